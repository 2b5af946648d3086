// kvcache_sim.svg: a small SVG line-chart writer for kvcache-sim's figures.
//
// Enough of SVG for the two charts the simulator draws, and nothing more: a
// Chart is a title, two axes and a list of Series (a polyline each, solid or
// dashed, optionally with a marker and a label at every point); render()
// turns it into one standalone SVG 1.1 document (valid XML, every text
// escaped) that any browser shows. The x axis may be logarithmic (base 10,
// ticks at 1, 2 and 5 times a power of ten); the y axis is linear.
//
// Layout, in pixels of the viewBox: the plot area is the canvas minus fixed
// margins (room for the tick labels on the left, the legend on the right,
// the title above and the x-axis title below). Axis ranges come from the
// data unless given; ticks are "nice" numbers (1, 2, 2.5 or 5 times a power
// of ten). Series are clipped to the plot area. Coordinates are written with
// one decimal through std::to_chars, so the output does not depend on the
// C locale.
//
// Thread safety: free functions over values; no shared state.
module;

#include <optional>
#include <string>
#include <string_view>
#include <vector>

export module kvcache_sim.svg;

export namespace kvcache_sim::svg {

struct Point {
  double x = 0;
  double y = 0;
};

struct Series {
  std::string label;     // legend text; empty: not in the legend
  std::string color;     // a CSS colour, e.g. "#1f77b4"
  bool dashed = false;
  bool markers = false;  // a small circle at each point
  std::vector<Point> points;
  // Optional text next to each point (same length as `points`, or empty).
  std::vector<std::string> point_labels;
  bool labels_below = false;  // point labels under the points (default above)
};

struct LegendEntry {
  std::string label;
  std::string color;
  bool dashed = false;
};

struct Axis {
  std::string title;
  std::optional<double> min;  // default: from the data (0 for a linear axis
  std::optional<double> max;  // whose data are all >= 0)
  bool log = false;           // base 10; REQUIRES: every value > 0
  std::string suffix;         // appended to each tick label, e.g. "%"
};

struct Chart {
  std::string title;
  std::string subtitle;       // one line under the title; may be empty
  Axis x;
  Axis y;
  std::vector<Series> series;
  // The legend: when empty, one entry per series with a label.
  std::vector<LegendEntry> legend;
  int width = 1060;
  int height = 560;
};

// Escapes & < > " ' for use in text and attribute values.
[[nodiscard]] std::string escape(std::string_view text);

// "Nice" tick values covering [lo, hi] (about `target` of them) on a linear
// axis: multiples of 1, 2, 2.5 or 5 times a power of ten.
[[nodiscard]] std::vector<double> linear_ticks(double lo, double hi, int target = 6);

// Ticks of a base-10 log axis over [lo, hi]: 1, 2 and 5 times the powers of
// ten within the range. REQUIRES: 0 < lo <= hi.
[[nodiscard]] std::vector<double> log_ticks(double lo, double hi);

// A short tick label: 0.5, 12, 2,500, 12k, 1.5M.
[[nodiscard]] std::string tick_label(double v);

// The whole SVG document.
[[nodiscard]] std::string render(const Chart& chart);

}  // namespace kvcache_sim::svg
