// kvcache/contracts.hpp: the library's precondition / postcondition macros.
//
// Macros do not cross `import`, so every module unit that checks a contract
// includes this header in its global module fragment.
//
// A broken contract is a bug in kvcache or in a caller that broke a documented
// `// REQUIRES:` precondition, never a user error: it prints where and why,
// then terminates (as GSL's Expects/Ensures do; GSL's own macros print
// nothing, which is why kvcache has its own). User errors throw the
// exceptions of kvcache.errors instead.
//
// The checking level is a build option of the library (KVCACHE_CONTRACTS =
// off | on | audit, see CMakeLists.txt), recorded in kvcache/build_config.hpp,
// not NDEBUG: a library and an importer built with different NDEBUG settings
// would silently disagree.
//   off   : no checks (conditions are not evaluated)
//   on    : O(1) checks (KVCACHE_EXPECTS / KVCACHE_ENSURES / KVCACHE_ASSERT)
//   audit : also the O(n) KVCACHE_AUDIT checks (check_invariants() after
//           every mutation)
#ifndef KVCACHE_CONTRACTS_HPP
#define KVCACHE_CONTRACTS_HPP

#include <cstdio>
#include <exception>

#include "kvcache/build_config.hpp"

#ifndef KVCACHE_CONTRACT_LEVEL
#define KVCACHE_CONTRACT_LEVEL 1
#endif

namespace kvcache::detail {
// The one place a broken contract ends. Not variadic (no printf-style call in
// every checking expression), out of line of the check, and never inlined
// into the hot paths that check.
[[noreturn, gnu::cold, gnu::noinline]] inline void contract_failed(const char* kind,
                                                                   const char* text,
                                                                   const char* file,
                                                                   int line) noexcept {
  std::fputs("kvcache: ", stderr);
  std::fputs(kind, stderr);
  std::fputs(" violated: ", stderr);
  std::fputs(text, stderr);
  std::fputs(" (", stderr);
  std::fputs(file, stderr);
  std::fputs(":", stderr);
  // A decimal line number without a vararg call.
  char digits[12] = {};  // NOLINT(cppcoreguidelines-avoid-c-arrays): a fixed scratch buffer, no <array> in every includer
  int at = static_cast<int>(sizeof digits) - 1;
  unsigned value = line < 0 ? 0U : static_cast<unsigned>(line);
  digits[--at] = static_cast<char>('0' + value % 10U);  // NOLINT(cppcoreguidelines-pro-bounds-constant-array-index)
  value /= 10U;
  while (value != 0U && at > 0) {
    digits[--at] = static_cast<char>('0' + value % 10U);  // NOLINT(cppcoreguidelines-pro-bounds-constant-array-index)
    value /= 10U;
  }
  std::fputs(&digits[at], stderr);  // NOLINT(cppcoreguidelines-pro-bounds-constant-array-index)
  std::fputs(")\n", stderr);
  std::fflush(stderr);
  std::terminate();
}
}  // namespace kvcache::detail

// NOLINTBEGIN(cppcoreguidelines-macro-usage): macros are the only way to
// capture the condition text and the source location before C++26 contracts.
#define KVCACHE_CONTRACT_FAIL_(kind, text) \
  ::kvcache::detail::contract_failed(kind, text, __FILE__, __LINE__)

#if KVCACHE_CONTRACT_LEVEL >= 1
#define KVCACHE_EXPECTS(cond) \
  ((cond) ? static_cast<void>(0) : KVCACHE_CONTRACT_FAIL_("precondition", #cond))
#define KVCACHE_ENSURES(cond) \
  ((cond) ? static_cast<void>(0) : KVCACHE_CONTRACT_FAIL_("postcondition", #cond))
#define KVCACHE_ASSERT(cond) \
  ((cond) ? static_cast<void>(0) : KVCACHE_CONTRACT_FAIL_("invariant", #cond))
#else
#define KVCACHE_EXPECTS(cond) static_cast<void>(0)
#define KVCACHE_ENSURES(cond) static_cast<void>(0)
#define KVCACHE_ASSERT(cond) static_cast<void>(0)
#endif

#if KVCACHE_CONTRACT_LEVEL >= 2
#define KVCACHE_AUDIT(cond) \
  ((cond) ? static_cast<void>(0) : KVCACHE_CONTRACT_FAIL_("audited invariant", #cond))
#else
#define KVCACHE_AUDIT(cond) static_cast<void>(0)
#endif
// NOLINTEND(cppcoreguidelines-macro-usage)

#endif  // KVCACHE_CONTRACTS_HPP
