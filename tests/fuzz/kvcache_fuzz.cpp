// kvcache_fuzz: a libFuzzer target that decodes bytes into a configuration
// and a sequence of operations on a BasicKVCache or a PagedKVCache, and after
// every operation checks the cache's own check_invariants() and the
// model-free invariants of the contract:
//
//  - both caches: the stats add up (basic: used + free == total, used == sum
//    of reservation * bytes_per_token, reserved == sum of reservations;
//    paged: free + used + cached == total, used_memory == used * page bytes,
//    0 <= memory_efficiency <= 1, every block table of every live request
//    holds ceil(tokens / page_size) pages, pages_held adds them up);
//  - a call that threw or returned false changed nothing: stats, free list,
//    every block table, every stored byte (a snapshot before and after);
//  - the exception type is the contract's for that mistake, in the
//    contract's order (argument checks, then the id, then memory);
//  - a call changes only its own request: every other request's tokens,
//    block tables and bytes are as before (copy-on-write isolation), and its
//    own bytes change only where it wrote;
//  - where the contract decides a result from observable state, the result
//    is that one (allocate fits exactly when used + reservation <= budget;
//    allocate_paged exactly when the pages it needs are free or cached and
//    evictable; an append fails only when no page is free or cached).
// Automatic prefix caching by content is fuzzed too (prompts of token ids
// from a 3-token vocabulary, 2 salts, so that prefixes are found often):
// a page shared by content always holds a block of exactly the prompt's
// token ids and salt, at most prompt - 1 tokens are shared, the rest reads
// as zero, per-layer appends to such a request are refused, and a call
// fails only when free pages could not cover it.
// The only model is a shadow of the live request ids (to pick known and
// unknown ids, and which were allocated by content) and the ids' set of
// names; everything else is read from the cache itself.
//
// Input format (tests/fuzz/make_seeds.py writes seeds in it):
//   byte 0          bit 0: 0 basic, 1 paged; bit 1: Storage::none;
//                   bits 2-4 == 0: a "wild" configuration of four raw
//                   uint32 fields, else one byte of small fields
//   config          wild: 4 x u32 (little endian); small: 1 byte
//                   (layers 1 + b%4, heads 1 + (b>>2)%2, head_dim 1 + (b>>3)%8,
//                   dtype_bytes {1,2,4,4}[b>>6])
//   page size       paged only: 1 byte (0: zero, 255: a raw u64, else 1 + b%8)
//   budget          1 byte: 255 then a raw u64; else a small multiple of a
//                   page (b%49 pages) or of two tokens (basic: b*2 tokens),
//                   then 1 byte added as a remainder
//   operations      one opcode byte each, then its operands, until the input
//                   ends (at most 1024): ids (a byte: top bit set picks a
//                   live id, else one of 20 names, some never live),
//                   layers, token counts, positions, rows (right length,
//                   one off, empty or double; content from a seed), hashes
// A short read gives zero bytes. Sizes are drawn small mostly, and near 2^64,
// at 2^63 and 2^32, or raw, sometimes.
//
// Harness limits (not library limits): a valid configuration with more than
// 8 layers or rows over 4 KiB, a pool over 4096 pages, a host-mode pool of
// more than 2^16 token slots per layer (pages * page_size: the harness
// snapshots every row after every operation), or a basic reservation that
// would really allocate more than 1 MiB is not run (libFuzzer's malloc limit
// would report it as a crash, or one input would take minutes); everything
// else is. Storage::none runs any page size.
//
// On a broken check the target prints what and where, and aborts: libFuzzer
// saves the input. KVCACHE_FUZZ_TRACE=1 prints every decoded operation while
// replaying one.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>  // std::fputs
#include <cstdlib>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <map>
#include <new>
#include <optional>
#include <set>
#include <source_location>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

import kvcache;

namespace {

using kvcache::BasicKVCache;
using kvcache::BasicStats;
using kvcache::Bytes;
using kvcache::ModelConfig;
using kvcache::PagedKVCache;
using kvcache::PagedStats;
using kvcache::PageId;
using kvcache::Pages;
using kvcache::Storage;
using kvcache::Tokens;

constexpr std::uint64_t kMax = std::numeric_limits<std::uint64_t>::max();
constexpr std::uint32_t kMaxLayers = 8;          // harness limits, see the top comment
constexpr std::uint64_t kMaxRowBytes = 4096;
constexpr std::uint64_t kMaxPages = 4096;
constexpr std::uint64_t kMaxHostSlots = std::uint64_t{1} << 16;  // pages * page_size, host mode
constexpr std::uint64_t kMaxRealAllocation = std::uint64_t{1} << 20;
constexpr std::size_t kMaxOps = 1024;

// ---------------------------------------------------------------------------
// Figures and failure reports.

struct Figures {
  std::uint64_t inputs = 0;
  std::uint64_t operations = 0;
  std::uint64_t input_operations = 0;  // of the current input
  std::uint64_t rejected_calls = 0;  // threw or returned false (and changed nothing)
};
Figures& figures() {
  static Figures f;
  return f;
}

bool tracing() {
  static const bool on = [] {
    const char* env = std::getenv("KVCACHE_FUZZ_TRACE");  // NOLINT(concurrency-mt-unsafe): single-threaded
    return env != nullptr && *env != '\0' && *env != '0';
  }();
  return on;
}

// Writes to stderr unbuffered (what libFuzzer's log shows), without printf.
void say(const std::string& line) { std::fputs(line.c_str(), stderr); }

void print_figures() {
  say("kvcache_fuzz: " + std::to_string(figures().operations) + " operations in " +
      std::to_string(figures().inputs) + " inputs (" + std::to_string(figures().rejected_calls) +
      " rejected calls checked unchanged)\n");
}

[[noreturn]] void fail(std::string_view what, const std::string& detail,
                       const std::source_location& where) {
  say("kvcache_fuzz: CHECK FAILED at " + std::string(where.file_name()) + ":" +
      std::to_string(where.line()) + ": " + std::string(what) + (detail.empty() ? "" : ": ") +
      detail + "\n");
  say("kvcache_fuzz: operation " + std::to_string(figures().input_operations) +
      " of this input (KVCACHE_FUZZ_TRACE=1 to list them)\n");
  std::abort();
}

void check(bool ok, std::string_view what, const std::string& detail = {},
           const std::source_location& where = std::source_location::current()) {
  if (!ok) fail(what, detail, where);
}

// Prints the line `make()` builds, only when tracing (building it costs).
template <class F>
void trace(F&& make) {
  if (tracing()) say("  " + std::string(std::forward<F>(make)()) + "\n");
}

// ---------------------------------------------------------------------------
// Decoding.

class Reader {
 public:
  explicit Reader(std::span<const std::uint8_t> data) : data_(data) {}
  [[nodiscard]] bool empty() const noexcept { return pos_ >= data_.size(); }
  std::uint8_t u8() noexcept { return empty() ? 0 : data_[pos_++]; }
  std::uint32_t u32() noexcept {
    std::uint32_t v = 0;
    for (unsigned i = 0; i < 4; ++i) v |= std::uint32_t{u8()} << (8U * i);
    return v;
  }
  std::uint64_t u64() noexcept {
    std::uint64_t v = 0;
    for (unsigned i = 0; i < 8; ++i) v |= std::uint64_t{u8()} << (8U * i);
    return v;
  }

 private:
  std::span<const std::uint8_t> data_;
  std::size_t pos_ = 0;
};

// A token count: mostly small, sometimes at the edges of 64 bits.
std::uint64_t tokens_from(Reader& in) {
  const std::uint8_t t = in.u8();
  if (t < 200) return t % 24U;
  if (t < 216) return kMax - (t - 200U);                        // near 2^64
  if (t < 224) return (std::uint64_t{1} << 63U) + (t - 216U);   // 2^63
  if (t < 232) return (std::uint64_t{1} << 32U) - 4U + (t - 224U);  // 2^32
  if (t < 248) return std::uint64_t{t - 232U} * 64U;            // medium
  return in.u64();                                              // raw
}

std::size_t layer_from(Reader& in, std::uint32_t layers) {
  const std::uint8_t l = in.u8();
  if (l < 240) return l % layers;
  if (l < 248) return std::size_t{layers} + (l - 240U);          // just past the end
  return std::numeric_limits<std::size_t>::max() - (l - 248U);  // huge
}

std::size_t position_from(Reader& in) {
  const std::uint8_t p = in.u8();
  if (p < 240) return p % 40U;
  return std::numeric_limits<std::size_t>::max() - (p - 240U);
}

// The names ids are drawn from: the shadow decides which are live.
const std::vector<std::string>& id_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> v;
    for (int i = 0; i < 16; ++i) v.push_back("r" + std::to_string(i));
    v.emplace_back("");                                        // the empty id is an id
    v.emplace_back("a-request-id-longer-than-any-small-string-buffer");
    v.emplace_back(std::string("r1\0x", 4));                   // embedded NUL: not "r1"
    v.emplace_back("R0");
    return v;
  }();
  return names;
}
// An id byte with the top bit set picks a live id (when there is one), so
// that random inputs reach deep states; else one of the names.
std::string id_from(Reader& in, const std::set<std::string>& live) {
  const std::uint8_t b = in.u8();
  if ((b & 0x80U) != 0 && !live.empty()) {
    auto it = live.begin();
    std::advance(it, static_cast<std::ptrdiff_t>((b & 0x7FU) % live.size()));
    return *it;
  }
  return id_names()[b % id_names().size()];
}

constexpr std::array<std::string_view, 6> kHashes{
    "h0", "h1", "h2", "h3", "", "a-prefix-hash-longer-than-any-small-string-buffer"};
std::string_view hash_from(Reader& in) { return kHashes[in.u8() % kHashes.size()]; }

// A key or value row: mostly the right length, sometimes one off or empty.
// Content from a seed (seed 0: all zero bytes, a valid row too).
std::vector<std::byte> bytes_from(Reader& in, std::size_t row) {
  const std::uint8_t r = in.u8();
  std::size_t n = row;
  switch (r >> 6U) {
    case 2: n = (r & 32U) != 0 ? row + 1 : row - 1; break;
    case 3: n = (r & 32U) != 0 ? 0 : row * 2; break;
    default: break;
  }
  std::vector<std::byte> v(n);
  const unsigned seed = r & 31U;
  if (seed != 0) {
    for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::byte>((std::size_t{seed} * 37U) ^ (i * 11U) ^ 0x5AU);
  }
  return v;
}

std::vector<float> floats_from(Reader& in, std::size_t elements) {
  const std::uint8_t r = in.u8();
  std::size_t n = elements;
  switch (r >> 6U) {
    case 2: n = (r & 32U) != 0 ? elements + 1 : elements - 1; break;
    case 3: n = 0; break;
    default: break;
  }
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<float>(r & 31U) + (0.25F * static_cast<float>(i));
  return v;
}

// ---------------------------------------------------------------------------
// Outcomes: what a call did, by the contract's exception types.

enum class Outcome : std::uint8_t {
  ok,            // returned (true, or void)
  no,            // returned false
  unknown,       // kvcache::UnknownRequest
  out_of_range,  // std::out_of_range, not UnknownRequest (a layer or a position)
  shape,         // kvcache::ShapeMismatch
  invalid,       // std::invalid_argument, not ShapeMismatch
  overflow,      // std::overflow_error
  reservation,   // kvcache::ReservationExceeded
  out_of_pages,  // kvcache::OutOfPages
  logic,         // std::logic_error of another kind (Storage::none)
  other,         // anything else: never expected
};

const char* name(Outcome o) {
  switch (o) {
    case Outcome::ok: return "ok";
    case Outcome::no: return "false";
    case Outcome::unknown: return "UnknownRequest";
    case Outcome::out_of_range: return "std::out_of_range";
    case Outcome::shape: return "ShapeMismatch";
    case Outcome::invalid: return "std::invalid_argument";
    case Outcome::overflow: return "std::overflow_error";
    case Outcome::reservation: return "ReservationExceeded";
    case Outcome::out_of_pages: return "OutOfPages";
    case Outcome::logic: return "std::logic_error";
    case Outcome::other: return "another exception";
  }
  return "?";
}

std::string g_last_message;  // NOLINT(cppcoreguidelines-avoid-non-const-global-variables): the last exception's what()

template <class F>
Outcome attempt(const F& f) {
  g_last_message.clear();
  try {
    if constexpr (std::is_same_v<decltype(f()), bool>) {
      return f() ? Outcome::ok : Outcome::no;
    } else {
      f();
      return Outcome::ok;
    }
  } catch (const kvcache::UnknownRequest& e) {
    g_last_message = e.what();
    return Outcome::unknown;
  } catch (const kvcache::ShapeMismatch& e) {
    g_last_message = e.what();
    return Outcome::shape;
  } catch (const kvcache::OutOfPages& e) {
    g_last_message = e.what();
    return Outcome::out_of_pages;
  } catch (const kvcache::ReservationExceeded& e) {
    g_last_message = e.what();
    return Outcome::reservation;
  } catch (const std::out_of_range& e) {
    g_last_message = e.what();
    return Outcome::out_of_range;
  } catch (const std::invalid_argument& e) {
    g_last_message = e.what();
    return Outcome::invalid;
  } catch (const std::overflow_error& e) {
    g_last_message = e.what();
    return Outcome::overflow;
  } catch (const std::logic_error& e) {
    g_last_message = e.what();
    return Outcome::logic;
  } catch (const std::exception& e) {
    g_last_message = e.what();
    return Outcome::other;
  }
}

// The last exception's message names `id` (what() stops at an embedded NUL:
// such an id cannot be found in it).
void names(const std::string& id, std::string_view what,
           const std::source_location& where = std::source_location::current()) {
  check(id.find('\0') != std::string::npos || g_last_message.find(id) != std::string::npos, what,
        g_last_message, where);
}

void expect(Outcome got, Outcome want, std::string_view call,
            const std::source_location& where = std::source_location::current()) {
  if (got != want) {
    fail(call, std::string("got ") + name(got) + ", expected " + name(want) +
                   (g_last_message.empty() ? "" : " (message: " + g_last_message + ")"),
         where);
  }
}

// ---------------------------------------------------------------------------
// Configuration.

struct Config {
  ModelConfig model;
  bool valid = false;        // our own verdict, computed without the library
  std::string bad_field;     // the field a rejection must name
};

// Valid when no field is 0 and heads * dim * dtype * 2 * layers fits 64 bits;
// else the field the contract's message names (the first zero, or the factor
// that overflows, in the formula's order).
Config judge(const ModelConfig& m) {
  Config c{m, false, {}};
  const std::array<std::pair<std::uint32_t, const char*>, 4> fields{
      {{m.num_layers, "num_layers"}, {m.num_kv_heads, "num_kv_heads"}, {m.head_dim, "head_dim"},
       {m.dtype_bytes, "dtype_bytes"}}};
  for (const auto& [v, n] : fields) {
    if (v == 0) {
      c.bad_field = n;
      return c;
    }
  }
  std::uint64_t acc = m.num_kv_heads;
  const auto times = [&acc](std::uint64_t f) {
    if (acc > kMax / f) return false;
    acc *= f;
    return true;
  };
  if (!times(m.head_dim)) {
    c.bad_field = "head_dim";
  } else if (!times(std::uint64_t{m.dtype_bytes} * 2U)) {
    c.bad_field = "dtype_bytes";
  } else if (!times(m.num_layers)) {
    c.bad_field = "num_layers";
  } else {
    c.valid = true;
  }
  return c;
}

// ---------------------------------------------------------------------------
// Snapshots: everything observable, compared whole after a rejected call and
// per request after a successful one.

using Row = std::string;  // a row's bytes

struct PagedRequest {
  std::vector<std::uint64_t> tokens;             // per layer
  std::vector<std::vector<std::uint32_t>> tables;  // per layer: page indices
  std::uint64_t held = 0;
  std::vector<std::vector<Row>> keys;  // [layer][token] (host mode)
  std::vector<std::vector<Row>> values;
  friend bool operator==(const PagedRequest&, const PagedRequest&) = default;
};

struct PagedSnapshot {
  std::array<std::uint64_t, 18> stats{};
  double efficiency = 0;
  std::vector<std::uint32_t> free_list;
  std::vector<bool> prefixes;  // has_prefix of each kHashes entry
  std::map<std::string, PagedRequest> requests;
  friend bool operator==(const PagedSnapshot&, const PagedSnapshot&) = default;
};

Row as_row(std::span<const std::byte> s) {
  return {reinterpret_cast<const char*>(s.data()), s.size()};  // NOLINT(cppcoreguidelines-pro-type-reinterpret-cast): bytes as chars
}

PagedRequest snapshot_request(const PagedKVCache& c, const std::string& id) {
  PagedRequest r;
  r.held = c.pages_held(id).count();
  for (std::size_t l = 0; l < c.config().num_layers; ++l) {
    r.tokens.push_back(c.tokens(id, l).count());
    auto& t = r.tables.emplace_back();
    for (const PageId p : c.block_table(id, l)) t.push_back(p.index());
    if (c.storage() == Storage::host) {
      const auto [keys, values] = c.get_kv(id, l);
      auto& k = r.keys.emplace_back();
      auto& v = r.values.emplace_back();
      for (const auto row : keys) k.push_back(as_row(row));
      for (const auto row : values) v.push_back(as_row(row));
    }
  }
  return r;
}

PagedSnapshot snapshot(const PagedKVCache& c) {
  PagedSnapshot s;
  const PagedStats st = c.stats();
  s.stats = {st.total_pages.count(), st.free_pages.count(),  st.used_pages.count(),
             st.cached_pages.count(), st.used_memory.count(), st.num_requests,
             st.prefix_hits,          st.prefix_misses,       st.stored_tokens.count(),
             st.page_size.count(),    st.bytes_per_page.count(), st.registered_prefixes,
             st.prefix.tokens_saved,  st.prefix.pages_saved,  st.prefix.cow_copies,
             st.prefix.prefixes_evicted, st.prefix.pages_evicted,
             static_cast<std::uint64_t>(st.utilization_pct * 1e6)};
  s.efficiency = c.memory_efficiency();
  for (const PageId p : c.pool().free_list()) s.free_list.push_back(p.index());
  for (const std::string_view h : kHashes) s.prefixes.push_back(c.has_prefix(h));
  for (const std::string& id : c.request_ids()) s.requests.emplace(id, snapshot_request(c, id));
  return s;
}

struct BasicRequest {
  std::uint64_t reservation = 0;
  std::vector<std::uint64_t> tokens;
  std::vector<std::vector<Row>> keys;
  std::vector<std::vector<Row>> values;
  friend bool operator==(const BasicRequest&, const BasicRequest&) = default;
};

struct BasicSnapshot {
  std::array<std::uint64_t, 7> stats{};
  std::map<std::string, BasicRequest> requests;
  friend bool operator==(const BasicSnapshot&, const BasicSnapshot&) = default;
};

BasicSnapshot snapshot(const BasicKVCache& c) {
  BasicSnapshot s;
  const BasicStats st = c.stats();
  s.stats = {st.total_memory.count(), st.used_memory.count(),     st.free_memory.count(),
             st.reserved_tokens.count(), st.stored_tokens.count(), st.num_requests,
             static_cast<std::uint64_t>(st.utilization_pct * 1e6)};
  for (const std::string& id : c.request_ids()) {
    BasicRequest r;
    r.reservation = c.reservation(id).count();
    for (std::size_t l = 0; l < c.config().num_layers; ++l) {
      r.tokens.push_back(c.tokens(id, l).count());
      if (c.storage() == Storage::none) continue;
      const auto [keys, values] = c.get_kv(id, l);
      auto& k = r.keys.emplace_back();
      auto& v = r.values.emplace_back();
      for (const auto row : keys) k.push_back(as_row(row));
      for (const auto row : values) v.push_back(as_row(row));
    }
    s.requests.emplace(id, std::move(r));
  }
  return s;
}

// Every request but those in `skip` is exactly as before, and none
// disappeared.
template <class Snapshot>
void others_unchanged(const Snapshot& before, const Snapshot& after, std::string_view call,
                      std::initializer_list<std::string_view> skip,
                      const std::source_location& where = std::source_location::current()) {
  for (const auto& [id, r] : before.requests) {
    if (std::find(skip.begin(), skip.end(), id) != skip.end()) continue;
    const auto it = after.requests.find(id);
    check(it != after.requests.end(), call, "request \"" + id + "\" disappeared", where);
    check(it->second == r, call, "request \"" + id + "\" changed", where);
  }
}

// ---------------------------------------------------------------------------
// The paged harness.

class PagedHarness {
 public:
  explicit PagedHarness(PagedKVCache cache)
      : c_(std::move(cache)),
        row_(static_cast<std::size_t>(c_.config().kv_bytes_per_token_per_layer().count())),
        elements_(static_cast<std::size_t>(c_.config().kv_elements_per_token_per_layer())),
        layers_(c_.config().num_layers),
        ps_(c_.page_size().count()),
        host_(c_.storage() == Storage::host) {}

  [[nodiscard]] const PagedKVCache& cache() const noexcept { return c_; }

  void step(Reader& in) {
    const std::uint8_t op = in.u8();
    switch (op % 16U) {
      case 0: allocate(in); break;
      case 14: allocate_content(in); break;
      case 1: allocate_prefix(in); break;
      case 2: append_bytes(in); break;
      case 3: append_floats(in); break;
      case 4: append_zero(in); break;
      case 13: append_ids(in); break;
      case 5: append_all(in); break;
      case 6: write_bytes(in, false); break;
      case 15: write_bytes(in, true); break;
      case 7: write_floats(in); break;
      case 8: fork(in); break;
      case 9: free(in); break;
      case 10: evict(in); break;
      case 11: clear(); break;
      default: queries(in); break;
    }
    invariants();
  }

 private:
  [[nodiscard]] bool live(const std::string& id) const { return live_.contains(id); }

  // Would stored_tokens (summed over requests and layers) overflow 64 bits
  // with `copies` more copies of `n` tokens? The cache rejects that with
  // std::overflow_error, a token count overflowing 64 bits.
  [[nodiscard]] bool stored_overflows(std::uint64_t n, std::uint64_t copies) const {
    const std::uint64_t stored = c_.stats().stored_tokens.count();
    return (n != 0 && copies > kMax / n) || n * copies > kMax - stored;
  }

  // After every operation.
  void invariants() const {
    check(c_.check_invariants(), "check_invariants()");
    const PagedStats s = c_.stats();
    check(s.free_pages.count() + s.used_pages.count() + s.cached_pages.count() == s.total_pages.count(),
          "free + used + cached == total");
    check(s.used_memory.count() == s.used_pages.count() * s.bytes_per_page.count(),
          "used_memory == used_pages * bytes_per_page");
    check(s.num_requests == live_.size(), "num_requests == live ids");
    const double e = c_.memory_efficiency();
    check(e >= 0.0 && e <= 1.0, "0 <= memory_efficiency <= 1", std::to_string(e));
    check(s.used_pages.count() != 0 || e == 0.0, "memory_efficiency is 0 with no used page");
    std::uint64_t stored = 0;
    // Tokens in each physical page a request holds: the most slots any of
    // its holders uses.
    std::map<std::uint32_t, std::uint64_t> page_tokens;
    for (const std::string& id : id_names()) {
      check(c_.contains(id) == live(id), "contains() agrees with the live ids", id);
      if (!live(id)) continue;
      std::uint64_t held = 0;
      for (std::size_t l = 0; l < layers_; ++l) {
        const std::uint64_t t = c_.tokens(id, l).count();
        const auto table = c_.block_table(id, l);
        check(table.size() == (t + ps_ - 1) / ps_, "block table holds ceil(tokens / page_size) pages",
              id + " layer " + std::to_string(l));
        for (std::size_t i = 0; i < table.size(); ++i) {
          check(static_cast<std::uint64_t>(table[i]) < s.total_pages.count(), "page id inside the pool");
          std::uint64_t& most = page_tokens[table[i].index()];
          most = std::max(most, std::min<std::uint64_t>(ps_, t - (i * ps_)));
        }
        held += table.size();
        stored += t;
      }
      check(c_.pages_held(id).count() == held, "pages_held == sum of block-table sizes", id);
    }
    check(stored == s.stored_tokens.count(), "stored_tokens == sum of tokens");
    check(page_tokens.size() == s.used_pages.count(), "used_pages == pages some request holds");
    std::uint64_t tokens = 0;
    for (const auto& [page, n] : page_tokens) tokens += n;
    const double want = page_tokens.empty() ? 0.0
                                            : static_cast<double>(tokens) /
                                                  (static_cast<double>(page_tokens.size()) *
                                                   static_cast<double>(ps_));
    check(e == want || std::abs(e - want) <= 1e-12 * want,
          "memory_efficiency == tokens in request pages / (pages * page_size)",
          std::to_string(e) + " != " + std::to_string(want));
  }

  // A call that failed must have changed nothing at all.
  void unchanged(const PagedSnapshot& before, std::string_view call,
                 const std::source_location& where = std::source_location::current()) {
    ++figures().rejected_calls;
    check(snapshot(c_) == before, call, "a rejected call changed the cache", where);
  }

  // The layer of `r` grew by one token whose row is `key`/`value` (zero when
  // empty); the rest of the request is as before but for a copied last page.
  void grew_by_one(const PagedRequest& was, const PagedRequest& now, std::size_t layer,
                   const std::vector<std::byte>& key, const std::vector<std::byte>& value,
                   std::string_view call) const {
    for (std::size_t l = 0; l < layers_; ++l) {
      if (l != layer) {
        check(now.tokens[l] == was.tokens[l] && now.tables[l] == was.tables[l], call, "another layer changed");
        if (host_) check(now.keys[l] == was.keys[l] && now.values[l] == was.values[l], call, "another layer's bytes changed");
        continue;
      }
      check(now.tokens[l] == was.tokens[l] + 1, call, "the layer did not grow by one token");
      const std::size_t keep = was.tokens[l] % ps_ == 0 ? was.tables[l].size() : was.tables[l].size() - 1;
      check(std::equal(was.tables[l].begin(), was.tables[l].begin() + static_cast<std::ptrdiff_t>(keep),
                       now.tables[l].begin()),
            call, "pages before the last one changed");
      if (!host_) continue;
      const Row zero(row_, '\0');
      std::vector<Row> k = was.keys[l];
      std::vector<Row> v = was.values[l];
      k.push_back(key.empty() ? zero : as_row(key));
      v.push_back(value.empty() ? zero : as_row(value));
      check(now.keys[l] == k && now.values[l] == v, call, "the layer's bytes are not the old ones plus the new token");
    }
  }

  void allocate(Reader& in) {
    const std::string id = id_from(in, live_);
    const std::uint64_t prompt = tokens_from(in);
    trace([&] { return "allocate_paged(\"" + id + "\", " + std::to_string(prompt) + ")"; });
    const std::uint64_t per_layer = (prompt / ps_) + (prompt % ps_ != 0 ? 1U : 0U);
    // A page count that overflows is an argument error (thrown first); the
    // running total of stored tokens (beyond the contract) is checked last,
    // after the duplicate and the memory checks.
    const bool pages_overflow = per_layer > kMax / layers_;
    const bool total_overflows = stored_overflows(prompt, layers_);
    const PagedSnapshot before = snapshot(c_);
    bool could = false;
    if (!pages_overflow) {
      could = c_.can_allocate(Tokens{prompt});
      const PagedStats s = c_.stats();
      check(could == (per_layer * layers_ <= s.free_pages.count() + s.cached_pages.count()),
            "can_allocate: the pages are free or cached");
      const kvcache::Admission a = c_.admission(Tokens{prompt});
      check((a == kvcache::Admission::now) == could, "admission() == now exactly when can_allocate");
      check((a == kvcache::Admission::never) == (per_layer * layers_ > s.total_pages.count()),
            "admission() == never exactly when larger than the pool");
      check(c_.pages_needed_to_allocate(Tokens{prompt}).count() == per_layer * layers_,
            "pages_needed_to_allocate == layers * ceil(prompt / page_size)");
    } else {
      expect(attempt([&] { static_cast<void>(c_.can_allocate(Tokens{prompt})); }), Outcome::overflow,
             "can_allocate: a page count overflowing 64 bits");
    }
    const Outcome got = attempt([&] { return c_.allocate_paged(id, Tokens{prompt}); });
    if (pages_overflow) {
      expect(got, Outcome::overflow, "allocate_paged: a page count overflowing 64 bits");
      names(id, "allocate_paged: the overflow message names the request");
    } else if (live(id)) {
      expect(got, Outcome::no, "allocate_paged: a duplicate id");
    } else if (!could) {
      expect(got, Outcome::no, "allocate_paged: fits exactly when can_allocate");
    } else {
      expect(got, total_overflows ? Outcome::overflow : Outcome::ok,
             "allocate_paged: fits exactly when can_allocate (stored tokens overflowing 64 bits)");
    }
    if (got != Outcome::ok) return unchanged(before, "allocate_paged");
    live_.insert(id);
    const PagedSnapshot after = snapshot(c_);
    others_unchanged(before, after, "allocate_paged", {id});
    const PagedRequest& r = after.requests.at(id);
    for (std::size_t l = 0; l < layers_; ++l) {
      check(r.tokens[l] == prompt, "allocate_paged: every layer holds the prompt");
      if (host_) {
        for (const Row& k : r.keys[l]) check(k == Row(row_, '\0'), "allocate_paged: prompt tokens read as zero");
      }
    }
  }

  void allocate_prefix(Reader& in) {
    const std::string id = id_from(in, live_);
    const std::uint64_t prompt = tokens_from(in);
    const std::string_view hash = hash_from(in);
    const std::uint64_t prefix = tokens_from(in);
    trace([&] { return "allocate_paged(\"" + id + "\", " + std::to_string(prompt) + ", \"" + std::string(hash) +
          "\", " + std::to_string(prefix) + ")"; });
    const auto* registered = c_.registry().find(hash);  // read before the call only
    const std::uint64_t registered_cached = registered == nullptr ? 0 : registered->cached;
    const bool hit = registered != nullptr;
    const std::uint64_t per_layer = (prompt / ps_) + (prompt % ps_ != 0 ? 1U : 0U);
    const PagedSnapshot before = snapshot(c_);
    const PagedStats s = c_.stats();
    // The contract's order: argument checks, then the duplicate id, then memory.
    Outcome args = Outcome::ok;
    if (hash.empty() || prefix == 0 || prefix > prompt ||
        (hit && registered->tokens.count() != prefix)) {
      args = Outcome::invalid;  // an empty hash, a prefix of 0 or past the prompt, another length
    } else if (per_layer > kMax / layers_) {
      args = Outcome::overflow;
    }
    const bool total_overflows = stored_overflows(prompt, layers_);  // checked last
    // Memory: exactly when the pages needed are free or evictable (a hit
    // needs the pages past the prefix and a copy of a partial last prefix
    // page it continues in, and cannot evict the prefix it reuses).
    std::uint64_t need = 0;
    std::uint64_t evictable = s.cached_pages.count();
    std::uint64_t registered_pages = 0;
    if (args == Outcome::ok) {
      need = per_layer * layers_;
      if (hit) {
        const std::uint64_t prefix_pages = (prefix / ps_) + (prefix % ps_ != 0 ? 1U : 0U);
        const bool copy_partial = prefix % ps_ != 0 && prompt > prefix;
        need = layers_ * (per_layer - prefix_pages + (copy_partial ? 1U : 0U));
        evictable -= registered_cached;
        registered_pages = registered->pages.size();
      }
    }
    const bool fits = need <= s.free_pages.count() + evictable;
    // The admission helpers agree, and reject bad arguments the same way.
    bool can = false;
    expect(attempt([&] { can = c_.can_allocate(Tokens{prompt}, hash, Tokens{prefix}); }), args,
           "can_allocate (prefix): bad prefix arguments or a page count overflowing");
    check(args != Outcome::ok || can == fits, "can_allocate (prefix) == the pages are free or evictable");
    Pages needed;
    expect(attempt([&] { needed = c_.pages_needed_to_allocate(Tokens{prompt}, hash, Tokens{prefix}); }), args,
           "pages_needed_to_allocate (prefix): bad prefix arguments or a page count overflowing");
    check(args != Outcome::ok || needed.count() == need, "pages_needed_to_allocate (prefix)");
    kvcache::Admission a{};
    const Outcome admitted = attempt([&] { a = c_.admission(Tokens{prompt}, hash, Tokens{prefix}); });
    expect(admitted, args, "admission (prefix): bad prefix arguments or a page count overflowing");
    check(args != Outcome::ok || (a == kvcache::Admission::now) == fits,
          "admission (prefix) == now exactly when it fits");
    check(args != Outcome::ok ||
              (a == kvcache::Admission::never) == (need > s.total_pages.count() - registered_pages),
          "admission (prefix) == never exactly when it cannot fit beside its prefix in an empty cache");
    const Outcome got = attempt([&] { return c_.allocate_paged(id, Tokens{prompt}, hash, Tokens{prefix}); });
    if (args != Outcome::ok) {
      expect(got, args, "allocate_paged: bad prefix arguments or a page count overflowing");
      if (args == Outcome::overflow) names(id, "allocate_paged: the overflow message names the request");
    } else if (live(id)) {
      expect(got, Outcome::no, "allocate_paged: a duplicate id");
    } else if (!fits) {
      expect(got, Outcome::no, "allocate_paged with a prefix: fits exactly when the pages are free or evictable");
    } else {
      expect(got, total_overflows ? Outcome::overflow : Outcome::ok,
             "allocate_paged with a prefix: fits (stored tokens overflowing 64 bits)");
    }
    if (got != Outcome::ok) return unchanged(before, "allocate_paged (prefix)");
    live_.insert(id);
    const PagedStats now = c_.stats();
    check(now.prefix_hits == s.prefix_hits + (hit ? 1U : 0U) &&
              now.prefix_misses == s.prefix_misses + (hit ? 0U : 1U),
          "allocate_paged: one hit or one miss");
    check(c_.has_prefix(hash), "allocate_paged: the prefix is registered");
    const PagedSnapshot after = snapshot(c_);
    others_unchanged(before, after, "allocate_paged (prefix)", {id});
    const PagedRequest& r = after.requests.at(id);
    for (std::size_t l = 0; l < layers_; ++l) {
      check(r.tokens[l] == prompt, "allocate_paged: every layer holds the prompt");
      if (!host_) continue;
      // Past the prefix everything reads as zero; on a miss the prefix too.
      const std::uint64_t from = hit ? prefix : 0;
      for (std::uint64_t t = from; t < prompt; ++t) {
        check(r.keys[l][t] == Row(row_, '\0') && r.values[l][t] == Row(row_, '\0'),
              "allocate_paged: tokens past a shared prefix read as zero");
      }
    }
  }

  // The append overloads share their checks.
  template <class F>
  void append_checked(const std::string& id, std::size_t layer, bool data, bool shape_ok, F&& call,
                      const std::vector<std::byte>& key, const std::vector<std::byte>& value,
                      std::string_view what) {
    const PagedSnapshot before = snapshot(c_);
    const PagedStats s = c_.stats();
    const bool overflows = stored_overflows(1, 1);
    const Outcome got = attempt(std::forward<F>(call));
    if (data && !host_) {
      expect(got, Outcome::logic, "append_token_paged with data in Storage::none");
    } else if (layer >= layers_) {
      expect(got, Outcome::out_of_range, "append_token_paged: a bad layer");
    } else if (!shape_ok) {
      expect(got, Outcome::shape, "append_token_paged: a wrong row");
    } else if (!live(id)) {
      expect(got, Outcome::unknown, "append_token_paged: an unknown id");
    } else if (content_.contains(id)) {
      expect(got, Outcome::logic, "append_token_paged: a request allocated with token ids");
    } else if (overflows) {
      expect(got, Outcome::overflow, "append_token_paged: stored tokens overflowing 64 bits");
    } else {
      check(got == Outcome::ok || got == Outcome::no, what, name(got));
      // It may fail only when no page can be had at all.
      check(got == Outcome::ok || (s.free_pages.count() == 0 && s.cached_pages.count() == 0), what,
            "returned false with a free or cached page");
    }
    if (got != Outcome::ok) return unchanged(before, what);
    const PagedSnapshot after = snapshot(c_);
    others_unchanged(before, after, what, {id});
    grew_by_one(before.requests.at(id), after.requests.at(id), layer, key, value, what);
  }

  void append_bytes(Reader& in) {
    const std::string id = id_from(in, live_);
    const std::size_t layer = layer_from(in, layers_);
    const auto key = bytes_from(in, row_);
    const auto value = bytes_from(in, row_);
    trace([&] { return "append_token_paged(\"" + id + "\", " + std::to_string(layer) + ", " +
          std::to_string(key.size()) + " B, " + std::to_string(value.size()) + " B)"; });
    append_checked(id, layer, true, key.size() == row_ && value.size() == row_,
                   [&] { return c_.append_token_paged(id, layer, key, value); }, key, value,
                   "append_token_paged (bytes)");
  }

  void append_floats(Reader& in) {
    const std::string id = id_from(in, live_);
    const std::size_t layer = layer_from(in, layers_);
    const auto key = floats_from(in, elements_);
    const auto value = floats_from(in, elements_);
    trace([&] { return "append_token_paged(\"" + id + "\", " + std::to_string(layer) + ", " +
          std::to_string(key.size()) + " floats, " + std::to_string(value.size()) + " floats)"; });
    const bool shape_ok = c_.config().dtype_bytes == 4 && key.size() == elements_ && value.size() == elements_;
    const auto kb = std::as_bytes(std::span<const float>(key));
    const auto vb = std::as_bytes(std::span<const float>(value));
    append_checked(id, layer, true, shape_ok,
                   [&] { return c_.append_token_paged(id, layer, std::span<const float>(key), std::span<const float>(value)); },
                   std::vector<std::byte>(kb.begin(), kb.end()), std::vector<std::byte>(vb.begin(), vb.end()),
                   "append_token_paged (floats)");
  }

  void append_zero(Reader& in) {
    const std::string id = id_from(in, live_);
    const std::size_t layer = layer_from(in, layers_);
    trace([&] { return "append_token_paged(\"" + id + "\", " + std::to_string(layer) + ")"; });
    append_checked(id, layer, false, true, [&] { return c_.append_token_paged(id, layer); }, {}, {},
                   "append_token_paged (no data)");
  }

  void append_all(Reader& in) {
    const std::string id = id_from(in, live_);
    trace([&] { return "append_token_all_layers(\"" + id + "\")"; });
    const PagedSnapshot before = snapshot(c_);
    const PagedStats s = c_.stats();
    std::uint64_t need = 0;
    if (live(id)) need = c_.pages_needed_to_append(id).count();
    const Outcome got = attempt([&] { return c_.append_token_all_layers(id); });
    if (!live(id)) {
      expect(got, Outcome::unknown, "append_token_all_layers: an unknown id");
    } else if (content_.contains(id)) {
      expect(got, Outcome::logic, "append_token_all_layers: a request allocated with token ids");
    } else if (need > s.free_pages.count() + s.cached_pages.count()) {
      expect(got, Outcome::no, "append_token_all_layers: all layers exactly when their pages can be had");
    } else {
      expect(got, stored_overflows(1, layers_) ? Outcome::overflow : Outcome::ok,
             "append_token_all_layers: all layers exactly when their pages can be had");
    }
    if (got != Outcome::ok) return unchanged(before, "append_token_all_layers");
    const PagedSnapshot after = snapshot(c_);
    others_unchanged(before, after, "append_token_all_layers", {id});
    const PagedRequest& was = before.requests.at(id);
    const PagedRequest& now = after.requests.at(id);
    for (std::size_t l = 0; l < layers_; ++l) {
      check(now.tokens[l] == was.tokens[l] + 1, "append_token_all_layers: every layer grew by one");
      if (!host_) continue;
      std::vector<Row> k = was.keys[l];
      k.emplace_back(row_, '\0');
      check(now.keys[l] == k, "append_token_all_layers: old bytes kept, a zero token added");
    }
  }

  template <class F>
  void write_checked(const std::string& id, std::size_t layer, std::size_t pos, bool shape_ok, F&& call,
                     const std::vector<std::byte>& key, const std::vector<std::byte>& value,
                     std::string_view what) {
    const PagedSnapshot before = snapshot(c_);
    const PagedStats s = c_.stats();
    const bool stored = layer < layers_ && live(id) && pos < c_.tokens(id, layer).count();
    const Outcome got = attempt(std::forward<F>(call));
    if (!host_) {
      expect(got, Outcome::logic, "write_kv in Storage::none");
    } else if (layer >= layers_) {
      expect(got, Outcome::out_of_range, "write_kv: a bad layer");
    } else if (!shape_ok) {
      expect(got, Outcome::shape, "write_kv: a wrong row");
    } else if (!live(id)) {
      expect(got, Outcome::unknown, "write_kv: an unknown id");
    } else if (!stored) {
      expect(got, Outcome::out_of_range, "write_kv: a position past the stored tokens");
    } else {
      check(got == Outcome::ok || got == Outcome::out_of_pages, what, name(got));
      check(got == Outcome::ok || (s.free_pages.count() == 0 && s.cached_pages.count() == 0), what,
            "OutOfPages with a free or cached page");
    }
    if (got != Outcome::ok) return unchanged(before, what);
    const PagedSnapshot after = snapshot(c_);
    others_unchanged(before, after, what, {id});
    const PagedRequest& was = before.requests.at(id);
    const PagedRequest& now = after.requests.at(id);
    check(now.tokens == was.tokens, what, "tokens changed");
    for (std::size_t l = 0; l < layers_; ++l) {
      std::vector<Row> k = was.keys[l];
      std::vector<Row> v = was.values[l];
      std::vector<std::uint32_t> t = was.tables[l];
      if (l == layer) {
        k[pos] = as_row(key);
        v[pos] = as_row(value);
        t[pos / ps_] = now.tables[l][pos / ps_];  // the written page may be a copy
      }
      check(now.keys[l] == k && now.values[l] == v, what, "bytes other than the written row changed, or it was not written");
      check(now.tables[l] == t, what, "a page other than the written one changed");
    }
  }

  void write_bytes(Reader& in, bool tokens_overload) {
    const std::string id = id_from(in, live_);
    const std::size_t layer = layer_from(in, layers_);
    const std::size_t pos = position_from(in);
    const auto key = bytes_from(in, row_);
    const auto value = bytes_from(in, row_);
    trace([&] { return "write_kv(\"" + id + "\", " + std::to_string(layer) + ", " + std::to_string(pos) + ", " +
          std::to_string(key.size()) + " B, " + std::to_string(value.size()) + " B)"; });
    const bool shape_ok = key.size() == row_ && value.size() == row_;
    if (tokens_overload) {
      write_checked(id, layer, pos, shape_ok, [&] { c_.write_kv(id, layer, Tokens{pos}, key, value); }, key, value,
                    "write_kv (bytes, Tokens)");
    } else {
      write_checked(id, layer, pos, shape_ok, [&] { c_.write_kv(id, layer, pos, key, value); }, key, value,
                    "write_kv (bytes)");
    }
  }

  void write_floats(Reader& in) {
    const std::string id = id_from(in, live_);
    const std::size_t layer = layer_from(in, layers_);
    const std::size_t pos = position_from(in);
    const auto key = floats_from(in, elements_);
    const auto value = floats_from(in, elements_);
    trace([&] { return "write_kv(\"" + id + "\", " + std::to_string(layer) + ", " + std::to_string(pos) + ", " +
          std::to_string(key.size()) + " floats, " + std::to_string(value.size()) + " floats)"; });
    const bool shape_ok = c_.config().dtype_bytes == 4 && key.size() == elements_ && value.size() == elements_;
    const auto kb = std::as_bytes(std::span<const float>(key));
    const auto vb = std::as_bytes(std::span<const float>(value));
    write_checked(id, layer, pos, shape_ok,
                  [&] { c_.write_kv(id, layer, pos, std::span<const float>(key), std::span<const float>(value)); },
                  std::vector<std::byte>(kb.begin(), kb.end()), std::vector<std::byte>(vb.begin(), vb.end()),
                  "write_kv (floats)");
  }

  // Automatic prefix caching by content. Prompts come from a vocabulary of
  // 3 token ids and 2 salts, so that prefixes are found often.
  std::vector<kvcache::TokenId> token_ids_from(Reader& in, std::size_t most) {
    std::vector<kvcache::TokenId> ids(in.u8() % (most + 1));
    for (auto& t : ids) t = in.u8() % 3U;
    return ids;
  }

  // Every page shared by content holds a block of exactly these token ids
  // and salt: no content is ever shared by key alone.
  void shared_pages_match(const std::string& id, std::span<const kvcache::TokenId> prompt,
                          std::string_view salt, std::uint64_t cached) const {
    for (std::size_t l = 0; l < layers_; ++l) {
      const auto table = c_.block_table(id, l);
      for (std::uint64_t i = 0; i < cached / ps_; ++i) {
        const auto* b = c_.registry().block_owner(table[static_cast<std::size_t>(i)]);
        check(b != nullptr, "allocate_paged (token ids): a shared page belongs to a block");
        const auto want = prompt.subspan(static_cast<std::size_t>(i * ps_), static_cast<std::size_t>(ps_));
        check(std::equal(b->tokens.begin(), b->tokens.end(), want.begin(), want.end()) && b->salt == salt &&
                  b->first_token == i * ps_,
              "allocate_paged (token ids): a shared page holds other content");
      }
    }
  }

  void allocate_content(Reader& in) {
    const std::string id = id_from(in, live_);
    const auto prompt = token_ids_from(in, 40);
    const std::string_view salt = (in.u8() & 1U) != 0 ? "a" : "";
    trace([&] { return "allocate_paged(\"" + id + "\", " + std::to_string(prompt.size()) + " token ids, \"" +
          std::string(salt) + "\")"; });
    const PagedSnapshot before = snapshot(c_);
    const PagedStats s = c_.stats();
    const std::uint64_t per_layer = (prompt.size() / ps_) + (prompt.size() % ps_ != 0 ? 1U : 0U);
    const Outcome got = attempt([&] { return c_.allocate_paged(id, prompt, salt); });
    if (live(id)) {
      expect(got, Outcome::no, "allocate_paged (token ids): a duplicate id");
    } else if (stored_overflows(prompt.size(), layers_)) {
      check(got == Outcome::overflow || got == Outcome::no, "allocate_paged (token ids): stored tokens overflowing",
            name(got));
    } else {
      check(got == Outcome::ok || got == Outcome::no, "allocate_paged (token ids)", name(got));
      // Without any page shared it needs per_layer * layers pages: free ones always do.
      check(got == Outcome::ok || per_layer * layers_ > s.free_pages.count(),
            "allocate_paged (token ids): false although the free pages cover the whole prompt");
    }
    if (got != Outcome::ok) return unchanged(before, "allocate_paged (token ids)");
    live_.insert(id);
    content_.insert(id);
    const PagedSnapshot after = snapshot(c_);
    others_unchanged(before, after, "allocate_paged (token ids)", {id});
    const std::uint64_t cached = c_.cached_tokens(id).count();
    check(cached % ps_ == 0 && (prompt.empty() ? cached == 0 : cached < prompt.size()),
          "allocate_paged (token ids): whole pages, at most prompt - 1 tokens cached");
    check(c_.content_addressed(id), "allocate_paged (token ids): content addressed");
    const PagedRequest& r = after.requests.at(id);
    for (std::size_t l = 0; l < layers_; ++l) {
      check(r.tokens[l] == prompt.size(), "allocate_paged (token ids): every layer holds the prompt");
      if (!host_) continue;
      for (std::size_t t = cached; t < prompt.size(); ++t) {
        check(r.keys[l][t] == Row(row_, '\0') && r.values[l][t] == Row(row_, '\0'),
              "allocate_paged (token ids): tokens past the cached ones read as zero");
      }
    }
    shared_pages_match(id, prompt, salt, cached);
  }

  void append_ids(Reader& in) {
    const std::string id = id_from(in, live_);
    const auto ids = token_ids_from(in, 12);
    trace([&] { return "append_token_ids(\"" + id + "\", " + std::to_string(ids.size()) + " token ids)"; });
    const PagedSnapshot before = snapshot(c_);
    const PagedStats s = c_.stats();
    const Outcome got = attempt([&] { return c_.append_token_ids(id, ids); });
    if (!live(id)) {
      expect(got, Outcome::unknown, "append_token_ids: an unknown id");
    } else if (!content_.contains(id)) {
      expect(got, Outcome::logic, "append_token_ids: a request allocated without token ids");
    } else if (ids.empty()) {
      expect(got, Outcome::ok, "append_token_ids: nothing to append");
    } else if (stored_overflows(ids.size(), layers_)) {
      check(got == Outcome::overflow || got == Outcome::no, "append_token_ids: stored tokens overflowing", name(got));
    } else {
      check(got == Outcome::ok || got == Outcome::no, "append_token_ids", name(got));
      // At most one new page per layer per page of tokens, plus a copy of
      // the last page: free pages that cover that always do.
      const std::uint64_t most = layers_ * (ids.size() / ps_ + 2U);
      check(got == Outcome::ok || most > s.free_pages.count(),
            "append_token_ids: false although the free pages cover every page it could need");
    }
    if (got != Outcome::ok) return unchanged(before, "append_token_ids");
    const PagedSnapshot after = snapshot(c_);
    others_unchanged(before, after, "append_token_ids", {id});
    const PagedRequest& was = before.requests.at(id);
    const PagedRequest& now = after.requests.at(id);
    for (std::size_t l = 0; l < layers_; ++l) {
      check(now.tokens[l] == was.tokens[l] + ids.size(), "append_token_ids: every layer grew by the tokens");
      if (!host_) continue;
      std::vector<Row> k = was.keys[l];
      k.resize(k.size() + ids.size(), Row(row_, '\0'));
      check(now.keys[l] == k, "append_token_ids: old bytes kept, zero tokens added");
    }
  }

  void fork(Reader& in) {
    const std::string parent = id_from(in, live_);
    const std::string child = id_from(in, live_);
    trace([&] { return "fork(\"" + parent + "\", \"" + child + "\")"; });
    const PagedSnapshot before = snapshot(c_);
    std::uint64_t parent_tokens = 0;
    bool overflows = false;
    if (live(parent)) {
      for (const std::uint64_t t : before.requests.at(parent).tokens) {
        overflows = overflows || t > kMax - parent_tokens;
        parent_tokens += overflows ? 0 : t;
      }
      overflows = overflows || stored_overflows(parent_tokens, 1);
    }
    const Outcome got = attempt([&] { return c_.fork(parent, child); });
    if (!live(parent)) {
      expect(got, Outcome::unknown, "fork: an unknown parent");
    } else if (live(child)) {
      expect(got, Outcome::no, "fork: an existing child id");
    } else {
      expect(got, overflows ? Outcome::overflow : Outcome::ok, "fork (stored tokens overflowing 64 bits)");
    }
    if (got != Outcome::ok) return unchanged(before, "fork");
    live_.insert(child);
    if (content_.contains(parent)) content_.insert(child);
    check(c_.cached_tokens(child) == c_.cached_tokens(parent), "fork: the child has the parent's cached tokens");
    const PagedSnapshot after = snapshot(c_);
    others_unchanged(before, after, "fork", {child});
    const PagedRequest& p = after.requests.at(parent);
    const PagedRequest& k = after.requests.at(child);
    check(k.tokens == p.tokens && k.tables == p.tables && k.keys == p.keys && k.values == p.values,
          "fork: the child shares every page of the parent");
  }

  void free(Reader& in) {
    const std::string id = id_from(in, live_);
    trace([&] { return "free(\"" + id + "\")"; });
    const PagedSnapshot before = snapshot(c_);
    const Outcome got = attempt([&] { c_.free(id); });
    expect(got, live(id) ? Outcome::ok : Outcome::unknown, "free");
    if (got != Outcome::ok) return unchanged(before, "free");
    live_.erase(id);
    content_.erase(id);
    const PagedSnapshot after = snapshot(c_);
    others_unchanged(before, after, "free", {id});
    check(!c_.contains(id), "free: the id is gone");
  }

  void evict(Reader& in) {
    const std::string_view hash = hash_from(in);
    trace([&] { return "evict_prefix(\"" + std::string(hash) + "\")"; });
    const PagedSnapshot before = snapshot(c_);
    const bool had = c_.has_prefix(hash);
    const Outcome got = attempt([&] { return c_.evict_prefix(hash); });
    expect(got, had ? Outcome::ok : Outcome::no, "evict_prefix");
    if (got != Outcome::ok) return unchanged(before, "evict_prefix");
    check(!c_.has_prefix(hash), "evict_prefix: the hash is gone");
    others_unchanged(before, snapshot(c_), "evict_prefix", {});
  }

  void clear() {
    trace([&] { return "clear_prefix_cache()"; });
    const PagedSnapshot before = snapshot(c_);
    const std::size_t registered = c_.stats().registered_prefixes + c_.registry().num_blocks();
    const std::size_t n = c_.clear_prefix_cache();
    check(n == registered, "clear_prefix_cache returns the prefixes and blocks it dropped");
    check(c_.registry().num_blocks() == 0, "clear_prefix_cache: no block left");
    const auto events = c_.drain_events();
    check(!events.empty() && events.back().kind == kvcache::KvEventKind::all_cleared,
          "clear_prefix_cache: ends with an all_cleared event");
    check(c_.stats().cached_pages == Pages{0} && c_.stats().registered_prefixes == 0,
          "clear_prefix_cache: nothing cached or registered");
    others_unchanged(before, snapshot(c_), "clear_prefix_cache", {});
  }

  // The const calls reject bad ids and layers with the contract's types.
  void queries(Reader& in) {
    const std::string id = id_from(in, live_);
    const std::size_t layer = layer_from(in, layers_);
    trace([&] { return "queries(\"" + id + "\", " + std::to_string(layer) + ")"; });
    const Outcome want = layer >= layers_ ? Outcome::out_of_range : live(id) ? Outcome::ok : Outcome::unknown;
    expect(attempt([&] { static_cast<void>(c_.block_table(id, layer)); }), want, "block_table");
    expect(attempt([&] { static_cast<void>(c_.tokens(id, layer)); }), want, "tokens");
    expect(attempt([&] { static_cast<void>(c_.get_kv(id, layer)); }), host_ ? want : Outcome::logic, "get_kv");
    expect(attempt([&] { static_cast<void>(c_.pages_held(id)); }), live(id) ? Outcome::ok : Outcome::unknown,
           "pages_held");
    expect(attempt([&] { static_cast<void>(c_.pages_needed_to_append(id)); }),
           live(id) ? Outcome::ok : Outcome::unknown, "pages_needed_to_append");
  }

  PagedKVCache c_;
  std::set<std::string> live_;  // the shadow: ids the cache must hold
  std::set<std::string> content_;  // of those, allocated with token ids (or forked from one)
  std::size_t row_;
  std::size_t elements_;
  std::uint32_t layers_;
  std::uint64_t ps_;
  bool host_;
};

// ---------------------------------------------------------------------------
// The basic harness.

class BasicHarness {
 public:
  BasicHarness(ModelConfig config, Bytes budget, Storage storage)
      : c_(config, budget, storage),
        row_(static_cast<std::size_t>(config.kv_bytes_per_token_per_layer().count())),
        elements_(static_cast<std::size_t>(config.kv_elements_per_token_per_layer())),
        layers_(config.num_layers),
        bpt_(config.bytes_per_token().count()),
        host_(storage == Storage::host) {}

  void step(Reader& in) {
    const std::uint8_t op = in.u8();
    switch (op % 8U) {
      case 0:
      case 1: allocate(in); break;
      case 2:
      case 3: append_bytes(in); break;
      case 4: append_floats(in); break;
      case 5: free(in); break;
      case 6: queries(in); break;
      default: append_zero(in); break;
    }
    invariants();
  }

 private:
  [[nodiscard]] bool live(const std::string& id) const { return live_.contains(id); }

  void invariants() const {
    check(c_.check_invariants(), "check_invariants()");
    const BasicStats s = c_.stats();
    check(s.used_memory.count() + s.free_memory.count() == s.total_memory.count(), "used + free == total");
    check(s.num_requests == live_.size(), "num_requests == live ids");
    std::uint64_t used = 0;
    std::uint64_t reserved = 0;
    std::uint64_t stored = 0;
    for (const std::string& id : id_names()) {
      check(c_.contains(id) == live(id), "contains() agrees with the live ids", id);
      if (!live(id)) continue;
      const std::uint64_t r = c_.reservation(id).count();
      used += r * bpt_;
      reserved += r;
      for (std::size_t l = 0; l < layers_; ++l) {
        const std::uint64_t t = c_.tokens(id, l).count();
        check(t <= r, "a layer holds at most its reservation", id);
        stored += t;
      }
    }
    check(used == s.used_memory.count(), "used == sum of reservation * bytes_per_token");
    check(reserved == s.reserved_tokens.count(), "reserved_tokens == sum of reservations");
    check(stored == s.stored_tokens.count(), "stored_tokens == sum of tokens");
  }

  void unchanged(const BasicSnapshot& before, std::string_view call,
                 const std::source_location& where = std::source_location::current()) {
    ++figures().rejected_calls;
    check(snapshot(c_) == before, call, "a rejected call changed the cache", where);
  }

  void allocate(Reader& in) {
    const std::string id = id_from(in, live_);
    const std::uint64_t prompt = tokens_from(in);
    const std::uint64_t max_gen = tokens_from(in);
    trace([&] { return "allocate(\"" + id + "\", " + std::to_string(prompt) + ", " + std::to_string(max_gen) + ")"; });
    const bool sum_overflows = prompt > kMax - max_gen;
    const bool overflows = sum_overflows || prompt + max_gen > kMax / bpt_;
    const std::uint64_t bytes = overflows ? 0 : (prompt + max_gen) * bpt_;
    const BasicStats s = c_.stats();
    const bool fits = !overflows && bytes <= s.free_memory.count();
    if (host_ && fits && !live(id) && bytes > kMaxRealAllocation) return;  // harness limit: a real allocation
    const BasicSnapshot before = snapshot(c_);
    if (!overflows) {
      check(c_.can_allocate(Tokens{prompt}, Tokens{max_gen}) == fits, "can_allocate: used + reservation <= budget");
      const kvcache::Admission a = c_.admission(Tokens{prompt}, Tokens{max_gen});
      check((a == kvcache::Admission::now) == fits, "admission == now exactly when it fits");
      check((a == kvcache::Admission::never) == (bytes > s.total_memory.count()),
            "admission == never exactly when larger than the budget");
    } else {
      expect(attempt([&] { static_cast<void>(c_.can_allocate(Tokens{prompt}, Tokens{max_gen})); }),
             Outcome::overflow, "can_allocate: a reservation overflowing 64 bits");
      expect(attempt([&] { static_cast<void>(c_.admission(Tokens{prompt}, Tokens{max_gen})); }),
             Outcome::overflow, "admission: a reservation overflowing 64 bits");
    }
    const Outcome got = attempt([&] { return c_.allocate(id, Tokens{prompt}, Tokens{max_gen}); });
    if (overflows) {
      expect(got, Outcome::overflow, "allocate: a reservation overflowing 64 bits");
      names(id, "allocate: the overflow message names the request");
    } else if (live(id)) {
      expect(got, Outcome::no, "allocate: a duplicate id");
    } else {
      expect(got, fits ? Outcome::ok : Outcome::no, "allocate: fits exactly when used + reservation <= budget");
    }
    if (got != Outcome::ok) return unchanged(before, "allocate");
    live_.insert(id);
    const BasicSnapshot after = snapshot(c_);
    others_unchanged(before, after, "allocate", {id});
    const BasicRequest& r = after.requests.at(id);
    check(r.reservation == prompt + max_gen, "allocate: reservation == prompt + max_gen");
    for (const std::uint64_t t : r.tokens) check(t == 0, "allocate: a new request holds no token");
  }

  template <class F>
  void append_checked(const std::string& id, std::size_t layer, bool data, bool shape_ok, F&& call,
                      const std::vector<std::byte>& key, const std::vector<std::byte>& value,
                      std::string_view what) {
    const BasicSnapshot before = snapshot(c_);
    const bool full = layer < layers_ && live(id) && c_.tokens(id, layer) == c_.reservation(id);
    const Outcome got = attempt(std::forward<F>(call));
    if (data && !host_) {
      expect(got, Outcome::logic, "append_token with data in Storage::none");
    } else if (layer >= layers_) {
      expect(got, Outcome::out_of_range, "append_token: a bad layer");
    } else if (!shape_ok) {
      expect(got, Outcome::shape, "append_token: a wrong row");
    } else if (!live(id)) {
      expect(got, Outcome::unknown, "append_token: an unknown id");
    } else if (full) {
      expect(got, Outcome::reservation, "append_token: past the reservation");
    } else {
      expect(got, Outcome::ok, what);
    }
    if (got != Outcome::ok) return unchanged(before, what);
    const BasicSnapshot after = snapshot(c_);
    others_unchanged(before, after, what, {id});
    BasicRequest want = before.requests.at(id);
    ++want.tokens[layer];
    if (host_) {
      const Row zero(row_, '\0');
      want.keys[layer].push_back(key.empty() ? zero : as_row(key));
      want.values[layer].push_back(value.empty() ? zero : as_row(value));
    }
    check(after.requests.at(id) == want, what, "not exactly one more token with the given bytes");
  }

  void append_bytes(Reader& in) {
    const std::string id = id_from(in, live_);
    const std::size_t layer = layer_from(in, layers_);
    const auto key = bytes_from(in, row_);
    const auto value = bytes_from(in, row_);
    trace([&] { return "append_token(\"" + id + "\", " + std::to_string(layer) + ", " + std::to_string(key.size()) +
          " B, " + std::to_string(value.size()) + " B)"; });
    append_checked(id, layer, true, key.size() == row_ && value.size() == row_,
                   [&] { c_.append_token(id, layer, key, value); }, key, value, "append_token (bytes)");
  }

  void append_zero(Reader& in) {
    const std::string id = id_from(in, live_);
    const std::size_t layer = layer_from(in, layers_);
    trace([&] { return "append_token(\"" + id + "\", " + std::to_string(layer) + ")"; });
    append_checked(id, layer, false, true, [&] { c_.append_token(id, layer); }, {}, {},
                   "append_token (no data)");
  }

  void append_floats(Reader& in) {
    const std::string id = id_from(in, live_);
    const std::size_t layer = layer_from(in, layers_);
    const auto key = floats_from(in, elements_);
    const auto value = floats_from(in, elements_);
    trace([&] { return "append_token(\"" + id + "\", " + std::to_string(layer) + ", " + std::to_string(key.size()) +
          " floats, " + std::to_string(value.size()) + " floats)"; });
    const bool shape_ok = c_.config().dtype_bytes == 4 && key.size() == elements_ && value.size() == elements_;
    const auto kb = std::as_bytes(std::span<const float>(key));
    const auto vb = std::as_bytes(std::span<const float>(value));
    append_checked(id, layer, true, shape_ok,
                   [&] { c_.append_token(id, layer, std::span<const float>(key), std::span<const float>(value)); },
                   std::vector<std::byte>(kb.begin(), kb.end()), std::vector<std::byte>(vb.begin(), vb.end()),
                   "append_token (floats)");
  }

  void free(Reader& in) {
    const std::string id = id_from(in, live_);
    trace([&] { return "free(\"" + id + "\")"; });
    const BasicSnapshot before = snapshot(c_);
    const Outcome got = attempt([&] { c_.free(id); });
    expect(got, live(id) ? Outcome::ok : Outcome::unknown, "free");
    if (got != Outcome::ok) return unchanged(before, "free");
    live_.erase(id);
    const BasicSnapshot after = snapshot(c_);
    others_unchanged(before, after, "free", {id});
    check(after.stats[1] == before.stats[1] - before.requests.at(id).reservation * bpt_,
          "free releases exactly the reservation");
  }

  void queries(Reader& in) {
    const std::string id = id_from(in, live_);
    const std::size_t layer = layer_from(in, layers_);
    trace([&] { return "queries(\"" + id + "\", " + std::to_string(layer) + ")"; });
    const Outcome want = layer >= layers_ ? Outcome::out_of_range : live(id) ? Outcome::ok : Outcome::unknown;
    expect(attempt([&] { static_cast<void>(c_.get_kv(id, layer)); }), host_ ? want : Outcome::logic, "get_kv");
    expect(attempt([&] { static_cast<void>(c_.tokens(id, layer)); }), want, "tokens");
    expect(attempt([&] { static_cast<void>(c_.reservation(id)); }), live(id) ? Outcome::ok : Outcome::unknown,
           "reservation");
  }

  BasicKVCache c_;
  std::set<std::string> live_;  // the shadow: ids the cache must hold
  std::size_t row_;
  std::size_t elements_;
  std::uint32_t layers_;
  std::uint64_t bpt_;
  bool host_;
};

// ---------------------------------------------------------------------------
// One input.

void run_paged(Reader& in, const Config& cfg, bool none) {
  const std::uint8_t p = in.u8();
  const std::uint64_t page_size = p == 0 ? 0 : p == 255 ? in.u64() : 1U + (p % 8U);
  const std::uint8_t b = in.u8();
  const Storage storage = none ? Storage::none : Storage::host;
  trace([&] { return "PagedKVCache(layers " + std::to_string(cfg.model.num_layers) + ", heads " +
        std::to_string(cfg.model.num_kv_heads) + ", head_dim " + std::to_string(cfg.model.head_dim) +
        ", dtype " + std::to_string(cfg.model.dtype_bytes) + ", page " + std::to_string(page_size) +
        (none ? ", none)" : ", host)"); });
  // The expected construction outcome, in the order of the checks.
  std::uint64_t bpp = 0;
  bool page_overflows = false;
  if (cfg.valid && page_size != 0) {
    const std::uint64_t row2 = 2 * std::uint64_t{cfg.model.num_kv_heads} * cfg.model.head_dim * cfg.model.dtype_bytes;
    page_overflows = page_size > kMax / row2;
    bpp = page_overflows ? 0 : page_size * row2;
  }
  std::uint64_t budget = 0;
  if (b == 255) {
    budget = in.u64();
  } else if (bpp != 0) {
    const std::uint64_t n = b % 49U;
    budget = n > kMax / bpp ? kMax : n * bpp;
    budget += std::min<std::uint64_t>(in.u8() % bpp, kMax - budget);
  } else {
    budget = (std::uint64_t{b} * 64U) + in.u8();
  }
  const auto construct = [&] { PagedKVCache c(cfg.model, Bytes{budget}, Tokens{page_size}, storage); };
  if (!cfg.valid) {
    expect(attempt(construct), Outcome::invalid, "PagedKVCache: an invalid ModelConfig");
    check(g_last_message.find(cfg.bad_field) != std::string::npos, "the message names the field", g_last_message);
    return;
  }
  if (page_size == 0) {
    expect(attempt(construct), Outcome::invalid, "PagedKVCache: page size 0");
    return;
  }
  if (page_overflows) {
    expect(attempt(construct), Outcome::overflow, "PagedKVCache: a page's bytes overflow 64 bits");
    return;
  }
  const std::uint64_t pool = budget / bpp;
  if (pool > std::uint64_t{kvcache::PageId::max_index} + 1) {
    expect(attempt(construct), Outcome::invalid, "PagedKVCache: more pages than a PageId names");
    return;
  }
  const std::uint64_t row = cfg.model.kv_bytes_per_token_per_layer().count();
  if (pool > kMaxPages || cfg.model.num_layers > kMaxLayers || row > kMaxRowBytes) return;  // harness limits
  // In host mode every operation snapshots every stored row: a pool holding
  // millions of tokens per layer (huge pages) would make one input take
  // minutes and gigabytes. Storage::none has no rows and runs any page size.
  if (!none && (page_size > kMaxHostSlots || pool * page_size > kMaxHostSlots)) return;
  // The arena is one mapping of pool * bytes_per_page: with huge pages the
  // address space may not be had, and the contract's answer is std::bad_alloc.
  std::optional<PagedKVCache> cache;
  try {
    cache.emplace(cfg.model, Bytes{budget}, Tokens{page_size}, storage);
  } catch (const std::bad_alloc&) {
    check(!none && pool * bpp >= (std::uint64_t{1} << 32U), "PagedKVCache: std::bad_alloc for a small arena");
    return;
  }
  PagedHarness h(std::move(*cache));
  check(h.cache().stats().total_pages == Pages{pool}, "total_pages == budget / bytes_per_page");
  for (std::size_t k = 0; k < kMaxOps && !in.empty(); ++k) {
    ++figures().operations;
    ++figures().input_operations;
    h.step(in);
  }
}

void run_basic(Reader& in, const Config& cfg, bool none) {
  const std::uint8_t b = in.u8();
  trace([&] { return "BasicKVCache(layers " + std::to_string(cfg.model.num_layers) + ", heads " +
        std::to_string(cfg.model.num_kv_heads) + ", head_dim " + std::to_string(cfg.model.head_dim) +
        ", dtype " + std::to_string(cfg.model.dtype_bytes) + ")"; });
  if (!cfg.valid) {
    expect(attempt([&] { BasicKVCache c(cfg.model, Bytes{1024}); }), Outcome::invalid,
           "BasicKVCache: an invalid ModelConfig");
    check(g_last_message.find(cfg.bad_field) != std::string::npos, "the message names the field", g_last_message);
    return;
  }
  const std::uint64_t row = cfg.model.kv_bytes_per_token_per_layer().count();
  if (cfg.model.num_layers > kMaxLayers || row > kMaxRowBytes) return;  // harness limits
  const std::uint64_t bpt = cfg.model.bytes_per_token().count();
  const std::uint64_t budget = b == 255 ? in.u64() : (std::uint64_t{b} * bpt * 2U) + in.u8();
  BasicHarness h(cfg.model, Bytes{budget}, none ? Storage::none : Storage::host);
  for (std::size_t k = 0; k < kMaxOps && !in.empty(); ++k) {
    ++figures().operations;
    ++figures().input_operations;
    h.step(in);
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  static_cast<void>(std::atexit(print_figures));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  ++figures().inputs;
  figures().input_operations = 0;
  Reader in(std::span<const std::uint8_t>(data, size));
  const std::uint8_t mode = in.u8();
  ModelConfig m;
  if (((mode >> 2U) & 7U) == 0) {
    m = ModelConfig{in.u32(), in.u32(), in.u32(), in.u32()};
  } else {
    const std::uint8_t c = in.u8();
    constexpr std::array<std::uint32_t, 4> dtypes{1, 2, 4, 4};
    m = ModelConfig{1U + (c & 3U), 1U + ((c >> 2U) & 1U), 1U + ((c >> 3U) & 7U), dtypes[c >> 6U]};
  }
  const Config cfg = judge(m);
  if ((mode & 1U) != 0) {
    run_paged(in, cfg, (mode & 2U) != 0);
  } else {
    run_basic(in, cfg, (mode & 2U) != 0);
  }
  return 0;
}
