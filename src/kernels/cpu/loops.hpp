#pragma once
// Elementwise loops over strided tensors. Operands are first expanded to the output's shape
// (broadcast dims get stride 0), then walked with the innermost dimension as a tight loop; the
// all-contiguous case is a single flat loop the compiler vectorizes.
#include <array>
#include <cstdint>

#include "chaingrad/tensor.hpp"
#include "kernels/cpu/parallel.hpp"

namespace chaingrad::kernels {

// Calls body(offsets, inner_count, inner_strides) once for each of the runs [first, last) of the
// innermost dimension, in row-major order, where offsets[k] is operand k's element offset at the
// start of the run.
template <int N, class Body>
void for_each_run_in(const Dims& shape, const std::array<const Dims*, N>& strides, std::int64_t first,
                     std::int64_t last, Body&& body) {
  const int nd = shape.size();
  std::array<std::int64_t, N> off{};
  std::array<std::int64_t, N> inner{};
  if (nd == 0) {
    if (first < last) body(off, std::int64_t{1}, inner);
    return;
  }
  for (int k = 0; k < N; ++k) inner[k] = (*strides[k])[nd - 1];
  const std::int64_t n_inner = shape[nd - 1];
  if (n_inner == 0 || first >= last) return;  // (an empty range: an outer extent may be 0)
  std::int64_t idx[kMaxDims] = {};
  for (std::int64_t rest = first, d = nd - 2; d >= 0; --d) {  // the outer index of run `first`
    idx[d] = rest % shape[d];
    rest /= shape[d];
    for (int k = 0; k < N; ++k) off[k] += idx[d] * (*strides[k])[d];
  }
  for (std::int64_t o = first; o < last; ++o) {
    body(off, n_inner, inner);
    for (int d = nd - 2; d >= 0; --d) {  // odometer increment of the outer index
      ++idx[d];
      for (int k = 0; k < N; ++k) off[k] += (*strides[k])[d];
      if (idx[d] < shape[d]) break;
      for (int k = 0; k < N; ++k) off[k] -= (*strides[k])[d] * shape[d];
      idx[d] = 0;
    }
  }
}

// Number of runs of the innermost dimension (0 for an empty tensor, 1 for a 0-d one).
inline std::int64_t count_runs(const Dims& shape) {
  if (shape.empty()) return 1;
  std::int64_t outer = shape[shape.size() - 1] == 0 ? 0 : 1;
  for (int d = 0; d < shape.size() - 1; ++d) outer *= shape[d];
  return outer;
}

// for_each_run over every run of the shape.
template <int N, class Body>
void for_each_run(const Dims& shape, const std::array<const Dims*, N>& strides, Body&& body) {
  for_each_run_in<N>(shape, strides, 0, count_runs(shape), body);
}

// for_each_run with the runs cut into one block per thread when the tensor has at least
// kParallelElements elements. Only for bodies that write each element of a separate output once
// (the out-of-place maps): a cut between runs then cannot change any result.
template <int N, class Body>
void parallel_runs(const Dims& shape, const std::array<const Dims*, N>& strides, Body&& body) {
  parallel_units(count_runs(shape), shape.numel(),
                 [&](std::int64_t lo, std::int64_t hi) { for_each_run_in<N>(shape, strides, lo, hi, body); });
}

// map_unary for a tensor of one or more dimensions, contiguous or strided.
template <class T, class U, class F>
void map_unary_strided(const Tensor& x, U* out, F f) {
  const T* px = static_cast<const T*>(x.storage()->data()) + x.offset();
  if (x.is_contiguous()) {
    parallel_range(x.numel(), [&](std::int64_t lo, std::int64_t hi) {
      for (std::int64_t i = lo; i < hi; ++i) out[i] = f(px[i]);
    });
    return;
  }
  const Dims cs = contiguous_strides(x.shape());
  parallel_runs<2>(x.shape(), {&x.strides(), &cs}, [&](auto off, std::int64_t n, auto st) {
    const T* a = px + off[0];
    U* o = out + off[1];
    for (std::int64_t i = 0; i < n; ++i) o[i] = f(a[i * st[0]]);
  });
}

// out[i] = f(x[i]) for a contiguous `out` of x's shape. The one-element case is inline, so it
// does not pay the general loop's stack frame (the scalar workload is mostly such calls).
template <class T, class U, class F>
inline void map_unary(const Tensor& x, U* out, F f) {
  if (x.dim() == 0) {
    out[0] = f(static_cast<const T*>(x.storage()->data())[x.offset()]);
    return;
  }
  map_unary_strided<T>(x, out, f);
}

// map_binary for operands of one or more dimensions.
template <class T, class U, class F>
void map_binary_strided(const Tensor& a, const Tensor& b, U* out, F f) {
  const T* pa = static_cast<const T*>(a.storage()->data()) + a.offset();
  const T* pb = static_cast<const T*>(b.storage()->data()) + b.offset();
  const std::int64_t n = a.numel();
  const bool ca = a.is_contiguous(), cb = b.is_contiguous();
  if (ca && cb) {
    parallel_range(n, [&](std::int64_t lo, std::int64_t hi) {
      for (std::int64_t i = lo; i < hi; ++i) out[i] = f(pa[i], pb[i]);
    });
    return;
  }
  const Dims cs = contiguous_strides(a.shape());
  parallel_runs<3>(a.shape(), {&a.strides(), &b.strides(), &cs}, [&](auto off, std::int64_t m, auto st) {
    const T* x = pa + off[0];
    const T* y = pb + off[1];
    U* o = out + off[2];
    if (st[0] == 1 && st[1] == 1) {
      for (std::int64_t i = 0; i < m; ++i) o[i] = f(x[i], y[i]);
    } else if (st[0] == 1 && st[1] == 0) {
      const T yv = *y;
      for (std::int64_t i = 0; i < m; ++i) o[i] = f(x[i], yv);
    } else if (st[0] == 0 && st[1] == 1) {
      const T xv = *x;
      for (std::int64_t i = 0; i < m; ++i) o[i] = f(xv, y[i]);
    } else {
      for (std::int64_t i = 0; i < m; ++i) o[i] = f(x[i * st[0]], y[i * st[1]]);
    }
  });
}

// out[i] = f(a[i], b[i]) where a and b are already expanded to out's shape (one element inline,
// as in map_unary).
template <class T, class U, class F>
inline void map_binary(const Tensor& a, const Tensor& b, U* out, F f) {
  if (a.dim() == 0) {
    out[0] = f(static_cast<const T*>(a.storage()->data())[a.offset()],
               static_cast<const T*>(b.storage()->data())[b.offset()]);
    return;
  }
  map_binary_strided<T>(a, b, out, f);
}

// out[i] = f(a[i], b[i], c[i]), all expanded to out's shape.
template <class T, class F>
void map_ternary(const Tensor& a, const Tensor& b, const Tensor& c, T* out, F f) {
  const T* pa = static_cast<const T*>(a.storage()->data()) + a.offset();
  const T* pb = static_cast<const T*>(b.storage()->data()) + b.offset();
  const T* pc = static_cast<const T*>(c.storage()->data()) + c.offset();
  const Dims cs = contiguous_strides(a.shape());
  parallel_runs<4>(a.shape(), {&a.strides(), &b.strides(), &c.strides(), &cs}, [&](auto off, std::int64_t m, auto st) {
    for (std::int64_t i = 0; i < m; ++i)
      out[off[3] + i] = f(pa[off[0] + i * st[0]], pb[off[1] + i * st[1]], pc[off[2] + i * st[2]]);
  });
}

// Copies any strided tensor into contiguous memory of the same dtype, converting to U.
void copy_to(const Tensor& src, void* dst, DType dst_dtype);

}  // namespace chaingrad::kernels
