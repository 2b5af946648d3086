// kvcache.basic: BasicKVCache, contiguous reservation per request.
//
// The baseline every paged design is measured against (what servers did
// before PagedAttention): `allocate(id, prompt, max_gen)` reserves
// (prompt + max_gen) * bytes_per_token up front, whether or not the tokens
// ever come. A request fits when used + reservation <= budget; there is no
// external fragmentation in this accounting (each request's storage is its
// own mapping), so the figure compared with paging is exactly the
// reservation waste.
//
// Data layout: each request owns one uninitialised heap block of exactly its
// reservation, laid out layer-major:
//     [layer 0: K rows (capacity) | V rows (capacity)] [layer 1: ...] ...
// where a row is kv_bytes_per_token_per_layer() bytes and capacity is
// prompt + max_gen tokens. Token t of layer l: K at (2l * capacity + t) * row,
// V at ((2l + 1) * capacity + t) * row. The block is allocated without being
// initialised (nothrow operator new), so the reservation costs address
// space and resident memory grows only with the rows actually appended: large
// blocks come from fresh mappings, and nothing writes them until an append.
// (Rows are read only below the layer's token count, so they need no zeroing.)
// A heap block rather than a mapping of its own per request: a process has a
// limited number of mappings (vm.max_map_count, 65,530 by default), and the
// allocator packs small reservations together.
//
// Tokens are stored by append_token only: a fresh request holds 0 tokens in
// every layer, and each layer holds at most `capacity` tokens.
//
// Ownership: the cache owns every request's storage; `get_kv` views borrow it
// until the next mutating call. Thread safety: not thread-safe.
module;

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

export module kvcache.basic;

import kvcache.units;
import kvcache.config;
import kvcache.errors;
import kvcache.storage;

export namespace kvcache::detail {

// Deleter for the blocks of BasicKVCache, which come from the nothrow
// operator new: a failed allocation returns null, which the cache turns into
// std::bad_alloc with nothing changed. (Under AddressSanitizer the throwing
// operator new aborts the process on an impossible size instead of throwing;
// the nothrow one returns null.) Going through operator new, not malloc, lets
// a test that replaces the global operator new inject failures here too.
struct FreeBytes {
  void operator()(std::byte* p) const noexcept;
};

}  // namespace kvcache::detail

export namespace kvcache {

struct BasicStats {
  Bytes total_memory;          // the budget
  Bytes used_memory;           // the sum of reservations
  Bytes free_memory;           // total - used
  Tokens reserved_tokens;      // the sum of prompt + max_gen over live requests
  Tokens stored_tokens;        // tokens appended, summed over layers and requests
  std::size_t num_requests = 0;
  double utilization_pct = 0;  // used / total * 100 (0 for a zero budget)
};

class BasicKVCache {
 public:
  // Throws std::invalid_argument (naming the field) for an invalid config.
  // Storage::none keeps the accounting only (no KV bytes): the calls that
  // pass or read bytes then throw std::logic_error, and append_token(id,
  // layer) without data counts a token.
  BasicKVCache(ModelConfig config, Bytes budget, Storage storage = Storage::host);
  // Movable, not copyable (a copy would duplicate every reservation).
  BasicKVCache(BasicKVCache&&) noexcept = default;
  BasicKVCache& operator=(BasicKVCache&&) noexcept = default;
  BasicKVCache(const BasicKVCache&) = delete;
  BasicKVCache& operator=(const BasicKVCache&) = delete;
  ~BasicKVCache() = default;

  // Reserves (prompt + max_gen) * bytes_per_token for `id`.
  // Throws std::overflow_error when prompt + max_gen or its byte size
  // overflows 64 bits; returns false (no change) for a duplicate id, then
  // when used + reservation > budget. Throws std::bad_alloc, changing
  // nothing, when the host cannot map the reservation's address space.
  [[nodiscard]] bool allocate(std::string_view id, Tokens prompt, Tokens max_gen);

  // True when allocate(…, prompt, max_gen) of a new id would succeed now.
  // Throws std::overflow_error like allocate.
  [[nodiscard]] bool can_allocate(Tokens prompt, Tokens max_gen) const;
  // now / later (fits in the empty cache) / never (a reservation larger than
  // the budget). Throws std::overflow_error like allocate.
  [[nodiscard]] Admission admission(Tokens prompt, Tokens max_gen) const;

  // Appends one token to `layer` of `id`. Throws, in this order:
  // std::out_of_range for a bad layer, ShapeMismatch for a wrong row length
  // (or the float overload when dtype_bytes != 4), UnknownRequest, then
  // ReservationExceeded when the layer already holds prompt + max_gen tokens.
  void append_token(std::string_view id, std::size_t layer, std::span<const std::byte> key,
                    std::span<const std::byte> value);
  void append_token(std::string_view id, std::size_t layer, std::span<const float> key,
                    std::span<const float> value);
  // Appends a token without data: a zero token in Storage::host mode, a
  // count in Storage::none mode. Throws std::out_of_range for a bad layer,
  // UnknownRequest, then ReservationExceeded.
  void append_token(std::string_view id, std::size_t layer);

  // The stored rows of `layer` of `id`, in append order. Invalidated by the
  // next mutating call. Throws std::out_of_range for a bad layer, then
  // UnknownRequest.
  [[nodiscard]] KVView get_kv(std::string_view id, std::size_t layer) const;

  // Releases exactly the reservation of `id`. Throws UnknownRequest.
  void free(std::string_view id);

  [[nodiscard]] BasicStats stats() const noexcept;

  // Queries beyond the contract.
  [[nodiscard]] bool contains(std::string_view id) const noexcept;
  // Tokens stored in `layer` of `id`; throws like get_kv.
  [[nodiscard]] Tokens tokens(std::string_view id, std::size_t layer) const;
  // prompt + max_gen of `id`; throws UnknownRequest.
  [[nodiscard]] Tokens reservation(std::string_view id) const;
  [[nodiscard]] std::size_t num_requests() const noexcept { return requests_.size(); }
  [[nodiscard]] const ModelConfig& config() const noexcept { return config_; }
  [[nodiscard]] Bytes budget() const noexcept { return budget_; }
  [[nodiscard]] Storage storage() const noexcept { return storage_; }
  // Live request ids, in no particular order.
  [[nodiscard]] std::vector<std::string> request_ids() const;

  // O(requests * layers) check of INV-BASIC-*; true when all hold.
  [[nodiscard]] bool check_invariants() const;

 private:
  struct Request {
    Tokens capacity;                   // prompt + max_gen
    // capacity * bytes_per_token, layer-major (none in Storage::none mode)
    std::unique_ptr<std::byte[], detail::FreeBytes> data;  // NOLINT(cppcoreguidelines-avoid-c-arrays): an owned raw byte block
    std::size_t size = 0;               // bytes of `data`
    std::vector<std::uint64_t> count;  // tokens stored per layer
  };
  struct IdHash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const noexcept {
      return std::hash<std::string_view>{}(s);
    }
  };
  using Map = std::unordered_map<std::string, Request, IdHash, std::equal_to<>>;

  void require_host(const char* where) const;
  [[nodiscard]] Request& checked_room(const char* where, std::string_view id, std::size_t layer);
  [[nodiscard]] const Request& find(const char* where, std::string_view id) const;
  [[nodiscard]] Request& find(const char* where, std::string_view id);
  // (prompt + max_gen) * bytes_per_token; std::overflow_error naming `id`.
  [[nodiscard]] Bytes reservation_bytes(const char* where, std::string_view id, Tokens prompt,
                                        Tokens max_gen) const;

  // Invariants:
  //   INV-BASIC-1  used_ == sum over requests of capacity * bytes_per_token
  //   INV-BASIC-2  used_ <= budget_ (so free == budget - used never underflows)
  //   INV-BASIC-3  reserved_ == sum over requests of capacity
  //   INV-BASIC-4  every layer of every request holds <= capacity tokens
  //   INV-BASIC-5  each request's storage is exactly its reservation in bytes
//                (Storage::host), none at all (Storage::none)
  //   INV-BASIC-6  stored_ == sum of per-layer token counts
  ModelConfig config_;
  Bytes budget_;
  Storage storage_;
  Bytes row_bytes_;        // kv_bytes_per_token_per_layer
  Bytes bytes_per_token_;  // all layers, K and V
  Map requests_;
  Bytes used_;
  Tokens reserved_;
  Tokens stored_;
};

}  // namespace kvcache
