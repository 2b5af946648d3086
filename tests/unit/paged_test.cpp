// Unit tests for kvcache.paged: PagedKVCache without prefix sharing (CONTRACT.md
// "PagedKVCache", "Errors", "KV data"; prefix sharing is in prefix_test.cpp).
//
// Every failure path checks the exception type (or the `false`) AND that the
// cache is exactly as before: `Snapshot` captures every field of stats(),
// memory_efficiency(), the pool's free list in order, every live request's
// pages_held(), tokens and block table of every layer, and (host mode) every
// key and value byte that get_kv returns.
//
// Most tests use a small model (3 layers, 1 KV head, head_dim 4, 2-byte
// elements: 8-byte rows) with page size 4, so one page of one layer is
// 4 * 8 * 2 = 64 bytes and a budget of `pages(n)` gives a pool of n pages.
// Pools stay small because the test preset audits every mutation
// (check_invariants is O(pages + block-table entries), and so is each pool
// allocation).
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <ostream>
#include <set>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

import kvcache;

namespace {

using kvcache::Admission;
using kvcache::Bytes;
using kvcache::ModelConfig;
using kvcache::PagedKVCache;
using kvcache::PagedStats;
using kvcache::PageId;
using kvcache::Pages;
using kvcache::Storage;
using kvcache::Tokens;

constexpr ModelConfig kSmall{3, 1, 4, 2};  // 8-byte rows
constexpr std::size_t kRow = 8;
constexpr Tokens kPage{4};
constexpr std::uint64_t kPageBytes = 64;  // 4 slots * 8 bytes * (K + V)
constexpr ModelConfig kFloat{2, 2, 2, 4};  // fp32: 4 floats = 16 bytes per row
constexpr ModelConfig kSeed{32, 8, 128, 2};
constexpr std::uint64_t kMax = std::numeric_limits<std::uint64_t>::max();
constexpr std::size_t kMiB = std::size_t{1} << 20;

static_assert(kSmall.kv_bytes_per_token_per_layer() == Bytes{kRow});
static_assert(kSmall.bytes_per_page(kPage) == Bytes{kPageBytes});

// A budget of exactly n pages of `cfg` with page size `ps`.
Bytes pages(std::uint64_t n, ModelConfig cfg = kSmall, Tokens ps = kPage) {
  return Bytes{n * cfg.bytes_per_page(ps).count()};
}

// A row of `n` bytes unique to (tag, layer, token); never all zero.
std::vector<std::byte> row(std::uint8_t tag, std::size_t layer, std::size_t token,
                           std::size_t n = kRow) {
  std::vector<std::byte> r(n);
  for (std::size_t i = 0; i < n; ++i) {
    r[i] = static_cast<std::byte>(((std::size_t{tag} * 131U) ^ (layer * 37U) ^ (token * 11U) ^ (i * 7U)) | 1U);
  }
  return r;
}
std::vector<std::byte> key_row(std::size_t layer, std::size_t token, std::size_t n = kRow) {
  return row(0x4B, layer, token, n);
}
std::vector<std::byte> value_row(std::size_t layer, std::size_t token, std::size_t n = kRow) {
  return row(0x56, layer, token, n);
}
const std::vector<std::byte> kZeroRow(kRow, std::byte{0});

std::vector<std::byte> copy(std::span<const std::byte> s) { return {s.begin(), s.end()}; }

std::vector<std::uint64_t> ids(std::span<const PageId> table) {
  std::vector<std::uint64_t> out;
  out.reserve(table.size());
  for (const PageId p : table) out.push_back(static_cast<std::uint64_t>(p));
  return out;
}

std::vector<std::uint64_t> free_list(const PagedKVCache& cache) {
  return ids(cache.pool().free_list());
}

// Every page id in the request's block tables, over all layers.
std::vector<std::uint64_t> all_pages(const PagedKVCache& cache, std::string_view id) {
  std::vector<std::uint64_t> out;
  for (std::size_t l = 0; l < cache.config().num_layers; ++l) {
    for (const std::uint64_t p : ids(cache.block_table(id, l))) out.push_back(p);
  }
  return out;
}

// ---------------------------------------------------------------------------
// Snapshot: everything observable about a cache

struct RequestState {
  std::string id;
  Pages held;
  std::vector<Tokens> tokens;                             // per layer
  std::vector<std::vector<std::uint64_t>> tables;         // per layer: page indices
  std::vector<std::vector<std::vector<std::byte>>> keys;  // [layer][token] (host mode)
  std::vector<std::vector<std::vector<std::byte>>> values;
  friend bool operator==(const RequestState&, const RequestState&) = default;
};

struct Snapshot {
  // stats(), field by field
  Pages total_pages;
  Pages free_pages;
  Pages used_pages;
  Pages cached_pages;
  Bytes used_memory;
  std::size_t num_requests = 0;
  std::uint64_t prefix_hits = 0;
  std::uint64_t prefix_misses = 0;
  double utilization_pct = 0;
  Tokens stored_tokens;
  Tokens page_size;
  Bytes bytes_per_page;
  std::size_t registered_prefixes = 0;
  std::array<std::uint64_t, 7> counters{};
  // the rest
  double efficiency = 0;
  std::vector<std::uint64_t> free_list;
  std::vector<RequestState> requests;  // sorted by id
  friend bool operator==(const Snapshot&, const Snapshot&) = default;

  friend void PrintTo(const Snapshot& s, std::ostream* os) {
    *os << "{pages total " << s.total_pages.count() << " free " << s.free_pages.count()
        << " used " << s.used_pages.count() << " cached " << s.cached_pages.count()
        << ", used " << s.used_memory << ", requests " << s.num_requests << ", stored "
        << s.stored_tokens.count() << ", util " << s.utilization_pct << "%, eff "
        << s.efficiency << ", free list";
    for (const std::uint64_t p : s.free_list) *os << ' ' << p;
    *os << ';';
    for (const RequestState& r : s.requests) {
      *os << " \"" << r.id << "\"(" << r.held.count() << " pages:";
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
  const PagedStats st = cache.stats();
  Snapshot s;
  s.total_pages = st.total_pages;
  s.free_pages = st.free_pages;
  s.used_pages = st.used_pages;
  s.cached_pages = st.cached_pages;
  s.used_memory = st.used_memory;
  s.num_requests = st.num_requests;
  s.prefix_hits = st.prefix_hits;
  s.prefix_misses = st.prefix_misses;
  s.utilization_pct = st.utilization_pct;
  s.stored_tokens = st.stored_tokens;
  s.page_size = st.page_size;
  s.bytes_per_page = st.bytes_per_page;
  s.registered_prefixes = st.registered_prefixes;
  s.counters = {st.prefix.hits,        st.prefix.misses,           st.prefix.tokens_saved,
                st.prefix.pages_saved, st.prefix.cow_copies,       st.prefix.prefixes_evicted,
                st.prefix.pages_evicted};
  s.efficiency = cache.memory_efficiency();
  s.free_list = free_list(cache);
  std::vector<std::string> live = cache.request_ids();
  std::sort(live.begin(), live.end());
  for (const std::string& id : live) {
    RequestState r{id, cache.pages_held(id), {}, {}, {}, {}};
    for (std::size_t l = 0; l < cache.config().num_layers; ++l) {
      r.tokens.push_back(cache.tokens(id, l));
      r.tables.push_back(ids(cache.block_table(id, l)));
      if (cache.storage() == Storage::host) {
        const auto [keys, values] = cache.get_kv(id, l);
        auto& k = r.keys.emplace_back();
        auto& v = r.values.emplace_back();
        for (const std::span<const std::byte> t : keys) k.push_back(copy(t));
        for (const std::span<const std::byte> t : values) v.push_back(copy(t));
      }
    }
    s.requests.push_back(std::move(r));
  }
  return s;
}

// Conservation and the derived fields, checked at every step of the longer tests.
void expect_consistent(const PagedKVCache& cache) {
  const PagedStats s = cache.stats();
  EXPECT_EQ(s.free_pages + s.used_pages + s.cached_pages, s.total_pages);
  EXPECT_EQ(s.used_memory, Bytes{s.used_pages.count() * s.bytes_per_page.count()});
  EXPECT_EQ(s.num_requests, cache.request_ids().size());
  EXPECT_EQ(s.free_pages, Pages{cache.pool().free_list().size()});
  if (s.total_pages.count() != 0) {
    EXPECT_DOUBLE_EQ(s.utilization_pct, static_cast<double>(s.used_pages.count()) * 100.0 /
                                            static_cast<double>(s.total_pages.count()));
  }
  const double e = cache.memory_efficiency();
  EXPECT_GE(e, 0.0);
  EXPECT_LE(e, 1.0);
  if (s.used_pages == Pages{0}) EXPECT_EQ(e, 0.0);
  EXPECT_TRUE(cache.check_invariants());
}

// "a": 5 tokens (2 pages per layer), layer 0 holding 6 written tokens, layer 2
// one more; "b": 1 token (1 page per layer). 9 of 12 pages used. Every prompt
// token of "a" written in layers 0 and 1.
PagedKVCache populated_cache(std::uint64_t pool = 12) {
  PagedKVCache cache(kSmall, pages(pool), kPage);
  EXPECT_TRUE(cache.allocate_paged("a", Tokens{5}));
  EXPECT_TRUE(cache.allocate_paged("b", Tokens{1}));
  for (std::size_t l = 0; l < 2; ++l) {
    for (std::size_t t = 0; t < 5; ++t) cache.write_kv("a", l, t, key_row(l, t), value_row(l, t));
  }
  EXPECT_TRUE(cache.append_token_paged("a", 0, key_row(0, 5), value_row(0, 5)));
  EXPECT_TRUE(cache.append_token_paged("a", 2, key_row(2, 5), value_row(2, 5)));
  cache.write_kv("b", 1, 0, key_row(1, 0), value_row(1, 0));
  return cache;
}

template <class E, class F>
std::string message_of(F&& f) {
  try {
    std::forward<F>(f)();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw an exception of another type: " << e.what();
    return {};
  } catch (...) {
    ADD_FAILURE() << "threw a non-std exception";
    return {};
  }
  ADD_FAILURE() << "did not throw";
  return {};
}

// Expects `f` to throw std::out_of_range that is not UnknownRequest.
template <class F>
void expect_out_of_range_not_unknown(F&& f) {
  try {
    std::forward<F>(f)();
    ADD_FAILURE() << "did not throw";
  } catch (const kvcache::UnknownRequest& e) {
    ADD_FAILURE() << "threw UnknownRequest for a bad layer: " << e.what();
  } catch (const std::out_of_range&) {
    SUCCEED();
  } catch (...) {
    ADD_FAILURE() << "threw an exception of another type";
  }
}

bool has(const std::string& haystack, std::string_view needle) {
  return haystack.find(needle) != std::string::npos;
}

std::size_t resident_bytes() {
  std::ifstream status("/proc/self/status");
  std::string key;
  while (status >> key) {
    if (key == "VmRSS:") {
      std::size_t kib = 0;
      status >> kib;
      return kib * 1024;
    }
    status.ignore(1 << 12, '\n');
  }
  return 0;
}

std::size_t grew(std::size_t before, std::size_t after) {
  return after > before ? after - before : 0;
}

std::uint64_t ceil_div(std::uint64_t a, std::uint64_t b) { return (a + b - 1) / b; }

// The failure-path checks compare snapshots: make sure a snapshot sees each
// kind of change (stats, free-list order, a block table, a byte).
TEST(PagedKVCacheTest, SnapshotSeesEveryKindOfChange) {
  PagedKVCache cache = populated_cache();
  Snapshot s0 = snapshot(cache);
  cache.write_kv("a", 1, 4, key_row(1, 3), value_row(1, 4));  // one key row differs
  Snapshot s1 = snapshot(cache);
  EXPECT_NE(s1, s0);
  EXPECT_EQ(s1.free_list, s0.free_list);
  ASSERT_TRUE(cache.append_token_paged("b", 2));  // tokens and stats, no page
  Snapshot s2 = snapshot(cache);
  EXPECT_NE(s2, s1);
  EXPECT_EQ(s2.free_list, s1.free_list);
  ASSERT_TRUE(cache.allocate_paged("c", Tokens{0}));
  ASSERT_TRUE(cache.allocate_paged("d", Tokens{0}));
  for (int t = 0; t < 9; ++t) ASSERT_TRUE(cache.append_token_paged("d", 0));  // 3 pages
  EXPECT_EQ(cache.stats().free_pages, Pages{0});
  cache.free("d");  // the same pages, back on the free list last first: another order
  Snapshot s3 = snapshot(cache);
  EXPECT_NE(s3.free_list, s2.free_list);
  EXPECT_EQ(s3.used_pages, s2.used_pages);
  s3.free_list = s2.free_list;
  EXPECT_NE(s3, s2);  // and "c" is a new request
  cache.free("c");
  Snapshot s4 = snapshot(cache);
  s4.free_list = s2.free_list;
  EXPECT_EQ(s4, s2);
}

// ---------------------------------------------------------------------------
// Construction

TEST(PagedKVCacheTest, BuiltWithTheContractSignature) {
  PagedKVCache cache({32, 8, 128, 2}, Bytes{8ULL << 30}, Tokens{16});
  EXPECT_EQ(cache.config(), kSeed);
  EXPECT_EQ(cache.page_size(), Tokens{16});
  EXPECT_EQ(cache.storage(), Storage::host);  // the default
  EXPECT_EQ(cache.bytes_per_page(), Bytes{16ULL * 8 * 128 * 2 * 2});
  EXPECT_EQ(cache.total_pages(), Pages{(8ULL << 30) / 65536});  // 131072
  const PagedStats s = cache.stats();
  EXPECT_EQ(s.total_pages, Pages{131072});
  EXPECT_EQ(s.free_pages, Pages{131072});
  EXPECT_EQ(s.used_pages, Pages{0});
  EXPECT_EQ(s.cached_pages, Pages{0});
  EXPECT_EQ(s.used_memory, Bytes{0});
  EXPECT_EQ(s.num_requests, 0U);
  EXPECT_EQ(s.prefix_hits, 0U);
  EXPECT_EQ(s.prefix_misses, 0U);
  EXPECT_DOUBLE_EQ(s.utilization_pct, 0.0);
  EXPECT_EQ(s.stored_tokens, Tokens{0});
  EXPECT_EQ(s.page_size, Tokens{16});
  EXPECT_EQ(s.bytes_per_page, Bytes{65536});
  EXPECT_EQ(s.registered_prefixes, 0U);
  EXPECT_EQ(cache.memory_efficiency(), 0.0);
  EXPECT_EQ(cache.num_requests(), 0U);
  EXPECT_TRUE(cache.request_ids().empty());
  EXPECT_EQ(cache.registry().total_pages(), Pages{131072});
  EXPECT_TRUE(cache.check_invariants());
}

TEST(PagedKVCacheTest, TotalPagesIsBudgetDividedByBytesPerPage) {
  struct Case {
    std::uint64_t budget;
    std::uint64_t pages;
  };
  const std::vector<Case> cases = {{0, 0}, {1, 0}, {63, 0}, {64, 1}, {127, 1}, {128, 2}, {64 * 10 + 63, 10}};
  for (const auto& c : cases) {
    SCOPED_TRACE(c.budget);
    PagedKVCache cache(kSmall, Bytes{c.budget}, kPage);
    EXPECT_EQ(cache.stats().total_pages, Pages{c.pages});
    EXPECT_EQ(cache.stats().free_pages, Pages{c.pages});
    EXPECT_EQ(cache.pool().free_list().size(), c.pages);
    EXPECT_TRUE(cache.check_invariants());
  }
  // Another page size, another model: 3 slots * 16-byte rows * (K + V) = 96 bytes.
  PagedKVCache f(kFloat, Bytes{96 * 7 + 95}, Tokens{3});
  EXPECT_EQ(f.bytes_per_page(), Bytes{96});
  EXPECT_EQ(f.total_pages(), Pages{7});
}

TEST(PagedKVCacheTest, EmptyPoolAcceptsOnlyEmptyPrompts) {
  PagedKVCache cache(kSmall, Bytes{63}, kPage);
  EXPECT_DOUBLE_EQ(cache.stats().utilization_pct, 0.0);
  EXPECT_FALSE(cache.allocate_paged("one", Tokens{1}));
  ASSERT_TRUE(cache.allocate_paged("empty", Tokens{0}));
  EXPECT_EQ(cache.memory_efficiency(), 0.0);
  EXPECT_DOUBLE_EQ(cache.stats().utilization_pct, 0.0);
  EXPECT_EQ(cache.admission(Tokens{1}), Admission::never);
  EXPECT_EQ(cache.max_prompt_tokens(), Tokens{0});
  expect_consistent(cache);
}

TEST(PagedKVCacheTest, InvalidConfigThrowsInvalidArgumentNamingTheField) {
  struct Case {
    ModelConfig cfg;
    const char* field;
  };
  const std::vector<Case> cases = {
      {{0, 8, 128, 2}, "num_layers"},
      {{32, 0, 128, 2}, "num_kv_heads"},
      {{32, 8, 0, 2}, "head_dim"},
      {{32, 8, 128, 0}, "dtype_bytes"},
      {{2, 1U << 31, 1U << 31, 1}, "num_layers"},  // 2^64 bytes per token
      {{1, 0xFFFFFFFFU, 0xFFFFFFFFU, 2}, "dtype_bytes"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(kvcache::to_string(c.cfg));
    const std::string msg = message_of<std::invalid_argument>(
        [&] { PagedKVCache cache(c.cfg, Bytes{1ULL << 20}, Tokens{16}); });
    EXPECT_TRUE(has(msg, c.field)) << msg;
    // Also in bookkeeping-only mode.
    EXPECT_THROW(PagedKVCache(c.cfg, Bytes{1ULL << 20}, Tokens{16}, Storage::none),
                 std::invalid_argument);
  }
}

TEST(PagedKVCacheTest, PageSizeZeroThrowsInvalidArgument) {
  const std::string msg =
      message_of<std::invalid_argument>([] { PagedKVCache cache(kSmall, pages(4), Tokens{0}); });
  EXPECT_TRUE(has(msg, "page")) << msg;
  EXPECT_THROW(PagedKVCache(kSmall, Bytes{0}, Tokens{0}, Storage::none), std::invalid_argument);
}

TEST(PagedKVCacheTest, BytesPerPageOverflowThrowsOverflowError) {
  // {1, 1, 1, 1}: 2 bytes per token per layer (K + V); 2^63 tokens per page
  // make 2^64 bytes.
  EXPECT_THROW(PagedKVCache({1, 1, 1, 1}, Bytes{1ULL << 20}, Tokens{1ULL << 63}),
               std::overflow_error);
  EXPECT_THROW(PagedKVCache(kSeed, Bytes{8ULL << 30}, Tokens::max()), std::overflow_error);
  EXPECT_THROW(PagedKVCache(kSeed, Bytes{8ULL << 30}, Tokens::max(), Storage::none),
               std::overflow_error);
  // One below: 2^63 - 1 tokens of 2 bytes fit; the pool is empty.
  PagedKVCache edge({1, 1, 1, 1}, Bytes{1ULL << 20}, Tokens{(1ULL << 63) - 1});
  EXPECT_EQ(edge.bytes_per_page(), Bytes{kMax - 1});
  EXPECT_EQ(edge.total_pages(), Pages{0});
}

TEST(PagedKVCacheTest, MorePagesThanAPageIdCanNameThrowsInvalidArgument) {
  // {1, 1, 1, 1} with page size 1: 2 bytes per page.
  const std::uint64_t too_many = kvcache::PagePool::max_capacity + 1;  // 2^32
  const std::string msg = message_of<std::invalid_argument>(
      [&] { PagedKVCache cache({1, 1, 1, 1}, Bytes{2 * too_many}, Tokens{1}); });
  EXPECT_TRUE(has(msg, std::to_string(too_many))) << msg;
  EXPECT_THROW(PagedKVCache({1, 1, 1, 1}, Bytes::max(), Tokens{1}), std::invalid_argument);
  EXPECT_THROW(PagedKVCache({1, 1, 1, 1}, Bytes::max(), Tokens{1}, Storage::none),
               std::invalid_argument);
}

// ---------------------------------------------------------------------------
// allocate_paged

TEST(PagedKVCacheTest, AllocateTakesCeilPromptOverPageSizePagesInEveryLayer) {
  PagedKVCache cache(kSmall, pages(200), kPage);
  std::uint64_t used = 0;
  std::uint64_t stored = 0;
  std::set<std::uint64_t> seen;
  for (std::uint64_t n = 0; n <= 13; ++n) {
    SCOPED_TRACE(n);
    const std::string id = "r" + std::to_string(n);
    const std::uint64_t per_layer = ceil_div(n, 4);
    EXPECT_EQ(cache.pages_needed_to_allocate(Tokens{n}), Pages{3 * per_layer});
    ASSERT_TRUE(cache.allocate_paged(id, Tokens{n}));
    used += 3 * per_layer;
    stored += 3 * n;
    EXPECT_EQ(cache.pages_held(id), Pages{3 * per_layer});
    for (std::size_t l = 0; l < 3; ++l) {
      EXPECT_EQ(cache.block_table(id, l).size(), per_layer);
      EXPECT_EQ(cache.tokens(id, l), Tokens{n});
      const auto [keys, values] = cache.get_kv(id, l);
      EXPECT_EQ(keys.size(), n);
      EXPECT_EQ(values.size(), n);
    }
    for (const std::uint64_t p : all_pages(cache, id)) {
      EXPECT_LT(p, 200U);
      EXPECT_TRUE(seen.insert(p).second) << "page " << p << " handed out twice";
    }
    const PagedStats s = cache.stats();
    EXPECT_EQ(s.used_pages, Pages{used});
    EXPECT_EQ(s.free_pages, Pages{200 - used});
    EXPECT_EQ(s.used_memory, Bytes{used * kPageBytes});
    EXPECT_EQ(s.stored_tokens, Tokens{stored});
    EXPECT_EQ(s.num_requests, n + 1);
    expect_consistent(cache);
  }
}

TEST(PagedKVCacheTest, ZeroTokenPromptTakesNoPages) {
  PagedKVCache cache(kSmall, pages(6), kPage);
  const std::vector<std::uint64_t> fl = free_list(cache);
  ASSERT_TRUE(cache.allocate_paged("z", Tokens{0}));
  EXPECT_TRUE(cache.contains("z"));
  EXPECT_EQ(cache.pages_held("z"), Pages{0});
  for (std::size_t l = 0; l < 3; ++l) {
    EXPECT_TRUE(cache.block_table("z", l).empty());
    EXPECT_EQ(cache.tokens("z", l), Tokens{0});
    const auto [keys, values] = cache.get_kv("z", l);
    EXPECT_TRUE(keys.empty());
    EXPECT_TRUE(values.empty());
  }
  EXPECT_EQ(free_list(cache), fl);
  EXPECT_EQ(cache.stats().used_pages, Pages{0});
  EXPECT_EQ(cache.stats().num_requests, 1U);
  EXPECT_EQ(cache.memory_efficiency(), 0.0);  // no request holds a page
  // Its first token takes a page in that layer only.
  ASSERT_TRUE(cache.append_token_paged("z", 1, key_row(1, 0), value_row(1, 0)));
  EXPECT_EQ(cache.pages_held("z"), Pages{1});
  EXPECT_EQ(cache.block_table("z", 1).size(), 1U);
  EXPECT_EQ(copy(cache.get_kv("z", 1).keys[0]), key_row(1, 0));
  EXPECT_DOUBLE_EQ(cache.memory_efficiency(), 0.25);
  expect_consistent(cache);
}

TEST(PagedKVCacheTest, MemoryEfficiencyContractExampleOnAnyNumberOfLayers) {
  for (const std::uint32_t layers : {1U, 2U, 3U, 7U, 32U}) {
    for (const std::uint32_t heads : {1U, 8U}) {
      const ModelConfig cfg{layers, heads, 4, 2};
      SCOPED_TRACE(kvcache::to_string(cfg));
      PagedKVCache cache(cfg, pages(2ULL * layers, cfg), kPage);
      ASSERT_TRUE(cache.allocate_paged("r", Tokens{5}));
      EXPECT_DOUBLE_EQ(cache.memory_efficiency(), 0.625);
      EXPECT_EQ(cache.pages_held("r"), Pages{2 * layers});
      EXPECT_EQ(cache.stats().free_pages, Pages{0});
    }
  }
}

TEST(PagedKVCacheTest, DuplicateIdReturnsFalseAndChangesNothing) {
  PagedKVCache cache = populated_cache();
  const Snapshot before = snapshot(cache);
  EXPECT_FALSE(cache.allocate_paged("a", Tokens{5}));  // same prompt
  EXPECT_FALSE(cache.allocate_paged("a", Tokens{0}));  // one that needs nothing
  EXPECT_FALSE(cache.allocate_paged("b", Tokens{1}));
  EXPECT_EQ(snapshot(cache), before);
  expect_consistent(cache);
}

TEST(PagedKVCacheTest, OutOfMemoryReturnsFalseAndChangesNothing) {
  PagedKVCache cache = populated_cache();  // 9 of 12 pages used
  ASSERT_EQ(cache.stats().free_pages, Pages{3});
  const Snapshot before = snapshot(cache);
  EXPECT_FALSE(cache.can_allocate(Tokens{5}));
  EXPECT_FALSE(cache.allocate_paged("c", Tokens{5}));  // 6 pages > 3
  EXPECT_EQ(snapshot(cache), before);
  EXPECT_FALSE(cache.contains("c"));
  EXPECT_FALSE(cache.allocate_paged("c", Tokens{1ULL << 40}));
  EXPECT_EQ(snapshot(cache), before);
  expect_consistent(cache);
}

TEST(PagedKVCacheTest, ExactFitSucceedsAndOnePageMoreFails) {
  PagedKVCache cache = populated_cache();  // 3 pages free
  EXPECT_TRUE(cache.can_allocate(Tokens{4}));
  std::vector<std::uint64_t> was_free = free_list(cache);
  ASSERT_TRUE(cache.allocate_paged("c", Tokens{4}));  // 1 page per layer: exactly 3
  std::vector<std::uint64_t> got = all_pages(cache, "c");
  std::sort(got.begin(), got.end());
  std::sort(was_free.begin(), was_free.end());
  EXPECT_EQ(got, was_free);
  const PagedStats s = cache.stats();
  EXPECT_EQ(s.free_pages, Pages{0});
  EXPECT_EQ(s.used_pages, Pages{12});
  EXPECT_EQ(s.used_memory, Bytes{12 * kPageBytes});
  EXPECT_DOUBLE_EQ(s.utilization_pct, 100.0);
  EXPECT_TRUE(cache.pool().free_list().empty());
  const Snapshot full = snapshot(cache);
  EXPECT_FALSE(cache.can_allocate(Tokens{1}));
  EXPECT_FALSE(cache.allocate_paged("d", Tokens{1}));
  EXPECT_EQ(snapshot(cache), full);
  ASSERT_TRUE(cache.allocate_paged("d", Tokens{0}));  // needs no page
  EXPECT_EQ(cache.stats().num_requests, 4U);
  expect_consistent(cache);
}

// 8 layers, page size 4: a prompt of more than 4 * (2^61 - 1) tokens needs
// 8 * 2^61 = 2^64 pages or more.
constexpr ModelConfig kDeep{8, 1, 4, 2};

TEST(PagedKVCacheTest, PromptWhosePageCountOverflowsThrowsOverflowError) {
  PagedKVCache cache(kDeep, pages(16, kDeep), kPage);
  ASSERT_TRUE(cache.allocate_paged("a", Tokens{4}));
  const Snapshot before = snapshot(cache);
  const std::uint64_t largest = ((1ULL << 61) - 1) * 4;  // (2^61 - 1) pages per layer: fits
  EXPECT_EQ(cache.pages_needed_to_allocate(Tokens{largest}), Pages{((1ULL << 61) - 1) * 8});
  EXPECT_FALSE(cache.allocate_paged("big", Tokens{largest}));  // only out of memory
  EXPECT_THROW((void)cache.allocate_paged("big", Tokens{largest + 1}), std::overflow_error);
  EXPECT_THROW((void)cache.allocate_paged("big", Tokens::max()), std::overflow_error);
  EXPECT_THROW((void)cache.pages_needed_to_allocate(Tokens{largest + 1}), std::overflow_error);
  EXPECT_THROW((void)cache.can_allocate(Tokens::max()), std::overflow_error);
  EXPECT_THROW((void)cache.admission(Tokens::max()), std::overflow_error);
  EXPECT_EQ(snapshot(cache), before);
  EXPECT_FALSE(cache.contains("big"));
  expect_consistent(cache);
}

// Regression (fuzzer, tests/fuzz/corpus/regression-admission-prefix-hit-page-count-overflow):
// admission() with a registered prefix skipped the overflow check of the
// prompt's page count and answered Admission::never; every other admission
// helper throws std::overflow_error for the same arguments.
TEST(PagedKVCacheTest, AdmissionWithARegisteredPrefixThrowsForAnOverflowingPrompt) {
  PagedKVCache cache(kDeep, pages(16, kDeep), kPage);
  ASSERT_TRUE(cache.allocate_paged("a", Tokens{6}, "h0", Tokens{6}));
  const Snapshot before = snapshot(cache);
  EXPECT_THROW((void)cache.admission(Tokens::max(), "h0", Tokens{6}), std::overflow_error);
  EXPECT_THROW((void)cache.can_allocate(Tokens::max(), "h0", Tokens{6}), std::overflow_error);
  EXPECT_THROW((void)cache.pages_needed_to_allocate(Tokens::max(), "h0", Tokens{6}),
               std::overflow_error);
  EXPECT_EQ(snapshot(cache), before);
  // The largest prompt whose page count fits still gets an answer.
  const std::uint64_t largest = ((1ULL << 61) - 1) * 4;
  EXPECT_EQ(cache.admission(Tokens{largest}, "h0", Tokens{6}), kvcache::Admission::never);
  expect_consistent(cache);
}

// Regression (fuzzer, tests/fuzz/corpus/regression-efficiency-page-size-2p40-fork):
// the shared-page scan of memory_efficiency() kept a page's used slots in 32
// bits, so a page of 2^40 tokens counted as empty (0.0 instead of 1.0).
TEST(PagedKVCacheTest, MemoryEfficiencyOfSharedPagesLargerThan2To32Tokens) {
  constexpr ModelConfig one{1, 1, 1, 1};
  const Tokens page{1ULL << 40};
  PagedKVCache cache(one, Bytes{4 * one.bytes_per_page(page).count()}, page,
                     kvcache::Storage::none);
  ASSERT_TRUE(cache.allocate_paged("a", page));
  EXPECT_DOUBLE_EQ(cache.memory_efficiency(), 1.0);  // the O(1) path
  ASSERT_TRUE(cache.fork("a", "b"));
  EXPECT_DOUBLE_EQ(cache.memory_efficiency(), 1.0);  // the shared-page scan
  ASSERT_TRUE(cache.allocate_paged("c", Tokens{(1ULL << 39) + 1}));
  EXPECT_DOUBLE_EQ(cache.memory_efficiency(), (1.5 + 1.0 / (1ULL << 40)) / 2.0);
  expect_consistent(cache);
}

TEST(PagedKVCacheTest, ArgumentChecksComeBeforeTheDuplicateAndTheMemoryChecks) {
  PagedKVCache cache(kDeep, pages(16, kDeep), kPage);
  ASSERT_TRUE(cache.allocate_paged("a", Tokens{4}));  // 8 of 16 pages
  const Snapshot before = snapshot(cache);
  // Duplicate AND overflowing: the argument check throws first.
  EXPECT_THROW((void)cache.allocate_paged("a", Tokens::max()), std::overflow_error);
  // New id, overflowing AND (necessarily) out of memory: throws, not false.
  EXPECT_THROW((void)cache.allocate_paged("new", Tokens::max()), std::overflow_error);
  // Duplicate AND out of memory: false.
  EXPECT_FALSE(cache.allocate_paged("a", Tokens{1000}));
  EXPECT_EQ(snapshot(cache), before);
  expect_consistent(cache);
}

// BUG (modules/paged/paged.cpp, PagedKVCache::allocate_paged, both
// overloads, via pages_needed_to_allocate): CONTRACT.md "Errors" says
// "Messages name the request id and the numbers involved", but the
// std::overflow_error for a prompt whose page count overflows is the bare unit
// arithmetic error "kvcache: Pages * overflows 64 bits: 4611686018427387904 * 8",
// without the request id (or the prompt length). Every other throw of
// allocate_paged names the id.
TEST(PagedKVCacheTest, OverflowMessageNamesTheRequestId) {
  PagedKVCache cache(kDeep, pages(16, kDeep), kPage);
  const std::string msg = message_of<std::overflow_error>(
      [&] { (void)cache.allocate_paged("req-overflow", Tokens::max()); });
  EXPECT_TRUE(has(msg, "req-overflow")) << msg;
}

TEST(PagedKVCacheTest, TheCacheKeepsItsOwnCopyOfTheId) {
  PagedKVCache cache(kSmall, pages(6), kPage);
  const std::string original = "request-with-a-long-enough-id-to-live-on-the-heap";
  {
    std::string id = original;
    ASSERT_TRUE(cache.allocate_paged(id, Tokens{1}));
    id.assign(id.size(), 'X');
  }
  EXPECT_TRUE(cache.contains(original));
  EXPECT_FALSE(cache.contains(std::string(original.size(), 'X')));
  EXPECT_EQ(cache.request_ids(), std::vector<std::string>{original});
  EXPECT_EQ(cache.tokens(original, 2), Tokens{1});
  const std::string_view with_nul("a\0b", 3);
  ASSERT_TRUE(cache.allocate_paged(with_nul, Tokens{0}));
  ASSERT_TRUE(cache.allocate_paged("a", Tokens{0}));
  EXPECT_EQ(cache.num_requests(), 3U);
  cache.free(with_nul);
  EXPECT_TRUE(cache.contains("a"));
  EXPECT_FALSE(cache.contains(with_nul));
}

// ---------------------------------------------------------------------------
// append_token_paged

TEST(PagedKVCacheTest, AppendTakesAPageExactlyAtThePageBoundary) {
  PagedKVCache cache(kSmall, pages(12), kPage);
  ASSERT_TRUE(cache.allocate_paged("r", Tokens{5}));  // 2 pages per layer
  const std::vector<std::uint64_t> table0 = ids(cache.block_table("r", 0));
  // Tokens 5, 6, 7 fill the second page of layer 0: no new page.
  for (std::size_t t = 5; t < 8; ++t) {
    SCOPED_TRACE(t);
    EXPECT_EQ(cache.pages_needed_to_append("r"), Pages{0});
    ASSERT_TRUE(cache.append_token_paged("r", 0, key_row(0, t), value_row(0, t)));
    EXPECT_EQ(cache.tokens("r", 0), Tokens{t + 1});
    EXPECT_EQ(cache.pages_held("r"), Pages{6});
    EXPECT_EQ(ids(cache.block_table("r", 0)), table0);
    EXPECT_EQ(cache.stats().free_pages, Pages{6});
    EXPECT_EQ(cache.stats().stored_tokens, Tokens{15 + t - 4});
  }
  EXPECT_EQ(cache.pages_needed_to_append("r"), Pages{1});  // layer 0 is full
  // Token 8 opens a third page; the first two entries do not move.
  const std::uint64_t next_free = free_list(cache).front();
  ASSERT_TRUE(cache.append_token_paged("r", 0, key_row(0, 8), value_row(0, 8)));
  const std::vector<std::uint64_t> grown = ids(cache.block_table("r", 0));
  ASSERT_EQ(grown.size(), 3U);
  EXPECT_EQ(std::vector<std::uint64_t>(grown.begin(), grown.begin() + 2), table0);
  EXPECT_EQ(grown[2], next_free);  // the head of the free list
  EXPECT_EQ(cache.pages_held("r"), Pages{7});
  EXPECT_EQ(cache.stats().free_pages, Pages{5});
  EXPECT_EQ(cache.stats().used_pages, Pages{7});
  // Three more fill it, the fourth opens a fourth page.
  for (std::size_t t = 9; t < 12; ++t) {
    ASSERT_TRUE(cache.append_token_paged("r", 0, key_row(0, t), value_row(0, t)));
  }
  EXPECT_EQ(cache.pages_held("r"), Pages{7});
  ASSERT_TRUE(cache.append_token_paged("r", 0, key_row(0, 12), value_row(0, 12)));
  EXPECT_EQ(cache.pages_held("r"), Pages{8});
  const auto [keys, values] = cache.get_kv("r", 0);
  ASSERT_EQ(keys.size(), 13U);
  for (std::size_t t = 0; t < 5; ++t) EXPECT_EQ(copy(keys[t]), kZeroRow) << t;
  for (std::size_t t = 5; t < 13; ++t) {
    EXPECT_EQ(copy(keys[t]), key_row(0, t)) << t;
    EXPECT_EQ(copy(values[t]), value_row(0, t)) << t;
  }
  expect_consistent(cache);
}

TEST(PagedKVCacheTest, LayersGrowIndependently) {
  PagedKVCache cache(kSmall, pages(12), kPage);
  ASSERT_TRUE(cache.allocate_paged("r", Tokens{0}));
  for (std::size_t t = 0; t < 6; ++t) {
    ASSERT_TRUE(cache.append_token_paged("r", 1, key_row(1, t), value_row(1, t)));
  }
  ASSERT_TRUE(cache.append_token_paged("r", 2, key_row(2, 0), value_row(2, 0)));
  EXPECT_EQ(cache.tokens("r", 0), Tokens{0});
  EXPECT_EQ(cache.tokens("r", 1), Tokens{6});
  EXPECT_EQ(cache.tokens("r", 2), Tokens{1});
  EXPECT_TRUE(cache.block_table("r", 0).empty());
  EXPECT_EQ(cache.block_table("r", 1).size(), 2U);
  EXPECT_EQ(cache.block_table("r", 2).size(), 1U);
  EXPECT_EQ(cache.pages_held("r"), Pages{3});
  EXPECT_EQ(cache.get_kv("r", 0).keys.size(), 0U);
  EXPECT_EQ(cache.get_kv("r", 1).keys.size(), 6U);
  EXPECT_EQ(copy(cache.get_kv("r", 2).values[0]), value_row(2, 0));
  EXPECT_EQ(cache.stats().stored_tokens, Tokens{7});
  EXPECT_DOUBLE_EQ(cache.memory_efficiency(), 7.0 / 12.0);
  EXPECT_EQ(cache.pages_needed_to_append("r"), Pages{1});  // layer 0 holds no page
  expect_consistent(cache);
}

TEST(PagedKVCacheTest, AppendWithoutAFreePageReturnsFalseAndChangesNothing) {
  PagedKVCache cache(kSmall, pages(6), kPage);
  ASSERT_TRUE(cache.allocate_paged("r", Tokens{7}));  // 2 pages per layer: the whole pool
  ASSERT_TRUE(cache.allocate_paged("z", Tokens{0}));
  ASSERT_EQ(cache.stats().free_pages, Pages{0});
  // Slot 3 of each last page is still free: no page needed.
  ASSERT_TRUE(cache.append_token_paged("r", 0, key_row(0, 7), value_row(0, 7)));
  ASSERT_TRUE(cache.append_token_paged("r", 1));
  const Snapshot before = snapshot(cache);
  EXPECT_FALSE(cache.append_token_paged("r", 0, key_row(0, 8), value_row(0, 8)));
  EXPECT_FALSE(cache.append_token_paged("r", 1));
  EXPECT_FALSE(cache.append_token_paged("z", 2, key_row(2, 0), value_row(2, 0)));
  EXPECT_FALSE(cache.append_token_paged("z", 2));
  EXPECT_FALSE(cache.append_token_all_layers("r"));
  EXPECT_FALSE(cache.append_token_all_layers("z"));
  EXPECT_EQ(snapshot(cache), before);
  // Layer 2 of r still has room.
  ASSERT_TRUE(cache.append_token_paged("r", 2, key_row(2, 7), value_row(2, 7)));
  // Freeing gives the pages back at once.
  cache.free("r");
  ASSERT_TRUE(cache.append_token_paged("z", 2, key_row(2, 0), value_row(2, 0)));
  EXPECT_EQ(copy(cache.get_kv("z", 2).keys[0]), key_row(2, 0));
  expect_consistent(cache);
}

TEST(PagedKVCacheTest, FloatOverloadsStoreTheFloatBytes) {
  PagedKVCache cache(kFloat, pages(8, kFloat), kPage);
  ASSERT_TRUE(cache.allocate_paged("f", Tokens{1}));
  const std::vector<float> k0{1.5F, -2.0F, 3.25F, 0.0F};
  const std::vector<float> v0{-0.5F, 7.0F, 1e-3F, 42.0F};
  const std::vector<float> k1{9.0F, 8.0F, 7.0F, 6.0F};
  const std::vector<float> v1{5.0F, 4.0F, 3.0F, 2.0F};
  const auto bytes = [](const std::vector<float>& f) {
    const auto b = std::as_bytes(std::span<const float>(f));
    return std::vector<std::byte>(b.begin(), b.end());
  };
  for (int t = 0; t < 5; ++t) {  // 6 tokens: crosses into a second page
    ASSERT_TRUE(cache.append_token_paged("f", 1, std::span<const float>(k0),
                                         std::span<const float>(v0)));
  }
  cache.write_kv("f", 1, std::size_t{0}, std::span<const float>(k1), std::span<const float>(v1));
  cache.write_kv("f", 1, Tokens{5}, std::span<const float>(k1), std::span<const float>(v1));
  const auto [keys, values] = cache.get_kv("f", 1);
  ASSERT_EQ(keys.size(), 6U);
  EXPECT_EQ(copy(keys[0]), bytes(k1));
  EXPECT_EQ(copy(values[0]), bytes(v1));
  for (std::size_t t = 1; t < 5; ++t) {
    EXPECT_EQ(copy(keys[t]), bytes(k0)) << t;
    EXPECT_EQ(copy(values[t]), bytes(v0)) << t;
  }
  EXPECT_EQ(copy(keys[5]), bytes(k1));
  EXPECT_EQ(copy(values[5]), bytes(v1));
  EXPECT_EQ(cache.block_table("f", 1).size(), 2U);
  // The byte overloads work on the same model: 16-byte rows.
  ASSERT_TRUE(cache.append_token_paged("f", 0, key_row(0, 1, 16), value_row(0, 1, 16)));
  EXPECT_EQ(copy(cache.get_kv("f", 0).keys[1]), key_row(0, 1, 16));
  // Wrong number of floats: ShapeMismatch, nothing changes.
  const Snapshot before = snapshot(cache);
  const std::vector<float> three(3, 1.0F);
  const std::vector<float> five(5, 1.0F);
  const auto f = [](const std::vector<float>& v) { return std::span<const float>(v); };
  const std::string msg = message_of<kvcache::ShapeMismatch>(
      [&] { (void)cache.append_token_paged("f", 1, f(three), f(v0)); });
  EXPECT_TRUE(has(msg, "\"f\"")) << msg;
  EXPECT_TRUE(has(msg, "3")) << msg;
  EXPECT_THROW((void)cache.append_token_paged("f", 1, f(k0), f(five)), kvcache::ShapeMismatch);
  EXPECT_THROW((void)cache.append_token_paged("f", 1, f({}), f({})), kvcache::ShapeMismatch);
  EXPECT_THROW(cache.write_kv("f", 1, std::size_t{0}, f(five), f(v0)), kvcache::ShapeMismatch);
  EXPECT_THROW(cache.write_kv("f", 1, Tokens{0}, f(k0), f(three)), kvcache::ShapeMismatch);
  // Byte rows of the wrong length on the fp32 model.
  EXPECT_THROW((void)cache.append_token_paged("f", 1, key_row(1, 0), value_row(1, 0)),
               kvcache::ShapeMismatch);
  EXPECT_EQ(snapshot(cache), before);
  expect_consistent(cache);
}

TEST(PagedKVCacheTest, FloatOverloadNeedsFourByteElements) {
  PagedKVCache cache = populated_cache();  // dtype_bytes 2: 4 elements per row
  const Snapshot before = snapshot(cache);
  const std::vector<float> four(4, 1.0F);  // the right element count, the wrong dtype
  const std::span<const float> f(four);
  const std::string msg = message_of<kvcache::ShapeMismatch>(
      [&] { (void)cache.append_token_paged("a", 0, f, f); });
  EXPECT_TRUE(has(msg, "dtype_bytes")) << msg;
  EXPECT_TRUE(has(msg, "\"a\"")) << msg;
  EXPECT_THROW(cache.write_kv("a", 0, std::size_t{0}, f, f), kvcache::ShapeMismatch);
  EXPECT_THROW(cache.write_kv("a", 0, Tokens{0}, f, f), kvcache::ShapeMismatch);
  EXPECT_THROW((void)cache.append_token_paged("a", 0, f, f), std::invalid_argument);
  EXPECT_EQ(snapshot(cache), before);
}

TEST(PagedKVCacheTest, ByteRowsOfTheWrongLengthThrowShapeMismatch) {
  PagedKVCache cache = populated_cache();
  const Snapshot before = snapshot(cache);
  const std::vector<std::byte> short_row(kRow - 1);
  const std::vector<std::byte> long_row(kRow + 1);
  const std::vector<std::byte> good(kRow, std::byte{1});
  const std::span<const std::byte> none;
  const std::string msg = message_of<kvcache::ShapeMismatch>(
      [&] { (void)cache.append_token_paged("a", 1, short_row, good); });
  EXPECT_TRUE(has(msg, "key")) << msg;
  EXPECT_TRUE(has(msg, std::to_string(kRow - 1))) << msg;
  EXPECT_TRUE(has(msg, "\"a\"")) << msg;
  EXPECT_TRUE(has(message_of<kvcache::ShapeMismatch>(
                      [&] { (void)cache.append_token_paged("a", 1, good, long_row); }),
                  "value"));
  // Empty spans are rows of the wrong length, not a zero token.
  EXPECT_THROW((void)cache.append_token_paged("a", 1, none, none), kvcache::ShapeMismatch);
  EXPECT_THROW((void)cache.append_token_paged("a", 1, good, none), kvcache::ShapeMismatch);
  EXPECT_THROW(cache.write_kv("a", 1, std::size_t{0}, short_row, good), kvcache::ShapeMismatch);
  EXPECT_THROW(cache.write_kv("a", 1, Tokens{0}, good, none), kvcache::ShapeMismatch);
  EXPECT_EQ(snapshot(cache), before);
}

TEST(PagedKVCacheTest, LayerOutOfRangeThrowsOutOfRangeNotUnknownRequest) {
  PagedKVCache cache = populated_cache();
  const Snapshot before = snapshot(cache);
  const std::vector<std::byte> k = key_row(0, 0);
  const std::vector<std::byte> v = value_row(0, 0);
  for (const std::string_view id : {std::string_view("a"), std::string_view("ghost")}) {
    for (const std::size_t layer : {std::size_t{3}, std::size_t{4}, SIZE_MAX}) {
      SCOPED_TRACE(std::string(id) + " layer " + std::to_string(layer));
      expect_out_of_range_not_unknown([&] { (void)cache.append_token_paged(id, layer, k, v); });
      expect_out_of_range_not_unknown([&] { (void)cache.append_token_paged(id, layer); });
      expect_out_of_range_not_unknown([&] { cache.write_kv(id, layer, std::size_t{0}, k, v); });
      expect_out_of_range_not_unknown([&] { cache.write_kv(id, layer, Tokens{0}, k, v); });
      expect_out_of_range_not_unknown([&] { (void)cache.get_kv(id, layer); });
      expect_out_of_range_not_unknown([&] { (void)cache.block_table(id, layer); });
      expect_out_of_range_not_unknown([&] { (void)cache.tokens(id, layer); });
    }
  }
  const std::string msg =
      message_of<std::out_of_range>([&] { (void)cache.append_token_paged("a", 3, k, v); });
  EXPECT_TRUE(has(msg, "layer 3")) << msg;
  EXPECT_TRUE(has(msg, "\"a\"")) << msg;
  EXPECT_EQ(snapshot(cache), before);
  // The float overloads, on an fp32 model.
  PagedKVCache fc(kFloat, pages(4, kFloat), kPage);
  ASSERT_TRUE(fc.allocate_paged("f", Tokens{1}));
  const std::vector<float> row4(4, 1.0F);
  const std::span<const float> f(row4);
  expect_out_of_range_not_unknown([&] { (void)fc.append_token_paged("f", 2, f, f); });
  expect_out_of_range_not_unknown([&] { fc.write_kv("f", 2, std::size_t{0}, f, f); });
  expect_out_of_range_not_unknown([&] { fc.write_kv("f", 2, Tokens{0}, f, f); });
  expect_out_of_range_not_unknown([&] { (void)fc.append_token_paged("ghost", 2, f, f); });
  EXPECT_EQ(fc.tokens("f", 1), Tokens{1});
}

TEST(PagedKVCacheTest, UnknownIdThrowsUnknownRequestEverywhere) {
  PagedKVCache cache = populated_cache();
  const Snapshot before = snapshot(cache);
  const std::vector<std::byte> k = key_row(0, 0);
  const std::vector<std::byte> v = value_row(0, 0);
  const std::string msg = message_of<kvcache::UnknownRequest>([&] { cache.free("ghost-7"); });
  EXPECT_TRUE(has(msg, "ghost-7")) << msg;
  EXPECT_THROW((void)cache.append_token_paged("ghost-7", 0, k, v), kvcache::UnknownRequest);
  EXPECT_THROW((void)cache.append_token_paged("ghost-7", 0), kvcache::UnknownRequest);
  EXPECT_THROW((void)cache.append_token_all_layers("ghost-7"), kvcache::UnknownRequest);
  EXPECT_THROW(cache.write_kv("ghost-7", 0, std::size_t{0}, k, v), kvcache::UnknownRequest);
  EXPECT_THROW(cache.write_kv("ghost-7", 0, Tokens{0}, k, v), kvcache::UnknownRequest);
  EXPECT_THROW((void)cache.get_kv("ghost-7", 0), kvcache::UnknownRequest);
  EXPECT_THROW((void)cache.block_table("ghost-7", 0), kvcache::UnknownRequest);
  EXPECT_THROW((void)cache.pages_held("ghost-7"), kvcache::UnknownRequest);
  EXPECT_THROW((void)cache.tokens("ghost-7", 0), kvcache::UnknownRequest);
  EXPECT_THROW((void)cache.pages_needed_to_append("ghost-7"), kvcache::UnknownRequest);
  EXPECT_THROW((void)cache.fork("ghost-7", "child"), kvcache::UnknownRequest);
  EXPECT_THROW(cache.free(""), kvcache::UnknownRequest);
  EXPECT_THROW(cache.free("A"), kvcache::UnknownRequest);  // ids are case-sensitive
  // A position past the end does not hide the unknown id.
  EXPECT_THROW(cache.write_kv("ghost-7", 0, SIZE_MAX, k, v), kvcache::UnknownRequest);
  EXPECT_FALSE(cache.contains("ghost-7"));
  EXPECT_FALSE(cache.contains("child"));
  EXPECT_EQ(snapshot(cache), before);
  EXPECT_THROW(cache.free("ghost-7"), std::out_of_range);  // the KeyError of this API
  // The float overloads.
  PagedKVCache fc(kFloat, pages(4, kFloat), kPage);
  const std::vector<float> row4(4, 1.0F);
  const std::span<const float> f(row4);
  EXPECT_THROW((void)fc.append_token_paged("ghost", 1, f, f), kvcache::UnknownRequest);
  EXPECT_THROW(fc.write_kv("ghost", 1, std::size_t{0}, f, f), kvcache::UnknownRequest);
  EXPECT_THROW(fc.write_kv("ghost", 1, Tokens{0}, f, f), kvcache::UnknownRequest);
  EXPECT_EQ(fc.stats().free_pages, Pages{4});
}

TEST(PagedKVCacheTest, ShapeIsCheckedBeforeTheId) {
  PagedKVCache cache = populated_cache();
  const std::vector<std::byte> short_row(kRow - 1);
  const std::vector<std::byte> good(kRow);
  EXPECT_THROW((void)cache.append_token_paged("nobody", 0, short_row, good),
               kvcache::ShapeMismatch);
  EXPECT_THROW(cache.write_kv("nobody", 0, std::size_t{0}, good, short_row),
               kvcache::ShapeMismatch);
  const std::vector<float> f(4, 0.0F);
  EXPECT_THROW((void)cache.append_token_paged("nobody", 0, std::span<const float>(f),
                                              std::span<const float>(f)),
               kvcache::ShapeMismatch);
}

TEST(PagedKVCacheTest, AppendWithoutDataStoresAZeroToken) {
  PagedKVCache cache(kSmall, pages(6), kPage);
  ASSERT_TRUE(cache.allocate_paged("r", Tokens{0}));
  ASSERT_TRUE(cache.append_token_paged("r", 0, key_row(0, 0), value_row(0, 0)));
  ASSERT_TRUE(cache.append_token_paged("r", 0));
  ASSERT_TRUE(cache.append_token_paged("r", 0, key_row(0, 2), value_row(0, 2)));
  EXPECT_EQ(cache.tokens("r", 0), Tokens{3});
  EXPECT_EQ(cache.stats().stored_tokens, Tokens{3});
  const auto [keys, values] = cache.get_kv("r", 0);
  ASSERT_EQ(keys.size(), 3U);
  EXPECT_EQ(copy(keys[0]), key_row(0, 0));
  EXPECT_EQ(copy(keys[1]), kZeroRow);
  EXPECT_EQ(copy(values[1]), kZeroRow);
  EXPECT_EQ(copy(keys[2]), key_row(0, 2));
  // And the zero token can be written later.
  cache.write_kv("r", 0, 1, key_row(0, 1), value_row(0, 1));
  EXPECT_EQ(copy(cache.get_kv("r", 0).values[1]), value_row(0, 1));
  expect_consistent(cache);
}

TEST(PagedKVCacheTest, AppendTokenAllLayersIsAllOrNothing) {
  PagedKVCache cache(kSmall, pages(8), kPage);
  ASSERT_TRUE(cache.allocate_paged("r", Tokens{4}));  // every layer full: 3 pages
  ASSERT_TRUE(cache.allocate_paged("s", Tokens{4}));
  ASSERT_EQ(cache.stats().free_pages, Pages{2});
  EXPECT_EQ(cache.pages_needed_to_append("r"), Pages{3});
  Snapshot before = snapshot(cache);
  EXPECT_FALSE(cache.append_token_all_layers("r"));  // 3 > 2: no layer grows
  EXPECT_EQ(snapshot(cache), before);
  ASSERT_TRUE(cache.append_token_paged("r", 0));  // layer 0 takes a page: 1 free
  EXPECT_EQ(cache.pages_needed_to_append("r"), Pages{2});
  before = snapshot(cache);
  EXPECT_FALSE(cache.append_token_all_layers("r"));  // 2 > 1
  EXPECT_EQ(snapshot(cache), before);
  cache.free("s");  // 4 free
  ASSERT_TRUE(cache.append_token_all_layers("r"));
  EXPECT_EQ(cache.tokens("r", 0), Tokens{6});
  EXPECT_EQ(cache.tokens("r", 1), Tokens{5});
  EXPECT_EQ(cache.tokens("r", 2), Tokens{5});
  EXPECT_EQ(cache.pages_held("r"), Pages{6});
  EXPECT_EQ(cache.stats().free_pages, Pages{2});
  for (std::size_t l = 0; l < 3; ++l) {
    const auto [keys, values] = cache.get_kv("r", l);
    EXPECT_EQ(copy(keys.at(keys.size() - 1)), kZeroRow);
    EXPECT_EQ(copy(values.at(values.size() - 1)), kZeroRow);
  }
  // Fill the pool; the next steps need no page until layer 0 is full again.
  ASSERT_TRUE(cache.allocate_paged("t", Tokens{0}));
  ASSERT_TRUE(cache.append_token_paged("t", 0));
  ASSERT_TRUE(cache.append_token_paged("t", 1));
  ASSERT_EQ(cache.stats().free_pages, Pages{0});
  EXPECT_EQ(cache.pages_needed_to_append("r"), Pages{0});
  ASSERT_TRUE(cache.append_token_all_layers("r"));  // 7, 6, 6
  ASSERT_TRUE(cache.append_token_all_layers("r"));  // 8, 7, 7
  EXPECT_EQ(cache.pages_needed_to_append("r"), Pages{1});
  before = snapshot(cache);
  EXPECT_FALSE(cache.append_token_all_layers("r"));
  EXPECT_EQ(snapshot(cache), before);
  EXPECT_EQ(cache.stats().stored_tokens, Tokens{8 + 7 + 7 + 2});
  expect_consistent(cache);
}

// ---------------------------------------------------------------------------
// write_kv

TEST(PagedKVCacheTest, WriteKvOverwritesAStoredToken) {
  PagedKVCache cache = populated_cache();
  const PagedStats s0 = cache.stats();
  const std::vector<std::uint64_t> fl = free_list(cache);
  cache.write_kv("a", 0, std::size_t{2}, key_row(7, 2), value_row(7, 2));
  cache.write_kv("a", 0, Tokens{5}, key_row(7, 5), value_row(7, 5));  // an appended token
  cache.write_kv("a", 2, Tokens{4}, key_row(7, 4), value_row(7, 4));  // unwritten until now
  const auto [keys, values] = cache.get_kv("a", 0);
  ASSERT_EQ(keys.size(), 6U);
  for (std::size_t t = 0; t < 6; ++t) {
    const bool rewritten = t == 2 || t == 5;
    EXPECT_EQ(copy(keys[t]), rewritten ? key_row(7, t) : key_row(0, t)) << t;
    EXPECT_EQ(copy(values[t]), rewritten ? value_row(7, t) : value_row(0, t)) << t;
  }
  const auto [k2, v2] = cache.get_kv("a", 2);
  for (std::size_t t = 0; t < 4; ++t) EXPECT_EQ(copy(k2[t]), kZeroRow) << t;
  EXPECT_EQ(copy(k2[4]), key_row(7, 4));
  EXPECT_EQ(copy(v2[5]), value_row(2, 5));
  // Writes take no page and store no token.
  const PagedStats s1 = cache.stats();
  EXPECT_EQ(s1.used_pages, s0.used_pages);
  EXPECT_EQ(s1.stored_tokens, s0.stored_tokens);
  EXPECT_EQ(free_list(cache), fl);
  // The other request is untouched.
  EXPECT_EQ(copy(cache.get_kv("b", 1).keys[0]), key_row(1, 0));
  expect_consistent(cache);
}

TEST(PagedKVCacheTest, WriteKvPastTheStoredTokensThrowsOutOfRangeAndChangesNothing) {
  PagedKVCache cache = populated_cache();  // a: 6, 5, 6 tokens; b: 1 token
  const Snapshot before = snapshot(cache);
  const std::vector<std::byte> k = key_row(9, 9);
  const std::vector<std::byte> v = value_row(9, 9);
  const std::string msg =
      message_of<std::out_of_range>([&] { cache.write_kv("a", 1, std::size_t{5}, k, v); });
  EXPECT_TRUE(has(msg, "\"a\"")) << msg;
  EXPECT_TRUE(has(msg, "5")) << msg;
  expect_out_of_range_not_unknown([&] { cache.write_kv("a", 1, std::size_t{5}, k, v); });
  expect_out_of_range_not_unknown([&] { cache.write_kv("a", 0, std::size_t{6}, k, v); });
  expect_out_of_range_not_unknown([&] { cache.write_kv("a", 0, Tokens{6}, k, v); });
  expect_out_of_range_not_unknown([&] { cache.write_kv("a", 0, Tokens{1ULL << 40}, k, v); });
  expect_out_of_range_not_unknown([&] { cache.write_kv("a", 0, Tokens::max(), k, v); });
  expect_out_of_range_not_unknown([&] { cache.write_kv("a", 0, SIZE_MAX, k, v); });
  expect_out_of_range_not_unknown([&] { cache.write_kv("b", 2, std::size_t{1}, k, v); });
  // Position 7 of layer 0 lies in a's second page, which has room: still not stored.
  expect_out_of_range_not_unknown([&] { cache.write_kv("a", 0, std::size_t{7}, k, v); });
  EXPECT_EQ(snapshot(cache), before);
  // A zero-token request has no position at all.
  ASSERT_TRUE(cache.allocate_paged("z", Tokens{0}));
  expect_out_of_range_not_unknown([&] { cache.write_kv("z", 0, std::size_t{0}, k, v); });
  EXPECT_EQ(cache.tokens("z", 0), Tokens{0});
}

// ---------------------------------------------------------------------------
// get_kv

TEST(PagedKVCacheTest, GetKvGathersAcrossPagesInOrderByteExact) {
  PagedKVCache cache(kSmall, pages(40), kPage);
  ASSERT_TRUE(cache.allocate_paged("r", Tokens{3}));
  // Another request in between, so r's later pages are not next to its first.
  ASSERT_TRUE(cache.allocate_paged("other", Tokens{9}));
  for (std::size_t l = 0; l < 3; ++l) {
    for (std::size_t t = 0; t < 3; ++t) cache.write_kv("r", l, t, key_row(l, t), value_row(l, t));
  }
  for (std::size_t t = 3; t < 11; ++t) {
    for (std::size_t l = 0; l < 3; ++l) {
      ASSERT_TRUE(cache.append_token_paged("r", l, key_row(l, t), value_row(l, t)));
    }
    ASSERT_TRUE(cache.append_token_paged("other", t % 3));  // interleave the page takes
  }
  for (std::size_t l = 0; l < 3; ++l) {
    SCOPED_TRACE(l);
    EXPECT_EQ(cache.block_table("r", l).size(), 3U);
    auto [keys, values] = cache.get_kv("r", l);
    static_assert(std::is_same_v<decltype(keys.size()), std::size_t>);
    static_assert(std::is_same_v<decltype(keys[0]), std::span<const std::byte>>);
    ASSERT_EQ(keys.size(), 11U);
    ASSERT_EQ(values.size(), 11U);
    for (std::size_t t = 0; t < 11; ++t) {
      EXPECT_EQ(keys[t].size(), kRow);
      EXPECT_EQ(copy(keys[t]), key_row(l, t)) << "token " << t;
      EXPECT_EQ(copy(values[t]), value_row(l, t)) << "token " << t;
    }
    // Iteration gives the same rows.
    std::size_t t = 0;
    for (const std::span<const std::byte> k : keys) EXPECT_EQ(copy(k), key_row(l, t++));
    EXPECT_EQ(t, 11U);
    EXPECT_THROW((void)keys.at(11), std::out_of_range);
  }
  // The other request reads only its zero tokens.
  for (const std::span<const std::byte> k : cache.get_kv("other", 0).keys) {
    EXPECT_EQ(copy(k), kZeroRow);
  }
  expect_consistent(cache);
}

TEST(PagedKVCacheTest, PromptTokensReadAsZeroUntilWritten) {
  PagedKVCache cache(kSmall, pages(12), kPage);
  ASSERT_TRUE(cache.allocate_paged("r", Tokens{7}));
  for (std::size_t l = 0; l < 3; ++l) {
    const auto [keys, values] = cache.get_kv("r", l);
    ASSERT_EQ(keys.size(), 7U);
    for (std::size_t t = 0; t < 7; ++t) {
      EXPECT_EQ(copy(keys[t]), kZeroRow);
      EXPECT_EQ(copy(values[t]), kZeroRow);
    }
  }
  cache.write_kv("r", 1, 5, key_row(1, 5), value_row(1, 5));
  const auto [keys, values] = cache.get_kv("r", 1);
  for (std::size_t t = 0; t < 7; ++t) {
    EXPECT_EQ(copy(keys[t]), t == 5 ? key_row(1, 5) : kZeroRow) << t;
    EXPECT_EQ(copy(values[t]), t == 5 ? value_row(1, 5) : kZeroRow) << t;
  }
  EXPECT_EQ(copy(cache.get_kv("r", 0).keys[5]), kZeroRow);
}

// A freed page is not cleared: the new holder must still never read the old
// bytes, in full pages and in partial ones, and writing a slot past the
// page's written mark must zero the slots skipped over.
TEST(PagedKVCacheTest, ReusedPagesNeverShowThePreviousRequestsBytes) {
  constexpr ModelConfig cfg{2, 1, 4, 2};
  PagedKVCache cache(cfg, pages(4, cfg), kPage);  // 4 pages: 2 per layer
  ASSERT_TRUE(cache.allocate_paged("old", Tokens{6}));
  for (std::size_t l = 0; l < 2; ++l) {
    for (std::size_t t = 0; t < 6; ++t) {
      cache.write_kv("old", l, t, key_row(l, t), value_row(l, t));
    }
  }
  // Layer 0 full pages (8 tokens), layer 1 a partial second page (6 tokens).
  ASSERT_TRUE(cache.append_token_paged("old", 0, key_row(0, 6), value_row(0, 6)));
  ASSERT_TRUE(cache.append_token_paged("old", 0, key_row(0, 7), value_row(0, 7)));
  std::vector<std::uint64_t> old_pages = all_pages(cache, "old");
  cache.free("old");
  ASSERT_TRUE(cache.allocate_paged("new", Tokens{5}));
  std::vector<std::uint64_t> new_pages = all_pages(cache, "new");
  std::sort(old_pages.begin(), old_pages.end());
  std::sort(new_pages.begin(), new_pages.end());
  ASSERT_EQ(new_pages, old_pages) << "the test needs the same physical pages back";
  const auto expect_zero = [&](std::size_t l, std::size_t t) {
    const auto [keys, values] = cache.get_kv("new", l);
    EXPECT_EQ(copy(keys[t]), kZeroRow) << "layer " << l << " token " << t;
    EXPECT_EQ(copy(values[t]), kZeroRow) << "layer " << l << " token " << t;
  };
  for (std::size_t l = 0; l < 2; ++l) {
    for (std::size_t t = 0; t < 5; ++t) expect_zero(l, t);
  }
  // A zero token appended onto a slot the old request wrote reads as zero.
  ASSERT_TRUE(cache.append_token_paged("new", 0));  // token 5
  ASSERT_TRUE(cache.append_token_paged("new", 1));
  expect_zero(0, 5);
  expect_zero(1, 5);
  // Writing slot 3 of the first page first: slots 0..2 stay zero.
  for (std::size_t l = 0; l < 2; ++l) {
    cache.write_kv("new", l, 3, key_row(8, l), value_row(8, l));
    for (std::size_t t = 0; t < 3; ++t) expect_zero(l, t);
    EXPECT_EQ(copy(cache.get_kv("new", l).keys[3]), key_row(8, l));
  }
  // Appending token 6 (slot 2 of the second page) with data skips slots 0
  // and 1 of that page, which the old request wrote: they read as zero.
  for (std::size_t l = 0; l < 2; ++l) {
    ASSERT_TRUE(cache.append_token_paged("new", l, key_row(9, l), value_row(9, l)));
    expect_zero(l, 4);
    expect_zero(l, 5);
    EXPECT_EQ(copy(cache.get_kv("new", l).values[6]), value_row(9, l));
  }
  // Token 7 without data: slot 3, written by the old request in layer 0.
  ASSERT_TRUE(cache.append_token_paged("new", 0));
  expect_zero(0, 7);
  for (std::size_t l = 0; l < 2; ++l) {
    for (const std::size_t t : {0U, 1U, 2U}) expect_zero(l, t);
  }
  expect_consistent(cache);
}

// ---------------------------------------------------------------------------
// free

TEST(PagedKVCacheTest, FreeReturnsEveryPageTailFirst) {
  constexpr ModelConfig one{1, 1, 4, 2};
  PagedKVCache cache(one, pages(8, one), kPage);
  ASSERT_TRUE(cache.allocate_paged("a", Tokens{9}));  // 3 pages
  ASSERT_TRUE(cache.allocate_paged("b", Tokens{5}));  // 2 pages
  const std::vector<std::uint64_t> ta = ids(cache.block_table("a", 0));
  const std::vector<std::uint64_t> tb = ids(cache.block_table("b", 0));
  std::vector<std::uint64_t> expected = free_list(cache);
  ASSERT_EQ(expected.size(), 3U);
  cache.free("a");
  expected.insert(expected.end(), ta.rbegin(), ta.rend());
  EXPECT_EQ(free_list(cache), expected);
  EXPECT_EQ(cache.stats().free_pages, Pages{6});
  cache.free("b");
  expected.insert(expected.end(), tb.rbegin(), tb.rend());
  EXPECT_EQ(free_list(cache), expected);
  EXPECT_EQ(cache.stats().free_pages, Pages{8});
  EXPECT_EQ(cache.stats().num_requests, 0U);
  expect_consistent(cache);
}

TEST(PagedKVCacheTest, FreeReturnsEachLayersPagesLastFirst) {
  PagedKVCache cache(kSmall, pages(20), kPage);
  ASSERT_TRUE(cache.allocate_paged("keep", Tokens{2}));
  ASSERT_TRUE(cache.allocate_paged("a", Tokens{9}));  // 3 pages per layer
  ASSERT_TRUE(cache.append_token_paged("a", 1, key_row(1, 9), value_row(1, 9)));
  const std::vector<std::uint64_t> before = free_list(cache);
  std::vector<std::vector<std::uint64_t>> tables;
  for (std::size_t l = 0; l < 3; ++l) tables.push_back(ids(cache.block_table("a", l)));
  cache.free("a");
  const std::vector<std::uint64_t> after = free_list(cache);
  ASSERT_EQ(after.size(), before.size() + 9);
  EXPECT_EQ(std::vector<std::uint64_t>(after.begin(),
                                       after.begin() + static_cast<std::ptrdiff_t>(before.size())),
            before);
  std::vector<std::uint64_t> tail(after.begin() + static_cast<std::ptrdiff_t>(before.size()),
                                  after.end());
  for (const auto& table : tables) {
    // Within a layer: last page first.
    std::vector<std::size_t> where;
    for (const std::uint64_t p : table) {
      const auto it = std::find(tail.begin(), tail.end(), p);
      ASSERT_NE(it, tail.end()) << "page " << p << " not returned";
      where.push_back(static_cast<std::size_t>(it - tail.begin()));
    }
    EXPECT_TRUE(std::is_sorted(where.rbegin(), where.rend())) << "not tail first";
  }
  EXPECT_EQ(cache.stats().used_pages, Pages{3});
  expect_consistent(cache);
}

TEST(PagedKVCacheTest, FreedMemoryIsReusableAtOnceAndTheIdToo) {
  PagedKVCache cache(kSmall, pages(9), kPage);
  ASSERT_TRUE(cache.allocate_paged("a", Tokens{8}));  // 6 pages
  ASSERT_TRUE(cache.allocate_paged("b", Tokens{4}));  // 3 pages
  EXPECT_FALSE(cache.allocate_paged("c", Tokens{5}));
  cache.write_kv("a", 0, 0, key_row(0, 0), value_row(0, 0));
  cache.free("a");
  ASSERT_TRUE(cache.allocate_paged("c", Tokens{5}));
  EXPECT_EQ(cache.stats().free_pages, Pages{0});
  cache.free("c");
  ASSERT_TRUE(cache.allocate_paged("a", Tokens{1}));  // the same id again: a new request
  EXPECT_EQ(cache.tokens("a", 0), Tokens{1});
  EXPECT_EQ(copy(cache.get_kv("a", 0).keys[0]), kZeroRow);
  EXPECT_EQ(cache.pages_held("a"), Pages{3});
  expect_consistent(cache);
}

TEST(PagedKVCacheTest, FreeOfAnUnknownIdThrowsAndChangesNothing) {
  PagedKVCache cache = populated_cache();
  cache.free("b");
  const Snapshot before = snapshot(cache);
  EXPECT_THROW(cache.free("b"), kvcache::UnknownRequest);  // double free
  EXPECT_THROW((void)cache.append_token_paged("b", 0), kvcache::UnknownRequest);
  EXPECT_THROW((void)cache.get_kv("b", 0), kvcache::UnknownRequest);
  EXPECT_THROW((void)cache.block_table("b", 0), kvcache::UnknownRequest);
  EXPECT_EQ(snapshot(cache), before);
}

// ---------------------------------------------------------------------------
// Queries and stats

TEST(PagedKVCacheTest, StatsFollowEveryStep) {
  PagedKVCache cache(kSmall, pages(20), kPage);
  const auto check = [&](std::uint64_t used, std::uint64_t stored, std::size_t requests) {
    const PagedStats s = cache.stats();
    EXPECT_EQ(s.total_pages, Pages{20});
    EXPECT_EQ(s.used_pages, Pages{used});
    EXPECT_EQ(s.free_pages, Pages{20 - used});
    EXPECT_EQ(s.cached_pages, Pages{0});
    EXPECT_EQ(s.used_memory, Bytes{used * kPageBytes});
    EXPECT_EQ(s.num_requests, requests);
    EXPECT_EQ(s.prefix_hits, 0U);
    EXPECT_EQ(s.prefix_misses, 0U);
    EXPECT_DOUBLE_EQ(s.utilization_pct, static_cast<double>(used) * 5.0);
    EXPECT_EQ(s.stored_tokens, Tokens{stored});
    EXPECT_EQ(s.page_size, kPage);
    EXPECT_EQ(s.bytes_per_page, Bytes{kPageBytes});
    EXPECT_EQ(s.registered_prefixes, 0U);
    EXPECT_EQ(s.prefix.cow_copies, 0U);
    if (used == 0) {
      EXPECT_EQ(cache.memory_efficiency(), 0.0);
    } else {
      EXPECT_DOUBLE_EQ(cache.memory_efficiency(),
                       static_cast<double>(stored) / static_cast<double>(used * 4));
    }
    expect_consistent(cache);
  };
  check(0, 0, 0);
  ASSERT_TRUE(cache.allocate_paged("a", Tokens{6}));
  check(6, 18, 1);
  ASSERT_TRUE(cache.allocate_paged("b", Tokens{1}));
  check(9, 21, 2);
  ASSERT_TRUE(cache.append_token_paged("a", 0));
  check(9, 22, 2);
  ASSERT_TRUE(cache.append_token_paged("a", 0));
  check(9, 23, 2);
  ASSERT_TRUE(cache.append_token_paged("a", 0));
  check(10, 24, 2);
  ASSERT_TRUE(cache.allocate_paged("c", Tokens{0}));
  check(10, 24, 3);
  ASSERT_TRUE(cache.append_token_all_layers("b"));
  check(10, 27, 3);
  ASSERT_TRUE(cache.append_token_all_layers("c"));
  check(13, 30, 3);
  cache.write_kv("a", 2, 0, key_row(2, 0), value_row(2, 0));
  check(13, 30, 3);
  cache.free("a");
  check(6, 9, 2);
  cache.free("c");
  check(3, 6, 1);
  cache.free("b");
  check(0, 0, 0);
  EXPECT_EQ(cache.pool().free_list().size(), 20U);
}

TEST(PagedKVCacheTest, MemoryEfficiencyStaysWithinZeroAndOne) {
  PagedKVCache cache(kSmall, pages(60), kPage);
  EXPECT_EQ(cache.memory_efficiency(), 0.0);
  std::uint64_t x = 12345;
  const auto next = [&] {
    x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    return x >> 33;
  };
  for (int step = 0; step < 300; ++step) {
    const std::string id = "r" + std::to_string(next() % 6);
    switch (next() % 4) {
      case 0:
        if (cache.contains(id)) {
          cache.free(id);
        } else {
          static_cast<void>(cache.allocate_paged(id, Tokens{next() % 10}));
        }
        break;
      default:
        if (cache.contains(id)) static_cast<void>(cache.append_token_paged(id, next() % 3));
        break;
    }
    const double e = cache.memory_efficiency();
    ASSERT_GE(e, 0.0) << step;
    ASSERT_LE(e, 1.0) << step;
    const PagedStats s = cache.stats();
    ASSERT_EQ(s.free_pages + s.used_pages + s.cached_pages, s.total_pages) << step;
    if (s.used_pages == Pages{0}) {
      ASSERT_EQ(e, 0.0);
    } else {
      ASSERT_DOUBLE_EQ(e, static_cast<double>(s.stored_tokens.count()) /
                              static_cast<double>(s.used_pages.count() * 4));
    }
  }
  expect_consistent(cache);
}

TEST(PagedKVCacheTest, RequestIdsAndContains) {
  PagedKVCache cache(kSmall, pages(12), kPage);
  EXPECT_TRUE(cache.request_ids().empty());
  ASSERT_TRUE(cache.allocate_paged("x", Tokens{1}));
  ASSERT_TRUE(cache.allocate_paged("y", Tokens{0}));
  ASSERT_TRUE(cache.allocate_paged("z", Tokens{2}));
  std::vector<std::string> live = cache.request_ids();
  std::sort(live.begin(), live.end());
  EXPECT_EQ(live, (std::vector<std::string>{"x", "y", "z"}));
  EXPECT_TRUE(cache.contains("y"));
  EXPECT_FALSE(cache.contains("w"));
  EXPECT_EQ(cache.num_requests(), 3U);
  cache.free("y");
  EXPECT_FALSE(cache.contains("y"));
  live = cache.request_ids();
  std::sort(live.begin(), live.end());
  EXPECT_EQ(live, (std::vector<std::string>{"x", "z"}));
}

TEST(PagedKVCacheTest, StatsFieldTypes) {
  static_assert(std::is_same_v<decltype(PagedStats::total_pages), Pages>);
  static_assert(std::is_same_v<decltype(PagedStats::free_pages), Pages>);
  static_assert(std::is_same_v<decltype(PagedStats::used_pages), Pages>);
  static_assert(std::is_same_v<decltype(PagedStats::cached_pages), Pages>);
  static_assert(std::is_same_v<decltype(PagedStats::used_memory), Bytes>);
  static_assert(std::is_same_v<decltype(PagedStats::num_requests), std::size_t>);
  static_assert(std::is_same_v<decltype(PagedStats::prefix_hits), std::uint64_t>);
  static_assert(std::is_same_v<decltype(PagedStats::prefix_misses), std::uint64_t>);
  static_assert(std::is_same_v<decltype(PagedStats::utilization_pct), double>);
  static_assert(std::is_same_v<decltype(std::declval<PagedKVCache&>().block_table("", 0)),
                               std::span<const PageId>>);
  static_assert(std::is_same_v<decltype(std::declval<PagedKVCache&>().pages_held("")), Pages>);
  static_assert(std::is_same_v<decltype(std::declval<PagedKVCache&>().memory_efficiency()),
                               double>);
  using Span = std::span<const std::byte>;
  static_assert(std::is_same_v<decltype(std::declval<PagedKVCache&>().allocate_paged("", Tokens{})),
                               bool>);
  static_assert(std::is_same_v<decltype(std::declval<PagedKVCache&>().allocate_paged(
                                   "", Tokens{}, "", Tokens{})),
                               bool>);
  static_assert(std::is_same_v<decltype(std::declval<PagedKVCache&>().append_token_paged(
                                   "", 0, Span{}, Span{})),
                               bool>);
  static_assert(std::is_same_v<decltype(std::declval<PagedKVCache&>().fork("", "")), bool>);
  static_assert(std::is_void_v<decltype(std::declval<PagedKVCache&>().write_kv(
                    "", 0, std::size_t{0}, Span{}, Span{}))>);
  static_assert(std::is_void_v<decltype(std::declval<PagedKVCache&>().free(""))>);
  static_assert(!std::is_copy_constructible_v<PagedKVCache>);
  static_assert(std::is_nothrow_move_constructible_v<PagedKVCache>);
  static_assert(std::is_nothrow_move_assignable_v<PagedKVCache>);
  const PagedStats s{};
  EXPECT_EQ(s.num_requests, 0U);
  EXPECT_EQ(s.used_pages, Pages{0});
}

// ---------------------------------------------------------------------------
// Storage::none: bookkeeping only

TEST(PagedKVCacheTest, StorageNoneKeepsBlockTablesAndRefusesBytes) {
  PagedKVCache cache(kSmall, pages(12), kPage, Storage::none);
  EXPECT_EQ(cache.storage(), Storage::none);
  ASSERT_TRUE(cache.allocate_paged("r", Tokens{5}));
  EXPECT_EQ(cache.pages_held("r"), Pages{6});
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(cache.append_token_paged("r", 0));
  EXPECT_EQ(cache.tokens("r", 0), Tokens{9});
  EXPECT_EQ(cache.block_table("r", 0).size(), 3U);
  ASSERT_TRUE(cache.append_token_all_layers("r"));
  EXPECT_EQ(cache.stats().stored_tokens, Tokens{9 + 5 + 5 + 3});
  EXPECT_DOUBLE_EQ(cache.memory_efficiency(), 22.0 / 28.0);
  ASSERT_TRUE(cache.fork("r", "child"));
  EXPECT_EQ(ids(cache.block_table("child", 2)), ids(cache.block_table("r", 2)));
  ASSERT_TRUE(cache.append_token_paged("child", 2));  // copy on write, without bytes
  EXPECT_NE(ids(cache.block_table("child", 2)), ids(cache.block_table("r", 2)));
  expect_consistent(cache);

  const Snapshot before = snapshot(cache);
  const std::vector<std::byte> k = key_row(0, 0);
  const std::vector<std::byte> v = value_row(0, 0);
  const std::vector<float> f4(4, 1.0F);
  const std::span<const float> f(f4);
  const std::string msg =
      message_of<std::logic_error>([&] { (void)cache.append_token_paged("r", 0, k, v); });
  EXPECT_TRUE(has(msg, "none")) << msg;
  EXPECT_THROW((void)cache.append_token_paged("r", 0, f, f), std::logic_error);
  EXPECT_THROW(cache.write_kv("r", 0, std::size_t{0}, k, v), std::logic_error);
  EXPECT_THROW(cache.write_kv("r", 0, Tokens{0}, k, v), std::logic_error);
  EXPECT_THROW(cache.write_kv("r", 0, std::size_t{0}, f, f), std::logic_error);
  EXPECT_THROW(cache.write_kv("r", 0, Tokens{0}, f, f), std::logic_error);
  EXPECT_THROW((void)cache.get_kv("r", 0), std::logic_error);
  // The storage check comes first: even an unknown id or a bad shape gives logic_error.
  EXPECT_THROW((void)cache.get_kv("ghost", 0), std::logic_error);
  EXPECT_THROW((void)cache.append_token_paged("ghost", 0, k, v), std::logic_error);
  EXPECT_THROW(cache.write_kv("r", 0, std::size_t{0}, std::vector<std::byte>(3), v),
               std::logic_error);
  EXPECT_EQ(snapshot(cache), before);
  // The no-data calls still check the id and the layer.
  EXPECT_THROW((void)cache.append_token_paged("ghost", 0), kvcache::UnknownRequest);
  expect_out_of_range_not_unknown([&] { (void)cache.append_token_paged("r", 3); });
  EXPECT_EQ(snapshot(cache), before);
  cache.free("r");
  cache.free("child");
  EXPECT_EQ(cache.stats().free_pages, Pages{12});
  expect_consistent(cache);
}

// ---------------------------------------------------------------------------
// Admission helpers

TEST(PagedKVCacheTest, AdmissionHelpers) {
  PagedKVCache cache(kSmall, pages(10), kPage);  // 3 layers: 3 pages per layer at most
  EXPECT_EQ(cache.max_prompt_tokens(), Tokens{12});
  EXPECT_EQ(cache.pages_needed_to_allocate(Tokens{0}), Pages{0});
  EXPECT_EQ(cache.pages_needed_to_allocate(Tokens{1}), Pages{3});
  EXPECT_EQ(cache.pages_needed_to_allocate(Tokens{4}), Pages{3});
  EXPECT_EQ(cache.pages_needed_to_allocate(Tokens{5}), Pages{6});
  EXPECT_EQ(cache.pages_needed_to_allocate(Tokens{13}), Pages{12});
  for (std::uint64_t n = 0; n <= 16; ++n) {
    SCOPED_TRACE(n);
    EXPECT_EQ(cache.admission(Tokens{n}), n <= 12 ? Admission::now : Admission::never);
    EXPECT_EQ(cache.can_allocate(Tokens{n}), n <= 12);
  }
  ASSERT_TRUE(cache.allocate_paged("a", Tokens{8}));  // 6 pages: 4 free
  EXPECT_EQ(cache.admission(Tokens{0}), Admission::now);
  EXPECT_EQ(cache.admission(Tokens{4}), Admission::now);
  EXPECT_EQ(cache.admission(Tokens{5}), Admission::later);
  EXPECT_EQ(cache.admission(Tokens{12}), Admission::later);
  EXPECT_EQ(cache.admission(Tokens{13}), Admission::never);
  EXPECT_EQ(cache.max_prompt_tokens(), Tokens{12});  // of the empty cache
  // can_allocate agrees with allocate_paged, and reserves nothing.
  for (std::uint64_t n = 0; n <= 13; ++n) {
    SCOPED_TRACE(n);
    const bool can = cache.can_allocate(Tokens{n});
    EXPECT_EQ(can, n <= 4);
    const Snapshot before = snapshot(cache);
    EXPECT_EQ(cache.allocate_paged("probe", Tokens{n}), can);
    if (can) {
      cache.free("probe");
    }
    Snapshot after = snapshot(cache);
    after.free_list = before.free_list;  // freed pages go to the tail: order differs
    EXPECT_EQ(after, before);
  }
  // pages_needed_to_append: the layers whose last page is full (or that have none).
  EXPECT_EQ(cache.pages_needed_to_append("a"), Pages{3});
  ASSERT_TRUE(cache.append_token_paged("a", 0));
  EXPECT_EQ(cache.pages_needed_to_append("a"), Pages{2});
  ASSERT_TRUE(cache.allocate_paged("b", Tokens{0}));
  EXPECT_EQ(cache.pages_needed_to_append("b"), Pages{3});
  ASSERT_TRUE(cache.append_token_paged("b", 1));
  EXPECT_EQ(cache.pages_needed_to_append("b"), Pages{2});
  // A shared last page must be copied: it counts too.
  ASSERT_TRUE(cache.fork("a", "a2"));
  EXPECT_EQ(cache.pages_needed_to_append("a"), Pages{3});
  EXPECT_EQ(cache.pages_needed_to_append("a2"), Pages{3});
  EXPECT_EQ(cache.stats().free_pages, Pages{2});
  EXPECT_EQ(cache.admission(Tokens{1}), Admission::later);
  expect_consistent(cache);
}

// ---------------------------------------------------------------------------
// Thousands of concurrent requests

// 2,000 concurrent requests: 250 prompts of 1..8 tokens (one page each),
// each sampled 8 times (its own request and 7 forks), as in parallel
// sampling. The test preset audits every mutation with check_invariants(),
// O(pages + requests * layers) each, so the request count, not only the pool,
// sets the run time: 2,000 requests (4,000 mutations) over 282 pages keep it
// to a few seconds under ASan, where 3,000 requests with a page each took
// ~15 s of CPU.
TEST(PagedKVCacheTest, TwoThousandConcurrentRequests) {
  constexpr ModelConfig cfg{1, 1, 4, 2};
  constexpr std::uint64_t prompts = 250;
  constexpr std::uint64_t samples = 8;
  constexpr std::uint64_t n = prompts * samples;
  constexpr std::uint64_t spare = 32;
  PagedKVCache cache(cfg, pages(prompts + spare, cfg, Tokens{8}), Tokens{8});
  ASSERT_EQ(cache.total_pages(), Pages{prompts + spare});
  const auto id = [](std::uint64_t p, std::uint64_t s) {
    return "req-" + std::to_string(p) + "-" + std::to_string(s);
  };
  std::uint64_t stored = 0;
  for (std::uint64_t p = 0; p < prompts; ++p) {
    ASSERT_TRUE(cache.allocate_paged(id(p, 0), Tokens{1 + p % 8})) << p;
    cache.write_kv(id(p, 0), 0, 0, key_row(0, p), value_row(0, p));
    for (std::uint64_t s = 1; s < samples; ++s) ASSERT_TRUE(cache.fork(id(p, 0), id(p, s)));
    stored += samples * (1 + p % 8);
  }
  PagedStats st = cache.stats();
  EXPECT_EQ(st.num_requests, n);
  EXPECT_EQ(cache.request_ids().size(), n);
  EXPECT_EQ(st.used_pages, Pages{prompts});
  EXPECT_EQ(st.free_pages, Pages{spare});
  EXPECT_EQ(st.stored_tokens, Tokens{stored});
  // The samples of a prompt share its page; prompts have pages of their own.
  std::set<std::uint64_t> seen;
  for (std::uint64_t p = 0; p < prompts; ++p) {
    const std::vector<std::uint64_t> t = ids(cache.block_table(id(p, 0), 0));
    ASSERT_EQ(t.size(), 1U);
    EXPECT_TRUE(seen.insert(t[0]).second) << p;
    EXPECT_EQ(ids(cache.block_table(id(p, samples - 1), 0)), t);
    EXPECT_EQ(copy(cache.get_kv(id(p, samples - 1), 0).keys[0]), key_row(0, p));
  }
  expect_consistent(cache);
  // A decode step for sample 1 of each prompt: it copies its shared page (or,
  // for a full page, opens a new one), until the spare pages run out.
  std::uint64_t taken = 0;
  for (std::uint64_t p = 0; p < prompts; ++p) {
    const std::string sample = id(p, 1);
    if (taken == spare) {
      const Snapshot before = snapshot(cache);
      EXPECT_FALSE(cache.append_token_paged(sample, 0, key_row(1, p), value_row(1, p)));
      EXPECT_EQ(snapshot(cache), before);
      break;
    }
    ASSERT_TRUE(cache.append_token_paged(sample, 0, key_row(1, p), value_row(1, p))) << p;
    ++taken;
    ++stored;
    const auto [keys, values] = cache.get_kv(sample, 0);
    ASSERT_EQ(keys.size(), 2 + p % 8);
    EXPECT_EQ(copy(keys[0]), key_row(0, p));
    EXPECT_EQ(copy(values[keys.size() - 1]), value_row(1, p));
    EXPECT_EQ(cache.tokens(id(p, 2), 0), Tokens{1 + p % 8});  // its siblings did not grow
  }
  EXPECT_EQ(taken, spare);
  st = cache.stats();
  EXPECT_EQ(st.used_pages, Pages{prompts + spare});
  EXPECT_EQ(st.free_pages, Pages{0});
  EXPECT_EQ(st.stored_tokens, Tokens{stored});
  expect_consistent(cache);
  // Free in a mixed order: k * 7 mod 2000 visits every request once.
  for (std::uint64_t k = 0; k < n; ++k) {
    const std::uint64_t i = (k * 7) % n;
    cache.free(id(i / samples, i % samples));
    if (k % 500 == 0) expect_consistent(cache);
  }
  st = cache.stats();
  EXPECT_EQ(st.num_requests, 0U);
  EXPECT_EQ(st.used_pages, Pages{0});
  EXPECT_EQ(st.free_pages, st.total_pages);
  EXPECT_EQ(st.stored_tokens, Tokens{0});
  EXPECT_EQ(cache.pool().free_list().size(), prompts + spare);
  expect_consistent(cache);
}

// ---------------------------------------------------------------------------
// Lazy commit (CONTRACT.md "KV data"): neither construction nor allocation
// touches memory in proportion to the budget; resident memory grows with the
// tokens written. Measured as VmRSS deltas (ASan has its own overhead).

TEST(PagedKVCacheLazyCommit, ConstructionAndAllocationCommitNoKvMemory) {
  const std::size_t r0 = resident_bytes();
  ASSERT_GT(r0, 0U) << "VmRSS unavailable";
  {
    // The contract's seed: 8 GiB, 131072 pages of 64 KiB. Bookkeeping is
    // ~28 bytes per page (3.5 MiB).
    PagedKVCache cache(kSeed, Bytes{8ULL << 30}, Tokens{16});
    const std::size_t r1 = resident_bytes();
    RecordProperty("rss_construct_8GiB", std::to_string(grew(r0, r1)));
    EXPECT_LT(grew(r0, r1), 16 * kMiB) << "construction: " << r0 << " -> " << r1;
  }
  // 8 GiB in 2048 pages of 4 MiB (page size 1024), so that the audited pool
  // allocations (each O(pages)) of a large prompt stay fast.
  const std::size_t r2 = resident_bytes();
  PagedKVCache cache(kSeed, Bytes{8ULL << 30}, Tokens{1024});
  ASSERT_EQ(cache.total_pages(), Pages{2048});
  const std::size_t r3 = resident_bytes();
  EXPECT_LT(grew(r2, r3), 16 * kMiB) << "construction: " << r2 << " -> " << r3;
  ASSERT_TRUE(cache.allocate_paged("long", Tokens{32768}));  // 4 GiB of KV, 1024 pages
  EXPECT_EQ(cache.stats().used_memory, Bytes{4ULL << 30});
  const std::size_t r4 = resident_bytes();
  RecordProperty("rss_allocate_4GiB", std::to_string(grew(r3, r4)));
  EXPECT_LT(grew(r3, r4), 16 * kMiB) << "allocating 4 GiB: " << r3 << " -> " << r4;
  // Reading the unwritten prompt commits nothing either.
  std::size_t nonzero = 0;
  const auto [keys, values] = cache.get_kv("long", 31);
  for (std::size_t t = 0; t < keys.size(); t += 97) {
    for (const std::byte b : keys[t]) nonzero += b != std::byte{0} ? 1 : 0;
  }
  EXPECT_EQ(nonzero, 0U);
  EXPECT_LT(grew(r3, resident_bytes()), 16 * kMiB);
}

TEST(PagedKVCacheLazyCommit, WritingTokensCommitsMemoryInProportion) {
  // Wide rows (64 KiB K, 64 KiB V per token per layer) so that the audited
  // check after each write (O(pages)) is small next to the data written.
  constexpr ModelConfig wide{2, 32, 512, 4};
  constexpr std::size_t row_bytes = std::size_t{32} * 512 * 4;
  PagedKVCache cache(wide, Bytes{8ULL << 30}, Tokens{64});  // 1024 pages of 8 MiB
  ASSERT_EQ(cache.total_pages(), Pages{1024});
  ASSERT_TRUE(cache.allocate_paged("r", Tokens{4096}));  // 64 pages per layer: 1 GiB
  const std::vector<std::byte> k(row_bytes, std::byte{0x5A});
  const std::vector<std::byte> v(row_bytes, std::byte{0xA5});
  const std::size_t r0 = resident_bytes();
  // 256 tokens of layer 0: 4 whole pages, 32 MiB.
  constexpr std::size_t tokens = 256;
  const std::size_t written = tokens * 2 * row_bytes;
  for (std::size_t t = 0; t < tokens; ++t) cache.write_kv("r", 0, t, k, v);
  const std::size_t r1 = resident_bytes();
  RecordProperty("rss_write_32MiB", std::to_string(grew(r0, r1)));
  EXPECT_GE(grew(r0, r1), written / 2) << "writing 32 MiB: " << r0 << " -> " << r1;
  EXPECT_LT(grew(r0, r1), 2 * written) << "writing 32 MiB: " << r0 << " -> " << r1;
  EXPECT_EQ(copy(cache.get_kv("r", 0).values[255]), v);
}

// ---------------------------------------------------------------------------
// Moves

TEST(PagedKVCacheTest, MoveConstructionKeepsRequestsViewsAndBlockTables) {
  PagedKVCache cache = populated_cache();
  const Snapshot before = snapshot(cache);
  const std::span<const PageId> table = cache.block_table("a", 0);
  const std::vector<std::uint64_t> table_ids = ids(table);
  const auto [keys, values] = cache.get_kv("a", 0);
  PagedKVCache moved(std::move(cache));
  EXPECT_EQ(snapshot(moved), before);
  // The storage did not move: the old views still read the same data.
  EXPECT_EQ(ids(table), table_ids);
  EXPECT_EQ(copy(keys[4]), key_row(0, 4));
  EXPECT_EQ(copy(values[5]), value_row(0, 5));
  // And it keeps working.
  ASSERT_TRUE(moved.append_token_paged("b", 1, key_row(1, 1), value_row(1, 1)));
  moved.write_kv("a", 1, 3, key_row(5, 3), value_row(5, 3));
  EXPECT_EQ(copy(moved.get_kv("a", 1).keys[3]), key_row(5, 3));
  ASSERT_TRUE(moved.allocate_paged("c", Tokens{4}));
  EXPECT_FALSE(moved.allocate_paged("d", Tokens{1}));
  moved.free("a");
  EXPECT_EQ(moved.stats().free_pages, Pages{6});
  expect_consistent(moved);
  // A moved-to cache destroyed with live requests releases everything (ASan).
}

TEST(PagedKVCacheTest, MoveAssignmentReplacesTheTargetsRequests) {
  PagedKVCache source = populated_cache();
  const Snapshot before = snapshot(source);
  PagedKVCache target(kFloat, pages(8, kFloat), kPage);
  ASSERT_TRUE(target.allocate_paged("old", Tokens{9}));
  const std::vector<float> row4(4, 1.0F);
  ASSERT_TRUE(target.append_token_paged("old", 1, std::span<const float>(row4),
                                        std::span<const float>(row4)));
  ASSERT_TRUE(target.allocate_paged("reg", Tokens{4}, "h", Tokens{4}));
  target.free("reg");  // a cached prefix too: the whole pool is held
  ASSERT_EQ(target.stats().cached_pages, Pages{2});
  target = std::move(source);
  EXPECT_EQ(snapshot(target), before);
  EXPECT_FALSE(target.contains("old"));
  EXPECT_FALSE(target.has_prefix("h"));
  EXPECT_EQ(target.config(), kSmall);
  EXPECT_EQ(target.stats().total_pages, Pages{12});
  ASSERT_TRUE(target.allocate_paged("c", Tokens{3}));  // the last 3 pages
  ASSERT_TRUE(target.append_token_paged("c", 0, key_row(0, 3), value_row(0, 3)));
  EXPECT_EQ(copy(target.get_kv("c", 0).keys[3]), key_row(0, 3));
  EXPECT_EQ(copy(target.get_kv("a", 0).keys[2]), key_row(0, 2));
  expect_consistent(target);
  // Moved again, into a fresh cache that then goes out of scope.
  {
    PagedKVCache third(kSmall, pages(1), kPage);
    third = std::move(target);
    EXPECT_EQ(third.stats().num_requests, 3U);
    EXPECT_TRUE(third.check_invariants());
  }
}

}  // namespace
