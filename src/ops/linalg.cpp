// Matrix products. mm and bmm are the primitives (one BLAS call per matrix); matmul and the
// batched/1-D cases are compositions of views around them.
#include <optional>
#include <utility>

#include "kernels/cpu/gemm.hpp"
#include "kernels/cpu/parallel.hpp"
#include "ops/common.hpp"

namespace chaingrad {

using detail::record;

namespace {

// A 2-D operand as the BLAS sees it: row-major as is, or row-major of its transpose.
struct GemmOperand {
  Tensor keep;  // owns the data (a contiguous copy when the strides fit neither layout)
  bool trans = false;
  std::int64_t ld = 1;
};

// The layout of a rows x cols matrix with strides (s0, s1) if the BLAS can read it in place: row-major
// (trans false) or row-major of its transpose, and the leading dimension. None: copy it first.
std::optional<std::pair<bool, std::int64_t>> blas_layout(std::int64_t rows, std::int64_t cols, std::int64_t s0,
                                                         std::int64_t s1) {
  if ((s1 == 1 || cols == 1) && s0 >= std::max<std::int64_t>(cols, 1)) return std::pair{false, s0};
  if ((s0 == 1 || rows == 1) && s1 >= std::max<std::int64_t>(rows, 1)) return std::pair{true, s1};
  return std::nullopt;
}

GemmOperand gemm_operand(const Tensor& t) {
  const std::int64_t rows = t.shape()[0], cols = t.shape()[1];
  if (const auto l = blas_layout(rows, cols, t.strides()[0], t.strides()[1])) return {t, l->first, l->second};
  Tensor c = t.detach().contiguous();
  return {c, false, std::max<std::int64_t>(cols, 1)};
}

template <class T>
void mm_into(const Tensor& a, const Tensor& b, T* out, T beta, T alpha = T(1)) {
  const std::int64_t m = a.shape()[0], k = a.shape()[1], n = b.shape()[1];
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (beta == T(0)) std::fill(out, out + m * n, T(0));
    return;
  }
  GemmOperand A = gemm_operand(a), B = gemm_operand(b);
  kernels::gemm<T>(A.trans, B.trans, m, n, k, alpha, static_cast<const T*>(A.keep.raw_data()), A.ld,
                   static_cast<const T*>(B.keep.raw_data()), B.ld, beta, out, std::max<std::int64_t>(n, 1));
}

// A batch of 2-D operands as the BLAS sees them (3-D tensors): matrix i starts batch_stride
// elements after matrix 0, all in one layout.
struct BatchOperand {
  Tensor keep;
  bool trans = false;
  std::int64_t ld = 1, batch_stride = 0;
};

BatchOperand batch_operand(const Tensor& t) {
  const std::int64_t rows = t.shape()[1], cols = t.shape()[2];
  if (const auto l = blas_layout(rows, cols, t.strides()[1], t.strides()[2]))
    return {t, l->first, l->second, t.strides()[0]};
  Tensor c = t.detach().contiguous();
  return {c, false, std::max<std::int64_t>(cols, 1), rows * cols};
}

// Note [updates in backward] (autograd.hpp): when the optimizer of `param` (input `input` of `self`,
// whose gradient is a b) asks for it, it steps `param` with the product written where it wants it;
// false: make the gradient.
bool update_in_product(const Node& self, std::size_t input, const Tensor& param, const Tensor& a, const Tensor& b) {
  InBackwardUpdate* update = self.update_in_backward(input);
  // (An empty batch, k = 0, is left to step(), which scales p by its decay alone.)
  if (!update || !param.is_contiguous() || param.dtype() != a.dtype() || param.dtype() != b.dtype() ||
      a.shape()[1] == 0)
    return false;
  struct Product final : InBackwardUpdate::Product {
    const Tensor &param, &a, &b;
    Product(const Tensor& p, const Tensor& x, const Tensor& y) : param(p), a(x), b(y) {}
    void into(const Tensor& c, double alpha, double beta) const override {
      CG_ASSERT(c.is_contiguous() && c.dtype() == param.dtype() && c.shape() == param.shape());
      dispatch_float(c.dtype(), "update in backward", [&]<class T>() {
        mm_into<T>(a, b, c.data<T>(), static_cast<T>(beta), static_cast<T>(alpha));
      });
    }
  };
  if (!update->apply(param, Product(param, a, b))) return false;
  param.bump_version();
  return true;
}

DType matmul_dtype(const Tensor& a, const Tensor& b, const char* op) {
  CG_CHECK(a.defined() && b.defined(), ValueError, op, ": an input is undefined");
  CG_CHECK(a.dtype() == b.dtype() && is_floating(a.dtype()), TypeError, op,
           ": expected two float tensors of the same dtype; got ", a.dtype(), " and ", b.dtype());
  return a.dtype();
}

}  // namespace

// d(AB)/dA = G B^T, d(AB)/dB = A^T G
Tensor mm(const Tensor& a, const Tensor& b) {
  const DType dt = matmul_dtype(a, b, "mm");
  CG_CHECK(a.dim() == 2 && b.dim() == 2, ShapeError, "mm: expected two 2-D tensors; got shapes ", a.shape(), " and ",
           b.shape());
  CG_CHECK(a.shape()[1] == b.shape()[0], ShapeError, "mm: shapes ", a.shape(), " and ", b.shape(),
           " cannot be multiplied (", a.shape()[1], " columns vs ", b.shape()[0], " rows)");
  Tensor out = empty({a.shape()[0], b.shape()[1]}, dt);
  dispatch_float(dt, "mm", [&]<class T>() { mm_into<T>(a, b, out.data<T>(), T(0)); });
  if (detail::any_requires_grad({a, b}))
    record("mm", {a, b}, out, [sa = SavedTensor(a, false), sb = SavedTensor(b, false)](const Tensor& g, const Node& self) {
      return GradList{self.needs_grad(0) ? mm(g, sb.unpack(self).t()) : Tensor(),
                      self.needs_grad(1) ? mm(sa.unpack(self).t(), g) : Tensor()};
    });
  return out;
}

Tensor bmm(const Tensor& a, const Tensor& b) {
  const DType dt = matmul_dtype(a, b, "bmm");
  CG_CHECK(a.dim() == 3 && b.dim() == 3, ShapeError, "bmm: expected two 3-D tensors; got shapes ", a.shape(), " and ",
           b.shape());
  CG_CHECK(a.shape()[0] == b.shape()[0] && a.shape()[2] == b.shape()[1], ShapeError, "bmm: shapes ", a.shape(), " and ",
           b.shape(), " cannot be multiplied (batch ", a.shape()[0], " vs ", b.shape()[0], ", inner ", a.shape()[2],
           " vs ", b.shape()[1], ")");
  const std::int64_t B = a.shape()[0], m = a.shape()[1], k = a.shape()[2], n = b.shape()[2];
  Tensor out = empty({B, m, n}, dt);
  if (B > 0 && m > 0 && n > 0) {
    const BatchOperand A = batch_operand(a), Bo = batch_operand(b);
    dispatch_float(dt, "bmm", [&]<class T>() {
      kernels::gemm_batched<T>(A.trans, Bo.trans, B, m, n, k, T(1), static_cast<const T*>(A.keep.raw_data()), A.ld,
                               A.batch_stride, static_cast<const T*>(Bo.keep.raw_data()), Bo.ld, Bo.batch_stride,
                               T(0), out.data<T>(), std::max<std::int64_t>(n, 1), m * n);
    });
  }
  if (detail::any_requires_grad({a, b}))
    record("bmm", {a, b}, out, [sa = SavedTensor(a, false), sb = SavedTensor(b, false)](const Tensor& g, const Node& self) {
      return GradList{self.needs_grad(0) ? bmm(g, sb.unpack(self).transpose(1, 2)) : Tensor(),
                      self.needs_grad(1) ? bmm(sa.unpack(self).transpose(1, 2), g) : Tensor()};
    });
  return out;
}

Tensor matmul(const Tensor& a, const Tensor& b) {
  matmul_dtype(a, b, "matmul");
  CG_CHECK(a.dim() >= 1 && b.dim() >= 1, ShapeError, "matmul: both arguments need at least 1 dimension; got shapes ",
           a.shape(), " and ", b.shape());
  const std::int64_t ka = a.shape()[a.dim() - 1];
  const std::int64_t kb = b.dim() == 1 ? b.shape()[0] : b.shape()[b.dim() - 2];
  CG_CHECK(ka == kb, ShapeError, "matmul: shapes ", a.shape(), " and ", b.shape(), " cannot be multiplied (", ka,
           " vs ", kb, ")");
  if (a.dim() == 1 && b.dim() == 1) return sum(mul(a, b));
  if (a.dim() == 2 && b.dim() == 2) return mm(a, b);
  if (a.dim() == 1) return squeeze(matmul(unsqueeze(a, 0), b), -2);
  if (b.dim() == 1) return squeeze(matmul(a, unsqueeze(b, 1)), -1);
  if (b.dim() == 2) {  // [..., n, k] x [k, m]: fold the batch into rows, one GEMM
    Dims out_shape = a.shape();
    out_shape[out_shape.size() - 1] = b.shape()[1];
    return reshape(mm(reshape(a, {-1, ka}), b), out_shape);
  }
  // Broadcast the batch dims, then one bmm.
  Dims ba(std::span<const std::int64_t>(a.shape().begin(), a.shape().end() - 2));
  Dims bb(std::span<const std::int64_t>(b.shape().begin(), b.shape().end() - 2));
  const Dims batch = broadcast_shapes(ba, bb, "matmul");
  const std::int64_t n = a.dim() >= 2 ? a.shape()[a.dim() - 2] : 1, m = b.shape()[b.dim() - 1];
  Dims ea = batch, eb = batch;
  ea.push_back(n);
  ea.push_back(ka);
  eb.push_back(kb);
  eb.push_back(m);
  const std::int64_t B = batch.numel();
  Tensor r = bmm(reshape(expand(a, ea), {B, n, ka}), reshape(expand(b, eb), {B, kb, m}));
  Dims out_shape = batch;
  out_shape.push_back(n);
  out_shape.push_back(m);
  return reshape(r, out_shape);
}

namespace {

// y = x W^T + b, then relu if asked, in one product: the bias and relu go into the product's
// epilogue where the matmul primitive runs it (kernels::gemm_bias_relu).
Tensor linear_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, bool relu, const char* op) {
  const DType dt = matmul_dtype(x, weight, op);
  CG_CHECK(weight.dim() == 2, ShapeError, op, ": weight must be 2-D [out, in]; got shape ", weight.shape());
  CG_CHECK(x.dim() >= 1 && x.shape()[x.dim() - 1] == weight.shape()[1], ShapeError, op, ": input of shape ", x.shape(),
           " does not match weight of shape ", weight.shape(), " (expected the last dimension to be ",
           weight.shape()[1], ")");
  const std::int64_t out_f = weight.shape()[0], in_f = weight.shape()[1];
  if (bias.defined()) {
    CG_CHECK(bias.dim() == 1 && bias.shape()[0] == out_f, ShapeError, op, ": bias of shape ", bias.shape(),
             " does not match weight of shape ", weight.shape(), " (expected [", out_f, "])");
    CG_CHECK(bias.dtype() == dt, TypeError, op, ": bias dtype ", bias.dtype(), " differs from weight dtype ", dt);
  }
  const Tensor x2 = x.dim() == 2 ? x : x.detach().reshape({-1, in_f});
  Dims out_shape = x.shape();
  out_shape[out_shape.size() - 1] = out_f;
  Tensor out = empty(out_shape, dt);
  const std::int64_t rows = x2.shape()[0];
  if (rows == 0 || out_f == 0) return out;
  const GemmOperand A = gemm_operand(x2), B = gemm_operand(weight.detach().t());
  const Tensor b = !bias.defined() || bias.is_contiguous() ? bias : bias.detach().contiguous();
  dispatch_float(dt, op, [&]<class T>() {
    kernels::gemm_bias_relu<T>(A.trans, B.trans, rows, out_f, in_f, static_cast<const T*>(A.keep.raw_data()), A.ld,
                               static_cast<const T*>(B.keep.raw_data()), B.ld, b.defined() ? b.data<T>() : nullptr,
                               relu, out.data<T>());
  });
  return out;
}

// The gradients of y = x W^T + b for the gradient g of y: G W, G^T x (or the optimizer's step
// folded into that product: Note [updates in backward]) and G summed over rows.
GradList linear_grads(const Tensor& g, const Node& self, const SavedTensor& sx, const SavedTensor& sw,
                      std::int64_t in_f, std::int64_t out_f) {
  const Tensor g2 = g.dim() == 2 ? g : reshape(g, {-1, out_f});
  GradList grads(3);
  if (self.needs_grad(0)) {
    const Tensor gx = mm(g2, sw.unpack(self));
    grads[0] = g.dim() == 2 ? gx : reshape(gx, self.input_meta(0).shape);
  }
  if (self.needs_grad(1)) {
    const Tensor& xv = sx.unpack(self);
    const Tensor x2v = xv.dim() == 2 ? xv : reshape(xv, {-1, in_f});
    // (After the input's gradient, which reads the weight as the forward saw it.)
    if (!update_in_product(self, 1, sw.unpack(self), g2.t(), x2v)) grads[1] = mm(g2.t(), x2v);
  }
  if (self.needs_grad(2)) grads[2] = sum(g2, {0});
  return grads;
}

}  // namespace

// y = x W^T + b. dy/dx = G W, dy/dW = G^T x, dy/db = sum of G over rows.
Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  Tensor out = linear_forward(x, weight, bias, /*relu=*/false, "linear");
  if (detail::any_requires_grad({x, weight, bias}))
    record("linear", {x, weight, bias}, out,
           [sx = SavedTensor(x, false), sw = SavedTensor(weight, false), in_f = weight.shape()[1],
            out_f = weight.shape()[0]](const Tensor& g, const Node& self) {
             return linear_grads(g, self, sx, sw, in_f, out_f);
           });
  return out;
}

// y = relu(x W^T + b): linear's rule on the gradient masked where y is 0 (relu's slope, taken as 0
// at 0 as relu's is).
Tensor linear_relu(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  Tensor out = linear_forward(x, weight, bias, /*relu=*/true, "linear_relu");
  if (detail::any_requires_grad({x, weight, bias}))
    record("linear_relu", {x, weight, bias}, out,
           [sx = SavedTensor(x, false), sw = SavedTensor(weight, false), so = SavedTensor(out, true),
            in_f = weight.shape()[1], out_f = weight.shape()[0]](Tensor g, const Node& self) {
             const Tensor y = so.unpack(self).detach();
             // y >= 0, so sign(y) is relu's slope; without a graph to record, one pass over g.
             const Tensor masked = GradMode::is_enabled() ? mul(g, sign(y))
                                                          : detail::grad_map(std::move(g), y, "linear_relu_backward",
                                                                             [](auto gv, auto yv) {
                                                                               return yv > 0 ? gv : decltype(gv)(0);
                                                                             });
             return linear_grads(masked, self, sx, sw, in_f, out_f);
           });
  return out;
}

}  // namespace chaingrad
