// Fault injection, the SQLite way: every public mutating call of BasicKVCache
// and PagedKVCache is run with its 1st, 2nd, ... Nth host allocation failing,
// until a run reaches no allocation N (the call then completed unfaulted).
//
// For each scenario (a cache in a given state, built afresh each time, and one
// call on it):
//   1. a reference run, unarmed, gives the call's result ("true", "false",
//      "threw kvcache::UnknownRequest", ...), the cache's state after it and
//      the number of allocations the call makes;
//   2. for N = 1, 2, ...: a fresh cache, a snapshot of everything observable
//      (`dump`), allocation N armed to fail, the call. Either the call threw
//      std::bad_alloc, and then the cache must equal the snapshot exactly
//      (the strong guarantee), check_invariants() must hold, the same call
//      unarmed must give the reference result and state, and a workout (free
//      everything, allocate, append, write, read back) must work: the cache is
//      fully usable; or allocation N was never made, and the call must have
//      given the reference result.
// Both SQLite modes run: `transient` (only allocation N fails) and
// `persistent` (N and every later allocation fail, so error paths that
// allocate fail too).
//
// The replaced global operator new is in fault_new.cpp (fault_hook.hpp
// controls it). The library this binary links is built at contract level
// "on" (tests/fault/CMakeLists.txt says why: at "audit", the
// check_invariants() that ends every mutating call itself allocates, so a
// fault injected there would be reported after the change).
//
// At exit the binary prints its totals: allocation points, faults injected,
// faults survived. scripts/test runs each test case in its own process; run
// the binary by hand for the figures of the whole suite.
#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <iomanip>
#include <ios>
#include <iostream>
#include <ostream>
#include <limits>
#include <new>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "fault_hook.hpp"

import kvcache;

namespace {

using kvcache::BasicKVCache;
using kvcache::BasicStats;
using kvcache::Bytes;
using kvcache::ModelConfig;
using kvcache::PagedKVCache;
using kvcache::PagedStats;
using kvcache::PageId;
using kvcache::Storage;
using kvcache::Tokens;
using kvcache_fault::Mode;

constexpr ModelConfig kCfg{2, 1, 4, 2};    // 2 layers, 8-byte rows
constexpr ModelConfig kFloat{2, 1, 2, 4};  // fp32: 2 floats = 8-byte rows
constexpr std::size_t kRow = 8;
constexpr std::size_t kFloats = 2;
constexpr Tokens kPage{4};
constexpr std::uint64_t kMax = std::numeric_limits<std::uint64_t>::max();
// The prefix hashes the scenarios use: `dump` reports each one's registration.
constexpr std::array<std::string_view, 4> kHashes{"sys", "sys2", "other", "p"};

// A budget of exactly n pages (page size 4) of `cfg`.
Bytes pages(std::uint64_t n, ModelConfig cfg = kCfg) {
  return Bytes{n * cfg.bytes_per_page(kPage).count()};
}

// A row never all zero, different for each seed.
std::vector<std::byte> row(unsigned seed, std::size_t n = kRow) {
  std::vector<std::byte> r(n);
  for (std::size_t i = 0; i < n; ++i) r[i] = static_cast<std::byte>(((std::size_t{seed} * 29U) + (i * 7U)) | 1U);
  return r;
}
std::vector<float> frow(unsigned seed) {
  return std::vector<float>(kFloats, static_cast<float>(seed) + 0.5F);
}

// ---------------------------------------------------------------------------
// Everything observable about a cache, as text: equal texts mean equal caches
// (and gtest prints a readable difference when they are not).

void hex(std::ostringstream& os, std::span<const std::byte> bytes) {
  os << std::hex;
  for (const std::byte b : bytes) os << std::setw(2) << std::setfill('0') << std::to_integer<unsigned>(b);
  os << std::dec << ' ';
}

std::vector<std::string> sorted_ids(std::vector<std::string> ids) {
  std::sort(ids.begin(), ids.end());
  return ids;
}

std::string dump(const PagedKVCache& c) {
  std::ostringstream os;
  const PagedStats s = c.stats();
  os << "pages total " << s.total_pages.count() << " free " << s.free_pages.count() << " used "
     << s.used_pages.count() << " cached " << s.cached_pages.count() << "; used "
     << s.used_memory.count() << " B; requests " << s.num_requests << "; hits " << s.prefix_hits
     << " misses " << s.prefix_misses << "; util " << std::setprecision(17) << s.utilization_pct
     << "; stored " << s.stored_tokens.count() << "; page " << s.page_size.count() << " tokens "
     << s.bytes_per_page.count() << " B; prefixes " << s.registered_prefixes << "; counters "
     << s.prefix.hits << ' ' << s.prefix.misses << ' ' << s.prefix.tokens_saved << ' '
     << s.prefix.pages_saved << ' ' << s.prefix.cow_copies << ' ' << s.prefix.prefixes_evicted
     << ' ' << s.prefix.pages_evicted << ' ' << s.prefix.content_prompt_tokens << ' '
     << s.prefix.content_hit_tokens << ' ' << s.prefix.blocks_stored << ' '
     << s.prefix.blocks_evicted << ' ' << s.prefix.blocks_duplicate << "; efficiency "
     << c.memory_efficiency() << "; blocks " << c.registry().num_blocks() << "; events pending "
     << c.registry().pending_events() << '\n';
  os << "free list:";
  for (const PageId p : c.pool().free_list()) os << ' ' << static_cast<std::uint64_t>(p);
  os << "\nrefs:";
  for (std::uint64_t i = 0; i < s.total_pages.count(); ++i) {
    os << ' ' << c.pool().ref_count(PageId{static_cast<PageId::rep>(i)});
  }
  os << "\nblocks:";
  for (std::uint64_t i = 0; i < s.total_pages.count(); ++i) {
    const auto* b = c.registry().block_owner(PageId{static_cast<PageId::rep>(i)});
    if (b == nullptr) continue;
    os << ' ' << i << ":" << b->serial << "<" << b->parent_serial << "@" << b->first_token << "/"
       << b->cached << (b->on_lru ? "L" : "");
  }
  os << '\n';
  for (const std::string_view h : kHashes) {
    if (!c.has_prefix(h)) continue;
    const auto* p = c.registry().find(h);
    os << "prefix " << h << ": " << p->tokens.count() << " tokens, pages";
    for (const PageId page : p->pages) os << ' ' << static_cast<std::uint64_t>(page);
    os << '\n';
  }
  for (const std::string& id : sorted_ids(c.request_ids())) {
    os << "request \"" << id << "\" holds " << c.pages_held(id).count() << " pages, cached tokens "
       << c.cached_tokens(id).count() << (c.content_addressed(id) ? ", by content" : "") << '\n';
    for (std::size_t l = 0; l < c.config().num_layers; ++l) {
      os << "  layer " << l << ": " << c.tokens(id, l).count() << " tokens, table";
      for (const PageId p : c.block_table(id, l)) os << ' ' << static_cast<std::uint64_t>(p);
      if (c.storage() == Storage::host) {
        const auto [keys, values] = c.get_kv(id, l);
        os << "\n    K ";
        for (const auto k : keys) hex(os, k);
        os << "\n    V ";
        for (const auto v : values) hex(os, v);
      }
      os << '\n';
    }
  }
  return os.str();
}

std::string dump(const BasicKVCache& c) {
  std::ostringstream os;
  const BasicStats s = c.stats();
  os << "total " << s.total_memory.count() << " used " << s.used_memory.count() << " free "
     << s.free_memory.count() << " reserved " << s.reserved_tokens.count() << " stored "
     << s.stored_tokens.count() << " requests " << s.num_requests << " util "
     << std::setprecision(17) << s.utilization_pct << '\n';
  for (const std::string& id : sorted_ids(c.request_ids())) {
    os << "request \"" << id << "\" reserves " << c.reservation(id).count() << " tokens\n";
    for (std::size_t l = 0; l < c.config().num_layers; ++l) {
      os << "  layer " << l << ": " << c.tokens(id, l).count() << " tokens";
      if (c.storage() == Storage::none) {
        os << '\n';
        continue;
      }
      const auto [keys, values] = c.get_kv(id, l);
      os << "\n    K ";
      for (const auto k : keys) hex(os, k);
      os << "\n    V ";
      for (const auto v : values) hex(os, v);
      os << '\n';
    }
  }
  return os.str();
}

// ---------------------------------------------------------------------------
// Calls and their results as text.

// What a call did. Made without allocating: with persistent failures armed,
// building a std::string for the outcome would itself fail.
struct Outcome {
  const char* what = "";    // "true", "false", "void", "count", or "threw <type>"
  std::uint64_t count = 0;  // for "count"
  friend bool operator==(const Outcome& a, const Outcome& b) {
    return std::string_view(a.what) == b.what && a.count == b.count;
  }
  friend std::ostream& operator<<(std::ostream& os, const Outcome& o) {
    os << o.what;
    if (std::string_view(o.what) == "count") os << ' ' << o.count;
    return os;
  }
};
constexpr Outcome kVoid{"void"};
constexpr Outcome kBadAlloc{"threw std::bad_alloc"};
Outcome result(bool ok) { return {ok ? "true" : "false"}; }

template <class Cache>
using Call = std::function<Outcome(Cache&)>;

// Runs `call`, turning its result or exception into an Outcome. The most
// derived contract type first.
template <class Cache>
Outcome invoke(const Call<Cache>& call, Cache& cache) {
  try {
    return call(cache);
  } catch (const std::bad_alloc&) {
    return kBadAlloc;
  } catch (const kvcache::UnknownRequest&) {
    return {"threw kvcache::UnknownRequest"};
  } catch (const kvcache::ShapeMismatch&) {
    return {"threw kvcache::ShapeMismatch"};
  } catch (const kvcache::OutOfPages&) {
    return {"threw kvcache::OutOfPages"};
  } catch (const kvcache::ReservationExceeded&) {
    return {"threw kvcache::ReservationExceeded"};
  } catch (const std::out_of_range&) {
    return {"threw std::out_of_range"};
  } catch (const std::invalid_argument&) {
    return {"threw std::invalid_argument"};
  } catch (const std::overflow_error&) {
    return {"threw std::overflow_error"};
  } catch (const std::logic_error&) {
    return {"threw std::logic_error"};
  } catch (const std::exception&) {
    return {"threw another std::exception"};
  } catch (...) {
    return {"threw a non-std exception"};
  }
}

// ---------------------------------------------------------------------------
// "Fully usable": free everything, then allocate, append, write, read back.

void workout(PagedKVCache& c) {
  for (const std::string& id : c.request_ids()) c.free(id);
  static_cast<void>(c.clear_prefix_cache());
  ASSERT_TRUE(c.check_invariants());
  ASSERT_EQ(c.stats().free_pages, c.stats().total_pages);
  // 4 pages at most (the smallest pool of the scenarios): 1 per layer, then
  // a copy of each on write after the fork.
  ASSERT_TRUE(c.allocate_paged("workout", Tokens{1}));
  ASSERT_TRUE(c.append_token_paged("workout", 1));
  ASSERT_TRUE(c.fork("workout", "workout-child"));
  if (c.storage() == Storage::host) {
    const auto r = row(99, static_cast<std::size_t>(c.config().kv_bytes_per_token_per_layer().count()));
    ASSERT_TRUE(c.append_token_paged("workout", 0, r, r));
    c.write_kv("workout", 1, std::size_t{0}, r, r);
    const auto [keys, values] = c.get_kv("workout", 1);
    ASSERT_EQ(keys.size(), 2U);
    EXPECT_TRUE(std::ranges::equal(keys[0], r));
    EXPECT_TRUE(std::ranges::equal(values[0], r));
    const auto [child_keys, child_values] = c.get_kv("workout-child", 1);
    EXPECT_FALSE(std::ranges::equal(child_keys[0], r));  // copy on write
  }
  c.free("workout");
  c.free("workout-child");
  EXPECT_TRUE(c.check_invariants());
  EXPECT_EQ(c.stats().free_pages, c.stats().total_pages);
}

void workout(BasicKVCache& c) {
  for (const std::string& id : c.request_ids()) c.free(id);
  ASSERT_TRUE(c.check_invariants());
  ASSERT_EQ(c.stats().used_memory, Bytes{0});
  ASSERT_TRUE(c.allocate("workout", Tokens{2}, Tokens{1}));
  if (c.storage() == Storage::host) {
    const auto r = row(99, static_cast<std::size_t>(c.config().kv_bytes_per_token_per_layer().count()));
    c.append_token("workout", 1, r, r);
    const auto [keys, values] = c.get_kv("workout", 1);
    ASSERT_EQ(keys.size(), 1U);
    EXPECT_TRUE(std::ranges::equal(keys[0], r));
    EXPECT_TRUE(std::ranges::equal(values[0], r));
  } else {
    c.append_token("workout", 1);
    EXPECT_EQ(c.tokens("workout", 1), Tokens{1});
  }
  c.free("workout");
  EXPECT_TRUE(c.check_invariants());
  EXPECT_EQ(c.stats().used_memory, Bytes{0});
}

// ---------------------------------------------------------------------------
// The runner and the process-wide tally.

struct Tally {
  std::uint64_t scenarios = 0;
  std::uint64_t points = 0;    // allocations made by the reference runs
  std::uint64_t injected = 0;  // runs in which an allocation was made to fail
  std::uint64_t survived = 0;  // ... after which every check passed
};
Tally& tally() {
  static Tally t;
  return t;
}

class PrintTally : public ::testing::Environment {
 public:
  void TearDown() override {
    const Tally& t = tally();
    std::cout << "[fault] " << t.scenarios << " scenarios, " << t.points << " allocation points; "
              << t.injected << " faults injected, " << t.survived
              << " survived (strong guarantee kept, cache fully usable)\n";
  }
};
// gtest takes ownership of the environment (its documented interface takes a raw pointer).
const auto* const kPrintTally = ::testing::AddGlobalTestEnvironment(new PrintTally);  // NOLINT(cppcoreguidelines-owning-memory)

const char* name_of(Mode m) { return m == Mode::transient ? "transient" : "persistent"; }

template <class Cache>
struct Scenario {
  std::string name;
  std::function<Cache()> setup;  // the cache before the call, built the same way every time
  Call<Cache> call;
};

template <class Cache>
void run(const Scenario<Cache>& s) {
  SCOPED_TRACE(s.name);
  // The reference run: unarmed, counting.
  Cache ref = s.setup();
  ASSERT_TRUE(ref.check_invariants());
  const std::string before = dump(ref);
  kvcache_fault::arm(0, Mode::transient);
  const Outcome expected = invoke(s.call, ref);
  const std::uint64_t points = kvcache_fault::allocations();
  kvcache_fault::disarm();
  ASSERT_NE(expected, kBadAlloc);
  const std::string after = dump(ref);
  ASSERT_TRUE(ref.check_invariants());
  ++tally().scenarios;
  tally().points += points;

  for (const Mode mode : {Mode::transient, Mode::persistent}) {
    for (std::uint64_t n = 1;; ++n) {
      SCOPED_TRACE(std::string(name_of(mode)) + " failure of allocation " + std::to_string(n) +
                   " of " + std::to_string(points));
      Cache c = s.setup();
      ASSERT_EQ(dump(c), before) << "the scenario's setup is not deterministic";
      kvcache_fault::arm(n, mode);
      const Outcome got = invoke(s.call, c);
      const std::uint64_t failed = kvcache_fault::failures();
      kvcache_fault::disarm();
      if (failed == 0) {
        // Allocation n was never made: the call ran as in the reference run.
        EXPECT_EQ(n, points + 1) << "the call made a different number of allocations";
        EXPECT_EQ(got, expected);
        EXPECT_EQ(dump(c), after);
        break;
      }
      ++tally().injected;
      ASSERT_EQ(got, kBadAlloc) << "a failed allocation was not reported";
      const std::string state = dump(c);
      EXPECT_EQ(state, before) << "strong guarantee broken";
      const bool invariants = c.check_invariants();
      EXPECT_TRUE(invariants);
      const Outcome retry = invoke(s.call, c);
      EXPECT_EQ(retry, expected) << "the same call, unarmed";
      const std::string retried = dump(c);
      EXPECT_EQ(retried, after) << "the same call, unarmed";
      const bool clean_before = !::testing::Test::HasFailure();
      workout(c);
      if (clean_before && !::testing::Test::HasFailure() && state == before && invariants &&
          retry == expected && retried == after) {
        ++tally().survived;
      }
      if (n > points) {
        ADD_FAILURE() << "allocation " << n << " failed but the reference run made only " << points;
        break;
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Paged setups.

PagedKVCache empty_paged(std::uint64_t pool = 16, ModelConfig cfg = kCfg,
                         Storage storage = Storage::host) {
  return PagedKVCache(cfg, pages(pool, cfg), kPage, storage);
}

// `k` requests "r0".."r<k-1>" of 3 tokens (1 page per layer), each token written.
PagedKVCache paged_with(std::size_t k, std::uint64_t pool = 32) {
  PagedKVCache c = empty_paged(pool);
  for (std::size_t i = 0; i < k; ++i) {
    const std::string id = "r" + std::to_string(i);
    EXPECT_TRUE(c.allocate_paged(id, Tokens{3}));
    for (std::size_t l = 0; l < 2; ++l) {
      for (std::size_t t = 0; t < 3; ++t) c.write_kv(id, l, t, row(static_cast<unsigned>(i * 10 + t)), row(7));
    }
  }
  return c;
}

// "reg" registered prefix "sys" of 6 tokens with a prompt of 9: 3 pages per
// layer, the first 2 registered (the second partial: 2 of 4 slots).
PagedKVCache paged_with_prefix(std::uint64_t pool = 16) {
  PagedKVCache c = empty_paged(pool);
  EXPECT_TRUE(c.allocate_paged("reg", Tokens{9}, "sys", Tokens{6}));
  for (std::size_t l = 0; l < 2; ++l) {
    for (std::size_t t = 0; t < 9; ++t) c.write_kv("reg", l, t, row(static_cast<unsigned>(t)), row(5));
  }
  return c;
}

// As above, then "reg" freed: the 4 prefix pages are cached.
PagedKVCache paged_with_cached_prefix(std::uint64_t pool = 16) {
  PagedKVCache c = paged_with_prefix(pool);
  c.free("reg");
  return c;
}

// 8 pages: the cached prefix "sys" holds 4, "big" 2 (1 per layer), 2 free.
PagedKVCache paged_full_but_cached() {
  PagedKVCache c = paged_with_cached_prefix(8);
  EXPECT_TRUE(c.allocate_paged("big", Tokens{4}));
  return c;
}

// "a" (5 tokens, written) and its fork "b": every page shared.
PagedKVCache paged_forked(std::uint64_t pool = 16) {
  PagedKVCache c = empty_paged(pool);
  EXPECT_TRUE(c.allocate_paged("a", Tokens{5}));
  for (std::size_t l = 0; l < 2; ++l) {
    for (std::size_t t = 0; t < 5; ++t) c.write_kv("a", l, t, row(static_cast<unsigned>(t)), row(3));
  }
  EXPECT_TRUE(c.fork("a", "b"));
  return c;
}

// Every page taken by "a" (8 pages: 16 tokens per layer) and no cached page.
PagedKVCache paged_exhausted() {
  PagedKVCache c = empty_paged(8);
  EXPECT_TRUE(c.allocate_paged("a", Tokens{16}));
  return c;
}

Scenario<PagedKVCache> paged(std::string name, std::function<PagedKVCache()> setup,
                             Call<PagedKVCache> call) {
  return {std::move(name), std::move(setup), std::move(call)};
}

// ---------------------------------------------------------------------------
// Basic setups: 2 layers of 8-byte rows, 32 bytes per token.

BasicKVCache basic_with(std::size_t k, Bytes budget = Bytes{1U << 14}, ModelConfig cfg = kCfg,
                        Storage storage = Storage::host) {
  BasicKVCache c(cfg, budget, storage);
  for (std::size_t i = 0; i < k; ++i) {
    const std::string id = "r" + std::to_string(i);
    EXPECT_TRUE(c.allocate(id, Tokens{2}, Tokens{2}));
    if (storage == Storage::host) {
      c.append_token(id, 0, row(static_cast<unsigned>(i)), row(1));
    } else {
      c.append_token(id, 0);
    }
  }
  return c;
}

BasicKVCache basic_none(std::size_t k) { return basic_with(k, Bytes{1U << 14}, kCfg, Storage::none); }

Scenario<BasicKVCache> basic(std::string name, std::function<BasicKVCache()> setup,
                             Call<BasicKVCache> call) {
  return {std::move(name), std::move(setup), std::move(call)};
}

// ---------------------------------------------------------------------------
// BasicKVCache

TEST(FaultInjectionBasic, Allocate) {
  for (std::size_t k = 0; k <= 16; ++k) {
    run(basic("allocate with " + std::to_string(k) + " live requests",
              [k] { return basic_with(k); },
              [](BasicKVCache& c) { return result(c.allocate("new", Tokens{3}, Tokens{5})); }));
  }
  run(basic("allocate a zero reservation", [] { return basic_with(2); },
            [](BasicKVCache& c) { return result(c.allocate("zero", Tokens{0}, Tokens{0})); }));
  run(basic("allocate a long id (heap string)", [] { return basic_with(2); },
            [](BasicKVCache& c) {
              return result(c.allocate(std::string(100, 'x'), Tokens{1}, Tokens{1}));
            }));
  run(basic("allocate in Storage::none", [] { return basic_none(3); },
            [](BasicKVCache& c) { return result(c.allocate("new", Tokens{3}, Tokens{5})); }));
  run(basic("allocate a duplicate id", [] { return basic_with(3); },
            [](BasicKVCache& c) { return result(c.allocate("r1", Tokens{1}, Tokens{1})); }));
  run(basic("allocate past the budget", [] { return basic_with(3, Bytes{512}); },
            [](BasicKVCache& c) { return result(c.allocate("new", Tokens{4}, Tokens{1})); }));
  run(basic("allocate with prompt + max_gen overflowing", [] { return basic_with(1); },
            [](BasicKVCache& c) { return result(c.allocate("new", Tokens{kMax}, Tokens{1})); }));
  run(basic("allocate with the byte size overflowing", [] { return basic_with(1); },
            [](BasicKVCache& c) { return result(c.allocate("new", Tokens{kMax / 16}, Tokens{0})); }));
}

TEST(FaultInjectionBasic, AppendToken) {
  run(basic("append_token (bytes)", [] { return basic_with(3); }, [](BasicKVCache& c) {
    c.append_token("r1", 1, row(4), row(5));
    return kVoid;
  }));
  run(basic("append_token (floats)", [] { return basic_with(3, Bytes{1U << 14}, kFloat); },
            [](BasicKVCache& c) {
              c.append_token("r1", 1, std::span<const float>(frow(4)), std::span<const float>(frow(5)));
              return kVoid;
            }));
  run(basic("append_token past the reservation",
            [] {
              BasicKVCache c = basic_with(3);
              for (unsigned t = 1; t < 4; ++t) c.append_token("r2", 0, row(t), row(t));  // 4 of 4
              return c;
            },
            [](BasicKVCache& c) {
              c.append_token("r2", 0, row(9), row(9));
              return kVoid;
            }));
  run(basic("append_token (no data)", [] { return basic_with(3); }, [](BasicKVCache& c) {
    c.append_token("r1", 1);
    return kVoid;
  }));
  run(basic("append_token (no data) in Storage::none", [] { return basic_none(3); }, [](BasicKVCache& c) {
    c.append_token("r1", 1);
    return kVoid;
  }));
  run(basic("append_token (bytes) in Storage::none", [] { return basic_none(3); }, [](BasicKVCache& c) {
    c.append_token("r1", 1, row(1), row(1));
    return kVoid;
  }));
  run(basic("append_token to an unknown id", [] { return basic_with(3); }, [](BasicKVCache& c) {
    c.append_token("nobody", 0, row(1), row(1));
    return kVoid;
  }));
  run(basic("append_token to a bad layer", [] { return basic_with(3); }, [](BasicKVCache& c) {
    c.append_token("r0", 2, row(1), row(1));
    return kVoid;
  }));
  run(basic("append_token with a short key", [] { return basic_with(3); }, [](BasicKVCache& c) {
    c.append_token("r0", 0, row(1, kRow - 1), row(1));
    return kVoid;
  }));
  run(basic("append_token (floats) with dtype_bytes 2", [] { return basic_with(3); },
            [](BasicKVCache& c) {
              c.append_token("r0", 0, std::span<const float>(frow(1)), std::span<const float>(frow(1)));
              return kVoid;
            }));
}

TEST(FaultInjectionBasic, Free) {
  run(basic("free", [] { return basic_with(3); }, [](BasicKVCache& c) {
    c.free("r1");
    return kVoid;
  }));
  run(basic("free an unknown id", [] { return basic_with(3); }, [](BasicKVCache& c) {
    c.free("nobody");
    return kVoid;
  }));
}

// ---------------------------------------------------------------------------
// PagedKVCache

TEST(FaultInjectionPaged, AllocatePaged) {
  for (std::size_t k = 0; k <= 16; ++k) {
    run(paged("allocate_paged with " + std::to_string(k) + " live requests",
              [k] { return paged_with(k, 64); },
              [](PagedKVCache& c) { return result(c.allocate_paged("new", Tokens{6})); }));
  }
  run(paged("allocate_paged of 0 tokens", [] { return paged_with(2); },
            [](PagedKVCache& c) { return result(c.allocate_paged("new", Tokens{0})); }));
  run(paged("allocate_paged evicting a cached prefix", paged_full_but_cached,
            [](PagedKVCache& c) { return result(c.allocate_paged("new", Tokens{8})); }));
  run(paged("allocate_paged out of pages", paged_exhausted,
            [](PagedKVCache& c) { return result(c.allocate_paged("new", Tokens{1})); }));
  run(paged("allocate_paged of a duplicate id", [] { return paged_with(3); },
            [](PagedKVCache& c) { return result(c.allocate_paged("r2", Tokens{1})); }));
  run(paged("allocate_paged with a page count overflowing", [] { return paged_with(1); },
            [](PagedKVCache& c) { return result(c.allocate_paged("new", Tokens{kMax})); }));
  run(paged("allocate_paged in Storage::none", [] { return empty_paged(16, kCfg, Storage::none); },
            [](PagedKVCache& c) { return result(c.allocate_paged("new", Tokens{5})); }));
}

TEST(FaultInjectionPaged, AllocatePagedWithPrefix) {
  for (std::size_t k = 0; k <= 14; ++k) {
    run(paged("prefix miss with " + std::to_string(k) + " registered prefixes",
              [k] {
                PagedKVCache c = empty_paged(64);
                for (std::size_t i = 0; i < k; ++i) {
                  const std::string id = "q" + std::to_string(i);
                  EXPECT_TRUE(c.allocate_paged(id, Tokens{2}, "h" + std::to_string(i), Tokens{1}));
                }
                return c;
              },
              [](PagedKVCache& c) {
                return result(c.allocate_paged("new", Tokens{9}, "sys", Tokens{6}));
              }));
  }
  run(paged("prefix hit, prompt ends inside the partial prefix page (shared)",
            [] { return paged_with_prefix(); },
            [](PagedKVCache& c) { return result(c.allocate_paged("hit", Tokens{6}, "sys", Tokens{6})); }));
  run(paged("prefix hit, prompt continues inside the partial page (copied)",
            [] { return paged_with_prefix(); },
            [](PagedKVCache& c) { return result(c.allocate_paged("hit", Tokens{11}, "sys", Tokens{6})); }));
  run(paged("prefix hit of a cached prefix", [] { return paged_with_cached_prefix(); },
            [](PagedKVCache& c) { return result(c.allocate_paged("hit", Tokens{13}, "sys", Tokens{6})); }));
  run(paged("prefix hit of a full-page prefix",
            [] {
              PagedKVCache c = empty_paged();
              EXPECT_TRUE(c.allocate_paged("reg", Tokens{8}, "p", Tokens{8}));
              return c;
            },
            [](PagedKVCache& c) { return result(c.allocate_paged("hit", Tokens{10}, "p", Tokens{8})); }));
  run(paged("prefix miss evicting another cached prefix", paged_full_but_cached,
            [](PagedKVCache& c) { return result(c.allocate_paged("new", Tokens{7}, "other", Tokens{2})); }));
  run(paged("prefix hit out of pages",
            [] {
              PagedKVCache c = paged_with_prefix(6);  // "reg" holds 6 of 6 pages
              return c;
            },
            [](PagedKVCache& c) { return result(c.allocate_paged("hit", Tokens{12}, "sys", Tokens{6})); }));
  run(paged("prefix with an empty hash", [] { return paged_with_prefix(); },
            [](PagedKVCache& c) { return result(c.allocate_paged("x", Tokens{6}, "", Tokens{6})); }));
  run(paged("prefix of 0 tokens", [] { return paged_with_prefix(); },
            [](PagedKVCache& c) { return result(c.allocate_paged("x", Tokens{6}, "p", Tokens{0})); }));
  run(paged("prefix longer than the prompt", [] { return paged_with_prefix(); },
            [](PagedKVCache& c) { return result(c.allocate_paged("x", Tokens{6}, "p", Tokens{7})); }));
  run(paged("registered prefix with another length", [] { return paged_with_prefix(); },
            [](PagedKVCache& c) { return result(c.allocate_paged("x", Tokens{9}, "sys", Tokens{5})); }));
  run(paged("prefix with a duplicate id", [] { return paged_with_prefix(); },
            [](PagedKVCache& c) { return result(c.allocate_paged("reg", Tokens{9}, "sys", Tokens{6})); }));
}

TEST(FaultInjectionPaged, AppendTokenPaged) {
  run(paged("append (bytes) into the last page", [] { return paged_with(3); },
            [](PagedKVCache& c) { return result(c.append_token_paged("r1", 0, row(1), row(2))); }));
  run(paged("append (bytes) taking a new page",
            [] {
              PagedKVCache c = paged_with(3);
              EXPECT_TRUE(c.append_token_paged("r1", 0));  // 4 tokens: the page is full
              return c;
            },
            [](PagedKVCache& c) { return result(c.append_token_paged("r1", 0, row(1), row(2))); }));
  run(paged("append (bytes) to a shared last page (copy on write)",
            [] { return paged_forked(); },
            [](PagedKVCache& c) { return result(c.append_token_paged("b", 1, row(1), row(2))); }));
  run(paged("append (bytes) evicting a cached prefix",
            [] {
              PagedKVCache c = paged_full_but_cached();
              EXPECT_TRUE(c.allocate_paged("c", Tokens{4}));  // the 2 free pages
              return c;
            },
            [](PagedKVCache& c) { return result(c.append_token_paged("c", 0, row(1), row(2))); }));
  run(paged("append (bytes) out of pages", paged_exhausted,
            [](PagedKVCache& c) { return result(c.append_token_paged("a", 0, row(1), row(2))); }));
  run(paged("append (floats)",
            [] {
              PagedKVCache c = empty_paged(16, kFloat);
              EXPECT_TRUE(c.allocate_paged("f", Tokens{4}));
              return c;
            },
            [](PagedKVCache& c) {
              return result(c.append_token_paged("f", 1, std::span<const float>(frow(1)),
                                                 std::span<const float>(frow(2))));
            }));
  run(paged("append (floats) with dtype_bytes 2", [] { return paged_with(1); },
            [](PagedKVCache& c) {
              return result(c.append_token_paged("r0", 0, std::span<const float>(frow(1)),
                                                 std::span<const float>(frow(2))));
            }));
  run(paged("append (no data) taking a new page",
            [] {
              PagedKVCache c = paged_with(2);
              EXPECT_TRUE(c.append_token_paged("r0", 1));
              return c;
            },
            [](PagedKVCache& c) { return result(c.append_token_paged("r0", 1)); }));
  run(paged("append (no data) in Storage::none",
            [] {
              PagedKVCache c = empty_paged(16, kCfg, Storage::none);
              EXPECT_TRUE(c.allocate_paged("n", Tokens{4}));
              return c;
            },
            [](PagedKVCache& c) { return result(c.append_token_paged("n", 0)); }));
  run(paged("append (bytes) in Storage::none",
            [] {
              PagedKVCache c = empty_paged(16, kCfg, Storage::none);
              EXPECT_TRUE(c.allocate_paged("n", Tokens{4}));
              return c;
            },
            [](PagedKVCache& c) { return result(c.append_token_paged("n", 0, row(1), row(1))); }));
  run(paged("append to an unknown id", [] { return paged_with(2); },
            [](PagedKVCache& c) { return result(c.append_token_paged("nobody", 0, row(1), row(1))); }));
  run(paged("append to a bad layer", [] { return paged_with(2); },
            [](PagedKVCache& c) { return result(c.append_token_paged("r0", 7, row(1), row(1))); }));
  run(paged("append with a long value", [] { return paged_with(2); },
            [](PagedKVCache& c) { return result(c.append_token_paged("r0", 0, row(1), row(1, kRow + 1))); }));
}

TEST(FaultInjectionPaged, AppendTokenAllLayers) {
  run(paged("append_token_all_layers taking a page per layer",
            [] {
              PagedKVCache c = paged_with(3);
              EXPECT_TRUE(c.append_token_all_layers("r2"));
              return c;
            },
            [](PagedKVCache& c) { return result(c.append_token_all_layers("r2")); }));
  run(paged("append_token_all_layers into the last pages", [] { return paged_with(3); },
            [](PagedKVCache& c) { return result(c.append_token_all_layers("r2")); }));
  run(paged("append_token_all_layers copying shared pages", [] { return paged_forked(); },
            [](PagedKVCache& c) { return result(c.append_token_all_layers("a")); }));
  run(paged("append_token_all_layers out of pages", paged_exhausted,
            [](PagedKVCache& c) { return result(c.append_token_all_layers("a")); }));
  run(paged("append_token_all_layers to an unknown id", [] { return paged_with(1); },
            [](PagedKVCache& c) { return result(c.append_token_all_layers("nobody")); }));
}

TEST(FaultInjectionPaged, WriteKv) {
  run(paged("write_kv in place", [] { return paged_with(3); }, [](PagedKVCache& c) {
    c.write_kv("r1", 1, std::size_t{2}, row(40), row(41));
    return kVoid;
  }));
  run(paged("write_kv copying a shared page (fork)", [] { return paged_forked(); },
            [](PagedKVCache& c) {
              c.write_kv("b", 0, std::size_t{1}, row(40), row(41));
              return kVoid;
            }));
  run(paged("write_kv copying a registered prefix page (hit)",
            [] {
              PagedKVCache c = paged_with_prefix();
              EXPECT_TRUE(c.allocate_paged("hit", Tokens{9}, "sys", Tokens{6}));
              return c;
            },
            [](PagedKVCache& c) {
              c.write_kv("hit", 1, Tokens{0}, row(40), row(41));
              return kVoid;
            }));
  run(paged("write_kv (floats, Tokens position)",
            [] {
              PagedKVCache c = empty_paged(16, kFloat);
              EXPECT_TRUE(c.allocate_paged("f", Tokens{3}));
              return c;
            },
            [](PagedKVCache& c) {
              c.write_kv("f", 0, Tokens{2}, std::span<const float>(frow(1)), std::span<const float>(frow(2)));
              return kVoid;
            }));
  run(paged("write_kv (floats, size_t position)",
            [] {
              PagedKVCache c = empty_paged(16, kFloat);
              EXPECT_TRUE(c.allocate_paged("f", Tokens{3}));
              return c;
            },
            [](PagedKVCache& c) {
              c.write_kv("f", 1, std::size_t{0}, std::span<const float>(frow(1)),
                         std::span<const float>(frow(2)));
              return kVoid;
            }));
  run(paged("write_kv past the stored tokens", [] { return paged_with(2); }, [](PagedKVCache& c) {
    c.write_kv("r1", 0, std::size_t{3}, row(1), row(1));
    return kVoid;
  }));
  run(paged("write_kv at a huge Tokens position", [] { return paged_with(2); }, [](PagedKVCache& c) {
    c.write_kv("r1", 0, Tokens{kMax}, row(1), row(1));
    return kVoid;
  }));
  run(paged("write_kv copying with no page (OutOfPages)",
            [] {
              PagedKVCache c = empty_paged(4);
              EXPECT_TRUE(c.allocate_paged("a", Tokens{8}));
              EXPECT_TRUE(c.fork("a", "b"));
              return c;
            },
            [](PagedKVCache& c) {
              c.write_kv("b", 0, std::size_t{0}, row(1), row(1));
              return kVoid;
            }));
  run(paged("write_kv to an unknown id", [] { return paged_with(2); }, [](PagedKVCache& c) {
    c.write_kv("nobody", 0, std::size_t{0}, row(1), row(1));
    return kVoid;
  }));
}

TEST(FaultInjectionPaged, Fork) {
  for (std::size_t k = 1; k <= 14; ++k) {
    run(paged("fork with " + std::to_string(k) + " live requests", [k] { return paged_with(k, 64); },
              [](PagedKVCache& c) { return result(c.fork("r0", "child")); }));
  }
  run(paged("fork of a prefix user", [] { return paged_with_prefix(); },
            [](PagedKVCache& c) { return result(c.fork("reg", "child")); }));
  run(paged("fork onto an existing id", [] { return paged_forked(); },
            [](PagedKVCache& c) { return result(c.fork("a", "b")); }));
  run(paged("fork of an unknown parent", [] { return paged_forked(); },
            [](PagedKVCache& c) { return result(c.fork("nobody", "c")); }));
}

// ---------------------------------------------------------------------------
// Content-addressed prefix caching (allocate_paged with token ids,
// append_token_ids, events).

std::vector<kvcache::TokenId> ids_from(kvcache::TokenId first, std::size_t n) {
  std::vector<kvcache::TokenId> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = first + static_cast<kvcache::TokenId>(i);
  return v;
}

// "c" by content: 9 tokens (2 keyed pages + a partial), written.
PagedKVCache paged_with_content(std::uint64_t pool = 16, bool collide = false) {
  PagedKVCache c = empty_paged(pool);
  c.force_key_collisions_for_testing(collide);
  EXPECT_TRUE(c.allocate_paged("c", ids_from(0, 9)));
  for (std::size_t l = 0; l < 2; ++l) {
    for (std::size_t t = 0; t < 9; ++t) c.write_kv("c", l, t, row(static_cast<unsigned>(t)), row(4));
  }
  return c;
}

TEST(FaultInjectionPaged, ContentAddressed) {
  for (std::size_t k = 0; k <= 6; ++k) {
    run(paged("content miss with " + std::to_string(k) + " cached requests' blocks",
              [k] {
                PagedKVCache c = empty_paged(64);
                for (std::size_t i = 0; i < k; ++i) {
                  const std::string id = "q" + std::to_string(i);
                  EXPECT_TRUE(c.allocate_paged(id, ids_from(static_cast<kvcache::TokenId>(100 * (i + 1)), 5)));
                  c.free(id);
                }
                return c;
              },
              [](PagedKVCache& c) { return result(c.allocate_paged("new", ids_from(0, 13), "salt")); }));
  }
  run(paged("content hit of a live request's pages", [] { return paged_with_content(); },
            [](PagedKVCache& c) { return result(c.allocate_paged("hit", ids_from(0, 11))); }));
  run(paged("content hit of cached pages",
            [] {
              PagedKVCache c = paged_with_content();
              c.free("c");
              return c;
            },
            [](PagedKVCache& c) { return result(c.allocate_paged("hit", ids_from(0, 12))); }));
  run(paged("content hit capped at prompt - 1 (an equal last block exists)",
            [] { return paged_with_content(); },
            [](PagedKVCache& c) { return result(c.allocate_paged("hit", ids_from(0, 8))); }));
  run(paged("content lookup under forced key collisions", [] { return paged_with_content(16, true); },
            [](PagedKVCache& c) {
              auto p = ids_from(0, 9);
              p[0] = 50;  // another first page, the same key
              return result(c.allocate_paged("x", p));
            }));
  run(paged("content allocation evicting cached blocks",
            [] {
              PagedKVCache c = paged_with_content(8);  // 6 of 8 pages
              c.free("c");                             // 4 cached, 4 free
              return c;
            },
            [](PagedKVCache& c) { return result(c.allocate_paged("big", ids_from(500, 12))); }));
  run(paged("content allocation out of pages", paged_exhausted,
            [](PagedKVCache& c) { return result(c.allocate_paged("new", ids_from(0, 5))); }));
  run(paged("content allocation of a duplicate id", [] { return paged_with_content(); },
            [](PagedKVCache& c) { return result(c.allocate_paged("c", ids_from(0, 5))); }));
  run(paged("append_token_ids into the last page", [] { return paged_with_content(); },
            [](PagedKVCache& c) { return result(c.append_token_ids("c", ids_from(9, 2))); }));
  run(paged("append_token_ids filling pages (keys them)", [] { return paged_with_content(); },
            [](PagedKVCache& c) { return result(c.append_token_ids("c", ids_from(9, 11))); }));
  run(paged("append_token_ids into a page shared with a fork",
            [] {
              PagedKVCache c = paged_with_content();
              EXPECT_TRUE(c.fork("c", "f"));
              return c;
            },
            [](PagedKVCache& c) { return result(c.append_token_ids("f", ids_from(9, 3))); }));
  run(paged("append_token_ids onto an equal existing block",
            [] {
              PagedKVCache c = paged_with_content();
              EXPECT_TRUE(c.fork("c", "f"));
              EXPECT_TRUE(c.append_token_ids("c", ids_from(9, 3)));
              return c;
            },
            [](PagedKVCache& c) { return result(c.append_token_ids("f", ids_from(9, 3))); }));
  run(paged("append_token_ids evicting a cached block",
            [] {
              PagedKVCache c = paged_with_content(8);
              EXPECT_TRUE(c.allocate_paged("d", ids_from(200, 4)));  // 2 pages, keyed
              c.free("d");                                           // 2 cached
              return c;
            },
            [](PagedKVCache& c) { return result(c.append_token_ids("c", ids_from(9, 4))); }));
  run(paged("append_token_ids out of pages",
            [] { return paged_with_content(6); },
            [](PagedKVCache& c) { return result(c.append_token_ids("c", ids_from(9, 4))); }));
  run(paged("append_token_ids on a request without token ids", [] { return paged_with(2); },
            [](PagedKVCache& c) { return result(c.append_token_ids("r0", ids_from(0, 1))); }));
  run(paged("write_kv copying a block page", 
            [] {
              PagedKVCache c = paged_with_content();
              EXPECT_TRUE(c.allocate_paged("hit", ids_from(0, 10)));
              return c;
            },
            [](PagedKVCache& c) {
              c.write_kv("hit", 1, std::size_t{2}, row(9), row(9));
              return kVoid;
            }));
  run(paged("free a content request (its blocks become cached)", [] { return paged_with_content(); },
            [](PagedKVCache& c) {
              c.free("c");
              return kVoid;
            }));
  run(paged("clear_prefix_cache with blocks and a named prefix",
            [] {
              PagedKVCache c = paged_with_content(32);
              EXPECT_TRUE(c.allocate_paged("n", Tokens{6}, "sys", Tokens{4}));
              c.free("c");
              return c;
            },
            [](PagedKVCache& c) { return Outcome{"count", c.clear_prefix_cache()}; }));
}

TEST(FaultInjectionPaged, FreeAndEviction) {
  run(paged("free", [] { return paged_with(3); }, [](PagedKVCache& c) {
    c.free("r1");
    return kVoid;
  }));
  run(paged("free a prefix registrant (its pages become cached)", [] { return paged_with_prefix(); },
            [](PagedKVCache& c) {
              c.free("reg");
              return kVoid;
            }));
  run(paged("free a forked parent", [] { return paged_forked(); }, [](PagedKVCache& c) {
    c.free("a");
    return kVoid;
  }));
  run(paged("free an unknown id", [] { return paged_with(2); }, [](PagedKVCache& c) {
    c.free("nobody");
    return kVoid;
  }));
  run(paged("evict_prefix of a cached prefix", [] { return paged_with_cached_prefix(); },
            [](PagedKVCache& c) { return result(c.evict_prefix("sys")); }));
  run(paged("evict_prefix of a prefix in use", [] { return paged_with_prefix(); },
            [](PagedKVCache& c) { return result(c.evict_prefix("sys")); }));
  run(paged("evict_prefix of an unknown hash", [] { return paged_with_prefix(); },
            [](PagedKVCache& c) { return result(c.evict_prefix("other")); }));
  run(paged("clear_prefix_cache",
            [] {
              PagedKVCache c = paged_with_cached_prefix(32);
              EXPECT_TRUE(c.allocate_paged("o", Tokens{3}, "other", Tokens{2}));
              return c;
            },
            [](PagedKVCache& c) { return Outcome{"count", c.clear_prefix_cache()}; }));
}

// ---------------------------------------------------------------------------
// The runner itself: it must notice a call that breaks the strong guarantee,
// and one that swallows the failure. (Its tally is left as it was.)

// Runs `s` with gtest's failures intercepted; true when one of them says `what`.
template <class Cache>
bool runner_reports(const Scenario<Cache>& s, std::string_view what) {
  const Tally saved = tally();
  ::testing::TestPartResultArray failures;
  {
    const ::testing::ScopedFakeTestPartResultReporter intercept(
        ::testing::ScopedFakeTestPartResultReporter::INTERCEPT_ONLY_CURRENT_THREAD, &failures);
    run(s);
  }
  tally() = saved;
  for (int i = 0; i < failures.size(); ++i) {
    if (std::string_view(failures.GetTestPartResult(i).message()).find(what) != std::string_view::npos) {
      return true;
    }
  }
  return false;
}

TEST(FaultInjectionHarness, SeesABrokenStrongGuarantee) {
  EXPECT_TRUE(runner_reports(basic("free, then allocate", [] { return basic_with(2); },
                                   [](BasicKVCache& c) {
                                     c.free("r0");
                                     return result(c.allocate("new", Tokens{1}, Tokens{1}));
                                   }),
                             "strong guarantee broken"));
}

TEST(FaultInjectionHarness, SeesASwallowedFailure) {
  EXPECT_TRUE(runner_reports(paged("allocate_paged, bad_alloc swallowed", [] { return paged_with(1); },
                                   [](PagedKVCache& c) {
                                     try {
                                       return result(c.allocate_paged("new", Tokens{1}));
                                     } catch (const std::bad_alloc&) {
                                       return result(false);
                                     }
                                   }),
                             "a failed allocation was not reported"));
}

}  // namespace
