// prefix_state_test.cpp: a RapidCheck state machine for prefix sharing in
// kvcache::PagedKVCache: reference counts, copy-on-write, isolation and
// eviction, over many requests, a few prefixes and forks.
//
// Model (PrefixModel). Pages are modelled by identity: every page the model
// knows has a model id (never reused) and content (page_size key rows and
// value rows, zero until written). A request is, per layer, a list of model
// page ids and a token count; a registered prefix is its token count, per
// layer the model ids of its pages, the request that registered it (a serial,
// never reused) and the logical time it was last used. Each rule is a
// sentence of CONTRACT.md ("PagedKVCache", "Prefix sharing"):
//   - a page exists while a request or the registry holds it; free = total -
//     pages; used = pages some request holds; cached = pages only the registry
//     holds;
//   - allocate_paged takes ceil(prompt / page_size) fresh pages per layer; a
//     miss registers the first ceil(prefix / page_size) of each layer; a hit
//     lists the registered pages instead, except a partial last prefix page
//     when the prompt continues inside it, which it copies (slots past the
//     prefix read as zero);
//   - a request writes a page in place only when it is the page's only
//     request holder and, if the registry holds the page, the request
//     registered it; any other write (append into the last page, write_kv)
//     copies the page first (the slots the writer uses);
//   - fork lists the parent's pages in the child;
//   - an allocation or append that needs pages that are not free evicts whole
//     prefixes that have cached pages, least recently used first, until enough
//     are free, and only when free + cached pages (those of the prefix being
//     reused excepted) cover the need; otherwise it fails and changes nothing.
//     A prefix is "used" when a request hits it and when one of its pages
//     becomes cached (its last request lets go). A write that must copy with
//     no free page evicts the least recently used prefix first, and writes in
//     place if that made the page writable; with nothing to evict it throws
//     OutOfPages and changes nothing;
//   - append_token_all_layers (beyond the contract) is all-or-nothing: it
//     succeeds exactly when appending to each layer in turn would, and
//     pages_needed_to_append counts the layers as paged.cppm documents.
// So the model knows exactly what every request must read (isolation: a
// write by one request is never seen by another, a cached prefix changes only
// through its registrant's in-place writes), which prefixes are registered,
// and which pages are shared with which.
//
// Harness. The cache's page ids are bound to the model's ids as they appear
// (PrefixSut::bind): from then on a model page must be the same cache page in
// every block table and registry entry that holds it, in every later state,
// and two model pages are never the same cache page. So the sharing structure
// (which entries name the same physical page, which writes copied) is checked
// exactly, not just the bytes.
//
// After every command (and before it) the whole model is compared with the
// cache: stats() (free, used, cached, num_requests, hits, misses, stored,
// registered prefixes), every request's tokens, get_kv of every layer
// byte-exact (isolation), block tables against the binding, has_prefix of
// every hash and the registry's pages against the binding; then, computed
// independently from the cache's own block tables and registry: each page's
// pool reference count == block-table entries + registry entries holding it,
// no page on the pool's free list is held, the free list is exactly the pages
// nobody holds, used == distinct pages in block tables, cached == registry
// pages no request holds, free + used + cached == total; pages_held,
// pages_needed_to_append, memory_efficiency (each physical page once, with the
// most slots any holder uses), and check_invariants(). Commands that must not
// change anything (every failure path: out of memory, duplicate id, bad
// prefix arguments, OutOfPages, unknown parent, evicting an unknown prefix)
// compare a full raw snapshot (stats, page ids of every block table and
// registry entry, every get_kv, has_prefix, the free list in order, every
// reference count) from before and after the call.
//
// Each test case draws a config ({1, 1, 2, 1} or {2, 1, 2, 1}: 1 or 2 layers,
// 2-byte rows), a page size of 2..4 and a pool of 6..16 pages, and runs one
// command sequence (twice RapidCheck's size long) over 5 request ids and 3
// prefix hashes. Generators lean towards pressure (allocations just past the
// free pages, pool fills, writes into shared prefix pages) and a scenario
// count printed after the run shows that evictions, LRU choices, in-place
// registrant writes, partial-page hits and copies really happen.
//
// Known library bug: see the LIBRARY BUG note at AppendAllLayers.
//
// Volume: at least 10,000 commands per ctest run (state_util.hpp drives
// RapidCheck in rounds until the counter reaches 10,000 * KVCACHE_STATE_SCALE).
//   Scale up:   KVCACHE_STATE_SCALE=100 ./prefix_state_test
//   Reproduce:  run the test with the RC_PARAMS="reproduce=..." string that a
//               failure prints on exit, e.g.
//               RC_PARAMS="reproduce=BCh..." ./prefix_state_test --gtest_filter=PrefixSharing*
//   Other RapidCheck knobs (seed, max_size, max_success per round) go in
//   RC_PARAMS as usual.
#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/state.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <iostream>
#include <limits>
#include <map>
#include <optional>
#include <ostream>
#include <set>
#include <span>
#include <stdexcept>
#include <string>
#include <tuple>
#include <typeinfo>
#include <utility>
#include <vector>

#include "state_util.hpp"

import kvcache;

namespace {

using kvcache::Admission;
using kvcache::Bytes;
using kvcache::ModelConfig;
using kvcache::OutOfPages;
using kvcache::PagedKVCache;
using kvcache::PagedStats;
using kvcache::PageId;
using kvcache::Pages;
using kvcache::PrefixRegistry;
using kvcache::Tokens;
using kvcache::UnknownRequest;
using kvcache_state::quoted;

using Row = std::vector<std::uint8_t>;

const std::vector<std::string> kIds = {"a", "b", "c", "d", "e"};
const std::vector<std::string> kHashes = {"h1", "h2", "h3"};

constexpr std::size_t kMaxPages = 16;  // pool sizes are drawn from 6..kMaxPages

// Model page ids of one layer, in token order: at most kMaxPages (no list
// holds a page twice), kept inline because RapidCheck copies the model for
// every command it generates.
class Ids {
 public:
  void push_back(std::uint32_t p) { ids_.at(n_++) = p; }
  [[nodiscard]] std::size_t size() const { return n_; }
  [[nodiscard]] bool empty() const { return n_ == 0; }
  [[nodiscard]] std::uint32_t back() const { return ids_.at(n_ - 1); }
  [[nodiscard]] std::uint32_t operator[](std::size_t i) const { return ids_[i]; }
  [[nodiscard]] std::uint32_t& operator[](std::size_t i) { return ids_[i]; }
  [[nodiscard]] const std::uint32_t* begin() const { return ids_.data(); }
  [[nodiscard]] const std::uint32_t* end() const { return ids_.data() + n_; }

 private:
  std::array<std::uint32_t, kMaxPages> ids_{};
  std::size_t n_ = 0;
};

struct MLayer {
  Ids pages;  // model page ids, token order
  std::uint64_t tokens = 0;
};

struct MRequest {
  std::uint64_t serial = 0;  // unique, never reused: who registered what
  std::vector<MLayer> layers;
};

struct MPrefix {
  std::uint64_t tokens = 0;
  std::vector<Ids> pages;        // per layer
  std::uint64_t registrant = 0;  // serial of the registering request
  std::uint64_t used_at = 0;     // logical time of the last use (LRU)
};

struct PrefixModel {
  ModelConfig cfg;
  std::uint64_t page_size = 2;
  std::uint64_t total = 0;
  // Pages by model id (dense, never reused). Content of page p: bytes
  // [p * page_bytes(), (p + 1) * page_bytes()), the key rows of slots 0 ..
  // page_size - 1, then their value rows. Flat, because RapidCheck copies the
  // model for every command it generates. `live[p]`: someone holds page p.
  std::vector<std::uint8_t> bytes;
  std::vector<std::uint8_t> live;
  std::uint64_t live_pages = 0;
  std::uint32_t next_page = 0;
  std::map<std::string, MRequest> requests;
  std::map<std::string, MPrefix> prefixes;
  std::uint64_t next_serial = 1;
  std::uint64_t clock = 0;
  std::uint64_t hits = 0;
  std::uint64_t misses = 0;
  bool strict_all_layers = false;  // see the LIBRARY BUG note at AppendAllLayers

  // ---- queries -------------------------------------------------------------

  [[nodiscard]] std::size_t layers() const { return cfg.num_layers; }
  [[nodiscard]] std::uint64_t row() const {
    return std::uint64_t{cfg.num_kv_heads} * cfg.head_dim * cfg.dtype_bytes;
  }
  [[nodiscard]] std::uint64_t bytes_per_page() const { return 2 * page_size * row(); }
  [[nodiscard]] std::uint64_t pages_for(std::uint64_t tokens) const {
    return tokens / page_size + (tokens % page_size != 0 ? 1U : 0U);
  }
  [[nodiscard]] bool has(const std::string& id) const { return requests.count(id) != 0; }
  [[nodiscard]] bool registered(const std::string& hash) const { return prefixes.count(hash) != 0; }
  // `hash` is not registered, or registered with `prefix` tokens.
  [[nodiscard]] bool fits_registered(const std::string& hash, std::uint64_t prefix) const {
    const auto it = prefixes.find(hash);
    return it == prefixes.end() || it->second.tokens == prefix;
  }
  // Block-table entries (over all requests and layers) that hold page p.
  [[nodiscard]] std::uint64_t holders(std::uint32_t p) const {
    std::uint64_t n = 0;
    for (const auto& [id, r] : requests) {
      for (const MLayer& l : r.layers) {
        n += static_cast<std::uint64_t>(std::count(l.pages.begin(), l.pages.end(), p));
      }
    }
    return n;
  }
  // The prefix holding page p, if any.
  [[nodiscard]] const std::string* owner(std::uint32_t p) const {
    for (const auto& [hash, pre] : prefixes) {
      for (const auto& layer : pre.pages) {
        if (std::find(layer.begin(), layer.end(), p) != layer.end()) return &hash;
      }
    }
    return nullptr;
  }
  [[nodiscard]] std::uint64_t cached_of(const std::string& hash) const {
    std::uint64_t n = 0;
    for (const auto& layer : prefixes.at(hash).pages) {
      for (const std::uint32_t p : layer) n += holders(p) == 0 ? 1U : 0U;
    }
    return n;
  }
  // Block-table entries per model page id, all at once (next_page long).
  [[nodiscard]] std::vector<std::uint64_t> holder_counts() const {
    std::vector<std::uint64_t> n(next_page, 0);
    for (const auto& [id, r] : requests) {
      for (const MLayer& l : r.layers) {
        for (const std::uint32_t p : l.pages) ++n[p];
      }
    }
    return n;
  }
  // Registry pages that no request holds.
  [[nodiscard]] std::uint64_t cached(const std::vector<std::uint64_t>& holder) const {
    std::uint64_t n = 0;
    for (const auto& [hash, pre] : prefixes) {
      for (const auto& layer : pre.pages) {
        for (const std::uint32_t p : layer) n += holder[p] == 0 ? 1U : 0U;
      }
    }
    return n;
  }
  [[nodiscard]] std::uint64_t cached() const { return cached(holder_counts()); }
  [[nodiscard]] std::uint64_t free() const { return total - live_pages; }
  // Pages that some request holds.
  [[nodiscard]] std::uint64_t used(const std::vector<std::uint64_t>& holder) const {
    std::uint64_t n = 0;
    for (std::uint32_t p = 0; p < next_page; ++p) n += live[p] != 0 && holder[p] != 0 ? 1U : 0U;
    return n;
  }
  [[nodiscard]] std::uint64_t stored() const {
    std::uint64_t n = 0;
    for (const auto& [id, r] : requests) {
      for (const MLayer& l : r.layers) n += l.tokens;
    }
    return n;
  }
  [[nodiscard]] std::uint64_t tokens(const std::string& id, std::size_t layer) const {
    return requests.at(id).layers[layer].tokens;
  }
  // Slots of entry `index` of a layer that its request uses.
  [[nodiscard]] std::uint64_t slots_used(const MLayer& l, std::size_t index) const {
    return std::min(page_size, l.tokens - (std::uint64_t{index} * page_size));
  }
  // May request `serial` write page p in place?
  [[nodiscard]] bool writable(std::uint32_t p, std::uint64_t serial) const {
    if (holders(p) != 1) return false;
    const std::string* o = owner(p);
    return o == nullptr || prefixes.at(*o).registrant == serial;
  }
  // pages_needed_to_append's count for one layer (paged.cppm: beyond the
  // contract): the last page is full (or there is none), or it is shared with
  // another request, or with a prefix that has no cached page (so cannot be
  // evicted). A last page shared only with an evictable prefix is not
  // counted: evicting the prefix makes it writable in place.
  // The library's rule (paged.cppm, pages_needed_to_append): a layer whose
  // last page is full, or shared with another request, consumes a page; a
  // layer whose last page is shared only with the registry ("swap") consumes
  // none net (its copy leaves the old page cached) but needs one to exist.
  [[nodiscard]] bool needs_page(const std::string& id, std::size_t layer) const {
    const MRequest& r = requests.at(id);
    const MLayer& l = r.layers[layer];
    if (l.tokens % page_size == 0) return true;
    const std::uint32_t last = l.pages.back();
    return !writable(last, r.serial) && holders(last) != 1;
  }
  [[nodiscard]] bool swaps(const std::string& id, std::size_t layer) const {
    const MRequest& r = requests.at(id);
    const MLayer& l = r.layers[layer];
    if (l.tokens % page_size == 0) return false;
    const std::uint32_t last = l.pages.back();
    return !writable(last, r.serial) && holders(last) == 1;
  }
  [[nodiscard]] std::uint64_t append_need(const std::string& id) const {
    std::uint64_t n = 0;
    bool any_swap = false;
    for (std::size_t l = 0; l < layers(); ++l) {
      n += needs_page(id, l) ? 1U : 0U;
      any_swap = any_swap || swaps(id, l);
    }
    return std::max<std::uint64_t>(n, any_swap ? 1U : 0U);
  }
  [[nodiscard]] std::size_t page_bytes() const {
    return static_cast<std::size_t>(2 * page_size * row());
  }
  [[nodiscard]] std::span<const std::uint8_t> page(std::uint32_t p) const {
    return std::span(bytes).subspan(p * page_bytes(), page_bytes());
  }
  // The key (or value) row of `slot` of page p.
  [[nodiscard]] std::span<const std::uint8_t> slot_row(std::uint32_t p, std::uint64_t slot,
                                                       bool value) const {
    const auto at = static_cast<std::size_t>(((value ? page_size : 0) + slot) * row());
    return page(p).subspan(at, static_cast<std::size_t>(row()));
  }
  // What the request reads from token t of one layer.
  [[nodiscard]] std::span<const std::uint8_t> token_row(const MLayer& l, std::uint64_t t,
                                                        bool value) const {
    return slot_row(l.pages[static_cast<std::size_t>(t / page_size)], t % page_size, value);
  }
  // What the request reads from one layer: its key (or value) rows in token
  // order, concatenated.
  [[nodiscard]] Row read(const std::string& id, std::size_t layer, bool value) const {
    const MLayer& l = requests.at(id).layers[layer];
    Row out;
    for (std::uint64_t t = 0; t < l.tokens; ++t) {
      const auto r = token_row(l, t, value);
      out.insert(out.end(), r.begin(), r.end());
    }
    return out;
  }
  void set_row(std::uint32_t p, std::uint64_t slot, bool value, const Row& data) {
    const auto at =
        (p * page_bytes()) + static_cast<std::size_t>(((value ? page_size : 0) + slot) * row());
    std::copy(data.begin(), data.end(), bytes.begin() + static_cast<std::ptrdiff_t>(at));
  }
  void set_slot(std::uint32_t p, std::uint64_t slot, const Row& key, const Row& value) {
    set_row(p, slot, false, key);
    set_row(p, slot, true, value);
  }
  // Tokens in the pages requests hold / (those pages * page_size), each
  // page once with the most slots any of its holders uses.
  [[nodiscard]] double efficiency() const {
    std::vector<std::uint64_t> best(next_page, 0);
    for (const auto& [id, r] : requests) {
      for (const MLayer& l : r.layers) {
        for (std::size_t i = 0; i < l.pages.size(); ++i) {
          best[l.pages[i]] = std::max(best[l.pages[i]], slots_used(l, i));
        }
      }
    }
    std::uint64_t held = 0;
    std::uint64_t sum = 0;
    for (const std::uint64_t b : best) {
      held += b != 0 ? 1U : 0U;
      sum += b;
    }
    if (held == 0) return 0.0;
    return static_cast<double>(sum) / (static_cast<double>(held) * static_cast<double>(page_size));
  }
  [[nodiscard]] std::vector<std::string> live_ids() const {
    std::vector<std::string> out;
    for (const auto& [id, r] : requests) out.push_back(id);
    return out;
  }
  [[nodiscard]] std::vector<std::string> unknown_ids() const {
    std::vector<std::string> out;
    for (const std::string& id : kIds) {
      if (!has(id)) out.push_back(id);
    }
    return out;
  }
  [[nodiscard]] std::vector<std::string> hashes(bool reg) const {
    std::vector<std::string> out;
    for (const std::string& h : kHashes) {
      if (registered(h) == reg) out.push_back(h);
    }
    return out;
  }
  [[nodiscard]] std::vector<std::pair<std::string, std::size_t>> all_layers() const {
    std::vector<std::pair<std::string, std::size_t>> out;
    for (const auto& [id, r] : requests) {
      for (std::size_t l = 0; l < r.layers.size(); ++l) out.emplace_back(id, l);
    }
    return out;
  }
  // Stored positions in pages that the request holds alone with the registry
  // and did not register: a write there must copy (or evict the prefix).
  [[nodiscard]] std::vector<std::tuple<std::string, std::size_t, std::uint64_t>>
  registry_shared_slots() const {
    std::vector<std::tuple<std::string, std::size_t, std::uint64_t>> out;
    for (const auto& [id, r] : requests) {
      for (std::size_t l = 0; l < r.layers.size(); ++l) {
        const MLayer& layer = r.layers[l];
        for (std::size_t i = 0; i < layer.pages.size(); ++i) {
          const std::string* o = owner(layer.pages[i]);
          if (o != nullptr && holders(layer.pages[i]) == 1 &&
              prefixes.at(*o).registrant != r.serial) {
            for (std::uint64_t s = 0; s < slots_used(layer, i); ++s) {
              out.emplace_back(id, l, (std::uint64_t{i} * page_size) + s);
            }
          }
        }
      }
    }
    return out;
  }
  [[nodiscard]] std::vector<std::pair<std::string, std::size_t>> nonempty_layers() const {
    std::vector<std::pair<std::string, std::size_t>> out;
    for (const auto& [id, r] : requests) {
      for (std::size_t l = 0; l < r.layers.size(); ++l) {
        if (r.layers[l].tokens != 0) out.emplace_back(id, l);
      }
    }
    return out;
  }

  // ---- pages, prefixes, eviction ---------------------------------------------

  // A new page, all zero. REQUIRES: free() > 0.
  std::uint32_t take() {
    const std::uint32_t p = next_page++;
    bytes.resize(bytes.size() + page_bytes(), 0);
    live.push_back(1);
    ++live_pages;
    return p;
  }
  void drop(std::uint32_t p) {
    live[p] = 0;
    --live_pages;
  }
  // A new page with the first `slots` slots of `from`, the rest zero.
  std::uint32_t copy(std::uint32_t from, std::uint64_t slots) {
    const std::uint32_t p = take();
    for (std::uint64_t s = 0; s < slots; ++s) {
      for (const bool value : {false, true}) {
        const auto r = slot_row(from, s, value);
        set_row(p, s, value, Row(r.begin(), r.end()));
      }
    }
    return p;
  }
  // A request let go of page p: the page becomes cached (a use of its prefix)
  // or free when nothing holds it any more.
  void let_go(std::uint32_t p) {
    if (holders(p) != 0) return;
    if (const std::string* o = owner(p)) {
      prefixes.at(*o).used_at = ++clock;
    } else {
      drop(p);
    }
  }
  void evict(const std::string hash) {  // a copy: callers pass keys of `prefixes`
    const MPrefix pre = prefixes.at(hash);
    prefixes.erase(hash);
    for (const auto& layer : pre.pages) {
      for (const std::uint32_t p : layer) {
        if (holders(p) == 0) drop(p);
      }
    }
  }
  // The least recently used prefix with cached pages, other than `keep`.
  [[nodiscard]] std::optional<std::string> lru(const std::string* keep) const {
    std::optional<std::string> best;
    for (const auto& [hash, pre] : prefixes) {
      if ((keep != nullptr && hash == *keep) || cached_of(hash) == 0) continue;
      if (!best || pre.used_at < prefixes.at(*best).used_at) best = hash;
    }
    return best;
  }
  // Pages that evicting every prefix but `keep` would free.
  [[nodiscard]] std::uint64_t evictable(const std::string* keep) const {
    return cached() - (keep == nullptr ? 0 : cached_of(*keep));
  }
  // The prefix an eviction takes now. REQUIRES: one has cached pages.
  [[nodiscard]] std::string victim(const std::string* keep) const {
    const std::optional<std::string> hash = lru(keep);
    if (!hash) throw std::logic_error("PrefixModel: nothing to evict");
    return *hash;
  }
  void make_room(std::uint64_t n, const std::string* keep) {
    while (free() < n) evict(victim(keep));
  }

  // ---- outcomes: does a call find its pages? (const: for preconditions too) --

  // Pages a hit takes: per layer, all but the shared prefix pages (a partial
  // last prefix page the prompt continues inside is copied, not shared).
  [[nodiscard]] std::uint64_t hit_need(std::uint64_t prompt, std::uint64_t prefix) const {
    const bool copy_partial = prefix % page_size != 0 && prompt > prefix;
    const std::uint64_t shared = pages_for(prefix) - (copy_partial ? 1U : 0U);
    return layers() * (pages_for(prompt) - shared);
  }
  [[nodiscard]] bool can_allocate(std::uint64_t prompt) const {
    return layers() * pages_for(prompt) <= free() + cached();
  }
  // REQUIRES: valid prefix arguments. The reused prefix is not evictable.
  [[nodiscard]] bool can_allocate(std::uint64_t prompt, const std::string& hash,
                                  std::uint64_t prefix) const {
    if (!registered(hash)) return can_allocate(prompt);
    return hit_need(prompt, prefix) <= free() + evictable(&hash);
  }
  // A write into entry `index` of the layer: in place, or a page for the copy.
  [[nodiscard]] bool can_write(const std::string& id, std::size_t layer, std::size_t index) const {
    const MRequest& r = requests.at(id);
    return writable(r.layers[layer].pages[index], r.serial) || free() + cached() > 0;
  }
  [[nodiscard]] bool can_append(const std::string& id, std::size_t layer) const {
    const MLayer& l = requests.at(id).layers[layer];
    if (l.tokens % page_size == 0) return free() + cached() > 0;
    return can_write(id, layer, l.pages.size() - 1);
  }
  // All-or-nothing: the decode step succeeds exactly when appending a token
  // to each layer in turn would (so it never refuses what single-layer
  // appends can do).
  // The order in which a decode step appends to the layers (the library's,
  // paged.cpp append_token_all_layers): layers whose last page is shared only
  // with the registry first, then writable ones, then those that take a page;
  // each group in layer order, classified before the step.
  [[nodiscard]] std::vector<std::size_t> step_order(const std::string& id) const {
    std::vector<std::size_t> order;
    for (int pass = 0; pass < 3; ++pass) {
      for (std::size_t l = 0; l < layers(); ++l) {
        const int kind = swaps(id, l) ? 0 : (needs_page(id, l) ? 2 : 1);
        if (kind == pass) order.push_back(l);
      }
    }
    return order;
  }
  [[nodiscard]] bool can_append_all(const std::string& id) const {
    PrefixModel m = *this;
    for (const std::size_t l : step_order(id)) {
      if (!m.append(id, l, Row(row(), 0), Row(row(), 0))) return false;
    }
    return true;
  }
  [[nodiscard]] bool can_write_at(const std::string& id, std::size_t layer,
                                  std::uint64_t position) const {
    return can_write(id, layer, static_cast<std::size_t>(position / page_size));
  }

  // ---- transitions (the contract's rules; see the top comment) ---------------
  // Each returns false, changing nothing, exactly when its can_* is false.
  // Copy-on-write of entry `index` of a layer; false (no change) when a copy
  // is needed and no page can be had.
  bool make_writable(const std::string& id, std::size_t layer, std::size_t index) {
    const std::uint64_t serial = requests.at(id).serial;
    const std::uint32_t old = requests.at(id).layers[layer].pages[index];
    if (!can_write(id, layer, index)) return false;
    if (writable(old, serial)) return true;
    if (free() == 0) {
      evict(victim(nullptr));
      if (writable(old, serial)) return true;
    }
    MLayer& l = requests.at(id).layers[layer];
    l.pages[index] = copy(old, slots_used(l, index));
    let_go(old);
    return true;
  }
  bool append(const std::string& id, std::size_t layer, const Row& key, const Row& value) {
    if (!can_append(id, layer)) return false;
    MLayer& l = requests.at(id).layers[layer];
    if (l.tokens % page_size == 0) {
      if (free() == 0) evict(victim(nullptr));
      l.pages.push_back(take());
    } else if (!make_writable(id, layer, l.pages.size() - 1)) {
      return false;
    }
    set_slot(l.pages.back(), l.tokens % page_size, key, value);
    ++l.tokens;
    return true;
  }
  bool append_all(const std::string& id) {
    if (!can_append_all(id)) return false;
    for (const std::size_t l : step_order(id)) {
      if (!append(id, l, Row(row(), 0), Row(row(), 0))) throw std::logic_error("model");
    }
    return true;
  }
  bool write(const std::string& id, std::size_t layer, std::uint64_t position, const Row& key,
             const Row& value) {
    const auto index = static_cast<std::size_t>(position / page_size);
    if (!make_writable(id, layer, index)) return false;
    set_slot(requests.at(id).layers[layer].pages[index], position % page_size, key, value);
    return true;
  }
  MRequest& add_request(const std::string& id, std::uint64_t prompt) {
    MRequest& r = requests[id];
    r.serial = next_serial++;
    r.layers.assign(layers(), MLayer{{}, prompt});
    return r;
  }
  // REQUIRES: id unknown.
  bool allocate(const std::string& id, std::uint64_t prompt) {
    if (!can_allocate(prompt)) return false;
    make_room(layers() * pages_for(prompt), nullptr);
    MRequest& r = add_request(id, prompt);
    for (MLayer& l : r.layers) {
      for (std::uint64_t k = 0; k < pages_for(prompt); ++k) l.pages.push_back(take());
    }
    return true;
  }
  // REQUIRES: id unknown, valid prefix arguments.
  bool allocate(const std::string& id, std::uint64_t prompt, const std::string& hash,
                std::uint64_t prefix) {
    const std::uint64_t per_layer = pages_for(prompt);
    const std::uint64_t ppl = pages_for(prefix);
    if (!registered(hash)) {  // a miss: allocate, then register
      if (!allocate(id, prompt)) return false;
      MPrefix pre;
      pre.tokens = prefix;
      pre.registrant = requests.at(id).serial;
      pre.used_at = ++clock;
      for (const MLayer& l : requests.at(id).layers) {
        Ids& reg = pre.pages.emplace_back();
        for (std::size_t k = 0; k < ppl; ++k) reg.push_back(l.pages[k]);
      }
      prefixes[hash] = pre;
      ++misses;
      return true;
    }
    const std::uint64_t rem = prefix % page_size;
    const bool copy_partial = rem != 0 && prompt > prefix;
    const std::uint64_t shared = ppl - (copy_partial ? 1U : 0U);
    if (!can_allocate(prompt, hash, prefix)) return false;
    make_room(hit_need(prompt, prefix), &hash);
    const std::vector<Ids> reg = prefixes.at(hash).pages;
    MRequest& r = add_request(id, prompt);
    for (std::size_t l = 0; l < layers(); ++l) {
      MLayer& layer = r.layers[l];
      for (std::size_t k = 0; k < shared; ++k) layer.pages.push_back(reg[l][k]);
      if (copy_partial) layer.pages.push_back(copy(reg[l].back(), rem));
      while (layer.pages.size() < per_layer) layer.pages.push_back(take());
    }
    prefixes.at(hash).used_at = ++clock;
    ++hits;
    return true;
  }
  void fork(const std::string& parent, const std::string& child) {
    const std::vector<MLayer> tables = requests.at(parent).layers;
    MRequest& r = add_request(child, 0);
    r.layers = tables;
  }
  void free_request(const std::string& id) {
    std::set<std::uint32_t> held;
    for (const MLayer& l : requests.at(id).layers) held.insert(l.pages.begin(), l.pages.end());
    requests.erase(id);
    for (const std::uint32_t p : held) let_go(p);
  }
  std::size_t clear() {
    const std::size_t n = prefixes.size();
    while (!prefixes.empty()) evict(prefixes.begin()->first);
    return n;
  }
};

// Scenarios the machine should reach, counted from the model before and after
// each command that passed, and printed after the run. Those reached at least
// ~10 times per 10,000 commands are expected at least once per run (a
// generator change that stops reaching one is noticed; a miss by chance has
// odds below e^-10); the rarest is only reported, and has a scripted test
// (EvictionMakesSharedPageWritable).
const std::vector<std::string> kScenarios = {
    "an allocation evicted a cached prefix",
    "an eviction chose the least recently used of several cached prefixes",
    "an append evicted a cached prefix",
    "a write_kv evicted a cached prefix",
    "a hit shared a partial last prefix page",
    "a hit copied a partial last prefix page",
    "a hit shared bytes its registrant wrote",
    "the registrant wrote a registered page in place",
    "a write_kv copied a shared page",
    "an append copied a shared page",
};
const std::vector<std::string> kRareScenarios = {
    "an eviction made a shared page writable in place",  // ~3 per 10,000 commands
};

// What the runs of one TEST share: the commands run and the scenarios reached.
struct Counts {
  kvcache_state::Tally tally;
  std::map<std::string, std::uint64_t> scenarios;
  void note(const std::string& scenario) {
    RC_ASSERT(std::find(kScenarios.begin(), kScenarios.end(), scenario) != kScenarios.end() ||
              std::find(kRareScenarios.begin(), kRareScenarios.end(), scenario) !=
                  kRareScenarios.end());
    ++scenarios[scenario];
  }
};
struct PrefixSut {
  PrefixSut(const PrefixModel& m, Counts& run_counts)
      : cache(m.cfg, Bytes{m.total * m.bytes_per_page()}, Tokens{m.page_size}),
        counts(run_counts) {}
  PagedKVCache cache;
  Counts& counts;
  std::vector<std::uint32_t> bind;  // model page id -> cache page index (kUnbound: none yet)
};

std::span<const std::byte> as_span(const Row& r) { return std::as_bytes(std::span(r)); }
void append_row(Row& out, std::span<const std::byte> s) {
  for (const std::byte b : s) out.push_back(static_cast<std::uint8_t>(b));
}
std::vector<std::uint32_t> page_indices(std::span<const PageId> table) {
  std::vector<std::uint32_t> out;
  for (const PageId p : table) out.push_back(p.index());
  return out;
}
// The registry's pages of `hash`, per layer, or nothing when not registered.
std::optional<std::vector<std::vector<std::uint32_t>>> registry_pages(const PagedKVCache& cache,
                                                                      const std::string& hash) {
  const PrefixRegistry::Prefix* p = cache.registry().find(hash);
  if (p == nullptr) return std::nullopt;
  std::vector<std::vector<std::uint32_t>> out(cache.config().num_layers);
  for (std::size_t i = 0; i < p->pages.size(); ++i) {
    out[i / std::max<std::size_t>(p->pages_per_layer, 1)].push_back(p->pages[i].index());
  }
  return out;
}

// Binds model page ids to cache page indices: a model page is one cache page,
// the same in every holder and every state; two model pages are two pages.
// (Flat vectors, not maps: this runs twice per command under ASan.)
constexpr std::uint32_t kUnbound = 0xFFFF'FFFF;
struct Binder {
  const std::vector<std::uint32_t>& before;  // model id -> cache page, last state
  std::vector<std::uint32_t> now;            // model id -> cache page, this state
  std::vector<std::uint32_t> reverse;        // cache page -> model id, this state
  Binder(const std::vector<std::uint32_t>& last, std::uint32_t model_ids, std::uint64_t total)
      : before(last),
        now(model_ids, kUnbound),
        reverse(static_cast<std::size_t>(total), kUnbound) {}
  void pair(std::uint32_t model, std::uint32_t page) {
    RC_ASSERT(model < now.size());
    RC_ASSERT(page < reverse.size());
    if (model < before.size() && before[model] != kUnbound) {
      RC_ASSERT(before[model] == page);  // the same page as in the last state
    }
    if (now[model] == kUnbound) now[model] = page;
    RC_ASSERT(now[model] == page);  // one model page, one cache page
    if (reverse[page] == kUnbound) reverse[page] = model;
    RC_ASSERT(reverse[page] == model);  // one cache page, one model page
  }
};

// The whole observable state of the cache equals `m`; the reference counts,
// free list and page classes are also recomputed from the cache's own block
// tables and registry.
void assert_matches(const PrefixModel& m, PrefixSut& sut) {
  const PagedKVCache& cache = sut.cache;
  const PagedStats s = cache.stats();
  const std::vector<std::uint64_t> holders = m.holder_counts();
  const std::uint64_t used = m.used(holders);
  const std::uint64_t model_cached = m.cached(holders);
  RC_ASSERT(s.total_pages == Pages{m.total});
  RC_ASSERT(s.free_pages == Pages{m.free()});
  RC_ASSERT(s.used_pages == Pages{used});
  RC_ASSERT(s.cached_pages == Pages{model_cached});
  RC_ASSERT(s.used_memory == Bytes{used * m.bytes_per_page()});
  RC_ASSERT(s.num_requests == m.requests.size());
  RC_ASSERT(s.prefix_hits == m.hits);
  RC_ASSERT(s.prefix_misses == m.misses);
  RC_ASSERT(s.stored_tokens == Tokens{m.stored()});
  RC_ASSERT(s.registered_prefixes == m.prefixes.size());
  RC_ASSERT(cache.num_requests() == m.requests.size());
  for (const std::string& id : kIds) RC_ASSERT(cache.contains(id) == m.has(id));

  Binder binder(sut.bind, m.next_page, m.total);
  const auto n = static_cast<std::size_t>(m.total);
  std::vector<std::uint64_t> table_refs(n, 0);  // block-table entries per cache page
  std::vector<std::uint64_t> registry_refs(n, 0);
  Row got;
  for (const auto& [id, r] : m.requests) {
    std::uint64_t held = 0;
    for (std::size_t l = 0; l < r.layers.size(); ++l) {
      const MLayer& ml = r.layers[l];
      RC_ASSERT(cache.tokens(id, l) == Tokens{ml.tokens});
      const std::span<const PageId> table = cache.block_table(id, l);
      RC_ASSERT(table.size() == ml.pages.size());
      RC_ASSERT(table.size() == m.pages_for(ml.tokens));
      for (std::size_t i = 0; i < table.size(); ++i) {
        binder.pair(ml.pages[i], table[i].index());
        ++table_refs[table[i].index()];
      }
      held += table.size();
      // Isolation: the request reads exactly its own bytes.
      const auto [keys, values] = cache.get_kv(id, l);
      RC_ASSERT(keys.size() == ml.tokens);
      RC_ASSERT(values.size() == ml.tokens);
      for (const bool value : {false, true}) {
        bool same = true;
        for (std::size_t t = 0; t < keys.size(); ++t) {
          const auto want = m.token_row(ml, t, value);
          const auto have = value ? values[t] : keys[t];
          same = same && std::equal(want.begin(), want.end(), have.begin(), have.end(),
                                    [](std::uint8_t w, std::byte h) {
                                      return w == static_cast<std::uint8_t>(h);
                                    });
        }
        if (!same) {  // build both for the message
          got.clear();
          for (std::size_t t = 0; t < keys.size(); ++t)
            append_row(got, value ? values[t] : keys[t]);
          RC_ASSERT(got == m.read(id, l, value));
        }
      }
    }
    RC_ASSERT(cache.pages_held(id) == Pages{held});
    RC_ASSERT(cache.pages_needed_to_append(id) == Pages{m.append_need(id)});
  }
  for (const std::string& hash : kHashes) {
    RC_ASSERT(cache.has_prefix(hash) == m.registered(hash));
    const PrefixRegistry::Prefix* reg = cache.registry().find(hash);
    RC_ASSERT((reg != nullptr) == m.registered(hash));
    if (reg == nullptr) continue;
    const MPrefix& pre = m.prefixes.at(hash);
    RC_ASSERT(reg->tokens == Tokens{pre.tokens});
    RC_ASSERT(reg->pages_per_layer == m.pages_for(pre.tokens));
    RC_ASSERT(reg->pages.size() == m.layers() * reg->pages_per_layer);  // layer-major
    for (std::size_t l = 0; l < m.layers(); ++l) {
      RC_ASSERT(pre.pages[l].size() == reg->pages_per_layer);
      for (std::size_t k = 0; k < pre.pages[l].size(); ++k) {
        const std::uint32_t page = reg->pages[(l * reg->pages_per_layer) + k].index();
        binder.pair(pre.pages[l][k], page);
        ++registry_refs[page];
        RC_ASSERT(registry_refs[page] == 1U);  // the registry holds a page once
      }
    }
  }
  std::size_t bound = 0;
  for (const std::uint32_t p : binder.now) bound += p != kUnbound ? 1U : 0U;
  RC_ASSERT(bound == m.live_pages);  // every model page is held, so was bound
  sut.bind = std::move(binder.now);

  // Computed from the cache's own block tables and registry only: reference
  // count == holders, the free list is exactly the pages nobody holds, and
  // the page classes.
  std::uint64_t in_tables = 0;
  std::uint64_t cached = 0;
  std::uint64_t nobody = 0;
  for (std::uint32_t i = 0; i < n; ++i) {
    RC_ASSERT(cache.pool().ref_count(PageId{i}) == table_refs[i] + registry_refs[i]);
    in_tables += table_refs[i] != 0 ? 1U : 0U;
    cached += table_refs[i] == 0 && registry_refs[i] != 0 ? 1U : 0U;
    nobody += table_refs[i] + registry_refs[i] == 0 ? 1U : 0U;
  }
  std::vector<bool> on_free_list(n, false);
  for (const PageId p : cache.pool().free_list()) {
    RC_ASSERT(p.index() < n);
    RC_ASSERT(table_refs[p.index()] + registry_refs[p.index()] == 0U);  // no held page is free
    RC_ASSERT(!on_free_list[p.index()]);
    on_free_list[p.index()] = true;
  }
  RC_ASSERT(s.free_pages == Pages{nobody});  // with the above: free list == pages nobody holds
  RC_ASSERT(s.used_pages == Pages{in_tables});
  RC_ASSERT(s.cached_pages == Pages{cached});
  RC_ASSERT(s.free_pages + s.used_pages + s.cached_pages == s.total_pages);

  RC_ASSERT(std::abs(cache.memory_efficiency() - m.efficiency()) <= 1e-12);
  RC_ASSERT(cache.check_invariants());
}

// Everything observable, raw, for the "nothing changed" comparison.
struct Snapshot {
  std::vector<std::uint64_t> stats;
  double efficiency = 0;
  std::vector<std::string> ids;
  std::vector<std::vector<std::uint32_t>> tables;  // per id, per layer
  std::vector<std::uint64_t> tokens;
  Row rows;  // every key and value byte, per id, per layer
  std::vector<bool> has_prefix;
  std::vector<std::vector<std::vector<std::uint32_t>>> registry;  // per hash, per layer
  std::vector<std::uint32_t> free_list;
  std::vector<std::uint32_t> refs;

  explicit Snapshot(const PagedKVCache& cache) : efficiency(cache.memory_efficiency()) {
    const PagedStats s = cache.stats();
    stats = {s.total_pages.count(),  s.free_pages.count(),      s.used_pages.count(),
             s.cached_pages.count(), s.used_memory.count(),     s.num_requests,
             s.prefix_hits,          s.prefix_misses,           s.stored_tokens.count(),
             s.registered_prefixes,  s.prefix.prefixes_evicted, s.prefix.pages_evicted};
    ids = cache.request_ids();
    std::sort(ids.begin(), ids.end());
    for (const std::string& id : ids) {
      for (std::size_t l = 0; l < cache.config().num_layers; ++l) {
        tables.push_back(page_indices(cache.block_table(id, l)));
        tokens.push_back(cache.tokens(id, l).count());
        const auto [keys, values] = cache.get_kv(id, l);
        for (const auto k : keys) append_row(rows, k);
        for (const auto v : values) append_row(rows, v);
      }
    }
    for (const std::string& hash : kHashes) {
      has_prefix.push_back(cache.has_prefix(hash));
      registry.push_back(
          registry_pages(cache, hash).value_or(std::vector<std::vector<std::uint32_t>>{}));
    }
    for (const PageId p : cache.pool().free_list()) free_list.push_back(p.index());
    for (std::uint32_t i = 0; i < cache.total_pages().count(); ++i) {
      refs.push_back(cache.pool().ref_count(PageId{i}));
    }
  }
};

void assert_unchanged(const Snapshot& before, const PagedKVCache& cache) {
  const Snapshot after(cache);
  RC_ASSERT(after.stats == before.stats);
  RC_ASSERT(after.efficiency == before.efficiency);
  RC_ASSERT(after.ids == before.ids);
  RC_ASSERT(after.tables == before.tables);
  RC_ASSERT(after.tokens == before.tokens);
  RC_ASSERT(after.rows == before.rows);
  RC_ASSERT(after.has_prefix == before.has_prefix);
  RC_ASSERT(after.registry == before.registry);
  RC_ASSERT(after.free_list == before.free_list);
  RC_ASSERT(after.refs == before.refs);
}

// Some prefix registered before the command is gone after it.
bool evicted_some(const PrefixModel& s0, const PrefixModel& s1) {
  for (const auto& [hash, pre] : s0.prefixes) {
    const auto it = s1.prefixes.find(hash);
    if (it == s1.prefixes.end() || it->second.registrant != pre.registrant) return true;
  }
  return false;
}
// Several prefixes had cached pages when the command evicted one: the LRU
// order decided which.
bool lru_choice(const PrefixModel& s0, const PrefixModel& s1) {
  if (!evicted_some(s0, s1)) return false;
  std::size_t candidates = 0;
  for (const auto& [hash, pre] : s0.prefixes) candidates += s0.cached_of(hash) != 0 ? 1U : 0U;
  return candidates >= 2;
}
// The bytes of a page registered before and after the command changed.
bool registry_written(const PrefixModel& s0, const PrefixModel& s1) {
  for (const auto& [hash, pre] : s1.prefixes) {
    const auto it = s0.prefixes.find(hash);
    if (it == s0.prefixes.end() || it->second.registrant != pre.registrant) continue;
    for (const auto& layer : pre.pages) {
      for (const std::uint32_t p : layer) {
        const auto a = s0.page(p);
        const auto b = s1.page(p);
        if (!std::equal(a.begin(), a.end(), b.begin(), b.end())) return true;
      }
    }
  }
  return false;
}

// Every command: compare the whole model before, run, compare the model's
// next state after; a command that must change nothing also compares the raw
// snapshot.
struct PrefixCommand : rc::state::Command<PrefixModel, PrefixSut> {
  void run(const PrefixModel& s0, PrefixSut& sut) const final {
    sut.counts.tally.record(typeid(*this));
    assert_matches(s0, sut);
    if (changes()) {
      exec(s0, sut.cache);
    } else {
      const Snapshot before(sut.cache);
      exec(s0, sut.cache);
      assert_unchanged(before, sut.cache);
    }
    const PrefixModel s1 = nextState(s0);
    assert_matches(s1, sut);
    scenarios(s0, s1, sut.counts);
  }
  virtual void exec(const PrefixModel& s0, PagedKVCache& cache) const = 0;
  [[nodiscard]] virtual bool changes() const { return false; }
  // Counts the scenarios (kScenarios) the command reached.
  virtual void scenarios(const PrefixModel& /*s0*/, const PrefixModel& /*s1*/,
                         Counts& /*out*/) const {}
};

// The prefix-aware admission helpers (paged.cppm, beyond the contract) agree
// with the model: the pages the allocation would take (for a hit, those it
// does not share), whether it fits now, and now / later / never (a hit is
// `never` when it cannot fit beside its prefix's pages in an otherwise empty
// cache).
void assert_admission(const PrefixModel& m, const PagedKVCache& cache, std::uint64_t prompt,
                      const std::string& hash, std::uint64_t prefix) {
  const bool hit = m.registered(hash);
  const std::uint64_t need = hit ? m.hit_need(prompt, prefix) : m.layers() * m.pages_for(prompt);
  RC_ASSERT(cache.pages_needed_to_allocate(Tokens{prompt}, hash, Tokens{prefix}) == Pages{need});
  const bool can = m.can_allocate(prompt, hash, prefix);
  RC_ASSERT(cache.can_allocate(Tokens{prompt}, hash, Tokens{prefix}) == can);
  const std::uint64_t room = m.total - (hit ? m.layers() * m.pages_for(prefix) : 0U);
  const Admission want = can ? Admission::now : need <= room ? Admission::later : Admission::never;
  RC_ASSERT(cache.admission(Tokens{prompt}, hash, Tokens{prefix}) == want);
}

template <class T>
T pick(const std::vector<T>& xs) {
  RC_PRE(!xs.empty());
  return *rc::gen::elementOf(xs);
}

// Prompt tokens past the prefix: often none (the prompt is the prefix), often
// a few (inside the partial last page, or past it).
rc::Gen<std::uint64_t> extra_tokens(const PrefixModel& m) {
  return rc::gen::weightedOneOf<std::uint64_t>(
      {{2, rc::gen::just<std::uint64_t>(0)},
       {5, rc::gen::inRange<std::uint64_t>(1, m.page_size + 2)}});
}

// A stored position to write: anywhere, or (as often) in the first two pages,
// where the prefix pages are.
rc::Gen<std::uint64_t> write_position(const PrefixModel& m, std::uint64_t tokens) {
  return rc::gen::oneOf(rc::gen::inRange<std::uint64_t>(0, tokens),
                        rc::gen::inRange<std::uint64_t>(0, std::min(tokens, 2 * m.page_size)));
}

// ---- allocate_paged with a prefix --------------------------------------------

// A new hash (a miss): the request allocates and registers its first pages.
struct AllocateMiss final : PrefixCommand {
  std::string id;
  std::string hash;
  std::uint64_t prefix;
  std::uint64_t prompt;
  explicit AllocateMiss(const PrefixModel& m)
      : id(pick(m.unknown_ids())),
        hash(pick(m.hashes(false))),
        prefix(*rc::gen::inRange<std::uint64_t>(1, 2 * m.page_size + 1)),
        prompt(prefix + *extra_tokens(m)) {}
  void checkPreconditions(const PrefixModel& m) const override {
    RC_PRE(!m.has(id) && !m.registered(hash) && prefix >= 1 && prefix <= prompt);
    RC_PRE(m.can_allocate(prompt, hash, prefix));
  }
  void apply(PrefixModel& m) const override {
    static_cast<void>(m.allocate(id, prompt, hash, prefix));
  }
  void exec(const PrefixModel& s0, PagedKVCache& cache) const override {
    assert_admission(s0, cache, prompt, hash, prefix);
    RC_ASSERT(cache.allocate_paged(id, Tokens{prompt}, hash, Tokens{prefix}));
  }
  [[nodiscard]] bool changes() const override { return true; }
  void scenarios(const PrefixModel& s0, const PrefixModel& s1, Counts& out) const override {
    if (evicted_some(s0, s1)) out.note("an allocation evicted a cached prefix");
    if (lru_choice(s0, s1))
      out.note("an eviction chose the least recently used of several cached prefixes");
  }
  void show(std::ostream& os) const override {
    os << "allocate_paged(" << quoted(id) << ", " << prompt << ", " << quoted(hash) << ", "
       << prefix << ") miss -> true";
  }
};

// A registered hash (a hit): shares the prefix pages (copies a partial last
// page the prompt continues inside), fresh pages for the rest.
struct AllocateHit final : PrefixCommand {
  std::string id;
  std::string hash;
  std::uint64_t prefix;
  std::uint64_t prompt;
  explicit AllocateHit(const PrefixModel& m)
      : id(pick(m.unknown_ids())),
        hash(pick(m.hashes(true))),
        prefix(m.prefixes.at(hash).tokens),
        prompt(prefix + *extra_tokens(m)) {}
  void checkPreconditions(const PrefixModel& m) const override {
    RC_PRE(!m.has(id) && m.registered(hash));
    RC_PRE(m.prefixes.at(hash).tokens == prefix);
    RC_PRE(prefix <= prompt);
    RC_PRE(m.can_allocate(prompt, hash, prefix));
  }
  void apply(PrefixModel& m) const override {
    static_cast<void>(m.allocate(id, prompt, hash, prefix));
  }
  void exec(const PrefixModel& s0, PagedKVCache& cache) const override {
    assert_admission(s0, cache, prompt, hash, prefix);
    RC_ASSERT(cache.allocate_paged(id, Tokens{prompt}, hash, Tokens{prefix}));
  }
  [[nodiscard]] bool changes() const override { return true; }
  void scenarios(const PrefixModel& s0, const PrefixModel& s1, Counts& out) const override {
    if (evicted_some(s0, s1)) out.note("an allocation evicted a cached prefix");
    if (lru_choice(s0, s1))
      out.note("an eviction chose the least recently used of several cached prefixes");
    if (prefix % s0.page_size != 0) {
      out.note(prompt == prefix ? "a hit shared a partial last prefix page"
                                : "a hit copied a partial last prefix page");
    }
    for (const auto& layer : s0.prefixes.at(hash).pages) {
      for (const std::uint32_t p : layer) {
        const auto page = s0.page(p);
        if (std::any_of(page.begin(), page.end(), [](std::uint8_t b) { return b != 0; })) {
          out.note("a hit shared bytes its registrant wrote");
          return;
        }
      }
    }
  }
  void show(std::ostream& os) const override {
    os << "allocate_paged(" << quoted(id) << ", " << prompt << ", " << quoted(hash) << ", "
       << prefix << ") hit -> true";
  }
};

// A hit or a miss whose pages cannot be had even after evicting every other
// cached prefix: false, nothing changes (nothing evicted either).
struct AllocatePrefixNoMemory final : PrefixCommand {
  std::string id;
  std::string hash = *rc::gen::elementOf(kHashes);
  std::uint64_t prefix = 0;
  std::uint64_t prompt = 0;
  explicit AllocatePrefixNoMemory(const PrefixModel& m) : id(pick(m.unknown_ids())) {
    prefix = m.registered(hash) ? m.prefixes.at(hash).tokens
                                : *rc::gen::inRange<std::uint64_t>(1, 3 * m.page_size + 1);
    const std::uint64_t room = (m.free() + m.cached()) / m.layers() * m.page_size;
    prompt = std::max(prefix, room) + *rc::gen::inRange<std::uint64_t>(0, 2 * m.page_size + 1);
  }
  void checkPreconditions(const PrefixModel& m) const override {
    RC_PRE(!m.has(id) && prefix >= 1 && prefix <= prompt);
    RC_PRE(m.fits_registered(hash, prefix));
    RC_PRE(!m.can_allocate(prompt, hash, prefix));
  }
  void exec(const PrefixModel& s0, PagedKVCache& cache) const override {
    assert_admission(s0, cache, prompt, hash, prefix);
    RC_ASSERT(!cache.allocate_paged(id, Tokens{prompt}, hash, Tokens{prefix}));
  }
  void show(std::ostream& os) const override {
    os << "allocate_paged(" << quoted(id) << ", " << prompt << ", " << quoted(hash) << ", "
       << prefix << ") out of memory -> false";
  }
};

// ---- allocate_paged without a prefix -----------------------------------------

struct Allocate final : PrefixCommand {
  std::string id;
  std::uint64_t prompt;
  explicit Allocate(const PrefixModel& m)
      : id(pick(m.unknown_ids())),
        prompt(*rc::gen::inRange<std::uint64_t>(0, 2 * m.page_size + 1)) {}
  void checkPreconditions(const PrefixModel& m) const override {
    RC_PRE(!m.has(id));
    RC_PRE(m.can_allocate(prompt));
  }
  void apply(PrefixModel& m) const override { static_cast<void>(m.allocate(id, prompt)); }
  void exec(const PrefixModel&, PagedKVCache& cache) const override {
    RC_ASSERT(cache.allocate_paged(id, Tokens{prompt}));
  }
  [[nodiscard]] bool changes() const override { return true; }
  void scenarios(const PrefixModel& s0, const PrefixModel& s1, Counts& out) const override {
    if (evicted_some(s0, s1)) out.note("an allocation evicted a cached prefix");
    if (lru_choice(s0, s1))
      out.note("an eviction chose the least recently used of several cached prefixes");
  }
  void show(std::ostream& os) const override {
    os << "allocate_paged(" << quoted(id) << ", " << prompt << ") -> true";
  }
};

struct AllocateNoMemory final : PrefixCommand {
  std::string id;
  std::uint64_t prompt = 0;
  explicit AllocateNoMemory(const PrefixModel& m) : id(pick(m.unknown_ids())) {
    const std::uint64_t room = (m.free() + m.cached()) / m.layers() * m.page_size;
    prompt = room + *rc::gen::inRange<std::uint64_t>(1, 2 * m.page_size + 1);
  }
  void checkPreconditions(const PrefixModel& m) const override {
    RC_PRE(!m.has(id));
    RC_PRE(!m.can_allocate(prompt));
  }
  void exec(const PrefixModel&, PagedKVCache& cache) const override {
    RC_ASSERT(!cache.allocate_paged(id, Tokens{prompt}));
  }
  void show(std::ostream& os) const override {
    os << "allocate_paged(" << quoted(id) << ", " << prompt << ") out of memory -> false";
  }
};

// An allocation (without a prefix, or a miss) that needs more pages than are
// free but no more than free + cached: it evicts least recently used prefixes
// until its pages are free, and succeeds.
struct AllocateEvicting final : PrefixCommand {
  std::string id;
  bool with_prefix = *rc::gen::arbitrary<bool>();
  std::string hash;
  std::uint64_t prefix = 0;
  std::uint64_t prompt = 0;
  explicit AllocateEvicting(const PrefixModel& m) : id(pick(m.unknown_ids())) {
    const std::uint64_t lo = m.free() / m.layers() + 1;  // pages per layer
    const std::uint64_t hi = (m.free() + m.cached()) / m.layers();
    RC_PRE(lo <= hi);
    // Mostly just past the free pages: one eviction, the other cached
    // prefixes stay (so that LRU order decides later evictions).
    const std::uint64_t pages = *rc::gen::weightedOneOf<std::uint64_t>(
        {{3, rc::gen::just(lo)}, {1, rc::gen::inRange<std::uint64_t>(lo, hi + 1)}});
    prompt = (pages - 1) * m.page_size + *rc::gen::inRange<std::uint64_t>(1, m.page_size + 1);
    if (with_prefix) {
      hash = pick(m.hashes(false));
      prefix = *rc::gen::inRange<std::uint64_t>(1, prompt + 1);
    }
  }
  void checkPreconditions(const PrefixModel& m) const override {
    RC_PRE(!m.has(id));
    RC_PRE(m.layers() * m.pages_for(prompt) > m.free());
    if (with_prefix) {
      RC_PRE(!m.registered(hash) && prefix >= 1 && prefix <= prompt);
      RC_PRE(m.can_allocate(prompt, hash, prefix));
    } else {
      RC_PRE(m.can_allocate(prompt));
    }
  }
  void apply(PrefixModel& m) const override {
    if (with_prefix) {
      static_cast<void>(m.allocate(id, prompt, hash, prefix));
    } else {
      static_cast<void>(m.allocate(id, prompt));
    }
  }
  void exec(const PrefixModel& s0, PagedKVCache& cache) const override {
    if (with_prefix) {
      assert_admission(s0, cache, prompt, hash, prefix);
      RC_ASSERT(cache.allocate_paged(id, Tokens{prompt}, hash, Tokens{prefix}));
    } else {
      RC_ASSERT(cache.allocate_paged(id, Tokens{prompt}));
    }
  }
  [[nodiscard]] bool changes() const override { return true; }
  void scenarios(const PrefixModel& s0, const PrefixModel& s1, Counts& out) const override {
    if (evicted_some(s0, s1)) out.note("an allocation evicted a cached prefix");
    if (lru_choice(s0, s1))
      out.note("an eviction chose the least recently used of several cached prefixes");
  }
  void show(std::ostream& os) const override {
    os << "allocate_paged(" << quoted(id) << ", " << prompt;
    if (with_prefix) os << ", " << quoted(hash) << ", " << prefix;
    os << ") evicting -> true";
  }
};

// An allocation without a prefix that takes every free page it can (whole
// pages per layer), so that later allocations, appends and copies must evict.
struct FillPool final : PrefixCommand {
  std::string id;
  std::uint64_t prompt = 0;
  explicit FillPool(const PrefixModel& m) : id(pick(m.unknown_ids())) {
    const std::uint64_t pages = m.free() / m.layers();
    RC_PRE(pages != 0);
    prompt = (pages - 1) * m.page_size + *rc::gen::inRange<std::uint64_t>(1, m.page_size + 1);
  }
  void checkPreconditions(const PrefixModel& m) const override {
    RC_PRE(!m.has(id));
    RC_PRE(m.layers() * m.pages_for(prompt) <= m.free());
  }
  void apply(PrefixModel& m) const override { static_cast<void>(m.allocate(id, prompt)); }
  void exec(const PrefixModel&, PagedKVCache& cache) const override {
    RC_ASSERT(cache.allocate_paged(id, Tokens{prompt}));
  }
  [[nodiscard]] bool changes() const override { return true; }
  void show(std::ostream& os) const override {
    os << "allocate_paged(" << quoted(id) << ", " << prompt << ") filling the pool -> true";
  }
};

// A live id with valid arguments (any prefix, any memory): false.
struct AllocateDuplicate final : PrefixCommand {
  std::string id;
  bool with_prefix = *rc::gen::arbitrary<bool>();
  std::string hash = *rc::gen::elementOf(kHashes);
  std::uint64_t prefix;
  std::uint64_t prompt;
  explicit AllocateDuplicate(const PrefixModel& m)
      : id(pick(m.live_ids())),
        prefix(m.registered(hash) ? m.prefixes.at(hash).tokens
                                  : *rc::gen::inRange<std::uint64_t>(1, 3 * m.page_size + 1)),
        prompt(prefix + *rc::gen::inRange<std::uint64_t>(0, 4 * m.page_size)) {}
  void checkPreconditions(const PrefixModel& m) const override {
    RC_PRE(m.has(id) && prefix >= 1 && prefix <= prompt);
    RC_PRE(!with_prefix || m.fits_registered(hash, prefix));
  }
  void exec(const PrefixModel&, PagedKVCache& cache) const override {
    if (with_prefix) {
      RC_ASSERT(!cache.allocate_paged(id, Tokens{prompt}, hash, Tokens{prefix}));
    } else {
      RC_ASSERT(!cache.allocate_paged(id, Tokens{prompt}));
    }
  }
  void show(std::ostream& os) const override {
    os << "allocate_paged(" << quoted(id) << " (live), " << prompt;
    if (with_prefix) os << ", " << quoted(hash) << ", " << prefix;
    os << ") -> false";
  }
};

// A prompt whose pages (num_layers * ceil(prompt / page_size)) overflow 64
// bits, with valid prefix arguments or none: std::overflow_error, checked
// before the id (so any id), nothing changes.
struct AllocateOverflow final : PrefixCommand {
  std::string id = *rc::gen::elementOf(kIds);
  bool with_prefix = *rc::gen::arbitrary<bool>();
  std::string hash = *rc::gen::elementOf(kHashes);
  std::uint64_t prompt =
      std::numeric_limits<std::uint64_t>::max() - *rc::gen::inRange<std::uint64_t>(0, 3);
  std::uint64_t prefix = 0;
  explicit AllocateOverflow(const PrefixModel& m)
      : prefix(m.registered(hash) ? m.prefixes.at(hash).tokens
                                  : *rc::gen::inRange<std::uint64_t>(1, 2 * m.page_size + 1)) {}
  void checkPreconditions(const PrefixModel& m) const override {
    RC_PRE(m.pages_for(prompt) > std::numeric_limits<std::uint64_t>::max() / m.layers());
    RC_PRE(!with_prefix || m.fits_registered(hash, prefix));
  }
  void exec(const PrefixModel&, PagedKVCache& cache) const override {
    if (with_prefix) {
      RC_ASSERT_THROWS_AS(
          static_cast<void>(cache.allocate_paged(id, Tokens{prompt}, hash, Tokens{prefix})),
          std::overflow_error);
    } else {
      RC_ASSERT_THROWS_AS(static_cast<void>(cache.allocate_paged(id, Tokens{prompt})),
                          std::overflow_error);
    }
  }
  void show(std::ostream& os) const override {
    os << "allocate_paged(" << quoted(id) << ", " << prompt;
    if (with_prefix) os << ", " << quoted(hash) << ", " << prefix;
    os << ") -> overflow_error";
  }
};

// Bad prefix arguments, checked before the id (so any id): an empty hash, a
// prefix of 0 tokens, one longer than the prompt, a registered hash with
// another length. std::invalid_argument, nothing changes.
struct AllocateBadPrefix final : PrefixCommand {
  enum class Bad { empty_hash, zero_prefix, longer_than_prompt, other_length };
  Bad bad = *rc::gen::element(Bad::empty_hash, Bad::zero_prefix, Bad::longer_than_prompt,
                              Bad::other_length);
  std::string id = *rc::gen::elementOf(kIds);
  std::string hash = *rc::gen::elementOf(kHashes);
  std::uint64_t prefix = 0;
  std::uint64_t prompt = 0;
  explicit AllocateBadPrefix(const PrefixModel& m) {
    switch (bad) {
      case Bad::empty_hash:
        hash.clear();
        prefix = *rc::gen::inRange<std::uint64_t>(1, 6);
        prompt = prefix + *rc::gen::inRange<std::uint64_t>(0, 4);
        break;
      case Bad::zero_prefix:
        prefix = 0;
        prompt = *rc::gen::inRange<std::uint64_t>(0, 6);
        break;
      case Bad::longer_than_prompt:
        prompt = *rc::gen::inRange<std::uint64_t>(0, 6);
        prefix = prompt + *rc::gen::inRange<std::uint64_t>(1, 4);
        break;
      case Bad::other_length: {
        hash = pick(m.hashes(true));
        const std::uint64_t len = m.prefixes.at(hash).tokens;
        prefix = *rc::gen::element<std::uint64_t>(len + 1, len + m.page_size, len - 1);
        RC_PRE(prefix != 0);
        prompt = prefix + *rc::gen::inRange<std::uint64_t>(0, 4);
        break;
      }
    }
  }
  void checkPreconditions(const PrefixModel& m) const override {
    const bool other_length =
        !hash.empty() && m.registered(hash) && m.prefixes.at(hash).tokens != prefix;
    RC_PRE(hash.empty() || prefix == 0 || prefix > prompt || other_length);
  }
  void exec(const PrefixModel&, PagedKVCache& cache) const override {
    RC_ASSERT_THROWS_AS(
        static_cast<void>(cache.allocate_paged(id, Tokens{prompt}, hash, Tokens{prefix})),
        std::invalid_argument);
    RC_ASSERT_THROWS_AS(
        static_cast<void>(cache.pages_needed_to_allocate(Tokens{prompt}, hash, Tokens{prefix})),
        std::invalid_argument);
    RC_ASSERT_THROWS_AS(static_cast<void>(cache.can_allocate(Tokens{prompt}, hash, Tokens{prefix})),
                        std::invalid_argument);
    RC_ASSERT_THROWS_AS(static_cast<void>(cache.admission(Tokens{prompt}, hash, Tokens{prefix})),
                        std::invalid_argument);
  }
  void show(std::ostream& os) const override {
    os << "allocate_paged(" << quoted(id) << ", " << prompt << ", " << quoted(hash) << ", "
       << prefix << ") -> invalid_argument";
  }
};

// ---- fork ------------------------------------------------------------------------

struct Fork final : PrefixCommand {
  std::string parent;
  std::string child;
  explicit Fork(const PrefixModel& m) : parent(pick(m.live_ids())), child(pick(m.unknown_ids())) {}
  void checkPreconditions(const PrefixModel& m) const override {
    RC_PRE(m.has(parent) && !m.has(child));
  }
  void apply(PrefixModel& m) const override { m.fork(parent, child); }
  void exec(const PrefixModel&, PagedKVCache& cache) const override {
    RC_ASSERT(cache.fork(parent, child));
  }
  [[nodiscard]] bool changes() const override { return true; }
  void show(std::ostream& os) const override {
    os << "fork(" << quoted(parent) << ", " << quoted(child) << ") -> true";
  }
};

// An existing child id (the parent itself included): false.
struct ForkExistingChild final : PrefixCommand {
  std::string parent;
  std::string child;
  explicit ForkExistingChild(const PrefixModel& m)
      : parent(pick(m.live_ids())), child(pick(m.live_ids())) {}
  void checkPreconditions(const PrefixModel& m) const override {
    RC_PRE(m.has(parent) && m.has(child));
  }
  void exec(const PrefixModel&, PagedKVCache& cache) const override {
    RC_ASSERT(!cache.fork(parent, child));
  }
  void show(std::ostream& os) const override {
    os << "fork(" << quoted(parent) << ", " << quoted(child) << " (live)) -> false";
  }
};

struct ForkUnknownParent final : PrefixCommand {
  std::string parent;
  std::string child = *rc::gen::elementOf(kIds);
  explicit ForkUnknownParent(const PrefixModel& m) : parent(pick(m.unknown_ids())) {}
  void checkPreconditions(const PrefixModel& m) const override { RC_PRE(!m.has(parent)); }
  void exec(const PrefixModel&, PagedKVCache& cache) const override {
    RC_ASSERT_THROWS_AS(static_cast<void>(cache.fork(parent, child)), UnknownRequest);
  }
  void show(std::ostream& os) const override {
    os << "fork(" << quoted(parent) << " (unknown), " << quoted(child) << ") -> UnknownRequest";
  }
};

// ---- appends and writes ------------------------------------------------------------

struct Append final : PrefixCommand {
  std::string id;
  std::size_t layer = 0;
  Row key;
  Row value;
  explicit Append(const PrefixModel& m)
      : key(*kvcache_state::bytes(m.row())), value(*kvcache_state::bytes(m.row())) {
    std::tie(id, layer) = pick(m.all_layers());
  }
  void checkPreconditions(const PrefixModel& m) const override {
    RC_PRE(m.has(id) && layer < m.layers() && key.size() == m.row() && value.size() == m.row());
    RC_PRE(m.can_append(id, layer));
  }
  void apply(PrefixModel& m) const override { static_cast<void>(m.append(id, layer, key, value)); }
  void exec(const PrefixModel&, PagedKVCache& cache) const override {
    RC_ASSERT(cache.append_token_paged(id, layer, as_span(key), as_span(value)));
  }
  [[nodiscard]] bool changes() const override { return true; }
  void scenarios(const PrefixModel& s0, const PrefixModel& s1, Counts& out) const override {
    if (evicted_some(s0, s1)) out.note("an append evicted a cached prefix");
    if (registry_written(s0, s1)) out.note("the registrant wrote a registered page in place");
    const MLayer& before = s0.requests.at(id).layers[layer];
    const MLayer& after = s1.requests.at(id).layers[layer];
    if (before.tokens % s0.page_size != 0 && before.pages.back() != after.pages.back()) {
      out.note("an append copied a shared page");
    }
    if (before.tokens % s0.page_size != 0 && evicted_some(s0, s1) &&
        before.pages.back() == after.pages.back() &&
        !s0.writable(before.pages.back(), s0.requests.at(id).serial)) {
      out.note("an eviction made a shared page writable in place");
    }
  }
  void show(std::ostream& os) const override {
    os << "append_token_paged(" << quoted(id) << ", layer " << layer << ", " << rc::toString(key)
       << ", " << rc::toString(value) << ") -> true";
  }
};

// The layer needs a page (its last is full, or shared and must be copied)
// and none is free or cached: false, nothing changes.
struct AppendNoPage final : PrefixCommand {
  std::string id;
  std::size_t layer = 0;
  bool with_data = *rc::gen::arbitrary<bool>();
  explicit AppendNoPage(const PrefixModel& m) { std::tie(id, layer) = pick(m.all_layers()); }
  void checkPreconditions(const PrefixModel& m) const override {
    RC_PRE(m.has(id) && layer < m.layers());
    RC_PRE(!m.can_append(id, layer));
  }
  void exec(const PrefixModel& s0, PagedKVCache& cache) const override {
    if (with_data) {
      const Row r(s0.row(), 0x77);
      RC_ASSERT(!cache.append_token_paged(id, layer, as_span(r), as_span(r)));
    } else {
      RC_ASSERT(!cache.append_token_paged(id, layer));
    }
  }
  void show(std::ostream& os) const override {
    os << "append_token_paged(" << quoted(id) << ", layer " << layer << (with_data ? ", bytes" : "")
       << ") with no page -> false";
  }
};

// LIBRARY BUG (reported, not fixed here): append_token_all_layers admits a
// decode step only when pages_needed_to_append(id) <= free + cached pages,
// and counts a layer whose last page is held by the request and by a prefix
// that has no cached page. Copying that page turns the old one into a cached
// page, so free + cached does not drop, and the step is refused although
// appending to each layer in turn succeeds (the model's definition of
// all-or-nothing). While the bug stands, MatchesModel runs only the decode
// steps that both rules admit; StrictAllLayers runs the machine
// without that restriction (PrefixModel::strict_all_layers) and fails (see
// the reproduce string in its comment).
struct AppendAllLayers final : PrefixCommand {
  std::string id;
  explicit AppendAllLayers(const PrefixModel& m) : id(pick(m.live_ids())) {}
  void checkPreconditions(const PrefixModel& m) const override {
    RC_PRE(m.has(id));
    RC_PRE(m.can_append_all(id));
    if (!m.strict_all_layers) RC_PRE(m.append_need(id) <= m.free() + m.cached());  // the bug
  }
  void apply(PrefixModel& m) const override { static_cast<void>(m.append_all(id)); }
  void exec(const PrefixModel&, PagedKVCache& cache) const override {
    RC_ASSERT(cache.append_token_all_layers(id));
  }
  [[nodiscard]] bool changes() const override { return true; }
  void scenarios(const PrefixModel& s0, const PrefixModel& s1, Counts& out) const override {
    if (evicted_some(s0, s1)) out.note("an append evicted a cached prefix");
  }
  void show(std::ostream& os) const override {
    os << "append_token_all_layers(" << quoted(id) << ") -> true";
  }
};

struct AppendAllLayersNoPage final : PrefixCommand {
  std::string id;
  explicit AppendAllLayersNoPage(const PrefixModel& m) : id(pick(m.live_ids())) {}
  void checkPreconditions(const PrefixModel& m) const override {
    RC_PRE(m.has(id));
    RC_PRE(!m.can_append_all(id));
  }
  void exec(const PrefixModel&, PagedKVCache& cache) const override {
    RC_ASSERT(!cache.append_token_all_layers(id));
  }
  void show(std::ostream& os) const override {
    os << "append_token_all_layers(" << quoted(id) << ") without pages -> false";
  }
};

// Overwrites a stored token at a random position, often inside shared prefix
// pages: in place when the request may write the page, else on a copy.
struct WriteKv final : PrefixCommand {
  std::string id;
  std::size_t layer = 0;
  std::uint64_t position = 0;
  Row key;
  Row value;
  explicit WriteKv(const PrefixModel& m)
      : key(*kvcache_state::bytes(m.row())), value(*kvcache_state::bytes(m.row())) {
    const auto shared = m.registry_shared_slots();
    if (!shared.empty() && *rc::gen::inRange(0, 3) == 0) {
      std::tie(id, layer, position) = *rc::gen::elementOf(shared);
    } else {
      std::tie(id, layer) = pick(m.nonempty_layers());
      position = *write_position(m, m.tokens(id, layer));
    }
  }
  void checkPreconditions(const PrefixModel& m) const override {
    RC_PRE(m.has(id) && layer < m.layers());
    RC_PRE(position < m.tokens(id, layer));
    RC_PRE(key.size() == m.row() && value.size() == m.row());
    RC_PRE(m.can_write_at(id, layer, position));
  }
  void apply(PrefixModel& m) const override {
    static_cast<void>(m.write(id, layer, position, key, value));
  }
  void exec(const PrefixModel&, PagedKVCache& cache) const override {
    cache.write_kv(id, layer, Tokens{position}, as_span(key), as_span(value));
  }
  [[nodiscard]] bool changes() const override { return true; }
  void scenarios(const PrefixModel& s0, const PrefixModel& s1, Counts& out) const override {
    const auto index = static_cast<std::size_t>(position / s0.page_size);
    const std::uint32_t before = s0.requests.at(id).layers[layer].pages[index];
    const std::uint32_t after = s1.requests.at(id).layers[layer].pages[index];
    const bool evicted = evicted_some(s0, s1);
    if (evicted) out.note("a write_kv evicted a cached prefix");
    if (registry_written(s0, s1)) out.note("the registrant wrote a registered page in place");
    if (before != after) out.note("a write_kv copied a shared page");
    if (evicted && before == after && !s0.writable(before, s0.requests.at(id).serial)) {
      out.note("an eviction made a shared page writable in place");
    }
  }
  void show(std::ostream& os) const override {
    os << "write_kv(" << quoted(id) << ", layer " << layer << ", " << position << ", "
       << rc::toString(key) << ", " << rc::toString(value) << ")";
  }
};

// A write into a page the request may not write in place, with no page free
// or cached for the copy: OutOfPages, nothing changes.
struct WriteKvNoPage final : PrefixCommand {
  std::string id;
  std::size_t layer = 0;
  std::uint64_t position = 0;
  explicit WriteKvNoPage(const PrefixModel& m) {
    std::tie(id, layer) = pick(m.nonempty_layers());
    position = *write_position(m, m.tokens(id, layer));
  }
  void checkPreconditions(const PrefixModel& m) const override {
    RC_PRE(m.has(id) && layer < m.layers());
    RC_PRE(position < m.tokens(id, layer));
    RC_PRE(!m.can_write_at(id, layer, position));
  }
  void exec(const PrefixModel& s0, PagedKVCache& cache) const override {
    const Row r(s0.row(), 0x33);
    RC_ASSERT_THROWS_AS(cache.write_kv(id, layer, Tokens{position}, as_span(r), as_span(r)),
                        OutOfPages);
  }
  void show(std::ostream& os) const override {
    os << "write_kv(" << quoted(id) << ", layer " << layer << ", " << position
       << ") shared, no page -> OutOfPages";
  }
};

// ---- free, eviction --------------------------------------------------------------

struct Free final : PrefixCommand {
  std::string id;
  explicit Free(const PrefixModel& m) : id(pick(m.live_ids())) {}
  void checkPreconditions(const PrefixModel& m) const override { RC_PRE(m.has(id)); }
  void apply(PrefixModel& m) const override { m.free_request(id); }
  void exec(const PrefixModel&, PagedKVCache& cache) const override { cache.free(id); }
  [[nodiscard]] bool changes() const override { return true; }
  void show(std::ostream& os) const override { os << "free(" << quoted(id) << ")"; }
};

// One in four generation attempts of the operator commands (evict_prefix,
// clear_prefix_cache) goes ahead: at full weight they drop the prefixes the
// machine builds up faster than it can share, cache and evict them.
void thin_out() { RC_PRE(*rc::gen::inRange(0, 4) == 0); }

struct EvictPrefix final : PrefixCommand {
  std::string hash;
  explicit EvictPrefix(const PrefixModel& m) : hash(pick(m.hashes(true))) { thin_out(); }
  void checkPreconditions(const PrefixModel& m) const override { RC_PRE(m.registered(hash)); }
  void apply(PrefixModel& m) const override { m.evict(hash); }
  void exec(const PrefixModel&, PagedKVCache& cache) const override {
    RC_ASSERT(cache.evict_prefix(hash));
  }
  [[nodiscard]] bool changes() const override { return true; }
  void show(std::ostream& os) const override {
    os << "evict_prefix(" << quoted(hash) << ") -> true";
  }
};

struct EvictUnknownPrefix final : PrefixCommand {
  std::string hash;
  explicit EvictUnknownPrefix(const PrefixModel& m) : hash(pick(m.hashes(false))) {}
  void checkPreconditions(const PrefixModel& m) const override { RC_PRE(!m.registered(hash)); }
  void exec(const PrefixModel&, PagedKVCache& cache) const override {
    RC_ASSERT(!cache.evict_prefix(hash));
  }
  void show(std::ostream& os) const override {
    os << "evict_prefix(" << quoted(hash) << " (not registered)) -> false";
  }
};

struct ClearPrefixCache final : PrefixCommand {
  ClearPrefixCache() { thin_out(); }
  void checkPreconditions(const PrefixModel& m) const override { RC_PRE(!m.prefixes.empty()); }
  void apply(PrefixModel& m) const override { static_cast<void>(m.clear()); }
  void exec(const PrefixModel& s0, PagedKVCache& cache) const override {
    RC_ASSERT(cache.clear_prefix_cache() == s0.prefixes.size());
  }
  [[nodiscard]] bool changes() const override { return true; }
  void show(std::ostream& os) const override { os << "clear_prefix_cache()"; }
};

// The queries are compared around every command; this one makes sure there is
// always a valid command, and that the queries alone change nothing.
struct Stats final : PrefixCommand {
  void exec(const PrefixModel&, PagedKVCache& cache) const override {
    static_cast<void>(cache.stats());
    static_cast<void>(cache.memory_efficiency());
  }
  void show(std::ostream& os) const override { os << "stats()"; }
};

// Weights: allocations (hits above all), appends, writes and frees often, so
// that prefixes are shared, written, cached and evicted.
using Commands = kvcache_state::CommandList<
    AllocateMiss, AllocateMiss, AllocateMiss, AllocateMiss, AllocateHit, AllocateHit, AllocateHit,
    AllocateHit, AllocateHit, AllocatePrefixNoMemory, Allocate, AllocateNoMemory, AllocateEvicting,
    AllocateEvicting, AllocateEvicting, AllocateEvicting, FillPool, AllocateDuplicate,
    AllocateBadPrefix, AllocateOverflow, Fork, Fork, ForkExistingChild, ForkUnknownParent, Append,
    Append, Append, Append, AppendNoPage, AppendNoPage, AppendAllLayers, AppendAllLayers,
    AppendAllLayersNoPage, WriteKv, WriteKv, WriteKv, WriteKv, WriteKv, WriteKvNoPage,
    WriteKvNoPage, Free, Free, Free, EvictPrefix, EvictUnknownPrefix, ClearPrefixCache, Stats>;

void prefix_property(Counts& counts, bool strict_all_layers) {
  PrefixModel initial;
  // Drawn as a number, so that a failure shows it (RapidCheck cannot print a ModelConfig).
  const auto layers = *rc::gen::inRange<std::uint32_t>(1, 3);
  initial.cfg = ModelConfig{layers, 1, 2, 1};
  initial.page_size = *rc::gen::inRange<std::uint64_t>(2, 5);
  initial.total = *rc::gen::inRange<std::uint64_t>(6, kMaxPages + 1);
  initial.strict_all_layers = strict_all_layers;
  PrefixSut sut(initial, counts);
  // Sequences three times as long as RapidCheck's size: a prefix needs a few
  // dozen commands to be registered, shared, written, cached and evicted.
  const auto commands =
      *rc::gen::scale(2.0, rc::state::gen::commands(initial, Commands::generator()));
  rc::state::runAll(commands, initial, sut);
}

TEST(PrefixSharingState, MatchesModel) {
  Counts counts;
  kvcache_state::drive(
      "PrefixSharingState/MatchesModel", [&counts] { prefix_property(counts, false); },
      counts.tally, kvcache_state::command_target(), Commands::kinds);
  if (!rc::detail::configuration().reproduce.empty()) return;
  std::cout << "Scenarios reached:\n";
  for (const std::string& s : kScenarios) {
    std::cout << "  " << counts.scenarios[s] << "\t" << s << "\n";
    EXPECT_GT(counts.scenarios[s], 0U) << "never reached: " << s;
  }
  for (const std::string& s : kRareScenarios) {
    std::cout << "  " << counts.scenarios[s] << "\t" << s << " (rare, not required)\n";
  }
}

// The rarest scenario, scripted (1 layer, page size 2, 3 pages): a request
// alone on a registered page it did not register writes it with no page free;
// the only cached pages belong to that page's prefix, which is evicted, and
// that makes the page writable in place (no copy). Plain GTest: no RapidCheck.
TEST(PrefixSharingState, EvictionMakesSharedPageWritable) {
  const ModelConfig cfg{1, 1, 2, 1};
  PagedKVCache cache(cfg, Bytes{3 * cfg.bytes_per_page(Tokens{2}).count()}, Tokens{2});
  ASSERT_TRUE(cache.allocate_paged("r", Tokens{3}, "h", Tokens{3}));  // pages A, B (partial)
  ASSERT_TRUE(cache.allocate_paged("x", Tokens{4}, "h", Tokens{3}));  // shares A, copies B
  const std::vector<std::uint32_t> before = page_indices(cache.block_table("x", 0));
  cache.free("r");  // B is cached; A is held by "x" and the registry
  ASSERT_EQ(cache.stats().free_pages, Pages{0});
  ASSERT_EQ(cache.stats().cached_pages, Pages{1});
  const Row key{1, 2};
  const Row value{3, 4};
  cache.write_kv("x", 0, Tokens{0}, as_span(key), as_span(value));
  EXPECT_FALSE(cache.has_prefix("h"));
  EXPECT_EQ(page_indices(cache.block_table("x", 0)), before);  // in place, no copy
  EXPECT_EQ(cache.stats().free_pages, Pages{1});
  EXPECT_EQ(cache.stats().cached_pages, Pages{0});
  EXPECT_EQ(cache.pool().ref_count(PageId{before[0]}), 1U);
  const auto [keys, values] = cache.get_kv("x", 0);
  ASSERT_EQ(keys.size(), 4U);
  Row got;
  append_row(got, keys[0]);
  append_row(got, values[0]);
  EXPECT_EQ(got, (Row{1, 2, 3, 4}));
  EXPECT_TRUE(cache.check_invariants());
}

// The machine without the workaround for the append_token_all_layers bug
// above. Fails on the current library; enable it when the bug is fixed (and
// drop PrefixModel::strict_all_layers). What RapidCheck found (2 layers, page size 3,
// 8 pages; RC_PARAMS="seed=1"):
//   allocate_paged("d", 5, "h3", 4) miss -> true
//   fork("d", "a") -> true
//   allocate_paged("e", 4, "h3", 4) hit -> true
//   free("d")
//   free("a")
//   append_token_all_layers("e") -> true
//   allocate_paged("c", 4, "h3", 4) hit -> true
//   fork("c", "a") -> true
//   append_token_paged("c", layer 0, [0, 0], [0, 0]) -> true
//   append_token_all_layers("a") -> true        (the library returns false)
// RC_PARAMS="reproduce=BICUyVmZph3UoFmcp52ZTRXY0V2LTRncpNGdBxGbMFWelJ3cbh8OshSn7hCgoIUZcTt6csyO3e_zx_qlRVCPRCaPd6JgACBATIFAAAQDgbwyDwqATHgdTVkP5czN3cD"
//   ./prefix_state_test --gtest_also_run_disabled_tests --gtest_filter='*StrictAllLayers'
// A shorter case by hand (2 layers, page size 2, 8 pages): "e" registers
// ("e", 1, "h1", 1), "a" (3 tokens) and "c" (1 token) hit "h1", "e" appends
// to layer 0; then append_token_all_layers("c") returns false with 1 free
// page, although append_token_paged("c", 0) and then ("c", 1) both succeed:
// layer 0's last page is held by "c" and the registry only, its copy takes
// the free page and leaves the old one cached, and layer 1's copy gets that
// page by evicting "h1".
TEST(PrefixSharingState, StrictAllLayers) {
  Counts counts;
  kvcache_state::drive(
      "PrefixSharingState/StrictAllLayers", [&counts] { prefix_property(counts, true); },
      counts.tally, kvcache_state::command_target(), Commands::kinds);
}

}  // namespace
