// kvcache_sim: the embedded synthetic workload and the trace parsers (see
// sim.cppm for the formats and docs/simulator.md for the choices).
module;

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <numbers>
#include <optional>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_map>
#include <utility>
#include <vector>

module kvcache_sim;

import kvcache;

namespace kvcache_sim {

using kvcache::Tokens;

namespace {

// Means from the PagedAttention paper (Kwon et al., SOSP 2023, section 6.1):
// ShareGPT 161.31 input / 337.99 output tokens, Alpaca 19.31 / 58.45. The
// sigmas (of the underlying normal) are our choice: ShareGPT's lengths are
// spread over two orders of magnitude, Alpaca's are concentrated.
constexpr Dataset kShareGpt{"sharegpt", {161.31, 1.0}, {337.99, 1.0}};
constexpr Dataset kAlpaca{"alpaca", {19.31, 0.7}, {58.45, 0.7}};

constexpr std::string_view kSystemPromptId = "system-prompt";
constexpr double kMaxRate = 500;  // exp(-rate) must stay a normal double
constexpr std::uint64_t kMaxRequests = 10'000'000;
constexpr std::uint64_t kMaxTraceTokens = 1'000'000'000;

std::string in_quotes(std::string_view s) { return "'" + std::string(s) + "'"; }

}  // namespace

// ---- Random numbers -------------------------------------------------------

std::uint64_t SplitMix64::next() noexcept {
  state_ += 0x9e3779b97f4a7c15ULL;
  std::uint64_t z = state_;
  z = (z ^ (z >> 30U)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27U)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31U);
}

double SplitMix64::uniform() noexcept {
  return static_cast<double>(next() >> 11U) * 0x1.0p-53;
}

std::uint64_t draw_length(SplitMix64& rng, const LengthModel& m, std::uint64_t lo,
                          std::uint64_t hi) {
  // Box-Muller (one of the pair): z ~ N(0, 1). u1 in (0, 1] so log(u1) is finite.
  const double u1 = 1.0 - rng.uniform();
  const double u2 = rng.uniform();
  const double z = std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
  // E[exp(mu + sigma z)] = exp(mu + sigma^2 / 2) = mean.
  const double mu = std::log(m.mean) - m.sigma * m.sigma / 2.0;
  const double x = std::exp(mu + m.sigma * z);
  if (!(x < static_cast<double>(hi))) return hi;  // also catches inf
  const auto n = static_cast<std::uint64_t>(std::llround(x));
  return std::clamp(n, lo, hi);
}

std::uint64_t draw_poisson(SplitMix64& rng, double rate) {
  // Knuth's multiplication method: O(rate) uniforms per draw.
  const double limit = std::exp(-rate);
  std::uint64_t k = 0;
  double p = rng.uniform();
  while (p > limit) {
    ++k;
    p *= rng.uniform();
  }
  return k;
}

// ---- Workload ----------------------------------------------------------------

const Dataset& sharegpt() noexcept { return kShareGpt; }
const Dataset& alpaca() noexcept { return kAlpaca; }

std::string_view workload_name(WorkloadKind kind) noexcept {
  switch (kind) {
    case WorkloadKind::mixed: return "mixed";
    case WorkloadKind::sharegpt: return "sharegpt";
    case WorkloadKind::alpaca: return "alpaca";
  }
  return "?";
}

std::vector<Request> generate_workload(const WorkloadSpec& spec) {
  if (spec.requests == 0 || spec.requests > kMaxRequests) {
    throw std::invalid_argument("the number of requests must be 1.." +
                                std::to_string(kMaxRequests));
  }
  if (!(spec.rate > 0) || spec.rate > kMaxRate) {
    throw std::invalid_argument("the arrival rate must be in (0, 500] per step");
  }
  if (spec.system_prompt_pct > 100) {
    throw std::invalid_argument("the system prompt share is a percentage (0..100)");
  }
  const std::uint64_t max_seq = spec.max_seq_len.count();
  if (max_seq < 2) {
    throw std::invalid_argument("the maximum sequence length must be at least 2");
  }
  const std::uint64_t sys = spec.system_prompt.count();
  if (spec.system_prompt_pct > 0 && (sys == 0 || sys > max_seq - 2)) {
    throw std::invalid_argument(
        "the system prompt must be 1.." + std::to_string(max_seq - 2) +
        " tokens (room for a 1-token prompt and a 1-token output in the maximum sequence length)");
  }

  // Two independent streams: lengths do not change with the arrival rate.
  SplitMix64 lengths(spec.seed);
  SplitMix64 arrivals(spec.seed ^ 0x5851f42d4c957f2dULL);
  std::vector<Request> out;
  out.reserve(static_cast<std::size_t>(spec.requests));
  for (std::uint64_t i = 0; i < spec.requests; ++i) {
    const Dataset* d = &kShareGpt;
    const double pick = lengths.uniform();
    if (spec.kind == WorkloadKind::alpaca ||
        (spec.kind == WorkloadKind::mixed && pick >= 0.5)) {
      d = &kAlpaca;
    }
    const bool with_prefix =
        lengths.uniform() * 100.0 < static_cast<double>(spec.system_prompt_pct);
    const std::uint64_t prefix = with_prefix ? sys : 0;
    const std::uint64_t user = draw_length(lengths, d->prompt, 1, max_seq - prefix - 1);
    const std::uint64_t prompt = prefix + user;
    const std::uint64_t output = draw_length(lengths, d->output, 1, max_seq - prompt);
    Request r;
    r.prompt = Tokens{prompt};
    r.output = Tokens{output};
    if (with_prefix) {
      r.prefix_id = std::string(kSystemPromptId);
      r.prefix_tokens = Tokens{prefix};
    }
    r.source = std::string(d->name);
    out.push_back(std::move(r));
  }
  std::uint64_t step = 0;
  for (std::size_t next = 0; next < out.size(); ++step) {
    if (step >= kMaxSteps) {
      throw std::invalid_argument("at this arrival rate the requests arrive over more "
                                  "than " + std::to_string(kMaxSteps) + " steps");
    }
    const std::uint64_t k = draw_poisson(arrivals, spec.rate);
    for (std::uint64_t j = 0; j < k && next < out.size(); ++j) out[next++].arrival = step;
  }
  return out;
}

WorkloadSummary summarize(std::span<const Request> workload) {
  WorkloadSummary s;
  s.requests = workload.size();
  if (workload.empty()) return s;
  s.first_arrival = workload.front().arrival;
  std::unordered_map<std::string, std::size_t> by_source;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> sums;  // per dataset: user prompt, output
  std::unordered_map<std::string, bool> prefixes;
  double prompt_sum = 0;
  double output_sum = 0;
  for (const Request& r : workload) {
    s.first_arrival = std::min(s.first_arrival, r.arrival);
    s.last_arrival = std::max(s.last_arrival, r.arrival);
    s.max_prompt = std::max(s.max_prompt, r.prompt.count());
    s.max_output = std::max(s.max_output, r.output.count());
    prompt_sum += static_cast<double>(r.prompt.count());
    output_sum += static_cast<double>(r.output.count());
    if (!r.prefix_id.empty()) {
      ++s.with_prefix;
      prefixes[r.prefix_id] = true;
    }
    auto [it, fresh] = by_source.try_emplace(r.source, s.datasets.size());
    if (fresh) {
      s.datasets.push_back({r.source, 0, 0, 0});
      sums.emplace_back(0, 0);
    }
    DatasetSummary& d = s.datasets[it->second];
    ++d.requests;
    sums[it->second].first += r.prompt.count() - r.prefix_tokens.count();
    sums[it->second].second += r.output.count();
  }
  s.prefixes = prefixes.size();
  s.mean_prompt = prompt_sum / static_cast<double>(s.requests);
  s.mean_output = output_sum / static_cast<double>(s.requests);
  for (std::size_t i = 0; i < s.datasets.size(); ++i) {
    const auto n = static_cast<double>(s.datasets[i].requests);
    s.datasets[i].mean_prompt = static_cast<double>(sums[i].first) / n;
    s.datasets[i].mean_output = static_cast<double>(sums[i].second) / n;
  }
  return s;
}

// ---- Traces --------------------------------------------------------------------

namespace {

// One row of a trace, before validation.
struct Row {
  std::optional<std::uint64_t> arrival;
  std::optional<std::uint64_t> prompt;
  std::optional<std::uint64_t> output;
  std::optional<std::string> prefix_id;        // nullopt or empty: none
  std::optional<std::uint64_t> prefix_tokens;
};

class TraceParser {
 public:
  explicit TraceParser(std::string_view name) : name_(name) {}

  [[noreturn]] void fail(std::size_t line, const std::string& what) const {
    throw TraceError(std::string(name_) + ":" + std::to_string(line) + ": " + what);
  }

  // A whole decimal number (digits only) for `field`.
  std::uint64_t number(std::size_t line, std::string_view field, std::string_view text) const {
    if (text.empty()) fail(line, std::string(field) + " is empty");
    if (text.starts_with('-')) {
      fail(line, std::string(field) + " " + in_quotes(text) + " is negative");
    }
    std::uint64_t v = 0;
    const char* end = text.data() + text.size();
    const auto [ptr, ec] = std::from_chars(text.data(), end, v);
    if (ec == std::errc::result_out_of_range) {
      fail(line, std::string(field) + " " + in_quotes(text) + " does not fit in 64 bits");
    }
    if (ec != std::errc{} || ptr != end) {
      fail(line, std::string(field) + " " + in_quotes(text) + " is not a whole number");
    }
    return v;
  }

  // Validates a row and appends its request.
  void add(std::size_t line, const Row& row) {
    if (!row.arrival) fail(line, "missing arrival");
    if (!row.prompt) fail(line, "missing prompt_tokens");
    if (!row.output) fail(line, "missing output_tokens");
    if (*row.arrival >= kMaxSteps) {
      fail(line, "arrival " + std::to_string(*row.arrival) + " is beyond the longest run (" +
                     std::to_string(kMaxSteps) + " steps)");
    }
    if (*row.prompt == 0) fail(line, "prompt_tokens must be at least 1");
    if (*row.output == 0) fail(line, "output_tokens must be at least 1");
    if (*row.prompt > kMaxTraceTokens) {
      fail(line, "prompt_tokens " + std::to_string(*row.prompt) + " is too large (at most " +
                     std::to_string(kMaxTraceTokens) + ")");
    }
    if (*row.output > kMaxTraceTokens) {
      fail(line, "output_tokens " + std::to_string(*row.output) + " is too large (at most " +
                     std::to_string(kMaxTraceTokens) + ")");
    }
    const bool has_id = row.prefix_id.has_value() && !row.prefix_id->empty();
    if (has_id != row.prefix_tokens.has_value()) {
      fail(line, has_id ? "prefix_id " + in_quotes(*row.prefix_id) + " without prefix_tokens"
                        : std::string("prefix_tokens without a prefix_id"));
    }
    Request r;
    r.arrival = *row.arrival;
    r.prompt = Tokens{*row.prompt};
    r.output = Tokens{*row.output};
    r.source = "trace";
    if (has_id) {
      const std::uint64_t n = *row.prefix_tokens;
      if (n == 0) fail(line, "prefix_tokens must be at least 1");
      if (n > *row.prompt) {
        fail(line, "prefix_tokens " + std::to_string(n) + " is longer than the prompt (" +
                       std::to_string(*row.prompt) + " tokens)");
      }
      const auto [it, fresh] = prefixes_.try_emplace(*row.prefix_id, n, line);
      if (!fresh && it->second.first != n) {
        fail(line, "prefix " + in_quotes(*row.prefix_id) + " has " + std::to_string(n) +
                       " tokens here but " + std::to_string(it->second.first) + " on line " +
                       std::to_string(it->second.second));
      }
      r.prefix_id = *row.prefix_id;
      r.prefix_tokens = Tokens{n};
    }
    out_.push_back(std::move(r));
  }

  std::vector<Request> finish() {
    if (out_.empty()) throw TraceError(std::string(name_) + ": no requests");
    // Arrival order, ties in file order. (Not std::stable_sort: libstdc++
    // 12's uses the deprecated get_temporary_buffer, which clang 19 flags.)
    std::vector<std::size_t> order(out_.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::ranges::sort(order, [&](std::size_t a, std::size_t b) {
      return out_[a].arrival != out_[b].arrival ? out_[a].arrival < out_[b].arrival : a < b;
    });
    std::vector<Request> sorted;
    sorted.reserve(out_.size());
    for (const std::size_t i : order) sorted.push_back(std::move(out_[i]));
    return sorted;
  }

 private:
  std::string_view name_;
  std::vector<Request> out_;
  std::map<std::string, std::pair<std::uint64_t, std::size_t>, std::less<>> prefixes_;
};

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) {
    s.remove_suffix(1);
  }
  return s;
}

// Calls f(line_number, line) for every line that is not blank or a comment.
// f is called once per line, so it is taken by const reference, not forwarded.
template <class F>
void for_each_line(std::string_view text, const F& f) {
  std::size_t number = 0;
  while (!text.empty()) {
    const std::size_t nl = text.find('\n');
    const std::string_view line = trim(text.substr(0, nl));
    text = nl == std::string_view::npos ? std::string_view{} : text.substr(nl + 1);
    ++number;
    if (line.empty() || line.front() == '#') continue;
    f(number, line);
  }
}

// Splits a CSV line into fields: commas separate, a field may be quoted
// ("a,b" and "" for a quote inside), spaces around fields are dropped.
std::vector<std::string> csv_fields(const TraceParser& p, std::size_t line, std::string_view s) {
  std::vector<std::string> fields;
  std::size_t i = 0;
  while (true) {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t')) ++i;
    std::string field;
    if (i < s.size() && s[i] == '"') {
      ++i;
      bool closed = false;
      while (i < s.size()) {
        if (s[i] == '"') {
          if (i + 1 < s.size() && s[i + 1] == '"') {
            field += '"';
            i += 2;
            continue;
          }
          ++i;
          closed = true;
          break;
        }
        field += s[i++];
      }
      if (!closed) p.fail(line, "unterminated quoted field");
      while (i < s.size() && (s[i] == ' ' || s[i] == '\t')) ++i;
      if (i < s.size() && s[i] != ',') p.fail(line, "text after a quoted field");
    } else {
      const std::size_t comma = s.find(',', i);
      field = std::string(trim(s.substr(i, comma == std::string_view::npos ? s.npos : comma - i)));
      i = comma == std::string_view::npos ? s.size() : comma;
    }
    fields.push_back(std::move(field));
    if (i >= s.size()) break;
    ++i;  // the comma
  }
  return fields;
}

void parse_csv(TraceParser& p, std::string_view text) {
  bool first = true;
  for_each_line(text, [&](std::size_t line, std::string_view s) {
    const std::vector<std::string> f = csv_fields(p, line, s);
    const bool is_first = std::exchange(first, false);
    if (is_first && !f.empty()) {
      std::string head = f[0];
      std::ranges::transform(head, head.begin(), [](char c) {
        return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
      });
      if (head.starts_with("arrival")) return;  // the header
    }
    if (f.size() != 3 && f.size() != 5) {
      p.fail(line, "expected 3 or 5 comma-separated fields "
                   "(arrival,prompt_tokens,output_tokens[,prefix_id,prefix_tokens]), got " +
                       std::to_string(f.size()));
    }
    Row row;
    row.arrival = p.number(line, "arrival", f[0]);
    row.prompt = p.number(line, "prompt_tokens", f[1]);
    row.output = p.number(line, "output_tokens", f[2]);
    if (f.size() == 5) {
      if (!f[3].empty()) row.prefix_id = f[3];
      if (!f[4].empty()) row.prefix_tokens = p.number(line, "prefix_tokens", f[4]);
    }
    p.add(line, row);
  });
}

// A JSON value of one line: enough to read a flat object of numbers and
// strings, and to skip anything else.
struct JsonValue {
  enum class Kind : std::uint8_t { number, string, null, other } kind = Kind::other;
  std::string text;  // a number's source text, or a string's decoded content
};

class JsonLine {
 public:
  JsonLine(const TraceParser& p, std::size_t line, std::string_view s)
      : p_(p), line_(line), s_(s) {}

  // The members of the line's object, in order.
  std::vector<std::pair<std::string, JsonValue>> object() {
    std::vector<std::pair<std::string, JsonValue>> members;
    ws();
    expect('{');
    ws();
    if (peek() == '}') {
      ++i_;
    } else {
      while (true) {
        ws();
        if (peek() != '"') error("expected a quoted key");
        std::string key = string();
        ws();
        expect(':');
        ws();
        JsonValue v = value(0);
        members.emplace_back(std::move(key), std::move(v));
        ws();
        if (peek() == ',') {
          ++i_;
          continue;
        }
        expect('}');
        break;
      }
    }
    ws();
    if (i_ != s_.size()) error("text after the object");
    return members;
  }

 private:
  [[noreturn]] void error(const std::string& what) const {
    p_.fail(line_, "invalid JSON at column " + std::to_string(i_ + 1) + ": " + what);
  }
  [[nodiscard]] char peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
  void ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\r')) ++i_;
  }
  void expect(char c) {
    if (peek() != c) error(std::string("expected '") + c + "'");
    ++i_;
  }
  static void put_utf8(std::string& out, std::uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0U | (cp >> 6U));
      out += static_cast<char>(0x80U | (cp & 0x3FU));
    } else {
      out += static_cast<char>(0xE0U | (cp >> 12U));
      out += static_cast<char>(0x80U | ((cp >> 6U) & 0x3FU));
      out += static_cast<char>(0x80U | (cp & 0x3FU));
    }
  }
  std::string string() {
    expect('"');
    std::string out;
    while (true) {
      if (i_ >= s_.size()) error("unterminated string");
      const char c = s_[i_++];
      if (c == '"') return out;
      if (c != '\\') {
        out += c;
        continue;
      }
      if (i_ >= s_.size()) error("unterminated string");
      const char e = s_[i_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          if (i_ + 4 > s_.size()) error("short \\u escape");
          std::uint32_t cp = 0;
          const auto [ptr, ec] = std::from_chars(s_.data() + i_, s_.data() + i_ + 4, cp, 16);
          if (ec != std::errc{} || ptr != s_.data() + i_ + 4) error("bad \\u escape");
          i_ += 4;
          put_utf8(out, cp);
          break;
        }
        default: error(std::string("bad escape '\\") + e + "'");
      }
    }
  }
  JsonValue value(int depth) {
    if (depth > 64) error("nested too deeply");
    JsonValue v;
    const char c = peek();
    if (c == '"') {
      v.kind = JsonValue::Kind::string;
      v.text = string();
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      const std::size_t start = i_;
      while (i_ < s_.size() && (std::string_view("+-.eE").find(s_[i_]) != std::string_view::npos ||
                                (s_[i_] >= '0' && s_[i_] <= '9'))) {
        ++i_;
      }
      v.kind = JsonValue::Kind::number;
      v.text = std::string(s_.substr(start, i_ - start));
    } else if (s_.substr(i_).starts_with("null")) {
      i_ += 4;
      v.kind = JsonValue::Kind::null;
    } else if (s_.substr(i_).starts_with("true")) {
      i_ += 4;
    } else if (s_.substr(i_).starts_with("false")) {
      i_ += 5;
    } else if (c == '[' || c == '{') {
      const char close = c == '[' ? ']' : '}';
      ++i_;
      ws();
      if (peek() == close) {
        ++i_;
        return v;
      }
      while (true) {
        ws();
        if (close == '}') {
          if (peek() != '"') error("expected a quoted key");
          static_cast<void>(string());
          ws();
          expect(':');
          ws();
        }
        static_cast<void>(value(depth + 1));
        ws();
        if (peek() == ',') {
          ++i_;
          continue;
        }
        expect(close);
        break;
      }
    } else {
      error("expected a value");
    }
    return v;
  }

  const TraceParser& p_;
  std::size_t line_;
  std::string_view s_;
  std::size_t i_ = 0;
};

void parse_jsonl(TraceParser& p, std::string_view text) {
  for_each_line(text, [&](std::size_t line, std::string_view s) {
    JsonLine parser(p, line, s);
    Row row;
    std::vector<std::string_view> seen;
    for (const auto& [key, v] : parser.object()) {
      const bool known = key == "arrival" || key == "prompt_tokens" || key == "output_tokens" ||
                         key == "prefix_id" || key == "prefix_tokens";
      if (!known) continue;  // extra fields of a serving log are fine
      if (std::ranges::find(seen, key) != seen.end()) p.fail(line, "\"" + key + "\" given twice");
      seen.push_back(key);
      if (key == "prefix_id") {
        if (v.kind == JsonValue::Kind::string) {
          row.prefix_id = v.text;
        } else if (v.kind != JsonValue::Kind::null) {
          p.fail(line, "prefix_id must be a string");
        }
        continue;
      }
      if (v.kind == JsonValue::Kind::null && key == "prefix_tokens") continue;
      if (v.kind != JsonValue::Kind::number) p.fail(line, key + " must be a whole number");
      const std::uint64_t n = p.number(line, key, v.text);
      if (key == "arrival") row.arrival = n;
      if (key == "prompt_tokens") row.prompt = n;
      if (key == "output_tokens") row.output = n;
      if (key == "prefix_tokens") row.prefix_tokens = n;
    }
    p.add(line, row);
  });
}

}  // namespace

TraceFormat detect_format(std::string_view name, std::string_view text) noexcept {
  const auto ends = [&](std::string_view ext) {
    if (name.size() < ext.size()) return false;
    const std::string_view tail = name.substr(name.size() - ext.size());
    return std::ranges::equal(tail, ext, [](char a, char b) {
      return ((a >= 'A' && a <= 'Z') ? static_cast<char>(a - 'A' + 'a') : a) == b;
    });
  };
  if (ends(".csv")) return TraceFormat::csv;
  if (ends(".jsonl") || ends(".ndjson") || ends(".json")) return TraceFormat::jsonl;
  for (const char c : text) {
    if (c == ' ' || c == '\t' || c == '\r' || c == '\n') continue;
    return c == '{' ? TraceFormat::jsonl : TraceFormat::csv;
  }
  return TraceFormat::csv;
}

std::vector<Request> parse_trace(std::string_view text, std::string_view name,
                                 TraceFormat format) {
  TraceParser p(name);
  if (format == TraceFormat::csv) {
    parse_csv(p, text);
  } else {
    parse_jsonl(p, text);
  }
  return p.finish();
}

std::vector<Request> load_trace(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    throw TraceError("cannot read trace '" + path + "': it is a directory");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw TraceError("cannot open trace '" + path + "'");
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw TraceError("cannot read trace '" + path + "'");
  const std::string text = ss.str();
  return parse_trace(text, path, detect_format(path, text));
}

}  // namespace kvcache_sim
