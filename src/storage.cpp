#include "chaingrad/storage.hpp"

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
  AllocatorStats stats;
  ~Cache() {
    for (auto& [size, list] : free)
      for (void* p : list) std::free(p);
  }
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: tensors may outlive static destruction order
  return *c;
}

}  // namespace

namespace allocator {

void* allocate(std::size_t nbytes) {
  const std::size_t cls = size_class(std::max<std::size_t>(nbytes, 1));
  Cache& c = cache();
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
  void* p = std::aligned_alloc(kAlignment, cls);
  if (!p) throw std::bad_alloc();
  std::lock_guard lock(c.mu);
  c.stats.os_allocations++;
  c.stats.bytes_in_use += cls;
  c.stats.peak_bytes_in_use = std::max(c.stats.peak_bytes_in_use, c.stats.bytes_in_use);
  return p;
}

void deallocate(void* p, std::size_t nbytes) noexcept {
  if (!p) return;
  const std::size_t cls = size_class(std::max<std::size_t>(nbytes, 1));
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
  return c.stats;
}

void empty_cache() {
  Cache& c = cache();
  std::lock_guard lock(c.mu);
  for (auto& [size, list] : c.free)
    for (void* p : list) std::free(p);
  c.free.clear();
  c.stats.bytes_cached = 0;
}

}  // namespace allocator

Storage::Storage(std::size_t nbytes) : data_(allocator::allocate(nbytes)), nbytes_(nbytes) {}
Storage::~Storage() { allocator::deallocate(data_, nbytes_); }

}  // namespace chaingrad
