#pragma once
// float32 convolution on oneDNN's direct convolution kernels (its JIT AVX-512 / AVX2 code, which
// works on channel-blocked layouts such as nChw16c). No autograd.
//
// The batch is cut into blocks of a fixed number of samples, chosen from the shape alone; each
// block is one task of chaingrad's pool and runs oneDNN on that thread only (OpenMP held to one
// thread around every call, as in gemm.cpp), so no OpenMP pool spins against chaingrad's. A block
// reorders its NCHW slice into oneDNN's layout, convolves and reorders back while the slice is in
// L2. The weight gradient is summed over the blocks in block order. The blocks and their order do
// not depend on the thread count, so neither do the results: they are bitwise the same for any
// number of threads.
//
// Primitives are created once per (pass, block shape) and cached for the life of the process
// (creation costs milliseconds). Each function returns false, having written nothing, when this path
// does not take the shape (empty dimensions, 1x1 kernels, the input gradient of fewer than 8 input
// channels: passes measured slower than im2col + GEMM there, or
// oneDNN offering only a reference or GEMM-based implementation); the caller then runs im2col + GEMM.
#include "kernels/cpu/conv_kernels.hpp"

namespace chaingrad::kernels::onednn {

// out [N, O, Ho, Wo] = conv(x, w) + bias (bias may be null).
bool conv2d_forward(const ConvShape& s, const float* x, const float* w, const float* bias, float* out);
// dx [N, C, H, W] = the adjoint of conv(., w) applied to g.
bool conv2d_backward_input(const ConvShape& s, const float* g, const float* w, float* dx);
// dw [O, C, kh, kw] = the adjoint of conv(x, .) applied to g, and db [O] = the sum of g over
// n, ho, wo when db is not null.
bool conv2d_backward_weight(const ConvShape& s, const float* g, const float* x, float* dw, float* db = nullptr);

}  // namespace chaingrad::kernels::onednn
