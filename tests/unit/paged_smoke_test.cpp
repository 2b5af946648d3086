#include <gtest/gtest.h>

#include <cstddef>
#include <vector>

import kvcache;

using namespace kvcache;

TEST(PagedSmoke, EfficiencyExampleAndGrowth) {
  PagedKVCache cache({2, 1, 4, 1}, Bytes{1 << 20}, Tokens{4});
  ASSERT_TRUE(cache.allocate_paged("r", Tokens{5}));
  EXPECT_DOUBLE_EQ(cache.memory_efficiency(), 0.625);
  EXPECT_EQ(cache.pages_held("r"), Pages{4});
  std::vector<std::byte> k(4, std::byte{7}), v(4, std::byte{9});
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(cache.append_token_paged("r", 0, k, v));
  EXPECT_EQ(cache.pages_held("r"), Pages{4});
  ASSERT_TRUE(cache.append_token_paged("r", 0, k, v));
  EXPECT_EQ(cache.pages_held("r"), Pages{5});
  auto [keys, values] = cache.get_kv("r", 0);
  ASSERT_EQ(keys.size(), 9u);
  EXPECT_EQ(keys[0][0], std::byte{0});
  EXPECT_EQ(keys[5][0], std::byte{7});
  EXPECT_EQ(values[8][3], std::byte{9});
  cache.write_kv("r", 0, 2, k, v);
  EXPECT_EQ(cache.get_kv("r", 0).keys[2][1], std::byte{7});
  EXPECT_EQ(cache.get_kv("r", 0).keys[1][1], std::byte{0});
  EXPECT_TRUE(cache.check_invariants());
  cache.free("r");
  EXPECT_EQ(cache.stats().free_pages, cache.stats().total_pages);
  ASSERT_TRUE(cache.allocate_paged("s", Tokens{8}));
  EXPECT_EQ(cache.get_kv("s", 0).keys[2][1], std::byte{0});  // no stale bytes
  EXPECT_TRUE(cache.check_invariants());
}
