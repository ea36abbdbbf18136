#pragma once
// C = alpha op(A) op(B) + beta C, row-major, BLAS semantics. float32 runs on oneDNN's sgemm (or, with
// CHAINGRAD_SGEMM=own on a CPU with AVX-512F, on chaingrad's own kernel for some shapes:
// sgemm_avx512.hpp), except products with a side of at most 16, which run on chaingrad's thin
// kernels where the CPU has AVX-512F (sgemm_thin.hpp; CHAINGRAD_SGEMM=onednn turns them off);
// float64 on OpenBLAS, split across chaingrad's thread pool (gemm.cpp says why). Where oneDNN has no
// AVX-512, A^T B with a short k runs as A B on a transposed copy of A (gemm.cpp, transpose_a_first).
#include <cstdint>

namespace chaingrad::kernels {

template <class T>
void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, T alpha, const T* a,
          std::int64_t lda, const T* b, std::int64_t ldb, T beta, T* c, std::int64_t ldc);

// C = op(A) op(B) + bias (added to every row; null: none), then relu if asked (a NaN becomes 0);
// C is m x n, dense. A linear layer's forward. Where gemm<float> would run the product on oneDNN's
// matmul primitive (gemm.cpp, use_matmul_primitive), the bias and relu are applied as each tile of
// C is written; elsewhere the bias is copied into C for a product with beta 1, and relu is one
// more pass over C.
template <class T>
void gemm_bias_relu(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, const T* a,
                    std::int64_t lda, const T* b, std::int64_t ldb, const T* bias, bool relu, T* c);

// gemm over a batch of products: operand i starts stride_* elements after operand i - 1 (a stride
// of 0 repeats one matrix).
template <class T>
void gemm_batched(bool trans_a, bool trans_b, std::int64_t batch, std::int64_t m, std::int64_t n, std::int64_t k,
                  T alpha, const T* a, std::int64_t lda, std::int64_t stride_a, const T* b, std::int64_t ldb,
                  std::int64_t stride_b, T beta, T* c, std::int64_t ldc, std::int64_t stride_c);

// The oneDNN path of gemm<float> whatever the CPU: for benchmarks that compare it with the own kernel.
void gemm_onednn(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                 const float* a, std::int64_t lda, const float* b, std::int64_t ldb, float beta, float* c,
                 std::int64_t ldc);

// Whether gemm<float> gives the same bits on every thread count. It cuts C into one block per
// thread and runs each block as a product of its own, so it does exactly when the block's kernel
// sums every element in an order that does not depend on the block's shape. The own and thin
// kernels do by construction, oneDNN's AVX-512 sgemm did on every shape of tests/test_sgemm.cpp's
// main lists, and its matmul primitive does on the blocks gemm.cpp gives it (use_matmul_primitive).
// Not everywhere, though: session 20 found oneDNN's sgemm changing bits on padded operands (rows
// longer than the matrix): 257 x 256 x 784 A B^T with rows padded by one, cut into 128 + 129 rows,
// and 45 x 600 x 830 padded by five at 7 threads, cut into columns 80 and 96 wide. Tensors'
// products run on dense operands, except on views. oneDNN's AVX2 kernels do not keep the bits:
// they pick their blocking by the block's shape. On an AMD EPYC with AVX2, row cuts changed bits at
// every alignment tried (1 to 192 rows), and column cuts at multiples of 16 changed them on 38 of
// 150 random shapes. There 1 and 2 threads agree to rounding only.
bool gemm_same_bits_any_threads();

// The time and work of the products since profiling was last switched on, so that a benchmark can
// measure the products inside a real training step rather than in a loop of their own (the
// operands are then where the step leaves them, in cache or not). Off by default, when a product
// pays one relaxed atomic load for it. Products that run at the same time on several threads (the
// convolution's per-sample ones) each add their own wall time, so `seconds` may exceed the elapsed time.
struct GemmProfile {
  std::uint64_t calls = 0;
  double flops = 0;    // 2 m n k per product
  double seconds = 0;  // wall time inside gemm<T>, summed over calls
};
void set_gemm_profiling(bool on);  // on: also clears the totals
GemmProfile gemm_profile();

// oneDNN generates the machine code of its sgemm kernels the first time each kind of product runs:
// about 30 ms on this project's machine, most of it for the first A^T B product. This runs one
// product of each layout, so that a caller can pay that cost when it suits it (`chaingrad train`:
// on another thread while the data set loads). Any thread may call it; only the first call works.
// chaingrad's own kernel (CHAINGRAD_SGEMM=own) is compiled ahead of time and needs no warm-up.
void warm_up_gemm();

}  // namespace chaingrad::kernels
