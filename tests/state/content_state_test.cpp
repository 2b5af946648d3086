// content_state_test.cpp: a RapidCheck state machine for automatic prefix
// caching by token content in kvcache::PagedKVCache (issue 8):
// allocate_paged(id, token ids, salt), append_token_ids, cached_tokens, KV
// events, eviction of content blocks, together with the named-prefix API,
// fork, copy-on-write and write_kv / get_kv, on one page pool.
//
// Model (Model). Pages are modelled by identity: every page has a model id
// (never reused) and, per slot, the id of the write_kv whose row it holds (0:
// a zero row). Every write_kv writes a row that no other write uses, so a
// read names the write it sees. A request is, per layer, a list of model page
// ids and a token count, plus (content-addressed) its salt, its token ids and
// the serial of the block its next full page names as parent. A content block
// is its serial, its parent's serial, salt, token ids (the whole prefix up to
// its end), the request that registered it and one page per layer; a named
// prefix is as in prefix_state_test.cpp. The registry's LRU is modelled as a
// list of entries (blocks and prefixes), exactly as the library keeps it: an
// entry joins the tail whenever one of its pages becomes held by the registry
// alone, leaves when none is, moves to the tail on a named-prefix hit, and
// evictions take it from the head. Rules (paged.cppm, prefix.cppm, issue 8):
//   - allocate_paged(id, prompt, salt): the lookup walks the prompt's full
//     pages from the first, each confirmed by (parent block, token ids,
//     salt), and stops at the first miss or after (prompt - 1) / page_size
//     pages; those blocks' pages are shared (one reference per layer), the
//     rest is fresh; all-or-nothing (the hit pages that were cached do not
//     count as evictable); each full prompt page past the hits becomes a
//     block unless an equal block exists (then the chain goes on through it);
//   - append_token_ids: appends to every layer (zero rows), copies a partial
//     last page the request may not write, keys each page that becomes full
//     the same way; all-or-nothing;
//   - a request writes a page in place only when it is its only request
//     holder and, if the page is a block's or a prefix's, it registered it;
//     otherwise the page is copied (the slots it uses), evicting LRU entries
//     first when no page is free (in place when that made it writable);
//   - free releases each layer's pages last first, layer 0 first: a freed
//     request's tail blocks join the LRU before its head blocks, so they are
//     evicted first;
//   - events: stored (key, parent key, first token, token ids, salt), removed
//     (evicted / cleared), all_cleared, with consecutive sequence numbers,
//     recorded only while recording is on.
// Keys are not modelled as numbers: a block's key is the chain of
// registry().block_key over its salt and prefix, computed by the harness (so
// with force_key_collisions_for_testing every key is one constant and lookups
// must tell blocks apart by content alone).
//
// After every command the whole observable state is compared with the model:
// stats() and every PrefixCounters field, every request's tokens, block
// tables (model pages bound to cache pages, as in prefix_state_test.cpp:
// sharing is checked exactly), get_kv of every layer (each row names the
// write it holds), cached_tokens, content_addressed, pages_held,
// pages_needed_to_append; every content block (found through
// registry().block_owner of every page) with its serial, parent, key, parent
// key, first token, token ids, salt, registrant, pages and cached count, and
// num_blocks; every named prefix; pending_events(); then, from the cache's own
// tables and registry: reference count == block-table entries + 1 if the
// registry holds the page, the free list is the pages nobody holds, free +
// used + cached == total; memory_efficiency; check_invariants(). Independent
// of the model: a content request's page owned by a block has that block's
// salt and token ids (no wrong content is ever shared, collisions forced or
// not), and a write_kv leaves every other request's rows as they were
// (isolation). DrainEvents compares the events, in order (the removed events
// of one clear_prefix_cache come in the registry's hash order: compared as a
// set, between their neighbours). Every failure path (out of pages,
// duplicate id, OutOfPages, logic_error) compares a full raw snapshot from
// before and after the call.
//
// Each test case draws 1 or 2 layers (4-byte rows), a page size of 1..4, a
// pool of 4..16 pages, whether every key collides (one case in three), and
// runs one command sequence over 5 request ids, 2 prefix hashes, token ids
// 0..2 and salts "", "a", "b", so that prompts share prefixes often. Prompts
// are drawn at random, or continue a cached block's or a live request's
// token ids. A scenario count printed after the run shows that hits,
// revivals of cached blocks, LRU evictions (tail before head), duplicates,
// collisions, salt misses and copies of block pages really happen.
//
// Volume: at least 10,000 commands per ctest run (state_util.hpp).
//   Scale up:   KVCACHE_STATE_SCALE=100 ./content_state_test
//   Reproduce:  RC_PARAMS="reproduce=..." ./content_state_test --gtest_filter='ContentCacheState.*'
//               with the string a failure prints on exit.
#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/state.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <iostream>
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

using kvcache::Bytes;
using kvcache::KvEvent;
using kvcache::KvEventKind;
using kvcache::KvRemovalReason;
using kvcache::ModelConfig;
using kvcache::OutOfPages;
using kvcache::PagedKVCache;
using kvcache::PagedStats;
using kvcache::PageId;
using kvcache::Pages;
using kvcache::PrefixCounters;
using kvcache::PrefixRegistry;
using kvcache::TokenId;
using kvcache::Tokens;
using kvcache_state::quoted;

using Ids = std::vector<TokenId>;
using Row = std::vector<std::uint8_t>;

const std::vector<std::string> kIds = {"a", "b", "c", "d", "e"};
const std::vector<std::string> kHashes = {"h1", "h2"};
const std::vector<std::string> kSalts = {"", "a", "b"};
constexpr TokenId kVocab = 3;                       // token ids 0 .. 2
constexpr std::uint64_t kPrefixUid = 1ULL << 60;    // entry uids: blocks by serial, prefixes above
constexpr std::uint32_t kRowBytes = 4;              // ModelConfig{layers, 1, 4, 1}

// The rows of write w (w > 0): three bytes of w and a tag; write 0 is zero.
Row key_row(std::uint32_t w) {
  if (w == 0) return Row(kRowBytes, 0);
  return {static_cast<std::uint8_t>(w & 0xFFU), static_cast<std::uint8_t>((w >> 8U) & 0xFFU),
          static_cast<std::uint8_t>((w >> 16U) & 0xFFU), 0x4B};
}
Row value_row(std::uint32_t w) {
  Row r = key_row(w);
  if (w != 0) r[3] = 0x56;
  return r;
}

std::string show_ids(const Ids& ids) {
  std::string s = "[";
  for (std::size_t i = 0; i < ids.size(); ++i) s += (i == 0 ? "" : ",") + std::to_string(ids[i]);
  return s + "]";
}

struct MRequest {
  std::uint64_t serial = 0;
  std::vector<std::vector<std::uint32_t>> pages;  // per layer, model page ids
  std::vector<std::uint64_t> tokens;              // per layer
  std::uint64_t cached_tokens = 0;
  bool content = false;
  std::string salt;
  std::uint64_t last_serial = 0;  // the block the next full page names as parent
  Ids ids;                        // content: every token id (prompt and appended)
};

struct MBlock {
  std::uint64_t serial = 0;
  std::uint64_t parent_serial = 0;
  std::uint64_t first_token = 0;
  std::uint64_t registrant = 0;
  std::string salt;
  Ids prefix;                        // token ids [0, first_token + page_size)
  std::vector<std::uint32_t> pages;  // per layer (empty while being prepared)
};

struct MPrefix {
  std::uint64_t uid = 0;
  std::uint64_t tokens = 0;
  std::uint64_t ppl = 0;  // pages per layer
  std::uint64_t registrant = 0;
  std::vector<std::uint32_t> pages;  // layer-major
};

struct MEvent {
  KvEventKind kind = KvEventKind::stored;
  std::string salt;
  Ids prefix;  // stored / removed: the block's whole prefix
  std::uint64_t first_token = 0;
  KvRemovalReason reason = KvRemovalReason::evicted;
  std::uint64_t seq = 0;
};

// What an allocate_paged with token ids finds.
struct Plan {
  std::vector<std::uint64_t> hits;  // block serials, in prompt order
  std::uint64_t need = 0;           // pages to take
  std::uint64_t hit_cached = 0;     // of the hits' pages, those only the registry holds
  bool fits = false;
};

struct Model {
  std::uint32_t layers = 1;
  std::uint64_t page_size = 1;
  std::uint64_t total = 0;
  bool collide = false;
  bool recording = true;
  // Per model page: write ids of its slots (page_size each), request holders,
  // owning entry uid (0: none), live.
  std::vector<std::uint32_t> wid;
  std::vector<std::uint32_t> holders;
  std::vector<std::uint64_t> owner;
  std::vector<std::uint8_t> live;
  std::uint64_t live_pages = 0;
  std::uint32_t next_page = 0;
  std::map<std::string, MRequest> requests;
  std::map<std::uint64_t, MBlock> blocks;  // by serial
  std::map<std::string, MPrefix> prefixes;
  std::vector<std::uint64_t> lru;  // entry uids, least recently used first
  std::uint64_t next_serial = 1;
  std::uint64_t next_block_serial = 1;
  std::uint64_t next_prefix_uid = kPrefixUid + 1;
  std::uint64_t next_seq = 1;
  std::uint32_t next_write = 1;
  PrefixCounters counters;
  std::vector<MEvent> pending;
  std::vector<std::uint64_t> evicted_now;  // block serials evicted by the last command, in order

  // ---- queries -------------------------------------------------------------
  [[nodiscard]] std::uint64_t pages_for(std::uint64_t t) const {
    return t / page_size + (t % page_size != 0 ? 1U : 0U);
  }
  [[nodiscard]] bool has(const std::string& id) const { return requests.count(id) != 0; }
  [[nodiscard]] std::uint64_t free() const { return total - live_pages; }
  [[nodiscard]] std::uint64_t cached() const {
    std::uint64_t n = 0;
    for (std::uint32_t p = 0; p < next_page; ++p) n += live[p] && owner[p] != 0 && holders[p] == 0;
    return n;
  }
  [[nodiscard]] const std::vector<std::uint32_t>& entry_pages(std::uint64_t uid) const {
    if (uid < kPrefixUid) return blocks.at(uid).pages;
    for (const auto& [h, p] : prefixes) {
      if (p.uid == uid) return p.pages;
    }
    throw std::logic_error("model: no entry");
  }
  [[nodiscard]] std::uint64_t registrant(std::uint64_t uid) const {
    if (uid < kPrefixUid) return blocks.at(uid).registrant;
    for (const auto& [h, p] : prefixes) {
      if (p.uid == uid) return p.registrant;
    }
    throw std::logic_error("model: no entry");
  }
  [[nodiscard]] std::uint64_t cached_of(std::uint64_t uid) const {
    std::uint64_t n = 0;
    for (const std::uint32_t p : entry_pages(uid)) n += holders[p] == 0 ? 1U : 0U;
    return n;
  }
  [[nodiscard]] bool writable(std::uint32_t p, std::uint64_t serial) const {
    return holders[p] == 1 && (owner[p] == 0 || registrant(owner[p]) == serial);
  }
  [[nodiscard]] std::uint64_t slots_used(std::uint64_t tokens, std::size_t index) const {
    return std::min(page_size, tokens - (std::uint64_t{index} * page_size));
  }
  [[nodiscard]] std::uint32_t slot(std::uint32_t p, std::uint64_t s) const {
    return wid[static_cast<std::size_t>((p * page_size) + s)];
  }
  // The write id request `id` reads at token t of `layer`.
  [[nodiscard]] std::uint32_t read(const MRequest& r, std::size_t layer, std::uint64_t t) const {
    return slot(r.pages[layer][static_cast<std::size_t>(t / page_size)], t % page_size);
  }
  [[nodiscard]] const MBlock* find_block(std::uint64_t parent, std::span<const TokenId> page,
                                         const std::string& salt) const {
    for (const auto& [serial, b] : blocks) {
      if (b.parent_serial == parent && b.salt == salt &&
          std::equal(b.prefix.end() - static_cast<std::ptrdiff_t>(page_size), b.prefix.end(),
                     page.begin(), page.end())) {
        return &b;
      }
    }
    return nullptr;
  }
  [[nodiscard]] Plan plan(const Ids& prompt, const std::string& salt) const {
    Plan out;
    const std::size_t ps = page_size;
    const std::size_t max_hit = prompt.empty() ? 0 : (prompt.size() - 1) / ps;
    std::uint64_t parent = 0;
    for (std::size_t i = 0; i < max_hit; ++i) {
      const MBlock* b = find_block(parent, std::span(prompt).subspan(i * ps, ps), salt);
      if (b == nullptr) break;
      out.hits.push_back(b->serial);
      out.hit_cached += cached_of(b->serial);
      parent = b->serial;
    }
    out.need = layers * (pages_for(prompt.size()) - out.hits.size());
    out.fits = out.need <= free() + cached() - out.hit_cached;
    return out;
  }
  [[nodiscard]] bool can_append(const MRequest& r, std::uint64_t k) const {
    const std::uint64_t t = r.tokens.front();
    const std::uint64_t fresh = pages_for(t + k) - pages_for(t);
    std::uint64_t copies = 0;
    if (t % page_size != 0) {
      for (const auto& l : r.pages) copies += writable(l.back(), r.serial) ? 0U : 1U;
    }
    return layers * fresh + copies <= free() + cached();
  }
  [[nodiscard]] bool can_write(const MRequest& r, std::size_t layer, std::uint64_t position) const {
    return writable(r.pages[layer][static_cast<std::size_t>(position / page_size)], r.serial) ||
           free() + cached() > 0;
  }
  // pages_needed_to_append (paged.cppm).
  [[nodiscard]] std::uint64_t step_need(const MRequest& r) const {
    std::uint64_t n = 0;
    bool swaps = false;
    for (std::size_t l = 0; l < layers; ++l) {
      if (r.tokens[l] % page_size == 0) {
        ++n;
        continue;
      }
      const std::uint32_t last = r.pages[l].back();
      if (writable(last, r.serial)) continue;
      if (holders[last] == 1) {
        swaps = true;
      } else {
        ++n;
      }
    }
    return std::max<std::uint64_t>(n, swaps ? 1U : 0U);
  }
  [[nodiscard]] std::uint64_t stored() const {
    std::uint64_t n = 0;
    for (const auto& [id, r] : requests) {
      for (const std::uint64_t t : r.tokens) n += t;
    }
    return n;
  }
  [[nodiscard]] std::uint64_t used() const {
    std::uint64_t n = 0;
    for (std::uint32_t p = 0; p < next_page; ++p) n += live[p] && holders[p] != 0;
    return n;
  }
  [[nodiscard]] double efficiency() const {
    std::vector<std::uint64_t> best(next_page, 0);
    for (const auto& [id, r] : requests) {
      for (std::size_t l = 0; l < layers; ++l) {
        for (std::size_t i = 0; i < r.pages[l].size(); ++i) {
          best[r.pages[l][i]] = std::max(best[r.pages[l][i]], slots_used(r.tokens[l], i));
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
  [[nodiscard]] std::vector<std::string> ids_where(bool live_id, int content) const {
    std::vector<std::string> out;
    for (const std::string& id : kIds) {
      const auto it = requests.find(id);
      if ((it != requests.end()) != live_id) continue;
      if (live_id && content >= 0 && it->second.content != (content == 1)) continue;
      out.push_back(id);
    }
    return out;
  }

  // ---- pages and the LRU (prefix.cpp's rules) -------------------------------
  void lru_remove(std::uint64_t uid) {
    lru.erase(std::remove(lru.begin(), lru.end(), uid), lru.end());
  }
  void lru_to_tail(std::uint64_t uid) {
    lru_remove(uid);
    lru.push_back(uid);
  }
  [[nodiscard]] bool on_lru(std::uint64_t uid) const {
    return std::find(lru.begin(), lru.end(), uid) != lru.end();
  }
  // A fresh page held by one request.
  std::uint32_t take() {
    if (free() == 0) throw std::logic_error("model: no free page");
    const std::uint32_t p = next_page++;
    wid.resize(wid.size() + page_size, 0);
    holders.push_back(1);
    owner.push_back(0);
    live.push_back(1);
    ++live_pages;
    return p;
  }
  void retain(std::uint32_t p) {
    ++holders[p];
    if (owner[p] != 0 && holders[p] == 1 && cached_of(owner[p]) == 0) lru_remove(owner[p]);
  }
  void release(std::uint32_t p) {
    if (--holders[p] != 0) return;
    if (owner[p] != 0) {
      lru_to_tail(owner[p]);  // a page newly held by the registry alone
    } else {
      live[p] = 0;
      --live_pages;
    }
  }
  void record(MEvent e) {
    if (!recording) return;
    e.seq = next_seq++;
    pending.push_back(std::move(e));
  }
  void evict(std::uint64_t uid, KvRemovalReason why) {
    lru_remove(uid);
    std::vector<std::uint32_t> pages = entry_pages(uid);
    std::uint64_t freed = 0;
    for (auto it = pages.rbegin(); it != pages.rend(); ++it) {
      owner[*it] = 0;
      if (holders[*it] == 0) {
        live[*it] = 0;
        --live_pages;
        ++freed;
      }
    }
    counters.pages_evicted += freed;
    if (uid >= kPrefixUid) {
      ++counters.prefixes_evicted;
      for (auto it = prefixes.begin(); it != prefixes.end(); ++it) {
        if (it->second.uid == uid) {
          prefixes.erase(it);
          break;
        }
      }
      return;
    }
    ++counters.blocks_evicted;
    const MBlock& b = blocks.at(uid);
    record(MEvent{KvEventKind::removed, b.salt, b.prefix, 0, why, 0});
    evicted_now.push_back(uid);
    blocks.erase(uid);
  }
  void evict_lru() {
    if (lru.empty()) throw std::logic_error("model: nothing to evict");
    evict(lru.front(), KvRemovalReason::evicted);
  }
  void make_room(std::uint64_t n, std::uint64_t keep) {
    const std::vector<std::uint64_t> order = lru;
    std::size_t i = 0;
    while (free() < n) {
      if (i == order.size()) throw std::logic_error("model: make_room ran out");
      const std::uint64_t uid = order[i++];
      if (uid != keep) evict(uid, KvRemovalReason::evicted);
    }
  }
  std::uint32_t copy(std::uint32_t from, std::uint64_t slots) {
    const std::uint32_t p = take();
    for (std::uint64_t s = 0; s < slots; ++s) {
      wid[static_cast<std::size_t>((p * page_size) + s)] = slot(from, s);
    }
    ++counters.cow_copies;
    return p;
  }
  bool make_writable(MRequest& r, std::size_t layer, std::size_t index) {
    const std::uint32_t old = r.pages[layer][index];
    if (writable(old, r.serial)) return true;
    if (free() == 0) {
      if (cached() == 0) return false;
      while (free() == 0) {
        evict_lru();
        if (writable(old, r.serial)) return true;
      }
    }
    r.pages[layer][index] = copy(old, slots_used(r.tokens[layer], index));
    release(old);
    return true;
  }

  // ---- content blocks ------------------------------------------------------------
  // prepare_blocks: the pages that `ids` (all of the request's token ids,
  // the first `from` already keyed) fill get blocks (no pages yet) or chain
  // onto an equal block. Returns the new blocks' serials (0: an equal one).
  std::vector<std::uint64_t> prepare_blocks(std::uint64_t& last_serial, const Ids& ids,
                                            std::uint64_t from, const std::string& salt,
                                            std::uint64_t registrant) {
    std::vector<std::uint64_t> out;
    for (std::uint64_t end = (from / page_size + 1) * page_size; end <= ids.size();
         end += page_size) {
      const auto page = std::span(ids).subspan(static_cast<std::size_t>(end - page_size),
                                               static_cast<std::size_t>(page_size));
      if (const MBlock* same = find_block(last_serial, page, salt)) {
        out.push_back(0);
        last_serial = same->serial;
        continue;
      }
      MBlock b;
      b.serial = next_block_serial++;
      b.parent_serial = last_serial;
      b.first_token = end - page_size;
      b.registrant = registrant;
      b.salt = salt;
      b.prefix.assign(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(end));
      last_serial = b.serial;
      out.push_back(b.serial);
      blocks[b.serial] = std::move(b);
    }
    return out;
  }
  void store_blocks(const MRequest& r, const std::vector<std::uint64_t>& fresh) {
    for (const std::uint64_t s : fresh) {
      if (s == 0) {
        ++counters.blocks_duplicate;
        continue;
      }
      MBlock& b = blocks.at(s);
      const auto index = static_cast<std::size_t>(b.first_token / page_size);
      for (std::size_t l = 0; l < layers; ++l) {
        const std::uint32_t p = r.pages[l][index];
        owner[p] = s;
        b.pages.push_back(p);
      }
      ++counters.blocks_stored;
      record(MEvent{KvEventKind::stored, b.salt, b.prefix, b.first_token,
                    KvRemovalReason::evicted, 0});
    }
  }
  MRequest& add_request(const std::string& id, std::uint64_t tokens) {
    MRequest& r = requests[id];
    r.serial = next_serial++;
    r.pages.assign(layers, {});
    r.tokens.assign(layers, tokens);
    return r;
  }

  // ---- transitions; each returns false, changing nothing, when it cannot --------
  bool allocate_content(const std::string& id, const Ids& prompt, const std::string& salt) {
    const Plan pl = plan(prompt, salt);
    if (has(id) || !pl.fits) return false;
    const std::uint64_t matched = pl.hits.size();
    std::uint64_t last = pl.hits.empty() ? 0 : pl.hits.back();
    const std::uint64_t serial = next_serial;
    const std::vector<std::uint64_t> fresh =
        prepare_blocks(last, prompt, matched * page_size, salt, serial);
    MRequest& r = add_request(id, prompt.size());
    r.content = true;
    r.salt = salt;
    r.ids = prompt;
    r.last_serial = last;
    r.cached_tokens = matched * page_size;
    for (std::size_t l = 0; l < layers; ++l) {
      for (const std::uint64_t s : pl.hits) {
        const std::uint32_t p = blocks.at(s).pages[l];
        r.pages[l].push_back(p);
        retain(p);
      }
    }
    make_room(pl.need, 0);
    for (std::size_t l = 0; l < layers; ++l) {
      while (r.pages[l].size() < pages_for(prompt.size())) r.pages[l].push_back(take());
    }
    store_blocks(r, fresh);
    counters.content_prompt_tokens += prompt.size();
    counters.content_hit_tokens += matched * page_size;
    counters.pages_saved += layers * matched;
    counters.tokens_saved += layers * matched * page_size;
    return true;
  }
  bool append_ids(const std::string& id, const Ids& add) {
    MRequest& r = requests.at(id);
    if (add.empty()) return true;
    if (!can_append(r, add.size())) return false;
    const std::uint64_t t = r.tokens.front();
    const std::uint64_t fresh = pages_for(t + add.size()) - pages_for(t);
    Ids all = r.ids;
    all.insert(all.end(), add.begin(), add.end());
    std::uint64_t last = r.last_serial;
    const std::vector<std::uint64_t> made = prepare_blocks(last, all, t, r.salt, r.serial);
    const std::uint64_t first_slot = t % page_size;
    const std::uint64_t end_slot = std::min(page_size, first_slot + add.size());
    for (std::size_t l = 0; l < layers; ++l) {
      if (first_slot != 0) {
        if (!make_writable(r, l, r.pages[l].size() - 1)) throw std::logic_error("model: append");
        const std::uint32_t p = r.pages[l].back();
        for (std::uint64_t s = first_slot; s < end_slot; ++s) {
          wid[static_cast<std::size_t>((p * page_size) + s)] = 0;
        }
      }
      for (std::uint64_t k = 0; k < fresh; ++k) {
        if (free() == 0) evict_lru();
        r.pages[l].push_back(take());
      }
      r.tokens[l] = t + add.size();
    }
    store_blocks(r, made);
    r.ids = std::move(all);
    r.last_serial = last;
    return true;
  }
  bool write(const std::string& id, std::size_t layer, std::uint64_t position, std::uint32_t w) {
    MRequest& r = requests.at(id);
    const auto index = static_cast<std::size_t>(position / page_size);
    if (!make_writable(r, layer, index)) return false;
    wid[static_cast<std::size_t>((r.pages[layer][index] * page_size) + (position % page_size))] = w;
    next_write = std::max(next_write, w + 1);
    return true;
  }
  // Named prefixes (prefix_state_test.cpp's rules).
  [[nodiscard]] std::uint64_t named_need(std::uint64_t prompt, const std::string& hash) const {
    const auto it = prefixes.find(hash);
    if (it == prefixes.end()) return layers * pages_for(prompt);
    const std::uint64_t prefix = it->second.tokens;
    const bool copy_partial = prefix % page_size != 0 && prompt > prefix;
    const std::uint64_t shared = pages_for(prefix) - (copy_partial ? 1U : 0U);
    return layers * (pages_for(prompt) - shared);
  }
  [[nodiscard]] bool can_named(std::uint64_t prompt, const std::string& hash) const {
    const auto it = prefixes.find(hash);
    const std::uint64_t keep = it == prefixes.end() ? 0 : cached_of(it->second.uid);
    return named_need(prompt, hash) <= free() + cached() - keep;
  }
  bool allocate_named(const std::string& id, std::uint64_t prompt, const std::string& hash,
                      std::uint64_t prefix) {
    if (has(id) || !can_named(prompt, hash)) return false;
    const std::uint64_t per_layer = pages_for(prompt);
    const std::uint64_t ppl = pages_for(prefix);
    const auto it = prefixes.find(hash);
    if (it == prefixes.end()) {
      MPrefix pre;
      pre.uid = next_prefix_uid++;
      pre.tokens = prefix;
      pre.ppl = ppl;
      make_room(layers * per_layer, pre.uid);
      MRequest& r = add_request(id, prompt);
      pre.registrant = r.serial;
      for (std::size_t l = 0; l < layers; ++l) {
        for (std::uint64_t k = 0; k < per_layer; ++k) r.pages[l].push_back(take());
        for (std::uint64_t k = 0; k < ppl; ++k) {
          owner[r.pages[l][k]] = pre.uid;
          pre.pages.push_back(r.pages[l][k]);
        }
      }
      prefixes[hash] = pre;
      ++counters.misses;
      return true;
    }
    const MPrefix pre = it->second;
    const std::uint64_t rem = prefix % page_size;
    const bool copy_partial = rem != 0 && prompt > prefix;
    const std::uint64_t shared = ppl - (copy_partial ? 1U : 0U);
    make_room(named_need(prompt, hash), pre.uid);
    MRequest& r = add_request(id, prompt);
    for (std::size_t l = 0; l < layers; ++l) {
      for (std::uint64_t k = 0; k < shared; ++k) {
        const std::uint32_t p = pre.pages[(l * ppl) + k];
        r.pages[l].push_back(p);
        retain(p);
      }
      if (copy_partial) r.pages[l].push_back(copy(pre.pages[(l * ppl) + ppl - 1], rem));
      while (r.pages[l].size() < per_layer) r.pages[l].push_back(take());
    }
    r.cached_tokens = prefix;
    if (on_lru(pre.uid)) lru_to_tail(pre.uid);
    ++counters.hits;
    counters.pages_saved += layers * shared;
    counters.tokens_saved +=
        layers * (shared * page_size - (rem != 0 && !copy_partial ? page_size - rem : 0U));
    return true;
  }
  void fork(const std::string& parent, const std::string& child) {
    const MRequest p = requests.at(parent);
    MRequest& c = requests[child];
    c = p;
    c.serial = next_serial++;
    for (const auto& l : c.pages) {
      for (const std::uint32_t page : l) retain(page);
    }
  }
  void free_request(const std::string& id) {
    const MRequest r = requests.at(id);
    requests.erase(id);
    for (const auto& l : r.pages) {  // layer 0 first, each layer's last page first
      for (auto it = l.rbegin(); it != l.rend(); ++it) release(*it);
    }
  }
  std::size_t clear() {
    const std::size_t n = prefixes.size() + blocks.size();
    while (!prefixes.empty()) evict(prefixes.begin()->second.uid, KvRemovalReason::cleared);
    while (!blocks.empty()) evict(blocks.begin()->first, KvRemovalReason::cleared);
    record(MEvent{KvEventKind::all_cleared, {}, {}, 0, KvRemovalReason::evicted, 0});
    return n;
  }
};

// ---- scenarios -----------------------------------------------------------------

const std::vector<std::string> kScenarios = {
    "a content allocation shared cached blocks",
    "a hit revived blocks that no request held",
    "a hit read rows written into a block",
    "an allocation evicted blocks",
    "an append evicted blocks",
    "an eviction took a request's tail block before its head",
    "append_token_ids chained onto an equal block",
    "a write_kv copied a block page",
    "a registrant wrote its block page in place",
    "a lookup with every key colliding passed over other content",
    "a salt kept a prompt from matching a cached block",
    "an append copied a forked partial page",
};

struct Counts {
  kvcache_state::Tally tally;
  std::map<std::string, std::uint64_t> scenarios;
  void note(const std::string& s) {
    RC_ASSERT(std::find(kScenarios.begin(), kScenarios.end(), s) != kScenarios.end());
    ++scenarios[s];
  }
};

struct Sut {
  Sut(const Model& m, Counts& c)
      : cache(ModelConfig{m.layers, 1, kRowBytes, 1},
              Bytes{m.total * ModelConfig{m.layers, 1, kRowBytes, 1}
                                  .bytes_per_page(Tokens{m.page_size})
                                  .count()},
              Tokens{m.page_size}),
        counts(c) {
    cache.force_key_collisions_for_testing(m.collide);
  }
  PagedKVCache cache;
  Counts& counts;
  std::vector<std::uint32_t> bind;  // model page id -> cache page index
};

std::span<const std::byte> as_span(const Row& r) { return std::as_bytes(std::span(r)); }
Row to_row(std::span<const std::byte> s) {
  Row out;
  for (const std::byte b : s) out.push_back(static_cast<std::uint8_t>(b));
  return out;
}

// The key of the block ending a chain of `prefix` (whole pages) under `salt`.
std::uint64_t key_of(const PagedKVCache& cache, const std::string& salt, const Ids& prefix,
                     std::size_t end) {
  const auto ps = static_cast<std::size_t>(cache.page_size().count());
  std::optional<std::uint64_t> key;
  for (std::size_t at = 0; at + ps <= end; at += ps) {
    key = cache.registry().block_key(key, salt, std::span(prefix).subspan(at, ps));
  }
  if (!key) throw std::logic_error("key_of: no page");
  return *key;
}

KvEvent expected_event(const PagedKVCache& cache, const MEvent& e) {
  KvEvent out;
  out.seq = e.seq;
  out.kind = e.kind;
  if (e.kind == KvEventKind::all_cleared) return out;
  out.key = key_of(cache, e.salt, e.prefix, e.prefix.size());
  if (e.kind == KvEventKind::removed) {
    out.reason = e.reason;
    return out;
  }
  if (e.first_token != 0) {
    out.parent_key = key_of(cache, e.salt, e.prefix, static_cast<std::size_t>(e.first_token));
  }
  out.first_token = e.first_token;
  out.token_ids.assign(e.prefix.begin() + static_cast<std::ptrdiff_t>(e.first_token),
                       e.prefix.end());
  out.salt = e.salt;
  return out;
}

// The removed events of one clear_prefix_cache come in hash-map order: sort
// each run of removed/cleared events by key (seq numbers stay in place).
std::vector<KvEvent> normalised(std::vector<KvEvent> es) {
  std::size_t i = 0;
  while (i < es.size()) {
    std::size_t j = i;
    while (j < es.size() && es[j].kind == KvEventKind::removed &&
           es[j].reason == KvRemovalReason::cleared) {
      ++j;
    }
    if (j > i) {
      std::vector<std::uint64_t> keys;
      for (std::size_t k = i; k < j; ++k) keys.push_back(es[k].key);
      std::sort(keys.begin(), keys.end());
      for (std::size_t k = i; k < j; ++k) es[k].key = keys[k - i];
      i = j;
    } else {
      ++i;
    }
  }
  return es;
}

constexpr std::uint32_t kUnbound = 0xFFFF'FFFF;
struct Binder {
  const std::vector<std::uint32_t>& before;
  std::vector<std::uint32_t> now;
  std::vector<std::uint32_t> reverse;
  Binder(const std::vector<std::uint32_t>& last, std::uint32_t model_ids, std::uint64_t total)
      : before(last), now(model_ids, kUnbound), reverse(static_cast<std::size_t>(total), kUnbound) {}
  void pair(std::uint32_t model, std::uint32_t page) {
    RC_ASSERT(model < now.size());
    RC_ASSERT(page < reverse.size());
    if (model < before.size() && before[model] != kUnbound) RC_ASSERT(before[model] == page);
    if (now[model] == kUnbound) now[model] = page;
    RC_ASSERT(now[model] == page);
    if (reverse[page] == kUnbound) reverse[page] = model;
    RC_ASSERT(reverse[page] == model);
  }
};

void assert_matches(const Model& m, Sut& sut) {
  const PagedKVCache& cache = sut.cache;
  const PagedStats s = cache.stats();
  const std::uint64_t used = m.used();
  RC_ASSERT(s.total_pages == Pages{m.total});
  RC_ASSERT(s.free_pages == Pages{m.free()});
  RC_ASSERT(s.used_pages == Pages{used});
  RC_ASSERT(s.cached_pages == Pages{m.cached()});
  RC_ASSERT(s.num_requests == m.requests.size());
  RC_ASSERT(s.stored_tokens == Tokens{m.stored()});
  RC_ASSERT(s.registered_prefixes == m.prefixes.size());
  RC_ASSERT(s.prefix_hits == m.counters.hits);
  RC_ASSERT(s.prefix_misses == m.counters.misses);
  RC_ASSERT(s.prefix == m.counters);
  for (const std::string& id : kIds) RC_ASSERT(cache.contains(id) == m.has(id));

  const auto ps = static_cast<std::size_t>(m.page_size);
  const auto n = static_cast<std::size_t>(m.total);
  Binder binder(sut.bind, m.next_page, m.total);
  std::vector<std::uint64_t> table_refs(n, 0);
  std::vector<std::uint64_t> registry_refs(n, 0);
  for (const auto& [id, r] : m.requests) {
    RC_ASSERT(cache.content_addressed(id) == r.content);
    RC_ASSERT(cache.cached_tokens(id) == Tokens{r.cached_tokens});
    std::uint64_t held = 0;
    for (std::size_t l = 0; l < m.layers; ++l) {
      RC_ASSERT(cache.tokens(id, l) == Tokens{r.tokens[l]});
      const std::span<const PageId> table = cache.block_table(id, l);
      RC_ASSERT(table.size() == r.pages[l].size());
      for (std::size_t i = 0; i < table.size(); ++i) {
        binder.pair(r.pages[l][i], table[i].index());
        ++table_refs[table[i].index()];
        // Never wrong content, independent of the model: a block page in a
        // content request's table holds this request's token ids and salt.
        if (const PrefixRegistry::Block* b = cache.registry().block_owner(table[i]);
            b != nullptr && r.content) {
          RC_ASSERT(b->first_token == i * ps);
          RC_ASSERT(b->salt == r.salt);
          RC_ASSERT(r.ids.size() >= (i + 1) * ps);
          RC_ASSERT(std::equal(b->tokens.begin(), b->tokens.end(),
                               r.ids.begin() + static_cast<std::ptrdiff_t>(i * ps),
                               r.ids.begin() + static_cast<std::ptrdiff_t>((i + 1) * ps)));
        }
      }
      held += table.size();
      const auto [keys, values] = cache.get_kv(id, l);
      RC_ASSERT(keys.size() == r.tokens[l]);
      RC_ASSERT(values.size() == r.tokens[l]);
      for (std::size_t t = 0; t < keys.size(); ++t) {
        const std::uint32_t w = m.read(r, l, t);
        const Row k = to_row(keys[t]);
        const Row v = to_row(values[t]);
        if (k != key_row(w) || v != value_row(w)) {
          RC_FAIL("get_kv(" + kvcache_state::quoted(id) + ", " + std::to_string(l) + ") token " +
                  std::to_string(t) + ": expected write " + std::to_string(w) + ", read " +
                  rc::toString(k) + " " + rc::toString(v));
        }
      }
    }
    RC_ASSERT(cache.pages_held(id) == Pages{held});
    RC_ASSERT(cache.pages_needed_to_append(id) == Pages{m.step_need(r)});
  }
  // Content blocks, found through the pages that hold them.
  std::map<std::uint64_t, const PrefixRegistry::Block*> lib_blocks;
  for (std::uint32_t i = 0; i < n; ++i) {
    const PrefixRegistry::Block* b = cache.registry().block_owner(PageId{i});
    const PrefixRegistry::Prefix* p = cache.registry().owner(PageId{i});
    RC_ASSERT(b == nullptr || p == nullptr);
    if (b != nullptr) lib_blocks[b->serial] = b;
  }
  RC_ASSERT(lib_blocks.size() == m.blocks.size());
  RC_ASSERT(cache.registry().num_blocks() == m.blocks.size());
  for (const auto& [serial, mb] : m.blocks) {
    const auto it = lib_blocks.find(serial);
    RC_ASSERT(it != lib_blocks.end());
    const PrefixRegistry::Block& b = *it->second;
    RC_ASSERT(b.parent_serial == mb.parent_serial);
    RC_ASSERT(b.first_token == mb.first_token);
    RC_ASSERT(b.salt == mb.salt);
    RC_ASSERT(b.registrant == mb.registrant);
    RC_ASSERT(std::equal(b.tokens.begin(), b.tokens.end(),
                         mb.prefix.begin() + static_cast<std::ptrdiff_t>(mb.first_token),
                         mb.prefix.end()));
    RC_ASSERT(b.key == key_of(cache, mb.salt, mb.prefix, mb.prefix.size()));
    if (mb.first_token == 0) {
      RC_ASSERT(!b.parent_key.has_value());
    } else {
      RC_ASSERT(b.parent_key ==
                std::optional(key_of(cache, mb.salt, mb.prefix,
                                     static_cast<std::size_t>(mb.first_token))));
    }
    RC_ASSERT(b.pages.size() == mb.pages.size());
    RC_ASSERT(mb.pages.size() == m.layers);
    for (std::size_t l = 0; l < mb.pages.size(); ++l) {
      binder.pair(mb.pages[l], b.pages[l].index());
      ++registry_refs[b.pages[l].index()];
    }
    RC_ASSERT(b.cached == m.cached_of(serial));
  }
  for (const std::string& hash : kHashes) {
    const auto mit = m.prefixes.find(hash);
    RC_ASSERT(cache.has_prefix(hash) == (mit != m.prefixes.end()));
    const PrefixRegistry::Prefix* p = cache.registry().find(hash);
    if (p == nullptr) continue;
    const MPrefix& mp = mit->second;
    RC_ASSERT(p->tokens == Tokens{mp.tokens});
    RC_ASSERT(p->pages_per_layer == mp.ppl);
    RC_ASSERT(p->registrant == mp.registrant);
    RC_ASSERT(p->pages.size() == mp.pages.size());
    for (std::size_t k = 0; k < mp.pages.size(); ++k) {
      binder.pair(mp.pages[k], p->pages[k].index());
      ++registry_refs[p->pages[k].index()];
    }
  }
  std::size_t bound = 0;
  for (const std::uint32_t p : binder.now) bound += p != kUnbound ? 1U : 0U;
  RC_ASSERT(bound == m.live_pages);
  sut.bind = std::move(binder.now);

  // From the cache's own tables and registry only.
  std::uint64_t in_tables = 0;
  std::uint64_t cached = 0;
  std::uint64_t nobody = 0;
  for (std::uint32_t i = 0; i < n; ++i) {
    RC_ASSERT(registry_refs[i] <= 1U);
    RC_ASSERT((registry_refs[i] == 1) == (cache.registry().block_owner(PageId{i}) != nullptr ||
                                          cache.registry().owner(PageId{i}) != nullptr));
    RC_ASSERT(cache.pool().ref_count(PageId{i}) == table_refs[i] + registry_refs[i]);
    in_tables += table_refs[i] != 0 ? 1U : 0U;
    cached += table_refs[i] == 0 && registry_refs[i] != 0 ? 1U : 0U;
    nobody += table_refs[i] + registry_refs[i] == 0 ? 1U : 0U;
  }
  std::vector<bool> on_free_list(n, false);
  for (const PageId p : cache.pool().free_list()) {
    RC_ASSERT(p.index() < n);
    RC_ASSERT(table_refs[p.index()] + registry_refs[p.index()] == 0U);
    RC_ASSERT(!on_free_list[p.index()]);
    on_free_list[p.index()] = true;
  }
  RC_ASSERT(s.free_pages == Pages{nobody});
  RC_ASSERT(s.used_pages == Pages{in_tables});
  RC_ASSERT(s.cached_pages == Pages{cached});
  RC_ASSERT(s.free_pages + s.used_pages + s.cached_pages == s.total_pages);
  RC_ASSERT(cache.registry().pending_events() == m.pending.size());
  RC_ASSERT(std::abs(cache.memory_efficiency() - m.efficiency()) <= 1e-12);
  RC_ASSERT(cache.check_invariants());
}

// Everything observable, raw, for "nothing changed".
struct Snapshot {
  PagedStats stats;
  std::vector<std::string> ids;
  std::vector<std::vector<std::uint32_t>> tables;
  std::vector<std::uint64_t> per_request;  // tokens, cached_tokens
  Row rows;
  std::vector<std::vector<std::uint32_t>> registry;  // per page: owner kind + serial
  std::vector<std::uint32_t> free_list;
  std::vector<std::uint32_t> refs;
  std::size_t pending = 0;
  std::size_t blocks = 0;
  double efficiency = 0;

  explicit Snapshot(const PagedKVCache& cache)
      : stats(cache.stats()),
        pending(cache.registry().pending_events()),
        blocks(cache.registry().num_blocks()),
        efficiency(cache.memory_efficiency()) {
    ids = cache.request_ids();
    std::sort(ids.begin(), ids.end());
    for (const std::string& id : ids) {
      per_request.push_back(cache.cached_tokens(id).count());
      for (std::size_t l = 0; l < cache.config().num_layers; ++l) {
        std::vector<std::uint32_t> t;
        for (const PageId p : cache.block_table(id, l)) t.push_back(p.index());
        tables.push_back(t);
        per_request.push_back(cache.tokens(id, l).count());
        const auto [keys, values] = cache.get_kv(id, l);
        for (const auto k : keys) {
          const Row r = to_row(k);
          rows.insert(rows.end(), r.begin(), r.end());
        }
        for (const auto v : values) {
          const Row r = to_row(v);
          rows.insert(rows.end(), r.begin(), r.end());
        }
      }
    }
    for (std::uint32_t i = 0; i < cache.total_pages().count(); ++i) {
      const PrefixRegistry::Block* b = cache.registry().block_owner(PageId{i});
      const PrefixRegistry::Prefix* p = cache.registry().owner(PageId{i});
      registry.push_back({b != nullptr ? 1U : p != nullptr ? 2U : 0U,
                          b != nullptr ? static_cast<std::uint32_t>(b->serial) : 0U});
      refs.push_back(cache.pool().ref_count(PageId{i}));
    }
    for (const PageId p : cache.pool().free_list()) free_list.push_back(p.index());
  }
};

void assert_unchanged(const Snapshot& a, const PagedKVCache& cache) {
  const Snapshot b(cache);
  RC_ASSERT(b.stats.free_pages == a.stats.free_pages);
  RC_ASSERT(b.stats.used_pages == a.stats.used_pages);
  RC_ASSERT(b.stats.cached_pages == a.stats.cached_pages);
  RC_ASSERT(b.stats.num_requests == a.stats.num_requests);
  RC_ASSERT(b.stats.stored_tokens == a.stats.stored_tokens);
  RC_ASSERT(b.stats.registered_prefixes == a.stats.registered_prefixes);
  RC_ASSERT(b.stats.prefix == a.stats.prefix);
  RC_ASSERT(b.ids == a.ids);
  RC_ASSERT(b.tables == a.tables);
  RC_ASSERT(b.per_request == a.per_request);
  RC_ASSERT(b.rows == a.rows);
  RC_ASSERT(b.registry == a.registry);
  RC_ASSERT(b.free_list == a.free_list);
  RC_ASSERT(b.refs == a.refs);
  RC_ASSERT(b.pending == a.pending);
  RC_ASSERT(b.blocks == a.blocks);
  RC_ASSERT(b.efficiency == a.efficiency);
}

// ---- commands ------------------------------------------------------------------

struct Cmd : rc::state::Command<Model, Sut> {
  void apply(Model& m) const final {
    m.evicted_now.clear();
    transition(m);
  }
  void run(const Model& s0, Sut& sut) const final {
    sut.counts.tally.record(typeid(*this));
    if (changes()) {
      exec(s0, sut.cache);
    } else {
      const Snapshot before(sut.cache);
      exec(s0, sut.cache);
      assert_unchanged(before, sut.cache);
    }
    const Model s1 = nextState(s0);
    assert_matches(s1, sut);
    scenarios(s0, s1, sut.counts);
  }
  virtual void transition(Model& /*m*/) const {}
  virtual void exec(const Model& s0, PagedKVCache& cache) const = 0;
  [[nodiscard]] virtual bool changes() const { return false; }
  virtual void scenarios(const Model& /*s0*/, const Model& /*s1*/, Counts& /*out*/) const {}
};

template <class T>
T pick(const std::vector<T>& xs) {
  RC_PRE(!xs.empty());
  return *rc::gen::elementOf(xs);
}

Ids random_ids(std::uint64_t n) {
  Ids out;
  for (std::uint64_t i = 0; i < n; ++i) out.push_back(*rc::gen::inRange<TokenId>(0, kVocab));
  return out;
}

// A prompt and salt: random, or continuing a cached block's prefix or a live
// content request's token ids (mostly under the same salt), so that lookups
// hit, miss mid-chain, and meet equal tokens under another salt.
std::pair<Ids, std::string> gen_prompt(const Model& m) {
  const int mode = *rc::gen::inRange(0, 5);
  const auto other_salt = [](const std::string& salt) {
    return *rc::gen::inRange(0, 5) == 0 ? *rc::gen::elementOf(kSalts) : salt;
  };
  const auto extra = [&m] { return random_ids(*rc::gen::inRange<std::uint64_t>(0, m.page_size + 2)); };
  if ((mode == 1 || mode == 2) && !m.blocks.empty()) {
    std::vector<std::uint64_t> serials;
    for (const auto& [s, b] : m.blocks) serials.push_back(s);
    const MBlock& b = m.blocks.at(*rc::gen::elementOf(serials));
    Ids p = b.prefix;
    const Ids more = extra();
    p.insert(p.end(), more.begin(), more.end());
    return {p, other_salt(b.salt)};
  }
  const std::vector<std::string> content = m.ids_where(true, 1);
  if (mode == 3 && !content.empty()) {
    const MRequest& r = m.requests.at(*rc::gen::elementOf(content));
    const auto cut = *rc::gen::inRange<std::size_t>(0, r.ids.size() + 1);
    Ids p(r.ids.begin(), r.ids.begin() + static_cast<std::ptrdiff_t>(cut));
    const Ids more = extra();
    p.insert(p.end(), more.begin(), more.end());
    return {p, other_salt(r.salt)};
  }
  return {random_ids(*rc::gen::inRange<std::uint64_t>(0, (3 * m.page_size) + 2)),
          *rc::gen::elementOf(kSalts)};
}

// Some block was evicted before its parent in one command (tail first).
bool tail_before_head(const Model& s0, const Model& s1) {
  for (std::size_t i = 0; i < s1.evicted_now.size(); ++i) {
    const std::uint64_t parent = s0.blocks.at(s1.evicted_now[i]).parent_serial;
    for (std::size_t j = i + 1; j < s1.evicted_now.size(); ++j) {
      if (s1.evicted_now[j] == parent) return true;
    }
  }
  return false;
}

struct AllocateContent final : Cmd {
  std::string id;
  Ids prompt;
  std::string salt;
  explicit AllocateContent(const Model& m) : id(pick(m.ids_where(false, -1))) {
    std::tie(prompt, salt) = gen_prompt(m);
  }
  void checkPreconditions(const Model& m) const override {
    RC_PRE(!m.has(id));
    RC_PRE(m.plan(prompt, salt).fits);
  }
  void transition(Model& m) const override {
    if (!m.allocate_content(id, prompt, salt)) throw std::logic_error("model: allocate");
  }
  void exec(const Model&, PagedKVCache& cache) const override {
    RC_ASSERT(cache.allocate_paged(id, std::span<const TokenId>(prompt), salt));
  }
  [[nodiscard]] bool changes() const override { return true; }
  void scenarios(const Model& s0, const Model& s1, Counts& out) const override {
    const Plan pl = s0.plan(prompt, salt);
    if (!pl.hits.empty()) out.note("a content allocation shared cached blocks");
    if (pl.hit_cached != 0) out.note("a hit revived blocks that no request held");
    bool written = false;
    for (const std::uint64_t h : pl.hits) {
      for (const std::uint32_t p : s0.blocks.at(h).pages) {
        for (std::uint64_t k = 0; k < s0.page_size; ++k) written = written || s0.slot(p, k) != 0;
      }
    }
    if (written) out.note("a hit read rows written into a block");
    if (!s1.evicted_now.empty()) out.note("an allocation evicted blocks");
    if (tail_before_head(s0, s1)) out.note("an eviction took a request's tail block before its head");
    const std::size_t max_hit = prompt.empty() ? 0 : (prompt.size() - 1) / s0.page_size;
    if (s0.collide && pl.hits.size() < max_hit && !s0.blocks.empty()) {
      out.note("a lookup with every key colliding passed over other content");
    }
    if (pl.hits.empty() && prompt.size() > s0.page_size) {
      for (const auto& [serial, b] : s0.blocks) {
        if (b.first_token == 0 && b.salt != salt &&
            std::equal(b.prefix.begin(), b.prefix.end(), prompt.begin())) {
          out.note("a salt kept a prompt from matching a cached block");
          break;
        }
      }
    }
  }
  void show(std::ostream& os) const override {
    os << "allocate_paged(" << quoted(id) << ", " << show_ids(prompt) << ", " << quoted(salt)
       << ") -> true";
  }
};

struct AllocateContentNoMemory final : Cmd {
  std::string id;
  Ids prompt;
  std::string salt;
  explicit AllocateContentNoMemory(const Model& m) : id(pick(m.ids_where(false, -1))) {
    std::tie(prompt, salt) = gen_prompt(m);
    const std::uint64_t room = (m.free() + m.cached()) / m.layers * m.page_size;
    if (prompt.size() <= room) {
      const Ids more = random_ids(room + 1 - prompt.size() +
                                  *rc::gen::inRange<std::uint64_t>(0, m.page_size + 1));
      prompt.insert(prompt.end(), more.begin(), more.end());
    }
  }
  void checkPreconditions(const Model& m) const override {
    RC_PRE(!m.has(id));
    RC_PRE(!m.plan(prompt, salt).fits);
  }
  void exec(const Model&, PagedKVCache& cache) const override {
    RC_ASSERT(!cache.allocate_paged(id, std::span<const TokenId>(prompt), salt));
  }
  void show(std::ostream& os) const override {
    os << "allocate_paged(" << quoted(id) << ", " << show_ids(prompt) << ", " << quoted(salt)
       << ") out of pages -> false";
  }
};

struct AllocateDuplicate final : Cmd {
  std::string id;
  Ids prompt;
  std::string salt;
  explicit AllocateDuplicate(const Model& m) : id(pick(m.ids_where(true, -1))) {
    std::tie(prompt, salt) = gen_prompt(m);
  }
  void checkPreconditions(const Model& m) const override { RC_PRE(m.has(id)); }
  void exec(const Model&, PagedKVCache& cache) const override {
    RC_ASSERT(!cache.allocate_paged(id, std::span<const TokenId>(prompt), salt));
  }
  void show(std::ostream& os) const override {
    os << "allocate_paged(" << quoted(id) << " (live), " << show_ids(prompt) << ") -> false";
  }
};

// Tokens to append: random, or the continuation of a cached block's prefix
// (or of another request) that extends this request's ids, so that equal
// blocks are met and chained onto.
Ids gen_append(const Model& m, const MRequest& r, std::uint64_t max_len) {
  if (*rc::gen::inRange(0, 2) == 0) {
    std::vector<Ids> continuations;
    for (const auto& [s, b] : m.blocks) {
      if (b.salt == r.salt && b.prefix.size() > r.ids.size() &&
          std::equal(r.ids.begin(), r.ids.end(), b.prefix.begin())) {
        continuations.emplace_back(b.prefix.begin() + static_cast<std::ptrdiff_t>(r.ids.size()),
                                   b.prefix.end());
      }
    }
    for (const auto& [id, o] : m.requests) {
      if (o.content && o.salt == r.salt && o.ids.size() > r.ids.size() &&
          std::equal(r.ids.begin(), r.ids.end(), o.ids.begin())) {
        continuations.emplace_back(o.ids.begin() + static_cast<std::ptrdiff_t>(r.ids.size()),
                                   o.ids.end());
      }
    }
    if (!continuations.empty()) {
      Ids c = *rc::gen::elementOf(continuations);
      if (c.size() > max_len) c.resize(static_cast<std::size_t>(max_len));
      return c;
    }
  }
  return random_ids(*rc::gen::inRange<std::uint64_t>(1, max_len + 1));
}

struct AppendTokenIds final : Cmd {
  std::string id;
  Ids tokens;
  explicit AppendTokenIds(const Model& m) : id(pick(m.ids_where(true, 1))) {
    tokens = gen_append(m, m.requests.at(id), 2 * m.page_size);
  }
  void checkPreconditions(const Model& m) const override {
    RC_PRE(m.has(id) && m.requests.at(id).content);
    RC_PRE(m.can_append(m.requests.at(id), tokens.size()));
  }
  void transition(Model& m) const override {
    if (!m.append_ids(id, tokens)) throw std::logic_error("model: append");
  }
  void exec(const Model&, PagedKVCache& cache) const override {
    RC_ASSERT(cache.append_token_ids(id, std::span<const TokenId>(tokens)));
  }
  [[nodiscard]] bool changes() const override { return true; }
  void scenarios(const Model& s0, const Model& s1, Counts& out) const override {
    if (s1.counters.blocks_duplicate > s0.counters.blocks_duplicate) {
      out.note("append_token_ids chained onto an equal block");
    }
    if (!s1.evicted_now.empty()) out.note("an append evicted blocks");
    if (tail_before_head(s0, s1)) out.note("an eviction took a request's tail block before its head");
    if (s1.counters.cow_copies > s0.counters.cow_copies) {
      out.note("an append copied a forked partial page");
    }
  }
  void show(std::ostream& os) const override {
    os << "append_token_ids(" << quoted(id) << ", " << show_ids(tokens) << ") -> true";
  }
};

struct AppendTokenIdsNoMemory final : Cmd {
  std::string id;
  Ids tokens;
  explicit AppendTokenIdsNoMemory(const Model& m) : id(pick(m.ids_where(true, 1))) {
    const std::uint64_t room = (m.free() + m.cached()) / m.layers * m.page_size;
    tokens = random_ids(room + *rc::gen::inRange<std::uint64_t>(1, (2 * m.page_size) + 1));
  }
  void checkPreconditions(const Model& m) const override {
    RC_PRE(m.has(id) && m.requests.at(id).content);
    RC_PRE(!m.can_append(m.requests.at(id), tokens.size()));
  }
  void exec(const Model&, PagedKVCache& cache) const override {
    RC_ASSERT(!cache.append_token_ids(id, std::span<const TokenId>(tokens)));
  }
  void show(std::ostream& os) const override {
    os << "append_token_ids(" << quoted(id) << ", " << show_ids(tokens) << ") no pages -> false";
  }
};

// append_token_ids with no token: true, nothing changes.
struct AppendNothing final : Cmd {
  std::string id;
  explicit AppendNothing(const Model& m) : id(pick(m.ids_where(true, 1))) {}
  void checkPreconditions(const Model& m) const override {
    RC_PRE(m.has(id) && m.requests.at(id).content);
  }
  void exec(const Model&, PagedKVCache& cache) const override {
    RC_ASSERT(cache.append_token_ids(id, std::span<const TokenId>()));
  }
  void show(std::ostream& os) const override {
    os << "append_token_ids(" << quoted(id) << ", []) -> true";
  }
};

// The wrong append for the request's kind: std::logic_error, nothing changes.
struct WrongAppend final : Cmd {
  std::string id;
  int how = *rc::gen::inRange(0, 3);
  explicit WrongAppend(const Model& m) : id(pick(m.ids_where(true, -1))) {}
  void checkPreconditions(const Model& m) const override { RC_PRE(m.has(id)); }
  void exec(const Model& s0, PagedKVCache& cache) const override {
    if (!s0.requests.at(id).content) {
      const Ids one{1};
      RC_ASSERT_THROWS_AS(static_cast<void>(cache.append_token_ids(id, std::span<const TokenId>(one))),
                          std::logic_error);
    } else if (how == 0) {
      RC_ASSERT_THROWS_AS(static_cast<void>(cache.append_token_all_layers(id)), std::logic_error);
    } else if (how == 1) {
      RC_ASSERT_THROWS_AS(static_cast<void>(cache.append_token_paged(id, 0)), std::logic_error);
    } else {
      const Row r(kRowBytes, 7);
      RC_ASSERT_THROWS_AS(
          static_cast<void>(cache.append_token_paged(id, 0, as_span(r), as_span(r))),
          std::logic_error);
    }
  }
  void show(std::ostream& os) const override {
    os << "wrong append (" << how << ") to " << quoted(id) << " -> logic_error";
  }
};

// A stored position of a request, often in a page a block or prefix holds.
std::tuple<std::string, std::size_t, std::uint64_t> gen_position(const Model& m) {
  std::vector<std::tuple<std::string, std::size_t, std::uint64_t>> in_registry;
  std::vector<std::pair<std::string, std::size_t>> layers;
  for (const auto& [id, r] : m.requests) {
    for (std::size_t l = 0; l < m.layers; ++l) {
      if (r.tokens[l] == 0) continue;
      layers.emplace_back(id, l);
      for (std::uint64_t t = 0; t < r.tokens[l]; ++t) {
        if (m.owner[r.pages[l][static_cast<std::size_t>(t / m.page_size)]] != 0) {
          in_registry.emplace_back(id, l, t);
        }
      }
    }
  }
  if (!in_registry.empty() && *rc::gen::inRange(0, 2) == 0) return *rc::gen::elementOf(in_registry);
  const auto [id, l] = pick(layers);
  return {id, l, *rc::gen::inRange<std::uint64_t>(0, m.requests.at(id).tokens[l])};
}

struct WriteKv final : Cmd {
  std::string id;
  std::size_t layer = 0;
  std::uint64_t position = 0;
  std::uint32_t w = 0;
  explicit WriteKv(const Model& m) : w(m.next_write) {
    std::tie(id, layer, position) = gen_position(m);
  }
  void checkPreconditions(const Model& m) const override {
    RC_PRE(m.has(id) && layer < m.layers && position < m.requests.at(id).tokens[layer]);
    RC_PRE(m.can_write(m.requests.at(id), layer, position));
  }
  void transition(Model& m) const override {
    if (!m.write(id, layer, position, w)) throw std::logic_error("model: write");
  }
  void exec(const Model&, PagedKVCache& cache) const override {
    // Isolation, independent of the model: no other request's rows change.
    std::vector<std::pair<std::string, Row>> others;
    for (const std::string& other : cache.request_ids()) {
      if (other == id) continue;
      for (std::size_t l = 0; l < cache.config().num_layers; ++l) {
        Row all;
        const auto [keys, values] = cache.get_kv(other, l);
        for (const auto k : keys) {
          const Row r = to_row(k);
          all.insert(all.end(), r.begin(), r.end());
        }
        for (const auto v : values) {
          const Row r = to_row(v);
          all.insert(all.end(), r.begin(), r.end());
        }
        others.emplace_back(other, std::move(all));
      }
    }
    const Row k = key_row(w);
    const Row v = value_row(w);
    cache.write_kv(id, layer, Tokens{position}, as_span(k), as_span(v));
    std::size_t i = 0;
    for (const std::string& other : cache.request_ids()) {
      if (other == id) continue;
      for (std::size_t l = 0; l < cache.config().num_layers; ++l) {
        Row all;
        const auto [keys, values] = cache.get_kv(other, l);
        for (const auto kk : keys) {
          const Row r = to_row(kk);
          all.insert(all.end(), r.begin(), r.end());
        }
        for (const auto vv : values) {
          const Row r = to_row(vv);
          all.insert(all.end(), r.begin(), r.end());
        }
        RC_ASSERT(i < others.size());
        RC_ASSERT(others[i].first == other);
        RC_ASSERT(others[i].second == all);
        ++i;
      }
    }
  }
  [[nodiscard]] bool changes() const override { return true; }
  void scenarios(const Model& s0, const Model& s1, Counts& out) const override {
    const auto index = static_cast<std::size_t>(position / s0.page_size);
    const std::uint32_t before = s0.requests.at(id).pages[layer][index];
    const std::uint32_t after = s1.requests.at(id).pages[layer][index];
    const std::uint64_t o = s0.owner[before];
    if (o != 0 && o < kPrefixUid) {
      if (before != after) out.note("a write_kv copied a block page");
      if (before == after && s1.owner[before] == o) {
        out.note("a registrant wrote its block page in place");
      }
    }
  }
  void show(std::ostream& os) const override {
    os << "write_kv(" << quoted(id) << ", layer " << layer << ", " << position << ", write " << w
       << ")";
  }
};

struct WriteKvNoPage final : Cmd {
  std::string id;
  std::size_t layer = 0;
  std::uint64_t position = 0;
  explicit WriteKvNoPage(const Model& m) { std::tie(id, layer, position) = gen_position(m); }
  void checkPreconditions(const Model& m) const override {
    RC_PRE(m.has(id) && layer < m.layers && position < m.requests.at(id).tokens[layer]);
    RC_PRE(!m.can_write(m.requests.at(id), layer, position));
  }
  void exec(const Model&, PagedKVCache& cache) const override {
    const Row r = key_row(0xABCDEF);
    RC_ASSERT_THROWS_AS(cache.write_kv(id, layer, Tokens{position}, as_span(r), as_span(r)),
                        OutOfPages);
  }
  void show(std::ostream& os) const override {
    os << "write_kv(" << quoted(id) << ", layer " << layer << ", " << position
       << ") shared, no page -> OutOfPages";
  }
};

struct Fork final : Cmd {
  std::string parent;
  std::string child;
  explicit Fork(const Model& m)
      : parent(pick(m.ids_where(true, -1))), child(pick(m.ids_where(false, -1))) {}
  void checkPreconditions(const Model& m) const override {
    RC_PRE(m.has(parent) && !m.has(child));
  }
  void transition(Model& m) const override { m.fork(parent, child); }
  void exec(const Model&, PagedKVCache& cache) const override {
    RC_ASSERT(cache.fork(parent, child));
  }
  [[nodiscard]] bool changes() const override { return true; }
  void show(std::ostream& os) const override {
    os << "fork(" << quoted(parent) << ", " << quoted(child) << ") -> true";
  }
};

struct ForkExistingChild final : Cmd {
  std::string parent;
  std::string child;
  explicit ForkExistingChild(const Model& m)
      : parent(pick(m.ids_where(true, -1))), child(pick(m.ids_where(true, -1))) {}
  void checkPreconditions(const Model& m) const override { RC_PRE(m.has(parent) && m.has(child)); }
  void exec(const Model&, PagedKVCache& cache) const override {
    RC_ASSERT(!cache.fork(parent, child));
  }
  void show(std::ostream& os) const override {
    os << "fork(" << quoted(parent) << ", " << quoted(child) << " (live)) -> false";
  }
};

struct Free final : Cmd {
  std::string id;
  explicit Free(const Model& m) : id(pick(m.ids_where(true, -1))) {}
  void checkPreconditions(const Model& m) const override { RC_PRE(m.has(id)); }
  void transition(Model& m) const override { m.free_request(id); }
  void exec(const Model&, PagedKVCache& cache) const override { cache.free(id); }
  [[nodiscard]] bool changes() const override { return true; }
  void show(std::ostream& os) const override { os << "free(" << quoted(id) << ")"; }
};

// allocate_paged(id, prompt, hash, prefix): a named prefix on the same pool.
struct AllocateNamed final : Cmd {
  std::string id;
  std::string hash = *rc::gen::elementOf(kHashes);
  std::uint64_t prefix = 0;
  std::uint64_t prompt = 0;
  explicit AllocateNamed(const Model& m) : id(pick(m.ids_where(false, -1))) {
    const auto it = m.prefixes.find(hash);
    prefix = it != m.prefixes.end() ? it->second.tokens
                                    : *rc::gen::inRange<std::uint64_t>(1, (2 * m.page_size) + 1);
    prompt = prefix + *rc::gen::inRange<std::uint64_t>(0, m.page_size + 2);
  }
  void checkPreconditions(const Model& m) const override {
    RC_PRE(!m.has(id));
    const auto it = m.prefixes.find(hash);
    RC_PRE(it == m.prefixes.end() || it->second.tokens == prefix);
    RC_PRE(m.can_named(prompt, hash));
  }
  void transition(Model& m) const override {
    if (!m.allocate_named(id, prompt, hash, prefix)) throw std::logic_error("model: named");
  }
  void exec(const Model&, PagedKVCache& cache) const override {
    RC_ASSERT(cache.allocate_paged(id, Tokens{prompt}, hash, Tokens{prefix}));
  }
  [[nodiscard]] bool changes() const override { return true; }
  void scenarios(const Model& s0, const Model& s1, Counts& out) const override {
    if (!s1.evicted_now.empty()) out.note("an allocation evicted blocks");
    if (tail_before_head(s0, s1)) out.note("an eviction took a request's tail block before its head");
  }
  void show(std::ostream& os) const override {
    os << "allocate_paged(" << quoted(id) << ", " << prompt << ", " << quoted(hash) << ", "
       << prefix << ") -> true";
  }
};

struct AllocateNamedNoMemory final : Cmd {
  std::string id;
  std::string hash = *rc::gen::elementOf(kHashes);
  std::uint64_t prefix = 0;
  std::uint64_t prompt = 0;
  explicit AllocateNamedNoMemory(const Model& m) : id(pick(m.ids_where(false, -1))) {
    const auto it = m.prefixes.find(hash);
    prefix = it != m.prefixes.end() ? it->second.tokens
                                    : *rc::gen::inRange<std::uint64_t>(1, (2 * m.page_size) + 1);
    const std::uint64_t room = (m.free() + m.cached()) / m.layers * m.page_size;
    prompt = std::max(prefix, room) + *rc::gen::inRange<std::uint64_t>(0, (2 * m.page_size) + 1);
  }
  void checkPreconditions(const Model& m) const override {
    RC_PRE(!m.has(id));
    const auto it = m.prefixes.find(hash);
    RC_PRE(it == m.prefixes.end() || it->second.tokens == prefix);
    RC_PRE(!m.can_named(prompt, hash));
  }
  void exec(const Model&, PagedKVCache& cache) const override {
    RC_ASSERT(!cache.allocate_paged(id, Tokens{prompt}, hash, Tokens{prefix}));
  }
  void show(std::ostream& os) const override {
    os << "allocate_paged(" << quoted(id) << ", " << prompt << ", " << quoted(hash) << ", "
       << prefix << ") out of pages -> false";
  }
};

// Operator commands go ahead one generation attempt in four.
void thin_out() { RC_PRE(*rc::gen::inRange(0, 4) == 0); }

struct EvictPrefix final : Cmd {
  std::string hash = *rc::gen::elementOf(kHashes);
  EvictPrefix() { thin_out(); }
  void transition(Model& m) const override {
    const auto it = m.prefixes.find(hash);
    if (it != m.prefixes.end()) m.evict(it->second.uid, KvRemovalReason::evicted);
  }
  void exec(const Model& s0, PagedKVCache& cache) const override {
    RC_ASSERT(cache.evict_prefix(hash) == (s0.prefixes.count(hash) != 0));
  }
  [[nodiscard]] bool changes() const override { return true; }
  void show(std::ostream& os) const override { os << "evict_prefix(" << quoted(hash) << ")"; }
};

struct ClearPrefixCache final : Cmd {
  ClearPrefixCache() { thin_out(); }
  void transition(Model& m) const override { static_cast<void>(m.clear()); }
  void exec(const Model& s0, PagedKVCache& cache) const override {
    RC_ASSERT(cache.clear_prefix_cache() == s0.prefixes.size() + s0.blocks.size());
  }
  [[nodiscard]] bool changes() const override { return true; }
  void show(std::ostream& os) const override { os << "clear_prefix_cache()"; }
};

// drain_events: exactly the events the model recorded, in order.
struct DrainEvents final : Cmd {
  void transition(Model& m) const override { m.pending.clear(); }
  void exec(const Model& s0, PagedKVCache& cache) const override {
    const std::vector<KvEvent> got = cache.drain_events();
    std::vector<KvEvent> want;
    for (const MEvent& e : s0.pending) want.push_back(expected_event(cache, e));
    RC_ASSERT(got.size() == want.size());
    for (std::size_t i = 0; i < got.size(); ++i) {
      RC_ASSERT(got[i].seq == want[i].seq);  // consecutive, never reused
    }
    RC_ASSERT(normalised(got) == normalised(want));
  }
  [[nodiscard]] bool changes() const override { return true; }
  void show(std::ostream& os) const override { os << "drain_events()"; }
};

struct RecordEvents final : Cmd {
  bool on = *rc::gen::arbitrary<bool>();
  RecordEvents() { thin_out(); }
  void transition(Model& m) const override { m.recording = on; }
  void exec(const Model&, PagedKVCache& cache) const override { cache.record_events(on); }
  [[nodiscard]] bool changes() const override { return true; }
  void show(std::ostream& os) const override { os << "record_events(" << on << ")"; }
};

// Reads change nothing (every get_kv is compared after every command).
struct Read final : Cmd {
  void exec(const Model&, PagedKVCache& cache) const override {
    for (const std::string& id : cache.request_ids()) {
      for (std::size_t l = 0; l < cache.config().num_layers; ++l) {
        static_cast<void>(cache.get_kv(id, l));
      }
      static_cast<void>(cache.cached_tokens(id));
    }
    static_cast<void>(cache.stats());
  }
  void show(std::ostream& os) const override { os << "get_kv / stats"; }
};

using Commands = kvcache_state::CommandList<
    AllocateContent, AllocateContent, AllocateContent, AllocateContent, AllocateContent,
    AllocateContent, AllocateContentNoMemory, AllocateDuplicate, AppendTokenIds, AppendTokenIds,
    AppendTokenIds, AppendTokenIds, AppendTokenIdsNoMemory, AppendNothing, WrongAppend, WriteKv,
    WriteKv, WriteKv, WriteKv, WriteKvNoPage, Fork, ForkExistingChild, Free, Free, Free, Free,
    AllocateNamed, AllocateNamedNoMemory, EvictPrefix, ClearPrefixCache, DrainEvents, DrainEvents,
    RecordEvents, Read>;

void content_property(Counts& counts) {
  Model initial;
  initial.layers = *rc::gen::inRange<std::uint32_t>(1, 3);
  initial.page_size = *rc::gen::inRange<std::uint64_t>(1, 5);
  initial.total = *rc::gen::inRange<std::uint64_t>(4, 17);
  initial.collide = *rc::gen::inRange(0, 3) == 0;
  Sut sut(initial, counts);
  assert_matches(initial, sut);
  const auto commands =
      *rc::gen::scale(2.0, rc::state::gen::commands(initial, Commands::generator()));
  rc::state::runAll(commands, initial, sut);
}

TEST(ContentCacheState, MatchesModel) {
  Counts counts;
  kvcache_state::drive(
      "ContentCacheState/MatchesModel", [&counts] { content_property(counts); }, counts.tally,
      kvcache_state::command_target(), Commands::kinds);
  if (!rc::detail::configuration().reproduce.empty()) return;
  std::cout << "Scenarios reached:\n";
  for (const std::string& s : kScenarios) {
    std::cout << "  " << counts.scenarios[s] << "\t" << s << "\n";
    EXPECT_GT(counts.scenarios[s], 0U) << "never reached: " << s;
  }
}

}  // namespace
