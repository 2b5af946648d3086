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
// Content blocks (automatic prefix caching). Besides named prefixes the
// registry holds *blocks*: one full page-sized run of a prompt's (or a
// decode's) token ids, stored in one page per layer, findable by a chained
// key (the previous block's key, the token ids, the salt; XXH3-64 from
// Debian's libxxhash). A block is the same kind of registry holder as a
// prefix: one registry reference per page, the same cached count, the same
// LRU list, the same eviction. A key match is confirmed before sharing: the
// candidate's token ids, salt and parent block (by serial, never reused) must
// equal the caller's, so a hash collision can never share wrong content, and
// a chain of confirmed parents means the whole prefix is equal. Every block
// stored or removed is recorded as a KvEvent for external KV-aware routers.
//
// Thread safety: not thread-safe; owned by one PagedKVCache.
module;

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
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

// A token id of the model's vocabulary (content-addressed prefix caching).
using TokenId = std::uint32_t;

// KV events: what a KV-aware router needs to mirror which content the cache
// holds. One event per content block (all of its layers), in order, each
// with a sequence number that increases by one per event over the cache's
// life (drained or not, so a router sees a gap when it missed some).
enum class KvEventKind : std::uint8_t {
  stored,       // a block became findable: key, parent_key, token range, salt
  removed,      // a block stopped being findable: key, reason
  all_cleared,  // clear_prefix_cache(): nothing content-addressed is left
};
enum class KvRemovalReason : std::uint8_t {
  evicted,  // the allocator needed its pages (least recently used first)
  cleared,  // an operator dropped it (clear_prefix_cache)
};
struct KvEvent {
  std::uint64_t seq = 0;
  KvEventKind kind = KvEventKind::stored;
  std::uint64_t key = 0;
  // stored: the previous block's key; empty for a prompt's first block.
  std::optional<std::uint64_t> parent_key;
  // stored: the block holds tokens [first_token, first_token + token_ids.size())
  // of the requests that share it.
  std::uint64_t first_token = 0;
  std::vector<TokenId> token_ids;
  std::string salt;
  KvRemovalReason reason = KvRemovalReason::evicted;  // removed
  friend bool operator==(const KvEvent&, const KvEvent&) = default;
};

// Cumulative counters of the registry (never reset, never overwritten).
struct PrefixCounters {
  std::uint64_t hits = 0;            // allocations whose prefix hash was registered
  std::uint64_t misses = 0;          // allocations that registered a new prefix
  std::uint64_t tokens_saved = 0;    // tokens (over layers) served from shared pages
  std::uint64_t pages_saved = 0;     // pages shared instead of allocated
  std::uint64_t cow_copies = 0;      // pages copied on write
  std::uint64_t prefixes_evicted = 0;
  std::uint64_t pages_evicted = 0;   // cached pages freed by evicting prefixes and blocks
  // Content-addressed allocations (allocate_paged with token ids):
  std::uint64_t content_prompt_tokens = 0;  // prompt tokens looked up
  std::uint64_t content_hit_tokens = 0;     // of those, found cached (cached_tokens)
  std::uint64_t blocks_stored = 0;          // blocks made findable
  std::uint64_t blocks_evicted = 0;         // blocks dropped to free their pages
  std::uint64_t blocks_duplicate = 0;       // full pages not keyed: an equal block existed
  friend bool operator==(const PrefixCounters&, const PrefixCounters&) = default;
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
  // A holder of registry references: a named prefix or a content block.
  struct Entry {
    enum class Kind : std::uint8_t { prefix, block };
    explicit Entry(Kind k) noexcept : kind(k) {}
    Kind kind;
    std::vector<PageId> pages;     // registry references, layer-major
    std::uint64_t registrant = 0;  // serial of the registering request (never reused)
    std::uint64_t cached = 0;      // of `pages`, those no request holds
    Entry* lru_prev = nullptr;     // on the LRU list iff cached > 0
    Entry* lru_next = nullptr;
    bool on_lru = false;
  };
  struct Prefix : Entry {
    Prefix() noexcept : Entry(Kind::prefix) {}
    std::string hash;
    Tokens tokens;               // prefix length
    std::size_t pages_per_layer = 0;
  };
  // One full page of content in every layer: pages[l] is layer l's page.
  struct Block : Entry {
    Block() noexcept : Entry(Kind::block) {}
    std::uint64_t key = 0;
    std::optional<std::uint64_t> parent_key;  // none for a first block
    std::uint64_t serial = 0;                 // unique, never reused
    std::uint64_t parent_serial = 0;          // 0: a first block
    std::uint64_t first_token = 0;
    std::vector<TokenId> tokens;              // page_size token ids
    std::string salt;
    std::optional<KvEvent> pending_event;     // its stored event, until stored()
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
  // The prefix that holds `page`, or nullptr (also for a block's page).
  [[nodiscard]] const Prefix* owner(PageId page) const noexcept {
    const Entry* e = owner_[page.index()];
    // NOLINTNEXTLINE(cppcoreguidelines-pro-type-static-cast-downcast): `kind` names the type
    return e != nullptr && e->kind == Entry::Kind::prefix ? static_cast<const Prefix*>(e) : nullptr;
  }
  // The content block that holds `page`, or nullptr.
  [[nodiscard]] const Block* block_owner(PageId page) const noexcept {
    const Entry* e = owner_[page.index()];
    // NOLINTNEXTLINE(cppcoreguidelines-pro-type-static-cast-downcast): `kind` names the type
    return e != nullptr && e->kind == Entry::Kind::block ? static_cast<const Block*>(e) : nullptr;
  }
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
  void hold(Entry& p, PageId page) noexcept;
  // Marks `p` as used now (LRU). noexcept.
  void touch(Entry& p) noexcept;

  // Content blocks.
  // The key of a block of `tokens` after a block keyed `parent` (none for
  // a first block), under `salt`: XXH3-64, chained. O(tokens).
  [[nodiscard]] std::uint64_t block_key(std::optional<std::uint64_t> parent, std::string_view salt,
                                        std::span<const TokenId> tokens) const noexcept;
  // The same with the salt's hash computed once per request (salt_hash).
  [[nodiscard]] std::uint64_t block_key(std::optional<std::uint64_t> parent,
                                        std::uint64_t salt_hash,
                                        std::span<const TokenId> tokens) const noexcept;
  [[nodiscard]] static std::uint64_t salt_hash(std::string_view salt) noexcept;
  // The block keyed `key` whose parent block is `parent_serial` (0: none),
  // whose token ids and salt are these, or nullptr. Candidates under the key
  // are confirmed by content: a collision is a miss. O(tokens) per candidate.
  [[nodiscard]] Block* find_block(std::uint64_t key, std::uint64_t parent_serial,
                                  std::span<const TokenId> tokens,
                                  std::string_view salt) noexcept;
  // Creates a findable block with no pages yet (throws std::bad_alloc,
  // changing nothing). Give it its pages with hold(), then call stored().
  Block& prepare_block(std::uint64_t key, std::optional<std::uint64_t> parent_key,
                       std::uint64_t parent_serial, std::uint64_t first_token,
                       std::span<const TokenId> tokens, std::string_view salt,
                       std::size_t layers, std::uint64_t registrant);
  // Removes a block made by prepare_block that got no pages (undo). noexcept.
  void unprepare_block(Block& b) noexcept;
  // Records the stored event of a block that got its pages. noexcept (room
  // reserved by reserve_events).
  void stored(Block& b) noexcept;
  [[nodiscard]] std::size_t num_blocks() const noexcept { return blocks_.size(); }

  // Events. Every call that may store or evict blocks first reserves room
  // for `stored` more events plus one per block that exists (the most it can
  // evict), so that recording is noexcept. Throws std::bad_alloc.
  void reserve_events(std::size_t stored);
  [[nodiscard]] std::vector<KvEvent> drain_events() noexcept { return std::exchange(events_, {}); }
  [[nodiscard]] std::size_t pending_events() const noexcept { return events_.size(); }
  void record_events(bool on) noexcept { record_events_ = on; }
  [[nodiscard]] bool records_events() const noexcept { return record_events_; }
  // Testing hook: every block key is the same constant, so every lookup has
  // to tell blocks apart by content (a forced collision).
  void force_key_collisions_for_testing(bool on) noexcept { collide_keys_ = on; }

  // Pages that evicting every entry except `keep` would free.
  [[nodiscard]] std::uint64_t evictable_except(const Entry* keep) const noexcept {
    return cached_ - (keep == nullptr ? 0 : keep->cached);
  }
  // Evicts LRU entries (never `keep`) until `n` pages are free.
  // REQUIRES: free + evictable_except(keep) >= n.
  void make_room(std::uint64_t n, const Entry* keep) noexcept;
  // Evicts the least recently used evictable entry. REQUIRES: cached > 0.
  void evict_lru() noexcept;
  // Drops every registry reference of `p` and forgets it. noexcept.
  void evict(Entry& p, KvRemovalReason why = KvRemovalReason::evicted) noexcept;
  // Drops every prefix and block (a `removed` event per block, reason
  // `cleared`, then one `all_cleared`); returns how many entries. Throws
  // std::bad_alloc (changing nothing) only when events cannot be recorded.
  std::size_t clear();

  // O(pages + prefixes) check of INV-REF-* against the given request
  // holder counts (per page, from the cache's block tables).
  [[nodiscard]] bool check_invariants(std::span<const std::uint64_t> request_holders) const;

 private:
  static std::size_t pool_size(Pages capacity);
  void lru_unlink(Entry& p) noexcept;
  void lru_push_back(Entry& p) noexcept;
  void page_became_cached(Entry& p) noexcept;
  void page_left_cache(Entry& p) noexcept;
  void record(KvEvent e) noexcept;
  void erase_block(const Block& b) noexcept;

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
  //   INV-CONT-1 a block holds one page per layer, is findable under its key
  //              exactly while it exists, and names a parent serial smaller
  //              than its own
  //   INV-CONT-2 events_ seq numbers increase by one
  PagePool pool_;
  std::vector<Entry*> owner_;  // per page: the prefix or block holding it, or nullptr
  std::unordered_map<std::string, std::unique_ptr<Prefix>, HashOf, std::equal_to<>> prefixes_;
  std::unordered_multimap<std::uint64_t, std::unique_ptr<Block>> blocks_;  // by key
  Entry* lru_head_ = nullptr;  // least recently touched evictable entry
  Entry* lru_tail_ = nullptr;
  std::vector<KvEvent> events_;
  std::uint64_t next_event_seq_ = 1;
  std::uint64_t next_block_serial_ = 1;
  bool record_events_ = true;
  bool collide_keys_ = false;
  std::uint64_t cached_ = 0;
  std::uint64_t request_refs_ = 0;
  PrefixCounters counters_;
};

}  // namespace kvcache
