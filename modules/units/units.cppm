// kvcache.units: strong integer units for every count the library keeps.
//
// Design: `Bytes`, `Tokens` and `Pages` are three instantiations of one
// `detail::Quantity<Tag>` template holding a std::uint64_t. Each unit adds and
// subtracts only with itself and compares only with itself; there is no
// implicit conversion to or from integers or between units, so `Bytes + Tokens`,
// `Bytes b = 5;` and `Pages{1} == Tokens{1}` do not compile
// (tests/compile/units_static_asserts.cpp proves it).
//
// Crossing units is done by a few named functions that say what they mean:
//   tokens_in(Pages, page_size)      -> Tokens   pages * tokens per page
//   bytes_for(Tokens, bytes_per_tok) -> Bytes    tokens * bytes per token
//   bytes_for(Pages, bytes_per_page) -> Bytes    pages * bytes per page
//   pages_for(Tokens, page_size)     -> Pages    ceil(tokens / page_size)
//
// Arithmetic is checked: a result that does not fit in 64 bits throws
// std::overflow_error, a subtraction below zero throws std::underflow_error.
// In a constant expression the throw makes the expression ill-formed, so such
// mistakes are rejected at compile time. Floating point never appears here.
//
// `PageId` names one page of the page pool. It is a name, not a number: it has
// `==` and a std::hash, no ordering and no arithmetic, and
// `static_cast<std::uint64_t>(id)` gives the page's index in the pool. It is
// 4 bytes, so a block table (a span of PageId) is the int32 array an attention
// kernel reads.
//
// Thread safety: value types; no shared state.
module;

#include <compare>
#include <concepts>
#include <cstdint>
#include <functional>
#include <limits>
#include <ostream>
#include <stdexcept>
#include <string>

export module kvcache.units;

// detail is exported (never documented as API) so that argument-dependent
// lookup finds the cross-unit functions: `bytes_for(t, b)` works unqualified.
export namespace kvcache::detail {

// Checked arithmetic on the raw counts. `what` names the operation in the
// message, e.g. "Bytes +".
constexpr std::uint64_t checked_add(std::uint64_t a, std::uint64_t b, const char* what) {
  if (a > std::numeric_limits<std::uint64_t>::max() - b) {
    throw std::overflow_error(std::string("kvcache: ") + what + " overflows 64 bits: " +
                              std::to_string(a) + " + " + std::to_string(b));
  }
  return a + b;
}

constexpr std::uint64_t checked_sub(std::uint64_t a, std::uint64_t b, const char* what) {
  if (a < b) {
    throw std::underflow_error(std::string("kvcache: ") + what + " goes below zero: " +
                               std::to_string(a) + " - " + std::to_string(b));
  }
  return a - b;
}

constexpr std::uint64_t checked_mul(std::uint64_t a, std::uint64_t b, const char* what) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) {
    throw std::overflow_error(std::string("kvcache: ") + what + " overflows 64 bits: " +
                              std::to_string(a) + " * " + std::to_string(b));
  }
  return a * b;
}

// Integral types a count may be built from: every integer type but bool and
// the character types (a `Tokens{'a'}` is a mistake, not a count).
template <class T>
concept count_integral =
    std::integral<T> && !std::same_as<T, bool> && !std::same_as<T, char> &&
    !std::same_as<T, wchar_t> && !std::same_as<T, char8_t> && !std::same_as<T, char16_t> &&
    !std::same_as<T, char32_t>;

template <class Tag>
class Quantity {
 public:
  using rep = std::uint64_t;

  constexpr Quantity() noexcept = default;

  // Explicit only. Any integer type is accepted so that `Tokens{n}` works for
  // an `int n`; a negative value throws std::out_of_range (and is a compile
  // error in a constant expression).
  template <count_integral I>
  constexpr explicit Quantity(I value) : value_(from_integer(value)) {}

  [[nodiscard]] constexpr rep count() const noexcept { return value_; }

  [[nodiscard]] static constexpr Quantity zero() noexcept { return Quantity{}; }
  [[nodiscard]] static constexpr Quantity max() noexcept {
    return Quantity{std::numeric_limits<rep>::max()};
  }

  friend constexpr bool operator==(Quantity, Quantity) noexcept = default;
  friend constexpr std::strong_ordering operator<=>(Quantity, Quantity) noexcept = default;

  friend constexpr Quantity operator+(Quantity a, Quantity b) {
    return Quantity{checked_add(a.value_, b.value_, Tag::plus)};
  }
  friend constexpr Quantity operator-(Quantity a, Quantity b) {
    return Quantity{checked_sub(a.value_, b.value_, Tag::minus)};
  }
  constexpr Quantity& operator+=(Quantity other) { return *this = *this + other; }
  constexpr Quantity& operator-=(Quantity other) { return *this = *this - other; }
  constexpr Quantity& operator++() { return *this += Quantity{1U}; }
  constexpr Quantity& operator--() { return *this -= Quantity{1U}; }

  // Scaling by a plain number keeps the unit: `Pages{3} * 2 == Pages{6}`.
  friend constexpr Quantity operator*(Quantity a, rep k) {
    return Quantity{checked_mul(a.value_, k, Tag::times)};
  }
  friend constexpr Quantity operator*(rep k, Quantity a) { return a * k; }

  // Ratio of two quantities of one unit is a plain number (integer division).
  // REQUIRES: b is not zero (division by zero throws std::domain_error).
  friend constexpr rep operator/(Quantity a, Quantity b) {
    if (b.value_ == 0) throw std::domain_error(std::string("kvcache: ") + Tag::name + " / 0");
    return a.value_ / b.value_;
  }
  friend constexpr Quantity operator%(Quantity a, Quantity b) {
    if (b.value_ == 0) throw std::domain_error(std::string("kvcache: ") + Tag::name + " % 0");
    return Quantity{a.value_ % b.value_};
  }

  friend std::ostream& operator<<(std::ostream& os, Quantity q) {
    return os << q.value_ << ' ' << Tag::suffix;
  }

 private:
  template <class I>
  static constexpr rep from_integer(I value) {
    if constexpr (std::is_signed_v<I>) {
      if (value < 0) {
        throw std::out_of_range(std::string("kvcache: ") + Tag::name +
                                " cannot be negative: " + std::to_string(value));
      }
    }
    return static_cast<rep>(value);
  }

  rep value_ = 0;
};

struct BytesTag {
  static constexpr const char* name = "Bytes";
  static constexpr const char* suffix = "B";
  static constexpr const char* plus = "Bytes +";
  static constexpr const char* minus = "Bytes -";
  static constexpr const char* times = "Bytes *";
};
struct TokensTag {
  static constexpr const char* name = "Tokens";
  static constexpr const char* suffix = "tokens";
  static constexpr const char* plus = "Tokens +";
  static constexpr const char* minus = "Tokens -";
  static constexpr const char* times = "Tokens *";
};
struct PagesTag {
  static constexpr const char* name = "Pages";
  static constexpr const char* suffix = "pages";
  static constexpr const char* plus = "Pages +";
  static constexpr const char* minus = "Pages -";
  static constexpr const char* times = "Pages *";
};

// Cross-unit operations, named for what they mean (re-exported in kvcache).
// Tokens held by `pages` pages of `page_size` tokens each.
[[nodiscard]] constexpr Quantity<TokensTag> tokens_in(Quantity<PagesTag> pages, Quantity<TokensTag> page_size) {
  return Quantity<TokensTag>{checked_mul(pages.count(), page_size.count(), "Pages * page size")};
}

// Bytes taken by `tokens` tokens of `bytes_per_token` bytes each.
[[nodiscard]] constexpr Quantity<BytesTag> bytes_for(Quantity<TokensTag> tokens, Quantity<BytesTag> bytes_per_token) {
  return Quantity<BytesTag>{checked_mul(tokens.count(), bytes_per_token.count(),
                                   "Tokens * bytes per token")};
}

// Bytes taken by `pages` pages of `bytes_per_page` bytes each.
[[nodiscard]] constexpr Quantity<BytesTag> bytes_for(Quantity<PagesTag> pages, Quantity<BytesTag> bytes_per_page) {
  return Quantity<BytesTag>{
      checked_mul(pages.count(), bytes_per_page.count(), "Pages * bytes per page")};
}

// Pages needed to hold `tokens` tokens: ceil(tokens / page_size). Never
// overflows (it is computed without `tokens + page_size - 1`).
// A zero page size throws std::invalid_argument.
[[nodiscard]] constexpr Quantity<PagesTag> pages_for(Quantity<TokensTag> tokens, Quantity<TokensTag> page_size) {
  if (page_size.count() == 0) throw std::invalid_argument("kvcache: pages_for: page size is 0");
  const std::uint64_t whole = tokens.count() / page_size.count();
  return Quantity<PagesTag>{whole + (tokens.count() % page_size.count() != 0 ? 1U : 0U)};
}

}  // namespace kvcache::detail

export namespace kvcache {

using Bytes = detail::Quantity<detail::BytesTag>;
using Tokens = detail::Quantity<detail::TokensTag>;
using Pages = detail::Quantity<detail::PagesTag>;

using detail::bytes_for;
using detail::pages_for;
using detail::tokens_in;

// The name of one page of the pool. Default-constructed it names no page
// (`PageId::none()`).
class PageId {
 public:
  using rep = std::uint32_t;

  constexpr PageId() noexcept = default;
  constexpr explicit PageId(rep index) noexcept : index_(index) {}

  [[nodiscard]] static constexpr PageId none() noexcept { return PageId{}; }
  // The largest index a page can have; `none()` is one past it.
  static constexpr rep max_index = std::numeric_limits<rep>::max() - 1;

  [[nodiscard]] constexpr rep index() const noexcept { return index_; }
  constexpr explicit operator std::uint64_t() const noexcept { return index_; }

  friend constexpr bool operator==(PageId, PageId) noexcept = default;

  friend std::ostream& operator<<(std::ostream& os, PageId id) {
    if (id == none()) return os << "page#none";
    return os << "page#" << id.index_;
  }

 private:
  rep index_ = std::numeric_limits<rep>::max();
};

}  // namespace kvcache

export template <class Tag>
struct std::hash<kvcache::detail::Quantity<Tag>> {
  std::size_t operator()(kvcache::detail::Quantity<Tag> q) const noexcept {
    return std::hash<std::uint64_t>{}(q.count());
  }
};

export template <>
struct std::hash<kvcache::PageId> {
  std::size_t operator()(kvcache::PageId id) const noexcept {
    return std::hash<std::uint32_t>{}(id.index());
  }
};
