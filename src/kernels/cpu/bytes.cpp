#include "kernels/cpu/bytes.hpp"

#include <immintrin.h>

namespace chaingrad::kernels {

void bytes_to_floats_scalar(const std::uint8_t* src, float divisor, float mean, float scale, float* dst,
                            std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) dst[i] = (static_cast<float>(src[i]) / divisor - mean) * scale;
}

namespace {
// Eight bytes a step: widen, convert (exact), then the division, subtraction and multiplication
// of the scalar form, lane by lane.
__attribute__((target("avx2"))) void bytes_to_floats_avx2(const std::uint8_t* src, float divisor, float mean,
                                                           float scale, float* dst, std::int64_t n) {
  const __m256 d = _mm256_set1_ps(divisor), m = _mm256_set1_ps(mean), s = _mm256_set1_ps(scale);
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i wide = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i)));
    const __m256 x = _mm256_div_ps(_mm256_cvtepi32_ps(wide), d);
    _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_sub_ps(x, m), s));
  }
  bytes_to_floats_scalar(src + i, divisor, mean, scale, dst + i, n - i);
}
}  // namespace

void bytes_to_floats(const std::uint8_t* src, float divisor, float mean, float scale, float* dst, std::int64_t n) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return bytes_to_floats_avx2(src, divisor, mean, scale, dst, n);
  bytes_to_floats_scalar(src, divisor, mean, scale, dst, n);
}

}  // namespace chaingrad::kernels
