#pragma once
// Storage: a reference-counted (in place, IntrusivePtr), 64-byte-aligned buffer shared by a tensor
// and its views (tensors of at most 32 bytes keep their data inline in the Storage, 16-byte
// aligned, and the Storage in their head's block).
// Buffers come from a caching allocator: once a training step has run, the next identical
// step finds every buffer it needs in the cache and asks the OS for nothing.
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <new>
#include <utility>

#include "chaingrad/intrusive_ptr.hpp"

namespace chaingrad {

struct AllocatorStats {
  std::uint64_t os_allocations = 0;   // buffers obtained from the OS (aligned_alloc)
  std::uint64_t cache_hits = 0;       // requests served from the cache
  std::uint64_t bytes_in_use = 0;     // bytes handed out and not yet returned (buffers over 512 bytes)
  std::uint64_t bytes_cached = 0;     // bytes held in the cache, free for reuse
  std::uint64_t peak_bytes_in_use = 0;
};

namespace allocator {
// Buffers of 4 MiB and more are 2 MiB-aligned (and advised for huge pages); others 64-byte-aligned.
void* allocate(std::size_t nbytes);
void deallocate(void* p, std::size_t nbytes) noexcept;
AllocatorStats stats();
void empty_cache();  // returns every cached buffer to the OS

// Blocks for the small objects every op creates (tensor heads, storages, graph nodes), recycled
// through per-thread free lists: no malloc and no lock once warm. A block may be freed on another
// thread than the one that allocated it (it joins that thread's list). Blocks are 16-byte aligned.
inline constexpr std::size_t kMaxPooledObject = 1024;

namespace pool {  // the per-thread free lists behind allocate_object (storage.cpp has the rest)
inline constexpr std::size_t kGranule = 16;
inline constexpr std::size_t kClasses = kMaxPooledObject / kGranule;
inline constexpr std::uint32_t kListCap = 4096;  // blocks kept per class; beyond, back to the OS
struct FreeBlock {
  FreeBlock* next;
};
// Trivially destructible and constant-initialized, so the inline fast paths below read it with
// no TLS guard; storage.cpp registers a reaper that empties it (and sets `dead`) at thread exit.
struct Cache {
  FreeBlock* head[kClasses];
  std::uint32_t count[kClasses];
  bool armed;  // the thread-exit reaper is registered (so the fast paths may keep blocks)
  bool dead;
};
extern thread_local constinit Cache cache;
constexpr std::size_t size_class(std::size_t nbytes) { return (nbytes + kGranule - 1) / kGranule - 1; }
void* allocate_slow(std::size_t cls);
void deallocate_slow(void* p, std::size_t cls) noexcept;
}  // namespace pool

#if defined(__SANITIZE_ADDRESS__)
#define CHAINGRAD_POOL_BYPASS 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CHAINGRAD_POOL_BYPASS 1
#endif
#endif

// nbytes in [1, kMaxPooledObject]. Under AddressSanitizer every block comes from operator new, so
// a use after free of a tensor head or node is reported rather than hidden by the free list.
#ifdef CHAINGRAD_POOL_BYPASS
inline void* allocate_object(std::size_t nbytes) { return ::operator new(nbytes); }
inline void deallocate_object(void* p, std::size_t) noexcept { ::operator delete(p); }
#else
inline void* allocate_object(std::size_t nbytes) {
  const std::size_t cls = pool::size_class(nbytes);
  pool::Cache& c = pool::cache;
  if (pool::FreeBlock* b = c.head[cls]) {
    c.head[cls] = b->next;
    --c.count[cls];
    return b;
  }
  return pool::allocate_slow(cls);
}
inline void deallocate_object(void* p, std::size_t nbytes) noexcept {
  const std::size_t cls = pool::size_class(nbytes);
  pool::Cache& c = pool::cache;
  const std::uint32_t n = c.count[cls];
  if (!c.armed || n >= pool::kListCap || !p) return pool::deallocate_slow(p, cls);  // (dead: not armed)
  auto* b = static_cast<pool::FreeBlock*>(p);
  b->next = c.head[cls];
  c.head[cls] = b;
  c.count[cls] = n + 1;
}
#endif
}  // namespace allocator

class Storage;
using StoragePtr = IntrusivePtr<Storage>;

class Storage {
 public:
  // Buffers up to this size (0-d and tiny tensors) live inside the Storage object itself, so a
  // scalar needs no buffer of its own; empty() puts such a Storage in its tensor head's block.
  static constexpr std::size_t kInlineBytes = 32;

  // A storage in a pooled block of its own.
  static StoragePtr make(std::size_t nbytes);
  // A storage constructed at `at`, inside a larger pooled block of `block_bytes` bytes that starts
  // at `block`, and the reference of the head that shares the block (see kHeadReference). Its
  // count starts at one ordinary reference besides. `nbytes` is at most kInlineBytes: the data
  // lives inline, so the head may free the block without running the destructor.
  static Storage* make_in(void* at, std::size_t nbytes, void* block, std::size_t block_bytes);
  // The block is freed when the last reference goes, so a tensor head in the same block holds a
  // reference of its own for as long as it lives, even if its `storage` is reassigned. That
  // reference weighs kHeadReference, so use_count() can leave it out: it tells whether any *tensor*
  // other than one handle shares the data.
  static constexpr std::int64_t kHeadReference = std::int64_t{1} << 40;
  // Drops the head's reference and `ordinary` (0 or 1) ordinary ones. True when they were the
  // last: the caller then frees the block, whose inline data needs no destructor (make_in's storage
  // always holds its data inline).
  [[nodiscard]] bool release_head_reference(std::int64_t ordinary) noexcept {
    const std::int64_t mine = kHeadReference + ordinary;
    return refs_.load(std::memory_order_acquire) == mine || refs_.fetch_sub(mine, std::memory_order_acq_rel) == mine;
  }
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return data_; }
  std::size_t nbytes() const { return nbytes_; }
  // Bumped by every in-place write; autograd compares it against the version saved for
  // backward to catch a tensor modified after an op saved it (see Note [version counter]).
  std::uint32_t version() const { return version_; }
  void bump_version() { ++version_; }
  long use_count() const { return refs_.load(std::memory_order_relaxed) % kHeadReference; }

 private:
  Storage(std::size_t nbytes, void* block, std::size_t block_bytes);
  ~Storage();
  void destroy() noexcept;
  friend void intrusive_retain(Storage* s) noexcept { s->refs_.fetch_add(1, std::memory_order_relaxed); }
  // A sole owner frees without an atomic read-modify-write: nobody else can add a reference to an
  // object only it can reach (as libstdc++'s shared_ptr does when both its counts are one).
  friend void intrusive_release(Storage* s) noexcept {
    if (s->refs_.load(std::memory_order_acquire) == 1 || s->refs_.fetch_sub(1, std::memory_order_acq_rel) == 1)
      s->destroy();
  }
  friend long intrusive_use_count(const Storage* s) noexcept { return s->use_count(); }

  std::atomic<std::int64_t> refs_{1};
  std::uint32_t version_ = 0;
  void* data_;
  std::size_t nbytes_;
  void* block_;              // the pooled block to free with this storage
  std::size_t block_bytes_;  // its size
  alignas(16) unsigned char inline_[kInlineBytes];
};

// Inline: a scalar's storage is made and freed with every op.
inline Storage::Storage(std::size_t nbytes, void* block, std::size_t block_bytes)
    : data_(nbytes <= kInlineBytes ? static_cast<void*>(inline_) : allocator::allocate(nbytes)),
      nbytes_(nbytes),
      block_(block),
      block_bytes_(block_bytes) {}
inline Storage::~Storage() {
  if (data_ != inline_) allocator::deallocate(data_, nbytes_);
}
inline Storage* Storage::make_in(void* at, std::size_t nbytes, void* block, std::size_t block_bytes) {
  auto* s = new (at) Storage(nbytes, block, block_bytes);
  s->refs_.store(1 + kHeadReference, std::memory_order_relaxed);
  return s;
}
inline void Storage::destroy() noexcept {
  void* block = block_;
  const std::size_t bytes = block_bytes_;
  this->~Storage();
  allocator::deallocate_object(block, bytes);
}

}  // namespace chaingrad
