#pragma once
// chaingrad's own float32 GEMM for CPUs with AVX-512F: BLIS-style packing of A and B into
// micro-panels, a register-blocked micro-kernel, cache blocking, and chaingrad's thread pool.
// sgemm_avx512.cpp describes the design; gemm.cpp decides when it runs instead of oneDNN.
#include <cstdint>

namespace chaingrad::kernels {

// True when the CPU running this process has AVX-512F (checked once, at run time: the library may
// be built without -march=native).
bool sgemm_avx512_available();

// C = alpha op(A) op(B) + beta C, row-major, BLAS semantics (beta = 0 overwrites C, NaN included).
// Splits the product over kernels::num_threads() threads of the pool when it is large enough. Every
// element of C is summed over k in the same order whatever the thread count, so the result does
// not depend on it. Requires sgemm_avx512_available(), m, n, k >= 1.
void sgemm_avx512(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                  const float* a, std::int64_t lda, const float* b, std::int64_t ldb, float beta, float* c,
                  std::int64_t ldc);

}  // namespace chaingrad::kernels
