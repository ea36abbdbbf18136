#include "kernels/cpu/vector_math.hpp"

#include <immintrin.h>

#include <algorithm>
#include <cmath>

namespace chaingrad::kernels {
namespace {

// libmvec's vector variants (the x86-64 vector function ABI names of expf and tanhf). The width
// is picked at run time, so a build without -march=native still gets them.
#pragma GCC push_options
#pragma GCC target("avx512f")
extern "C" __m512 _ZGVeN16v_expf(__m512);
extern "C" __m512 _ZGVeN16v_tanhf(__m512);
extern "C" __m512 _ZGVeN16v_logf(__m512);

template <__m512 (*F)(__m512)>
void map16(const float* x, float* y, std::int64_t n) {
  std::int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, F(_mm512_loadu_ps(x + i)));
  if (i < n) {
    const auto mask = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(y + i, mask, F(_mm512_maskz_loadu_ps(mask, x + i)));
  }
}
void exp16(const float* x, float* y, std::int64_t n) { map16<_ZGVeN16v_expf>(x, y, n); }
void tanh16(const float* x, float* y, std::int64_t n) { map16<_ZGVeN16v_tanhf>(x, y, n); }
void log16(const float* x, float* y, std::int64_t n) { map16<_ZGVeN16v_logf>(x, y, n); }
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
extern "C" __m256 _ZGVdN8v_expf(__m256);
extern "C" __m256 _ZGVdN8v_tanhf(__m256);
extern "C" __m256 _ZGVdN8v_logf(__m256);

template <__m256 (*F)(__m256)>
void map8(const float* x, float* y, std::int64_t n) {
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, F(_mm256_loadu_ps(x + i)));
  if (i < n) {  // the tail goes through the same lanes, padded
    alignas(32) float pad[8] = {};
    std::copy(x + i, x + n, pad);
    _mm256_store_ps(pad, F(_mm256_load_ps(pad)));
    std::copy(pad, pad + (n - i), y + i);
  }
}
void exp8(const float* x, float* y, std::int64_t n) { map8<_ZGVdN8v_expf>(x, y, n); }
void tanh8(const float* x, float* y, std::int64_t n) { map8<_ZGVdN8v_tanhf>(x, y, n); }
void log8(const float* x, float* y, std::int64_t n) { map8<_ZGVdN8v_logf>(x, y, n); }
#pragma GCC pop_options

void exp1(const float* x, float* y, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) y[i] = std::exp(x[i]);
}
void tanh1(const float* x, float* y, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) y[i] = std::tanh(x[i]);
}
void log1(const float* x, float* y, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) y[i] = std::log(x[i]);
}

bool has_avx512() { return __builtin_cpu_supports("avx512f"); }
bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

struct Impl {
  ArrayFn exp, tanh, log;
};
const Impl& impl() {
  static const Impl chosen = [] {
    if (has_avx512()) return Impl{exp16, tanh16, log16};
    if (has_avx2()) return Impl{exp8, tanh8, log8};
    return Impl{exp1, tanh1, log1};
  }();
  return chosen;
}

}  // namespace

ArrayFn vexp_with_lanes(int lanes) {
  if (lanes == 16) return has_avx512() ? exp16 : nullptr;
  if (lanes == 8) return has_avx2() ? exp8 : nullptr;
  return lanes == 1 ? exp1 : nullptr;
}
ArrayFn vtanh_with_lanes(int lanes) {
  if (lanes == 16) return has_avx512() ? tanh16 : nullptr;
  if (lanes == 8) return has_avx2() ? tanh8 : nullptr;
  return lanes == 1 ? tanh1 : nullptr;
}

ArrayFn vlog_with_lanes(int lanes) {
  if (lanes == 16) return has_avx512() ? log16 : nullptr;
  if (lanes == 8) return has_avx2() ? log8 : nullptr;
  return lanes == 1 ? log1 : nullptr;
}

void vexp(const float* x, float* y, std::int64_t n) { impl().exp(x, y, n); }
void vlog(const float* x, float* y, std::int64_t n) { impl().log(x, y, n); }
void vtanh(const float* x, float* y, std::int64_t n) { impl().tanh(x, y, n); }

void vsigmoid(const float* x, float* y, std::int64_t n) {
  constexpr std::int64_t kBlock = 512;  // e^-|x| for a block stays in L1 between the passes
  alignas(64) float e[kBlock];
  for (std::int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const std::int64_t m = std::min(kBlock, n - i0);
    const float* xb = x + i0;
    for (std::int64_t j = 0; j < m; ++j) e[j] = -std::abs(xb[j]);
    impl().exp(e, e, m);
    float* yb = y + i0;
    for (std::int64_t j = 0; j < m; ++j) {
      const float r = 1.0f / (1.0f + e[j]);
      yb[j] = xb[j] >= 0.0f ? r : e[j] * r;
    }
  }
}

}  // namespace chaingrad::kernels
