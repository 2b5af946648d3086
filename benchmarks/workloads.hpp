// benchmarks/workloads.hpp: the three standard block-manager workloads W1-W3
// of WORKLOADS.md (/work/shared/bench/WORKLOADS.md), shared with the peer
// (vLLM v1's BlockPool / KVCacheManager) so that both run the same sequence.
//
// What lives here, and only here:
//   - SplitMix64, the generator every workload starts from seed 42;
//   - each workload's parameters (`standard` is WORKLOADS.md; `smoke` is the
//     same generator and algorithm at a size that runs in milliseconds under
//     ASan with audited contracts);
//   - the inputs, drawn before any timing, in the documented order;
//   - the drivers: the exact loop of each workload, written once as a template
//     over a Backend (the page pool, a PagedKVCache, or a reference model), so
//     the sequence of operations cannot differ between variants;
//   - reference models (no kvcache types) from which the test derives every
//     reference fact of WORKLOADS.md, and against which the real backends are
//     checked step by step;
//   - the chained block hash of W3.
//
// No kvcache type appears here, so a program can include this header before
// `import kvcache;`. Everything is header-only (inline).
//
// Thread safety: none needed; every object here is used by one thread.
#ifndef KVCACHE_BENCH_WORKLOADS_HPP
#define KVCACHE_BENCH_WORKLOADS_HPP

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace kvcache::bench {

// ---- common definitions (WORKLOADS.md, "Common definitions") ----------------

inline constexpr std::uint64_t seed = 42;
inline constexpr std::uint64_t block_size = 16;     // tokens per block (page)
inline constexpr std::uint64_t pool_blocks = 65536;  // blocks in the pool
inline constexpr std::uint64_t vocab = 32000;        // token = next() % 32000
inline constexpr int runs = 5;                       // independent runs per figure

// splitmix64 (Steele, Lea, Flood 2014), exactly as WORKLOADS.md writes it.
class SplitMix64 {
 public:
  constexpr explicit SplitMix64(std::uint64_t s = seed) noexcept : state_(s) {}
  constexpr std::uint64_t next() noexcept {
    state_ += 0x9E3779B97F4A7C15ULL;
    std::uint64_t z = state_;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  // A token id: next() % vocab, no rejection sampling.
  constexpr std::uint32_t token() noexcept { return static_cast<std::uint32_t>(next() % vocab); }

 private:
  std::uint64_t state_;
};

// Blocks needed for `tokens` tokens.
constexpr std::uint64_t blocks_for(std::uint64_t tokens) noexcept {
  return (tokens + block_size - 1) / block_size;
}

[[noreturn]] inline void workload_error(const std::string& what) {
  throw std::logic_error("kvcache bench: " + what);
}

// ---- W1: alloc/free churn ---------------------------------------------------
namespace w1 {

struct Params {
  std::size_t ops = 200000;
  std::uint32_t max_blocks = 64;
  std::uint64_t pool = pool_blocks;
  std::uint64_t high_water = pool_blocks * 9 / 10;  // floor(0.9 * 65536) = 58982
};
inline constexpr Params standard{};
inline constexpr Params smoke{200, 64, 256, 256 * 9 / 10};

// Ring slots for live requests: request i lives in slot i % ring. W1 never has
// more than 1,890 live requests at once; the driver checks the bound.
inline constexpr std::size_t ring = 2048;

// sizes[i] = 1 + next() % max_blocks, drawn before timing.
inline std::vector<std::uint32_t> make_sizes(const Params& p) {
  SplitMix64 rng;
  std::vector<std::uint32_t> sizes(p.ops);
  for (auto& s : sizes) s = 1 + static_cast<std::uint32_t>(rng.next() % p.max_blocks);
  return sizes;
}

// What a run observes (WORKLOADS.md "Reference facts").
struct Facts {
  std::uint64_t blocks = 0;                // sum(sizes)
  std::uint64_t freed_in_loop = 0;         // requests freed inside the loop
  std::uint64_t left_for_drain = 0;        // requests left for the final drain
  std::uint64_t blocks_left_for_drain = 0;
  std::uint64_t max_used = 0;              // blocks held by live requests, at most
  std::uint64_t max_live = 0;              // live requests, at most
  std::uint64_t backend_in_use_mismatches = 0;  // backend pages in use != model's `used`
  std::uint64_t backend_in_use_at_end = 0;      // after the drain (0 expected)
};

// The timed runs observe nothing (every call inlines to nothing).
struct NoObserver {
  template <class B> void allocated(const B&, std::uint64_t, std::size_t) noexcept {}
  void freed_in_loop() noexcept {}
  template <class B> void drain(const B&, std::size_t, std::uint64_t) noexcept {}
  template <class B> void done(const B&) noexcept {}
};

// Records the facts, and checks after every step that the backend's own count
// of pages in use equals the workload's `used`.
struct FactObserver {
  Facts facts;
  template <class B>
  void allocated(const B& b, std::uint64_t used, std::size_t live) {
    facts.max_used = std::max(facts.max_used, used);
    facts.max_live = std::max<std::uint64_t>(facts.max_live, live);
    if (b.pages_in_use() != used) ++facts.backend_in_use_mismatches;
  }
  void freed_in_loop() noexcept { ++facts.freed_in_loop; }
  template <class B>
  void drain(const B& b, std::size_t live, std::uint64_t used) {
    facts.left_for_drain = live;
    facts.blocks_left_for_drain = used;
    if (b.pages_in_use() != used) ++facts.backend_in_use_mismatches;
  }
  template <class B> void done(const B& b) { facts.backend_in_use_at_end = b.pages_in_use(); }
};

// The W1 loop, timed region included (the caller starts and stops the clock
// around it). Backend: allocate(i, n) gives request i n blocks (false: out of
// blocks), free(i) frees request i tail-first; request i lives in slot i % ring.
template <class Backend, class Observer>
void run(std::span<const std::uint32_t> sizes, std::uint64_t high_water, Backend& b,
         Observer& obs) {
  std::size_t oldest = 0;  // live requests are [oldest, i): a FIFO
  std::uint64_t used = 0;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    const std::uint32_t n = sizes[i];
    while (used + n > high_water) {
      used -= sizes[oldest];
      b.free(oldest);
      obs.freed_in_loop();
      ++oldest;
    }
    if (i - oldest >= ring) [[unlikely]] workload_error("W1: more live requests than ring slots");
    if (!b.allocate(i, n)) [[unlikely]] workload_error("W1: allocation failed");
    used += n;
    obs.allocated(b, used, i + 1 - oldest);
  }
  obs.drain(b, sizes.size() - oldest, used);
  while (oldest < sizes.size()) b.free(oldest++);
  obs.done(b);
}

// Reference model: counts blocks in use, nothing else.
struct Model {
  std::vector<std::uint32_t> held = std::vector<std::uint32_t>(ring, 0);
  std::uint64_t in_use = 0;
  bool allocate(std::size_t i, std::uint32_t n) {
    held[i % ring] = n;
    in_use += n;
    return true;
  }
  void free(std::size_t i) { in_use -= std::exchange(held[i % ring], 0); }
  [[nodiscard]] std::uint64_t pages_in_use() const noexcept { return in_use; }
};

inline Facts model_facts(const Params& p) {
  const auto sizes = make_sizes(p);
  Model m;
  FactObserver obs;
  run(std::span<const std::uint32_t>(sizes), p.high_water, m, obs);
  for (const auto s : sizes) obs.facts.blocks += s;
  return obs.facts;
}

// Caching on (issue 8: allocate_paged with token ids). WORKLOADS.md gives W1
// no token ids, so this is the benchmark's choice, written down in
// docs/performance.md: the same generator continues after the sizes and
// draws request i's 16 * sizes[i] token ids, i outer, next() % 32000. The
// content is random, so nothing is ever shared: what W1 measures with caching
// on is the keying and storing of every full page, and the eviction of a
// cached page for almost every page taken once the pool is full of them.
struct Content {
  Params params;
  std::vector<std::uint32_t> sizes;   // as make_sizes(params)
  std::vector<std::uint64_t> first;   // request i's tokens: [first[i], first[i + 1])
  std::vector<std::uint32_t> tokens;  // every request's token ids, request-major

  [[nodiscard]] std::span<const std::uint32_t> tokens_of(std::size_t i) const noexcept {
    return std::span<const std::uint32_t>(tokens).subspan(first[i], first[i + 1] - first[i]);
  }
};

inline Content make_content(const Params& p) {
  SplitMix64 rng;
  Content c{p, std::vector<std::uint32_t>(p.ops), std::vector<std::uint64_t>(p.ops + 1, 0), {}};
  for (auto& s : c.sizes) s = 1 + static_cast<std::uint32_t>(rng.next() % p.max_blocks);
  for (std::size_t i = 0; i < p.ops; ++i) c.first[i + 1] = c.first[i] + (block_size * c.sizes[i]);
  c.tokens.resize(c.first.back());
  for (auto& t : c.tokens) t = rng.token();
  return c;
}

}  // namespace w1

// ---- W2: decode growth ------------------------------------------------------
namespace w2 {

struct Params {
  std::size_t reqs = 256;
  std::size_t prompt = 512;  // tokens (32 full blocks)
  std::size_t steps = 1024;
  std::uint64_t pool = pool_blocks;
};
inline constexpr Params standard{};
inline constexpr Params smoke{8, 512, 64, 512};

// The token ids, drawn before timing: prompt[r][t] (r outer), then
// decode[s][r] (s outer) from the same generator.
struct Input {
  Params params;
  std::vector<std::uint32_t> prompt;  // reqs * prompt, request-major
  std::vector<std::uint32_t> decode;  // steps * reqs, step-major

  [[nodiscard]] std::span<const std::uint32_t> prompt_of(std::size_t r) const noexcept {
    return std::span<const std::uint32_t>(prompt).subspan(r * params.prompt, params.prompt);
  }
  [[nodiscard]] std::uint32_t decode_at(std::size_t s, std::size_t r) const noexcept {
    return decode[(s * params.reqs) + r];
  }
};

inline Input make_input(const Params& p) {
  SplitMix64 rng;
  Input in{p, std::vector<std::uint32_t>(p.reqs * p.prompt),
           std::vector<std::uint32_t>(p.steps * p.reqs)};
  for (auto& t : in.prompt) t = rng.token();
  for (auto& t : in.decode) t = rng.token();
  return in;
}

// Untimed setup (reported separately as prefill): request r gets its prompt.
// Backend::prefill(r, tokens) -> bool.
template <class Backend>
void prefill(const Input& in, Backend& b) {
  for (std::size_t r = 0; r < in.params.reqs; ++r) {
    if (!b.prefill(r, in.prompt_of(r))) workload_error("W2: prefill failed");
  }
}

// The decode part of the timed region. Backend::append(r, token) -> bool adds
// one token and takes a block when token_count(r) > 16 * len(block_table(r)).
template <class Backend, class Observer>
void decode(const Input& in, Backend& b, Observer& obs) {
  for (std::size_t s = 0; s < in.params.steps; ++s) {
    for (std::size_t r = 0; r < in.params.reqs; ++r) {
      if (!b.append(r, in.decode_at(s, r))) [[unlikely]] workload_error("W2: append failed");
      obs.appended(b);
    }
  }
}

// The free part of the timed region: every request, in order, each tail-first.
template <class Backend>
void free_all(const Input& in, Backend& b) {
  for (std::size_t r = 0; r < in.params.reqs; ++r) b.free(r);
}

struct Facts {
  std::uint64_t min_tokens = UINT64_MAX, max_tokens = 0;  // per request, after decode
  std::uint64_t min_blocks = UINT64_MAX, max_blocks = 0;
  std::uint64_t blocks_after_prefill = 0;
  std::uint64_t blocks_after_decode = 0;  // - after prefill = blocks allocated in decode
  std::uint64_t max_in_use = 0;
  std::uint64_t sum_blocks = 0;           // over requests, after decode (== in use: no sharing)
  std::uint64_t in_use_at_end = 0;        // after free-all
};

struct NoObserver {
  template <class B> void appended(const B&) noexcept {}
};
struct FactObserver {
  Facts facts;
  template <class B> void appended(const B& b) {
    facts.max_in_use = std::max(facts.max_in_use, b.pages_in_use());
  }
};

// Backend queries used by the fact-collecting run (never in the timed one):
// pages_in_use(), tokens(r), blocks(r).
template <class Backend>
void observe_decoded(const Input& in, const Backend& b, Facts& f) {
  f.blocks_after_decode = b.pages_in_use();
  for (std::size_t r = 0; r < in.params.reqs; ++r) {
    const std::uint64_t t = b.tokens(r);
    const std::uint64_t k = b.blocks(r);
    f.min_tokens = std::min(f.min_tokens, t);
    f.max_tokens = std::max(f.max_tokens, t);
    f.min_blocks = std::min(f.min_blocks, k);
    f.max_blocks = std::max(f.max_blocks, k);
    f.sum_blocks += k;
  }
}

// Reference model: token counts and block counts, the growth rule verbatim.
struct Model {
  std::vector<std::uint64_t> count, table;
  std::uint64_t in_use = 0;
  explicit Model(const Params& p) : count(p.reqs, 0), table(p.reqs, 0) {}
  bool prefill(std::size_t r, std::span<const std::uint32_t> prompt) {
    count[r] = prompt.size();
    table[r] = blocks_for(prompt.size());
    in_use += table[r];
    return true;
  }
  bool append(std::size_t r, std::uint32_t /*token*/) {
    if (++count[r] > block_size * table[r]) {
      ++table[r];
      ++in_use;
    }
    return true;
  }
  void free(std::size_t r) {
    in_use -= table[r];
    table[r] = 0;
  }
  [[nodiscard]] std::uint64_t pages_in_use() const noexcept { return in_use; }
  [[nodiscard]] std::uint64_t tokens(std::size_t r) const noexcept { return count[r]; }
  [[nodiscard]] std::uint64_t blocks(std::size_t r) const noexcept { return table[r]; }
};

// The whole workload with the observer on any backend.
template <class Backend>
Facts observe(const Input& in, Backend& b) {
  FactObserver obs;
  prefill(in, b);
  obs.facts.blocks_after_prefill = b.pages_in_use();
  decode(in, b, obs);
  observe_decoded(in, b, obs.facts);
  free_all(in, b);
  obs.facts.in_use_at_end = b.pages_in_use();
  return obs.facts;
}

}  // namespace w2

// ---- W3: prefix hits --------------------------------------------------------
namespace w3 {

struct Params {
  std::size_t reqs = 1000;
  std::size_t prompts = 10;       // system prompts
  std::size_t sys_tokens = 1024;  // per system prompt (64 full blocks)
  std::size_t uniq = 100;         // unique tokens per request
  std::uint64_t pool = pool_blocks;
};
inline constexpr Params standard{};
inline constexpr Params smoke{30, 10, 1024, 100, 1024};

// Drawn before timing: sys[p][t] (p outer), then for each request q its
// prompt p[q] and its unique tokens; tokens(q) = sys[p[q]] ++ uniq[q].
struct Input {
  Params params;
  std::vector<std::uint32_t> sys;        // prompts * sys_tokens
  std::vector<std::uint32_t> prompt_of;  // per request: which system prompt
  std::vector<std::uint32_t> uniq;       // reqs * uniq
  std::vector<std::uint32_t> tokens;     // reqs * request_tokens(): tokens(q), concatenated

  [[nodiscard]] std::size_t request_tokens() const noexcept {
    return params.sys_tokens + params.uniq;  // 1124
  }
  [[nodiscard]] std::size_t full_blocks() const noexcept {
    return request_tokens() / block_size;  // 70
  }
  [[nodiscard]] std::size_t request_blocks() const noexcept {
    return static_cast<std::size_t>(blocks_for(request_tokens()));  // 71
  }
  [[nodiscard]] std::size_t prefix_blocks() const noexcept {
    return params.sys_tokens / block_size;  // 64: the system prompt's full blocks
  }
  [[nodiscard]] std::span<const std::uint32_t> tokens_of(std::size_t q) const noexcept {
    return std::span<const std::uint32_t>(tokens).subspan(q * request_tokens(), request_tokens());
  }
};

inline Input make_input(const Params& p) {
  SplitMix64 rng;
  Input in{p, std::vector<std::uint32_t>(p.prompts * p.sys_tokens),
           std::vector<std::uint32_t>(p.reqs), std::vector<std::uint32_t>(p.reqs * p.uniq), {}};
  for (auto& t : in.sys) t = rng.token();
  for (std::size_t q = 0; q < p.reqs; ++q) {
    in.prompt_of[q] = static_cast<std::uint32_t>(rng.next() % p.prompts);
    for (std::size_t j = 0; j < p.uniq; ++j) in.uniq[(q * p.uniq) + j] = rng.token();
  }
  in.tokens.reserve(p.reqs * in.request_tokens());
  for (std::size_t q = 0; q < p.reqs; ++q) {
    const auto s = in.sys.begin() + static_cast<std::ptrdiff_t>(in.prompt_of[q] * p.sys_tokens);
    in.tokens.insert(in.tokens.end(), s, s + static_cast<std::ptrdiff_t>(p.sys_tokens));
    const auto u = in.uniq.begin() + static_cast<std::ptrdiff_t>(q * p.uniq);
    in.tokens.insert(in.tokens.end(), u, u + static_cast<std::ptrdiff_t>(p.uniq));
  }
  return in;
}

// ---- the chained block hash -------------------------------------------------
//
// Block k of a request is named by h_k = block_hash(h_{k-1}, its 16 token ids),
// h_{-1} = hash_root. block_hash is a 64-bit multiply-fold hash in the style
// of wyhash (Wang Yi): the 16 token ids, packed two per 64-bit word, are
// folded pairwise by 64x64->128-bit multiplications ("mum": low ^ high half)
// with wyhash's secrets, the parent hash entering the first level. Fast (about
// 3 dependent multiplications per block) and well mixed, but NOT
// collision-resistant against an adversary; vLLM uses SHA-256 of a pickle
// (or a builtin hash) instead. The W3 test checks that no two different
// token prefixes of W3 share a hash.
__extension__ using Uint128 = unsigned __int128;  // __extension__: no -Wpedantic warning

inline constexpr std::uint64_t hash_root = 0x243F6A8885A308D3ULL;  // pi, 64 bits
inline constexpr std::array<std::uint64_t, 4> hash_secret = {
    0xa0761d6478bd642fULL, 0xe7037ed1a0b428dbULL, 0x8ebc6af09c88c6e3ULL, 0x589965cc75374cc3ULL};

inline std::uint64_t mum(std::uint64_t a, std::uint64_t b) noexcept {
  const Uint128 p = static_cast<Uint128>(a) * b;
  return static_cast<std::uint64_t>(p) ^ static_cast<std::uint64_t>(p >> 64);
}

// REQUIRES: t points at 16 token ids.
inline std::uint64_t block_hash(std::uint64_t parent, const std::uint32_t* t) noexcept {
  const auto w = [t](std::size_t i) {
    return static_cast<std::uint64_t>(t[2 * i]) | (static_cast<std::uint64_t>(t[(2 * i) + 1]) << 32);
  };
  const auto& s = hash_secret;
  const std::uint64_t a = mum(w(0) ^ s[0], w(1) ^ parent);
  const std::uint64_t b = mum(w(2) ^ s[1], w(3) ^ parent);
  const std::uint64_t c = mum(w(4) ^ s[2], w(5) ^ parent);
  const std::uint64_t d = mum(w(6) ^ s[3], w(7) ^ parent);
  return mum(mum(a ^ s[0], b ^ s[1]) ^ parent, mum(c ^ s[2], d ^ s[3]) ^ (s[0] + block_size));
}
static_assert(block_size == 16, "block_hash folds exactly 16 token ids");

// The chained hashes of the full blocks of `tokens` into `out` (out.size()
// must be tokens.size() / 16).
inline void block_hashes(std::span<const std::uint32_t> tokens, std::span<std::uint64_t> out) noexcept {
  std::uint64_t h = hash_root;
  for (std::size_t k = 0; k < out.size(); ++k) {
    h = block_hash(h, tokens.data() + (k * block_size));
    out[k] = h;
  }
}

// The [hash] step of every request: reqs * full_blocks() hashes, request-major.
inline void hash_all(const Input& in, std::vector<std::uint64_t>& out) {
  const std::size_t fb = in.full_blocks();
  out.resize(in.params.reqs * fb);
  for (std::size_t q = 0; q < in.params.reqs; ++q) {
    block_hashes(in.tokens_of(q), std::span<std::uint64_t>(out).subspan(q * fb, fb));
  }
}

// The most leading full blocks a lookup may hit: it may cover at most
// num_tokens - 1 tokens (the last token is always computed).
inline std::size_t max_hit_blocks(const Input& in) noexcept {
  return std::min(in.full_blocks(), (in.request_tokens() - 1) / block_size);
}

// The [timed] step for every request, in order (every request stays alive).
// Backend::admit(q, hashes of q's full blocks) -> bool.
template <class Backend, class Observer>
void admit_all(const Input& in, std::span<const std::uint64_t> hashes, Backend& b,
               Observer& obs) {
  const std::size_t fb = in.full_blocks();
  for (std::size_t q = 0; q < in.params.reqs; ++q) {
    if (!b.admit(q, hashes.subspan(q * fb, fb))) [[unlikely]] {
      workload_error("W3: admission failed");
    }
    obs.admitted(b, q);
  }
}

// After all requests: free every request (timed separately), each tail-first.
template <class Backend>
void free_all(const Input& in, Backend& b) {
  for (std::size_t q = 0; q < in.params.reqs; ++q) b.free(q);
}

struct Facts {
  std::vector<std::uint32_t> hits;   // per request: leading full blocks found cached
  std::uint64_t hit_blocks = 0;
  std::uint64_t max_in_use = 0;      // blocks in use, at most
  std::uint64_t in_use_at_end = 0;   // after free-all (cached blocks are not in use)
};

struct NoObserver {
  template <class B> void admitted(const B&, std::size_t) noexcept {}
};
// Backend queries: pages_in_use(), hit_blocks() (cumulative blocks found
// cached, over all admissions so far).
struct FactObserver {
  Facts facts;
  template <class B> void admitted(const B& b, std::size_t /*q*/) {
    const std::uint64_t total = b.hit_blocks();
    facts.hits.push_back(static_cast<std::uint32_t>(total - facts.hit_blocks));
    facts.hit_blocks = total;
    facts.max_in_use = std::max(facts.max_in_use, b.pages_in_use());
  }
};

// Reference model of the prefix cache, by content: a block is a hit when its
// hash is cached AND the cached block holds the same token prefix (compared
// token by token, so a hash collision cannot pass for a hit; it is counted).
// Nothing is freed before the end and the pool never fills in W3, so the
// model needs no free list; it checks that the pool would not overflow.
class Model {
 public:
  explicit Model(const Input& in) : in_(&in) {}
  bool admit(std::size_t q, std::span<const std::uint64_t> hashes) {
    const auto tokens = in_->tokens_of(q);
    std::size_t hits = 0;
    for (; hits < max_hit_blocks(*in_); ++hits) {
      const auto it = cached_.find(hashes[hits]);
      if (it == cached_.end()) break;
      const auto [q0, k0] = it->second;
      const std::size_t len = (hits + 1) * block_size;
      if (k0 != hits || !std::equal(tokens.begin(), tokens.begin() + static_cast<std::ptrdiff_t>(len),
                                    in_->tokens_of(q0).begin())) {
        ++collisions_;
        break;
      }
    }
    for (std::size_t k = hits; k < hashes.size(); ++k) cached_.try_emplace(hashes[k], Where{q, k});
    in_use_ += in_->request_blocks() - hits;
    held_.push_back(in_->request_blocks() - hits);
    hit_blocks_ += hits;
    return in_use_ <= in_->params.pool;
  }
  void free(std::size_t q) { in_use_ -= held_[q]; }
  [[nodiscard]] std::uint64_t pages_in_use() const noexcept { return in_use_; }
  [[nodiscard]] std::uint64_t hit_blocks() const noexcept { return hit_blocks_; }
  [[nodiscard]] std::uint64_t collisions() const noexcept { return collisions_; }
  [[nodiscard]] std::size_t distinct_hashes() const noexcept { return cached_.size(); }

 private:
  struct Where {
    std::size_t q, k;  // first request that cached the block, block index
  };
  const Input* in_;
  std::unordered_map<std::uint64_t, Where> cached_;
  std::vector<std::uint64_t> held_;
  std::uint64_t hit_blocks_ = 0;
  std::uint64_t in_use_ = 0;
  std::uint64_t collisions_ = 0;
};

// The whole workload with the observer on any backend.
template <class Backend>
Facts observe(const Input& in, Backend& b) {
  std::vector<std::uint64_t> hashes;
  hash_all(in, hashes);
  FactObserver obs;
  admit_all(in, std::span<const std::uint64_t>(hashes), b, obs);
  free_all(in, b);
  obs.facts.in_use_at_end = b.pages_in_use();
  return obs.facts;
}

}  // namespace w3

}  // namespace kvcache::bench

#endif  // KVCACHE_BENCH_WORKLOADS_HPP
