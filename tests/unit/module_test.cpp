// The {fmt} rule (STYLE.md "Tests"): every entity that `import kvcache;`
// exports is used here at least once, so a name that the umbrella fails to
// export, or an inline function whose body does not compile in an importer,
// breaks this file. The behaviour of each entity is tested in depth in the
// per-module files; here one use each is enough.
//
// Exported entities, by module:
//   kvcache.units     Bytes, Tokens, Pages (detail::Quantity), tokens_in,
//                     bytes_for (Tokens, Pages), pages_for, PageId,
//                     std::hash<Quantity>, std::hash<PageId>
//   kvcache.config    ModelConfig, to_string(ModelConfig)
//   kvcache.errors    UnknownRequest, ShapeMismatch, OutOfPages,
//                     ReservationExceeded, StalePage; detail::throw_unknown_request,
//                     detail::check_layer, detail::check_row_bytes,
//                     detail::check_float_rows
//   kvcache.storage   Storage, TokenRows (and its iterator), KVView,
//                     detail::LazyBuffer
//   kvcache.allocator PageHandle, PagePool
//   kvcache.basic     BasicStats, BasicKVCache
//   kvcache.prefix    PrefixCounters, PageList, PrefixRegistry (and its Prefix)
//   kvcache.paged     PagedStats, Admission, PagedKVCache
#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

import kvcache;

namespace {

TEST(Module, Units) {
  const kvcache::Bytes b{16};
  const kvcache::Tokens t{1 << 20};
  const kvcache::Pages p{3};
  EXPECT_EQ(b.count(), 16U);
  EXPECT_EQ(t.count(), std::uint64_t{1} << 20);
  EXPECT_EQ(p + kvcache::Pages{1}, kvcache::Pages{4});
  EXPECT_EQ(b - kvcache::Bytes{6}, kvcache::Bytes{10});
  EXPECT_LT(kvcache::Tokens::zero(), t);
  EXPECT_EQ(kvcache::Pages::max().count(), ~std::uint64_t{0});
  EXPECT_EQ(kvcache::tokens_in(p, kvcache::Tokens{16}), kvcache::Tokens{48});
  EXPECT_EQ(kvcache::bytes_for(kvcache::Tokens{2}, kvcache::Bytes{8}), kvcache::Bytes{16});
  EXPECT_EQ(kvcache::bytes_for(kvcache::Pages{2}, kvcache::Bytes{8}), kvcache::Bytes{16});
  EXPECT_EQ(kvcache::pages_for(kvcache::Tokens{17}, kvcache::Tokens{16}), kvcache::Pages{2});
  EXPECT_EQ(std::hash<kvcache::Tokens>{}(t), std::hash<kvcache::Tokens>{}(kvcache::Tokens{1 << 20}));
  std::ostringstream os;
  os << b;
  EXPECT_EQ(os.str(), "16 B");
}

TEST(Module, PageId) {
  const kvcache::PageId id{5};
  EXPECT_EQ(static_cast<std::uint64_t>(id), 5U);
  EXPECT_EQ(id.index(), 5U);
  EXPECT_NE(id, kvcache::PageId::none());
  EXPECT_EQ(std::hash<kvcache::PageId>{}(id), std::hash<kvcache::PageId>{}(kvcache::PageId{5}));
  std::ostringstream os;
  os << id;
  EXPECT_EQ(os.str(), "page#5");
}

TEST(Module, ModelConfig) {
  const kvcache::ModelConfig cfg{32, 8, 128, 2};
  cfg.validate();
  EXPECT_TRUE(cfg.valid());
  EXPECT_EQ(cfg.bytes_per_token(), kvcache::Bytes{131072});
  EXPECT_EQ(cfg.bytes_per_token_per_layer(), kvcache::Bytes{4096});
  EXPECT_EQ(cfg.kv_bytes_per_token_per_layer(), kvcache::Bytes{2048});
  EXPECT_EQ(cfg.bytes_per_page(kvcache::Tokens{16}), kvcache::Bytes{65536});
  EXPECT_EQ(cfg.max_tokens(kvcache::Bytes{8ULL << 30}), kvcache::Tokens{65536});
  EXPECT_EQ(cfg.kv_elements_per_token_per_layer(), 1024U);
  EXPECT_EQ(kvcache::to_string(cfg),
            "ModelConfig{layers=32, kv_heads=8, head_dim=128, dtype_bytes=2}");
  EXPECT_EQ(cfg, (kvcache::ModelConfig{32, 8, 128, 2}));
}

TEST(Module, Errors) {
  EXPECT_THROW(throw kvcache::UnknownRequest("u"), std::out_of_range);
  EXPECT_THROW(throw kvcache::ShapeMismatch("s"), std::invalid_argument);
  EXPECT_THROW(throw kvcache::OutOfPages("o"), std::runtime_error);
  EXPECT_THROW(throw kvcache::ReservationExceeded("r"), std::length_error);
  EXPECT_THROW(throw kvcache::StalePage("p"), std::invalid_argument);
}

TEST(Module, ErrorsDetail) {
  EXPECT_THROW(kvcache::detail::throw_unknown_request("where", "id"), kvcache::UnknownRequest);
  EXPECT_THROW(kvcache::detail::check_layer("where", "id", 2, 2), std::out_of_range);
  EXPECT_THROW(kvcache::detail::check_row_bytes("where", "id", 0, "key", 1, 2),
               kvcache::ShapeMismatch);
  EXPECT_THROW(kvcache::detail::check_float_rows("where", "id", 0, 2, 1, 1, 1),
               kvcache::ShapeMismatch);
}

TEST(Module, Storage) {
  EXPECT_NE(kvcache::Storage::host, kvcache::Storage::none);
  const std::vector<std::byte> bytes(8, std::byte{3});
  const kvcache::TokenRows rows(bytes.data(), 2, 4, 4);
  kvcache::TokenRows::iterator it = rows.begin();
  EXPECT_EQ((*++it)[0], std::byte{3});
  const kvcache::KVView view{rows, kvcache::TokenRows{}};
  const auto [keys, values] = view;
  EXPECT_EQ(keys.size(), 2U);
  EXPECT_TRUE(values.empty());
  kvcache::detail::LazyBuffer buf(4096);
  buf.data()[1] = std::byte{1};
  buf.discard(0, 4096);
  EXPECT_EQ(buf.data()[1], std::byte{0});
}

TEST(Module, PagePool) {
  kvcache::PagePool pool(kvcache::Pages{2});
  const std::optional<kvcache::PageHandle> got = pool.allocate();
  if (!got) FAIL() << "allocate() on a fresh pool returned no page";
  const kvcache::PageHandle h = *got;
  EXPECT_EQ(h.id, kvcache::PageId{0});
  EXPECT_EQ(pool.handle(h.id), h);
  pool.retain(h);
  EXPECT_EQ(pool.ref_count(h.id), 2U);
  EXPECT_FALSE(pool.release(h));
  EXPECT_TRUE(pool.release(h));
  const kvcache::PageHandle taken = pool.take(kvcache::PageId{1});
  EXPECT_TRUE(pool.is_live(taken));
  std::vector<kvcache::PageHandle> out;
  EXPECT_TRUE(pool.allocate(kvcache::Pages{1}, out));
  EXPECT_FALSE(pool.can_allocate(kvcache::Pages{1}));
  EXPECT_EQ(pool.capacity(), kvcache::Pages{2});
  EXPECT_EQ(pool.free_pages(), kvcache::Pages{0});
  EXPECT_EQ(pool.live_pages(), kvcache::Pages{2});
  EXPECT_FALSE(pool.is_free(kvcache::PageId{0}));
  EXPECT_TRUE(pool.free_list().empty());
  EXPECT_TRUE(pool.check_invariants());
  EXPECT_GT(kvcache::PagePool::max_capacity, 0U);
}

TEST(Module, BasicKVCache) {
  kvcache::BasicKVCache cache({2, 1, 2, 4}, kvcache::Bytes{1024});
  ASSERT_TRUE(cache.allocate("r", kvcache::Tokens{1}, kvcache::Tokens{1}));
  EXPECT_TRUE(cache.can_allocate(kvcache::Tokens{1}, kvcache::Tokens{0}));
  const std::vector<std::byte> row(8, std::byte{9});
  const std::vector<float> floats{1.0F, 2.0F};
  cache.append_token("r", 0, row, row);
  cache.append_token("r", 0, std::span<const float>(floats), std::span<const float>(floats));
  const auto [keys, values] = cache.get_kv("r", 0);
  EXPECT_EQ(keys.size(), 2U);
  EXPECT_EQ(values[0][0], std::byte{9});
  EXPECT_EQ(cache.tokens("r", 0), kvcache::Tokens{2});
  EXPECT_EQ(cache.reservation("r"), kvcache::Tokens{2});
  EXPECT_TRUE(cache.contains("r"));
  EXPECT_EQ(cache.num_requests(), 1U);
  EXPECT_EQ(cache.request_ids(), std::vector<std::string>{"r"});
  EXPECT_EQ(cache.config().dtype_bytes, 4U);
  EXPECT_EQ(cache.budget(), kvcache::Bytes{1024});
  EXPECT_TRUE(cache.check_invariants());
  const kvcache::BasicStats s = cache.stats();
  EXPECT_EQ(s.used_memory, kvcache::Bytes{64});  // 2 tokens * 2 layers * 2 * 8 bytes
  EXPECT_EQ(s.free_memory, kvcache::Bytes{960});
  EXPECT_EQ(s.total_memory, kvcache::Bytes{1024});
  EXPECT_EQ(s.reserved_tokens, kvcache::Tokens{2});
  EXPECT_EQ(s.stored_tokens, kvcache::Tokens{2});
  EXPECT_EQ(s.num_requests, 1U);
  EXPECT_DOUBLE_EQ(s.utilization_pct, 6.25);
  cache.free("r");
  EXPECT_EQ(cache.stats().num_requests, 0U);
}

TEST(Module, PrefixRegistry) {
  kvcache::PrefixRegistry registry(kvcache::Pages{3});
  kvcache::PrefixCounters& counters = registry.counters();
  EXPECT_EQ(registry.total_pages(), kvcache::Pages{3});
  {
    kvcache::PageList list(registry);
    list.reserve_more(2);
    list.adopt(registry.take());
    list.share(list[0]);  // a second request reference to the same page
    EXPECT_EQ(list.ids().size(), 2U);
    EXPECT_EQ(list.size(), 2U);
    EXPECT_FALSE(list.empty());
    EXPECT_EQ(list.back(), list[0]);
    EXPECT_EQ(registry.request_holders(list[0]), 2U);
    EXPECT_EQ(registry.request_refs(), 2U);
    EXPECT_FALSE(registry.writable_by(list[0], 1));
    kvcache::PrefixRegistry::Prefix& sys =
        registry.prepare("sys", kvcache::Tokens{4}, 1, 1, /*registrant=*/1);
    registry.hold(sys, list[0]);
    registry.touch(sys);
    EXPECT_EQ(registry.owner(list[0]), &sys);
    EXPECT_EQ(registry.find("sys"), &sys);
    EXPECT_EQ(std::as_const(registry).find("sys")->tokens, kvcache::Tokens{4});
    list.replace(1, registry.take());
    EXPECT_TRUE(registry.writable_by(list[0], 1));  // its registrant, its only request holder
    kvcache::PageList moved(std::move(list));
    kvcache::PageList assigned;
    assigned = std::move(moved);
    EXPECT_EQ(registry.used_pages(), kvcache::Pages{2});
    assigned.clear();
  }
  EXPECT_EQ(registry.cached_pages(), kvcache::Pages{1});  // only the registry holds it
  EXPECT_EQ(registry.evictable_except(nullptr), 1U);
  EXPECT_TRUE(registry.check_invariants(std::vector<std::uint64_t>(3, 0)));
  registry.make_room(3, nullptr);
  EXPECT_EQ(registry.free_pages(), kvcache::Pages{3});
  EXPECT_EQ(counters.prefixes_evicted, 1U);
  EXPECT_EQ(counters.pages_evicted, 1U);
  kvcache::PrefixRegistry::Prefix& undo = registry.prepare("undo", kvcache::Tokens{1}, 1, 1, 2);
  registry.unprepare(undo);
  EXPECT_EQ(registry.num_prefixes(), 0U);
  const kvcache::PageId page = registry.take();
  registry.retain(page);
  registry.release(page);
  registry.release(page);
  EXPECT_EQ(registry.pool().free_pages(), kvcache::Pages{3});
  {
    kvcache::PageList a(registry);
    a.reserve_more(1);
    a.adopt(registry.take());
    registry.hold(registry.prepare("p1", kvcache::Tokens{1}, 1, 1, 7), a[0]);
    kvcache::PageList b(registry);
    b.reserve_more(1);
    b.adopt(registry.take());
    kvcache::PrefixRegistry::Prefix& p2 = registry.prepare("p2", kvcache::Tokens{1}, 1, 1, 8);
    registry.hold(p2, b[0]);
    registry.evict(p2);  // b keeps its page
    EXPECT_EQ(registry.find("p2"), nullptr);
    EXPECT_EQ(registry.free_pages(), kvcache::Pages{1});
  }
  registry.evict_lru();  // p1, cached since `a` went away
  EXPECT_EQ(registry.clear(), 0U);
  EXPECT_EQ(registry.free_pages(), kvcache::Pages{3});
  EXPECT_EQ(counters.prefixes_evicted, 3U);
}

TEST(Module, PagedKVCache) {
  // 8-byte rows (2 floats), page size 2: 32-byte pages, 16 of them.
  kvcache::PagedKVCache cache({2, 1, 2, 4}, kvcache::Bytes{32 * 16}, kvcache::Tokens{2});
  ASSERT_TRUE(cache.allocate_paged("r", kvcache::Tokens{3}));
  ASSERT_TRUE(cache.allocate_paged("p", kvcache::Tokens{4}, "sys", kvcache::Tokens{2}));
  ASSERT_TRUE(cache.fork("r", "f"));
  const std::vector<std::byte> row(8, std::byte{9});
  const std::vector<float> floats{1.0F, 2.0F};
  const std::span<const float> f(floats);
  ASSERT_TRUE(cache.append_token_paged("r", 0, row, row));
  ASSERT_TRUE(cache.append_token_paged("r", 0, f, f));
  ASSERT_TRUE(cache.append_token_paged("r", 1));
  ASSERT_TRUE(cache.append_token_all_layers("f"));
  cache.write_kv("r", 0, std::size_t{0}, row, row);
  cache.write_kv("r", 0, std::size_t{1}, f, f);
  cache.write_kv("r", 0, kvcache::Tokens{2}, row, row);
  cache.write_kv("r", 0, kvcache::Tokens{3}, f, f);
  const auto [keys, values] = cache.get_kv("r", 0);
  EXPECT_EQ(keys.size(), 5U);
  EXPECT_EQ(values[0][0], std::byte{9});
  EXPECT_EQ(cache.block_table("r", 0).size(), 3U);
  EXPECT_EQ(cache.pages_held("r"), kvcache::Pages{5});
  EXPECT_EQ(cache.tokens("r", 1), kvcache::Tokens{4});
  EXPECT_TRUE(cache.contains("f"));
  EXPECT_EQ(cache.num_requests(), 3U);
  EXPECT_EQ(cache.request_ids().size(), 3U);
  EXPECT_EQ(cache.config().dtype_bytes, 4U);
  EXPECT_EQ(cache.page_size(), kvcache::Tokens{2});
  EXPECT_EQ(cache.bytes_per_page(), kvcache::Bytes{32});
  EXPECT_EQ(cache.total_pages(), kvcache::Pages{16});
  EXPECT_EQ(cache.storage(), kvcache::Storage::host);
  EXPECT_EQ(cache.pool().capacity(), kvcache::Pages{16});
  EXPECT_EQ(cache.registry().num_prefixes(), 1U);
  EXPECT_TRUE(cache.has_prefix("sys"));
  EXPECT_GT(cache.memory_efficiency(), 0.0);
  EXPECT_EQ(cache.pages_needed_to_allocate(kvcache::Tokens{3}), kvcache::Pages{4});
  EXPECT_EQ(cache.pages_needed_to_append("p"), kvcache::Pages{2});
  EXPECT_TRUE(cache.can_allocate(kvcache::Tokens{1}));
  EXPECT_EQ(cache.admission(kvcache::Tokens{1}), kvcache::Admission::now);
  EXPECT_EQ(cache.admission(kvcache::Tokens{16}), kvcache::Admission::later);
  EXPECT_EQ(cache.admission(kvcache::Tokens{17}), kvcache::Admission::never);
  EXPECT_EQ(cache.max_prompt_tokens(), kvcache::Tokens{16});
  EXPECT_TRUE(cache.check_invariants());
  const kvcache::PagedStats s = cache.stats();
  EXPECT_EQ(s.free_pages + s.used_pages + s.cached_pages, s.total_pages);
  EXPECT_EQ(s.prefix_misses, 1U);
  EXPECT_EQ(s.prefix.misses, 1U);
  cache.free("p");
  EXPECT_EQ(cache.stats().cached_pages, kvcache::Pages{2});
  EXPECT_TRUE(cache.evict_prefix("sys"));
  EXPECT_EQ(cache.clear_prefix_cache(), 0U);
  kvcache::PagedKVCache moved(std::move(cache));
  kvcache::PagedKVCache other({1, 1, 1, 1}, kvcache::Bytes{0}, kvcache::Tokens{1},
                              kvcache::Storage::none);
  other = std::move(moved);
  EXPECT_EQ(other.num_requests(), 2U);
}

}  // namespace
