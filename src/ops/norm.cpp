// Layer and batch normalization as single ops. layer_norm: y = (x - mean) / sqrt(var + eps) *
// weight + bias over the trailing `normalized_shape` dims (biased variance, as PyTorch). Composed
// from mean, sub, square, mul, ... it made seven passes and took 3.5x libtorch's time on [1024, 256].
//
// With xhat = (x - mean) rstd, rstd = 1/sqrt(var + eps), gy = g weight and means over a row:
//   dx = rstd (gy - mean(gy) - xhat mean(gy xhat)),  dweight = sum over rows of g xhat,  dbias = sum of g
// The engine reduces dweight = g xhat and dbias = g to the parameters' shape.
#include <cmath>
#include <vector>

#include "kernels/cpu/parallel.hpp"
#include "ops/common.hpp"

namespace chaingrad {

using detail::record;

namespace {

// sum of term(i) for i in [0, n) in double, in eight independent lanes: one running sum is a chain
// of dependent adds, which made this op 4x slower than libtorch's.
template <class F>
double lane_sum(std::int64_t n, F term) {
  double s[8] = {};
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) s[k] += term(i + k);
  for (; i < n; ++i) s[0] += term(i);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// Rows of length n with their mean and rstd (saved for backward).
template <class T>
void layer_norm_forward(const T* x, const T* w, const T* b, T* y, T* mean, T* rstd, std::int64_t rows,
                        std::int64_t n, double eps) {
  const int parts = rows * n >= kernels::kParallelElements ? kernels::num_threads() : 1;
  kernels::parallel_for(parts, [&](int p) {
    for (std::int64_t r = rows * p / parts; r < rows * (p + 1) / parts; ++r) {
      const T* xr = x + r * n;
      const double mu = lane_sum(n, [&](std::int64_t i) { return static_cast<double>(xr[i]); }) / static_cast<double>(n);
      const double ss = lane_sum(n, [&](std::int64_t i) {
        const double d = xr[i] - mu;
        return d * d;
      });
      const double rs = 1.0 / std::sqrt(ss / static_cast<double>(n) + eps);
      mean[r] = static_cast<T>(mu);
      rstd[r] = static_cast<T>(rs);
      const T m = static_cast<T>(mu), k = static_cast<T>(rs);
      T* yr = y + r * n;
      for (std::int64_t i = 0; i < n; ++i) {
        const T v = (xr[i] - m) * k;
        yr[i] = w ? v * w[i] + (b ? b[i] : T(0)) : v + (b ? b[i] : T(0));
      }
    }
  });
}

// dx by rows; dweight and dbias by columns, so each sum has one order whatever the thread count.
template <class T>
void layer_norm_backward(const T* g, const T* x, const T* w, const T* mean, const T* rstd, T* dx, T* dw, T* db,
                         std::int64_t rows, std::int64_t n) {
  const int parts = rows * n >= kernels::kParallelElements ? kernels::num_threads() : 1;
  if (dx) {
    kernels::parallel_for(parts, [&](int p) {
      for (std::int64_t r = rows * p / parts; r < rows * (p + 1) / parts; ++r) {
        const T *gr = g + r * n, *xr = x + r * n;
        const T m = mean[r], k = rstd[r];
        const auto gy_at = [&](std::int64_t i) { return w ? gr[i] * w[i] : gr[i]; };
        const double s1 = lane_sum(n, [&](std::int64_t i) { return static_cast<double>(gy_at(i)); });
        const double s2 = lane_sum(n, [&](std::int64_t i) { return static_cast<double>(gy_at(i) * ((xr[i] - m) * k)); });
        const T a = static_cast<T>(s1 / static_cast<double>(n)), c = static_cast<T>(s2 / static_cast<double>(n));
        T* out = dx + r * n;
        for (std::int64_t i = 0; i < n; ++i) out[i] = k * (gy_at(i) - a - (xr[i] - m) * k * c);
      }
    });
  }
  if (!dw && !db) return;
  constexpr std::int64_t kColumns = 64;
  const std::int64_t blocks = (n + kColumns - 1) / kColumns;
  kernels::parallel_for(static_cast<int>(std::min<std::int64_t>(blocks, parts)), [&](int p) {
    const int nparts = static_cast<int>(std::min<std::int64_t>(blocks, parts));
    for (std::int64_t blk = blocks * p / nparts; blk < blocks * (p + 1) / nparts; ++blk) {
      const std::int64_t i0 = blk * kColumns, i1 = std::min(n, i0 + kColumns);
      double sw[kColumns] = {}, sb[kColumns] = {};
      for (std::int64_t r = 0; r < rows; ++r) {
        const T *gr = g + r * n, *xr = x + r * n;
        const T m = mean[r], k = rstd[r];
        for (std::int64_t i = i0; i < i1; ++i) {
          sw[i - i0] += gr[i] * ((xr[i] - m) * k);
          sb[i - i0] += gr[i];
        }
      }
      for (std::int64_t i = i0; i < i1; ++i) {
        if (dw) dw[i] = static_cast<T>(sw[i - i0]);
        if (db) db[i] = static_cast<T>(sb[i - i0]);
      }
    }
  });
}

// weight and bias, when given, must have `shape` and the input's dtype; eps must be usable.
void check_operands(const char* op, const Tensor& x, const Tensor& weight, const Tensor& bias, const Dims& shape,
                    double eps) {
  for (const Tensor* p : {&weight, &bias}) {
    if (!p->defined()) continue;
    const char* which = p == &weight ? "weight" : "bias";
    CG_CHECK(p->shape() == shape, ShapeError, op, ": ", which, " has shape ", p->shape(), "; expected ", shape,
             " for an input of shape ", x.shape());
    CG_CHECK(p->dtype() == x.dtype(), TypeError, op, ": ", which, " is ", p->dtype(), " but the input is ", x.dtype());
  }
  CG_CHECK(eps >= 0 && std::isfinite(eps), ValueError, op, ": eps must be finite and non-negative; got ", eps);
}

// The kernels read plain contiguous arrays; an optional operand is a null pointer.
Tensor packed(const Tensor& t) { return !t.defined() || t.is_contiguous() ? t : t.detach().contiguous(); }
template <class T>
T* data_or_null(const Tensor& t) {
  return t.defined() ? t.data<T>() : nullptr;
}

// create_graph: dx from differentiable ops, the statistics recomputed from x so that the rule can
// be differentiated again; also xhat, for the weight's gradient. `w` broadcasts against x.
struct ComposedGrad {
  Tensor dx, xhat;
};
ComposedGrad composed_backward(const Tensor& g, const Tensor& x, const Tensor& w, const DimList& dims, double eps) {
  const Tensor centered = x - mean(x, dims, true);
  const Tensor rstd = rsqrt(mean(square(centered), dims, true) + eps);
  const Tensor xhat = centered * rstd;
  const Tensor gy = w.defined() ? g * w : g;
  return {rstd * (gy - mean(gy, dims, true) - xhat * mean(gy * xhat, dims, true)), xhat};
}

}  // namespace

Tensor layer_norm(const Tensor& x, const Dims& normalized_shape, const Tensor& weight, const Tensor& bias,
                  double eps) {
  CG_CHECK(x.defined(), ValueError, "layer_norm: input is undefined");
  const int k = normalized_shape.size();
  bool ok = k > 0 && x.dim() >= k;
  for (int i = 0; ok && i < k; ++i) ok = x.shape()[x.dim() - k + i] == normalized_shape[i];
  CG_CHECK(ok, ShapeError, "layer_norm: expected an input whose trailing dimensions are ", normalized_shape, "; got ",
           x.shape());
  check_operands("layer_norm", x, weight, bias, normalized_shape, eps);
  const std::int64_t n = normalized_shape.numel(), rows = n ? x.numel() / n : 0;
  const Tensor xc = packed(x), wc = packed(weight), bc = packed(bias);
  Tensor out = empty(x.shape(), x.dtype());
  Tensor mean = empty({rows}, x.dtype()), rstd = empty({rows}, x.dtype());
  dispatch_float(x.dtype(), "layer_norm", [&]<class T>() {
    layer_norm_forward<T>(xc.data<T>(), data_or_null<T>(wc), data_or_null<T>(bc),
                          out.data<T>(), mean.data<T>(), rstd.data<T>(), rows, n, eps);
  });
  if (!detail::any_requires_grad({x, weight, bias})) return out;
  DimList dims;
  for (int i = 0; i < k; ++i) dims.push_back(x.dim() - k + i);
  record("layer_norm", {x, weight, bias}, out,
         [sx = SavedTensor(x, false), sw = SavedTensor(weight, false), mean, rstd, dims, n, rows, eps](
             const Tensor& g, const Node& self) {
           const Tensor &xv = sx.unpack(self), &wv = sw.unpack(self);
           if (GradMode::is_enabled()) {
             auto [dx, xhat] = composed_backward(g, xv, wv, dims, eps);
             return GradList{self.needs_grad(0) ? std::move(dx) : Tensor(), self.needs_grad(1) ? g * xhat : Tensor(),
                             self.needs_grad(2) ? g : Tensor()};
           }
           const Tensor gc = packed(g), xc2 = packed(xv), wc2 = packed(wv);
           Tensor dx = self.needs_grad(0) ? empty(xv.shape(), xv.dtype()) : Tensor();
           Tensor dw = self.needs_grad(1) ? empty(wv.shape(), wv.dtype()) : Tensor();
           Tensor db = self.needs_grad(2) ? empty(self.input_meta(2).shape, xv.dtype()) : Tensor();
           dispatch_float(xv.dtype(), "layer_norm_backward", [&]<class T>() {
             layer_norm_backward<T>(gc.data<T>(), xc2.data<T>(), data_or_null<T>(wc2),
                                    mean.data<T>(), rstd.data<T>(), data_or_null<T>(dx),
                                    data_or_null<T>(dw), data_or_null<T>(db),
                                    rows, n);
           });
           return GradList{std::move(dx), std::move(dw), std::move(db)};
         });
  return out;
}

// ---------------------------------------------------------------- batch_norm
// Per channel c of x viewed as [N, C, S]: statistics over the N*S values, the same rule as
// layer_norm's with the channel's values in place of a row (M = N*S values).
namespace {

template <class T>
void batch_norm_forward(const T* x, const T* w, const T* b, T* y, T* mean, T* var, std::int64_t N, std::int64_t C,
                        std::int64_t S, double eps) {
  const double M = static_cast<double>(N * S);
  const int parts = N * C * S >= kernels::kParallelElements ? static_cast<int>(std::min<std::int64_t>(C, kernels::num_threads())) : 1;
  kernels::parallel_for(parts, [&](int p) {
    for (std::int64_t c = C * p / parts; c < C * (p + 1) / parts; ++c) {
      double s = 0;
      for (std::int64_t n = 0; n < N; ++n) {
        const T* xc = x + (n * C + c) * S;
        s += lane_sum(S, [&](std::int64_t i) { return static_cast<double>(xc[i]); });
      }
      const double mu = s / M;
      double ss = 0;
      for (std::int64_t n = 0; n < N; ++n) {
        const T* xc = x + (n * C + c) * S;
        ss += lane_sum(S, [&](std::int64_t i) {
          const double d = xc[i] - mu;
          return d * d;
        });
      }
      mean[c] = static_cast<T>(mu);
      var[c] = static_cast<T>(ss / M);
      const T k = static_cast<T>(1.0 / std::sqrt(ss / M + eps)), m = static_cast<T>(mu);
      const T scale = w ? w[c] * k : k, shift = (b ? b[c] : T(0)) - m * scale;
      for (std::int64_t n = 0; n < N; ++n) {
        const T* xc = x + (n * C + c) * S;
        T* yc = y + (n * C + c) * S;
        for (std::int64_t i = 0; i < S; ++i) yc[i] = xc[i] * scale + shift;
      }
    }
  });
}

template <class T>
void batch_norm_backward(const T* g, const T* x, const T* w, const T* mean, const T* var, double eps, T* dx, T* dw,
                         T* db, std::int64_t N, std::int64_t C, std::int64_t S) {
  const double M = static_cast<double>(N * S);
  const int parts = N * C * S >= kernels::kParallelElements ? static_cast<int>(std::min<std::int64_t>(C, kernels::num_threads())) : 1;
  kernels::parallel_for(parts, [&](int p) {
    for (std::int64_t c = C * p / parts; c < C * (p + 1) / parts; ++c) {
      const T m = mean[c], k = static_cast<T>(1.0 / std::sqrt(static_cast<double>(var[c]) + eps));
      double sg = 0, sgx = 0;  // sum of g and of g xhat over the channel
      for (std::int64_t n = 0; n < N; ++n) {
        const T *gc = g + (n * C + c) * S, *xc = x + (n * C + c) * S;
        sg += lane_sum(S, [&](std::int64_t i) { return static_cast<double>(gc[i]); });
        sgx += lane_sum(S, [&](std::int64_t i) { return static_cast<double>(gc[i] * ((xc[i] - m) * k)); });
      }
      if (dw) dw[c] = static_cast<T>(sgx);
      if (db) db[c] = static_cast<T>(sg);
      if (!dx) continue;
      // dx = rstd w (g - mean(g) - xhat mean(g xhat))
      const T wc = w ? w[c] : T(1), a = static_cast<T>(sg / M), q = static_cast<T>(sgx / M);
      for (std::int64_t n = 0; n < N; ++n) {
        const T *gc = g + (n * C + c) * S, *xc = x + (n * C + c) * S;
        T* out = dx + (n * C + c) * S;
        for (std::int64_t i = 0; i < S; ++i) out[i] = k * wc * (gc[i] - a - (xc[i] - m) * k * q);
      }
    }
  });
}

}  // namespace

Tensor batch_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps, Tensor* batch_mean,
                  Tensor* batch_var) {
  CG_CHECK(x.defined() && x.dim() >= 2, ShapeError, "batch_norm: expected an input of shape [N, C, ...]; got ",
           x.defined() ? to_string(x.shape()) : std::string("an undefined tensor"));
  const std::int64_t N = x.shape()[0], C = x.shape()[1];
  std::int64_t S = 1;  // values per sample and channel
  for (int d = 2; d < x.dim(); ++d) S *= x.shape()[d];
  CG_CHECK(C > 0 && N * S > 1, ValueError, "batch_norm: needs more than one value per channel; got input of shape ",
           x.shape());
  check_operands("batch_norm", x, weight, bias, Dims{C}, eps);
  const Tensor xc = packed(x), wc = packed(weight), bc = packed(bias);
  Tensor out = empty(x.shape(), x.dtype());
  Tensor mean = empty({C}, x.dtype()), var = empty({C}, x.dtype());
  dispatch_float(x.dtype(), "batch_norm", [&]<class T>() {
    batch_norm_forward<T>(xc.data<T>(), data_or_null<T>(wc), data_or_null<T>(bc),
                          out.data<T>(), mean.data<T>(), var.data<T>(), N, C, S, eps);
  });
  if (batch_mean) *batch_mean = mean;
  if (batch_var) *batch_var = var;
  if (!detail::any_requires_grad({x, weight, bias})) return out;
  DimList dims{0};
  for (int d = 2; d < x.dim(); ++d) dims.push_back(d);
  Dims cshape = Dims::filled(x.dim(), 1);
  cshape[1] = C;
  record("batch_norm", {x, weight, bias}, out,
         [sx = SavedTensor(x, false), sw = SavedTensor(weight, false), mean, var, dims, cshape, eps, N, C, S](
             const Tensor& g, const Node& self) {
           const Tensor &xv = sx.unpack(self), &wv = sw.unpack(self);
           if (GradMode::is_enabled()) {
             auto [dx, xhat] = composed_backward(g, xv, wv.defined() ? reshape(wv, cshape) : Tensor(), dims, eps);
             return GradList{self.needs_grad(0) ? std::move(dx) : Tensor(),
                             self.needs_grad(1) ? reshape(sum(g * xhat, dims, false), {C}) : Tensor(),
                             self.needs_grad(2) ? reshape(sum(g, dims, false), {C}) : Tensor()};
           }
           const Tensor gc = packed(g), xc2 = packed(xv), wc2 = packed(wv);
           Tensor dx = self.needs_grad(0) ? empty(xv.shape(), xv.dtype()) : Tensor();
           Tensor dw = self.needs_grad(1) ? empty({C}, xv.dtype()) : Tensor();
           Tensor db = self.needs_grad(2) ? empty({C}, xv.dtype()) : Tensor();
           dispatch_float(xv.dtype(), "batch_norm_backward", [&]<class T>() {
             batch_norm_backward<T>(gc.data<T>(), xc2.data<T>(), data_or_null<T>(wc2),
                                    mean.data<T>(), var.data<T>(), eps, data_or_null<T>(dx),
                                    data_or_null<T>(dw), data_or_null<T>(db), N, C,
                                    S);
           });
           return GradList{std::move(dx), std::move(dw), std::move(db)};
         });
  return out;
}

}  // namespace chaingrad
