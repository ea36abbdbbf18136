#include "kernels/cpu/sgemm_thin.hpp"

#include <immintrin.h>

#include <algorithm>

#include "kernels/cpu/avx512_util.hpp"
#include "kernels/cpu/sgemm_avx512.hpp"

// Three register-blocked loops, one per thin layout, none packing anything:
//  - A B^T, n small (the logits Y = X W^T): every C[i][j] is a dot product of two rows, A's i-th
//    and B's j-th. Up to four rows of A against up to eight of B at a time (24 accumulators at
//    most), 16 lanes of k per step; the column groups follow each other on the same rows of A
//    (then in L1); each accumulator is summed across its lanes at the end, eight at once
//    (sum_lanes8), so C[i][j] = sum over lanes of (sum over k steps), an order fixed by k alone.
//  - A B, k small (dX = G W): a rank-k update. Six rows of C by four vectors of columns, one row
//    of B (a few KB, in L1 throughout) loaded per k and multiplied by broadcasts of A.
//  - A^T B, m small (dW = G^T X): up to twelve rows of C by a strip of columns in registers while
//    k streams past, so B is read once: per k one row of B's strip and a broadcast per row of C.
// In the last two every element of C is a plain sum over k in order. On the MLP's three thin
// products they run 1.1-1.8x oneDNN's speed (BENCHMARKS.md, "The thin products").
// Every function that runs AVX-512 instructions carries target("avx512f"), as in sgemm_avx512.cpp.

// GCC 12's shuffle, mask and set intrinsics start from an undefined register, which
// -W(maybe-)uninitialized reports at every use (a false positive: every lane used is written).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace chaingrad::kernels {
namespace {

// Fully unrolled, so that GCC keeps the accumulator arrays in registers (left as loops, it stores
// them to the stack on every k step).
#define CG_UNROLL _Pragma("GCC unroll 32")

// C = alpha acc + beta C on the lanes in `mask` (beta = 0 does not read C).
CG_AVX512 inline void store_c(float* c, __m512 acc, __mmask16 mask, float alpha, float beta) {
  __m512 r = _mm512_mul_ps(acc, _mm512_set1_ps(alpha));
  if (beta != 0.0f) r = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, c), _mm512_set1_ps(beta), r);
  _mm512_mask_storeu_ps(c, mask, r);
}

// The lane sums of v[0..7], in lanes 0..7 of the result (lanes 8..15 hold copies). All in 512-bit
// registers: GCC 12 reports its own 256-bit extract and insert intrinsics as uninitialized.
CG_AVX512 inline __m512 sum_lanes8(const __m512 v[8]) {
  __m512 t[4], u[2];
  // Within each 128-bit block: t[i] = [a0+a2, b0+b2, a1+a3, b1+b3] for a = v[2i], b = v[2i+1].
  CG_UNROLL
  for (int i = 0; i < 4; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  // u[h] = each block's sums of v[4h..4h+3].
  CG_UNROLL
  for (int h = 0; h < 2; ++h) {
    const __m512d x = _mm512_castps_pd(t[2 * h]), y = _mm512_castps_pd(t[2 * h + 1]);
    u[h] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // Blocks [u0.0+u0.1, u0.2+u0.3, u1.0+u1.1, u1.2+u1.3], then each pair of blocks summed.
  const __m512 w = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 z = _mm512_add_ps(w, _mm512_shuffle_f32x4(w, w, 0xB1));
  return _mm512_shuffle_f32x4(z, z, 0x08);
}

// ---- A B^T with n small: rows [0, R) of A against columns [0, NB) of B^T ----
template <int R, int NB>
CG_AVX512 __attribute__((always_inline)) inline void nt_step(__m512 (&acc)[R][8], const float* a, std::int64_t lda,
                                                            const float* b, std::int64_t ldb, __mmask16 mask) {
  __m512 av[R];
  CG_UNROLL
  for (int r = 0; r < R; ++r) av[r] = _mm512_maskz_loadu_ps(mask, a + r * lda);
  CG_UNROLL
  for (int j = 0; j < NB; ++j) {
    const __m512 bv = _mm512_maskz_loadu_ps(mask, b + j * ldb);
    CG_UNROLL
    for (int r = 0; r < R; ++r) acc[r][j] = _mm512_fmadd_ps(av[r], bv, acc[r][j]);
  }
}

template <int R, int NB>
CG_AVX512 void nt_block(std::int64_t k, float alpha, const float* a, std::int64_t lda, const float* b,
                        std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
  __m512 acc[R][8];
  CG_UNROLL
  for (int r = 0; r < R; ++r)
    CG_UNROLL
    for (int j = 0; j < 8; ++j) acc[r][j] = _mm512_setzero_ps();
  std::int64_t p = 0;
  for (; p + 16 <= k; p += 16) nt_step<R, NB>(acc, a + p, lda, b + p, ldb, 0xFFFF);
  if (p < k) nt_step<R, NB>(acc, a + p, lda, b + p, ldb, lanes(k - p));
  CG_UNROLL
  for (int r = 0; r < R; ++r) store_c(c + r * ldc, sum_lanes8(acc[r]), lanes(NB), alpha, beta);
}

// Rows [0, R) of C, columns in groups of at most eight (each group's R x NB accumulators fit in
// registers); the groups follow each other on the same rows of A, which are then in L1.
template <int R>
CG_AVX512 void nt_rows(std::int64_t n, std::int64_t k, float alpha, const float* a, std::int64_t lda, const float* b,
                       std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
  const std::int64_t groups = (n + 7) / 8;
  for (std::int64_t g = 0, j0 = 0; g < groups; ++g) {
    const std::int64_t j1 = n * (g + 1) / groups;
    const float* bj = b + j0 * ldb;
    float* cj = c + j0;
    switch (j1 - j0) {
      case 1: nt_block<R, 1>(k, alpha, a, lda, bj, ldb, beta, cj, ldc); break;
      case 2: nt_block<R, 2>(k, alpha, a, lda, bj, ldb, beta, cj, ldc); break;
      case 3: nt_block<R, 3>(k, alpha, a, lda, bj, ldb, beta, cj, ldc); break;
      case 4: nt_block<R, 4>(k, alpha, a, lda, bj, ldb, beta, cj, ldc); break;
      case 5: nt_block<R, 5>(k, alpha, a, lda, bj, ldb, beta, cj, ldc); break;
      case 6: nt_block<R, 6>(k, alpha, a, lda, bj, ldb, beta, cj, ldc); break;
      case 7: nt_block<R, 7>(k, alpha, a, lda, bj, ldb, beta, cj, ldc); break;
      default: nt_block<R, 8>(k, alpha, a, lda, bj, ldb, beta, cj, ldc); break;
    }
    j0 = j1;
  }
}

CG_AVX512 void thin_nt(std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a, std::int64_t lda,
                       const float* b, std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
  // Groups as even as possible (10 = 5 + 5); four rows at a time when no group is wider than six
  // (accumulators R x NB <= 24 of the 32 registers). (One group of ten, two rows at a time,
  // measured 1.3-1.6x slower: twelve loads per 20 FMAs.)
  const std::int64_t widest = (n + (n + 7) / 8 - 1) / ((n + 7) / 8);
  std::int64_t i = 0;
  if (widest <= 6) {
    for (; i + 4 <= m; i += 4) nt_rows<4>(n, k, alpha, a + i * lda, lda, b, ldb, beta, c + i * ldc, ldc);
  } else {
    for (; i + 3 <= m; i += 3) nt_rows<3>(n, k, alpha, a + i * lda, lda, b, ldb, beta, c + i * ldc, ldc);
  }
  for (; i < m; ++i) nt_rows<1>(n, k, alpha, a + i * lda, lda, b, ldb, beta, c + i * ldc, ldc);
}

// ---- A B with k small, A^T B with m small: rank-1 updates, rows [0, R) of C by V vectors of
// columns, k streaming; element (r, p) of op(A) is a[p * lda + r] when TA (A^T), else a[r * lda + p] ----
template <bool TA, int R, int V>
CG_AVX512 void rank_block(std::int64_t k, float alpha, const float* a, std::int64_t lda, const float* b,
                          std::int64_t ldb, float beta, float* c, std::int64_t ldc, std::int64_t cols) {
  __mmask16 mask[V];
  CG_UNROLL
  for (int v = 0; v < V; ++v) mask[v] = lanes(cols - 16 * v);
  __m512 acc[R][V];
  CG_UNROLL
  for (int r = 0; r < R; ++r)
    CG_UNROLL
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (std::int64_t p = 0; p < k; ++p) {
    __m512 bv[V];
    CG_UNROLL
    for (int v = 0; v < V; ++v) bv[v] = _mm512_maskz_loadu_ps(mask[v], b + p * ldb + 16 * v);
    CG_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(TA ? a[p * lda + r] : a[r * lda + p]);
      CG_UNROLL
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  CG_UNROLL
  for (int r = 0; r < R; ++r)
    CG_UNROLL
    for (int v = 0; v < V; ++v) store_c(c + r * ldc + 16 * v, acc[r][v], mask[v], alpha, beta);
}

// Rows [0, R) of C across all n columns.
template <bool TA, int R>
CG_AVX512 void rank_rows(std::int64_t n, std::int64_t k, float alpha, const float* a, std::int64_t lda,
                         const float* b, std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
  constexpr int V = 24 / R < 4 ? 24 / R : 4;  // accumulators R x V <= 24 of the 32 registers
  std::int64_t j = 0;
  for (; j + 16 * V <= n; j += 16 * V) rank_block<TA, R, V>(k, alpha, a, lda, b + j, ldb, beta, c + j, ldc, 16 * V);
  for (; j < n; j += 16) rank_block<TA, R, 1>(k, alpha, a, lda, b + j, ldb, beta, c + j, ldc, n - j);
}

CG_AVX512 void thin_nn(std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a, std::int64_t lda,
                       const float* b, std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
  constexpr int R = 6;
  std::int64_t i = 0;
  for (; i + R <= m; i += R) rank_rows<false, R>(n, k, alpha, a + i * lda, lda, b, ldb, beta, c + i * ldc, ldc);
  for (; i < m; ++i) rank_rows<false, 1>(n, k, alpha, a + i * lda, lda, b, ldb, beta, c + i * ldc, ldc);
}

CG_AVX512 void thin_tn(std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a, std::int64_t lda,
                       const float* b, std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
  // Rows in groups of at most twelve, as even as possible, so that B streams past once for up to
  // twelve rows (the MLP's 10: 2 vectors of columns at a time; as 5 + 5 rows, 0.8x oneDNN's speed
  // at k = 1024, where B no longer fits in L2 twice).
  const std::int64_t groups = (m + 11) / 12;
  for (std::int64_t g = 0, i0 = 0; g < groups; ++g) {
    const std::int64_t i1 = m * (g + 1) / groups;
    const float* ai = a + i0;
    float* ci = c + i0 * ldc;
    switch (i1 - i0) {
      case 1: rank_rows<true, 1>(n, k, alpha, ai, lda, b, ldb, beta, ci, ldc); break;
      case 2: rank_rows<true, 2>(n, k, alpha, ai, lda, b, ldb, beta, ci, ldc); break;
      case 3: rank_rows<true, 3>(n, k, alpha, ai, lda, b, ldb, beta, ci, ldc); break;
      case 4: rank_rows<true, 4>(n, k, alpha, ai, lda, b, ldb, beta, ci, ldc); break;
      case 5: rank_rows<true, 5>(n, k, alpha, ai, lda, b, ldb, beta, ci, ldc); break;
      case 6: rank_rows<true, 6>(n, k, alpha, ai, lda, b, ldb, beta, ci, ldc); break;
      case 7: rank_rows<true, 7>(n, k, alpha, ai, lda, b, ldb, beta, ci, ldc); break;
      case 8: rank_rows<true, 8>(n, k, alpha, ai, lda, b, ldb, beta, ci, ldc); break;
      case 9: rank_rows<true, 9>(n, k, alpha, ai, lda, b, ldb, beta, ci, ldc); break;
      case 10: rank_rows<true, 10>(n, k, alpha, ai, lda, b, ldb, beta, ci, ldc); break;
      case 11: rank_rows<true, 11>(n, k, alpha, ai, lda, b, ldb, beta, ci, ldc); break;
      default: rank_rows<true, 12>(n, k, alpha, ai, lda, b, ldb, beta, ci, ldc); break;
    }
    i0 = i1;
  }
}

}  // namespace

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

bool sgemm_thin_applies(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k) {
  if (!sgemm_avx512_available()) return false;
  if (!ta && tb) return n <= kThinMax;
  if (!ta && !tb) return k <= kThinMax;
  if (ta && !tb) return m <= kThinMax;
  return false;
}

void sgemm_thin(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a,
                std::int64_t lda, const float* b, std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
  if (!ta && tb) return thin_nt(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  if (!ta && !tb) return thin_nn(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  thin_tn(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace chaingrad::kernels
