// benchmarks/bench_basic.cpp: allocate + free of one request (kvcache_bench_basic).
//
// BasicKVCache reserves (prompt + max_gen) * bytes_per_token up front with
// one malloc, so its allocate/free cost is the C library's for that size:
// small reservations come from the heap, reservations above glibc's mmap
// threshold (at most 32 MiB) are an mmap + munmap pair, whose cost the kernel
// sets. PagedKVCache's allocate_paged + free of the same prompt (32 pages per
// layer, 32 layers) is shown next to it for scale. Model: ModelConfig{32, 8,
// 128, 2} (128 KiB per token over all layers).
// Figures: ns per allocate + free pair, median of 5 repetitions.
#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench_support.hpp"
#include "workloads.hpp"

import kvcache;

namespace kvcache::bench {

namespace {

constexpr ModelConfig full_model{32, 8, 128, 2};
constexpr ModelConfig smoke_model{2, 2, 16, 2};

void check(bool ok, const char* what) {
  if (!ok) throw std::runtime_error(std::string("kvcache bench: ") + what);
}

void basic_alloc_free(benchmark::State& state, ModelConfig cfg, std::uint64_t prompt,
                      std::uint64_t max_gen) {
  BasicKVCache cache(cfg, Bytes{std::uint64_t{1} << 40});
  for (auto _ : state) {
    check(cache.allocate("req-1", Tokens{prompt}, Tokens{max_gen}), "allocate failed");
    cache.free("req-1");
  }
}

void paged_alloc_free(benchmark::State& state, ModelConfig cfg, std::uint64_t prompt,
                      std::uint64_t /*max_gen*/) {
  const std::uint64_t pages = blocks_for(prompt) * cfg.num_layers;
  PagedKVCache cache(cfg, Bytes{pages * cfg.bytes_per_page(Tokens{block_size}).count()},
                     Tokens{block_size}, Storage::none);
  for (auto _ : state) {
    check(cache.allocate_paged("req-1", Tokens{prompt}), "allocate_paged failed");
    cache.free("req-1");
  }
}

}  // namespace

void register_benchmarks(const Options& o) {
  const ModelConfig cfg = o.smoke ? smoke_model : full_model;
  struct Case {
    const char* name;
    const char* label;
    void (*fn)(benchmark::State&, ModelConfig, std::uint64_t, std::uint64_t);
    std::uint64_t prompt, max_gen;
  };
  const std::vector<Case> cases = {
      {"basic/alloc_free/small", "BasicKVCache: 16 + 16 tokens (4 MiB, heap)", basic_alloc_free, 16, 16},
      {"basic/alloc_free/large", "BasicKVCache: 512 + 512 tokens (128 MiB, mmap)", basic_alloc_free, 512, 512},
      {"paged/alloc_free", "PagedKVCache none: 512-token prompt (1,024 pages)", paged_alloc_free, 512, 0},
  };
  for (const Case& c : cases) {
    register_micro(o, c.name, [c, cfg](benchmark::State& state) {
      c.fn(state, cfg, c.prompt, c.max_gen);
    });
    table_row(c.name, {"allocate + free", c.label, "real_time", "ns/pair", 1.0, ""});
  }
}

}  // namespace kvcache::bench
