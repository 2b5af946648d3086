#include <gtest/gtest.h>

#include <cstddef>
#include <vector>

import kvcache;

using namespace kvcache;

TEST(Smoke, SeedNumbers) {
  ModelConfig cfg{32, 8, 128, 2};
  EXPECT_EQ(cfg.bytes_per_token(), Bytes{131072});
  EXPECT_EQ(cfg.max_tokens(Bytes{8ull << 30}), Tokens{65536});
  BasicKVCache cache({32, 8, 128, 2}, Bytes{8ull << 30});
  ASSERT_TRUE(cache.allocate("r", Tokens{10}, Tokens{5}));
  std::vector<std::byte> k(2048, std::byte{1}), v(2048, std::byte{2});
  cache.append_token("r", 3, k, v);
  auto [keys, values] = cache.get_kv("r", 3);
  ASSERT_EQ(keys.size(), 1u);
  EXPECT_EQ(keys[0][0], std::byte{1});
  EXPECT_EQ(values[0][2047], std::byte{2});
  EXPECT_TRUE(cache.check_invariants());
  PagePool pool(Pages{4});
  std::vector<PageHandle> hs;
  ASSERT_TRUE(pool.allocate(Pages{3}, hs));
  EXPECT_FALSE(pool.allocate(Pages{2}, hs));
  EXPECT_TRUE(pool.check_invariants());
}
