// Unit tests for kvcache.config: ModelConfig's memory math (the seed numbers
// of CONTRACT.md "Model configuration") and its rejection of invalid shapes:
// a zero field, or sizes that overflow 64 bits, throw std::invalid_argument
// with a message that names the field. (A cache built from such a config is
// tested in basic_test.cpp.)
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

import kvcache;

namespace {

using kvcache::Bytes;
using kvcache::ModelConfig;
using kvcache::Tokens;

constexpr std::uint32_t kMax32 = std::numeric_limits<std::uint32_t>::max();
constexpr std::uint64_t kMax64 = std::numeric_limits<std::uint64_t>::max();

template <class E, class F>
std::string message_of(F&& f) {
  try {
    std::forward<F>(f)();
  } catch (const E& e) {
    return e.what();
  } catch (...) {
    ADD_FAILURE() << "threw an exception of another type";
    return {};
  }
  ADD_FAILURE() << "did not throw";
  return {};
}

// ---------------------------------------------------------------------------
// Shape of the type

TEST(ModelConfigTest, IsAnAggregateWithTheFieldsInContractOrder) {
  static_assert(std::is_aggregate_v<ModelConfig>);
  const ModelConfig cfg{32, 8, 128, 2};
  EXPECT_EQ(cfg.num_layers, 32U);
  EXPECT_EQ(cfg.num_kv_heads, 8U);
  EXPECT_EQ(cfg.head_dim, 128U);
  EXPECT_EQ(cfg.dtype_bytes, 2U);
  static_assert(std::is_same_v<decltype(ModelConfig::num_layers), std::uint32_t>);
  static_assert(std::is_same_v<decltype(ModelConfig::num_kv_heads), std::uint32_t>);
  static_assert(std::is_same_v<decltype(ModelConfig::head_dim), std::uint32_t>);
  static_assert(std::is_same_v<decltype(ModelConfig::dtype_bytes), std::uint32_t>);
}

TEST(ModelConfigTest, CopyListInitializationAndEquality) {
  const ModelConfig a = {32, 8, 128, 2};
  const ModelConfig b{32, 8, 128, 2};
  const ModelConfig c{32, 8, 128, 4};
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  EXPECT_FALSE(a == c);
}

// ---------------------------------------------------------------------------
// The seed numbers

TEST(ModelConfigTest, SeedBytesPerToken) {
  const ModelConfig cfg{32, 8, 128, 2};
  EXPECT_EQ(cfg.bytes_per_token(), Bytes{32ULL * 8 * 128 * 2 * 2});
  EXPECT_EQ(cfg.bytes_per_token(), Bytes{131072});
}

TEST(ModelConfigTest, SeedBytesPerPageIsOneLayer) {
  const ModelConfig cfg{32, 8, 128, 2};
  EXPECT_EQ(cfg.bytes_per_page(Tokens{16}), Bytes{16ULL * 8 * 128 * 2 * 2});
  EXPECT_EQ(cfg.bytes_per_page(Tokens{16}), Bytes{65536});
  EXPECT_EQ(cfg.bytes_per_page(Tokens{1}), Bytes{4096});
}

TEST(ModelConfigTest, SeedMaxTokensIsIntegerDivision) {
  const ModelConfig cfg{32, 8, 128, 2};
  EXPECT_EQ(cfg.max_tokens(Bytes{8ULL << 30}), Tokens{65536});
  EXPECT_EQ(cfg.max_tokens(Bytes{(8ULL << 30) - 1}), Tokens{65535});
  EXPECT_EQ(cfg.max_tokens(Bytes{(8ULL << 30) + 131071}), Tokens{65536});
  EXPECT_EQ(cfg.max_tokens(Bytes{131071}), Tokens{0});
  EXPECT_EQ(cfg.max_tokens(Bytes{0}), Tokens{0});
  EXPECT_EQ(cfg.max_tokens(Bytes::max()), Tokens{kMax64 / 131072});
}

TEST(ModelConfigTest, SeedKvBytesPerTokenPerLayerIsOneOfKOrV) {
  const ModelConfig cfg{32, 8, 128, 2};
  EXPECT_EQ(cfg.kv_bytes_per_token_per_layer(), Bytes{8 * 128 * 2});
  EXPECT_EQ(cfg.bytes_per_token_per_layer(), Bytes{8 * 128 * 2 * 2});
  EXPECT_EQ(cfg.kv_elements_per_token_per_layer(), 8U * 128U);
}

TEST(ModelConfigTest, OtherShapes) {
  // Llama-3-70B: 80 layers, 8 KV heads (GQA), head_dim 128, bf16.
  const ModelConfig llama70b{80, 8, 128, 2};
  EXPECT_EQ(llama70b.bytes_per_token(), Bytes{327680});
  // The smallest shape: one layer, one head, one element of one byte.
  const ModelConfig tiny{1, 1, 1, 1};
  EXPECT_EQ(tiny.kv_bytes_per_token_per_layer(), Bytes{1});
  EXPECT_EQ(tiny.bytes_per_token(), Bytes{2});
  EXPECT_EQ(tiny.bytes_per_page(Tokens{4}), Bytes{8});
  EXPECT_EQ(tiny.max_tokens(Bytes{5}), Tokens{2});
  // fp32 (the float overload's dtype).
  const ModelConfig f32{2, 2, 4, 4};
  EXPECT_EQ(f32.kv_bytes_per_token_per_layer(), Bytes{32});
  EXPECT_EQ(f32.kv_elements_per_token_per_layer(), 8U);
  EXPECT_EQ(f32.bytes_per_token(), Bytes{128});
}

TEST(ModelConfigTest, ConstantEvaluation) {
  static_assert(ModelConfig{32, 8, 128, 2}.bytes_per_token() == Bytes{131072});
  static_assert(ModelConfig{32, 8, 128, 2}.max_tokens(Bytes{8ULL << 30}) == Tokens{65536});
  static_assert(ModelConfig{32, 8, 128, 2}.bytes_per_page(Tokens{16}) == Bytes{65536});
  static_assert(ModelConfig{32, 8, 128, 2}.valid());
  // (valid() of an invalid config is not a constant expression: it catches
  // the exception validate() throws, and C++20 constant evaluation cannot
  // throw. tests/compile/ proves that an invalid config is rejected there.)
  constexpr ModelConfig cfg{32, 8, 128, 2};
  EXPECT_EQ(cfg.kv_bytes_per_token_per_layer(), Bytes{2048});
}

TEST(ModelConfigTest, ToString) {
  EXPECT_EQ(kvcache::to_string(ModelConfig{32, 8, 128, 2}),
            "ModelConfig{layers=32, kv_heads=8, head_dim=128, dtype_bytes=2}");
}

// ---------------------------------------------------------------------------
// bytes_per_page arguments

TEST(ModelConfigTest, BytesPerPageZeroPageSizeThrowsInvalidArgument) {
  const ModelConfig cfg{32, 8, 128, 2};
  const std::string msg =
      message_of<std::invalid_argument>([&] { (void)cfg.bytes_per_page(Tokens{0}); });
  EXPECT_NE(msg.find("page_size"), std::string::npos) << msg;
}

TEST(ModelConfigTest, BytesPerPageOverflowThrowsOverflowError) {
  const ModelConfig cfg{32, 8, 128, 2};  // 4096 bytes per token per layer
  EXPECT_EQ(cfg.bytes_per_page(Tokens{kMax64 / 4096}), Bytes{kMax64 / 4096 * 4096});
  EXPECT_THROW((void)cfg.bytes_per_page(Tokens{kMax64 / 4096 + 1}), std::overflow_error);
  EXPECT_THROW((void)cfg.bytes_per_page(Tokens::max()), std::overflow_error);
}

// ---------------------------------------------------------------------------
// Invalid configurations: a zero field

struct ZeroField {
  ModelConfig cfg;
  const char* field;
};

class ModelConfigZeroField : public ::testing::TestWithParam<ZeroField> {};

TEST_P(ModelConfigZeroField, ValidateThrowsInvalidArgumentNamingTheField) {
  const ZeroField& p = GetParam();
  EXPECT_FALSE(p.cfg.valid());
  const std::string msg = message_of<std::invalid_argument>([&] { p.cfg.validate(); });
  EXPECT_NE(msg.find(p.field), std::string::npos) << msg;
}

TEST_P(ModelConfigZeroField, EverySizeFunctionRejectsIt) {
  const ModelConfig& cfg = GetParam().cfg;
  const char* field = GetParam().field;
  EXPECT_NE(message_of<std::invalid_argument>([&] { (void)cfg.bytes_per_token(); }).find(field),
            std::string::npos);
  EXPECT_NE(message_of<std::invalid_argument>([&] {
              (void)cfg.kv_bytes_per_token_per_layer();
            }).find(field),
            std::string::npos);
  EXPECT_THROW((void)cfg.bytes_per_token_per_layer(), std::invalid_argument);
  EXPECT_THROW((void)cfg.bytes_per_page(Tokens{16}), std::invalid_argument);
  EXPECT_THROW((void)cfg.max_tokens(Bytes{8ULL << 30}), std::invalid_argument);
  EXPECT_THROW((void)cfg.kv_elements_per_token_per_layer(), std::invalid_argument);
}

INSTANTIATE_TEST_SUITE_P(
    EachField, ModelConfigZeroField,
    ::testing::Values(ZeroField{{0, 8, 128, 2}, "num_layers"},
                      ZeroField{{32, 0, 128, 2}, "num_kv_heads"},
                      ZeroField{{32, 8, 0, 2}, "head_dim"},
                      ZeroField{{32, 8, 128, 0}, "dtype_bytes"},
                      // Several zero fields: the first one in declaration order is named.
                      ZeroField{{0, 0, 0, 0}, "num_layers"}),
    [](const ::testing::TestParamInfo<ZeroField>& info) {
      return std::string(info.param.field) + "_" + std::to_string(info.index);
    });

// ---------------------------------------------------------------------------
// Invalid configurations: byte sizes that overflow 64 bits

TEST(ModelConfigTest, LargestBytesPerTokenThatFitsIsValid) {
  // 2^31 * 2^31 * 1 * 2 (K and V) * 1 layer = 2^63 bytes per token: fits.
  const ModelConfig cfg{1, 1U << 31, 1U << 31, 1};
  EXPECT_TRUE(cfg.valid());
  EXPECT_EQ(cfg.bytes_per_token(), Bytes{std::uint64_t{1} << 63});
}

TEST(ModelConfigTest, OverflowingLayerCountThrowsNamingNumLayers) {
  // Same shape with 2 layers: 2^64 bytes per token.
  const ModelConfig cfg{2, 1U << 31, 1U << 31, 1};
  EXPECT_FALSE(cfg.valid());
  const std::string msg = message_of<std::invalid_argument>([&] { cfg.validate(); });
  EXPECT_NE(msg.find("num_layers"), std::string::npos) << msg;
  EXPECT_THROW((void)cfg.bytes_per_token(), std::invalid_argument);
  EXPECT_THROW((void)cfg.max_tokens(Bytes{1}), std::invalid_argument);
}

TEST(ModelConfigTest, OverflowingDtypeThrowsNamingDtypeBytes) {
  // (2^32 - 1)^2 * 2: K (or V) of one token in one layer does not fit.
  const ModelConfig cfg{1, kMax32, kMax32, 2};
  EXPECT_FALSE(cfg.valid());
  const std::string msg = message_of<std::invalid_argument>([&] { cfg.validate(); });
  EXPECT_NE(msg.find("dtype_bytes"), std::string::npos) << msg;
  EXPECT_THROW((void)cfg.kv_bytes_per_token_per_layer(), std::invalid_argument);
}

TEST(ModelConfigTest, AllFieldsAtTheirMaximumThrowInvalidArgument) {
  const ModelConfig cfg{kMax32, kMax32, kMax32, kMax32};
  EXPECT_FALSE(cfg.valid());
  EXPECT_THROW(cfg.validate(), std::invalid_argument);
  EXPECT_THROW((void)cfg.bytes_per_token(), std::invalid_argument);
  EXPECT_THROW((void)cfg.bytes_per_page(Tokens{1}), std::invalid_argument);
}

// BUG (modules/config/config.cppm, ModelConfig::validate): when
// num_kv_heads * head_dim * dtype_bytes fits in 64 bits but doubling it for K
// and V does not, the message is "ModelConfig: K and V (2 *) = 2 makes the KV
// bytes per token overflow 64 bits": it names none of the four fields, while
// the contract asks for "a message that names the field".
TEST(ModelConfigTest, OverflowingKAndVDoublingNamesAField) {
  // (2^32 - 1)^2 * 1 fits; times 2 for K and V does not.
  const ModelConfig cfg{1, kMax32, kMax32, 1};
  EXPECT_FALSE(cfg.valid());
  const std::string msg = message_of<std::invalid_argument>([&] { cfg.validate(); });
  const bool names_a_field = msg.find("num_kv_heads") != std::string::npos ||
                             msg.find("head_dim") != std::string::npos ||
                             msg.find("dtype_bytes") != std::string::npos ||
                             msg.find("num_layers") != std::string::npos;
  EXPECT_TRUE(names_a_field) << msg;
}

}  // namespace
