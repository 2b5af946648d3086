// Implementation of kvcache.basic: see basic.cppm for the design.
module;

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <gsl/narrow>

#include "kvcache/contracts.hpp"

module kvcache.basic;

namespace kvcache {

void detail::FreeBytes::operator()(std::byte* p) const noexcept { ::operator delete[](p); }

BasicKVCache::BasicKVCache(ModelConfig config, Bytes budget, Storage storage)
    : config_(config),
      budget_(budget),
      storage_(storage),
      row_bytes_(config.kv_bytes_per_token_per_layer()),  // validates the config
      bytes_per_token_(config.bytes_per_token()) {}

Bytes BasicKVCache::reservation_bytes(const char* where, std::string_view id, Tokens prompt,
                                      Tokens max_gen) const {
  const std::uint64_t max = Tokens::max().count();
  const bool sum_overflows = prompt.count() > max - max_gen.count();
  if (sum_overflows ||
      prompt.count() + max_gen.count() > max / bytes_per_token_.count()) {
    throw std::overflow_error(
        std::string("kvcache: ") + where + ": request \"" + std::string(id) + "\": prompt " +
        std::to_string(prompt.count()) + " + max_gen " + std::to_string(max_gen.count()) +
        (sum_overflows ? " tokens overflows 64 bits"
                       : " tokens at " + std::to_string(bytes_per_token_.count()) +
                             " bytes per token overflows 64 bits"));
  }
  return bytes_for(prompt + max_gen, bytes_per_token_);
}

bool BasicKVCache::can_allocate(Tokens prompt, Tokens max_gen) const {
  return reservation_bytes("BasicKVCache::can_allocate", "", prompt, max_gen) <= budget_ - used_;
}

Admission BasicKVCache::admission(Tokens prompt, Tokens max_gen) const {
  const Bytes bytes = reservation_bytes("BasicKVCache::admission", "", prompt, max_gen);
  if (bytes > budget_) return Admission::never;
  return bytes <= budget_ - used_ ? Admission::now : Admission::later;
}

bool BasicKVCache::allocate(std::string_view id, Tokens prompt, Tokens max_gen) {
  // Argument checks throw first.
  const Bytes bytes = reservation_bytes("BasicKVCache::allocate", id, prompt, max_gen);
  if (requests_.find(id) != requests_.end()) return false;  // then the duplicate id
  if (bytes > budget_ - used_) return false;                // then memory (INV-BASIC-2)

  // Everything that can throw (mapping, vectors, the map node) happens before
  // the first change to the counters: the strong guarantee.
  const auto size = gsl::narrow<std::size_t>(bytes.count());
  std::unique_ptr<std::byte[], detail::FreeBytes> data;  // NOLINT(cppcoreguidelines-avoid-c-arrays): an owned raw byte block, not an array of objects
  if (size != 0 && storage_ == Storage::host) {
    // Uninitialised, so lazily committed.
    data.reset(static_cast<std::byte*>(::operator new[](size, std::nothrow)));
    if (data == nullptr) throw std::bad_alloc();
  }
  Request r{prompt + max_gen, std::move(data), storage_ == Storage::host ? size : 0,
            std::vector<std::uint64_t>(config_.num_layers, 0)};
  requests_.emplace(std::string(id), std::move(r));
  used_ += bytes;
  reserved_ += prompt + max_gen;
  KVCACHE_AUDIT(check_invariants());
  return true;
}

const BasicKVCache::Request& BasicKVCache::find(const char* where, std::string_view id) const {
  const auto it = requests_.find(id);
  if (it == requests_.end()) detail::throw_unknown_request(where, id);
  return it->second;
}

BasicKVCache::Request& BasicKVCache::find(const char* where, std::string_view id) {
  const auto it = requests_.find(id);
  if (it == requests_.end()) detail::throw_unknown_request(where, id);
  return it->second;
}

void BasicKVCache::require_host(const char* where) const {
  if (storage_ == Storage::none) {
    throw std::logic_error(std::string("kvcache: ") + where +
                           ": this cache keeps no KV bytes (Storage::none)");
  }
}

// The request, after checking that its layer has room for one more token
// (ReservationExceeded otherwise).
BasicKVCache::Request& BasicKVCache::checked_room(const char* where, std::string_view id,
                                                  std::size_t layer) {
  Request& r = find(where, id);
  if (r.count[layer] >= r.capacity.count()) {
    throw ReservationExceeded("kvcache: " + std::string(where) + ": request \"" +
                              std::string(id) + "\", layer " + std::to_string(layer) +
                              " already holds its whole reservation of " +
                              std::to_string(r.capacity.count()) + " tokens (prompt + max_gen)");
  }
  return r;
}

void BasicKVCache::append_token(std::string_view id, std::size_t layer,
                                std::span<const std::byte> key,
                                std::span<const std::byte> value) {
  constexpr const char* where = "BasicKVCache::append_token";
  require_host(where);
  detail::check_layer(where, id, layer, config_.num_layers);
  detail::check_row_bytes(where, id, layer, "key", key.size(), row_bytes_.count());
  detail::check_row_bytes(where, id, layer, "value", value.size(), row_bytes_.count());
  Request& r = checked_room(where, id, layer);
  // No throw from here on.
  std::uint64_t& n = r.count[layer];
  const std::size_t row = key.size();
  const std::size_t cap = static_cast<std::size_t>(r.capacity.count());
  std::memcpy(r.data.get() + ((2 * layer * cap + n) * row), key.data(), row);
  std::memcpy(r.data.get() + (((2 * layer + 1) * cap + n) * row), value.data(), row);
  ++n;
  ++stored_;
  KVCACHE_AUDIT(check_invariants());
}

void BasicKVCache::append_token(std::string_view id, std::size_t layer) {
  constexpr const char* where = "BasicKVCache::append_token";
  detail::check_layer(where, id, layer, config_.num_layers);
  Request& r = checked_room(where, id, layer);
  // No throw from here on.
  std::uint64_t& n = r.count[layer];
  if (storage_ == Storage::host) {
    const auto row = static_cast<std::size_t>(row_bytes_.count());
    const std::size_t cap = static_cast<std::size_t>(r.capacity.count());
    std::memset(r.data.get() + ((2 * layer * cap + n) * row), 0, row);
    std::memset(r.data.get() + (((2 * layer + 1) * cap + n) * row), 0, row);
  }
  ++n;
  ++stored_;
  KVCACHE_AUDIT(check_invariants());
}

void BasicKVCache::append_token(std::string_view id, std::size_t layer,
                                std::span<const float> key, std::span<const float> value) {
  constexpr const char* where = "BasicKVCache::append_token";
  require_host(where);
  detail::check_layer(where, id, layer, config_.num_layers);
  detail::check_float_rows(where, id, layer, config_.dtype_bytes, key.size(), value.size(),
                           config_.kv_elements_per_token_per_layer());
  append_token(id, layer, std::as_bytes(key), std::as_bytes(value));
}

KVView BasicKVCache::get_kv(std::string_view id, std::size_t layer) const {
  constexpr const char* where = "BasicKVCache::get_kv";
  require_host(where);
  detail::check_layer(where, id, layer, config_.num_layers);
  const Request& r = find(where, id);
  const auto row = static_cast<std::size_t>(row_bytes_.count());
  const auto cap = static_cast<std::size_t>(r.capacity.count());
  const auto n = static_cast<std::size_t>(r.count[layer]);
  const std::byte* base = r.data.get();
  return KVView{TokenRows(base == nullptr ? nullptr : base + (2 * layer * cap * row), n, row, row),
                TokenRows(base == nullptr ? nullptr : base + ((2 * layer + 1) * cap * row), n,
                          row, row)};
}

void BasicKVCache::free(std::string_view id) {
  const auto it = requests_.find(id);
  if (it == requests_.end()) detail::throw_unknown_request("BasicKVCache::free", id);
  const Request& r = it->second;
  const Bytes bytes = bytes_for(r.capacity, bytes_per_token_);
  KVCACHE_EXPECTS(bytes <= used_ && r.capacity <= reserved_);
  std::uint64_t stored = 0;
  for (const std::uint64_t n : r.count) stored += n;
  used_ -= bytes;
  reserved_ -= r.capacity;
  stored_ -= Tokens{stored};
  requests_.erase(it);  // unmaps the storage: the memory is usable at once
  KVCACHE_AUDIT(check_invariants());
}

BasicStats BasicKVCache::stats() const noexcept {
  BasicStats s;
  s.total_memory = budget_;
  s.used_memory = used_;
  s.free_memory = Bytes{budget_.count() - used_.count()};  // INV-BASIC-2: no underflow
  s.reserved_tokens = reserved_;
  s.stored_tokens = stored_;
  s.num_requests = requests_.size();
  s.utilization_pct = budget_.count() == 0 ? 0.0
                                           : static_cast<double>(used_.count()) * 100.0 /
                                                 static_cast<double>(budget_.count());
  return s;
}

bool BasicKVCache::contains(std::string_view id) const noexcept {
  return requests_.find(id) != requests_.end();
}

Tokens BasicKVCache::tokens(std::string_view id, std::size_t layer) const {
  constexpr const char* where = "BasicKVCache::tokens";
  detail::check_layer(where, id, layer, config_.num_layers);
  return Tokens{find(where, id).count[layer]};
}

Tokens BasicKVCache::reservation(std::string_view id) const {
  return find("BasicKVCache::reservation", id).capacity;
}

std::vector<std::string> BasicKVCache::request_ids() const {
  std::vector<std::string> ids;
  ids.reserve(requests_.size());
  for (const auto& [id, r] : requests_) ids.push_back(id);
  return ids;
}

bool BasicKVCache::check_invariants() const {
  std::uint64_t used = 0;
  std::uint64_t reserved = 0;
  std::uint64_t stored = 0;
  for (const auto& [id, r] : requests_) {
    const std::uint64_t bytes = r.capacity.count() * bytes_per_token_.count();
    if (r.capacity.count() != 0 && bytes / r.capacity.count() != bytes_per_token_.count()) {
      return false;  // a reservation that overflows could not have been accepted
    }
    used += bytes;
    reserved += r.capacity.count();
    const bool host = storage_ == Storage::host;
    if (r.size != (host ? bytes : 0) || (r.size != 0) != (r.data != nullptr)) {
      return false;  // INV-BASIC-5
    }
    if (r.count.size() != config_.num_layers) return false;
    for (const std::uint64_t n : r.count) {
      if (n > r.capacity.count()) return false;                     // INV-BASIC-4
      stored += n;
    }
  }
  return used == used_.count() && reserved == reserved_.count() &&  // INV-BASIC-1, -3
         used_ <= budget_ && stored == stored_.count();             // INV-BASIC-2, -6
}

}  // namespace kvcache
