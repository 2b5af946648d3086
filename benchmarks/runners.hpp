// benchmarks/runners.hpp: W1-W3 run on the library's backends.
//
// Each workload runs at two levels:
//   - the page pool (kvcache::PagePool), block tables kept by the benchmark:
//     the level of vLLM's BlockPool;
//   - the PagedKVCache API, bookkeeping-only (Storage::none) and with host
//     storage (Storage::host): the level of vLLM's KVCacheManager; with
//     Api::token_ids, with automatic prefix caching by content on (issue 8).
// A vLLM block covers every layer, so PagedKVCache runs a 1-layer model,
// ModelConfig{1, 8, 128, 2}, with 16-token pages and a budget of exactly
// 65,536 pages (65,536 * 64 KiB = 4 GiB): one page per vLLM block.
//
// `time_*` performs one run of the workload on a fresh pool or cache and
// returns the timed regions of WORKLOADS.md, measured with steady_clock
// (nothing is observed inside them). `observe_*` performs the same sequence
// with an observer that records the reference facts and compares the
// backend's count of pages in use with the workload's, step by step; the
// test checks those against WORKLOADS.md.
//
// The implementation (runners.cpp) imports kvcache; this header does not, so
// a program can include it before `import kvcache;`.
#ifndef KVCACHE_BENCH_RUNNERS_HPP
#define KVCACHE_BENCH_RUNNERS_HPP

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "workloads.hpp"

namespace kvcache::bench {

enum class Level : std::uint8_t {
  pool,        // PagePool; allocate(n, out) / allocate() / release / retain / take
  paged_none,  // PagedKVCache, Storage::none
  paged_host,  // PagedKVCache, Storage::host
};

// How W2 appends through PagedKVCache (a 1-layer model: the same work), and
// whether a PagedKVCache level runs with automatic prefix caching on.
enum class Api : std::uint8_t {
  token_paged,  // append_token_paged(id, 0)
  all_layers,   // append_token_all_layers(id)
  // Caching on (issue 8), every workload: allocate_paged(id, token ids) and,
  // in W2, append_token_ids(id, {token}); event recording off. The library
  // keys pages inside those calls (XXH3-64, chained), so a timed region
  // includes the hashing; hash_ns is a separate pass computing the same keys
  // with registry().block_key, and "without hashing" is the difference.
  token_ids,
};

// Request ids: "req-<i>" (at most 10 characters: within libstdc++'s
// small-string buffer), or vLLM-style "cmpl-<32 hex digits>-<i>" (39+).
enum class Ids : std::uint8_t { short_ids, long_ids };

struct Variant {
  Level level = Level::pool;
  Api api = Api::token_paged;
  Ids ids = Ids::short_ids;
};

// The ids a run uses, made before timing.
[[nodiscard]] std::vector<std::string> make_ids(std::size_t n, Ids style);

// ---- W1 ----
// The content counters of a run with Api::token_ids (PrefixCounters, read
// after the timed regions), and the cache's cached pages at the end.
struct ContentCounters {
  std::uint64_t prompt_tokens = 0;  // content_prompt_tokens
  std::uint64_t hit_tokens = 0;     // content_hit_tokens
  std::uint64_t blocks_stored = 0;
  std::uint64_t blocks_evicted = 0;
  std::uint64_t blocks_duplicate = 0;
  std::uint64_t cached_pages = 0;   // at the end of the run
};

struct W1Timing {
  std::uint64_t ns = 0;       // loop + final drain
  std::uint64_t hash_ns = 0;  // Api::token_ids: the key pass alone (see Api)
  std::uint64_t blocks = 0;   // sum(sizes): the divisor
  ContentCounters content;
};
// Api::token_ids needs `content` (w1::make_content of the same params; its
// sizes are `sizes`).
[[nodiscard]] W1Timing time_w1(const Variant& v, const w1::Params& p,
                               std::span<const std::uint32_t> sizes,
                               const w1::Content* content = nullptr);
[[nodiscard]] w1::Facts observe_w1(const Variant& v, const w1::Params& p);

// ---- W2 ----
struct W2Timing {
  std::uint64_t prefill_ns = 0;  // untimed setup, reported separately
  std::uint64_t decode_ns = 0;
  std::uint64_t free_ns = 0;
  std::uint64_t hash_ns = 0;     // Api::token_ids: the decode blocks' key pass alone
  std::uint64_t tokens = 0;      // reqs * steps: the divisor
  ContentCounters content;
};
[[nodiscard]] W2Timing time_w2(const Variant& v, const w2::Input& in);
[[nodiscard]] w2::Facts observe_w2(const Variant& v, const w2::Input& in);

// ---- W3 ----
// Level::pool is a prefix cache by content, built in the benchmark over
// PagePool exactly as WORKLOADS.md describes it (hash -> block map, a freed
// block keeps its hash, a hit on a free block takes it out of the free list,
// reuse evicts the hash). The PagedKVCache levels name the prefix by the
// chained hash of the system prompt's last full block (block 63: it names
// the whole 1,024-token prefix) and pass it to allocate_paged as an opaque
// 8-byte hash with prefix_tokens = 1,024 (64 pages). With Api::token_ids
// they call allocate_paged(id, tokens(q)): the library keys and looks up the
// pages by content itself, so admit_ns includes its hashing and hash_ns is
// a separate pass of the same 70 chained XXH3 keys per request.
struct W3Timing {
  std::uint64_t hash_ns = 0;   // [hash] of every request (a pass before the lookups)
  std::uint64_t admit_ns = 0;  // [timed]: lookup + allocate + insert, every request
                               // (Api::token_ids: and the library's hashing)
  std::uint64_t free_ns = 0;   // free every request (timed separately)
  std::uint64_t requests = 0;
  std::uint64_t hit_blocks = 0;
  std::uint64_t full_blocks = 0;    // reqs * 70
  std::uint64_t hit_tokens = 0;
  std::uint64_t prompt_tokens = 0;  // reqs * 1124
  std::uint64_t evicted = 0;        // blocks whose cached hash was evicted
  std::uint64_t prefix_hits = 0;    // PagedKVCache's counters (0 at the pool level)
  std::uint64_t prefix_misses = 0;
};
[[nodiscard]] W3Timing time_w3(const Variant& v, const w3::Input& in);
struct W3Observed {
  w3::Facts facts;
  W3Timing counters;  // the end-of-run counters (times are not meaningful here)
  // Api::token_ids: cached_tokens(id) of every request, before the frees.
  std::vector<std::uint64_t> cached_tokens;
  ContentCounters content;
};
[[nodiscard]] W3Observed observe_w3(const Variant& v, const w3::Input& in);

}  // namespace kvcache::bench

#endif  // KVCACHE_BENCH_RUNNERS_HPP
