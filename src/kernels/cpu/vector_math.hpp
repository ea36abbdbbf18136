#pragma once
// float32 transcendental functions over contiguous arrays, 16 (AVX-512) or 8 (AVX2) lanes at a time
// through glibc's libmvec: std::exp on each element does not vectorize, and was 10x slower than
// PyTorch's sigmoid on 1M elements. Each lane is computed on its own, so a result does not depend
// on where an array is cut (thread count) or on its length. x and y may be the same array.
#include <cstdint>

namespace chaingrad::kernels {

void vexp(const float* x, float* y, std::int64_t n);
void vlog(const float* x, float* y, std::int64_t n);
void vtanh(const float* x, float* y, std::int64_t n);
void verf(const float* x, float* y, std::int64_t n);
void vlog1p(const float* x, float* y, std::int64_t n);
void vexpm1(const float* x, float* y, std::int64_t n);
// 1 / (1 + e^-x), from e^-|x| so that neither side overflows.
void vsigmoid(const float* x, float* y, std::int64_t n);
// log(1 + e^x) = max(x, 0) + log1p(e^-|x|), finite for any x.
void vsoftplus(const float* x, float* y, std::int64_t n);
// gelu(x) = x Phi(x) = x/2 erfc(-x/sqrt 2), and its backward g (Phi(x) + x phi(x)); relative error
// within about 1e-6 on both sides of 0 (the erf form loses the negative tail to cancellation).
void vgelu(const float* x, float* y, std::int64_t n);
void vgelu_backward(const float* g, const float* x, float* out, std::int64_t n);

// The implementations by lane width (16, 8 or 1), so tests reach every one; null where this CPU
// lacks the instructions. The functions above use the widest.
enum class VectorFn { Exp, Log, Tanh, Erf, Log1p, Expm1 };
using ArrayFn = void (*)(const float*, float*, std::int64_t);
ArrayFn vector_fn_with_lanes(VectorFn fn, int lanes);
using GeluBackwardFn = void (*)(const float* g, const float* x, float* out, std::int64_t n);
ArrayFn gelu_with_lanes(int lanes);
GeluBackwardFn gelu_backward_with_lanes(int lanes);

}  // namespace chaingrad::kernels
