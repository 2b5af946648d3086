// kvcache.allocator: the page pool. Fixed number of pages, a free list, and a
// reference count per page. It knows nothing of layers, tokens or requests:
// the paged cache and the prefix registry stand on it.
//
// Data layout: one 16-byte `Slot` per page in a vector indexed by page index:
// the reference count, a generation, and the prev/next links of an intrusive
// doubly linked free list. The free list is LRU ordered: `allocate` takes
// from the head (the page freed longest ago, or never used), a page whose last
// reference goes returns to the tail. Never-used pages sit at the head in
// index order, so a fresh pool hands out pages 0, 1, 2, ... The links are
// doubly linked so that a later layer can take a page out of the middle of the
// free list in O(1) (`take`), which prefix caching by content needs.
//
// Handles: `allocate` returns `PageHandle`s, a page id plus the page's
// generation. The generation advances each time the page returns to the free
// list, so a handle kept after its page was freed (and perhaps handed to
// someone else) is stale: `retain` and `release` detect it and throw
// StalePage instead of corrupting another holder's count. A double release is
// the same mistake and is caught the same way. (The generation is 32 bits: a
// handle that is stale by an exact multiple of 2^32 frees is not detected.)
//
// Cost: allocate and release are O(1) per page; `allocate(n, out)` is
// all-or-nothing: it checks the free count first, so a failure changes
// nothing. `check_invariants()` is O(pages).
//
// Thread safety: not thread-safe; one owner serialises every call.
module;

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

export module kvcache.allocator;

import kvcache.units;
import kvcache.errors;

export namespace kvcache {

// A page id together with the generation it was handed out in.
struct PageHandle {
  PageId id;
  std::uint32_t generation = 0;

  friend constexpr bool operator==(const PageHandle&, const PageHandle&) noexcept = default;
};

class PagePool {
 public:
  // The largest pool a PageId can name.
  static constexpr std::uint64_t max_capacity = std::uint64_t{PageId::max_index} + 1;

  // A pool of `capacity` pages, all free. Throws std::invalid_argument when
  // capacity exceeds max_capacity.
  explicit PagePool(Pages capacity);

  [[nodiscard]] Pages capacity() const noexcept { return Pages{slots_.size()}; }
  [[nodiscard]] Pages free_pages() const noexcept { return Pages{free_count_}; }
  // Pages with at least one reference.
  [[nodiscard]] Pages live_pages() const noexcept {
    return Pages{slots_.size() - free_count_};
  }
  [[nodiscard]] bool can_allocate(Pages n) const noexcept { return n.count() <= free_count_; }

  // Takes the page at the head of the free list with one reference, or
  // nothing when the pool is exhausted. O(1).
  [[nodiscard]] std::optional<PageHandle> allocate() noexcept;

  // All-or-nothing: appends `n` fresh handles (one reference each) to `out`
  // and returns true, or returns false and changes nothing when fewer than `n`
  // pages are free. Throws std::bad_alloc only if `out` cannot grow, and then
  // changes nothing either. O(n).
  [[nodiscard]] bool allocate(Pages n, std::vector<PageHandle>& out);

  // Adds a reference to a live page. Throws std::out_of_range for a page
  // outside the pool, StalePage when `h` does not name a live page of its
  // generation, std::overflow_error at 2^32 - 1 references; each changes nothing.
  void retain(PageHandle h);

  // Drops one reference. Returns true when that was the last one and the page
  // went back to the tail of the free list. Throws std::out_of_range for a
  // page outside the pool, StalePage for a stale handle or a double release;
  // each changes nothing.
  bool release(PageHandle h);

  // Takes a specific free page out of the free list with one reference, O(1).
  // Throws StalePage when the page is not free, std::out_of_range when it is
  // not in the pool.
  PageHandle take(PageId id);

  // Queries. Each throws std::out_of_range for an id outside the pool.
  [[nodiscard]] std::uint32_t ref_count(PageId id) const;
  [[nodiscard]] bool is_free(PageId id) const { return ref_count(id) == 0; }
  // The current handle of a live page; StalePage when the page is free.
  [[nodiscard]] PageHandle handle(PageId id) const;
  // True when `h` names a live page of its generation.
  [[nodiscard]] bool is_live(PageHandle h) const noexcept;

  // The free list from head (next to be allocated) to tail. O(pages).
  [[nodiscard]] std::vector<PageId> free_list() const;

  // O(pages) check of INV-POOL-*; true when all hold.
  [[nodiscard]] bool check_invariants() const;

 private:
  static constexpr std::uint32_t nil = PageId::max_index + 1;  // no page

  struct Slot {
    std::uint32_t refs = 0;        // 0: on the free list
    std::uint32_t generation = 0;  // advances on every return to the free list
    std::uint32_t prev = nil;      // free-list links; meaningful only when refs == 0
    std::uint32_t next = nil;
  };

  [[nodiscard]] std::size_t index_of(PageId id) const;  // throws std::out_of_range
  [[nodiscard]] const Slot& live_slot(PageHandle h, const char* what) const;  // throws StalePage
  void unlink(std::uint32_t i) noexcept;
  void push_back(std::uint32_t i) noexcept;
  [[nodiscard]] PageHandle pop_front() noexcept;

  // Invariants:
  //   INV-POOL-1  free_count_ + live pages == capacity
  //   INV-POOL-2  a page is on the free list exactly when its refs == 0; the
  //               list holds each such page once, linked both ways, from head_
  //               to tail_, free_count_ long
  //   INV-POOL-3  a handle is accepted only while refs > 0 and its generation
  //               equals the page's (stale and double releases are rejected)
  //   INV-POOL-4  allocation is all-or-nothing: a failed allocate changes nothing
  std::vector<Slot> slots_;
  std::uint32_t head_ = nil;
  std::uint32_t tail_ = nil;
  std::uint64_t free_count_ = 0;
};

}  // namespace kvcache
