// Gather/scatter pairs: each is the other's adjoint, so each backward is the other op.
#include <algorithm>
#include <cstring>

#include "kernels/cpu/parallel.hpp"
#include "ops/common.hpp"

namespace chaingrad {

using detail::record;

namespace {

Tensor contiguous_index(const Tensor& index, const char* op) {
  CG_CHECK(index.defined() && index.dtype() == DType::Int64, TypeError, op, ": index must be an int64 tensor; got ",
           index.defined() ? std::string(dtype_name(index.dtype())) : "undefined");
  return index.is_contiguous() ? index : index.contiguous();
}

void check_range(std::int64_t v, std::int64_t n, const char* op, std::int64_t pos) {
  CG_CHECK(v >= 0 && v < n, ShapeError, op, ": index ", v, " at position ", pos, " is out of range [0, ", n, ")");
}

// [outer, n, inner] layout around `dim` for contiguous shape.
void split_dims(const Dims& s, int dim, std::int64_t& outer, std::int64_t& inner) {
  outer = 1;
  inner = 1;
  for (int i = 0; i < dim; ++i) outer *= s[i];
  for (int i = dim + 1; i < s.size(); ++i) inner *= s[i];
}

void check_gather_shapes(const Tensor& x, int dim, const Tensor& index, const char* op) {
  CG_CHECK(index.dim() == x.dim(), ShapeError, op, ": index must have as many dimensions as the input; got shapes ",
           index.shape(), " and ", x.shape());
  for (int d = 0; d < x.dim(); ++d)
    CG_CHECK(d == dim || index.shape()[d] <= x.shape()[d], ShapeError, op, ": index shape ", index.shape(),
             " exceeds input shape ", x.shape(), " in dimension ", d);
}

// out[..., index[..., j, ...], ...] += src[..., j, ...] along `dim` (index and src same shape).
template <class T>
void scatter_add_into(T* out, const Dims& out_shape, int dim, const Tensor& index, const Tensor& src) {
  const Dims cs = contiguous_strides(out_shape);
  const Tensor s = src.is_contiguous() ? src : src.contiguous();
  const T* ps = s.data<T>();
  const std::int64_t* pi = index.data<std::int64_t>();
  const Dims& is = index.shape();
  if (is.size() == 2 && dim == 1) {  // rows scatter independently (max_pool2d's backward)
    const std::int64_t rows = is[0], cols = is[1], width = out_shape[1];
    for (std::int64_t r = 0; r < rows; ++r) {
      T* o = out + r * width;
      const std::int64_t* ir = pi + r * cols;
      const T* sr = ps + r * cols;
      for (std::int64_t j = 0; j < cols; ++j) {
        check_range(ir[j], width, "scatter_add", r * cols + j);
        o[ir[j]] += sr[j];
      }
    }
    return;
  }
  std::int64_t idx[kMaxDims] = {};
  for (std::int64_t k = 0, n = index.numel(); k < n; ++k) {
    std::int64_t off = 0;
    for (int d = 0; d < is.size(); ++d) off += (d == dim ? pi[k] : idx[d]) * cs[d];
    check_range(pi[k], out_shape[dim], "scatter_add", k);
    out[off] += ps[k];
    for (int d = is.size() - 1; d >= 0; --d) {
      if (++idx[d] < is[d]) break;
      idx[d] = 0;
    }
  }
}

}  // namespace

Tensor gather(const Tensor& x_in, std::int64_t dim_in, const Tensor& index_in) {
  const int dim = wrap_dim(dim_in, x_in.dim(), "gather");
  const Tensor index = contiguous_index(index_in, "gather");
  check_gather_shapes(x_in, dim, index, "gather");
  const Tensor x = x_in.is_contiguous() ? x_in : x_in.detach().contiguous();
  Tensor out = empty(index.shape(), x.dtype());
  dispatch_float(x.dtype(), "gather", [&]<class T>() {
    const Dims cs = contiguous_strides(x.shape());
    const T* px = x.data<T>();
    T* po = out.data<T>();
    const std::int64_t* pi = index.data<std::int64_t>();
    std::int64_t idx[kMaxDims] = {};
    for (std::int64_t k = 0, n = index.numel(); k < n; ++k) {
      check_range(pi[k], x.shape()[dim], "gather", k);
      std::int64_t off = 0;
      for (int d = 0; d < index.dim(); ++d) off += (d == dim ? pi[k] : idx[d]) * cs[d];
      po[k] = px[off];
      for (int d = index.dim() - 1; d >= 0; --d) {
        if (++idx[d] < index.shape()[d]) break;
        idx[d] = 0;
      }
    }
  });
  if (detail::any_requires_grad({x_in}))
    record("gather", {x_in}, out, [shape = x_in.shape(), dim, index](const Tensor& g, const Node&) {
      return GradList{scatter_add(zeros(shape, {.dtype = g.dtype()}), dim, index, g)};
    });
  return out;
}

// d/dx = 1, d/dsrc = gather(g)
Tensor scatter_add(const Tensor& x, std::int64_t dim_in, const Tensor& index_in, const Tensor& src) {
  const int dim = wrap_dim(dim_in, x.dim(), "scatter_add");
  const Tensor index = contiguous_index(index_in, "scatter_add");
  check_gather_shapes(x, dim, index, "scatter_add");
  CG_CHECK(src.shape() == index.shape(), ShapeError, "scatter_add: src shape ", src.shape(),
           " must equal index shape ", index.shape());
  const DType dt = promote(x.dtype(), src.dtype());
  Tensor out = empty(x.shape(), dt);
  kernels::copy_to(x, out.raw_data(), dt);
  dispatch_float(dt, "scatter_add", [&]<class T>() {
    scatter_add_into<T>(out.data<T>(), x.shape(), dim, index, src.dtype() == dt ? src : src.detach().to(dt));
  });
  if (detail::any_requires_grad({x, src}))
    record("scatter_add", {x, src}, out, [dim, index](const Tensor& g, const Node& self) {
      return GradList{self.needs_grad(0) ? g : Tensor(), self.needs_grad(1) ? gather(g, dim, index) : Tensor()};
    });
  return out;
}

Tensor index_select(const Tensor& x_in, std::int64_t dim_in, const Tensor& index_in) {
  CG_CHECK(x_in.dim() > 0, ShapeError, "index_select: cannot index a 0-d tensor");
  const int dim = wrap_dim(dim_in, x_in.dim(), "index_select");
  const Tensor index = contiguous_index(index_in, "index_select");
  CG_CHECK(index.dim() <= 1, ShapeError, "index_select: index must be 0-D or 1-D; got shape ", index.shape());
  const Tensor x = x_in.is_contiguous() ? x_in : x_in.detach().contiguous();
  std::int64_t outer, inner;
  split_dims(x.shape(), dim, outer, inner);
  const std::int64_t n = x.shape()[dim], k = index.numel();
  Dims shape = x.shape();
  shape[dim] = k;
  Tensor out = empty(shape, x.dtype());
  const std::int64_t* pi = index.data<std::int64_t>();
  for (std::int64_t j = 0; j < k; ++j) check_range(pi[j], n, "index_select", j);
  const std::size_t es = element_size(x.dtype());
  const char* px = static_cast<const char*>(x.raw_data());
  char* po = static_cast<char*>(out.raw_data());
  // Row u = o * k + j of the output; the rows go to the threads from 64k elements on (an embedding
  // lookup of a batch), since a gather of scattered rows waits on memory.
  kernels::parallel_units(outer * k, outer * k * inner, [&](std::int64_t lo, std::int64_t hi) {
    for (std::int64_t u = lo; u < hi; ++u) {
      const std::int64_t o = u / k, j = u % k;
      std::memcpy(po + u * inner * es, px + ((o * n + pi[j]) * inner) * es, inner * es);
    }
  });
  if (detail::any_requires_grad({x_in}))
    record("index_select", {x_in}, out, [shape = x_in.shape(), dim, index](const Tensor& g, const Node&) {
      return GradList{index_add(zeros(shape, {.dtype = g.dtype()}), dim, index, g)};
    });
  return out;
}

// d/dx = 1, d/dsrc = index_select(g)
Tensor index_add(const Tensor& x, std::int64_t dim_in, const Tensor& index_in, const Tensor& src_in) {
  CG_CHECK(x.dim() > 0, ShapeError, "index_add: cannot index a 0-d tensor");
  const int dim = wrap_dim(dim_in, x.dim(), "index_add");
  const Tensor index = contiguous_index(index_in, "index_add");
  const std::int64_t k = index.numel(), n = x.shape()[dim];
  Dims expect = x.shape();
  expect[dim] = k;
  CG_CHECK(src_in.shape() == expect, ShapeError, "index_add: src shape ", src_in.shape(), " must be ", expect,
           " for input ", x.shape(), " and ", k, " indices");
  const DType dt = promote(x.dtype(), src_in.dtype());
  Tensor out = empty(x.shape(), dt);
  kernels::copy_to(x, out.raw_data(), dt);
  const Tensor src = (src_in.dtype() == dt ? src_in : src_in.detach().to(dt)).detach().contiguous();
  std::int64_t outer, inner;
  split_dims(x.shape(), dim, outer, inner);
  const std::int64_t* pi = index.data<std::int64_t>();
  for (std::int64_t j = 0; j < k; ++j) check_range(pi[j], n, "index_add", j);
  // Repeated indices add into one row, so the threads share out columns, not source rows: unit u is
  // outer slice u / blocks, columns of block u % blocks. Every element still takes its additions in
  // the order of the index, so the bits do not depend on the cut (an embedding's backward).
  const std::int64_t blocks = (inner + 15) / 16;
  dispatch_float(dt, "index_add", [&]<class T>() {
    T* po = out.data<T>();
    const T* ps = src.data<T>();
    kernels::parallel_units(outer * blocks, outer * k * inner, [&](std::int64_t lo, std::int64_t hi) {
      for (std::int64_t o = lo / blocks; o * blocks < hi; ++o) {
        const std::int64_t c0 = (std::max(lo, o * blocks) - o * blocks) * 16;
        const std::int64_t c1 = std::min(inner, (std::min(hi, (o + 1) * blocks) - o * blocks) * 16);
        for (std::int64_t j = 0; j < k; ++j) {
          T* dst = po + (o * n + pi[j]) * inner;
          const T* s = ps + (o * k + j) * inner;
          for (std::int64_t i = c0; i < c1; ++i) dst[i] += s[i];
        }
      }
    });
  });
  if (detail::any_requires_grad({x, src_in}))
    record("index_add", {x, src_in}, out, [dim, index](const Tensor& g, const Node& self) {
      return GradList{self.needs_grad(0) ? g : Tensor(), self.needs_grad(1) ? index_select(g, dim, index) : Tensor()};
    });
  return out;
}

Tensor embedding(const Tensor& weight, const Tensor& indices) {
  CG_CHECK(weight.dim() == 2, ShapeError, "embedding: weight must be 2-D [num, dim]; got shape ", weight.shape());
  Dims shape = indices.shape();
  shape.push_back(weight.shape()[1]);
  return reshape(index_select(weight, 0, reshape(indices, {-1})), shape);
}

Tensor one_hot(const Tensor& index_in, std::int64_t num_classes, DType dtype) {
  const Tensor index = contiguous_index(index_in, "one_hot");
  Dims shape = index.shape();
  shape.push_back(num_classes);
  Tensor out = zeros(shape, {.dtype = dtype});
  const std::int64_t* pi = index.data<std::int64_t>();
  dispatch(dtype, [&]<class T>() {
    T* po = out.data<T>();
    for (std::int64_t k = 0, n = index.numel(); k < n; ++k) {
      check_range(pi[k], num_classes, "one_hot", k);
      po[k * num_classes + pi[k]] = T(1);
    }
  });
  return out;
}

}  // namespace chaingrad
