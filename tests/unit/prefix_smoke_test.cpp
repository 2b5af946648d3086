#include <gtest/gtest.h>

#include <cstddef>
#include <vector>

import kvcache;

using namespace kvcache;

namespace {
std::vector<std::byte> row(std::byte b) { return std::vector<std::byte>(4, b); }
}  // namespace

TEST(PrefixSmoke, ContractExample) {
  PagedKVCache cache({2, 1, 4, 1}, Bytes{32 * 100}, Tokens{4});  // 100 pages of 32 B
  ASSERT_EQ(cache.stats().total_pages, Pages{100});
  ASSERT_TRUE(cache.allocate_paged("a", Tokens{16}, "sys", Tokens{8}));
  EXPECT_EQ(cache.stats().free_pages, Pages{92});
  // a writes its prefill in place into the registered pages.
  cache.write_kv("a", 0, 1, row(std::byte{5}), row(std::byte{6}));
  EXPECT_EQ(cache.stats().prefix.cow_copies, 0u);
  ASSERT_TRUE(cache.allocate_paged("b", Tokens{16}, "sys", Tokens{8}));
  EXPECT_EQ(cache.stats().free_pages, Pages{88});  // 2 new pages per layer
  EXPECT_EQ(cache.stats().prefix_hits, 1u);
  EXPECT_EQ(cache.stats().prefix_misses, 1u);
  auto ta = cache.block_table("a", 0);
  auto tb = cache.block_table("b", 0);
  EXPECT_EQ(ta[0], tb[0]);
  EXPECT_EQ(ta[1], tb[1]);
  EXPECT_NE(ta[2], tb[2]);
  // b sees a's prefill (shared); b's write copies.
  EXPECT_EQ(cache.get_kv("b", 0).keys[1][0], std::byte{5});
  cache.write_kv("b", 0, 1, row(std::byte{7}), row(std::byte{8}));
  EXPECT_EQ(cache.get_kv("a", 0).keys[1][0], std::byte{5});
  EXPECT_EQ(cache.get_kv("b", 0).keys[1][0], std::byte{7});
  EXPECT_EQ(cache.stats().prefix.cow_copies, 1u);
  EXPECT_TRUE(cache.check_invariants());
  cache.free("a");
  EXPECT_EQ(cache.stats().cached_pages, Pages{1});  // page 1 of layer 0 went to b's copy
  cache.free("b");
  EXPECT_EQ(cache.stats().cached_pages, Pages{4});
  EXPECT_EQ(cache.stats().free_pages + cache.stats().cached_pages, Pages{100});
  ASSERT_TRUE(cache.allocate_paged("c", Tokens{8}, "sys", Tokens{8}));
  EXPECT_EQ(cache.stats().cached_pages, Pages{0});
  EXPECT_EQ(cache.get_kv("c", 0).keys[1][0], std::byte{5});
  EXPECT_TRUE(cache.check_invariants());
  ASSERT_TRUE(cache.fork("c", "d"));
  EXPECT_EQ(cache.stats().used_pages, Pages{4});
  ASSERT_TRUE(cache.append_token_paged("d", 0, row(std::byte{9}), row(std::byte{9})));
  EXPECT_EQ(cache.tokens("c", 0), Tokens{8});
  EXPECT_EQ(cache.tokens("d", 0), Tokens{9});
  EXPECT_TRUE(cache.check_invariants());
}

TEST(PrefixSmoke, LruEvictionOnlyWhenItHelps) {
  PagedKVCache cache({1, 1, 4, 1}, Bytes{32 * 6}, Tokens{4});  // 6 pages, 1 layer
  ASSERT_TRUE(cache.allocate_paged("a", Tokens{8}, "p1", Tokens{8}));
  ASSERT_TRUE(cache.allocate_paged("b", Tokens{8}, "p2", Tokens{8}));
  cache.free("a");
  cache.free("b");
  EXPECT_EQ(cache.stats().cached_pages, Pages{4});
  // 7 pages can never be had: nothing is evicted.
  EXPECT_FALSE(cache.allocate_paged("x", Tokens{28}));
  EXPECT_EQ(cache.stats().cached_pages, Pages{4});
  EXPECT_TRUE(cache.has_prefix("p1"));
  // 3 pages: 2 free + evict p1 (least recently used).
  ASSERT_TRUE(cache.allocate_paged("y", Tokens{12}));
  EXPECT_FALSE(cache.has_prefix("p1"));
  EXPECT_TRUE(cache.has_prefix("p2"));
  EXPECT_EQ(cache.stats().prefix.prefixes_evicted, 1u);
  EXPECT_TRUE(cache.check_invariants());
}
