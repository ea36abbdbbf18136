#pragma once
// 2-D convolution on contiguous NCHW data, a chunk of nb samples at a time: the chunk's patches are
// unrolled (im2col) into a scratch buffer that stays in L2, and one GEMM per chunk computes it.
// With nb = 1 the GEMM reads or writes the NCHW tensor in place; with nb > 1 (small Ho*Wo, where a
// single sample makes too thin a product) its [O, nb*Ho*Wo] result or operand is copied from or to
// NCHW while still in cache. Either way there is no batch-sized [O, N*Ho*Wo] intermediate and no
// permute pass over memory. No autograd.
//
//   forward          out[n]  = W [O, CKK] x cols(x[n]) [CKK, HoWo]   (+ bias, as the GEMM's C operand)
//   backward input   dx[n]   = col2im(W^T [CKK, O] x g[n] [O, HoWo])
//   backward weight  dW      = sum_n g[n] [O, HoWo] x cols(x[n])^T [HoWo, CKK]
//   backward bias    db[o]   = sum_{n, hw} g[n, o, hw]
// where CKK = C*kh*kw and cols(.) has row (c, i, j) and column (ho, wo).
#include <cstdint>
#include <functional>

namespace chaingrad::kernels {

struct ConvShape {
  std::int64_t N, C, H, W;            // input
  std::int64_t O, kh, kw;             // weight [O, C, kh, kw]
  std::int64_t stride, pad, dil;
  std::int64_t Ho, Wo;                // output

  std::int64_t ckk() const { return C * kh * kw; }
  std::int64_t out_plane() const { return Ho * Wo; }
  // A 1x1 kernel with unit stride and no padding: the image is its own column matrix.
  bool pointwise() const { return kh == 1 && kw == 1 && stride == 1 && pad == 0; }
};

// Calls fn(lo, hi) on blocks that cover [0, items) once, in parallel on chaingrad's pool when the
// work (items * work_per_item element operations) is worth it. The blocks are cut by the sizes
// alone, never by the thread count, and fn must write disjoint outputs per item, so results do not
// depend on the number of threads. fn must not call gemm (a product inside a parallel_for would
// wait for the pool that runs it).
inline constexpr int kMaxBlocks = 8;
void parallel_blocks(std::int64_t items, std::int64_t work_per_item,
                     const std::function<void(std::int64_t, std::int64_t)>& fn);

// cols [C*kh*kw, N*Ho*Wo] <- patches of img [N, C, H, W] (column order (n, ho, wo)); O is unused.
template <class T>
void im2col(const ConvShape& s, const T* img, T* cols);
// img [N, C, H, W] += the adjoint of im2col applied to cols.
template <class T>
void col2im_add(const ConvShape& s, const T* cols, T* img);

// The three passes below run float32 on oneDNN's direct convolution where it takes the shape
// (conv_onednn.hpp) and everything else on im2col + GEMM; the *_im2col variants are the latter only.

// out [N, O, Ho, Wo] = conv(x [N, C, H, W], w [O, C, kh, kw]) + bias [O] (bias may be null).
template <class T>
void conv2d_forward(const ConvShape& s, const T* x, const T* w, const T* bias, T* out);
// dx [N, C, H, W] = the adjoint of conv(., w) applied to g [N, O, Ho, Wo] (overwrites dx).
template <class T>
void conv2d_backward_input(const ConvShape& s, const T* g, const T* w, T* dx);
// dw [O, C, kh, kw] = the adjoint of conv(x, .) applied to g (overwrites dw); with db, also
// db = conv2d_backward_bias(g) in the same pass over g (up to float rounding).
template <class T>
void conv2d_backward_weight(const ConvShape& s, const T* g, const T* x, T* dw, T* db = nullptr);
template <class T>
void conv2d_forward_im2col(const ConvShape& s, const T* x, const T* w, const T* bias, T* out);
template <class T>
void conv2d_backward_input_im2col(const ConvShape& s, const T* g, const T* w, T* dx);
template <class T>
void conv2d_backward_weight_im2col(const ConvShape& s, const T* g, const T* x, T* dw);
// db [O] = sum of g [N, O, Ho, Wo] over n, ho, wo (float sums are accumulated in double per plane).
template <class T>
void conv2d_backward_bias(const ConvShape& s, const T* g, T* db);

}  // namespace chaingrad::kernels
