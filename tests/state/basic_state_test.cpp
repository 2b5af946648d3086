// basic_state_test.cpp: a RapidCheck state machine for kvcache::BasicKVCache.
//
// Model (CacheModel): the config, the budget, and a std::map from request id
// to {capacity = prompt + max_gen, per layer the list of (key bytes, value
// bytes) appended so far}. Everything the cache reports is derived from it in
// the obvious way: used = sum(capacity) * bytes_per_token, reserved = sum
// (capacity), stored = sum of list lengths, a request fits when
// used + (prompt + max_gen) * bytes_per_token <= budget.
//
// Each test case draws one of three small configs (so rows are 4 or 8 bytes
// and out-of-memory is frequent):
//   {2, 1, 4, 1}  2 layers, 4-byte rows, byte overload only
//   {2, 1, 2, 4}  2 layers, 8-byte rows = 2 floats, byte and float overloads
//   {1, 2, 2, 2}  1 layer, 8-byte rows, dtype 2 (float overload: ShapeMismatch)
// and a budget of 0..24 tokens' worth of bytes (not always a multiple of a
// token), and runs one command sequence over a fixed set of six ids (with the
// empty id, one with an embedded NUL and a long one).
//
// Before every command the whole model is compared with the cache (stats()
// field by field, num_requests, request_ids, contains, reservation, tokens,
// and get_kv of every layer of every request, byte-exact), and again after it
// against the model's next state, with check_invariants(). Failure-path
// commands (duplicate id, over budget, 64-bit overflow, past the reservation,
// wrong row size, float overload on dtype != 4, layer out of range, unknown
// id) leave the model unchanged, so that second comparison asserts the strong
// guarantee: nothing changed.
//
// Volume: at least 10,000 commands per ctest run (state_util.hpp drives
// RapidCheck in rounds until the counter reaches 10,000 * KVCACHE_STATE_SCALE).
//   Scale up:   KVCACHE_STATE_SCALE=100 ./basic_state_test
//   Reproduce:  run the test with the RC_PARAMS="reproduce=..." string that a
//               failure prints on exit, e.g.
//               RC_PARAMS="reproduce=BCh..." ./basic_state_test --gtest_filter=BasicKVCacheState.*
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

using kvcache::BasicKVCache;
using kvcache::BasicStats;
using kvcache::Bytes;
using kvcache::ModelConfig;
using kvcache::ReservationExceeded;
using kvcache::ShapeMismatch;
using kvcache::Tokens;
using kvcache::UnknownRequest;
using kvcache_state::quoted;

using Row = std::vector<std::uint8_t>;
constexpr std::uint64_t kMax = std::numeric_limits<std::uint64_t>::max();

const std::vector<ModelConfig> kConfigs = {{2, 1, 4, 1}, {2, 1, 2, 4}, {1, 2, 2, 2}};
// The ids every machine uses: short ones, the empty id, one with an embedded
// NUL (ids are string_views, not C strings) and one too long for the small
// string buffer.
const std::string kLongId(80, 'r');
const std::vector<std::string> kIds = {"a", "b", "c", "", std::string("n\0ul", 4), kLongId};

struct Token {
  Row key;
  Row value;
};

struct Request {
  std::uint64_t capacity = 0;              // prompt + max_gen
  std::vector<std::vector<Token>> layers;  // tokens appended, per layer
};

struct CacheModel {
  ModelConfig cfg;
  std::uint64_t budget = 0;
  std::map<std::string, Request> requests;

  [[nodiscard]] std::uint64_t row() const {
    return std::uint64_t{cfg.num_kv_heads} * cfg.head_dim * cfg.dtype_bytes;
  }
  [[nodiscard]] std::uint64_t floats() const {
    return std::uint64_t{cfg.num_kv_heads} * cfg.head_dim;
  }
  [[nodiscard]] std::uint64_t bytes_per_token() const {
    return std::uint64_t{cfg.num_layers} * 2 * row();
  }
  [[nodiscard]] std::uint64_t used() const {
    std::uint64_t sum = 0;
    for (const auto& [id, r] : requests) sum += r.capacity * bytes_per_token();
    return sum;
  }
  [[nodiscard]] std::uint64_t reserved() const {
    std::uint64_t sum = 0;
    for (const auto& [id, r] : requests) sum += r.capacity;
    return sum;
  }
  [[nodiscard]] std::uint64_t stored() const {
    std::uint64_t sum = 0;
    for (const auto& [id, r] : requests) {
      for (const auto& layer : r.layers) sum += layer.size();
    }
    return sum;
  }
  // Whole tokens that still fit in the budget.
  [[nodiscard]] std::uint64_t room() const { return (budget - used()) / bytes_per_token(); }
  [[nodiscard]] bool has(const std::string& id) const { return requests.count(id) != 0; }
  // prompt + max_gen, or its byte size, does not fit in 64 bits.
  [[nodiscard]] bool overflows(std::uint64_t prompt, std::uint64_t max_gen) const {
    return prompt > kMax - max_gen || prompt + max_gen > kMax / bytes_per_token();
  }
  [[nodiscard]] bool fits(std::uint64_t prompt, std::uint64_t max_gen) const {
    return !overflows(prompt, max_gen) && (prompt + max_gen) * bytes_per_token() <= budget - used();
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
  // (id, layer) pairs whose layer has room for one more token / is full.
  [[nodiscard]] std::vector<std::pair<std::string, std::size_t>> layers_where(bool full) const {
    std::vector<std::pair<std::string, std::size_t>> out;
    for (const auto& [id, r] : requests) {
      for (std::size_t l = 0; l < r.layers.size(); ++l) {
        if ((r.layers[l].size() == r.capacity) == full) out.emplace_back(id, l);
      }
    }
    return out;
  }
};

struct CacheSut {
  CacheSut(const ModelConfig& cfg, std::uint64_t budget, kvcache_state::Tally& counter)
      : cache(cfg, Bytes{budget}), tally(counter) {}
  BasicKVCache cache;
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

// The whole observable state of `cache` equals `m`.
void assert_matches(const CacheModel& m, const BasicKVCache& cache) {
  const BasicStats s = cache.stats();
  RC_ASSERT(s.total_memory.count() == m.budget);
  RC_ASSERT(s.used_memory.count() == m.used());
  RC_ASSERT(s.free_memory.count() == m.budget - m.used());
  RC_ASSERT(s.reserved_tokens.count() == m.reserved());
  RC_ASSERT(s.stored_tokens.count() == m.stored());
  RC_ASSERT(s.num_requests == m.requests.size());
  const double pct =
      m.budget == 0 ? 0.0 : static_cast<double>(m.used()) / static_cast<double>(m.budget) * 100.0;
  RC_ASSERT(std::abs(s.utilization_pct - pct) <= 1e-9);
  RC_ASSERT(cache.num_requests() == m.requests.size());
  RC_ASSERT(cache.budget().count() == m.budget);
  RC_ASSERT(cache.config() == m.cfg);
  std::vector<std::string> ids = cache.request_ids();
  std::sort(ids.begin(), ids.end());
  RC_ASSERT(ids == m.live_ids());
  for (const std::string& id : kIds) RC_ASSERT(cache.contains(id) == m.has(id));
  for (const auto& [id, r] : m.requests) {
    RC_ASSERT(cache.reservation(id).count() == r.capacity);
    for (std::size_t l = 0; l < r.layers.size(); ++l) {
      const std::vector<Token>& want = r.layers[l];
      RC_ASSERT(cache.tokens(id, l).count() == want.size());
      const auto [keys, values] = cache.get_kv(id, l);
      RC_ASSERT(keys.size() == want.size());
      RC_ASSERT(values.size() == want.size());
      for (std::size_t t = 0; t < want.size(); ++t) {
        RC_ASSERT(to_row(keys[t]) == want[t].key);
        RC_ASSERT(to_row(values[t]) == want[t].value);
      }
    }
  }
  RC_ASSERT(cache.check_invariants());
}

// Every command: compare the whole model before, run, compare the model's
// next state after (for a failure path: the unchanged model).
struct CacheCommand : rc::state::Command<CacheModel, CacheSut> {
  void run(const CacheModel& s0, CacheSut& sut) const final {
    sut.tally.record(typeid(*this));
    assert_matches(s0, sut.cache);
    exec(s0, sut.cache);
    assert_matches(nextState(s0), sut.cache);
  }
  virtual void exec(const CacheModel& s0, BasicKVCache& cache) const = 0;
};

template <class T>
T pick(const std::vector<T>& xs) {
  RC_PRE(!xs.empty());
  return *rc::gen::elementOf(xs);
}

// ---- allocate ----------------------------------------------------------

// A new id whose reservation fits: true.
struct Allocate final : CacheCommand {
  std::string id;
  std::uint64_t prompt = 0;
  std::uint64_t max_gen = 0;
  explicit Allocate(const CacheModel& m) : id(pick(m.unknown_ids())) {
    const auto total =
        *rc::gen::inRange<std::uint64_t>(0, std::min<std::uint64_t>(m.room(), 8) + 1);
    prompt = *rc::gen::inRange<std::uint64_t>(0, total + 1);
    max_gen = total - prompt;
  }
  void checkPreconditions(const CacheModel& m) const override {
    RC_PRE(!m.has(id) && m.fits(prompt, max_gen));
  }
  void apply(CacheModel& m) const override {
    m.requests[id] = Request{prompt + max_gen, std::vector<std::vector<Token>>(m.cfg.num_layers)};
  }
  void exec(const CacheModel&, BasicKVCache& cache) const override {
    RC_ASSERT(cache.can_allocate(Tokens{prompt}, Tokens{max_gen}));
    RC_ASSERT(cache.allocate(id, Tokens{prompt}, Tokens{max_gen}));
  }
  void show(std::ostream& os) const override {
    os << "allocate(" << quoted(id) << ", " << prompt << ", " << max_gen << ") -> true";
  }
};

// A live id, any (non-overflowing) size, fitting or not: false.
struct AllocateDuplicate final : CacheCommand {
  std::string id;
  std::uint64_t prompt = *rc::gen::inRange<std::uint64_t>(0, 40);
  std::uint64_t max_gen = *rc::gen::inRange<std::uint64_t>(0, 40);
  explicit AllocateDuplicate(const CacheModel& m) : id(pick(m.live_ids())) {}
  void checkPreconditions(const CacheModel& m) const override {
    RC_PRE(m.has(id) && !m.overflows(prompt, max_gen));
  }
  void exec(const CacheModel&, BasicKVCache& cache) const override {
    RC_ASSERT(!cache.allocate(id, Tokens{prompt}, Tokens{max_gen}));
  }
  void show(std::ostream& os) const override {
    os << "allocate(" << quoted(id) << " (live), " << prompt << ", " << max_gen << ") -> false";
  }
};

// A new id whose reservation does not fit in what is left: false.
struct AllocateOverBudget final : CacheCommand {
  std::string id;
  std::uint64_t prompt = 0;
  std::uint64_t max_gen = 0;
  explicit AllocateOverBudget(const CacheModel& m) : id(pick(m.unknown_ids())) {
    const auto total = m.room() + *rc::gen::inRange<std::uint64_t>(1, 4);
    prompt = *rc::gen::inRange<std::uint64_t>(0, total + 1);
    max_gen = total - prompt;
  }
  void checkPreconditions(const CacheModel& m) const override {
    RC_PRE(!m.has(id) && !m.overflows(prompt, max_gen) && !m.fits(prompt, max_gen));
  }
  void exec(const CacheModel&, BasicKVCache& cache) const override {
    RC_ASSERT(!cache.can_allocate(Tokens{prompt}, Tokens{max_gen}));
    RC_ASSERT(!cache.allocate(id, Tokens{prompt}, Tokens{max_gen}));
  }
  void show(std::ostream& os) const override {
    os << "allocate(" << quoted(id) << ", " << prompt << ", " << max_gen
       << ") over budget -> false";
  }
};

// prompt + max_gen, or its byte size, overflows 64 bits: std::overflow_error,
// before the duplicate check (so the id may be live or not).
struct AllocateOverflow final : CacheCommand {
  std::string id = *rc::gen::elementOf(kIds);
  std::uint64_t prompt = 0;
  std::uint64_t max_gen = 0;
  explicit AllocateOverflow(const CacheModel& m) {
    if (*rc::gen::arbitrary<bool>()) {  // the sum overflows
      prompt = kMax - *rc::gen::inRange<std::uint64_t>(0, 4);
      max_gen = (kMax - prompt) + *rc::gen::inRange<std::uint64_t>(1, 4);
    } else {  // the sum fits, its bytes do not
      const std::uint64_t total =
          kMax / m.bytes_per_token() + *rc::gen::inRange<std::uint64_t>(1, 4);
      prompt = *rc::gen::element<std::uint64_t>(0, 1, total / 2, total);
      max_gen = total - prompt;
    }
  }
  void checkPreconditions(const CacheModel& m) const override {
    RC_PRE(m.overflows(prompt, max_gen));
  }
  void exec(const CacheModel&, BasicKVCache& cache) const override {
    RC_ASSERT_THROWS_AS(static_cast<void>(cache.can_allocate(Tokens{prompt}, Tokens{max_gen})),
                        std::overflow_error);
    RC_ASSERT_THROWS_AS(static_cast<void>(cache.allocate(id, Tokens{prompt}, Tokens{max_gen})),
                        std::overflow_error);
  }
  void show(std::ostream& os) const override {
    os << "allocate(" << quoted(id) << ", " << prompt << ", " << max_gen << ") -> overflow_error";
  }
};

// ---- append_token ----------------------------------------------------------

// One token to a layer with room: random bytes through the byte overload, or
// random float bit patterns (NaNs included) through the float overload when
// dtype_bytes == 4.
struct Append final : CacheCommand {
  std::string id;
  std::size_t layer = 0;
  bool use_float = false;
  Row key;
  Row value;
  std::vector<float> fkey;
  std::vector<float> fvalue;
  explicit Append(const CacheModel& m) {
    std::tie(id, layer) = pick(m.layers_where(false));
    use_float = m.cfg.dtype_bytes == 4 && *rc::gen::arbitrary<bool>();
    if (use_float) {
      const auto gen = rc::gen::container<std::vector<std::uint32_t>>(
          m.floats(), rc::gen::arbitrary<std::uint32_t>());
      fkey = to_floats(*gen);
      fvalue = to_floats(*gen);
      key = to_row(fkey);
      value = to_row(fvalue);
    } else {
      key = *kvcache_state::bytes(m.row());
      value = *kvcache_state::bytes(m.row());
    }
  }
  void checkPreconditions(const CacheModel& m) const override {
    RC_PRE(m.has(id));
    const Request& r = m.requests.at(id);
    RC_PRE(layer < r.layers.size() && r.layers[layer].size() < r.capacity);
    RC_PRE(key.size() == m.row() && value.size() == m.row());
    RC_PRE(!use_float || m.cfg.dtype_bytes == 4);
  }
  void apply(CacheModel& m) const override {
    m.requests.at(id).layers[layer].push_back(Token{key, value});
  }
  void exec(const CacheModel&, BasicKVCache& cache) const override {
    if (use_float) {
      cache.append_token(id, layer, std::span<const float>(fkey), std::span<const float>(fvalue));
    } else {
      cache.append_token(id, layer, as_span(key), as_span(value));
    }
  }
  void show(std::ostream& os) const override {
    os << "append_token(" << quoted(id) << ", layer " << layer << ", "
       << (use_float ? "floats " : "bytes ") << rc::toString(key) << ", " << rc::toString(value)
       << ")";
  }
};

// A layer that already holds prompt + max_gen tokens (a zero-capacity request
// included): ReservationExceeded from either overload.
struct AppendPastReservation final : CacheCommand {
  std::string id;
  std::size_t layer = 0;
  bool use_float = false;
  explicit AppendPastReservation(const CacheModel& m) {
    std::tie(id, layer) = pick(m.layers_where(true));
    use_float = m.cfg.dtype_bytes == 4 && *rc::gen::arbitrary<bool>();
  }
  void checkPreconditions(const CacheModel& m) const override {
    RC_PRE(m.has(id));
    const Request& r = m.requests.at(id);
    RC_PRE(layer < r.layers.size() && r.layers[layer].size() == r.capacity);
    RC_PRE(!use_float || m.cfg.dtype_bytes == 4);
  }
  void exec(const CacheModel& s0, BasicKVCache& cache) const override {
    if (use_float) {
      const std::vector<float> f(s0.floats(), 1.5F);
      RC_ASSERT_THROWS_AS(
          cache.append_token(id, layer, std::span<const float>(f), std::span<const float>(f)),
          ReservationExceeded);
    } else {
      const Row r(s0.row(), 0xAB);
      RC_ASSERT_THROWS_AS(cache.append_token(id, layer, as_span(r), as_span(r)),
                          ReservationExceeded);
    }
  }
  void show(std::ostream& os) const override {
    os << "append_token(" << quoted(id) << ", full layer " << layer << ", "
       << (use_float ? "floats" : "bytes") << ") -> ReservationExceeded";
  }
};

// A key or value of the wrong length (bytes, or floats when dtype_bytes == 4),
// checked before the id (so any id) and before the reservation: ShapeMismatch.
struct AppendWrongShape final : CacheCommand {
  std::string id = *rc::gen::elementOf(kIds);
  std::size_t layer = 0;
  bool use_float = false;
  std::size_t key_len = 0;  // bytes or floats
  std::size_t value_len = 0;
  explicit AppendWrongShape(const CacheModel& m)
      : layer(*rc::gen::inRange<std::size_t>(0, m.cfg.num_layers)),
        use_float(m.cfg.dtype_bytes == 4 && *rc::gen::arbitrary<bool>()) {
    const std::size_t right = use_float ? m.floats() : m.row();
    const auto len = rc::gen::element<std::size_t>(0, right - 1, right, right + 1, 2 * right);
    key_len = *len;
    value_len = *len;
    RC_PRE(key_len != right || value_len != right);
  }
  void checkPreconditions(const CacheModel& m) const override {
    RC_PRE(layer < m.cfg.num_layers && (!use_float || m.cfg.dtype_bytes == 4));
    const std::size_t right = use_float ? m.floats() : m.row();
    RC_PRE(key_len != right || value_len != right);
  }
  void exec(const CacheModel&, BasicKVCache& cache) const override {
    if (use_float) {
      const std::vector<float> k(key_len, 0.25F);
      const std::vector<float> v(value_len, 0.5F);
      RC_ASSERT_THROWS_AS(
          cache.append_token(id, layer, std::span<const float>(k), std::span<const float>(v)),
          ShapeMismatch);
    } else {
      const Row k(key_len, 1);
      const Row v(value_len, 2);
      RC_ASSERT_THROWS_AS(cache.append_token(id, layer, as_span(k), as_span(v)), ShapeMismatch);
    }
  }
  void show(std::ostream& os) const override {
    os << "append_token(" << quoted(id) << ", layer " << layer << ", " << key_len << " + "
       << value_len << (use_float ? " floats" : " bytes") << ") -> ShapeMismatch";
  }
};

// The float overload when dtype_bytes != 4, whatever the float count and the
// id: ShapeMismatch.
struct AppendFloatWrongDtype final : CacheCommand {
  std::string id = *rc::gen::elementOf(kIds);
  std::size_t layer = 0;
  std::size_t len = 0;  // floats, key and value
  explicit AppendFloatWrongDtype(const CacheModel& m)
      : layer(*rc::gen::inRange<std::size_t>(0, m.cfg.num_layers)),
        len(*rc::gen::element<std::size_t>(m.floats(), m.row() / 4, 0, m.floats() + 1)) {}
  void checkPreconditions(const CacheModel& m) const override {
    RC_PRE(m.cfg.dtype_bytes != 4 && layer < m.cfg.num_layers);
  }
  void exec(const CacheModel&, BasicKVCache& cache) const override {
    const std::vector<float> f(len, 3.0F);
    RC_ASSERT_THROWS_AS(
        cache.append_token(id, layer, std::span<const float>(f), std::span<const float>(f)),
        ShapeMismatch);
  }
  void show(std::ostream& os) const override {
    os << "append_token(" << quoted(id) << ", layer " << layer << ", " << len
       << " floats) on dtype != 4 -> ShapeMismatch";
  }
};

// ---- layer out of range, unknown id ----------------------------------------

// A layer >= num_layers, with any id and any row length: std::out_of_range,
// and not UnknownRequest (the layer is checked first).
struct LayerOutOfRange final : CacheCommand {
  enum class Op { append_bytes, append_floats, get_kv, tokens };
  Op op = *rc::gen::element(Op::append_bytes, Op::append_floats, Op::get_kv, Op::tokens);
  std::string id = *rc::gen::elementOf(kIds);
  std::size_t layer = 0;
  std::size_t len = *rc::gen::inRange<std::size_t>(0, 10);
  explicit LayerOutOfRange(const CacheModel& m)
      : layer(*rc::gen::element<std::size_t>(m.cfg.num_layers, m.cfg.num_layers + 1,
                                             std::numeric_limits<std::size_t>::max())) {}
  void checkPreconditions(const CacheModel& m) const override { RC_PRE(layer >= m.cfg.num_layers); }
  void exec(const CacheModel&, BasicKVCache& cache) const override {
    try {
      switch (op) {
        case Op::append_bytes: {
          const Row r(len, 7);
          cache.append_token(id, layer, as_span(r), as_span(r));
          break;
        }
        case Op::append_floats: {
          const std::vector<float> f(len, 7.0F);
          cache.append_token(id, layer, std::span<const float>(f), std::span<const float>(f));
          break;
        }
        case Op::get_kv:
          static_cast<void>(cache.get_kv(id, layer));
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
    static constexpr std::array<const char*, 4> names = {
        "append_token(bytes)", "append_token(floats)", "get_kv", "tokens"};
    os << names.at(static_cast<std::size_t>(op)) << "(" << quoted(id) << ", layer " << layer
       << ", rows of " << len << ") -> out_of_range";
  }
};

// An id the cache does not hold, everything else valid: UnknownRequest.
struct UnknownId final : CacheCommand {
  enum class Op { append_bytes, append_floats, get_kv, tokens, reservation, free };
  Op op = *rc::gen::element(Op::append_bytes, Op::append_floats, Op::get_kv, Op::tokens,
                            Op::reservation, Op::free);
  std::string id;
  std::size_t layer = 0;
  explicit UnknownId(const CacheModel& m)
      : id(pick(m.unknown_ids())), layer(*rc::gen::inRange<std::size_t>(0, m.cfg.num_layers)) {}
  void checkPreconditions(const CacheModel& m) const override {
    RC_PRE(!m.has(id) && layer < m.cfg.num_layers);
    RC_PRE(op != Op::append_floats || m.cfg.dtype_bytes == 4);
  }
  void exec(const CacheModel& s0, BasicKVCache& cache) const override {
    switch (op) {
      case Op::append_bytes: {
        const Row r(s0.row(), 9);
        RC_ASSERT_THROWS_AS(cache.append_token(id, layer, as_span(r), as_span(r)), UnknownRequest);
        break;
      }
      case Op::append_floats: {
        const std::vector<float> f(s0.floats(), 9.0F);
        RC_ASSERT_THROWS_AS(
            cache.append_token(id, layer, std::span<const float>(f), std::span<const float>(f)),
            UnknownRequest);
        break;
      }
      case Op::get_kv:
        RC_ASSERT_THROWS_AS(static_cast<void>(cache.get_kv(id, layer)), UnknownRequest);
        break;
      case Op::tokens:
        RC_ASSERT_THROWS_AS(static_cast<void>(cache.tokens(id, layer)), UnknownRequest);
        break;
      case Op::reservation:
        RC_ASSERT_THROWS_AS(static_cast<void>(cache.reservation(id)), UnknownRequest);
        break;
      case Op::free:
        RC_ASSERT_THROWS_AS(cache.free(id), UnknownRequest);
        break;
    }
  }
  void show(std::ostream& os) const override {
    static constexpr std::array<const char*, 6> names = {
        "append_token(bytes)", "append_token(floats)", "get_kv", "tokens", "reservation", "free"};
    os << names.at(static_cast<std::size_t>(op)) << "(" << quoted(id) << " (unknown), layer "
       << layer << ") -> UnknownRequest";
  }
};

// ---- reads, free, stats ------------------------------------------------------

// get_kv of one layer, byte-exact, through every way TokenRows offers.
struct GetKv final : CacheCommand {
  std::string id;
  std::size_t layer = 0;
  explicit GetKv(const CacheModel& m)
      : id(pick(m.live_ids())), layer(*rc::gen::inRange<std::size_t>(0, m.cfg.num_layers)) {}
  void checkPreconditions(const CacheModel& m) const override {
    RC_PRE(m.has(id) && layer < m.cfg.num_layers);
  }
  void exec(const CacheModel& s0, BasicKVCache& cache) const override {
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

struct Free final : CacheCommand {
  std::string id;
  explicit Free(const CacheModel& m) : id(pick(m.live_ids())) {}
  void checkPreconditions(const CacheModel& m) const override { RC_PRE(m.has(id)); }
  void apply(CacheModel& m) const override { m.requests.erase(id); }
  void exec(const CacheModel&, BasicKVCache& cache) const override { cache.free(id); }
  void show(std::ostream& os) const override { os << "free(" << quoted(id) << ")"; }
};

// stats() is compared field by field around every command; this one only
// makes sure there is always a valid command, and that stats() alone changes
// nothing.
struct Stats final : CacheCommand {
  void exec(const CacheModel&, BasicKVCache& cache) const override {
    static_cast<void>(cache.stats());
  }
  void show(std::ostream& os) const override { os << "stats()"; }
};

// Weights: allocate, append and free more often than the failure paths, so
// that requests fill up and memory runs out.
using Commands = kvcache_state::CommandList<
    Allocate, Allocate, Allocate, AllocateDuplicate, AllocateOverBudget, AllocateOverBudget,
    AllocateOverflow, Append, Append, Append, Append, Append, AppendPastReservation,
    AppendWrongShape, AppendFloatWrongDtype, LayerOutOfRange, UnknownId, GetKv, Free, Free, Stats>;

void cache_property(kvcache_state::Tally& tally) {
  const ModelConfig cfg = *rc::gen::elementOf(kConfigs);
  const std::uint64_t bpt = cfg.bytes_per_token().count();
  const auto budget = *rc::gen::inRange<std::uint64_t>(0, 24 * bpt + 1);
  const CacheModel initial{cfg, budget, {}};
  CacheSut sut(cfg, budget, tally);
  rc::state::check(initial, sut, Commands::generator());
}

TEST(BasicKVCacheState, MatchesModel) {
  kvcache_state::Tally tally;  // commands run, over all test cases
  kvcache_state::drive(
      "BasicKVCacheState/MatchesModel", [&tally] { cache_property(tally); }, tally,
      kvcache_state::command_target(), Commands::kinds);
}

}  // namespace
