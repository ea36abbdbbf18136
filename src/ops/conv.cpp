// Convolution as im2col + one GEMM, pooling as a reduction over im2col patches. im2col and col2im
// are each other's adjoints, so every op here is differentiable to any order.
#include <cmath>

#include "ops/common.hpp"

namespace chaingrad {

using detail::record;

namespace {
struct ConvGeometry {
  std::int64_t N, C, H, W, kh, kw, stride, pad, dil, Ho, Wo;
};

ConvGeometry geometry(const Dims& s, std::int64_t kh, std::int64_t kw, std::int64_t stride, std::int64_t pad,
                      std::int64_t dil, const char* op) {
  CG_CHECK(s.size() == 4, ShapeError, op, ": expected input of shape [N, C, H, W]; got ", s);
  CG_CHECK(kh > 0 && kw > 0 && stride > 0 && pad >= 0 && dil > 0, ValueError, op,
           ": kernel, stride and dilation must be positive and padding non-negative; got kernel ", kh, "x", kw,
           ", stride ", stride, ", padding ", pad, ", dilation ", dil);
  ConvGeometry g{s[0], s[1], s[2], s[3], kh, kw, stride, pad, dil, 0, 0};
  g.Ho = (g.H + 2 * pad - dil * (kh - 1) - 1) / stride + 1;
  g.Wo = (g.W + 2 * pad - dil * (kw - 1) - 1) / stride + 1;
  CG_CHECK(g.Ho > 0 && g.Wo > 0, ShapeError, op, ": input of shape ", s, " is too small for a ", kh, "x", kw,
           " kernel (stride ", stride, ", padding ", pad, ", dilation ", dil, ")");
  return g;
}

// kAdjoint = false: cols <- patches(x). kAdjoint = true: x += adjoint(cols).
// For each kernel offset (i, j) the valid output columns form one contiguous run [lo, hi), so the
// inner loop is a plain (strided when stride > 1) copy or accumulate with no per-element test.
template <class T, bool kAdjoint>
void im2col_kernel(const ConvGeometry& g, T* img, T* cols) {
  const std::int64_t L = g.N * g.Ho * g.Wo;
  for (std::int64_t c = 0; c < g.C; ++c)
    for (std::int64_t i = 0; i < g.kh; ++i)
      for (std::int64_t j = 0; j < g.kw; ++j) {
        T* row = cols + ((c * g.kh + i) * g.kw + j) * L;
        const std::int64_t shift = j * g.dil - g.pad;  // iw = ow * stride + shift
        // lo = first ow with iw >= 0; hi = one past the last ow with iw < W.
        std::int64_t lo = shift >= 0 ? 0 : (-shift + g.stride - 1) / g.stride;
        std::int64_t hi = g.W - shift <= 0 ? 0 : (g.W - shift - 1) / g.stride + 1;
        lo = std::min(lo, g.Wo);
        hi = std::clamp(hi, lo, g.Wo);
        for (std::int64_t n = 0; n < g.N; ++n) {
          T* plane = img + (n * g.C + c) * g.H * g.W;
          for (std::int64_t oh = 0; oh < g.Ho; ++oh) {
            const std::int64_t ih = oh * g.stride - g.pad + i * g.dil;
            T* r = row + (n * g.Ho + oh) * g.Wo;
            if (ih < 0 || ih >= g.H) {
              if constexpr (!kAdjoint) std::fill(r, r + g.Wo, T(0));
              continue;
            }
            T* src = plane + ih * g.W + shift;
            if constexpr (kAdjoint) {
              if (g.stride == 1)
                for (std::int64_t ow = lo; ow < hi; ++ow) src[ow] += r[ow];
              else
                for (std::int64_t ow = lo; ow < hi; ++ow) src[ow * g.stride] += r[ow];
            } else {
              std::fill(r, r + lo, T(0));
              if (g.stride == 1)
                for (std::int64_t ow = lo; ow < hi; ++ow) r[ow] = src[ow];
              else
                for (std::int64_t ow = lo; ow < hi; ++ow) r[ow] = src[ow * g.stride];
              std::fill(r + hi, r + g.Wo, T(0));
            }
          }
        }
      }
}
}  // namespace

Tensor im2col(const Tensor& x_in, std::int64_t kh, std::int64_t kw, std::int64_t stride, std::int64_t padding,
              std::int64_t dilation) {
  const ConvGeometry g = geometry(x_in.shape(), kh, kw, stride, padding, dilation, "im2col");
  const Tensor x = x_in.is_contiguous() ? x_in : x_in.detach().contiguous();
  Tensor out = empty({g.C * kh * kw, g.N * g.Ho * g.Wo}, x.dtype());
  dispatch_float(x.dtype(), "im2col", [&]<class T>() {
    im2col_kernel<T, false>(g, const_cast<T*>(x.data<T>()), out.data<T>());
  });
  if (detail::any_requires_grad({x_in}))
    record("im2col", {x_in}, out, [shape = x_in.shape(), kh, kw, stride, padding, dilation](const Tensor& gr, const Node&) {
      return GradList{col2im(gr, shape, kh, kw, stride, padding, dilation)};
    });
  return out;
}

Tensor col2im(const Tensor& cols_in, const Dims& input_shape, std::int64_t kh, std::int64_t kw, std::int64_t stride,
              std::int64_t padding, std::int64_t dilation) {
  const ConvGeometry g = geometry(input_shape, kh, kw, stride, padding, dilation, "col2im");
  CG_CHECK(cols_in.dim() == 2 && cols_in.shape()[0] == g.C * kh * kw && cols_in.shape()[1] == g.N * g.Ho * g.Wo,
           ShapeError, "col2im: columns of shape ", cols_in.shape(), " do not match image ", input_shape, " (expected [",
           g.C * kh * kw, ", ", g.N * g.Ho * g.Wo, "])");
  const Tensor cols = cols_in.is_contiguous() ? cols_in : cols_in.detach().contiguous();
  Tensor out = zeros(input_shape, {.dtype = cols.dtype()});
  dispatch_float(cols.dtype(), "col2im", [&]<class T>() {
    im2col_kernel<T, true>(g, out.data<T>(), const_cast<T*>(cols.data<T>()));
  });
  if (detail::any_requires_grad({cols_in}))
    record("col2im", {cols_in}, out, [kh, kw, stride, padding, dilation](const Tensor& gr, const Node&) {
      return GradList{im2col(gr, kh, kw, stride, padding, dilation)};
    });
  return out;
}

Tensor conv2d(const Tensor& x, const Tensor& weight, const Tensor& bias, std::int64_t stride, std::int64_t padding,
              std::int64_t dilation) {
  CG_CHECK(weight.dim() == 4, ShapeError, "conv2d: weight must be [out, in, kh, kw]; got shape ", weight.shape());
  CG_CHECK(x.dim() == 4 && x.shape()[1] == weight.shape()[1], ShapeError, "conv2d: input of shape ", x.shape(),
           " does not match weight of shape ", weight.shape(), " (expected [N, ", weight.shape()[1], ", H, W])");
  const std::int64_t O = weight.shape()[0], kh = weight.shape()[2], kw = weight.shape()[3];
  const ConvGeometry g = geometry(x.shape(), kh, kw, stride, padding, dilation, "conv2d");
  const Tensor cols = im2col(x, kh, kw, stride, padding, dilation);
  const Tensor y = mm(reshape(weight, {O, -1}), cols);                       // [O, N*Ho*Wo]
  Tensor out = permute(reshape(y, {O, g.N, g.Ho, g.Wo}), {1, 0, 2, 3});     // [N, O, Ho, Wo]
  if (bias.defined()) {
    CG_CHECK(bias.dim() == 1 && bias.shape()[0] == O, ShapeError, "conv2d: bias of shape ", bias.shape(),
             " does not match ", O, " output channels");
    return out + reshape(bias, {1, O, 1, 1});
  }
  return contiguous(out);
}

// max_pool2d: each output is the first maximum of its window; the gradient goes to that element
// (scatter_add through the saved flat indices, so the backward is itself differentiable).
Tensor max_pool2d(const Tensor& x_in, std::int64_t kernel, std::int64_t stride) {
  if (stride == 0) stride = kernel;
  const ConvGeometry g = geometry(x_in.shape(), kernel, kernel, stride, 0, 1, "max_pool2d");
  const Tensor x = x_in.is_contiguous() ? x_in : x_in.detach().contiguous();
  Tensor out = empty({g.N, g.C, g.Ho, g.Wo}, x.dtype());
  Tensor index = empty({g.N * g.C, g.Ho * g.Wo}, DType::Int64);
  dispatch_float(x.dtype(), "max_pool2d", [&]<class T>() {
    const T* px = x.data<T>();
    T* po = out.data<T>();
    std::int64_t* pi = index.data<std::int64_t>();
    for (std::int64_t p = 0; p < g.N * g.C; ++p) {
      const T* plane = px + p * g.H * g.W;
      if (kernel == 2 && stride == 2) {  // the common case, unrolled
        for (std::int64_t oh = 0; oh < g.Ho; ++oh)
          for (std::int64_t ow = 0; ow < g.Wo; ++ow) {
            const std::int64_t k0 = 2 * oh * g.W + 2 * ow, k1 = k0 + 1, k2 = k0 + g.W, k3 = k2 + 1;
            std::int64_t best = k0;
            best = plane[k1] > plane[best] ? k1 : best;
            best = plane[k2] > plane[best] ? k2 : best;
            best = plane[k3] > plane[best] ? k3 : best;
            const std::int64_t o = (p * g.Ho + oh) * g.Wo + ow;
            po[o] = plane[best];
            pi[o] = best;
          }
        continue;
      }
      for (std::int64_t oh = 0; oh < g.Ho; ++oh)
        for (std::int64_t ow = 0; ow < g.Wo; ++ow) {
          const std::int64_t h0 = oh * stride, w0 = ow * stride;
          std::int64_t best = h0 * g.W + w0;
          T bv = plane[best];
          for (std::int64_t i = 0; i < kernel; ++i) {
            const T* row = plane + (h0 + i) * g.W + w0;
            for (std::int64_t j = 0; j < kernel; ++j) {
              const bool better = row[j] > bv;  // NaN never wins; anomaly mode reports NaNs
              bv = better ? row[j] : bv;
              best = better ? (h0 + i) * g.W + w0 + j : best;
            }
          }
          const std::int64_t o = (p * g.Ho + oh) * g.Wo + ow;
          po[o] = bv;
          pi[o] = best;
        }
    }
  });
  if (detail::any_requires_grad({x_in}))
    record("max_pool2d", {x_in}, out, [shape = x_in.shape(), index, g](const Tensor& gr, const Node&) {
      const Tensor flat = scatter_add(zeros({g.N * g.C, g.H * g.W}, {.dtype = gr.dtype()}), 1, index,
                                      reshape(gr, {g.N * g.C, g.Ho * g.Wo}));
      return GradList{reshape(flat, shape)};
    });
  return out;
}

// avg_pool2d: the mean over im2col patches, a composition.
Tensor avg_pool2d(const Tensor& x, std::int64_t kernel, std::int64_t stride) {
  if (stride == 0) stride = kernel;
  const ConvGeometry g = geometry(x.shape(), kernel, kernel, stride, 0, 1, "avg_pool2d");
  const Tensor patches = im2col(reshape(x, {g.N * g.C, 1, g.H, g.W}), kernel, kernel, stride, 0, 1);
  return reshape(mean(patches, {0}), {g.N, g.C, g.Ho, g.Wo});
}

}  // namespace chaingrad
