// Tests of the kvcache_sim module: the random numbers and the embedded
// workload, the trace parsers, the simulation loop against small workloads
// worked out by hand (every figure below is derived in the comment above
// it), the renderers, the command line and run()'s exit codes. The
// executable itself is exercised by the sim.cli.* tests (CMakeLists.txt).
//
// The hand-computed cases use ModelConfig{1, 1, 1, 1}: one layer, a token is
// 2 bytes (K and V of one 1-byte element), a page of P tokens is 2P bytes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

import kvcache;
import kvcache_sim;
import kvcache_sim.svg;

using kvcache::Bytes;
using kvcache::ModelConfig;
using kvcache::Tokens;
using namespace kvcache_sim;

namespace {

constexpr double kEps = 1e-9;

Request req(std::uint64_t arrival, std::uint64_t prompt, std::uint64_t output,
            std::string prefix = "", std::uint64_t prefix_tokens = 0) {
  Request r;
  r.arrival = arrival;
  r.prompt = Tokens{prompt};
  r.output = Tokens{output};
  r.prefix_id = std::move(prefix);
  r.prefix_tokens = Tokens{prefix_tokens};
  r.source = "test";
  return r;
}

// One layer, 2 bytes per token; `budget` bytes; max sequence 8 tokens.
SimParams tiny(std::uint64_t budget, std::uint64_t page_size = 2, std::uint64_t steps = 0) {
  SimParams p;
  p.model = ModelConfig{1, 1, 1, 1};
  p.budget = Bytes{budget};
  p.max_seq_len = Tokens{8};
  p.page_size = Tokens{page_size};
  p.max_steps = steps;
  return p;
}

// A: prompt 2, output 3; B: prompt 1, output 2; both at step 0.
std::vector<Request> two_requests() { return {req(0, 2, 3), req(0, 1, 2)}; }

std::vector<double> kv_shares(const ModeResult& m) {
  std::vector<double> v;
  for (const StepSample& s : m.timeline) v.push_back(s.kv_share);
  return v;
}
std::vector<double> reserved_shares(const ModeResult& m) {
  std::vector<double> v;
  for (const StepSample& s : m.timeline) v.push_back(s.reserved_share);
  return v;
}

void expect_shares(const std::vector<double>& got, std::initializer_list<double> want) {
  ASSERT_EQ(got.size(), want.size());
  std::size_t i = 0;
  for (const double w : want) {
    EXPECT_NEAR(got[i], w, kEps) << "step " << i;
    ++i;
  }
}

Options parse(std::initializer_list<std::string_view> args) {
  const std::vector<std::string_view> v(args);
  return parse_args(v);
}

std::string usage_error(std::initializer_list<std::string_view> args) {
  try {
    static_cast<void>(parse(args));
  } catch (const UsageError& e) {
    return e.what();
  }
  return "";
}

std::string trace_error(std::string_view text, TraceFormat format) {
  try {
    static_cast<void>(parse_trace(text, "t", format));
  } catch (const TraceError& e) {
    return e.what();
  }
  return "";
}

struct RunResult {
  int code;
  std::string out;
  std::string err;
};

RunResult run_with(std::initializer_list<std::string_view> args, bool bar = false) {
  const std::vector<std::string_view> v(args);
  std::ostringstream out;
  std::ostringstream err;
  const int code = run(v, out, err, bar);
  return {code, out.str(), err.str()};
}

// Brackets balance outside strings: a cheap well-formedness check of JSON.
bool balanced_json(const std::string& s) {
  std::vector<char> stack;
  bool in_string = false;
  for (std::size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (in_string) {
      if (c == '\\') {
        ++i;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') in_string = true;
    if (c == '{' || c == '[') stack.push_back(c);
    if (c == '}' || c == ']') {
      if (stack.empty() || stack.back() != (c == '}' ? '{' : '[')) return false;
      stack.pop_back();
    }
  }
  return stack.empty() && !in_string;
}

std::size_t occurrences(const std::string& s, std::string_view what) {
  std::size_t n = 0;
  for (std::size_t pos = s.find(what); pos != std::string::npos; pos = s.find(what, pos + 1)) ++n;
  return n;
}

}  // namespace

// ---- Random numbers and the embedded workload ------------------------------------

TEST(SplitMix64, ReferenceOutput) {
  // The reference implementation (Vigna, splitmix64.c) seeded with 0.
  SplitMix64 rng(0);
  EXPECT_EQ(rng.next(), 0xe220a8397b1dcdafULL);
  EXPECT_EQ(rng.next(), 0x6e789e6aa1b965f4ULL);
  SplitMix64 u(7);
  for (int i = 0; i < 1000; ++i) {
    const double x = u.uniform();
    ASSERT_GE(x, 0.0);
    ASSERT_LT(x, 1.0);
  }
}

TEST(Draws, LogNormalMeanAndClamp) {
  SplitMix64 rng(1);
  double sum = 0;
  constexpr int n = 20000;
  for (int i = 0; i < n; ++i) {
    const std::uint64_t v = draw_length(rng, {100.0, 0.8}, 1, 100000);
    ASSERT_GE(v, 1u);
    sum += static_cast<double>(v);
  }
  EXPECT_NEAR(sum / n, 100.0, 3.0);
  for (int i = 0; i < 1000; ++i) {
    const std::uint64_t v = draw_length(rng, {1000.0, 2.0}, 5, 50);
    ASSERT_GE(v, 5u);
    ASSERT_LE(v, 50u);
  }
}

TEST(Draws, PoissonMean) {
  SplitMix64 rng(2);
  double sum = 0;
  constexpr int n = 20000;
  for (int i = 0; i < n; ++i) sum += static_cast<double>(draw_poisson(rng, 3.0));
  EXPECT_NEAR(sum / n, 3.0, 0.06);
}

TEST(Workload, DatasetsAndNames) {
  EXPECT_EQ(sharegpt().name, "sharegpt");
  EXPECT_DOUBLE_EQ(sharegpt().prompt.mean, 161.31);
  EXPECT_DOUBLE_EQ(sharegpt().output.mean, 337.99);
  EXPECT_EQ(alpaca().name, "alpaca");
  EXPECT_DOUBLE_EQ(alpaca().prompt.mean, 19.31);
  EXPECT_DOUBLE_EQ(alpaca().output.mean, 58.45);
  EXPECT_EQ(workload_name(WorkloadKind::mixed), "mixed");
  EXPECT_EQ(workload_name(WorkloadKind::sharegpt), "sharegpt");
  EXPECT_EQ(workload_name(WorkloadKind::alpaca), "alpaca");
  const std::vector<std::string_view> labels = {"basic, max", "basic, oracle", "paged",
                                                "paged + prefix"};
  const std::vector<std::string_view> keys = {"basic_max", "basic_oracle", "paged",
                                              "paged_prefix"};
  for (std::size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(mode_label(kModes[i]), labels[i]);
    EXPECT_EQ(mode_key(kModes[i]), keys[i]);
    EXPECT_EQ(is_paged(kModes[i]), i >= 2);
  }
}

TEST(Workload, DeterministicForASeed) {
  WorkloadSpec spec;
  spec.requests = 300;
  const std::vector<Request> a = generate_workload(spec);
  const std::vector<Request> b = generate_workload(spec);
  ASSERT_EQ(a.size(), 300u);
  for (std::size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].arrival, b[i].arrival);
    EXPECT_EQ(a[i].prompt, b[i].prompt);
    EXPECT_EQ(a[i].output, b[i].output);
    EXPECT_EQ(a[i].prefix_id, b[i].prefix_id);
  }
  spec.seed = 43;
  const std::vector<Request> c = generate_workload(spec);
  std::size_t same = 0;
  for (std::size_t i = 0; i < a.size(); ++i) same += a[i].output == c[i].output ? 1U : 0U;
  EXPECT_LT(same, 30u);
}

TEST(Workload, PublishedMeans) {
  WorkloadSpec spec;
  spec.requests = 20000;
  spec.system_prompt_pct = 0;
  spec.kind = WorkloadKind::sharegpt;
  WorkloadSummary s = summarize(generate_workload(spec));
  EXPECT_NEAR(s.mean_prompt, 161.31, 161.31 * 0.04);
  EXPECT_NEAR(s.mean_output, 337.99, 337.99 * 0.04);
  spec.kind = WorkloadKind::alpaca;
  s = summarize(generate_workload(spec));
  EXPECT_NEAR(s.mean_prompt, 19.31, 19.31 * 0.04);
  EXPECT_NEAR(s.mean_output, 58.45, 58.45 * 0.04);
}

TEST(Workload, MixedWithSystemPrompt) {
  WorkloadSpec spec;  // the defaults: mixed, 50 % with a 200-token system prompt
  spec.requests = 4000;
  const std::vector<Request> w = generate_workload(spec);
  const WorkloadSummary s = summarize(w);
  ASSERT_EQ(s.datasets.size(), 2u);
  EXPECT_NEAR(static_cast<double>(s.datasets[0].requests), 2000.0, 150.0);
  EXPECT_NEAR(static_cast<double>(s.with_prefix), 2000.0, 150.0);
  EXPECT_EQ(s.prefixes, 1u);
  std::uint64_t previous = 0;
  for (const Request& r : w) {
    ASSERT_GE(r.prompt.count(), 1u);
    ASSERT_GE(r.output.count(), 1u);
    ASSERT_LE(r.prompt.count() + r.output.count(), 4096u);
    ASSERT_GE(r.arrival, previous);
    previous = r.arrival;
    if (!r.prefix_id.empty()) {
      EXPECT_EQ(r.prefix_id, "system-prompt");
      EXPECT_EQ(r.prefix_tokens, Tokens{200});
      EXPECT_GT(r.prompt, Tokens{200});
    } else {
      EXPECT_EQ(r.prefix_tokens, Tokens{0});
    }
  }
  // Poisson(1) arrivals: 4,000 requests over about 4,000 steps.
  EXPECT_EQ(w.front().arrival, s.first_arrival);
  EXPECT_NEAR(static_cast<double>(s.last_arrival), 4000.0, 250.0);
}

TEST(Workload, LengthsFitTheMaxSequence) {
  WorkloadSpec spec;
  spec.requests = 2000;
  spec.max_seq_len = Tokens{256};
  for (const Request& r : generate_workload(spec)) {
    ASSERT_LE(r.prompt.count() + r.output.count(), 256u);
    ASSERT_GE(r.output.count(), 1u);
  }
}

TEST(Workload, RejectsImpossibleSpecs) {
  WorkloadSpec spec;
  spec.requests = 0;
  EXPECT_THROW(static_cast<void>(generate_workload(spec)), std::invalid_argument);
  spec = WorkloadSpec{};
  spec.rate = 0;
  EXPECT_THROW(static_cast<void>(generate_workload(spec)), std::invalid_argument);
  spec = WorkloadSpec{};
  spec.max_seq_len = Tokens{201};  // a 200-token system prompt leaves no room
  EXPECT_THROW(static_cast<void>(generate_workload(spec)), std::invalid_argument);
}

// ---- Traces ------------------------------------------------------------------------

TEST(Trace, CsvWithHeaderCommentsAndPrefixes) {
  const std::vector<Request> w = parse_trace(
      "arrival,prompt_tokens,output_tokens,prefix_id,prefix_tokens\n"
      "# a comment\n"
      "\n"
      "5, 10, 3\n"
      "0,12,4,\"sys, v1\",8\r\n"
      "5,9,1,,\n"
      "0,20,2,\"sys, v1\",8\n",
      "t.csv", TraceFormat::csv);
  ASSERT_EQ(w.size(), 4u);
  // Arrival order, ties in file order.
  EXPECT_EQ(w[0].arrival, 0u);
  EXPECT_EQ(w[0].prompt, Tokens{12});
  EXPECT_EQ(w[0].prefix_id, "sys, v1");
  EXPECT_EQ(w[0].prefix_tokens, Tokens{8});
  EXPECT_EQ(w[1].prompt, Tokens{20});
  EXPECT_EQ(w[2].arrival, 5u);
  EXPECT_EQ(w[2].prompt, Tokens{10});
  EXPECT_EQ(w[2].output, Tokens{3});
  EXPECT_TRUE(w[2].prefix_id.empty());
  EXPECT_EQ(w[3].prompt, Tokens{9});
  EXPECT_TRUE(w[3].prefix_id.empty());
}

TEST(Trace, Jsonl) {
  const std::vector<Request> w = parse_trace(
      R"({"arrival": 3, "prompt_tokens": 7, "output_tokens": 2, "user": {"id": [1, 2]}, "ok": true}
{"prompt_tokens": 16, "output_tokens": 1, "arrival": 0, "prefix_id": "sys\u0041", "prefix_tokens": 4}
{"arrival": 1, "prompt_tokens": 3, "output_tokens": 5, "prefix_id": null, "prefix_tokens": null}
)",
      "t.jsonl", TraceFormat::jsonl);
  ASSERT_EQ(w.size(), 3u);
  EXPECT_EQ(w[0].prompt, Tokens{16});
  EXPECT_EQ(w[0].prefix_id, "sysA");
  EXPECT_EQ(w[0].prefix_tokens, Tokens{4});
  EXPECT_EQ(w[1].arrival, 1u);
  EXPECT_TRUE(w[1].prefix_id.empty());
  EXPECT_EQ(w[2].arrival, 3u);
  EXPECT_EQ(w[2].output, Tokens{2});
}

TEST(Trace, ErrorsNameTheLine) {
  EXPECT_EQ(trace_error("0,1,1\n0,1\n", TraceFormat::csv),
            "t:2: expected 3 or 5 comma-separated fields "
            "(arrival,prompt_tokens,output_tokens[,prefix_id,prefix_tokens]), got 2");
  EXPECT_EQ(trace_error("0,1,1\n\n# c\n0,abc,1\n", TraceFormat::csv),
            "t:4: prompt_tokens 'abc' is not a whole number");
  EXPECT_EQ(trace_error("0,1,-3\n", TraceFormat::csv), "t:1: output_tokens '-3' is negative");
  EXPECT_EQ(trace_error("0,0,1\n", TraceFormat::csv), "t:1: prompt_tokens must be at least 1");
  EXPECT_EQ(trace_error("0,1,0\n", TraceFormat::csv), "t:1: output_tokens must be at least 1");
  EXPECT_EQ(trace_error("0,4,1,sys,5\n", TraceFormat::csv),
            "t:1: prefix_tokens 5 is longer than the prompt (4 tokens)");
  EXPECT_EQ(trace_error("0,4,1,sys,\n", TraceFormat::csv), "t:1: prefix_id 'sys' without prefix_tokens");
  EXPECT_EQ(trace_error("0,4,1,,2\n", TraceFormat::csv), "t:1: prefix_tokens without a prefix_id");
  EXPECT_EQ(trace_error("0,8,1,sys,4\n1,8,1,sys,3\n", TraceFormat::csv),
            "t:2: prefix 'sys' has 3 tokens here but 4 on line 1");
  EXPECT_EQ(trace_error("1000000,1,1\n", TraceFormat::csv),
            "t:1: arrival 1000000 is beyond the longest run (1000000 steps)");
  EXPECT_EQ(trace_error("0,\"sys,1,1\n", TraceFormat::csv), "t:1: unterminated quoted field");
  EXPECT_EQ(trace_error("# only a comment\n", TraceFormat::csv), "t: no requests");
  EXPECT_EQ(trace_error("{\"arrival\": 0, \"prompt_tokens\": 1}\n", TraceFormat::jsonl),
            "t:1: missing output_tokens");
  EXPECT_EQ(trace_error("{\"arrival\": 0, \"prompt_tokens\": 1.5, \"output_tokens\": 1}\n",
                        TraceFormat::jsonl),
            "t:1: prompt_tokens '1.5' is not a whole number");
  EXPECT_EQ(trace_error("{\"arrival\": 0, \"prompt_tokens\": \"7\", \"output_tokens\": 1}\n",
                        TraceFormat::jsonl),
            "t:1: prompt_tokens must be a whole number");
  EXPECT_EQ(trace_error("{\"arrival\": 0, \"arrival\": 1, \"prompt_tokens\": 7, "
                        "\"output_tokens\": 1}\n",
                        TraceFormat::jsonl),
            "t:1: \"arrival\" given twice");
  EXPECT_EQ(trace_error("{\"arrival\": 0, \"prompt_tokens\": 7, \"output_tokens\": 1}\n"
                        "{\"arrival\": 0 \"prompt_tokens\": 7}\n",
                        TraceFormat::jsonl),
            "t:2: invalid JSON at column 15: expected '}'");
  EXPECT_EQ(trace_error("{\"arrival\": 0, \"prompt_tokens\": 7, \"output_tokens\": 1} x\n",
                        TraceFormat::jsonl),
            "t:1: invalid JSON at column 56: text after the object");
}

TEST(Trace, FormatDetection) {
  EXPECT_EQ(detect_format("a.csv", "{"), TraceFormat::csv);
  EXPECT_EQ(detect_format("a.JSONL", "0,1,1"), TraceFormat::jsonl);
  EXPECT_EQ(detect_format("a.ndjson", ""), TraceFormat::jsonl);
  EXPECT_EQ(detect_format("trace", "\n  {\"arrival\": 0}"), TraceFormat::jsonl);
  EXPECT_EQ(detect_format("trace", "0,1,1"), TraceFormat::csv);
}

TEST(Trace, LoadFromFiles) {
  const std::vector<Request> w = load_trace(std::string(KVCACHE_SIM_TEST_DATA) + "/two.csv");
  ASSERT_EQ(w.size(), 2u);
  EXPECT_EQ(w[0].prompt, Tokens{2});
  EXPECT_EQ(w[1].output, Tokens{2});
  EXPECT_THROW(static_cast<void>(load_trace(std::string(KVCACHE_SIM_TEST_DATA) + "/none.csv")),
               TraceError);
  EXPECT_THROW(static_cast<void>(load_trace(KVCACHE_SIM_TEST_DATA)), TraceError);
}

// ---- The simulation, by hand -------------------------------------------------------

// basic, max on a 20-byte budget (10 tokens), max sequence 8: each request
// reserves 8 tokens = 16 B, so one runs at a time. A runs steps 0-2 holding
// 3, 4, 5 tokens; B runs steps 3-4 holding 2, 3. Reserved: 16/20 = 0.8
// every step; fragmentation 1 - (3+4+5+2+3) / (5 * 8) = 0.575.
TEST(Simulate, BasicMaxReservesTheWholeSequence) {
  const std::vector<Request> w = two_requests();
  const ModeResult m = simulate(Mode::basic_max, tiny(20), w);
  EXPECT_EQ(m.steps, 5u);
  EXPECT_TRUE(m.drained);
  EXPECT_EQ(m.finished, 2u);
  EXPECT_EQ(m.admitted, 2u);
  EXPECT_EQ(m.rejected, 0u);
  EXPECT_EQ(m.preemptions, 0u);
  EXPECT_EQ(m.generated_tokens, 5u);
  EXPECT_DOUBLE_EQ(m.mean_batch, 1.0);
  EXPECT_EQ(m.peak_batch, 1u);
  expect_shares(kv_shares(m), {0.3, 0.4, 0.5, 0.2, 0.3});
  expect_shares(reserved_shares(m), {0.8, 0.8, 0.8, 0.8, 0.8});
  EXPECT_NEAR(m.mean_kv_share, 0.34, kEps);
  EXPECT_NEAR(m.peak_kv_share, 0.5, kEps);
  EXPECT_NEAR(m.mean_reserved_share, 0.8, kEps);
  EXPECT_NEAR(m.internal_fragmentation, 0.575, kEps);
  EXPECT_EQ(m.page_size, Tokens{0});
}

// basic, oracle: A reserves 2 + 3 = 5 tokens (10 B), B 1 + 2 = 3 (6 B);
// both fit. Step 0: A 3 + B 2 tokens; step 1: 4 + 3 (B finishes); step 2:
// A 5. Reserved 16, 16, 10 B. Fragmentation 1 - 34 / 42.
TEST(Simulate, BasicOracleReservesPromptPlusOutput) {
  const std::vector<Request> w = two_requests();
  const ModeResult m = simulate(Mode::basic_oracle, tiny(20), w);
  EXPECT_EQ(m.steps, 3u);
  EXPECT_EQ(m.finished, 2u);
  EXPECT_NEAR(m.mean_batch, 5.0 / 3.0, kEps);
  EXPECT_EQ(m.peak_batch, 2u);
  expect_shares(kv_shares(m), {0.5, 0.7, 0.5});
  expect_shares(reserved_shares(m), {0.8, 0.8, 0.5});
  EXPECT_NEAR(m.internal_fragmentation, 1.0 - 34.0 / 42.0, kEps);
}

// paged, page size 2 (4 B per page, 5 pages): A takes 1 page for its
// 2-token prompt, B 1 page. Step 0: A's 3rd token takes a page (3 pages,
// 5 tokens); step 1: B's 3rd token takes one (4 pages, 7 tokens), B ends
// and returns 2; step 2: A's 5th token takes one (3 pages, 5 tokens).
// Block-table entries 3, 4, 3. Fragmentation 1 - 34 / 40.
TEST(Simulate, PagedTakesPagesOnDemand) {
  const std::vector<Request> w = two_requests();
  const ModeResult m = simulate(Mode::paged, tiny(20), w);
  EXPECT_EQ(m.steps, 3u);
  EXPECT_EQ(m.finished, 2u);
  EXPECT_EQ(m.preemptions, 0u);
  EXPECT_EQ(m.total_pages, 5u);
  EXPECT_EQ(m.page_size, Tokens{2});
  expect_shares(kv_shares(m), {0.5, 0.7, 0.5});
  expect_shares(reserved_shares(m), {0.6, 0.8, 0.6});
  EXPECT_NEAR(m.internal_fragmentation, 1.0 - 34.0 / 40.0, kEps);
  EXPECT_NEAR(m.mean_page_table_entries, 10.0 / 3.0, kEps);
  EXPECT_EQ(m.peak_page_table_entries, 4u);
  EXPECT_EQ(m.prefix_hits + m.prefix_misses, 0u);
  EXPECT_EQ(m.peak_saved_bytes, 0u);
}

// paged with 3 pages (12 B). Step 0: A 2->3 takes the 3rd page; B 1->2.
// Step 1: A 3->4; B needs a page, none is free, B is the newest: B
// preempts itself (preemption 1) and waits with 1 generated token.
// Step 2: B comes back with a 2-token prompt (1 page, the last free one);
// A needs a page for its 5th token: the newest, B, is preempted again
// (preemption 2), A gets the page and finishes. Step 3: B again (1 page),
// its 3rd token takes a 2nd page, it finishes.
TEST(Simulate, PagedPreemptsTheNewest) {
  const std::vector<Request> w = two_requests();
  const ModeResult m = simulate(Mode::paged, tiny(12), w);
  EXPECT_EQ(m.total_pages, 3u);
  EXPECT_EQ(m.steps, 4u);
  EXPECT_EQ(m.finished, 2u);
  EXPECT_EQ(m.preemptions, 2u);
  EXPECT_EQ(m.admitted, 4u);         // A, B, B again, B a third time
  EXPECT_EQ(m.generated_tokens, 5u);  // A 3, B 1 + 1 (its first token survives preemption)
  expect_shares(kv_shares(m), {10.0 / 12, 8.0 / 12, 10.0 / 12, 6.0 / 12});
  expect_shares(reserved_shares(m), {1.0, 8.0 / 12, 1.0, 8.0 / 12});
  EXPECT_EQ(m.peak_batch, 2u);
}

// Two requests with the same 2-token prefix (one page of size 2), prompts
// of 3 tokens, one output token each; 10 pages. A misses and registers the
// prefix page (2 pages in all); B hits: it shares that page and takes one
// (3 physical pages, 4 block-table entries). Decoding fills both tail pages:
// 6 tokens in 3 full pages, no fragmentation; 1 page (4 B) saved.
TEST(Simulate, PrefixSharingSavesPages) {
  const std::vector<Request> w = {req(0, 3, 1, "s", 2), req(0, 3, 1, "s", 2)};
  const ModeResult m = simulate(Mode::paged_prefix, tiny(40), w);
  EXPECT_EQ(m.steps, 1u);
  EXPECT_EQ(m.finished, 2u);
  EXPECT_EQ(m.prefix_hits, 1u);
  EXPECT_EQ(m.prefix_misses, 1u);
  EXPECT_DOUBLE_EQ(m.prefix_hit_rate, 0.5);
  expect_shares(kv_shares(m), {12.0 / 40});
  expect_shares(reserved_shares(m), {12.0 / 40});
  EXPECT_NEAR(m.internal_fragmentation, 0.0, kEps);
  EXPECT_EQ(m.peak_page_table_entries, 4u);
  EXPECT_EQ(m.peak_saved_bytes, 4u);
  EXPECT_NEAR(m.mean_saved_share, 0.1, kEps);
  EXPECT_EQ(m.pages_saved, 1u);

  // The same workload without sharing: 2 pages each, 8 tokens.
  const ModeResult p = simulate(Mode::paged, tiny(40), w);
  expect_shares(kv_shares(p), {16.0 / 40});
  expect_shares(reserved_shares(p), {16.0 / 40});
  EXPECT_EQ(p.peak_page_table_entries, 4u);
  EXPECT_EQ(p.peak_saved_bytes, 0u);
}

// Requests that can never fit are rejected, not queued forever.
TEST(Simulate, RejectsWhatCanNeverFit) {
  // 12 B = 6 tokens = 3 pages of 2. A (2 + 5 = 7 tokens) fits no mode;
  // B (1 + 2) fits all but basic, max (8 tokens = 16 B > 12 B).
  const std::vector<Request> w = {req(0, 2, 5), req(0, 1, 2)};
  for (const Mode mode : kModes) {
    const ModeResult m = simulate(mode, tiny(12), w);
    EXPECT_EQ(m.rejected, mode == Mode::basic_max ? 2u : 1u) << mode_label(mode);
    EXPECT_EQ(m.finished, mode == Mode::basic_max ? 0u : 1u) << mode_label(mode);
    EXPECT_TRUE(m.drained) << mode_label(mode);
  }
  // Longer than the model's maximum sequence (8): rejected everywhere.
  const std::vector<Request> too_long = {req(0, 6, 3)};
  for (const Mode mode : kModes) {
    EXPECT_EQ(simulate(mode, tiny(1000), too_long).rejected, 1u) << mode_label(mode);
  }
}

// The horizon stops the run: at step 2 basic, max still runs A, B waits.
TEST(Simulate, HorizonStopsTheRun) {
  const std::vector<Request> w = two_requests();
  const ModeResult m = simulate(Mode::basic_max, tiny(20, 2, 2), w);
  EXPECT_EQ(m.steps, 2u);
  EXPECT_FALSE(m.drained);
  EXPECT_EQ(m.finished, 0u);
  EXPECT_EQ(m.running_at_end, 1u);
  EXPECT_EQ(m.queued_at_end, 1u);
  EXPECT_EQ(m.timeline.size(), 2u);
}

// Idle steps before the first arrival count (as zero samples).
TEST(Simulate, LateArrivals) {
  const std::vector<Request> w = {req(3, 2, 1)};
  const ModeResult m = simulate(Mode::basic_oracle, tiny(20), w);
  EXPECT_EQ(m.steps, 4u);
  expect_shares(kv_shares(m), {0, 0, 0, 0.3});
  EXPECT_NEAR(m.mean_batch, 0.25, kEps);
}

TEST(Simulate, ReportsProgressAndRejectsUnsortedWorkloads) {
  std::vector<double> seen;
  const std::vector<Request> w = two_requests();
  static_cast<void>(simulate(Mode::paged, tiny(20), w, [&](double f) { seen.push_back(f); }));
  ASSERT_FALSE(seen.empty());
  EXPECT_DOUBLE_EQ(seen.back(), 1.0);
  const std::vector<Request> unsorted = {req(2, 1, 1), req(0, 1, 1)};
  EXPECT_THROW(static_cast<void>(simulate(Mode::paged, tiny(20), unsorted)),
               std::invalid_argument);
}

// On a realistic small workload the modes order as the paper says.
TEST(Simulate, PagedHoldsMoreTokensThanReservation) {
  WorkloadSpec spec;
  spec.requests = 60;
  spec.max_seq_len = Tokens{256};
  spec.system_prompt = Tokens{100};
  const std::vector<Request> w = generate_workload(spec);
  SimParams p;
  p.model = ModelConfig{2, 1, 8, 2};  // 64 B per token
  p.budget = Bytes{64 * 1024};        // 1,024 tokens, 128 pages of 16
  p.max_seq_len = Tokens{256};
  p.max_steps = 400;
  const ModeResult max = simulate(Mode::basic_max, p, w);
  const ModeResult oracle = simulate(Mode::basic_oracle, p, w);
  const ModeResult paged = simulate(Mode::paged, p, w);
  const ModeResult prefix = simulate(Mode::paged_prefix, p, w);
  EXPECT_LT(max.finished, paged.finished);
  EXPECT_LT(max.mean_kv_share, paged.mean_kv_share);
  EXPECT_GT(max.internal_fragmentation, oracle.internal_fragmentation);
  EXPECT_GT(oracle.internal_fragmentation, paged.internal_fragmentation);
  EXPECT_LE(max.peak_batch, 4u);  // 1,024 / 256
  EXPECT_GT(prefix.prefix_hits, 0u);
  EXPECT_GT(prefix.peak_saved_bytes, 0u);
  EXPECT_EQ(max.preemptions + oracle.preemptions, 0u);
}

TEST(Downsample, AveragesBuckets) {
  std::vector<StepSample> s;
  for (int i = 0; i < 10; ++i) s.push_back({static_cast<double>(i), 1.0});
  const std::vector<TimelinePoint> p = downsample(s, 5);
  ASSERT_EQ(p.size(), 5u);
  EXPECT_DOUBLE_EQ(p[0].step, 0.5);
  EXPECT_DOUBLE_EQ(p[0].kv_share, 0.5);
  EXPECT_DOUBLE_EQ(p[4].kv_share, 8.5);
  EXPECT_DOUBLE_EQ(p[4].reserved_share, 1.0);
  EXPECT_EQ(downsample(s, 100).size(), 10u);
  EXPECT_TRUE(downsample({}, 5).empty());
}

// ---- Command line and report --------------------------------------------------------

TEST(Args, Defaults) {
  const Options o = parse({});
  EXPECT_EQ(o.model_name, "Llama-3.1-8B");
  EXPECT_EQ(o.sim.model, (ModelConfig{32, 8, 128, 2}));
  EXPECT_EQ(o.sim.budget, Bytes{std::uint64_t{4} << 30});
  EXPECT_EQ(o.sim.max_seq_len, Tokens{4096});
  EXPECT_EQ(o.sim.page_size, Tokens{16});
  EXPECT_EQ(o.sim.max_steps, kDefaultSteps);
  EXPECT_EQ(o.workload.requests, 2000u);
  EXPECT_FALSE(o.trace.has_value());
}

TEST(Args, Values) {
  const Options o = parse({"--model", "qwen2.5-7b", "--dtype-bytes", "1", "--budget=1GiB",
                           "--max-seq-len", "8k", "--page-size", "32,8,16", "--requests", "10",
                           "--rate", "0.25", "--seed", "7", "--workload", "alpaca",
                           "--system-prompt-share", "0", "--steps", "0", "-q"});
  EXPECT_EQ(o.model_name, "Qwen2.5-7B");
  EXPECT_EQ(o.sim.model, (ModelConfig{28, 4, 128, 1}));
  EXPECT_EQ(o.sim.budget, Bytes{std::uint64_t{1} << 30});
  EXPECT_EQ(o.sim.max_seq_len, Tokens{8192});
  EXPECT_EQ(o.workload.max_seq_len, Tokens{8192});
  ASSERT_EQ(o.page_sizes.size(), 3u);
  EXPECT_EQ(o.sim.page_size, Tokens{32});
  EXPECT_DOUBLE_EQ(o.workload.rate, 0.25);
  EXPECT_EQ(o.workload.seed, 7u);
  EXPECT_EQ(o.workload.kind, WorkloadKind::alpaca);
  EXPECT_EQ(o.sim.max_steps, 0u);
  EXPECT_TRUE(o.quiet);
  const Options t = parse({"--trace", "x.csv", "--layers", "2", "--kv-heads", "1", "--head-dim",
                           "8"});
  EXPECT_EQ(t.model_name, "custom");
  EXPECT_EQ(t.sim.max_steps, 0u);  // a trace runs until done
  EXPECT_EQ(t.trace, std::optional<std::string>("x.csv"));
}

TEST(Args, Errors) {
  EXPECT_EQ(usage_error({"--bogus"}), "unknown option '--bogus' (try --help)");
  EXPECT_EQ(usage_error({"--budget"}), "missing value for --budget");
  EXPECT_EQ(usage_error({"--steps", "1", "--steps", "2"}), "--steps given twice");
  EXPECT_EQ(usage_error({"--model", "gpt-9"}).substr(0, 30), "unknown model 'gpt-9'; built-i");
  EXPECT_EQ(usage_error({"--model", "Llama-3.1-8B", "--layers", "2"}),
            "--model cannot be combined with --layers, --kv-heads or --head-dim");
  EXPECT_EQ(usage_error({"--layers", "2"}),
            "a custom model needs all of --layers, --kv-heads and --head-dim");
  EXPECT_EQ(usage_error({"--page-size", "8,8"}), "--page-size lists 8 twice");
  EXPECT_EQ(usage_error({"--page-size", "0"}), "--page-size must be at least 1 token");
  EXPECT_EQ(usage_error({"--rate", "0"}),
            "--rate must be more than 0 and at most 500 arrivals per step");
  EXPECT_EQ(usage_error({"--rate", "-1"}),
            "--rate: '-1' is not a positive decimal number (e.g. 0.5)");
  EXPECT_EQ(usage_error({"--system-prompt-share", "101"}),
            "--system-prompt-share is a percentage (0..100)");
  EXPECT_EQ(usage_error({"--max-seq-len", "100"}),
            "--system-prompt-tokens must be 1..98 (--max-seq-len minus a 1-token prompt and a "
            "1-token output)");
  EXPECT_EQ(usage_error({"--trace", "x", "--requests", "3"}),
            "--requests cannot be combined with --trace (it shapes the embedded workload)");
  EXPECT_EQ(usage_error({"--steps", "1000001"}),
            "--steps must be at most 1,000,000 (0: until every request is done)");
  EXPECT_EQ(usage_error({"--budget", "0B"}), "--budget must be more than 0 B");
  EXPECT_EQ(usage_error({"--sweep-svg", "x.svg"}),
            "--sweep-svg needs several page sizes (e.g. --page-size 8,16,32)");
  EXPECT_EQ(usage_error({"--quiet=yes"}), "--quiet takes no value");
  EXPECT_EQ(usage_error({"extra"}), "unexpected argument 'extra' (options start with --; try --help)");
  EXPECT_NE(usage_error({"--layers", "0", "--kv-heads", "1", "--head-dim", "1"})
                .find("invalid model configuration"),
            std::string::npos);
}

namespace {

Options small_options() {
  Options o = parse({"--layers", "2", "--kv-heads", "1", "--head-dim", "8", "--budget", "64KiB",
                     "--max-seq-len", "256", "--requests", "30", "--steps", "200",
                     "--page-size", "16,4", "--system-prompt-tokens", "64"});
  return o;
}

}  // namespace

TEST(Report, ModesSweepAndRenderers) {
  const Options o = small_options();
  const std::vector<Request> w = generate_workload(o.workload);
  std::vector<double> progress;
  const Report r = make_report(o, w, [&](double f, std::string_view) { progress.push_back(f); });
  ASSERT_EQ(r.modes.size(), 4u);
  for (std::size_t i = 0; i < 4; ++i) EXPECT_EQ(r.modes[i].mode, kModes[i]);
  EXPECT_EQ(r.modes[2].page_size, Tokens{16});
  ASSERT_EQ(r.sweep.size(), 4u);  // paged and paged + prefix at 4 and 16
  EXPECT_EQ(r.sweep[0].page_size, Tokens{4});
  EXPECT_EQ(r.sweep[0].mode, Mode::paged);
  EXPECT_EQ(r.sweep[1].mode, Mode::paged_prefix);
  EXPECT_EQ(r.sweep[2].page_size, Tokens{16});
  EXPECT_EQ(r.sweep[2].finished, r.modes[2].finished);
  // Smaller pages: less fragmentation, more page-table entries.
  EXPECT_LT(r.sweep[0].internal_fragmentation, r.sweep[2].internal_fragmentation);
  EXPECT_GT(r.sweep[0].mean_page_table_entries, r.sweep[2].mean_page_table_entries);
  ASSERT_FALSE(progress.empty());
  EXPECT_NEAR(progress.back(), 1.0, kEps);

  const std::string text = render_text(r);
  EXPECT_NE(text.find("requests finished"), std::string::npos);
  EXPECT_NE(text.find("Page-size sweep"), std::string::npos);
  EXPECT_NE(text.find("20.4-38.2 %"), std::string::npos);

  const std::string json = render_json(r);
  EXPECT_TRUE(balanced_json(json));
  EXPECT_EQ(occurrences(json, "\"mode\": "), 8u);  // 4 modes + 4 sweep rows
  EXPECT_NE(json.find("\"mean_kv_share\": "), std::string::npos);
  EXPECT_NE(json.find("\"prefix_hit_rate\": "), std::string::npos);
  EXPECT_NE(json.find("\"page_size_sweep\": ["), std::string::npos);
  EXPECT_EQ(occurrences(json, "\"timeline\": {"), 4u);

  const std::string svg = render_timeline_svg(r);
  EXPECT_TRUE(svg.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg "));
  EXPECT_TRUE(svg.ends_with("</svg>\n"));
  EXPECT_EQ(occurrences(svg, "<polyline "), 8u);  // holding and reserved, per mode
  EXPECT_NE(svg.find("paged + prefix"), std::string::npos);

  const std::string sweep = render_sweep_svg(r);
  EXPECT_EQ(occurrences(sweep, "<polyline "), 2u);
  EXPECT_EQ(occurrences(sweep, "<circle "), 4u);
  EXPECT_NE(sweep.find("4 tok/page"), std::string::npos);
}

// ---- SVG writer ------------------------------------------------------------------------

TEST(Svg, EscapesText) {
  EXPECT_EQ(svg::escape("a<b & \"c\" 'd'>"), "a&lt;b &amp; &quot;c&quot; &apos;d&apos;&gt;");
  EXPECT_EQ(svg::escape(std::string("x\x01y")), "x y");
  svg::Chart c;
  c.title = "R&D <test>";
  svg::Series series;
  series.label = "a & b";
  series.color = "#000";
  series.points = {{0, 0}, {1, 1}};
  c.series.push_back(series);
  const std::string s = svg::render(c);
  EXPECT_NE(s.find("<title>R&amp;D &lt;test&gt;</title>"), std::string::npos);
  EXPECT_NE(s.find(">a &amp; b</text>"), std::string::npos);
  EXPECT_EQ(s.find("R&D"), std::string::npos);
}

TEST(Svg, Ticks) {
  EXPECT_EQ(svg::linear_ticks(0, 100), (std::vector<double>{0, 20, 40, 60, 80, 100}));
  EXPECT_EQ(svg::linear_ticks(0, 2000), (std::vector<double>{0, 500, 1000, 1500, 2000}));
  EXPECT_EQ(svg::linear_ticks(0, 7), (std::vector<double>{0, 2, 4, 6, 8}));
  EXPECT_TRUE(svg::linear_ticks(1, 1).empty());
  EXPECT_EQ(svg::log_ticks(3000, 50000), (std::vector<double>{5000, 10000, 20000, 50000}));
  EXPECT_EQ(svg::tick_label(12000), "12k");
  EXPECT_EQ(svg::tick_label(2500), "2,500");
  EXPECT_EQ(svg::tick_label(0.5), "0.5");
  EXPECT_EQ(svg::tick_label(1500000), "1.5M");
  EXPECT_EQ(svg::tick_label(0), "0");
}

TEST(Svg, LogAxisAndMarkers) {
  svg::Chart c;
  c.x.log = true;
  svg::Series s;
  s.color = "#123456";
  s.markers = true;
  s.points = {{300, 10}, {3000, 5}, {30000, 1}};
  s.point_labels = {"a", "b", "c"};
  c.series.push_back(s);
  const std::string out = svg::render(c);
  EXPECT_EQ(occurrences(out, "<circle "), 3u);
  EXPECT_NE(out.find(">5,000</text>"), std::string::npos);
  EXPECT_NE(out.find(">50k</text>"), std::string::npos);  // the range widens to 200..50,000
  EXPECT_NE(out.find(">c</text>"), std::string::npos);
}

// ---- run() ---------------------------------------------------------------------------------

TEST(Run, SmallRunPrintsTheTable) {
  const RunResult r = run_with({"--layers", "2", "--kv-heads", "1", "--head-dim", "8", "--budget",
                                "64KiB", "--max-seq-len", "256", "--requests", "10", "--steps",
                                "50", "--system-prompt-tokens", "32"});
  EXPECT_EQ(r.code, kExitOk) << r.err;
  EXPECT_NE(r.out.find("requests finished"), std::string::npos);
  EXPECT_EQ(r.err, "");  // no progress bar unless asked for
}

TEST(Run, ProgressBarOnlyWhenAskedAndNotQuiet) {
  const std::initializer_list<std::string_view> args = {
      "--layers", "2", "--kv-heads", "1", "--head-dim", "8", "--budget", "64KiB",
      "--max-seq-len", "256", "--requests", "10", "--steps", "50", "--system-prompt-tokens", "32"};
  const RunResult shown = run_with(args, true);
  EXPECT_EQ(shown.code, kExitOk);
  EXPECT_NE(shown.err.find("kvcache-sim ["), std::string::npos);
  EXPECT_TRUE(shown.err.ends_with("\r"));  // the bar is cleared before the table
  std::vector<std::string_view> quiet(args);
  quiet.push_back("--quiet");
  std::ostringstream out;
  std::ostringstream err;
  EXPECT_EQ(run(quiet, out, err, true), kExitOk);
  EXPECT_EQ(err.str(), "");
}

TEST(Run, ErrorsAreOneLine) {
  RunResult r = run_with({"--page-size", "x"});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_EQ(r.out, "");
  EXPECT_EQ(r.err, "kvcache-sim: error: --page-size: 'x' is not a whole number\n");
  r = run_with({"--trace", KVCACHE_SIM_TEST_DATA "/bad.csv"});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_NE(r.err.find("bad.csv:3: output_tokens 'x' is not a whole number"), std::string::npos);
  r = run_with({"--help"});
  EXPECT_EQ(r.code, kExitOk);
  EXPECT_TRUE(r.out.starts_with("Usage: kvcache-sim"));
}

// A page size the library rejects (more pages than a 32-bit PageId names).
TEST(Run, PageSizeTheLibraryRejects) {
  const RunResult r = run_with({"--layers", "1", "--kv-heads", "1", "--head-dim", "1",
                                "--dtype-bytes", "1", "--budget", "16GiB", "--requests", "1",
                                "--page-size", "1", "--system-prompt-share", "0"});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_TRUE(r.err.starts_with("kvcache-sim: error: --page-size 1: ")) << r.err;
}
