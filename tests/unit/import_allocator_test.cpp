// A consumer importing kvcache.allocator (and kvcache.units for Pages and
// PageId) without the umbrella.
#include <gtest/gtest.h>

import kvcache.allocator;
import kvcache.units;

TEST(SingleModuleImport, Allocator) {
  kvcache::PagePool pool(kvcache::Pages{2});
  EXPECT_EQ(pool.allocate()->id, kvcache::PageId{0});
  EXPECT_EQ(pool.free_pages(), kvcache::Pages{1});
}
