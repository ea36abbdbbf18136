#pragma once
// What chaingrad's AVX-512 kernels (sgemm_avx512.cpp, sgemm_thin.cpp) share: the target attribute
// that lets a function use AVX-512F in a library built without -march=native (callers check the
// CPU first), and the store/load mask for the first `count` of 16 lanes.
#include <immintrin.h>

#include <cstdint>

#define CG_AVX512 __attribute__((target("avx512f")))

namespace chaingrad::kernels {

inline __mmask16 lanes(std::int64_t count) {
  return count <= 0 ? __mmask16{0} : count >= 16 ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << count) - 1);
}

}  // namespace chaingrad::kernels
