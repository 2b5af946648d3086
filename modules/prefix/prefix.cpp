// Implementation of kvcache.prefix: see prefix.cppm for the design.
module;

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <gsl/narrow>

// XXH3 from Debian's libxxhash-dev, used header-only (inlined into this unit):
// no link dependency for kvcache's users.
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "kvcache/contracts.hpp"

module kvcache.prefix;

namespace kvcache {

// ---- PageList ---------------------------------------------------------------

void PageList::reserve_more(std::size_t n) {
  const std::size_t want = ids_.size() + n;
  if (want > ids_.capacity()) ids_.reserve(std::max(want, 2 * ids_.capacity()));
}

void PageList::adopt(PageId page) noexcept {
  KVCACHE_EXPECTS(registry_ != nullptr && ids_.size() < ids_.capacity());
  ids_.push_back(page);  // no reallocation: room was reserved
  ++registry_->request_refs_;
}

void PageList::share(PageId page) noexcept {
  KVCACHE_EXPECTS(registry_ != nullptr);
  registry_->retain(page);
  adopt(page);
}

void PageList::replace(std::size_t i, PageId adopted) noexcept {
  KVCACHE_EXPECTS(registry_ != nullptr && i < ids_.size());
  const PageId old = std::exchange(ids_[i], adopted);
  registry_->release(old);
}

void PageList::clear() noexcept {
  if (registry_ == nullptr) return;
  // Last page first: a request's tail pages reach the LRU free list before its
  // head pages, so they are reused first.
  for (auto it = ids_.rbegin(); it != ids_.rend(); ++it) {
    registry_->release(*it);
    --registry_->request_refs_;
  }
  ids_.clear();
}

// ---- PrefixRegistry: page references ---------------------------------------

std::size_t PrefixRegistry::pool_size(Pages capacity) {
  return gsl::narrow<std::size_t>(capacity.count());
}

PageId PrefixRegistry::take() noexcept {
  const auto h = pool_.allocate();
  KVCACHE_EXPECTS(h.has_value());  // callers make room first
  KVCACHE_ASSERT(owner_[h->id.index()] == nullptr);
  return h->id;
}

void PrefixRegistry::retain(PageId page) noexcept {
  Entry* p = owner_[page.index()];
  if (p != nullptr && pool_.ref_count(page) == 1) page_left_cache(*p);  // registry-only until now
  pool_.retain(pool_.handle(page));  // the page is live: its current handle
}

void PrefixRegistry::release(PageId page) noexcept {
  static_cast<void>(pool_.release(pool_.handle(page)));
  Entry* p = owner_[page.index()];
  if (p != nullptr && pool_.ref_count(page) == 1) page_became_cached(*p);
}

std::uint32_t PrefixRegistry::request_holders(PageId page) const noexcept {
  const std::uint32_t refs = pool_.ref_count(page);
  return owner_[page.index()] == nullptr ? refs : refs - 1;
}

bool PrefixRegistry::writable_by(PageId page, std::uint64_t serial) const noexcept {
  if (request_holders(page) != 1) return false;
  const Entry* p = owner_[page.index()];
  return p == nullptr || p->registrant == serial;
}

// ---- PrefixRegistry: prefixes and LRU ---------------------------------------

PrefixRegistry::Prefix* PrefixRegistry::find(std::string_view hash) noexcept {
  const auto it = prefixes_.find(hash);
  return it == prefixes_.end() ? nullptr : it->second.get();
}

const PrefixRegistry::Prefix* PrefixRegistry::find(std::string_view hash) const noexcept {
  const auto it = prefixes_.find(hash);
  return it == prefixes_.end() ? nullptr : it->second.get();
}

PrefixRegistry::Prefix& PrefixRegistry::prepare(std::string_view hash, Tokens tokens,
                                                std::size_t layers, std::size_t pages_per_layer,
                                                std::uint64_t registrant) {
  KVCACHE_EXPECTS(find(hash) == nullptr);
  auto entry = std::make_unique<Prefix>();
  entry->hash = std::string(hash);
  entry->tokens = tokens;
  entry->pages_per_layer = pages_per_layer;
  entry->pages.reserve(layers * pages_per_layer);
  entry->registrant = registrant;
  Prefix& ref = *entry;
  prefixes_.emplace(ref.hash, std::move(entry));  // may throw: nothing else changed
  return ref;
}

void PrefixRegistry::unprepare(Prefix& p) noexcept {
  KVCACHE_EXPECTS(p.pages.empty() && !p.on_lru);
  const auto it = prefixes_.find(p.hash);
  KVCACHE_ASSERT(it != prefixes_.end());
  prefixes_.erase(it);
}

void PrefixRegistry::hold(Entry& p, PageId page) noexcept {
  KVCACHE_EXPECTS(owner_[page.index()] == nullptr && p.pages.size() < p.pages.capacity());
  pool_.retain(pool_.handle(page));
  owner_[page.index()] = &p;
  p.pages.push_back(page);
  // The page has a request holder (the registrant): it is not cached.
  KVCACHE_ASSERT(pool_.ref_count(page) >= 2);
}

void PrefixRegistry::touch(Entry& p) noexcept {
  if (p.on_lru) {
    lru_unlink(p);
    lru_push_back(p);
  }
}

void PrefixRegistry::lru_unlink(Entry& p) noexcept {
  KVCACHE_EXPECTS(p.on_lru);
  (p.lru_prev == nullptr ? lru_head_ : p.lru_prev->lru_next) = p.lru_next;
  (p.lru_next == nullptr ? lru_tail_ : p.lru_next->lru_prev) = p.lru_prev;
  p.lru_prev = p.lru_next = nullptr;
  p.on_lru = false;
}

void PrefixRegistry::lru_push_back(Entry& p) noexcept {
  KVCACHE_EXPECTS(!p.on_lru);
  p.lru_prev = lru_tail_;
  p.lru_next = nullptr;
  (lru_tail_ == nullptr ? lru_head_ : lru_tail_->lru_next) = &p;
  lru_tail_ = &p;
  p.on_lru = true;
}

void PrefixRegistry::page_became_cached(Entry& p) noexcept {
  ++cached_;
  ++p.cached;
  // Newly idle pages make the prefix the most recently touched one.
  if (p.on_lru) lru_unlink(p);
  lru_push_back(p);
}

void PrefixRegistry::page_left_cache(Entry& p) noexcept {
  KVCACHE_EXPECTS(cached_ > 0 && p.cached > 0);
  --cached_;
  if (--p.cached == 0) lru_unlink(p);
}

// ---- PrefixRegistry: content blocks and events ------------------------------

std::uint64_t PrefixRegistry::salt_hash(std::string_view salt) noexcept {
  return XXH3_64bits(salt.data(), salt.size());
}

std::uint64_t PrefixRegistry::block_key(std::optional<std::uint64_t> parent, std::string_view salt,
                                        std::span<const TokenId> tokens) const noexcept {
  return block_key(parent, salt_hash(salt), tokens);
}

std::uint64_t PrefixRegistry::block_key(std::optional<std::uint64_t> parent,
                                        std::uint64_t salt_hash,
                                        std::span<const TokenId> tokens) const noexcept {
  if (collide_keys_) return 0x6b76636163686521ULL;  // testing: every key the same
  // seed = H(parent present, parent key, H(salt)); key = H_seed(token ids).
  // The salt goes through its own hash so that no salt can mimic a parent.
  const std::uint64_t head[3] = {parent.has_value() ? 1U : 0U, parent.value_or(0), salt_hash};  // NOLINT(cppcoreguidelines-avoid-c-arrays): hashed as bytes
  const XXH64_hash_t seed = XXH3_64bits(static_cast<const void*>(head), sizeof head);
  return XXH3_64bits_withSeed(tokens.data(), tokens.size_bytes(), seed);
}

PrefixRegistry::Block* PrefixRegistry::find_block(std::uint64_t key, std::uint64_t parent_serial,
                                                  std::span<const TokenId> tokens,
                                                  std::string_view salt) noexcept {
  auto [it, end] = blocks_.equal_range(key);
  for (; it != end; ++it) {
    Block& b = *it->second;
    // Confirmed by content, never by the key alone.
    if (b.parent_serial == parent_serial && b.salt == salt &&
        std::equal(b.tokens.begin(), b.tokens.end(), tokens.begin(), tokens.end())) {
      return &b;
    }
  }
  return nullptr;
}

PrefixRegistry::Block& PrefixRegistry::prepare_block(std::uint64_t key,
                                                     std::optional<std::uint64_t> parent_key,
                                                     std::uint64_t parent_serial,
                                                     std::uint64_t first_token,
                                                     std::span<const TokenId> tokens,
                                                     std::string_view salt, std::size_t layers,
                                                     std::uint64_t registrant) {
  auto b = std::make_unique<Block>();
  b->key = key;
  b->parent_key = parent_key;
  b->parent_serial = parent_serial;
  b->first_token = first_token;
  b->tokens.assign(tokens.begin(), tokens.end());
  b->salt = std::string(salt);
  b->pages.reserve(layers);
  b->registrant = registrant;
  b->serial = next_block_serial_;
  if (record_events_) {
    // Built now, where allocating may throw; recorded by stored() (noexcept).
    KvEvent& e = b->pending_event.emplace();
    e.kind = KvEventKind::stored;
    e.key = key;
    e.parent_key = parent_key;
    e.first_token = first_token;
    e.token_ids = b->tokens;
    e.salt = b->salt;
  }
  Block& ref = *b;
  blocks_.emplace(key, std::move(b));  // may throw: nothing else changed
  ++next_block_serial_;
  return ref;
}

// Removes `b` from the key index, which owns (and so destroys) it. O(blocks
// under its key): one unless keys collide.
void PrefixRegistry::erase_block(const Block& b) noexcept {
  auto [it, end] = blocks_.equal_range(b.key);
  while (it != end && it->second.get() != &b) ++it;
  KVCACHE_ASSERT(it != end);
  blocks_.erase(it);
}

void PrefixRegistry::unprepare_block(Block& b) noexcept {
  KVCACHE_EXPECTS(b.pages.empty() && !b.on_lru);
  const std::uint64_t serial = b.serial;
  erase_block(b);  // destroys b
  // Undone newest first, a block gives its serial back: a failed call leaves
  // even the serials as they were.
  if (serial + 1 == next_block_serial_) --next_block_serial_;
}

void PrefixRegistry::reserve_events(std::size_t stored) {
  if (!record_events_) return;
  const std::size_t want = events_.size() + stored + blocks_.size() + 1;
  // Geometric, so that a call per operation stays O(1) amortised.
  if (want > events_.capacity()) events_.reserve(std::max(want, 2 * events_.capacity()));
}

void PrefixRegistry::record(KvEvent e) noexcept {
  if (!record_events_) return;
  KVCACHE_EXPECTS(events_.size() < events_.capacity());  // reserved by the caller
  e.seq = next_event_seq_++;
  events_.push_back(std::move(e));  // no reallocation
}

void PrefixRegistry::stored(Block& b) noexcept {
  KVCACHE_EXPECTS(!b.pages.empty());
  ++counters_.blocks_stored;
  if (b.pending_event.has_value()) {
    record(std::move(*b.pending_event));
    b.pending_event.reset();
  }
}

// ---- PrefixRegistry: eviction -----------------------------------------------

void PrefixRegistry::evict(Entry& p, KvRemovalReason why) noexcept {
  if (p.on_lru) lru_unlink(p);
  std::uint64_t freed = 0;
  // Last pages first, like a request's free.
  for (auto it = p.pages.rbegin(); it != p.pages.rend(); ++it) {
    owner_[it->index()] = nullptr;
    if (pool_.release(pool_.handle(*it))) ++freed;
  }
  KVCACHE_ASSERT(freed == p.cached);
  cached_ -= p.cached;
  counters_.pages_evicted += freed;
  if (p.kind == Entry::Kind::prefix) {
    auto& prefix = static_cast<Prefix&>(p);  // NOLINT(cppcoreguidelines-pro-type-static-cast-downcast): `kind` names the type
    ++counters_.prefixes_evicted;
    const auto it = prefixes_.find(prefix.hash);
    KVCACHE_ASSERT(it != prefixes_.end());
    prefixes_.erase(it);  // destroys p
    return;
  }
  auto& block = static_cast<Block&>(p);  // NOLINT(cppcoreguidelines-pro-type-static-cast-downcast): `kind` names the type
  ++counters_.blocks_evicted;
  KvEvent e;
  e.kind = KvEventKind::removed;
  e.key = block.key;
  e.reason = why;
  record(std::move(e));
  erase_block(block);  // destroys p
}

void PrefixRegistry::evict_lru() noexcept {
  KVCACHE_EXPECTS(lru_head_ != nullptr);
  evict(*lru_head_);
}

void PrefixRegistry::make_room(std::uint64_t n, const Entry* keep) noexcept {
  KVCACHE_EXPECTS(pool_.free_pages().count() + evictable_except(keep) >= n);
  Entry* p = lru_head_;
  while (pool_.free_pages().count() < n) {
    KVCACHE_ASSERT(p != nullptr);
    Entry* next = p->lru_next;
    if (p != keep) evict(*p);  // INV-REF-5: skip the prefix being reused
    p = next;
  }
}

std::size_t PrefixRegistry::clear() {
  reserve_events(0);  // one removed per block and the all_cleared: may throw, nothing changed
  std::size_t n = 0;
  while (!prefixes_.empty()) {
    evict(*prefixes_.begin()->second, KvRemovalReason::cleared);
    ++n;
  }
  while (!blocks_.empty()) {
    evict(*blocks_.begin()->second, KvRemovalReason::cleared);
    ++n;
  }
  KvEvent e;
  e.kind = KvEventKind::all_cleared;
  record(std::move(e));
  return n;
}

bool PrefixRegistry::check_invariants(std::span<const std::uint64_t> request_holders) const {
  if (!pool_.check_invariants()) return false;
  if (request_holders.size() != owner_.size()) return false;
  std::uint64_t cached = 0;
  std::uint64_t refs = 0;
  for (std::size_t i = 0; i < owner_.size(); ++i) {
    const PageId page{static_cast<std::uint32_t>(i)};
    const std::uint64_t reg = owner_[i] == nullptr ? 0 : 1;
    if (pool_.ref_count(page) != request_holders[i] + reg) return false;  // INV-REF-1
    if (reg == 1 && request_holders[i] == 0) ++cached;
    refs += request_holders[i];
  }
  if (cached != cached_ || refs != request_refs_) return false;  // INV-REF-2
  std::unordered_map<const Entry*, std::uint64_t> owned;
  for (const Entry* o : owner_) {
    if (o != nullptr) ++owned[o];
  }
  std::uint64_t sum_cached = 0;
  std::size_t on_lru = 0;
  const auto entry_ok = [&](const Entry& p) {
    std::uint64_t c = 0;
    for (const PageId page : p.pages) {
      if (owner_[page.index()] != &p) return false;  // INV-REF-3
      if (request_holders[page.index()] == 0) ++c;
    }
    const auto o = owned.find(&p);
    if ((o == owned.end() ? 0 : o->second) != p.pages.size() || c != p.cached) return false;
    if (p.on_lru != (p.cached > 0)) return false;
    on_lru += p.on_lru ? 1 : 0;
    sum_cached += c;
    return true;
  };
  for (const auto& [hash, entry] : prefixes_) {
    if (entry->kind != Entry::Kind::prefix || entry->hash != hash || !entry_ok(*entry)) return false;
  }
  std::size_t layers = 0;
  for (const auto& [key, entry] : blocks_) {
    const Block& b = *entry;
    // INV-CONT-1: one page per layer (every block has the same count),
    // findable under its key, parents older than children.
    if (b.kind != Entry::Kind::block || b.key != key || b.pages.empty()) return false;
    if (layers == 0) layers = b.pages.size();
    if (b.pages.size() != layers || b.parent_serial >= b.serial) return false;
    if (b.parent_key.has_value() != (b.parent_serial != 0)) return false;
    if (!entry_ok(b)) return false;
  }
  if (sum_cached != cached_) return false;
  // INV-CONT-2: consecutive sequence numbers, ending just before the next.
  for (std::size_t i = 0; i < events_.size(); ++i) {
    if (events_[i].seq != next_event_seq_ - events_.size() + i) return false;
  }
  // The LRU list holds exactly the entries flagged on it, linked both ways.
  std::size_t walked = 0;
  const Entry* prev = nullptr;
  for (const Entry* p = lru_head_; p != nullptr; p = p->lru_next) {
    if (!p->on_lru || p->lru_prev != prev || ++walked > prefixes_.size() + blocks_.size()) {
      return false;
    }
    prev = p;
  }
  if (prev != lru_tail_ || walked != on_lru) return false;
  return pool_.free_pages().count() + used_pages().count() + cached_ ==
         pool_.capacity().count();
}

}  // namespace kvcache
