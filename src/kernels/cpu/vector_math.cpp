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
  if (i + 1 == n) {  // (one element: see map8, below)
    y[i] = _mm512_cvtss_f32(F(_mm512_set1_ps(x[i])));
  } else if (i < n) {
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
// The first r of 8 lanes (0 < r < 8), for a tail that goes through the same lanes as the body:
// masked loads read zeros into the other lanes, and masked stores leave their memory alone.
CG_AVX2 inline __m256i tail_mask8(std::int64_t r) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(r)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
template <__m256 (*F)(__m256)>
CG_AVX2 void map8(const float* x, float* y, std::int64_t n) {
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, F(_mm256_loadu_ps(x + i)));
  if (i + 1 == n) {
    // One element (every op of a scalar formula): a masked load cannot take its value from the
    // store that just wrote it, nor can the next op's load take it from a masked store, and each
    // waits for the store to reach the cache (an expf took 19-35 ns instead of 5 on an AMD EPYC
    // Zen 4). A broadcast load and a scalar store forward; the lane's bits are the same.
    y[i] = _mm256_cvtss_f32(F(_mm256_set1_ps(x[i])));
  } else if (i < n) {
    const __m256i mask = tail_mask8(n - i);
    _mm256_maskstore_ps(y + i, mask, F(_mm256_maskload_ps(x + i, mask)));
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

namespace {
// sigmoid(x) from e = e^-|x|: 1 / (1 + e) for x >= 0, e / (1 + e) below.
void sigmoid_from_exp1(const float* x, const float* e, float* y, std::int64_t m) {
  for (std::int64_t j = 0; j < m; ++j) {
    const float r = 1.0f / (1.0f + e[j]);
    y[j] = x[j] >= 0.0f ? r : e[j] * r;
  }
}
// The same steps eight lanes at a time, with the sign's choice a blend: compiled for the baseline
// CPU, the loop above branches on each sign, and on random signs (randn) half the branches
// mispredicted: 1M floats took 6.6 ms, 0.13x libtorch's time, on an AMD EPYC (session 15). IEEE
// division and multiplication in each lane give the loop's bits.
__attribute__((target("avx2"))) inline __m256 sigmoid_from_exp(__m256 x, __m256 e) {
  const __m256 r = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
  const __m256 nonneg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ);
  return _mm256_blendv_ps(_mm256_mul_ps(e, r), r, nonneg);
}
// Both steps in one pass, where vexp would use these same 8-lane expf calls (a CPU with AVX2 and
// no AVX-512), so the bits are those of the two passes: 1M floats in 650 against 1050 us.
__attribute__((target("avx2,fma"))) inline __m256 sigmoid8(__m256 x) {
  return sigmoid_from_exp(x, _ZGVdN8v_expf(_mm256_or_ps(x, _mm256_set1_ps(-0.0f))));  // e^-|x|
}
__attribute__((target("avx2,fma"))) void sigmoid_lanes8(const float* x, float* y, std::int64_t n) {
  map8<sigmoid8>(x, y, n);
}
// The same in 16 lanes, where vexp would use the 16-lane expf (AVX-512): one pass, with no
// staging buffer.
__attribute__((target("avx512f"))) inline __m512 sigmoid16(__m512 x) {
  const __m512 minus_abs = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN)));
  const __m512 e = _ZGVeN16v_expf(minus_abs);
  const __m512 r = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  const __mmask16 nonneg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ);
  return _mm512_mask_blend_ps(nonneg, _mm512_mul_ps(e, r), r);
}
__attribute__((target("avx512f"))) void sigmoid_lanes16(const float* x, float* y, std::int64_t n) {
  map16<sigmoid16>(x, y, n);
}
}  // namespace

void vsigmoid(const float* x, float* y, std::int64_t n) {
  static const int lanes = has_avx512() ? 16 : has_avx2() ? 8 : 1;
  if (lanes == 16) return sigmoid_lanes16(x, y, n);
  if (lanes == 8) return sigmoid_lanes8(x, y, n);
  with_exp_of_minus_abs(x, y, n, sigmoid_from_exp1);
}

void vsoftplus(const float* x, float* y, std::int64_t n) {
  with_exp_of_minus_abs(x, y, n, [](const float* xb, float* e, float* yb, std::int64_t m) {
    vlog1p(e, e, m);
    for (std::int64_t j = 0; j < m; ++j) yb[j] = std::max(xb[j], 0.0f) + e[j];
  });
}

// gelu goes through erfc rather than erf: x Phi(x) = x/2 erfc(-x/sqrt 2). For x < 0 the erf form
// takes 1 + erf(x/sqrt 2), which cancels: in float, gelu(-5) came out 17% low and gelu(-6) as 0.
// erfc(z), z >= 0, is the Chebyshev fit of Numerical Recipes' erfcc (fractional error below 1.2e-7
// everywhere): erfc(z) = t exp(P(t) - z^2), t = 1 / (1 + z/2), with P of degree 9 below. P(t) - z^2
// is one fused multiply-add, so the exponent is rounded once. With one exp and no erf per element,
// and the 16-lane exp inline, 1M floats take 0.72x the time of the erff form forward, 0.69x backward.
namespace {
constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kErfcFit[10] = {-1.26551223f, 1.00002368f, 0.37409196f, 0.09678418f, -0.18628806f,
                                0.27886807f,  -1.13520398f, 1.48851587f, -0.82215223f, 0.17087277f};
// t is bounded away from 0 for the fit; beyond z = 20, erfc(z) is far below the smallest float.
constexpr float kMaxZ = 20.0f;

// Phi(-|x|) = erfc(|x|/sqrt 2)/2 for one element, in the same steps as the vector versions.
float half_erfc_scalar(float x) {
  const float z = std::min(std::abs(x) * kSqrtHalf, kMaxZ);
  const float t = 1.0f / (1.0f + 0.5f * z);
  float p = kErfcFit[9];
  for (int i = 8; i >= 0; --i) p = std::fma(p, t, kErfcFit[i]);
  return 0.5f * t * std::exp(std::fma(-0.5f * x, x, p));
}
void gelu_lanes1(const float* x, float* y, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) {
    const float q = half_erfc_scalar(x[i]);
    y[i] = x[i] * (x[i] >= 0.0f ? 1.0f - q : q);
  }
}
void gelu_backward_lanes1(const float* g, const float* x, float* out, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) {
    const float q = half_erfc_scalar(x[i]);
    const float pdf = std::exp(-0.5f * x[i] * x[i]) * kInvSqrt2Pi;
    out[i] = g[i] * ((x[i] >= 0.0f ? 1.0f - q : q) + x[i] * pdf);
  }
}
}  // namespace

#define CG_AVX512 __attribute__((target("avx512f")))
#define CG_AVX2 __attribute__((target("avx2,fma")))
namespace {
// e^a for the exponents of gelu (a <= 0), inline: a call into libmvec's expf took a third of
// gelu's time, with every vector register caller-saved. Cody-Waite reduction a = n ln 2 + r,
// |r| <= ln 2 / 2, then e^r by its Taylor series to r^7 (truncation below 5e-9) and 2^n by scalef,
// which also rounds the subnormal results correctly. Exponents below -104, where e^a is under the
// smallest subnormal float, are clamped to it.
CG_AVX512 inline __m512 exp_nonpositive16(__m512 a) {
  a = _mm512_maskz_max_ps(0xFFFF, a, _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_maskz_roundscale_ps(0xFFFF, _mm512_mul_ps(a, _mm512_set1_ps(1.44269504088896341f)),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), a);  // ln 2, high bits: n ln2_hi is exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-6f), r);      // and the rest
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_maskz_scalef_ps(0xFFFF, p, n);
}
// t = 1 / (1 + z/2) and the exponent P(t) - x^2/2 of erfc(z), z = |x|/sqrt 2.
CG_AVX512 inline void erfc_terms16(__m512 x, __m512& t, __m512& arg) {
  // (abs, min and rcp14 spelled out: their intrinsics start from an undefined vector, which g++ 12
  // warns about)
  const __m512 abs_x = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff)));
  const __m512 z = _mm512_maskz_min_ps(0xFFFF, _mm512_mul_ps(abs_x, _mm512_set1_ps(kSqrtHalf)), _mm512_set1_ps(kMaxZ));
  const __m512 d = _mm512_fmadd_ps(z, _mm512_set1_ps(0.5f), _mm512_set1_ps(1.0f));
  t = _mm512_maskz_rcp14_ps(0xFFFF, d);  // 14 bits; one Newton step gives full float precision
  t = _mm512_mul_ps(t, _mm512_fnmadd_ps(d, t, _mm512_set1_ps(2.0f)));
  __m512 p = _mm512_set1_ps(kErfcFit[9]);
  for (int i = 8; i >= 0; --i) p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(kErfcFit[i]));
  arg = _mm512_fmadd_ps(_mm512_mul_ps(x, _mm512_set1_ps(-0.5f)), x, p);
}
// Phi(x), from Phi(-|x|) = t exp(arg) / 2.
CG_AVX512 inline __m512 normal_cdf16(__m512 x) {
  __m512 t, arg;
  erfc_terms16(x, t, arg);
  const __m512 q = _mm512_mul_ps(_mm512_mul_ps(t, _mm512_set1_ps(0.5f)), exp_nonpositive16(arg));
  const __mmask16 nonneg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ);
  return _mm512_mask_sub_ps(q, nonneg, _mm512_set1_ps(1.0f), q);
}
CG_AVX512 inline __m512 gelu16(__m512 x) { return _mm512_mul_ps(x, normal_cdf16(x)); }
CG_AVX512 inline __m512 gelu_backward16(__m512 g, __m512 x) {
  const __m512 pdf = _mm512_mul_ps(exp_nonpositive16(_mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(-0.5f)), x)),
                                   _mm512_set1_ps(kInvSqrt2Pi));
  return _mm512_mul_ps(g, _mm512_fmadd_ps(x, pdf, normal_cdf16(x)));
}
CG_AVX512 void gelu_lanes16(const float* x, float* y, std::int64_t n) {
  std::int64_t i = 0;
  for (; i + 32 <= n; i += 32) {  // two independent chains a step: 5% faster than one
    const __m512 a = gelu16(_mm512_loadu_ps(x + i)), b = gelu16(_mm512_loadu_ps(x + i + 16));
    _mm512_storeu_ps(y + i, a);
    _mm512_storeu_ps(y + i + 16, b);
  }
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, gelu16(_mm512_loadu_ps(x + i)));
  if (i < n) {
    const auto mask = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(y + i, mask, gelu16(_mm512_maskz_loadu_ps(mask, x + i)));
  }
}
CG_AVX512 void gelu_backward_lanes16(const float* g, const float* x, float* out, std::int64_t n) {
  std::int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(out + i, gelu_backward16(_mm512_loadu_ps(g + i), _mm512_loadu_ps(x + i)));
  if (i < n) {
    const auto mask = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(out + i, mask,
                          gelu_backward16(_mm512_maskz_loadu_ps(mask, g + i), _mm512_maskz_loadu_ps(mask, x + i)));
  }
}

// The 8-lane forms advance K vectors together, one step at a time. Written one vector at a time,
// gelu's chain of about 40 dependent operations (the fit, then an exp) filled the FP scheduler
// with two or three vectors in flight, and 1M floats took 1450 us with libmvec's expf (40 cycles
// a vector on a Zen 3). Six in step, with the exp inline, take 880 us; seven or more spill too
// much. Each lane still runs the same operations in the same order, so the bits do not depend on K.
#define CG_EACH_OF(K) _Pragma("GCC unroll 8") for (int j = 0; j < (K); ++j)
constexpr int kGeluVectors = 6;

// exp_nonpositive16 on 8 lanes, in place. 2^n, n >= -150, is applied as two normal powers of two:
// the first product is exact and the second rounds once, also to a subnormal.
template <int K>
CG_AVX2 inline void exp_nonpositive8(__m256* a) {
  constexpr float kTaylor[8] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
  __m256 n[K], r[K];
  CG_EACH_OF(K) {
    a[j] = _mm256_max_ps(a[j], _mm256_set1_ps(-104.0f));
    n[j] = _mm256_round_ps(_mm256_mul_ps(a[j], _mm256_set1_ps(1.44269504088896341f)),
                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  CG_EACH_OF(K) r[j] = _mm256_fnmadd_ps(n[j], _mm256_set1_ps(0.693145751953125f), a[j]);
  CG_EACH_OF(K) r[j] = _mm256_fnmadd_ps(n[j], _mm256_set1_ps(1.428606765330187e-6f), r[j]);
  CG_EACH_OF(K) a[j] = _mm256_set1_ps(kTaylor[0]);
#pragma GCC unroll 7
  for (int i = 1; i < 8; ++i) CG_EACH_OF(K) a[j] = _mm256_fmadd_ps(a[j], r[j], _mm256_set1_ps(kTaylor[i]));
  CG_EACH_OF(K) {
    const __m256i whole = _mm256_cvtps_epi32(n[j]);
    const __m256i half = _mm256_srai_epi32(whole, 1), rest = _mm256_sub_epi32(whole, half);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 first = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
    const __m256 second = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(rest, bias), 23));
    a[j] = _mm256_mul_ps(_mm256_mul_ps(a[j], first), second);
  }
}
// Phi(x) for K vectors, as normal_cdf16.
template <int K>
CG_AVX2 inline void normal_cdf8(const __m256* x, __m256* cdf) {
  __m256 d[K], t[K];
  CG_EACH_OF(K) {
    const __m256 abs_x = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x[j]);
    const __m256 z = _mm256_min_ps(_mm256_mul_ps(abs_x, _mm256_set1_ps(kSqrtHalf)), _mm256_set1_ps(kMaxZ));
    d[j] = _mm256_fmadd_ps(z, _mm256_set1_ps(0.5f), _mm256_set1_ps(1.0f));
    t[j] = _mm256_rcp_ps(d[j]);  // 12 bits; one Newton step gives 24
  }
  CG_EACH_OF(K) t[j] = _mm256_mul_ps(t[j], _mm256_fnmadd_ps(d[j], t[j], _mm256_set1_ps(2.0f)));
  CG_EACH_OF(K) cdf[j] = _mm256_set1_ps(kErfcFit[9]);
#pragma GCC unroll 9
  for (int i = 8; i >= 0; --i) CG_EACH_OF(K) cdf[j] = _mm256_fmadd_ps(cdf[j], t[j], _mm256_set1_ps(kErfcFit[i]));
  CG_EACH_OF(K) cdf[j] = _mm256_fmadd_ps(_mm256_mul_ps(x[j], _mm256_set1_ps(-0.5f)), x[j], cdf[j]);
  exp_nonpositive8<K>(cdf);
  CG_EACH_OF(K) {
    const __m256 q = _mm256_mul_ps(_mm256_mul_ps(t[j], _mm256_set1_ps(0.5f)), cdf[j]);
    const __m256 nonneg = _mm256_cmp_ps(x[j], _mm256_setzero_ps(), _CMP_GE_OQ);
    cdf[j] = _mm256_blendv_ps(q, _mm256_sub_ps(_mm256_set1_ps(1.0f), q), nonneg);
  }
}
template <int K>
CG_AVX2 inline void gelu8(const __m256* x, __m256* y) {
  normal_cdf8<K>(x, y);
  CG_EACH_OF(K) y[j] = _mm256_mul_ps(x[j], y[j]);
}
template <int K>
CG_AVX2 inline void gelu_backward8(const __m256* g, const __m256* x, __m256* out) {
  __m256 pdf[K];
  CG_EACH_OF(K) pdf[j] = _mm256_mul_ps(_mm256_mul_ps(x[j], _mm256_set1_ps(-0.5f)), x[j]);
  exp_nonpositive8<K>(pdf);
  normal_cdf8<K>(x, out);
  CG_EACH_OF(K) {
    pdf[j] = _mm256_mul_ps(pdf[j], _mm256_set1_ps(kInvSqrt2Pi));
    out[j] = _mm256_mul_ps(g[j], _mm256_fmadd_ps(x[j], pdf[j], out[j]));
  }
}
// Tails go through the same lanes, masked, as in map8.
CG_AVX2 void gelu_lanes8(const float* x, float* y, std::int64_t n) {
  constexpr int K = kGeluVectors;
  std::int64_t i = 0;
  for (; i + 8 * K <= n; i += 8 * K) {
    __m256 in[K], out[K];
    CG_EACH_OF(K) in[j] = _mm256_loadu_ps(x + i + 8 * j);
    gelu8<K>(in, out);
    CG_EACH_OF(K) _mm256_storeu_ps(y + i + 8 * j, out[j]);
  }
  __m256 in, out;
  for (; i + 8 <= n; i += 8) {
    in = _mm256_loadu_ps(x + i);
    gelu8<1>(&in, &out);
    _mm256_storeu_ps(y + i, out);
  }
  if (i < n) {
    const __m256i mask = tail_mask8(n - i);
    in = _mm256_maskload_ps(x + i, mask);
    gelu8<1>(&in, &out);
    _mm256_maskstore_ps(y + i, mask, out);
  }
}
CG_AVX2 void gelu_backward_lanes8(const float* g, const float* x, float* out, std::int64_t n) {
  constexpr int K = kGeluVectors;
  std::int64_t i = 0;
  for (; i + 8 * K <= n; i += 8 * K) {
    __m256 gv[K], xv[K], ov[K];
    CG_EACH_OF(K) {
      gv[j] = _mm256_loadu_ps(g + i + 8 * j);
      xv[j] = _mm256_loadu_ps(x + i + 8 * j);
    }
    gelu_backward8<K>(gv, xv, ov);
    CG_EACH_OF(K) _mm256_storeu_ps(out + i + 8 * j, ov[j]);
  }
  __m256 gv, xv, ov;
  for (; i + 8 <= n; i += 8) {
    gv = _mm256_loadu_ps(g + i);
    xv = _mm256_loadu_ps(x + i);
    gelu_backward8<1>(&gv, &xv, &ov);
    _mm256_storeu_ps(out + i, ov);
  }
  if (i < n) {
    const __m256i mask = tail_mask8(n - i);
    gv = _mm256_maskload_ps(g + i, mask);
    xv = _mm256_maskload_ps(x + i, mask);
    gelu_backward8<1>(&gv, &xv, &ov);
    _mm256_maskstore_ps(out + i, mask, ov);
  }
}
#undef CG_EACH_OF
}  // namespace
#undef CG_AVX512
#undef CG_AVX2

ArrayFn gelu_with_lanes(int lanes) {
  if (lanes == 16) return has_avx512() ? gelu_lanes16 : nullptr;
  if (lanes == 8) return has_avx2() ? gelu_lanes8 : nullptr;
  return lanes == 1 ? gelu_lanes1 : nullptr;
}
GeluBackwardFn gelu_backward_with_lanes(int lanes) {
  if (lanes == 16) return has_avx512() ? gelu_backward_lanes16 : nullptr;
  if (lanes == 8) return has_avx2() ? gelu_backward_lanes8 : nullptr;
  return lanes == 1 ? gelu_backward_lanes1 : nullptr;
}

void vgelu(const float* x, float* y, std::int64_t n) {
  static const ArrayFn f = has_avx512() ? gelu_lanes16 : has_avx2() ? gelu_lanes8 : gelu_lanes1;
  f(x, y, n);
}
void vgelu_backward(const float* g, const float* x, float* out, std::int64_t n) {
  static const GeluBackwardFn f =
      has_avx512() ? gelu_backward_lanes16 : has_avx2() ? gelu_backward_lanes8 : gelu_backward_lanes1;
  f(g, x, out, n);
}

}  // namespace chaingrad::kernels
