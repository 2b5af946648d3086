// Unit tests for kvcache.basic: BasicKVCache, one contiguous reservation of
// (prompt + max_gen) * bytes_per_token per request (CONTRACT.md
// "BasicKVCache", "Errors", "KV data").
//
// Every failure path checks the exception type (or the `false`) AND that the
// cache is exactly as before: `Snapshot` captures the stats, the live ids,
// each request's reservation, its tokens per layer and every stored key and
// value byte. Most tests use a small model (4 layers, 2 KV heads, head_dim 8,
// 2-byte elements: 32-byte rows, 256 bytes per token) so budgets are easy to
// reason about; the seed model of the contract appears where its numbers
// matter (the seed figures, the lazy-commit test).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <new>
#include <ostream>
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
using kvcache::Tokens;

constexpr ModelConfig kSmall{4, 2, 8, 2};        // 32-byte rows, 256 bytes per token
constexpr std::size_t kRow = 32;                 // kSmall.kv_bytes_per_token_per_layer()
constexpr std::uint64_t kBytesPerToken = 256;    // kSmall.bytes_per_token()
constexpr ModelConfig kSeed{32, 8, 128, 2};      // 2048-byte rows, 131072 bytes per token
constexpr ModelConfig kFloat{3, 2, 4, 4};        // fp32: 8 floats = 32 bytes per row
constexpr std::uint64_t kMax = std::numeric_limits<std::uint64_t>::max();
constexpr std::size_t kMiB = std::size_t{1} << 20;

static_assert(kSmall.kv_bytes_per_token_per_layer() == Bytes{kRow});
static_assert(kSmall.bytes_per_token() == Bytes{kBytesPerToken});

Bytes tokens_bytes(std::uint64_t tokens) { return Bytes{tokens * kBytesPerToken}; }

// A row of `n` bytes whose content is unique to (tag, layer, token): byte i is
// a mix of all four, so a row read from the wrong place differs.
std::vector<std::byte> row(std::size_t n, std::uint8_t tag, std::size_t layer, std::size_t token) {
  std::vector<std::byte> r(n);
  for (std::size_t i = 0; i < n; ++i) {
    r[i] = static_cast<std::byte>((std::size_t{tag} * 131U) ^ (layer * 37U) ^ (token * 11U) ^ (i * 7U) ^
                                  (i >> 8U));
  }
  return r;
}
std::vector<std::byte> key_row(std::size_t layer, std::size_t token, std::size_t n = kRow) {
  return row(n, 0x4B, layer, token);
}
std::vector<std::byte> value_row(std::size_t layer, std::size_t token, std::size_t n = kRow) {
  return row(n, 0x56, layer, token);
}

std::vector<std::byte> copy(std::span<const std::byte> s) { return {s.begin(), s.end()}; }

// ---------------------------------------------------------------------------
// Snapshot: everything observable about a cache

struct RequestState {
  std::string id;
  Tokens reservation;
  std::vector<Tokens> tokens;                           // per layer
  std::vector<std::vector<std::vector<std::byte>>> keys;  // [layer][token] -> bytes
  std::vector<std::vector<std::vector<std::byte>>> values;
  friend bool operator==(const RequestState&, const RequestState&) = default;
};

struct Snapshot {
  Bytes total_memory;
  Bytes used_memory;
  Bytes free_memory;
  Tokens reserved_tokens;
  Tokens stored_tokens;
  std::size_t num_requests = 0;
  double utilization_pct = 0;
  std::vector<RequestState> requests;  // sorted by id
  friend bool operator==(const Snapshot&, const Snapshot&) = default;

  friend void PrintTo(const Snapshot& s, std::ostream* os) {
    *os << "{total " << s.total_memory << ", used " << s.used_memory << ", free "
        << s.free_memory << ", reserved " << s.reserved_tokens << ", stored " << s.stored_tokens
        << ", requests " << s.num_requests << ", util " << s.utilization_pct << "%:";
    for (const RequestState& r : s.requests) {
      *os << " \"" << r.id << "\"(" << r.reservation << "; per layer";
      for (const Tokens t : r.tokens) *os << ' ' << t.count();
      *os << ')';
    }
    *os << '}';
  }
};

Snapshot snapshot(const BasicKVCache& cache) {
  const BasicStats st = cache.stats();
  Snapshot s{st.total_memory,    st.used_memory, st.free_memory,      st.reserved_tokens,
             st.stored_tokens,   st.num_requests, st.utilization_pct, {}};
  std::vector<std::string> ids = cache.request_ids();
  std::sort(ids.begin(), ids.end());
  for (const std::string& id : ids) {
    RequestState r{id, cache.reservation(id), {}, {}, {}};
    for (std::size_t layer = 0; layer < cache.config().num_layers; ++layer) {
      r.tokens.push_back(cache.tokens(id, layer));
      if (cache.storage() == kvcache::Storage::none) continue;  // no bytes to read
      const auto [keys, values] = cache.get_kv(id, layer);
      auto& k = r.keys.emplace_back();
      auto& v = r.values.emplace_back();
      for (std::size_t i = 0; i < keys.size(); ++i) k.push_back(copy(keys[i]));
      for (std::size_t i = 0; i < values.size(); ++i) v.push_back(copy(values[i]));
    }
    s.requests.push_back(std::move(r));
  }
  return s;
}

// A small cache with some state: "a" (prompt 3, max_gen 2) holding 2 tokens
// in layer 0 and 1 in layer 3, "b" (prompt 1, max_gen 1) holding 1 in layer 1.
// Budget 20 tokens: 7 reserved.
BasicKVCache populated_cache() {
  BasicKVCache cache(kSmall, tokens_bytes(20));
  EXPECT_TRUE(cache.allocate("a", Tokens{3}, Tokens{2}));
  EXPECT_TRUE(cache.allocate("b", Tokens{1}, Tokens{1}));
  cache.append_token("a", 0, key_row(0, 0), value_row(0, 0));
  cache.append_token("a", 0, key_row(0, 1), value_row(0, 1));
  cache.append_token("a", 3, key_row(3, 0), value_row(3, 0));
  cache.append_token("b", 1, key_row(1, 0), value_row(1, 0));
  return cache;
}

template <class E, class F>
std::string message_of(F&& f) {
  try {
    std::forward<F>(f)();
  } catch (const E& e) {
    return e.what();
  } catch (...) {
    ADD_FAILURE() << "threw an exception of another type";
    return {};
  }
  ADD_FAILURE() << "did not throw";
  return {};
}

// Expects `f` to throw std::out_of_range that is not UnknownRequest.
template <class F>
void expect_out_of_range_not_unknown(F&& f) {
  try {
    std::forward<F>(f)();
    ADD_FAILURE() << "did not throw";
  } catch (const kvcache::UnknownRequest& e) {
    ADD_FAILURE() << "threw UnknownRequest for a bad layer: " << e.what();
  } catch (const std::out_of_range&) {
    SUCCEED();
  } catch (...) {
    ADD_FAILURE() << "threw an exception of another type";
  }
}

bool has(const std::string& haystack, std::string_view needle) {
  return haystack.find(needle) != std::string::npos;
}

std::size_t resident_bytes() {
  std::ifstream status("/proc/self/status");
  std::string key;
  while (status >> key) {
    if (key == "VmRSS:") {
      std::size_t kib = 0;
      status >> kib;
      return kib * 1024;
    }
    status.ignore(1 << 12, '\n');
  }
  return 0;
}

std::size_t grew(std::size_t before, std::size_t after) {
  return after > before ? after - before : 0;
}

// ---------------------------------------------------------------------------
// Construction

TEST(BasicKVCacheTest, BuiltFromACopyListInitializedConfig) {
  BasicKVCache cache({32, 8, 128, 2}, Bytes{8ULL << 30});
  EXPECT_EQ(cache.config(), kSeed);
  EXPECT_EQ(cache.budget(), Bytes{8ULL << 30});
  const BasicStats s = cache.stats();
  EXPECT_EQ(s.total_memory, Bytes{8ULL << 30});
  EXPECT_EQ(s.used_memory, Bytes{0});
  EXPECT_EQ(s.free_memory, Bytes{8ULL << 30});
  EXPECT_EQ(s.reserved_tokens, Tokens{0});
  EXPECT_EQ(s.stored_tokens, Tokens{0});
  EXPECT_EQ(s.num_requests, 0U);
  EXPECT_EQ(cache.num_requests(), 0U);
  EXPECT_DOUBLE_EQ(s.utilization_pct, 0.0);
  EXPECT_TRUE(cache.request_ids().empty());
  EXPECT_TRUE(cache.check_invariants());
}

TEST(BasicKVCacheTest, InvalidConfigThrowsInvalidArgumentNamingTheField) {
  struct Case {
    ModelConfig cfg;
    const char* field;
  };
  const std::vector<Case> cases = {
      {{0, 8, 128, 2}, "num_layers"},
      {{32, 0, 128, 2}, "num_kv_heads"},
      {{32, 8, 0, 2}, "head_dim"},
      {{32, 8, 128, 0}, "dtype_bytes"},
      {{2, 1U << 31, 1U << 31, 1}, "num_layers"},  // 2^64 bytes per token
      {{1, 0xFFFFFFFFU, 0xFFFFFFFFU, 2}, "dtype_bytes"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(kvcache::to_string(c.cfg));
    const std::string msg =
        message_of<std::invalid_argument>([&] { BasicKVCache cache(c.cfg, Bytes{1ULL << 30}); });
    EXPECT_TRUE(has(msg, c.field)) << msg;
  }
}

TEST(BasicKVCacheTest, ZeroBudgetHoldsOnlyEmptyReservations) {
  BasicKVCache cache(kSmall, Bytes{0});
  EXPECT_DOUBLE_EQ(cache.stats().utilization_pct, 0.0);
  EXPECT_FALSE(cache.allocate("one", Tokens{1}, Tokens{0}));
  EXPECT_TRUE(cache.allocate("empty", Tokens{0}, Tokens{0}));  // 0 <= 0: fits
  EXPECT_EQ(cache.stats().num_requests, 1U);
  EXPECT_EQ(cache.stats().used_memory, Bytes{0});
  EXPECT_TRUE(cache.check_invariants());
}

// ---------------------------------------------------------------------------
// allocate

TEST(BasicKVCacheTest, SeedReservationAndStats) {
  BasicKVCache cache(kSeed, Bytes{8ULL << 30});
  ASSERT_TRUE(cache.allocate("req1", Tokens{1000}, Tokens{24}));
  const BasicStats s = cache.stats();
  EXPECT_EQ(s.used_memory, Bytes{1024ULL * 131072});  // 128 MiB
  EXPECT_EQ(s.free_memory, Bytes{(8ULL << 30) - (1024ULL * 131072)});
  EXPECT_EQ(s.reserved_tokens, Tokens{1024});
  EXPECT_EQ(s.num_requests, 1U);
  EXPECT_DOUBLE_EQ(s.utilization_pct, 1.5625);  // 128 MiB / 8 GiB
  // The whole budget is 65536 tokens: the seed figure.
  ASSERT_TRUE(cache.allocate("req2", Tokens{65536 - 1024}, Tokens{0}));
  EXPECT_EQ(cache.stats().free_memory, Bytes{0});
  EXPECT_DOUBLE_EQ(cache.stats().utilization_pct, 100.0);
  EXPECT_FALSE(cache.allocate("req3", Tokens{1}, Tokens{0}));
}

TEST(BasicKVCacheTest, AllocateReservesPromptPlusMaxGenAndStoresNothing) {
  BasicKVCache cache(kSmall, tokens_bytes(100));
  ASSERT_TRUE(cache.allocate("r", Tokens{7}, Tokens{5}));
  EXPECT_TRUE(cache.contains("r"));
  EXPECT_EQ(cache.reservation("r"), Tokens{12});
  const BasicStats s = cache.stats();
  EXPECT_EQ(s.used_memory, tokens_bytes(12));
  EXPECT_EQ(s.free_memory, tokens_bytes(88));
  EXPECT_EQ(s.reserved_tokens, Tokens{12});
  EXPECT_EQ(s.stored_tokens, Tokens{0});
  EXPECT_EQ(s.num_requests, 1U);
  EXPECT_DOUBLE_EQ(s.utilization_pct, 12.0);
  for (std::size_t layer = 0; layer < kSmall.num_layers; ++layer) {
    EXPECT_EQ(cache.tokens("r", layer), Tokens{0});
    const auto [keys, values] = cache.get_kv("r", layer);
    EXPECT_EQ(keys.size(), 0U);
    EXPECT_EQ(values.size(), 0U);
  }
  EXPECT_EQ(cache.request_ids(), std::vector<std::string>{"r"});
  EXPECT_TRUE(cache.check_invariants());
}

TEST(BasicKVCacheTest, OutOfMemoryReturnsFalseAndChangesNothing) {
  BasicKVCache cache = populated_cache();  // 7 of 20 tokens reserved
  const Snapshot before = snapshot(cache);
  EXPECT_FALSE(cache.can_allocate(Tokens{10}, Tokens{4}));
  EXPECT_FALSE(cache.allocate("big", Tokens{10}, Tokens{4}));  // 14 > 13
  EXPECT_EQ(snapshot(cache), before);
  EXPECT_FALSE(cache.contains("big"));
  EXPECT_FALSE(cache.allocate("huge", Tokens{1ULL << 40}, Tokens{0}));
  EXPECT_EQ(snapshot(cache), before);
  EXPECT_TRUE(cache.check_invariants());
}

TEST(BasicKVCacheTest, ExactFitSucceedsAndOneTokenMoreFails) {
  BasicKVCache cache(kSmall, tokens_bytes(10));
  ASSERT_TRUE(cache.allocate("a", Tokens{4}, Tokens{2}));
  EXPECT_TRUE(cache.can_allocate(Tokens{3}, Tokens{1}));
  EXPECT_FALSE(cache.can_allocate(Tokens{3}, Tokens{2}));
  const Snapshot before = snapshot(cache);
  EXPECT_FALSE(cache.allocate("b", Tokens{3}, Tokens{2}));  // 6 + 5 > 10
  EXPECT_EQ(snapshot(cache), before);
  ASSERT_TRUE(cache.allocate("b", Tokens{3}, Tokens{1}));  // 6 + 4 == 10
  const BasicStats s = cache.stats();
  EXPECT_EQ(s.used_memory, s.total_memory);
  EXPECT_EQ(s.free_memory, Bytes{0});
  EXPECT_DOUBLE_EQ(s.utilization_pct, 100.0);
  const Snapshot full = snapshot(cache);
  EXPECT_FALSE(cache.allocate("c", Tokens{0}, Tokens{1}));
  EXPECT_FALSE(cache.allocate("c", Tokens{1}, Tokens{0}));
  EXPECT_EQ(snapshot(cache), full);
  EXPECT_TRUE(cache.check_invariants());
}

TEST(BasicKVCacheTest, ABudgetThatIsNotAWholeNumberOfTokensFitsWhatItCan) {
  BasicKVCache cache(kSmall, Bytes{(3 * kBytesPerToken) + kBytesPerToken - 1});
  EXPECT_FALSE(cache.allocate("r", Tokens{4}, Tokens{0}));
  EXPECT_TRUE(cache.allocate("r", Tokens{3}, Tokens{0}));
  EXPECT_EQ(cache.stats().free_memory, Bytes{kBytesPerToken - 1});
}

TEST(BasicKVCacheTest, DuplicateIdReturnsFalseAndChangesNothing) {
  BasicKVCache cache = populated_cache();
  const Snapshot before = snapshot(cache);
  EXPECT_FALSE(cache.allocate("a", Tokens{3}, Tokens{2}));  // same reservation
  EXPECT_FALSE(cache.allocate("a", Tokens{1}, Tokens{0}));  // a smaller one, that would fit
  EXPECT_FALSE(cache.allocate("b", Tokens{0}, Tokens{0}));
  EXPECT_EQ(snapshot(cache), before);
  EXPECT_TRUE(cache.check_invariants());
}

TEST(BasicKVCacheTest, ZeroPromptOrZeroMaxGenAreValid) {
  BasicKVCache cache(kSmall, tokens_bytes(20));
  ASSERT_TRUE(cache.allocate("no-prompt", Tokens{0}, Tokens{3}));
  ASSERT_TRUE(cache.allocate("no-gen", Tokens{3}, Tokens{0}));
  EXPECT_EQ(cache.reservation("no-prompt"), Tokens{3});
  EXPECT_EQ(cache.reservation("no-gen"), Tokens{3});
  EXPECT_EQ(cache.stats().used_memory, tokens_bytes(6));
  for (std::size_t t = 0; t < 3; ++t) {
    cache.append_token("no-prompt", 2, key_row(2, t), value_row(2, t));
    cache.append_token("no-gen", 2, key_row(2, t), value_row(2, t));
  }
  EXPECT_EQ(cache.tokens("no-prompt", 2), Tokens{3});
  EXPECT_EQ(cache.tokens("no-gen", 2), Tokens{3});
  EXPECT_THROW(cache.append_token("no-gen", 2, key_row(2, 3), value_row(2, 3)),
               kvcache::ReservationExceeded);
  EXPECT_TRUE(cache.check_invariants());
}

TEST(BasicKVCacheTest, ZeroPromptAndZeroMaxGenIsAnEmptyReservation) {
  BasicKVCache cache = populated_cache();
  const BasicStats before = cache.stats();
  ASSERT_TRUE(cache.allocate("z", Tokens{0}, Tokens{0}));
  EXPECT_TRUE(cache.contains("z"));
  EXPECT_EQ(cache.reservation("z"), Tokens{0});
  EXPECT_EQ(cache.stats().used_memory, before.used_memory);
  EXPECT_EQ(cache.stats().num_requests, before.num_requests + 1);
  const auto [keys, values] = cache.get_kv("z", 0);
  EXPECT_TRUE(keys.empty());
  EXPECT_TRUE(values.empty());
  const Snapshot with_z = snapshot(cache);
  EXPECT_THROW(cache.append_token("z", 0, key_row(0, 0), value_row(0, 0)),
               kvcache::ReservationExceeded);
  EXPECT_EQ(snapshot(cache), with_z);
  cache.free("z");
  EXPECT_FALSE(cache.contains("z"));
  EXPECT_EQ(cache.stats().used_memory, before.used_memory);
  EXPECT_TRUE(cache.check_invariants());
}

TEST(BasicKVCacheTest, PromptPlusMaxGenOverflowThrowsOverflowErrorAndChangesNothing) {
  BasicKVCache cache = populated_cache();
  const Snapshot before = snapshot(cache);
  // The token count itself overflows.
  EXPECT_THROW((void)cache.allocate("x", Tokens::max(), Tokens{1}), std::overflow_error);
  EXPECT_THROW((void)cache.allocate("x", Tokens{kMax / 2 + 1}, Tokens{kMax / 2 + 1}),
               std::overflow_error);
  EXPECT_EQ(snapshot(cache), before);
  // The token count fits but its byte size does not.
  EXPECT_THROW((void)cache.allocate("x", Tokens{kMax / kBytesPerToken + 1}, Tokens{0}),
               std::overflow_error);
  EXPECT_THROW((void)cache.allocate("x", Tokens{0}, Tokens{kMax / kBytesPerToken + 1}),
               std::overflow_error);
  EXPECT_EQ(snapshot(cache), before);
  EXPECT_FALSE(cache.contains("x"));
  EXPECT_THROW((void)cache.can_allocate(Tokens::max(), Tokens::max()), std::overflow_error);
  EXPECT_TRUE(cache.check_invariants());
}

TEST(BasicKVCacheTest, OverflowMessageNamesTheNumbers) {
  BasicKVCache cache(kSmall, tokens_bytes(10));
  const std::string sum = message_of<std::overflow_error>(
      [&] { (void)cache.allocate("req-overflow", Tokens::max(), Tokens{1}); });
  EXPECT_TRUE(has(sum, std::to_string(kMax))) << sum;
  const std::string bytes = message_of<std::overflow_error>([&] {
    (void)cache.allocate("req-overflow", Tokens{kMax / kBytesPerToken + 1}, Tokens{0});
  });
  EXPECT_TRUE(has(bytes, std::to_string(kMax / kBytesPerToken + 1))) << bytes;
}

// BUG (modules/basic/basic.cpp, BasicKVCache::allocate via reservation_bytes,
// and can_allocate): the std::overflow_error for `prompt + max_gen` (or its
// byte size) overflowing is the bare unit-arithmetic error, e.g.
// "kvcache: Tokens + overflows 64 bits: 18446744073709551615 + 1"; it does
// not name the request id, while CONTRACT.md "Errors" says "Messages name the
// request id and the numbers involved" (every other throw of BasicKVCache
// does name it).
TEST(BasicKVCacheTest, OverflowMessageNamesTheRequestId) {
  BasicKVCache cache(kSmall, tokens_bytes(10));
  const std::string sum = message_of<std::overflow_error>(
      [&] { (void)cache.allocate("req-overflow", Tokens::max(), Tokens{1}); });
  EXPECT_TRUE(has(sum, "req-overflow")) << sum;
  const std::string bytes = message_of<std::overflow_error>([&] {
    (void)cache.allocate("req-overflow", Tokens{kMax / kBytesPerToken + 1}, Tokens{0});
  });
  EXPECT_TRUE(has(bytes, "req-overflow")) << bytes;
}

TEST(BasicKVCacheTest, ArgumentChecksComeBeforeTheDuplicateAndTheMemoryChecks) {
  BasicKVCache cache = populated_cache();  // holds "a"; 13 tokens free
  const Snapshot before = snapshot(cache);
  // Duplicate AND overflowing: the argument check throws first.
  EXPECT_THROW((void)cache.allocate("a", Tokens::max(), Tokens{1}), std::overflow_error);
  // New id, overflowing AND (necessarily) out of memory: throws, not false.
  EXPECT_THROW((void)cache.allocate("new", Tokens{1}, Tokens::max()), std::overflow_error);
  // Duplicate AND out of memory: false.
  EXPECT_FALSE(cache.allocate("a", Tokens{1000}, Tokens{0}));
  EXPECT_EQ(snapshot(cache), before);
  EXPECT_TRUE(cache.check_invariants());
}

TEST(BasicKVCacheTest, CanAllocateAgreesWithAllocate) {
  BasicKVCache cache(kSmall, tokens_bytes(8));
  for (std::uint64_t n = 0; n <= 9; ++n) {
    EXPECT_EQ(cache.can_allocate(Tokens{n}, Tokens{0}), n <= 8) << n;
    EXPECT_EQ(cache.can_allocate(Tokens{0}, Tokens{n}), n <= 8) << n;
  }
  ASSERT_TRUE(cache.allocate("a", Tokens{5}, Tokens{0}));
  EXPECT_TRUE(cache.can_allocate(Tokens{2}, Tokens{1}));
  EXPECT_FALSE(cache.can_allocate(Tokens{2}, Tokens{2}));
  EXPECT_EQ(cache.stats().reserved_tokens, Tokens{5});  // can_allocate reserves nothing
}

TEST(BasicKVCacheTest, TheCacheKeepsItsOwnCopyOfTheId) {
  BasicKVCache cache(kSmall, tokens_bytes(10));
  const std::string original = "request-with-a-long-enough-id-to-live-on-the-heap";
  {
    std::string id = original;
    ASSERT_TRUE(cache.allocate(id, Tokens{1}, Tokens{1}));
    id.assign(id.size(), 'X');  // the caller reuses its buffer, then frees it
  }
  EXPECT_TRUE(cache.contains(original));
  EXPECT_FALSE(cache.contains(std::string(original.size(), 'X')));
  cache.append_token(original, 0, key_row(0, 0), value_row(0, 0));
  EXPECT_EQ(cache.tokens(original, 0), Tokens{1});
  EXPECT_EQ(cache.request_ids(), std::vector<std::string>{original});
}

TEST(BasicKVCacheTest, IdsAreComparedByteForByte) {
  BasicKVCache cache(kSmall, tokens_bytes(10));
  const std::string_view with_nul("a\0b", 3);
  ASSERT_TRUE(cache.allocate("a", Tokens{1}, Tokens{0}));
  ASSERT_TRUE(cache.allocate(with_nul, Tokens{1}, Tokens{0}));
  ASSERT_TRUE(cache.allocate("A", Tokens{1}, Tokens{0}));
  EXPECT_EQ(cache.stats().num_requests, 3U);
  cache.free(with_nul);
  EXPECT_TRUE(cache.contains("a"));
  EXPECT_TRUE(cache.contains("A"));
  EXPECT_FALSE(cache.contains(with_nul));
}

TEST(BasicKVCacheTest, ImpossibleMappingThrowsBadAllocAndChangesNothing) {
  // A budget larger than any address space: the accounting accepts a
  // reservation of 2^61 bytes, the host cannot map it.
  BasicKVCache cache(kSeed, Bytes::max());
  ASSERT_TRUE(cache.allocate("small", Tokens{1}, Tokens{0}));
  const Snapshot before = snapshot(cache);
  EXPECT_THROW((void)cache.allocate("huge", Tokens{1ULL << 44}, Tokens{0}), std::bad_alloc);
  EXPECT_EQ(snapshot(cache), before);
  EXPECT_FALSE(cache.contains("huge"));
  EXPECT_TRUE(cache.check_invariants());
}

// ---------------------------------------------------------------------------
// append_token and get_kv

TEST(BasicKVCacheTest, AppendOrderAndByteExactReadBackInEveryLayer) {
  BasicKVCache cache(kSmall, tokens_bytes(20));
  ASSERT_TRUE(cache.allocate("r", Tokens{3}, Tokens{2}));  // 5 tokens per layer
  // Interleave layers: layer l receives l + 2 tokens (2, 3, 4, 5).
  for (std::size_t t = 0; t < 5; ++t) {
    for (std::size_t layer = 0; layer < kSmall.num_layers; ++layer) {
      if (t < layer + 2) cache.append_token("r", layer, key_row(layer, t), value_row(layer, t));
    }
  }
  for (std::size_t layer = 0; layer < kSmall.num_layers; ++layer) {
    SCOPED_TRACE(layer);
    EXPECT_EQ(cache.tokens("r", layer), Tokens{layer + 2});
    auto [keys, values] = cache.get_kv("r", layer);
    static_assert(std::is_same_v<decltype(keys.size()), std::size_t>);
    ASSERT_EQ(keys.size(), layer + 2);
    ASSERT_EQ(values.size(), layer + 2);
    for (std::size_t t = 0; t < keys.size(); ++t) {
      const std::span<const std::byte> k = keys[t];
      const std::span<const std::byte> v = values[t];
      EXPECT_EQ(k.size(), kRow);
      EXPECT_EQ(copy(k), key_row(layer, t)) << "token " << t;
      EXPECT_EQ(copy(v), value_row(layer, t)) << "token " << t;
    }
  }
  EXPECT_EQ(cache.stats().stored_tokens, Tokens{2 + 3 + 4 + 5});
  EXPECT_TRUE(cache.check_invariants());
}

TEST(BasicKVCacheTest, SeedModelReadBackAcrossDistantLayers) {
  BasicKVCache cache(kSeed, Bytes{1ULL << 30});
  ASSERT_TRUE(cache.allocate("r", Tokens{100}, Tokens{28}));
  const std::size_t row_bytes = 2048;
  const std::vector<std::size_t> layers = {31, 0, 17, 31, 0, 31};
  std::vector<std::size_t> count(32, 0);
  for (const std::size_t layer : layers) {
    cache.append_token("r", layer, key_row(layer, count[layer], row_bytes),
                       value_row(layer, count[layer], row_bytes));
    ++count[layer];
  }
  for (const std::size_t layer : {0U, 17U, 31U, 1U, 30U}) {
    SCOPED_TRACE(layer);
    const auto [keys, values] = cache.get_kv("r", layer);
    ASSERT_EQ(keys.size(), count[layer]);
    for (std::size_t t = 0; t < keys.size(); ++t) {
      EXPECT_EQ(copy(keys[t]), key_row(layer, t, row_bytes));
      EXPECT_EQ(copy(values[t]), value_row(layer, t, row_bytes));
    }
  }
}

TEST(BasicKVCacheTest, RequestsDoNotSeeEachOthersData) {
  BasicKVCache cache(kSmall, tokens_bytes(20));
  ASSERT_TRUE(cache.allocate("x", Tokens{2}, Tokens{0}));
  ASSERT_TRUE(cache.allocate("y", Tokens{2}, Tokens{0}));
  cache.append_token("x", 1, key_row(1, 0), value_row(1, 0));
  cache.append_token("y", 1, key_row(9, 9), value_row(9, 9));
  cache.append_token("x", 1, key_row(1, 1), value_row(1, 1));
  auto [xk, xv] = cache.get_kv("x", 1);
  ASSERT_EQ(xk.size(), 2U);
  EXPECT_EQ(copy(xk[0]), key_row(1, 0));
  EXPECT_EQ(copy(xk[1]), key_row(1, 1));
  EXPECT_EQ(copy(xv[1]), value_row(1, 1));
  auto [yk, yv] = cache.get_kv("y", 1);
  ASSERT_EQ(yk.size(), 1U);
  EXPECT_EQ(copy(yk[0]), key_row(9, 9));
  EXPECT_EQ(copy(yv[0]), value_row(9, 9));
  // Freeing one leaves the other's bytes intact.
  cache.free("y");
  auto [xk2, xv2] = cache.get_kv("x", 1);
  EXPECT_EQ(copy(xk2[1]), key_row(1, 1));
  EXPECT_EQ(copy(xv2[0]), value_row(1, 0));
}

TEST(BasicKVCacheTest, ViewsIterateAsRanges) {
  BasicKVCache cache = populated_cache();
  const auto [keys, values] = cache.get_kv("a", 0);
  std::size_t t = 0;
  for (const std::span<const std::byte> k : keys) {
    EXPECT_EQ(copy(k), key_row(0, t));
    ++t;
  }
  EXPECT_EQ(t, 2U);
  EXPECT_EQ(copy(values.at(1)), value_row(0, 1));
  EXPECT_THROW((void)values.at(2), std::out_of_range);
}

TEST(BasicKVCacheTest, FloatOverloadStoresTheFloatsBytes) {
  BasicKVCache cache(kFloat, Bytes{1ULL << 20});
  ASSERT_TRUE(cache.allocate("f", Tokens{2}, Tokens{2}));
  const std::size_t n = kFloat.kv_elements_per_token_per_layer();  // 8
  ASSERT_EQ(n, 8U);
  std::vector<float> key(n);
  std::vector<float> value(n);
  for (std::size_t i = 0; i < n; ++i) {
    key[i] = static_cast<float>(i) * 0.5F - 1.25F;
    value[i] = -static_cast<float>(i) * 3.0F + 1e-3F;
  }
  cache.append_token("f", 2, std::span<const float>(key), std::span<const float>(value));
  // Mix in a byte-overload token on the same layer.
  cache.append_token("f", 2, key_row(2, 1), value_row(2, 1));
  const auto [keys, values] = cache.get_kv("f", 2);
  ASSERT_EQ(keys.size(), 2U);
  ASSERT_EQ(keys[0].size(), n * sizeof(float));
  // Byte-exact: the floats come back with the very bits that went in.
  EXPECT_EQ(copy(keys[0]), copy(std::as_bytes(std::span<const float>(key))));
  EXPECT_EQ(copy(values[0]), copy(std::as_bytes(std::span<const float>(value))));
  EXPECT_EQ(copy(keys[1]), key_row(2, 1));
  EXPECT_EQ(cache.tokens("f", 0), Tokens{0});
  EXPECT_TRUE(cache.check_invariants());
}

TEST(BasicKVCacheTest, FloatOverloadNeedsDtypeBytesFour) {
  BasicKVCache cache = populated_cache();  // dtype_bytes == 2
  // 16 floats are 64 bytes: neither the element count (16 halves = 32 bytes)
  // nor the byte count matches a float row; 8 floats (32 bytes) match the
  // byte length of a row, and are rejected as well.
  const std::vector<float> eight(8, 1.0F);
  const std::vector<float> sixteen(16, 1.0F);
  const Snapshot before = snapshot(cache);
  for (const std::vector<float>* f : {&eight, &sixteen}) {
    const std::string msg = message_of<kvcache::ShapeMismatch>([&] {
      cache.append_token("a", 0, std::span<const float>(*f), std::span<const float>(*f));
    });
    EXPECT_TRUE(has(msg, "dtype_bytes")) << msg;
    EXPECT_EQ(snapshot(cache), before);
  }
}

TEST(BasicKVCacheTest, FloatOverloadWrongLengthThrowsShapeMismatch) {
  BasicKVCache cache(kFloat, Bytes{1ULL << 20});
  ASSERT_TRUE(cache.allocate("f", Tokens{2}, Tokens{2}));
  const std::vector<float> good(8, 2.0F);
  cache.append_token("f", 0, std::span<const float>(good), std::span<const float>(good));
  const Snapshot before = snapshot(cache);
  const std::vector<float> short_row(7, 1.0F);
  const std::vector<float> long_row(9, 1.0F);
  const std::vector<float> empty;
  EXPECT_THROW(cache.append_token("f", 0, std::span<const float>(short_row),
                                  std::span<const float>(good)),
               kvcache::ShapeMismatch);
  EXPECT_THROW(cache.append_token("f", 0, std::span<const float>(good),
                                  std::span<const float>(long_row)),
               kvcache::ShapeMismatch);
  EXPECT_THROW(cache.append_token("f", 0, std::span<const float>(empty),
                                  std::span<const float>(empty)),
               kvcache::ShapeMismatch);
  EXPECT_EQ(snapshot(cache), before);
}

TEST(BasicKVCacheTest, WrongRowLengthThrowsShapeMismatchAndChangesNothing) {
  BasicKVCache cache = populated_cache();
  const Snapshot before = snapshot(cache);
  const std::vector<std::byte> good = key_row(0, 5);
  const std::vector<std::byte> short_row(kRow - 1);
  const std::vector<std::byte> long_row(kRow + 1);
  const std::vector<std::byte> empty;
  const std::string msg =
      message_of<kvcache::ShapeMismatch>([&] { cache.append_token("a", 0, short_row, good); });
  EXPECT_TRUE(has(msg, "\"a\"")) << msg;
  EXPECT_TRUE(has(msg, std::to_string(kRow - 1))) << msg;
  EXPECT_TRUE(has(msg, std::to_string(kRow))) << msg;
  EXPECT_THROW(cache.append_token("a", 0, good, long_row), kvcache::ShapeMismatch);
  EXPECT_THROW(cache.append_token("a", 0, empty, empty), kvcache::ShapeMismatch);
  EXPECT_THROW(cache.append_token("a", 0, long_row, long_row), kvcache::ShapeMismatch);
  EXPECT_EQ(snapshot(cache), before);
  static_assert(std::is_base_of_v<std::invalid_argument, kvcache::ShapeMismatch>);
}

// ---------------------------------------------------------------------------
// Layer out of range, unknown ids

TEST(BasicKVCacheTest, LayerOutOfRangeThrowsOutOfRangeButNotUnknownRequest) {
  BasicKVCache cache = populated_cache();  // 4 layers
  const Snapshot before = snapshot(cache);
  const std::vector<std::byte> k = key_row(0, 0);
  const std::vector<std::byte> v = value_row(0, 0);
  const std::vector<float> f(8, 0.0F);
  for (const std::size_t layer : {std::size_t{4}, std::size_t{5}, std::size_t{1000},
                                  std::numeric_limits<std::size_t>::max()}) {
    SCOPED_TRACE(layer);
    // A known id and an unknown one: the layer (an argument check) comes first.
    for (const std::string_view id : {std::string_view("a"), std::string_view("nobody")}) {
      SCOPED_TRACE(id);
      expect_out_of_range_not_unknown([&] { cache.append_token(id, layer, k, v); });
      expect_out_of_range_not_unknown([&] {
        cache.append_token(id, layer, std::span<const float>(f), std::span<const float>(f));
      });
      expect_out_of_range_not_unknown([&] { (void)cache.get_kv(id, layer); });
      expect_out_of_range_not_unknown([&] { (void)cache.tokens(id, layer); });
    }
  }
  const std::string msg =
      message_of<std::out_of_range>([&] { (void)cache.get_kv("a", 4); });
  EXPECT_TRUE(has(msg, "4")) << msg;
  EXPECT_EQ(snapshot(cache), before);
  // The last layer is in range.
  EXPECT_NO_THROW(cache.append_token("a", 3, k, v));
}

TEST(BasicKVCacheTest, UnknownIdThrowsUnknownRequestEverywhere) {
  BasicKVCache cache = populated_cache();
  const Snapshot before = snapshot(cache);
  const std::vector<std::byte> k = key_row(0, 0);
  const std::vector<std::byte> v = value_row(0, 0);
  const std::string msg =
      message_of<kvcache::UnknownRequest>([&] { cache.free("ghost-7"); });
  EXPECT_TRUE(has(msg, "ghost-7")) << msg;
  EXPECT_THROW(cache.append_token("ghost-7", 0, k, v), kvcache::UnknownRequest);
  EXPECT_THROW((void)cache.get_kv("ghost-7", 0), kvcache::UnknownRequest);
  EXPECT_THROW((void)cache.tokens("ghost-7", 0), kvcache::UnknownRequest);
  EXPECT_THROW((void)cache.reservation("ghost-7"), kvcache::UnknownRequest);
  EXPECT_THROW(cache.free(""), kvcache::UnknownRequest);
  EXPECT_THROW(cache.free("A"), kvcache::UnknownRequest);  // ids are case-sensitive
  EXPECT_FALSE(cache.contains("ghost-7"));
  EXPECT_EQ(snapshot(cache), before);
  // UnknownRequest is the contract's KeyError: a std::out_of_range.
  EXPECT_THROW(cache.free("ghost-7"), std::out_of_range);
}

TEST(BasicKVCacheTest, UnknownIdThroughTheFloatOverload) {
  BasicKVCache cache(kFloat, Bytes{1ULL << 20});
  const std::vector<float> f(8, 0.0F);
  EXPECT_THROW(cache.append_token("ghost", 1, std::span<const float>(f), std::span<const float>(f)),
               kvcache::UnknownRequest);
  EXPECT_EQ(cache.stats().stored_tokens, Tokens{0});
}

TEST(BasicKVCacheTest, FreedIdIsUnknown) {
  BasicKVCache cache = populated_cache();
  cache.free("a");
  const Snapshot before = snapshot(cache);
  EXPECT_THROW(cache.free("a"), kvcache::UnknownRequest);  // double free
  EXPECT_THROW(cache.append_token("a", 0, key_row(0, 0), value_row(0, 0)),
               kvcache::UnknownRequest);
  EXPECT_THROW((void)cache.get_kv("a", 0), kvcache::UnknownRequest);
  EXPECT_THROW((void)cache.reservation("a"), kvcache::UnknownRequest);
  EXPECT_EQ(snapshot(cache), before);
}

TEST(BasicKVCacheTest, ShapeIsCheckedBeforeTheId) {
  BasicKVCache cache = populated_cache();
  const std::vector<std::byte> short_row(kRow - 1);
  const std::vector<std::byte> good(kRow);
  // Wrong shape AND unknown id: the argument check throws first.
  EXPECT_THROW(cache.append_token("nobody", 0, short_row, good), kvcache::ShapeMismatch);
  // The float overload on a 2-byte model AND an unknown id: ShapeMismatch.
  const std::vector<float> f(16, 0.0F);
  EXPECT_THROW(cache.append_token("nobody", 0, std::span<const float>(f), std::span<const float>(f)),
               kvcache::ShapeMismatch);
}

// ---------------------------------------------------------------------------
// ReservationExceeded

TEST(BasicKVCacheTest, AppendingPastTheReservationThrowsAndChangesNothing) {
  BasicKVCache cache(kSmall, tokens_bytes(20));
  ASSERT_TRUE(cache.allocate("r", Tokens{2}, Tokens{1}));  // 3 tokens per layer
  for (std::size_t t = 0; t < 3; ++t) cache.append_token("r", 1, key_row(1, t), value_row(1, t));
  const Snapshot before = snapshot(cache);
  const std::string msg = message_of<kvcache::ReservationExceeded>(
      [&] { cache.append_token("r", 1, key_row(1, 3), value_row(1, 3)); });
  EXPECT_TRUE(has(msg, "\"r\"")) << msg;
  EXPECT_TRUE(has(msg, "3")) << msg;
  EXPECT_EQ(snapshot(cache), before);
  EXPECT_THROW(cache.append_token("r", 1, key_row(1, 3), value_row(1, 3)), std::length_error);
  EXPECT_EQ(snapshot(cache), before);
  // Each layer has its own prompt + max_gen: layer 0 still takes 3 tokens.
  for (std::size_t t = 0; t < 3; ++t) cache.append_token("r", 0, key_row(0, t), value_row(0, t));
  EXPECT_THROW(cache.append_token("r", 0, key_row(0, 3), value_row(0, 3)),
               kvcache::ReservationExceeded);
  EXPECT_EQ(cache.tokens("r", 0), Tokens{3});
  // The rows that fit are intact.
  const auto [keys, values] = cache.get_kv("r", 1);
  ASSERT_EQ(keys.size(), 3U);
  EXPECT_EQ(copy(keys[2]), key_row(1, 2));
  EXPECT_EQ(copy(values[2]), value_row(1, 2));
  EXPECT_TRUE(cache.check_invariants());
}

TEST(BasicKVCacheTest, FloatOverloadAlsoStopsAtTheReservation) {
  BasicKVCache cache(kFloat, Bytes{1ULL << 20});
  ASSERT_TRUE(cache.allocate("f", Tokens{1}, Tokens{0}));
  const std::vector<float> f(8, 1.0F);
  cache.append_token("f", 0, std::span<const float>(f), std::span<const float>(f));
  const Snapshot before = snapshot(cache);
  EXPECT_THROW(cache.append_token("f", 0, std::span<const float>(f), std::span<const float>(f)),
               kvcache::ReservationExceeded);
  EXPECT_EQ(snapshot(cache), before);
}

// ---------------------------------------------------------------------------
// free

// ---------------------------------------------------------------------------
// Storage::none: the accounting without the bytes (beyond the contract)

TEST(BasicKVCacheStorageNone, AccountsLikeHostStorageWithoutBytes) {
  BasicKVCache none(kSmall, tokens_bytes(20), kvcache::Storage::none);
  BasicKVCache host(kSmall, tokens_bytes(20));
  EXPECT_EQ(none.storage(), kvcache::Storage::none);
  for (BasicKVCache* c : {&none, &host}) {
    ASSERT_TRUE(c->allocate("a", Tokens{3}, Tokens{2}));
    ASSERT_TRUE(c->allocate("b", Tokens{1}, Tokens{1}));
    c->append_token("a", 0);
    c->append_token("a", 0);
    c->append_token("b", 3);
  }
  const BasicStats n = none.stats();
  const BasicStats h = host.stats();
  EXPECT_EQ(n.used_memory, h.used_memory);
  EXPECT_EQ(n.used_memory, tokens_bytes(7));
  EXPECT_EQ(n.reserved_tokens, h.reserved_tokens);
  EXPECT_EQ(n.stored_tokens, Tokens{3});
  EXPECT_EQ(n.stored_tokens, h.stored_tokens);
  EXPECT_EQ(none.tokens("a", 0), Tokens{2});
  EXPECT_EQ(none.tokens("b", 3), Tokens{1});
  none.free("a");
  EXPECT_EQ(none.stats().used_memory, tokens_bytes(2));
  EXPECT_TRUE(none.check_invariants());
}

TEST(BasicKVCacheStorageNone, CallsThatPassOrReadBytesThrowLogicErrorAndChangeNothing) {
  BasicKVCache cache(kSmall, tokens_bytes(20), kvcache::Storage::none);
  ASSERT_TRUE(cache.allocate("r", Tokens{2}, Tokens{1}));
  cache.append_token("r", 1);
  const Snapshot before = snapshot(cache);
  const std::string msg = message_of<std::logic_error>(
      [&] { cache.append_token("r", 1, key_row(1, 1), value_row(1, 1)); });
  EXPECT_TRUE(has(msg, "Storage::none")) << msg;
  EXPECT_EQ(snapshot(cache), before);
  const std::vector<float> f(std::size_t{kSmall.num_kv_heads} * kSmall.head_dim);
  EXPECT_THROW(cache.append_token("r", 1, std::span<const float>(f), std::span<const float>(f)),
               std::logic_error);
  EXPECT_EQ(snapshot(cache), before);
  EXPECT_THROW((void)cache.get_kv("r", 1), std::logic_error);
  EXPECT_EQ(snapshot(cache), before);
  EXPECT_TRUE(cache.check_invariants());
}

TEST(BasicKVCacheStorageNone, DatalessAppendStopsAtTheReservationAndChecksItsArguments) {
  BasicKVCache cache(kSmall, tokens_bytes(20), kvcache::Storage::none);
  ASSERT_TRUE(cache.allocate("r", Tokens{1}, Tokens{1}));  // 2 tokens per layer
  cache.append_token("r", 2);
  cache.append_token("r", 2);
  const Snapshot before = snapshot(cache);
  EXPECT_THROW(cache.append_token("r", 2), kvcache::ReservationExceeded);
  EXPECT_EQ(snapshot(cache), before);
  EXPECT_THROW(cache.append_token("r", 4), std::out_of_range);
  EXPECT_EQ(snapshot(cache), before);
  EXPECT_THROW(cache.append_token("nobody", 0), kvcache::UnknownRequest);
  EXPECT_EQ(snapshot(cache), before);
  EXPECT_EQ(cache.tokens("r", 2), Tokens{2});
  EXPECT_TRUE(cache.check_invariants());
}

TEST(BasicKVCacheStorageNone, NeedsNoHostMemoryForAHugeReservation) {
  // 2^50 bytes of reservations: only the accounting exists.
  BasicKVCache cache(kSmall, Bytes{1ULL << 50}, kvcache::Storage::none);
  ASSERT_TRUE(cache.allocate("r", Tokens{(1ULL << 50) / kBytesPerToken}, Tokens{0}));
  EXPECT_EQ(cache.stats().free_memory, Bytes{0});
  cache.append_token("r", 0);
  EXPECT_EQ(cache.tokens("r", 0), Tokens{1});
  EXPECT_TRUE(cache.check_invariants());
}

TEST(BasicKVCacheTest, FreeReleasesExactlyTheReservation) {
  BasicKVCache cache = populated_cache();
  const Snapshot before = snapshot(cache);
  ASSERT_TRUE(cache.allocate("c", Tokens{6}, Tokens{3}));
  cache.append_token("c", 2, key_row(2, 0), value_row(2, 0));
  cache.append_token("c", 2, key_row(2, 1), value_row(2, 1));
  EXPECT_EQ(cache.stats().used_memory, before.used_memory + tokens_bytes(9));
  EXPECT_EQ(cache.stats().stored_tokens, before.stored_tokens + Tokens{2});
  cache.free("c");
  EXPECT_EQ(snapshot(cache), before);  // everything else untouched, including data
  EXPECT_TRUE(cache.check_invariants());
}

TEST(BasicKVCacheTest, FreedMemoryIsImmediatelyReusable) {
  BasicKVCache cache(kSmall, tokens_bytes(10));
  ASSERT_TRUE(cache.allocate("a", Tokens{6}, Tokens{0}));
  ASSERT_TRUE(cache.allocate("b", Tokens{4}, Tokens{0}));
  EXPECT_FALSE(cache.allocate("c", Tokens{6}, Tokens{0}));
  cache.free("a");
  EXPECT_TRUE(cache.allocate("c", Tokens{6}, Tokens{0}));
  EXPECT_EQ(cache.stats().free_memory, Bytes{0});
  // The same id can be reused after free, and starts empty.
  cache.append_token("b", 0, key_row(0, 0), value_row(0, 0));
  cache.free("b");
  ASSERT_TRUE(cache.allocate("b", Tokens{2}, Tokens{2}));
  EXPECT_EQ(cache.tokens("b", 0), Tokens{0});
  EXPECT_EQ(cache.reservation("b"), Tokens{4});
  cache.append_token("b", 0, key_row(0, 7), value_row(0, 7));
  const auto [keys, values] = cache.get_kv("b", 0);
  ASSERT_EQ(keys.size(), 1U);
  EXPECT_EQ(copy(keys[0]), key_row(0, 7));
  EXPECT_TRUE(cache.check_invariants());
}

TEST(BasicKVCacheTest, ManyCyclesLeaveNoResidue) {
  BasicKVCache cache(kSmall, tokens_bytes(16));
  for (int i = 0; i < 200; ++i) {
    const std::string id = "r" + std::to_string(i % 3);
    if (cache.contains(id)) {
      cache.free(id);
    } else {
      ASSERT_TRUE(cache.allocate(id, Tokens{3}, Tokens{2}));
      cache.append_token(id, static_cast<std::size_t>(i) % 4, key_row(0, 0), value_row(0, 0));
    }
    ASSERT_TRUE(cache.check_invariants());
  }
  for (const std::string& id : cache.request_ids()) cache.free(id);
  const BasicStats s = cache.stats();
  EXPECT_EQ(s.used_memory, Bytes{0});
  EXPECT_EQ(s.free_memory, s.total_memory);
  EXPECT_EQ(s.reserved_tokens, Tokens{0});
  EXPECT_EQ(s.stored_tokens, Tokens{0});
  EXPECT_EQ(s.num_requests, 0U);
}

// ---------------------------------------------------------------------------
// stats

TEST(BasicKVCacheTest, StatsAreSumsOverLiveRequests) {
  BasicKVCache cache(kSmall, tokens_bytes(40));
  ASSERT_TRUE(cache.allocate("a", Tokens{5}, Tokens{5}));
  ASSERT_TRUE(cache.allocate("b", Tokens{3}, Tokens{0}));
  ASSERT_TRUE(cache.allocate("c", Tokens{0}, Tokens{7}));
  cache.append_token("a", 0, key_row(0, 0), value_row(0, 0));
  cache.append_token("a", 1, key_row(1, 0), value_row(1, 0));
  cache.append_token("c", 3, key_row(3, 0), value_row(3, 0));
  BasicStats s = cache.stats();
  EXPECT_EQ(s.total_memory, tokens_bytes(40));
  EXPECT_EQ(s.used_memory, tokens_bytes(20));
  EXPECT_EQ(s.free_memory, tokens_bytes(20));
  EXPECT_EQ(s.reserved_tokens, Tokens{20});
  EXPECT_EQ(s.stored_tokens, Tokens{3});
  EXPECT_EQ(s.num_requests, 3U);
  EXPECT_DOUBLE_EQ(s.utilization_pct, 50.0);
  EXPECT_EQ(s.used_memory + s.free_memory, s.total_memory);
  cache.free("b");
  s = cache.stats();
  EXPECT_EQ(s.used_memory, tokens_bytes(17));
  EXPECT_EQ(s.reserved_tokens, Tokens{17});
  EXPECT_EQ(s.num_requests, 2U);
  EXPECT_DOUBLE_EQ(s.utilization_pct, 17.0 / 40.0 * 100.0);
  cache.free("a");
  s = cache.stats();
  EXPECT_EQ(s.stored_tokens, Tokens{1});
  EXPECT_EQ(s.reserved_tokens, Tokens{7});
}

TEST(BasicKVCacheTest, StatsFieldTypes) {
  static_assert(std::is_same_v<decltype(BasicStats::total_memory), Bytes>);
  static_assert(std::is_same_v<decltype(BasicStats::used_memory), Bytes>);
  static_assert(std::is_same_v<decltype(BasicStats::free_memory), Bytes>);
  static_assert(std::is_same_v<decltype(BasicStats::reserved_tokens), Tokens>);
  static_assert(std::is_same_v<decltype(BasicStats::num_requests), std::size_t>);
  static_assert(std::is_same_v<decltype(BasicStats::utilization_pct), double>);
  const BasicStats s{};
  EXPECT_EQ(s.num_requests, 0U);
  EXPECT_EQ(s.used_memory, Bytes{0});
}

TEST(BasicKVCacheTest, AMovedCacheKeepsItsRequestsAndData) {
  BasicKVCache cache = populated_cache();
  const Snapshot before = snapshot(cache);
  BasicKVCache moved(std::move(cache));
  EXPECT_EQ(snapshot(moved), before);
  moved.append_token("b", 1, key_row(1, 1), value_row(1, 1));
  EXPECT_EQ(moved.tokens("b", 1), Tokens{2});
  EXPECT_TRUE(moved.check_invariants());
}

// ---------------------------------------------------------------------------
// Lazy commit (CONTRACT.md "KV data"): neither construction nor allocation
// touches memory in proportion to the budget or the reservation; resident
// memory grows with the tokens written. Measured as VmRSS deltas (ASan has
// its own resident overhead, constant across one operation).

TEST(BasicKVCacheLazyCommit, ReservationCostsNoResidentMemoryWritesDo) {
  const std::size_t r0 = resident_bytes();
  ASSERT_GT(r0, 0U) << "VmRSS unavailable";
  BasicKVCache cache(kSeed, Bytes{8ULL << 30});
  const std::size_t r1 = resident_bytes();
  EXPECT_LT(grew(r0, r1), 64 * kMiB) << "construction: " << r0 << " -> " << r1;

  ASSERT_TRUE(cache.allocate("long", Tokens{16384}, Tokens{16384}));  // 4 GiB
  ASSERT_TRUE(cache.allocate("other", Tokens{8192}, Tokens{8192}));   // 2 GiB
  EXPECT_EQ(cache.stats().used_memory, Bytes{6ULL << 30});
  const std::size_t r2 = resident_bytes();
  EXPECT_LT(grew(r1, r2), 64 * kMiB) << "allocating 6 GiB: " << r1 << " -> " << r2;

  // 64 tokens in each of the 32 layers: 64 * 32 * 2 (K, V) * 2048 B = 8 MiB.
  const std::size_t written = 64ULL * 32 * 2 * 2048;
  const std::vector<std::byte> k(2048, std::byte{0x5A});
  const std::vector<std::byte> v(2048, std::byte{0xA5});
  for (std::size_t layer = 0; layer < 32; ++layer) {
    for (int t = 0; t < 64; ++t) cache.append_token("long", layer, k, v);
  }
  const std::size_t r3 = resident_bytes();
  EXPECT_GE(grew(r2, r3), written / 2) << "writing 8 MiB: " << r2 << " -> " << r3;
  // Far less than the 6 GiB reserved; the margin allows a 2 MiB transparent
  // huge page for each of the 64 K/V blocks touched.
  EXPECT_LT(grew(r2, r3), 256 * kMiB) << "writing 8 MiB: " << r2 << " -> " << r3;

  // Freeing the request gives its memory back at once.
  cache.free("long");
  const std::size_t r4 = resident_bytes();
  // For the record (--gtest_output=xml): the four deltas in bytes.
  RecordProperty("rss_construct", std::to_string(grew(r0, r1)));
  RecordProperty("rss_allocate_6GiB", std::to_string(grew(r1, r2)));
  RecordProperty("rss_write_8MiB", std::to_string(grew(r2, r3)));
  RecordProperty("rss_free", std::to_string(grew(r4, r3)));
  EXPECT_GE(grew(r4, r3), written / 2) << "free: " << r3 << " -> " << r4;
}

}  // namespace
