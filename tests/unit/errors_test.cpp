// Unit tests for kvcache.errors: each exception type derives from the standard
// exception CONTRACT.md "Errors" names (so a caller's existing catch clauses
// work), keeps its message, and the argument-check helpers that the caches
// share throw the right type with a message naming the request id and the
// numbers involved. (The helpers are kvcache::detail, exported only because
// other modules need them; they are exercised here for the {fmt} rule.)
#include <gtest/gtest.h>

#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

import kvcache;

namespace {

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

bool contains(const std::string& haystack, std::string_view needle) {
  return haystack.find(needle) != std::string::npos;
}

// ---------------------------------------------------------------------------
// The hierarchy of CONTRACT.md "Errors"

static_assert(std::is_base_of_v<std::out_of_range, kvcache::UnknownRequest>);
static_assert(std::is_base_of_v<std::invalid_argument, kvcache::ShapeMismatch>);
static_assert(std::is_base_of_v<std::runtime_error, kvcache::OutOfPages>);
static_assert(std::is_base_of_v<std::length_error, kvcache::ReservationExceeded>);
static_assert(std::is_base_of_v<std::invalid_argument, kvcache::StalePage>);
// Distinct types: catching one does not catch another.
static_assert(!std::is_base_of_v<kvcache::ShapeMismatch, kvcache::StalePage>);
static_assert(!std::is_base_of_v<kvcache::StalePage, kvcache::ShapeMismatch>);

template <class E, class Base>
void expect_caught_as_base(const char* text) {
  try {
    throw E(text);
  } catch (const Base& e) {
    EXPECT_STREQ(e.what(), text);
    EXPECT_NE(dynamic_cast<const E*>(&e), nullptr);
    return;
  } catch (...) {
    ADD_FAILURE() << "not caught as its base";
    return;
  }
}

TEST(Errors, CaughtByTheStandardBaseWithTheMessageKept) {
  expect_caught_as_base<kvcache::UnknownRequest, std::out_of_range>("no such request");
  expect_caught_as_base<kvcache::ShapeMismatch, std::invalid_argument>("bad shape");
  expect_caught_as_base<kvcache::OutOfPages, std::runtime_error>("no page");
  expect_caught_as_base<kvcache::ReservationExceeded, std::length_error>("full");
  expect_caught_as_base<kvcache::StalePage, std::invalid_argument>("stale");
  expect_caught_as_base<kvcache::UnknownRequest, std::exception>("any");
  expect_caught_as_base<kvcache::OutOfPages, std::exception>("any");
}

TEST(Errors, SiblingTypesAreNotCaughtForEachOther) {
  bool caught_as_stale = false;
  try {
    try {
      throw kvcache::ShapeMismatch("shape");
    } catch (const kvcache::StalePage&) {
      caught_as_stale = true;
    }
  } catch (const kvcache::ShapeMismatch& e) {
    EXPECT_STREQ(e.what(), "shape");
  }
  EXPECT_FALSE(caught_as_stale);
}

TEST(Errors, ConstructibleFromStdString) {
  const kvcache::UnknownRequest e(std::string("req \"a\""));
  EXPECT_STREQ(e.what(), "req \"a\"");
  const kvcache::ReservationExceeded copy = kvcache::ReservationExceeded("x");
  EXPECT_STREQ(copy.what(), "x");
}

// ---------------------------------------------------------------------------
// The shared argument checks (kvcache::detail)

TEST(ErrorsDetail, ThrowUnknownRequestNamesTheIdAndTheCall) {
  const std::string msg = message_of<kvcache::UnknownRequest>(
      [] { kvcache::detail::throw_unknown_request("Cache::free", "req-42"); });
  EXPECT_TRUE(contains(msg, "\"req-42\"")) << msg;
  EXPECT_TRUE(contains(msg, "Cache::free")) << msg;
}

TEST(ErrorsDetail, CheckLayerAcceptsInRangeRejectsTheRest) {
  EXPECT_NO_THROW(kvcache::detail::check_layer("f", "r", 0, 1));
  EXPECT_NO_THROW(kvcache::detail::check_layer("f", "r", 31, 32));
  const std::string msg = message_of<std::out_of_range>(
      [] { kvcache::detail::check_layer("f", "req-7", 32, 32); });
  EXPECT_TRUE(contains(msg, "req-7")) << msg;
  EXPECT_TRUE(contains(msg, "32")) << msg;
  // A bad layer is std::out_of_range but not UnknownRequest.
  try {
    kvcache::detail::check_layer("f", "r", 5, 2);
    ADD_FAILURE() << "did not throw";
  } catch (const kvcache::UnknownRequest&) {
    ADD_FAILURE() << "a bad layer must not be UnknownRequest";
  } catch (const std::out_of_range&) {
    SUCCEED();
  }
}

TEST(ErrorsDetail, CheckRowBytesNamesActualAndExpected) {
  EXPECT_NO_THROW(kvcache::detail::check_row_bytes("f", "r", 0, "key", 2048, 2048));
  const std::string msg = message_of<kvcache::ShapeMismatch>(
      [] { kvcache::detail::check_row_bytes("f", "req-1", 3, "value", 2047, 2048); });
  EXPECT_TRUE(contains(msg, "req-1")) << msg;
  EXPECT_TRUE(contains(msg, "value")) << msg;
  EXPECT_TRUE(contains(msg, "2047")) << msg;
  EXPECT_TRUE(contains(msg, "2048")) << msg;
}

TEST(ErrorsDetail, CheckFloatRowsNeedsFourByteDtypeAndTheRightLength) {
  EXPECT_NO_THROW(kvcache::detail::check_float_rows("f", "r", 0, 4, 8, 8, 8));
  const std::string dtype = message_of<kvcache::ShapeMismatch>(
      [] { kvcache::detail::check_float_rows("f", "r", 0, 2, 8, 8, 8); });
  EXPECT_TRUE(contains(dtype, "dtype_bytes")) << dtype;
  const std::string key = message_of<kvcache::ShapeMismatch>(
      [] { kvcache::detail::check_float_rows("f", "r", 0, 4, 7, 8, 8); });
  EXPECT_TRUE(contains(key, "key")) << key;
  EXPECT_TRUE(contains(key, "7")) << key;
  const std::string value = message_of<kvcache::ShapeMismatch>(
      [] { kvcache::detail::check_float_rows("f", "r", 0, 4, 8, 9, 8); });
  EXPECT_TRUE(contains(value, "value")) << value;
  EXPECT_TRUE(contains(value, "9")) << value;
}

}  // namespace
