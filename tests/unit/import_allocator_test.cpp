// A consumer importing kvcache.allocator (and kvcache.units for Pages and
// PageId) without the umbrella.
#include <gtest/gtest.h>

#include <optional>

import kvcache.allocator;
import kvcache.units;

TEST(SingleModuleImport, Allocator) {
  kvcache::PagePool pool(kvcache::Pages{2});
  const std::optional<kvcache::PageHandle> h = pool.allocate();
  if (!h) FAIL() << "allocate() on a fresh pool returned no page";
  EXPECT_EQ(h->id, kvcache::PageId{0});
  EXPECT_EQ(pool.free_pages(), kvcache::Pages{1});
}
