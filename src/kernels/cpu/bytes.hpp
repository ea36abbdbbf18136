#pragma once
// Bytes (pixels as stored in an image file) to the floats they stand for.
#include <cstdint>

namespace chaingrad::kernels {

// dst[i] = (src[i] / divisor - mean) * scale in float32, each operation rounded as written (no
// fused multiply-add): the same floats as dividing first and normalizing the floats afterwards,
// whatever the lane width. The widest the CPU has.
void bytes_to_floats(const std::uint8_t* src, float divisor, float mean, float scale, float* dst, std::int64_t n);
// One lane at a time, for tests.
void bytes_to_floats_scalar(const std::uint8_t* src, float divisor, float mean, float scale, float* dst,
                            std::int64_t n);

}  // namespace chaingrad::kernels
