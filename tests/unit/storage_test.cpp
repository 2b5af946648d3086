// Unit tests for kvcache.storage: the Storage mode enum, TokenRows / KVView
// (what get_kv returns: rows in token order, each a span of exactly the row
// length, iterable as a random-access range) and detail::LazyBuffer, the
// lazily committed, zero-filled host memory behind every cache (CONTRACT.md
// "KV data": resident memory grows with what is written, not with what is
// reserved).
//
// Resident memory is read from VmRSS in /proc/self/status. The tests run
// under ASan, which has its own resident overhead, so they compare deltas
// around one operation, never absolute values, and leave wide margins.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <new>
#include <ranges>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

import kvcache;

namespace {

using kvcache::KVView;
using kvcache::TokenRows;
using kvcache::detail::LazyBuffer;

constexpr std::size_t kMiB = std::size_t{1} << 20;

// Resident set size of this process in bytes (VmRSS), or 0 when unknown.
std::size_t resident_bytes() {
  std::ifstream status("/proc/self/status");
  std::string key;
  while (status >> key) {
    if (key == "VmRSS:") {
      std::size_t kib = 0;
      status >> kib;
      return kib * 1024;
    }
    status.ignore(1 << 12, '\n');
  }
  return 0;
}

bool all_zero(const std::byte* p, std::size_t n) {
  return std::all_of(p, p + n, [](std::byte b) { return b == std::byte{0}; });
}

// A buffer of `count` rows `stride` bytes apart; row i is filled with byte i+1.
struct RowFixture {
  static constexpr std::size_t kCount = 5;
  static constexpr std::size_t kRow = 8;
  static constexpr std::size_t kStride = 12;
  std::vector<std::byte> buffer = make();

  static std::vector<std::byte> make() {
    std::vector<std::byte> b(kCount * kStride, std::byte{0xEE});
    for (std::size_t i = 0; i < kCount; ++i) {
      std::fill_n(b.begin() + static_cast<std::ptrdiff_t>(i * kStride), kRow,
                  static_cast<std::byte>(i + 1));
    }
    return b;
  }
  [[nodiscard]] TokenRows rows() const { return TokenRows(buffer.data(), kCount, kRow, kStride); }
};

// ---------------------------------------------------------------------------
// Storage

TEST(StorageMode, HostAndNoneAreDistinct) {
  EXPECT_NE(kvcache::Storage::host, kvcache::Storage::none);
  static_assert(std::is_enum_v<kvcache::Storage>);
  static_assert(!std::is_convertible_v<kvcache::Storage, int>, "a scoped enum");
}

// ---------------------------------------------------------------------------
// TokenRows

TEST(TokenRowsTest, DefaultIsEmpty) {
  const TokenRows rows;
  EXPECT_EQ(rows.size(), 0U);
  EXPECT_TRUE(rows.empty());
  EXPECT_EQ(rows.begin(), rows.end());
  EXPECT_THROW((void)rows.at(0), std::out_of_range);
}

TEST(TokenRowsTest, RowsAreStrideApartAndRowBytesLong) {
  const RowFixture f;
  const TokenRows rows = f.rows();
  ASSERT_EQ(rows.size(), RowFixture::kCount);
  EXPECT_FALSE(rows.empty());
  EXPECT_EQ(rows.row_bytes(), RowFixture::kRow);
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const std::span<const std::byte> row = rows[i];
    EXPECT_EQ(row.size(), RowFixture::kRow);
    EXPECT_EQ(row.data(), f.buffer.data() + (i * RowFixture::kStride));
    EXPECT_TRUE(std::ranges::all_of(row, [&](std::byte b) { return b == std::byte(i + 1); }))
        << "row " << i;
  }
}

TEST(TokenRowsTest, AtChecksTheIndex) {
  const RowFixture f;
  const TokenRows rows = f.rows();
  EXPECT_EQ(rows.at(4).data(), rows[4].data());
  EXPECT_THROW((void)rows.at(5), std::out_of_range);
  EXPECT_THROW((void)rows.at(static_cast<std::size_t>(-1)), std::out_of_range);
}

TEST(TokenRowsTest, IsARandomAccessSizedRange) {
  static_assert(std::random_access_iterator<TokenRows::iterator>);
  static_assert(std::ranges::random_access_range<const TokenRows>);
  static_assert(std::is_same_v<std::iter_value_t<TokenRows::iterator>, std::span<const std::byte>>);
  const RowFixture f;
  const TokenRows rows = f.rows();
  EXPECT_EQ(std::ranges::distance(rows), 5);
  std::size_t i = 0;
  for (const std::span<const std::byte> row : rows) {
    EXPECT_EQ(row.front(), std::byte(i + 1));
    ++i;
  }
  EXPECT_EQ(i, 5U);
}

TEST(TokenRowsTest, IteratorArithmetic) {
  const RowFixture f;
  const TokenRows rows = f.rows();
  TokenRows::iterator it = rows.begin();
  EXPECT_EQ((*it).front(), std::byte{1});
  EXPECT_EQ(it[3].front(), std::byte{4});
  it += 2;
  EXPECT_EQ((*it).front(), std::byte{3});
  EXPECT_EQ((*(it + 1)).front(), std::byte{4});
  EXPECT_EQ((*(1 + it)).front(), std::byte{4});
  EXPECT_EQ((*(it - 1)).front(), std::byte{2});
  EXPECT_EQ(rows.end() - it, 3);
  EXPECT_EQ(it - rows.begin(), 2);
  TokenRows::iterator old = it++;
  EXPECT_EQ(it - old, 1);
  old = it--;
  EXPECT_EQ(old - it, 1);
  --it;
  EXPECT_EQ((*it).front(), std::byte{2});
  ++it;
  it -= 2;
  EXPECT_EQ(it, rows.begin());
  EXPECT_LT(rows.begin(), rows.end());
  EXPECT_GT(rows.end(), it);
}

TEST(KVViewTest, DestructuresIntoKeysThenValues) {
  const RowFixture k;
  RowFixture v;
  std::fill(v.buffer.begin(), v.buffer.end(), std::byte{0x55});
  const KVView view{k.rows(), v.rows()};
  const auto [keys, values] = view;
  EXPECT_EQ(keys.size(), 5U);
  EXPECT_EQ(values.size(), 5U);
  EXPECT_EQ(keys[0][0], std::byte{1});
  EXPECT_EQ(values[0][0], std::byte{0x55});
  static_assert(std::is_same_v<decltype(keys.size()), std::size_t>);
}

// ---------------------------------------------------------------------------
// LazyBuffer

TEST(LazyBufferTest, DefaultAndZeroSizeHoldNothing) {
  const LazyBuffer none;
  EXPECT_EQ(none.data(), nullptr);
  EXPECT_EQ(none.size(), 0U);
  LazyBuffer zero(0);
  EXPECT_EQ(zero.data(), nullptr);
  EXPECT_EQ(zero.size(), 0U);
  zero.discard(0, 0);  // the empty range of an empty buffer is valid
  EXPECT_EQ(zero.size(), 0U);
}

TEST(LazyBufferTest, IsZeroFilledAndWritable) {
  LazyBuffer buf(3 * 4096 + 17);
  ASSERT_NE(buf.data(), nullptr);
  EXPECT_EQ(buf.size(), 3U * 4096 + 17);
  EXPECT_TRUE(all_zero(buf.data(), buf.size()));
  std::memset(buf.data(), 0x7F, buf.size());
  EXPECT_EQ(buf.data()[buf.size() - 1], std::byte{0x7F});
  const LazyBuffer& cref = buf;
  EXPECT_EQ(cref.data(), buf.data());
}

TEST(LazyBufferTest, MoveTransfersTheMapping) {
  LazyBuffer a(4096);
  a.data()[10] = std::byte{42};
  std::byte* const p = a.data();
  LazyBuffer b(std::move(a));
  EXPECT_EQ(b.data(), p);
  EXPECT_EQ(b.size(), 4096U);
  EXPECT_EQ(b.data()[10], std::byte{42});
  EXPECT_EQ(a.data(), nullptr);  // NOLINT(bugprone-use-after-move): moved-from is empty
  EXPECT_EQ(a.size(), 0U);       // NOLINT(bugprone-use-after-move)

  LazyBuffer c(100);
  c = std::move(b);
  EXPECT_EQ(c.data(), p);
  EXPECT_EQ(c.size(), 4096U);
  EXPECT_EQ(b.data(), nullptr);  // NOLINT(bugprone-use-after-move)
  EXPECT_EQ(b.size(), 0U);       // NOLINT(bugprone-use-after-move)

  LazyBuffer& alias = c;
  c = std::move(alias);  // self-move keeps the mapping
  EXPECT_EQ(c.data(), p);
  EXPECT_EQ(c.data()[10], std::byte{42});
  static_assert(!std::is_copy_constructible_v<LazyBuffer>);
  static_assert(!std::is_copy_assignable_v<LazyBuffer>);
}

TEST(LazyBufferTest, DiscardZeroesExactlyTheRangeInsideOnePage) {
  LazyBuffer buf(8192);
  std::memset(buf.data(), 0xAB, buf.size());
  buf.discard(100, 50);
  EXPECT_EQ(buf.data()[99], std::byte{0xAB});
  EXPECT_TRUE(all_zero(buf.data() + 100, 50));
  EXPECT_EQ(buf.data()[150], std::byte{0xAB});
}

TEST(LazyBufferTest, DiscardZeroesExactlyARangeSpanningPages) {
  const std::size_t size = std::size_t{16} * 4096;
  LazyBuffer buf(size);
  std::memset(buf.data(), 0xCD, size);
  // Partial page at both ends, whole pages in the middle.
  const std::size_t offset = 4096 + 123;
  const std::size_t length = 9 * 4096 + 1000;
  buf.discard(offset, length);
  EXPECT_TRUE(std::all_of(buf.data(), buf.data() + offset,
                          [](std::byte b) { return b == std::byte{0xCD}; }));
  EXPECT_TRUE(all_zero(buf.data() + offset, length));
  EXPECT_TRUE(std::all_of(buf.data() + offset + length, buf.data() + size,
                          [](std::byte b) { return b == std::byte{0xCD}; }));
  // The discarded range is writable again.
  buf.data()[offset] = std::byte{1};
  EXPECT_EQ(buf.data()[offset], std::byte{1});
}

TEST(LazyBufferTest, DiscardAtTheBoundaries) {
  LazyBuffer buf(std::size_t{4096} * 2);
  std::memset(buf.data(), 0x11, buf.size());
  buf.discard(buf.size(), 0);  // empty range at the end
  buf.discard(0, 0);
  EXPECT_EQ(buf.data()[0], std::byte{0x11});
  buf.discard(0, buf.size());  // the whole buffer
  EXPECT_TRUE(all_zero(buf.data(), buf.size()));
}

TEST(LazyBufferTest, ConstructionCommitsNoMemory) {
  const std::size_t before = resident_bytes();
  ASSERT_GT(before, 0U) << "VmRSS unavailable";
  const LazyBuffer buf(std::size_t{8} << 30);  // 8 GiB of address space
  const std::size_t after = resident_bytes();
  ASSERT_NE(buf.data(), nullptr);
  EXPECT_LT(after - std::min(after, before), 64 * kMiB)
      << "before " << before << " after " << after;
}

TEST(LazyBufferTest, MemoryIsCommittedOnWriteAndReturnedByDiscard) {
  const std::size_t size = 64 * kMiB;
  LazyBuffer buf(size);
  const std::size_t before = resident_bytes();
  ASSERT_GT(before, 0U) << "VmRSS unavailable";
  std::memset(buf.data(), 1, size);
  const std::size_t written = resident_bytes();
  EXPECT_GT(written, before + (48 * kMiB)) << "before " << before << " written " << written;
  buf.discard(0, size);
  const std::size_t discarded = resident_bytes();
  EXPECT_LT(discarded + (48 * kMiB), written) << "written " << written << " discarded "
                                              << discarded;
  EXPECT_TRUE(all_zero(buf.data(), 4096));
}

TEST(LazyBufferTest, ImpossibleSizeThrowsBadAlloc) {
  // 2^62 bytes is more address space than any x86-64 or AArch64 process has.
  EXPECT_THROW(LazyBuffer{std::size_t{1} << 62}, std::bad_alloc);
}

}  // namespace
