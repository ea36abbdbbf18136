#include "kernels/cpu/gemm.hpp"

#include <cblas.h>
#include <dnnl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "chaingrad/error.hpp"
#include "kernels/cpu/matmul_onednn.hpp"
#include "kernels/cpu/openmp_control.hpp"
#include "kernels/cpu/parallel.hpp"
#include "kernels/cpu/sgemm_avx512.hpp"
#include "kernels/cpu/sgemm_thin.hpp"
#include "kernels/cpu/transpose.hpp"

// float32 products go to oneDNN's sgemm: its JIT kernels use AVX-512 where the CPU has it, whatever
// OPENBLAS_CORETYPE says, and on this project's MLP products they run 1.2-1.6x faster than
// OpenBLAS's (BENCHMARKS.md, "Micro-benchmarks"). chaingrad's own AVX-512 kernel
// (sgemm_avx512.cpp) runs instead only with CHAINGRAD_SGEMM=own: use_own_sgemm says why it is not
// the default. Products with a side of at most 16 (a layer with a few outputs) run on chaingrad's
// thin kernels (sgemm_thin.cpp), which read both operands in place: use_thin_sgemm.
// float64 has no oneDNN kernel and stays on OpenBLAS. Both libraries run
// single-threaded; the product is cut into one block per thread of chaingrad's own pool, so no
// library pool spins against another's.

namespace chaingrad::kernels {
namespace {

// Below this many flops a product runs on the calling thread: waking a worker costs about what
// half of such a product does.
constexpr double kMinParallelFlops = 1 << 20;
// Column blocks are cut at multiples of a cache line of floats, so no two threads write one line.
constexpr std::int64_t kColumnAlign = 16;
// The fewest rows a block of the matmul primitive gets (split_gemm).
constexpr std::int64_t kMatmulRows = 16;

void make_openblas_single_threaded() {
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
}

bool onednn_has_avx512() {
  const unsigned isa = dnnl_get_effective_cpu_isa(), avx512 = dnnl_cpu_isa_avx512_core;
  return (isa & avx512) == avx512;
}

// Whether the product runs on oneDNN's matmul primitive rather than its sgemm: the forward's X W^T
// (A B^T) with at least 32 rows and dense operands (rows of A and B k long, of C n long), where
// oneDNN has AVX-512. There the primitive runs its brgemm kernels, which took the MLP's X W^T
// products 4-10% faster than sgemm's on this project's AMD EPYC Zen 4 (one thread, operands hot,
// 128-1024 x 256 x 256-784), and its training step 1.8-3.8% shorter (batch 64 and 256 on one
// thread, 256 and 1024 on two; interleaved runs, BENCHMARKS.md "Session 20: the MLP step on the Zen 4"). The
// backward's layouts ran no faster on it (0-2% slower), and without AVX-512 it was not measured.
// Results must not depend on the thread count, and brgemm's summation order depends on the block's
// shape in two cases found: a block of another number of columns (so blocks are whole rows), and,
// with padded rows, a block of another number of rows (257 rows at once against 128 + 129: every
// bit; so padded operands stay on sgemm). Dense blocks of 16 rows or more, cut at multiples of 16
// (split_gemm), gave the same bits at every cut tried (tests/test_sgemm.cpp). Under 32 rows such a
// cut leaves threads idle, and sgemm keeps the product. CHAINGRAD_SGEMM_NT=sgemm keeps every
// product on sgemm, for A/B runs.
bool use_matmul_primitive(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t lda,
                          std::int64_t ldb, std::int64_t ldc) {
  static const bool on = [] {
    const char* e = std::getenv("CHAINGRAD_SGEMM_NT");
    return onednn_has_avx512() && !(e && std::string(e) == "sgemm");
  }();
  return on && !ta && tb && m >= 32 && lda == k && ldb == k && ldc == n;
}

// The kernel a product runs on. It is decided on the whole product (float_kernel), never on a
// thread's block of it, so that every block runs the same kernel whatever the thread count:
// - sgemm: oneDNN's sgemm, or OpenBLAS's dgemm for float64;
// - thin: the product has a side of at most 16 (a layer with few outputs), on sgemm_thin.cpp's
//   kernels (BENCHMARKS.md, "The thin products");
// - matmul: oneDNN's matmul primitive (use_matmul_primitive);
// - own: chaingrad's AVX-512 kernel, which cuts the product itself (use_own_sgemm);
// - transposed_a: A^T copied first, then A B on sgemm (transpose_a_first).
// Only the first three run a thread's block (split_gemm, serial_gemm).
enum class Kernel { sgemm, thin, matmul, own, transposed_a };

// C's rows set to the bias, for a product with beta 1 to add to.
template <class T>
void fill_rows(const T* bias, std::int64_t m, std::int64_t n, T* c, std::int64_t ldc) {
  for (std::int64_t i = 0; i < m; ++i) std::copy(bias, bias + n, c + i * ldc);
}

// relu over rows of C. A NaN becomes 0, as in the matmul primitive's epilogue and chaingrad's relu.
template <class T>
void relu_rows(std::int64_t m, std::int64_t n, T* c, std::int64_t ldc) {
  for (std::int64_t i = 0; i < m; ++i)
    for (T* p = c + i * ldc; p != c + i * ldc + n; ++p) *p = *p > T(0) ? *p : T(0);
}

// An epilogue is only asked for with beta = 0 (gemm_bias_relu). Without the primitive it is done by
// hand: the bias copied into C's rows for a product with beta 1, relu over the block after.
void serial_gemm(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a,
                 std::int64_t lda, const float* b, std::int64_t ldb, float beta, float* c, std::int64_t ldc,
                 Kernel kernel, Epilogue epilogue = {}) {
  if (kernel == Kernel::thin) return sgemm_thin(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  SingleThreadedOpenMp one_thread;
  if (kernel == Kernel::matmul && matmul_onednn(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, epilogue))
    return;
  if (epilogue.bias) {
    fill_rows(epilogue.bias, m, n, c, ldc);
    beta = 1.0f;
  }
  const dnnl_status_t st =
      dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  CG_CHECK(st == dnnl_success, InternalError, "gemm: oneDNN sgemm failed with status ", static_cast<int>(st),
           " for m=", m, " n=", n, " k=", k);
  if (epilogue.relu) relu_rows(m, n, c, ldc);
}

void serial_gemm(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, double alpha, const double* a,
                 std::int64_t lda, const double* b, std::int64_t ldb, double beta, double* c, std::int64_t ldc,
                 Kernel /*float64 has only dgemm*/, Epilogue epilogue = {}) {
  CG_ASSERT(!epilogue.bias && !epilogue.relu);
  make_openblas_single_threaded();
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, static_cast<int>(m),
              static_cast<int>(n), static_cast<int>(k), alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta,
              c, static_cast<int>(ldc));
}

// C = alpha op(A) op(B) + beta C, cut into row or column blocks of C, one per thread. Every block
// is an independent product over the full k, so the result is the same for any thread count as
// long as the block's kernel is (the thin ones and oneDNN's AVX-512 ones are; oneDNN's AVX2 ones
// are not: gemm_same_bits_any_threads).
template <class T>
void split_gemm(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, T alpha, const T* a, std::int64_t lda,
                const T* b, std::int64_t ldb, T beta, T* c, std::int64_t ldc, Kernel kernel,
                Epilogue epilogue = {}) {
  const double flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  const int threads = flops < kMinParallelFlops ? 1 : num_threads();
  // The matmul primitive's blocks are whole rows, at least kMatmulRows of them: with fewer, and
  // padded rows, brgemm changed every bit of the block (use_matmul_primitive).
  const bool matmul = kernel == Kernel::matmul;
  const bool by_rows = m >= n || matmul;
  const std::int64_t extent = by_rows ? m : n, align = matmul ? kMatmulRows : by_rows ? 1 : kColumnAlign;
  // (Whole units of align; for the primitive, the last unit also takes the rows left over.)
  const std::int64_t units = matmul ? std::max<std::int64_t>(1, extent / align) : (extent + align - 1) / align;
  const int parts = static_cast<int>(std::min<std::int64_t>(threads, units));
  if (parts <= 1) {
    serial_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, kernel, epilogue);
    return;
  }
  parallel_for(parts, [&](int p) {
    const std::int64_t lo = std::min(extent, units * p / parts * align);
    const std::int64_t hi = p + 1 == parts ? extent : std::min(extent, units * (p + 1) / parts * align);
    if (hi <= lo) return;
    if (by_rows) {
      // Rows [lo, hi) of op(A) and of C.
      const T* a_block = ta ? a + lo : a + lo * lda;
      serial_gemm(ta, tb, hi - lo, n, k, alpha, a_block, lda, b, ldb, beta, c + lo * ldc, ldc, kernel, epilogue);
    } else {
      // Columns [lo, hi) of op(B) and of C.
      const T* b_block = tb ? b + lo * ldb : b + lo;
      CG_ASSERT(!epilogue.bias && !epilogue.relu);  // (the only blocks with an epilogue, the primitive's, are rows)
      serial_gemm(ta, tb, m, hi - lo, k, alpha, a, lda, b_block, ldb, beta, c + lo, ldc, kernel, epilogue);
    }
  });
}

// BLAS semantics for an empty sum: C = beta C, and beta = 0 overwrites C (even NaN) with zeros.
template <class T>
void scale_only(std::int64_t m, std::int64_t n, T beta, T* c, std::int64_t ldc) {
  for (std::int64_t i = 0; i < m; ++i) {
    T* row = c + i * ldc;
    if (beta == T(0)) {
      std::fill(row, row + n, T(0));
    } else {
      for (std::int64_t j = 0; j < n; ++j) row[j] *= beta;
    }
  }
}

// Whether gemm<float> runs chaingrad's own AVX-512 kernel instead of oneDNN. Off unless
// CHAINGRAD_SGEMM=own: on this project's 2-core machine the own kernel measured no faster than
// oneDNN on two threads, the default (bench_gemm, quiet runs with the FMA peak at 454-472 GFLOP/s:
// the eight MLP products at batch 1024 at 0.95-1.07x oneDNN's GFLOP/s; BM_MlpProduct own/oneDNN
// on 2 threads: X W^T 1024x256x784 0.93-1.02, 1024x256x256 1.00-1.05, G W 1024x256x256 0.95-0.97;
// on 1 thread 0.97-1.04, 0.98-1.04, 1.02-1.12). With CHAINGRAD_SGEMM=own it takes the shapes
// where it measured ahead in interleaved A/B runs (own/oneDNN GFLOP/s, medians of 9-15 rounds):
//  - A B (dX = G W) with m >= 512: 1.09-1.13 at m = 512 and 1024 (0.74-0.98 at m = 64, 256);
//  - A B^T (Y = X W^T) with m >= 1024: 1.02-1.07 at m = 1024 (0.89-1.06 at 512, 0.85-1.0 below).
// Never for A^T B (dW = G^T X: 0.85-1.06) or a side under 32 (the MLP's 10-logit layer: 0.4-0.8;
// the own kernel spends most of its time packing the long operand, which serves only a few rows).
// Session 5 sped up the own kernel's G^T X (panels packed inside the tiles) and looked for shapes
// to give it by default; none measured faster where it counts, the MLP step's eight products in
// sequence (bench_gemm BM_MlpGemmsChaingrad/1024, 2 threads, 8-10 interleaved rounds): own for
// G W with m >= 512 and G^T X with n >= 2m gave 0.97-0.99x oneDNN's GFLOP/s, each alone 1.003x
// and 0.997x, all within noise. Products in isolation disagreed between harnesses (G W
// 1024x256x256 own/oneDNN 1.04-1.10 with hot operands called back to back, 0.98 in BM_MlpProduct),
// so no default rests on them (BENCHMARKS.md, "The products").
// The choice depends on the shape only, never on the thread count, so results stay the same for
// any thread count. Unset, the products go to oneDNN except the thin ones (use_thin_sgemm);
// CHAINGRAD_SGEMM=onednn keeps every product on oneDNN, thin ones included.
bool use_own_sgemm(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k) {
  static const bool own = [] {
    const char* e = std::getenv("CHAINGRAD_SGEMM");
    return sgemm_avx512_available() && e && std::string(e) == "own";
  }();
  if (!own || ta || std::min(n, k) < 32) return false;
  return m >= (tb ? 1024 : 512);
}

// Whether gemm<float> runs the whole product on sgemm_thin.cpp's kernels: a side of at most 16
// (a layer with a few outputs), unless CHAINGRAD_SGEMM=onednn.
bool use_thin_sgemm(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k) {
  static const bool allowed = [] {
    const char* e = std::getenv("CHAINGRAD_SGEMM");
    return !(e && std::string(e) == "onednn");
  }();
  return allowed && sgemm_thin_applies(ta, tb, m, n, k);
}

// Whether gemm<float> copies A^T into a buffer first and runs A^T B as a plain A B product.
// Where oneDNN has no AVX-512 (an AMD EPYC, Zen 3), its A^T B kernels ran the weight gradients
// (dW = G^T X, k = the batch) 10-14% slower than its A B kernels on the copy, which costs 1-4% of
// the product while A fits in L2; the MLP's training step was 4-9% shorter at batch 128-512. At
// batch 1024 and 32 the steps were level, so the copy is made only for 64 <= k <= 512, and for
// m, n >= 128, where it was measured (BENCHMARKS.md, "Session 15: weight gradients through a
// transposed copy"). On the AVX-512 machine of sessions 3-9 the layouts ran within 5% of each
// other, so there products run as called. CHAINGRAD_SGEMM_TN=direct or =transposed overrides the
// choice, for A/B runs. Like the other choices here it depends on the shape, never on the
// thread count.
bool transpose_a_first(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k) {
  static const bool on = [] {
    const char* e = std::getenv("CHAINGRAD_SGEMM_TN");
    if (e && std::string(e) == "direct") return false;
    if (e && std::string(e) == "transposed") return true;
    return !onednn_has_avx512();
  }();
  return on && ta && !tb && m >= 128 && m <= 4096 && n >= 128 && k >= 64 && k <= 512;
}

// The kernel of a float32 product (Kernel), in order of precedence.
Kernel float_kernel(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t lda,
                    std::int64_t ldb, std::int64_t ldc) {
  if (use_own_sgemm(ta, tb, m, n, k)) return Kernel::own;
  if (use_thin_sgemm(ta, tb, m, n, k)) return Kernel::thin;
  if (transpose_a_first(ta, tb, m, n, k)) return Kernel::transposed_a;
  if (use_matmul_primitive(ta, tb, m, n, k, lda, ldb, ldc)) return Kernel::matmul;
  return Kernel::sgemm;
}

// A^T B as A' B with A' = A^T in a buffer kept per thread (at most 4096 x 512 floats, 8 MiB).
void gemm_after_transposing_a(std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a,
                              std::int64_t lda, const float* b, std::int64_t ldb, float beta, float* c,
                              std::int64_t ldc) {
  static thread_local std::vector<float> scratch;
  if (scratch.size() < static_cast<std::size_t>(m * k)) scratch.resize(static_cast<std::size_t>(m * k));
  float* at = scratch.data();
  // A is stored k x m; A' (m x k) is its transpose, cut by A's columns (A' rows) across the pool.
  parallel_units((m + 7) / 8, m * k, [&](std::int64_t lo, std::int64_t hi) {
    transpose_f32(a, k, m, lda, at, k, lo * 8, std::min(m, hi * 8));
  });
  split_gemm(false, false, m, n, k, alpha, static_cast<const float*>(at), k, b, ldb, beta, c, ldc,
             Kernel::sgemm);
}

std::atomic<bool> profiling{false};
std::atomic<std::uint64_t> profiled_calls{0}, profiled_flops{0}, profiled_ns{0};

}  // namespace

void set_gemm_profiling(bool on) {
  if (on) {
    profiled_calls = 0;
    profiled_flops = 0;
    profiled_ns = 0;
  }
  profiling.store(on, std::memory_order_relaxed);
}

GemmProfile gemm_profile() {
  return {profiled_calls.load(), static_cast<double>(profiled_flops.load()), static_cast<double>(profiled_ns.load()) * 1e-9};
}

namespace {
// Runs a product, timing it when gemm_profile is on.
template <class Run>
void profiled(std::int64_t m, std::int64_t n, std::int64_t k, Run&& run) {
  if (!profiling.load(std::memory_order_relaxed)) [[likely]]
    return run();
  const auto t0 = std::chrono::steady_clock::now();
  run();
  const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0);
  profiled_calls.fetch_add(1, std::memory_order_relaxed);
  profiled_flops.fetch_add(static_cast<std::uint64_t>(2 * m * n * k), std::memory_order_relaxed);
  profiled_ns.fetch_add(static_cast<std::uint64_t>(ns.count()), std::memory_order_relaxed);
}
}  // namespace

template <class T>
void gemm(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, T alpha, const T* a, std::int64_t lda,
          const T* b, std::int64_t ldb, T beta, T* c, std::int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) return scale_only(m, n, beta, c, ldc);
  profiled(m, n, k, [&] {
    Kernel kernel = Kernel::sgemm;
    if constexpr (std::is_same_v<T, float>) {
      kernel = float_kernel(ta, tb, m, n, k, lda, ldb, ldc);
      if (kernel == Kernel::own) return sgemm_avx512(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
      if (kernel == Kernel::transposed_a) return gemm_after_transposing_a(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    }
    split_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, kernel);
  });
}

template <class T>
void gemm_bias_relu(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, const T* a, std::int64_t lda,
                    const T* b, std::int64_t ldb, const T* bias, bool relu, T* c) {
  if (m == 0 || n == 0) return;
  if constexpr (std::is_same_v<T, float>) {
    if (k > 0 && float_kernel(ta, tb, m, n, k, lda, ldb, n) == Kernel::matmul) {
      profiled(m, n, k, [&] {
        split_gemm(ta, tb, m, n, k, 1.0f, a, lda, b, ldb, 0.0f, c, n, Kernel::matmul, Epilogue{bias, relu});
      });
      return;
    }
  }
  if (bias)
    parallel_units(m, m * n, [&](std::int64_t lo, std::int64_t hi) { fill_rows(bias, hi - lo, n, c + lo * n, n); });
  gemm<T>(ta, tb, m, n, k, T(1), a, lda, b, ldb, bias ? T(1) : T(0), c, n);
  if (relu) parallel_units(m, m * n, [&](std::int64_t lo, std::int64_t hi) { relu_rows(hi - lo, n, c + lo * n, n); });
}

void gemm_onednn(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a,
                 std::int64_t lda, const float* b, std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) return scale_only(m, n, beta, c, ldc);
  split_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, Kernel::sgemm);
}

bool gemm_same_bits_any_threads() { return onednn_has_avx512(); }

void warm_up_gemm() {
  static std::once_flag once;
  std::call_once(once, [] {
    // Every transposition, beta 0 and 1, at sizes on both sides of oneDNN's small-matrix paths.
    const std::int64_t sizes[][3] = {{256, 256, 256}, {32, 256, 256}, {256, 10, 256}, {10, 256, 256}, {256, 256, 10}};
    std::vector<float> a(256 * 256, 0.5f), b(256 * 256, 0.25f), c(256 * 256, 0.f);
    for (const auto& s : sizes)
      for (int t = 0; t < 4; ++t) {
        const bool ta = t & 1, tb = t & 2;
        const std::int64_t m = s[0], n = s[1], k = s[2];
        for (const float beta : {0.f, 1.f})
          serial_gemm(ta, tb, m, n, k, 1.f, a.data(), ta ? m : k, b.data(), tb ? k : n, beta, c.data(), n,
                      Kernel::sgemm);
      }
  });
}

template <class T>
void gemm_batched(bool ta, bool tb, std::int64_t batch, std::int64_t m, std::int64_t n, std::int64_t k, T alpha,
                  const T* a, std::int64_t lda, std::int64_t stride_a, const T* b, std::int64_t ldb,
                  std::int64_t stride_b, T beta, T* c, std::int64_t ldc, std::int64_t stride_c) {
  auto product = [&](std::int64_t i) {
    gemm<T>(ta, tb, m, n, k, alpha, a + i * stride_a, lda, b + i * stride_b, ldb, beta, c + i * stride_c, ldc);
  };
  // Products too small to be cut (attention's heads, say) go to the threads whole, a range of the
  // batch each; inside a task gemm runs on its thread (parallel_for nests inline). Each product is
  // still one call on one thread, so the bits are those of the loop below.
  const double flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  const int parts = static_cast<int>(std::min<std::int64_t>(num_threads(), batch));
  if (parts > 1 && flops < kMinParallelFlops && flops * static_cast<double>(batch) >= kMinParallelFlops) {
    parallel_for(parts, [&](int p) {
      for (std::int64_t i = batch * p / parts; i < batch * (p + 1) / parts; ++i) product(i);
    });
    return;
  }
  for (std::int64_t i = 0; i < batch; ++i) product(i);
}

template void gemm<float>(bool, bool, std::int64_t, std::int64_t, std::int64_t, float, const float*, std::int64_t,
                          const float*, std::int64_t, float, float*, std::int64_t);
template void gemm<double>(bool, bool, std::int64_t, std::int64_t, std::int64_t, double, const double*, std::int64_t,
                           const double*, std::int64_t, double, double*, std::int64_t);
template void gemm_bias_relu<float>(bool, bool, std::int64_t, std::int64_t, std::int64_t, const float*, std::int64_t,
                                    const float*, std::int64_t, const float*, bool, float*);
template void gemm_bias_relu<double>(bool, bool, std::int64_t, std::int64_t, std::int64_t, const double*, std::int64_t,
                                     const double*, std::int64_t, const double*, bool, double*);

template void gemm_batched<float>(bool, bool, std::int64_t, std::int64_t, std::int64_t, std::int64_t, float,
                                  const float*, std::int64_t, std::int64_t, const float*, std::int64_t, std::int64_t,
                                  float, float*, std::int64_t, std::int64_t);
template void gemm_batched<double>(bool, bool, std::int64_t, std::int64_t, std::int64_t, std::int64_t, double,
                                   const double*, std::int64_t, std::int64_t, const double*, std::int64_t,
                                   std::int64_t, double, double*, std::int64_t, std::int64_t);

}  // namespace chaingrad::kernels
