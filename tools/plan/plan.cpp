// Implementation of kvcache_plan: see plan.cppm for the design.
module;

#include <algorithm>
#include <array>
#include <cctype>
#include <charconv>
#include <cstdint>
#include <exception>
#include <iomanip>
#include <limits>
#include <new>
#include <optional>
#include <ostream>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

module kvcache_plan;

import kvcache;

namespace kvcache_plan {

using kvcache::Bytes;
using kvcache::ModelConfig;
using kvcache::Pages;
using kvcache::Tokens;
using kvcache::bytes_for;
using kvcache::tokens_in;

namespace {

// From each model's config.json on Hugging Face (num_hidden_layers,
// num_attention_heads, num_key_value_heads, hidden_size / num_attention_heads).
constexpr std::array kPresets{
    Preset{"Llama-2-7B", 32, 32, 32, 128},       // full multi-head attention
    Preset{"Llama-3.1-8B", 32, 32, 8, 128},
    Preset{"Llama-3.1-70B", 80, 64, 8, 128},
    Preset{"Llama-3.1-405B", 126, 128, 8, 128},
    Preset{"Mistral-7B-v0.3", 32, 32, 8, 128},
    Preset{"Qwen2.5-7B", 28, 28, 4, 128},
    Preset{"Qwen2.5-72B", 80, 64, 8, 128},
};

constexpr std::array kDtypes{
    Dtype{"fp32", 4}, Dtype{"float32", 4},  Dtype{"fp16", 2},     Dtype{"float16", 2},
    Dtype{"half", 2}, Dtype{"bf16", 2},     Dtype{"bfloat16", 2}, Dtype{"fp8", 1},
    Dtype{"fp8_e4m3", 1}, Dtype{"fp8_e5m2", 1}, Dtype{"int8", 1},
};

constexpr std::uint64_t kKiB = std::uint64_t{1} << 10;

bool iequals(std::string_view a, std::string_view b) noexcept {
  return std::ranges::equal(a, b, [](char x, char y) {
    return std::tolower(static_cast<unsigned char>(x)) ==
           std::tolower(static_cast<unsigned char>(y));
  });
}

std::string in_quotes(std::string_view s) { return "'" + std::string(s) + "'"; }

std::string preset_names() {
  std::string names;
  for (const Preset& p : kPresets) {
    if (!names.empty()) names += ", ";
    names += p.name;
  }
  return names;
}

// Attention kind, from the head counts.
std::string attention_kind(std::uint32_t q_heads, std::uint32_t kv_heads) {
  if (q_heads == kv_heads) return "MHA";
  if (kv_heads == 1) return "MQA";
  return "GQA";
}

// Splits a size into its leading digits and the rest (the unit), dropping
// spaces between them.
std::pair<std::string_view, std::string_view> split_number(std::string_view text) {
  std::size_t i = 0;
  while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i])) != 0) ++i;
  std::string_view unit = text.substr(i);
  while (!unit.empty() && unit.front() == ' ') unit.remove_prefix(1);
  return {text.substr(0, i), unit};
}

// Rejects a sign or a fraction with a message that says what was wrong.
void reject_non_integer(std::string_view flag, std::string_view text) {
  if (text.starts_with('-')) {
    throw UsageError(std::string(flag) + ": " + in_quotes(text) + " is negative");
  }
  if (text.find('.') != std::string_view::npos || text.find(',') != std::string_view::npos) {
    throw UsageError(std::string(flag) + ": " + in_quotes(text) +
                     " is not a whole number (integers only)");
  }
}

// Multiplies, throwing UsageError on overflow.
std::uint64_t scaled(std::string_view flag, std::string_view text, std::uint64_t n,
                     std::uint64_t unit) {
  if (n != 0 && unit > std::numeric_limits<std::uint64_t>::max() / n) {
    throw UsageError(std::string(flag) + ": " + in_quotes(text) +
                     " does not fit in 64 bits (at most 18,446,744,073,709,551,615)");
  }
  return n * unit;
}

// ---- Text layout ---------------------------------------------------------

constexpr std::size_t kLabelWidth = 32;

void line(std::ostringstream& os, std::string_view label, std::string_view value) {
  os << "  " << label;
  if (label.size() < kLabelWidth) {
    os << std::string(kLabelWidth - label.size(), ' ');
  } else {
    os << "  ";
  }
  os << value << '\n';
}

std::string ratio_text(double ratio) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(1) << ratio;
  return os.str();
}

std::string tokens_text(Tokens t) {
  return group_digits(t.count()) + (t.count() == 1 ? " token" : " tokens");
}

// "+18" or "-3": the difference of two counts.
std::string delta(std::uint64_t a, std::uint64_t b) {
  return a >= b ? "+" + group_digits(a - b) : "-" + group_digits(b - a);
}

// ---- JSON ----------------------------------------------------------------

// A flat JSON object writer: fields in insertion order, nested objects by
// passing an already-rendered object as `raw`.
class JsonObject {
 public:
  explicit JsonObject(int indent) : indent_(indent) {}
  JsonObject& raw(std::string_view key, std::string_view value) {
    fields_ += fields_.empty() ? "\n" : ",\n";
    fields_ += std::string(static_cast<std::size_t>(indent_ + 2), ' ') + json_string(key) +
               ": " + std::string(value);
    return *this;
  }
  JsonObject& num(std::string_view key, std::uint64_t v) { return raw(key, std::to_string(v)); }
  JsonObject& str(std::string_view key, std::string_view v) { return raw(key, json_string(v)); }
  JsonObject& boolean(std::string_view key, bool v) { return raw(key, v ? "true" : "false"); }
  JsonObject& real(std::string_view key, double v) {
    std::ostringstream os;
    os << std::fixed << std::setprecision(3) << v;
    return raw(key, os.str());
  }
  [[nodiscard]] std::string str() const {
    if (fields_.empty()) return "{}";
    return "{" + fields_ + "\n" + std::string(static_cast<std::size_t>(indent_), ' ') + "}";
  }

 private:
  int indent_;
  std::string fields_;
};

// ---- The BasicKVCache check ----------------------------------------------

Simulation simulate_basic(const ModelConfig& config, Bytes budget, Tokens context,
                          std::uint64_t expected, std::uint64_t limit) {
  Simulation sim;
  sim.limit = limit;
  if (expected > limit) {
    sim.status = SimStatus::skipped_cap;
    return sim;
  }
  try {
    kvcache::BasicKVCache cache(config, budget);
    // Allocate until refused; one past `expected` is the refusal we want to
    // see (or, if the library accepted more, the mismatch we report).
    for (std::uint64_t i = 0; i <= expected; ++i) {
      if (!cache.allocate("request-" + std::to_string(i), context, Tokens{0U})) break;
      ++sim.allocated;
    }
    const kvcache::BasicStats stats = cache.stats();
    if (sim.allocated != expected || stats.num_requests != expected ||
        stats.used_memory != bytes_for(context, config.bytes_per_token()) * expected) {
      throw std::logic_error(
          "BasicKVCache accepted " + group_digits(sim.allocated) + " requests of " +
          tokens_text(context) + " (using " + group_digits(stats.used_memory.count()) +
          " B), but the arithmetic says " + group_digits(expected) + " fit");
    }
  } catch (const std::bad_alloc&) {
    // Each request maps its reservation's address space; a budget beyond what
    // the host can map (or a sanitizer's address-space limit) ends up here.
    sim.status = SimStatus::skipped_no_space;
    sim.allocated = 0;
  }
  return sim;
}

}  // namespace

// ---- Presets and dtypes --------------------------------------------------

std::span<const Preset> presets() noexcept { return kPresets; }

const Preset* find_preset(std::string_view name) noexcept {
  for (const Preset& p : kPresets) {
    if (iequals(p.name, name)) return &p;
  }
  return nullptr;
}

std::span<const Dtype> dtypes() noexcept { return kDtypes; }

std::optional<Dtype> find_dtype(std::string_view name) noexcept {
  for (const Dtype& d : kDtypes) {
    if (iequals(d.name, name)) return d;
  }
  return std::nullopt;
}

// ---- Value parsers -------------------------------------------------------

std::uint64_t parse_count(std::string_view flag, std::string_view text) {
  if (text.empty()) throw UsageError(std::string(flag) + ": empty value");
  reject_non_integer(flag, text);
  std::uint64_t value = 0;
  const char* const end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, value);
  if (ec == std::errc::result_out_of_range) {
    throw UsageError(std::string(flag) + ": " + in_quotes(text) +
                     " does not fit in 64 bits (at most 18,446,744,073,709,551,615)");
  }
  if (ec != std::errc{} || ptr != end || text.starts_with('+')) {
    throw UsageError(std::string(flag) + ": " + in_quotes(text) + " is not a whole number");
  }
  return value;
}

std::uint32_t parse_u32(std::string_view flag, std::string_view text) {
  const std::uint64_t value = parse_count(flag, text);
  if (value > std::numeric_limits<std::uint32_t>::max()) {
    throw UsageError(std::string(flag) + ": " + in_quotes(text) +
                     " is too large (at most 4,294,967,295)");
  }
  return static_cast<std::uint32_t>(value);
}

Bytes parse_size(std::string_view flag, std::string_view text) {
  if (text.empty()) throw UsageError(std::string(flag) + ": empty value");
  reject_non_integer(flag, text);
  const auto [digits, unit] = split_number(text);
  if (digits.empty()) {
    throw UsageError(std::string(flag) + ": " + in_quotes(text) +
                     " is not a size (write e.g. 24GiB, 512MiB or 80000000000B)");
  }
  const std::uint64_t n = parse_count(flag, digits);
  struct Unit {
    std::string_view name;
    std::uint64_t bytes;
  };
  constexpr std::array units{
      Unit{"", 1},           Unit{"b", 1},
      Unit{"kib", kKiB},     Unit{"mib", kKiB * kKiB},
      Unit{"gib", kKiB * kKiB * kKiB},  Unit{"tib", kKiB * kKiB * kKiB * kKiB},
      Unit{"kb", 1'000},     Unit{"mb", 1'000'000},
      Unit{"gb", 1'000'000'000},        Unit{"tb", 1'000'000'000'000},
  };
  for (const Unit& u : units) {
    if (iequals(unit, u.name)) return Bytes{scaled(flag, text, n, u.bytes)};
  }
  if (unit.size() == 1 && std::string_view("kmgtKMGT").find(unit[0]) != std::string_view::npos) {
    const std::string u(unit);
    throw UsageError(std::string(flag) + ": the unit " + in_quotes(u) + " in " + in_quotes(text) +
                     " is ambiguous: write " + u + "iB for powers of 2 or " + u +
                     "B for powers of 10");
  }
  throw UsageError(std::string(flag) + ": unknown unit " + in_quotes(unit) + " in " +
                   in_quotes(text) +
                   " (use B, KiB, MiB, GiB, TiB, or KB, MB, GB, TB for powers of 10)");
}

Tokens parse_tokens(std::string_view flag, std::string_view text) {
  if (text.empty()) throw UsageError(std::string(flag) + ": empty value");
  reject_non_integer(flag, text);
  if (text.ends_with('k') || text.ends_with('K')) {
    const std::string_view digits = text.substr(0, text.size() - 1);
    if (digits.empty()) {
      throw UsageError(std::string(flag) + ": " + in_quotes(text) + " is not a token count");
    }
    return Tokens{scaled(flag, text, parse_count(flag, digits), kKiB)};
  }
  if (const auto [digits, suffix] = split_number(text); !digits.empty() && !suffix.empty()) {
    throw UsageError(std::string(flag) + ": unknown suffix in " + in_quotes(text) +
                     " (a token count takes only k = 1024, e.g. 8k)");
  }
  return Tokens{parse_count(flag, text)};
}

// ---- Command line --------------------------------------------------------

Options parse_args(std::span<const std::string_view> args) {
  struct Raw {
    std::optional<std::string_view> model, layers, kv_heads, head_dim, q_heads, dtype,
        dtype_bytes, budget, context, page_size;
    bool json = false, help = false, list = false;
  } raw;
  struct Flag {
    std::string_view name;
    std::optional<std::string_view> Raw::*value;  // null for a switch
    bool Raw::*on;                                // null for an option with a value
  };
  const std::array flags{
      Flag{"--model", &Raw::model, nullptr},
      Flag{"--layers", &Raw::layers, nullptr},
      Flag{"--kv-heads", &Raw::kv_heads, nullptr},
      Flag{"--head-dim", &Raw::head_dim, nullptr},
      Flag{"--q-heads", &Raw::q_heads, nullptr},
      Flag{"--dtype", &Raw::dtype, nullptr},
      Flag{"--dtype-bytes", &Raw::dtype_bytes, nullptr},
      Flag{"--budget", &Raw::budget, nullptr},
      Flag{"--context", &Raw::context, nullptr},
      Flag{"--page-size", &Raw::page_size, nullptr},
      Flag{"--json", nullptr, &Raw::json},
      Flag{"--list-models", nullptr, &Raw::list},
      Flag{"--help", nullptr, &Raw::help},
  };

  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string_view arg = args[i];
    if (arg == "-h") {
      raw.help = true;
      continue;
    }
    if (!arg.starts_with("--")) {
      throw UsageError("unexpected argument " + in_quotes(arg) +
                       " (options start with --; try --help)");
    }
    const std::size_t eq = arg.find('=');
    const std::string_view name = arg.substr(0, eq);
    const auto flag = std::ranges::find(flags, name, &Flag::name);
    if (flag == flags.end()) {
      throw UsageError("unknown option " + in_quotes(name) + " (try --help)");
    }
    if (flag->on != nullptr) {
      if (eq != std::string_view::npos) {
        throw UsageError(std::string(name) + " takes no value");
      }
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
  o.json = raw.json;
  if (raw.help) {
    o.action = Action::help;
    return o;
  }
  if (raw.list) {
    o.action = Action::list_models;
    return o;
  }

  // The model: a preset, or every dimension given explicitly.
  if (raw.model) {
    const Preset* p = find_preset(*raw.model);
    if (p == nullptr) {
      throw UsageError("unknown model " + in_quotes(*raw.model) + "; built-in models: " +
                       preset_names() + " (or give --layers, --kv-heads and --head-dim)");
    }
    const auto dims = std::to_array<std::pair<std::string_view, bool>>(
        {{"--layers", raw.layers.has_value()},
         {"--kv-heads", raw.kv_heads.has_value()},
         {"--head-dim", raw.head_dim.has_value()},
         {"--q-heads", raw.q_heads.has_value()}});
    for (const auto& [dim, given] : dims) {
      if (given) {
        throw UsageError(std::string(dim) +
                         " cannot be combined with --model (the preset fixes the shape; "
                         "drop --model to give every dimension)");
      }
    }
    o.model_name = p->name;
    o.config = ModelConfig{p->layers, p->kv_heads, p->head_dim, 2};
    o.q_heads = p->q_heads;
  } else {
    if (!raw.layers && !raw.kv_heads && !raw.head_dim) {
      throw UsageError(
          "no model given: use --model NAME (see --list-models) or --layers, --kv-heads and "
          "--head-dim (try --help)");
    }
    // Every dimension must be there before any is parsed: the first missing
    // one is the error.
    const auto required = [](const std::optional<std::string_view>& text, std::string_view dim) {
      if (!text) {
        throw UsageError("missing " + std::string(dim) +
                         " (a custom model needs --layers, --kv-heads and --head-dim)");
      }
      return *text;
    };
    const std::string_view layers = required(raw.layers, "--layers");
    const std::string_view kv_heads = required(raw.kv_heads, "--kv-heads");
    const std::string_view head_dim = required(raw.head_dim, "--head-dim");
    o.model_name = "custom";
    o.config = ModelConfig{parse_u32("--layers", layers), parse_u32("--kv-heads", kv_heads),
                           parse_u32("--head-dim", head_dim), 2};
    if (raw.q_heads) o.q_heads = parse_u32("--q-heads", *raw.q_heads);
  }

  // The element type: bf16 unless told otherwise.
  o.dtype_name = "bf16";
  if (raw.dtype && raw.dtype_bytes) {
    throw UsageError("give --dtype or --dtype-bytes, not both");
  }
  if (raw.dtype) {
    const std::optional<Dtype> d = find_dtype(*raw.dtype);
    if (!d) {
      std::string names;
      for (const Dtype& x : kDtypes) names += (names.empty() ? "" : ", ") + std::string(x.name);
      throw UsageError("unknown --dtype " + in_quotes(*raw.dtype) + " (use " + names +
                       ", or --dtype-bytes N)");
    }
    o.dtype_name = d->name;
    o.config.dtype_bytes = d->bytes;
  } else if (raw.dtype_bytes) {
    o.config.dtype_bytes = parse_u32("--dtype-bytes", *raw.dtype_bytes);
    o.dtype_name = std::to_string(o.config.dtype_bytes) + "-byte";
  }

  // kvcache's own check: a zero field, or a size that overflows 64 bits,
  // throws std::invalid_argument naming the field.
  o.config.validate();

  if (o.q_heads) {
    const std::uint32_t q = *o.q_heads;
    if (q == 0) throw UsageError("--q-heads must be at least 1");
    if (q % o.config.num_kv_heads != 0) {
      throw UsageError("--q-heads " + std::to_string(q) + " is not a multiple of --kv-heads " +
                       std::to_string(o.config.num_kv_heads) +
                       " (each KV head serves a whole group of query heads)");
    }
  }

  if (!raw.budget) throw UsageError("missing --budget (e.g. --budget 24GiB)");
  o.budget = parse_size("--budget", *raw.budget);
  if (o.budget == Bytes{0U}) throw UsageError("--budget must be more than 0 B");

  if (!raw.context) throw UsageError("missing --context (e.g. --context 8192 or 8k)");
  o.context = parse_tokens("--context", *raw.context);
  if (o.context == Tokens{0U}) throw UsageError("--context must be at least 1 token");

  if (raw.page_size) {
    o.page_size = parse_tokens("--page-size", *raw.page_size);
    if (*o.page_size == Tokens{0U}) throw UsageError("--page-size must be at least 1 token");
  }
  return o;
}

// ---- The report ----------------------------------------------------------

Report make_report(const Options& options, std::uint64_t simulate_limit) {
  Report r;
  r.options = options;
  const ModelConfig& cfg = options.config;
  const Bytes budget = options.budget;
  const Tokens context = options.context;

  r.kv_bytes_per_token_per_layer = cfg.kv_bytes_per_token_per_layer();
  r.bytes_per_token_per_layer = cfg.bytes_per_token_per_layer();
  r.bytes_per_token = cfg.bytes_per_token();
  r.tokens_fit = cfg.max_tokens(budget);
  try {
    r.request_bytes = bytes_for(context, r.bytes_per_token);
  } catch (const std::overflow_error&) {
    throw UsageError("--context " + group_digits(context.count()) +
                     ": one request's reservation (context * " +
                     group_digits(r.bytes_per_token.count()) +
                     " B per token) does not fit in 64 bits");
  }
  // floor(floor(budget / bpt) / context) == floor(budget / (context * bpt)).
  r.requests_fit = r.tokens_fit / context;
  r.reserved = r.request_bytes * r.requests_fit;  // <= budget: cannot overflow
  r.leftover = budget - r.reserved;

  if (options.q_heads) {
    GqaComparison g;
    g.q_heads = *options.q_heads;
    g.group = g.q_heads / cfg.num_kv_heads;
    ModelConfig mha = cfg;
    mha.num_kv_heads = g.q_heads;
    try {
      mha.validate();
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(std::string("multi-head comparison (") +
                                  std::to_string(g.q_heads) + " KV heads): " + e.what());
    }
    g.mha_bytes_per_token = mha.bytes_per_token();
    g.mha_tokens_fit = mha.max_tokens(budget);
    g.mha_requests_fit = g.mha_tokens_fit / context;
    g.ratio = static_cast<double>(g.mha_bytes_per_token.count()) /
              static_cast<double>(r.bytes_per_token.count());
    r.gqa = g;
  }

  if (options.page_size) {
    PagedPlan p;
    p.page_size = *options.page_size;
    try {
      p.bytes_per_page = cfg.bytes_per_page(p.page_size);
    } catch (const std::overflow_error&) {
      throw UsageError("--page-size " + group_digits(p.page_size.count()) +
                       ": one page of one layer (page size * " +
                       group_digits(r.bytes_per_token_per_layer.count()) +
                       " B per token) does not fit in 64 bits");
    }
    p.pool_pages = Pages{budget / p.bytes_per_page};
    p.pages_per_layer = Pages{p.pool_pages.count() / cfg.num_layers};
    p.tokens_per_layer = tokens_in(p.pages_per_layer, p.page_size);
    p.request_pages_per_layer = kvcache::pages_for(context, p.page_size);
    p.request_pages = p.request_pages_per_layer * cfg.num_layers;
    p.requests_fit = p.pool_pages / p.request_pages;
    p.last_page_slack = tokens_in(p.request_pages_per_layer, p.page_size) - context;
    p.exceeds_page_ids =
        p.pool_pages.count() > std::uint64_t{kvcache::PageId::max_index} + 1;
    r.paged = p;
  }

  // Last: the only step whose cost grows with the numbers (one allocation per
  // request, each O(requests) in an audit build of the library).
  r.simulation = simulate_basic(cfg, budget, context, r.requests_fit, simulate_limit);
  return r;
}

std::string render_text(const Report& r) {
  const Options& o = r.options;
  const ModelConfig& cfg = o.config;
  std::ostringstream os;
  os << "kvcache-plan: " << o.model_name << " in " << o.dtype_name << ", "
     << format_bytes(o.budget) << " budget, " << group_digits(o.context.count())
     << "-token context\n\n";

  os << "Model\n";
  line(os, "layers", std::to_string(cfg.num_layers));
  if (o.q_heads) {
    const std::uint32_t q = *o.q_heads;
    const std::uint32_t kv = cfg.num_kv_heads;
    std::string heads = std::to_string(q) + " query, " + std::to_string(kv) + " KV (";
    if (q == kv) {
      heads += "full multi-head attention)";
    } else {
      heads += kv == 1 ? "multi-query attention: " : "grouped-query attention: ";
      heads += std::to_string(q / kv) + " query heads per KV head)";
    }
    line(os, "attention heads", heads);
  } else {
    line(os, "attention heads", std::to_string(cfg.num_kv_heads) + " KV (query heads not given)");
  }
  line(os, "head dim", std::to_string(cfg.head_dim));
  line(os, "dtype", o.dtype_name + ", " + std::to_string(cfg.dtype_bytes) +
                        (cfg.dtype_bytes == 1 ? " byte" : " bytes") + " per element");

  os << "\nKV cache per token\n";
  line(os, "one layer, K or V", format_bytes(r.kv_bytes_per_token_per_layer));
  line(os, "one layer, K and V", format_bytes(r.bytes_per_token_per_layer));
  line(os, "all " + std::to_string(cfg.num_layers) + " layers", format_bytes(r.bytes_per_token));

  os << "\nBudget " << format_bytes(o.budget) << "\n";
  line(os, "tokens that fit", group_digits(r.tokens_fit.count()));
  line(os, "one request reserves", format_bytes(r.request_bytes) + " for " +
                                       tokens_text(o.context) + ", up front");
  line(os, "requests that fit", group_digits(r.requests_fit) +
                                    " (contiguous reservation of the full context each)");
  if (r.requests_fit == 0) {
    line(os, "", "the context does not fit: one request needs more than the budget");
  }
  line(os, "left over", format_bytes(r.leftover));
  switch (r.simulation.status) {
    case SimStatus::verified:
      line(os, "checked with BasicKVCache",
           group_digits(r.simulation.allocated) + " requests allocated, request " +
               group_digits(r.simulation.allocated + 1) + " refused");
      break;
    case SimStatus::skipped_cap:
      line(os, "not checked with BasicKVCache",
           "it allocates at most " + group_digits(r.simulation.limit) +
               " requests (one mapping each); arithmetic only");
      break;
    case SimStatus::skipped_no_space:
      line(os, "not checked with BasicKVCache",
           "this host cannot map the address space; arithmetic only");
      break;
  }

  os << "\nGQA against full multi-head attention\n";
  if (!r.gqa) {
    line(os, "saving", "unknown: give --q-heads (the query-head count) to compare");
  } else if (r.gqa->group == 1) {
    line(os, "saving", "none: " + o.model_name + " has one KV head per query head (MHA)");
  } else {
    const GqaComparison& g = *r.gqa;
    line(os, "MHA (" + std::to_string(g.q_heads) + " KV heads) per token",
         format_bytes(g.mha_bytes_per_token));
    line(os, "saving", ratio_text(g.ratio) + "x smaller per token");
    line(os, "tokens that fit", group_digits(r.tokens_fit.count()) + " vs " +
                                    group_digits(g.mha_tokens_fit.count()) + " with MHA (" +
                                    delta(r.tokens_fit.count(), g.mha_tokens_fit.count()) + ")");
    line(os, "requests that fit", group_digits(r.requests_fit) + " vs " +
                                      group_digits(g.mha_requests_fit) + " with MHA (" +
                                      delta(r.requests_fit, g.mha_requests_fit) + ")");
  }

  if (r.paged) {
    const PagedPlan& p = *r.paged;
    os << "\nPaged pool (" << tokens_text(p.page_size) << " per page)\n";
    line(os, "one page of one layer", format_bytes(p.bytes_per_page));
    line(os, "pages in the budget", group_digits(p.pool_pages.count()) + ", shared by all " +
                                        std::to_string(cfg.num_layers) + " layers");
    line(os, "pages per layer", group_digits(p.pages_per_layer.count()) + " (" +
                                    tokens_text(p.tokens_per_layer) + ")");
    line(os, "one request of the context", group_digits(p.request_pages_per_layer.count()) +
                                               " pages per layer, " +
                                               group_digits(p.request_pages.count()) + " in all");
    line(os, "requests that fit", group_digits(p.requests_fit) + " at the full context (" +
                                      tokens_text(p.last_page_slack) +
                                      " unused in each layer's last page)");
    if (p.exceeds_page_ids) {
      line(os, "warning", "more pages than a 32-bit PageId can name: use a larger page size");
    }
    line(os, "note", "at the full context paging fits no more requests; it wins when");
    line(os, "", "requests stop short of it, taking pages only as tokens arrive");
  }
  return os.str();
}

std::string render_json(const Report& r) {
  const Options& o = r.options;
  const ModelConfig& cfg = o.config;
  JsonObject model(2);
  model.str("name", o.model_name).num("layers", cfg.num_layers);
  if (o.q_heads) {
    model.num("q_heads", *o.q_heads);
  } else {
    model.raw("q_heads", "null");
  }
  model.num("kv_heads", cfg.num_kv_heads)
      .num("head_dim", cfg.head_dim)
      .str("dtype", o.dtype_name)
      .num("dtype_bytes", cfg.dtype_bytes);

  const char* status = "verified";
  if (r.simulation.status == SimStatus::skipped_cap) status = "skipped_cap";
  if (r.simulation.status == SimStatus::skipped_no_space) status = "skipped_no_space";
  JsonObject sim(2);
  sim.str("status", status).num("allocated", r.simulation.allocated).num("limit",
                                                                        r.simulation.limit);

  JsonObject top(0);
  top.raw("model", model.str())
      .num("budget_bytes", o.budget.count())
      .num("context_tokens", o.context.count())
      .num("kv_bytes_per_token_per_layer", r.kv_bytes_per_token_per_layer.count())
      .num("bytes_per_token_per_layer", r.bytes_per_token_per_layer.count())
      .num("bytes_per_token", r.bytes_per_token.count())
      .num("tokens_fit", r.tokens_fit.count())
      .num("request_bytes", r.request_bytes.count())
      .num("requests_fit", r.requests_fit)
      .num("leftover_bytes", r.leftover.count())
      .raw("basic_kv_cache_check", sim.str());
  if (r.gqa) {
    JsonObject g(2);
    g.num("q_heads", r.gqa->q_heads)
        .num("query_heads_per_kv_head", r.gqa->group)
        .num("mha_bytes_per_token", r.gqa->mha_bytes_per_token.count())
        .num("mha_tokens_fit", r.gqa->mha_tokens_fit.count())
        .num("mha_requests_fit", r.gqa->mha_requests_fit)
        .real("ratio", r.gqa->ratio);
    top.raw("gqa", g.str());
  } else {
    top.raw("gqa", "null");
  }
  if (r.paged) {
    const PagedPlan& p = *r.paged;
    JsonObject pg(2);
    pg.num("page_size", p.page_size.count())
        .num("bytes_per_page", p.bytes_per_page.count())
        .num("pool_pages", p.pool_pages.count())
        .num("pages_per_layer", p.pages_per_layer.count())
        .num("tokens_per_layer", p.tokens_per_layer.count())
        .num("request_pages_per_layer", p.request_pages_per_layer.count())
        .num("request_pages", p.request_pages.count())
        .num("requests_fit", p.requests_fit)
        .num("last_page_slack_tokens", p.last_page_slack.count())
        .boolean("exceeds_page_ids", p.exceeds_page_ids);
    top.raw("paged", pg.str());
  } else {
    top.raw("paged", "null");
  }
  return top.str() + "\n";
}

std::string help_text() {
  return R"(Usage: kvcache-plan (--model NAME | --layers N --kv-heads N --head-dim N [--q-heads N])
                    --budget SIZE --context TOKENS [options]

A KV-cache calculator: the bytes one token's keys and values take, how many
tokens and how many requests of a given context fit in a memory budget, and
what grouped-query attention (GQA) saves against full multi-head attention.

Model:
  --model NAME        a built-in preset (--list-models; case-insensitive)
  --layers N          number of transformer layers       (num_hidden_layers)
  --kv-heads N        key/value heads per layer          (num_key_value_heads)
  --head-dim N        elements per head                  (head_dim)
  --q-heads N         query heads, for the GQA comparison (num_attention_heads);
                      without it the saving is reported as unknown
  --dtype NAME        element type: fp32, fp16, bf16 (default), fp8, int8
  --dtype-bytes N     bytes per element, instead of --dtype

Budget and context:
  --budget SIZE       KV-cache memory: an integer with a unit, e.g. 24GiB.
                      B, KiB, MiB, GiB, TiB are powers of 2; KB, MB, GB, TB are
                      powers of 10 (24GB = 24,000,000,000 B); a bare G is refused
  --context TOKENS    tokens reserved per request (prompt + generation);
                      k means 1024: 8k = 8192
  --page-size TOKENS  also plan a paged pool with pages of this many tokens

Output:
  --json              machine-readable output
  --list-models       list the built-in presets
  -h, --help          this text

Requests that fit reserve the full context each, contiguously (BasicKVCache);
the count is checked by allocating them in a real BasicKVCache.
Bad arguments print one "kvcache-plan: error:" line and exit with status 2.

Example:
  kvcache-plan --model Llama-3.1-8B --budget 24GiB --context 8k --page-size 16
)";
}

std::string models_text(bool json) {
  if (json) {
    std::string out = "[";
    for (const Preset& p : kPresets) {
      JsonObject m(2);
      m.str("name", p.name)
          .num("layers", p.layers)
          .num("q_heads", p.q_heads)
          .num("kv_heads", p.kv_heads)
          .num("head_dim", p.head_dim)
          .num("bf16_bytes_per_token",
               ModelConfig{p.layers, p.kv_heads, p.head_dim, 2}.bytes_per_token().count());
      out += (out.size() == 1 ? "\n  " : ",\n  ") + m.str();
    }
    return out + "\n]\n";
  }
  std::ostringstream os;
  os << "Built-in models (shapes from each model's Hugging Face config.json):\n\n";
  os << std::left << std::setw(18) << "name" << std::right << std::setw(7) << "layers"
     << std::setw(9) << "q heads" << std::setw(10) << "kv heads" << std::setw(10) << "head dim"
     << "  attention  KV per token (bf16)\n";
  for (const Preset& p : kPresets) {
    const Bytes bpt = ModelConfig{p.layers, p.kv_heads, p.head_dim, 2}.bytes_per_token();
    os << std::left << std::setw(18) << p.name << std::right << std::setw(7) << p.layers
       << std::setw(9) << p.q_heads << std::setw(10) << p.kv_heads << std::setw(10)
       << p.head_dim << "  " << std::left << std::setw(9) << attention_kind(p.q_heads, p.kv_heads)
       << "  " << format_bytes(bpt) << '\n';
  }
  return os.str();
}

// ---- Formatting helpers --------------------------------------------------

std::string group_digits(std::uint64_t n) {
  const std::string digits = std::to_string(n);
  std::string out;
  out.reserve(digits.size() + (digits.size() / 3));
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i != 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

std::string format_bytes(Bytes b) {
  constexpr std::array<std::string_view, 7> names{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  const std::uint64_t n = b.count();
  std::size_t k = 0;
  std::uint64_t unit = 1;
  while (k + 1 < names.size() && n / unit >= kKiB) {
    unit *= kKiB;
    ++k;
  }
  if (k == 0) return group_digits(n) + " B";
  // Truncate to one decimal: (n % unit) < unit <= 2^60, so * 10 cannot overflow.
  const std::uint64_t whole = n / unit;
  const std::uint64_t tenth = (n % unit) * 10 / unit;
  return std::to_string(whole) + "." + std::to_string(tenth) + " " + std::string(names[k]) +
         " (" + group_digits(n) + " B)";
}

int run(std::span<const std::string_view> args, std::ostream& out, std::ostream& err,
        std::uint64_t simulate_limit) {
  try {
    const Options o = parse_args(args);
    switch (o.action) {
      case Action::help:
        out << help_text();
        return kExitOk;
      case Action::list_models:
        out << models_text(o.json);
        return kExitOk;
      case Action::report:
        break;
    }
    const Report r = make_report(o, simulate_limit);
    out << (o.json ? render_json(r) : render_text(r));
    return kExitOk;
  } catch (const UsageError& e) {
    err << "kvcache-plan: error: " << e.what() << '\n';
    return kExitUsage;
  } catch (const std::invalid_argument& e) {
    // kvcache rejected the model configuration; its message names the field.
    err << "kvcache-plan: error: invalid model configuration: " << e.what() << '\n';
    return kExitUsage;
  } catch (const std::exception& e) {
    err << "kvcache-plan: internal error: " << e.what() << '\n';
    return kExitInternal;
  } catch (...) {
    err << "kvcache-plan: internal error: unknown exception\n";
    return kExitInternal;
  }
}

std::string json_string(std::string_view s) {
  std::string out = "\"";
  for (const char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      constexpr std::string_view hex = "0123456789abcdef";
      out += "\\u00";
      out += hex[static_cast<unsigned char>(c) >> 4U];
      out += hex[static_cast<unsigned char>(c) & 0xFU];
    } else {
      out += c;
    }
  }
  return out + "\"";
}

}  // namespace kvcache_plan
