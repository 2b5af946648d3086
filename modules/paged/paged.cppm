// kvcache.paged: PagedKVCache, per-layer pages taken on demand (PagedAttention).
//
// Pages are logical: a request's KV cache for one layer is a block table, an
// ordered list of page ids, and token t of that layer lives in page
// table[t / page_size], slot t % page_size. Pages come from one PagePool
// shared by all layers and all requests; a request takes ceil(prompt /
// page_size) pages per layer at allocation and one more page in a layer only
// when that layer's last page is full. Nothing is reserved for tokens that do
// not exist yet, so the only waste is the unfilled tail of each layer's last
// page (internal fragmentation), under one page per layer per request.
//
// Storage is separate from bookkeeping. In `Storage::host` mode the bytes live
// in one arena of total_pages * bytes_per_page, an anonymous mapping committed
// lazily by the OS (see kvcache.storage): building a cache with an 8 GiB
// budget touches none of it, and resident memory grows with the pages
// actually written. Page p of the arena is laid out like FlashInfer's NHD
// paged layout, [2][page_size][num_kv_heads][head_dim] elements:
//
//   arena + p * bytes_per_page
//     + 0                          K of slot 0, 1, ..., page_size - 1
//     + page_size * row            V of slot 0, 1, ..., page_size - 1
//   row = num_kv_heads * head_dim * dtype_bytes (kv_bytes_per_token_per_layer)
//
// (docs/design.md has the picture and the index formula a kernel would use.)
// A freed page is not cleared. Instead each page has a written mark: slots
// [0, written) hold bytes written by its holders, and a read of a slot at or
// past the mark returns a shared zero row. A page's mark is reset to 0 when
// the pool hands it out, in O(1), so allocation never pays for zeroing and no
// reader ever sees another request's stale bytes. Writing slot s past the
// mark zeroes the skipped slots [mark, s) first (bounded by the writer's own
// work). In `Storage::none` mode there is no arena: page ids and block tables
// only, for engines that keep the KV tensors on the GPU.
//
// Prefix sharing (kvcache.prefix): `allocate_paged(id, prompt, hash, n)`
// names the first n prompt tokens a prefix. The first request with a hash
// registers its first ceil(n / page_size) pages of every layer; later requests
// with the hash list those page ids in their own block tables (one more
// reference each) and take new pages only for the rest of their prompt. A
// prompt that continues inside the prefix's partial last page copies that
// page at allocation. Copy-on-write: a request writes a page in place only
// when no other request holds it and, if the registry holds it, that request
// registered it; any other write (append, write_kv) copies the page first.
// When its requests are gone a prefix's pages stay cached (counted in
// cached_pages) until an allocation needs them: then whole prefixes are
// evicted, least recently used first, and only when that makes the
// allocation succeed. `fork` shares every page of a request with a new one.
//
// Out of memory is all-or-nothing everywhere: every call that needs pages
// counts them first and takes them only when all are available; anything that
// can throw (vector growth, map nodes) happens before the first page is taken.
//
// Ownership: the cache owns its pool, arena and request table; block tables
// and get_kv views borrow them until the next mutating call.
// Thread safety: not thread-safe; an engine's scheduler serialises calls.
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
#include <vector>

export module kvcache.paged;

import kvcache.units;
import kvcache.config;
import kvcache.errors;
import kvcache.storage;
import kvcache.allocator;
import kvcache.prefix;

export namespace kvcache {

struct PagedStats {
  Pages total_pages;    // budget / bytes_per_page
  Pages free_pages;     // on the pool's free list
  Pages used_pages;     // referenced by at least one request
  Pages cached_pages;   // held only by the prefix registry (evictable)
  Bytes used_memory;    // used_pages * bytes_per_page
  std::size_t num_requests = 0;
  std::uint64_t prefix_hits = 0;
  std::uint64_t prefix_misses = 0;
  double utilization_pct = 0;  // used_pages / total_pages * 100 (0 for an empty pool)
  // Beyond the contract:
  Tokens stored_tokens;  // tokens held, summed over requests and layers
  Tokens page_size;
  Bytes bytes_per_page;
  std::size_t registered_prefixes = 0;  // prefixes the registry holds now
  PrefixCounters prefix;                // cumulative: hits, savings, copies, evictions
};

class PagedKVCache {
 public:
  // Throws std::invalid_argument for an invalid config or a zero page size,
  // std::overflow_error when a page's byte size overflows 64 bits, and
  // std::invalid_argument when the budget gives more pages than a PageId can
  // name. Throws std::bad_alloc when the arena's address space cannot be had.
  PagedKVCache(ModelConfig config, Bytes budget, Tokens page_size,
               Storage storage = Storage::host);
  // Movable, not copyable. Views and block tables of the moved-from cache
  // stay valid for the moved-to one (the storage does not move).
  PagedKVCache(PagedKVCache&&) noexcept = default;
  PagedKVCache& operator=(PagedKVCache&& other) noexcept;
  PagedKVCache(const PagedKVCache&) = delete;
  PagedKVCache& operator=(const PagedKVCache&) = delete;
  ~PagedKVCache() = default;

  // Takes ceil(prompt / page_size) pages in every layer, all-or-nothing. The
  // prompt's tokens count as stored at once (zero bytes until written).
  // Returns false, changing nothing, for a duplicate id, then when the pages
  // cannot be had. Throws std::overflow_error when the page count overflows.
  [[nodiscard]] bool allocate_paged(std::string_view id, Tokens prompt);

  // As above, the first `prefix_tokens` of the prompt being the prefix named
  // `prefix_hash`: a registered hash shares its pages (a hit), an unknown one
  // is registered by this request (a miss). Throws std::invalid_argument for
  // an empty hash, a prefix of 0 tokens or longer than the prompt, or a
  // registered hash with another length; then false for a duplicate id, then
  // false when the pages cannot be had even after evicting cached prefixes.
  [[nodiscard]] bool allocate_paged(std::string_view id, Tokens prompt,
                                    std::string_view prefix_hash, Tokens prefix_tokens);

  // ---- Automatic prefix caching by content (docs/prefix-caching.md) ----
  using TokenId = kvcache::TokenId;

  // Allocates a request whose prompt's token ids are known. Every full page
  // of the prompt is keyed by (the previous page's key, its token ids,
  // `salt`); the longest run of leading full pages already cached, confirmed
  // by content, is shared (one reference per page in every layer; a cached
  // page leaves the evictable set in O(1)); the rest is allocated and the
  // prompt's full pages become findable. At most prompt - 1 tokens are
  // shared: the engine always computes the last prompt token (its logits).
  // Requests with different salts never share. All-or-nothing: false,
  // changing nothing, for a duplicate id, then when the pages cannot be had
  // even after evicting cached pages (never the ones being shared).
  [[nodiscard]] bool allocate_paged(std::string_view id, std::span<const TokenId> prompt,
                                    std::string_view salt = {});
  // Leading prompt tokens found cached at allocation (their prefill can be
  // skipped): content hits; for a named prefix hit, the prefix's tokens; 0
  // otherwise. A fork's child has its parent's. Throws UnknownRequest.
  [[nodiscard]] Tokens cached_tokens(std::string_view id) const;
  // Appends `tokens` to every layer of a request allocated with token ids
  // (zero KV until write_kv), taking pages on demand; each page that becomes
  // full gets its key and becomes findable. All-or-nothing: false, changing
  // nothing, when the pages cannot be had. Throws UnknownRequest, then
  // std::logic_error for a request allocated without token ids.
  [[nodiscard]] bool append_token_ids(std::string_view id, std::span<const TokenId> tokens);
  // The KV events (content pages stored / removed, all cleared) since the
  // last drain, in order. Recorded until drained: drain them every step, or
  // turn recording off.
  [[nodiscard]] std::vector<KvEvent> drain_events() noexcept { return registry_->drain_events(); }
  // Beyond the issue: event recording on (default) or off; true when `id`
  // was allocated with token ids (or forked from one); the testing hook that
  // makes every key collide (lookups then rely on the content check alone).
  void record_events(bool on) noexcept { registry_->record_events(on); }
  [[nodiscard]] bool content_addressed(std::string_view id) const;
  void force_key_collisions_for_testing(bool on) noexcept {
    registry_->force_key_collisions_for_testing(on);
  }

  // The child shares every page of the parent (parallel sampling, beam
  // search); later writes copy on write. Throws UnknownRequest for an unknown
  // parent; returns false for an existing child id.
  [[nodiscard]] bool fork(std::string_view parent_id, std::string_view child_id);

  // Operators: drops the registry's references of one prefix (false when the
  // hash is not registered), or of all (returns how many). Pages that
  // requests still hold stay theirs.
  bool evict_prefix(std::string_view prefix_hash);
  std::size_t clear_prefix_cache();
  [[nodiscard]] bool has_prefix(std::string_view prefix_hash) const noexcept;

  // Appends one token at the end of `layer`, taking a page only when the
  // layer's last page is full. Returns false, changing nothing, when no page
  // can be had. Throws (in this order) std::logic_error in Storage::none mode
  // (data overloads), std::out_of_range for a bad layer, ShapeMismatch,
  // UnknownRequest. The overload without data appends a zero token (in both
  // storage modes).
  [[nodiscard]] bool append_token_paged(std::string_view id, std::size_t layer,
                                        std::span<const std::byte> key,
                                        std::span<const std::byte> value);
  [[nodiscard]] bool append_token_paged(std::string_view id, std::size_t layer,
                                        std::span<const float> key, std::span<const float> value);
  [[nodiscard]] bool append_token_paged(std::string_view id, std::size_t layer);

  // One decode step: appends a zero token to every layer, all-or-nothing
  // (up to num_layers pages). Throws UnknownRequest.
  [[nodiscard]] bool append_token_all_layers(std::string_view id);

  // Overwrites the token at `position` of `layer`. Throws std::logic_error in
  // Storage::none mode, std::out_of_range for a bad layer, ShapeMismatch,
  // UnknownRequest, then std::out_of_range when position >= the layer's tokens.
  void write_kv(std::string_view id, std::size_t layer, std::size_t position,
                std::span<const std::byte> key, std::span<const std::byte> value);
  void write_kv(std::string_view id, std::size_t layer, std::size_t position,
                std::span<const float> key, std::span<const float> value);
  void write_kv(std::string_view id, std::size_t layer, Tokens position,
                std::span<const std::byte> key, std::span<const std::byte> value) {
    write_kv(id, layer, to_index(position), key, value);
  }
  void write_kv(std::string_view id, std::size_t layer, Tokens position,
                std::span<const float> key, std::span<const float> value) {
    write_kv(id, layer, to_index(position), key, value);
  }

  // The layer's tokens in order, gathered across its pages. Throws
  // std::logic_error in Storage::none mode, std::out_of_range for a bad
  // layer, UnknownRequest. Invalidated by the next mutating call.
  [[nodiscard]] KVView get_kv(std::string_view id, std::size_t layer) const;

  // Returns every page of `id` (last page of each layer first, so a request's
  // tail pages reach the free list before its head). Throws UnknownRequest.
  void free(std::string_view id);

  // The request's page ids for `layer`, in token order: what an attention
  // kernel consumes. Valid until the next mutating call. Throws
  // std::out_of_range for a bad layer, UnknownRequest.
  [[nodiscard]] std::span<const PageId> block_table(std::string_view id, std::size_t layer) const;

  // Physical pages in the request's block tables, over all layers.
  [[nodiscard]] Pages pages_held(std::string_view id) const;

  // Tokens held by the request pages / (those pages * page_size), each
  // physical page once; 0.0 when no request holds a page. In [0, 1].
  [[nodiscard]] double memory_efficiency() const;

  [[nodiscard]] PagedStats stats() const noexcept;

  // Admission helpers for a scheduler.
  // Pages a new request of `prompt` tokens takes: num_layers * ceil(prompt / page_size).
  [[nodiscard]] Pages pages_needed_to_allocate(Tokens prompt) const;
  // Free or evictable pages the next append_token_all_layers(id) needs: one
  // per layer whose last page is full (or that holds no page) or shared with
  // another request (copy on write); at least 1 when a layer's last page is
  // shared only with the registry (its copy leaves the old page cached, so
  // it consumes nothing net, but needs a page to exist). Throws UnknownRequest.
  [[nodiscard]] Pages pages_needed_to_append(std::string_view id) const;
  // True when allocate_paged of a new id with `prompt` tokens would succeed
  // now (counting pages that evicting cached prefixes would free).
  [[nodiscard]] bool can_allocate(Tokens prompt) const;
  // The same for a prompt whose first `prefix_tokens` are the prefix
  // `prefix_hash`: a registered prefix needs only the pages past it (and a
  // copy of a partial last prefix page the prompt continues in), and is not
  // counted as evictable. Throws like allocate_paged for bad prefix arguments.
  [[nodiscard]] Pages pages_needed_to_allocate(Tokens prompt, std::string_view prefix_hash,
                                               Tokens prefix_tokens) const;
  [[nodiscard]] bool can_allocate(Tokens prompt, std::string_view prefix_hash,
                                  Tokens prefix_tokens) const;
  // now / later (fits in the empty cache) / never (larger than the pool).
  [[nodiscard]] Admission admission(Tokens prompt) const;
  // The same with a prefix. A hit that continues inside a partial prefix page
  // keeps the registered page and a copy: it is `never` when that cannot fit
  // beside the prefix in an otherwise empty cache (evict_prefix, then
  // allocate it as a miss).
  [[nodiscard]] Admission admission(Tokens prompt, std::string_view prefix_hash,
                                    Tokens prefix_tokens) const;
  // The longest prompt that fits in the empty cache.
  [[nodiscard]] Tokens max_prompt_tokens() const noexcept;

  // Queries beyond the contract.
  [[nodiscard]] bool contains(std::string_view id) const noexcept;
  [[nodiscard]] Tokens tokens(std::string_view id, std::size_t layer) const;
  [[nodiscard]] std::size_t num_requests() const noexcept { return requests_.size(); }
  [[nodiscard]] const ModelConfig& config() const noexcept { return config_; }
  [[nodiscard]] Tokens page_size() const noexcept { return page_size_; }
  [[nodiscard]] Bytes bytes_per_page() const noexcept { return bytes_per_page_; }
  [[nodiscard]] Pages total_pages() const noexcept { return registry_->total_pages(); }
  [[nodiscard]] Storage storage() const noexcept { return storage_; }
  [[nodiscard]] const PagePool& pool() const noexcept { return registry_->pool(); }
  [[nodiscard]] const PrefixRegistry& registry() const noexcept { return *registry_; }
  // Live request ids, in no particular order.
  [[nodiscard]] std::vector<std::string> request_ids() const;

  // O(pages + requests * layers) check of INV-PAGED-*; true when all hold.
  [[nodiscard]] bool check_invariants() const;

 private:
  // A content-addressed request's key chain (allocate_paged with token ids).
  struct Content {
    std::string salt;
    std::uint64_t salt_hash = 0;            // PrefixRegistry::salt_hash(salt)
    std::vector<TokenId> tail;              // token ids past the last full page
    std::optional<std::uint64_t> last_key;  // key of the last full page
    std::uint64_t last_serial = 0;          // block the next full page names as parent
  };
  struct Request {
    std::vector<PageList> tables;       // per layer, token order; releases on destruction
    std::vector<std::uint64_t> tokens;  // per layer
    std::uint64_t serial = 0;           // unique, never reused (copy-on-write rule)
    std::uint64_t cached_tokens = 0;    // found cached at allocation
    std::optional<Content> content;     // set: allocated with token ids
  };
  struct IdHash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const noexcept {
      return std::hash<std::string_view>{}(s);
    }
  };
  using Map = std::unordered_map<std::string, Request, IdHash, std::equal_to<>>;

  static std::size_t to_index(Tokens t);
  [[nodiscard]] const Request& find(const char* where, std::string_view id) const;
  [[nodiscard]] Request& find(const char* where, std::string_view id);
  void require_host(const char* where) const;
  [[nodiscard]] Request make_request(Tokens prompt) const;
  [[nodiscard]] PageId take_page() noexcept;
  [[nodiscard]] PageId copy_page(PageId from, std::size_t slots) noexcept;
  [[nodiscard]] std::byte* slot_key(PageId page, std::size_t slot) noexcept;
  [[nodiscard]] std::byte* slot_value(PageId page, std::size_t slot) noexcept;
  void write_slot(PageId page, std::size_t slot, std::span<const std::byte> key,
                  std::span<const std::byte> value) noexcept;
  void zero_slot(PageId page, std::size_t slot) noexcept;
  [[nodiscard]] bool layer_last_page_full(const Request& r, std::size_t layer) const noexcept;
  [[nodiscard]] std::size_t slots_used(const Request& r, std::size_t layer,
                                       std::size_t index) const noexcept;
  enum class AppendNeed : std::uint8_t { none, swap, page };
  [[nodiscard]] AppendNeed append_need(const Request& r, std::size_t layer) const noexcept;
  [[nodiscard]] std::uint64_t step_need(const Request& r) const noexcept;
  // The argument checks of allocate_paged with a prefix; the registered
  // prefix or nullptr.
  [[nodiscard]] PrefixRegistry::Prefix* check_prefix_args(const char* where, std::string_view id,
                                                          Tokens prompt,
                                                          std::string_view prefix_hash,
                                                          Tokens prefix_tokens) const;
  struct HitPlan {
    std::uint64_t rem = 0;     // slots of a partial last prefix page (0: none)
    bool copy_partial = false;  // the prompt continues inside it: copy it
    std::uint64_t shared = 0;  // prefix pages listed, per layer
    std::uint64_t fresh = 0;   // new pages past the prefix, per layer
    std::uint64_t need = 0;    // pages taken in all: layers * (fresh + copy)
  };
  [[nodiscard]] HitPlan plan_hit(Tokens prompt, Tokens prefix_tokens) const noexcept;
  // num_layers * ceil(prompt / page_size); std::overflow_error naming `id`.
  [[nodiscard]] Pages pages_to_allocate(const char* where, std::string_view id,
                                        Tokens prompt) const;
  [[nodiscard]] bool make_writable(Request& r, std::size_t layer, std::size_t index) noexcept;
  [[nodiscard]] bool append_one(Request& r, std::size_t layer, std::span<const std::byte> key,
                                std::span<const std::byte> value);
  [[nodiscard]] double scan_efficiency() const;
  void refuse_content(const char* where, std::string_view id, const Request& r) const;
  // Walks `ids`, the token ids that follow token `from` of a request whose
  // key chain is `chain`, and prepares a block for each page they fill
  // (nullptr in `out` where an equal block already exists: it is reused as
  // the parent, not duplicated). Updates `chain` to the state after `ids`.
  // Throws std::bad_alloc, undoing every block it prepared and leaving
  // `chain` as it was.
  void prepare_blocks(Content& chain, std::uint64_t from, std::span<const TokenId> ids,
                      std::uint64_t registrant, std::vector<PrefixRegistry::Block*>& out);
  void store_blocks(const Request& r, std::span<PrefixRegistry::Block* const> blocks) noexcept;

  // Invariants:
  //   INV-PAGED-1  free + used + cached == total pages (conservation)
  //   INV-PAGED-2  every layer's table holds exactly ceil(tokens / page_size) pages
  //   INV-PAGED-3  every page's pool reference count equals the number of
  //                block-table entries that hold it plus one if the registry
  //                holds it; a page is free exactly when nothing holds it
  //   INV-PAGED-4  written_[p] <= page_size, and a page just taken from the
  //                pool has written_[p] == 0 (unwritten slots read as zero)
  //   INV-PAGED-5  stored_ == sum of tokens over requests and layers
  //   INV-PAGED-6  a failed allocation or append changes nothing (all-or-nothing)
  //   INV-PAGED-7  copy-on-write: a page is written in place only by its only
  //                request holder, and a registry page only by its registrant
  ModelConfig config_;
  Tokens page_size_;
  Bytes row_bytes_;        // kv_bytes_per_token_per_layer
  Bytes bytes_per_page_;   // 2 * page_size * row_bytes_
  Storage storage_;
  // Heap-allocated so that its address, which every PageList keeps, survives
  // a move of the cache. Declared before requests_: destroyed after them.
  std::unique_ptr<PrefixRegistry> registry_;
  detail::LazyBuffer arena_;             // total_pages * bytes_per_page (host mode)
  std::vector<std::uint64_t> written_;   // per page: written mark (host mode)
  std::vector<std::byte> zero_row_;      // row_bytes_ zeros, served for unwritten slots
  Map requests_;
  Tokens stored_;
  std::uint64_t next_serial_ = 1;
  // scan_efficiency's scratch, per page: the stamp of the last scan that saw
  // the page and the most slots a holder used then.
  mutable std::vector<std::uint32_t> scan_stamp_;
  mutable std::vector<std::uint64_t> scan_best_;
  mutable std::uint32_t scan_epoch_ = 0;
};

}  // namespace kvcache
