// Unit tests for kvcache.allocator: the page pool. A fresh pool hands out
// pages 0, 1, 2, ...; released pages go to the tail of an LRU free list;
// allocate(n) is all-or-nothing; reference counts return a page to the free
// list exactly when its last holder lets go; stale handles (double release, a
// handle kept after its page was freed and handed out again) throw StalePage;
// take(id) removes a page from the middle of the free list; ids outside the
// pool throw std::out_of_range. Every failure path checks that the pool is
// exactly as before (free list, reference counts, handles, counts).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <vector>

import kvcache;

namespace {

using kvcache::PageHandle;
using kvcache::PageId;
using kvcache::PagePool;
using kvcache::Pages;

// Everything observable about a pool, to compare before and after a failed call.
struct PoolSnapshot {
  Pages capacity;
  Pages free_pages;
  Pages live_pages;
  std::vector<PageId> free_list;
  std::vector<std::uint32_t> refs;
  std::vector<std::optional<PageHandle>> handles;  // handle(id) of live pages

  friend bool operator==(const PoolSnapshot&, const PoolSnapshot&) = default;
};

PoolSnapshot snapshot(const PagePool& pool) {
  PoolSnapshot s{pool.capacity(), pool.free_pages(), pool.live_pages(), pool.free_list(), {}, {}};
  for (std::uint64_t i = 0; i < pool.capacity().count(); ++i) {
    const PageId id{static_cast<std::uint32_t>(i)};
    s.refs.push_back(pool.ref_count(id));
    s.handles.push_back(pool.is_free(id) ? std::nullopt : std::optional(pool.handle(id)));
  }
  return s;
}

// The page allocate() hands out. With no free page it throws, and the test
// fails there rather than read an empty optional (a check that
// bugprone-unchecked-optional-access sees; it counts optional::value() as
// unchecked).
PageHandle allocate_one(PagePool& pool) {
  const std::optional<PageHandle> h = pool.allocate();
  if (!h) throw std::logic_error("PagePool::allocate() returned no page");
  return *h;
}

std::vector<PageId> ids(std::initializer_list<std::uint32_t> indices) {
  std::vector<PageId> out;
  for (const std::uint32_t i : indices) out.emplace_back(i);
  return out;
}

// ---------------------------------------------------------------------------
// Construction

TEST(PagePoolTest, FreshPoolIsAllFreeInIndexOrder) {
  const PagePool pool(Pages{4});
  EXPECT_EQ(pool.capacity(), Pages{4});
  EXPECT_EQ(pool.free_pages(), Pages{4});
  EXPECT_EQ(pool.live_pages(), Pages{0});
  EXPECT_EQ(pool.free_list(), ids({0, 1, 2, 3}));
  for (std::uint32_t i = 0; i < 4; ++i) {
    EXPECT_EQ(pool.ref_count(PageId{i}), 0U);
    EXPECT_TRUE(pool.is_free(PageId{i}));
  }
  EXPECT_TRUE(pool.check_invariants());
}

TEST(PagePoolTest, CapacityZero) {
  PagePool pool(Pages{0});
  EXPECT_EQ(pool.capacity(), Pages{0});
  EXPECT_EQ(pool.free_pages(), Pages{0});
  EXPECT_TRUE(pool.free_list().empty());
  EXPECT_FALSE(pool.allocate().has_value());
  std::vector<PageHandle> out;
  EXPECT_FALSE(pool.allocate(Pages{1}, out));
  EXPECT_TRUE(out.empty());
  EXPECT_TRUE(pool.allocate(Pages{0}, out));  // nothing asked, nothing given
  EXPECT_TRUE(out.empty());
  EXPECT_TRUE(pool.can_allocate(Pages{0}));
  EXPECT_FALSE(pool.can_allocate(Pages{1}));
  EXPECT_THROW((void)pool.ref_count(PageId{0}), std::out_of_range);
  EXPECT_THROW((void)pool.take(PageId{0}), std::out_of_range);
  EXPECT_TRUE(pool.check_invariants());
}

TEST(PagePoolTest, CapacityBeyondWhatAPageIdNamesThrowsInvalidArgument) {
  EXPECT_EQ(PagePool::max_capacity, std::uint64_t{PageId::max_index} + 1);
  EXPECT_THROW(PagePool{Pages{PagePool::max_capacity + 1}}, std::invalid_argument);
  EXPECT_THROW(PagePool{Pages::max()}, std::invalid_argument);
}

// ---------------------------------------------------------------------------
// allocate

TEST(PagePoolTest, AllocateHandsOutPagesInIndexOrderWithOneReference) {
  PagePool pool(Pages{3});
  for (std::uint32_t i = 0; i < 3; ++i) {
    const PageHandle h = allocate_one(pool);
    EXPECT_EQ(h.id, PageId{i});
    EXPECT_EQ(pool.ref_count(h.id), 1U);
    EXPECT_FALSE(pool.is_free(h.id));
    EXPECT_EQ(pool.handle(h.id), h);
    EXPECT_TRUE(pool.is_live(h));
  }
  EXPECT_EQ(pool.free_pages(), Pages{0});
  EXPECT_EQ(pool.live_pages(), Pages{3});
  EXPECT_TRUE(pool.check_invariants());
}

TEST(PagePoolTest, AllocateFromAnExhaustedPoolReturnsNothingAndChangesNothing) {
  PagePool pool(Pages{2});
  ASSERT_TRUE(pool.allocate().has_value());
  ASSERT_TRUE(pool.allocate().has_value());
  const PoolSnapshot before = snapshot(pool);
  EXPECT_FALSE(pool.allocate().has_value());
  EXPECT_EQ(snapshot(pool), before);
  EXPECT_TRUE(pool.check_invariants());
}

TEST(PagePoolTest, AllocateNAppendsInOrderAndKeepsWhatOutHeld) {
  PagePool pool(Pages{5});
  std::vector<PageHandle> out;
  ASSERT_TRUE(pool.allocate(Pages{2}, out));
  ASSERT_TRUE(pool.allocate(Pages{3}, out));
  ASSERT_EQ(out.size(), 5U);
  for (std::uint32_t i = 0; i < 5; ++i) {
    EXPECT_EQ(out[i].id, PageId{i});
    EXPECT_EQ(pool.ref_count(PageId{i}), 1U);
  }
  EXPECT_EQ(pool.free_pages(), Pages{0});
  EXPECT_TRUE(pool.check_invariants());
}

TEST(PagePoolTest, AllocateNIsAllOrNothing) {
  PagePool pool(Pages{4});
  std::vector<PageHandle> out;
  ASSERT_TRUE(pool.allocate(Pages{3}, out));
  ASSERT_TRUE(pool.release(out[1]));  // free list: [3, 1]
  const std::vector<PageHandle> out_before = out;
  const PoolSnapshot before = snapshot(pool);
  EXPECT_FALSE(pool.allocate(Pages{3}, out));
  EXPECT_FALSE(pool.can_allocate(Pages{3}));
  EXPECT_EQ(snapshot(pool), before);
  EXPECT_EQ(out, out_before);  // `out` untouched too
  EXPECT_FALSE(pool.allocate(Pages::max(), out));
  EXPECT_EQ(snapshot(pool), before);
  // Exactly what is free succeeds, in free-list order.
  EXPECT_TRUE(pool.can_allocate(Pages{2}));
  std::vector<PageHandle> got;
  ASSERT_TRUE(pool.allocate(Pages{2}, got));
  ASSERT_EQ(got.size(), 2U);
  EXPECT_EQ(got[0].id, PageId{3});
  EXPECT_EQ(got[1].id, PageId{1});
  EXPECT_TRUE(pool.check_invariants());
}

TEST(PagePoolTest, AllocateZeroPagesSucceedsAndChangesNothing) {
  PagePool pool(Pages{2});
  const PoolSnapshot before = snapshot(pool);
  std::vector<PageHandle> out;
  EXPECT_TRUE(pool.allocate(Pages{0}, out));
  EXPECT_TRUE(out.empty());
  EXPECT_EQ(snapshot(pool), before);
}

// ---------------------------------------------------------------------------
// LRU order of the free list

TEST(PagePoolTest, ReleasedPagesGoToTheTailInReleaseOrder) {
  PagePool pool(Pages{4});
  std::vector<PageHandle> h;
  ASSERT_TRUE(pool.allocate(Pages{4}, h));
  EXPECT_TRUE(pool.release(h[2]));
  EXPECT_TRUE(pool.release(h[0]));
  EXPECT_TRUE(pool.release(h[3]));
  EXPECT_EQ(pool.free_list(), ids({2, 0, 3}));
  // The head (freed longest ago) is handed out first.
  EXPECT_EQ(allocate_one(pool).id, PageId{2});
  EXPECT_EQ(allocate_one(pool).id, PageId{0});
  EXPECT_EQ(pool.free_list(), ids({3}));
  EXPECT_TRUE(pool.check_invariants());
}

TEST(PagePoolTest, NeverUsedPagesComeBeforeReleasedOnes) {
  PagePool pool(Pages{6});
  std::vector<PageHandle> h;
  ASSERT_TRUE(pool.allocate(Pages{4}, h));
  EXPECT_TRUE(pool.release(h[1]));
  EXPECT_EQ(pool.free_list(), ids({4, 5, 1}));
  EXPECT_EQ(allocate_one(pool).id, PageId{4});
  EXPECT_EQ(allocate_one(pool).id, PageId{5});
  EXPECT_EQ(allocate_one(pool).id, PageId{1});
  EXPECT_FALSE(pool.allocate().has_value());
}

// ---------------------------------------------------------------------------
// Reference counts

TEST(PagePoolTest, PageReturnsToTheFreeListExactlyWhenTheLastHolderReleases) {
  PagePool pool(Pages{3});
  const PageHandle h = allocate_one(pool);
  pool.retain(h);
  pool.retain(h);
  EXPECT_EQ(pool.ref_count(h.id), 3U);
  EXPECT_EQ(pool.live_pages(), Pages{1});
  EXPECT_FALSE(pool.release(h));
  EXPECT_EQ(pool.ref_count(h.id), 2U);
  EXPECT_FALSE(pool.is_free(h.id));
  EXPECT_EQ(pool.free_list(), ids({1, 2}));
  EXPECT_FALSE(pool.release(h));
  EXPECT_EQ(pool.ref_count(h.id), 1U);
  EXPECT_TRUE(pool.is_live(h));
  EXPECT_TRUE(pool.release(h));
  EXPECT_EQ(pool.ref_count(h.id), 0U);
  EXPECT_TRUE(pool.is_free(h.id));
  EXPECT_FALSE(pool.is_live(h));
  EXPECT_EQ(pool.free_list(), ids({1, 2, 0}));
  EXPECT_EQ(pool.free_pages(), Pages{3});
  EXPECT_TRUE(pool.check_invariants());
}

TEST(PagePoolTest, DoubleReleaseThrowsStalePageAndChangesNothing) {
  PagePool pool(Pages{3});
  const PageHandle a = allocate_one(pool);
  const PageHandle b = allocate_one(pool);
  ASSERT_TRUE(pool.release(a));
  const PoolSnapshot before = snapshot(pool);
  EXPECT_THROW((void)pool.release(a), kvcache::StalePage);
  EXPECT_EQ(snapshot(pool), before);
  EXPECT_THROW(pool.retain(a), kvcache::StalePage);
  EXPECT_EQ(snapshot(pool), before);
  EXPECT_EQ(pool.ref_count(b.id), 1U);
  EXPECT_TRUE(pool.check_invariants());
}

TEST(PagePoolTest, StaleHandleOfAReallocatedPageThrowsAndLeavesTheNewHolderAlone) {
  PagePool pool(Pages{1});
  const PageHandle old_handle = allocate_one(pool);
  ASSERT_TRUE(pool.release(old_handle));
  const PageHandle new_handle = allocate_one(pool);
  ASSERT_EQ(new_handle.id, old_handle.id);  // the same page, handed out again
  EXPECT_NE(new_handle, old_handle);        // in another generation
  EXPECT_FALSE(pool.is_live(old_handle));
  EXPECT_TRUE(pool.is_live(new_handle));
  const PoolSnapshot before = snapshot(pool);
  EXPECT_THROW((void)pool.release(old_handle), kvcache::StalePage);
  EXPECT_EQ(snapshot(pool), before);
  EXPECT_THROW(pool.retain(old_handle), kvcache::StalePage);
  EXPECT_EQ(snapshot(pool), before);
  EXPECT_EQ(pool.ref_count(new_handle.id), 1U);
  // A handle from a generation that never existed is just as stale.
  const PageHandle future{new_handle.id, new_handle.generation + 1};
  EXPECT_THROW((void)pool.release(future), kvcache::StalePage);
  EXPECT_EQ(snapshot(pool), before);
  // The real holder still releases normally.
  EXPECT_TRUE(pool.release(new_handle));
  EXPECT_TRUE(pool.check_invariants());
}

TEST(PagePoolTest, HandleOfAFreePageThrowsStalePage) {
  PagePool pool(Pages{2});
  EXPECT_THROW((void)pool.handle(PageId{0}), kvcache::StalePage);
  const PageHandle h = allocate_one(pool);
  EXPECT_EQ(pool.handle(PageId{0}), h);
  ASSERT_TRUE(pool.release(h));
  EXPECT_THROW((void)pool.handle(PageId{0}), kvcache::StalePage);
}

// ---------------------------------------------------------------------------
// take

TEST(PagePoolTest, TakeRemovesAPageFromTheMiddleOfTheFreeList) {
  PagePool pool(Pages{5});
  const PageHandle h = pool.take(PageId{2});
  EXPECT_EQ(h.id, PageId{2});
  EXPECT_EQ(pool.ref_count(PageId{2}), 1U);
  EXPECT_TRUE(pool.is_live(h));
  EXPECT_EQ(pool.handle(PageId{2}), h);
  EXPECT_EQ(pool.free_list(), ids({0, 1, 3, 4}));
  EXPECT_EQ(pool.free_pages(), Pages{4});
  EXPECT_TRUE(pool.check_invariants());
  // Head and tail too.
  (void)pool.take(PageId{0});
  (void)pool.take(PageId{4});
  EXPECT_EQ(pool.free_list(), ids({1, 3}));
  EXPECT_TRUE(pool.check_invariants());
  // A taken page is released like any other: to the tail.
  EXPECT_TRUE(pool.release(h));
  EXPECT_EQ(pool.free_list(), ids({1, 3, 2}));
  EXPECT_TRUE(pool.check_invariants());
}

TEST(PagePoolTest, TakeAReleasedPageOutOfTheLruList) {
  PagePool pool(Pages{3});
  std::vector<PageHandle> h;
  ASSERT_TRUE(pool.allocate(Pages{3}, h));
  ASSERT_TRUE(pool.release(h[0]));
  ASSERT_TRUE(pool.release(h[1]));
  ASSERT_TRUE(pool.release(h[2]));
  const PageHandle again = pool.take(PageId{1});
  EXPECT_EQ(pool.free_list(), ids({0, 2}));
  EXPECT_FALSE(pool.is_live(h[1]));  // the old handle stays stale
  EXPECT_TRUE(pool.is_live(again));
  EXPECT_THROW((void)pool.release(h[1]), kvcache::StalePage);
  EXPECT_TRUE(pool.check_invariants());
}

TEST(PagePoolTest, TakeALivePageThrowsStalePageAndChangesNothing) {
  PagePool pool(Pages{3});
  const PageHandle h = allocate_one(pool);
  pool.retain(h);
  const PoolSnapshot before = snapshot(pool);
  EXPECT_THROW((void)pool.take(h.id), kvcache::StalePage);
  EXPECT_EQ(snapshot(pool), before);
  EXPECT_EQ(pool.ref_count(h.id), 2U);
}

// ---------------------------------------------------------------------------
// Ids outside the pool

TEST(PagePoolTest, IdsOutsideThePoolThrowOutOfRangeAndChangeNothing) {
  PagePool pool(Pages{3});
  const PageHandle live = allocate_one(pool);
  const PoolSnapshot before = snapshot(pool);
  for (const PageId bad : {PageId{3}, PageId{1000}, PageId{PageId::max_index}, PageId::none()}) {
    SCOPED_TRACE(static_cast<std::uint64_t>(bad));
    EXPECT_THROW((void)pool.ref_count(bad), std::out_of_range);
    EXPECT_THROW((void)pool.is_free(bad), std::out_of_range);
    EXPECT_THROW((void)pool.handle(bad), std::out_of_range);
    EXPECT_THROW((void)pool.take(bad), std::out_of_range);
    EXPECT_THROW(pool.retain(PageHandle{bad, live.generation}), std::out_of_range);
    EXPECT_THROW((void)pool.release(PageHandle{bad, live.generation}), std::out_of_range);
    EXPECT_FALSE(pool.is_live(PageHandle{bad, live.generation}));
    EXPECT_EQ(snapshot(pool), before);
  }
  EXPECT_TRUE(pool.check_invariants());
}

// ---------------------------------------------------------------------------
// PageHandle

TEST(PageHandleTest, EqualWhenIdAndGenerationAreEqual) {
  EXPECT_EQ((PageHandle{PageId{1}, 2}), (PageHandle{PageId{1}, 2}));
  EXPECT_NE((PageHandle{PageId{1}, 2}), (PageHandle{PageId{1}, 3}));
  EXPECT_NE((PageHandle{PageId{1}, 2}), (PageHandle{PageId{2}, 2}));
  EXPECT_EQ(PageHandle{}.id, PageId::none());
}

// ---------------------------------------------------------------------------
// A deterministic walk against a tiny model: free list as a deque (allocate
// pops the front, a last release pushes the back), a reference count per page.

TEST(PagePoolTest, DeterministicWalkMatchesAnLruModel) {
  constexpr std::uint32_t kCap = 8;
  PagePool pool(Pages{kCap});
  std::deque<std::uint32_t> model_free;
  for (std::uint32_t i = 0; i < kCap; ++i) model_free.push_back(i);
  std::vector<std::uint32_t> model_refs(kCap, 0);
  std::vector<PageHandle> held;  // one entry per reference
  std::uint64_t state = 0x9E3779B97F4A7C15ULL;
  const auto next = [&state](std::uint64_t bound) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (state >> 33) % bound;
  };
  for (int step = 0; step < 3000; ++step) {
    switch (next(4)) {
      case 0: {  // allocate one
        const std::optional<PageHandle> h = pool.allocate();
        if (model_free.empty()) {
          ASSERT_FALSE(h.has_value());
        } else {
          if (!h) FAIL() << "allocate() returned no page with " << model_free.size() << " free";
          ASSERT_EQ(h->id.index(), model_free.front());
          model_free.pop_front();
          model_refs[h->id.index()] = 1;
          held.push_back(*h);
        }
        break;
      }
      case 1: {  // allocate n, all or nothing
        const std::uint64_t n = next(4);
        std::vector<PageHandle> out;
        const bool ok = pool.allocate(Pages{n}, out);
        ASSERT_EQ(ok, n <= model_free.size());
        ASSERT_EQ(out.size(), ok ? n : 0U);
        for (const PageHandle& h : out) {
          ASSERT_EQ(h.id.index(), model_free.front());
          model_free.pop_front();
          model_refs[h.id.index()] = 1;
          held.push_back(h);
        }
        break;
      }
      case 2: {  // retain a held page
        if (held.empty()) break;
        const PageHandle h = held[next(held.size())];
        pool.retain(h);
        ++model_refs[h.id.index()];
        held.push_back(h);
        break;
      }
      default: {  // release one reference
        if (held.empty()) break;
        const std::size_t k = next(held.size());
        const PageHandle h = held[k];
        held.erase(held.begin() + static_cast<std::ptrdiff_t>(k));
        const bool last = --model_refs[h.id.index()] == 0;
        ASSERT_EQ(pool.release(h), last);
        if (last) model_free.push_back(h.id.index());
        break;
      }
    }
    ASSERT_TRUE(pool.check_invariants()) << "step " << step;
    ASSERT_EQ(pool.free_pages(), Pages{model_free.size()}) << "step " << step;
    std::vector<PageId> expected;
    for (const std::uint32_t i : model_free) expected.emplace_back(i);
    ASSERT_EQ(pool.free_list(), expected) << "step " << step;
    for (std::uint32_t i = 0; i < kCap; ++i) {
      ASSERT_EQ(pool.ref_count(PageId{i}), model_refs[i]) << "step " << step << " page " << i;
    }
  }
}

}  // namespace
