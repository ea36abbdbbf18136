// Views and shape ops. Views share storage (and so the version counter); their backward rules
// are the inverse views, or, for slices and broadcasts, their adjoints.
#include <cstring>
#include <numeric>
#include <optional>

#include "ops/common.hpp"

namespace chaingrad {

using detail::make_view;
using detail::record;

namespace {
Dims infer_shape(const Dims& requested, std::int64_t numel, const Dims& from) {
  Dims shape = requested;
  int infer = -1;
  std::int64_t known = 1;
  for (int i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      CG_CHECK(infer < 0, ShapeError, "reshape: only one dimension can be -1; got ", requested);
      infer = i;
    } else {
      CG_CHECK(shape[i] >= 0, ShapeError, "reshape: invalid dimension ", shape[i], " in ", requested);
      known *= shape[i];
    }
  }
  if (infer >= 0) {
    CG_CHECK(known != 0 && numel % known == 0, ShapeError, "reshape: shape ", requested,
             " is invalid for input of shape ", from, " (", numel, " elements)");
    shape[infer] = numel / known;
  }
  CG_CHECK(shape.numel() == numel, ShapeError, "reshape: shape ", requested, " is invalid for input of shape ", from,
           " (", numel, " elements)");
  return shape;
}

// Strides that show the elements of (shape, strides), in row-major order, as `target`, or none
// when no strides can (the result then needs a copy). The source's dimensions fall into runs that
// step through memory evenly (each dimension's stride is the next one's times its extent);
// `target` is a view exactly when each of its dimensions lies within one run, so the runs are
// matched from the innermost out. Size-1 dimensions break no run and take any stride.
std::optional<Dims> view_strides(const Dims& shape, const Dims& strides, const Dims& target) {
  if (shape.numel() == 0) return contiguous_strides(target);  // (no element to address)
  Dims out = Dims::filled(target.size(), 0);
  int t = target.size() - 1;
  std::int64_t run = 1, taken = 1, inner = 0;  // the current run's elements, target's share of them, its step
  for (int d = shape.size() - 1; d >= 0; --d) {
    if (shape[d] == 1) continue;
    if (run == 1) inner = strides[d];
    run *= shape[d];
    int outer = d - 1;
    while (outer >= 0 && shape[outer] == 1) --outer;
    if (outer >= 0 && strides[outer] == strides[d] * shape[d]) continue;  // the run goes on outward
    // The run ends at d: target's dims take it from the inside out until they cover it exactly.
    while (t >= 0 && (taken < run || target[t] == 1)) {
      out[t] = inner * taken;
      taken *= target[t];
      --t;
    }
    if (taken != run) return std::nullopt;
    run = 1;
    taken = 1;
  }
  for (; t >= 0; --t) out[t] = 1;  // target's leading size-1 dims (the element counts match)
  return out;
}
}  // namespace

Tensor reshape(const Tensor& x, const Dims& requested) {
  CG_CHECK(x.defined(), ValueError, "reshape: input is undefined");
  const Dims shape = infer_shape(requested, x.numel(), x.shape());
  if (shape == x.shape()) return x;
  // A view wherever strides allow (as in PyTorch): select, squeeze and unsqueeze of a transposed
  // or sliced tensor share its storage rather than copy it.
  Tensor out;
  if (x.is_contiguous())
    out = make_view(x, shape, contiguous_strides(shape), x.offset());
  else if (const std::optional<Dims> strides = view_strides(x.shape(), x.strides(), shape))
    out = make_view(x, shape, *strides, x.offset());
  else
    out = make_view(x.detach().contiguous(), shape, contiguous_strides(shape), 0);
  if (detail::any_requires_grad({x}))
    record("reshape", {x}, out, [in_shape = x.shape()](const Tensor& g, const Node&) {
      return GradList{reshape(g, in_shape)};
    });
  return out;
}

Tensor permute(const Tensor& x, const Dims& order) {
  CG_CHECK(order.size() == x.dim(), ShapeError, "permute: order ", order, " does not match ", x.dim(),
           " dimensions of shape ", x.shape());
  Dims shape, strides, inverse = Dims::filled(x.dim(), -1);
  for (int i = 0; i < order.size(); ++i) {
    const int d = wrap_dim(order[i], x.dim(), "permute");
    CG_CHECK(inverse[d] < 0, ShapeError, "permute: dimension ", d, " repeats in order ", order);
    inverse[d] = i;
    shape.push_back(x.shape()[d]);
    strides.push_back(x.strides()[d]);
  }
  Tensor out = make_view(x, shape, strides, x.offset());
  if (detail::any_requires_grad({x}))
    record("permute", {x}, out, [inverse](const Tensor& g, const Node&) { return GradList{permute(g, inverse)}; });
  return out;
}

Tensor transpose(const Tensor& x, std::int64_t d0, std::int64_t d1) {
  const int a = wrap_dim(d0, x.dim(), "transpose"), b = wrap_dim(d1, x.dim(), "transpose");
  if (x.dim() < 2 || a == b) return x;
  Dims order;
  for (int i = 0; i < x.dim(); ++i) order.push_back(i);
  std::swap(order[a], order[b]);
  return permute(x, order);
}

Tensor slice(const Tensor& x, std::int64_t dim_in, std::int64_t start, std::int64_t end, std::int64_t step) {
  CG_CHECK(x.dim() > 0, ShapeError, "slice: cannot slice a 0-d tensor");
  const int dim = wrap_dim(dim_in, x.dim(), "slice");
  CG_CHECK(step > 0, ValueError, "slice: step must be positive; got ", step);
  const std::int64_t n = x.shape()[dim];
  auto clampi = [n](std::int64_t i) { return std::clamp<std::int64_t>(i < 0 ? i + n : i, 0, n); };
  start = clampi(start);
  end = std::max(clampi(end), start);
  Dims shape = x.shape(), strides = x.strides();
  shape[dim] = (end - start + step - 1) / step;
  strides[dim] *= step;
  Tensor out = make_view(x, shape, strides, x.offset() + start * x.strides()[dim]);
  if (detail::any_requires_grad({x}))
    record("slice", {x}, out, [in_shape = x.shape(), dim, start, step](const Tensor& g, const Node&) {
      return GradList{slice_backward(g, in_shape, dim, start, step)};
    });
  return out;
}

// The adjoint of slice: zeros of the input's shape with `grad` written into the sliced positions.
Tensor slice_backward(const Tensor& grad, const Dims& input_shape, std::int64_t dim_in, std::int64_t start,
                      std::int64_t step) {
  CG_CHECK(grad.defined() && grad.dim() > 0 && grad.dim() == input_shape.size(), ShapeError,
           "slice_backward: a gradient of shape ", grad.defined() ? to_string(grad.shape()) : "undefined",
           " cannot be a slice of an input of shape ", input_shape, " (a slice keeps the input's rank, 1 or more)");
  const int dim = wrap_dim(dim_in, grad.dim(), "slice_backward");
  Tensor out = zeros(input_shape, {.dtype = grad.dtype()});
  {
    NoGradGuard ng;
    out.slice(dim, start, start + grad.shape()[dim] * step, step).copy_(grad);
  }
  if (detail::any_requires_grad({grad}))
    record("slice_backward", {grad}, out, [dim, start, n = grad.shape()[dim], step](const Tensor& g, const Node&) {
      return GradList{slice(g, dim, start, start + n * step, step)};
    });
  return out;
}

Tensor select(const Tensor& x, std::int64_t dim_in, std::int64_t index) {
  CG_CHECK(x.dim() > 0, ShapeError, "select: cannot select from a 0-d tensor");
  const int dim = wrap_dim(dim_in, x.dim(), "select");
  const std::int64_t n = x.shape()[dim];
  CG_CHECK(index >= -n && index < n, ShapeError, "select: index ", index, " is out of range for dimension ", dim,
           " of size ", n);
  if (index < 0) index += n;
  return squeeze(slice(x, dim, index, index + 1), dim);
}

Tensor expand(const Tensor& x, const Dims& requested) {
  CG_CHECK(requested.size() >= x.dim(), ShapeError, "expand: cannot expand shape ", x.shape(), " to fewer dimensions ",
           requested);
  Dims shape = requested;
  const int lead = shape.size() - x.dim();
  for (int i = 0; i < shape.size(); ++i) {
    if (i >= lead && shape[i] == -1) shape[i] = x.shape()[i - lead];
    if (i >= lead) {
      const std::int64_t have = x.shape()[i - lead];
      CG_CHECK(have == shape[i] || have == 1, ShapeError, "expand: shape ", x.shape(), " cannot be expanded to ",
               requested, " (dimension ", i, ": ", have, " vs ", shape[i], ")");
    }
  }
  if (shape == x.shape()) return x;
  Tensor out = make_view(x, shape, Dims(), -1);
  if (detail::any_requires_grad({x}))
    record("expand", {x}, out, [in_shape = x.shape()](const Tensor& g, const Node&) {
      return GradList{sum_to(g, in_shape)};
    });
  return out;
}

Tensor squeeze(const Tensor& x, std::optional<std::int64_t> dim) {
  Dims shape;
  if (dim) {
    const int d = wrap_dim(*dim, x.dim(), "squeeze");
    for (int i = 0; i < x.dim(); ++i)
      if (i != d || x.shape()[i] != 1) shape.push_back(x.shape()[i]);
  } else {
    for (int i = 0; i < x.dim(); ++i)
      if (x.shape()[i] != 1) shape.push_back(x.shape()[i]);
  }
  return reshape(x, shape);
}

Tensor unsqueeze(const Tensor& x, std::int64_t dim) {
  const int d = wrap_dim(dim, x.dim() + 1, "unsqueeze");
  Dims shape = x.shape();
  shape.insert(d, 1);
  return reshape(x, shape);
}

Tensor flatten(const Tensor& x, std::int64_t start, std::int64_t end) {
  if (x.dim() == 0) return reshape(x, {1});
  const int s = wrap_dim(start, x.dim(), "flatten"), e = wrap_dim(end, x.dim(), "flatten");
  CG_CHECK(s <= e, ShapeError, "flatten: start dimension ", s, " comes after end dimension ", e);
  Dims shape;
  for (int i = 0; i < s; ++i) shape.push_back(x.shape()[i]);
  std::int64_t p = 1;
  for (int i = s; i <= e; ++i) p *= x.shape()[i];
  shape.push_back(p);
  for (int i = e + 1; i < x.dim(); ++i) shape.push_back(x.shape()[i]);
  return reshape(x, shape);
}

Tensor contiguous(const Tensor& x) {
  if (x.is_contiguous()) return x;
  Tensor out = empty(x.shape(), x.dtype());
  kernels::copy_to(x, out.raw_data(), x.dtype());
  if (detail::any_requires_grad({x}))
    record("contiguous", {x}, out, [](const Tensor& g, const Node&) { return GradList{g}; });
  return out;
}

// d/dx cast(x) = 1, in the input's dtype (the engine restores it).
Tensor cast(const Tensor& x, DType dtype) {
  if (x.dtype() == dtype) return x;
  Tensor out = empty(x.shape(), dtype);
  kernels::copy_to(x, out.raw_data(), dtype);
  if (is_floating(dtype) && detail::any_requires_grad({x}))
    record("cast", {x}, out, [](const Tensor& g, const Node&) { return GradList{g}; });
  return out;
}

Tensor cat(const std::vector<Tensor>& xs, std::int64_t dim_in) {
  CG_CHECK(!xs.empty(), ValueError, "cat: expected a non-empty list of tensors");
  const Tensor& first = xs[0];
  CG_CHECK(first.dim() > 0, ShapeError, "cat: zero-dimensional tensors cannot be concatenated");
  const int dim = wrap_dim(dim_in, first.dim(), "cat");
  Dims shape = first.shape();
  shape[dim] = 0;
  DType dt = first.dtype();
  for (std::size_t i = 0; i < xs.size(); ++i) {
    const Tensor& t = xs[i];
    CG_CHECK(t.defined() && t.dim() == first.dim(), ShapeError, "cat: tensor ", i, " has shape ",
             t.defined() ? to_string(t.shape()) : "undefined", " but tensor 0 has shape ", first.shape());
    for (int d = 0; d < t.dim(); ++d)
      CG_CHECK(d == dim || t.shape()[d] == first.shape()[d], ShapeError, "cat: shapes ", first.shape(), " and ",
               t.shape(), " (tensor ", i, ") differ outside dimension ", dim);
    shape[dim] += t.shape()[dim];
    dt = promote(dt, t.dtype());
  }
  Tensor out = empty(shape, dt);
  std::vector<std::int64_t> sizes;
  {
    NoGradGuard ng;
    std::int64_t off = 0;
    for (const Tensor& t : xs) {
      out.slice(dim, off, off + t.shape()[dim]).copy_(t);
      off += t.shape()[dim];
      sizes.push_back(t.shape()[dim]);
    }
    out.impl()->storage->bump_version();
  }
  if (detail::any_requires_grad(std::span<const Tensor>(xs)))
    record("cat", std::span<const Tensor>(xs), out, [sizes, dim](const Tensor& g, const Node& self) {
      GradList grads(sizes.size());
      std::int64_t off = 0;
      for (std::size_t i = 0; i < sizes.size(); ++i) {
        if (self.needs_grad(i)) grads[i] = slice(g, dim, off, off + sizes[i]);
        off += sizes[i];
      }
      return grads;
    });
  return out;
}

Tensor stack(const std::vector<Tensor>& xs, std::int64_t dim) {
  CG_CHECK(!xs.empty(), ValueError, "stack: expected a non-empty list of tensors");
  const int d = wrap_dim(dim, xs[0].dim() + 1, "stack");
  std::vector<Tensor> parts;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    CG_CHECK(xs[i].shape() == xs[0].shape(), ShapeError, "stack: tensor ", i, " has shape ", xs[i].shape(),
             " but tensor 0 has shape ", xs[0].shape());
    parts.push_back(unsqueeze(xs[i], d));
  }
  return cat(parts, d);
}

std::vector<Tensor> split(const Tensor& x, std::int64_t split_size, std::int64_t dim_in) {
  CG_CHECK(split_size > 0, ValueError, "split: split_size must be positive; got ", split_size);
  CG_CHECK(x.dim() > 0, ShapeError, "split: cannot split a 0-d tensor");  // (it has no dimension to split)
  const int dim = wrap_dim(dim_in, x.dim(), "split");
  std::vector<Tensor> parts;
  for (std::int64_t s = 0; s < x.shape()[dim]; s += split_size) parts.push_back(slice(x, dim, s, s + split_size));
  return parts;
}

}  // namespace chaingrad
