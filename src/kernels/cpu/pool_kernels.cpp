#include "kernels/cpu/pool_kernels.hpp"

#include <algorithm>

namespace chaingrad::kernels {

namespace {

// One output row of 2x2, stride-2 pooling from input rows r0 and r1 (r0 starts at flat position
// base). The first maximum in row-major order wins and a NaN never does, as in the general loop.
// Selects are written as arithmetic on the comparisons so the loop has no data-dependent branch
// (the winner of a window is unpredictable) and vectorizes.
template <class T>
void pool2x2_row(const T* __restrict r0, const T* __restrict r1, T* __restrict o, std::int64_t* __restrict oi,
                 std::int64_t Wo, std::int64_t base, std::int64_t W) {
  for (std::int64_t ow = 0; ow < Wo; ++ow) {
    const T a = r0[2 * ow], b = r0[2 * ow + 1], c = r1[2 * ow], d = r1[2 * ow + 1];
    const bool ab = b > a;
    const bool cd = d > c || c != c;
    const T m1 = ab ? b : a, m2 = cd ? d : c;
    const std::int64_t i1 = base + 2 * ow + ab, i2 = base + W + 2 * ow + cd;
    const bool second = m2 > m1;  // ties keep the first row's maximum
    o[ow] = second ? m2 : m1;
    oi[ow] = i1 + (i2 - i1) * second;
  }
}

}  // namespace

template <class T>
void max_pool2d_forward(const PoolShape& s, const T* x, T* out, std::int64_t* index) {
  const std::int64_t in_plane = s.H * s.W, out_plane = s.Ho * s.Wo;
  for (std::int64_t p = 0; p < s.planes; ++p) {
    const T* plane = x + p * in_plane;
    T* po = out + p * out_plane;
    std::int64_t* pi = index + p * out_plane;
    if (s.kernel == 2 && s.stride == 2) {  // the common case: one branch-free pass per output row
      for (std::int64_t oh = 0; oh < s.Ho; ++oh)
        pool2x2_row(plane + 2 * oh * s.W, plane + (2 * oh + 1) * s.W, po + oh * s.Wo, pi + oh * s.Wo, s.Wo,
                    2 * oh * s.W, s.W);
      continue;
    }
    for (std::int64_t oh = 0; oh < s.Ho; ++oh)
      for (std::int64_t ow = 0; ow < s.Wo; ++ow) {
        const std::int64_t h0 = oh * s.stride, w0 = ow * s.stride;
        std::int64_t best = h0 * s.W + w0;
        T bv = plane[best];
        for (std::int64_t i = 0; i < s.kernel; ++i) {
          const T* row = plane + (h0 + i) * s.W + w0;
          for (std::int64_t j = 0; j < s.kernel; ++j) {
            const bool better = row[j] > bv;  // NaN never wins; anomaly mode reports NaNs
            bv = better ? row[j] : bv;
            best = better ? (h0 + i) * s.W + w0 + j : best;
          }
        }
        po[oh * s.Wo + ow] = bv;
        pi[oh * s.Wo + ow] = best;
      }
  }
}

template <class T>
void max_pool2d_backward(const PoolShape& s, const T* g, const std::int64_t* index, T* dx) {
  const std::int64_t in_plane = s.H * s.W, out_plane = s.Ho * s.Wo;
  for (std::int64_t p = 0; p < s.planes; ++p) {
    T* d = dx + p * in_plane;
    const T* gp = g + p * out_plane;
    const std::int64_t* ip = index + p * out_plane;
    std::fill(d, d + in_plane, T(0));
    for (std::int64_t o = 0; o < out_plane; ++o) d[ip[o]] += gp[o];
  }
}

template void max_pool2d_forward<float>(const PoolShape&, const float*, float*, std::int64_t*);
template void max_pool2d_forward<double>(const PoolShape&, const double*, double*, std::int64_t*);
template void max_pool2d_backward<float>(const PoolShape&, const float*, const std::int64_t*, float*);
template void max_pool2d_backward<double>(const PoolShape&, const double*, const std::int64_t*, double*);

}  // namespace chaingrad::kernels
