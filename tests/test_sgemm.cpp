// chaingrad's own float32 GEMM (src/kernels/cpu/sgemm_avx512.cpp), the oneDNN path and the float32
// path of kernels::gemm (oneDNN, or the own kernel with CHAINGRAD_SGEMM=own), against a
// double-precision triple loop: every transposition,
// alpha and beta (beta 0 over a C full of NaN), ragged and tiny sizes, leading dimensions larger
// than the rows, and bit-identical results on 1, 2 and 3 threads (and on up to 16, where threads
// race for the panels they share) wherever that is promised (gemm_same_bits_any_threads).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "chaingrad/chaingrad.hpp"
#include "kernels/cpu/gemm.hpp"
#include "kernels/cpu/parallel.hpp"
#include "kernels/cpu/sgemm_avx512.hpp"

namespace cg = chaingrad;
namespace kc = chaingrad::kernels;

namespace {

struct ThreadCount {
  int saved = kc::num_threads();
  ~ThreadCount() { kc::set_num_threads(saved); }
};

struct Case {
  bool ta, tb;
  std::int64_t m, n, k;
  float alpha, beta;
  std::int64_t pad;  // extra elements per row of A, B and C beyond the minimal leading dimension
};

std::string describe(const Case& g) {
  return "ta=" + std::to_string(g.ta) + " tb=" + std::to_string(g.tb) + " m=" + std::to_string(g.m) +
         " n=" + std::to_string(g.n) + " k=" + std::to_string(g.k) + " alpha=" + std::to_string(g.alpha) +
         " beta=" + std::to_string(g.beta) + " pad=" + std::to_string(g.pad);
}

using Gemm = void (*)(bool, bool, std::int64_t, std::int64_t, std::int64_t, float, const float*, std::int64_t,
                      const float*, std::int64_t, float, float*, std::int64_t);

void dispatched(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a,
                std::int64_t lda, const float* b, std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
  kc::gemm<float>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

struct Operands {
  std::int64_t lda, ldb, ldc;
  std::vector<float> a, b, c0;
  explicit Operands(const Case& g, unsigned seed) {
    // A is m x k (k x m when transposed), B is k x n (n x k when transposed); row-major.
    const std::int64_t a_rows = g.ta ? g.k : g.m, a_cols = g.ta ? g.m : g.k;
    const std::int64_t b_rows = g.tb ? g.n : g.k, b_cols = g.tb ? g.k : g.n;
    lda = a_cols + g.pad;
    ldb = b_cols + g.pad;
    ldc = g.n + g.pad;
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    a.resize(static_cast<std::size_t>(a_rows * lda));
    b.resize(static_cast<std::size_t>(b_rows * ldb));
    c0.resize(static_cast<std::size_t>(g.m * ldc));
    for (float& x : a) x = u(rng);
    for (float& x : b) x = u(rng);
    for (float& x : c0) x = g.beta == 0.f ? std::numeric_limits<float>::quiet_NaN() : u(rng);
  }
  double A(const Case& g, std::int64_t i, std::int64_t p) const {
    return g.ta ? a[static_cast<std::size_t>(p * lda + i)] : a[static_cast<std::size_t>(i * lda + p)];
  }
  double B(const Case& g, std::int64_t p, std::int64_t j) const {
    return g.tb ? b[static_cast<std::size_t>(j * ldb + p)] : b[static_cast<std::size_t>(p * ldb + j)];
  }
};

// Runs f on a copy of C, checks it against the reference (and that the padding of C is untouched),
// and returns the result.
std::vector<float> check(Gemm f, const Case& g, const Operands& o) {
  std::vector<float> c = o.c0;
  f(g.ta, g.tb, g.m, g.n, g.k, g.alpha, o.a.data(), o.lda, o.b.data(), o.ldb, g.beta, c.data(), o.ldc);
  for (std::int64_t i = 0; i < g.m; ++i) {
    for (std::int64_t j = 0; j < o.ldc; ++j) {
      const std::size_t at = static_cast<std::size_t>(i * o.ldc + j);
      if (j >= g.n) {
        // Outside the product: left exactly as it was (NaN stays NaN).
        const bool same = std::isnan(o.c0[at]) ? std::isnan(c[at]) : c[at] == o.c0[at];
        EXPECT_TRUE(same) << describe(g) << " wrote padding at i=" << i << " j=" << j;
        continue;
      }
      double want = 0, scale = 0;
      for (std::int64_t p = 0; p < g.k; ++p) {
        want += o.A(g, i, p) * o.B(g, p, j);
        scale += std::abs(o.A(g, i, p) * o.B(g, p, j));
      }
      want *= g.alpha;
      scale *= std::abs(g.alpha);
      if (g.beta != 0.f) {
        want += static_cast<double>(g.beta) * o.c0[at];
        scale += std::abs(static_cast<double>(g.beta) * o.c0[at]);
      }
      const double tol = 1e-6 + 4.0 * static_cast<double>(g.k + 2) * 6e-8 * scale;
      if (!(std::abs(c[at] - want) <= tol)) {
        ADD_FAILURE() << describe(g) << " at i=" << i << " j=" << j << ": got " << c[at] << ", want " << want
                      << " (tolerance " << tol << ")";
        return c;
      }
    }
  }
  return c;
}

std::vector<Case> cases() {
  std::vector<Case> out;
  const std::int64_t sizes[] = {1, 2, 3, 7, 10, 15, 17, 31, 33, 100, 257};
  // Every (m, n) pair from the list with a few k, for every transposition, beta 0 and 1.
  for (int t = 0; t < 4; ++t)
    for (std::int64_t m : sizes)
      for (std::int64_t n : sizes)
        for (std::int64_t k : {1, 10, 33}) {
          // Keep the reference loop affordable: the largest pairs only with small k.
          if (m * n * k > 257 * 100 * 10) continue;
          out.push_back({(t & 1) != 0, (t & 2) != 0, m, n, k, 1.f, (m + n + k) % 2 == 0 ? 0.f : 1.f, 0});
        }
  // Long k (several k blocks, ragged last block), alpha != 1, beta != 0/1, padded leading dims.
  for (int t = 0; t < 4; ++t) {
    const bool ta = (t & 1) != 0, tb = (t & 2) != 0;
    out.push_back({ta, tb, 31, 47, 257, 1.f, 0.f, 0});
    out.push_back({ta, tb, 33, 17, 600, 0.5f, 1.f, 3});
    out.push_back({ta, tb, 100, 100, 100, -1.5f, 0.f, 5});
    out.push_back({ta, tb, 17, 100, 513, 2.f, -0.75f, 1});
    out.push_back({ta, tb, 257, 10, 256, 1.f, 1.f, 7});
    out.push_back({ta, tb, 10, 257, 15, 1.f, 0.f, 16});
    out.push_back({ta, tb, 1, 257, 300, 1.f, 1.f, 2});
    out.push_back({ta, tb, 257, 1, 300, 1.f, 0.f, 2});
    out.push_back({ta, tb, 7, 3, 1, 3.f, 0.5f, 4});
  }
  // Big enough to be split across threads (more than 2^20 flops), with ragged edges.
  for (int t = 0; t < 4; ++t) {
    const bool ta = (t & 1) != 0, tb = (t & 2) != 0;
    out.push_back({ta, tb, 257, 100, 300, 1.f, 0.f, 0});
    out.push_back({ta, tb, 100, 257, 300, 0.5f, 1.f, 3});
    out.push_back({ta, tb, 130, 10, 1030, 1.f, 0.f, 0});
    out.push_back({ta, tb, 10, 130, 1030, 1.f, 1.f, 0});
  }
  // The own kernel's packing paths (sgemm_avx512.cpp), with ragged edges and several ragged k
  // blocks: row blocks (m >= n) holding more than one block of A per thread on 2 threads, column
  // blocks (n > m) holding more than one block of B per thread; each with the shared operand
  // packed by the tiles (op(B) = B, resp. op(A) = A^T) or up front (B^T, resp. A direct).
  for (int t = 0; t < 4; ++t) {
    const bool ta = (t & 1) != 0, tb = (t & 2) != 0;
    out.push_back({ta, tb, 250, 45, 1030, 0.75f, 0.5f, 3});
    out.push_back({ta, tb, 45, 600, 830, 1.f, 0.f, 5});
    out.push_back({ta, tb, 113, 33, 401, -2.f, 1.f, 17});
  }
  // A^T B through a transposed copy of A (gemm.cpp, transpose_a_first: m, n >= 128 and
  // 64 <= k <= 512 where oneDNN lacks AVX-512): ragged 8 x 8 blocks on both sides, a padded
  // leading dimension, the shortest and longest k, and a copy big enough to be cut across threads.
  for (int t = 0; t < 4; ++t) {
    const bool ta = (t & 1) != 0, tb = (t & 2) != 0;
    out.push_back({ta, tb, 200, 150, 130, 1.f, 0.f, 0});
    out.push_back({ta, tb, 131, 257, 64, 0.5f, 1.f, 3});
    out.push_back({ta, tb, 257, 128, 511, -1.f, 0.5f, 9});
  }
  return out;
}

// Whether f promises the same bits on every thread count (gemm_same_bits_any_threads says where
// oneDNN's kernels do). Where it does not, each thread count's result is checked against the
// reference instead.
bool same_bits_promised(Gemm f) { return f == &kc::sgemm_avx512 || kc::gemm_same_bits_any_threads(); }

std::vector<Gemm> paths() {
  std::vector<Gemm> p = {&dispatched, &kc::gemm_onednn};
  if (kc::sgemm_avx512_available()) p.push_back(&kc::sgemm_avx512);
  return p;
}

}  // namespace

TEST(Sgemm, MatchesDoubleReferenceOnEveryPath) {
  ThreadCount restore;
  unsigned seed = 1;
  for (Gemm f : paths())
    for (const Case& g : cases()) {
      Operands o(g, seed++);
      check(f, g, o);
      if (::testing::Test::HasFailure()) return;
    }
}

// Every element of C is summed in the same order whatever the thread count, where promised.
TEST(Sgemm, SameBitsOnOneTwoAndThreeThreads) {
  ThreadCount restore;
  unsigned seed = 1000;
  for (Gemm f : paths())
    for (const Case& g : cases()) {
      if (2.0 * static_cast<double>(g.m * g.n * g.k) < 1e5) continue;
      Operands o(g, seed++);
      std::vector<float> first;
      for (int threads : {1, 2, 3}) {
        kc::set_num_threads(threads);
        std::vector<float> c = check(f, g, o);
        if (::testing::Test::HasFailure()) return;
        if (threads == 1) {
          first = c;
        } else if (same_bits_promised(f)) {
          ASSERT_EQ(std::memcmp(c.data(), first.data(), c.size() * sizeof(float)), 0)
              << describe(g) << " differs between 1 and " << threads << " threads";
        }
      }
    }
}

// More threads than panels to share: threads race for the shared panels, and a thread that finds
// one still being packed by another packs a copy of its own; the bits must not change.
TEST(Sgemm, SameBitsWhenThreadsRaceForSharedPanels) {
  ThreadCount restore;
  const std::vector<Case> racing = {{true, false, 250, 45, 1030, 1.f, 0.f, 0}, {true, false, 45, 600, 830, 1.f, 1.f, 2},
                                    {false, false, 600, 70, 300, 0.5f, 0.f, 1}, {true, true, 300, 300, 500, 1.f, 0.f, 0}};
  unsigned seed = 3000;
  for (Gemm f : paths())
    for (const Case& g : racing) {
      Operands o(g, seed++);
      kc::set_num_threads(1);
      const std::vector<float> one = check(f, g, o);
      if (::testing::Test::HasFailure()) return;
      for (int threads : {4, 7, 16}) {
        kc::set_num_threads(threads);
        if (!same_bits_promised(f)) {  // the bits may differ: once per thread count is enough
          check(f, g, o);
          if (::testing::Test::HasFailure()) return;
          continue;
        }
        for (int repeat = 0; repeat < 5; ++repeat) {
          std::vector<float> c = o.c0;
          f(g.ta, g.tb, g.m, g.n, g.k, g.alpha, o.a.data(), o.lda, o.b.data(), o.ldb, g.beta, c.data(), o.ldc);
          ASSERT_EQ(std::memcmp(c.data(), one.data(), one.size() * sizeof(float)), 0)
              << describe(g) << " differs between 1 and " << threads << " threads";
        }
      }
    }
}

// A B^T with 32 rows or more and dense operands runs on oneDNN's matmul primitive where oneDNN has
// AVX-512 (gemm.cpp, use_matmul_primitive), cut into blocks of at least 16 whole rows: blocks of 16
// to 31 rows, many threads. (Padded operands stay on oneDNN's sgemm, which changes bits on some of
// them too: 257 x 256 x 784 with rows padded by one, cut into 128 + 129 rows, and 45 x 600 x 830
// padded by five at 7 threads, cut into columns 80 and 96 wide. gemm.hpp says so.)
TEST(Sgemm, MatmulPrimitiveBlocksKeepTheBits) {
  if (!kc::gemm_same_bits_any_threads()) GTEST_SKIP() << "oneDNN has no AVX-512 here: A B^T stays on sgemm";
  ThreadCount restore;
  const std::vector<Case> shapes = {{false, true, 300, 300, 500, 1.f, 1.f, 0}, {false, true, 45, 600, 830, 1.f, 0.f, 0},
                                    {false, true, 257, 256, 784, 0.5f, 0.f, 0}, {false, true, 33, 10, 1030, 1.f, 1.f, 0},
                                    {false, true, 1000, 256, 784, 1.f, 0.f, 0}};
  unsigned seed = 4000;
  for (const Case& g : shapes) {
    Operands o(g, seed++);
    kc::set_num_threads(1);
    const std::vector<float> one = check(&dispatched, g, o);
    if (::testing::Test::HasFailure()) return;
    for (int threads : {2, 3, 4, 7, 16}) {
      kc::set_num_threads(threads);
      const std::vector<float> c = check(&dispatched, g, o);
      if (::testing::Test::HasFailure()) return;
      ASSERT_EQ(std::memcmp(c.data(), one.data(), one.size() * sizeof(float)), 0)
          << describe(g) << " differs between 1 and " << threads << " threads";
    }
  }
}

// The MLP's shapes at batch 1024 (bench/bench_gemm.cpp, mlp_products), 2 threads against 1.
TEST(Sgemm, MlpShapesMatchReferenceAndThreadCounts) {
  ThreadCount restore;
  const std::int64_t B = 1024, in[] = {784, 256, 256}, out_[] = {256, 256, 10};
  std::vector<Case> ps;
  for (int l = 0; l < 3; ++l) {
    ps.push_back({false, true, B, out_[l], in[l], 1.f, 0.f, 0});
    ps.push_back({true, false, out_[l], in[l], B, 1.f, 1.f, 0});
    if (l > 0) ps.push_back({false, false, B, in[l], out_[l], 1.f, 0.f, 0});
  }
  unsigned seed = 5000;
  for (Gemm f : paths())
    for (const Case& g : ps) {
      Operands o(g, seed++);
      kc::set_num_threads(1);
      const std::vector<float> one = check(f, g, o);
      if (::testing::Test::HasFailure()) return;
      kc::set_num_threads(2);
      if (!same_bits_promised(f)) {
        check(f, g, o);
        if (::testing::Test::HasFailure()) return;
        continue;
      }
      std::vector<float> two = o.c0;
      f(g.ta, g.tb, g.m, g.n, g.k, g.alpha, o.a.data(), o.lda, o.b.data(), o.ldb, g.beta, two.data(), o.ldc);
      ASSERT_EQ(std::memcmp(two.data(), one.data(), one.size() * sizeof(float)), 0) << describe(g);
    }
}
