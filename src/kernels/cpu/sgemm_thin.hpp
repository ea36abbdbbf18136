#pragma once
// float32 products with one side of at most kThinMax: the layer that maps features to a few
// logits (the MLP's 784-256-256-10 has three of them per step: Y = X W^T with n = 10, dX = G W
// with k = 10, dW = G^T X with m = 10). General GEMM kernels, oneDNN's and sgemm_avx512 alike,
// spend most of such a product packing the long operand for a tile they fill with a few columns;
// these kernels read both operands where they lie and keep the short side in registers.
// sgemm_thin.cpp says how; BENCHMARKS.md ("The thin products") what they measured.
#include <cstdint>

namespace chaingrad::kernels {

inline constexpr std::int64_t kThinMax = 16;

// Whether sgemm_thin takes this product: AVX-512F, and A B^T with n <= kThinMax, A B with
// k <= kThinMax, or A^T B with m <= kThinMax.
bool sgemm_thin_applies(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k);

// C = alpha op(A) op(B) + beta C on the calling thread, row-major, BLAS semantics (beta = 0
// overwrites C, NaN included). Requires sgemm_thin_applies(...) and m, n, k >= 1. Each element of
// C is summed over k in an order that depends on k only, so a caller may cut C into row or
// column blocks (one per thread) without changing the result.
void sgemm_thin(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                const float* a, std::int64_t lda, const float* b, std::int64_t ldb, float beta, float* c,
                std::int64_t ldc);

}  // namespace chaingrad::kernels
