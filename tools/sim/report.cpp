// kvcache_sim: the command line, the report (table, JSON, charts) and run()
// (see sim.cppm).
module;

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <fstream>
#include <functional>
#include <iomanip>
#include <optional>
#include <ostream>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

module kvcache_sim;

import kvcache;
import kvcache_plan;  // the size and count parsers, presets and number formatting
import kvcache_sim.svg;

namespace kvcache_sim {

using kvcache::Bytes;
using kvcache::ModelConfig;
using kvcache::Tokens;

namespace {

constexpr std::size_t kMaxPageSizes = 16;
constexpr std::size_t kChartPoints = 500;  // per line of the timeline chart and JSON
constexpr double kMaxRate = 500;

std::string in_quotes(std::string_view s) { return "'" + std::string(s) + "'"; }

std::string fixed(double v, int decimals) {
  if (!std::isfinite(v)) return "nan";
  std::array<char, 64> buf{};
  const auto [ptr, ec] =
      std::to_chars(buf.data(), buf.data() + buf.size(), v, std::chars_format::fixed, decimals);
  if (ec != std::errc{}) return "nan";
  return {buf.data(), ptr};
}

std::string pct(double share) { return fixed(share * 100.0, 1) + " %"; }

// 1.5 GiB, 64.0 KiB, 512 B: one decimal, truncated like kvcache-plan's.
std::string short_bytes(double bytes) {
  constexpr std::array<std::string_view, 6> names{"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  std::size_t k = 0;
  double v = bytes;
  while (k + 1 < names.size() && v >= 1024.0) {
    v /= 1024.0;
    ++k;
  }
  if (k == 0) return kvcache_plan::group_digits(static_cast<std::uint64_t>(bytes)) + " B";
  return fixed(std::floor(v * 10.0) / 10.0, 1) + " " + std::string(names[k]);
}

std::string count(std::uint64_t n) { return kvcache_plan::group_digits(n); }

// ---- Command-line values ---------------------------------------------------------

double parse_rate(std::string_view flag, std::string_view text) {
  double v = 0;
  const char* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, v, std::chars_format::fixed);
  if (text.empty() || ec != std::errc{} || ptr != end || text.starts_with('-')) {
    throw UsageError(std::string(flag) + ": " + in_quotes(text) +
                     " is not a positive decimal number (e.g. 0.5)");
  }
  if (!(v > 0) || v > kMaxRate) {
    throw UsageError(std::string(flag) + " must be more than 0 and at most 500 arrivals per step");
  }
  return v;
}

std::vector<Tokens> parse_page_sizes(std::string_view text) {
  std::vector<Tokens> sizes;
  std::string_view rest = text;
  while (true) {
    const std::size_t comma = rest.find(',');
    const std::string_view item = rest.substr(0, comma);
    const std::uint64_t n = kvcache_plan::parse_count("--page-size", item);
    if (n == 0) throw UsageError("--page-size must be at least 1 token");
    if (std::ranges::find(sizes, Tokens{n}) != sizes.end()) {
      throw UsageError("--page-size lists " + std::to_string(n) + " twice");
    }
    sizes.emplace_back(n);
    if (comma == std::string_view::npos) break;
    rest = rest.substr(comma + 1);
  }
  if (sizes.size() > kMaxPageSizes) {
    throw UsageError("--page-size: at most " + std::to_string(kMaxPageSizes) + " sizes");
  }
  return sizes;
}

// ---- JSON --------------------------------------------------------------------

using kvcache_plan::json_string;

// A streaming JSON writer: nested objects and arrays, two-space indentation,
// arrays of numbers on one line.
class JsonWriter {
 public:
  JsonWriter& key(std::string_view k) {
    separate();
    out_ += json_string(k) + ": ";
    pending_key_ = true;
    return *this;
  }
  JsonWriter& begin_object() { return open('{', false); }
  JsonWriter& end_object() { return close('}'); }
  JsonWriter& begin_array(bool one_line = false) { return open('[', one_line); }
  JsonWriter& end_array() { return close(']'); }
  JsonWriter& value(std::uint64_t v) { return scalar(std::to_string(v)); }
  JsonWriter& value(double v, int decimals = 6) {
    return scalar(std::isfinite(v) ? fixed(v, decimals) : "null");
  }
  JsonWriter& value(std::string_view v) { return scalar(json_string(v)); }
  JsonWriter& value(const char* v) { return scalar(json_string(v)); }
  JsonWriter& value(bool v) { return scalar(v ? "true" : "false"); }
  JsonWriter& null() { return scalar("null"); }

  template <class T>
    requires(!std::is_array_v<T>)
  JsonWriter& field(std::string_view k, const T& v) {
    key(k);
    return value(v);
  }
  // A string literal, taken as a string_view rather than decayed to a pointer.
  JsonWriter& field(std::string_view k, std::string_view v) {
    key(k);
    return value(v);
  }
  JsonWriter& field(std::string_view k, double v, int decimals) {
    key(k);
    return value(v, decimals);
  }

  [[nodiscard]] std::string str() const { return out_ + "\n"; }

 private:
  struct Level {
    bool one_line = false;
    bool first = true;
  };
  void separate() {
    if (pending_key_) {
      pending_key_ = false;
      return;
    }
    if (levels_.empty()) return;
    Level& l = levels_.back();
    if (!l.first) out_ += l.one_line ? ", " : ",";
    if (!l.one_line) out_ += "\n" + std::string(levels_.size() * 2, ' ');
    l.first = false;
  }
  JsonWriter& scalar(const std::string& text) {
    separate();
    out_ += text;
    return *this;
  }
  JsonWriter& open(char c, bool one_line) {
    const bool parent_one_line = !levels_.empty() && levels_.back().one_line;
    separate();
    out_ += c;
    levels_.push_back({one_line || parent_one_line, true});
    return *this;
  }
  JsonWriter& close(char c) {
    const Level l = levels_.back();
    levels_.pop_back();
    if (!l.one_line && !l.first) out_ += "\n" + std::string(levels_.size() * 2, ' ');
    out_ += c;
    return *this;
  }

  std::string out_;
  std::vector<Level> levels_;
  bool pending_key_ = false;
};

void json_mode(JsonWriter& j, const ModeResult& m, bool with_timeline) {
  j.begin_object();
  j.field("mode", mode_key(m.mode));
  j.field("label", mode_label(m.mode));
  if (is_paged(m.mode)) {
    j.field("page_size", m.page_size.count());
    j.field("total_pages", m.total_pages);
  }
  j.field("steps", m.steps);
  j.field("drained", m.drained);
  j.field("arrived", m.arrived);
  j.field("admitted", m.admitted);
  j.field("finished", m.finished);
  j.field("rejected", m.rejected);
  j.field("preemptions", m.preemptions);
  j.field("running_at_end", m.running_at_end);
  j.field("queued_at_end", m.queued_at_end);
  j.field("generated_tokens", m.generated_tokens);
  j.field("mean_batch", m.mean_batch, 3);
  j.field("peak_batch", m.peak_batch);
  j.field("mean_kv_share", m.mean_kv_share);
  j.field("peak_kv_share", m.peak_kv_share);
  j.field("mean_reserved_share", m.mean_reserved_share);
  j.field("peak_reserved_share", m.peak_reserved_share);
  j.field("internal_fragmentation", m.internal_fragmentation);
  if (is_paged(m.mode)) {
    j.field("mean_page_table_entries", m.mean_page_table_entries, 1);
    j.field("peak_page_table_entries", m.peak_page_table_entries);
  }
  if (m.mode == Mode::paged_prefix) {
    j.field("prefix_hits", m.prefix_hits);
    j.field("prefix_misses", m.prefix_misses);
    j.field("prefix_hit_rate", m.prefix_hit_rate);
    j.field("mean_saved_bytes", m.mean_saved_bytes, 0);
    j.field("peak_saved_bytes", m.peak_saved_bytes);
    j.field("mean_saved_share", m.mean_saved_share);
    j.field("peak_saved_share", m.peak_saved_share);
    j.field("pages_saved_cumulative", m.pages_saved);
    j.field("cow_copies", m.cow_copies);
    j.field("prefixes_evicted", m.prefixes_evicted);
  }
  if (with_timeline) {
    const std::vector<TimelinePoint> pts = downsample(m.timeline, kChartPoints);
    j.key("timeline").begin_object();
    j.field("points", static_cast<std::uint64_t>(pts.size()));
    j.field("steps_per_point",
            static_cast<std::uint64_t>(pts.empty() ? 0 : (m.timeline.size() + pts.size() - 1) /
                                                             pts.size()));
    j.key("step").begin_array(true);
    for (const TimelinePoint& p : pts) j.value(p.step, 1);
    j.end_array();
    j.key("kv_share").begin_array(true);
    for (const TimelinePoint& p : pts) j.value(p.kv_share, 5);
    j.end_array();
    j.key("reserved_share").begin_array(true);
    for (const TimelinePoint& p : pts) j.value(p.reserved_share, 5);
    j.end_array();
    j.end_object();
  }
  j.end_object();
}

// ---- Text ----------------------------------------------------------------------

std::string model_text(const Options& o) {
  const ModelConfig& c = o.sim.model;
  std::string who = o.model_name == "custom" ? "a custom model" : o.model_name + "'s shape";
  return who + " (" + std::to_string(c.num_layers) + (c.num_layers == 1 ? " layer, " : " layers, ") +
         std::to_string(c.num_kv_heads) + (c.num_kv_heads == 1 ? " KV head of " : " KV heads of ") +
         std::to_string(c.head_dim) + ", " +
         std::to_string(c.dtype_bytes) + "-byte elements)";
}

void labelled(std::ostringstream& os, std::string_view label, const std::string& value) {
  os << "  " << std::left << std::setw(18) << label << value << '\n';
}

std::string workload_line(const Report& r) {
  const Options& o = r.options;
  if (o.trace) return "trace " + *o.trace + ": " + count(r.workload.requests) + " requests";
  return "embedded \"" + std::string(workload_name(o.workload.kind)) + "\", seed " +
         std::to_string(o.workload.seed) + ": " + count(r.workload.requests) +
         " requests, Poisson arrivals " + fixed(o.workload.rate, 2) + " per step";
}

std::string horizon_text(const Options& o) {
  if (o.sim.max_steps == 0) {
    return "until every request has finished or been rejected (at most " + count(kMaxSteps) +
           " steps)";
  }
  return count(o.sim.max_steps) + " steps (one decode token per running request per step)";
}

}  // namespace

// ---- Command line ------------------------------------------------------------------

Options parse_args(std::span<const std::string_view> args) {
  struct Raw {
    std::optional<std::string_view> trace, workload, requests, rate, seed, sys_share, sys_tokens,
        steps, model, layers, kv_heads, head_dim, dtype_bytes, budget, max_seq_len, page_size,
        json, svg, sweep_svg;
    bool quiet = false, help = false;
  } raw;
  struct Flag {
    std::string_view name;
    std::optional<std::string_view> Raw::*value;  // null for a switch
    bool Raw::*on;                                // null for an option with a value
  };
  const std::array flags{
      Flag{"--trace", &Raw::trace, nullptr},
      Flag{"--workload", &Raw::workload, nullptr},
      Flag{"--requests", &Raw::requests, nullptr},
      Flag{"--rate", &Raw::rate, nullptr},
      Flag{"--seed", &Raw::seed, nullptr},
      Flag{"--system-prompt-share", &Raw::sys_share, nullptr},
      Flag{"--system-prompt-tokens", &Raw::sys_tokens, nullptr},
      Flag{"--steps", &Raw::steps, nullptr},
      Flag{"--model", &Raw::model, nullptr},
      Flag{"--layers", &Raw::layers, nullptr},
      Flag{"--kv-heads", &Raw::kv_heads, nullptr},
      Flag{"--head-dim", &Raw::head_dim, nullptr},
      Flag{"--dtype-bytes", &Raw::dtype_bytes, nullptr},
      Flag{"--budget", &Raw::budget, nullptr},
      Flag{"--max-seq-len", &Raw::max_seq_len, nullptr},
      Flag{"--page-size", &Raw::page_size, nullptr},
      Flag{"--json", &Raw::json, nullptr},
      Flag{"--svg", &Raw::svg, nullptr},
      Flag{"--sweep-svg", &Raw::sweep_svg, nullptr},
      Flag{"--quiet", nullptr, &Raw::quiet},
      Flag{"--help", nullptr, &Raw::help},
  };

  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string_view arg = args[i];
    if (arg == "-h" || arg == "-q") {
      (arg == "-h" ? raw.help : raw.quiet) = true;
      continue;
    }
    if (!arg.starts_with("--")) {
      throw UsageError("unexpected argument " + in_quotes(arg) +
                       " (options start with --; try --help)");
    }
    const std::size_t eq = arg.find('=');
    const std::string_view name = arg.substr(0, eq);
    const auto flag = std::ranges::find(flags, name, &Flag::name);
    if (flag == flags.end()) throw UsageError("unknown option " + in_quotes(name) + " (try --help)");
    if (flag->on != nullptr) {
      if (eq != std::string_view::npos) throw UsageError(std::string(name) + " takes no value");
      raw.*(flag->on) = true;
      continue;
    }
    std::string_view value;
    if (eq != std::string_view::npos) {
      value = arg.substr(eq + 1);
    } else if (i + 1 < args.size() && !args[i + 1].starts_with("--")) {
      value = args[++i];
    } else {
      throw UsageError("missing value for " + std::string(name));
    }
    if (value.empty()) throw UsageError("missing value for " + std::string(name));
    std::optional<std::string_view>& slot = raw.*(flag->value);
    if (slot.has_value()) throw UsageError(std::string(name) + " given twice");
    slot = value;
  }

  Options o;
  o.quiet = raw.quiet;
  if (raw.help) {
    o.action = Action::help;
    return o;
  }
  try {
    // The model: a kvcache-plan preset, or every dimension.
    const bool dims = raw.layers || raw.kv_heads || raw.head_dim;
    if (raw.model && dims) {
      throw UsageError("--model cannot be combined with --layers, --kv-heads or --head-dim");
    }
    std::uint32_t dtype = 2;
    if (raw.dtype_bytes) dtype = kvcache_plan::parse_u32("--dtype-bytes", *raw.dtype_bytes);
    if (dims) {
      if (!raw.layers || !raw.kv_heads || !raw.head_dim) {
        throw UsageError("a custom model needs all of --layers, --kv-heads and --head-dim");
      }
      o.model_name = "custom";
      o.sim.model = ModelConfig{kvcache_plan::parse_u32("--layers", *raw.layers),
                                kvcache_plan::parse_u32("--kv-heads", *raw.kv_heads),
                                kvcache_plan::parse_u32("--head-dim", *raw.head_dim), dtype};
    } else {
      const std::string_view name = raw.model.value_or("Llama-3.1-8B");
      const kvcache_plan::Preset* p = kvcache_plan::find_preset(name);
      if (p == nullptr) {
        std::string names;
        for (const kvcache_plan::Preset& q : kvcache_plan::presets()) {
          names += (names.empty() ? "" : ", ") + std::string(q.name);
        }
        throw UsageError("unknown model " + in_quotes(name) + "; built-in models: " + names +
                         " (or give --layers, --kv-heads and --head-dim)");
      }
      o.model_name = std::string(p->name);
      o.sim.model = ModelConfig{p->layers, p->kv_heads, p->head_dim, dtype};
    }
    try {
      o.sim.model.validate();
    } catch (const std::invalid_argument& e) {
      throw UsageError(std::string("invalid model configuration: ") + e.what());
    }

    if (raw.budget) o.sim.budget = kvcache_plan::parse_size("--budget", *raw.budget);
    if (o.sim.budget.count() == 0) throw UsageError("--budget must be more than 0 B");
    if (raw.max_seq_len) {
      o.sim.max_seq_len = kvcache_plan::parse_tokens("--max-seq-len", *raw.max_seq_len);
    }
    if (o.sim.max_seq_len.count() < 2 || o.sim.max_seq_len.count() > 100'000'000) {
      throw UsageError("--max-seq-len must be 2..100,000,000 tokens");
    }
    o.workload.max_seq_len = o.sim.max_seq_len;
    if (raw.page_size) o.page_sizes = parse_page_sizes(*raw.page_size);
    o.sim.page_size = o.page_sizes.front();

    // The workload: a trace, or the embedded generator's knobs.
    if (raw.trace) {
      const auto knobs = std::to_array<std::pair<std::string_view, bool>>(
          {{"--workload", raw.workload.has_value()},
           {"--requests", raw.requests.has_value()},
           {"--rate", raw.rate.has_value()},
           {"--seed", raw.seed.has_value()},
           {"--system-prompt-share", raw.sys_share.has_value()},
           {"--system-prompt-tokens", raw.sys_tokens.has_value()}});
      for (const auto& [knob, given] : knobs) {
        if (given) {
          throw UsageError(std::string(knob) +
                           " cannot be combined with --trace (it shapes the embedded workload)");
        }
      }
      o.trace = std::string(*raw.trace);
    }
    if (raw.workload) {
      if (*raw.workload == "mixed") {
        o.workload.kind = WorkloadKind::mixed;
      } else if (*raw.workload == "sharegpt") {
        o.workload.kind = WorkloadKind::sharegpt;
      } else if (*raw.workload == "alpaca") {
        o.workload.kind = WorkloadKind::alpaca;
      } else {
        throw UsageError("unknown --workload " + in_quotes(*raw.workload) +
                         " (mixed, sharegpt or alpaca)");
      }
    }
    if (raw.requests) {
      o.workload.requests = kvcache_plan::parse_count("--requests", *raw.requests);
      if (o.workload.requests == 0 || o.workload.requests > 10'000'000) {
        throw UsageError("--requests must be 1..10,000,000");
      }
    }
    if (raw.rate) o.workload.rate = parse_rate("--rate", *raw.rate);
    if (raw.seed) o.workload.seed = kvcache_plan::parse_count("--seed", *raw.seed);
    if (raw.sys_share) {
      const std::uint64_t share = kvcache_plan::parse_count("--system-prompt-share", *raw.sys_share);
      if (share > 100) throw UsageError("--system-prompt-share is a percentage (0..100)");
      o.workload.system_prompt_pct = static_cast<std::uint32_t>(share);
    }
    if (raw.sys_tokens) {
      o.workload.system_prompt =
          kvcache_plan::parse_tokens("--system-prompt-tokens", *raw.sys_tokens);
    }
    if (!o.trace && o.workload.system_prompt_pct > 0) {
      const std::uint64_t sys = o.workload.system_prompt.count();
      const std::uint64_t room = o.sim.max_seq_len.count() - 2;
      if (sys == 0 || sys > room) {
        throw UsageError("--system-prompt-tokens must be 1.." + count(room) +
                         " (--max-seq-len minus a 1-token prompt and a 1-token output)");
      }
    }

    if (raw.steps) {
      o.sim.max_steps = kvcache_plan::parse_count("--steps", *raw.steps);
      if (o.sim.max_steps > kMaxSteps) {
        throw UsageError("--steps must be at most " + count(kMaxSteps) +
                         " (0: until every request is done)");
      }
    } else {
      o.sim.max_steps = o.trace ? 0 : kDefaultSteps;
    }

    if (raw.json) o.json_path = std::string(*raw.json);
    if (raw.svg) o.svg_path = std::string(*raw.svg);
    if (raw.sweep_svg) {
      if (o.page_sizes.size() < 2) {
        throw UsageError("--sweep-svg needs several page sizes (e.g. --page-size 8,16,32)");
      }
      o.sweep_svg_path = std::string(*raw.sweep_svg);
    }
  } catch (const kvcache_plan::UsageError& e) {
    throw UsageError(e.what());  // the shared parsers' messages name the flag
  }
  return o;
}

// ---- The report ----------------------------------------------------------------

Report make_report(const Options& options, std::span<const Request> workload,
                   const std::function<void(double, std::string_view)>& progress) {
  Report rep;
  rep.options = options;
  rep.workload = summarize(workload);
  rep.workload_source = options.trace ? *options.trace
                                      : "embedded " + std::string(workload_name(
                                                          options.workload.kind)) +
                                            " (seed " + std::to_string(options.workload.seed) +
                                            ")";
  std::vector<std::pair<Mode, Tokens>> runs;
  for (const Mode m : kModes) runs.emplace_back(m, options.page_sizes.front());
  for (std::size_t i = 1; i < options.page_sizes.size(); ++i) {
    runs.emplace_back(Mode::paged, options.page_sizes[i]);
    runs.emplace_back(Mode::paged_prefix, options.page_sizes[i]);
  }
  // A page size the library rejects (e.g. more pages than a PageId can
  // name) is a usage error; check each before running anything.
  for (const Tokens page : options.page_sizes) {
    try {
      const kvcache::PagedKVCache probe(options.sim.model, options.sim.budget, page,
                                        kvcache::Storage::none);
    } catch (const std::invalid_argument& e) {
      throw UsageError("--page-size " + std::to_string(page.count()) + ": " + e.what());
    }
  }
  std::vector<ModeResult> results;
  for (std::size_t k = 0; k < runs.size(); ++k) {
    const auto [mode, page] = runs[k];
    SimParams p = options.sim;
    p.page_size = page;
    const std::string what = std::string(mode_label(mode)) +
                             (is_paged(mode) ? ", page " + std::to_string(page.count()) : "") +
                             " (" + std::to_string(k + 1) + "/" + std::to_string(runs.size()) +
                             ")";
    Progress sub;
    if (progress) {
      sub = [&](double f) {
        progress((static_cast<double>(k) + f) / static_cast<double>(runs.size()), what);
      };
    }
    results.push_back(simulate(mode, p, workload, sub));
  }
  rep.modes.assign(results.begin(), results.begin() + 4);
  if (options.page_sizes.size() > 1) {
    for (std::size_t k = 0; k < results.size(); ++k) {
      if (!is_paged(results[k].mode)) continue;
      ModeResult m = results[k];
      m.timeline.clear();
      m.timeline.shrink_to_fit();
      rep.sweep.push_back(std::move(m));
    }
    // (page size, mode) is unique, so a plain sort is stable enough.
    std::ranges::sort(rep.sweep, [](const ModeResult& a, const ModeResult& b) {
      return a.page_size != b.page_size ? a.page_size < b.page_size : a.mode < b.mode;
    });
  }
  return rep;
}

std::string render_text(const Report& r) {
  const Options& o = r.options;
  const ModelConfig& c = o.sim.model;
  std::ostringstream os;
  os << "kvcache-sim: continuous batching on " << model_text(o) << "\n";
  const Bytes bpt = c.bytes_per_token();
  labelled(os, "KV budget",
           short_bytes(static_cast<double>(o.sim.budget.count())) + " = " +
               count(c.max_tokens(o.sim.budget).count()) + " tokens of " +
               short_bytes(static_cast<double>(bpt.count())));
  labelled(os, "max sequence",
           count(o.sim.max_seq_len.count()) + " tokens (what \"basic, max\" reserves per request)");
  {
    const Bytes page = c.bytes_per_page(o.sim.page_size);
    const std::uint64_t pages = o.sim.budget.count() / page.count();
    labelled(os, "pages",
             count(o.sim.page_size.count()) + " tokens of one layer = " +
                 short_bytes(static_cast<double>(page.count())) + "; " + count(pages) +
                 " in the budget");
  }
  labelled(os, "workload", workload_line(r));
  const WorkloadSummary& w = r.workload;
  for (const DatasetSummary& d : w.datasets) {
    labelled(os, "",
             "  " + d.name + ": " + count(d.requests) + " requests, mean prompt " +
                 fixed(d.mean_prompt, 1) + (w.with_prefix > 0 ? " (beyond the prefix)" : "") +
                 ", mean output " + fixed(d.mean_output, 1) + " tokens");
  }
  if (w.with_prefix > 0) {
    labelled(os, "",
             "  " + count(w.with_prefix) + " (" +
                 fixed(100.0 * static_cast<double>(w.with_prefix) /
                           static_cast<double>(w.requests), 1) +
                 " %) carry a shared prefix" +
                 (o.trace ? " (" + count(w.prefixes) + " distinct)"
                          : " (a " + count(o.workload.system_prompt.count()) +
                                "-token system prompt)") +
                 "; mean prompt " + fixed(w.mean_prompt, 1) + " tokens in all");
  }
  labelled(os, "horizon", horizon_text(o));
  os << '\n';

  // The comparison, one column per mode.
  constexpr int kLabel = 34;
  constexpr int kCol = 16;
  const auto row = [&](std::string_view label, auto cell) {
    os << std::left << std::setw(kLabel) << label << std::right;
    for (const ModeResult& m : r.modes) os << std::setw(kCol) << cell(m);
    os << '\n';
  };
  os << std::left << std::setw(kLabel) << "" << std::right;
  for (const ModeResult& m : r.modes) os << std::setw(kCol) << mode_label(m.mode);
  os << '\n';
  const auto dash = std::string("-");
  row("requests finished", [&](const ModeResult& m) { return count(m.finished); });
  row("rejected (can never fit)", [&](const ModeResult& m) { return count(m.rejected); });
  row("running / waiting at the end", [&](const ModeResult& m) {
    return count(m.running_at_end) + " / " + count(m.queued_at_end);
  });
  row("preemptions (recompute)", [&](const ModeResult& m) { return count(m.preemptions); });
  row("batch size, mean", [&](const ModeResult& m) { return fixed(m.mean_batch, 1); });
  row("batch size, peak", [&](const ModeResult& m) { return count(m.peak_batch); });
  row("memory holding tokens, mean", [&](const ModeResult& m) { return pct(m.mean_kv_share); });
  row("memory holding tokens, peak", [&](const ModeResult& m) { return pct(m.peak_kv_share); });
  row("memory reserved, mean", [&](const ModeResult& m) { return pct(m.mean_reserved_share); });
  row("internal fragmentation",
      [&](const ModeResult& m) { return pct(m.internal_fragmentation); });
  row("page-table entries, mean", [&](const ModeResult& m) {
    return is_paged(m.mode)
               ? count(static_cast<std::uint64_t>(std::llround(m.mean_page_table_entries)))
               : dash;
  });
  row("prefix hit rate", [&](const ModeResult& m) {
    return m.mode == Mode::paged_prefix ? pct(m.prefix_hit_rate) : dash;
  });
  row("sharing saved, mean", [&](const ModeResult& m) {
    return m.mode == Mode::paged_prefix ? pct(m.mean_saved_share) : dash;
  });
  row("sharing saved, peak", [&](const ModeResult& m) {
    return m.mode == Mode::paged_prefix ? short_bytes(static_cast<double>(m.peak_saved_bytes))
                                        : dash;
  });
  os << "\nMemory holding tokens = real token KV held by running requests / budget, each step;\n"
        "internal fragmentation = reserved (or page-held) memory not holding tokens.\n"
        "The PagedAttention paper (Kwon et al., SOSP 2023, fig. 2) measured 20.4-38.2 % of KV\n"
        "memory holding tokens in contiguous-reservation servers and 96.3 % in vLLM.\n";

  if (!r.sweep.empty()) {
    os << "\nPage-size sweep (the paged modes; fragmentation against page-table size):\n";
    os << std::right << std::setw(10) << "page size" << "  " << std::left << std::setw(15)
       << "mode" << std::right << std::setw(10) << "finished" << std::setw(16)
       << "holding tokens" << std::setw(12) << "int. frag." << std::setw(20)
       << "page-table entries" << std::setw(13) << "preemptions" << '\n';
    for (const ModeResult& m : r.sweep) {
      os << std::right << std::setw(10) << count(m.page_size.count()) << "  " << std::left
         << std::setw(15) << mode_label(m.mode) << std::right << std::setw(10)
         << count(m.finished) << std::setw(16) << pct(m.mean_kv_share) << std::setw(12)
         << pct(m.internal_fragmentation) << std::setw(20)
         << count(static_cast<std::uint64_t>(std::llround(m.mean_page_table_entries)))
         << std::setw(13)
         << count(m.preemptions) << '\n';
    }
    os << "(page-table entries: mean over steps of the block-table entries of running "
          "requests, 4 bytes each)\n";
  }
  return os.str();
}

std::string render_json(const Report& r) {
  const Options& o = r.options;
  const ModelConfig& c = o.sim.model;
  JsonWriter j;
  j.begin_object();
  j.field("tool", "kvcache-sim");
  j.key("model").begin_object();
  j.field("name", o.model_name);
  j.field("num_layers", std::uint64_t{c.num_layers});
  j.field("num_kv_heads", std::uint64_t{c.num_kv_heads});
  j.field("head_dim", std::uint64_t{c.head_dim});
  j.field("dtype_bytes", std::uint64_t{c.dtype_bytes});
  j.field("bytes_per_token", c.bytes_per_token().count());
  j.field("max_seq_len", o.sim.max_seq_len.count());
  j.end_object();
  j.field("budget_bytes", o.sim.budget.count());
  j.field("budget_tokens", c.max_tokens(o.sim.budget).count());
  j.field("page_size", o.sim.page_size.count());
  j.field("bytes_per_page", c.bytes_per_page(o.sim.page_size).count());
  j.field("horizon_steps", o.sim.max_steps);
  j.key("workload").begin_object();
  j.field("source", o.trace ? "trace" : "embedded");
  if (o.trace) {
    j.field("trace", *o.trace);
  } else {
    j.field("kind", workload_name(o.workload.kind));
    j.field("seed", o.workload.seed);
    j.field("arrival_rate", o.workload.rate, 3);
    j.field("system_prompt_pct", std::uint64_t{o.workload.system_prompt_pct});
    j.field("system_prompt_tokens", o.workload.system_prompt.count());
  }
  const WorkloadSummary& w = r.workload;
  j.field("requests", w.requests);
  j.field("with_prefix", w.with_prefix);
  j.field("distinct_prefixes", w.prefixes);
  j.field("mean_prompt_tokens", w.mean_prompt, 2);
  j.field("mean_output_tokens", w.mean_output, 2);
  j.field("max_prompt_tokens", w.max_prompt);
  j.field("max_output_tokens", w.max_output);
  j.field("first_arrival", w.first_arrival);
  j.field("last_arrival", w.last_arrival);
  j.key("datasets").begin_array();
  for (const DatasetSummary& d : w.datasets) {
    j.begin_object();
    j.field("name", d.name);
    j.field("requests", d.requests);
    j.field("mean_prompt_tokens_beyond_prefix", d.mean_prompt, 2);
    j.field("mean_output_tokens", d.mean_output, 2);
    j.end_object();
  }
  j.end_array();
  j.end_object();
  j.key("modes").begin_array();
  for (const ModeResult& m : r.modes) json_mode(j, m, true);
  j.end_array();
  if (!r.sweep.empty()) {
    j.key("page_size_sweep").begin_array();
    for (const ModeResult& m : r.sweep) json_mode(j, m, false);
    j.end_array();
  }
  j.key("reference").begin_object();
  j.field("source", "Kwon et al., Efficient Memory Management for Large Language Model Serving "
                    "with PagedAttention, SOSP 2023, figure 2");
  j.key("contiguous_token_share_pct").begin_array(true);
  j.value(20.4, 1).value(38.2, 1);
  j.end_array();
  j.field("vllm_token_share_pct", 96.3, 1);
  j.end_object();
  j.end_object();
  return j.str();
}

namespace {

constexpr std::array<std::string_view, 4> kColors{"#d62728", "#ff7f0e", "#1f77b4", "#2ca02c"};

std::string_view mode_color(Mode m) { return kColors[static_cast<std::size_t>(m)]; }

std::string chart_subtitle(const Report& r) {
  const Options& o = r.options;
  return (o.model_name == "custom" ? std::string("custom model") : o.model_name) + ", " +
         short_bytes(static_cast<double>(o.sim.budget.count())) + " budget, " +
         (o.trace ? "trace " + *o.trace : "embedded " + std::string(workload_name(o.workload.kind))) +
         " workload (" + count(r.workload.requests) + " requests)";
}

}  // namespace

std::string render_timeline_svg(const Report& r) {
  svg::Chart chart;
  chart.title = "KV-cache memory over time: holding tokens vs reserved";
  chart.subtitle =
      chart_subtitle(r) + ", page size " + count(r.options.sim.page_size.count()) + " tokens";
  chart.x.title = "simulated time (decode steps)";
  chart.y.title = "share of the KV-cache budget";
  chart.y.suffix = "%";
  chart.y.min = 0;
  chart.y.max = 100;
  for (const ModeResult& m : r.modes) {
    const std::vector<TimelinePoint> pts = downsample(m.timeline, kChartPoints);
    svg::Series tokens;
    svg::Series reserved;
    tokens.color = reserved.color = std::string(mode_color(m.mode));
    reserved.dashed = true;
    for (const TimelinePoint& p : pts) {
      tokens.points.push_back({p.step, p.kv_share * 100.0});
      reserved.points.push_back({p.step, p.reserved_share * 100.0});
    }
    chart.series.push_back(std::move(reserved));
    chart.series.push_back(std::move(tokens));
    chart.legend.push_back({std::string(mode_label(m.mode)) + " (mean " + pct(m.mean_kv_share) + ")",
                            std::string(mode_color(m.mode)), false});
  }
  chart.legend.push_back({"", "none", false});
  chart.legend.push_back({"holding token KV", "#555555", false});
  chart.legend.push_back({"reserved / pages held", "#555555", true});
  return svg::render(chart);
}

std::string render_sweep_svg(const Report& r) {
  svg::Chart chart;
  chart.title = "Page-size trade-off: internal fragmentation vs page-table size";
  chart.subtitle = chart_subtitle(r);
  chart.x.title = "page-table entries (mean block-table entries of running requests, log scale)";
  chart.x.log = true;
  chart.y.title = "internal fragmentation";
  chart.y.suffix = "%";
  for (const Mode mode : {Mode::paged, Mode::paged_prefix}) {
    svg::Series s;
    s.label = std::string(mode_label(mode));
    s.color = std::string(mode_color(mode));
    s.markers = true;
    s.labels_below = mode == Mode::paged;  // the lower line: keep the labels apart
    for (const ModeResult& m : r.sweep) {
      if (m.mode != mode || m.mean_page_table_entries <= 0) continue;
      s.points.push_back({m.mean_page_table_entries, m.internal_fragmentation * 100.0});
      s.point_labels.push_back(std::to_string(m.page_size.count()) + " tok/page");
    }
    chart.series.push_back(std::move(s));
  }
  return svg::render(chart);
}

std::string help_text() {
  return R"(Usage: kvcache-sim [options]

A discrete-step serving simulator on kvcache: replays a workload through a
continuous-batching loop (FCFS admission, one decode token per running request
per step, preemption of the newest request when the paged cache runs out of
pages) and compares, on the same model, budget and workload:
  basic, max      contiguous reservation of the max sequence length per request
  basic, oracle   contiguous reservation of exactly prompt + output
  paged           pages on demand (PagedKVCache)
  paged + prefix  as paged, requests with the same prefix share its pages

Workload (default: the embedded synthetic one, 2,000 requests):
  --trace FILE               replay a trace: CSV (arrival,prompt_tokens,
                             output_tokens[,prefix_id,prefix_tokens]) or JSONL
                             ({"arrival":0,"prompt_tokens":161,...}), one
                             request per line
  --workload NAME            mixed (default; ShareGPT- and Alpaca-like, 50/50),
                             sharegpt or alpaca
  --requests N               embedded: number of requests (default 2000)
  --rate R                   embedded: mean arrivals per step (default 1.0)
  --seed N                   embedded: random seed (default 42)
  --system-prompt-share PCT  embedded: requests with the shared system prompt
                             (default 50)
  --system-prompt-tokens N   embedded: its length (default 200)

Serving:
  --model NAME               a kvcache-plan preset (default Llama-3.1-8B)
  --layers N --kv-heads N --head-dim N
                             a custom model instead of --model
  --dtype-bytes N            bytes per element (default 2)
  --budget SIZE              KV-cache budget, e.g. 4GiB (default 4GiB)
  --max-seq-len N            the model's maximum sequence length (default 4096)
  --page-size N[,N...]       page size in tokens (default 16); several sizes
                             sweep the paged modes (the first is the main one)
  --steps N                  simulated steps (default 2000 for the embedded
                             workload; for a trace, until every request is done;
                             0: until done)

Output (the table always goes to stdout):
  --json FILE                every figure, and the timelines
  --svg FILE                 chart: memory holding tokens vs reserved over time
  --sweep-svg FILE           chart: fragmentation vs page-table size (a sweep)
  --quiet, -q                no progress bar on stderr
  --help, -h                 this text

Exit status: 0 success, 2 bad arguments or a malformed trace, 1 an output file
that cannot be written or an internal error.
)";
}

namespace {

void write_file(const std::string& path, const std::string& content) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw OutputError("cannot write '" + path + "'");
  f << content;
  f.close();
  if (!f) throw OutputError("cannot write '" + path + "'");
}

}  // namespace

int run(std::span<const std::string_view> args, std::ostream& out, std::ostream& err,
        bool progress_bar) {
  bool bar_shown = false;
  const auto clear_bar = [&] {
    if (bar_shown) {
      err << '\r' << std::string(79, ' ') << '\r' << std::flush;
      bar_shown = false;
    }
  };
  try {
    const Options o = parse_args(args);
    if (o.action == Action::help) {
      out << help_text();
      return kExitOk;
    }
    const std::vector<Request> workload = o.trace ? load_trace(*o.trace)
                                                  : generate_workload(o.workload);
    std::function<void(double, std::string_view)> progress;
    int last_pct = -1;
    std::string last_what;
    if (progress_bar && !o.quiet) {
      progress = [&](double f, std::string_view what) {
        const int p = static_cast<int>(f * 100.0);
        if (p == last_pct && what == last_what) return;
        last_pct = p;
        last_what = std::string(what);
        constexpr int kWidth = 24;
        const int filled = std::clamp(static_cast<int>(f * kWidth), 0, kWidth);
        std::string line = "kvcache-sim [" + std::string(static_cast<std::size_t>(filled), '#') +
                           std::string(static_cast<std::size_t>(kWidth - filled), '.') + "] " +
                           std::to_string(p) + "% " + last_what;
        if (line.size() < 79) line += std::string(79 - line.size(), ' ');
        err << '\r' << line << std::flush;
        bar_shown = true;
      };
    }
    const Report rep = make_report(o, workload, progress);
    clear_bar();
    std::vector<std::string> written;
    if (!o.json_path.empty()) {
      write_file(o.json_path, render_json(rep));
      written.push_back(o.json_path + " (every figure)");
    }
    if (!o.svg_path.empty()) {
      write_file(o.svg_path, render_timeline_svg(rep));
      written.push_back(o.svg_path + " (memory over time)");
    }
    if (!o.sweep_svg_path.empty()) {
      write_file(o.sweep_svg_path, render_sweep_svg(rep));
      written.push_back(o.sweep_svg_path + " (page-size trade-off)");
    }
    out << render_text(rep);
    for (const std::string& f : written) out << "wrote " << f << '\n';
    return kExitOk;
  } catch (const UsageError& e) {
    clear_bar();
    err << "kvcache-sim: error: " << e.what() << '\n';
    return kExitUsage;
  } catch (const TraceError& e) {
    clear_bar();
    err << "kvcache-sim: error: " << e.what() << '\n';
    return kExitUsage;
  } catch (const std::invalid_argument& e) {
    clear_bar();
    err << "kvcache-sim: error: " << e.what() << '\n';
    return kExitUsage;
  } catch (const OutputError& e) {
    clear_bar();
    err << "kvcache-sim: error: " << e.what() << '\n';
    return kExitInternal;
  } catch (const std::exception& e) {
    clear_bar();
    err << "kvcache-sim: internal error: " << e.what() << '\n';
    return kExitInternal;
  } catch (...) {
    clear_bar();
    err << "kvcache-sim: internal error: unknown exception\n";
    return kExitInternal;
  }
}

}  // namespace kvcache_sim
