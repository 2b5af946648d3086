// Compile-time proof of CONTRACT.md "Units": what must compile and, through
// requires-expressions that would be hard errors if written out directly,
// what must NOT compile. If this file builds, every static_assert holds; the
// GoogleTest cases at the bottom then check at run time that the same
// expressions that are rejected in constant evaluation throw.
//
// The trick for "must not compile": a concept whose requires-expression
// contains the forbidden expression with dependent operands. An ill-formed
// expression there is a substitution failure, so the concept is simply false
// and `static_assert(!concept<...>)` proves the expression does not compile.
//
// Constant evaluation: `Constant<(expr).count()>` needs `expr` as a constant
// expression (a non-type template argument). Checked arithmetic throws on
// overflow, and a throw is not allowed in constant evaluation, so for an
// overflowing `expr` the type requirement fails: the mistake is rejected at
// compile time rather than wrapping silently.
#include <gtest/gtest.h>

#include <compare>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <stdexcept>
#include <type_traits>

import kvcache;

namespace {

using kvcache::Bytes;
using kvcache::PageId;
using kvcache::Pages;
using kvcache::Tokens;

// ---------------------------------------------------------------------------
// Expression probes: each is true exactly when its expression compiles

template <class A, class B>
concept Addable = requires(A a, B b) { a + b; };
template <class A, class B>
concept Subtractable = requires(A a, B b) { a - b; };
template <class A, class B>
concept Multipliable = requires(A a, B b) { a * b; };
template <class A, class B>
concept Divisible = requires(A a, B b) { a / b; };
template <class A, class B>
concept EqualityComparable = requires(A a, B b) { a == b; };
template <class A, class B>
concept NotEqualComparable = requires(A a, B b) { a != b; };
template <class A, class B>
concept LessComparable = requires(A a, B b) { a < b; };
template <class A, class B>
concept ThreeWayComparable = requires(A a, B b) { a <=> b; };
template <class A, class B>
concept PlusAssignable = requires(A& a, B b) { a += b; };
template <class A, class B>
concept MinusAssignable = requires(A& a, B b) { a -= b; };
template <class A>
concept Incrementable = requires(A& a) { ++a; };
template <class A>
concept Negatable = requires(A a) { -a; };
template <class T, class... Args>
concept BraceConstructible = requires(Args... args) { T{args...}; };
// Copy-initialization from a value: `T t = value;`
template <class T, class From>
concept CopyInitializable = std::is_convertible_v<From, T>;
// Copy-list-initialization: `T t = {value};`
template <class T, class From>
concept CopyListInitializable = requires(From f, void (*sink)(T)) { sink({f}); };

template <class P, class T>
concept TokensInCallable = requires(P p, T t) { kvcache::tokens_in(p, t); };
template <class Q, class B>
concept BytesForCallable = requires(Q q, B b) { kvcache::bytes_for(q, b); };
template <class T, class S>
concept PagesForCallable = requires(T t, S s) { kvcache::pages_for(t, s); };

// ---------------------------------------------------------------------------
// What must compile (also: every probe above is true for a valid expression,
// so the negative uses below cannot pass vacuously)

static_assert(Addable<Bytes, Bytes> && Addable<Tokens, Tokens> && Addable<Pages, Pages>);
static_assert(Subtractable<Bytes, Bytes> && Subtractable<Tokens, Tokens>);
static_assert(Multipliable<Pages, unsigned> && Multipliable<std::uint64_t, Bytes>);
static_assert(Divisible<Bytes, Bytes> && Negatable<int>);
static_assert(EqualityComparable<Tokens, Tokens> && NotEqualComparable<Bytes, Bytes>);
static_assert(LessComparable<Pages, Pages> && ThreeWayComparable<Bytes, Bytes>);
static_assert(Incrementable<Tokens> && PlusAssignable<Pages, Pages>);
static_assert(CopyInitializable<Bytes, Bytes> && CopyInitializable<long, int>);
static_assert(CopyListInitializable<Tokens, Tokens> && CopyListInitializable<long long, int>);

static_assert(BraceConstructible<Bytes, int>, "Bytes{16}");
static_assert(requires { Bytes{16}; });
static_assert(requires { Tokens{1 << 20}; });
static_assert(requires { Pages{std::uint64_t{7}}; });
static_assert(std::is_same_v<decltype(Bytes{16}.count()), std::uint64_t>);
static_assert(Bytes{16}.count() == 16);
static_assert(Tokens{1 << 20}.count() == (std::uint64_t{1} << 20));

static_assert(std::is_same_v<decltype(Bytes{1} + Bytes{1}), Bytes>);
static_assert(std::is_same_v<decltype(Tokens{2} - Tokens{1}), Tokens>);
static_assert(std::is_same_v<decltype(Pages{1} <=> Pages{2}), std::strong_ordering>);
static_assert(std::totally_ordered<Bytes> && std::totally_ordered<Tokens> &&
              std::totally_ordered<Pages>);
static_assert(std::three_way_comparable<Pages, std::strong_ordering>);
static_assert(PlusAssignable<Bytes, Bytes> && MinusAssignable<Tokens, Tokens>);
static_assert(std::regular<Bytes> && std::regular<PageId>);
static_assert(std::is_trivially_copyable_v<Bytes> && sizeof(Bytes) == sizeof(std::uint64_t));

// Scaling by a plain number keeps the unit; a ratio of one unit is a number.
static_assert(std::is_same_v<decltype(Pages{3} * 2U), Pages>);
static_assert(std::is_same_v<decltype(2U * Pages{3}), Pages>);
static_assert(std::is_same_v<decltype(Bytes{6} / Bytes{3}), std::uint64_t>);

// The named cross-unit functions, with exactly these argument units.
static_assert(std::is_same_v<decltype(kvcache::tokens_in(Pages{}, Tokens{})), Tokens>);
static_assert(std::is_same_v<decltype(kvcache::bytes_for(Tokens{}, Bytes{})), Bytes>);
static_assert(std::is_same_v<decltype(kvcache::bytes_for(Pages{}, Bytes{})), Bytes>);
static_assert(std::is_same_v<decltype(kvcache::pages_for(Tokens{}, Tokens{})), Pages>);
static_assert(kvcache::tokens_in(Pages{2}, Tokens{16}) == Tokens{32});
static_assert(kvcache::bytes_for(Tokens{2}, Bytes{131072}) == Bytes{262144});
static_assert(kvcache::bytes_for(Pages{3}, Bytes{65536}) == Bytes{196608});
static_assert(kvcache::pages_for(Tokens{17}, Tokens{16}) == Pages{2});
static_assert(kvcache::pages_for(Tokens{16}, Tokens{16}) == Pages{1});
static_assert(kvcache::pages_for(Tokens{0}, Tokens{16}) == Pages{0});

// ---------------------------------------------------------------------------
// What must NOT compile: mixing units

static_assert(!Addable<Bytes, Tokens>, "Bytes + Tokens");
static_assert(!Addable<Tokens, Pages> && !Addable<Pages, Bytes>);
static_assert(!Subtractable<Bytes, Tokens> && !Subtractable<Pages, Tokens>);
static_assert(!EqualityComparable<Bytes, Tokens>, "Bytes{1} == Tokens{1}");
static_assert(!EqualityComparable<Pages, Tokens>, "Pages == Tokens");
static_assert(!EqualityComparable<Tokens, Pages> && !EqualityComparable<Bytes, Pages>);
static_assert(!NotEqualComparable<Bytes, Tokens>);
static_assert(!LessComparable<Bytes, Tokens> && !ThreeWayComparable<Pages, Tokens>);
static_assert(!std::three_way_comparable_with<Bytes, Tokens>);
static_assert(!std::equality_comparable_with<Pages, Tokens>);
static_assert(!PlusAssignable<Bytes, Tokens> && !MinusAssignable<Tokens, Pages>);
static_assert(!std::is_constructible_v<Bytes, Tokens> && !std::is_constructible_v<Tokens, Pages>);
static_assert(!std::is_assignable_v<Bytes&, Tokens>);
// Multiplying two quantities has no meaning without a name: use bytes_for etc.
static_assert(!Multipliable<Bytes, Tokens> && !Multipliable<Tokens, Bytes>);
static_assert(!Multipliable<Pages, Pages> && !Multipliable<Pages, Tokens>);
static_assert(!Divisible<Bytes, Tokens> && !Divisible<Bytes, std::uint64_t>);
static_assert(!Negatable<Bytes>);

// The named functions take only their own argument units.
static_assert(TokensInCallable<Pages, Tokens>);
static_assert(!TokensInCallable<Tokens, Pages> && !TokensInCallable<Pages, Pages>);
static_assert(!TokensInCallable<std::uint64_t, Tokens> && !TokensInCallable<Pages, int>);
static_assert(BytesForCallable<Tokens, Bytes> && BytesForCallable<Pages, Bytes>);
static_assert(!BytesForCallable<Bytes, Bytes> && !BytesForCallable<Tokens, Tokens>);
static_assert(!BytesForCallable<Bytes, Tokens> && !BytesForCallable<Tokens, std::uint64_t>);
static_assert(PagesForCallable<Tokens, Tokens>);
static_assert(!PagesForCallable<Pages, Tokens> && !PagesForCallable<Tokens, Pages>);
static_assert(!PagesForCallable<Tokens, int> && !PagesForCallable<Bytes, Bytes>);

// ---------------------------------------------------------------------------
// What must NOT compile: implicit conversion from or to integers

static_assert(!CopyInitializable<Bytes, int>, "Bytes b = 5;");
static_assert(!CopyInitializable<Tokens, std::uint64_t> && !CopyInitializable<Pages, long>);
static_assert(!CopyListInitializable<Bytes, int>, "Bytes b = {5};");
static_assert(!std::is_assignable_v<Bytes&, int> && !std::is_assignable_v<Tokens&, std::uint64_t>);
static_assert(!CopyInitializable<std::uint64_t, Bytes>, "std::uint64_t n = Bytes{5};");
static_assert(!CopyInitializable<int, Tokens> && !CopyInitializable<bool, Pages>);
static_assert(!std::is_constructible_v<std::uint64_t, Bytes>, "only .count() gives the number");
static_assert(!Addable<Bytes, int> && !Addable<int, Bytes>, "Bytes{1} + 1");
static_assert(!Addable<Tokens, std::uint64_t> && !Subtractable<Pages, unsigned>);
static_assert(!EqualityComparable<Bytes, int> && !EqualityComparable<std::uint64_t, Tokens>);
static_assert(!LessComparable<Pages, int>);
static_assert(!PlusAssignable<Bytes, int>);
// Explicit construction takes integers only: not bool, characters or floating point.
static_assert(std::is_constructible_v<Bytes, int> && std::is_constructible_v<Bytes, std::size_t>);
static_assert(!std::is_constructible_v<Bytes, bool> && !std::is_constructible_v<Tokens, char>);
static_assert(!std::is_constructible_v<Bytes, double> && !std::is_constructible_v<Pages, float>);
static_assert(!BraceConstructible<Tokens, double>);

// ---------------------------------------------------------------------------
// PageId: a name, not a number. ==, hash and an explicit conversion only.

static_assert(EqualityComparable<PageId, PageId> && NotEqualComparable<PageId, PageId>);
static_assert(!LessComparable<PageId, PageId>, "PageId has no ordering");
static_assert(!ThreeWayComparable<PageId, PageId>);
static_assert(!std::totally_ordered<PageId>);
static_assert(!Addable<PageId, PageId> && !Addable<PageId, int> && !Addable<int, PageId>);
static_assert(!Subtractable<PageId, PageId> && !Subtractable<PageId, int>);
static_assert(!Incrementable<PageId> && !PlusAssignable<PageId, int>);
static_assert(!Multipliable<PageId, int>);
static_assert(!CopyInitializable<PageId, std::uint32_t> && !CopyInitializable<PageId, int>);
static_assert(!CopyInitializable<std::uint64_t, PageId> && !CopyInitializable<std::uint32_t, PageId>);
static_assert(!EqualityComparable<PageId, std::uint32_t> && !EqualityComparable<PageId, Pages>);
static_assert(static_cast<std::uint64_t>(PageId{9}) == 9, "the documented explicit conversion");
static_assert(std::is_invocable_r_v<std::size_t, std::hash<PageId>, PageId>);
static_assert(sizeof(PageId) == 4);

// ---------------------------------------------------------------------------
// Constant evaluation rejects overflow and underflow

template <std::uint64_t>
struct Constant {};

constexpr std::uint64_t kMax = std::numeric_limits<std::uint64_t>::max();

// Each probe is true exactly when its expression is a constant expression.
// Every probe is shown true for a value that fits, so none passes vacuously.
template <class Q, std::uint64_t A, std::uint64_t B>
concept SumIsConstant = requires { typename Constant<(Q{A} + Q{B}).count()>; };
template <class Q, std::uint64_t A, std::uint64_t B>
concept DifferenceIsConstant = requires { typename Constant<(Q{A} - Q{B}).count()>; };
template <class Q, std::uint64_t A, std::uint64_t K>
concept ProductIsConstant = requires { typename Constant<(Q{A} * K).count()>; };
template <class Q, std::uint64_t A>
concept IncrementIsConstant = requires {
  typename Constant<([] {
                      Q q{A};
                      ++q;
                      return q;
                    }())
                        .count()>;
};
template <class Q, long long V>
concept ConstructionIsConstant = requires { typename Constant<Q{V}.count()>; };
template <std::uint64_t T, std::uint64_t PageSize>
concept PagesForIsConstant =
    requires { typename Constant<kvcache::pages_for(Tokens{T}, Tokens{PageSize}).count()>; };
template <std::uint64_t T, std::uint64_t B>
concept BytesForIsConstant =
    requires { typename Constant<kvcache::bytes_for(Tokens{T}, Bytes{B}).count()>; };
template <std::uint64_t P, std::uint64_t S>
concept TokensInIsConstant =
    requires { typename Constant<kvcache::tokens_in(Pages{P}, Tokens{S}).count()>; };

// Overflow of +: `Bytes::max() + Bytes{1}` is not a constant expression.
static_assert(SumIsConstant<Bytes, kMax - 1, 1> && !SumIsConstant<Bytes, kMax, 1>,
              "Bytes::max() + Bytes{1}");
static_assert(SumIsConstant<Tokens, 0, kMax> && !SumIsConstant<Tokens, kMax, kMax>);
static_assert(SumIsConstant<Pages, 1, kMax - 1> && !SumIsConstant<Pages, 2, kMax - 1>);
// Underflow of -.
static_assert(DifferenceIsConstant<Bytes, 1, 1> && !DifferenceIsConstant<Bytes, 0, 1>);
static_assert(DifferenceIsConstant<Tokens, kMax, kMax> && !DifferenceIsConstant<Tokens, 4, 5>);
static_assert(!DifferenceIsConstant<Pages, 0, kMax>);
// Overflow of scaling.
static_assert(ProductIsConstant<Bytes, kMax / 2, 2> && !ProductIsConstant<Bytes, kMax / 2 + 1, 2>);
static_assert(ProductIsConstant<Pages, kMax, 1> && !ProductIsConstant<Pages, kMax, 2>);
// ++ past the top.
static_assert(IncrementIsConstant<Tokens, kMax - 1> && !IncrementIsConstant<Tokens, kMax>);
// A negative count.
static_assert(ConstructionIsConstant<Bytes, 0> && !ConstructionIsConstant<Bytes, -1>);
static_assert(!ConstructionIsConstant<Tokens, -(1LL << 40)>);
// The named functions: overflow, and a zero page size.
static_assert(PagesForIsConstant<5, 4> && !PagesForIsConstant<5, 0>);
static_assert(PagesForIsConstant<kMax, 2>, "ceil without overflow");
static_assert(BytesForIsConstant<1ULL << 46, 131072> && !BytesForIsConstant<1ULL << 47, 131072>);
static_assert(TokensInIsConstant<kMax / 16, 16> && !TokensInIsConstant<kMax / 16 + 1, 16>);

// ---------------------------------------------------------------------------
// Run time: the expressions rejected above in constant evaluation throw.

TEST(CompileUnits, WhatConstantEvaluationRejectsThrowsAtRunTime) {
  volatile std::uint64_t one = 1;  // keep the operands run-time values
  EXPECT_THROW((void)(Bytes::max() + Bytes{one}), std::overflow_error);
  EXPECT_THROW((void)(Tokens::zero() - Tokens{one}), std::underflow_error);
  EXPECT_THROW((void)(Pages::max() * (one + 1)), std::overflow_error);
  volatile int minus_one = -1;
  EXPECT_THROW((void)Bytes{minus_one}, std::out_of_range);
  EXPECT_THROW((void)kvcache::pages_for(Tokens{5}, Tokens{one - 1}), std::invalid_argument);
  EXPECT_EQ((Bytes::max() - Bytes{one}).count(), std::numeric_limits<std::uint64_t>::max() - 1);
}

}  // namespace
