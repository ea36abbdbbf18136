#pragma once
// Reductions over one axis of contiguous data viewed as [outer, R, inner].
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels/cpu/parallel.hpp"
#include "kernels/cpu/vector_math.hpp"

namespace chaingrad::kernels {

// Row maximum and double-precision row sum in eight independent lanes, which the compiler turns
// into vector instructions (one running value would be a chain of dependent adds: 3x slower on
// 1000-class rows).
inline float row_max(const float* p, std::int64_t n) {
  float m[8];
  std::fill(m, m + 8, -std::numeric_limits<float>::infinity());
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) m[k] = std::max(m[k], p[i + k]);
  for (; i < n; ++i) m[0] = std::max(m[0], p[i]);
  return *std::max_element(m, m + 8);
}
// The sum of f(p[i]) (of p[i] by default), each term taken to double first.
template <class T, class F = std::identity>
double row_sum(const T* p, std::int64_t n, F f = {}) {
  double s[8] = {};
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) s[k] += f(static_cast<double>(p[i + k]));
  for (; i < n; ++i) s[0] += f(static_cast<double>(p[i]));
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// Sums over R of contiguous data viewed as [outer, R, inner], for the outputs [o0, o1) x [i0, i1).
template <class T>
void sum_axis_block(const T* x, T* out, std::int64_t o0, std::int64_t o1, std::int64_t R, std::int64_t inner,
                    std::int64_t i0, std::int64_t i1) {
  if (inner == 1) {
    // double accumulation, so a float32 sum of 60,000 terms keeps its digits, in eight lanes
    for (std::int64_t o = o0; o < o1; ++o) out[o] = static_cast<T>(row_sum(x + o * R, R));
    return;
  }
  for (std::int64_t o = o0; o < o1; ++o) {
    T* __restrict dst = out + o * inner;
    const T* src = x + o * R * inner;
    if (R == 0) {  // an empty sum (there is no first row to start from)
      std::fill(dst + i0, dst + i1, T(0));
      continue;
    }
    for (std::int64_t i = i0; i < i1; ++i) dst[i] = src[i];
    std::int64_t r = 1;
    for (; r + 4 <= R; r += 4) {  // four rows per pass over dst: a quarter of its loads and stores
      const T *a = src + r * inner, *b = a + inner, *c = b + inner, *d = c + inner;
      for (std::int64_t i = i0; i < i1; ++i) dst[i] += (a[i] + b[i]) + (c[i] + d[i]);
    }
    for (; r < R; ++r) {
      const T* row = src + r * inner;
      for (std::int64_t i = i0; i < i1; ++i) dst[i] += row[i];
    }
  }
}

// Above kParallelElements inputs the outputs are cut into one block per thread: by `outer`, or by
// columns of `inner` at multiples of 16 when there is one outer (a bias gradient: the batch's rows
// summed). Every output is summed in the same order whatever the cut.
template <class T>
void sum_axis(const T* x, T* out, std::int64_t outer, std::int64_t R, std::int64_t inner) {
  const std::int64_t elements = outer * R * inner;
  if (outer > 1 || inner < 32) {
    parallel_units(outer, elements,
                   [&](std::int64_t lo, std::int64_t hi) { sum_axis_block(x, out, lo, hi, R, inner, 0, inner); });
  } else {
    parallel_units((inner + 15) / 16, elements, [&](std::int64_t lo, std::int64_t hi) {
      sum_axis_block(x, out, 0, outer, R, inner, lo * 16, std::min(inner, hi * 16));
    });
  }
}

// Softmax over contiguous float32 rows (the class axis of a classifier). Rows go in blocks, so the
// exponentials and logarithms of many short rows take one call to the vector math kernels; sums are
// accumulated in double. float64 keeps the general loop below.
template <int kKind>
void softmax_rows_float(const float* x, float* out, std::int64_t rows, std::int64_t R) {
  const std::int64_t block = std::max<std::int64_t>(1, 4096 / std::max<std::int64_t>(R, 1));
  std::vector<float> e(static_cast<std::size_t>(kKind == 0 ? 0 : std::min(block, rows) * R));
  std::vector<float> m(static_cast<std::size_t>(std::min(block, rows))), s(m.size());
  for (std::int64_t o0 = 0; o0 < rows; o0 += block) {
    const std::int64_t nb = std::min(block, rows - o0);
    const float* p = x + o0 * R;
    float* q = kKind == 0 ? out + o0 * R : e.data();  // softmax keeps its exponentials in place
    for (std::int64_t b = 0; b < nb; ++b) {
      float mb = row_max(p + b * R, R);
      if (!std::isfinite(mb)) mb = 0;  // all -inf (or inf): keep the arithmetic well defined
      m[static_cast<std::size_t>(b)] = mb;
      for (std::int64_t r = 0; r < R; ++r) q[b * R + r] = p[b * R + r] - mb;
    }
    vexp(q, q, nb * R);
    for (std::int64_t b = 0; b < nb; ++b) s[static_cast<std::size_t>(b)] = static_cast<float>(row_sum(q + b * R, R));
    if constexpr (kKind == 0) {
      for (std::int64_t b = 0; b < nb; ++b) {
        const float inv = 1.0f / s[static_cast<std::size_t>(b)];
        for (std::int64_t r = 0; r < R; ++r) q[b * R + r] *= inv;
      }
    } else {
      vlog(s.data(), s.data(), nb);
      for (std::int64_t b = 0; b < nb; ++b) {
        const float lse = m[static_cast<std::size_t>(b)] + s[static_cast<std::size_t>(b)];
        if constexpr (kKind == 1) {
          for (std::int64_t r = 0; r < R; ++r) out[(o0 + b) * R + r] = p[b * R + r] - lse;
        } else {
          out[o0 + b] = lse;
        }
      }
    }
  }
}

// Each slice along the axis (u = o * inner + i) on its own, cut across the pool from
// kParallelElements inputs on.
template <class T, bool kMax>
void extreme_axis(const T* x, T* out, std::int64_t* index, std::int64_t outer, std::int64_t R, std::int64_t inner) {
  parallel_units(outer * inner, outer * R * inner, [&](std::int64_t lo, std::int64_t hi) {
    for (std::int64_t u = lo; u < hi; ++u) {
      const std::int64_t o = u / inner, i = u % inner;
      const T* p = x + o * R * inner + i;
      T best = p[0];
      std::int64_t bi = 0;
      for (std::int64_t r = 1; r < R; ++r) {
        const T v = p[r * inner];
        if (kMax ? (v > best || std::isnan(v)) : (v < best || std::isnan(v))) {
          if (std::isnan(best)) continue;
          best = v;
          bi = r;
        }
      }
      if (out) out[u] = best;
      if (index) index[u] = bi;
    }
  });
}

// kind 0: softmax, 1: log_softmax, 2: logsumexp (out has inner elements per outer). Each slice
// along the axis is reduced on its own, in the same order whatever the cut, so the slices are cut
// into one block per thread from kParallelElements inputs on and the bits do not depend on the
// thread count.
template <class T, int kKind>
void softmax_axis(const T* x, T* out, std::int64_t outer, std::int64_t R, std::int64_t inner) {
  const std::int64_t elements = outer * R * inner;
  if constexpr (std::is_same_v<T, float>) {
    if (inner == 1) {
      parallel_units(outer, elements, [&](std::int64_t lo, std::int64_t hi) {
        softmax_rows_float<kKind>(x + lo * R, out + (kKind == 2 ? lo : lo * R), hi - lo, R);
      });
      return;
    }
  }
  // Slice u = o * inner + i.
  parallel_units(outer * inner, elements, [&](std::int64_t lo, std::int64_t hi) {
    for (std::int64_t u = lo; u < hi; ++u) {
      const std::int64_t o = u / inner, i = u % inner;
      const T* p = x + o * R * inner + i;
      T m = -std::numeric_limits<T>::infinity();
      for (std::int64_t r = 0; r < R; ++r) m = std::max(m, p[r * inner]);
      if (!std::isfinite(m)) m = 0;  // all -inf (or inf): keep the arithmetic well defined
      double s = 0;
      for (std::int64_t r = 0; r < R; ++r) s += std::exp(static_cast<double>(p[r * inner] - m));
      if constexpr (kKind == 2) {
        out[u] = static_cast<T>(m + std::log(s));
      } else {
        T* q = out + o * R * inner + i;
        if constexpr (kKind == 0) {
          const double inv = 1.0 / s;
          for (std::int64_t r = 0; r < R; ++r) q[r * inner] = static_cast<T>(std::exp(static_cast<double>(p[r * inner] - m)) * inv);
        } else {
          const T lse = static_cast<T>(m + std::log(s));
          for (std::int64_t r = 0; r < R; ++r) q[r * inner] = p[r * inner] - lse;
        }
      }
    }
  });
}

}  // namespace chaingrad::kernels
