#include "ops/common.hpp"

#include <algorithm>

namespace chaingrad::detail {

BroadcastPair broadcast_pair(const Tensor& a, const Tensor& b, const char* op) {
  CG_CHECK(a.defined() && b.defined(), ValueError, op, ": an input is undefined");
  BroadcastPair p;
  p.shape = broadcast_shapes(a.shape(), b.shape(), op);
  p.dtype = promote(a.dtype(), b.dtype());
  if (!is_floating(p.dtype)) p.dtype = DType::Float32;
  Tensor ca = a.dtype() == p.dtype ? a : a.detach().to(p.dtype);
  Tensor cb = b.dtype() == p.dtype ? b : b.detach().to(p.dtype);
  p.a = ca.shape() == p.shape ? ca : make_view(ca, p.shape, Dims(), -1);
  p.b = cb.shape() == p.shape ? cb : make_view(cb, p.shape, Dims(), -1);
  return p;
}

std::vector<int> reduction_dims(const DimList& dims, int ndim, const char* op) {
  std::vector<int> out;
  if (dims.empty()) {
    for (int i = 0; i < ndim; ++i) out.push_back(i);
    return out;
  }
  for (auto d : dims) out.push_back(wrap_dim(d, ndim, op));
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  if (ndim == 0) out.clear();
  return out;
}

Dims reduced_shape(const Dims& shape, const std::vector<int>& dims, bool keepdim) {
  Dims out;
  for (int i = 0; i < shape.size(); ++i) {
    const bool reduced = std::find(dims.begin(), dims.end(), i) != dims.end();
    if (!reduced)
      out.push_back(shape[i]);
    else if (keepdim)
      out.push_back(1);
  }
  return out;
}

// With offset -1, builds the broadcast (expand) view of x to `shape`: stride 0 on new/size-1 dims.
Tensor make_view(const Tensor& x, const Dims& shape, const Dims& strides, std::int64_t offset) {
  ImplPtr impl = TensorImpl::make(x.storage());
  impl->dtype = x.dtype();
  impl->shape = shape;
  if (offset >= 0) {
    impl->strides = strides;
    impl->offset = offset;
  } else {
    impl->offset = x.offset();
    impl->strides = Dims::filled(shape.size(), 0);
    const int lead = shape.size() - x.dim();
    for (int i = 0; i < x.dim(); ++i)
      impl->strides[lead + i] = x.shape()[i] == 1 && shape[lead + i] != 1 ? 0 : x.strides()[i];
  }
  return Tensor(std::move(impl));
}

}  // namespace chaingrad::detail
