// fault_hook.hpp: control of the failing global operator new of the
// fault-injection test binary (fault_new.cpp replaces every throwing and
// nothrow form of operator new / new[] and the matching deletes).
//
// While counting, every allocation is numbered 1, 2, 3, ... When armed with
// `n`, allocation number n fails: the throwing forms throw std::bad_alloc, the
// nothrow forms return nullptr (what a real out-of-memory does). In
// `Mode::transient` only allocation n fails (a passing shortage); in
// `Mode::persistent` n and every later one fail (memory does not come back,
// so the error path itself cannot allocate: SQLite's "persistent" mode).
//
// Single-threaded, like the library: the test never allocates from two
// threads while armed.
#ifndef KVCACHE_TESTS_FAULT_FAULT_HOOK_HPP
#define KVCACHE_TESTS_FAULT_FAULT_HOOK_HPP

#include <cstdint>

namespace kvcache_fault {

enum class Mode : std::uint8_t { transient, persistent };

// Starts numbering allocations from 1; allocation `fail_at` fails (0: none
// fails, only count).
void arm(std::uint64_t fail_at, Mode mode) noexcept;
// Stops numbering and failing.
void disarm() noexcept;
// Allocations numbered since the last arm().
[[nodiscard]] std::uint64_t allocations() noexcept;
// Allocations made to fail since the last arm().
[[nodiscard]] std::uint64_t failures() noexcept;

}  // namespace kvcache_fault

#endif  // KVCACHE_TESTS_FAULT_FAULT_HOOK_HPP
