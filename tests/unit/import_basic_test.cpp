// A consumer importing kvcache.basic (and kvcache.units for its units)
// without the umbrella; the config is passed as a braced list.
#include <gtest/gtest.h>

import kvcache.basic;
import kvcache.units;

TEST(SingleModuleImport, Basic) {
  kvcache::BasicKVCache cache({32, 8, 128, 2}, kvcache::Bytes{8ULL << 30});
  ASSERT_TRUE(cache.allocate("r", kvcache::Tokens{10}, kvcache::Tokens{6}));
  EXPECT_EQ(cache.stats().used_memory, kvcache::Bytes{16 * 131072});
  cache.free("r");
  EXPECT_EQ(cache.stats().num_requests, 0U);
}
