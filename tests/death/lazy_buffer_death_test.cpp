// Death tests for the internal preconditions of kvcache (STYLE.md "Errors":
// a broken precondition is a bug, not a user error; it prints where and why
// and terminates through KVCACHE_EXPECTS, kvcache/contracts.hpp).
//
// Which preconditions can a caller reach through the exported API? Every
// KVCACHE_EXPECTS / KVCACHE_ASSERT / KVCACHE_AUDIT in modules/:
//   storage.cpp   LazyBuffer::discard    EXPECTS offset <= size && length <= size - offset
//                                        reachable: detail::LazyBuffer is exported
//   allocator.cpp PagePool::pop_front    EXPECTS head_ != nil, ASSERT refs == 0
//                                        not reachable: both callers check free_count_ first
//   basic.cpp     BasicKVCache::free     EXPECTS bytes <= used_ && capacity <= reserved_
//                                        not reachable: INV-BASIC-1/-3 make it hold
//   *             KVCACHE_AUDIT(check_invariants()) after every mutation
//                                        not reachable unless the library has a bug
// So the reachable one is LazyBuffer::discard with a range that does not lie
// inside the buffer. The tests check the message ("precondition violated",
// the condition, the file) and that the process ends in std::terminate
// (SIGABRT), not in an exception or an out-of-bounds write.
#include <gtest/gtest.h>

#include <csignal>
#include <cstddef>
#include <limits>
#include <utility>

#include "kvcache/build_config.hpp"

import kvcache;

namespace {

using kvcache::detail::LazyBuffer;

// The whole line KVCACHE_EXPECTS prints for discard's precondition.
constexpr const char* kDiscardViolation =
    "kvcache: precondition violated: offset <= size_ && length <= size_ - offset "
    "\\(.*storage\\.cpp:[0-9]+\\)";

class LazyBufferDeathTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // fork + exec: safe with the threads ASan and gtest may have started.
    GTEST_FLAG_SET(death_test_style, "threadsafe");
    if (KVCACHE_CONTRACT_LEVEL == 0) GTEST_SKIP() << "built with KVCACHE_CONTRACTS=off";
  }
};

TEST_F(LazyBufferDeathTest, OffsetPastTheEnd) {
  LazyBuffer buf(4096);
  EXPECT_DEATH(buf.discard(4097, 0), kDiscardViolation);
}

TEST_F(LazyBufferDeathTest, LengthPastTheEnd) {
  LazyBuffer buf(4096);
  EXPECT_DEATH(buf.discard(0, 4097), kDiscardViolation);
}

TEST_F(LazyBufferDeathTest, RangeEndingPastTheEnd) {
  LazyBuffer buf(8192);
  EXPECT_DEATH(buf.discard(8000, 193), kDiscardViolation);
}

TEST_F(LazyBufferDeathTest, RangeWhoseEndWrapsAround) {
  // offset + length wraps to 0 in std::size_t: the check must not be fooled.
  LazyBuffer buf(4096);
  EXPECT_DEATH(buf.discard(1, std::numeric_limits<std::size_t>::max()), kDiscardViolation);
}

TEST_F(LazyBufferDeathTest, AnyNonEmptyRangeOfAnEmptyBuffer) {
  LazyBuffer empty;
  EXPECT_DEATH(empty.discard(0, 1), kDiscardViolation);
  LazyBuffer source(4096);
  LazyBuffer target(std::move(source));
  // NOLINTNEXTLINE(bugprone-use-after-move): a moved-from buffer is empty
  EXPECT_DEATH(source.discard(0, 1), kDiscardViolation);
}

TEST_F(LazyBufferDeathTest, TerminatesWithSigabrt) {
  LazyBuffer buf(4096);
  EXPECT_EXIT(buf.discard(4096, 1), ::testing::KilledBySignal(SIGABRT), kDiscardViolation);
}

// The boundary itself is not a violation: the same calls with ranges that
// end exactly at the end of the buffer return normally.
TEST_F(LazyBufferDeathTest, RangesEndingAtTheEndAreValid) {
  LazyBuffer buf(8192);
  buf.data()[8191] = std::byte{1};
  buf.discard(8192, 0);
  buf.discard(8000, 192);
  EXPECT_EQ(buf.data()[8191], std::byte{0});
  buf.discard(0, 8192);
  LazyBuffer empty;
  empty.discard(0, 0);
  EXPECT_EQ(empty.size(), 0U);
}

}  // namespace
