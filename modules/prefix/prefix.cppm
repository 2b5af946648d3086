// kvcache.prefix: the prefix registry used by PagedKVCache, and the
// reference-holding types through which every page reference is taken.
//
// Holders. A page of the pool is held by block-table entries of requests
// and, at most once, by the registry (when it belongs to a registered
// prefix). Its pool reference count is exactly the number of its holders
// (INV-REF-1). Request references live in `PageList`s, move-only lists that
// release every page they hold in their destructor (tail first), so dropping
// a request cannot leak a page or release one twice: there is no manual
// decrement anywhere in the cache. Registry references live in the registry's
// `Prefix` entries and are dropped only by `evict`.
//
// Cached pages. A page held by the registry and by no request is *cached*:
// it keeps a prefix's KV bytes for the next request with that hash, and it is
// what eviction can free. The registry counts cached pages, in total and per
// prefix, at every reference transition (O(1)), so
//     free + used + cached == total       (INV-REF-2)
// is maintained, not recomputed; used = pages with at least one request
// holder.
//
// Eviction. Prefixes with at least one cached page sit on an intrusive LRU
// list, least recently touched first (registration, a hit, or a page becoming
// cached all touch a prefix). Making room for `n` pages evicts from the front
// until n pages are free. Callers first check that free + evictable pages
// cover the need, so a failing allocation evicts nothing (INV-REF-4), and a
// prefix being reused by the allocating call is excluded from both the count
// and the eviction (INV-REF-5). No per-allocation scan of prefixes: eviction
// costs O(pages freed), each list update O(1).
//
// Thread safety: not thread-safe; owned by one PagedKVCache.
module;

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

export module kvcache.prefix;

import kvcache.units;
import kvcache.errors;
import kvcache.allocator;

export namespace kvcache {

class PrefixRegistry;

// Cumulative counters of the registry (never reset, never overwritten).
struct PrefixCounters {
  std::uint64_t hits = 0;            // allocations whose prefix hash was registered
  std::uint64_t misses = 0;          // allocations that registered a new prefix
  std::uint64_t tokens_saved = 0;    // tokens (over layers) served from shared pages
  std::uint64_t pages_saved = 0;     // pages shared instead of allocated
  std::uint64_t cow_copies = 0;      // pages copied on write
  std::uint64_t prefixes_evicted = 0;
  std::uint64_t pages_evicted = 0;   // cached pages freed by evicting prefixes
};

// An ordered list of page references owned by one holder (a request's block
// table for one layer). Move-only; the destructor releases every page it holds,
// last page first. Its ids are contiguous: `ids()` is a block table.
class PageList {
 public:
  PageList() noexcept = default;
  explicit PageList(PrefixRegistry& registry) noexcept : registry_(&registry) {}
  PageList(PageList&& other) noexcept
      : registry_(other.registry_), ids_(std::exchange(other.ids_, {})) {}
  PageList& operator=(PageList&& other) noexcept {
    if (this != &other) {
      clear();
      registry_ = other.registry_;
      ids_ = std::exchange(other.ids_, {});
    }
    return *this;
  }
  PageList(const PageList&) = delete;
  PageList& operator=(const PageList&) = delete;
  ~PageList() { clear(); }

  [[nodiscard]] std::span<const PageId> ids() const noexcept { return ids_; }
  [[nodiscard]] std::size_t size() const noexcept { return ids_.size(); }
  [[nodiscard]] bool empty() const noexcept { return ids_.empty(); }
  [[nodiscard]] PageId back() const noexcept { return ids_.back(); }
  [[nodiscard]] PageId operator[](std::size_t i) const noexcept { return ids_[i]; }

  // Makes room for `n` more ids (may throw std::bad_alloc; no other change),
  // growing geometrically.
  void reserve_more(std::size_t n);
  // Adopts a reference the caller already took (from PrefixRegistry::take or
  // ::retain). REQUIRES: room was reserved (noexcept).
  void adopt(PageId page) noexcept;
  // Takes a new reference to `page` and appends it. REQUIRES: room reserved.
  void share(PageId page) noexcept;
  // Replaces entry i by an adopted reference, releasing the old one.
  void replace(std::size_t i, PageId adopted) noexcept;
  // Releases every page, last first.
  void clear() noexcept;

 private:
  PrefixRegistry* registry_ = nullptr;
  std::vector<PageId> ids_;
};

// The registry: page reference bookkeeping over a PagePool plus the
// registered prefixes and their LRU.
class PrefixRegistry {
 public:
  struct Prefix {
    std::string hash;
    Tokens tokens;               // prefix length
    std::size_t pages_per_layer = 0;
    std::vector<PageId> pages;   // registry references, layer-major
    std::uint64_t registrant = 0;  // serial of the registering request (never reused)
    std::uint64_t cached = 0;    // of `pages`, those no request holds
    Prefix* lru_prev = nullptr;  // on the LRU list iff cached > 0
    Prefix* lru_next = nullptr;
    bool on_lru = false;
  };

  explicit PrefixRegistry(Pages capacity) : pool_(capacity), owner_(pool_size(capacity), nullptr) {}
  PrefixRegistry(const PrefixRegistry&) = delete;
  PrefixRegistry& operator=(const PrefixRegistry&) = delete;
  PrefixRegistry(PrefixRegistry&&) = delete;
  PrefixRegistry& operator=(PrefixRegistry&&) = delete;
  ~PrefixRegistry() = default;

  [[nodiscard]] const PagePool& pool() const noexcept { return pool_; }
  [[nodiscard]] Pages total_pages() const noexcept { return pool_.capacity(); }
  [[nodiscard]] Pages free_pages() const noexcept { return pool_.free_pages(); }
  [[nodiscard]] Pages cached_pages() const noexcept { return Pages{cached_}; }
  [[nodiscard]] Pages used_pages() const noexcept {
    return Pages{pool_.live_pages().count() - cached_};
  }
  // Request references in all PageLists (a page held by k requests counts k).
  [[nodiscard]] std::uint64_t request_refs() const noexcept { return request_refs_; }
  [[nodiscard]] const PrefixCounters& counters() const noexcept { return counters_; }
  [[nodiscard]] PrefixCounters& counters() noexcept { return counters_; }
  [[nodiscard]] std::size_t num_prefixes() const noexcept { return prefixes_.size(); }

  // Page references (used by PageList and the cache). All O(1), noexcept.
  // REQUIRES (take): a free page exists.
  [[nodiscard]] PageId take() noexcept;
  // REQUIRES: the page is live and has fewer than 2^32 - 1 references.
  void retain(PageId page) noexcept;
  void release(PageId page) noexcept;  // REQUIRES: the caller holds a reference

  // Request holders of a live page: its references minus the registry's.
  [[nodiscard]] std::uint32_t request_holders(PageId page) const noexcept;
  // The prefix that holds `page`, or nullptr.
  [[nodiscard]] const Prefix* owner(PageId page) const noexcept { return owner_[page.index()]; }
  // Copy-on-write rule: may request `serial` write `page` in place? Only when
  // no other request holds it and, if the registry holds it, `serial`
  // registered it.
  [[nodiscard]] bool writable_by(PageId page, std::uint64_t serial) const noexcept;

  // Prefixes.
  [[nodiscard]] Prefix* find(std::string_view hash) noexcept;
  [[nodiscard]] const Prefix* find(std::string_view hash) const noexcept;
  // Creates an entry with no pages yet (may throw std::bad_alloc; nothing
  // else changes). REQUIRES: `hash` is not registered.
  Prefix& prepare(std::string_view hash, Tokens tokens, std::size_t layers,
                  std::size_t pages_per_layer, std::uint64_t registrant);
  // Removes an entry made by prepare that got no pages (undo). noexcept.
  void unprepare(Prefix& p) noexcept;
  // Gives the registry a reference to `page` as part of `p`. noexcept.
  // REQUIRES: room reserved by prepare, page live and not owned.
  void hold(Prefix& p, PageId page) noexcept;
  // Marks `p` as used now (LRU). noexcept.
  void touch(Prefix& p) noexcept;

  // Pages that evicting every prefix except `keep` would free.
  [[nodiscard]] std::uint64_t evictable_except(const Prefix* keep) const noexcept {
    return cached_ - (keep == nullptr ? 0 : keep->cached);
  }
  // Evicts LRU prefixes (never `keep`) until `n` pages are free.
  // REQUIRES: free + evictable_except(keep) >= n.
  void make_room(std::uint64_t n, const Prefix* keep) noexcept;
  // Evicts the least recently used evictable prefix. REQUIRES: cached > 0.
  void evict_lru() noexcept;
  // Drops every registry reference of `p` and forgets it. noexcept.
  void evict(Prefix& p) noexcept;
  // Evicts all prefixes; returns how many.
  std::size_t clear() noexcept;

  // O(pages + prefixes) check of INV-REF-* against the given request
  // holder counts (per page, from the cache's block tables).
  [[nodiscard]] bool check_invariants(std::span<const std::uint64_t> request_holders) const;

 private:
  static std::size_t pool_size(Pages capacity);
  void lru_unlink(Prefix& p) noexcept;
  void lru_push_back(Prefix& p) noexcept;
  void page_became_cached(Prefix& p) noexcept;
  void page_left_cache(Prefix& p) noexcept;

  struct HashOf {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const noexcept {
      return std::hash<std::string_view>{}(s);
    }
  };

  friend class PageList;  // keeps request_refs_

  // Invariants:
  //   INV-REF-1  pool ref_count(p) == request holders(p) + (owner_[p] ? 1 : 0)
  //   INV-REF-2  cached_ == #pages with owner_ set and no request holder ==
  //              sum of Prefix::cached; free + used + cached == total
  //   INV-REF-3  a prefix is on the LRU list iff its cached count is > 0;
  //              owner_[p] == &prefix iff p is in prefix.pages
  //   INV-REF-4  a failed allocation evicts nothing (callers check
  //              free + evictable_except first)
  //   INV-REF-5  eviction never takes a prefix the current call is reusing
  PagePool pool_;
  std::vector<Prefix*> owner_;  // per page: the prefix holding it, or nullptr
  std::unordered_map<std::string, std::unique_ptr<Prefix>, HashOf, std::equal_to<>> prefixes_;
  Prefix* lru_head_ = nullptr;  // least recently touched evictable prefix
  Prefix* lru_tail_ = nullptr;
  std::uint64_t cached_ = 0;
  std::uint64_t request_refs_ = 0;
  PrefixCounters counters_;
};

}  // namespace kvcache
