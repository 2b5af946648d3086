// Negative compilation tests: each KVCACHE_CASE_* below adds ONE line that
// must not compile, spelled exactly as CONTRACT.md writes it. The static
// asserts next door prove the same through requires-expressions; these cases
// show the compiler's own diagnostic for the literal code, and cover what a
// type trait cannot see ([[nodiscard]]).
//
// tests/compile/CMakeLists.txt builds one object library per case
// (EXCLUDE_FROM_ALL) and a ctest test that runs the build of that target and
// passes only if the output shows the expected diagnostic. The `control`
// case (no KVCACHE_CASE_* line) must compile: it proves that the rest of this
// file is fine, so each failure comes from its one line.
#include <cstdint>

import kvcache;

namespace {

[[maybe_unused]] void cases(kvcache::BasicKVCache& cache) {
  using kvcache::Bytes;
  using kvcache::PageId;
  using kvcache::Tokens;
  static_cast<void>(cache);
#if defined(KVCACHE_CASE_bytes_plus_tokens)
  auto sum = Bytes{1} + Tokens{1};
#elif defined(KVCACHE_CASE_bytes_equals_tokens)
  bool same = Bytes{1} == Tokens{1};
#elif defined(KVCACHE_CASE_bytes_from_int)
  Bytes b = 5;
#elif defined(KVCACHE_CASE_bytes_to_int)
  std::uint64_t n = Bytes{5};
#elif defined(KVCACHE_CASE_page_id_ordering)
  bool less = PageId{1} < PageId{2};
#elif defined(KVCACHE_CASE_constant_overflow)
  constexpr Bytes too_big = Bytes::max() + Bytes{1};
#elif defined(KVCACHE_CASE_allocate_nodiscard)
  cache.allocate("r", Tokens{1}, Tokens{1});
#endif
}

}  // namespace
