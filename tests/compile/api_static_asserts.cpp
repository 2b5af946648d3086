// Compile-time proof of the signatures CONTRACT.md fixes outside the units:
// ModelConfig (an aggregate, fields in order, copy-list-initializable, an
// invalid one rejected in constant evaluation), BasicKVCache's signatures
// (units, not integers; spans of bytes or floats; get_kv's two-member view)
// and the page pool's handles. Same techniques as units_static_asserts.cpp.
#include <gtest/gtest.h>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

import kvcache;

namespace {

using kvcache::BasicKVCache;
using kvcache::BasicStats;
using kvcache::Bytes;
using kvcache::KVView;
using kvcache::ModelConfig;
using kvcache::Pages;
using kvcache::Tokens;
using kvcache::TokenRows;

template <std::uint64_t>
struct Constant {};

// ---------------------------------------------------------------------------
// ModelConfig

static_assert(std::is_aggregate_v<ModelConfig>);
static_assert(std::is_same_v<decltype(ModelConfig::num_layers), std::uint32_t> &&
              std::is_same_v<decltype(ModelConfig::num_kv_heads), std::uint32_t> &&
              std::is_same_v<decltype(ModelConfig::head_dim), std::uint32_t> &&
              std::is_same_v<decltype(ModelConfig::dtype_bytes), std::uint32_t>);
constexpr ModelConfig kSeed = {32, 8, 128, 2};  // copy-list initialization
static_assert(kSeed.num_layers == 32 && kSeed.num_kv_heads == 8 && kSeed.head_dim == 128 &&
              kSeed.dtype_bytes == 2, "fields in contract order");
static_assert(kSeed.bytes_per_token() == Bytes{131072});
static_assert(kSeed.bytes_per_page(Tokens{16}) == Bytes{16 * 8 * 128 * 2 * 2});
static_assert(kSeed.max_tokens(Bytes{8ULL << 30}) == Tokens{65536});
static_assert(kSeed.kv_bytes_per_token_per_layer() == Bytes{8 * 128 * 2});

// An invalid configuration is rejected in constant evaluation.
template <ModelConfig C>
concept BytesPerTokenIsConstant = requires { typename Constant<C.bytes_per_token().count()>; };
static_assert(BytesPerTokenIsConstant<ModelConfig{32, 8, 128, 2}>);
static_assert(!BytesPerTokenIsConstant<ModelConfig{0, 8, 128, 2}>);
static_assert(!BytesPerTokenIsConstant<ModelConfig{32, 0, 128, 2}>);
static_assert(!BytesPerTokenIsConstant<ModelConfig{32, 8, 0, 2}>);
static_assert(!BytesPerTokenIsConstant<ModelConfig{32, 8, 128, 0}>);
static_assert(!BytesPerTokenIsConstant<ModelConfig{2, 1U << 31, 1U << 31, 1}>);  // 2^64 bytes
static_assert(BytesPerTokenIsConstant<ModelConfig{1, 1U << 31, 1U << 31, 1}>);   // 2^63 bytes

template <ModelConfig C, std::uint64_t PageSize>
concept BytesPerPageIsConstant =
    requires { typename Constant<C.bytes_per_page(Tokens{PageSize}).count()>; };
static_assert(BytesPerPageIsConstant<kSeed, 16>);
static_assert(!BytesPerPageIsConstant<kSeed, 0>, "page size 0");
static_assert(!BytesPerPageIsConstant<kSeed, (~0ULL / 4096) + 1>, "page bytes overflow");

// Integers are not units: bytes_per_page and max_tokens take Tokens and Bytes.
template <class T>
concept BytesPerPageCallable = requires(ModelConfig c, T t) { c.bytes_per_page(t); };
template <class T>
concept MaxTokensCallable = requires(ModelConfig c, T t) { c.max_tokens(t); };
static_assert(BytesPerPageCallable<Tokens> && !BytesPerPageCallable<int> &&
              !BytesPerPageCallable<Bytes>);
static_assert(MaxTokensCallable<Bytes> && !MaxTokensCallable<std::uint64_t> &&
              !MaxTokensCallable<Tokens>);

// ---------------------------------------------------------------------------
// BasicKVCache signatures

static_assert(requires { BasicKVCache({32, 8, 128, 2}, Bytes{8ULL << 30}); },
              "BasicKVCache cache({32, 8, 128, 2}, budget)");
static_assert(std::is_constructible_v<BasicKVCache, ModelConfig, Bytes>);
static_assert(!std::is_constructible_v<BasicKVCache, ModelConfig, std::uint64_t>,
              "the budget is Bytes, not a number");
static_assert(!std::is_constructible_v<BasicKVCache, ModelConfig, Tokens>);
static_assert(!std::is_default_constructible_v<BasicKVCache>);

template <class C, class P, class G>
concept AllocateCallable = requires(C& c, P p, G g) { c.allocate(std::string_view("r"), p, g); };
static_assert(AllocateCallable<BasicKVCache, Tokens, Tokens>);
static_assert(!AllocateCallable<BasicKVCache, int, int>, "prompt and max_gen are Tokens");
static_assert(!AllocateCallable<BasicKVCache, Bytes, Tokens>);
static_assert(!AllocateCallable<BasicKVCache, Tokens, Pages>);
static_assert(
    std::is_same_v<decltype(std::declval<BasicKVCache&>().allocate("r", Tokens{}, Tokens{})),
                   bool>);

template <class C, class Row>
concept AppendCallable = requires(C& c, const Row& k, const Row& v) {
  { c.append_token(std::string_view("r"), std::size_t{0}, k, v) } -> std::same_as<void>;
};
static_assert(AppendCallable<BasicKVCache, std::span<const std::byte>>);
static_assert(AppendCallable<BasicKVCache, std::span<const float>>);
static_assert(AppendCallable<BasicKVCache, std::vector<std::byte>>);
static_assert(AppendCallable<BasicKVCache, std::vector<float>>);
static_assert(!AppendCallable<BasicKVCache, std::vector<double>>);
static_assert(!AppendCallable<BasicKVCache, std::vector<int>>);
static_assert(!AppendCallable<BasicKVCache, std::string>);

static_assert(std::is_same_v<decltype(std::declval<BasicKVCache&>().free("r")), void>);
static_assert(std::is_same_v<decltype(std::declval<const BasicKVCache&>().stats()), BasicStats>);
// Ids are string views: a std::string and a literal both work.
static_assert(requires(BasicKVCache& c, const std::string& s) {
  c.free(s);
  c.free("literal");
});

// get_kv: a struct of exactly two public members, keys then values.
static_assert(
    std::is_same_v<decltype(std::declval<const BasicKVCache&>().get_kv("r", 0)), KVView>);
static_assert(std::is_aggregate_v<KVView>);
template <class V, class R>
concept BracedFromTwo = requires(R a) { V{a, a}; };
template <class V, class R>
concept BracedFromThree = requires(R a) { V{a, a, a}; };
static_assert(BracedFromTwo<KVView, TokenRows>);
static_assert(!BracedFromThree<KVView, TokenRows>, "no third member");
static_assert(std::is_same_v<decltype(KVView::keys), TokenRows> &&
              std::is_same_v<decltype(KVView::values), TokenRows>);
static_assert(std::is_same_v<decltype(std::declval<TokenRows>().size()), std::size_t>);
static_assert(std::is_same_v<decltype(std::declval<TokenRows>()[0]), std::span<const std::byte>>);

[[maybe_unused]] void destructures(const KVView& view) {
  const auto& [keys, values] = view;  // must compile: exactly two members
  static_assert(std::is_same_v<std::remove_cvref_t<decltype(keys)>, TokenRows>);
  static_assert(std::is_same_v<std::remove_cvref_t<decltype(values)>, TokenRows>);
  static_cast<void>(keys);
  static_cast<void>(values);
}

// BasicStats: the contract's fields with the contract's types.
static_assert(std::is_same_v<decltype(BasicStats::total_memory), Bytes> &&
              std::is_same_v<decltype(BasicStats::used_memory), Bytes> &&
              std::is_same_v<decltype(BasicStats::free_memory), Bytes> &&
              std::is_same_v<decltype(BasicStats::reserved_tokens), Tokens> &&
              std::is_same_v<decltype(BasicStats::num_requests), std::size_t> &&
              std::is_same_v<decltype(BasicStats::utilization_pct), double>);

// ---------------------------------------------------------------------------
// Errors

static_assert(std::derived_from<kvcache::UnknownRequest, std::out_of_range>);
static_assert(std::derived_from<kvcache::ShapeMismatch, std::invalid_argument>);
static_assert(std::derived_from<kvcache::OutOfPages, std::runtime_error>);
static_assert(std::derived_from<kvcache::ReservationExceeded, std::length_error>);

// ---------------------------------------------------------------------------
// Page pool

static_assert(!std::is_convertible_v<Pages, kvcache::PagePool>, "explicit capacity");
static_assert(!std::is_constructible_v<kvcache::PagePool, std::uint64_t>);
static_assert(std::equality_comparable<kvcache::PageHandle>);

// ---------------------------------------------------------------------------
// Run time: the file compiled, and the signatures probed above behave.

TEST(CompileApi, SignaturesProbedAtCompileTimeWork) {
  BasicKVCache cache({1, 1, 1, 4}, Bytes{1024});
  ASSERT_TRUE(cache.allocate(std::string("r"), Tokens{1}, Tokens{0}));
  const std::vector<float> f{1.5F};
  cache.append_token("r", 0, f, f);
  const auto [keys, values] = cache.get_kv("r", 0);
  EXPECT_EQ(keys.size(), 1U);
  EXPECT_EQ(values[0].size(), 4U);
  const kvcache::ModelConfig bad{0, 1, 1, 1};
  EXPECT_THROW((void)bad.bytes_per_token(), std::invalid_argument);
}

}  // namespace
