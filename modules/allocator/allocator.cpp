// Implementation of kvcache.allocator: see allocator.cppm for the design.
module;

#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <gsl/narrow>

#include "kvcache/contracts.hpp"

module kvcache.allocator;

namespace kvcache {

namespace {
std::string describe(PageHandle h) {
  return "page " + std::to_string(h.id.index()) + " (generation " +
         std::to_string(h.generation) + ")";
}
}  // namespace

// Audit level: the O(capacity) check_invariants() runs after the constructor
// and allocate(n), not after the O(1) single-page operations. The caches call
// those once per page and audit themselves once per public call; auditing
// every page operation made audited builds quadratic. tests/state checks the
// pool's invariants after every single operation instead.
PagePool::PagePool(Pages capacity) {
  if (capacity.count() > max_capacity) {
    throw std::invalid_argument("kvcache: PagePool: " + std::to_string(capacity.count()) +
                                " pages is more than the " + std::to_string(max_capacity) +
                                " a PageId can name");
  }
  const auto n = gsl::narrow<std::uint32_t>(capacity.count());
  slots_.resize(n);
  for (std::uint32_t i = 0; i < n; ++i) push_back(i);
  KVCACHE_AUDIT(check_invariants());
}

void PagePool::unlink(std::uint32_t i) noexcept {
  Slot& s = slots_[i];
  if (s.prev == nil) {
    head_ = s.next;
  } else {
    slots_[s.prev].next = s.next;
  }
  if (s.next == nil) {
    tail_ = s.prev;
  } else {
    slots_[s.next].prev = s.prev;
  }
  s.prev = nil;
  s.next = nil;
  --free_count_;
}

void PagePool::push_back(std::uint32_t i) noexcept {
  Slot& s = slots_[i];
  s.prev = tail_;
  s.next = nil;
  if (tail_ == nil) {
    head_ = i;
  } else {
    slots_[tail_].next = i;
  }
  tail_ = i;
  ++free_count_;
}

PageHandle PagePool::pop_front() noexcept {
  KVCACHE_EXPECTS(head_ != nil);
  const std::uint32_t i = head_;
  unlink(i);
  Slot& s = slots_[i];
  KVCACHE_ASSERT(s.refs == 0);
  s.refs = 1;
  return PageHandle{PageId{i}, s.generation};
}

std::optional<PageHandle> PagePool::allocate() noexcept {
  if (free_count_ == 0) return std::nullopt;
  PageHandle h = pop_front();
  return h;
}

bool PagePool::allocate(Pages n, std::vector<PageHandle>& out) {
  if (n.count() > free_count_) return false;  // INV-POOL-4: decided before any change
  // The only step that can throw comes before the first change.
  out.reserve(out.size() + gsl::narrow<std::size_t>(n.count()));
  for (std::uint64_t k = 0; k < n.count(); ++k) out.push_back(pop_front());
  KVCACHE_AUDIT(check_invariants());
  return true;
}

std::size_t PagePool::index_of(PageId id) const {
  const std::uint64_t i = static_cast<std::uint64_t>(id);
  if (i >= slots_.size()) {
    throw std::out_of_range("kvcache: PagePool: page " + std::to_string(i) +
                            " is not in a pool of " + std::to_string(slots_.size()) + " pages");
  }
  return static_cast<std::size_t>(i);
}

const PagePool::Slot& PagePool::live_slot(PageHandle h, const char* what) const {
  const Slot& s = slots_[index_of(h.id)];
  if (s.refs == 0) {
    throw StalePage(std::string("kvcache: PagePool::") + what + ": " + describe(h) +
                    " is free (double release, or a handle kept after its release)");
  }
  if (s.generation != h.generation) {
    throw StalePage(std::string("kvcache: PagePool::") + what + ": " + describe(h) +
                    " is stale: the page was freed and handed out again (now generation " +
                    std::to_string(s.generation) + ")");
  }
  return s;
}

void PagePool::retain(PageHandle h) {
  const Slot& s = live_slot(h, "retain");
  if (s.refs == std::numeric_limits<std::uint32_t>::max()) {
    throw std::overflow_error("kvcache: PagePool::retain: " + describe(h) +
                              " already has 2^32 - 1 references");
  }
  ++slots_[h.id.index()].refs;
}

bool PagePool::release(PageHandle h) {
  static_cast<void>(live_slot(h, "release"));
  Slot& s = slots_[h.id.index()];
  if (--s.refs != 0) return false;
  ++s.generation;  // every handle of this page is stale from now on (INV-POOL-3)
  push_back(h.id.index());
  return true;
}

PageHandle PagePool::take(PageId id) {
  const std::size_t i = index_of(id);
  Slot& s = slots_[i];
  if (s.refs != 0) {
    throw StalePage("kvcache: PagePool::take: page " + std::to_string(i) + " is not free (" +
                    std::to_string(s.refs) + " references)");
  }
  unlink(static_cast<std::uint32_t>(i));
  s.refs = 1;
  return PageHandle{id, s.generation};
}

std::uint32_t PagePool::ref_count(PageId id) const { return slots_[index_of(id)].refs; }

PageHandle PagePool::handle(PageId id) const {
  const Slot& s = slots_[index_of(id)];
  if (s.refs == 0) {
    throw StalePage("kvcache: PagePool::handle: page " + std::to_string(id.index()) +
                    " is free");
  }
  return PageHandle{id, s.generation};
}

bool PagePool::is_live(PageHandle h) const noexcept {
  const std::uint64_t i = static_cast<std::uint64_t>(h.id);
  return i < slots_.size() && slots_[i].refs != 0 && slots_[i].generation == h.generation;
}

std::vector<PageId> PagePool::free_list() const {
  std::vector<PageId> out;
  out.reserve(gsl::narrow<std::size_t>(free_count_));
  for (std::uint32_t i = head_; i != nil && out.size() <= slots_.size(); i = slots_[i].next) {
    out.emplace_back(i);
  }
  return out;
}

bool PagePool::check_invariants() const {
  // INV-POOL-2: walk the list forwards, at most capacity steps.
  std::vector<bool> on_list(slots_.size(), false);
  std::uint64_t walked = 0;
  std::uint32_t prev = nil;
  for (std::uint32_t i = head_; i != nil; i = slots_[i].next) {
    if (i >= slots_.size() || on_list[i] || walked == slots_.size()) return false;
    if (slots_[i].refs != 0 || slots_[i].prev != prev) return false;
    on_list[i] = true;
    prev = i;
    ++walked;
  }
  if (prev != tail_ || walked != free_count_) return false;
  // INV-POOL-1 and the other half of INV-POOL-2: every page with no
  // reference is on the list, every page on it has none.
  std::uint64_t live = 0;
  for (std::size_t i = 0; i < slots_.size(); ++i) {
    if (slots_[i].refs == 0) {
      if (!on_list[i]) return false;
    } else {
      ++live;
    }
  }
  return live + free_count_ == slots_.size();
}

}  // namespace kvcache
