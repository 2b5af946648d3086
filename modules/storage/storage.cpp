// Implementation of kvcache.storage's out-of-line members.
module;

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kvcache/contracts.hpp"

module kvcache.storage;

namespace kvcache::detail {

void LazyBuffer::discard(std::size_t offset, std::size_t length) noexcept {
  KVCACHE_EXPECTS(offset <= size_ && length <= size_ - offset);
  if (length == 0) return;
  static const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  const std::size_t begin = offset;
  const std::size_t end = offset + length;
  const std::size_t first_whole = (begin + page - 1) / page * page;
  const std::size_t last_whole = end / page * page;
  if (first_whole >= last_whole) {
    std::memset(data_ + begin, 0, length);
    return;
  }
  std::memset(data_ + begin, 0, first_whole - begin);
  // MADV_DONTNEED on a private anonymous mapping: the pages read as zero again
  // and their memory goes back to the OS. It cannot fail on a valid range.
  ::madvise(data_ + first_whole, last_whole - first_whole, MADV_DONTNEED);
  std::memset(data_ + last_whole, 0, end - last_whole);
}

}  // namespace kvcache::detail
