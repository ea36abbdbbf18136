#pragma once
// One thread's block of a float32 product on oneDNN's matmul primitive, which on a CPU with
// AVX-512 runs its brgemm kernels (gemm.cpp, use_matmul_primitive, says where and why).
#include <cstdint>

namespace chaingrad::kernels {

// What the primitive applies to each tile of C as it writes it: a bias added to every row (n
// values), then relu (which gives 0 for a NaN).
struct Epilogue {
  const float* bias = nullptr;
  bool relu = false;
};

// C = alpha op(A) op(B) + beta C, then the epilogue, row-major, on the calling thread. False where
// oneDNN has no primitive for it (the caller then runs the product another way).
bool matmul_onednn(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                   const float* a, std::int64_t lda, const float* b, std::int64_t ldb, float beta, float* c,
                   std::int64_t ldc, Epilogue epilogue = {});

}  // namespace chaingrad::kernels
