// benchmarks/bench_datapath.cpp: KV bytes in and out (kvcache_bench_datapath).
//
//   append/*   append_token_paged with data, one token of every layer at a time
//              (decode order), into a host-storage PagedKVCache, next to a plain
//              memcpy of the same bytes from the same source rows into a
//              pre-faulted buffer of the same size (the physical limit), and
//              the same memcpys into the cache's paged layout (what is left
//              when the bookkeeping is taken away).
//   gather/*   get_kv of every layer, each row copied out (what a host-side
//              consumer of the view does), for PagedKVCache and BasicKVCache,
//              next to the same row copies from one contiguous buffer: the
//              physical limit.
// Model: ModelConfig{32, 8, 128, 2} (Llama-3-8B's KV shape): a K or V row is
// 2 KiB, an append moves 4 KiB. Two sizes: 64 tokens (8 MiB in all, within
// the 32 MiB L3) and 2,048 tokens (256 MiB, DRAM). Every destination page is
// faulted in before timing, so the figures are copies, not page faults.
// Figures: GB/s (10^9 bytes per second of real time), median of 5 repetitions.
#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
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

std::size_t row_bytes(const ModelConfig& c) {
  return static_cast<std::size_t>(c.kv_bytes_per_token_per_layer().count());
}

std::vector<std::byte> pattern(std::size_t n, std::uint64_t s) {
  SplitMix64 rng(s);
  std::vector<std::byte> v(n);
  for (auto& b : v) b = static_cast<std::byte>(rng.next());
  return v;
}

void check(bool ok, const char* what) {
  if (!ok) throw std::runtime_error(std::string("kvcache bench: ") + what);
}

void set_throughput(benchmark::State& state, std::size_t bytes_per_iteration) {
  const auto bytes = static_cast<double>(bytes_per_iteration) * static_cast<double>(state.iterations());
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes));
  state.counters["GB_per_s"] = benchmark::Counter(bytes / 1e9, benchmark::Counter::kIsRate);
}

// A host-storage cache with exactly the pages `tokens` tokens of every layer need.
PagedKVCache exact_cache(const ModelConfig& cfg, std::size_t tokens) {
  const std::uint64_t pages = blocks_for(tokens) * cfg.num_layers;
  const Bytes per_page = cfg.bytes_per_page(Tokens{block_size});
  return PagedKVCache(cfg, Bytes{pages * per_page.count()}, Tokens{block_size}, Storage::host);
}

void fill_paged(PagedKVCache& cache, const ModelConfig& cfg, std::size_t tokens,
                std::span<const std::byte> key, std::span<const std::byte> value) {
  check(cache.allocate_paged("r", Tokens{0}), "allocate_paged failed");
  for (std::size_t t = 0; t < tokens; ++t) {
    for (std::size_t l = 0; l < cfg.num_layers; ++l) {
      check(cache.append_token_paged("r", l, key, value), "append_token_paged failed");
    }
  }
}

void append_paged(benchmark::State& state, ModelConfig cfg, std::size_t tokens) {
  const std::size_t row = row_bytes(cfg);
  const auto key = pattern(row, 1);
  const auto value = pattern(row, 2);
  PagedKVCache cache = exact_cache(cfg, tokens);
  fill_paged(cache, cfg, tokens, key, value);  // faults every page of the arena in
  cache.free("r");
  for (auto _ : state) {
    fill_paged(cache, cfg, tokens, key, value);
    state.PauseTiming();
    cache.free("r");
    state.ResumeTiming();
  }
  set_throughput(state, tokens * cfg.num_layers * 2 * row);
}

void append_memcpy(benchmark::State& state, ModelConfig cfg, std::size_t tokens) {
  const std::size_t row = row_bytes(cfg);
  const auto key = pattern(row, 1);
  const auto value = pattern(row, 2);
  std::vector<std::byte> dst(tokens * cfg.num_layers * 2 * row);  // zero-filled: faulted in
  for (auto _ : state) {
    std::byte* d = dst.data();
    for (std::size_t t = 0; t < tokens; ++t) {
      for (std::size_t l = 0; l < cfg.num_layers; ++l) {
        std::memcpy(d, key.data(), row);
        std::memcpy(d + row, value.data(), row);
        d += 2 * row;
      }
    }
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  set_throughput(state, dst.size());
}

// The same memcpys into the destinations append_token_paged writes: page
// (t / 16) * layers + l of an arena laid out like the cache's (K slots, then V
// slots, in each 16-token page), the order in which a fresh cache hands pages
// out. The difference to memcpy_rows is the layout; the difference to
// paged_host is the library's bookkeeping.
void append_memcpy_paged_layout(benchmark::State& state, ModelConfig cfg, std::size_t tokens) {
  const std::size_t row = row_bytes(cfg);
  const auto key = pattern(row, 1);
  const auto value = pattern(row, 2);
  const std::size_t page_bytes = block_size * 2 * row;
  std::vector<std::byte> arena(blocks_for(tokens) * cfg.num_layers * page_bytes);
  for (auto _ : state) {
    for (std::size_t t = 0; t < tokens; ++t) {
      const std::size_t slot = t % block_size;
      for (std::size_t l = 0; l < cfg.num_layers; ++l) {
        std::byte* page = arena.data() + ((((t / block_size) * cfg.num_layers) + l) * page_bytes);
        std::memcpy(page + (slot * row), key.data(), row);
        std::memcpy(page + ((block_size + slot) * row), value.data(), row);
      }
    }
    benchmark::DoNotOptimize(arena.data());
    benchmark::ClobberMemory();
  }
  set_throughput(state, tokens * cfg.num_layers * 2 * row);
}

// Copies every row of the view into `out` (keys, then values).
void copy_rows(const KVView& view, std::byte* out, std::size_t row) {
  for (const auto k : view.keys) {
    std::memcpy(out, k.data(), row);
    out += row;
  }
  for (const auto v : view.values) {
    std::memcpy(out, v.data(), row);
    out += row;
  }
}

void gather_paged(benchmark::State& state, ModelConfig cfg, std::size_t tokens) {
  const std::size_t row = row_bytes(cfg);
  PagedKVCache cache = exact_cache(cfg, tokens);
  fill_paged(cache, cfg, tokens, pattern(row, 1), pattern(row, 2));
  std::vector<std::byte> out(tokens * 2 * row);  // one layer's K and V, reused per layer
  for (auto _ : state) {
    for (std::size_t l = 0; l < cfg.num_layers; ++l) copy_rows(cache.get_kv("r", l), out.data(), row);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_throughput(state, tokens * cfg.num_layers * 2 * row);
}

void gather_basic(benchmark::State& state, ModelConfig cfg, std::size_t tokens) {
  const std::size_t row = row_bytes(cfg);
  BasicKVCache cache(cfg, Bytes{tokens * cfg.bytes_per_token().count()});
  check(cache.allocate("r", Tokens{tokens}, Tokens{0}), "allocate failed");
  const auto key = pattern(row, 1);
  const auto value = pattern(row, 2);
  for (std::size_t t = 0; t < tokens; ++t) {
    for (std::size_t l = 0; l < cfg.num_layers; ++l) {
      cache.append_token("r", l, std::span<const std::byte>(key), std::span<const std::byte>(value));
    }
  }
  std::vector<std::byte> out(tokens * 2 * row);
  for (auto _ : state) {
    for (std::size_t l = 0; l < cfg.num_layers; ++l) copy_rows(cache.get_kv("r", l), out.data(), row);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_throughput(state, tokens * cfg.num_layers * 2 * row);
}

// The same row copies from a contiguous buffer: what the gather costs without
// the view (one memcpy per row, as a consumer of get_kv does). Not one bulk
// memcpy per layer: on this machine glibc copies large blocks with `rep movsb`,
// which is slower here than row-sized vector copies (docs/performance.md).
void gather_memcpy(benchmark::State& state, ModelConfig cfg, std::size_t tokens) {
  const std::size_t row = row_bytes(cfg);
  const std::size_t layer_bytes = tokens * 2 * row;
  const auto src = pattern(layer_bytes * cfg.num_layers, 3);
  std::vector<std::byte> out(layer_bytes);
  for (auto _ : state) {
    for (std::size_t l = 0; l < cfg.num_layers; ++l) {
      const std::byte* s = src.data() + (l * layer_bytes);
      std::byte* d = out.data();
      for (std::size_t i = 0; i < 2 * tokens; ++i) {
        std::memcpy(d, s, row);
        d += row;
        s += row;
      }
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_throughput(state, layer_bytes * cfg.num_layers);
}

using Fn = void (*)(benchmark::State&, ModelConfig, std::size_t);

}  // namespace

void register_benchmarks(const Options& o) {
  const ModelConfig cfg = o.smoke ? smoke_model : full_model;
  struct Size {
    const char* tag;
    const char* label;
    std::size_t tokens;
  };
  const std::vector<Size> sizes =
      o.smoke ? std::vector<Size>{{"L3", "smoke", 16}}
              : std::vector<Size>{{"L3", "8 MiB, in L3", 64}, {"DRAM", "256 MiB, DRAM", 2048}};
  struct Bench {
    const char* name;
    const char* workload;
    const char* label;
    Fn fn;
  };
  const std::vector<Bench> benches = {
      {"append/paged_host", "append data path", "PagedKVCache host: append_token_paged", append_paged},
      {"append/memcpy", "append data path", "memcpy of the same rows (limit)", append_memcpy},
      {"append/memcpy_paged_layout", "append data path", "memcpy of the same rows, paged layout",
       append_memcpy_paged_layout},
      {"gather/paged_host", "get_kv gather", "PagedKVCache host: get_kv + row copies", gather_paged},
      {"gather/basic", "get_kv gather", "BasicKVCache: get_kv + row copies", gather_basic},
      {"gather/memcpy", "get_kv gather", "memcpy of the same rows, contiguous (limit)", gather_memcpy},
  };
  for (const Size& s : sizes) {
    for (const Bench& b : benches) {
      const std::string name = std::string(b.name) + "/" + s.tag;
      register_micro(o, name, [fn = b.fn, cfg, tokens = s.tokens](benchmark::State& state) {
        fn(state, cfg, tokens);
      });
      table_row(name, {std::string(b.workload) + " (" + s.label + ")", b.label, "GB_per_s",
                       "GB/s", 1.0, ""});
    }
  }
}

}  // namespace kvcache::bench
