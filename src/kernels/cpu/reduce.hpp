#pragma once
// Reductions over one axis of contiguous data viewed as [outer, R, inner].
#include <cmath>
#include <cstdint>
#include <limits>

namespace chaingrad::kernels {

template <class T>
void sum_axis(const T* x, T* out, std::int64_t outer, std::int64_t R, std::int64_t inner) {
  if (inner == 1) {
    for (std::int64_t o = 0; o < outer; ++o) {
      const T* p = x + o * R;
      double acc = 0;  // double accumulation: a float32 sum of 60,000 terms keeps its digits
      for (std::int64_t r = 0; r < R; ++r) acc += p[r];
      out[o] = static_cast<T>(acc);
    }
    return;
  }
  for (std::int64_t o = 0; o < outer; ++o) {
    T* dst = out + o * inner;
    const T* src = x + o * R * inner;
    for (std::int64_t i = 0; i < inner; ++i) dst[i] = src[i];
    for (std::int64_t r = 1; r < R; ++r) {
      const T* row = src + r * inner;
      for (std::int64_t i = 0; i < inner; ++i) dst[i] += row[i];
    }
  }
}

template <class T, bool kMax>
void extreme_axis(const T* x, T* out, std::int64_t* index, std::int64_t outer, std::int64_t R, std::int64_t inner) {
  for (std::int64_t o = 0; o < outer; ++o)
    for (std::int64_t i = 0; i < inner; ++i) {
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
      if (out) out[o * inner + i] = best;
      if (index) index[o * inner + i] = bi;
    }
}

// kind 0: softmax, 1: log_softmax, 2: logsumexp (out has inner elements per outer)
template <class T, int kKind>
void softmax_axis(const T* x, T* out, std::int64_t outer, std::int64_t R, std::int64_t inner) {
  for (std::int64_t o = 0; o < outer; ++o)
    for (std::int64_t i = 0; i < inner; ++i) {
      const T* p = x + o * R * inner + i;
      T m = -std::numeric_limits<T>::infinity();
      for (std::int64_t r = 0; r < R; ++r) m = std::max(m, p[r * inner]);
      if (!std::isfinite(m)) m = 0;  // all -inf (or inf): keep the arithmetic well defined
      double s = 0;
      for (std::int64_t r = 0; r < R; ++r) s += std::exp(static_cast<double>(p[r * inner] - m));
      if constexpr (kKind == 2) {
        out[o * inner + i] = static_cast<T>(m + std::log(s));
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
}

}  // namespace chaingrad::kernels
