// Unit tests for kvcache.units: Bytes, Tokens, Pages, the named cross-unit
// functions and PageId (CONTRACT.md "Units"). What must not compile is proven
// in tests/compile/units_static_asserts.cpp; this file checks run-time values,
// the checked arithmetic (std::overflow_error / std::underflow_error, never a
// silent wrap) and that a throwing compound assignment leaves its operand
// unchanged.
#include <gtest/gtest.h>

#include <compare>
#include <cstdint>
#include <functional>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unordered_set>
#include <utility>

import kvcache;

namespace {

using kvcache::Bytes;
using kvcache::PageId;
using kvcache::Pages;
using kvcache::Tokens;

constexpr std::uint64_t kMax = std::numeric_limits<std::uint64_t>::max();

// The message of the exception `f` throws as E; fails the test if it throws
// anything else or nothing.
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

template <class T>
std::string printed(const T& value) {
  std::ostringstream os;
  os << value;
  return os.str();
}

// ---------------------------------------------------------------------------
// Construction and count()

TEST(Units, ExplicitConstructionKeepsTheCount) {
  EXPECT_EQ(Bytes{16}.count(), 16U);
  EXPECT_EQ(Tokens{1 << 20}.count(), std::uint64_t{1} << 20);
  EXPECT_EQ(Pages{7U}.count(), 7U);
  EXPECT_EQ(Bytes{kMax}.count(), kMax);
  static_assert(std::is_same_v<decltype(Bytes{1}.count()), std::uint64_t>);
}

TEST(Units, BuildsFromAnyIntegerType) {
  const int i = 3;
  const long l = 4;
  const unsigned short us = 5;
  const std::int8_t s8 = 6;
  const std::size_t z = 7;
  EXPECT_EQ(Tokens{i}.count(), 3U);
  EXPECT_EQ(Tokens{l}.count(), 4U);
  EXPECT_EQ(Tokens{us}.count(), 5U);
  EXPECT_EQ(Tokens{s8}.count(), 6U);
  EXPECT_EQ(Tokens{z}.count(), 7U);
}

TEST(Units, DefaultAndZeroAreZeroMaxIsTheLargestCount) {
  EXPECT_EQ(Bytes{}.count(), 0U);
  EXPECT_EQ(Tokens::zero(), Tokens{0});
  EXPECT_EQ(Pages::zero().count(), 0U);
  EXPECT_EQ(Bytes::max().count(), kMax);
  EXPECT_EQ(Tokens::max().count(), kMax);
  EXPECT_EQ(Pages::max().count(), kMax);
}

TEST(Units, NegativeIntegerThrowsOutOfRange) {
  volatile int minus_one = -1;  // volatile: a run-time value, not a constant
  const std::string msg = message_of<std::out_of_range>([&] { (void)Tokens{minus_one}; });
  EXPECT_NE(msg.find("Tokens"), std::string::npos) << msg;
  EXPECT_NE(msg.find("-1"), std::string::npos) << msg;
  const long long min = std::numeric_limits<long long>::min();
  EXPECT_THROW((void)Bytes{min}, std::out_of_range);
  EXPECT_THROW((void)Pages{std::int8_t{-5}}, std::out_of_range);
}

// ---------------------------------------------------------------------------
// Comparison within a unit

TEST(Units, EqualityAndOrderingWithinAUnit) {
  EXPECT_EQ(Bytes{5}, Bytes{5});
  EXPECT_NE(Bytes{5}, Bytes{6});
  EXPECT_LT(Tokens{1}, Tokens{2});
  EXPECT_LE(Tokens{2}, Tokens{2});
  EXPECT_GT(Pages{9}, Pages{3});
  EXPECT_GE(Pages{3}, Pages{3});
  EXPECT_EQ(Bytes{1} <=> Bytes{2}, std::strong_ordering::less);
  EXPECT_EQ(Bytes{2} <=> Bytes{2}, std::strong_ordering::equal);
  EXPECT_EQ(Bytes{kMax} <=> Bytes{0}, std::strong_ordering::greater);
}

// ---------------------------------------------------------------------------
// Checked + and -

TEST(Units, AdditionAndSubtractionWithinAUnit) {
  EXPECT_EQ(Bytes{3} + Bytes{4}, Bytes{7});
  EXPECT_EQ(Tokens{10} - Tokens{4}, Tokens{6});
  EXPECT_EQ(Pages{5} - Pages{5}, Pages{0});
  EXPECT_EQ(Bytes{kMax - 1} + Bytes{1}, Bytes::max());  // the largest sum that fits
  EXPECT_EQ(Bytes::max() - Bytes::max(), Bytes::zero());
}

TEST(Units, AdditionOverflowThrowsOverflowError) {
  EXPECT_THROW((void)(Bytes::max() + Bytes{1}), std::overflow_error);
  EXPECT_THROW((void)(Tokens{kMax / 2 + 1} + Tokens{kMax / 2 + 1}), std::overflow_error);
  EXPECT_THROW((void)(Pages{1} + Pages::max()), std::overflow_error);
  const std::string msg =
      message_of<std::overflow_error>([] { (void)(Tokens::max() + Tokens{2}); });
  EXPECT_NE(msg.find("Tokens"), std::string::npos) << msg;
  EXPECT_NE(msg.find(std::to_string(kMax)), std::string::npos) << msg;
}

TEST(Units, SubtractionBelowZeroThrowsUnderflowError) {
  EXPECT_THROW((void)(Bytes{0} - Bytes{1}), std::underflow_error);
  EXPECT_THROW((void)(Tokens{4} - Tokens{5}), std::underflow_error);
  EXPECT_THROW((void)(Pages::zero() - Pages::max()), std::underflow_error);
  const std::string msg = message_of<std::underflow_error>([] { (void)(Pages{2} - Pages{3}); });
  EXPECT_NE(msg.find("Pages"), std::string::npos) << msg;
  EXPECT_NE(msg.find('3'), std::string::npos) << msg;
}

TEST(Units, CompoundAssignmentAndIncrement) {
  Tokens t{5};
  t += Tokens{3};
  EXPECT_EQ(t, Tokens{8});
  t -= Tokens{8};
  EXPECT_EQ(t, Tokens{0});
  ++t;
  ++t;
  EXPECT_EQ(t, Tokens{2});
  --t;
  EXPECT_EQ(t, Tokens{1});
  EXPECT_EQ(&(t += Tokens{1}), &t);  // returns *this
}

TEST(Units, ThrowingCompoundAssignmentLeavesTheValueUnchanged) {
  Bytes b{kMax - 2};
  EXPECT_THROW(b += Bytes{3}, std::overflow_error);
  EXPECT_EQ(b, Bytes{kMax - 2});
  Tokens t{2};
  EXPECT_THROW(t -= Tokens{3}, std::underflow_error);
  EXPECT_EQ(t, Tokens{2});
  Pages top = Pages::max();
  EXPECT_THROW(++top, std::overflow_error);
  EXPECT_EQ(top, Pages::max());
  Pages bottom = Pages::zero();
  EXPECT_THROW(--bottom, std::underflow_error);
  EXPECT_EQ(bottom, Pages::zero());
}

// ---------------------------------------------------------------------------
// Scaling, ratio and remainder

TEST(Units, ScalingByANumberKeepsTheUnit) {
  EXPECT_EQ(Pages{3} * 2U, Pages{6});
  EXPECT_EQ(2U * Pages{3}, Pages{6});
  EXPECT_EQ(Bytes{5} * 0U, Bytes{0});
  EXPECT_EQ(Bytes{0} * kMax, Bytes{0});
  EXPECT_EQ(Bytes{kMax} * 1U, Bytes::max());
  EXPECT_THROW((void)(Bytes{kMax / 2 + 1} * 2U), std::overflow_error);
  EXPECT_THROW((void)(3U * Tokens{kMax / 3 + 1}), std::overflow_error);
}

TEST(Units, RatioAndRemainderWithinAUnit) {
  EXPECT_EQ(Bytes{10} / Bytes{3}, 3U);
  static_assert(std::is_same_v<decltype(Bytes{10} / Bytes{3}), std::uint64_t>);
  EXPECT_EQ(Bytes{10} % Bytes{3}, Bytes{1});
  EXPECT_EQ(Tokens{0} / Tokens{7}, 0U);
  EXPECT_THROW((void)(Bytes{1} / Bytes{0}), std::domain_error);
  EXPECT_THROW((void)(Tokens{1} % Tokens{0}), std::domain_error);
}

// ---------------------------------------------------------------------------
// Named cross-unit functions

TEST(Units, TokensInPages) {
  EXPECT_EQ(kvcache::tokens_in(Pages{3}, Tokens{16}), Tokens{48});
  EXPECT_EQ(kvcache::tokens_in(Pages{0}, Tokens{16}), Tokens{0});
  EXPECT_EQ(kvcache::tokens_in(Pages{kMax}, Tokens{1}), Tokens::max());
  EXPECT_THROW((void)kvcache::tokens_in(Pages{kMax / 16 + 1}, Tokens{16}), std::overflow_error);
}

TEST(Units, BytesForTokensAndForPages) {
  EXPECT_EQ(kvcache::bytes_for(Tokens{65536}, Bytes{131072}), Bytes{8ULL << 30});
  EXPECT_EQ(kvcache::bytes_for(Pages{4}, Bytes{65536}), Bytes{262144});
  EXPECT_EQ(kvcache::bytes_for(Tokens{0}, Bytes::max()), Bytes{0});
  EXPECT_THROW((void)kvcache::bytes_for(Tokens{std::uint64_t{1} << 47}, Bytes{131072}),
               std::overflow_error);
  EXPECT_THROW((void)kvcache::bytes_for(Pages{2}, Bytes{kMax / 2 + 1}), std::overflow_error);
}

TEST(Units, PagesForRoundsUp) {
  EXPECT_EQ(kvcache::pages_for(Tokens{0}, Tokens{16}), Pages{0});
  EXPECT_EQ(kvcache::pages_for(Tokens{1}, Tokens{16}), Pages{1});
  EXPECT_EQ(kvcache::pages_for(Tokens{16}, Tokens{16}), Pages{1});
  EXPECT_EQ(kvcache::pages_for(Tokens{17}, Tokens{16}), Pages{2});
  EXPECT_EQ(kvcache::pages_for(Tokens{5}, Tokens{4}), Pages{2});
  EXPECT_EQ(kvcache::pages_for(Tokens{7}, Tokens{1}), Pages{7});
}

TEST(Units, PagesForNeverOverflowsNearTheTop) {
  // ceil(max / 2) computed as (max + 1) / 2 would wrap; the contract says no wrap.
  EXPECT_EQ(kvcache::pages_for(Tokens::max(), Tokens{2}), Pages{kMax / 2 + 1});
  EXPECT_EQ(kvcache::pages_for(Tokens::max(), Tokens{1}), Pages::max());
  EXPECT_EQ(kvcache::pages_for(Tokens::max(), Tokens::max()), Pages{1});
  EXPECT_EQ(kvcache::pages_for(Tokens{1}, Tokens::max()), Pages{1});
}

TEST(Units, PagesForZeroPageSizeThrowsInvalidArgument) {
  EXPECT_THROW((void)kvcache::pages_for(Tokens{5}, Tokens{0}), std::invalid_argument);
  EXPECT_THROW((void)kvcache::pages_for(Tokens{0}, Tokens{0}), std::invalid_argument);
}

TEST(Units, ConstantEvaluationGivesTheSameValues) {
  static_assert(Bytes{3} + Bytes{4} == Bytes{7});
  static_assert(Tokens{10} - Tokens{4} == Tokens{6});
  static_assert(kvcache::pages_for(Tokens{17}, Tokens{16}) == Pages{2});
  static_assert(kvcache::bytes_for(Tokens{2}, Bytes{3}) == Bytes{6});
  static_assert(kvcache::tokens_in(Pages{2}, Tokens{3}) == Tokens{6});
  constexpr Bytes b = Bytes{1} + Bytes{1};
  EXPECT_EQ(b.count(), 2U);
}

// ---------------------------------------------------------------------------
// Printing and hashing

TEST(Units, StreamsTheCountAndTheUnit) {
  EXPECT_EQ(printed(Bytes{16}), "16 B");
  EXPECT_EQ(printed(Tokens{3}), "3 tokens");
  EXPECT_EQ(printed(Pages{2}), "2 pages");
}

TEST(Units, HashIsUsableInUnorderedContainers) {
  std::unordered_set<Tokens> seen{Tokens{1}, Tokens{2}, Tokens{1}};
  EXPECT_EQ(seen.size(), 2U);
  EXPECT_TRUE(seen.contains(Tokens{2}));
  EXPECT_FALSE(seen.contains(Tokens{3}));
  EXPECT_EQ(std::hash<Bytes>{}(Bytes{42}), std::hash<Bytes>{}(Bytes{42}));
  EXPECT_EQ(std::hash<Pages>{}(Pages{42}), std::hash<std::uint64_t>{}(42));
}

// ---------------------------------------------------------------------------
// PageId

TEST(PageIdTest, IndexAndExplicitConversion) {
  const PageId id{7};
  EXPECT_EQ(id.index(), 7U);
  EXPECT_EQ(static_cast<std::uint64_t>(id), 7U);
  EXPECT_EQ(PageId{0}.index(), 0U);
  EXPECT_EQ(static_cast<std::uint64_t>(PageId{PageId::max_index}), PageId::max_index);
  static_assert(sizeof(PageId) == 4, "a block table is an int32 array");
}

TEST(PageIdTest, DefaultIsNoneAndDistinctFromEveryIndex) {
  EXPECT_EQ(PageId{}, PageId::none());
  EXPECT_NE(PageId::none(), PageId{0});
  EXPECT_NE(PageId::none(), PageId{PageId::max_index});
  EXPECT_EQ(PageId::max_index, std::numeric_limits<std::uint32_t>::max() - 1);
  EXPECT_EQ(PageId::none().index(), PageId::max_index + 1);
}

TEST(PageIdTest, EqualityAndHash) {
  EXPECT_EQ(PageId{3}, PageId{3});
  EXPECT_NE(PageId{3}, PageId{4});
  std::unordered_set<PageId> ids{PageId{1}, PageId{2}, PageId{1}, PageId::none()};
  EXPECT_EQ(ids.size(), 3U);
  EXPECT_TRUE(ids.contains(PageId::none()));
  EXPECT_EQ(std::hash<PageId>{}(PageId{9}), std::hash<PageId>{}(PageId{9}));
}

TEST(PageIdTest, Streams) {
  EXPECT_EQ(printed(PageId{12}), "page#12");
  EXPECT_EQ(printed(PageId::none()), "page#none");
}

}  // namespace
