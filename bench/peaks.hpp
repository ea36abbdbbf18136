#pragma once
// The machine's ceilings, measured in the same run as the benchmarks that are compared with them
// (the machine drifts, so a peak from another run would not do): the fp32 FMA peak for
// compute-bound kernels and the memcpy bandwidth for memory-bound ones.
#include <benchmark/benchmark.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <vector>

#include "kernels/cpu/parallel.hpp"

namespace bench {

// 24 independent FMA chains: enough to cover the FMA latency on both ports.
__attribute__((target("avx512f"))) inline float fma_loop_avx512(long iters) {
  __m512 acc[24];
  for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_ps(1.0f + static_cast<float>(i) * 1e-3f);
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 24  // keeps the accumulators in registers
    for (int i = 0; i < 24; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  }
  __m512 s = acc[0];
  for (int i = 1; i < 24; ++i) s = _mm512_add_ps(s, acc[i]);
  float out[16];
  _mm512_storeu_ps(out, s);
  return out[0] + out[15];
}

__attribute__((target("avx2,fma"))) inline float fma_loop_avx2(long iters) {
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(1.0f + static_cast<float>(i) * 1e-3f);
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  }
  float out[8];
  __m256 s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, acc[i]);
  _mm256_storeu_ps(out, s);
  return out[0] + out[7];
}

// fp32 FLOP/s of FMA chains on every thread of chaingrad's pool at once (kernels::num_threads()
// when first asked): best of 5 runs of ~50 ms.
inline double fma_peak_gflops() {
  static const double peak = [] {
    namespace kc = chaingrad::kernels;
    const bool avx512 = __builtin_cpu_supports("avx512f");
    const long iters = 2'000'000;
    const double flops_per_thread = static_cast<double>(iters) * (avx512 ? 24 * 16 * 2 : 12 * 8 * 2);
    const int threads = kc::num_threads();
    std::atomic<float> sink{0};
    double best = 0;
    for (int r = 0; r < 5; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      kc::parallel_for(threads, [&](int) { sink = sink + (avx512 ? fma_loop_avx512(iters) : fma_loop_avx2(iters)); });
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::max(best, flops_per_thread * threads / s / 1e9);
    }
    benchmark::DoNotOptimize(sink.load());
    return best;
  }();
  return peak;
}

// Bytes moved per second (read + write) by memcpy on the calling thread, for a kernel whose
// operands take `footprint` bytes in all: best of 5 runs of at least ~20 ms each.
inline double copy_bandwidth_gbs(std::size_t footprint) {
  static std::map<std::size_t, double> cache;
  if (auto it = cache.find(footprint); it != cache.end()) return it->second;
  const std::size_t half = std::max<std::size_t>(footprint / 2, 4096);
  std::vector<char> src(half, 1), dst(half, 0);
  const int reps = static_cast<int>(std::max<std::size_t>(1, (std::size_t{64} << 20) / half));
  double best = 0;
  for (int r = 0; r < 5; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) {
      std::memcpy(dst.data(), src.data(), half);
      benchmark::ClobberMemory();
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * static_cast<double>(half) * reps / s / 1e9);
  }
  benchmark::DoNotOptimize(dst.data());
  return cache[footprint] = best;
}

}  // namespace bench
