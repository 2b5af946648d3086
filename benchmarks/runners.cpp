// benchmarks/runners.cpp: the W1-W3 backends over kvcache (see runners.hpp).
//
// Each backend adapts one level of the library to the driver interface of
// workloads.hpp; the drivers own the sequence of operations, the backends
// only translate "give request i n blocks" into library calls. Everything a
// timed region needs (the pool or cache, request ids, block-table vectors) is
// built before the clock starts; nothing is observed inside it.
#include <array>
#include <bit>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <unordered_map>
#include <vector>

#include "runners.hpp"
#include "workloads.hpp"

import kvcache;

namespace kvcache::bench {

namespace {

using Clock = std::chrono::steady_clock;

std::uint64_t ns_between(Clock::time_point a, Clock::time_point b) {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(b - a).count());
}

// One vLLM block = one page of a 1-layer model (see runners.hpp).
constexpr ModelConfig one_layer{1, 8, 128, 2};

PagedKVCache make_cache(std::uint64_t pages, Storage storage) {
  const Bytes per_page = one_layer.bytes_per_page(Tokens{block_size});
  PagedKVCache cache(one_layer, Bytes{pages * per_page.count()}, Tokens{block_size}, storage);
  if (cache.total_pages() != Pages{pages}) workload_error("the cache does not have the pages asked for");
  return cache;
}

Storage storage_of(Level level) { return level == Level::paged_host ? Storage::host : Storage::none; }

void expect(bool ok, const char* what) {
  if (!ok) workload_error(what);
}

// ---- W1 ------------------------------------------------------------------------

// The pool level: request i's blocks go into the reused vector of slot
// i % ring by allocate(n, out), and are released tail-first.
class W1Pool {
 public:
  explicit W1Pool(const w1::Params& p) : pool_(Pages{p.pool}), tables_(w1::ring) {
    for (auto& t : tables_) t.reserve(p.max_blocks);
  }
  bool allocate(std::size_t i, std::uint32_t n) {
    auto& t = tables_[i % w1::ring];
    t.clear();
    return pool_.allocate(Pages{n}, t);
  }
  void free(std::size_t i) {
    const auto& t = tables_[i % w1::ring];
    for (auto it = t.rbegin(); it != t.rend(); ++it) static_cast<void>(pool_.release(*it));
  }
  [[nodiscard]] std::uint64_t pages_in_use() const noexcept { return pool_.live_pages().count(); }

 private:
  PagePool pool_;
  std::vector<std::vector<PageHandle>> tables_;
};

// The PagedKVCache level: request i is allocate_paged(ids[i], 16 n tokens).
class W1Paged {
 public:
  W1Paged(const w1::Params& p, Storage s, const std::vector<std::string>& ids)
      : cache_(make_cache(p.pool, s)), ids_(&ids) {}
  bool allocate(std::size_t i, std::uint32_t n) {
    return cache_.allocate_paged((*ids_)[i], Tokens{std::uint64_t{n} * block_size});
  }
  void free(std::size_t i) { cache_.free((*ids_)[i]); }
  [[nodiscard]] std::uint64_t pages_in_use() const noexcept {
    return cache_.stats().used_pages.count();
  }

 private:
  PagedKVCache cache_;
  const std::vector<std::string>* ids_;
};

// ---- caching on (Api::token_ids): the content API of issue 8 -------------------

// The chained keys of the full pages of `tokens` after `parent`, exactly as
// the library computes them inside allocate_paged / append_token_ids
// (registry().block_key, empty salt); `parent` ends as the last key. Returns
// the keys' xor, which the caller checks, so that nothing is optimised away.
std::uint64_t chain_keys(const PagedKVCache& c, std::optional<std::uint64_t>& parent,
                         std::span<const std::uint32_t> tokens) {
  std::uint64_t x = 0;
  for (std::size_t k = 0; k + block_size <= tokens.size(); k += block_size) {
    const std::uint64_t key = c.registry().block_key(parent, {}, tokens.subspan(k, block_size));
    parent = key;
    x ^= key;
  }
  return x;
}

ContentCounters content_counters(const PagedKVCache& c) {
  const PagedStats s = c.stats();
  return {s.prefix.content_prompt_tokens, s.prefix.content_hit_tokens, s.prefix.blocks_stored,
          s.prefix.blocks_evicted,        s.prefix.blocks_duplicate,   s.cached_pages.count()};
}

// Request i is allocate_paged(ids[i], its 16 n token ids): every full page is
// keyed and stored; freed pages stay cached until the allocator evicts them.
class W1Content {
 public:
  W1Content(const w1::Content& c, Storage s, const std::vector<std::string>& ids)
      : cache_(make_cache(c.params.pool, s)), ids_(&ids), content_(&c) {
    cache_.record_events(false);
  }
  bool allocate(std::size_t i, std::uint32_t /*n*/) {
    return cache_.allocate_paged((*ids_)[i], content_->tokens_of(i));
  }
  void free(std::size_t i) { cache_.free((*ids_)[i]); }
  [[nodiscard]] std::uint64_t pages_in_use() const noexcept {
    return cache_.stats().used_pages.count();
  }
  [[nodiscard]] const PagedKVCache& cache() const noexcept { return cache_; }

 private:
  PagedKVCache cache_;
  const std::vector<std::string>* ids_;
  const w1::Content* content_;
};

// The timed regions are functions of their own (never inlined) so that a
// profiler can isolate them: valgrind --tool=callgrind --toggle-collect='*region_*'
// counts exactly what the clock measures (docs/performance.md). One call per
// region and run: no effect on the figures.
template <class Backend>
[[gnu::noinline]] void region_w1(Backend& b, std::span<const std::uint32_t> sizes,
                                 std::uint64_t high_water) {
  w1::NoObserver obs;
  w1::run(sizes, high_water, b, obs);
}

template <class Backend>
std::uint64_t timed_w1(Backend& b, std::span<const std::uint32_t> sizes, std::uint64_t high_water) {
  const auto t0 = Clock::now();
  region_w1(b, sizes, high_water);
  const auto t1 = Clock::now();
  expect(b.pages_in_use() == 0, "W1: pages left in use after the drain");
  return ns_between(t0, t1);
}

[[gnu::noinline]] std::uint64_t region_w1_keys(const PagedKVCache& c, const w1::Content& in) {
  std::uint64_t x = 0;
  for (std::size_t i = 0; i < in.sizes.size(); ++i) {
    std::optional<std::uint64_t> parent;
    x ^= chain_keys(c, parent, in.tokens_of(i));
  }
  return x;
}

W1Timing timed_w1_content(W1Content& b, const w1::Content& in) {
  W1Timing t;
  const auto t0 = Clock::now();
  const std::uint64_t keys = region_w1_keys(b.cache(), in);
  const auto t1 = Clock::now();
  expect(keys != 0, "W1: the key pass folded to 0");  // 2^-64 for distinct random keys
  t.hash_ns = ns_between(t0, t1);
  t.ns = timed_w1(b, std::span<const std::uint32_t>(in.sizes), in.params.high_water);
  t.content = content_counters(b.cache());
  return t;
}

// ---- W2 ------------------------------------------------------------------------

class W2Pool {
 public:
  explicit W2Pool(const w2::Params& p) : pool_(Pages{p.pool}), tables_(p.reqs), count_(p.reqs, 0) {}
  bool prefill(std::size_t r, std::span<const std::uint32_t> prompt) {
    count_[r] = prompt.size();
    return pool_.allocate(Pages{blocks_for(prompt.size())}, tables_[r]);
  }
  // Token count += 1; a new block when it exceeds 16 * len(block_table).
  bool append(std::size_t r, std::uint32_t /*token*/) {
    auto& t = tables_[r];
    if (++count_[r] > block_size * t.size()) {
      const auto h = pool_.allocate();
      if (!h) {
        --count_[r];
        return false;
      }
      t.push_back(*h);
    }
    return true;
  }
  void free(std::size_t r) {
    auto& t = tables_[r];
    for (auto it = t.rbegin(); it != t.rend(); ++it) static_cast<void>(pool_.release(*it));
    t.clear();
  }
  [[nodiscard]] std::uint64_t pages_in_use() const noexcept { return pool_.live_pages().count(); }
  [[nodiscard]] std::uint64_t tokens(std::size_t r) const noexcept { return count_[r]; }
  [[nodiscard]] std::uint64_t blocks(std::size_t r) const noexcept { return tables_[r].size(); }

 private:
  PagePool pool_;
  std::vector<std::vector<PageHandle>> tables_;
  std::vector<std::uint64_t> count_;
};

template <Api A>
class W2Paged {
 public:
  W2Paged(const w2::Params& p, Storage s, const std::vector<std::string>& ids)
      : cache_(make_cache(p.pool, s)), ids_(&ids) {}
  bool prefill(std::size_t r, std::span<const std::uint32_t> prompt) {
    return cache_.allocate_paged((*ids_)[r], Tokens{prompt.size()});
  }
  bool append(std::size_t r, std::uint32_t /*token*/) {
    if constexpr (A == Api::token_paged) {
      return cache_.append_token_paged((*ids_)[r], 0);
    } else {
      return cache_.append_token_all_layers((*ids_)[r]);
    }
  }
  void free(std::size_t r) { cache_.free((*ids_)[r]); }
  [[nodiscard]] std::uint64_t pages_in_use() const noexcept {
    return cache_.stats().used_pages.count();
  }
  [[nodiscard]] std::uint64_t tokens(std::size_t r) const { return cache_.tokens((*ids_)[r], 0).count(); }
  [[nodiscard]] std::uint64_t blocks(std::size_t r) const { return cache_.pages_held((*ids_)[r]).count(); }
  [[nodiscard]] const PagedKVCache& cache() const noexcept { return cache_; }

 private:
  PagedKVCache cache_;
  const std::vector<std::string>* ids_;
};

// Prefill is allocate_paged(id, the prompt's token ids); each decode token is
// append_token_ids(id, {token}), which keys a page when it fills.
class W2Content {
 public:
  W2Content(const w2::Params& p, Storage s, const std::vector<std::string>& ids)
      : cache_(make_cache(p.pool, s)), ids_(&ids) {
    cache_.record_events(false);
  }
  bool prefill(std::size_t r, std::span<const std::uint32_t> prompt) {
    return cache_.allocate_paged((*ids_)[r], prompt);
  }
  bool append(std::size_t r, std::uint32_t token) {
    return cache_.append_token_ids((*ids_)[r], std::span<const std::uint32_t>(&token, 1));
  }
  void free(std::size_t r) { cache_.free((*ids_)[r]); }
  [[nodiscard]] std::uint64_t pages_in_use() const noexcept {
    return cache_.stats().used_pages.count();
  }
  [[nodiscard]] std::uint64_t tokens(std::size_t r) const { return cache_.tokens((*ids_)[r], 0).count(); }
  [[nodiscard]] std::uint64_t blocks(std::size_t r) const { return cache_.pages_held((*ids_)[r]).count(); }
  [[nodiscard]] const PagedKVCache& cache() const noexcept { return cache_; }

 private:
  PagedKVCache cache_;
  const std::vector<std::string>* ids_;
};

// The keys append_token_ids computes in W2's decode: per request, the 64
// pages its decode tokens fill, chained after its prompt's last page. Setup
// (each request's decode tokens made contiguous, the prompt's keys) untimed.
std::uint64_t w2_key_pass_ns(const PagedKVCache& c, const w2::Input& in) {
  const std::size_t reqs = in.params.reqs;
  const std::size_t steps = in.params.steps;
  std::vector<std::uint32_t> decode(reqs * steps);
  std::vector<std::optional<std::uint64_t>> parent(reqs);
  for (std::size_t r = 0; r < reqs; ++r) {
    for (std::size_t s = 0; s < steps; ++s) decode[(r * steps) + s] = in.decode_at(s, r);
    static_cast<void>(chain_keys(c, parent[r], in.prompt_of(r)));
  }
  const auto t0 = Clock::now();
  std::uint64_t x = 0;
  for (std::size_t r = 0; r < reqs; ++r) {
    x ^= chain_keys(c, parent[r], std::span<const std::uint32_t>(decode).subspan(r * steps, steps));
  }
  const auto t1 = Clock::now();
  expect(x != 0, "W2: the key pass folded to 0");  // 2^-64 for distinct random keys
  return ns_between(t0, t1);
}

template <class Backend>
[[gnu::noinline]] void region_w2_decode(Backend& b, const w2::Input& in) {
  w2::NoObserver obs;
  w2::decode(in, b, obs);
}

template <class Backend>
[[gnu::noinline]] void region_w2_free(Backend& b, const w2::Input& in) {
  w2::free_all(in, b);
}

template <class Backend>
W2Timing timed_w2(Backend& b, const w2::Input& in) {
  W2Timing t;
  const auto t0 = Clock::now();
  w2::prefill(in, b);
  const auto t1 = Clock::now();
  region_w2_decode(b, in);
  const auto t2 = Clock::now();
  // Untimed: every request ends with prompt + steps tokens.
  const std::uint64_t per_request = blocks_for(in.params.prompt + in.params.steps);
  expect(b.pages_in_use() == in.params.reqs * per_request, "W2: wrong pages in use after decode");
  const auto t3 = Clock::now();
  region_w2_free(b, in);
  const auto t4 = Clock::now();
  expect(b.pages_in_use() == 0, "W2: pages left in use after free-all");
  t.prefill_ns = ns_between(t0, t1);
  t.decode_ns = ns_between(t1, t2);
  t.free_ns = ns_between(t3, t4);
  t.tokens = in.params.reqs * in.params.steps;
  return t;
}

// ---- W3 ------------------------------------------------------------------------

// A prefix cache by content over PagePool, as WORKLOADS.md specifies it.
class W3Pool {
 public:
  explicit W3Pool(const w3::Input& in)
      : pool_(Pages{in.params.pool}),
        tables_(in.params.reqs),
        page_hash_(in.params.pool, 0),
        hashed_(in.params.pool, 0),
        request_blocks_(in.request_blocks()),
        max_hits_(w3::max_hit_blocks(in)) {
    for (auto& t : tables_) t.reserve(request_blocks_);
    cached_.reserve(in.params.pool);
  }

  bool admit(std::size_t q, std::span<const std::uint64_t> hashes) {
    auto& t = tables_[q];
    // Lookup: the longest run of leading full blocks that are cached; each
    // hit gets a reference (taken out of the free list when it had none).
    std::size_t hits = 0;
    for (; hits < max_hits_; ++hits) {
      const auto it = cached_.find(hashes[hits]);
      if (it == cached_.end()) break;
      PageHandle& h = it->second;
      if (pool_.is_free(h.id)) {
        h = pool_.take(h.id);  // out of the middle of the free list, O(1)
      } else {
        pool_.retain(h);
      }
      t.push_back(h);
    }
    // Allocate the rest from the free list's head.
    if (!pool_.allocate(Pages{request_blocks_ - hits}, t)) {
      for (auto it = t.rbegin(); it != t.rend(); ++it) static_cast<void>(pool_.release(*it));
      t.clear();
      return false;  // W3 never runs out of blocks
    }
    // A reused block loses the hash it kept while free.
    for (std::size_t k = hits; k < t.size(); ++k) {
      const auto i = t[k].id.index();
      if (hashed_[i] != 0) {
        cached_.erase(page_hash_[i]);
        hashed_[i] = 0;
        ++evicted_;
      }
    }
    // Insert the request's not-yet-cached full blocks.
    for (std::size_t k = hits; k < hashes.size(); ++k) {
      const auto i = t[k].id.index();
      if (cached_.try_emplace(hashes[k], t[k]).second) {
        page_hash_[i] = hashes[k];
        hashed_[i] = 1;
      }
    }
    hit_blocks_ += hits;
    return true;
  }
  void free(std::size_t q) {
    auto& t = tables_[q];
    for (auto it = t.rbegin(); it != t.rend(); ++it) static_cast<void>(pool_.release(*it));
    t.clear();  // the blocks keep their hashes on the free list
  }
  [[nodiscard]] std::uint64_t pages_in_use() const noexcept { return pool_.live_pages().count(); }
  [[nodiscard]] std::uint64_t hit_blocks() const noexcept { return hit_blocks_; }
  [[nodiscard]] std::uint64_t evicted() const noexcept { return evicted_; }

 private:
  PagePool pool_;
  std::vector<std::vector<PageHandle>> tables_;
  std::unordered_map<std::uint64_t, PageHandle> cached_;  // hash -> block
  std::vector<std::uint64_t> page_hash_;                  // per page: its hash, when hashed_
  std::vector<std::uint8_t> hashed_;
  std::size_t request_blocks_;
  std::size_t max_hits_;
  std::uint64_t hit_blocks_ = 0;
  std::uint64_t evicted_ = 0;
};

// PagedKVCache with an opaque prefix name: the hash of the system prompt.
class W3Paged {
 public:
  W3Paged(const w3::Input& in, Storage s, const std::vector<std::string>& ids)
      : cache_(make_cache(in.params.pool, s)),
        ids_(&ids),
        prompt_(in.request_tokens()),
        prefix_(in.params.sys_tokens),
        prefix_block_(in.prefix_blocks() - 1) {}
  bool admit(std::size_t q, std::span<const std::uint64_t> hashes) {
    // The 8 bytes of the system prompt's hash are the prefix's name.
    const auto name = std::bit_cast<std::array<char, sizeof(std::uint64_t)>>(hashes[prefix_block_]);
    return cache_.allocate_paged((*ids_)[q], prompt_, std::string_view(name.data(), name.size()),
                                 prefix_);
  }
  void free(std::size_t q) { cache_.free((*ids_)[q]); }
  [[nodiscard]] std::uint64_t pages_in_use() const noexcept {
    return cache_.stats().used_pages.count();
  }
  [[nodiscard]] std::uint64_t hit_blocks() const noexcept {
    return cache_.stats().prefix.pages_saved;  // 1 layer: pages shared = blocks hit
  }
  [[nodiscard]] const PagedKVCache& cache() const noexcept { return cache_; }

 private:
  PagedKVCache cache_;
  const std::vector<std::string>* ids_;
  Tokens prompt_;
  Tokens prefix_;
  std::size_t prefix_block_;
};

// allocate_paged(id, tokens(q)): the library finds the shared pages by
// content itself; the benchmark's hashes are not used.
class W3Content {
 public:
  W3Content(const w3::Input& in, Storage s, const std::vector<std::string>& ids)
      : cache_(make_cache(in.params.pool, s)), ids_(&ids), in_(&in) {
    cache_.record_events(false);
  }
  bool admit(std::size_t q, std::span<const std::uint64_t> /*hashes*/) {
    return cache_.allocate_paged((*ids_)[q], in_->tokens_of(q));
  }
  void free(std::size_t q) { cache_.free((*ids_)[q]); }
  [[nodiscard]] std::uint64_t pages_in_use() const noexcept {
    return cache_.stats().used_pages.count();
  }
  [[nodiscard]] std::uint64_t hit_blocks() const noexcept {
    return cache_.stats().prefix.content_hit_tokens / block_size;  // 1 layer
  }
  // cached_tokens(id) of the first `n` requests (all of them alive).
  [[nodiscard]] std::vector<std::uint64_t> cached_tokens(std::size_t n) const {
    std::vector<std::uint64_t> v(n);
    for (std::size_t q = 0; q < n; ++q) v[q] = cache_.cached_tokens((*ids_)[q]).count();
    return v;
  }
  [[nodiscard]] const PagedKVCache& cache() const noexcept { return cache_; }

 private:
  PagedKVCache cache_;
  const std::vector<std::string>* ids_;
  const w3::Input* in_;
};

void fill_counters(const W3Content& b, W3Timing& t) {
  const PagedStats s = b.cache().stats();
  t.hit_tokens = s.prefix.content_hit_tokens;
  t.hit_blocks = t.hit_tokens / block_size;
  t.evicted = s.prefix.blocks_evicted;
  for (const auto c : b.cached_tokens(s.num_requests)) ++(c != 0 ? t.prefix_hits : t.prefix_misses);
}

void fill_counters(const W3Pool& b, W3Timing& t) {
  t.hit_blocks = b.hit_blocks();
  t.evicted = b.evicted();
  t.hit_tokens = t.hit_blocks * block_size;
}

void fill_counters(const W3Paged& b, W3Timing& t) {
  const PagedStats s = b.cache().stats();
  t.hit_blocks = s.prefix.pages_saved;
  t.hit_tokens = s.prefix.tokens_saved;
  t.evicted = s.prefix.pages_evicted;
  t.prefix_hits = s.prefix_hits;
  t.prefix_misses = s.prefix_misses;
}

void fill_sizes(const w3::Input& in, W3Timing& t) {
  t.requests = in.params.reqs;
  t.full_blocks = in.params.reqs * in.full_blocks();
  t.prompt_tokens = in.params.reqs * in.request_tokens();
}

// The [hash] step: the benchmark's block_hash, or with Api::token_ids the
// library's own keys (the 70 chained XXH3 keys of each request).
template <class Backend>
[[gnu::noinline]] void region_w3_hash(const Backend& b, const w3::Input& in,
                                      std::vector<std::uint64_t>& hashes) {
  if constexpr (std::is_same_v<Backend, W3Content>) {
    const std::size_t fb = in.full_blocks();
    for (std::size_t q = 0; q < in.params.reqs; ++q) {
      std::optional<std::uint64_t> parent;
      const auto tokens = in.tokens_of(q);
      for (std::size_t k = 0; k < fb; ++k) {
        parent = b.cache().registry().block_key(parent, {}, tokens.subspan(k * block_size, block_size));
        hashes[(q * fb) + k] = *parent;
      }
    }
  } else {
    static_cast<void>(b);
    w3::hash_all(in, hashes);
  }
}

template <class Backend>
[[gnu::noinline]] void region_w3_admit(Backend& b, const w3::Input& in,
                                       std::span<const std::uint64_t> hashes) {
  w3::NoObserver obs;
  w3::admit_all(in, hashes, b, obs);
}

template <class Backend>
[[gnu::noinline]] void region_w3_free(Backend& b, const w3::Input& in) {
  w3::free_all(in, b);
}

template <class Backend>
W3Timing timed_w3(Backend& b, const w3::Input& in) {
  W3Timing t;
  std::vector<std::uint64_t> hashes(in.params.reqs * in.full_blocks());
  const auto t0 = Clock::now();
  region_w3_hash(b, in, hashes);
  const auto t1 = Clock::now();
  region_w3_admit(b, in, std::span<const std::uint64_t>(hashes));
  const auto t2 = Clock::now();
  fill_counters(b, t);
  const auto t3 = Clock::now();
  region_w3_free(b, in);
  const auto t4 = Clock::now();
  expect(b.pages_in_use() == 0, "W3: pages left in use after free-all");
  t.hash_ns = ns_between(t0, t1);
  t.admit_ns = ns_between(t1, t2);
  t.free_ns = ns_between(t3, t4);
  fill_sizes(in, t);
  return t;
}

template <class Backend>
W3Observed observed_w3(Backend& b, const w3::Input& in) {
  W3Observed o;
  o.facts = w3::observe(in, b);
  fill_counters(b, o.counters);
  fill_sizes(in, o.counters);
  return o;
}

// As w3::observe, reading cached_tokens(id) of every request before the frees.
W3Observed observed_w3_content(W3Content& b, const w3::Input& in) {
  W3Observed o;
  std::vector<std::uint64_t> hashes;
  w3::hash_all(in, hashes);
  w3::FactObserver obs;
  w3::admit_all(in, std::span<const std::uint64_t>(hashes), b, obs);
  o.cached_tokens = b.cached_tokens(in.params.reqs);
  fill_counters(b, o.counters);
  w3::free_all(in, b);
  obs.facts.in_use_at_end = b.pages_in_use();
  o.facts = std::move(obs.facts);
  o.content = content_counters(b.cache());
  fill_sizes(in, o.counters);
  return o;
}

}  // namespace

std::vector<std::string> make_ids(std::size_t n, Ids style) {
  std::vector<std::string> ids;
  ids.reserve(n);
  SplitMix64 rng(7);
  for (std::size_t i = 0; i < n; ++i) {
    if (style == Ids::short_ids) {
      ids.push_back("req-" + std::to_string(i));
    } else {
      std::string id = "cmpl-";  // vLLM: "cmpl-" + uuid4().hex + "-<n>"
      for (int word = 0; word < 2; ++word) {
        const std::uint64_t x = rng.next();
        for (int shift = 60; shift >= 0; shift -= 4) id += "0123456789abcdef"[(x >> shift) & 15U];
      }
      ids.push_back(id + "-" + std::to_string(i));
    }
  }
  return ids;
}

W1Timing time_w1(const Variant& v, const w1::Params& p, std::span<const std::uint32_t> sizes,
                 const w1::Content* content) {
  W1Timing t;
  for (const auto s : sizes) t.blocks += s;
  if (v.api == Api::token_ids) {
    expect(v.level != Level::pool && content != nullptr && content->sizes.size() == sizes.size(),
           "W1 with caching on needs a PagedKVCache level and the token ids");
    const auto ids = make_ids(sizes.size(), v.ids);
    W1Content b(*content, storage_of(v.level), ids);
    const W1Timing c = timed_w1_content(b, *content);
    t.ns = c.ns;
    t.hash_ns = c.hash_ns;
    t.content = c.content;
  } else if (v.level == Level::pool) {
    W1Pool b(p);
    t.ns = timed_w1(b, sizes, p.high_water);
  } else {
    const auto ids = make_ids(sizes.size(), v.ids);
    W1Paged b(p, storage_of(v.level), ids);
    t.ns = timed_w1(b, sizes, p.high_water);
  }
  return t;
}

w1::Facts observe_w1(const Variant& v, const w1::Params& p) {
  const auto sizes = w1::make_sizes(p);
  w1::FactObserver obs;
  if (v.api == Api::token_ids) {
    const w1::Content content = w1::make_content(p);
    const auto ids = make_ids(sizes.size(), v.ids);
    W1Content b(content, storage_of(v.level), ids);
    w1::run(std::span<const std::uint32_t>(content.sizes), p.high_water, b, obs);
  } else if (v.level == Level::pool) {
    W1Pool b(p);
    w1::run(std::span<const std::uint32_t>(sizes), p.high_water, b, obs);
  } else {
    const auto ids = make_ids(sizes.size(), v.ids);
    W1Paged b(p, storage_of(v.level), ids);
    w1::run(std::span<const std::uint32_t>(sizes), p.high_water, b, obs);
  }
  for (const auto s : sizes) obs.facts.blocks += s;
  return obs.facts;
}

W2Timing time_w2(const Variant& v, const w2::Input& in) {
  if (v.level == Level::pool) {
    W2Pool b(in.params);
    return timed_w2(b, in);
  }
  const auto ids = make_ids(in.params.reqs, v.ids);
  if (v.api == Api::token_ids) {
    W2Content b(in.params, storage_of(v.level), ids);
    const std::uint64_t hash_ns = w2_key_pass_ns(b.cache(), in);
    W2Timing t = timed_w2(b, in);
    t.hash_ns = hash_ns;
    t.content = content_counters(b.cache());
    return t;
  }
  if (v.api == Api::token_paged) {
    W2Paged<Api::token_paged> b(in.params, storage_of(v.level), ids);
    return timed_w2(b, in);
  }
  W2Paged<Api::all_layers> b(in.params, storage_of(v.level), ids);
  return timed_w2(b, in);
}

w2::Facts observe_w2(const Variant& v, const w2::Input& in) {
  if (v.level == Level::pool) {
    W2Pool b(in.params);
    return w2::observe(in, b);
  }
  const auto ids = make_ids(in.params.reqs, v.ids);
  if (v.api == Api::token_ids) {
    W2Content b(in.params, storage_of(v.level), ids);
    auto f = w2::observe(in, b);
    expect(b.cache().stats().prefix.blocks_evicted == 0, "W2: blocks evicted");
    return f;
  }
  if (v.api == Api::token_paged) {
    W2Paged<Api::token_paged> b(in.params, storage_of(v.level), ids);
    auto f = w2::observe(in, b);
    expect(b.cache().stats().prefix.pages_evicted == 0, "W2: pages evicted");
    return f;
  }
  W2Paged<Api::all_layers> b(in.params, storage_of(v.level), ids);
  return w2::observe(in, b);
}

W3Timing time_w3(const Variant& v, const w3::Input& in) {
  if (v.level == Level::pool) {
    W3Pool b(in);
    return timed_w3(b, in);
  }
  const auto ids = make_ids(in.params.reqs, v.ids);
  if (v.api == Api::token_ids) {
    W3Content b(in, storage_of(v.level), ids);
    return timed_w3(b, in);
  }
  W3Paged b(in, storage_of(v.level), ids);
  return timed_w3(b, in);
}

W3Observed observe_w3(const Variant& v, const w3::Input& in) {
  if (v.level == Level::pool) {
    W3Pool b(in);
    return observed_w3(b, in);
  }
  const auto ids = make_ids(in.params.reqs, v.ids);
  if (v.api == Api::token_ids) {
    W3Content b(in, storage_of(v.level), ids);
    return observed_w3_content(b, in);
  }
  W3Paged b(in, storage_of(v.level), ids);
  return observed_w3(b, in);
}

}  // namespace kvcache::bench
