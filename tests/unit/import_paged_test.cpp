// A consumer importing kvcache.paged (and kvcache.units for its units)
// without the umbrella; the config is passed as a braced list, the storage
// mode is the default one.
#include <gtest/gtest.h>

import kvcache.paged;
import kvcache.units;

TEST(SingleModuleImport, Paged) {
  kvcache::PagedKVCache cache({32, 8, 128, 2}, kvcache::Bytes{64ULL << 20}, kvcache::Tokens{16});
  EXPECT_EQ(cache.total_pages(), kvcache::Pages{1024});  // 64 MiB / 64 KiB
  ASSERT_TRUE(cache.allocate_paged("r", kvcache::Tokens{17}));
  EXPECT_EQ(cache.pages_held("r"), kvcache::Pages{64});
  ASSERT_TRUE(cache.allocate_paged("s", kvcache::Tokens{17}, "sys", kvcache::Tokens{16}));
  ASSERT_TRUE(cache.allocate_paged("t", kvcache::Tokens{17}, "sys", kvcache::Tokens{16}));
  EXPECT_EQ(cache.block_table("t", 31)[0], cache.block_table("s", 31)[0]);
  const auto [keys, values] = cache.get_kv("t", 31);
  EXPECT_EQ(keys.size(), 17U);
  EXPECT_EQ(values.size(), 17U);
  const kvcache::PagedStats s = cache.stats();
  EXPECT_EQ(s.used_pages, kvcache::Pages{64 + 64 + 32});
  EXPECT_EQ(s.prefix_hits, 1U);
  // Per layer: r 17 tokens in 2 pages, s 17 in 2, t 1 in its own page (the
  // shared one counts once): 35 tokens in 5 pages of 16.
  EXPECT_DOUBLE_EQ(cache.memory_efficiency(), 35.0 / 80.0);
  cache.free("r");
  cache.free("s");
  cache.free("t");
  EXPECT_EQ(cache.stats().cached_pages, kvcache::Pages{32});
  EXPECT_EQ(cache.stats().num_requests, 0U);
}
