// The matrix products of the MLP step, on chaingrad's path (oneDNN sgemm split across the pool)
// and on OpenBLAS with its own threads (what PyTorch calls), next to the machine's fp32 FMA peak
// measured in the same run. Counters: GFLOP/s, and peak% = GFLOP/s over the peak for as many
// threads as the products use (CHAINGRAD_NUM_THREADS / --threads; all cores by default).
#include <benchmark/benchmark.h>
#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <vector>

#include "chaingrad/chaingrad.hpp"
#include "peaks.hpp"
#include "kernels/cpu/gemm.hpp"
#include "kernels/cpu/parallel.hpp"

namespace cg = chaingrad;
namespace kc = chaingrad::kernels;

extern "C" void openblas_set_num_threads(int);

namespace {

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
  const double peak = bench::fma_peak_gflops();  // measured before the clock starts
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) step();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double gflops = flops * static_cast<double>(state.iterations()) / s / 1e9;
  state.counters["GFLOP/s"] = gflops;
  state.counters["peak%"] = 100 * gflops / peak;
}

void BM_FmaPeak(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(bench::fma_peak_gflops());
  state.counters["GFLOP/s"] = bench::fma_peak_gflops();
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
