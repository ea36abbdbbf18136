// The matrix products of the MLP step, on chaingrad's path (oneDNN sgemm split across the pool)
// and on OpenBLAS with its own threads (what PyTorch calls), next to the machine's fp32 FMA peak
// measured in the same run. Counters: GFLOP/s, and peak% = GFLOP/s over the peak for as many
// threads as the products use (CHAINGRAD_NUM_THREADS / --threads; all cores by default).
#include <benchmark/benchmark.h>
#include <cblas.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <vector>

#include "chaingrad/chaingrad.hpp"
#include "kernels/cpu/gemm.hpp"
#include "kernels/cpu/parallel.hpp"

namespace cg = chaingrad;
namespace kc = chaingrad::kernels;

extern "C" void openblas_set_num_threads(int);

namespace {

// 24 independent FMA chains: enough to cover the FMA latency on both ports.
__attribute__((target("avx512f"))) float fma_loop_avx512(long iters) {
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

__attribute__((target("avx2,fma"))) float fma_loop_avx2(long iters) {
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

// fp32 FLOP/s of FMA chains on every thread of the pool at once: best of 5 runs of ~50 ms.
double fma_peak_gflops() {
  static const double peak = [] {
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

struct Product {
  bool ta, tb;
  std::int64_t m, n, k;
};

// One SGD step of the 784-256-256-10 MLP at batch B, torch layout (X [B,in], W [out,in]):
// forward X W^T for 3 layers, dW = G^T X for 3 layers, dX = G W for layers 2 and 3.
std::vector<Product> mlp_products(std::int64_t B) {
  const std::int64_t in[] = {784, 256, 256}, out[] = {256, 256, 10};
  std::vector<Product> p;
  for (int l = 0; l < 3; ++l) {
    p.push_back({false, true, B, out[l], in[l]});
    p.push_back({true, false, out[l], in[l], B});
    if (l > 0) p.push_back({false, false, B, in[l], out[l]});
  }
  return p;
}

struct Operands {
  std::vector<std::vector<float>> a, b, c;
  double flops = 0;
  explicit Operands(const std::vector<Product>& ps) {
    for (const Product& p : ps) {
      a.emplace_back(static_cast<std::size_t>(p.m * p.k), 0.01f);
      b.emplace_back(static_cast<std::size_t>(p.k * p.n), 0.02f);
      c.emplace_back(static_cast<std::size_t>(p.m * p.n), 0.0f);
      flops += 2.0 * static_cast<double>(p.m * p.n * p.k);
    }
  }
};

// Times the loop itself (wall clock, as the counters need the rate of all threads together).
template <class F>
void run_and_report(benchmark::State& state, double flops, F&& step) {
  const double peak = fma_peak_gflops();  // measured before the clock starts
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) step();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double gflops = flops * static_cast<double>(state.iterations()) / s / 1e9;
  state.counters["GFLOP/s"] = gflops;
  state.counters["peak%"] = 100 * gflops / peak;
}

void BM_FmaPeak(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(fma_peak_gflops());
  state.counters["GFLOP/s"] = fma_peak_gflops();
  state.counters["threads"] = kc::num_threads();
}
BENCHMARK(BM_FmaPeak)->Iterations(1);

void BM_MlpGemmsChaingrad(benchmark::State& state) {
  const auto ps = mlp_products(state.range(0));
  Operands o(ps);
  run_and_report(state, o.flops, [&] {
    for (std::size_t i = 0; i < ps.size(); ++i) {
      const Product& p = ps[i];
      kc::gemm<float>(p.ta, p.tb, p.m, p.n, p.k, 1.f, o.a[i].data(), p.ta ? p.m : p.k, o.b[i].data(),
                      p.tb ? p.k : p.n, 0.f, o.c[i].data(), p.n);
    }
  });
}
BENCHMARK(BM_MlpGemmsChaingrad)->Arg(64)->Arg(256)->Arg(1024)->UseRealTime()->MinTime(0.5);

void BM_MlpGemmsOpenBlas(benchmark::State& state) {
  const auto ps = mlp_products(state.range(0));
  Operands o(ps);
  openblas_set_num_threads(kc::num_threads());
  run_and_report(state, o.flops, [&] {
    for (std::size_t i = 0; i < ps.size(); ++i) {
      const Product& p = ps[i];
      cblas_sgemm(CblasRowMajor, p.ta ? CblasTrans : CblasNoTrans, p.tb ? CblasTrans : CblasNoTrans,
                  static_cast<int>(p.m), static_cast<int>(p.n), static_cast<int>(p.k), 1.f, o.a[i].data(),
                  static_cast<int>(p.ta ? p.m : p.k), o.b[i].data(), static_cast<int>(p.tb ? p.k : p.n), 0.f,
                  o.c[i].data(), static_cast<int>(p.n));
    }
  });
  openblas_set_num_threads(1);  // chaingrad's float64 path expects it single-threaded
}
BENCHMARK(BM_MlpGemmsOpenBlas)->Arg(64)->Arg(256)->Arg(1024)->UseRealTime()->MinTime(0.5);

}  // namespace

BENCHMARK_MAIN();
