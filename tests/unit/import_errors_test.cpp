// A consumer importing only kvcache.errors.
#include <gtest/gtest.h>

#include <stdexcept>

import kvcache.errors;

TEST(SingleModuleImport, Errors) {
  EXPECT_THROW(throw kvcache::UnknownRequest("x"), std::out_of_range);
  EXPECT_THROW(throw kvcache::StalePage("x"), std::invalid_argument);
}
