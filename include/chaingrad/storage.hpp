#pragma once
// Storage: a reference-counted, 64-byte-aligned buffer shared by a tensor and its views.
// Buffers come from a caching allocator: once a training step has run, the next identical
// step finds every buffer it needs in the cache and asks the OS for nothing.
#include <cstddef>
#include <cstdint>
#include <memory>

namespace chaingrad {

struct AllocatorStats {
  std::uint64_t os_allocations = 0;   // buffers obtained from the OS (aligned_alloc)
  std::uint64_t cache_hits = 0;       // requests served from the cache
  std::uint64_t bytes_in_use = 0;     // bytes handed out and not yet returned (buffers over 512 bytes)
  std::uint64_t bytes_cached = 0;     // bytes held in the cache, free for reuse
  std::uint64_t peak_bytes_in_use = 0;
};

namespace allocator {
void* allocate(std::size_t nbytes);
void deallocate(void* p, std::size_t nbytes) noexcept;
AllocatorStats stats();
void empty_cache();  // returns every cached buffer to the OS
}  // namespace allocator

class Storage {
 public:
  explicit Storage(std::size_t nbytes);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return data_; }
  std::size_t nbytes() const { return nbytes_; }
  // Bumped by every in-place write; autograd compares it against the version saved for
  // backward to catch a tensor modified after an op saved it (see Note [version counter]).
  std::uint32_t version() const { return version_; }
  void bump_version() { ++version_; }

 private:
  void* data_;
  std::size_t nbytes_;
  std::uint32_t version_ = 0;
};

}  // namespace chaingrad
