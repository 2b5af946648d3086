// Implementation of kvcache_sim.svg: see svg.cppm for the design.
module;

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

module kvcache_sim.svg;

namespace kvcache_sim::svg {

namespace {

// Fixed-point text of `v` with `decimals` decimals, locale-independent.
std::string fixed(double v, int decimals) {
  if (!std::isfinite(v)) return "0";
  std::array<char, 64> buf{};
  const auto [ptr, ec] =
      std::to_chars(buf.data(), buf.data() + buf.size(), v, std::chars_format::fixed, decimals);
  if (ec != std::errc{}) return "0";
  std::string s(buf.data(), ptr);
  if (s == "-0.0" || s == "-0") s.erase(0, 1);
  return s;
}

// Drops trailing zeros of a fixed-point text ("2.50" -> "2.5", "3.00" -> "3").
std::string trimmed(std::string s) {
  if (s.find('.') == std::string::npos) return s;
  while (s.back() == '0') s.pop_back();
  if (s.back() == '.') s.pop_back();
  return s;
}

std::string grouped(std::uint64_t n) {
  const std::string digits = std::to_string(n);
  std::string out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i != 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

// The pixel geometry of the plot area and the mapping of data to pixels.
struct Frame {
  double left = 0;
  double top = 0;
  double width = 0;
  double height = 0;
  double x_lo = 0;
  double x_hi = 1;
  double y_lo = 0;
  double y_hi = 1;
  bool x_log = false;

  [[nodiscard]] double px(double x) const {
    double t = 0;
    if (x_log) {
      t = (std::log10(std::max(x, std::numeric_limits<double>::min())) - std::log10(x_lo)) /
          (std::log10(x_hi) - std::log10(x_lo));
    } else {
      t = (x - x_lo) / (x_hi - x_lo);
    }
    return left + t * width;
  }
  [[nodiscard]] double py(double y) const {
    return top + height - (y - y_lo) / (y_hi - y_lo) * height;
  }
};

struct Range {
  double lo = 0;
  double hi = 1;
  std::vector<double> ticks;
};

// The data range of one coordinate over every series.
void data_range(const Chart& c, bool want_x, double& lo, double& hi, bool& any) {
  lo = std::numeric_limits<double>::max();
  hi = std::numeric_limits<double>::lowest();
  any = false;
  for (const Series& s : c.series) {
    for (const Point& p : s.points) {
      const double v = want_x ? p.x : p.y;
      if (!std::isfinite(v)) continue;
      lo = std::min(lo, v);
      hi = std::max(hi, v);
      any = true;
    }
  }
}

Range axis_range(const Chart& c, const Axis& axis, bool want_x) {
  double lo = 0;
  double hi = 0;
  bool any = false;
  data_range(c, want_x, lo, hi, any);
  if (axis.log) {
    if (!any || lo <= 0) {
      lo = 1;
      hi = 10;
    }
    if (axis.min && *axis.min > 0) lo = *axis.min;
    if (axis.max && *axis.max > lo) hi = *axis.max;
    // Widen the range to the nearest 1-2-5 values around the data.
    const double decade_lo = std::pow(10.0, std::floor(std::log10(lo)));
    double new_lo = decade_lo;
    for (const double m : {2.0, 5.0}) {
      if (m * decade_lo <= lo) new_lo = m * decade_lo;
    }
    const double decade_hi = std::pow(10.0, std::floor(std::log10(hi)));
    double new_hi = 10 * decade_hi;
    for (const double m : {5.0, 2.0, 1.0}) {
      if (m * decade_hi >= hi) new_hi = m * decade_hi;
    }
    if (!axis.min) lo = new_lo;
    if (!axis.max) hi = new_hi;
    if (hi <= lo) hi = lo * 10;
    return {lo, hi, log_ticks(lo, hi)};
  }
  if (!any) {
    lo = 0;
    hi = 1;
  }
  if (!axis.min && lo >= 0) lo = 0;
  if (axis.min) lo = *axis.min;
  if (axis.max) hi = *axis.max;
  if (hi <= lo) hi = lo + 1;
  std::vector<double> t = linear_ticks(lo, hi);
  Range r{lo, hi, {}};
  if (!axis.min && !t.empty()) r.lo = std::min(lo, t.front());
  if (!axis.max && !t.empty()) r.hi = std::max(hi, t.back());
  constexpr double eps = 1e-9;
  for (const double v : t) {
    if (v >= r.lo - eps * (r.hi - r.lo) && v <= r.hi + eps * (r.hi - r.lo)) r.ticks.push_back(v);
  }
  return r;
}

class Writer {
 public:
  void raw(std::string_view s) { out_ += s; }
  void line(double x1, double y1, double x2, double y2, std::string_view stroke,
            std::string_view extra = {}) {
    out_ += "<line x1=\"" + fixed(x1, 1) + "\" y1=\"" + fixed(y1, 1) + "\" x2=\"" + fixed(x2, 1) +
            "\" y2=\"" + fixed(y2, 1) + "\" stroke=\"" + escape(stroke) + "\"";
    if (!extra.empty()) {
      out_ += ' ';
      out_ += extra;
    }
    out_ += "/>\n";
  }
  void text(double x, double y, std::string_view content, std::string_view attrs) {
    out_ += "<text x=\"" + fixed(x, 1) + "\" y=\"" + fixed(y, 1) + "\"";
    if (!attrs.empty()) {
      out_ += ' ';
      out_ += attrs;
    }
    out_ += '>' + escape(content) + "</text>\n";
  }
  [[nodiscard]] std::string take() { return std::move(out_); }

 private:
  std::string out_;
};

}  // namespace

std::string escape(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (const char c : text) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      default:
        // XML 1.0 forbids most control characters, even escaped.
        if (static_cast<unsigned char>(c) < 0x20 && c != '\t' && c != '\n' && c != '\r') {
          out += ' ';
        } else {
          out += c;
        }
    }
  }
  return out;
}

std::vector<double> linear_ticks(double lo, double hi, int target) {
  std::vector<double> ticks;
  if (!(hi > lo) || !std::isfinite(lo) || !std::isfinite(hi) || target < 1) return ticks;
  const double raw_step = (hi - lo) / target;
  const double magnitude = std::pow(10.0, std::floor(std::log10(raw_step)));
  double step = 10 * magnitude;
  for (const double m : {1.0, 2.0, 2.5, 5.0, 10.0}) {
    if (m * magnitude >= raw_step) {
      step = m * magnitude;
      break;
    }
  }
  const double first = std::floor(lo / step);
  const double last = std::ceil(hi / step);
  for (double k = first; k <= last + 0.5; k += 1) {
    const double v = k * step;
    ticks.push_back(std::abs(v) < step * 1e-9 ? 0.0 : v);
  }
  return ticks;
}

std::vector<double> log_ticks(double lo, double hi) {
  std::vector<double> ticks;
  if (!(lo > 0) || !(hi >= lo) || !std::isfinite(hi)) return ticks;
  const int first = static_cast<int>(std::floor(std::log10(lo)));
  const int last = static_cast<int>(std::ceil(std::log10(hi)));
  for (int e = first; e <= last; ++e) {
    const double decade = std::pow(10.0, e);
    for (const double m : {1.0, 2.0, 5.0}) {
      const double v = m * decade;
      if (v >= lo * (1 - 1e-12) && v <= hi * (1 + 1e-12)) ticks.push_back(v);
    }
  }
  return ticks;
}

std::string tick_label(double v) {
  if (!std::isfinite(v)) return "?";
  const double a = std::abs(v);
  const std::string sign = v < 0 ? "-" : "";
  if (a >= 1e6) return sign + trimmed(fixed(a / 1e6, 1)) + "M";
  if (a >= 1e4) return sign + trimmed(fixed(a / 1e3, 1)) + "k";
  if (a == std::floor(a)) return sign + grouped(static_cast<std::uint64_t>(a));
  return sign + trimmed(fixed(a, 2));
}

std::string render(const Chart& c) {
  const double width = std::max(c.width, 320);
  const double height = std::max(c.height, 240);
  constexpr double kLeft = 74;
  constexpr double kRight = 262;  // the legend
  constexpr double kTop = 72;
  constexpr double kBottom = 58;

  const Range xr = axis_range(c, c.x, true);
  const Range yr = axis_range(c, c.y, false);
  Frame f;
  f.left = kLeft;
  f.top = kTop;
  f.width = width - kLeft - kRight;
  f.height = height - kTop - kBottom;
  f.x_lo = xr.lo;
  f.x_hi = xr.hi;
  f.y_lo = yr.lo;
  f.y_hi = yr.hi;
  f.x_log = c.x.log;

  Writer w;
  const std::string wd = fixed(width, 0);
  const std::string ht = fixed(height, 0);
  w.raw("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
  w.raw("<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"" + wd +
        "\" height=\"" + ht + "\" viewBox=\"0 0 " + wd + " " + ht +
        "\" font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\" font-size=\"12\">\n");
  w.raw("<title>" + escape(c.title) + "</title>\n");
  w.raw("<rect x=\"0\" y=\"0\" width=\"" + wd + "\" height=\"" + ht + "\" fill=\"#ffffff\"/>\n");
  w.raw("<defs><clipPath id=\"plot-area\"><rect x=\"" + fixed(f.left, 1) + "\" y=\"" +
        fixed(f.top - 2, 1) + "\" width=\"" + fixed(f.width + 2, 1) + "\" height=\"" +
        fixed(f.height + 4, 1) + "\"/></clipPath></defs>\n");

  // Title and subtitle.
  w.text(f.left + f.width / 2, 28, c.title,
         "text-anchor=\"middle\" font-size=\"17\" font-weight=\"bold\" fill=\"#222\"");
  if (!c.subtitle.empty()) {
    w.text(f.left + f.width / 2, 50, c.subtitle, "text-anchor=\"middle\" fill=\"#555\"");
  }

  // Grid and tick labels.
  w.raw("<g stroke-width=\"1\">\n");
  for (const double t : yr.ticks) {
    const double y = f.py(t);
    w.line(f.left, y, f.left + f.width, y, "#e4e4e4");
  }
  for (const double t : xr.ticks) {
    const double x = f.px(t);
    w.line(x, f.top, x, f.top + f.height, "#e4e4e4");
  }
  w.raw("</g>\n<g fill=\"#333\" font-size=\"11\">\n");
  for (const double t : yr.ticks) {
    w.text(f.left - 8, f.py(t) + 4, tick_label(t) + c.y.suffix, "text-anchor=\"end\"");
  }
  for (const double t : xr.ticks) {
    w.text(f.px(t), f.top + f.height + 17, tick_label(t) + c.x.suffix, "text-anchor=\"middle\"");
  }
  w.raw("</g>\n");

  // Axes and their titles.
  w.line(f.left, f.top + f.height, f.left + f.width, f.top + f.height, "#333");
  w.line(f.left, f.top, f.left, f.top + f.height, "#333");
  w.text(f.left + f.width / 2, height - 16, c.x.title, "text-anchor=\"middle\" fill=\"#222\"");
  {
    const double cx = 18;
    const double cy = f.top + f.height / 2;
    w.text(cx, cy, c.y.title,
           "text-anchor=\"middle\" fill=\"#222\" transform=\"rotate(-90 " + fixed(cx, 1) + " " +
               fixed(cy, 1) + ")\"");
  }

  // Series.
  w.raw("<g clip-path=\"url(#plot-area)\" fill=\"none\" stroke-width=\"2\" "
        "stroke-linejoin=\"round\" stroke-linecap=\"round\">\n");
  for (const Series& s : c.series) {
    if (s.points.empty()) continue;
    std::string pts;
    pts.reserve(s.points.size() * 14);
    for (const Point& p : s.points) {
      if (!pts.empty()) pts += ' ';
      pts += fixed(f.px(p.x), 1) + "," + fixed(f.py(p.y), 1);
    }
    w.raw("<polyline stroke=\"" + escape(s.color) + "\"" +
          (s.dashed ? std::string(" stroke-dasharray=\"7 4\"") : std::string()) + " points=\"" +
          pts + "\"/>\n");
  }
  w.raw("</g>\n");
  for (const Series& s : c.series) {
    if (!s.markers && s.point_labels.empty()) continue;
    w.raw("<g fill=\"" + escape(s.color) + "\">\n");
    for (std::size_t i = 0; i < s.points.size(); ++i) {
      const double x = f.px(s.points[i].x);
      const double y = f.py(s.points[i].y);
      if (s.markers) {
        w.raw("<circle cx=\"" + fixed(x, 1) + "\" cy=\"" + fixed(y, 1) + "\" r=\"4\"/>\n");
      }
      if (i < s.point_labels.size() && !s.point_labels[i].empty()) {
        w.text(x + 7, s.labels_below ? y + 16 : y - 7, s.point_labels[i], "font-size=\"11\"");
      }
    }
    w.raw("</g>\n");
  }

  // Legend.
  std::vector<LegendEntry> legend = c.legend;
  if (legend.empty()) {
    for (const Series& s : c.series) {
      if (!s.label.empty()) legend.push_back({s.label, s.color, s.dashed});
    }
  }
  const double lx = f.left + f.width + 18;
  double ly = f.top + 8;
  for (const LegendEntry& e : legend) {
    w.line(lx, ly, lx + 28, ly, e.color,
           std::string("stroke-width=\"2.5\"") +
               (e.dashed ? " stroke-dasharray=\"7 4\"" : ""));
    w.text(lx + 36, ly + 4, e.label, "fill=\"#222\"");
    ly += 22;
  }
  w.raw("</svg>\n");
  return w.take();
}

}  // namespace kvcache_sim::svg
