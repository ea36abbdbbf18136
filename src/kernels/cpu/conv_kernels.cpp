#include "kernels/cpu/conv_kernels.hpp"

#include <algorithm>
#include <type_traits>
#include <vector>

#include "kernels/cpu/conv_onednn.hpp"
#include "kernels/cpu/gemm.hpp"
#include "kernels/cpu/parallel.hpp"

namespace chaingrad::kernels {

void parallel_blocks(std::int64_t items, std::int64_t work_per_item,
                     const std::function<void(std::int64_t, std::int64_t)>& fn) {
  if (items <= 0) return;
  // About 64K element operations per task at least: below that, waking a worker costs more.
  const std::int64_t by_work = items * std::max<std::int64_t>(work_per_item, 1) / (1 << 16);
  const int parts = static_cast<int>(std::clamp<std::int64_t>(std::min(by_work, items), 1, kMaxBlocks));
  if (parts == 1) return fn(0, items);
  parallel_for(parts, [&](int p) { fn(items * p / parts, items * (p + 1) / parts); });
}

namespace {

// Per-thread buffers (kSlot 0: a chunk's columns, 1: its [O, nb*P] product or gradient); each grows
// to the largest layer once and is reused, so a warm training step allocates nothing here.
template <class T, int kSlot>
T* scratch(std::int64_t n) {
  thread_local std::vector<T> buf;
  if (static_cast<std::int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// kAdjoint = false: cols <- patches(img). kAdjoint = true: img += adjoint(cols).
// For each kernel offset (i, j) the valid output columns form one contiguous run [lo, hi), so the
// inner loop is a plain (strided when stride > 1) copy or accumulate with no per-element test.
template <class T, bool kAdjoint>
void im2col_kernel(const ConvShape& s, std::conditional_t<kAdjoint, T*, const T*> img,
                   std::conditional_t<kAdjoint, const T*, T*> cols) {
  const std::int64_t L = s.N * s.Ho * s.Wo;
  for (std::int64_t c = 0; c < s.C; ++c)
    for (std::int64_t i = 0; i < s.kh; ++i)
      for (std::int64_t j = 0; j < s.kw; ++j) {
        const std::int64_t row_off = ((c * s.kh + i) * s.kw + j) * L;
        const std::int64_t shift = j * s.dil - s.pad;  // iw = ow * stride + shift
        // lo = first ow with iw >= 0; hi = one past the last ow with iw < W.
        std::int64_t lo = shift >= 0 ? 0 : (-shift + s.stride - 1) / s.stride;
        std::int64_t hi = s.W - shift <= 0 ? 0 : (s.W - shift - 1) / s.stride + 1;
        lo = std::min(lo, s.Wo);
        hi = std::clamp(hi, lo, s.Wo);
        for (std::int64_t n = 0; n < s.N; ++n) {
          const std::int64_t plane = (n * s.C + c) * s.H * s.W;
          for (std::int64_t oh = 0; oh < s.Ho; ++oh) {
            const std::int64_t ih = oh * s.stride - s.pad + i * s.dil;
            const std::int64_t r_off = row_off + (n * s.Ho + oh) * s.Wo;
            if constexpr (kAdjoint) {
              if (ih < 0 || ih >= s.H) continue;
              if (lo == hi) continue;
              T* src = img + plane + ih * s.W + lo * s.stride + shift;  // column lo*stride + shift >= 0
              const T* r = cols + r_off + lo;
              if (s.stride == 1)
                for (std::int64_t k = 0; k < hi - lo; ++k) src[k] += r[k];
              else
                for (std::int64_t k = 0; k < hi - lo; ++k) src[k * s.stride] += r[k];
            } else {
              T* r = cols + r_off;
              if (ih < 0 || ih >= s.H) {
                std::fill(r, r + s.Wo, T(0));
                continue;
              }
              std::fill(r, r + lo, T(0));
              if (lo < hi) {
                const T* src = img + plane + ih * s.W + lo * s.stride + shift;  // column lo*stride + shift >= 0
                if (s.stride == 1)
                  for (std::int64_t k = 0; k < hi - lo; ++k) r[lo + k] = src[k];
                else
                  for (std::int64_t k = 0; k < hi - lo; ++k) r[lo + k] = src[k * s.stride];
              }
              std::fill(r + hi, r + s.Wo, T(0));
            }
          }
        }
      }
}

// The same as im2col_kernel for stride 1 and Wo == W ("same" width, e.g. 3x3 with padding 1):
// then row (c, i, j) of one sample is the image plane shifted by dr = i*dil - pad rows and
// dc = j*dil - pad columns, so it is one flat copy of ~H*W elements plus zeros in the |dc| columns
// that wrapped around and in the rows outside the image. The adjoint zeroes those wrapped columns
// of `cols` in place first (cols is the caller's scratch), then adds one flat run.
bool flat_rows(const ConvShape& s) { return s.stride == 1 && s.Wo == s.W; }

template <class T, bool kAdjoint>
void im2col_flat(const ConvShape& s, std::conditional_t<kAdjoint, T*, const T*> img, T* cols) {
  const std::int64_t W = s.W, HW = s.H * s.W, P = s.Ho * W, L = s.N * P;
  // Each (channel, sample) pair owns its image plane and its column segments: one task each.
  parallel_blocks(s.C * s.N, s.kh * s.kw * P, [&](std::int64_t t0, std::int64_t t1) {
    for (std::int64_t t = t0; t < t1; ++t) {
      const std::int64_t c = t / s.N, n = t % s.N;
      auto plane = img + (n * s.C + c) * HW;
      for (std::int64_t i = 0; i < s.kh; ++i)
        for (std::int64_t j = 0; j < s.kw; ++j) {
          const std::int64_t dr = i * s.dil - s.pad, dc = j * s.dil - s.pad, off = dr * W + dc;
          const std::int64_t oh_lo = std::clamp<std::int64_t>(-dr, 0, s.Ho);
          const std::int64_t oh_hi = std::clamp<std::int64_t>(s.H - dr, oh_lo, s.Ho);
          const std::int64_t k_lo = oh_lo * W, k_hi = oh_hi * W;
          const std::int64_t a = std::clamp<std::int64_t>(-off, k_lo, k_hi);  // flat source in bounds
          const std::int64_t b = std::clamp<std::int64_t>(HW - off, a, k_hi);  // on [a, b)
          const std::int64_t wrap_lo = dc < 0 ? 0 : std::max<std::int64_t>(W - dc, 0);
          const std::int64_t wrap_hi = dc < 0 ? std::min<std::int64_t>(-dc, W) : W;
          T* r = cols + ((c * s.kh + i) * s.kw + j) * L + n * P;
          if constexpr (kAdjoint) {
            if (dc != 0)
              for (std::int64_t oh = oh_lo; oh < oh_hi; ++oh)
                std::fill(r + oh * W + wrap_lo, r + oh * W + wrap_hi, T(0));
            T* dst = plane + a + off;  // a + off >= 0: no pointer before the plane is formed
            const T* src = r + a;
            for (std::int64_t k = 0; k < b - a; ++k) dst[k] += src[k];
          } else {
            std::fill(r, r + a, T(0));
            std::copy(plane + a + off, plane + b + off, r + a);
            std::fill(r + b, r + P, T(0));
            if (dc != 0)
              for (std::int64_t oh = oh_lo; oh < oh_hi; ++oh)
                std::fill(r + oh * W + wrap_lo, r + oh * W + wrap_hi, T(0));
          }
        }
    }
  });
}

// cols <- patches(img), choosing the flat-row kernel where it applies.
template <class T>
void unfold(const ConvShape& s, const T* img, T* cols) {
  if (flat_rows(s))
    im2col_flat<T, false>(s, img, cols);
  else
    im2col_kernel<T, false>(s, img, cols);
}

// img += adjoint(cols), where cols is scratch that may be overwritten.
template <class T>
void fold_add(const ConvShape& s, T* cols, T* img) {
  if (flat_rows(s))
    im2col_flat<T, true>(s, img, cols);
  else
    im2col_kernel<T, true>(s, img, cols);
}

// Chunking targets (chunk_samples); tuned on BM_Conv2d* in bench/bench_core.cpp.
constexpr std::int64_t kChunkColumns = 768;
constexpr std::int64_t kChunkBytes = 1 << 20;

// Sum of n contiguous values with 16 independent partial sums (vectorizes without -ffast-math).
template <class T>
double row_sum(const T* p, std::int64_t n) {
  constexpr int kLanes = 16;
  T part[kLanes] = {};
  std::int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) part[k] += p[j + k];
  double acc = 0;
  for (; j < n; ++j) acc += p[j];
  for (int k = 0; k < kLanes; ++k) acc += part[k];
  return acc;
}

}  // namespace

template <class T>
void im2col(const ConvShape& s, const T* img, T* cols) {
  unfold<T>(s, img, cols);
}

template <class T>
void col2im_add(const ConvShape& s, const T* cols, T* img) {
  im2col_kernel<T, true>(s, img, cols);
}

namespace {
// Samples per GEMM: enough columns (nb * Ho*Wo) for the GEMM to run near its peak and split well
// across threads, few enough that one chunk's columns stay in L2.
template <class T>
std::int64_t chunk_samples(const ConvShape& s) {
  const std::int64_t P = std::max<std::int64_t>(s.out_plane(), 1), K = std::max<std::int64_t>(s.ckk(), 1);
  const std::int64_t by_cols = (kChunkColumns + P - 1) / P;
  const std::int64_t by_cache = std::max<std::int64_t>(1, kChunkBytes / (K * P * static_cast<std::int64_t>(sizeof(T))));
  return std::clamp<std::int64_t>(std::min(by_cols, by_cache), 1, std::max<std::int64_t>(s.N, 1));
}
}  // namespace

template <class T>
void conv2d_forward_im2col(const ConvShape& s, const T* x, const T* w, const T* bias, T* out) {
  const std::int64_t P = s.out_plane(), K = s.ckk(), in_size = s.C * s.H * s.W, out_size = s.O * P;
  if (s.N == 0 || s.O == 0 || P == 0) return;
  if (K == 0) {
    for (std::int64_t n = 0; n < s.N; ++n)
      for (std::int64_t o = 0; o < s.O; ++o)
        std::fill(out + n * out_size + o * P, out + n * out_size + (o + 1) * P, bias ? bias[o] : T(0));
    return;
  }
  const std::int64_t nb = chunk_samples<T>(s);
  T* cols = scratch<T, 0>(K * nb * P);
  T* y = nb > 1 ? scratch<T, 1>(s.O * nb * P) : nullptr;
  for (std::int64_t n0 = 0; n0 < s.N; n0 += nb) {
    const std::int64_t cn = std::min(nb, s.N - n0), L = cn * P;
    ConvShape cs = s;
    cs.N = cn;
    const T* b = x + n0 * in_size;
    if (!(s.pointwise() && cn == 1)) {
      unfold<T>(cs, x + n0 * in_size, cols);
      b = cols;
    }
    if (cn == 1) {  // straight into the NCHW output, the bias as the GEMM's C operand
      T* on = out + n0 * out_size;
      if (bias)
        for (std::int64_t o = 0; o < s.O; ++o) std::fill(on + o * P, on + (o + 1) * P, bias[o]);
      gemm<T>(false, false, s.O, P, K, T(1), w, K, b, P, bias ? T(1) : T(0), on, P);
      continue;
    }
    // y [O, cn*P] (columns (n, p)) -> out[n0 + n, o, p], adding the bias on the way.
    gemm<T>(false, false, s.O, L, K, T(1), w, K, b, L, T(0), y, L);
    parallel_blocks(cn * s.O, P, [&](std::int64_t t0, std::int64_t t1) {
      for (std::int64_t t = t0; t < t1; ++t) {
        const std::int64_t n = t / s.O, o = t % s.O;
        const T* src = y + o * L + n * P;
        T* dst = out + (n0 + n) * out_size + o * P;
        const T bo = bias ? bias[o] : T(0);
        for (std::int64_t p = 0; p < P; ++p) dst[p] = src[p] + bo;
      }
    });
  }
}

namespace {
// gc [O, cn*P] (columns (n, p)) <- g[n0 .. n0+cn) [O, P] each.
template <class T>
void gather_chunk(const ConvShape& s, const T* g, std::int64_t cn, T* gc) {
  const std::int64_t P = s.out_plane(), L = cn * P;
  parallel_blocks(cn * s.O, P, [&](std::int64_t t0, std::int64_t t1) {
    for (std::int64_t t = t0; t < t1; ++t) {
      const std::int64_t n = t / s.O, o = t % s.O;
      std::copy(g + t * P, g + (t + 1) * P, gc + o * L + n * P);
    }
  });
}
// The backward passes walk the batch in chunks of `nb` samples: f(n0, chunk shape, the chunk's
// output gradient as [O, cn*P]), gathered from NCHW into scratch when the chunk has several samples.
template <class T, class F>
void for_each_grad_chunk(const ConvShape& s, std::int64_t nb, const T* g, F&& f) {
  const std::int64_t P = s.out_plane(), out_size = s.O * P;
  T* gc = nb > 1 ? scratch<T, 1>(s.O * nb * P) : nullptr;
  for (std::int64_t n0 = 0; n0 < s.N; n0 += nb) {
    ConvShape cs = s;
    cs.N = std::min(nb, s.N - n0);
    const T* a = g + n0 * out_size;
    if (cs.N > 1) {
      gather_chunk(s, a, cs.N, gc);
      a = gc;
    }
    f(n0, cs, a);
  }
}
}  // namespace

template <class T>
void conv2d_backward_input_im2col(const ConvShape& s, const T* g, const T* w, T* dx) {
  const std::int64_t P = s.out_plane(), K = s.ckk(), in_size = s.C * s.H * s.W;
  if (s.N == 0 || in_size == 0) return;
  if (s.O == 0 || P == 0) {
    std::fill(dx, dx + s.N * in_size, T(0));
    return;
  }
  const std::int64_t nb = chunk_samples<T>(s);
  T* cols = scratch<T, 0>(K * nb * P);
  for_each_grad_chunk(s, nb, g, [&](std::int64_t n0, const ConvShape& cs, const T* a) {
    const std::int64_t L = cs.N * P;
    T* dxn = dx + n0 * in_size;
    if (s.pointwise() && cs.N == 1) {
      gemm<T>(true, false, K, P, s.O, T(1), w, K, a, P, T(0), dxn, P);
      return;
    }
    gemm<T>(true, false, K, L, s.O, T(1), w, K, a, L, T(0), cols, L);
    std::fill(dxn, dxn + cs.N * in_size, T(0));
    fold_add<T>(cs, cols, dxn);
  });
}

template <class T>
void conv2d_backward_weight_im2col(const ConvShape& s, const T* g, const T* x, T* dw) {
  const std::int64_t P = s.out_plane(), K = s.ckk(), in_size = s.C * s.H * s.W;
  if (s.O == 0 || K == 0) return;
  if (s.N == 0 || P == 0) {
    std::fill(dw, dw + s.O * K, T(0));
    return;
  }
  const std::int64_t nb = chunk_samples<T>(s);
  T* cols = scratch<T, 0>(K * nb * P);
  for_each_grad_chunk(s, nb, g, [&](std::int64_t n0, const ConvShape& cs, const T* a) {
    const std::int64_t L = cs.N * P;
    const T* b = x + n0 * in_size;
    if (!(s.pointwise() && cs.N == 1)) {
      unfold<T>(cs, x + n0 * in_size, cols);
      b = cols;
    }
    gemm<T>(false, true, s.O, K, L, T(1), a, L, b, L, n0 == 0 ? T(0) : T(1), dw, K);
  });
}

template <class T>
void conv2d_forward(const ConvShape& s, const T* x, const T* w, const T* bias, T* out) {
  if constexpr (std::is_same_v<T, float>)
    if (onednn::conv2d_forward(s, x, w, bias, out)) return;
  conv2d_forward_im2col<T>(s, x, w, bias, out);
}

template <class T>
void conv2d_backward_input(const ConvShape& s, const T* g, const T* w, T* dx) {
  if constexpr (std::is_same_v<T, float>)
    if (onednn::conv2d_backward_input(s, g, w, dx)) return;
  conv2d_backward_input_im2col<T>(s, g, w, dx);
}

template <class T>
void conv2d_backward_weight(const ConvShape& s, const T* g, const T* x, T* dw, T* db) {
  if constexpr (std::is_same_v<T, float>)
    if (onednn::conv2d_backward_weight(s, g, x, dw, db)) return;
  conv2d_backward_weight_im2col<T>(s, g, x, dw);
  if (db) conv2d_backward_bias<T>(s, g, db);
}

template <class T>
void conv2d_backward_bias(const ConvShape& s, const T* g, T* db) {
  const std::int64_t P = s.out_plane();
  parallel_blocks(s.O, s.N * P, [&](std::int64_t o0, std::int64_t o1) {
    for (std::int64_t o = o0; o < o1; ++o) {
      double acc = 0;
      for (std::int64_t n = 0; n < s.N; ++n) acc += row_sum(g + (n * s.O + o) * P, P);
      db[o] = static_cast<T>(acc);
    }
  });
}

#define CG_INSTANTIATE(T)                                                                   \
  template void im2col<T>(const ConvShape&, const T*, T*);                                  \
  template void col2im_add<T>(const ConvShape&, const T*, T*);                              \
  template void conv2d_forward<T>(const ConvShape&, const T*, const T*, const T*, T*);      \
  template void conv2d_backward_input<T>(const ConvShape&, const T*, const T*, T*);         \
  template void conv2d_backward_weight<T>(const ConvShape&, const T*, const T*, T*, T*);    \
  template void conv2d_forward_im2col<T>(const ConvShape&, const T*, const T*, const T*, T*); \
  template void conv2d_backward_input_im2col<T>(const ConvShape&, const T*, const T*, T*);  \
  template void conv2d_backward_weight_im2col<T>(const ConvShape&, const T*, const T*, T*); \
  template void conv2d_backward_bias<T>(const ConvShape&, const T*, T*);
CG_INSTANTIATE(float)
CG_INSTANTIATE(double)
#undef CG_INSTANTIATE

}  // namespace chaingrad::kernels
