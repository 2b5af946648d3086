// kvcache.storage: where KV bytes live on the host, committed lazily.
//
// `Storage` picks whether a cache keeps KV bytes at all (`host`) or only the
// bookkeeping (`none`, for engines whose KV tensors live on the GPU).
// `Admission` is the scheduler's answer: now, later or never.
//
// `detail::LazyBuffer` is a zero-filled byte region that takes address space
// at construction and physical memory only for the OS pages actually written:
// an anonymous private mapping (MAP_NORESERVE), which the kernel backs with
// the shared zero page until first write. So a cache with an 8 GiB budget, or
// a basic request reserving a long context, costs no resident memory until its
// tokens are written. (malloc/calloc cannot promise this: glibc's calloc
// clears memory that came from its heap, and its mmap threshold moves.)
// Ownership: move-only, unmaps in the destructor.
//
// `TokenRows` and `KVView` are what `get_kv` returns: a non-owning view of a
// layer's key rows and value rows, token i's row being `rows[i]`, a
// std::span<const std::byte> of kv_bytes_per_token_per_layer() bytes. A view
// is invalidated by the next mutating call on the cache that made it.
//
// Thread safety: none of its own; callers serialise access.
module;

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <iterator>
#include <new>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>

export module kvcache.storage;

import kvcache.units;

export namespace kvcache {

enum class Storage : std::uint8_t {
  host,  // KV bytes stored in host memory, committed lazily
  none,  // bookkeeping only: page ids and block tables, no KV bytes
};

// What an engine's scheduler may do with a new request, as the caches'
// admission() answer it.
enum class Admission : std::uint8_t {
  now,    // the memory is available now
  later,  // not now, but it fits in the empty cache: queue it
  never,  // larger than the whole cache: reject it, it would wait forever
};

// The rows of K (or of V) of one layer of one request, in token order.
//
// Two shapes, one type:
//  - contiguous (BasicKVCache): row i at base + i * stride;
//  - paged (PagedKVCache): token i lives in page pages[i / page_tokens], slot
//    s = i % page_tokens, at base + page * page_bytes + offset + s * row_bytes,
//    where `offset` selects K or V inside the page. A slot at or past its
//    page's written mark (`written[page]`) has never been written by its
//    holders and reads as the shared all-zero row instead: freed pages are
//    reused without being cleared, and no reader sees another request's
//    stale bytes.
class TokenRows {
 public:
  class iterator {
   public:
    using iterator_category = std::random_access_iterator_tag;
    using value_type = std::span<const std::byte>;
    using difference_type = std::ptrdiff_t;
    using reference = std::span<const std::byte>;
    using pointer = void;

    iterator() noexcept = default;
    reference operator*() const noexcept { return (*rows_)[i_]; }
    reference operator[](difference_type k) const noexcept {
      return (*rows_)[static_cast<std::size_t>(static_cast<difference_type>(i_) + k)];
    }
    iterator& operator++() noexcept { ++i_; return *this; }
    iterator operator++(int) noexcept { iterator t = *this; ++i_; return t; }
    iterator& operator--() noexcept { --i_; return *this; }
    iterator operator--(int) noexcept { iterator t = *this; --i_; return t; }
    iterator& operator+=(difference_type k) noexcept {
      i_ = static_cast<std::size_t>(static_cast<difference_type>(i_) + k);
      return *this;
    }
    iterator& operator-=(difference_type k) noexcept { return *this += -k; }
    friend iterator operator+(iterator it, difference_type k) noexcept { return it += k; }
    friend iterator operator+(difference_type k, iterator it) noexcept { return it += k; }
    friend iterator operator-(iterator it, difference_type k) noexcept { return it -= k; }
    friend difference_type operator-(const iterator& a, const iterator& b) noexcept {
      return static_cast<difference_type>(a.i_) - static_cast<difference_type>(b.i_);
    }
    friend bool operator==(const iterator& a, const iterator& b) noexcept { return a.i_ == b.i_; }
    friend auto operator<=>(const iterator& a, const iterator& b) noexcept { return a.i_ <=> b.i_; }

   private:
    friend class TokenRows;
    iterator(const TokenRows* rows, std::size_t i) noexcept : rows_(rows), i_(i) {}
    const TokenRows* rows_ = nullptr;
    std::size_t i_ = 0;
  };

  // Where the rows of one paged layer are (for the library's caches).
  struct Paged {
    const std::byte* arena = nullptr;        // page p starts at arena + p * page_bytes
    const PageId* pages = nullptr;           // the block table
    const std::uint64_t* written = nullptr;  // per page: slots [0, written) were written
    const std::byte* zero_row = nullptr;     // row_bytes zero bytes
    std::size_t page_tokens = 0;             // slots per page
    std::size_t page_bytes = 0;
    std::size_t offset = 0;                  // 0 for K, page_tokens * row_bytes for V
  };

  TokenRows() noexcept = default;
  // Contiguous rows: row i at base + i * stride, row_bytes long.
  TokenRows(const std::byte* base, std::size_t count, std::size_t row_bytes,
            std::size_t stride) noexcept
      : base_(base), count_(count), row_bytes_(row_bytes), stride_(stride) {}
  // Paged rows, see `Paged`.
  TokenRows(const Paged& paged, std::size_t count, std::size_t row_bytes) noexcept
      : base_(paged.arena), count_(count), row_bytes_(row_bytes), stride_(row_bytes),
        paged_(paged) {}

  [[nodiscard]] std::size_t size() const noexcept { return count_; }
  [[nodiscard]] bool empty() const noexcept { return count_ == 0; }
  [[nodiscard]] std::size_t row_bytes() const noexcept { return row_bytes_; }

  // REQUIRES: i < size() (unchecked, like std::span; use at() for a check).
  // O(1): one division to find the page.
  [[nodiscard]] std::span<const std::byte> operator[](std::size_t i) const noexcept {
    if (paged_.pages == nullptr) return {base_ + (i * stride_), row_bytes_};
    const std::size_t page = paged_.pages[i / paged_.page_tokens].index();
    const std::size_t slot = i % paged_.page_tokens;
    if (slot >= paged_.written[page]) return {paged_.zero_row, row_bytes_};
    return {base_ + (page * paged_.page_bytes) + paged_.offset + (slot * row_bytes_), row_bytes_};
  }
  // Throws std::out_of_range when i >= size().
  [[nodiscard]] std::span<const std::byte> at(std::size_t i) const {
    if (i >= count_) {
      throw std::out_of_range("kvcache: TokenRows::at: token " + std::to_string(i) +
                              " of " + std::to_string(count_));
    }
    return (*this)[i];
  }
  [[nodiscard]] iterator begin() const noexcept { return {this, 0}; }
  [[nodiscard]] iterator end() const noexcept { return {this, count_}; }

 private:
  const std::byte* base_ = nullptr;
  std::size_t count_ = 0;
  std::size_t row_bytes_ = 0;
  std::size_t stride_ = 0;
  Paged paged_;
};

// What get_kv returns: `auto [keys, values] = cache.get_kv(id, layer);`
struct KVView {
  TokenRows keys;
  TokenRows values;
};

}  // namespace kvcache

export namespace kvcache::detail {

class LazyBuffer {
 public:
  LazyBuffer() noexcept = default;

  // Maps `size` zero bytes. Throws std::bad_alloc when the address space
  // cannot be had. Touches no page.
  explicit LazyBuffer(std::size_t size) : size_(size) {
    if (size_ == 0) return;
    void* p = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    data_ = static_cast<std::byte*>(p);
  }

  LazyBuffer(LazyBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  LazyBuffer& operator=(LazyBuffer&& other) noexcept {
    if (this != &other) {
      release();
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  LazyBuffer(const LazyBuffer&) = delete;
  LazyBuffer& operator=(const LazyBuffer&) = delete;
  ~LazyBuffer() { release(); }

  [[nodiscard]] std::byte* data() noexcept { return data_; }
  [[nodiscard]] const std::byte* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }

  // Gives the physical memory of [offset, offset + length) back to the OS;
  // the range reads as zero afterwards. Only whole OS pages inside the range
  // are returned; the rest is zeroed by hand.
  void discard(std::size_t offset, std::size_t length) noexcept;

 private:
  void release() noexcept {
    if (data_ != nullptr) ::munmap(data_, size_);
    data_ = nullptr;
    size_ = 0;
  }

  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace kvcache::detail
