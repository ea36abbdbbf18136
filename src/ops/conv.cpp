// Convolution and pooling (NCHW).
//
// conv2d and its two adjoints are primitives with per-sample GEMM kernels
// (kernels/cpu/conv_kernels.hpp); they close under differentiation, so gradients of any order stay
// on the fast kernels (Note [conv adjoints]). im2col and col2im are each other's adjoints and stay
// as ops of their own; avg_pool2d is a composition over im2col.
#include <cmath>
#include <tuple>
#include <utility>

#include "kernels/cpu/conv_kernels.hpp"
#include "kernels/cpu/pool_kernels.hpp"
#include "ops/common.hpp"

namespace chaingrad {

using detail::record;
using kernels::ConvShape;

// Note [conv adjoints]: write y = conv(x, W) (bilinear in x and W), Bx = conv2d_backward_input(g, W)
// = the adjoint of conv(., W) applied to g, and BW = conv2d_backward_weight(g, x) = the adjoint of
// conv(x, .) applied to g, so that <conv(x, W), g> = <x, Bx(g, W)> = <W, BW(g, x)>. Then
//   d conv(x, W)   : dx = Bx(g, W),           dW = BW(g, x),            db = sum of g over n, h, w
//   d Bx(g, W)     : dg = conv(gx, W),         dW = BW(g, gx)            (gx: upstream, x's shape)
//   d BW(g, x)     : dg = conv(x, gW),         dx = Bx(g, gW)            (gW: upstream, W's shape)
// so the three ops are each other's backward rules.

namespace {

ConvShape geometry(const Dims& s, std::int64_t kh, std::int64_t kw, std::int64_t stride, std::int64_t pad,
                   std::int64_t dil, const char* op) {
  CG_CHECK(s.size() == 4, ShapeError, op, ": expected input of shape [N, C, H, W]; got ", s);
  CG_CHECK(kh > 0 && kw > 0 && stride > 0 && pad >= 0 && dil > 0, ValueError, op,
           ": kernel, stride and dilation must be positive and padding non-negative; got kernel ", kh, "x", kw,
           ", stride ", stride, ", padding ", pad, ", dilation ", dil);
  ConvShape g{s[0], s[1], s[2], s[3], 0, kh, kw, stride, pad, dil, 0, 0};
  g.Ho = (g.H + 2 * pad - dil * (kh - 1) - 1) / stride + 1;
  g.Wo = (g.W + 2 * pad - dil * (kw - 1) - 1) / stride + 1;
  CG_CHECK(g.Ho > 0 && g.Wo > 0, ShapeError, op, ": input of shape ", s, " is too small for a ", kh, "x", kw,
           " kernel (stride ", stride, ", padding ", pad, ", dilation ", dil, ")");
  return g;
}

// The geometry of conv(x of x_shape, W of w_shape), with the shapes' consistency checked.
ConvShape conv_geometry(const Dims& x_shape, const Dims& w_shape, std::int64_t stride, std::int64_t pad,
                        std::int64_t dil, const char* op) {
  CG_CHECK(w_shape.size() == 4, ShapeError, op, ": weight must be [out, in, kh, kw]; got shape ", w_shape);
  CG_CHECK(x_shape.size() == 4 && x_shape[1] == w_shape[1], ShapeError, op, ": input of shape ", x_shape,
           " does not match weight of shape ", w_shape, " (expected [N, ", w_shape[1], ", H, W])");
  ConvShape g = geometry(x_shape, w_shape[2], w_shape[3], stride, pad, dil, op);
  g.O = w_shape[0];
  return g;
}

Dims output_shape(const ConvShape& g) { return Dims{g.N, g.O, g.Ho, g.Wo}; }

void check_grad_output(const Tensor& grad_output, const ConvShape& g, const char* op) {
  CG_CHECK(grad_output.shape() == output_shape(g), ShapeError, op, ": grad_output of shape ", grad_output.shape(),
           " does not match the convolution's output shape ", output_shape(g));
}

// All tensor operands of one conv op share a float dtype.
DType common_dtype(std::initializer_list<Tensor> ts, const char* op) {
  DType dt = ts.begin()->dtype();
  for (const Tensor& t : ts) {
    if (!t.defined()) continue;
    CG_CHECK(is_floating(t.dtype()) && t.dtype() == dt, TypeError, op,
             ": expected float tensors of one dtype; got ", dt, " and ", t.dtype());
  }
  return dt;
}

Tensor contiguous_data(const Tensor& t) { return t.is_contiguous() ? t.detach() : t.detach().contiguous(); }

// db = sum of g over (n, h, w). Its derivative is a broadcast, so when a graph is being built
// (create_graph) it is the differentiable sum; otherwise one vectorized pass.
Tensor conv_bias_grad(const Tensor& g, const ConvShape& s) {
  if (GradMode::is_enabled() && g.requires_grad()) return sum(g, {0, 2, 3});
  const Tensor gc = contiguous_data(g);
  Tensor db = empty({s.O}, g.dtype());
  dispatch_float(g.dtype(), "conv2d", [&]<class T>() { kernels::conv2d_backward_bias<T>(s, gc.data<T>(), db.data<T>()); });
  return db;
}

// dW and db of conv2d together, in one pass over g, when no graph is being built through them (with
// create_graph they are the differentiable ops conv2d_backward_weight and sum).
bool fuse_weight_and_bias_grads(const Tensor& g, const Tensor& x) {
  return g.dtype() == x.dtype() && !detail::any_requires_grad({g, x});
}

std::pair<Tensor, Tensor> conv_weight_and_bias_grads(const Tensor& g, const Tensor& x, const Dims& weight_shape,
                                                     const ConvShape& s) {
  const Tensor gc = contiguous_data(g), xc = contiguous_data(x);
  Tensor dw = empty(weight_shape, g.dtype()), db = empty({s.O}, g.dtype());
  dispatch_float(g.dtype(), "conv2d", [&]<class T>() {
    kernels::conv2d_backward_weight<T>(s, gc.data<T>(), xc.data<T>(), dw.data<T>(), db.data<T>());
  });
  return {dw, db};
}

}  // namespace

Tensor im2col(const Tensor& x_in, std::int64_t kh, std::int64_t kw, std::int64_t stride, std::int64_t padding,
              std::int64_t dilation) {
  const ConvShape g = geometry(x_in.shape(), kh, kw, stride, padding, dilation, "im2col");
  const Tensor x = contiguous_data(x_in);
  Tensor out = empty({g.C * kh * kw, g.N * g.Ho * g.Wo}, x.dtype());
  dispatch_float(x.dtype(), "im2col", [&]<class T>() { kernels::im2col<T>(g, x.data<T>(), out.data<T>()); });
  if (detail::any_requires_grad({x_in}))
    record("im2col", {x_in}, out, [shape = x_in.shape(), kh, kw, stride, padding, dilation](const Tensor& gr, const Node&) {
      return GradList{col2im(gr, shape, kh, kw, stride, padding, dilation)};
    });
  return out;
}

Tensor col2im(const Tensor& cols_in, const Dims& input_shape, std::int64_t kh, std::int64_t kw, std::int64_t stride,
              std::int64_t padding, std::int64_t dilation) {
  const ConvShape g = geometry(input_shape, kh, kw, stride, padding, dilation, "col2im");
  CG_CHECK(cols_in.dim() == 2 && cols_in.shape()[0] == g.C * kh * kw && cols_in.shape()[1] == g.N * g.Ho * g.Wo,
           ShapeError, "col2im: columns of shape ", cols_in.shape(), " do not match image ", input_shape, " (expected [",
           g.C * kh * kw, ", ", g.N * g.Ho * g.Wo, "])");
  const Tensor cols = contiguous_data(cols_in);
  Tensor out = zeros(input_shape, {.dtype = cols.dtype()});
  dispatch_float(cols.dtype(), "col2im", [&]<class T>() { kernels::col2im_add<T>(g, cols.data<T>(), out.data<T>()); });
  if (detail::any_requires_grad({cols_in}))
    record("col2im", {cols_in}, out, [kh, kw, stride, padding, dilation](const Tensor& gr, const Node&) {
      return GradList{im2col(gr, kh, kw, stride, padding, dilation)};
    });
  return out;
}

// y[n, o] = sum_{c, i, j} W[o, c, i, j] x[n, c, h*stride - pad + i*dil, w*stride - pad + j*dil] + b[o]
// (zero outside the image). Backward: Note [conv adjoints].
Tensor conv2d(const Tensor& x, const Tensor& weight, const Tensor& bias, std::int64_t stride, std::int64_t padding,
              std::int64_t dilation) {
  CG_CHECK(x.defined() && weight.defined(), ValueError, "conv2d: input and weight must be defined");
  const ConvShape g = conv_geometry(x.shape(), weight.shape(), stride, padding, dilation, "conv2d");
  if (bias.defined())
    CG_CHECK(bias.dim() == 1 && bias.shape()[0] == g.O, ShapeError, "conv2d: bias of shape ", bias.shape(),
             " does not match ", g.O, " output channels");
  const DType dt = common_dtype({x, weight, bias}, "conv2d");
  const Tensor xc = contiguous_data(x), wc = contiguous_data(weight);
  const Tensor bc = bias.defined() ? contiguous_data(bias) : Tensor();
  Tensor out = empty(output_shape(g), dt);
  dispatch_float(dt, "conv2d", [&]<class T>() {
    kernels::conv2d_forward<T>(g, xc.data<T>(), wc.data<T>(), bc.defined() ? bc.data<T>() : nullptr, out.data<T>());
  });
  if (detail::any_requires_grad({x, weight, bias}))
    record("conv2d", {x, weight, bias}, out,
           [sx = SavedTensor(x, false), sw = SavedTensor(weight, false), g](const Tensor& gr, const Node& self) {
             GradList grads(3);
             if (self.needs_grad(0))
               grads[0] = conv2d_backward_input(gr, sw.unpack(self), self.input_meta(0).shape, g.stride, g.pad, g.dil);
             if (self.needs_grad(1) && self.needs_grad(2) && fuse_weight_and_bias_grads(gr, sx.unpack(self))) {
               std::tie(grads[1], grads[2]) = conv_weight_and_bias_grads(gr, sx.unpack(self), self.input_meta(1).shape, g);
               return grads;
             }
             if (self.needs_grad(1))
               grads[1] = conv2d_backward_weight(gr, sx.unpack(self), self.input_meta(1).shape, g.stride, g.pad, g.dil);
             if (self.needs_grad(2)) grads[2] = conv_bias_grad(gr, g);
             return grads;
           });
  return out;
}

// The adjoint of conv2d in its input: <conv2d(x, W), g> = <x, conv2d_backward_input(g, W)>.
Tensor conv2d_backward_input(const Tensor& grad_output, const Tensor& weight, const Dims& input_shape,
                             std::int64_t stride, std::int64_t padding, std::int64_t dilation) {
  CG_CHECK(grad_output.defined() && weight.defined(), ValueError,
           "conv2d_backward_input: grad_output and weight must be defined");
  const ConvShape g = conv_geometry(input_shape, weight.shape(), stride, padding, dilation, "conv2d_backward_input");
  check_grad_output(grad_output, g, "conv2d_backward_input");
  const DType dt = common_dtype({grad_output, weight}, "conv2d_backward_input");
  const Tensor gc = contiguous_data(grad_output), wc = contiguous_data(weight);
  Tensor dx = empty(input_shape, dt);
  dispatch_float(dt, "conv2d_backward_input", [&]<class T>() {
    kernels::conv2d_backward_input<T>(g, gc.data<T>(), wc.data<T>(), dx.data<T>());
  });
  if (detail::any_requires_grad({grad_output, weight}))
    record("conv2d_backward_input", {grad_output, weight}, dx,
           [sg = SavedTensor(grad_output, false), sw = SavedTensor(weight, false), g](const Tensor& gx, const Node& self) {
             GradList grads(2);
             if (self.needs_grad(0)) grads[0] = conv2d(gx, sw.unpack(self), {}, g.stride, g.pad, g.dil);
             if (self.needs_grad(1))
               grads[1] = conv2d_backward_weight(sg.unpack(self), gx, self.input_meta(1).shape, g.stride, g.pad, g.dil);
             return grads;
           });
  return dx;
}

// The adjoint of conv2d in its weight: <conv2d(x, W), g> = <W, conv2d_backward_weight(g, x)>.
Tensor conv2d_backward_weight(const Tensor& grad_output, const Tensor& input, const Dims& weight_shape,
                              std::int64_t stride, std::int64_t padding, std::int64_t dilation) {
  CG_CHECK(grad_output.defined() && input.defined(), ValueError,
           "conv2d_backward_weight: grad_output and input must be defined");
  const ConvShape g = conv_geometry(input.shape(), weight_shape, stride, padding, dilation, "conv2d_backward_weight");
  check_grad_output(grad_output, g, "conv2d_backward_weight");
  const DType dt = common_dtype({grad_output, input}, "conv2d_backward_weight");
  const Tensor gc = contiguous_data(grad_output), xc = contiguous_data(input);
  Tensor dw = empty(weight_shape, dt);
  dispatch_float(dt, "conv2d_backward_weight", [&]<class T>() {
    kernels::conv2d_backward_weight<T>(g, gc.data<T>(), xc.data<T>(), dw.data<T>());
  });
  if (detail::any_requires_grad({grad_output, input}))
    record("conv2d_backward_weight", {grad_output, input}, dw,
           [sg = SavedTensor(grad_output, false), sx = SavedTensor(input, false), g](const Tensor& gw, const Node& self) {
             GradList grads(2);
             if (self.needs_grad(0)) grads[0] = conv2d(sx.unpack(self), gw, {}, g.stride, g.pad, g.dil);
             if (self.needs_grad(1))
               grads[1] = conv2d_backward_input(sg.unpack(self), gw, self.input_meta(1).shape, g.stride, g.pad, g.dil);
             return grads;
           });
  return dw;
}

namespace {
kernels::PoolShape pool_geometry(const Dims& s, std::int64_t kernel, std::int64_t stride, const char* op) {
  const ConvShape g = geometry(s, kernel, kernel, stride, 0, 1, op);
  return {g.N * g.C, g.H, g.W, kernel, stride, g.Ho, g.Wo};
}
}  // namespace

namespace {
// max_pool2d_backward; `from_pool` = {kernel, stride} when the indices are max_pool2d's own (each in
// its window, so they need no range check and 2x2 windows take the write-once kernel), else {0, 0}.
Tensor max_pool2d_backward_impl(const Tensor& grad_output, const Tensor& indices, const Dims& input_shape,
                                std::pair<std::int64_t, std::int64_t> from_pool) {
  CG_CHECK(grad_output.defined() && indices.defined(), ValueError,
           "max_pool2d_backward: grad_output and indices must be defined");
  CG_CHECK(indices.dtype() == DType::Int64, TypeError, "max_pool2d_backward: indices must be int64; got ",
           indices.dtype());
  CG_CHECK(input_shape.size() == 4 && grad_output.dim() == 4 && indices.shape() == grad_output.shape() &&
               grad_output.shape()[0] == input_shape[0] && grad_output.shape()[1] == input_shape[1],
           ShapeError, "max_pool2d_backward: grad_output ", grad_output.shape(), " and indices ", indices.shape(),
           " must share one shape [N, C, Ho, Wo] matching the input shape ", input_shape);
  const std::int64_t planes = input_shape[0] * input_shape[1], in_plane = input_shape[2] * input_shape[3];
  const kernels::PoolShape s{planes, input_shape[2], input_shape[3], from_pool.first, from_pool.second,
                             grad_output.shape()[2], grad_output.shape()[3]};
  const Tensor idx = indices.is_contiguous() ? indices : indices.contiguous();
  const std::int64_t* pi = idx.data<std::int64_t>();
  if (from_pool.first == 0) {
    bool out_of_range = false;  // one branch-free pass; the first bad index is looked up only on failure
    for (std::int64_t k = 0, n = idx.numel(); k < n; ++k)
      out_of_range |= static_cast<std::uint64_t>(pi[k]) >= static_cast<std::uint64_t>(in_plane);
    if (out_of_range)
      for (std::int64_t k = 0, n = idx.numel(); k < n; ++k)
        CG_CHECK(pi[k] >= 0 && pi[k] < in_plane, ShapeError, "max_pool2d_backward: index ", pi[k], " at position ", k,
                 " is out of range [0, ", in_plane, ")");
  }
  const Tensor gc = contiguous_data(grad_output);
  Tensor dx = empty(input_shape, grad_output.dtype());
  dispatch_float(grad_output.dtype(), "max_pool2d_backward", [&]<class T>() {
    kernels::max_pool2d_backward<T>(s, gc.data<T>(), pi, dx.data<T>());
  });
  if (detail::any_requires_grad({grad_output}))
    record("max_pool2d_backward", {grad_output}, dx, [idx, planes, in_plane](const Tensor& gg, const Node& self) {
      const Dims& gs = self.input_meta(0).shape;
      const Tensor picked = gather(reshape(gg, {planes, in_plane}), 1, reshape(idx, {planes, gs[2] * gs[3]}));
      return GradList{reshape(picked, gs)};
    });
  return dx;
}
}  // namespace

// max_pool2d: each output is the first maximum of its window; the gradient goes to that element
// through max_pool2d_backward with the saved positions.
Tensor max_pool2d(const Tensor& x_in, std::int64_t kernel, std::int64_t stride) {
  if (stride == 0) stride = kernel;
  CG_CHECK(x_in.defined(), ValueError, "max_pool2d: input is undefined");
  const kernels::PoolShape s = pool_geometry(x_in.shape(), kernel, stride, "max_pool2d");
  const Dims out_shape{x_in.shape()[0], x_in.shape()[1], s.Ho, s.Wo};
  const Tensor x = contiguous_data(x_in);
  Tensor out = empty(out_shape, x.dtype());
  Tensor index = empty(out_shape, DType::Int64);
  dispatch_float(x.dtype(), "max_pool2d", [&]<class T>() {
    kernels::max_pool2d_forward<T>(s, x.data<T>(), out.data<T>(), index.data<std::int64_t>());
  });
  if (detail::any_requires_grad({x_in}))
    record("max_pool2d", {x_in}, out, [index, kernel, stride](const Tensor& gr, const Node& self) {
      return GradList{max_pool2d_backward_impl(gr, index, self.input_meta(0).shape, {kernel, stride})};
    });
  return out;
}

// dx[n, c, p] = sum of g[n, c, o] over the outputs o with indices[n, c, o] = p (p a flat position in
// the H*W plane); linear in g, so its backward gathers the upstream gradient at the indices.
Tensor max_pool2d_backward(const Tensor& grad_output, const Tensor& indices, const Dims& input_shape) {
  return max_pool2d_backward_impl(grad_output, indices, input_shape, {0, 0});
}

// avg_pool2d: the mean over im2col patches, a composition.
Tensor avg_pool2d(const Tensor& x, std::int64_t kernel, std::int64_t stride) {
  if (stride == 0) stride = kernel;
  const ConvShape g = geometry(x.shape(), kernel, kernel, stride, 0, 1, "avg_pool2d");
  const Tensor patches = im2col(reshape(x, {g.N * g.C, 1, g.H, g.W}), kernel, kernel, stride, 0, 1);
  return reshape(mean(patches, {0}), {g.N, g.C, g.Ho, g.Wo});
}

}  // namespace chaingrad
