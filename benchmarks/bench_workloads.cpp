// benchmarks/bench_workloads.cpp: W1-W3 of WORKLOADS.md (kvcache_bench_workloads).
//
// Every benchmark is one whole run per repetition on a fresh pool or cache,
// 5 repetitions; the manual time is the run's timed region (runners.hpp), and
// the figures are counters: ns per block (W1), ns per appended token (W2),
// us per request (W3). Rows marked "caching on" run the content API of issue 8
// (allocate_paged with token ids, append_token_ids): measured with the
// library's hashing inside, and with a separately timed key pass subtracted
// (runners.hpp, Api::token_ids). The vLLM figures next to them were measured by the
// project with vLLM v1 on this machine with the same workloads (vLLM cannot
// be installed here; see docs/performance.md).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "bench_support.hpp"
#include "runners.hpp"
#include "workloads.hpp"

namespace kvcache::bench {

namespace {

struct Case {
  std::string name;   // benchmark name
  std::string label;  // the table's variant column
  Variant variant;
};

double per(std::uint64_t ns, std::uint64_t n) {
  return static_cast<double>(ns) / static_cast<double>(n);
}

void register_w1(const Options& o) {
  const w1::Params p = o.smoke ? w1::smoke : w1::standard;
  const auto sizes = std::make_shared<const std::vector<std::uint32_t>>(w1::make_sizes(p));
  const std::vector<Case> cases = {
      {"W1/pool", "PagePool: allocate(n, out) + release", {Level::pool}},
      {"W1/paged_none", "PagedKVCache none: allocate_paged + free", {Level::paged_none}},
      {"W1/paged_host", "PagedKVCache host: allocate_paged + free", {Level::paged_host}},
  };
  for (const Case& c : cases) {
    register_run(o, c.name, [p, sizes, v = c.variant](benchmark::State& state) {
      W1Timing t;
      for (auto _ : state) {
        t = time_w1(v, p, *sizes);
        state.SetIterationTime(static_cast<double>(t.ns) * 1e-9);
      }
      state.counters["ns_per_block"] = per(t.ns, t.blocks);
    });
    table_row(c.name, {"W1 alloc/free churn", c.label, "ns_per_block", "ns/block", 1.0,
                       c.variant.level == Level::pool ? "336 (BlockPool)" : ""});
  }

  // Caching on: allocate_paged(id, the request's 16 n token ids). The token
  // ids (416 MB at the standard size) are drawn on first use, so that a
  // --benchmark_filter that skips these runs does not pay for them.
  auto content = std::make_shared<std::optional<w1::Content>>();
  const std::vector<Case> on = {
      {"W1/paged_none_content", "PagedKVCache none: allocate_paged(token ids) + free",
       {Level::paged_none, Api::token_ids}},
      {"W1/paged_host_content", "PagedKVCache host: allocate_paged(token ids) + free",
       {Level::paged_host, Api::token_ids}},
  };
  for (const Case& c : on) {
    register_run(o, c.name, [p, content, v = c.variant](benchmark::State& state) {
      if (!content->has_value()) content->emplace(w1::make_content(p));
      const w1::Content& in = **content;
      W1Timing t;
      for (auto _ : state) {
        t = time_w1(v, p, in.sizes, &in);
        state.SetIterationTime(static_cast<double>(t.ns) * 1e-9);
      }
      state.counters["ns_per_block"] = per(t.ns, t.blocks);
      state.counters["ns_per_block_no_hash"] = per(t.ns - std::min(t.ns, t.hash_ns), t.blocks);
      state.counters["hash_ns_per_block"] = per(t.hash_ns, t.blocks);
      state.counters["blocks_evicted"] = static_cast<double>(t.content.blocks_evicted);
    });
    table_row(c.name, {"W1 churn, caching on", c.label + ", with hashing", "ns_per_block",
                       "ns/block", 1.0, ""});
    table_row(c.name, {"W1 churn, caching on", c.label + ", hashing subtracted",
                       "ns_per_block_no_hash", "ns/block", 1.0, ""});
  }
  table_row("W1/paged_none_content", {"W1 churn, caching on", "key pass alone: registry().block_key",
                                      "hash_ns_per_block", "ns/block", 1.0, ""});
}

void register_w2(const Options& o) {
  const auto in = std::make_shared<const w2::Input>(
      w2::make_input(o.smoke ? w2::smoke : w2::standard));
  const std::vector<Case> cases = {
      {"W2/pool", "PagePool: allocate() + release", {Level::pool}},
      {"W2/paged_none", "PagedKVCache none: append_token_paged", {Level::paged_none}},
      {"W2/paged_host", "PagedKVCache host: append_token_paged", {Level::paged_host}},
      {"W2/paged_none_all_layers", "PagedKVCache none: append_token_all_layers",
       {Level::paged_none, Api::all_layers}},
      {"W2/paged_none_long_ids", "PagedKVCache none: append_token_paged, 39-char ids",
       {Level::paged_none, Api::token_paged, Ids::long_ids}},
      {"W2/paged_none_content", "PagedKVCache none: append_token_ids",
       {Level::paged_none, Api::token_ids}},
      {"W2/paged_host_content", "PagedKVCache host: append_token_ids",
       {Level::paged_host, Api::token_ids}},
  };
  for (const Case& c : cases) {
    register_run(o, c.name, [in, v = c.variant](benchmark::State& state) {
      W2Timing t;
      for (auto _ : state) {
        t = time_w2(v, *in);
        state.SetIterationTime(static_cast<double>(t.decode_ns + t.free_ns) * 1e-9);
      }
      state.counters["ns_per_token"] = per(t.decode_ns + t.free_ns, t.tokens);
      state.counters["decode_ns_per_token"] = per(t.decode_ns, t.tokens);
      state.counters["prefill_ns_per_request"] = per(t.prefill_ns, in->params.reqs);
      const std::uint64_t timed = t.decode_ns + t.free_ns;
      state.counters["ns_per_token_no_hash"] = per(timed - std::min(timed, t.hash_ns), t.tokens);
      state.counters["hash_ns_per_token"] = per(t.hash_ns, t.tokens);
    });
    if (c.variant.api == Api::token_ids) {  // caching on: its own rows
      table_row(c.name, {"W2 decode, caching on", c.label + ", with hashing", "ns_per_token",
                         "ns/token", 1.0, ""});
      table_row(c.name, {"W2 decode, caching on", c.label + ", hashing subtracted",
                         "ns_per_token_no_hash", "ns/token", 1.0, ""});
      continue;
    }
    const bool peer = c.variant.level == Level::paged_none && c.variant.api == Api::token_paged &&
                      c.variant.ids == Ids::short_ids;
    table_row(c.name, {"W2 decode growth", c.label, "ns_per_token", "ns/token", 1.0,
                       peer ? "4800 (KVCacheManager)" : ""});
  }
  table_row("W2/pool", {"W2 decode only", "PagePool", "decode_ns_per_token", "ns/token", 1.0, ""});
  table_row("W2/paged_none", {"W2 decode only", "PagedKVCache none", "decode_ns_per_token",
                              "ns/token", 1.0, ""});
  table_row("W2/pool", {"W2 prefill (setup)", "PagePool: allocate(32, out)",
                        "prefill_ns_per_request", "ns/request", 1.0, ""});
  table_row("W2/paged_none", {"W2 prefill (setup)", "PagedKVCache none: allocate_paged(512)",
                              "prefill_ns_per_request", "ns/request", 1.0, ""});
  table_row("W2/paged_none_content", {"W2 decode, caching on", "key pass alone: registry().block_key",
                                      "hash_ns_per_token", "ns/token", 1.0, ""});
  table_row("W2/paged_none_content", {"W2 prefill (setup)",
                                      "PagedKVCache none: allocate_paged(512 token ids)",
                                      "prefill_ns_per_request", "ns/request", 1.0, ""});
}

void register_w3(const Options& o) {
  const auto in = std::make_shared<const w3::Input>(
      w3::make_input(o.smoke ? w3::smoke : w3::standard));
  const std::vector<Case> cases = {
      {"W3/pool", "PagePool + content-hash map (benchmark's)", {Level::pool}},
      {"W3/paged_none", "PagedKVCache none: opaque prefix hash", {Level::paged_none}},
      {"W3/paged_host", "PagedKVCache host: opaque prefix hash", {Level::paged_host}},
  };
  for (const Case& c : cases) {
    register_run(o, c.name, [in, v = c.variant](benchmark::State& state) {
      W3Timing t;
      for (auto _ : state) {
        t = time_w3(v, *in);
        state.SetIterationTime(static_cast<double>(t.admit_ns) * 1e-9);
      }
      state.counters["us_per_request"] = per(t.admit_ns, t.requests) / 1000;
      state.counters["us_per_request_hashing"] = per(t.admit_ns + t.hash_ns, t.requests) / 1000;
      state.counters["us_free_per_request"] = per(t.free_ns, t.requests) / 1000;
      state.counters["token_hit_rate"] =
          static_cast<double>(t.hit_tokens) / static_cast<double>(t.prompt_tokens);
      state.counters["block_hit_rate"] =
          static_cast<double>(t.hit_blocks) / static_cast<double>(t.full_blocks);
    });
    const bool peer = c.variant.level == Level::paged_none;
    table_row(c.name, {"W3 prefix hits", c.label, "us_per_request", "us/request", 1.0,
                       peer ? "103 (KVCacheManager, no hashing)" : ""});
    table_row(c.name, {"W3 with hashing", c.label, "us_per_request_hashing", "us/request", 1.0,
                       ""});
  }
  table_row("W3/paged_none", {"W3 free-all", "PagedKVCache none", "us_free_per_request",
                              "us/request", 1.0, ""});

  // Caching on: allocate_paged(id, tokens(q)). The library hashes inside the
  // call, so the measured figure is "with hashing"; "hashing subtracted" is
  // it minus a separate pass computing the same 70 chained keys per request
  // with registry().block_key.
  const std::vector<Case> on = {
      {"W3/paged_none_content", "PagedKVCache none: allocate_paged(token ids)",
       {Level::paged_none, Api::token_ids}},
      {"W3/paged_host_content", "PagedKVCache host: allocate_paged(token ids)",
       {Level::paged_host, Api::token_ids}},
  };
  for (const Case& c : on) {
    register_run(o, c.name, [in, v = c.variant](benchmark::State& state) {
      W3Timing t;
      for (auto _ : state) {
        t = time_w3(v, *in);
        state.SetIterationTime(static_cast<double>(t.admit_ns) * 1e-9);
      }
      state.counters["us_per_request_hashing"] = per(t.admit_ns, t.requests) / 1000;
      state.counters["us_per_request"] =
          per(t.admit_ns - std::min(t.admit_ns, t.hash_ns), t.requests) / 1000;
      state.counters["us_hash_per_request"] = per(t.hash_ns, t.requests) / 1000;
      state.counters["us_free_per_request"] = per(t.free_ns, t.requests) / 1000;
      state.counters["token_hit_rate"] =
          static_cast<double>(t.hit_tokens) / static_cast<double>(t.prompt_tokens);
      state.counters["block_hit_rate"] =
          static_cast<double>(t.hit_blocks) / static_cast<double>(t.full_blocks);
    });
    const bool peer = c.variant.level == Level::paged_none;
    table_row(c.name, {"W3 caching on", c.label + ", with hashing", "us_per_request_hashing",
                       "us/request", 1.0, peer ? "260 (KVCacheManager, SHA-256 hashing)" : ""});
    table_row(c.name, {"W3 caching on", c.label + ", hashing subtracted", "us_per_request",
                       "us/request", 1.0, peer ? "103 (KVCacheManager, no hashing)" : ""});
  }
  table_row("W3/paged_none_content", {"W3 caching on", "key pass alone: registry().block_key",
                                      "us_hash_per_request", "us/request", 1.0, ""});
  table_row("W3/paged_none_content", {"W3 free-all", "PagedKVCache none, caching on",
                                      "us_free_per_request", "us/request", 1.0, ""});
  table_row("W3/pool", {"W3 token hit rate", "PagePool + content-hash map", "token_hit_rate",
                        "ratio", 1.0, "0.90192 (expected)"});
  table_row("W3/paged_none", {"W3 token hit rate", "PagedKVCache none", "token_hit_rate",
                              "ratio", 1.0, "0.90192 (expected)"});
  table_row("W3/paged_none", {"W3 block hit rate", "PagedKVCache none", "block_hit_rate",
                              "ratio", 1.0, "0.905 (expected)"});
  table_row("W3/paged_none_content", {"W3 token hit rate", "PagedKVCache none, caching on",
                                      "token_hit_rate", "ratio", 1.0, "0.90192 (expected)"});
}

}  // namespace

void register_benchmarks(const Options& options) {
  register_w1(options);
  register_w2(options);
  register_w3(options);
}

}  // namespace kvcache::bench
