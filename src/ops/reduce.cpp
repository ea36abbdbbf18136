// Reductions, softmax family and their compositions.
#include <cmath>

#include "kernels/cpu/reduce.hpp"
#include "ops/common.hpp"

namespace chaingrad {

using detail::record;
using detail::scalar_like;

namespace {

struct AxisView {
  std::int64_t outer = 1, R = 1, inner = 1;
};
// Contiguous x viewed as [outer, R, inner] around dims [first, last].
AxisView axis_view(const Dims& shape, int first, int last) {
  AxisView v;
  for (int i = 0; i < shape.size(); ++i) {
    if (i < first)
      v.outer *= shape[i];
    else if (i <= last)
      v.R *= shape[i];
    else
      v.inner *= shape[i];
  }
  return v;
}

// Reduces `dims` (sorted, unique) with keepdim, one run of adjacent dims at a time.
// kind 0 = sum, 1 = max, 2 = min.
Tensor reduce_kernel(const Tensor& x_in, const std::vector<int>& dims, int kind, const char* op) {
  Tensor x = x_in.is_contiguous() ? x_in : x_in.detach().contiguous();
  if (dims.empty()) return kind == 0 ? x.detach().clone() : x.detach().clone();
  Dims shape = x.shape();
  for (int i = 0; i < shape.size(); ++i)
    CG_CHECK(kind == 0 || shape[i] > 0 || std::find(dims.begin(), dims.end(), i) == dims.end(), ValueError, op,
             ": cannot reduce over an empty dimension ", i, " of shape ", shape);
  // Runs of adjacent dims, processed from the last run to the first.
  std::vector<std::pair<int, int>> runs;
  for (int d : dims) {
    if (!runs.empty() && runs.back().second + 1 == d)
      runs.back().second = d;
    else
      runs.push_back({d, d});
  }
  Tensor cur = x;
  for (auto it = runs.rbegin(); it != runs.rend(); ++it) {
    const AxisView v = axis_view(cur.shape(), it->first, it->second);
    Dims out_shape = cur.shape();
    for (int d = it->first; d <= it->second; ++d) out_shape[d] = 1;
    Tensor out = empty(out_shape, cur.dtype());
    dispatch_float(cur.dtype(), op, [&]<class T>() {
      if (kind == 0)
        kernels::sum_axis<T>(cur.data<T>(), out.data<T>(), v.outer, v.R, v.inner);
      else if (kind == 1)
        kernels::extreme_axis<T, true>(cur.data<T>(), out.data<T>(), nullptr, v.outer, v.R, v.inner);
      else
        kernels::extreme_axis<T, false>(cur.data<T>(), out.data<T>(), nullptr, v.outer, v.R, v.inner);
    });
    cur = out;
  }
  return cur;
}

// The shape of g with reduced dims restored as size 1 (so it broadcasts against the input).
Tensor restore_reduced(const Tensor& g, const Dims& input_shape, const std::vector<int>& dims) {
  return reshape(g, detail::reduced_shape(input_shape, dims, true));
}

Tensor finish(Tensor keep, const Dims& shape, const std::vector<int>& dims, bool keepdim) {
  if (keepdim) return keep;
  return detail::make_view(keep, detail::reduced_shape(shape, dims, false),
                           contiguous_strides(detail::reduced_shape(shape, dims, false)), keep.offset());
}

}  // namespace

// d/dx_i sum(x) = 1: the gradient is broadcast back over the reduced dims.
Tensor sum(const Tensor& x, const DimList& dims_in, bool keepdim) {
  CG_CHECK(x.defined(), ValueError, "sum: input is undefined");
  const auto dims = detail::reduction_dims(dims_in, x.dim(), "sum");
  Tensor out = finish(reduce_kernel(x, dims, 0, "sum"), x.shape(), dims, keepdim);
  if (detail::any_requires_grad({x}))
    record("sum", {x}, out, [shape = x.shape(), dims](const Tensor& g, const Node&) {
      return GradList{expand(restore_reduced(g, shape, dims), shape)};
    });
  return out;
}

Tensor mean(const Tensor& x, const DimList& dims_in, bool keepdim) {
  const auto dims = detail::reduction_dims(dims_in, x.dim(), "mean");
  std::int64_t n = 1;
  for (int d : dims) n *= x.shape()[d];
  CG_CHECK(n > 0, ValueError, "mean: cannot average over zero elements (shape ", x.shape(), ")");
  return sum(x, dims_in, keepdim) / static_cast<double>(n);
}

namespace {
// amax/amin: the gradient goes to the elements equal to the extreme, shared evenly among ties.
Tensor extreme(const Tensor& x, const DimList& dims_in, bool keepdim, bool is_max) {
  const char* op = is_max ? "amax" : "amin";
  CG_CHECK(x.defined(), ValueError, op, ": input is undefined");
  CG_CHECK(x.numel() > 0, ValueError, op, ": cannot reduce an empty tensor (shape ", x.shape(), ")");
  const auto dims = detail::reduction_dims(dims_in, x.dim(), op);
  Tensor keep = reduce_kernel(x, dims, is_max ? 1 : 2, op);
  Tensor out = finish(keep, x.shape(), dims, keepdim);
  if (detail::any_requires_grad({x}))
    record(op, {x}, out, [sx = SavedTensor(x, false), keep = keep.detach(), dims](const Tensor& g, const Node& self) {
      const Tensor xv = sx.unpack(self).detach();
      const Tensor mask = eq(xv, keep);
      const Tensor count = reduce_kernel(mask, dims, 0, "amax");
      return GradList{mul(restore_reduced(g, xv.shape(), dims), div(mask, count))};
    });
  return out;
}
}  // namespace

Tensor amax(const Tensor& x, const DimList& dims, bool keepdim) { return extreme(x, dims, keepdim, true); }
Tensor amin(const Tensor& x, const DimList& dims, bool keepdim) { return extreme(x, dims, keepdim, false); }

// var = sum((x - mean)^2) / (n - correction): a composition.
Tensor var(const Tensor& x, const DimList& dims_in, bool keepdim, std::int64_t correction) {
  const auto dims = detail::reduction_dims(dims_in, x.dim(), "var");
  std::int64_t n = 1;
  for (int d : dims) n *= x.shape()[d];
  CG_CHECK(n - correction > 0, ValueError, "var: need more than ", correction, " elements per reduction; got ", n,
           " (shape ", x.shape(), ")");
  const Tensor centered = x - mean(x, dims_in, true);
  return sum(square(centered), dims_in, keepdim) / static_cast<double>(n - correction);
}

Tensor std(const Tensor& x, const DimList& dims, bool keepdim, std::int64_t correction) {
  return sqrt(var(x, dims, keepdim, correction));
}

Tensor norm(const Tensor& x) { return sqrt(sum(square(x))); }

// d/dx logsumexp(x) = softmax(x) = exp(x - logsumexp(x))
Tensor logsumexp(const Tensor& x, std::int64_t dim_in, bool keepdim) {
  CG_CHECK(x.defined(), ValueError, "logsumexp: input is undefined");
  const int dim = wrap_dim(dim_in, x.dim(), "logsumexp");
  Tensor xc = x.is_contiguous() ? x : x.detach().contiguous();
  const std::vector<int> dims = x.dim() ? std::vector<int>{dim} : std::vector<int>{};
  Dims keep_shape = detail::reduced_shape(x.shape(), dims, true);
  Tensor keep = empty(keep_shape, x.dtype());
  const AxisView v = axis_view(x.shape(), dim, x.dim() ? dim : -1);
  dispatch_float(x.dtype(), "logsumexp", [&]<class T>() {
    kernels::softmax_axis<T, 2>(xc.data<T>(), keep.data<T>(), v.outer, v.R, v.inner);
  });
  Tensor out = finish(keep, x.shape(), dims, keepdim);
  if (detail::any_requires_grad({x}))
    record("logsumexp", {x}, out,
           [sx = SavedTensor(x, false), so = SavedTensor(out, true), dims](const Tensor& g, const Node& self) {
             const Tensor& xv = sx.unpack(self);
             const Tensor lse = restore_reduced(so.unpack(self), xv.shape(), dims);
             return GradList{mul(restore_reduced(g, xv.shape(), dims), exp(xv - lse))};
           });
  return out;
}

namespace {
template <int kKind>
Tensor softmax_like(const Tensor& x, std::int64_t dim_in, const char* op) {
  CG_CHECK(x.defined(), ValueError, op, ": input is undefined");
  const int dim = wrap_dim(dim_in, x.dim(), op);
  Tensor xc = x.is_contiguous() ? x : x.detach().contiguous();
  Tensor out = empty(x.shape(), x.dtype());
  const AxisView v = axis_view(x.shape(), dim, x.dim() ? dim : -1);
  dispatch_float(x.dtype(), op, [&]<class T>() {
    kernels::softmax_axis<T, kKind>(xc.data<T>(), out.data<T>(), v.outer, v.R, v.inner);
  });
  return out;
}
}  // namespace

// d softmax: y * (g - sum(g y))
Tensor softmax(const Tensor& x, std::int64_t dim) {
  Tensor out = softmax_like<0>(x, dim, "softmax");
  if (detail::any_requires_grad({x}))
    record("softmax", {x}, out, [so = SavedTensor(out, true), dim](const Tensor& g, const Node& self) {
      const Tensor& y = so.unpack(self);
      return GradList{mul(y, g - sum(mul(g, y), {dim}, true))};
    });
  return out;
}

// d log_softmax: g - softmax(x) sum(g), with softmax(x) = exp(log_softmax(x))
Tensor log_softmax(const Tensor& x, std::int64_t dim) {
  Tensor out = softmax_like<1>(x, dim, "log_softmax");
  if (detail::any_requires_grad({x}))
    record("log_softmax", {x}, out, [so = SavedTensor(out, true), dim](const Tensor& g, const Node& self) {
      return GradList{g - mul(exp(so.unpack(self)), sum(g, {dim}, true))};
    });
  return out;
}

// Sums the leading dims and the dims where `shape` has 1: the adjoint of expand.
Tensor sum_to(const Tensor& x, const Dims& shape) {
  if (x.shape() == shape) return x;
  const int lead = x.dim() - shape.size();
  CG_CHECK(lead >= 0, ShapeError, "sum_to: cannot sum shape ", x.shape(), " to the larger shape ", shape);
  DimList dims;
  for (int i = 0; i < x.dim(); ++i) {
    if (i < lead) {
      dims.push_back(i);
    } else if (shape[i - lead] == 1 && x.shape()[i] != 1) {
      dims.push_back(i);
    } else {
      CG_CHECK(shape[i - lead] == x.shape()[i], ShapeError, "sum_to: shape ", x.shape(),
               " does not broadcast to ", shape);
    }
  }
  if (dims.empty()) return reshape(x, shape);
  return reshape(sum(x, dims, true), shape);
}

Tensor argmax(const Tensor& x, std::int64_t dim_in, bool keepdim) {
  const int dim = wrap_dim(dim_in, x.dim(), "argmax");
  CG_CHECK(x.numel() > 0, ValueError, "argmax: cannot take the argmax of an empty tensor");
  Tensor xc = x.is_contiguous() ? x : x.detach().contiguous();
  const std::vector<int> dims = x.dim() ? std::vector<int>{dim} : std::vector<int>{};
  Tensor idx = empty(detail::reduced_shape(x.shape(), dims, keepdim), DType::Int64);
  const AxisView v = axis_view(x.shape(), dim, x.dim() ? dim : -1);
  dispatch_float(x.dtype(), "argmax", [&]<class T>() {
    kernels::extreme_axis<T, true>(xc.data<T>(), nullptr, idx.data<std::int64_t>(), v.outer, v.R, v.inner);
  });
  return idx;
}

Tensor argmin(const Tensor& x, std::int64_t dim_in, bool keepdim) {
  const int dim = wrap_dim(dim_in, x.dim(), "argmin");
  CG_CHECK(x.numel() > 0, ValueError, "argmin: cannot take the argmin of an empty tensor");
  Tensor xc = x.is_contiguous() ? x : x.detach().contiguous();
  const std::vector<int> dims = x.dim() ? std::vector<int>{dim} : std::vector<int>{};
  Tensor idx = empty(detail::reduced_shape(x.shape(), dims, keepdim), DType::Int64);
  const AxisView v = axis_view(x.shape(), dim, x.dim() ? dim : -1);
  dispatch_float(x.dtype(), "argmin", [&]<class T>() {
    kernels::extreme_axis<T, false>(xc.data<T>(), nullptr, idx.data<std::int64_t>(), v.outer, v.R, v.inner);
  });
  return idx;
}

}  // namespace chaingrad
