// kvcache.config: the model shape and the KV-cache memory math.
//
// `ModelConfig` is an aggregate of the four numbers that decide the size of a
// token's KV cache: layers, KV heads (after grouped-query attention), head
// dimension and bytes per element. Every size is derived, in integers only:
//
//   kv_bytes_per_token_per_layer = num_kv_heads * head_dim * dtype_bytes   (K or V)
//   bytes_per_token              = num_layers * 2 * kv_bytes_per_token_per_layer
//   bytes_per_page(page_size)    = page_size * 2 * kv_bytes_per_token_per_layer
//   max_tokens(budget)           = budget / bytes_per_token   (integer division)
//
// Being an aggregate, a ModelConfig cannot check itself when built; every
// size function and every cache constructor calls `validate()`, which rejects
// a zero field or a size that overflows 64 bits with std::invalid_argument
// naming the field. So an invalid config is rejected at the latest when a
// cache is built from it.
//
// Thread safety: a value type.
module;

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

export module kvcache.config;

import kvcache.units;

export namespace kvcache {

struct ModelConfig {
  std::uint32_t num_layers = 0;
  std::uint32_t num_kv_heads = 0;
  std::uint32_t head_dim = 0;
  std::uint32_t dtype_bytes = 0;

  // Throws std::invalid_argument naming the first zero field, or the field
  // whose factor makes bytes_per_token overflow 64 bits.
  constexpr void validate() const {
    check_nonzero(num_layers, "num_layers");
    check_nonzero(num_kv_heads, "num_kv_heads");
    check_nonzero(head_dim, "head_dim");
    check_nonzero(dtype_bytes, "dtype_bytes");
    // Multiply in the order of the formula, naming the factor that overflows.
    std::uint64_t acc = num_kv_heads;  // fits: a uint32
    acc = times(acc, head_dim, "head_dim");
    // dtype_bytes counts twice (K and V); 2 * a uint32 fits in 64 bits.
    acc = times(acc, std::uint64_t{dtype_bytes} * 2U, "dtype_bytes");
    static_cast<void>(times(acc, num_layers, "num_layers"));
  }

  [[nodiscard]] constexpr bool valid() const noexcept {
    try {
      validate();
      return true;
    } catch (...) {
      return false;
    }
  }

  // Bytes of ONE of K or V, for one token in one layer.
  [[nodiscard]] constexpr Bytes kv_bytes_per_token_per_layer() const {
    validate();
    return Bytes{std::uint64_t{num_kv_heads} * head_dim * dtype_bytes};
  }

  // Bytes of K and V of one token in one layer.
  [[nodiscard]] constexpr Bytes bytes_per_token_per_layer() const {
    return kv_bytes_per_token_per_layer() * 2U;
  }

  // Bytes of K and V of one token over all layers.
  [[nodiscard]] constexpr Bytes bytes_per_token() const {
    return bytes_per_token_per_layer() * num_layers;
  }

  // Bytes of one page of ONE layer holding `page_size` tokens.
  // Throws std::invalid_argument for a zero page size, std::overflow_error
  // when the page does not fit in 64 bits.
  [[nodiscard]] constexpr Bytes bytes_per_page(Tokens page_size) const {
    if (page_size.count() == 0) {
      throw std::invalid_argument("kvcache: ModelConfig::bytes_per_page: page_size is 0");
    }
    return bytes_for(page_size, bytes_per_token_per_layer());
  }

  // Tokens (all layers) that fit in `budget`: integer division, rounding down.
  [[nodiscard]] constexpr Tokens max_tokens(Bytes budget) const {
    return Tokens{budget / bytes_per_token()};
  }

  // The elements (not bytes) of one K or V row: num_kv_heads * head_dim.
  [[nodiscard]] constexpr std::uint64_t kv_elements_per_token_per_layer() const {
    validate();
    return std::uint64_t{num_kv_heads} * head_dim;
  }

  friend constexpr bool operator==(const ModelConfig&, const ModelConfig&) = default;

 private:
  static constexpr void check_nonzero(std::uint32_t v, const char* field) {
    if (v == 0) {
      throw std::invalid_argument(std::string("kvcache: ModelConfig: ") + field +
                                  " is 0; every field must be at least 1");
    }
  }
  static constexpr std::uint64_t times(std::uint64_t acc, std::uint64_t factor,
                                       const char* field) {
    if (acc > std::numeric_limits<std::uint64_t>::max() / factor) {
      throw std::invalid_argument(std::string("kvcache: ModelConfig: ") + field +
                                  " makes the KV bytes per token overflow 64 bits (" +
                                  std::to_string(acc) + " * " + std::to_string(factor) + ")");
    }
    return acc * factor;
  }
};

// A short human-readable form: "ModelConfig{layers=32, kv_heads=8, head_dim=128, dtype_bytes=2}".
[[nodiscard]] inline std::string to_string(const ModelConfig& c) {
  return "ModelConfig{layers=" + std::to_string(c.num_layers) +
         ", kv_heads=" + std::to_string(c.num_kv_heads) +
         ", head_dim=" + std::to_string(c.head_dim) +
         ", dtype_bytes=" + std::to_string(c.dtype_bytes) + "}";
}

}  // namespace kvcache
