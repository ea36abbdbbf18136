#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/cpu/loops.hpp"
#include "kernels/cpu/transpose.hpp"

namespace chaingrad::kernels {
namespace {

// A transposed source (the output's last dim strided in the source, another dim unit-stride)
// walked in output order reads one element per cache line: a 1024x1024 transpose took 7.5x
// libtorch's time. Square tiles keep the lines of both sides in L1 while they are used.
constexpr std::int64_t kTile = 32;

template <class T, class U>
void copy_tiles(const T* s, U* d, std::int64_t rows, std::int64_t cols, std::int64_t s_col_stride,
                std::int64_t d_row_stride) {
  // source (i, j) at s[i + j * s_col_stride]; destination (i, j) at d[i * d_row_stride + j]
  if constexpr (std::is_same_v<T, float> && std::is_same_v<U, float>) {
    // float32 to float32 (the common case): 8x8 blocks through AVX2 registers where the CPU has them.
    return transpose_f32(s, cols, rows, s_col_stride, d, d_row_stride, 0, rows);
  }
  for (std::int64_t i0 = 0; i0 < rows; i0 += kTile) {
    const std::int64_t i1 = std::min(rows, i0 + kTile);
    for (std::int64_t j0 = 0; j0 < cols; j0 += kTile) {
      const std::int64_t j1 = std::min(cols, j0 + kTile);
      for (std::int64_t i = i0; i < i1; ++i)
        for (std::int64_t j = j0; j < j1; ++j) d[i * d_row_stride + j] = element_cast<U>(s[i + j * s_col_stride]);
    }
  }
}

// Copies with tiles when the source is a transpose; false when it is not.
bool copy_transposed(const Tensor& src, void* dst, DType dst_dtype) {
  const int nd = src.dim();
  if (nd < 2) return false;
  const Dims& shape = src.shape();
  const Dims& st = src.strides();
  const int last = nd - 1;
  if (st[last] == 1 || shape[last] < kTile) return false;
  int row_dim = -1;  // the unit-stride source dim that becomes the tile's rows
  for (int d = last - 1; d >= 0 && row_dim < 0; --d)
    if (st[d] == 1 && shape[d] >= kTile) row_dim = d;
  if (row_dim < 0) return false;
  const Dims ds = contiguous_strides(shape);
  // Every index of the remaining dims, as (source offset, destination offset).
  Dims outer_shape, outer_src, outer_dst;
  for (int d = 0; d < last; ++d) {
    if (d == row_dim) continue;
    outer_shape.push_back(shape[d]);
    outer_src.push_back(st[d]);
    outer_dst.push_back(ds[d]);
  }
  outer_shape.push_back(1);  // for_each_run walks runs of the last dim: make each run one index
  outer_src.push_back(0);
  outer_dst.push_back(0);
  std::vector<std::pair<std::int64_t, std::int64_t>> outer;
  for_each_run<2>(outer_shape, {&outer_src, &outer_dst},
                  [&](auto off, std::int64_t, auto) { outer.emplace_back(off[0], off[1]); });
  const std::int64_t rows = shape[row_dim], cols = shape[last];
  dispatch(src.dtype(), [&]<class T>() {
    dispatch(dst_dtype, [&]<class U>() {
      const T* s = static_cast<const T*>(src.storage()->data()) + src.offset();
      U* d = static_cast<U*>(dst);
      const auto run = [&](std::int64_t lo, std::int64_t hi) {
        for (const auto& [so, dof] : outer)
          copy_tiles(s + so + lo, d + dof + lo * ds[row_dim], hi - lo, cols, st[last], ds[row_dim]);
      };
      const int parts = src.numel() >= kParallelElements ? num_threads() : 1;
      if (parts <= 1) return run(0, rows);
      parallel_for(parts, [&](int p) {
        const auto cut = [&](int q) { return rows * q / parts; };
        if (cut(p) < cut(p + 1)) run(cut(p), cut(p + 1));
      });
    });
  });
  return true;
}

}  // namespace

void copy_to(const Tensor& src, void* dst, DType dst_dtype) {
  if (src.numel() == 0) return;  // dst may be null: memcpy must not see it
  if (src.dtype() == dst_dtype && src.is_contiguous()) {
    // Split from 64k elements on: one core's copy is bound by its own loads and stores, not by
    // the memory (a clone of 5 MB: 158 us on one thread, 80 on two).
    const std::size_t es = element_size(dst_dtype);
    const char* from = static_cast<const char*>(src.raw_data());
    char* to = static_cast<char*>(dst);
    parallel_range(src.numel(), [&](std::int64_t lo, std::int64_t hi) {
      std::memcpy(to + static_cast<std::size_t>(lo) * es, from + static_cast<std::size_t>(lo) * es,
                  static_cast<std::size_t>(hi - lo) * es);
    });
    return;
  }
  if (copy_transposed(src, dst, dst_dtype)) return;
  dispatch(src.dtype(), [&]<class T>() {
    dispatch(dst_dtype, [&]<class U>() {
      map_unary<T>(src, static_cast<U*>(dst), [](T v) { return element_cast<U>(v); });
    });
  });
}

}  // namespace chaingrad::kernels
