#include <cstring>

#include "kernels/cpu/loops.hpp"

namespace chaingrad::kernels {

void copy_to(const Tensor& src, void* dst, DType dst_dtype) {
  if (src.numel() == 0) return;  // dst may be null: memcpy must not see it
  if (src.dtype() == dst_dtype && src.is_contiguous()) {
    std::memcpy(dst, src.raw_data(), src.numel() * element_size(dst_dtype));
    return;
  }
  dispatch(src.dtype(), [&]<class T>() {
    dispatch(dst_dtype, [&]<class U>() {
      map_unary<T>(src, static_cast<U*>(dst), [](T v) { return static_cast<U>(v); });
    });
  });
}

}  // namespace chaingrad::kernels
