#pragma once
// Out-of-place transposition of a float32 matrix: for products that run faster on the other
// layout (gemm.cpp, transpose_a_first), and for copies of transposed float32 tensors (copy.cpp).
#include <cstdint>

namespace chaingrad::kernels {

// dst (cols x rows, row stride ldd) = src^T, src rows x cols with row stride lds; only the dst rows
// [col_lo, col_hi), i.e. the src columns, so that threads can share one transposition.
void transpose_f32(const float* src, std::int64_t rows, std::int64_t cols, std::int64_t lds, float* dst,
                   std::int64_t ldd, std::int64_t col_lo, std::int64_t col_hi);

}  // namespace chaingrad::kernels
