// Implementation of the argument-check helpers of kvcache.errors.
module;

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>

module kvcache.errors;

namespace kvcache::detail {

namespace {
std::string quoted(std::string_view id) {
  std::string s;
  s.reserve(id.size() + 2);
  s += '"';
  s += id;
  s += '"';
  return s;
}
}  // namespace

void throw_unknown_request(const char* where, std::string_view id) {
  throw UnknownRequest(std::string("kvcache: ") + where + ": unknown request id " + quoted(id));
}

void check_layer(const char* where, std::string_view id, std::size_t layer,
                 std::uint32_t num_layers) {
  if (layer >= num_layers) {
    throw std::out_of_range(std::string("kvcache: ") + where + ": request " + quoted(id) +
                            ": layer " + std::to_string(layer) + " is out of range (model has " +
                            std::to_string(num_layers) + " layers)");
  }
}

void check_row_bytes(const char* where, std::string_view id, std::size_t layer,
                     const char* what, std::size_t actual, std::uint64_t expected) {
  if (actual != expected) {
    throw ShapeMismatch(std::string("kvcache: ") + where + ": request " + quoted(id) +
                        ", layer " + std::to_string(layer) + ": " + what + " has " +
                        std::to_string(actual) + " bytes, expected " + std::to_string(expected) +
                        " (kv_bytes_per_token_per_layer)");
  }
}

void check_float_rows(const char* where, std::string_view id, std::size_t layer,
                      std::uint32_t dtype_bytes, std::size_t key_floats,
                      std::size_t value_floats, std::uint64_t elements) {
  if (dtype_bytes != sizeof(float)) {
    throw ShapeMismatch(std::string("kvcache: ") + where + ": request " + quoted(id) +
                        ": the float overload needs dtype_bytes == 4, the model has " +
                        std::to_string(dtype_bytes));
  }
  const auto check = [&](const char* what, std::size_t n) {
    if (n != elements) {
      throw ShapeMismatch(std::string("kvcache: ") + where + ": request " + quoted(id) +
                          ", layer " + std::to_string(layer) + ": " + what + " has " +
                          std::to_string(n) + " floats, expected " + std::to_string(elements) +
                          " (num_kv_heads * head_dim)");
    }
  };
  check("key", key_floats);
  check("value", value_floats);
}

}  // namespace kvcache::detail
