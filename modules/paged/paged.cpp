// Implementation of kvcache.paged: see paged.cppm for the design.
module;

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
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

std::string quoted(std::string_view s) { return "\"" + std::string(s) + "\""; }

}  // namespace

PagedKVCache::PagedKVCache(ModelConfig config, Bytes budget, Tokens page_size, Storage storage)
    : config_(config),
      page_size_(page_size),
      row_bytes_(config.kv_bytes_per_token_per_layer()),  // validates the config
      bytes_per_page_(checked_page_bytes(config, page_size)),
      storage_(storage),
      registry_(std::make_unique<PrefixRegistry>(pool_pages(budget, bytes_per_page_))) {
  if (storage_ == Storage::host) {
    const Bytes arena = bytes_for(registry_->total_pages(), bytes_per_page_);
    arena_ = detail::LazyBuffer(gsl::narrow<std::size_t>(arena.count()));
    written_.assign(gsl::narrow<std::size_t>(registry_->total_pages().count()), 0);
    zero_row_.assign(gsl::narrow<std::size_t>(row_bytes_.count()), std::byte{0});
  }
}

PagedKVCache& PagedKVCache::operator=(PagedKVCache&& other) noexcept {
  if (this == &other) return *this;
  requests_.clear();  // release our pages into our registry while it exists
  config_ = other.config_;
  page_size_ = other.page_size_;
  row_bytes_ = other.row_bytes_;
  bytes_per_page_ = other.bytes_per_page_;
  storage_ = other.storage_;
  registry_ = std::move(other.registry_);
  arena_ = std::move(other.arena_);
  written_ = std::move(other.written_);
  zero_row_ = std::move(other.zero_row_);
  requests_ = std::move(other.requests_);
  stored_ = other.stored_;
  next_serial_ = other.next_serial_;
  scan_stamp_ = std::move(other.scan_stamp_);
  scan_best_ = std::move(other.scan_best_);
  scan_epoch_ = other.scan_epoch_;
  return *this;
}

std::size_t PagedKVCache::to_index(Tokens t) {
  // A position past SIZE_MAX is past every layer's end: clamp, and the range
  // check in write_kv rejects it with std::out_of_range.
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

// ---- pages and slots ---------------------------------------------------------

PageId PagedKVCache::take_page() noexcept {
  const PageId page = registry_->take();
  if (storage_ == Storage::host) written_[page.index()] = 0;  // INV-PAGED-4: O(1), no zeroing
  return page;
}

PageId PagedKVCache::copy_page(PageId from, std::size_t slots) noexcept {
  const PageId to = take_page();
  if (storage_ == Storage::host) {
    // Copy what the writer can see of the page and nothing past it: the
    // copied slots past `slots` read as zero (contract: partial prefix page).
    const std::size_t n = std::min<std::size_t>(slots, written_[from.index()]);
    const auto row = static_cast<std::size_t>(row_bytes_.count());
    if (n != 0) {
      std::memcpy(slot_key(to, 0), slot_key(from, 0), n * row);
      std::memcpy(slot_value(to, 0), slot_value(from, 0), n * row);
    }
    written_[to.index()] = n;
  }
  ++registry_->counters().cow_copies;
  return to;
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
  std::uint64_t& mark = written_[page.index()];
  // Slots skipped over read as zero: clear them before moving the mark.
  for (std::size_t s = mark; s < slot; ++s) zero_slot(page, s);
  std::memcpy(slot_key(page, slot), key.data(), key.size());
  std::memcpy(slot_value(page, slot), value.data(), value.size());
  mark = std::max<std::uint64_t>(mark, slot + 1);
}

void PagedKVCache::zero_slot(PageId page, std::size_t slot) noexcept {
  const auto row = static_cast<std::size_t>(row_bytes_.count());
  std::memset(slot_key(page, slot), 0, row);
  std::memset(slot_value(page, slot), 0, row);
}

bool PagedKVCache::layer_last_page_full(const Request& r, std::size_t layer) const noexcept {
  return r.tokens[layer] % page_size_.count() == 0;  // also true for a layer with no page
}

std::size_t PagedKVCache::slots_used(const Request& r, std::size_t layer,
                                     std::size_t index) const noexcept {
  const std::uint64_t before = std::uint64_t{index} * page_size_.count();
  return static_cast<std::size_t>(std::min(page_size_.count(), r.tokens[layer] - before));
}

// What the next append to `layer` needs. `page`: a page of its own, for
// sure (the last page is full, or shared with another request). `swap`: the
// last page is shared only with the registry: copying it turns the old page
// into a cached one (or evicting its prefix makes it writable in place), so
// free + cached pages do not drop, but the step needs one of them to exist at
// that moment. `none`: the page is writable in place.
PagedKVCache::AppendNeed PagedKVCache::append_need(const Request& r,
                                                   std::size_t layer) const noexcept {
  if (layer_last_page_full(r, layer)) return AppendNeed::page;
  const PageId last = r.tables[layer].back();
  if (registry_->writable_by(last, r.serial)) return AppendNeed::none;
  return registry_->request_holders(last) == 1 ? AppendNeed::swap : AppendNeed::page;
}

// Pages (free or evictable) that must exist for a step appending to every
// layer to succeed: every `page` layer consumes one; `swap` layers consume
// none net but need one to exist, and they go first (see
// append_token_all_layers), so max(pages, swaps ? 1 : 0).
std::uint64_t PagedKVCache::step_need(const Request& r) const noexcept {
  std::uint64_t pages = 0;
  bool swaps = false;
  for (std::size_t l = 0; l < r.tables.size(); ++l) {
    const AppendNeed n = append_need(r, l);
    pages += n == AppendNeed::page ? 1U : 0U;
    swaps = swaps || n == AppendNeed::swap;
  }
  return std::max<std::uint64_t>(pages, swaps ? 1U : 0U);
}

// Copy-on-write: makes entry `index` of the layer's table writable by `r`,
// copying the page when another holder shares it. Returns false, changing
// nothing, when a copy is needed and no page can be had even after eviction.
// O(1) plus the page copy.
bool PagedKVCache::make_writable(Request& r, std::size_t layer, std::size_t index) noexcept {
  PageList& table = r.tables[layer];
  if (registry_->writable_by(table[index], r.serial)) return true;
  if (registry_->free_pages() == Pages{0}) {
    if (registry_->cached_pages() == Pages{0}) return false;  // nothing to evict: no change
    // Evicting may drop the very registry reference that made the page
    // shared; look again after each eviction.
    while (registry_->free_pages() == Pages{0}) {
      registry_->evict_lru();
      if (registry_->writable_by(table[index], r.serial)) return true;
    }
  }
  table.replace(index, copy_page(table[index], slots_used(r, layer, index)));
  return true;
}

// ---- admission -----------------------------------------------------------------

Pages PagedKVCache::pages_needed_to_allocate(Tokens prompt) const {
  return pages_to_allocate("PagedKVCache::pages_needed_to_allocate", {}, prompt);
}

Pages PagedKVCache::pages_to_allocate(const char* where, std::string_view id,
                                      Tokens prompt) const {
  const Pages per_layer = pages_for(prompt, page_size_);
  if (per_layer.count() > Pages::max().count() / config_.num_layers) {
    throw std::overflow_error("kvcache: " + std::string(where) + ": request " + quoted(id) +
                              ": a prompt of " + std::to_string(prompt.count()) + " tokens needs " +
                              std::to_string(per_layer.count()) + " pages in each of " +
                              std::to_string(config_.num_layers) +
                              " layers, which overflows 64 bits");
  }
  return per_layer * config_.num_layers;
}

bool PagedKVCache::can_allocate(Tokens prompt) const {
  return pages_needed_to_allocate(prompt).count() <=
         registry_->free_pages().count() + registry_->evictable_except(nullptr);
}

Admission PagedKVCache::admission(Tokens prompt) const {
  const Pages need = pages_needed_to_allocate(prompt);
  if (need > registry_->total_pages()) return Admission::never;
  return can_allocate(prompt) ? Admission::now : Admission::later;
}

Admission PagedKVCache::admission(Tokens prompt, std::string_view prefix_hash,
                                  Tokens prefix_tokens) const {
  constexpr const char* where = "PagedKVCache::admission";
  const PrefixRegistry::Prefix* prefix =
      check_prefix_args(where, {}, prompt, prefix_hash, prefix_tokens);
  // The overflow check of the whole prompt comes first, hit or miss: a hit's
  // page count (at most the prompt's) is then computed without overflow.
  (void)pages_to_allocate(where, {}, prompt);
  if (prefix == nullptr) return admission(prompt);
  const HitPlan plan = plan_hit(prompt, prefix_tokens);
  // In an otherwise empty cache the prefix's own pages stay, beside the
  // request's new ones.
  const std::uint64_t registered = prefix->pages.size();
  if (plan.need > registry_->total_pages().count() - registered) return Admission::never;
  return can_allocate(prompt, prefix_hash, prefix_tokens) ? Admission::now : Admission::later;
}

Tokens PagedKVCache::max_prompt_tokens() const noexcept {
  return Tokens{registry_->total_pages().count() / config_.num_layers * page_size_.count()};
}

Pages PagedKVCache::pages_needed_to_append(std::string_view id) const {
  return Pages{step_need(find("PagedKVCache::pages_needed_to_append", id))};
}

// ---- allocation ----------------------------------------------------------------

PagedKVCache::Request PagedKVCache::make_request(Tokens prompt) const {
  const auto per_layer = gsl::narrow<std::size_t>(pages_for(prompt, page_size_).count());
  Request r;
  r.tables.reserve(config_.num_layers);
  for (std::uint32_t l = 0; l < config_.num_layers; ++l) {
    r.tables.emplace_back(*registry_);
    r.tables.back().reserve_more(per_layer);
  }
  r.tokens.assign(config_.num_layers, prompt.count());
  return r;
}

bool PagedKVCache::allocate_paged(std::string_view id, Tokens prompt) {
  const Pages need = pages_to_allocate("PagedKVCache::allocate_paged", id, prompt);  // throws first
  if (requests_.find(id) != requests_.end()) return false;
  if (need.count() > registry_->free_pages().count() + registry_->evictable_except(nullptr)) {
    return false;  // INV-PAGED-6, INV-REF-4: decided before any change
  }
  // The running total of stored tokens (beyond the contract) must not
  // overflow either; checked after the contract's checks, before any change.
  const Tokens stored = stored_ + tokens_in(Pages{config_.num_layers}, prompt);
  // Everything that can throw happens before the first eviction or page.
  registry_->reserve_events(0);  // an eviction of a content block records an event
  Request r = make_request(prompt);
  r.serial = next_serial_;
  auto [it, inserted] = requests_.emplace(std::string(id), std::move(r));
  KVCACHE_ASSERT(inserted);
  ++next_serial_;
  registry_->make_room(need.count(), nullptr);
  const std::uint64_t per_layer = pages_for(prompt, page_size_).count();
  for (PageList& table : it->second.tables) {
    for (std::uint64_t k = 0; k < per_layer; ++k) table.adopt(take_page());
  }
  stored_ = stored;
  KVCACHE_AUDIT(check_invariants());
  return true;
}

PrefixRegistry::Prefix* PagedKVCache::check_prefix_args(const char* where, std::string_view id,
                                                       Tokens prompt,
                                                       std::string_view prefix_hash,
                                                       Tokens prefix_tokens) const {
  if (prefix_hash.empty()) {
    throw std::invalid_argument(std::string("kvcache: ") + where + ": request " + quoted(id) +
                                ": the prefix hash is empty");
  }
  if (prefix_tokens == Tokens{0} || prefix_tokens > prompt) {
    throw std::invalid_argument(
        std::string("kvcache: ") + where + ": request " + quoted(id) + ": prefix of " +
        std::to_string(prefix_tokens.count()) + " tokens with a prompt of " +
        std::to_string(prompt.count()) + " (it must be 1 .. prompt tokens)");
  }
  PrefixRegistry::Prefix* prefix = registry_->find(prefix_hash);
  if (prefix != nullptr && prefix->tokens != prefix_tokens) {
    throw std::invalid_argument(
        std::string("kvcache: ") + where + ": request " + quoted(id) + ": prefix " +
        quoted(prefix_hash) + " is registered with " + std::to_string(prefix->tokens.count()) +
        " tokens, not " + std::to_string(prefix_tokens.count()));
  }
  return prefix;
}

PagedKVCache::HitPlan PagedKVCache::plan_hit(Tokens prompt, Tokens prefix_tokens) const noexcept {
  // Share the full prefix pages; the partial last page too when the prompt
  // ends exactly at the prefix, else copy it (the prompt continues inside
  // it). New pages for the rest. Per layer.
  const std::uint64_t ps = page_size_.count();
  const std::uint64_t prefix_pages = pages_for(prefix_tokens, page_size_).count();
  HitPlan plan;
  plan.rem = prefix_tokens.count() % ps;
  plan.copy_partial = plan.rem != 0 && prompt > prefix_tokens;
  plan.shared = prefix_pages - (plan.copy_partial ? 1U : 0U);
  plan.fresh = pages_for(prompt, page_size_).count() - prefix_pages;
  plan.need = config_.num_layers * (plan.fresh + (plan.copy_partial ? 1U : 0U));
  return plan;
}

Pages PagedKVCache::pages_needed_to_allocate(Tokens prompt, std::string_view prefix_hash,
                                             Tokens prefix_tokens) const {
  constexpr const char* where = "PagedKVCache::pages_needed_to_allocate";
  const PrefixRegistry::Prefix* prefix =
      check_prefix_args(where, {}, prompt, prefix_hash, prefix_tokens);
  const Pages plain = pages_to_allocate(where, {}, prompt);
  return prefix == nullptr ? plain : Pages{plan_hit(prompt, prefix_tokens).need};
}

bool PagedKVCache::can_allocate(Tokens prompt, std::string_view prefix_hash,
                                Tokens prefix_tokens) const {
  const Pages need = pages_needed_to_allocate(prompt, prefix_hash, prefix_tokens);
  // A hit never evicts the prefix it reuses (INV-REF-5).
  return need.count() <= registry_->free_pages().count() +
                             registry_->evictable_except(registry_->find(prefix_hash));
}

bool PagedKVCache::allocate_paged(std::string_view id, Tokens prompt,
                                  std::string_view prefix_hash, Tokens prefix_tokens) {
  constexpr const char* where = "PagedKVCache::allocate_paged";
  // Argument checks, all before anything else.
  PrefixRegistry::Prefix* prefix =
      check_prefix_args(where, id, prompt, prefix_hash, prefix_tokens);
  const Pages need_plain = pages_to_allocate(where, id, prompt);  // overflow_error
  if (requests_.find(id) != requests_.end()) return false;

  const std::uint64_t ps = page_size_.count();
  const std::uint64_t layers = config_.num_layers;
  const std::uint64_t per_layer = pages_for(prompt, page_size_).count();
  const std::uint64_t prefix_pages = pages_for(prefix_tokens, page_size_).count();
  const std::uint64_t rem = prefix_tokens.count() % ps;  // slots of a partial last prefix page

  if (prefix == nullptr) {
    // Miss: allocate as usual, then register the first prefix pages.
    if (need_plain.count() > registry_->free_pages().count() + registry_->evictable_except(nullptr)) {
      return false;
    }
    const Tokens stored = stored_ + tokens_in(Pages{layers}, prompt);  // overflow_error, no change
    registry_->reserve_events(0);
    Request r = make_request(prompt);
    r.serial = next_serial_;
    PrefixRegistry::Prefix& entry = registry_->prepare(
        prefix_hash, prefix_tokens, layers, gsl::narrow<std::size_t>(prefix_pages), r.serial);
    try {
      const auto [it, inserted] = requests_.emplace(std::string(id), std::move(r));
      KVCACHE_ASSERT(inserted);
      ++next_serial_;
      registry_->make_room(need_plain.count(), &entry);  // entry has no pages yet: nothing to skip
      for (PageList& table : it->second.tables) {
        for (std::uint64_t k = 0; k < per_layer; ++k) table.adopt(take_page());
        for (std::uint64_t k = 0; k < prefix_pages; ++k) {
          registry_->hold(entry, table[static_cast<std::size_t>(k)]);
        }
      }
    } catch (...) {
      registry_->unprepare(entry);  // only the map insert can throw, before any page
      throw;
    }
    registry_->touch(entry);
    ++registry_->counters().misses;
    stored_ = stored;
    KVCACHE_AUDIT(check_invariants());
    return true;
  }

  // Hit.
  const HitPlan plan = plan_hit(prompt, prefix_tokens);
  const bool copy_partial = plan.copy_partial;
  const std::uint64_t shared = plan.shared;
  const std::uint64_t fresh = plan.fresh;
  const std::uint64_t need = plan.need;
  if (need > registry_->free_pages().count() + registry_->evictable_except(prefix)) {
    return false;  // INV-REF-4: nothing evicted; INV-REF-5: the reused prefix not counted
  }
  const Tokens stored = stored_ + tokens_in(Pages{layers}, prompt);  // overflow_error, no change
  registry_->reserve_events(0);
  Request r = make_request(prompt);
  r.serial = next_serial_;
  const auto [it, inserted] = requests_.emplace(std::string(id), std::move(r));
  KVCACHE_ASSERT(inserted);
  ++next_serial_;
  registry_->make_room(need, prefix);
  const std::size_t ppl = prefix->pages_per_layer;
  for (std::uint64_t l = 0; l < layers; ++l) {
    PageList& table = it->second.tables[static_cast<std::size_t>(l)];
    const std::size_t base = static_cast<std::size_t>(l) * ppl;
    for (std::uint64_t k = 0; k < shared; ++k) {
      table.share(prefix->pages[base + static_cast<std::size_t>(k)]);
    }
    if (copy_partial) {
      table.adopt(copy_page(prefix->pages[base + ppl - 1], static_cast<std::size_t>(rem)));
    }
    for (std::uint64_t k = 0; k < fresh; ++k) table.adopt(take_page());
  }
  it->second.cached_tokens = prefix_tokens.count();
  registry_->touch(*prefix);
  PrefixCounters& c = registry_->counters();
  ++c.hits;
  c.pages_saved += layers * shared;
  c.tokens_saved += layers * (shared * ps - (rem != 0 && !copy_partial ? ps - rem : 0U));
  stored_ = stored;
  KVCACHE_AUDIT(check_invariants());
  return true;
}

// ---- automatic prefix caching by content ---------------------------------------

void PagedKVCache::prepare_blocks(Content& chain, std::uint64_t from,
                                  std::span<const TokenId> ids, std::uint64_t registrant,
                                  std::vector<PrefixRegistry::Block*>& out) {
  const auto ps = static_cast<std::size_t>(page_size_.count());
  Content next = chain;  // a copy: `chain` changes only when nothing threw
  const std::size_t first_out = out.size();
  std::uint64_t pos = from;
  bool made_one = false;
  try {
    std::size_t i = 0;
    while (i < ids.size()) {
      const std::size_t take = std::min(ps - next.tail.size(), ids.size() - i);
      std::span<const TokenId> page;
      if (next.tail.empty() && take == ps) {
        page = ids.subspan(i, ps);  // a whole page of `ids`: no copy
      } else {
        next.tail.insert(next.tail.end(), ids.begin() + static_cast<std::ptrdiff_t>(i),
                         ids.begin() + static_cast<std::ptrdiff_t>(i + take));
        if (next.tail.size() < ps) break;  // the last page stays partial
        page = next.tail;
      }
      i += take;
      pos += take;
      const std::uint64_t key = registry_->block_key(next.last_key, next.salt_hash, page);
      // After a block this call made, no existing block can have the new
      // parent: no lookup is needed.
      const PrefixRegistry::Block* same =
          made_one ? nullptr : registry_->find_block(key, next.last_serial, page, next.salt);
      // Room first, so that a prepared block is never lost; a null entry is
      // a page whose equal content is cached already: chain on to it.
      out.push_back(nullptr);
      if (same != nullptr) {
        next.last_serial = same->serial;
      } else {
        PrefixRegistry::Block& b =
            registry_->prepare_block(key, next.last_key, next.last_serial, pos - ps, page,
                                     next.salt, config_.num_layers, registrant);
        out.back() = &b;
        next.last_serial = b.serial;
        made_one = true;
      }
      next.last_key = key;
      next.tail.clear();
    }
  } catch (...) {
    for (std::size_t k = out.size(); k-- > first_out;) {  // newest first
      if (out[k] != nullptr) registry_->unprepare_block(*out[k]);
    }
    out.resize(first_out);
    throw;
  }
  chain = std::move(next);
}

// Gives each prepared block the pages of `r` that hold its tokens (one per
// layer) and records it as stored; a null entry is a page an equal block
// already covers. noexcept: the blocks and their events were prepared.
void PagedKVCache::store_blocks(const Request& r,
                                std::span<PrefixRegistry::Block* const> blocks) noexcept {
  const std::uint64_t ps = page_size_.count();
  for (PrefixRegistry::Block* b : blocks) {
    if (b == nullptr) {
      ++registry_->counters().blocks_duplicate;
      continue;
    }
    const auto index = static_cast<std::size_t>(b->first_token / ps);
    for (const PageList& table : r.tables) registry_->hold(*b, table[index]);
    registry_->stored(*b);
  }
}

bool PagedKVCache::allocate_paged(std::string_view id, std::span<const TokenId> prompt,
                                  std::string_view salt) {
  constexpr const char* where = "PagedKVCache::allocate_paged";
  const Tokens prompt_tokens{std::uint64_t{prompt.size()}};
  const Pages need_plain = pages_to_allocate(where, id, prompt_tokens);  // overflow_error
  if (requests_.find(id) != requests_.end()) return false;

  const auto ps = static_cast<std::size_t>(page_size_.count());
  const std::uint64_t layers = config_.num_layers;
  // Lookup: the longest run of leading full pages cached with this content
  // and salt, confirmed page by page (parent, token ids, salt), covering at
  // most prompt - 1 tokens. O(prompt) hashing and comparing.
  const std::size_t max_hit = prompt.empty() ? 0 : (prompt.size() - 1) / ps;
  std::vector<PrefixRegistry::Block*> hits;
  hits.reserve(max_hit);
  Content chain{std::string(salt), PrefixRegistry::salt_hash(salt), {}, std::nullopt, 0};
  for (std::size_t i = 0; i < max_hit; ++i) {
    const auto page = prompt.subspan(i * ps, ps);
    const std::uint64_t key = registry_->block_key(chain.last_key, chain.salt_hash, page);
    PrefixRegistry::Block* b = registry_->find_block(key, chain.last_serial, page, salt);
    if (b == nullptr) break;
    hits.push_back(b);
    chain.last_key = key;
    chain.last_serial = b->serial;
  }
  const std::uint64_t matched = hits.size();
  const std::uint64_t need = need_plain.count() - layers * matched;
  std::uint64_t hit_cached = 0;  // cached pages the hits will hold: not evictable for this call
  for (const PrefixRegistry::Block* b : hits) hit_cached += b->cached;
  if (need > registry_->free_pages().count() + registry_->evictable_except(nullptr) - hit_cached) {
    return false;  // INV-PAGED-6, INV-REF-4: decided before any change
  }
  const Tokens stored = stored_ + tokens_in(Pages{layers}, prompt_tokens);  // overflow_error

  // Everything that can throw, before the first page moves.
  const std::uint64_t matched_tokens = matched * ps;
  registry_->reserve_events(prompt.size() / ps - matched);
  Request r = make_request(prompt_tokens);
  r.serial = next_serial_;
  r.cached_tokens = matched_tokens;
  const auto [it, inserted] = requests_.emplace(std::string(id), std::move(r));
  KVCACHE_ASSERT(inserted);
  std::vector<PrefixRegistry::Block*> fresh_blocks;
  try {
    fresh_blocks.reserve(prompt.size() / ps - matched);
    prepare_blocks(chain, matched_tokens, prompt.subspan(matched_tokens), it->second.serial,
                   fresh_blocks);
    it->second.content.emplace(std::move(chain));
  } catch (...) {
    requests_.erase(it);  // holds no page yet
    throw;
  }
  ++next_serial_;

  // Share the hits first: their cached pages leave the evictable set, so
  // making room below cannot evict them.
  Request& req = it->second;
  for (std::uint64_t l = 0; l < layers; ++l) {
    PageList& table = req.tables[static_cast<std::size_t>(l)];
    for (const PrefixRegistry::Block* b : hits) table.share(b->pages[static_cast<std::size_t>(l)]);
  }
  registry_->make_room(need, nullptr);
  const std::uint64_t per_layer = pages_for(prompt_tokens, page_size_).count();
  for (PageList& table : req.tables) {
    for (std::uint64_t k = matched; k < per_layer; ++k) table.adopt(take_page());
  }
  store_blocks(req, fresh_blocks);
  PrefixCounters& c = registry_->counters();
  c.content_prompt_tokens += prompt.size();
  c.content_hit_tokens += matched_tokens;
  c.pages_saved += layers * matched;
  c.tokens_saved += layers * matched_tokens;
  stored_ = stored;
  KVCACHE_AUDIT(check_invariants());
  return true;
}

bool PagedKVCache::append_token_ids(std::string_view id, std::span<const TokenId> tokens) {
  constexpr const char* where = "PagedKVCache::append_token_ids";
  Request& r = find(where, id);
  if (!r.content.has_value()) {
    throw std::logic_error("kvcache: " + std::string(where) + ": request " + quoted(id) +
                           " was not allocated with token ids (allocate_paged(id, prompt "
                           "token ids, salt)); append to it with append_token_paged");
  }
  if (tokens.empty()) return true;
  const std::uint64_t ps = page_size_.count();
  const std::uint64_t t = r.tokens.front();  // every layer holds t tokens
  const Tokens total = Tokens{t} + Tokens{std::uint64_t{tokens.size()}};  // overflow_error
  (void)pages_to_allocate(where, id, total);                               // overflow_error
  const std::uint64_t fresh = pages_for(total, page_size_).count() - pages_for(Tokens{t}, page_size_).count();
  // A partial last page the request cannot write in place is copied first.
  std::uint64_t copies = 0;
  if (t % ps != 0) {
    for (const PageList& table : r.tables) {
      copies += registry_->writable_by(table.back(), r.serial) ? 0U : 1U;
    }
  }
  const std::uint64_t need = config_.num_layers * fresh + copies;
  if (need > registry_->free_pages().count() + registry_->evictable_except(nullptr)) {
    return false;  // INV-PAGED-6: nothing changed
  }
  const Tokens stored = stored_ + tokens_in(Pages{config_.num_layers}, Tokens{std::uint64_t{tokens.size()}});
  // Everything that can throw, before any change.
  for (PageList& table : r.tables) table.reserve_more(static_cast<std::size_t>(fresh));
  // Only when the free pages do not cover the need can the call evict (and
  // record events).
  if (need > registry_->free_pages().count()) registry_->reserve_events(0);
  const bool fills_a_page = t % ps + tokens.size() >= ps;
  std::vector<PrefixRegistry::Block*> blocks;
  std::optional<Content> chain;  // the key chain after the call, when a page fills
  if (fills_a_page) {
    registry_->reserve_events(static_cast<std::size_t>((t % ps + tokens.size()) / ps));
    chain.emplace(*r.content);
    prepare_blocks(*chain, t, tokens, r.serial, blocks);
  } else {
    // The common decode step: the tokens join the partial page; only the
    // tail grows (room made here, so the change below cannot throw).
    // Geometric growth, never past a page (a page may be far larger than
    // any prompt: room for it is not reserved up front).
    std::vector<TokenId>& tail = r.content->tail;
    const std::size_t want = tail.size() + tokens.size();
    if (tail.capacity() < want) {
      tail.reserve(std::max(want, std::min(2 * tail.capacity(), static_cast<std::size_t>(ps))));
    }
  }

  const auto first_slot = static_cast<std::size_t>(t % ps);
  const std::size_t end_slot = std::min<std::size_t>(static_cast<std::size_t>(ps), first_slot + tokens.size());
  for (std::size_t l = 0; l < r.tables.size(); ++l) {
    PageList& table = r.tables[l];
    if (first_slot != 0) {
      const bool ok = make_writable(r, l, table.size() - 1);  // may evict; counted in `need`
      KVCACHE_ASSERT(ok);
      if (storage_ == Storage::host) {
        // The new tokens read as zero until written.
        const PageId last = table.back();
        for (std::size_t s = first_slot; s < end_slot && s < written_[last.index()]; ++s) {
          zero_slot(last, s);
        }
      }
    }
    for (std::uint64_t k = 0; k < fresh; ++k) {
      if (registry_->free_pages() == Pages{0}) registry_->evict_lru();
      table.adopt(take_page());
    }
    r.tokens[l] = total.count();
  }
  store_blocks(r, blocks);
  if (chain.has_value()) {
    *r.content = std::move(*chain);
  } else {
    r.content->tail.insert(r.content->tail.end(), tokens.begin(), tokens.end());  // no allocation
  }
  stored_ = stored;
  KVCACHE_AUDIT(check_invariants());
  return true;
}

Tokens PagedKVCache::cached_tokens(std::string_view id) const {
  return Tokens{find("PagedKVCache::cached_tokens", id).cached_tokens};
}

bool PagedKVCache::content_addressed(std::string_view id) const {
  return find("PagedKVCache::content_addressed", id).content.has_value();
}

void PagedKVCache::refuse_content(const char* where, std::string_view id, const Request& r) const {
  if (r.content.has_value()) {
    throw std::logic_error("kvcache: " + std::string(where) + ": request " + quoted(id) +
                           " was allocated with token ids: append to it with append_token_ids "
                           "(its layers advance together, and each full page gets its key)");
  }
}

bool PagedKVCache::fork(std::string_view parent_id, std::string_view child_id) {
  const Request& parent = find("PagedKVCache::fork", parent_id);
  if (requests_.find(child_id) != requests_.end()) return false;
  Tokens stored = stored_;
  for (const std::uint64_t n : parent.tokens) stored += Tokens{n};  // overflow_error, no change
  for (const PageList& table : parent.tables) {
    for (const PageId p : table.ids()) {
      if (registry_->pool().ref_count(p) == UINT32_MAX) {
        throw std::overflow_error("kvcache: PagedKVCache::fork: page " +
                                  std::to_string(p.index()) + " already has 2^32 - 1 holders");
      }
    }
  }
  Request child;
  child.tables.reserve(parent.tables.size());
  for (const PageList& table : parent.tables) {
    child.tables.emplace_back(*registry_);
    child.tables.back().reserve_more(table.size());
  }
  child.tokens = parent.tokens;
  child.serial = next_serial_;
  child.cached_tokens = parent.cached_tokens;
  child.content = parent.content;  // the key chain goes on in the child
  const auto [it, inserted] = requests_.emplace(std::string(child_id), std::move(child));
  KVCACHE_ASSERT(inserted);
  ++next_serial_;
  const Request& p = find("PagedKVCache::fork", parent_id);  // rehash-safe: nodes are stable
  for (std::size_t l = 0; l < p.tables.size(); ++l) {
    for (const PageId page : p.tables[l].ids()) it->second.tables[l].share(page);
  }
  stored_ = stored;
  KVCACHE_AUDIT(check_invariants());
  return true;
}

// ---- appends and writes --------------------------------------------------------

bool PagedKVCache::append_one(Request& r, std::size_t layer, std::span<const std::byte> key,
                              std::span<const std::byte> value) {
  const Tokens stored = stored_ + Tokens{1U};  // overflow_error before any change
  // Only without a free page can the append below evict (and record an event).
  if (registry_->free_pages() == Pages{0}) registry_->reserve_events(0);
  PageList& table = r.tables[layer];
  if (layer_last_page_full(r, layer)) {
    const bool can = registry_->free_pages() > Pages{0} || registry_->cached_pages() > Pages{0};
    if (!can) return false;       // INV-PAGED-6: no change
    table.reserve_more(1);        // may throw; nothing changed yet
    if (registry_->free_pages() == Pages{0}) registry_->evict_lru();
    table.adopt(take_page());
  } else if (!make_writable(r, layer, table.size() - 1)) {
    return false;  // a shared last page and no page for its copy: no change
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
  stored_ = stored;
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
  Request& r = find(where, id);
  refuse_content(where, id, r);
  const bool ok = append_one(r, layer, key, value);
  KVCACHE_AUDIT(check_invariants());  // once per public call (append_one is per layer)
  return ok;
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
  Request& r = find(where, id);
  refuse_content(where, id, r);
  const bool ok = append_one(r, layer, {}, {});
  KVCACHE_AUDIT(check_invariants());
  return ok;
}

bool PagedKVCache::append_token_all_layers(std::string_view id) {
  constexpr const char* where = "PagedKVCache::append_token_all_layers";
  Request& r = find(where, id);
  refuse_content(where, id, r);
  if (step_need(r) > registry_->free_pages().count() + registry_->evictable_except(nullptr)) {
    return false;  // INV-PAGED-6: all layers or none
  }
  // Everything that can throw before the first change. Room for the events
  // of every eviction the step may make (`swap` layers take free pages
  // beyond `need`, so even a step that fits in the free pages may evict):
  // each eviction records one event and drops one block, so the appends
  // below never need more.
  const Tokens stored = stored_ + Tokens{r.tables.size()};
  for (PageList& table : r.tables) table.reserve_more(1);
  registry_->reserve_events(0);
  // `swap` layers first, while free + cached >= 1 is still guaranteed: each
  // leaves free + cached as it was. Then `page` layers, one page each, by
  // eviction when none is free; an eviction can only lower what is left.
  std::vector<AppendNeed> needs;
  needs.reserve(r.tables.size());
  for (std::size_t l = 0; l < r.tables.size(); ++l) needs.push_back(append_need(r, l));
  for (const AppendNeed pass : {AppendNeed::swap, AppendNeed::none, AppendNeed::page}) {
    for (std::size_t l = 0; l < r.tables.size(); ++l) {
      if (needs[l] != pass) continue;
      const bool ok = append_one(r, l, {}, {});
      KVCACHE_ASSERT(ok);
    }
  }
  KVCACHE_ASSERT(stored_ == stored);
  KVCACHE_AUDIT(check_invariants());
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
    throw std::out_of_range("kvcache: " + std::string(where) + ": request " + quoted(id) +
                            ", layer " + std::to_string(layer) + ": position " +
                            std::to_string(position) + " is not stored (" +
                            std::to_string(r.tokens[layer]) + " tokens)");
  }
  const auto ps = static_cast<std::size_t>(page_size_.count());
  const std::size_t index = position / ps;
  if (registry_->free_pages() == Pages{0}) registry_->reserve_events(0);  // a copy may evict
  if (!make_writable(r, layer, index)) {
    throw OutOfPages("kvcache: " + std::string(where) + ": request " + quoted(id) + ", layer " +
                     std::to_string(layer) + ", position " + std::to_string(position) +
                     ": the page is shared and no free page can be had for its copy (" +
                     std::to_string(registry_->total_pages().count()) + " pages, none free)");
  }
  write_slot(r.tables[layer][index], position % ps, key, value);
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

// ---- reads, free, queries ----------------------------------------------------------

KVView PagedKVCache::get_kv(std::string_view id, std::size_t layer) const {
  constexpr const char* where = "PagedKVCache::get_kv";
  require_host(where);
  detail::check_layer(where, id, layer, config_.num_layers);
  const Request& r = find(where, id);
  const auto row = static_cast<std::size_t>(row_bytes_.count());
  const auto ps = static_cast<std::size_t>(page_size_.count());
  TokenRows::Paged k;
  k.arena = arena_.data();
  k.pages = r.tables[layer].ids().data();
  k.written = written_.data();
  k.zero_row = zero_row_.data();
  k.page_tokens = ps;
  k.page_bytes = static_cast<std::size_t>(bytes_per_page_.count());
  TokenRows::Paged v = k;
  v.offset = ps * row;
  const auto n = static_cast<std::size_t>(r.tokens[layer]);
  return KVView{TokenRows(k, n, row), TokenRows(v, n, row)};
}

void PagedKVCache::free(std::string_view id) {
  const auto it = requests_.find(id);
  if (it == requests_.end()) detail::throw_unknown_request("PagedKVCache::free", id);
  std::uint64_t tokens = 0;
  for (const std::uint64_t n : it->second.tokens) tokens += n;
  stored_ -= Tokens{tokens};
  // The request's PageLists release every page, each table last page first.
  requests_.erase(it);
  KVCACHE_AUDIT(check_invariants());
}

bool PagedKVCache::evict_prefix(std::string_view prefix_hash) {
  PrefixRegistry::Prefix* p = registry_->find(prefix_hash);
  if (p == nullptr) return false;
  registry_->evict(*p);
  KVCACHE_AUDIT(check_invariants());
  return true;
}

std::size_t PagedKVCache::clear_prefix_cache() {
  const std::size_t n = registry_->clear();
  KVCACHE_AUDIT(check_invariants());
  return n;
}

bool PagedKVCache::has_prefix(std::string_view prefix_hash) const noexcept {
  return registry_->find(prefix_hash) != nullptr;
}

std::span<const PageId> PagedKVCache::block_table(std::string_view id, std::size_t layer) const {
  constexpr const char* where = "PagedKVCache::block_table";
  detail::check_layer(where, id, layer, config_.num_layers);
  return find(where, id).tables[layer].ids();
}

Pages PagedKVCache::pages_held(std::string_view id) const {
  const Request& r = find("PagedKVCache::pages_held", id);
  std::uint64_t n = 0;
  for (const PageList& t : r.tables) n += t.size();
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

double PagedKVCache::memory_efficiency() const {
  const std::uint64_t used = registry_->used_pages().count();
  if (used == 0) return 0.0;
  if (registry_->request_refs() == used) {
    // No page is listed by two requests: the tokens in request pages are
    // exactly stored_, O(1).
    return static_cast<double>(stored_.count()) /
           (static_cast<double>(used) * static_cast<double>(page_size_.count()));
  }
  return scan_efficiency();
}

// Shared pages: a page counts once, with the most slots any request holder
// uses. O(block-table entries): the per-page scratch is kept between calls
// and told apart by a stamp, so no pass over the whole pool.
double PagedKVCache::scan_efficiency() const {
  const auto pages_total = gsl::narrow<std::size_t>(registry_->total_pages().count());
  if (scan_stamp_.size() != pages_total) {
    scan_stamp_.assign(pages_total, 0);
    scan_best_.assign(pages_total, 0);
    scan_epoch_ = 0;
  }
  if (++scan_epoch_ == 0) {  // the stamps wrapped: clear them once
    std::fill(scan_stamp_.begin(), scan_stamp_.end(), 0);
    scan_epoch_ = 1;
  }
  std::uint64_t pages = 0;
  std::uint64_t tokens = 0;
  for (const auto& [id, r] : requests_) {
    for (std::size_t l = 0; l < r.tables.size(); ++l) {
      const auto ids = r.tables[l].ids();
      for (std::size_t i = 0; i < ids.size(); ++i) {
        const std::size_t p = ids[i].index();
        const std::uint64_t used = slots_used(r, l, i);  // a page may hold 2^32 tokens or more
        if (scan_stamp_[p] != scan_epoch_) {
          scan_stamp_[p] = scan_epoch_;
          scan_best_[p] = used;
          ++pages;
          tokens += used;
        } else if (used > scan_best_[p]) {
          tokens += used - scan_best_[p];
          scan_best_[p] = used;
        }
      }
    }
  }
  return static_cast<double>(tokens) /
         (static_cast<double>(pages) * static_cast<double>(page_size_.count()));
}

PagedStats PagedKVCache::stats() const noexcept {
  PagedStats s;
  s.total_pages = registry_->total_pages();
  s.free_pages = registry_->free_pages();
  s.used_pages = registry_->used_pages();
  s.cached_pages = registry_->cached_pages();
  s.used_memory = Bytes{s.used_pages.count() * bytes_per_page_.count()};  // <= budget
  s.num_requests = requests_.size();
  s.prefix_hits = registry_->counters().hits;
  s.prefix_misses = registry_->counters().misses;
  s.utilization_pct = s.total_pages.count() == 0
                          ? 0.0
                          : static_cast<double>(s.used_pages.count()) * 100.0 /
                                static_cast<double>(s.total_pages.count());
  s.stored_tokens = stored_;
  s.page_size = page_size_;
  s.bytes_per_page = bytes_per_page_;
  s.registered_prefixes = registry_->num_prefixes();
  s.prefix = registry_->counters();
  return s;
}

bool PagedKVCache::check_invariants() const {
  // INV-PAGED-3 / INV-REF-1: count every block-table entry per page.
  std::vector<std::uint64_t> holders(gsl::narrow<std::size_t>(registry_->total_pages().count()), 0);
  std::uint64_t stored = 0;
  for (const auto& [id, r] : requests_) {
    if (r.tables.size() != config_.num_layers || r.tokens.size() != config_.num_layers) {
      return false;
    }
    if (r.serial == 0 || r.serial >= next_serial_) return false;
    if (r.content.has_value()) {
      // INV-PAGED-8: a content request's layers advance together, and its
      // chain holds exactly the token ids past its last full page.
      for (const std::uint64_t n : r.tokens) {
        if (n != r.tokens.front()) return false;
      }
      if (r.content->tail.size() != r.tokens.front() % page_size_.count()) return false;
      if (r.content->last_key.has_value() != (r.tokens.front() >= page_size_.count())) return false;
    }
    if (r.cached_tokens > r.tokens.front()) return false;
    for (std::size_t l = 0; l < r.tables.size(); ++l) {
      if (Pages{r.tables[l].size()} != pages_for(Tokens{r.tokens[l]}, page_size_)) {
        return false;  // INV-PAGED-2
      }
      for (const PageId p : r.tables[l].ids()) {
        if (static_cast<std::uint64_t>(p) >= holders.size()) return false;
        ++holders[p.index()];
      }
      stored += r.tokens[l];
    }
  }
  if (!registry_->check_invariants(holders)) return false;  // INV-REF-*, INV-PAGED-1
  if (storage_ == Storage::host) {
    for (const std::uint64_t w : written_) {
      if (w > page_size_.count()) return false;  // INV-PAGED-4
    }
  }
  return stored == stored_.count();  // INV-PAGED-5
}

}  // namespace kvcache
