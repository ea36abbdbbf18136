// The CPU kernels under the ops: the matrix product (oneDNN / OpenBLAS, split across the thread
// pool) against a plain triple loop, and the thread pool itself.
#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include "chaingrad/error.hpp"
#include "chaingrad/ops.hpp"
#include "chaingrad/tensor.hpp"
#include "kernels/cpu/bytes.hpp"
#include "kernels/cpu/gemm.hpp"
#include "kernels/cpu/parallel.hpp"
#include "kernels/cpu/sgemm_thin.hpp"
#include "kernels/cpu/vector_math.hpp"

namespace cg = chaingrad;
namespace kc = chaingrad::kernels;

namespace {

// Restores the thread count a test changed.
struct ThreadCount {
  int saved = kc::num_threads();
  ~ThreadCount() { kc::set_num_threads(saved); }
};

template <class T>
std::vector<T> pattern(std::int64_t n, int seed) {
  std::vector<T> v(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = T(((i * 7919 + seed * 104729) % 2001) - 1000) / T(997);
  return v;
}

struct GemmCase {
  bool ta, tb;
  std::int64_t m, n, k;
  double alpha, beta;
};

using FloatProduct = void (*)(bool, bool, std::int64_t, std::int64_t, std::int64_t, float, const float*, std::int64_t,
                             const float*, std::int64_t, float, float*, std::int64_t);

// C = alpha op(A) op(B) + beta C with padded leading dimensions, checked against a double loop.
// `product` defaults to kernels::gemm<T>.
template <class T>
void check_gemm(const GemmCase& g, double tol, FloatProduct product = nullptr) {
  const std::int64_t a_rows = g.ta ? g.k : g.m, a_cols = g.ta ? g.m : g.k;
  const std::int64_t b_rows = g.tb ? g.n : g.k, b_cols = g.tb ? g.k : g.n;
  const std::int64_t lda = a_cols + 3, ldb = b_cols + 5, ldc = g.n + 2;
  const auto a = pattern<T>(a_rows * lda, 1), b = pattern<T>(b_rows * ldb, 2);
  auto c = pattern<T>(g.m * ldc, 3);
  const auto c0 = c;
  if constexpr (std::is_same_v<T, float>) {
    if (product) product(g.ta, g.tb, g.m, g.n, g.k, T(g.alpha), a.data(), lda, b.data(), ldb, T(g.beta), c.data(), ldc);
  }
  if (!product) kc::gemm<T>(g.ta, g.tb, g.m, g.n, g.k, T(g.alpha), a.data(), lda, b.data(), ldb, T(g.beta), c.data(), ldc);
  for (std::int64_t i = 0; i < g.m; ++i) {
    for (std::int64_t j = 0; j < ldc; ++j) {
      const double got = c[static_cast<std::size_t>(i * ldc + j)];
      if (j >= g.n) {  // padding past n must be left alone
        ASSERT_EQ(got, c0[static_cast<std::size_t>(i * ldc + j)]) << "padding written at " << i << "," << j;
        continue;
      }
      double want = 0, scale = 0;
      for (std::int64_t p = 0; p < g.k; ++p) {
        const double x = a[static_cast<std::size_t>(g.ta ? p * lda + i : i * lda + p)];
        const double y = b[static_cast<std::size_t>(g.tb ? j * ldb + p : p * ldb + j)];
        want += x * y;
        scale += std::abs(x * y);
      }
      want = g.alpha * want + (g.beta == 0 ? 0.0 : g.beta * c0[static_cast<std::size_t>(i * ldc + j)]);
      ASSERT_NEAR(got, want, tol * (1 + std::abs(g.alpha) * scale))
          << "C[" << i << "," << j << "] for m=" << g.m << " n=" << g.n << " k=" << g.k << " ta=" << g.ta
          << " tb=" << g.tb;
    }
  }
}

const std::vector<GemmCase>& gemm_cases() {
  static const std::vector<GemmCase> cases = [] {
    std::vector<GemmCase> v;
    // Small (serial), tall (split by rows), wide (split by columns, not a multiple of 16), thin k;
    // a few logits (n = 10: the thin kernels for A B^T, and for A^T B and A B in the transposes).
    const std::int64_t shapes[][3] = {{3, 5, 7},    {1, 1, 1},      {257, 33, 129}, {31, 517, 65},
                                      {64, 784, 9}, {300, 300, 1},  {1030, 10, 257}, {10, 1030, 257},
                                      {258, 300, 10}};
    for (const auto& s : shapes)
      for (bool ta : {false, true})
        for (bool tb : {false, true}) v.push_back({ta, tb, s[0], s[1], s[2], 1.0, 0.0});
    v.push_back({false, true, 129, 200, 70, -0.5, 1.0});
    v.push_back({true, false, 200, 129, 70, 2.0, 0.25});
    v.push_back({false, true, 130, 10, 70, -0.5, 1.0});
    v.push_back({true, false, 10, 130, 70, 2.0, 0.25});
    v.push_back({false, false, 130, 77, 10, 1.5, -1.0});
    return v;
  }();
  return cases;
}

}  // namespace

TEST(Gemm, Float32MatchesTripleLoopForEveryLayoutAndThreadCount) {
  ThreadCount restore;
  for (int threads : {1, 2, 3}) {
    kc::set_num_threads(threads);
    for (const auto& g : gemm_cases()) check_gemm<float>(g, 1e-5);
  }
}

TEST(Gemm, Float64MatchesTripleLoopForEveryLayoutAndThreadCount) {
  ThreadCount restore;
  for (int threads : {1, 2, 3}) {
    kc::set_num_threads(threads);
    for (const auto& g : gemm_cases()) check_gemm<double>(g, 1e-12);
  }
}

// The thin kernels on their own, over every register block and tail they have: each short side
// from 1 to 16, rows and columns that leave every remainder, k below, at and past a vector.
TEST(Gemm, ThinKernelsMatchTripleLoopForEveryBlockAndTail) {
  if (!kc::sgemm_thin_applies(false, true, 4, 4, 4)) GTEST_SKIP() << "no AVX-512F on this CPU";
  for (std::int64_t s = 1; s <= kc::kThinMax; ++s)
    for (const std::int64_t l : {1, 5, 7, 13, 67})
      for (const std::int64_t k : {1, 15, 16, 17, 40}) {
        check_gemm<float>({false, true, l, s, k, 1.0, 0.0}, 1e-5, kc::sgemm_thin);   // A B^T, n short
        check_gemm<float>({true, false, s, l + 64, k, -0.5, 1.0}, 1e-5, kc::sgemm_thin);  // A^T B, m short
      }
  for (std::int64_t k = 1; k <= kc::kThinMax; ++k)
    for (const std::int64_t m : {1, 5, 6, 7, 13})
      for (const std::int64_t n : {1, 16, 17, 64, 65, 150})
        check_gemm<float>({false, false, m, n, k, 2.0, 0.5}, 1e-5, kc::sgemm_thin);  // A B, k short
  EXPECT_FALSE(kc::sgemm_thin_applies(true, true, 4, 4, 4));
  EXPECT_FALSE(kc::sgemm_thin_applies(false, true, 4, kc::kThinMax + 1, 4));
}

TEST(Gemm, ThinKernelsWithBetaZeroOverwriteNan) {
  if (!kc::sgemm_thin_applies(false, true, 4, 4, 4)) GTEST_SKIP() << "no AVX-512F on this CPU";
  const std::vector<float> a(6 * 20, 0.5f), b(20 * 6, 0.25f);
  for (const auto& [ta, tb, m, n, k] : {std::tuple{false, true, 6, 3, 20}, std::tuple{true, false, 3, 6, 20},
                                        std::tuple{false, false, 6, 6, 3}}) {
    std::vector<float> c(static_cast<std::size_t>(m * n), NAN);
    kc::sgemm_thin(ta, tb, m, n, k, 1.f, a.data(), ta ? m : k, b.data(), tb ? k : n, 0.f, c.data(), n);
    for (const float x : c) EXPECT_FLOAT_EQ(x, 0.125f * static_cast<float>(k)) << "ta=" << ta << " tb=" << tb;
  }
}

// bmm hands small products to the threads whole, a range of the batch each (gemm_batched). Each
// product must match mm on that batch's matrices bit for bit, on any thread count, whatever the
// layout: contiguous, transposed, a batch broadcast with stride 0, a layout the BLAS cannot read.
TEST(Gemm, BmmMatchesMmOnEveryBatchForEveryLayoutAndThreadCount) {
  ThreadCount restore;
  for (const cg::DType dt : {cg::DType::Float32, cg::DType::Float64}) {
    const cg::TensorOptions o{.dtype = dt};
    const std::int64_t B = 37, m = 24, k = 33, n = 20;  // 32 kflop a product, 1.2 Mflop in all
    const cg::Tensor a = cg::randn({B, m, k}, o), at = cg::randn({B, k, m}, o).transpose(1, 2);
    const cg::Tensor b = cg::randn({B, k, n}, o), bt = cg::randn({B, n, k}, o).transpose(1, 2);
    const cg::Tensor b_one = cg::randn({1, k, n}, o).expand({B, k, n});
    const cg::Tensor a_odd = cg::randn({B, m, 2 * k}, o).slice(2, 0, 2 * k, 2);  // column stride 2
    for (const auto& [x, y] : {std::pair{a, b}, {at, b}, {a, bt}, {at, bt}, {a, b_one}, {a_odd, bt}}) {
      std::vector<double> want;
      for (std::int64_t i = 0; i < B; ++i) {
        const std::vector<double> one = cg::mm(x.select(0, i), y.select(0, i)).to_vector<double>();
        want.insert(want.end(), one.begin(), one.end());
      }
      for (int threads : {3, 2, 1}) {
        kc::set_num_threads(threads);
        // A freed block of the output's size, full of NaN, for the allocator to hand back: a product
        // left out must show, not leave the previous call's result in place.
        (void)cg::full({B, m, n}, std::nan(""), o);
        EXPECT_EQ(cg::bmm(x, y).to_vector<double>(), want) << cg::dtype_name(dt) << ", " << threads << " threads";
      }
    }
  }
  // Empty sides and an empty sum.
  EXPECT_EQ(cg::bmm(cg::ones({3, 2, 0}), cg::ones({3, 0, 4})).to_vector<float>(), std::vector<float>(24, 0.f));
  EXPECT_EQ(cg::bmm(cg::ones({0, 2, 3}), cg::ones({0, 3, 4})).numel(), 0);
}

TEST(Gemm, EmptySumScalesCAndBetaZeroOverwritesNan) {
  std::vector<float> c = {1.f, NAN, 3.f, 4.f};
  kc::gemm<float>(false, false, 2, 2, 0, 1.f, nullptr, 1, nullptr, 2, 0.f, c.data(), 2);
  EXPECT_EQ(c, (std::vector<float>{0, 0, 0, 0}));
  std::vector<double> d = {1, 2, 3, 4};
  kc::gemm<double>(false, false, 2, 2, 0, 1.0, nullptr, 1, nullptr, 2, 0.5, d.data(), 2);
  EXPECT_EQ(d, (std::vector<double>{0.5, 1, 1.5, 2}));
}

// The profile counts each product once, with its 2 m n k flops, only while it is on, and switching
// it on starts the totals afresh.
TEST(Gemm, ProfileCountsProductsOnlyWhileOn) {
  std::vector<float> a(37 * 29, 0.5f), b(29 * 41, 0.25f), c(37 * 41);
  auto product = [&] { kc::gemm<float>(false, false, 37, 41, 29, 1.f, a.data(), 29, b.data(), 41, 0.f, c.data(), 41); };
  product();
  kc::set_gemm_profiling(true);
  product();
  std::vector<double> ad(a.begin(), a.end()), bd(b.begin(), b.end()), cd(c.size());
  kc::gemm<double>(false, false, 37, 41, 29, 1.0, ad.data(), 29, bd.data(), 41, 0.0, cd.data(), 41);
  kc::GemmProfile p = kc::gemm_profile();
  EXPECT_EQ(p.calls, 2u);
  EXPECT_EQ(p.flops, 2 * 2.0 * 37 * 41 * 29);
  EXPECT_GT(p.seconds, 0.0);
  kc::set_gemm_profiling(false);
  product();
  EXPECT_EQ(kc::gemm_profile().calls, 2u);
  kc::set_gemm_profiling(true);
  EXPECT_EQ(kc::gemm_profile().calls, 0u);
  EXPECT_EQ(kc::gemm_profile().seconds, 0.0);
  kc::set_gemm_profiling(false);
  EXPECT_FLOAT_EQ(c[0], 29 * 0.125f);
}

TEST(Gemm, ProductsFromTwoUserThreadsAtOnceAreBothRight) {
  // One thread gets the pool, the other runs inline; both must get the full product.
  std::vector<std::thread> users;
  std::atomic<int> failures{0};
  for (int t = 0; t < 2; ++t) {
    users.emplace_back([&] {
      for (int r = 0; r < 20; ++r) {
        const std::int64_t m = 96, n = 160, k = 200;
        const auto a = pattern<float>(m * k, 4), b = pattern<float>(k * n, 5);
        std::vector<float> c(static_cast<std::size_t>(m * n));
        kc::gemm<float>(false, false, m, n, k, 1.f, a.data(), k, b.data(), n, 0.f, c.data(), n);
        double want = 0;
        for (std::int64_t p = 0; p < k; ++p) want += double(a[static_cast<std::size_t>(95 * k + p)]) * b[static_cast<std::size_t>(p * n + 159)];
        if (std::abs(c.back() - want) > 1e-3) ++failures;
      }
    });
  }
  for (auto& u : users) u.join();
  EXPECT_EQ(failures.load(), 0);
}

TEST(ThreadPool, RunsEveryTaskOnceForAnyThreadCount) {
  ThreadCount restore;
  for (int threads : {1, 2, 4}) {
    kc::set_num_threads(threads);
    EXPECT_EQ(kc::num_threads(), threads);
    EXPECT_EQ(cg::get_num_threads(), threads);
    for (int tasks : {0, 1, 2, 7, 100}) {
      std::vector<std::atomic<int>> hits(static_cast<std::size_t>(tasks));
      kc::parallel_for(tasks, [&](int i) { hits[static_cast<std::size_t>(i)]++; });
      for (int i = 0; i < tasks; ++i) EXPECT_EQ(hits[static_cast<std::size_t>(i)].load(), 1) << "task " << i;
    }
  }
}

// More threads than cores: when a job starts, some workers are not running, and the caller may run
// every task itself and return before they wake. A late worker must then skip the job it missed
// (its tasks and their captures are gone) and join the next one. Each job's counters live on the
// caller's stack, so a worker running a stale job would write into a dead frame (ASan reports it).
TEST(ThreadPool, ManyShortJobsWithMoreThreadsThanCores) {
  ThreadCount restore;
  kc::set_num_threads(6);
  int wrong = 0;
  for (int job = 0; job < 20000; ++job) {
    const int tasks = 1 + job % 7;
    std::array<std::atomic<int>, 8> hits{};
    kc::parallel_for(tasks, [&hits, job](int i) { hits[static_cast<std::size_t>(i)] += 1 + job % 3; });
    for (int i = 0; i < 8; ++i) wrong += hits[static_cast<std::size_t>(i)].load() != (i < tasks ? 1 + job % 3 : 0);
  }
  EXPECT_EQ(wrong, 0);
}

TEST(ThreadPool, NestedCallRunsInlineAndCompletes) {
  ThreadCount restore;
  kc::set_num_threads(2);
  std::atomic<int> inner{0};
  kc::parallel_for(4, [&](int) { kc::parallel_for(3, [&](int) { inner++; }); });
  EXPECT_EQ(inner.load(), 12);
}

// A task may run a product big enough to be split: it asks the pool's size (without waiting for
// the pool, which its own parallel_for holds) and runs the blocks inline.
TEST(ThreadPool, ProductInsideATaskRunsInline) {
  ThreadCount restore;
  kc::set_num_threads(2);
  const std::int64_t m = 128, n = 128, k = 128;  // 4 MFLOP: above the split threshold
  const auto a = pattern<float>(m * k, 6), b = pattern<float>(k * n, 7);
  std::vector<std::vector<float>> c(4, std::vector<float>(static_cast<std::size_t>(m * n)));
  kc::parallel_for(4, [&](int t) {
    EXPECT_EQ(kc::num_threads(), 2);
    kc::gemm<float>(false, false, m, n, k, 1.f, a.data(), k, b.data(), n, 0.f, c[static_cast<std::size_t>(t)].data(), n);
  });
  for (int t = 1; t < 4; ++t) EXPECT_EQ(c[static_cast<std::size_t>(t)], c[0]);
  double want = 0;
  for (std::int64_t p = 0; p < k; ++p) want += double(a[static_cast<std::size_t>(p)]) * b[static_cast<std::size_t>(p * n)];
  EXPECT_NEAR(c[0][0], want, 1e-3);
}

TEST(ThreadPool, RethrowsTheTasksExceptionOnTheCaller) {
  ThreadCount restore;
  kc::set_num_threads(2);
  std::atomic<int> ran{0};
  EXPECT_THROW(kc::parallel_for(8,
                                [&](int i) {
                                  ran++;
                                  if (i == 5) throw std::runtime_error("task 5 failed");
                                }),
               std::runtime_error);
  EXPECT_EQ(ran.load(), 8);  // the other tasks still ran
  int after = 0;
  kc::parallel_for(1, [&](int) { after = 1; });  // and the pool still works
  EXPECT_EQ(after, 1);
}

TEST(ThreadPool, ParallelRangeCoversEveryIndexOnceInCacheLineCuts) {
  ThreadCount restore;
  for (int threads : {1, 2, 3}) {
    kc::set_num_threads(threads);
    for (std::int64_t n : {std::int64_t{0}, std::int64_t{5}, kc::kParallelElements - 1, kc::kParallelElements + 7,
                           3 * kc::kParallelElements + 1}) {
      std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
      std::atomic<int> misaligned{0};
      kc::parallel_range(n, [&](std::int64_t lo, std::int64_t hi) {
        if (lo % 16 != 0) ++misaligned;
        for (std::int64_t i = lo; i < hi; ++i) hits[static_cast<std::size_t>(i)]++;
      });
      EXPECT_EQ(misaligned.load(), 0) << "n=" << n;
      for (std::int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[static_cast<std::size_t>(i)].load(), 1) << "n=" << n << " i=" << i;
    }
  }
}

// A large elementwise op is split across threads; every element must come out as on one thread.
TEST(ThreadPool, LargeElementwiseOpsMatchOneThread) {
  ThreadCount restore;
  const std::int64_t n = 3 * kc::kParallelElements + 5;
  cg::Tensor a = cg::randn({n}), b = cg::randn({n});
  kc::set_num_threads(1);
  const auto one = cg::relu(cg::mul(a, b) + a).to_vector<float>();
  kc::set_num_threads(3);
  EXPECT_EQ(cg::relu(cg::mul(a, b) + a).to_vector<float>(), one);
}

// Broadcast and strided operands take the run-by-run walk, which is cut between runs across the
// threads: every element must come out as on one thread and as computed element by element.
TEST(ThreadPool, LargeBroadcastAndStridedOpsMatchOneThreadAndTheElementwiseWalk) {
  ThreadCount restore;
  const cg::Tensor a = cg::randn({300, 257}), row = cg::randn({257}), col = cg::randn({300, 1});
  const cg::Tensor x = cg::randn({7, 100, 97});  // 67,900 elements, permuted below: every run strided
  const cg::Tensor cond = cg::gt(a, cg::scalar(0.0, {}));
  auto ops = [&] {
    return std::vector<cg::Tensor>{cg::add(a, row), cg::mul(col, a), cg::exp(a.t()), x.permute({2, 0, 1}) - 1.0,
                                   cg::where(cond, a, row)};
  };
  kc::set_num_threads(1);
  const std::vector<cg::Tensor> one = ops();
  kc::set_num_threads(3);
  const std::vector<cg::Tensor> three = ops();
  for (std::size_t i = 0; i < one.size(); ++i)
    EXPECT_EQ(three[i].contiguous().to_vector<float>(), one[i].contiguous().to_vector<float>()) << "op " << i;
  const auto sum = three[0].to_vector<float>(), prod = three[1].to_vector<float>(), pick = three[4].to_vector<float>();
  const auto av = a.to_vector<float>(), rv = row.to_vector<float>(), cv = col.to_vector<float>();
  for (std::size_t r = 0; r < 300; ++r) {
    for (std::size_t c = 0; c < 257; ++c) {
      const std::size_t k = r * 257 + c;
      ASSERT_EQ(sum[k], av[k] + rv[c]) << r << "," << c;
      ASSERT_EQ(prod[k], cv[r] * av[k]) << r << "," << c;
      ASSERT_EQ(pick[k], av[k] > 0 ? av[k] : rv[c]) << r << "," << c;
    }
  }
  EXPECT_EQ(cg::add(cg::zeros({0, 257}), row).shape(), (cg::Dims{0, 257}));  // no runs at all
  const auto shifted = three[3].contiguous().to_vector<float>(), xv = x.to_vector<float>();
  for (std::size_t k = 0; k < 97; ++k)
    for (std::size_t i = 0; i < 7; ++i)
      for (std::size_t j = 0; j < 100; ++j)
        ASSERT_EQ(shifted[(k * 7 + i) * 100 + j], xv[(i * 100 + j) * 97 + k] - 1.0f) << k << "," << i << "," << j;
}

// Large sums over one axis are cut by outputs across the threads (by rows, or by columns for a
// bias gradient's one row): each output keeps its order of summation, so every thread count gives
// the same bits, and the sums match double precision.
TEST(ThreadPool, LargeAxisSumsMatchOneThreadAndDoublePrecision) {
  ThreadCount restore;
  const cg::Tensor a = cg::randn({1000, 257}), b = cg::randn({5, 4000, 20});
  auto sums = [&] { return std::vector<cg::Tensor>{cg::sum(a, {0}), cg::sum(a, {1}), cg::sum(b, {1})}; };
  kc::set_num_threads(1);
  const std::vector<cg::Tensor> one = sums();
  kc::set_num_threads(3);
  const std::vector<cg::Tensor> three = sums();
  for (std::size_t i = 0; i < one.size(); ++i)
    EXPECT_EQ(three[i].to_vector<float>(), one[i].to_vector<float>()) << "sum " << i;
  const auto av = a.to_vector<float>(), bv = b.to_vector<float>();
  const auto cols = three[0].to_vector<float>(), rows = three[1].to_vector<float>(), mid = three[2].to_vector<float>();
  for (std::size_t c = 0; c < 257; ++c) {
    double want = 0;
    for (std::size_t r = 0; r < 1000; ++r) want += av[r * 257 + c];
    ASSERT_NEAR(cols[c], want, 1e-4 * 1000) << "column " << c;
  }
  for (std::size_t r = 0; r < 1000; ++r) {
    double want = 0;
    for (std::size_t c = 0; c < 257; ++c) want += av[r * 257 + c];
    ASSERT_NEAR(rows[r], want, 1e-5 * 257) << "row " << r;
  }
  for (std::size_t o = 0; o < 5; ++o)
    for (std::size_t i = 0; i < 20; ++i) {
      double want = 0;
      for (std::size_t r = 0; r < 4000; ++r) want += bv[(o * 4000 + r) * 20 + i];
      ASSERT_NEAR(mid[o * 20 + i], want, 1e-4 * 4000) << o << "," << i;
    }
  // A sum over an empty dimension is zero, with or without columns after it.
  EXPECT_EQ(cg::sum(cg::ones({0, 5}), {0}).to_vector<float>(), std::vector<float>(5, 0.0f));
  EXPECT_EQ(cg::sum(cg::ones({3, 0, 5}), {1}).to_vector<float>(), std::vector<float>(15, 0.0f));
  EXPECT_EQ(cg::sum(cg::ones({4, 0}), {1}).to_vector<float>(), std::vector<float>(4, 0.0f));
}

TEST(ThreadPool, RejectsNonsenseThreadCounts) {
  EXPECT_THROW(kc::set_num_threads(0), cg::ValueError);
  EXPECT_THROW(cg::set_num_threads(-3), cg::ValueError);
}

// The warm-up (oneDNN's kernel generation, ahead of the first product) may run on any thread, at
// the same time as products on others, and leaves them right.
TEST(Gemm, WarmUpFromAnotherThreadWhileProductsRun) {
  std::thread warm([] { kc::warm_up_gemm(); });
  for (const auto& g : gemm_cases()) check_gemm<float>(g, 1e-5);
  warm.join();
  kc::warm_up_gemm();  // a second call does nothing
  for (const auto& g : gemm_cases()) check_gemm<float>(g, 1e-5);
}

// ---------------------------------------------------------------- vector math (libmvec)
namespace {
// Values across the whole float range, the overflow edges and the special values.
std::vector<float> transcendental_inputs() {
  std::vector<float> v = {0.0f, -0.0f, 1e-30f, -1e-30f, 1e-7f, 0.5f, -0.5f, 1.0f, -1.0f, 10.0f, -10.0f,
                          88.0f, 88.8f, -87.0f, -103.0f, -104.0f, 200.0f, -200.0f,
                          std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()};
  for (int i = -4000; i <= 4000; ++i) v.push_back(static_cast<float>(i) * 0.0237f);
  return v;
}
// |got - want| within 4 ulp of want (or of the smallest normal float, near 0).
::testing::AssertionResult close_ulps(float got, double want, float x) {
  const double tol = 4 * std::max<double>(std::abs(want), std::numeric_limits<float>::min()) *
                     std::numeric_limits<float>::epsilon();
  if (std::isinf(want) && got == static_cast<float>(want)) return ::testing::AssertionSuccess();
  if (std::abs(static_cast<double>(got) - want) <= tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "x=" << x << " got " << got << " want " << want;
}
}  // namespace

TEST(VectorMath, MatchesDoublePrecisionWithinFourUlps) {
  const std::vector<float> x = transcendental_inputs();
  const auto n = static_cast<std::int64_t>(x.size());
  std::vector<float> e(x.size()), t(x.size()), s(x.size());
  kc::vexp(x.data(), e.data(), n);
  kc::vtanh(x.data(), t.data(), n);
  kc::vsigmoid(x.data(), s.data(), n);
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double xd = x[i];
    const double want_exp = std::exp(xd);
    // expf overflows to inf above ~88.72 and underflows through the subnormals below ~-87.3.
    if (want_exp > std::numeric_limits<float>::max()) {
      EXPECT_EQ(e[i], std::numeric_limits<float>::infinity()) << "x=" << x[i];
    } else {
      EXPECT_TRUE(close_ulps(e[i], want_exp, x[i]));
    }
    EXPECT_TRUE(close_ulps(t[i], std::tanh(xd), x[i]));
    EXPECT_TRUE(close_ulps(s[i], 1.0 / (1.0 + std::exp(-xd)), x[i]));
  }
  // Every function at every width this CPU has, tails included, against double precision.
  struct Reference {
    kc::VectorFn fn;
    double (*f)(double);
  };
  const Reference refs[] = {{kc::VectorFn::Exp, [](double v) { return std::exp(v); }},
                            {kc::VectorFn::Log, [](double v) { return std::log(v); }},
                            {kc::VectorFn::Tanh, [](double v) { return std::tanh(v); }},
                            {kc::VectorFn::Erf, [](double v) { return std::erf(v); }},
                            {kc::VectorFn::Log1p, [](double v) { return std::log1p(v); }},
                            {kc::VectorFn::Expm1, [](double v) { return std::expm1(v); }}};
  for (const Reference& ref : refs) {
    for (int lanes : {16, 8, 1}) {
      const kc::ArrayFn fn = kc::vector_fn_with_lanes(ref.fn, lanes);
      if (!fn) continue;
      for (std::int64_t len : {n, std::int64_t{13}, std::int64_t{5}}) {
        std::vector<float> got(static_cast<std::size_t>(len));
        fn(x.data() + (n - len), got.data(), len);
        for (std::int64_t i = 0; i < len; ++i) {
          const float xi = x[static_cast<std::size_t>(n - len + i)], gi = got[static_cast<std::size_t>(i)];
          const double want = ref.f(xi);
          if (std::isnan(want)) {
            EXPECT_TRUE(std::isnan(gi)) << "function " << static_cast<int>(ref.fn) << " x=" << xi;
          } else if (std::abs(want) > std::numeric_limits<float>::max()) {
            EXPECT_EQ(gi, static_cast<float>(want)) << "function " << static_cast<int>(ref.fn) << " x=" << xi;
          } else {
            EXPECT_TRUE(close_ulps(gi, want, xi)) << "function " << static_cast<int>(ref.fn) << ", " << lanes << " lanes";
          }
        }
      }
    }
  }
  std::vector<float> sp(x.size());
  kc::vsoftplus(x.data(), sp.data(), n);
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double xd = x[i];
    const double want = std::max(xd, 0.0) + std::log1p(std::exp(-std::abs(xd)));
    EXPECT_TRUE(close_ulps(sp[i], want, x[i]));
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  float out = 0;
  kc::vsigmoid(&nan, &out, 1);
  EXPECT_TRUE(std::isnan(out));
  kc::vexp(&nan, &out, 1);
  EXPECT_TRUE(std::isnan(out));
}

// gelu and its backward at every width, against x Phi(x) in double with Phi from erfc, so that the
// negative tail is checked in relative terms too (the erf form, 1 + erf(x/sqrt 2), cancels there).
TEST(VectorMath, GeluAndItsBackwardMatchDoublePrecisionAtEveryWidth) {
  std::vector<float> x;
  for (int i = -6000; i <= 6000; ++i) x.push_back(static_cast<float>(i) * 0.0021f);  // [-12.6, 12.6]
  for (float v : {1e-30f, -1e-30f, 1e-7f, -1e-7f, 30.0f, -30.0f, 1e4f, -1e4f}) x.push_back(v);
  const auto n = static_cast<std::int64_t>(x.size());
  std::vector<float> g(x.size());
  for (std::size_t i = 0; i < g.size(); ++i) g[i] = 0.5f + static_cast<float>(i % 7) * 0.25f;
  auto cdf = [](double v) { return 0.5 * std::erfc(-v * M_SQRT1_2); };
  auto pdf = [](double v) { return std::exp(-0.5 * v * v) / std::sqrt(2 * M_PI); };
  // Relative to the terms' size: the fit's 1.2e-7, a few roundings, and the rounding of the
  // exponent near -x^2/2, which is 3e-8 x^2. The backward's terms cancel near x = -0.75.
  auto close = [](float got, double want, double size, double v) {
    const double rel = 6e-7 + 3e-8 * v * v;
    return std::abs(static_cast<double>(got) - want) <= rel * size + std::numeric_limits<float>::denorm_min() * 4;
  };
  int widths = 0;
  for (int lanes : {16, 8, 1}) {
    const kc::ArrayFn fwd = kc::gelu_with_lanes(lanes);
    const kc::GeluBackwardFn bwd = kc::gelu_backward_with_lanes(lanes);
    ASSERT_EQ(fwd == nullptr, bwd == nullptr);
    if (!fwd) continue;
    ++widths;
    for (std::int64_t len : {n, std::int64_t{13}, std::int64_t{5}}) {  // tails of each width
      std::vector<float> y(static_cast<std::size_t>(len)), dx(static_cast<std::size_t>(len));
      const float* xs = x.data() + (n - len);
      const float* gs = g.data() + (n - len);
      fwd(xs, y.data(), len);
      bwd(gs, xs, dx.data(), len);
      for (std::int64_t i = 0; i < len; ++i) {
        const double v = xs[i];
        EXPECT_TRUE(close(y[i], v * cdf(v), std::abs(v * cdf(v)), v)) << lanes << " lanes: gelu(" << v << ") = " << y[i];
        EXPECT_TRUE(close(dx[i], gs[i] * (cdf(v) + v * pdf(v)), gs[i] * (cdf(v) + std::abs(v) * pdf(v)), v))
            << lanes << " lanes: gelu'(" << v << ") g = " << dx[i];
      }
    }
    const float special[] = {std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(), 0.0f};
    float out[3];
    fwd(special, out, 3);
    EXPECT_EQ(out[0], std::numeric_limits<float>::infinity());
    EXPECT_TRUE(std::isnan(out[1]));
    EXPECT_EQ(out[2], 0.0f);
  }
  EXPECT_GE(widths, 1);
}

// vsigmoid fuses its two steps per CPU width; the bits must stay those of e = vexp(-|x|), then
// 1 / (1 + e) for x >= 0 and e / (1 + e) below, in IEEE float arithmetic.
TEST(VectorMath, SigmoidIsExactlyItsTwoStepsFromVexp) {
  std::vector<float> x = transcendental_inputs();
  for (float v : {0.0f, -0.0f, 1e-30f, -1e-30f, 88.0f, -88.0f, 104.0f, -104.0f}) x.push_back(v);
  const auto n = static_cast<std::int64_t>(x.size());
  std::vector<float> e(x.size()), s(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) e[i] = -std::abs(x[i]);
  kc::vexp(e.data(), e.data(), n);
  kc::vsigmoid(x.data(), s.data(), n);
  for (std::size_t i = 0; i < x.size(); ++i) {
    const float r = 1.0f / (1.0f + e[i]);
    const float want = x[i] >= 0.0f ? r : e[i] * r;
    EXPECT_EQ(std::memcmp(&s[i], &want, sizeof(float)), 0) << "x=" << x[i] << " got " << s[i] << " want " << want;
  }
  for (std::int64_t len = 1; len <= 17; ++len) {  // one-element tensors and every tail
    std::vector<float> part(static_cast<std::size_t>(len));
    kc::vsigmoid(x.data() + 3, part.data(), len);
    EXPECT_EQ(std::memcmp(part.data(), s.data() + 3, part.size() * sizeof(float)), 0) << "length " << len;
  }
}

// Every length (the vector tails), cut anywhere, in place or not: the same bits as one call.
TEST(VectorMath, ResultsDoNotDependOnLengthCutsOrAliasing) {
  std::vector<float> x(300);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(static_cast<float>(i)) * 12.0f;  // log: NaN below 0
  for (auto fn : {kc::vexp, kc::vtanh, kc::vsigmoid, kc::vlog, kc::verf, kc::vlog1p, kc::vexpm1, kc::vsoftplus, kc::vgelu}) {
    std::vector<float> whole(x.size());
    fn(x.data(), whole.data(), static_cast<std::int64_t>(x.size()));
    for (std::int64_t len = 0; len <= 40; ++len) {
      std::vector<float> part(static_cast<std::size_t>(len));
      fn(x.data() + 7, part.data(), len);  // len 0: writes nothing (part.data() may be null)
      if (len > 0) {
        EXPECT_EQ(std::memcmp(part.data(), whole.data() + 7, part.size() * sizeof(float)), 0) << "length " << len;
      }
    }
    std::vector<float> inplace = x;
    fn(inplace.data(), inplace.data(), 123);
    fn(inplace.data() + 123, inplace.data() + 123, static_cast<std::int64_t>(x.size()) - 123);
    EXPECT_EQ(std::memcmp(inplace.data(), whole.data(), x.size() * sizeof(float)), 0);  // bits: NaN too
  }
}

// The ops use the kernels for float32 of any layout and size, so a strided or small input gives
// the same bits as a contiguous or large one.
TEST(VectorMath, Float32OpsAgreeAcrossLayoutsSizesAndThreads) {
  ThreadCount restore;
  const cg::Tensor x = cg::randn({300, 257}) * 6.0;
  for (auto op : {+[](const cg::Tensor& t) { return cg::sigmoid(t); }, +[](const cg::Tensor& t) { return cg::tanh(t); },
                  +[](const cg::Tensor& t) { return cg::exp(t); },
                  +[](const cg::Tensor& t) { return cg::log(cg::abs(t) + 0.01); },
                  +[](const cg::Tensor& t) { return cg::gelu(t); }, +[](const cg::Tensor& t) { return cg::elu(t, 0.7); },
                  +[](const cg::Tensor& t) { return cg::softplus(t); }}) {
    kc::set_num_threads(1);
    const auto want = op(x).to_vector<float>();
    kc::set_num_threads(3);
    EXPECT_EQ(op(x).to_vector<float>(), want);
    EXPECT_EQ(op(x.t().contiguous()).t().contiguous().to_vector<float>(), want);
    EXPECT_EQ(op(x.t()).t().contiguous().to_vector<float>(), want);
    EXPECT_EQ(op(x.select(0, 5).select(0, 9)).item(), static_cast<double>(want[5 * 257 + 9]));
  }
}

// float32 softmax rows go through the vector kernels in blocks of rows; they must match float64
// across block boundaries, for short and long rows, with -inf entries.
TEST(VectorMath, Float32SoftmaxFamilyMatchesFloat64) {
  for (const auto& [rows, cols] : {std::pair<std::int64_t, std::int64_t>{1000, 10}, {3, 5000}, {7, 1}}) {
    cg::Tensor x = cg::randn({rows, cols}, {.dtype = cg::DType::Float64}) * 8.0;
    if (cols > 1) x.select(0, 1).select(0, 0).fill_(-std::numeric_limits<double>::infinity());
    const cg::Tensor xf = x.to(cg::DType::Float32).to(cg::DType::Float64);  // the same values in both
    const cg::Tensor x32 = x.to(cg::DType::Float32);
    EXPECT_TRUE(cg::allclose(cg::softmax(x32, 1).to(cg::DType::Float64), cg::softmax(xf, 1), 1e-5, 1e-7));
    EXPECT_TRUE(cg::allclose(cg::log_softmax(x32, 1).to(cg::DType::Float64).slice(1, cols > 1 ? 1 : 0, cols),
                             cg::log_softmax(xf, 1).slice(1, cols > 1 ? 1 : 0, cols), 1e-5, 1e-5));
    EXPECT_TRUE(cg::allclose(cg::logsumexp(x32, {1}).to(cg::DType::Float64), cg::logsumexp(xf, {1}), 1e-6, 1e-5));
    EXPECT_EQ(cg::softmax(x32, 1).at({1, 0}), cols > 1 ? 0.0 : 1.0);
  }
}

// softmax, log_softmax and logsumexp cut their slices across the pool from 64k inputs on; every
// slice is reduced in the same order whatever the cut, so the bits must not depend on the threads.
// Rows of float32 (the vector path), other axes and float64 (the general loop), ragged cuts.
TEST(VectorMath, SoftmaxFamilyGivesTheSameBitsOnAnyThreadCount) {
  ThreadCount restore;
  for (const cg::DType dt : {cg::DType::Float32, cg::DType::Float64}) {
    const cg::Tensor x = cg::randn({301, 3, 97}, {.dtype = dt}) * 5.0;  // 87,591 elements
    for (const std::int64_t dim : {2, 1, 0}) {
      std::vector<std::vector<double>> want;
      // Each output goes into a block freed full of NaN, so that a slice left out shows.
      auto poisoned = [&](auto op, const cg::Dims& shape) {
        (void)cg::full(shape, std::nan(""), {.dtype = dt});
        return op().template to_vector<double>();
      };
      cg::Dims reduced = x.shape();
      reduced.erase(static_cast<int>(dim));
      for (int threads : {1, 2, 3}) {
        kc::set_num_threads(threads);
        const std::vector<std::vector<double>> got = {
            poisoned([&] { return cg::softmax(x, dim); }, x.shape()),
            poisoned([&] { return cg::log_softmax(x, dim); }, x.shape()),
            poisoned([&] { return cg::logsumexp(x, dim); }, reduced)};
        if (want.empty())
          want = got;
        else
          EXPECT_EQ(got, want) << cg::dtype_name(dt) << ", dim " << dim << ", " << threads << " threads";
      }
    }
  }
}

// A contiguous copy of one dtype is split across the pool from 64k elements on: every element,
// with ragged ends, on any thread count.
TEST(CopyKernel, ContiguousCopiesAreWholeOnAnyThreadCount) {
  ThreadCount restore;
  for (const cg::DType dt : {cg::DType::Float32, cg::DType::Float64}) {
    const cg::Tensor x = cg::randn({70001}, {.dtype = dt});
    const std::vector<double> want = x.to_vector<double>();
    for (int threads : {3, 2, 1}) {
      kc::set_num_threads(threads);
      (void)cg::full({70001}, std::nan(""), {.dtype = dt});  // a freed block: an element left out shows
      EXPECT_EQ(x.clone().to_vector<double>(), want) << cg::dtype_name(dt) << ", " << threads << " threads";
      (void)cg::full({70001 - 3}, std::nan(""), {.dtype = dt});
      EXPECT_EQ(x.slice(0, 3, 70001).clone().to_vector<double>(), std::vector<double>(want.begin() + 3, want.end()));
    }
  }
}

// index_select gathers its rows on the pool from 64k elements on: every row must be the source's,
// on any thread count, for the first axis (an embedding lookup) and an inner one.
TEST(CopyKernel, IndexSelectGathersTheSameRowsOnAnyThreadCount) {
  ThreadCount restore;
  const cg::Tensor x = cg::randn({500, 7, 40});
  const cg::Tensor rows = cg::randint(0, 500, {301}), cols = cg::randint(0, 7, {9});
  for (int threads : {3, 2, 1}) {
    kc::set_num_threads(threads);
    (void)cg::full({301, 7, 40}, std::nan(""));  // a freed block for the output: a row left out shows
    const cg::Tensor by_rows = cg::index_select(x, 0, rows);  // 84,280 elements
    for (std::int64_t j = 0; j < 301; ++j)
      ASSERT_EQ(by_rows.select(0, j).to_vector<float>(), x.select(0, rows.at({j})).to_vector<float>())
          << threads << " threads, row " << j;
    (void)cg::full({500, 9, 40}, std::nan(""));
    const cg::Tensor by_cols = cg::index_select(x, 1, cols);  // 180,000 elements
    for (std::int64_t j = 0; j < 9; ++j)
      ASSERT_EQ(by_cols.select(1, j).contiguous().to_vector<float>(),
                x.select(1, static_cast<std::int64_t>(cols.at({j}))).contiguous().to_vector<float>())
          << threads << " threads, column " << j;
  }
}

// amax/amin/argmax/argmin cut their slices across the pool, and index_add its columns (repeated
// indices add into one row): on any thread count the bits must be those of one thread, NaN
// included, and index_add's sums those of the index's order.
TEST(VectorMath, ExtremesAndIndexAddGiveTheSameBitsOnAnyThreadCount) {
  ThreadCount restore;
  cg::Tensor x = cg::randn({301, 3, 97}, {.dtype = cg::DType::Float64});
  x.select(0, 7).select(0, 1).select(0, 5).fill_(std::nan(""));
  const cg::Tensor rows = cg::randint(0, 50, {301});  // repeats
  const cg::Tensor base = cg::randn({50, 3, 97}, {.dtype = cg::DType::Float64});
  auto run_all = [&] {  // as bit patterns, so that NaN compares equal to itself
    std::vector<std::vector<std::uint64_t>> r;
    auto bits = [&](const cg::Tensor& t) {
      const std::vector<double> v = t.to_vector<double>();
      std::vector<std::uint64_t> b(v.size());
      std::memcpy(b.data(), v.data(), v.size() * sizeof(double));
      r.push_back(b);
    };
    for (const std::int64_t dim : {0, 1, 2}) {
      (void)cg::full({301, 3, 97}, std::nan(""), {.dtype = cg::DType::Float64});
      bits(cg::amax(x, {dim}));
      bits(cg::amin(x, {dim}));
      (void)cg::full({301, 3, 97}, -1.0, {.dtype = cg::DType::Int64});
      bits(cg::argmax(x, dim));
      bits(cg::argmin(x, dim));
    }
    (void)cg::full({50, 3, 97}, std::nan(""), {.dtype = cg::DType::Float64});
    bits(cg::index_add(base, 0, rows, x));  // 87,591 source elements
    return r;
  };
  kc::set_num_threads(1);
  const auto want = run_all();
  for (int threads : {2, 3}) {
    kc::set_num_threads(threads);
    EXPECT_EQ(run_all(), want) << threads << " threads";
  }
  // index_add against its definition, summed in the index's order.
  std::vector<double> sum = base.to_vector<double>();
  const std::vector<double> xs = x.to_vector<double>();
  const std::vector<std::int64_t> ri = rows.to_vector<std::int64_t>();
  for (std::size_t j = 0; j < ri.size(); ++j)
    for (std::size_t c = 0; c < 3 * 97; ++c)
      sum[static_cast<std::size_t>(ri[j]) * 3 * 97 + c] += xs[j * 3 * 97 + c];
  std::vector<double> got(want.back().size());
  std::memcpy(got.data(), want.back().data(), got.size() * sizeof(double));
  ASSERT_EQ(got.size(), sum.size());
  for (std::size_t i = 0; i < sum.size(); ++i) {
    if (!(std::isnan(got[i]) && std::isnan(sum[i]))) {
      EXPECT_EQ(got[i], sum[i]) << "element " << i;
    }
  }
}

// Transposed sources are copied in tiles; every layout must give the plain walk's result.
TEST(CopyKernel, TransposedCopiesMatchTheElementwiseWalk) {
  ThreadCount restore;
  for (int threads : {1, 3}) {
    kc::set_num_threads(threads);
    const cg::Tensor a = cg::randn({3, 70, 45, 33}, {.dtype = cg::DType::Float64});
    for (const cg::Dims& order : {cg::Dims{0, 1, 3, 2}, cg::Dims{3, 2, 1, 0}, cg::Dims{0, 3, 1, 2}, cg::Dims{2, 0, 3, 1}}) {
      const cg::Tensor p = a.permute(order);
      const cg::Tensor copy = p.contiguous(), as_float = p.to(cg::DType::Float32);
      // float32 to float32 goes through the AVX2 8x8 blocks (transpose.cpp): ragged on every side.
      const cg::Tensor p32 = a.to(cg::DType::Float32).permute(order), copy32 = p32.contiguous();
      for (std::int64_t i = 0; i < p.size(0); i += 2)
        for (std::int64_t j = 0; j < p.size(1); j += 3)
          for (std::int64_t k = 0; k < p.size(2); k += 5)
            for (std::int64_t l = 0; l < p.size(3); ++l) {
              ASSERT_EQ(copy.at({i, j, k, l}), p.at({i, j, k, l}));
              ASSERT_EQ(as_float.at({i, j, k, l}), static_cast<double>(static_cast<float>(p.at({i, j, k, l}))));
              ASSERT_EQ(copy32.at({i, j, k, l}), p32.at({i, j, k, l}));
            }
    }
    const cg::Tensor big = cg::randn({300, 400});
    EXPECT_EQ(big.t().contiguous().t().contiguous().to_vector<float>(), big.to_vector<float>());
  }
}

// gelu is one op with a fused backward; its value and gradient must match the composition it
// replaced, x/2 (1 + erf(x/sqrt 2)), in float64 (the scalar rule) and float32 (the vector kernels).
TEST(FusedOps, GeluMatchesItsComposition) {
  const cg::Tensor base = cg::randn({40, 50}, {.dtype = cg::DType::Float64}) * 3.0;
  for (cg::DType dt : {cg::DType::Float64, cg::DType::Float32}) {
    cg::Tensor a = base.to(dt).detach().requires_grad_(), b = base.to(dt).detach().requires_grad_();
    const cg::Tensor g = cg::randn({40, 50}, {.dtype = dt});
    const cg::Tensor fused = cg::gelu(a), composed = cg::mul(b * 0.5, cg::erf(b * M_SQRT1_2) + 1.0);
    const double tol = dt == cg::DType::Float32 ? 1e-5 : 1e-12;
    EXPECT_TRUE(cg::allclose(fused, composed, tol, tol));
    fused.backward(g);
    composed.backward(g);
    EXPECT_TRUE(cg::allclose(a.grad(), b.grad(), tol, tol)) << cg::dtype_name(dt);
    // an expanded (stride-0) upstream gradient, as from sum()
    a.zero_grad();
    cg::gelu(a.t()).sum().backward();
    b.zero_grad();
    cg::mul(b.t() * 0.5, cg::erf(b.t() * M_SQRT1_2) + 1.0).sum().backward();
    EXPECT_TRUE(cg::allclose(a.grad(), b.grad(), tol, tol)) << cg::dtype_name(dt);
  }
}

// layer_norm is one op with a fused backward; value and gradients must match the composition it
// replaced, in both dtypes, with and without the affine parameters, on 1 and 3 threads.
TEST(FusedOps, LayerNormMatchesItsComposition) {
  ThreadCount restore;
  for (int threads : {1, 3})
    for (cg::DType dt : {cg::DType::Float64, cg::DType::Float32})
      for (bool affine : {true, false}) {
        kc::set_num_threads(threads);
        const cg::Tensor base = cg::randn({300, 7, 40}, {.dtype = cg::DType::Float64}) * 2.0 + 0.5;
        cg::Tensor a = base.to(dt).detach().requires_grad_(), b = base.to(dt).detach().requires_grad_();
        cg::Tensor w1 = (cg::randn({7, 40}, {.dtype = dt}) + 1.0).detach().requires_grad_();
        cg::Tensor w2 = w1.detach().clone().requires_grad_();
        cg::Tensor b1 = cg::randn({7, 40}, {.dtype = dt}).requires_grad_(), b2 = b1.detach().clone().requires_grad_();
        const cg::Tensor g = cg::randn({300, 7, 40}, {.dtype = dt});
        const cg::Tensor fused = cg::layer_norm(a, {7, 40}, affine ? w1 : cg::Tensor(), affine ? b1 : cg::Tensor());
        const cg::Tensor centered = b - cg::mean(b, {1, 2}, true);
        cg::Tensor composed = centered * cg::rsqrt(cg::mean(cg::square(centered), {1, 2}, true) + 1e-5);
        if (affine) composed = composed * w2 + b2;
        const double tol = dt == cg::DType::Float32 ? 2e-4 : 1e-10;
        EXPECT_TRUE(cg::allclose(fused, composed, tol, tol));
        fused.backward(g);
        composed.backward(g);
        EXPECT_TRUE(cg::allclose(a.grad(), b.grad(), tol, tol)) << cg::dtype_name(dt) << " affine " << affine;
        if (affine) {
          EXPECT_TRUE(cg::allclose(w1.grad(), w2.grad(), tol, tol)) << cg::dtype_name(dt);
          EXPECT_TRUE(cg::allclose(b1.grad(), b2.grad(), tol, tol)) << cg::dtype_name(dt);
        }
      }
}

TEST(FusedOps, LayerNormRejectsMismatchedShapes) {
  const cg::Tensor x = cg::randn({4, 6});
  EXPECT_THROW(cg::layer_norm(x, {5}), cg::ShapeError);
  EXPECT_THROW(cg::layer_norm(x, {6}, cg::randn({5})), cg::ShapeError);
  EXPECT_THROW(cg::layer_norm(x, {6}, cg::randn({6}, {.dtype = cg::DType::Float64})), cg::TypeError);
  try {
    cg::layer_norm(x, {4, 6, 1});
    ADD_FAILURE() << "no error";
  } catch (const cg::ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("[4, 6]"), std::string::npos) << e.what();
  }
}

// batch_norm (training statistics) against the composition BatchNorm used before, both dtypes.
TEST(FusedOps, BatchNormMatchesItsComposition) {
  ThreadCount restore;
  for (int threads : {1, 3})
    for (cg::DType dt : {cg::DType::Float64, cg::DType::Float32}) {
      kc::set_num_threads(threads);
      const cg::Tensor base = cg::randn({16, 12, 9, 11}, {.dtype = cg::DType::Float64}) * 1.5 + 0.3;
      cg::Tensor a = base.to(dt).detach().requires_grad_(), b = base.to(dt).detach().requires_grad_();
      cg::Tensor w1 = (cg::randn({12}, {.dtype = dt}) + 1.0).detach().requires_grad_(), w2 = w1.detach().clone().requires_grad_();
      cg::Tensor b1 = cg::randn({12}, {.dtype = dt}).requires_grad_(), b2 = b1.detach().clone().requires_grad_();
      const cg::Tensor g = cg::randn({16, 12, 9, 11}, {.dtype = dt});
      cg::Tensor mean, var;
      const cg::Tensor fused = cg::batch_norm(a, w1, b1, 1e-5, &mean, &var);
      const cg::Tensor centered = b - cg::mean(b, {0, 2, 3}, true);
      const cg::Tensor var_b = cg::mean(cg::square(centered), {0, 2, 3}, true);
      const cg::Tensor composed = centered * cg::rsqrt(var_b + 1e-5) * w2.reshape({1, 12, 1, 1}) + b2.reshape({1, 12, 1, 1});
      const double tol = dt == cg::DType::Float32 ? 2e-4 : 1e-10;
      EXPECT_TRUE(cg::allclose(fused, composed, tol, tol));
      EXPECT_TRUE(cg::allclose(var, var_b.reshape({12}), tol, tol));
      EXPECT_TRUE(cg::allclose(mean, cg::mean(b, {0, 2, 3}), tol, tol));
      fused.backward(g);
      composed.backward(g);
      EXPECT_TRUE(cg::allclose(a.grad(), b.grad(), tol, tol)) << cg::dtype_name(dt);
      EXPECT_TRUE(cg::allclose(w1.grad(), w2.grad(), tol, tol)) << cg::dtype_name(dt);
      EXPECT_TRUE(cg::allclose(b1.grad(), b2.grad(), tol, tol)) << cg::dtype_name(dt);
    }
  EXPECT_THROW(cg::batch_norm(cg::randn({1, 3}), {}, {}, 1e-5), cg::ValueError);
  EXPECT_THROW(cg::batch_norm(cg::randn({4, 3}), cg::randn({4}), {}, 1e-5), cg::ShapeError);
}

// Bytes to floats: every byte, in each of the eight lanes and in the tail, gives the floats of
// dividing first and normalizing afterwards (read_idx_images, then normalize_), on both paths.
TEST(Bytes, ConvertToTheFloatsOfDividingThenNormalizingInEveryLane) {
  std::vector<std::uint8_t> src(256 + 13);
  for (std::size_t i = 0; i < src.size(); ++i) src[i] = static_cast<std::uint8_t>((i * 7 + 3) & 0xff);
  const float scalings[][3] = {{255.0f, 0.0f, 1.0f}, {255.0f, 0.2860402f, 2.8274617f}, {3.0f, -1.5f, 0.125f}};
  for (const auto& sc : scalings) {
    for (std::size_t n : {std::size_t{0}, std::size_t{5}, std::size_t{8}, std::size_t{13}, src.size()}) {
      std::vector<float> fast(n, NAN), slow(n, NAN), expect(n);
      for (std::size_t i = 0; i < n; ++i) {
        // (what read_idx_images stores for a byte, then normalize_'s arithmetic)
        const float x = sc[0] == 255.0f ? static_cast<float>(src[i] / 255.0) : static_cast<float>(src[i]) / sc[0];
        expect[i] = (x - sc[1]) * sc[2];
      }
      kc::bytes_to_floats(src.data(), sc[0], sc[1], sc[2], fast.data(), static_cast<std::int64_t>(n));
      kc::bytes_to_floats_scalar(src.data(), sc[0], sc[1], sc[2], slow.data(), static_cast<std::int64_t>(n));
      for (std::size_t i = 0; i < n; ++i) {
        EXPECT_EQ(std::memcmp(&fast[i], &expect[i], 4), 0) << "byte " << int{src[i]} << " at " << i << " of " << n;
        EXPECT_EQ(std::memcmp(&slow[i], &expect[i], 4), 0) << "byte " << int{src[i]} << " at " << i << " of " << n;
      }
    }
  }
}
