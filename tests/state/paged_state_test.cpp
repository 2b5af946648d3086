// paged_state_test.cpp: a RapidCheck state machine for kvcache::PagedKVCache
// without prefixes (prefix sharing has its own machine, prefix_state_test.cpp).
//
// Model (PagedModel): the config, the page size, the pool's page count, the
// storage mode, and a std::map from request id to, per layer, the list of
// (key bytes, value bytes) of every stored token; a token that was never
// written (the prompt of allocate_paged, the overload without data) is a row
// of zeros. Everything the cache reports is derived from it in the obvious
// way (CONTRACT.md, "PagedKVCache"): a layer of t tokens holds ceil(t /
// page_size) pages, used = the sum of those over requests and layers, free =
// total - used, cached = 0, stored = the sum of t, memory efficiency =
// stored / (used * page_size) (0 with no page), and a layer needs a page for
// its next token exactly when t is a multiple of the page size.
//
// Each test case draws one of three tiny configs:
//   {2, 1, 4, 1}  2 layers, 4-byte rows, byte overload only
//   {1, 1, 2, 4}  1 layer, 8-byte rows = 2 floats, byte and float overloads
//   {3, 2, 1, 1}  3 layers, 2-byte rows
// a page size of 1..4 tokens and a pool of 0..12 pages (the budget is not
// always a multiple of a page), so that running out of pages is frequent,
// and runs one command sequence over a fixed set of six ids (the empty id,
// one with an embedded NUL and one too long for the small string buffer
// among them).
//
// Before every command the whole model is compared with the cache, and again
// after it against the model's next state: stats() field by field, every
// request's tokens, pages_held, pages_needed_to_append, block tables (the
// right length, no page id twice over all tables, each page with reference
// count 1 and off the free list, the free list exactly the other pages),
// memory_efficiency, get_kv of every layer byte-exact (host mode), and
// check_invariants(). Commands that must not change anything (every failure
// path, and the queries) also compare a full snapshot of the observable
// state (stats, block tables with their page ids, get_kv bytes, the pool's
// free list in order) from before and after the call.
//
// Two machines: MatchesModel (Storage::host, every command) and
// StorageNone (Storage::none: bookkeeping only; the calls that pass or read
// KV bytes throw std::logic_error and change nothing).
//
// Volume: at least 10,000 commands per machine per ctest run (state_util.hpp
// drives RapidCheck in rounds until the counter reaches 10,000 *
// KVCACHE_STATE_SCALE).
//   Scale up:   KVCACHE_STATE_SCALE=100 ./paged_state_test
//   Reproduce:  run the test with the RC_PARAMS="reproduce=..." string that a
//               failure prints on exit, e.g.
//               RC_PARAMS="reproduce=BCh..." ./paged_state_test --gtest_filter=PagedKVCacheState.*
//   Other RapidCheck knobs (seed, max_size, max_success per round) go in
//   RC_PARAMS as usual.
#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/state.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <ostream>
#include <set>
#include <span>
#include <stdexcept>
#include <string>
#include <tuple>
#include <typeinfo>
#include <utility>
#include <vector>

#include "state_util.hpp"

import kvcache;

namespace {

using kvcache::Admission;
using kvcache::Bytes;
using kvcache::ModelConfig;
using kvcache::PagedKVCache;
using kvcache::PagedStats;
using kvcache::PageId;
using kvcache::Pages;
using kvcache::ShapeMismatch;
using kvcache::Storage;
using kvcache::Tokens;
using kvcache::UnknownRequest;
using kvcache_state::quoted;

using Row = std::vector<std::uint8_t>;
constexpr std::uint64_t kMax = std::numeric_limits<std::uint64_t>::max();
constexpr std::uint64_t kMaxPages = 12;
constexpr std::uint64_t kMaxPageSize = 4;

const std::vector<ModelConfig> kConfigs = {{2, 1, 4, 1}, {1, 1, 2, 4}, {3, 2, 1, 1}};
const std::string kLongId(80, 'r');
const std::vector<std::string> kIds = {"a", "b", "c", "", std::string("n\0ul", 4), kLongId};

struct Token {
  Row key;
  Row value;
};

struct Request {
  std::vector<std::vector<Token>> layers;  // per layer, the stored tokens in order
};

struct PagedModel {
  ModelConfig cfg;
  std::uint64_t page_size = 1;
  std::uint64_t total = 0;  // pages in the pool
  bool host = true;         // Storage::host
  std::map<std::string, Request> requests;

  [[nodiscard]] std::uint64_t row() const {
    return std::uint64_t{cfg.num_kv_heads} * cfg.head_dim * cfg.dtype_bytes;
  }
  [[nodiscard]] std::uint64_t floats() const {
    return std::uint64_t{cfg.num_kv_heads} * cfg.head_dim;
  }
  [[nodiscard]] std::uint64_t bytes_per_page() const { return 2 * page_size * row(); }
  [[nodiscard]] std::uint64_t pages_for(std::uint64_t tokens) const {
    return tokens / page_size + (tokens % page_size != 0 ? 1U : 0U);
  }
  [[nodiscard]] std::uint64_t used() const {
    std::uint64_t sum = 0;
    for (const auto& [id, r] : requests) {
      for (const auto& layer : r.layers) sum += pages_for(layer.size());
    }
    return sum;
  }
  [[nodiscard]] std::uint64_t free() const { return total - used(); }
  [[nodiscard]] std::uint64_t stored() const {
    std::uint64_t sum = 0;
    for (const auto& [id, r] : requests) {
      for (const auto& layer : r.layers) sum += layer.size();
    }
    return sum;
  }
  [[nodiscard]] bool has(const std::string& id) const { return requests.count(id) != 0; }
  [[nodiscard]] std::uint64_t tokens(const std::string& id, std::size_t layer) const {
    return requests.at(id).layers[layer].size();
  }
  // num_layers * ceil(prompt / page_size) does not fit in 64 bits.
  [[nodiscard]] bool overflows(std::uint64_t prompt) const {
    return pages_for(prompt) > kMax / cfg.num_layers;
  }
  [[nodiscard]] std::uint64_t need(std::uint64_t prompt) const {
    return pages_for(prompt) * cfg.num_layers;  // REQUIRES: !overflows(prompt)
  }
  [[nodiscard]] bool fits(std::uint64_t prompt) const {
    return !overflows(prompt) && need(prompt) <= free();
  }
  // The longest prompt that fits now.
  [[nodiscard]] std::uint64_t room() const { return free() / cfg.num_layers * page_size; }
  [[nodiscard]] bool needs_page(const std::string& id, std::size_t layer) const {
    return tokens(id, layer) % page_size == 0;
  }
  [[nodiscard]] std::uint64_t append_need(const std::string& id) const {
    std::uint64_t n = 0;
    for (std::size_t l = 0; l < cfg.num_layers; ++l) n += needs_page(id, l) ? 1U : 0U;
    return n;
  }
  [[nodiscard]] bool can_append(const std::string& id, std::size_t layer) const {
    return !needs_page(id, layer) || free() > 0;
  }
  [[nodiscard]] std::vector<std::string> live_ids() const {
    std::vector<std::string> out;
    for (const auto& [id, r] : requests) out.push_back(id);
    return out;
  }
  [[nodiscard]] std::vector<std::string> unknown_ids() const {
    std::vector<std::string> out;
    for (const std::string& id : kIds) {
      if (!has(id)) out.push_back(id);
    }
    return out;
  }
  // (id, layer) pairs where an append succeeds / finds no page.
  [[nodiscard]] std::vector<std::pair<std::string, std::size_t>> layers_where(
      bool appendable) const {
    std::vector<std::pair<std::string, std::size_t>> out;
    for (const auto& [id, r] : requests) {
      for (std::size_t l = 0; l < r.layers.size(); ++l) {
        if (can_append(id, l) == appendable) out.emplace_back(id, l);
      }
    }
    return out;
  }
  // (id, layer) pairs holding at least one token.
  [[nodiscard]] std::vector<std::pair<std::string, std::size_t>> nonempty_layers() const {
    std::vector<std::pair<std::string, std::size_t>> out;
    for (const auto& [id, r] : requests) {
      for (std::size_t l = 0; l < r.layers.size(); ++l) {
        if (!r.layers[l].empty()) out.emplace_back(id, l);
      }
    }
    return out;
  }
  [[nodiscard]] Token zero_token() const { return Token{Row(row(), 0), Row(row(), 0)}; }
};

struct PagedSut {
  PagedSut(const PagedModel& m, std::uint64_t budget, kvcache_state::Tally& counter)
      : cache(m.cfg, Bytes{budget}, Tokens{m.page_size}, m.host ? Storage::host : Storage::none),
        tally(counter) {}
  PagedKVCache cache;
  kvcache_state::Tally& tally;
};

std::span<const std::byte> as_span(const Row& r) { return std::as_bytes(std::span(r)); }
Row to_row(std::span<const std::byte> s) {
  Row r(s.size());
  if (!s.empty()) std::memcpy(r.data(), s.data(), s.size());
  return r;
}
Row to_row(const std::vector<float>& f) { return to_row(std::as_bytes(std::span(f))); }
std::vector<float> to_floats(const std::vector<std::uint32_t>& bits) {
  std::vector<float> out;
  for (const std::uint32_t b : bits) out.push_back(std::bit_cast<float>(b));
  return out;
}
std::vector<std::uint32_t> page_indices(std::span<const PageId> table) {
  std::vector<std::uint32_t> out;
  for (const PageId p : table) out.push_back(p.index());
  return out;
}

// The whole observable state of `cache` equals `m`.
void assert_matches(const PagedModel& m, const PagedKVCache& cache) {
  const PagedStats s = cache.stats();
  const std::uint64_t used = m.used();
  RC_ASSERT(s.total_pages == Pages{m.total});
  RC_ASSERT(s.free_pages == Pages{m.total - used});
  RC_ASSERT(s.used_pages == Pages{used});
  RC_ASSERT(s.cached_pages == Pages{0});
  RC_ASSERT(s.free_pages + s.used_pages + s.cached_pages == s.total_pages);
  RC_ASSERT(s.used_memory == Bytes{used * m.bytes_per_page()});
  RC_ASSERT(s.num_requests == m.requests.size());
  RC_ASSERT(s.prefix_hits == 0U);
  RC_ASSERT(s.prefix_misses == 0U);
  const double pct =
      m.total == 0 ? 0.0 : static_cast<double>(used) * 100.0 / static_cast<double>(m.total);
  RC_ASSERT(std::abs(s.utilization_pct - pct) <= 1e-9);
  RC_ASSERT(s.stored_tokens == Tokens{m.stored()});
  RC_ASSERT(s.page_size == Tokens{m.page_size});
  RC_ASSERT(s.bytes_per_page == Bytes{m.bytes_per_page()});
  RC_ASSERT(s.registered_prefixes == 0U);
  RC_ASSERT(cache.total_pages() == Pages{m.total});
  RC_ASSERT(cache.page_size() == Tokens{m.page_size});
  RC_ASSERT(cache.bytes_per_page() == Bytes{m.bytes_per_page()});
  RC_ASSERT(cache.storage() == (m.host ? Storage::host : Storage::none));
  RC_ASSERT(cache.config() == m.cfg);
  RC_ASSERT(cache.num_requests() == m.requests.size());
  std::vector<std::string> ids = cache.request_ids();
  std::sort(ids.begin(), ids.end());
  RC_ASSERT(ids == m.live_ids());
  for (const std::string& id : kIds) RC_ASSERT(cache.contains(id) == m.has(id));

  std::set<std::uint32_t> held;  // every page in a block table, each once
  for (const auto& [id, r] : m.requests) {
    std::uint64_t pages = 0;
    for (std::size_t l = 0; l < r.layers.size(); ++l) {
      const std::vector<Token>& want = r.layers[l];
      RC_ASSERT(cache.tokens(id, l) == Tokens{want.size()});
      const std::vector<std::uint32_t> table = page_indices(cache.block_table(id, l));
      RC_ASSERT(table.size() == m.pages_for(want.size()));
      for (const std::uint32_t p : table) {
        RC_ASSERT(p < m.total);
        RC_ASSERT(held.insert(p).second);  // no page in two places
        RC_ASSERT(cache.pool().ref_count(PageId{p}) == 1U);
      }
      pages += table.size();
      if (m.host) {
        const auto [keys, values] = cache.get_kv(id, l);
        RC_ASSERT(keys.size() == want.size());
        RC_ASSERT(values.size() == want.size());
        for (std::size_t t = 0; t < want.size(); ++t) {
          RC_ASSERT(to_row(keys[t]) == want[t].key);
          RC_ASSERT(to_row(values[t]) == want[t].value);
        }
      }
    }
    RC_ASSERT(cache.pages_held(id) == Pages{pages});
    RC_ASSERT(cache.pages_needed_to_append(id) == Pages{m.append_need(id)});
  }
  RC_ASSERT(held.size() == used);
  std::set<std::uint32_t> free_set;
  for (const PageId p : cache.pool().free_list()) {
    RC_ASSERT(p.index() < m.total);
    RC_ASSERT(held.count(p.index()) == 0U);
    RC_ASSERT(free_set.insert(p.index()).second);
  }
  RC_ASSERT(free_set.size() == m.total - used);
  const double efficiency =
      used == 0 ? 0.0
                : static_cast<double>(m.stored()) /
                      (static_cast<double>(used) * static_cast<double>(m.page_size));
  RC_ASSERT(std::abs(cache.memory_efficiency() - efficiency) <= 1e-12);
  RC_ASSERT(cache.memory_efficiency() >= 0.0 && cache.memory_efficiency() <= 1.0);
  RC_ASSERT(cache.max_prompt_tokens() == Tokens{m.total / m.cfg.num_layers * m.page_size});
  RC_ASSERT(cache.check_invariants());
}

// Everything observable, raw, for the "nothing changed" comparison of the
// commands that must not change the cache. Page ids included: a failed call
// must not even move a request to other pages.
struct Snapshot {
  std::vector<std::uint64_t> stats;  // every integer field of stats()
  double efficiency = 0;
  std::vector<std::string> ids;
  std::vector<std::vector<std::uint32_t>> tables;  // per id, per layer
  std::vector<std::uint64_t> tokens;
  std::vector<Row> rows;  // keys then values, per id, per layer (host mode)
  std::vector<std::uint32_t> free_list;

  explicit Snapshot(const PagedKVCache& cache) : efficiency(cache.memory_efficiency()) {
    const PagedStats s = cache.stats();
    stats = {s.total_pages.count(),  s.free_pages.count(),  s.used_pages.count(),
             s.cached_pages.count(), s.used_memory.count(), s.num_requests,
             s.prefix_hits,          s.prefix_misses,       s.stored_tokens.count(),
             s.registered_prefixes,  s.prefix.cow_copies,   s.prefix.pages_evicted};
    ids = cache.request_ids();
    std::sort(ids.begin(), ids.end());
    for (const std::string& id : ids) {
      for (std::size_t l = 0; l < cache.config().num_layers; ++l) {
        tables.push_back(page_indices(cache.block_table(id, l)));
        tokens.push_back(cache.tokens(id, l).count());
        if (cache.storage() == Storage::host) {
          const auto [keys, values] = cache.get_kv(id, l);
          for (const auto k : keys) rows.push_back(to_row(k));
          for (const auto v : values) rows.push_back(to_row(v));
        }
      }
    }
    for (const PageId p : cache.pool().free_list()) free_list.push_back(p.index());
  }
};

void assert_unchanged(const Snapshot& before, const PagedKVCache& cache) {
  const Snapshot after(cache);
  RC_ASSERT(after.stats == before.stats);
  RC_ASSERT(after.efficiency == before.efficiency);
  RC_ASSERT(after.ids == before.ids);
  RC_ASSERT(after.tables == before.tables);
  RC_ASSERT(after.tokens == before.tokens);
  RC_ASSERT(after.rows == before.rows);
  RC_ASSERT(after.free_list == before.free_list);
}

// Every command: compare the whole model before, run, compare the model's
// next state after; a command that must change nothing (`changes()` false)
// also compares the raw snapshot.
struct PagedCommand : rc::state::Command<PagedModel, PagedSut> {
  void run(const PagedModel& s0, PagedSut& sut) const final {
    sut.tally.record(typeid(*this));
    assert_matches(s0, sut.cache);
    if (changes()) {
      exec(s0, sut.cache);
    } else {
      const Snapshot before(sut.cache);
      exec(s0, sut.cache);
      assert_unchanged(before, sut.cache);
    }
    assert_matches(nextState(s0), sut.cache);
  }
  virtual void exec(const PagedModel& s0, PagedKVCache& cache) const = 0;
  [[nodiscard]] virtual bool changes() const { return false; }
};

template <class T>
T pick(const std::vector<T>& xs) {
  RC_PRE(!xs.empty());
  return *rc::gen::elementOf(xs);
}

// Key and value data for one token: random bytes through the byte overload,
// or random float bit patterns (NaNs included) through the float overload
// when dtype_bytes == 4.
struct Data {
  bool use_float = false;
  Row key;
  Row value;
  std::vector<float> fkey;
  std::vector<float> fvalue;

  static Data random(const PagedModel& m) {
    Data d;
    d.use_float = m.cfg.dtype_bytes == 4 && *rc::gen::arbitrary<bool>();
    if (d.use_float) {
      const auto gen = rc::gen::container<std::vector<std::uint32_t>>(
          m.floats(), rc::gen::arbitrary<std::uint32_t>());
      d.fkey = to_floats(*gen);
      d.fvalue = to_floats(*gen);
      d.key = to_row(d.fkey);
      d.value = to_row(d.fvalue);
    } else {
      d.key = *kvcache_state::bytes(m.row());
      d.value = *kvcache_state::bytes(m.row());
    }
    return d;
  }
  [[nodiscard]] bool valid_for(const PagedModel& m) const {
    return key.size() == m.row() && value.size() == m.row() &&
           (!use_float || m.cfg.dtype_bytes == 4);
  }
  [[nodiscard]] bool append(PagedKVCache& cache, const std::string& id, std::size_t layer) const {
    if (use_float) {
      return cache.append_token_paged(id, layer, std::span<const float>(fkey),
                                      std::span<const float>(fvalue));
    }
    return cache.append_token_paged(id, layer, as_span(key), as_span(value));
  }
  void write(PagedKVCache& cache, const std::string& id, std::size_t layer,
             std::size_t position) const {
    if (use_float) {
      cache.write_kv(id, layer, position, std::span<const float>(fkey),
                     std::span<const float>(fvalue));
    } else {
      cache.write_kv(id, layer, position, as_span(key), as_span(value));
    }
  }
  void show(std::ostream& os) const {
    os << (use_float ? "floats " : "bytes ") << rc::toString(key) << ", " << rc::toString(value);
  }
};

// ---- allocate_paged ----------------------------------------------------------

// A new id whose pages are free: true, each layer holds `prompt` zero tokens.
struct Allocate final : PagedCommand {
  std::string id;
  std::uint64_t prompt;
  explicit Allocate(const PagedModel& m)
      : id(pick(m.unknown_ids())),
        prompt(*rc::gen::inRange<std::uint64_t>(0, std::min<std::uint64_t>(m.room(), 9) + 1)) {}
  void checkPreconditions(const PagedModel& m) const override {
    RC_PRE(!m.has(id) && m.fits(prompt));
  }
  void apply(PagedModel& m) const override {
    m.requests[id] = Request{std::vector<std::vector<Token>>(
        m.cfg.num_layers, std::vector<Token>(prompt, m.zero_token()))};
  }
  void exec(const PagedModel& s0, PagedKVCache& cache) const override {
    RC_ASSERT(cache.pages_needed_to_allocate(Tokens{prompt}) == Pages{s0.need(prompt)});
    RC_ASSERT(cache.can_allocate(Tokens{prompt}));
    RC_ASSERT(cache.admission(Tokens{prompt}) == Admission::now);
    RC_ASSERT(cache.allocate_paged(id, Tokens{prompt}));
  }
  [[nodiscard]] bool changes() const override { return true; }
  void show(std::ostream& os) const override {
    os << "allocate_paged(" << quoted(id) << ", " << prompt << ") -> true";
  }
};

// A live id, any size (fitting or not): false.
struct AllocateDuplicate final : PagedCommand {
  std::string id;
  std::uint64_t prompt = *rc::gen::inRange<std::uint64_t>(0, 60);
  explicit AllocateDuplicate(const PagedModel& m) : id(pick(m.live_ids())) {}
  void checkPreconditions(const PagedModel& m) const override { RC_PRE(m.has(id)); }
  void exec(const PagedModel&, PagedKVCache& cache) const override {
    RC_ASSERT(!cache.allocate_paged(id, Tokens{prompt}));
  }
  void show(std::ostream& os) const override {
    os << "allocate_paged(" << quoted(id) << " (live), " << prompt << ") -> false";
  }
};

// A new id whose pages are not all free (just past what is left, or a
// prompt larger than the pool, up to 2^64 - 1 tokens): false.
struct AllocateOutOfMemory final : PagedCommand {
  std::string id;
  std::uint64_t prompt;
  explicit AllocateOutOfMemory(const PagedModel& m)
      : id(pick(m.unknown_ids())),
        prompt(*rc::gen::weightedOneOf<std::uint64_t>(
            {{6, rc::gen::inRange<std::uint64_t>(m.room() + 1, m.room() + 2 * m.page_size + 1)},
             {1, rc::gen::just(kMax / m.cfg.num_layers)},
             {1, rc::gen::just(kMax)}})) {}
  void checkPreconditions(const PagedModel& m) const override {
    RC_PRE(!m.has(id) && !m.overflows(prompt) && !m.fits(prompt));
  }
  void exec(const PagedModel& s0, PagedKVCache& cache) const override {
    RC_ASSERT(cache.pages_needed_to_allocate(Tokens{prompt}) == Pages{s0.need(prompt)});
    RC_ASSERT(!cache.can_allocate(Tokens{prompt}));
    RC_ASSERT(cache.admission(Tokens{prompt}) ==
              (s0.need(prompt) <= s0.total ? Admission::later : Admission::never));
    RC_ASSERT(!cache.allocate_paged(id, Tokens{prompt}));
  }
  void show(std::ostream& os) const override {
    os << "allocate_paged(" << quoted(id) << ", " << prompt << ") out of memory -> false";
  }
};

// num_layers * ceil(prompt / page_size) does not fit in 64 bits: overflow_error,
// before the duplicate check (so any id).
struct AllocateOverflow final : PagedCommand {
  std::string id = *rc::gen::elementOf(kIds);
  std::uint64_t prompt = kMax - *rc::gen::inRange<std::uint64_t>(0, 3);
  void checkPreconditions(const PagedModel& m) const override { RC_PRE(m.overflows(prompt)); }
  void exec(const PagedModel&, PagedKVCache& cache) const override {
    RC_ASSERT_THROWS_AS(static_cast<void>(cache.pages_needed_to_allocate(Tokens{prompt})),
                        std::overflow_error);
    RC_ASSERT_THROWS_AS(static_cast<void>(cache.allocate_paged(id, Tokens{prompt})),
                        std::overflow_error);
  }
  void show(std::ostream& os) const override {
    os << "allocate_paged(" << quoted(id) << ", " << prompt << ") -> overflow_error";
  }
};

// ---- append_token_paged ------------------------------------------------------

// One token with data (byte or float overload) where a page can be had.
struct AppendData final : PagedCommand {
  std::string id;
  std::size_t layer = 0;
  Data data;
  explicit AppendData(const PagedModel& m) : data(Data::random(m)) {
    std::tie(id, layer) = pick(m.layers_where(true));
  }
  void checkPreconditions(const PagedModel& m) const override {
    RC_PRE(m.host && m.has(id) && layer < m.cfg.num_layers);
    RC_PRE(m.can_append(id, layer));
    RC_PRE(data.valid_for(m));
  }
  void apply(PagedModel& m) const override {
    m.requests.at(id).layers[layer].push_back(Token{data.key, data.value});
  }
  void exec(const PagedModel&, PagedKVCache& cache) const override {
    RC_ASSERT(data.append(cache, id, layer));
  }
  [[nodiscard]] bool changes() const override { return true; }
  void show(std::ostream& os) const override {
    os << "append_token_paged(" << quoted(id) << ", layer " << layer << ", ";
    data.show(os);
    os << ") -> true";
  }
};

// One token without data where a page can be had: a zero token.
struct AppendZero final : PagedCommand {
  std::string id;
  std::size_t layer = 0;
  explicit AppendZero(const PagedModel& m) { std::tie(id, layer) = pick(m.layers_where(true)); }
  void checkPreconditions(const PagedModel& m) const override {
    RC_PRE(m.has(id) && layer < m.cfg.num_layers);
    RC_PRE(m.can_append(id, layer));
  }
  void apply(PagedModel& m) const override {
    m.requests.at(id).layers[layer].push_back(m.zero_token());
  }
  void exec(const PagedModel&, PagedKVCache& cache) const override {
    RC_ASSERT(cache.append_token_paged(id, layer));
  }
  [[nodiscard]] bool changes() const override { return true; }
  void show(std::ostream& os) const override {
    os << "append_token_paged(" << quoted(id) << ", layer " << layer << ") -> true";
  }
};

// The layer's last page is full (or it holds none) and no page is free: every
// overload returns false and changes nothing.
struct AppendNoPage final : PagedCommand {
  enum class Op { bytes, floats, zero };
  std::string id;
  std::size_t layer = 0;
  Op op;
  explicit AppendNoPage(const PagedModel& m)
      : op(m.host ? (m.cfg.dtype_bytes == 4 ? *rc::gen::element(Op::bytes, Op::floats, Op::zero)
                                            : *rc::gen::element(Op::bytes, Op::zero))
                  : Op::zero) {
    std::tie(id, layer) = pick(m.layers_where(false));
  }
  void checkPreconditions(const PagedModel& m) const override {
    RC_PRE(m.has(id) && layer < m.cfg.num_layers);
    RC_PRE(!m.can_append(id, layer));
    RC_PRE(op == Op::zero || m.host);
    RC_PRE(op != Op::floats || m.cfg.dtype_bytes == 4);
  }
  void exec(const PagedModel& s0, PagedKVCache& cache) const override {
    RC_ASSERT(cache.pages_needed_to_append(id) >= Pages{1});
    switch (op) {
      case Op::bytes: {
        const Row r(s0.row(), 0x5A);
        RC_ASSERT(!cache.append_token_paged(id, layer, as_span(r), as_span(r)));
        break;
      }
      case Op::floats: {
        const std::vector<float> f(s0.floats(), -2.5F);
        RC_ASSERT(!cache.append_token_paged(id, layer, std::span<const float>(f),
                                            std::span<const float>(f)));
        break;
      }
      case Op::zero:
        RC_ASSERT(!cache.append_token_paged(id, layer));
        break;
    }
  }
  void show(std::ostream& os) const override {
    static constexpr std::array<const char*, 3> names = {"bytes", "floats", "no data"};
    os << "append_token_paged(" << quoted(id) << ", layer " << layer << ", "
       << names.at(static_cast<std::size_t>(op)) << ") with no free page -> false";
  }
};

// One zero token in every layer when the pages for all of them are free.
struct AppendAllLayers final : PagedCommand {
  std::string id;
  explicit AppendAllLayers(const PagedModel& m) : id(pick(m.live_ids())) {}
  void checkPreconditions(const PagedModel& m) const override {
    RC_PRE(m.has(id));
    RC_PRE(m.append_need(id) <= m.free());
  }
  void apply(PagedModel& m) const override {
    for (auto& layer : m.requests.at(id).layers) layer.push_back(m.zero_token());
  }
  void exec(const PagedModel&, PagedKVCache& cache) const override {
    RC_ASSERT(cache.append_token_all_layers(id));
  }
  [[nodiscard]] bool changes() const override { return true; }
  void show(std::ostream& os) const override {
    os << "append_token_all_layers(" << quoted(id) << ") -> true";
  }
};

// Some layers need a page and fewer are free: false, no layer changes (not
// even those whose last page has room).
struct AppendAllLayersNoPage final : PagedCommand {
  std::string id;
  explicit AppendAllLayersNoPage(const PagedModel& m) : id(pick(m.live_ids())) {}
  void checkPreconditions(const PagedModel& m) const override {
    RC_PRE(m.has(id));
    RC_PRE(m.append_need(id) > m.free());
  }
  void exec(const PagedModel&, PagedKVCache& cache) const override {
    RC_ASSERT(!cache.append_token_all_layers(id));
  }
  void show(std::ostream& os) const override {
    os << "append_token_all_layers(" << quoted(id) << ") without enough pages -> false";
  }
};

// ---- write_kv ------------------------------------------------------------------

// Overwrites a stored token (of the prompt or appended), through the
// std::size_t or the Tokens position overload.
struct WriteKv final : PagedCommand {
  std::string id;
  std::size_t layer = 0;
  std::size_t position = 0;
  bool tokens_overload = *rc::gen::arbitrary<bool>();
  Data data;
  explicit WriteKv(const PagedModel& m) : data(Data::random(m)) {
    std::tie(id, layer) = pick(m.nonempty_layers());
    position = *rc::gen::inRange<std::size_t>(0, m.tokens(id, layer));
  }
  void checkPreconditions(const PagedModel& m) const override {
    RC_PRE(m.host && m.has(id) && layer < m.cfg.num_layers);
    RC_PRE(position < m.tokens(id, layer));
    RC_PRE(data.valid_for(m));
  }
  void apply(PagedModel& m) const override {
    m.requests.at(id).layers[layer][position] = Token{data.key, data.value};
  }
  void exec(const PagedModel&, PagedKVCache& cache) const override {
    if (tokens_overload && !data.use_float) {
      cache.write_kv(id, layer, Tokens{position}, as_span(data.key), as_span(data.value));
    } else if (tokens_overload) {
      cache.write_kv(id, layer, Tokens{position}, std::span<const float>(data.fkey),
                     std::span<const float>(data.fvalue));
    } else {
      data.write(cache, id, layer, position);
    }
  }
  [[nodiscard]] bool changes() const override { return true; }
  void show(std::ostream& os) const override {
    os << "write_kv(" << quoted(id) << ", layer " << layer << ", "
       << (tokens_overload ? "Tokens{" : "") << position << (tokens_overload ? "}" : "") << ", ";
    data.show(os);
    os << ")";
  }
};

// A position at or past the layer's end (just past, further, the largest
// size_t, a Tokens position past 64-bit size_t range is the same): a plain
// std::out_of_range, not UnknownRequest; nothing changes.
struct WriteKvPastEnd final : PagedCommand {
  std::string id;
  std::size_t layer = 0;
  std::uint64_t position = 0;
  bool tokens_overload = *rc::gen::arbitrary<bool>();
  bool use_float = false;
  explicit WriteKvPastEnd(const PagedModel& m)
      : id(pick(m.live_ids())), layer(*rc::gen::inRange<std::size_t>(0, m.cfg.num_layers)) {
    const std::uint64_t t = m.tokens(id, layer);
    position = *rc::gen::element<std::uint64_t>(t + 0, t + 1, t + m.page_size, kMax);
    use_float = m.cfg.dtype_bytes == 4 && *rc::gen::arbitrary<bool>();
  }
  void checkPreconditions(const PagedModel& m) const override {
    RC_PRE(m.host && m.has(id) && layer < m.cfg.num_layers);
    RC_PRE(position >= m.tokens(id, layer));
    RC_PRE(!use_float || m.cfg.dtype_bytes == 4);
  }
  void exec(const PagedModel& s0, PagedKVCache& cache) const override {
    const Row r(s0.row(), 0xEE);
    const std::vector<float> f(s0.floats(), 4.0F);
    try {
      if (tokens_overload && use_float) {
        cache.write_kv(id, layer, Tokens{position}, std::span<const float>(f),
                       std::span<const float>(f));
      } else if (tokens_overload) {
        cache.write_kv(id, layer, Tokens{position}, as_span(r), as_span(r));
      } else if (use_float) {
        cache.write_kv(id, layer, static_cast<std::size_t>(position), std::span<const float>(f),
                       std::span<const float>(f));
      } else {
        cache.write_kv(id, layer, static_cast<std::size_t>(position), as_span(r), as_span(r));
      }
    } catch (const UnknownRequest& e) {
      RC_FAIL(std::string("UnknownRequest for a live id: ") + e.what());
    } catch (const std::out_of_range&) {
      return;
    } catch (const std::exception& e) {
      RC_FAIL(std::string("not std::out_of_range: ") + e.what());
    }
    RC_FAIL("no exception");
  }
  void show(std::ostream& os) const override {
    os << "write_kv(" << quoted(id) << ", layer " << layer << ", "
       << (tokens_overload ? "Tokens{" : "") << position << (tokens_overload ? "}" : "") << ", "
       << (use_float ? "floats" : "bytes") << ") past the end -> out_of_range";
  }
};

// ---- get_kv, free --------------------------------------------------------------

// get_kv of one layer, byte-exact, through every way TokenRows offers.
struct GetKv final : PagedCommand {
  std::string id;
  std::size_t layer = 0;
  explicit GetKv(const PagedModel& m)
      : id(pick(m.live_ids())), layer(*rc::gen::inRange<std::size_t>(0, m.cfg.num_layers)) {}
  void checkPreconditions(const PagedModel& m) const override {
    RC_PRE(m.host && m.has(id) && layer < m.cfg.num_layers);
  }
  void exec(const PagedModel& s0, PagedKVCache& cache) const override {
    const std::vector<Token>& want = s0.requests.at(id).layers[layer];
    const auto [keys, values] = cache.get_kv(id, layer);
    RC_ASSERT(keys.size() == want.size());
    RC_ASSERT(values.size() == want.size());
    RC_ASSERT(keys.empty() == want.empty());
    RC_ASSERT(keys.row_bytes() == s0.row());
    RC_ASSERT(values.row_bytes() == s0.row());
    std::size_t t = 0;
    for (const std::span<const std::byte> k : keys) {
      RC_ASSERT(t < want.size());
      RC_ASSERT(to_row(k) == want[t].key);
      RC_ASSERT(to_row(values.at(t)) == want[t].value);
      ++t;
    }
    RC_ASSERT(t == want.size());
    RC_ASSERT_THROWS_AS(static_cast<void>(keys.at(want.size())), std::out_of_range);
    RC_ASSERT_THROWS_AS(static_cast<void>(values.at(want.size())), std::out_of_range);
  }
  void show(std::ostream& os) const override {
    os << "get_kv(" << quoted(id) << ", layer " << layer << ")";
  }
};

struct Free final : PagedCommand {
  std::string id;
  explicit Free(const PagedModel& m) : id(pick(m.live_ids())) {}
  void checkPreconditions(const PagedModel& m) const override { RC_PRE(m.has(id)); }
  void apply(PagedModel& m) const override { m.requests.erase(id); }
  void exec(const PagedModel&, PagedKVCache& cache) const override { cache.free(id); }
  [[nodiscard]] bool changes() const override { return true; }
  void show(std::ostream& os) const override { os << "free(" << quoted(id) << ")"; }
};

// ---- bad calls -------------------------------------------------------------------

// An id the cache does not hold, everything else valid: UnknownRequest from
// every call that takes an id (fork: an unknown parent). In Storage::none mode
// only the calls that pass no KV bytes (the others throw logic_error first).
struct UnknownId final : PagedCommand {
  enum class Op {
    append_bytes,
    append_floats,
    append_zero,
    append_all,
    write_kv,
    write_kv_floats,
    get_kv,
    free,
    block_table,
    pages_held,
    pages_needed,
    tokens,
    fork
  };
  Op op;
  std::string id;
  std::size_t layer = 0;
  std::string child = *rc::gen::elementOf(kIds);
  explicit UnknownId(const PagedModel& m)
      : op(*rc::gen::elementOf(ops(m))),
        id(pick(m.unknown_ids())),
        layer(*rc::gen::inRange<std::size_t>(0, m.cfg.num_layers)) {}
  static std::vector<Op> ops(const PagedModel& m) {
    std::vector<Op> out = {Op::append_zero, Op::append_all,   Op::free,   Op::block_table,
                           Op::pages_held,  Op::pages_needed, Op::tokens, Op::fork};
    if (m.host) {
      out.insert(out.end(), {Op::append_bytes, Op::write_kv, Op::get_kv});
      if (m.cfg.dtype_bytes == 4) out.insert(out.end(), {Op::append_floats, Op::write_kv_floats});
    }
    return out;
  }
  void checkPreconditions(const PagedModel& m) const override {
    RC_PRE(!m.has(id) && layer < m.cfg.num_layers);
    const std::vector<Op> allowed = ops(m);
    RC_PRE(std::find(allowed.begin(), allowed.end(), op) != allowed.end());
  }
  void exec(const PagedModel& s0, PagedKVCache& cache) const override {
    const Row r(s0.row(), 9);
    const std::vector<float> f(s0.floats(), 9.0F);
    switch (op) {
      case Op::append_bytes:
        RC_ASSERT_THROWS_AS(
            static_cast<void>(cache.append_token_paged(id, layer, as_span(r), as_span(r))),
            UnknownRequest);
        break;
      case Op::append_floats:
        RC_ASSERT_THROWS_AS(static_cast<void>(cache.append_token_paged(
                                id, layer, std::span<const float>(f), std::span<const float>(f))),
                            UnknownRequest);
        break;
      case Op::append_zero:
        RC_ASSERT_THROWS_AS(static_cast<void>(cache.append_token_paged(id, layer)), UnknownRequest);
        break;
      case Op::append_all:
        RC_ASSERT_THROWS_AS(static_cast<void>(cache.append_token_all_layers(id)), UnknownRequest);
        break;
      case Op::write_kv:
        RC_ASSERT_THROWS_AS(cache.write_kv(id, layer, std::size_t{0}, as_span(r), as_span(r)),
                            UnknownRequest);
        break;
      case Op::write_kv_floats:
        RC_ASSERT_THROWS_AS(cache.write_kv(id, layer, std::size_t{0}, std::span<const float>(f),
                                           std::span<const float>(f)),
                            UnknownRequest);
        break;
      case Op::get_kv:
        RC_ASSERT_THROWS_AS(static_cast<void>(cache.get_kv(id, layer)), UnknownRequest);
        break;
      case Op::free:
        RC_ASSERT_THROWS_AS(cache.free(id), UnknownRequest);
        break;
      case Op::block_table:
        RC_ASSERT_THROWS_AS(static_cast<void>(cache.block_table(id, layer)), UnknownRequest);
        break;
      case Op::pages_held:
        RC_ASSERT_THROWS_AS(static_cast<void>(cache.pages_held(id)), UnknownRequest);
        break;
      case Op::pages_needed:
        RC_ASSERT_THROWS_AS(static_cast<void>(cache.pages_needed_to_append(id)), UnknownRequest);
        break;
      case Op::tokens:
        RC_ASSERT_THROWS_AS(static_cast<void>(cache.tokens(id, layer)), UnknownRequest);
        break;
      case Op::fork:
        RC_ASSERT_THROWS_AS(static_cast<void>(cache.fork(id, child)), UnknownRequest);
        break;
    }
  }
  void show(std::ostream& os) const override {
    static constexpr std::array<const char*, 13> names = {"append_token_paged(bytes)",
                                                          "append_token_paged(floats)",
                                                          "append_token_paged(no data)",
                                                          "append_token_all_layers",
                                                          "write_kv",
                                                          "write_kv(floats)",
                                                          "get_kv",
                                                          "free",
                                                          "block_table",
                                                          "pages_held",
                                                          "pages_needed_to_append",
                                                          "tokens",
                                                          "fork"};
    os << names.at(static_cast<std::size_t>(op)) << "(" << quoted(id) << " (unknown), layer "
       << layer;
    if (op == Op::fork) os << ", child " << quoted(child);
    os << ") -> UnknownRequest";
  }
};

// A layer >= num_layers, with any id (live or not) and any row length:
// std::out_of_range, and not UnknownRequest (the layer is checked first).
struct LayerOutOfRange final : PagedCommand {
  enum class Op { append_bytes, append_floats, append_zero, write_kv, get_kv, block_table, tokens };
  Op op;
  std::string id = *rc::gen::elementOf(kIds);
  std::size_t layer;
  std::size_t len = *rc::gen::inRange<std::size_t>(0, 10);
  explicit LayerOutOfRange(const PagedModel& m)
      : op(*rc::gen::elementOf(ops(m))),
        layer(*rc::gen::element<std::size_t>(m.cfg.num_layers, m.cfg.num_layers + 1,
                                             std::numeric_limits<std::size_t>::max())) {}
  static std::vector<Op> ops(const PagedModel& m) {
    if (!m.host) return {Op::append_zero, Op::block_table, Op::tokens};
    return {Op::append_bytes, Op::append_floats, Op::append_zero, Op::write_kv,
            Op::get_kv,       Op::block_table,   Op::tokens};
  }
  void checkPreconditions(const PagedModel& m) const override {
    RC_PRE(layer >= m.cfg.num_layers);
    const std::vector<Op> allowed = ops(m);
    RC_PRE(std::find(allowed.begin(), allowed.end(), op) != allowed.end());
  }
  void exec(const PagedModel&, PagedKVCache& cache) const override {
    const Row r(len, 7);
    const std::vector<float> f(len, 7.0F);
    try {
      switch (op) {
        case Op::append_bytes:
          static_cast<void>(cache.append_token_paged(id, layer, as_span(r), as_span(r)));
          break;
        case Op::append_floats:
          static_cast<void>(cache.append_token_paged(id, layer, std::span<const float>(f),
                                                     std::span<const float>(f)));
          break;
        case Op::append_zero:
          static_cast<void>(cache.append_token_paged(id, layer));
          break;
        case Op::write_kv:
          cache.write_kv(id, layer, std::size_t{0}, as_span(r), as_span(r));
          break;
        case Op::get_kv:
          static_cast<void>(cache.get_kv(id, layer));
          break;
        case Op::block_table:
          static_cast<void>(cache.block_table(id, layer));
          break;
        case Op::tokens:
          static_cast<void>(cache.tokens(id, layer));
          break;
      }
    } catch (const UnknownRequest& e) {
      RC_FAIL(std::string("UnknownRequest instead of a plain std::out_of_range: ") + e.what());
    } catch (const std::out_of_range&) {
      return;
    } catch (const std::exception& e) {
      RC_FAIL(std::string("not std::out_of_range: ") + e.what());
    }
    RC_FAIL("no exception");
  }
  void show(std::ostream& os) const override {
    static constexpr std::array<const char*, 7> names = {"append_token_paged(bytes)",
                                                         "append_token_paged(floats)",
                                                         "append_token_paged(no data)",
                                                         "write_kv",
                                                         "get_kv",
                                                         "block_table",
                                                         "tokens"};
    os << names.at(static_cast<std::size_t>(op)) << "(" << quoted(id) << ", layer " << layer
       << ", rows of " << len << ") -> out_of_range";
  }
};

// A key or value of the wrong length (bytes, or floats when dtype_bytes == 4),
// with a valid layer and any id, for append and write_kv (any position):
// ShapeMismatch, checked before the id and the position.
struct WrongShape final : PagedCommand {
  bool write = *rc::gen::arbitrary<bool>();
  std::string id = *rc::gen::elementOf(kIds);
  std::size_t layer;
  std::size_t position = *rc::gen::inRange<std::size_t>(0, 20);
  bool use_float;
  std::size_t key_len = 0;  // bytes or floats
  std::size_t value_len = 0;
  explicit WrongShape(const PagedModel& m)
      : layer(*rc::gen::inRange<std::size_t>(0, m.cfg.num_layers)),
        use_float(m.cfg.dtype_bytes == 4 && *rc::gen::arbitrary<bool>()) {
    const std::size_t right = use_float ? m.floats() : m.row();
    const auto len = rc::gen::element<std::size_t>(0, right - 1, right, right + 1, 2 * right);
    key_len = *len;
    value_len = *len;
    RC_PRE(key_len != right || value_len != right);
  }
  void checkPreconditions(const PagedModel& m) const override {
    RC_PRE(m.host && layer < m.cfg.num_layers && (!use_float || m.cfg.dtype_bytes == 4));
    const std::size_t right = use_float ? m.floats() : m.row();
    RC_PRE(key_len != right || value_len != right);
  }
  void exec(const PagedModel&, PagedKVCache& cache) const override {
    const Row k(key_len, 1);
    const Row v(value_len, 2);
    const std::vector<float> fk(key_len, 0.25F);
    const std::vector<float> fv(value_len, 0.5F);
    if (write && use_float) {
      RC_ASSERT_THROWS_AS(cache.write_kv(id, layer, position, std::span<const float>(fk),
                                         std::span<const float>(fv)),
                          ShapeMismatch);
    } else if (write) {
      RC_ASSERT_THROWS_AS(cache.write_kv(id, layer, position, as_span(k), as_span(v)),
                          ShapeMismatch);
    } else if (use_float) {
      RC_ASSERT_THROWS_AS(static_cast<void>(cache.append_token_paged(
                              id, layer, std::span<const float>(fk), std::span<const float>(fv))),
                          ShapeMismatch);
    } else {
      RC_ASSERT_THROWS_AS(
          static_cast<void>(cache.append_token_paged(id, layer, as_span(k), as_span(v))),
          ShapeMismatch);
    }
  }
  void show(std::ostream& os) const override {
    os << (write ? "write_kv(" : "append_token_paged(") << quoted(id) << ", layer " << layer;
    if (write) os << ", position " << position;
    os << ", " << key_len << " + " << value_len << (use_float ? " floats" : " bytes")
       << ") -> ShapeMismatch";
  }
};

// The float overload (append or write_kv) when dtype_bytes != 4, whatever the
// float count and the id: ShapeMismatch.
struct FloatWrongDtype final : PagedCommand {
  bool write = *rc::gen::arbitrary<bool>();
  std::string id = *rc::gen::elementOf(kIds);
  std::size_t layer;
  std::size_t len;  // floats, key and value
  explicit FloatWrongDtype(const PagedModel& m)
      : layer(*rc::gen::inRange<std::size_t>(0, m.cfg.num_layers)),
        len(*rc::gen::element<std::size_t>(m.floats(), m.row() / 4, 0, m.floats() + 1)) {}
  void checkPreconditions(const PagedModel& m) const override {
    RC_PRE(m.host && m.cfg.dtype_bytes != 4 && layer < m.cfg.num_layers);
  }
  void exec(const PagedModel&, PagedKVCache& cache) const override {
    const std::vector<float> f(len, 3.0F);
    if (write) {
      RC_ASSERT_THROWS_AS(cache.write_kv(id, layer, std::size_t{0}, std::span<const float>(f),
                                         std::span<const float>(f)),
                          ShapeMismatch);
    } else {
      RC_ASSERT_THROWS_AS(static_cast<void>(cache.append_token_paged(
                              id, layer, std::span<const float>(f), std::span<const float>(f))),
                          ShapeMismatch);
    }
  }
  void show(std::ostream& os) const override {
    os << (write ? "write_kv" : "append_token_paged") << "(" << quoted(id) << ", layer " << layer
       << ", " << len << " floats) on dtype != 4 -> ShapeMismatch";
  }
};

// Storage::none: every call that passes or reads KV bytes, with otherwise
// valid arguments (a live id, a valid layer, rows of the right size, a stored
// position), throws std::logic_error and changes nothing.
struct NoStorageBytes final : PagedCommand {
  enum class Op { append_bytes, append_floats, write_bytes, write_floats, get_kv };
  Op op;
  std::string id;
  std::size_t layer = 0;
  explicit NoStorageBytes(const PagedModel& m)
      : op(m.cfg.dtype_bytes == 4
               ? *rc::gen::element(Op::append_bytes, Op::append_floats, Op::write_bytes,
                                   Op::write_floats, Op::get_kv)
               : *rc::gen::element(Op::append_bytes, Op::write_bytes, Op::get_kv)),
        id(pick(m.live_ids())),
        layer(*rc::gen::inRange<std::size_t>(0, m.cfg.num_layers)) {}
  void checkPreconditions(const PagedModel& m) const override {
    RC_PRE(!m.host && m.has(id) && layer < m.cfg.num_layers);
    RC_PRE((op != Op::append_floats && op != Op::write_floats) || m.cfg.dtype_bytes == 4);
  }
  void exec(const PagedModel& s0, PagedKVCache& cache) const override {
    const Row r(s0.row(), 3);
    const std::vector<float> f(s0.floats(), 3.0F);
    const std::size_t position = s0.tokens(id, layer) == 0 ? 0 : s0.tokens(id, layer) - 1;
    switch (op) {
      case Op::append_bytes:
        RC_ASSERT_THROWS_AS(
            static_cast<void>(cache.append_token_paged(id, layer, as_span(r), as_span(r))),
            std::logic_error);
        break;
      case Op::append_floats:
        RC_ASSERT_THROWS_AS(static_cast<void>(cache.append_token_paged(
                                id, layer, std::span<const float>(f), std::span<const float>(f))),
                            std::logic_error);
        break;
      case Op::write_bytes:
        RC_ASSERT_THROWS_AS(cache.write_kv(id, layer, position, as_span(r), as_span(r)),
                            std::logic_error);
        break;
      case Op::write_floats:
        RC_ASSERT_THROWS_AS(cache.write_kv(id, layer, position, std::span<const float>(f),
                                           std::span<const float>(f)),
                            std::logic_error);
        break;
      case Op::get_kv:
        RC_ASSERT_THROWS_AS(static_cast<void>(cache.get_kv(id, layer)), std::logic_error);
        break;
    }
  }
  void show(std::ostream& os) const override {
    static constexpr std::array<const char*, 5> names = {
        "append_token_paged(bytes)", "append_token_paged(floats)", "write_kv(bytes)",
        "write_kv(floats)", "get_kv"};
    os << names.at(static_cast<std::size_t>(op)) << "(" << quoted(id) << ", layer " << layer
       << ") on Storage::none -> logic_error";
  }
};

// stats() and the other queries are compared around every command; this one
// makes sure there is always a valid command, and that the queries alone
// change nothing.
struct Stats final : PagedCommand {
  void exec(const PagedModel&, PagedKVCache& cache) const override {
    static_cast<void>(cache.stats());
    static_cast<void>(cache.memory_efficiency());
  }
  void show(std::ostream& os) const override { os << "stats()"; }
};

// Weights: allocate, append and free more often than the failure paths, so
// that pools fill up and drain.
using HostCommands = kvcache_state::CommandList<
    Allocate, Allocate, Allocate, AllocateDuplicate, AllocateOutOfMemory, AllocateOutOfMemory,
    AllocateOverflow, AppendData, AppendData, AppendData, AppendData, AppendZero, AppendNoPage,
    AppendNoPage, AppendAllLayers, AppendAllLayersNoPage, WriteKv, WriteKv, WriteKvPastEnd, GetKv,
    Free, Free, UnknownId, LayerOutOfRange, WrongShape, FloatWrongDtype, Stats>;

using NoneCommands =
    kvcache_state::CommandList<Allocate, Allocate, Allocate, AllocateDuplicate, AllocateOutOfMemory,
                               AllocateOutOfMemory, AllocateOverflow, AppendZero, AppendZero,
                               AppendZero, AppendNoPage, AppendNoPage, AppendAllLayers,
                               AppendAllLayers, AppendAllLayersNoPage, Free, Free, UnknownId,
                               LayerOutOfRange, NoStorageBytes, Stats>;

template <class Commands>
void paged_property(bool host, kvcache_state::Tally& tally) {
  PagedModel initial;
  // An index, so that a failure shows it (RapidCheck cannot print a ModelConfig).
  initial.cfg = kConfigs.at(*rc::gen::inRange<std::size_t>(0, kConfigs.size()));
  initial.page_size = *rc::gen::inRange<std::uint64_t>(1, kMaxPageSize + 1);
  initial.total = *rc::gen::inRange<std::uint64_t>(0, kMaxPages + 1);
  initial.host = host;
  const std::uint64_t slack = *rc::gen::inRange<std::uint64_t>(0, initial.bytes_per_page());
  const std::uint64_t budget = initial.total * initial.bytes_per_page() + slack;
  PagedSut sut(initial, budget, tally);
  rc::state::check(initial, sut, Commands::generator());
}

TEST(PagedKVCacheState, MatchesModel) {
  kvcache_state::Tally tally;
  kvcache_state::drive(
      "PagedKVCacheState/MatchesModel", [&tally] { paged_property<HostCommands>(true, tally); },
      tally, kvcache_state::command_target(), HostCommands::kinds);
}

TEST(PagedKVCacheState, StorageNone) {
  kvcache_state::Tally tally;
  kvcache_state::drive(
      "PagedKVCacheState/StorageNone", [&tally] { paged_property<NoneCommands>(false, tally); },
      tally, kvcache_state::command_target(), NoneCommands::kinds);
}

// ---- stored-token overflow (DISABLED: a library bug) ------------------------
//
// LIBRARY BUG (reported, not fixed here): PagedKVCache keeps stats().
// stored_tokens in checked 64-bit arithmetic, but fork, allocate_paged (both
// overloads) and append_token_paged add to it only after the request or the
// token is in place, so an overflow_error there leaves the cache changed (a
// fork's child is inserted) and check_invariants() false: no strong guarantee.
// Reachable only with huge pages (Storage::none, 2^61 tokens a page), where a
// few forks of one request hold 2^64 tokens. This machine expects, when the
// sum would pass 2^64 - 1, std::overflow_error and no change (the existing
// design: checked Tokens); allocations and forks that fit must succeed.
// Minimal sequence RapidCheck found (RC_PARAMS="seed=1"):
//   allocate_paged("b", 4611686018427387904) -> true      (2^62 tokens, 2 pages)
//   fork("b", "c") -> true
//   fork("c", "") -> true
//   fork("c", "a") -> overflow_error, nothing changed     (the child "a" stays,
//                                                          num_requests 4)
// RC_PARAMS="reproduce=BYCUhdWZktkVDF2YoV2U0FGdl9yU09mclRGVvtWZuN3T2Vmcmx2b3FAAAAAAAAAABAAAAAAAAAQAAAAAAAAAAEAAAAAAAAAAABwBGAAAAEgD"
//   ./paged_state_test --gtest_also_run_disabled_tests --gtest_filter='*StoredTokensOverflow'
// Enable when fixed.

constexpr std::uint64_t kHugePage = std::uint64_t{1} << 61;  // tokens a page

struct HugeModel {
  // Per request: its tokens (one layer) and the allocation it shares pages with.
  std::map<std::string, std::pair<std::uint64_t, std::uint64_t>> requests;
  std::map<std::uint64_t, std::uint64_t> allocations;  // serial -> pages
  std::uint64_t next_serial = 1;
  static constexpr std::uint64_t total = 2;

  [[nodiscard]] bool has(const std::string& id) const { return requests.count(id) != 0; }
  // Never past 2^64 - 1: the commands that would pass it are the failures.
  [[nodiscard]] std::uint64_t stored() const {
    std::uint64_t n = 0;
    for (const auto& [id, r] : requests) n += r.first;
    return n;
  }
  [[nodiscard]] bool overflows(std::uint64_t more) const { return more > kMax - stored(); }
  [[nodiscard]] std::uint64_t used() const {
    std::uint64_t n = 0;
    for (const auto& [serial, pages] : allocations) {
      const bool held = std::any_of(requests.begin(), requests.end(),
                                    [&](const auto& r) { return r.second.second == serial; });
      n += held ? pages : 0U;
    }
    return n;
  }
  [[nodiscard]] std::vector<std::string> live_ids() const {
    std::vector<std::string> out;
    for (const auto& [id, r] : requests) out.push_back(id);
    return out;
  }
  [[nodiscard]] std::vector<std::string> unknown_ids() const {
    std::vector<std::string> out;
    for (const std::string& id : kIds) {
      if (!has(id)) out.push_back(id);
    }
    return out;
  }
};

struct HugeSut {
  explicit HugeSut(kvcache_state::Tally& counter)
      : cache(ModelConfig{1, 1, 1, 1}, Bytes{std::uint64_t{1} << 63}, Tokens{kHugePage},
              Storage::none),
        tally(counter) {}
  PagedKVCache cache;
  kvcache_state::Tally& tally;
};

void assert_matches(const HugeModel& m, const PagedKVCache& cache) {
  const PagedStats s = cache.stats();
  RC_ASSERT(s.total_pages == Pages{HugeModel::total});
  RC_ASSERT(s.used_pages == Pages{m.used()});
  RC_ASSERT(s.free_pages == Pages{HugeModel::total - m.used()});
  RC_ASSERT(s.num_requests == m.requests.size());
  RC_ASSERT(s.stored_tokens == Tokens{m.stored()});
  for (const auto& [id, r] : m.requests) RC_ASSERT(cache.tokens(id, 0) == Tokens{r.first});
  RC_ASSERT(cache.check_invariants());
}

struct HugeCommand : rc::state::Command<HugeModel, HugeSut> {
  void run(const HugeModel& s0, HugeSut& sut) const final {
    sut.tally.record(typeid(*this));
    assert_matches(s0, sut.cache);
    const Snapshot before(sut.cache);
    exec(sut.cache);
    if (!changes()) assert_unchanged(before, sut.cache);
    assert_matches(nextState(s0), sut.cache);
  }
  virtual void exec(PagedKVCache& cache) const = 0;
  [[nodiscard]] virtual bool changes() const { return false; }
};

struct HugeAllocate final : HugeCommand {
  std::string id;
  std::uint64_t prompt = *rc::gen::element(kHugePage, 2 * kHugePage, std::uint64_t{1});
  explicit HugeAllocate(const HugeModel& m) : id(pick(m.unknown_ids())) {}
  [[nodiscard]] std::uint64_t pages() const { return (prompt + kHugePage - 1) / kHugePage; }
  void checkPreconditions(const HugeModel& m) const override {
    RC_PRE(!m.has(id) && pages() <= HugeModel::total - m.used() && !m.overflows(prompt));
  }
  void apply(HugeModel& m) const override {
    m.allocations[m.next_serial] = pages();
    m.requests[id] = {prompt, m.next_serial++};
  }
  void exec(PagedKVCache& cache) const override {
    RC_ASSERT(cache.allocate_paged(id, Tokens{prompt}));
  }
  [[nodiscard]] bool changes() const override { return true; }
  void show(std::ostream& os) const override {
    os << "allocate_paged(" << quoted(id) << ", " << prompt << ") -> true";
  }
};

struct HugeAllocateOverflow final : HugeCommand {
  std::string id;
  std::uint64_t prompt = *rc::gen::element(kHugePage, 2 * kHugePage, std::uint64_t{1});
  explicit HugeAllocateOverflow(const HugeModel& m) : id(pick(m.unknown_ids())) {}
  void checkPreconditions(const HugeModel& m) const override {
    const std::uint64_t pages = (prompt + kHugePage - 1) / kHugePage;
    RC_PRE(!m.has(id) && pages <= HugeModel::total - m.used() && m.overflows(prompt));
  }
  void exec(PagedKVCache& cache) const override {
    RC_ASSERT_THROWS_AS(static_cast<void>(cache.allocate_paged(id, Tokens{prompt})),
                        std::overflow_error);
  }
  void show(std::ostream& os) const override {
    os << "allocate_paged(" << quoted(id) << ", " << prompt
       << ") -> overflow_error, nothing changed";
  }
};

struct HugeFork final : HugeCommand {
  std::string parent;
  std::string child;
  explicit HugeFork(const HugeModel& m)
      : parent(pick(m.live_ids())), child(pick(m.unknown_ids())) {}
  void checkPreconditions(const HugeModel& m) const override {
    RC_PRE(m.has(parent) && !m.has(child));
    RC_PRE(!m.overflows(m.requests.at(parent).first));
  }
  void apply(HugeModel& m) const override { m.requests[child] = m.requests.at(parent); }
  void exec(PagedKVCache& cache) const override { RC_ASSERT(cache.fork(parent, child)); }
  [[nodiscard]] bool changes() const override { return true; }
  void show(std::ostream& os) const override {
    os << "fork(" << quoted(parent) << ", " << quoted(child) << ") -> true";
  }
};

struct HugeForkOverflow final : HugeCommand {
  std::string parent;
  std::string child;
  explicit HugeForkOverflow(const HugeModel& m)
      : parent(pick(m.live_ids())), child(pick(m.unknown_ids())) {}
  void checkPreconditions(const HugeModel& m) const override {
    RC_PRE(m.has(parent) && !m.has(child));
    RC_PRE(m.overflows(m.requests.at(parent).first));
  }
  void exec(PagedKVCache& cache) const override {
    RC_ASSERT_THROWS_AS(static_cast<void>(cache.fork(parent, child)), std::overflow_error);
  }
  void show(std::ostream& os) const override {
    os << "fork(" << quoted(parent) << ", " << quoted(child)
       << ") -> overflow_error, nothing changed";
  }
};

struct HugeFree final : HugeCommand {
  std::string id;
  explicit HugeFree(const HugeModel& m) : id(pick(m.live_ids())) {}
  void checkPreconditions(const HugeModel& m) const override { RC_PRE(m.has(id)); }
  void apply(HugeModel& m) const override { m.requests.erase(id); }
  void exec(PagedKVCache& cache) const override { cache.free(id); }
  [[nodiscard]] bool changes() const override { return true; }
  void show(std::ostream& os) const override { os << "free(" << quoted(id) << ")"; }
};

using HugeCommands =
    kvcache_state::CommandList<HugeAllocate, HugeAllocate, HugeAllocateOverflow, HugeFork, HugeFork,
                               HugeFork, HugeForkOverflow, HugeFree>;

TEST(PagedKVCacheState, StoredTokensOverflow) {
  kvcache_state::Tally tally;
  kvcache_state::drive(
      "PagedKVCacheState/StoredTokensOverflow",
      [&tally] {
        HugeSut sut(tally);
        rc::state::check(HugeModel{}, sut, HugeCommands::generator());
      },
      // HugeAllocateOverflow needs forks to pile stored tokens up to the
      // limit while a page is still free, which random sequences reach only
      // sometimes; StoredTokensOverflowScripted below covers it every run.
      tally, kvcache_state::command_target(), HugeCommands::kinds - 1);
}

}  // namespace

// The allocation path of the stored-token overflow, deterministically: seven
// requests of 2^61 tokens (one allocated, six forks) hold 2^64 - 2^61 tokens
// and one of the two pages; one more of 2^61 would reach 2^64.
TEST(PagedKVCacheState, StoredTokensOverflowScripted) {
  PagedKVCache cache({1, 1, 1, 1}, Bytes{std::uint64_t{1} << 63}, Tokens{kHugePage},
                     Storage::none);
  ASSERT_EQ(cache.stats().total_pages, Pages{2});
  ASSERT_TRUE(cache.allocate_paged("a", Tokens{kHugePage}));
  for (const char* child : {"b", "c", "d", "e", "f", "g"}) ASSERT_TRUE(cache.fork("a", child));
  const PagedStats before = cache.stats();
  EXPECT_THROW(static_cast<void>(cache.allocate_paged("x", Tokens{kHugePage})),
               std::overflow_error);
  EXPECT_THROW(static_cast<void>(cache.fork("a", "x")), std::overflow_error);
  EXPECT_FALSE(cache.contains("x"));
  EXPECT_EQ(cache.stats().free_pages, before.free_pages);
  EXPECT_EQ(cache.stats().num_requests, before.num_requests);
  EXPECT_EQ(cache.stats().stored_tokens, before.stored_tokens);
  EXPECT_TRUE(cache.check_invariants());
}
