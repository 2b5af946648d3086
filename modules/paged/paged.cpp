// Implementation of kvcache.paged: see paged.cppm for the design.
module;

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <gsl/narrow>

#include "kvcache/contracts.hpp"

module kvcache.paged;

namespace kvcache {

namespace {

Pages pool_pages(Bytes budget, Bytes bytes_per_page) {
  const std::uint64_t n = budget / bytes_per_page;
  if (n > PagePool::max_capacity) {
    throw std::invalid_argument("kvcache: PagedKVCache: a budget of " +
                                std::to_string(budget.count()) + " bytes gives " +
                                std::to_string(n) + " pages of " +
                                std::to_string(bytes_per_page.count()) +
                                " bytes, more than the " +
                                std::to_string(PagePool::max_capacity) +
                                " a PageId can name; use a larger page size");
  }
  return Pages{n};
}

Bytes checked_page_bytes(const ModelConfig& config, Tokens page_size) {
  config.validate();
  if (page_size.count() == 0) {
    throw std::invalid_argument("kvcache: PagedKVCache: page_size is 0; it must be at least 1");
  }
  return config.bytes_per_page(page_size);
}

// Makes room for one more page id without the quadratic cost of
// reserve(size + 1) (libstdc++ reserves exactly what is asked). May throw
// std::bad_alloc, before any state change.
void room_for_one(std::vector<PageId>& table) {
  if (table.size() == table.capacity()) table.reserve(std::max<std::size_t>(4, 2 * table.size()));
}

}  // namespace

PagedKVCache::PagedKVCache(ModelConfig config, Bytes budget, Tokens page_size, Storage storage)
    : config_(config),
      page_size_(page_size),
      row_bytes_(config.kv_bytes_per_token_per_layer()),
      bytes_per_page_(checked_page_bytes(config, page_size)),
      storage_(storage),
      pool_(pool_pages(budget, bytes_per_page_)) {
  if (storage_ == Storage::host) {
    const Bytes arena = bytes_for(pool_.capacity(), bytes_per_page_);
    arena_ = detail::LazyBuffer(gsl::narrow<std::size_t>(arena.count()));
    written_.assign(gsl::narrow<std::size_t>(pool_.capacity().count()), 0);
    zero_row_.assign(gsl::narrow<std::size_t>(row_bytes_.count()), std::byte{0});
  }
}

std::size_t PagedKVCache::to_index(Tokens t) {
  // A position past SIZE_MAX is past every layer's end: clamp, the range check
  // in write_kv rejects it with std::out_of_range.
  if (t.count() > SIZE_MAX) return SIZE_MAX;
  return static_cast<std::size_t>(t.count());
}

const PagedKVCache::Request& PagedKVCache::find(const char* where, std::string_view id) const {
  const auto it = requests_.find(id);
  if (it == requests_.end()) detail::throw_unknown_request(where, id);
  return it->second;
}

PagedKVCache::Request& PagedKVCache::find(const char* where, std::string_view id) {
  const auto it = requests_.find(id);
  if (it == requests_.end()) detail::throw_unknown_request(where, id);
  return it->second;
}

void PagedKVCache::require_host(const char* where) const {
  if (storage_ == Storage::none) {
    throw std::logic_error(std::string("kvcache: ") + where +
                           ": this cache keeps no KV bytes (Storage::none)");
  }
}

PageId PagedKVCache::take_page() noexcept {
  const auto h = pool_.allocate();
  KVCACHE_EXPECTS(h.has_value());  // callers count free pages first
  if (storage_ == Storage::host) written_[h->id.index()] = 0;  // INV-PAGED-4: O(1), no zeroing
  return h->id;
}

void PagedKVCache::drop_page(PageId page) noexcept {
  // The cache holds this page: its handle is current by INV-PAGED-3.
  static_cast<void>(pool_.release(pool_.handle(page)));
}

std::byte* PagedKVCache::slot_key(PageId page, std::size_t slot) noexcept {
  const auto row = static_cast<std::size_t>(row_bytes_.count());
  const auto bpp = static_cast<std::size_t>(bytes_per_page_.count());
  return arena_.data() + (page.index() * bpp) + (slot * row);
}

std::byte* PagedKVCache::slot_value(PageId page, std::size_t slot) noexcept {
  const auto row = static_cast<std::size_t>(row_bytes_.count());
  const auto ps = static_cast<std::size_t>(page_size_.count());
  return slot_key(page, slot) + (ps * row);
}

void PagedKVCache::write_slot(PageId page, std::size_t slot, std::span<const std::byte> key,
                              std::span<const std::byte> value) noexcept {
  std::uint32_t& mark = written_[page.index()];
  // Slots skipped over read as zero: clear them before moving the mark.
  for (std::size_t s = mark; s < slot; ++s) zero_slot(page, s);
  std::memcpy(slot_key(page, slot), key.data(), key.size());
  std::memcpy(slot_value(page, slot), value.data(), value.size());
  mark = std::max(mark, static_cast<std::uint32_t>(slot + 1));
}

void PagedKVCache::zero_slot(PageId page, std::size_t slot) noexcept {
  const auto row = static_cast<std::size_t>(row_bytes_.count());
  std::memset(slot_key(page, slot), 0, row);
  std::memset(slot_value(page, slot), 0, row);
}

bool PagedKVCache::layer_last_page_full(const Request& r, std::size_t layer) const noexcept {
  return r.tokens[layer] % page_size_.count() == 0;  // also true for a layer with no page
}

Pages PagedKVCache::pages_needed_to_allocate(Tokens prompt) const {
  return pages_for(prompt, page_size_) * config_.num_layers;  // checked: overflow_error
}

bool PagedKVCache::can_allocate(Tokens prompt) const {
  return pages_needed_to_allocate(prompt) <= pool_.free_pages();
}

Admission PagedKVCache::admission(Tokens prompt) const {
  const Pages need = pages_needed_to_allocate(prompt);
  if (need > pool_.capacity()) return Admission::never;
  return need <= pool_.free_pages() ? Admission::now : Admission::later;
}

Tokens PagedKVCache::max_prompt_tokens() const noexcept {
  return Tokens{pool_.capacity().count() / config_.num_layers * page_size_.count()};
}

Pages PagedKVCache::pages_needed_to_append(std::string_view id) const {
  const Request& r = find("PagedKVCache::pages_needed_to_append", id);
  std::uint64_t n = 0;
  for (std::size_t l = 0; l < r.tokens.size(); ++l) n += layer_last_page_full(r, l) ? 1U : 0U;
  return Pages{n};
}

bool PagedKVCache::allocate_paged(std::string_view id, Tokens prompt) {
  const Pages per_layer = pages_for(prompt, page_size_);
  const Pages need = pages_needed_to_allocate(prompt);  // argument check: overflow_error
  if (requests_.find(id) != requests_.end()) return false;
  if (need > pool_.free_pages()) return false;  // INV-PAGED-6: decided before any change

  // Build the whole request (everything that can throw) before taking pages.
  Request r;
  r.tables.resize(config_.num_layers);
  for (auto& t : r.tables) t.reserve(gsl::narrow<std::size_t>(per_layer.count()));
  r.tokens.assign(config_.num_layers, prompt.count());
  auto [it, inserted] = requests_.emplace(std::string(id), std::move(r));
  KVCACHE_ASSERT(inserted);
  for (auto& t : it->second.tables) {
    for (std::uint64_t k = 0; k < per_layer.count(); ++k) t.push_back(take_page());
  }
  stored_ += tokens_in(Pages{config_.num_layers}, prompt);
  KVCACHE_AUDIT(check_invariants());
  return true;
}

bool PagedKVCache::append_one(std::string_view id, Request& r, std::size_t layer,
                              std::span<const std::byte> key, std::span<const std::byte> value) {
  static_cast<void>(id);
  auto& table = r.tables[layer];
  const bool needs_page = layer_last_page_full(r, layer);
  if (needs_page) {
    if (pool_.free_pages() == Pages{0}) return false;  // INV-PAGED-6
    room_for_one(table);  // may throw; nothing changed yet
    table.push_back(take_page());
  }
  const auto slot = static_cast<std::size_t>(r.tokens[layer] % page_size_.count());
  const PageId page = table.back();
  if (storage_ == Storage::host) {
    if (key.empty()) {
      if (slot < written_[page.index()]) zero_slot(page, slot);
    } else {
      write_slot(page, slot, key, value);
    }
  }
  ++r.tokens[layer];
  ++stored_;
  KVCACHE_AUDIT(check_invariants());
  return true;
}

bool PagedKVCache::append_token_paged(std::string_view id, std::size_t layer,
                                      std::span<const std::byte> key,
                                      std::span<const std::byte> value) {
  constexpr const char* where = "PagedKVCache::append_token_paged";
  require_host(where);
  detail::check_layer(where, id, layer, config_.num_layers);
  detail::check_row_bytes(where, id, layer, "key", key.size(), row_bytes_.count());
  detail::check_row_bytes(where, id, layer, "value", value.size(), row_bytes_.count());
  return append_one(id, find(where, id), layer, key, value);
}

bool PagedKVCache::append_token_paged(std::string_view id, std::size_t layer,
                                      std::span<const float> key, std::span<const float> value) {
  constexpr const char* where = "PagedKVCache::append_token_paged";
  require_host(where);
  detail::check_layer(where, id, layer, config_.num_layers);
  detail::check_float_rows(where, id, layer, config_.dtype_bytes, key.size(), value.size(),
                           config_.kv_elements_per_token_per_layer());
  return append_token_paged(id, layer, std::as_bytes(key), std::as_bytes(value));
}

bool PagedKVCache::append_token_paged(std::string_view id, std::size_t layer) {
  constexpr const char* where = "PagedKVCache::append_token_paged";
  detail::check_layer(where, id, layer, config_.num_layers);
  return append_one(id, find(where, id), layer, {}, {});
}

bool PagedKVCache::append_token_all_layers(std::string_view id) {
  constexpr const char* where = "PagedKVCache::append_token_all_layers";
  Request& r = find(where, id);
  const Pages need = pages_needed_to_append(id);
  if (need > pool_.free_pages()) return false;  // INV-PAGED-6: all layers or none
  // Make room in every table that grows first (may throw; nothing changed yet).
  for (std::size_t l = 0; l < r.tables.size(); ++l) {
    if (layer_last_page_full(r, l)) room_for_one(r.tables[l]);
  }
  for (std::size_t l = 0; l < r.tables.size(); ++l) {
    const bool ok = append_one(id, r, l, {}, {});
    KVCACHE_ASSERT(ok);
  }
  return true;
}

void PagedKVCache::write_kv(std::string_view id, std::size_t layer, std::size_t position,
                            std::span<const std::byte> key, std::span<const std::byte> value) {
  constexpr const char* where = "PagedKVCache::write_kv";
  require_host(where);
  detail::check_layer(where, id, layer, config_.num_layers);
  detail::check_row_bytes(where, id, layer, "key", key.size(), row_bytes_.count());
  detail::check_row_bytes(where, id, layer, "value", value.size(), row_bytes_.count());
  Request& r = find(where, id);
  if (position >= r.tokens[layer]) {
    throw std::out_of_range("kvcache: " + std::string(where) + ": request \"" +
                            std::string(id) + "\", layer " + std::to_string(layer) +
                            ": position " + std::to_string(position) + " is not stored (" +
                            std::to_string(r.tokens[layer]) + " tokens)");
  }
  const auto ps = static_cast<std::size_t>(page_size_.count());
  write_slot(r.tables[layer][position / ps], position % ps, key, value);
  KVCACHE_AUDIT(check_invariants());
}

void PagedKVCache::write_kv(std::string_view id, std::size_t layer, std::size_t position,
                            std::span<const float> key, std::span<const float> value) {
  constexpr const char* where = "PagedKVCache::write_kv";
  require_host(where);
  detail::check_layer(where, id, layer, config_.num_layers);
  detail::check_float_rows(where, id, layer, config_.dtype_bytes, key.size(), value.size(),
                           config_.kv_elements_per_token_per_layer());
  write_kv(id, layer, position, std::as_bytes(key), std::as_bytes(value));
}

KVView PagedKVCache::get_kv(std::string_view id, std::size_t layer) const {
  constexpr const char* where = "PagedKVCache::get_kv";
  require_host(where);
  detail::check_layer(where, id, layer, config_.num_layers);
  const Request& r = find(where, id);
  const auto row = static_cast<std::size_t>(row_bytes_.count());
  const auto ps = static_cast<std::size_t>(page_size_.count());
  TokenRows::Paged p;
  p.arena = arena_.data();
  p.pages = r.tables[layer].data();
  p.written = written_.data();
  p.zero_row = zero_row_.data();
  p.page_tokens = ps;
  p.page_bytes = static_cast<std::size_t>(bytes_per_page_.count());
  const auto n = static_cast<std::size_t>(r.tokens[layer]);
  TokenRows::Paged v = p;
  v.offset = ps * row;
  return KVView{TokenRows(p, n, row), TokenRows(v, n, row)};
}

void PagedKVCache::free(std::string_view id) {
  const auto it = requests_.find(id);
  if (it == requests_.end()) detail::throw_unknown_request("PagedKVCache::free", id);
  const Request& r = it->second;
  std::uint64_t tokens = 0;
  for (const auto& table : r.tables) {
    // Tail first: the last pages reach the LRU free list first, so they are
    // reused (evicted) before the head pages, which are likelier to be shared.
    for (auto p = table.rbegin(); p != table.rend(); ++p) drop_page(*p);
  }
  for (const std::uint64_t n : r.tokens) tokens += n;
  stored_ -= Tokens{tokens};
  requests_.erase(it);
  KVCACHE_AUDIT(check_invariants());
}

std::span<const PageId> PagedKVCache::block_table(std::string_view id, std::size_t layer) const {
  constexpr const char* where = "PagedKVCache::block_table";
  detail::check_layer(where, id, layer, config_.num_layers);
  return find(where, id).tables[layer];
}

Pages PagedKVCache::pages_held(std::string_view id) const {
  const Request& r = find("PagedKVCache::pages_held", id);
  std::uint64_t n = 0;
  for (const auto& t : r.tables) n += t.size();
  return Pages{n};
}

Tokens PagedKVCache::tokens(std::string_view id, std::size_t layer) const {
  constexpr const char* where = "PagedKVCache::tokens";
  detail::check_layer(where, id, layer, config_.num_layers);
  return Tokens{find(where, id).tokens[layer]};
}

bool PagedKVCache::contains(std::string_view id) const noexcept {
  return requests_.find(id) != requests_.end();
}

std::vector<std::string> PagedKVCache::request_ids() const {
  std::vector<std::string> ids;
  ids.reserve(requests_.size());
  for (const auto& [id, r] : requests_) ids.push_back(id);
  return ids;
}

double PagedKVCache::memory_efficiency() const noexcept {
  // No page is shared (yet), so the request pages are the pool's live pages
  // and the tokens in them are stored_: O(1).
  const std::uint64_t pages = pool_.live_pages().count();
  if (pages == 0) return 0.0;
  return static_cast<double>(stored_.count()) /
         (static_cast<double>(pages) * static_cast<double>(page_size_.count()));
}

PagedStats PagedKVCache::stats() const noexcept {
  PagedStats s;
  s.total_pages = pool_.capacity();
  s.free_pages = pool_.free_pages();
  s.used_pages = pool_.live_pages();
  s.cached_pages = Pages{0};
  s.used_memory = Bytes{s.used_pages.count() * bytes_per_page_.count()};  // <= budget
  s.num_requests = requests_.size();
  s.utilization_pct = s.total_pages.count() == 0
                          ? 0.0
                          : static_cast<double>(s.used_pages.count()) * 100.0 /
                                static_cast<double>(s.total_pages.count());
  s.stored_tokens = stored_;
  s.page_size = page_size_;
  s.bytes_per_page = bytes_per_page_;
  return s;
}

bool PagedKVCache::check_invariants() const {
  if (!pool_.check_invariants()) return false;
  // INV-PAGED-3: count every block-table entry per page.
  std::vector<std::uint64_t> holders(gsl::narrow<std::size_t>(pool_.capacity().count()), 0);
  std::uint64_t stored = 0;
  for (const auto& [id, r] : requests_) {
    if (r.tables.size() != config_.num_layers || r.tokens.size() != config_.num_layers) {
      return false;
    }
    for (std::size_t l = 0; l < r.tables.size(); ++l) {
      if (Pages{r.tables[l].size()} != pages_for(Tokens{r.tokens[l]}, page_size_)) {
        return false;  // INV-PAGED-2
      }
      for (const PageId p : r.tables[l]) {
        if (static_cast<std::uint64_t>(p) >= holders.size()) return false;
        ++holders[p.index()];
      }
      stored += r.tokens[l];
    }
  }
  std::uint64_t live = 0;
  for (std::size_t p = 0; p < holders.size(); ++p) {
    if (pool_.ref_count(PageId{static_cast<std::uint32_t>(p)}) != holders[p]) return false;
    if (holders[p] != 0) ++live;
    if (storage_ == Storage::host && written_[p] > page_size_.count()) return false;  // -4
  }
  // INV-PAGED-1 (no registry yet: cached == 0) and INV-PAGED-5.
  if (live + pool_.free_pages().count() != pool_.capacity().count()) return false;
  return stored == stored_.count() && stored <= live * page_size_.count();
}

}  // namespace kvcache
