// A consumer importing only kvcache.storage.
#include <gtest/gtest.h>

#include <cstddef>
#include <vector>

import kvcache.storage;

TEST(SingleModuleImport, Storage) {
  const std::vector<std::byte> bytes(4, std::byte{7});
  const kvcache::KVView view{kvcache::TokenRows(bytes.data(), 1, 4, 4), {}};
  EXPECT_EQ(view.keys[0][3], std::byte{7});
  EXPECT_NE(kvcache::Storage::host, kvcache::Storage::none);
}
