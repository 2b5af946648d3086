// A consumer importing kvcache.config (and kvcache.units, whose types its
// functions return) without the umbrella.
#include <gtest/gtest.h>

import kvcache.config;
import kvcache.units;

TEST(SingleModuleImport, Config) {
  const kvcache::ModelConfig cfg{32, 8, 128, 2};
  EXPECT_EQ(cfg.bytes_per_token(), kvcache::Bytes{131072});
  EXPECT_EQ(kvcache::to_string(cfg),
            "ModelConfig{layers=32, kv_heads=8, head_dim=128, dtype_bytes=2}");
}
