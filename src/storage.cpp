#include "chaingrad/storage.hpp"

#include <sys/mman.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

#include "chaingrad/error.hpp"

namespace chaingrad {
namespace {

constexpr std::size_t kAlignment = 64;
// Requests are rounded to size classes so that slightly different sizes share buffers; small
// ones to 64 bytes, larger ones to 1/8 of their power of two (at most 12.5% waste).
std::size_t size_class(std::size_t n) {
  if (n <= 512) return (n + 63) & ~std::size_t{63};
  std::size_t p = 1;
  while (p < n) p <<= 1;
  const std::size_t step = p >> 3;
  return (n + step - 1) / step * step;
}

struct Cache {
  std::mutex mu;
  std::unordered_map<std::size_t, std::vector<void*>> free;
  AllocatorStats stats;  // guarded by mu, except the small-buffer counters below
  std::atomic<std::uint64_t> small_hits{0}, small_os{0};
  ~Cache() {
    for (auto& [size, list] : free)
      for (void* p : list) std::free(p);
  }
};

// Buffers of 4 MiB and more start on a 2 MiB boundary and are advised for transparent huge pages
// (this machine's kernel gives them only on request: THP "madvise"). The training set is one such
// buffer, and each step gathers rows from all over it: on 4 KiB pages nearly every row also missed
// the TLB. Fashion-MNIST's 47 MB of bytes, batch 256 on two threads (/tmp harness timing each
// phase, 7 interleaved runs): the gather 51 -> 39 us a step, the whole step 3% shorter (paired).
// A smaller buffer is not worth its rounding up to whole 2 MiB pages.
constexpr std::size_t kHugePage = std::size_t{2} << 20, kHugeMin = 2 * kHugePage;

void* os_allocate(std::size_t cls) {
  if (cls < kHugeMin) {
    void* p = std::aligned_alloc(kAlignment, cls);
    if (!p) throw std::bad_alloc();
    return p;
  }
  const std::size_t rounded = (cls + kHugePage - 1) / kHugePage * kHugePage;
  void* p = std::aligned_alloc(kHugePage, rounded);
  if (!p) throw std::bad_alloc();
  // (Advice only: without huge pages, as in a container that forbids them, nothing changes.)
  ::madvise(p, rounded, MADV_HUGEPAGE);
  return p;
}

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: tensors may outlive static destruction order
  return *c;
}

// Buffers of at most 512 bytes (scalars, biases of small layers) are recycled through per-thread
// lists without a lock: the scalar workload allocates a few of them per op.
constexpr std::size_t kSmallMax = 512;
thread_local bool small_cache_dead = false;  // set at thread exit: then buffers go to free()
struct SmallCache {
  std::vector<void*> lists[kSmallMax / 64 + 1];
  ~SmallCache() {
    small_cache_dead = true;
    for (auto& l : lists)
      for (void* p : l) std::free(p);
  }
};
SmallCache& small_cache() {
  static thread_local SmallCache c;
  return c;
}

// Per-thread free lists of fixed-size object blocks (allocator::allocate_object, inline in
// storage.hpp), one list per 16-byte size class. A list holds at most kListCap blocks, so a thread
// that only frees what others allocate does not hoard memory. A reaper, registered the first time
// a thread's list is empty (first allocation, or first free into an empty list), returns the
// blocks at thread exit; after that (tensors destroyed during static destruction, say) blocks go
// straight to operator new/delete.
struct ObjectCacheReaper {
  bool armed = false;
  ~ObjectCacheReaper() {
    allocator::pool::Cache& c = allocator::pool::cache;
    c.dead = true;
    c.armed = false;
    for (std::size_t i = 0; i < allocator::pool::kClasses; ++i) {
      while (allocator::pool::FreeBlock* b = c.head[i]) {
        c.head[i] = b->next;
        ::operator delete(b);
      }
      c.count[i] = 0;
    }
  }
};
thread_local ObjectCacheReaper object_cache_reaper;

}  // namespace

namespace allocator {

void* allocate(std::size_t nbytes) {
  const std::size_t cls = size_class(std::max<std::size_t>(nbytes, 1));
  Cache& c = cache();
  if (cls <= kSmallMax) {
    if (!small_cache_dead) {
      auto& list = small_cache().lists[cls / 64];
      if (!list.empty()) {
        void* p = list.back();
        list.pop_back();
        c.small_hits.fetch_add(1, std::memory_order_relaxed);
        return p;
      }
    }
    void* p = std::aligned_alloc(kAlignment, cls);
    if (!p) throw std::bad_alloc();
    c.small_os.fetch_add(1, std::memory_order_relaxed);
    return p;
  }
  {
    std::lock_guard lock(c.mu);
    auto it = c.free.find(cls);
    if (it != c.free.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      c.stats.cache_hits++;
      c.stats.bytes_cached -= cls;
      c.stats.bytes_in_use += cls;
      c.stats.peak_bytes_in_use = std::max(c.stats.peak_bytes_in_use, c.stats.bytes_in_use);
      return p;
    }
  }
  void* p = os_allocate(cls);
  std::lock_guard lock(c.mu);
  c.stats.os_allocations++;
  c.stats.bytes_in_use += cls;
  c.stats.peak_bytes_in_use = std::max(c.stats.peak_bytes_in_use, c.stats.bytes_in_use);
  return p;
}

void deallocate(void* p, std::size_t nbytes) noexcept {
  if (!p) return;
  const std::size_t cls = size_class(std::max<std::size_t>(nbytes, 1));
  if (cls <= kSmallMax) {
    if (small_cache_dead) return std::free(p);
    try {
      small_cache().lists[cls / 64].push_back(p);
    } catch (...) {
      std::free(p);
    }
    return;
  }
  Cache& c = cache();
  std::lock_guard lock(c.mu);
  c.stats.bytes_in_use -= cls;
  c.stats.bytes_cached += cls;
  try {
    c.free[cls].push_back(p);
  } catch (...) {
    c.stats.bytes_cached -= cls;
    std::free(p);
  }
}

AllocatorStats stats() {
  Cache& c = cache();
  std::lock_guard lock(c.mu);
  AllocatorStats s = c.stats;
  s.cache_hits += c.small_hits.load(std::memory_order_relaxed);
  s.os_allocations += c.small_os.load(std::memory_order_relaxed);
  return s;
}

void empty_cache() {
  Cache& c = cache();
  std::lock_guard lock(c.mu);
  for (auto& [size, list] : c.free)
    for (void* p : list) std::free(p);
  c.free.clear();
  c.stats.bytes_cached = 0;
}

namespace pool {
thread_local constinit Cache cache{};

namespace {
void arm() {
  object_cache_reaper.armed = true;  // first touch of the thread_local registers the reaper
  cache.armed = true;
}
}  // namespace

void* allocate_slow(std::size_t cls) {
  if (!cache.dead) arm();
  return ::operator new((cls + 1) * kGranule);
}

void deallocate_slow(void* p, std::size_t cls) noexcept {
  if (!p) return;
  Cache& c = cache;
  if (c.dead || c.count[cls] >= kListCap) return ::operator delete(p);
  arm();  // a thread that only frees needs it too
  auto* b = static_cast<FreeBlock*>(p);
  b->next = c.head[cls];
  c.head[cls] = b;
  ++c.count[cls];
}
}  // namespace pool

}  // namespace allocator

StoragePtr Storage::make(std::size_t nbytes) {
  void* block = allocator::allocate_object(sizeof(Storage));
  try {
    return StoragePtr::adopt(new (block) Storage(nbytes, block, sizeof(Storage)));
  } catch (...) {
    allocator::deallocate_object(block, sizeof(Storage));
    throw;
  }
}

}  // namespace chaingrad
