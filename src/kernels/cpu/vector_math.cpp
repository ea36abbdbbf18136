#include "kernels/cpu/vector_math.hpp"

#include <immintrin.h>

#include <algorithm>
#include <cmath>

// libmvec's vector variants, by their x86-64 vector function ABI names ('e': AVX-512, 16 lanes;
// 'd': AVX2, 8 lanes). The width is picked at run time, so a build without -march=native still
// gets them. Target attributes (not pragmas) so that clang, which the fuzzers use, builds it too.
#define CG_AVX512 __attribute__((target("avx512f")))
#define CG_AVX2 __attribute__((target("avx2,fma")))
extern "C" {
CG_AVX512 __m512 _ZGVeN16v_expf(__m512);
CG_AVX512 __m512 _ZGVeN16v_logf(__m512);
CG_AVX512 __m512 _ZGVeN16v_tanhf(__m512);
CG_AVX512 __m512 _ZGVeN16v_erff(__m512);
CG_AVX512 __m512 _ZGVeN16v_log1pf(__m512);
CG_AVX512 __m512 _ZGVeN16v_expm1f(__m512);
}
namespace chaingrad::kernels {
namespace {
template <__m512 (*F)(__m512)>
CG_AVX512 void map16(const float* x, float* y, std::int64_t n) {
  std::int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, F(_mm512_loadu_ps(x + i)));
  if (i < n) {
    const auto mask = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(y + i, mask, F(_mm512_maskz_loadu_ps(mask, x + i)));
  }
}
}  // namespace
}  // namespace chaingrad::kernels

extern "C" {
CG_AVX2 __m256 _ZGVdN8v_expf(__m256);
CG_AVX2 __m256 _ZGVdN8v_logf(__m256);
CG_AVX2 __m256 _ZGVdN8v_tanhf(__m256);
CG_AVX2 __m256 _ZGVdN8v_erff(__m256);
CG_AVX2 __m256 _ZGVdN8v_log1pf(__m256);
CG_AVX2 __m256 _ZGVdN8v_expm1f(__m256);
}
namespace chaingrad::kernels {
namespace {
template <__m256 (*F)(__m256)>
CG_AVX2 void map8(const float* x, float* y, std::int64_t n) {
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, F(_mm256_loadu_ps(x + i)));
  if (i < n) {  // the tail goes through the same lanes, padded
    alignas(32) float pad[8] = {};
    std::copy(x + i, x + n, pad);
    _mm256_store_ps(pad, F(_mm256_load_ps(pad)));
    std::copy(pad, pad + (n - i), y + i);
  }
}
}  // namespace
}  // namespace chaingrad::kernels
#undef CG_AVX512
#undef CG_AVX2

namespace chaingrad::kernels {
namespace {

template <float (*F)(float)>
void map1(const float* x, float* y, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) y[i] = F(x[i]);
}

struct Widths {
  ArrayFn lanes16, lanes8, lanes1;
};
const Widths& widths(VectorFn fn) {
  static const Widths table[] = {
      {map16<_ZGVeN16v_expf>, map8<_ZGVdN8v_expf>, map1<::expf>},
      {map16<_ZGVeN16v_logf>, map8<_ZGVdN8v_logf>, map1<::logf>},
      {map16<_ZGVeN16v_tanhf>, map8<_ZGVdN8v_tanhf>, map1<::tanhf>},
      {map16<_ZGVeN16v_erff>, map8<_ZGVdN8v_erff>, map1<::erff>},
      {map16<_ZGVeN16v_log1pf>, map8<_ZGVdN8v_log1pf>, map1<::log1pf>},
      {map16<_ZGVeN16v_expm1f>, map8<_ZGVdN8v_expm1f>, map1<::expm1f>},
  };
  return table[static_cast<int>(fn)];
}

bool has_avx512() { return __builtin_cpu_supports("avx512f"); }
bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

ArrayFn widest(VectorFn fn) {
  const Widths& w = widths(fn);
  return has_avx512() ? w.lanes16 : has_avx2() ? w.lanes8 : w.lanes1;
}

}  // namespace

ArrayFn vector_fn_with_lanes(VectorFn fn, int lanes) {
  const Widths& w = widths(fn);
  if (lanes == 16) return has_avx512() ? w.lanes16 : nullptr;
  if (lanes == 8) return has_avx2() ? w.lanes8 : nullptr;
  return lanes == 1 ? w.lanes1 : nullptr;
}

namespace {
template <VectorFn F>
void on_widest(const float* x, float* y, std::int64_t n) {
  static const ArrayFn f = widest(F);
  f(x, y, n);
}
}  // namespace

void vexp(const float* x, float* y, std::int64_t n) { on_widest<VectorFn::Exp>(x, y, n); }
void vlog(const float* x, float* y, std::int64_t n) { on_widest<VectorFn::Log>(x, y, n); }
void vtanh(const float* x, float* y, std::int64_t n) { on_widest<VectorFn::Tanh>(x, y, n); }
void verf(const float* x, float* y, std::int64_t n) { on_widest<VectorFn::Erf>(x, y, n); }
void vlog1p(const float* x, float* y, std::int64_t n) { on_widest<VectorFn::Log1p>(x, y, n); }
void vexpm1(const float* x, float* y, std::int64_t n) { on_widest<VectorFn::Expm1>(x, y, n); }

namespace {
// finish(x, e, y, m) for blocks of e = e^-|x|, which stay in L1 between the passes.
template <class Finish>
void with_exp_of_minus_abs(const float* x, float* y, std::int64_t n, Finish finish) {
  constexpr std::int64_t kBlock = 512;
  alignas(64) float e[kBlock];
  for (std::int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const std::int64_t m = std::min(kBlock, n - i0);
    for (std::int64_t j = 0; j < m; ++j) e[j] = -std::abs(x[i0 + j]);
    vexp(e, e, m);
    finish(x + i0, e, y + i0, m);
  }
}
}  // namespace

void vsigmoid(const float* x, float* y, std::int64_t n) {
  with_exp_of_minus_abs(x, y, n, [](const float* xb, const float* e, float* yb, std::int64_t m) {
    for (std::int64_t j = 0; j < m; ++j) {
      const float r = 1.0f / (1.0f + e[j]);
      yb[j] = xb[j] >= 0.0f ? r : e[j] * r;
    }
  });
}

void vsoftplus(const float* x, float* y, std::int64_t n) {
  with_exp_of_minus_abs(x, y, n, [](const float* xb, float* e, float* yb, std::int64_t m) {
    vlog1p(e, e, m);
    for (std::int64_t j = 0; j < m; ++j) yb[j] = std::max(xb[j], 0.0f) + e[j];
  });
}

namespace {
constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr std::int64_t kBlock = 512;  // scratch per block stays in L1
}  // namespace

void vgelu(const float* x, float* y, std::int64_t n) {
  alignas(64) float t[kBlock];
  for (std::int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const std::int64_t m = std::min(kBlock, n - i0);
    for (std::int64_t j = 0; j < m; ++j) t[j] = x[i0 + j] * kSqrtHalf;
    verf(t, t, m);
    for (std::int64_t j = 0; j < m; ++j) y[i0 + j] = 0.5f * x[i0 + j] * (1.0f + t[j]);
  }
}

void vgelu_backward(const float* g, const float* x, float* out, std::int64_t n) {
  alignas(64) float cdf[kBlock], pdf[kBlock];
  for (std::int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const std::int64_t m = std::min(kBlock, n - i0);
    const float* xb = x + i0;
    for (std::int64_t j = 0; j < m; ++j) {
      cdf[j] = xb[j] * kSqrtHalf;
      pdf[j] = -0.5f * xb[j] * xb[j];
    }
    verf(cdf, cdf, m);
    vexp(pdf, pdf, m);
    for (std::int64_t j = 0; j < m; ++j)
      out[i0 + j] = g[i0 + j] * (0.5f * (1.0f + cdf[j]) + xb[j] * pdf[j] * kInvSqrt2Pi);
  }
}

}  // namespace chaingrad::kernels
