// fault_new.cpp: the replaceable global allocation functions of the
// fault-injection test binary, counting and failing on demand (fault_hook.hpp).
//
// kvcache allocates host memory only through operator new: std containers and
// strings, std::make_unique, and BasicKVCache's data blocks through the
// nothrow `::operator new[](size, std::nothrow)` (PagedKVCache's arena is an
// mmap made once, at construction). Replacing these functions therefore sees
// every allocation a public call makes.
//
// Every form goes to malloc / free (aligned forms to posix_memalign / free),
// so that the allocation and deallocation functions always match however they
// are paired. Under AddressSanitizer (the test preset) this is still fully
// checked: the executable's definitions take precedence over the ASan
// runtime's operator new, and ASan intercepts malloc and free, so overflows,
// use-after-free and leaks are still reported; only ASan's new/delete
// mismatch check is lost (everything is malloc/free here).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

#include "fault_hook.hpp"

namespace kvcache_fault {
namespace {

struct State {
  bool counting = false;
  Mode mode = Mode::transient;
  std::uint64_t fail_at = 0;
  std::uint64_t count = 0;
  std::uint64_t failed = 0;
};

// Constant-initialised: usable by allocations made before main().
constinit State state;  // NOLINT(cppcoreguidelines-avoid-non-const-global-variables): the hook's switch

// True when this allocation must fail.
bool should_fail() noexcept {
  if (!state.counting) return false;
  ++state.count;
  const bool fail = state.fail_at != 0 &&
                    (state.count == state.fail_at ||
                     (state.mode == Mode::persistent && state.count > state.fail_at));
  if (fail) ++state.failed;
  return fail;
}

void* allocate(std::size_t size) noexcept {
  if (should_fail()) return nullptr;
  return std::malloc(size == 0 ? 1 : size);  // NOLINT(cppcoreguidelines-no-malloc,cppcoreguidelines-owning-memory): the allocator itself
}

void* allocate_aligned(std::size_t size, std::align_val_t align) noexcept {
  if (should_fail()) return nullptr;
  void* p = nullptr;
  const auto a = static_cast<std::size_t>(align);
  if (::posix_memalign(&p, a < sizeof(void*) ? sizeof(void*) : a, size == 0 ? 1 : size) != 0) {
    return nullptr;
  }
  return p;
}

void* allocate_or_throw(std::size_t size) {
  void* p = allocate(size);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}

void* allocate_aligned_or_throw(std::size_t size, std::align_val_t align) {
  void* p = allocate_aligned(size, align);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}

void deallocate(void* p) noexcept { std::free(p); }  // NOLINT(cppcoreguidelines-no-malloc,cppcoreguidelines-owning-memory)

}  // namespace

void arm(std::uint64_t fail_at, Mode mode) noexcept {
  state = State{true, mode, fail_at, 0, 0};
}
void disarm() noexcept { state.counting = false; }
std::uint64_t allocations() noexcept { return state.count; }
std::uint64_t failures() noexcept { return state.failed; }

}  // namespace kvcache_fault

// NOLINTBEGIN(cppcoreguidelines-owning-memory,misc-new-delete-overloads): the
// global replacements themselves, every form the standard lets a program
// replace.
void* operator new(std::size_t size) { return kvcache_fault::allocate_or_throw(size); }
void* operator new[](std::size_t size) { return kvcache_fault::allocate_or_throw(size); }
void* operator new(std::size_t size, const std::nothrow_t& /*tag*/) noexcept {
  return kvcache_fault::allocate(size);
}
void* operator new[](std::size_t size, const std::nothrow_t& /*tag*/) noexcept {
  return kvcache_fault::allocate(size);
}
void* operator new(std::size_t size, std::align_val_t align) {
  return kvcache_fault::allocate_aligned_or_throw(size, align);
}
void* operator new[](std::size_t size, std::align_val_t align) {
  return kvcache_fault::allocate_aligned_or_throw(size, align);
}
void* operator new(std::size_t size, std::align_val_t align, const std::nothrow_t& /*tag*/) noexcept {
  return kvcache_fault::allocate_aligned(size, align);
}
void* operator new[](std::size_t size, std::align_val_t align, const std::nothrow_t& /*tag*/) noexcept {
  return kvcache_fault::allocate_aligned(size, align);
}

void operator delete(void* p) noexcept { kvcache_fault::deallocate(p); }
void operator delete[](void* p) noexcept { kvcache_fault::deallocate(p); }
void operator delete(void* p, std::size_t /*size*/) noexcept { kvcache_fault::deallocate(p); }
void operator delete[](void* p, std::size_t /*size*/) noexcept { kvcache_fault::deallocate(p); }
void operator delete(void* p, const std::nothrow_t& /*tag*/) noexcept { kvcache_fault::deallocate(p); }
void operator delete[](void* p, const std::nothrow_t& /*tag*/) noexcept { kvcache_fault::deallocate(p); }
void operator delete(void* p, std::align_val_t /*align*/) noexcept { kvcache_fault::deallocate(p); }
void operator delete[](void* p, std::align_val_t /*align*/) noexcept { kvcache_fault::deallocate(p); }
void operator delete(void* p, std::size_t /*size*/, std::align_val_t /*align*/) noexcept {
  kvcache_fault::deallocate(p);
}
void operator delete[](void* p, std::size_t /*size*/, std::align_val_t /*align*/) noexcept {
  kvcache_fault::deallocate(p);
}
void operator delete(void* p, std::align_val_t /*align*/, const std::nothrow_t& /*tag*/) noexcept {
  kvcache_fault::deallocate(p);
}
void operator delete[](void* p, std::align_val_t /*align*/, const std::nothrow_t& /*tag*/) noexcept {
  kvcache_fault::deallocate(p);
}
// NOLINTEND(cppcoreguidelines-owning-memory,misc-new-delete-overloads)
