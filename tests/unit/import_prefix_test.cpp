// A consumer importing kvcache.prefix alone (and kvcache.units for its
// units): the registry and its page lists work without the cache.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

import kvcache.prefix;
import kvcache.units;

TEST(SingleModuleImport, Prefix) {
  kvcache::PrefixRegistry registry(kvcache::Pages{4});
  {
    kvcache::PageList list(registry);
    list.reserve_more(2);
    list.adopt(registry.take());
    list.adopt(registry.take());
    registry.hold(registry.prepare("sys", kvcache::Tokens{3}, 1, 1, /*registrant=*/1), list[0]);
    EXPECT_EQ(registry.free_pages(), kvcache::Pages{2});
    EXPECT_EQ(registry.used_pages(), kvcache::Pages{2});
    EXPECT_EQ(registry.cached_pages(), kvcache::Pages{0});
    EXPECT_TRUE(registry.writable_by(list[0], 1));
    EXPECT_FALSE(registry.writable_by(list[0], 2));
  }
  // The request went away: its prefix page stays, cached; the other is free.
  EXPECT_EQ(registry.free_pages(), kvcache::Pages{3});
  EXPECT_EQ(registry.cached_pages(), kvcache::Pages{1});
  EXPECT_TRUE(registry.check_invariants(std::vector<std::uint64_t>(4, 0)));
  EXPECT_EQ(registry.clear(), 1U);
  const kvcache::PrefixCounters c = registry.counters();
  EXPECT_EQ(c.prefixes_evicted, 1U);
  EXPECT_EQ(c.pages_evicted, 1U);
  EXPECT_EQ(registry.free_pages(), kvcache::Pages{4});
}
