// Unit tests for automatic prefix caching by token content (issue 8):
// PagedKVCache::allocate_paged(id, token ids, salt), cached_tokens,
// append_token_ids, drain_events, and how content blocks live with the named
// prefixes, fork and copy-on-write on one pool.
//
// Every failure path checks the result (exception type or `false`) AND that
// the cache is exactly as before, through a Snapshot of every stats() field
// (with all the prefix counters), the free list in order, the pending events,
// and each live request's block tables, tokens, cached_tokens and bytes.
//
// Models: 1 or 2 layers, 1 KV head, head_dim 4, 2-byte elements (8-byte
// rows), page size 4.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <optional>
#include <ostream>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

import kvcache;

namespace {

using kvcache::Bytes;
using kvcache::KvEvent;
using kvcache::KvEventKind;
using kvcache::KvRemovalReason;
using kvcache::ModelConfig;
using kvcache::PagedKVCache;
using kvcache::PageId;
using kvcache::Pages;
using kvcache::Storage;
using kvcache::TokenId;
using kvcache::Tokens;

constexpr ModelConfig kTwo{2, 1, 4, 2};  // 2 layers, 8-byte rows
constexpr ModelConfig kOne{1, 1, 4, 2};  // 1 layer
constexpr std::size_t kRow = 8;
constexpr Tokens kPage{4};

Bytes pages(std::uint64_t n, ModelConfig cfg = kTwo) {
  return Bytes{n * cfg.bytes_per_page(kPage).count()};
}

// Token ids first, first + 1, ... (n of them).
std::vector<TokenId> seq(TokenId first, std::size_t n) {
  std::vector<TokenId> v(n);
  std::iota(v.begin(), v.end(), first);
  return v;
}
std::vector<TokenId> cat(std::vector<TokenId> a, const std::vector<TokenId>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

std::vector<std::byte> row(std::uint8_t tag, std::size_t layer, std::size_t token) {
  std::vector<std::byte> r(kRow);
  for (std::size_t i = 0; i < kRow; ++i) {
    r[i] = static_cast<std::byte>(
        ((std::size_t{tag} * 131U) ^ (layer * 37U) ^ (token * 11U) ^ (i * 7U)) | 1U);
  }
  return r;
}
const std::vector<std::byte> kZero(kRow, std::byte{0});
std::vector<std::byte> copy(std::span<const std::byte> s) { return {s.begin(), s.end()}; }

void write_all(PagedKVCache& cache, std::string_view id, std::uint8_t tag, std::size_t from,
               std::size_t to) {
  for (std::size_t l = 0; l < cache.config().num_layers; ++l) {
    for (std::size_t t = from; t < to; ++t) cache.write_kv(id, l, t, row(tag, l, t), row(tag, l, t));
  }
}
// Token t of every layer of `id` holds writer `tag`'s rows (0: zero).
void expect_tokens(const PagedKVCache& cache, std::string_view id, std::size_t from,
                   std::size_t to, std::uint8_t tag) {
  for (std::size_t l = 0; l < cache.config().num_layers; ++l) {
    const auto [keys, values] = cache.get_kv(id, l);
    for (std::size_t t = from; t < to; ++t) {
      ASSERT_LT(t, keys.size());
      EXPECT_EQ(copy(keys[t]), tag == 0 ? kZero : row(tag, l, t)) << id << " L" << l << " t" << t;
      EXPECT_EQ(copy(values[t]), tag == 0 ? kZero : row(tag, l, t)) << id << " L" << l << " t" << t;
    }
  }
}

std::vector<std::uint64_t> table(const PagedKVCache& cache, std::string_view id, std::size_t l) {
  std::vector<std::uint64_t> out;
  for (const PageId p : cache.block_table(id, l)) out.push_back(static_cast<std::uint64_t>(p));
  return out;
}

// ---------------------------------------------------------------------------
// Snapshot

struct RequestState {
  std::string id;
  Tokens cached;
  bool content = false;
  std::vector<Tokens> tokens;
  std::vector<std::vector<std::uint64_t>> tables;
  std::vector<std::vector<std::vector<std::byte>>> rows;  // keys then values, per layer
  friend bool operator==(const RequestState&, const RequestState&) = default;
};

struct Snapshot {
  kvcache::PagedStats stats;
  double efficiency = 0;
  std::vector<std::uint64_t> free_list;
  std::size_t pending_events = 0;
  std::vector<RequestState> requests;
  friend bool operator==(const Snapshot& a, const Snapshot& b) {
    const auto& x = a.stats;
    const auto& y = b.stats;
    return x.total_pages == y.total_pages && x.free_pages == y.free_pages &&
           x.used_pages == y.used_pages && x.cached_pages == y.cached_pages &&
           x.used_memory == y.used_memory && x.num_requests == y.num_requests &&
           x.prefix_hits == y.prefix_hits && x.prefix_misses == y.prefix_misses &&
           x.stored_tokens == y.stored_tokens && x.registered_prefixes == y.registered_prefixes &&
           x.prefix == y.prefix && a.efficiency == b.efficiency && a.free_list == b.free_list &&
           a.pending_events == b.pending_events && a.requests == b.requests;
  }
  friend void PrintTo(const Snapshot& s, std::ostream* os) {
    *os << "{free " << s.stats.free_pages.count() << " used " << s.stats.used_pages.count()
        << " cached " << s.stats.cached_pages.count() << ", events " << s.pending_events << ';';
    for (const RequestState& r : s.requests) {
      *os << " \"" << r.id << "\"(cached " << r.cached.count();
      for (std::size_t l = 0; l < r.tables.size(); ++l) {
        *os << " L" << l << '/' << r.tokens[l].count() << '[';
        for (const std::uint64_t p : r.tables[l]) *os << ' ' << p;
        *os << " ]";
      }
      *os << ')';
    }
    *os << '}';
  }
};

Snapshot snapshot(const PagedKVCache& cache) {
  Snapshot s;
  s.stats = cache.stats();
  s.efficiency = cache.memory_efficiency();
  for (const PageId p : cache.pool().free_list()) s.free_list.push_back(static_cast<std::uint64_t>(p));
  s.pending_events = cache.registry().pending_events();
  std::vector<std::string> live = cache.request_ids();
  std::sort(live.begin(), live.end());
  for (const std::string& id : live) {
    RequestState r{id, cache.cached_tokens(id), cache.content_addressed(id), {}, {}, {}};
    for (std::size_t l = 0; l < cache.config().num_layers; ++l) {
      r.tokens.push_back(cache.tokens(id, l));
      r.tables.push_back(table(cache, id, l));
      if (cache.storage() == Storage::host) {
        const auto [keys, values] = cache.get_kv(id, l);
        auto& rows = r.rows.emplace_back();
        for (std::size_t t = 0; t < keys.size(); ++t) rows.push_back(copy(keys[t]));
        for (std::size_t t = 0; t < values.size(); ++t) rows.push_back(copy(values[t]));
      }
    }
    s.requests.push_back(std::move(r));
  }
  return s;
}

void expect_consistent(const PagedKVCache& cache) {
  const auto s = cache.stats();
  EXPECT_EQ(s.free_pages.count() + s.used_pages.count() + s.cached_pages.count(),
            s.total_pages.count());
  EXPECT_TRUE(cache.check_invariants());
}

// ---------------------------------------------------------------------------
// Sharing

TEST(ContentCacheTest, ASecondPromptWithTheSameFirstPagesSharesThem) {
  PagedKVCache cache(kTwo, pages(20), kPage);
  const auto a = cat(seq(100, 8), seq(1, 3));  // two full pages + 3 tokens
  const auto b = cat(seq(100, 8), seq(50, 5));  // the same two full pages + 5 tokens
  ASSERT_TRUE(cache.allocate_paged("a", a));
  EXPECT_EQ(cache.cached_tokens("a"), Tokens{0});
  EXPECT_TRUE(cache.content_addressed("a"));
  EXPECT_EQ(cache.stats().used_pages, Pages{6});  // 3 pages x 2 layers
  write_all(cache, "a", 1, 0, 11);                // a's prefill
  ASSERT_TRUE(cache.allocate_paged("b", b));
  EXPECT_EQ(cache.cached_tokens("b"), Tokens{8});
  for (std::size_t l = 0; l < 2; ++l) {
    const auto ta = table(cache, "a", l);
    const auto tb = table(cache, "b", l);
    ASSERT_EQ(tb.size(), 4U);
    EXPECT_EQ(tb[0], ta[0]);
    EXPECT_EQ(tb[1], ta[1]);
    EXPECT_NE(tb[2], ta[2]);
    EXPECT_EQ(cache.pool().ref_count(PageId{static_cast<std::uint32_t>(ta[0])}), 3U);  // a, b, registry
  }
  EXPECT_EQ(cache.stats().used_pages, Pages{6 + 4});  // b took 2 pages per layer
  expect_tokens(cache, "b", 0, 8, 1);   // b reads a's KV for the shared pages
  expect_tokens(cache, "b", 8, 13, 0);  // and zeros past them
  const auto c = cache.stats().prefix;
  EXPECT_EQ(c.content_prompt_tokens, 11U + 13U);
  EXPECT_EQ(c.content_hit_tokens, 8U);
  EXPECT_EQ(c.pages_saved, 4U);
  EXPECT_EQ(c.blocks_stored, 2U + 1U);  // a: pages 0, 1; b: page 2 (13 tokens: 3 full, 2 shared)
  expect_consistent(cache);
}

TEST(ContentCacheTest, APromptThatDivergesMidPageSharesOnlyTheFullPagesBefore) {
  PagedKVCache cache(kOne, pages(20, kOne), kPage);
  const auto a = seq(0, 12);
  auto b = seq(0, 12);
  b[6] = 999;  // diverges inside page 1
  ASSERT_TRUE(cache.allocate_paged("a", a));
  ASSERT_TRUE(cache.allocate_paged("b", b));
  EXPECT_EQ(cache.cached_tokens("b"), Tokens{4});
  EXPECT_EQ(table(cache, "b", 0)[0], table(cache, "a", 0)[0]);
  EXPECT_NE(table(cache, "b", 0)[1], table(cache, "a", 0)[1]);
  EXPECT_NE(table(cache, "b", 0)[2], table(cache, "a", 0)[2]);  // same tokens, other parent
  expect_consistent(cache);
}

TEST(ContentCacheTest, AtMostPromptMinusOneTokensAreShared) {
  PagedKVCache cache(kOne, pages(20, kOne), kPage);
  ASSERT_TRUE(cache.allocate_paged("a", seq(0, 8)));
  ASSERT_TRUE(cache.allocate_paged("b", seq(0, 8)));  // identical, a multiple of the page size
  EXPECT_EQ(cache.cached_tokens("b"), Tokens{4});     // the last token is computed again
  ASSERT_TRUE(cache.allocate_paged("c", seq(0, 9)));
  EXPECT_EQ(cache.cached_tokens("c"), Tokens{8});
  EXPECT_EQ(table(cache, "c", 0)[1], table(cache, "a", 0)[1]);
  // b's own copy of page 1 is not a second block: an equal one exists.
  EXPECT_EQ(cache.stats().prefix.blocks_duplicate, 1U);
  ASSERT_TRUE(cache.allocate_paged("one", seq(0, 1)));
  EXPECT_EQ(cache.cached_tokens("one"), Tokens{0});
  ASSERT_TRUE(cache.allocate_paged("empty", std::span<const TokenId>{}));
  EXPECT_EQ(cache.pages_held("empty"), Pages{0});
  expect_consistent(cache);
}

TEST(ContentCacheTest, SaltsIsolateTenants) {
  PagedKVCache cache(kOne, pages(20, kOne), kPage);
  const auto p = seq(7, 9);
  ASSERT_TRUE(cache.allocate_paged("a", p, "tenant-a"));
  ASSERT_TRUE(cache.allocate_paged("b", p, "tenant-b"));
  ASSERT_TRUE(cache.allocate_paged("plain", p));
  EXPECT_EQ(cache.cached_tokens("b"), Tokens{0});
  EXPECT_EQ(cache.cached_tokens("plain"), Tokens{0});
  const auto ta = table(cache, "a", 0);
  const auto tb = table(cache, "b", 0);
  const auto tp = table(cache, "plain", 0);
  for (std::size_t i = 0; i < 3; ++i) {
    EXPECT_NE(ta[i], tb[i]);
    EXPECT_NE(ta[i], tp[i]);
  }
  ASSERT_TRUE(cache.allocate_paged("a2", p, "tenant-a"));
  EXPECT_EQ(cache.cached_tokens("a2"), Tokens{8});
  EXPECT_EQ(table(cache, "a2", 0)[0], ta[0]);
  expect_consistent(cache);
}

TEST(ContentCacheTest, AForcedKeyCollisionNeverSharesOtherContent) {
  PagedKVCache cache(kOne, pages(40, kOne), kPage);
  cache.force_key_collisions_for_testing(true);  // every key the same
  ASSERT_TRUE(cache.allocate_paged("a", seq(0, 9)));
  write_all(cache, "a", 1, 0, 9);
  // Other first page, same second page: no sharing at all (the second page's
  // KV depends on the first).
  auto b = seq(0, 9);
  b[0] = 77;
  ASSERT_TRUE(cache.allocate_paged("b", b));
  EXPECT_EQ(cache.cached_tokens("b"), Tokens{0});
  expect_tokens(cache, "b", 0, 9, 0);
  // Another salt: nothing.
  ASSERT_TRUE(cache.allocate_paged("c", seq(0, 9), "s"));
  EXPECT_EQ(cache.cached_tokens("c"), Tokens{0});
  // The same content still shares, found among the colliding candidates.
  ASSERT_TRUE(cache.allocate_paged("d", seq(0, 9)));
  EXPECT_EQ(cache.cached_tokens("d"), Tokens{8});
  expect_tokens(cache, "d", 0, 8, 1);
  for (const KvEvent& e : cache.drain_events()) {
    if (e.kind == KvEventKind::stored) {
      EXPECT_EQ(e.key, cache.registry().block_key(e.parent_key, e.salt, e.token_ids));
    }
  }
  expect_consistent(cache);
}

TEST(ContentCacheTest, KeysAreChainedOverParentTokensAndSalt) {
  PagedKVCache cache(kOne, pages(4, kOne), kPage);
  const auto& reg = cache.registry();
  const auto t = seq(1, 4);
  const std::uint64_t k = reg.block_key(std::nullopt, "", t);
  EXPECT_EQ(k, reg.block_key(std::nullopt, "", t));
  EXPECT_NE(k, reg.block_key(std::nullopt, "x", t));
  EXPECT_NE(k, reg.block_key(std::uint64_t{0}, "", t));
  EXPECT_NE(k, reg.block_key(k, "", t));
  EXPECT_NE(k, reg.block_key(std::nullopt, "", seq(2, 4)));
}

// ---------------------------------------------------------------------------
// Decode

TEST(ContentCacheTest, AppendTokenIdsKeysPagesAsTheyFill) {
  PagedKVCache cache(kTwo, pages(20), kPage);
  ASSERT_TRUE(cache.allocate_paged("a", seq(0, 3)));
  EXPECT_EQ(cache.stats().prefix.blocks_stored, 0U);
  ASSERT_TRUE(cache.append_token_ids("a", seq(3, 2)));  // page 0 fills
  EXPECT_EQ(cache.tokens("a", 0), Tokens{5});
  EXPECT_EQ(cache.tokens("a", 1), Tokens{5});
  EXPECT_EQ(cache.stats().prefix.blocks_stored, 1U);
  ASSERT_TRUE(cache.append_token_ids("a", seq(5, 7)));  // pages 1 and 2 fill
  EXPECT_EQ(cache.stats().prefix.blocks_stored, 3U);
  EXPECT_TRUE(cache.append_token_ids("a", {}));
  write_all(cache, "a", 3, 0, 12);
  // A later request with those 12 tokens and more finds all three pages.
  ASSERT_TRUE(cache.allocate_paged("b", seq(0, 14)));
  EXPECT_EQ(cache.cached_tokens("b"), Tokens{12});
  expect_tokens(cache, "b", 0, 12, 3);
  expect_consistent(cache);
}

TEST(ContentCacheTest, AppendIsAllOrNothingAndChangesNothingWhenNoPageCanBeHad) {
  PagedKVCache cache(kTwo, pages(4), kPage);
  ASSERT_TRUE(cache.allocate_paged("a", seq(0, 6)));  // 2 pages x 2 layers: the whole pool
  write_all(cache, "a", 1, 0, 6);
  const Snapshot before = snapshot(cache);
  EXPECT_FALSE(cache.append_token_ids("a", seq(6, 3)));  // needs a third page per layer
  EXPECT_EQ(snapshot(cache), before);
  EXPECT_TRUE(cache.append_token_ids("a", seq(6, 2)));    // fits in the last pages
  expect_tokens(cache, "a", 0, 6, 1);
  expect_tokens(cache, "a", 6, 8, 0);
  expect_consistent(cache);
}

TEST(ContentCacheTest, AllocationIsAllOrNothingAndEvictsNothingWhenItFails) {
  PagedKVCache cache(kOne, pages(4, kOne), kPage);
  ASSERT_TRUE(cache.allocate_paged("a", seq(0, 9)));  // 3 pages, 2 keyed
  cache.free("a");                                   // 2 cached, 2 free
  ASSERT_TRUE(cache.allocate_paged("x", seq(500, 4)));  // 1 page: 1 free left
  static_cast<void>(cache.drain_events());
  const Snapshot before = snapshot(cache);
  // 5 pages needed, 1 free + 2 cached.
  EXPECT_FALSE(cache.allocate_paged("b", seq(100, 20)));
  EXPECT_EQ(snapshot(cache), before);
  // Duplicate id: false, nothing changed (even with a prompt that would fit).
  EXPECT_FALSE(cache.allocate_paged("x", seq(0, 5)));
  EXPECT_EQ(snapshot(cache), before);
  // A hit that shares the 2 cached pages needs 1 more: fits, evicting nothing.
  ASSERT_TRUE(cache.allocate_paged("c", seq(0, 10)));
  EXPECT_EQ(cache.cached_tokens("c"), Tokens{8});
  EXPECT_EQ(cache.stats().prefix.blocks_evicted, 0U);
  expect_consistent(cache);
}

TEST(ContentCacheTest, AHitNeverEvictsThePagesItShares) {
  PagedKVCache cache(kOne, pages(3, kOne), kPage);
  ASSERT_TRUE(cache.allocate_paged("a", seq(0, 9)));  // all 3 pages
  cache.free("a");                                   // 2 cached (keyed), 1 free
  // Shares the 2 cached pages and needs 1: the free one. Evicting the shared
  // pages to make room would be wrong; there is exactly enough without.
  ASSERT_TRUE(cache.allocate_paged("b", seq(0, 12)));
  EXPECT_EQ(cache.cached_tokens("b"), Tokens{8});
  EXPECT_EQ(cache.stats().prefix.blocks_evicted, 0U);
  // Now nothing is free or cached: another prompt does not fit.
  EXPECT_FALSE(cache.allocate_paged("c", seq(1000, 1)));
  expect_consistent(cache);
}

// ---------------------------------------------------------------------------
// Eviction

TEST(ContentCacheTest, FreedKeyedPagesStayFindableUntilTheAllocatorNeedsThem) {
  PagedKVCache cache(kOne, pages(6, kOne), kPage);
  ASSERT_TRUE(cache.allocate_paged("a", seq(0, 13)));  // 4 pages, 3 keyed
  write_all(cache, "a", 2, 0, 13);
  cache.free("a");
  EXPECT_EQ(cache.stats().cached_pages, Pages{3});
  EXPECT_EQ(cache.stats().free_pages, Pages{3});
  ASSERT_TRUE(cache.allocate_paged("b", seq(0, 13)));
  EXPECT_EQ(cache.cached_tokens("b"), Tokens{12});
  expect_tokens(cache, "b", 0, 12, 2);
  EXPECT_EQ(cache.stats().cached_pages, Pages{0});  // taken out of the evictable set
  expect_consistent(cache);
}

TEST(ContentCacheTest, EvictionTakesTheLeastRecentlyUsedAndATailBeforeItsHead) {
  PagedKVCache cache(kOne, pages(8, kOne), kPage);
  ASSERT_TRUE(cache.allocate_paged("old", seq(0, 9)));     // pages A0 A1 (+ a partial)
  ASSERT_TRUE(cache.allocate_paged("new", seq(100, 9)));   // pages B0 B1 (+ a partial)
  cache.free("old");  // A1 then A0 become cached: A1 is the older of the two
  cache.free("new");  // then B1, B0
  ASSERT_EQ(cache.stats().cached_pages, Pages{4});
  static_cast<void>(cache.drain_events());
  // 4 free pages; a request of 6 pages evicts exactly 2 blocks: A1 then A0.
  ASSERT_TRUE(cache.allocate_paged("big", seq(500, 24)));
  auto events = cache.drain_events();
  std::vector<std::uint64_t> removed;
  for (const KvEvent& e : events) {
    if (e.kind == KvEventKind::removed) {
      EXPECT_EQ(e.reason, KvRemovalReason::evicted);
      removed.push_back(e.key);
    }
  }
  const auto& reg = cache.registry();
  const std::uint64_t a0 = reg.block_key(std::nullopt, "", seq(0, 4));
  const std::uint64_t a1 = reg.block_key(a0, "", seq(4, 4));
  EXPECT_EQ(removed, (std::vector<std::uint64_t>{a1, a0}));
  EXPECT_EQ(cache.stats().prefix.blocks_evicted, 2U);
  cache.free("big");
  // "new"'s blocks survived: a prompt starting with them hits.
  ASSERT_TRUE(cache.allocate_paged("again", seq(100, 9)));
  EXPECT_EQ(cache.cached_tokens("again"), Tokens{8});
  expect_consistent(cache);
}

TEST(ContentCacheTest, AHitMakesABlockRecentlyUsedAgain) {
  PagedKVCache cache(kOne, pages(4, kOne), kPage);
  ASSERT_TRUE(cache.allocate_paged("a", seq(0, 5)));    // A0 keyed
  ASSERT_TRUE(cache.allocate_paged("b", seq(100, 5)));  // B0 keyed
  cache.free("a");
  cache.free("b");                                      // LRU: A0, B0
  ASSERT_TRUE(cache.allocate_paged("a2", seq(0, 5)));   // hits A0, then frees it again
  cache.free("a2");                                     // LRU: B0, A0
  // x needs 4 pages: the 2 free ones, then B0 and A0 evicted, B0 first.
  ASSERT_TRUE(cache.allocate_paged("x", seq(900, 13)));
  std::vector<std::uint64_t> removed;
  for (const KvEvent& e : cache.drain_events()) {
    if (e.kind == KvEventKind::removed) removed.push_back(e.key);
  }
  const auto& reg = cache.registry();
  EXPECT_EQ(removed, (std::vector<std::uint64_t>{reg.block_key(std::nullopt, "", seq(100, 4)),
                                                 reg.block_key(std::nullopt, "", seq(0, 4))}));
  expect_consistent(cache);
}

// ---------------------------------------------------------------------------
// Events

TEST(ContentCacheTest, EventsComeInOrderWithTheirFieldsAndReasons) {
  PagedKVCache cache(kOne, pages(3, kOne), kPage);
  ASSERT_TRUE(cache.allocate_paged("a", seq(10, 9), "t"));  // stores 2 blocks
  cache.free("a");
  ASSERT_TRUE(cache.allocate_paged("b", seq(50, 11)));  // evicts both, stores 2
  ASSERT_EQ(cache.clear_prefix_cache(), 2U);            // removes b's 2 (cleared), all_cleared
  const std::vector<KvEvent> ev = cache.drain_events();
  ASSERT_EQ(ev.size(), 2U + 2U + 2U + 2U + 1U);
  for (std::size_t i = 1; i < ev.size(); ++i) EXPECT_EQ(ev[i].seq, ev[i - 1].seq + 1);
  const auto& reg = cache.registry();
  const std::uint64_t a0 = reg.block_key(std::nullopt, "t", seq(10, 4));
  const std::uint64_t a1 = reg.block_key(a0, "t", seq(14, 4));
  EXPECT_EQ(ev[0].kind, KvEventKind::stored);
  EXPECT_EQ(ev[0].key, a0);
  EXPECT_FALSE(ev[0].parent_key.has_value());
  EXPECT_EQ(ev[0].first_token, 0U);
  EXPECT_EQ(ev[0].token_ids, seq(10, 4));
  EXPECT_EQ(ev[0].salt, "t");
  EXPECT_EQ(ev[1].kind, KvEventKind::stored);
  EXPECT_EQ(ev[1].key, a1);
  EXPECT_EQ(ev[1].parent_key, a0);
  EXPECT_EQ(ev[1].first_token, 4U);
  EXPECT_EQ(ev[1].token_ids, seq(14, 4));
  // b needs 3 pages: 1 free, then a's blocks evicted, tail first.
  EXPECT_EQ(ev[2].kind, KvEventKind::removed);
  EXPECT_EQ(ev[2].key, a1);
  EXPECT_EQ(ev[2].reason, KvRemovalReason::evicted);
  EXPECT_EQ(ev[3].key, a0);
  EXPECT_EQ(ev[4].kind, KvEventKind::stored);
  EXPECT_EQ(ev[5].kind, KvEventKind::stored);
  EXPECT_EQ(ev[6].kind, KvEventKind::removed);
  EXPECT_EQ(ev[6].reason, KvRemovalReason::cleared);
  EXPECT_EQ(ev[7].reason, KvRemovalReason::cleared);
  EXPECT_EQ(ev[8].kind, KvEventKind::all_cleared);
  EXPECT_TRUE(cache.drain_events().empty());
  // The pages b holds stay b's; only their keys are gone.
  EXPECT_EQ(cache.stats().used_pages, Pages{3});
  EXPECT_EQ(cache.stats().cached_pages, Pages{0});
  expect_consistent(cache);
}

TEST(ContentCacheTest, RecordingCanBeTurnedOffAndSequenceNumbersNeverRepeat) {
  PagedKVCache cache(kOne, pages(8, kOne), kPage);
  ASSERT_TRUE(cache.allocate_paged("a", seq(0, 5)));
  const auto first = cache.drain_events();
  ASSERT_EQ(first.size(), 1U);
  cache.record_events(false);
  ASSERT_TRUE(cache.allocate_paged("b", seq(100, 5)));
  EXPECT_TRUE(cache.drain_events().empty());
  cache.record_events(true);
  ASSERT_TRUE(cache.allocate_paged("c", seq(200, 5)));
  const auto later = cache.drain_events();
  ASSERT_EQ(later.size(), 1U);
  EXPECT_GT(later[0].seq, first[0].seq);
}

// ---------------------------------------------------------------------------
// Errors

TEST(ContentCacheTest, ErrorsThrowTheRightTypeAndChangeNothing) {
  PagedKVCache cache(kTwo, pages(10), kPage);
  ASSERT_TRUE(cache.allocate_paged("c", seq(0, 5)));
  ASSERT_TRUE(cache.allocate_paged("t", Tokens{5}));
  const Snapshot before = snapshot(cache);
  EXPECT_THROW((void)cache.append_token_ids("nobody", seq(0, 1)), kvcache::UnknownRequest);
  EXPECT_THROW((void)cache.cached_tokens("nobody"), kvcache::UnknownRequest);
  // Token ids into a request allocated by a token count: logic_error.
  EXPECT_THROW((void)cache.append_token_ids("t", seq(0, 1)), std::logic_error);
  // Per-layer appends into a content request: logic_error (its layers move together).
  EXPECT_THROW((void)cache.append_token_paged("c", 0), std::logic_error);
  EXPECT_THROW((void)cache.append_token_paged("c", 0, row(1, 0, 0), row(1, 0, 0)), std::logic_error);
  EXPECT_THROW((void)cache.append_token_all_layers("c"), std::logic_error);
  EXPECT_EQ(snapshot(cache), before);
  try {
    (void)cache.append_token_ids("t", seq(0, 1));
  } catch (const std::logic_error& e) {
    EXPECT_NE(std::string(e.what()).find("\"t\""), std::string::npos) << e.what();
  }
  expect_consistent(cache);
}

// ---------------------------------------------------------------------------
// Together with fork, copy-on-write and named prefixes

TEST(ContentCacheTest, CopyOnWriteKeepsCachedContentIntact) {
  PagedKVCache cache(kOne, pages(10, kOne), kPage);
  ASSERT_TRUE(cache.allocate_paged("a", seq(0, 9)));
  write_all(cache, "a", 1, 0, 9);
  ASSERT_TRUE(cache.allocate_paged("b", seq(0, 9)));
  ASSERT_EQ(cache.cached_tokens("b"), Tokens{8});
  // b overwrites a shared token: its own copy, a and the cache unchanged.
  cache.write_kv("b", 0, 1, row(9, 0, 1), row(9, 0, 1));
  EXPECT_NE(table(cache, "b", 0)[0], table(cache, "a", 0)[0]);
  expect_tokens(cache, "a", 0, 9, 1);
  ASSERT_TRUE(cache.allocate_paged("c", seq(0, 9)));
  expect_tokens(cache, "c", 0, 8, 1);
  EXPECT_GE(cache.stats().prefix.cow_copies, 1U);
  expect_consistent(cache);
}

TEST(ContentCacheTest, AForkedChildContinuesTheKeyChain) {
  PagedKVCache cache(kOne, pages(10, kOne), kPage);
  ASSERT_TRUE(cache.allocate_paged("p", seq(0, 6)));
  write_all(cache, "p", 1, 0, 6);
  ASSERT_TRUE(cache.fork("p", "c"));
  EXPECT_TRUE(cache.content_addressed("c"));
  // Both append different tokens into the shared partial page: each copies.
  ASSERT_TRUE(cache.append_token_ids("p", seq(6, 2)));
  ASSERT_TRUE(cache.append_token_ids("c", std::vector<TokenId>{70, 71}));
  EXPECT_NE(table(cache, "p", 0)[1], table(cache, "c", 0)[1]);
  expect_tokens(cache, "c", 0, 6, 1);
  expect_tokens(cache, "c", 6, 8, 0);
  // Both second pages are findable under their own content.
  ASSERT_TRUE(cache.allocate_paged("q", cat(seq(0, 8), seq(0, 1))));
  EXPECT_EQ(cache.cached_tokens("q"), Tokens{8});
  EXPECT_EQ(table(cache, "q", 0)[1], table(cache, "p", 0)[1]);
  ASSERT_TRUE(cache.allocate_paged("r", std::vector<TokenId>{0, 1, 2, 3, 4, 5, 70, 71, 9}));
  EXPECT_EQ(table(cache, "r", 0)[1], table(cache, "c", 0)[1]);
  expect_consistent(cache);
}

TEST(ContentCacheTest, EqualDecodesInTwoRequestsMakeOneBlock) {
  PagedKVCache cache(kOne, pages(10, kOne), kPage);
  ASSERT_TRUE(cache.allocate_paged("p", seq(0, 2)));
  ASSERT_TRUE(cache.fork("p", "c"));
  ASSERT_TRUE(cache.append_token_ids("p", seq(2, 2)));
  ASSERT_TRUE(cache.append_token_ids("c", seq(2, 2)));
  EXPECT_EQ(cache.stats().prefix.blocks_stored, 1U);
  EXPECT_EQ(cache.stats().prefix.blocks_duplicate, 1U);
  // The chain goes on from the existing block: c's next page is findable.
  ASSERT_TRUE(cache.append_token_ids("c", seq(4, 4)));
  ASSERT_TRUE(cache.allocate_paged("q", seq(0, 9)));
  EXPECT_EQ(cache.cached_tokens("q"), Tokens{8});
  EXPECT_EQ(table(cache, "q", 0)[1], table(cache, "c", 0)[1]);
  expect_consistent(cache);
}

TEST(ContentCacheTest, NamedPrefixesAndContentBlocksShareOnePoolAndOneCachedCount) {
  PagedKVCache cache(kOne, pages(6, kOne), kPage);
  ASSERT_TRUE(cache.allocate_paged("n", Tokens{8}, "sys", Tokens{8}));  // 2 pages, named
  ASSERT_TRUE(cache.allocate_paged("c", seq(0, 9)));                    // 3 pages, 2 keyed
  cache.free("n");
  cache.free("c");
  EXPECT_EQ(cache.stats().cached_pages, Pages{4});
  EXPECT_EQ(cache.stats().free_pages, Pages{2});
  // 5 pages: 2 free + the LRU entries: the named prefix (freed first), then
  // the content tail block.
  ASSERT_TRUE(cache.allocate_paged("big", Tokens{20}));
  EXPECT_FALSE(cache.has_prefix("sys"));
  EXPECT_EQ(cache.stats().prefix.blocks_evicted, 1U);
  EXPECT_EQ(cache.stats().cached_pages, Pages{1});
  expect_consistent(cache);
  EXPECT_EQ(cache.cached_tokens("big"), Tokens{0});
}

TEST(ContentCacheTest, ANamedPrefixHitReportsItsTokensAsCached) {
  PagedKVCache cache(kOne, pages(10, kOne), kPage);
  ASSERT_TRUE(cache.allocate_paged("a", Tokens{9}, "sys", Tokens{6}));
  EXPECT_EQ(cache.cached_tokens("a"), Tokens{0});
  ASSERT_TRUE(cache.allocate_paged("b", Tokens{9}, "sys", Tokens{6}));
  EXPECT_EQ(cache.cached_tokens("b"), Tokens{6});
  EXPECT_FALSE(cache.content_addressed("b"));
}

// Regression (fuzzer, tests/fuzz/corpus/regression-content-huge-page-reserve):
// allocation reserved room for a whole page of token ids up front, so a page
// size of 2^46 in Storage::none asked for 2^48 bytes.
TEST(ContentCacheTest, AHugePageSizeReservesNothingUpFront) {
  const Tokens page{1ULL << 46};
  PagedKVCache cache(kOne, Bytes{4 * kOne.bytes_per_page(page).count()}, page, Storage::none);
  ASSERT_TRUE(cache.allocate_paged("a", seq(0, 9)));
  for (TokenId t = 9; t < 100; ++t) ASSERT_TRUE(cache.append_token_ids("a", std::vector<TokenId>{t}));
  ASSERT_TRUE(cache.allocate_paged("b", seq(0, 9)));
  EXPECT_EQ(cache.cached_tokens("b"), Tokens{0});  // no full page to share
  EXPECT_EQ(cache.tokens("a", 0), Tokens{100});
  expect_consistent(cache);
}

TEST(ContentCacheTest, StorageNoneKeepsTheSameBookkeeping) {
  PagedKVCache cache(kTwo, pages(10), kPage, Storage::none);
  ASSERT_TRUE(cache.allocate_paged("a", seq(0, 9)));
  ASSERT_TRUE(cache.allocate_paged("b", seq(0, 9)));
  EXPECT_EQ(cache.cached_tokens("b"), Tokens{8});
  EXPECT_EQ(cache.block_table("b", 1)[0], cache.block_table("a", 1)[0]);
  ASSERT_TRUE(cache.append_token_ids("b", seq(9, 3)));
  expect_consistent(cache);
}

}  // namespace
