// Sanitizer defaults for every kvcache test binary, wherever it is run from
// (ctest, by hand, a debugger): a test cannot forget them.
//
// allocator_may_return_null=1: an allocation too large for ASan's allocator
// makes operator new throw std::bad_alloc, as it would without ASan, instead
// of aborting the process. The library's strong guarantee under bad_alloc is
// exactly what some tests check.

// The sanitizer runtimes look these two up by name: the reserved identifiers
// are theirs to fix, not ours to choose.
// NOLINTBEGIN(bugprone-reserved-identifier,readability-identifier-naming)
extern "C" const char* __asan_default_options() {
  return "allocator_may_return_null=1:detect_stack_use_after_return=1:strict_string_checks=1";
}
extern "C" const char* __ubsan_default_options() { return "print_stacktrace=1"; }
// NOLINTEND(bugprone-reserved-identifier,readability-identifier-naming)
