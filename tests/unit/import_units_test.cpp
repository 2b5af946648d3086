// CONTRACT.md "Build surface": a consumer may import a single module instead
// of the umbrella. This translation unit imports only kvcache.units, so every
// name it uses must be exported by that module itself.
#include <gtest/gtest.h>

#include <cstdint>

import kvcache.units;

TEST(SingleModuleImport, Units) {
  EXPECT_EQ(kvcache::Bytes{16} + kvcache::Bytes{16}, kvcache::Bytes{32});
  EXPECT_EQ(kvcache::pages_for(kvcache::Tokens{5}, kvcache::Tokens{4}), kvcache::Pages{2});
  EXPECT_EQ(static_cast<std::uint64_t>(kvcache::PageId{3}), 3U);
}
