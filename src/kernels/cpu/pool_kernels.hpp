#pragma once
// Max pooling on contiguous [planes, H, W] data (planes = N*C). No autograd.
#include <cstdint>

namespace chaingrad::kernels {

struct PoolShape {
  std::int64_t planes, H, W;
  std::int64_t kernel, stride;
  std::int64_t Ho, Wo;
};

// out[p, o] = the first maximum of window o of plane p; index[p, o] = its flat position in the
// plane (ih * W + iw). A NaN never wins.
template <class T>
void max_pool2d_forward(const PoolShape& s, const T* x, T* out, std::int64_t* index);

// dx[p, :] = 0, then dx[p, index[p, o]] += g[p, o]; one plane at a time so the zeroing and the
// scatter both hit cache (measured faster than writing each 2x2 window once with selects, whose
// stride-2 stores vectorize poorly on short rows). Indices must lie in [0, H*W) (the caller
// checks); kernel and stride are unused.
template <class T>
void max_pool2d_backward(const PoolShape& s, const T* g, const std::int64_t* index, T* dx);

}  // namespace chaingrad::kernels
