// pool_state_test.cpp: a RapidCheck state machine for kvcache::PagePool.
//
// Model (PoolModel): the free list as a std::deque of page indices, head
// first (allocate pops the front, a page whose last reference goes is pushed
// at the back); a reference count and a generation per page (the generation
// advances each time the page returns to the free list, as allocator.cppm
// documents). A live handle of page i is {i, generation[i]}; any other
// generation, or any handle of a free page, is stale.
//
// Every command compares the whole observable state of the pool with the
// model before it runs and with the model's next state after it runs
// (free_list() in order, free_pages(), live_pages(), capacity(), can_allocate,
// ref_count / is_free / is_live / handle of every page) and asserts
// check_invariants(). Failure-path commands (allocate past the free count,
// stale handles, take of a live page, out-of-range ids) leave the model
// unchanged, so the comparison after them asserts that nothing changed.
// Each test case draws a pool of 0..10 pages and runs one command sequence.
//
// Volume: at least 10,000 commands per ctest run (state_util.hpp drives
// RapidCheck in rounds until the counter reaches 10,000 * KVCACHE_STATE_SCALE).
//   Scale up:   KVCACHE_STATE_SCALE=100 ./pool_state_test
//   Reproduce:  run the test with the RC_PARAMS="reproduce=..." string that a
//               failure prints on exit, e.g.
//               RC_PARAMS="reproduce=BCh..." ./pool_state_test --gtest_filter=PagePoolState.*
//   Other RapidCheck knobs (seed, max_size, max_success per round) go in
//   RC_PARAMS as usual.
#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/state.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <optional>
#include <ostream>
#include <stdexcept>
#include <string>
#include <typeinfo>
#include <utility>
#include <vector>

#include "state_util.hpp"

import kvcache;

namespace {

using kvcache::PageHandle;
using kvcache::PageId;
using kvcache::PagePool;
using kvcache::Pages;
using kvcache::StalePage;

constexpr std::uint32_t kMaxCapacity = 10;

struct PoolModel {
  std::uint32_t capacity = 0;
  std::deque<std::uint32_t> free;         // head (next to allocate) first
  std::vector<std::uint32_t> refs;        // per page; 0 = on the free list
  std::vector<std::uint32_t> generation;  // per page

  explicit PoolModel(std::uint32_t n) : capacity(n), refs(n, 0), generation(n, 0) {
    for (std::uint32_t i = 0; i < n; ++i) free.push_back(i);
  }

  [[nodiscard]] bool live(std::uint32_t i) const { return refs[i] != 0; }
  [[nodiscard]] PageHandle handle(std::uint32_t i) const {
    return PageHandle{PageId{i}, generation[i]};
  }
  [[nodiscard]] std::vector<std::uint32_t> live_pages() const {
    std::vector<std::uint32_t> out;
    for (std::uint32_t i = 0; i < capacity; ++i) {
      if (live(i)) out.push_back(i);
    }
    return out;
  }
  [[nodiscard]] std::vector<std::uint32_t> free_pages() const { return {free.begin(), free.end()}; }
  // Takes page i off the free list with one reference.
  void take(std::uint32_t i) {
    free.erase(std::find(free.begin(), free.end(), i));
    refs[i] = 1;
  }
};

struct PoolSut {
  explicit PoolSut(std::uint32_t capacity, kvcache_state::Tally& counter)
      : pool(Pages{capacity}), tally(counter) {}
  PagePool pool;
  kvcache_state::Tally& tally;
};

// A handle as RapidCheck can show it in a failed RC_ASSERT: {index, generation}.
std::pair<std::uint32_t, std::uint32_t> key(const PageHandle& h) {
  return {h.id.index(), h.generation};
}
std::vector<std::pair<std::uint32_t, std::uint32_t>> keys(const std::vector<PageHandle>& hs) {
  std::vector<std::pair<std::uint32_t, std::uint32_t>> out;
  for (const PageHandle& h : hs) out.push_back(key(h));
  return out;
}

// The whole observable state of `pool` equals `m`.
void assert_matches(const PoolModel& m, const PagePool& pool) {
  RC_ASSERT(pool.capacity() == Pages{m.capacity});
  RC_ASSERT(pool.free_pages() == Pages{m.free.size()});
  RC_ASSERT(pool.live_pages() == Pages{m.capacity - m.free.size()});
  RC_ASSERT(pool.can_allocate(Pages{m.free.size()}));
  RC_ASSERT(!pool.can_allocate(Pages{m.free.size() + 1}));
  std::vector<std::uint32_t> list;
  for (const PageId id : pool.free_list()) list.push_back(id.index());
  RC_ASSERT(list == m.free_pages());
  for (std::uint32_t i = 0; i < m.capacity; ++i) {
    const PageId id{i};
    const PageHandle h = m.handle(i);
    RC_ASSERT(pool.ref_count(id) == m.refs[i]);
    RC_ASSERT(pool.is_free(id) == !m.live(i));
    RC_ASSERT(pool.is_live(h) == m.live(i));
    RC_ASSERT(!pool.is_live(PageHandle{id, h.generation + 1}));
    if (h.generation != 0) RC_ASSERT(!pool.is_live(PageHandle{id, h.generation - 1}));
    if (m.live(i)) RC_ASSERT(key(pool.handle(id)) == key(h));
  }
  RC_ASSERT(!pool.is_live(PageHandle{PageId{m.capacity}, 0}));
  RC_ASSERT(!pool.is_live(PageHandle{PageId::none(), 0}));
  RC_ASSERT(pool.check_invariants());
}

// Every command: compare the whole model before, run, compare the model's
// next state after (for a failure path: the unchanged model).
struct PoolCommand : rc::state::Command<PoolModel, PoolSut> {
  void run(const PoolModel& s0, PoolSut& sut) const final {
    sut.tally.record(typeid(*this));
    assert_matches(s0, sut.pool);
    exec(s0, sut.pool);
    assert_matches(nextState(s0), sut.pool);
  }
  virtual void exec(const PoolModel& s0, PagePool& pool) const = 0;
};

// A page drawn from `pages`; discards the command when there is none.
std::uint32_t pick(const std::vector<std::uint32_t>& pages) {
  RC_PRE(!pages.empty());
  return *rc::gen::elementOf(pages);
}

// ---- allocate ----------------------------------------------------------

struct AllocateOne final : PoolCommand {
  void checkPreconditions(const PoolModel& m) const override { RC_PRE(!m.free.empty()); }
  void apply(PoolModel& m) const override { m.take(m.free.front()); }
  void exec(const PoolModel& s0, PagePool& pool) const override {
    const std::optional<PageHandle> h = pool.allocate();
    if (!h) RC_FAIL("allocate() returned no page with pages free");
    RC_ASSERT(key(*h) == key(s0.handle(s0.free.front())));  // the head, with its generation
  }
  void show(std::ostream& os) const override { os << "allocate() -> head of the free list"; }
};

struct AllocateOneExhausted final : PoolCommand {
  void checkPreconditions(const PoolModel& m) const override { RC_PRE(m.free.empty()); }
  void exec(const PoolModel&, PagePool& pool) const override {
    RC_ASSERT(!pool.allocate().has_value());
  }
  void show(std::ostream& os) const override { os << "allocate() on an exhausted pool -> nullopt"; }
};

// allocate(n, out) with n <= free: true, the n head pages appended to `out`
// (which already holds `prefill` handles that must stay as they were).
struct AllocateMany final : PoolCommand {
  std::size_t n;
  std::size_t prefill = *rc::gen::inRange<std::size_t>(0, 3);
  explicit AllocateMany(const PoolModel& m)
      : n(*rc::gen::inRange<std::size_t>(0, m.free.size() + 1)) {}
  void checkPreconditions(const PoolModel& m) const override { RC_PRE(n <= m.free.size()); }
  void apply(PoolModel& m) const override {
    for (std::size_t k = 0; k < n; ++k) m.take(m.free.front());
  }
  void exec(const PoolModel& s0, PagePool& pool) const override {
    const PageHandle junk{PageId{12345}, 678};
    std::vector<PageHandle> out(prefill, junk);
    RC_ASSERT(pool.allocate(Pages{n}, out));
    std::vector<PageHandle> expected(prefill, junk);
    for (std::size_t k = 0; k < n; ++k) expected.push_back(s0.handle(s0.free[k]));
    RC_ASSERT(keys(out) == keys(expected));
  }
  void show(std::ostream& os) const override {
    os << "allocate(Pages{" << n << "}, out of " << prefill << " handles) -> true";
  }
};

// allocate(n, out) with n > free: false, nothing changes, `out` untouched.
struct AllocateTooMany final : PoolCommand {
  std::size_t n;
  std::size_t prefill = *rc::gen::inRange<std::size_t>(0, 3);
  explicit AllocateTooMany(const PoolModel& m)
      : n(m.free.size() + *rc::gen::inRange<std::size_t>(1, 4)) {}
  void checkPreconditions(const PoolModel& m) const override { RC_PRE(n > m.free.size()); }
  void exec(const PoolModel&, PagePool& pool) const override {
    const PageHandle junk{PageId{12345}, 678};
    std::vector<PageHandle> out(prefill, junk);
    RC_ASSERT(!pool.allocate(Pages{n}, out));
    RC_ASSERT(keys(out) == keys(std::vector<PageHandle>(prefill, junk)));
  }
  void show(std::ostream& os) const override {
    os << "allocate(Pages{" << n << "}, out of " << prefill << " handles) -> false";
  }
};

// ---- retain / release ----------------------------------------------------

struct Retain final : PoolCommand {
  std::uint32_t page;
  explicit Retain(const PoolModel& m) : page(pick(m.live_pages())) {}
  void checkPreconditions(const PoolModel& m) const override {
    RC_PRE(page < m.capacity && m.live(page));
  }
  void apply(PoolModel& m) const override { ++m.refs[page]; }
  void exec(const PoolModel& s0, PagePool& pool) const override { pool.retain(s0.handle(page)); }
  void show(std::ostream& os) const override { os << "retain(live page " << page << ")"; }
};

// release(live handle) returns true exactly at the last reference; the page
// then goes to the tail of the free list and its generation advances.
struct Release final : PoolCommand {
  std::uint32_t page;
  explicit Release(const PoolModel& m) : page(pick(m.live_pages())) {}
  void checkPreconditions(const PoolModel& m) const override {
    RC_PRE(page < m.capacity && m.live(page));
  }
  void apply(PoolModel& m) const override {
    if (--m.refs[page] == 0) {
      ++m.generation[page];
      m.free.push_back(page);
    }
  }
  void exec(const PoolModel& s0, PagePool& pool) const override {
    RC_ASSERT(pool.release(s0.handle(page)) == (s0.refs[page] == 1));
  }
  void show(std::ostream& os) const override { os << "release(live page " << page << ")"; }
};

// retain or release of a handle that names no live page of its generation:
// a free page (double release, never allocated, kept after its release) or a
// live page of another generation (kept after its page was handed out
// again). StalePage, nothing changes.
struct StaleHandle final : PoolCommand {
  bool release = *rc::gen::arbitrary<bool>();
  std::uint32_t page;
  std::uint32_t generation = 0;
  explicit StaleHandle(const PoolModel& m)
      : page(*rc::gen::inRange<std::uint32_t>(0, std::max<std::uint32_t>(m.capacity, 1))) {
    RC_PRE(page < m.capacity);
    std::vector<std::uint32_t> stale{m.generation[page] + 1};
    if (m.generation[page] != 0) stale.push_back(m.generation[page] - 1);
    if (!m.live(page)) stale.push_back(m.generation[page]);
    generation = *rc::gen::elementOf(stale);
  }
  void checkPreconditions(const PoolModel& m) const override {
    RC_PRE(page < m.capacity && (!m.live(page) || generation != m.generation[page]));
  }
  void exec(const PoolModel&, PagePool& pool) const override {
    const PageHandle h{PageId{page}, generation};
    RC_ASSERT(!pool.is_live(h));
    if (release) {
      RC_ASSERT_THROWS_AS(static_cast<void>(pool.release(h)), StalePage);
    } else {
      RC_ASSERT_THROWS_AS(pool.retain(h), StalePage);
    }
  }
  void show(std::ostream& os) const override {
    os << (release ? "release" : "retain") << "(stale handle {page " << page << ", gen "
       << generation << "}) -> StalePage";
  }
};

// ---- take ----------------------------------------------------------------

// take(id) of any free page (head, middle or tail): off the list, one reference.
struct TakeFree final : PoolCommand {
  std::uint32_t page;
  explicit TakeFree(const PoolModel& m) : page(pick(m.free_pages())) {}
  void checkPreconditions(const PoolModel& m) const override {
    RC_PRE(page < m.capacity && !m.live(page));
  }
  void apply(PoolModel& m) const override { m.take(page); }
  void exec(const PoolModel& s0, PagePool& pool) const override {
    RC_ASSERT(key(pool.take(PageId{page})) == key(s0.handle(page)));
  }
  void show(std::ostream& os) const override { os << "take(free page " << page << ")"; }
};

struct TakeLive final : PoolCommand {
  std::uint32_t page;
  explicit TakeLive(const PoolModel& m) : page(pick(m.live_pages())) {}
  void checkPreconditions(const PoolModel& m) const override {
    RC_PRE(page < m.capacity && m.live(page));
  }
  void exec(const PoolModel&, PagePool& pool) const override {
    RC_ASSERT_THROWS_AS(static_cast<void>(pool.take(PageId{page})), StalePage);
  }
  void show(std::ostream& os) const override {
    os << "take(live page " << page << ") -> StalePage";
  }
};

// handle(id) of a free page: StalePage.
struct HandleOfFree final : PoolCommand {
  std::uint32_t page;
  explicit HandleOfFree(const PoolModel& m) : page(pick(m.free_pages())) {}
  void checkPreconditions(const PoolModel& m) const override {
    RC_PRE(page < m.capacity && !m.live(page));
  }
  void exec(const PoolModel&, PagePool& pool) const override {
    RC_ASSERT_THROWS_AS(static_cast<void>(pool.handle(PageId{page})), StalePage);
  }
  void show(std::ostream& os) const override {
    os << "handle(free page " << page << ") -> StalePage";
  }
};

// ---- ids outside the pool ------------------------------------------------

// Every call that takes an id or a handle, with an id >= capacity (just past
// the end, further, the largest index, PageId::none()): std::out_of_range
// (is_live: false), nothing changes.
struct OutOfRange final : PoolCommand {
  enum class Op { take, ref_count, is_free, handle, retain, release };
  Op op =
      *rc::gen::element(Op::take, Op::ref_count, Op::is_free, Op::handle, Op::retain, Op::release);
  std::uint32_t id;
  explicit OutOfRange(const PoolModel& m)
      : id(*rc::gen::element(m.capacity, m.capacity + 1, m.capacity + 7, PageId::max_index,
                             PageId::none().index())) {}
  void checkPreconditions(const PoolModel& m) const override { RC_PRE(id >= m.capacity); }
  void exec(const PoolModel&, PagePool& pool) const override {
    const PageId pid{id};
    const PageHandle h{pid, 0};
    RC_ASSERT(!pool.is_live(h));
    switch (op) {
      case Op::take:
        RC_ASSERT_THROWS_AS(static_cast<void>(pool.take(pid)), std::out_of_range);
        break;
      case Op::ref_count:
        RC_ASSERT_THROWS_AS(static_cast<void>(pool.ref_count(pid)), std::out_of_range);
        break;
      case Op::is_free:
        RC_ASSERT_THROWS_AS(static_cast<void>(pool.is_free(pid)), std::out_of_range);
        break;
      case Op::handle:
        RC_ASSERT_THROWS_AS(static_cast<void>(pool.handle(pid)), std::out_of_range);
        break;
      case Op::retain:
        RC_ASSERT_THROWS_AS(pool.retain(h), std::out_of_range);
        break;
      case Op::release:
        RC_ASSERT_THROWS_AS(static_cast<void>(pool.release(h)), std::out_of_range);
        break;
    }
  }
  void show(std::ostream& os) const override {
    static constexpr std::array<const char*, 6> names = {"take",   "ref_count", "is_free",
                                                         "handle", "retain",    "release"};
    os << names.at(static_cast<std::size_t>(op)) << "(page " << id
       << ", outside the pool) -> out_of_range";
  }
};

// Weights: the state-changing commands twice, so that pools fill and drain.
using Commands = kvcache_state::CommandList<AllocateOne, AllocateOne, AllocateOneExhausted,
                                            AllocateMany, AllocateMany, AllocateTooMany, Retain,
                                            Retain, Release, Release, Release, StaleHandle,
                                            TakeFree, TakeFree, TakeLive, HandleOfFree, OutOfRange>;

void pool_property(kvcache_state::Tally& tally) {
  const auto capacity = *rc::gen::inRange<std::uint32_t>(0, kMaxCapacity + 1);
  const PoolModel initial(capacity);
  PoolSut sut(capacity, tally);
  rc::state::check(initial, sut, Commands::generator());
}

TEST(PagePoolState, MatchesModel) {
  kvcache_state::Tally tally;  // commands run, over all test cases
  kvcache_state::drive(
      "PagePoolState/MatchesModel", [&tally] { pool_property(tally); }, tally,
      kvcache_state::command_target(), Commands::kinds);
}

}  // namespace
