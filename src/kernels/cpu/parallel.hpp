#pragma once
// chaingrad's one thread pool. Kernels that split work across cores (the matrix products) go
// through parallel_for; the BLAS libraries underneath run single-threaded, so there is exactly one
// threading model and no pool of one library spinning against another's.
#include <algorithm>
#include <cstdint>
#include <functional>

namespace chaingrad::kernels {

// Threads a parallel_for may use, the calling thread included. Defaults to the CPUs this process
// may run on (its affinity mask); CHAINGRAD_NUM_THREADS overrides the default.
int num_threads();

// Resizes the pool. Must not be called from inside a parallel_for.
void set_num_threads(int n);

// Runs fn(i) once for every i in [0, tasks), on up to num_threads() threads; the caller runs tasks
// too, and the call returns when all are done. When the pool is busy (a call from inside fn, or
// from a second user thread at the same moment) the tasks run inline on the caller: results never
// depend on which thread ran a task, only on how the work was cut, which the caller decides.
// Exceptions thrown by fn are rethrown on the caller (the first one; the remaining tasks still run).
void parallel_for(int tasks, const std::function<void(int)>& fn);

// Below this many elements an elementwise loop stays on one thread: waking a worker costs about as
// much as 64k elements of a memory-bound loop.
inline constexpr std::int64_t kParallelElements = std::int64_t{1} << 16;

// body(lo, hi) over [0, units), cut into one range of units per thread when the work touches at
// least kParallelElements elements (and into one range, on the caller, below that).
template <class Body>
void parallel_units(std::int64_t units, std::int64_t elements, Body&& body) {
  const int parts = elements < kParallelElements ? 1 : static_cast<int>(std::min<std::int64_t>(num_threads(), units));
  if (parts <= 1) {
    if (units > 0) body(std::int64_t{0}, units);
    return;
  }
  parallel_for(parts, [&](int p) {
    const std::int64_t lo = units * p / parts, hi = units * (p + 1) / parts;
    if (lo < hi) body(lo, hi);
  });
}

// body(lo, hi) over [0, n), cut into one range per thread when n >= kParallelElements. Cuts fall
// on multiples of 16 elements, so no two threads write one cache line of a float32 output.
template <class Body>
void parallel_range(std::int64_t n, Body&& body) {
  parallel_units((n + 15) / 16, n, [&](std::int64_t lo, std::int64_t hi) { body(lo * 16, std::min(n, hi * 16)); });
}

}  // namespace chaingrad::kernels
