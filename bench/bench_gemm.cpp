// The matrix products of the MLP step, on chaingrad's path (kernels::gemm<float>: oneDNN sgemm split
// across the pool, or with CHAINGRAD_SGEMM=own chaingrad's own AVX-512 kernel for some shapes), on
// the oneDNN path alone, on the own kernel alone (sgemm_avx512.cpp), and on OpenBLAS with its own
// threads (what PyTorch calls), next to the machine's fp32 FMA peak
// measured in the same run. Counters: GFLOP/s, and peak% = GFLOP/s over the peak for as many
// threads as the products use (CHAINGRAD_NUM_THREADS / --threads; all cores by default).
// BM_MlpStepProducts measures the same products inside real training steps.
#include <benchmark/benchmark.h>
#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <string>
#include <vector>

#include "chaingrad/chaingrad.hpp"
#include "peaks.hpp"
#include "kernels/cpu/gemm.hpp"
#include "kernels/cpu/parallel.hpp"
#include "kernels/cpu/sgemm_avx512.hpp"

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
  // One untimed pass: oneDNN's JIT code generation (warm_up_gemm) and the first touch of the
  // operands would otherwise fall on whichever benchmark runs first.
  kc::warm_up_gemm();
  step();
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

using FloatGemm = void (*)(bool, bool, std::int64_t, std::int64_t, std::int64_t, float, const float*, std::int64_t,
                          const float*, std::int64_t, float, float*, std::int64_t);

void chaingrad_gemm(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a,
                    std::int64_t lda, const float* b, std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
  kc::gemm<float>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void run_products(benchmark::State& state, const std::vector<Product>& ps, FloatGemm f) {
  Operands o(ps);
  run_and_report(state, o.flops, [&] {
    for (std::size_t i = 0; i < ps.size(); ++i) {
      const Product& p = ps[i];
      f(p.ta, p.tb, p.m, p.n, p.k, 1.f, o.a[i].data(), p.ta ? p.m : p.k, o.b[i].data(), p.tb ? p.k : p.n, 0.f,
        o.c[i].data(), p.n);
    }
  });
}

void BM_MlpGemmsChaingrad(benchmark::State& state) { run_products(state, mlp_products(state.range(0)), chaingrad_gemm); }
BENCHMARK(BM_MlpGemmsChaingrad)->Arg(64)->Arg(256)->Arg(1024)->UseRealTime()->MinTime(0.5);

// The oneDNN path of gemm<float>, whatever CHAINGRAD_SGEMM says.
void BM_MlpGemmsOneDnn(benchmark::State& state) { run_products(state, mlp_products(state.range(0)), kc::gemm_onednn); }
BENCHMARK(BM_MlpGemmsOneDnn)->Arg(64)->Arg(256)->Arg(1024)->UseRealTime()->MinTime(0.5);

// The own AVX-512 kernel on every product, whatever gemm<float> picks.
void BM_MlpGemmsOwn(benchmark::State& state) {
  if (!kc::sgemm_avx512_available()) return state.SkipWithError("no AVX-512F on this CPU");
  run_products(state, mlp_products(state.range(0)), kc::sgemm_avx512);
}
BENCHMARK(BM_MlpGemmsOwn)->Arg(64)->Arg(256)->Arg(1024)->UseRealTime()->MinTime(0.5);

// One product of the MLP step at a time: range(0) = batch, range(1) = index in mlp_products,
// range(2) = 0 for the own kernel, 1 for oneDNN, 2 for gemm<float> as chaingrad runs it (oneDNN,
// or the thin kernels of sgemm_thin.cpp for the last layer's three products).
void BM_MlpProduct(benchmark::State& state) {
  const auto all = mlp_products(state.range(0));
  const Product p = all[static_cast<std::size_t>(state.range(1))];
  const int path = static_cast<int>(state.range(2));
  if (path == 0 && !kc::sgemm_avx512_available()) return state.SkipWithError("no AVX-512F on this CPU");
  const char* names[] = {" own", " onednn", " chaingrad"};
  const FloatGemm fns[] = {kc::sgemm_avx512, kc::gemm_onednn, chaingrad_gemm};
  state.SetLabel(std::string(p.ta ? "T" : "N") + (p.tb ? "T" : "N") + " " + std::to_string(p.m) + "x" +
                 std::to_string(p.n) + "x" + std::to_string(p.k) + names[path]);
  run_products(state, {p}, fns[path]);
}
BENCHMARK(BM_MlpProduct)
    ->ArgsProduct({{64, 256, 1024}, {0, 1, 2, 3, 4, 5, 6, 7}, {0, 1, 2}})
    ->UseRealTime()
    ->MinTime(0.2);

// The products inside real training steps of the MLP (nn::Sequential, cross_entropy, SGD), as
// `chaingrad train` runs them: each step gathers a shuffled batch out of 60,000 rows, as the
// DataLoader does, so the operands are where a step leaves them rather than hot in a loop of their
// own. gemm<T>'s profile gives the products' wall time; counters: their GFLOP/s, peak%, and
// products% = their share of the step's time.
void BM_MlpStepProducts(benchmark::State& state) {
  const std::int64_t B = state.range(0), rows = 60000;
  cg::Generator gen(7);
  cg::nn::Sequential net{cg::nn::Linear(784, 256, true, &gen), cg::nn::ReLU(), cg::nn::Linear(256, 256, true, &gen),
                         cg::nn::ReLU(), cg::nn::Linear(256, 10, true, &gen)};
  cg::optim::SGD opt(net.parameters(), {.lr = 0.01});
  const cg::Tensor data = cg::rand({rows, 784}, {}, &gen), labels = cg::randint(0, 10, {rows}, &gen);
  const cg::Tensor order = cg::randperm(rows, &gen);
  std::int64_t next = 0;
  auto step = [&] {
    if (next + B > rows) next = 0;
    const cg::Tensor idx = order.slice(0, next, next + B);
    next += B;
    const cg::Tensor x = cg::index_select(data, 0, idx), y = cg::index_select(labels, 0, idx);
    opt.zero_grad();
    cg::cross_entropy(net.forward(x), y).backward();
    opt.step();
  };
  const double peak = bench::fma_peak_gflops();
  kc::warm_up_gemm();
  for (int i = 0; i < 3; ++i) step();
  kc::set_gemm_profiling(true);
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) step();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const kc::GemmProfile prof = kc::gemm_profile();
  kc::set_gemm_profiling(false);
  const double gflops = prof.flops / prof.seconds / 1e9;
  state.counters["GFLOP/s"] = gflops;
  state.counters["peak%"] = 100 * gflops / peak;
  state.counters["products%"] = 100 * prof.seconds / s;
  state.counters["products/step"] = static_cast<double>(prof.calls) / static_cast<double>(state.iterations());
}
BENCHMARK(BM_MlpStepProducts)->Arg(64)->Arg(256)->Arg(1024)->UseRealTime()->MinTime(1.0);

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
