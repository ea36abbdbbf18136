#pragma once
// Shared forward plumbing for ops: dtype promotion, broadcasting, elementwise maps. No autograd.
#include "chaingrad/ops.hpp"
#include "kernels/cpu/loops.hpp"

namespace chaingrad::detail {

// Promotes both operands to a common floating dtype and broadcasts them (as stride-0 views).
struct BroadcastPair {
  Tensor a, b;
  Dims shape;
  DType dtype;
};
BroadcastPair broadcast_pair(const Tensor& a, const Tensor& b, const char* op);

// out = f(x) elementwise; float dtypes only.
template <class F>
Tensor unary_map(const Tensor& x, const char* op, F f) {
  CG_CHECK(x.defined(), ValueError, op, ": input is undefined");
  Tensor out = empty(x.shape(), x.dtype());
  dispatch_float(x.dtype(), op, [&]<class T>() { kernels::map_unary<T>(x, out.data<T>(), f); });
  return out;
}

// out = f(a, b) elementwise with broadcasting and promotion; float dtypes only.
template <class F>
Tensor binary_map(const Tensor& a, const Tensor& b, const char* op, F f) {
  if (a.defined() && b.defined() && a.dtype() == b.dtype() && is_floating(a.dtype()) && a.shape() == b.shape()) {
    // Same shape and dtype (the common case, and all of the scalar workload): no broadcast views.
    Tensor out = empty(a.shape(), a.dtype());
    dispatch_float(a.dtype(), op, [&]<class T>() { kernels::map_binary<T>(a, b, out.data<T>(), f); });
    return out;
  }
  BroadcastPair p = broadcast_pair(a, b, op);
  Tensor out = empty(p.shape, p.dtype);
  dispatch_float(p.dtype, op, [&]<class T>() { kernels::map_binary<T>(p.a, p.b, out.data<T>(), f); });
  return out;
}

// out = f(g, x) elementwise for a backward rule that records no graph (grad mode off): written
// over the incoming gradient `g` when the rule holds the only reference to it and to its buffer
// and it already has the result's shape, dtype and layout. The engine hands each rule its summed
// gradient by value, so a chain of elementwise backwards then allocates nothing. Otherwise (a
// gradient still shared, say by add's two inputs or a retain_grad; broadcasting) a fresh tensor.
template <class F>
Tensor grad_map(Tensor&& g, const Tensor& x, const char* op, F f) {
  if (g.defined() && x.defined() && g.dtype() == x.dtype() && is_floating(g.dtype()) && g.shape() == x.shape() &&
      g.impl_ptr().use_count() == 1 && g.storage().use_count() == 1 && !g.requires_grad() && !g.impl()->extras &&
      g.is_contiguous()) {
    Tensor out = std::move(g);
    dispatch_float(out.dtype(), op, [&]<class T>() { kernels::map_binary<T>(out, x, out.data<T>(), f); });
    return out;
  }
  return binary_map(g, x, op, f);
}

// A 0-d tensor holding `v` in x's dtype (a double operand does not promote, as in PyTorch).
inline Tensor scalar_like(const Tensor& x, double v) {
  return full({}, v, {.dtype = is_floating(x.dtype()) ? x.dtype() : DType::Float32});
}

// Normalizes a dim list (negative dims, duplicates) to sorted unique dims; empty = all.
std::vector<int> reduction_dims(const DimList& dims, int ndim, const char* op);
// The shape after reducing `dims` with keepdim.
Dims reduced_shape(const Dims& shape, const std::vector<int>& dims, bool keepdim);

// A view over the same storage (no autograd).
Tensor make_view(const Tensor& x, const Dims& shape, const Dims& strides, std::int64_t offset);

}  // namespace chaingrad::detail
