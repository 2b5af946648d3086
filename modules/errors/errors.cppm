// kvcache.errors: the exception types of the public contract.
//
// Each derives from the standard exception a caller would already catch for
// that kind of mistake, so `catch (const std::out_of_range&)` also catches an
// unknown request id. Messages name the request id and the numbers involved.
//
// User errors throw these (with the strong guarantee: the object is unchanged).
// Bugs do not: a broken invariant terminates through KVCACHE_EXPECTS and
// friends (kvcache/contracts.hpp).
//
// Thread safety: exception objects are immutable after construction.
module;

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>

export module kvcache.errors;

export namespace kvcache {

// A request id that the cache does not hold (the KeyError of this API).
class UnknownRequest : public std::out_of_range {
 public:
  using std::out_of_range::out_of_range;
};

// A key or value of the wrong byte length, or the float overload used when
// dtype_bytes != 4.
class ShapeMismatch : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// A write that must copy a shared page when no page can be had.
class OutOfPages : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Appending past a basic reservation (prompt + max_gen tokens in a layer).
class ReservationExceeded : public std::length_error {
 public:
  using std::length_error::length_error;
};

// A page handle that no longer names a live page: released twice, or released
// after its page went back to the free list (and perhaps to another holder).
class StalePage : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

}  // namespace kvcache

// Helpers shared by the caches for the contract's argument checks and their
// messages. Not API.
export namespace kvcache::detail {

// Throws UnknownRequest naming `id`, from `where` (e.g. "BasicKVCache::free").
[[noreturn]] void throw_unknown_request(const char* where, std::string_view id);

// Throws std::out_of_range unless layer < num_layers.
void check_layer(const char* where, std::string_view id, std::size_t layer,
                 std::uint32_t num_layers);

// Throws ShapeMismatch unless `actual` == `expected` bytes; `what` is "key" or "value".
void check_row_bytes(const char* where, std::string_view id, std::size_t layer,
                     const char* what, std::size_t actual, std::uint64_t expected);

// Throws ShapeMismatch unless dtype_bytes == 4 and both float rows hold
// `elements` floats.
void check_float_rows(const char* where, std::string_view id, std::size_t layer,
                      std::uint32_t dtype_bytes, std::size_t key_floats,
                      std::size_t value_floats, std::uint64_t elements);

}  // namespace kvcache::detail
