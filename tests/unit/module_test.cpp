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
  const std::optional<kvcache::PageHandle> h = pool.allocate();
  ASSERT_TRUE(h.has_value());
  EXPECT_EQ(h->id, kvcache::PageId{0});
  EXPECT_EQ(pool.handle(h->id), *h);
  pool.retain(*h);
  EXPECT_EQ(pool.ref_count(h->id), 2U);
  EXPECT_FALSE(pool.release(*h));
  EXPECT_TRUE(pool.release(*h));
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

}  // namespace
