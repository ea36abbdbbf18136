#include "kernels/cpu/sgemm_avx512.hpp"

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <new>
#include <utility>
#include <vector>

#include "kernels/cpu/avx512_util.hpp"
#include "kernels/cpu/parallel.hpp"

// Design (BLIS's, with the roles of rows and columns as a row-major C wants them):
//  - The micro-kernel keeps a kMR x kNR (14 x 32) tile of C in 28 zmm accumulators; per k it
//    loads kNR / 16 vectors of op(B) and broadcasts kMR floats of op(A), one FMA per accumulator.
//    It reaches about 87% of the FMA peak with its operands in L1 (the rest: the 16 loads per 28
//    FMAs and the loop); 12 x 32 and 8 x 48 measured within noise of it, 6 x 64 lower.
//  - op(B) is packed into micro-panels of kNR columns: for each k, kNR consecutive floats
//    (transposed 16 x 16 at a time in registers when B is stored n x k).
//  - op(A): when A is stored m x k (X W^T, G W), the micro-kernel reads its rows where they lie:
//    packing would transpose all of A (it cost 10-13% of the forward product at batch 1024). When
//    A is stored k x m (G^T X), it is packed into micro-panels of kMR rows, one aligned line per k.
//  - A panel whose source rows are its rows (op(A) = A^T, op(B) = B) is packed by the first tile
//    that uses it, inside the micro-kernel (FeedA/FeedB kPacking), so that the loads of its source
//    overlap that tile's FMAs; a transposed panel is packed in a loop of its own, up front.
//    Edge panels are padded with zeros; only the stores to C are cut (row count as a template
//    argument, column count as store masks).
//  - k is cut into blocks of at most kMaxKC; each block adds into C (the first one applies beta).
//    The cut depends on k only, and every element of C is summed over k in the same order by
//    every tile shape, so results do not depend on the thread count.
//  - Threads: C is cut into row blocks (m >= n) or column blocks, one per thread. The operand
//    both blocks need (op(B) for row blocks, op(A) for column blocks) is packed once per product,
//    each panel by whichever thread reaches it first (Shared, SharedBlock); each thread packs
//    its own part of the other operand, and asks for the next block's source lines (prefetch into
//    L2) while it multiplies the current one.
// Every function that runs AVX-512 instructions carries target("avx512f"), so the file also builds
// without -march=native (and under clang, which ignores #pragma GCC target); gemm.cpp calls in only
// after sgemm_avx512_available().

namespace chaingrad::kernels {
namespace {

// Block sizes for this project's machine (2 cores, 48 KiB L1d and 2 MiB L2 each), measured on
// the MLP's products; BENCHMARKS-style figures are in the commit messages.
constexpr int kMR = 14;        // rows of the micro-tile (broadcasts of A); 12 measured the same
constexpr int kNV = 2;         // zmm vectors per row of the micro-tile
constexpr int kNR = 16 * kNV;  // columns of the micro-tile (vectors of B)
constexpr int kAS = 16;        // floats per k in a packed A micro-panel: one aligned cache line
constexpr int kUnroll = 4;     // k steps per loop iteration of the micro-kernel (1: 3-5% slower)
// k per block. A block of 784 (the MLP's first layer) becomes 2 x 392; 1024 becomes 3 x 342.
// 160 and 256 measured 1-4% slower on the MLP's products, 512 the same.
constexpr std::int64_t kMaxKC = 400;
constexpr std::int64_t kMC = 8 * kMR;  // rows of packed A per block (L2), when A is packed
constexpr std::int64_t kNC = 8 * kNR;  // columns of B packed per block, when each thread packs its own

// Below this many flops a product runs on the calling thread: waking a worker costs about what
// half of such a product does (the same threshold as the oneDNN path).
constexpr double kMinParallelFlops = 1 << 20;


// A growable, 64-byte aligned scratch buffer; one per thread and role, kept for the next product.
class Scratch {
 public:
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { std::free(data_); }
  float* get(std::size_t floats) {
    if (floats > capacity_) {
      std::free(data_);
      data_ = nullptr;
      capacity_ = 0;
      const std::size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
      data_ = static_cast<float*>(std::aligned_alloc(64, bytes));
      if (!data_) throw std::bad_alloc();
      capacity_ = bytes / sizeof(float);
    }
    return data_;
  }

 private:
  float* data_ = nullptr;
  std::size_t capacity_ = 0;
};

// out[p * S + l] = src[p * lds + l] for l < L, 0 for L <= l < S; p < kb. S is a multiple of 16.
template <int S>
CG_AVX512 void pack_contiguous(const float* src, std::int64_t lds, int L, std::int64_t kb, float* out) {
  constexpr int V = S / 16;
  __mmask16 in[V];
  for (int v = 0; v < V; ++v) in[v] = lanes(L - 16 * v);
  for (std::int64_t p = 0; p < kb; ++p) {
    const float* s = src + p * lds;
    float* o = out + p * S;
    for (int v = 0; v < V; ++v) _mm512_store_ps(o + 16 * v, _mm512_maskz_loadu_ps(in[v], s + 16 * v));
  }
}

// GCC 12's shuffle intrinsics start from _mm512_undefined_ps(), which -Wmaybe-uninitialized
// reports at every use (a false positive: every lane is written).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// r[j] lane i = r[i] lane j before the call.
CG_AVX512 __attribute__((always_inline)) inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m512 u[16];
  for (int i = 0; i < 4; ++i) {
    const __m512d t0 = _mm512_castps_pd(t[4 * i]), t1 = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d t2 = _mm512_castps_pd(t[4 * i + 2]), t3 = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  // u[4g + j], 128-bit lane L, holds rows 4g..4g+3 of column 4L + j: transpose the 128-bit lanes.
  for (int j = 0; j < 4; ++j) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88), v1 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xdd);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88);
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xdd);
    r[j] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    r[4 + j] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(v0, v2, 0xdd);
    r[12 + j] = _mm512_shuffle_f32x4(v1, v3, 0xdd);
  }
}

// out[p * S + l] = src[l * lds + p] for l < L, 0 for L <= l < S; p < kb. S is a multiple of 16;
// 16 x 16 tiles are transposed in registers.
template <int S>
CG_AVX512 void pack_transposed(const float* src, std::int64_t lds, int L, std::int64_t kb, float* out) {
  for (int l0 = 0; l0 < S; l0 += 16) {
    const int rows = std::clamp(L - l0, 0, 16);
    for (std::int64_t p0 = 0; p0 < kb; p0 += 16) {
      const int pc = static_cast<int>(std::min<std::int64_t>(16, kb - p0));
      const __mmask16 pm = lanes(pc);
      __m512 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        r[i] = i < rows ? _mm512_maskz_loadu_ps(pm, src + (l0 + i) * lds + p0) : _mm512_setzero_ps();
      transpose16(r);
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j)
        if (j < pc) _mm512_store_ps(out + (p0 + j) * S + l0, r[j]);
    }
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// Where the micro-kernel takes each operand from. The packing feeds let the first tile that uses a
// panel also pack it: its source lines then arrive while the FMAs of the previous k steps run,
// instead of in a packing loop that does little but wait on them (up front, packing took 10-15% of
// a G^T X product's time).
enum class FeedA {
  kPacked,   // a packed micro-panel, kAS floats per k
  kDirect,   // where it lies: op(A) = A, row r of the tile at a + r * ld, consecutive k consecutive
  kPacking,  // where it lies as A^T (row p at a + p * ld, kMR floats), copied into its packed panel
};
enum class FeedB {
  kPacked,   // a packed micro-panel, kNR floats per k
  kPacking,  // where it lies: op(B) = B, row p at b + p * ld, copied into its packed panel
};

// A panel as a tile gets it: packed at `at`, or (pack_to set) its source at `at`, to be packed
// into pack_to by the tile.
struct Panel {
  const float* at;
  float* pack_to = nullptr;
};

// One operand of a tile as the micro-kernel reads it: a Panel, the source's row stride, and the
// lanes of its source inside the matrix.
struct Operand {
  const float* at = nullptr;
  std::int64_t ld = 0;
  float* pack_to = nullptr;       // the packing feeds only
  __mmask16 lanes[kNV] = {};      // the packing feeds: the lanes of the source inside the matrix
};

// C[0:R, 0:kNR] (columns cut by the masks) = alpha * sum_p A[r][p] * B[p][:] + (first ? beta C : C).
// Packed panels get the source's lanes past the matrix's edge as zeros, as pack_contiguous does.
template <int R, FeedA FA, FeedB FB>
CG_AVX512 void micro_kernel(std::int64_t kb, const Operand& A, const Operand& B, float* c, std::int64_t ldc,
                            const __mmask16* mask, float alpha, float beta, bool first) {
  const float* ap = A.at;
  const float* bp = B.at;
  const std::int64_t a_step = FA == FeedA::kPacked ? kAS : FA == FeedA::kDirect ? 1 : A.ld;
  const std::int64_t b_step = FB == FeedB::kPacked ? kNR : B.ld;
  const std::int64_t a_ld = A.ld;
  float* a_out = A.pack_to;
  float* b_out = B.pack_to;
  const __mmask16 a_lanes = A.lanes[0];
  __mmask16 b_lanes[kNV];
  for (int v = 0; v < kNV; ++v) b_lanes[v] = B.lanes[v];
  __m512 acc[R][kNV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) acc[r][v] = _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
#pragma GCC unroll kUnroll
  for (std::int64_t p = 0; p < kb; ++p) {
    __m512 b[kNV];
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) {
      if constexpr (FB == FeedB::kPacking) {
        b[v] = _mm512_maskz_loadu_ps(b_lanes[v], bp + 16 * v);
        _mm512_store_ps(b_out + p * kNR + 16 * v, b[v]);
      } else {
        b[v] = _mm512_load_ps(bp + 16 * v);
      }
    }
    if constexpr (FA == FeedA::kPacking) _mm512_store_ps(a_out + p * kAS, _mm512_maskz_loadu_ps(a_lanes, ap));
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(FA == FeedA::kDirect ? ap[r * a_ld] : ap[r]);
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
    }
    ap += a_step;
    bp += b_step;
  }
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    float* cr = c + r * ldc;
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) {
      __m512 y;
      if (!first)
        y = _mm512_fmadd_ps(va, acc[r][v], _mm512_maskz_loadu_ps(mask[v], cr + 16 * v));
      else if (beta == 0.f)
        y = _mm512_mul_ps(va, acc[r][v]);
      else
        y = _mm512_fmadd_ps(va, acc[r][v], _mm512_mul_ps(vb, _mm512_maskz_loadu_ps(mask[v], cr + 16 * v)));
      _mm512_mask_storeu_ps(cr + 16 * v, mask[v], y);
    }
  }
}

using MicroKernel = void (*)(std::int64_t, const Operand&, const Operand&, float*, std::int64_t, const __mmask16*,
                             float, float, bool);

template <FeedA FA, FeedB FB, int... R>
constexpr std::array<MicroKernel, sizeof...(R)> kernel_table(std::integer_sequence<int, R...>) {
  return {&micro_kernel<R + 1, FA, FB>...};
}
template <FeedA FA, FeedB FB>
constexpr std::array<MicroKernel, kMR> kRows = kernel_table<FA, FB>(std::make_integer_sequence<int, kMR>{});
// kKernels[feed of A][feed of B][r - 1] computes r rows.
constexpr std::array<MicroKernel, kMR> kKernels[3][2] = {
    {kRows<FeedA::kPacked, FeedB::kPacked>, kRows<FeedA::kPacked, FeedB::kPacking>},
    {kRows<FeedA::kDirect, FeedB::kPacked>, kRows<FeedA::kDirect, FeedB::kPacking>},
    {kRows<FeedA::kPacking, FeedB::kPacked>, kRows<FeedA::kPacking, FeedB::kPacking>}};

struct Problem {
  bool ta, tb;
  std::int64_t m, n, k;
  float alpha;
  const float* a;
  std::int64_t lda;
  const float* b;
  std::int64_t ldb;
  float beta;
  float* c;
  std::int64_t ldc;
  // True when this computes the transpose of the caller's product (narrow C, see sgemm_avx512):
  // element (i, j) of this problem's C is then c[j * ldc + i].
  bool c_transposed;
  // op(A) = A (row-major, k contiguous): the micro-kernel reads A where it lies instead of a
  // packed copy, which would cost a transposition of all of A.
  bool direct_a;
  // k blocks: block q covers [q * kc, min(k, (q + 1) * kc)).
  std::int64_t kc, k_blocks;
  // Micro-panels of op(A) (kMR rows each) and op(B) (kNR columns each).
  std::int64_t a_panels, b_panels;
};

// Panel ip of op(A), rows [ip * kMR, ...), k range [p0, p0 + kb), into out (kb * kAS floats).
void pack_a(const Problem& P, std::int64_t ip, std::int64_t p0, std::int64_t kb, float* out) {
  const std::int64_t i0 = ip * kMR;
  const int rows = static_cast<int>(std::min<std::int64_t>(kMR, P.m - i0));
  if (P.ta)
    pack_contiguous<kAS>(P.a + p0 * P.lda + i0, P.lda, rows, kb, out);
  else
    pack_transposed<kAS>(P.a + i0 * P.lda + p0, P.lda, rows, kb, out);
}

// Panel jp of op(B), columns [jp * kNR, ...), k range [p0, p0 + kb), into out (kb * kNR floats).
void pack_b(const Problem& P, std::int64_t jp, std::int64_t p0, std::int64_t kb, float* out) {
  const std::int64_t j0 = jp * kNR;
  const int cols = static_cast<int>(std::min<std::int64_t>(kNR, P.n - j0));
  if (P.tb)
    pack_transposed<kNR>(P.b + j0 * P.ldb + p0, P.ldb, cols, kb, out);
  else
    pack_contiguous<kNR>(P.b + p0 * P.ldb + j0, P.ldb, cols, kb, out);
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // transpose16, as above
#endif
// c[j * ldc + i] = alpha t[i][j] + (first ? beta c : c)[j * ldc + i] for i < rows, j < cols: a
// tile of a product computed transposed, written back a 16 x 16 transpose at a time.
CG_AVX512 void store_transposed(const float* t, int rows, int cols, float* c, std::int64_t ldc, float alpha,
                                float beta, bool first) {
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  const __mmask16 m = lanes(rows);
  for (int h = 0; h < kNV && 16 * h < cols; ++h) {
    __m512 r[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_load_ps(t + i * kNR + 16 * h) : _mm512_setzero_ps();
    transpose16(r);
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      if (16 * h + j >= cols) break;
      float* cj = c + (16 * h + j) * ldc;
      __m512 y;
      if (!first)
        y = _mm512_fmadd_ps(va, r[j], _mm512_maskz_loadu_ps(m, cj));
      else if (beta == 0.f)
        y = _mm512_mul_ps(va, r[j]);
      else
        y = _mm512_fmadd_ps(va, r[j], _mm512_mul_ps(vb, _mm512_maskz_loadu_ps(m, cj)));
      _mm512_mask_storeu_ps(cj, m, y);
    }
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// The tile of C at micro-panels (ip, jp), for k block q. pa, pb: the packed panels, or with
// Panel::pack_to their sources (the caller's A^T, resp. B, row-major, at the tile's first
// row / column and k), to be packed on the way; with P.direct_a, pa is the tile's first row of A.
// (Panels, not Operands, are passed here: a copied Operand was read back by vector loads from
// narrower stores, a store-forwarding stall that cost 20-30% of the 1024x256x10 product.)
void tile(const Problem& P, std::int64_t ip, std::int64_t jp, std::int64_t q, std::int64_t kb, Panel pa, Panel pb) {
  const std::int64_t i0 = ip * kMR, j0 = jp * kNR;
  const int rows = static_cast<int>(std::min<std::int64_t>(kMR, P.m - i0));
  const std::int64_t cols = std::min<std::int64_t>(kNR, P.n - j0);
  const FeedA fa = P.direct_a ? FeedA::kDirect : pa.pack_to ? FeedA::kPacking : FeedA::kPacked;
  const FeedB fb = pb.pack_to ? FeedB::kPacking : FeedB::kPacked;
  const auto kernel = kKernels[static_cast<int>(fa)][static_cast<int>(fb)][static_cast<std::size_t>(rows - 1)];
  Operand a, b;
  a.at = pa.at;
  a.pack_to = pa.pack_to;
  a.ld = P.lda;
  a.lanes[0] = lanes(rows);
  b.at = pb.at;
  b.pack_to = pb.pack_to;
  b.ld = P.ldb;
  for (int v = 0; v < kNV; ++v) b.lanes[v] = lanes(cols - 16 * v);
  if (!P.c_transposed) {
    kernel(kb, a, b, P.c + i0 * P.ldc + j0, P.ldc, b.lanes, P.alpha, P.beta, q == 0);
    return;
  }
  // The sums go to a scratch tile, then into the caller's C transposed.
  alignas(64) float t[16 * kNR];  // 16 rows: store_transposed reads whole 16 x 16 blocks
  __mmask16 all[kNV];
  for (int v = 0; v < kNV; ++v) all[v] = 0xFFFF;
  kernel(kb, a, b, t, kNR, all, 1.f, 0.f, true);
  store_transposed(t, rows, static_cast<int>(cols), P.c + j0 * P.ldc + i0, P.ldc, P.alpha, P.beta, q == 0);
}

std::int64_t block_begin(const Problem& P, std::int64_t q) { return q * P.kc; }
std::int64_t block_size(const Problem& P, std::int64_t q) { return std::min(P.kc, P.k - q * P.kc); }

// The operand that every thread needs (all of op(B) when C is cut into row blocks, all of op(A)
// when into column blocks), packed once per product by whichever thread needs a panel first: k
// block q, panel j at q * kc * panels * width + j * kb * width. state[q * panels + j] is 0 (not
// packed), 1 (a thread is packing it) or 2 (ready). A thread never waits for another: a panel that
// another thread is still packing when this one needs it, it packs again into a buffer of its own
// (the other thread may have been descheduled mid-panel, and chaingrad's pool never waits on a
// thread the OS has not run). The scheme also works when the pool runs the tasks one after the
// other on one thread.
// When the shared operand's panels are rows of its source (op(B) = B, or op(A) = A^T), `lazy`:
// a thread claims a panel when its first tile needs it and packs it in that tile (FeedA/FeedB
// kPacking); otherwise SharedBlock::pack_all packs a whole k block before its tiles.
struct Shared {
  bool by_rows;
  bool lazy;
  std::int64_t panels, width;
  float* data;
  std::atomic<std::uint8_t>* state;
};

// One thread's view of the shared panels of k block q: panel j at ready[j] once known.
class SharedBlock {
 public:
  SharedBlock(const Problem& P, const Shared& S, std::int64_t q, std::vector<const float*>& ready)
      : P_(P), S_(S), q_(q), p0_(block_begin(P, q)), kb_(block_size(P, q)), ready_(ready) {
    ready_.assign(static_cast<std::size_t>(S.panels), nullptr);
  }
  SharedBlock(const SharedBlock&) = delete;
  SharedBlock& operator=(const SharedBlock&) = delete;
  ~SharedBlock() { publish(); }

  // Packs every panel now (starting at `first`, so that threads pack different ones at the same time).
  void pack_all(std::int64_t first);

  // Panel j as a tile's operand: the packed panel, or (lazy) its source and where to pack it, when
  // this thread is the first to need it or the thread packing it has not finished.
  Panel operand(std::int64_t j) {
    publish();
    if (const float* at = ready_[static_cast<std::size_t>(j)]) return {at};
    std::atomic<std::uint8_t>& st = S_.state[q_ * S_.panels + j];
    std::uint8_t seen = st.load(std::memory_order_acquire);
    float* dst = nullptr;
    if (seen == 0 && st.compare_exchange_strong(seen, 1, std::memory_order_acq_rel)) {
      dst = shared_panel(j);
      claimed_ = j;
    } else if (seen == 2) {
      return {ready_[static_cast<std::size_t>(j)] = shared_panel(j)};
    } else {
      dst = own_copy(j);
    }
    ready_[static_cast<std::size_t>(j)] = dst;
    return {source(j), dst};
  }

 private:
  float* shared_panel(std::int64_t j) const { return S_.data + p0_ * S_.panels * S_.width + j * kb_ * S_.width; }
  float* own_copy(std::int64_t j) {
    thread_local Scratch own_copies;
    if (!copies_) copies_ = own_copies.get(static_cast<std::size_t>(kb_ * S_.panels * S_.width));
    return copies_ + j * kb_ * S_.width;
  }
  // The first element of panel j's source (lazy: rows of the source matrix).
  const float* source(std::int64_t j) const {
    return S_.by_rows ? P_.b + p0_ * P_.ldb + j * kNR : P_.a + p0_ * P_.lda + j * kMR;
  }
  // The panel claimed last is packed once the tile that packs it has run, that is by the time
  // this thread asks for the next tile's panel or leaves the block.
  void publish() {
    if (claimed_ < 0) return;
    S_.state[q_ * S_.panels + claimed_].store(2, std::memory_order_release);
    claimed_ = -1;
  }
  void pack(std::int64_t j, float* dst) const {
    if (S_.by_rows)
      pack_b(P_, j, p0_, kb_, dst);
    else
      pack_a(P_, j, p0_, kb_, dst);
  }

  const Problem& P_;
  const Shared& S_;
  std::int64_t q_, p0_, kb_;
  std::vector<const float*>& ready_;
  float* copies_ = nullptr;
  std::int64_t claimed_ = -1;
};

void SharedBlock::pack_all(std::int64_t first) {
  bool busy = false;
  for (std::int64_t jj = 0; jj < S_.panels; ++jj) {
    const std::int64_t j = (first + jj) % S_.panels;
    std::atomic<std::uint8_t>& st = S_.state[q_ * S_.panels + j];
    std::uint8_t seen = st.load(std::memory_order_acquire);
    if (seen == 0 && st.compare_exchange_strong(seen, 1, std::memory_order_acq_rel)) {
      pack(j, shared_panel(j));
      st.store(2, std::memory_order_release);
      seen = 2;
    }
    if (seen == 2) ready_[static_cast<std::size_t>(j)] = shared_panel(j);
    busy |= seen == 1;
  }
  if (!busy) return;
  for (std::int64_t j = 0; j < S_.panels; ++j) {
    if (ready_[static_cast<std::size_t>(j)]) continue;
    if (S_.state[q_ * S_.panels + j].load(std::memory_order_acquire) == 2) {
      ready_[static_cast<std::size_t>(j)] = shared_panel(j);
      continue;
    }
    float* dst = own_copy(j);
    pack(j, dst);
    ready_[static_cast<std::size_t>(j)] = dst;
  }
}

// A rectangle of a source matrix (rows of `row_len` floats, `ld` apart) that a thread will pack
// next. Its lines are asked for (into L2) a slice at a time while the thread multiplies the block
// before, so that packing reads them from L2 instead of waiting on L3 or memory.
struct Upcoming {
  const float* base = nullptr;
  std::int64_t ld = 0, rows = 0, row_len = 0;
  std::int64_t lines_per_row() const { return (row_len + 15) / 16 + 1; }
  // Slice t of `slices`.
  void prefetch(std::int64_t t, std::int64_t slices) const {
    if (!base) return;
    const std::int64_t per_row = lines_per_row(), total = rows * per_row;
    for (std::int64_t l = total * t / slices, e = total * (t + 1) / slices; l < e; ++l)
      _mm_prefetch(reinterpret_cast<const char*>(base + (l / per_row) * ld + (l % per_row) * 16), _MM_HINT_T1);
  }
};

// Source of op(A) rows [i0, i1), k range [p0, p0 + kb).
Upcoming upcoming_a(const Problem& P, std::int64_t i0, std::int64_t i1, std::int64_t p0, std::int64_t kb) {
  if (P.ta) return {P.a + p0 * P.lda + i0, P.lda, kb, i1 - i0};
  return {P.a + i0 * P.lda + p0, P.lda, i1 - i0, kb};
}

// Source of op(B) columns [j0, j1), k range [p0, p0 + kb).
Upcoming upcoming_b(const Problem& P, std::int64_t j0, std::int64_t j1, std::int64_t p0, std::int64_t kb) {
  if (P.tb) return {P.b + j0 * P.ldb + p0, P.ldb, j1 - j0, kb};
  return {P.b + p0 * P.ldb + j0, P.ldb, kb, j1 - j0};
}

// Row panels [lo, hi) of C against the shared op(B).
void run_rows(const Problem& P, const Shared& S, std::int64_t lo, std::int64_t hi, std::int64_t first) {
  thread_local Scratch scratch;
  thread_local std::vector<const float*> shared;
  float* ap = scratch.get(static_cast<std::size_t>(std::min(P.kc, P.k) * (kMC / kMR) * kAS));
  const std::int64_t panels_per_block = kMC / kMR;
  for (std::int64_t q = 0; q < P.k_blocks; ++q) {
    const std::int64_t p0 = block_begin(P, q), kb = block_size(P, q);
    SharedBlock B(P, S, q, shared);
    if (!S.lazy) B.pack_all(first);
    if (P.direct_a) {
      // One micro-panel of A (kMR rows of kb floats, L1) against all of B's k block (L2).
      for (std::int64_t ip = lo; ip < hi; ++ip) {
        const float* a_rows = P.a + ip * kMR * P.lda + p0;
        Upcoming next;
        if (ip + 1 < hi) next = upcoming_a(P, (ip + 1) * kMR, std::min(P.m, (ip + 2) * kMR), p0, kb);
        for (std::int64_t jj = 0; jj < P.b_panels; ++jj) {
          // Lazily shared panels: threads start at different ones, so as not to race for each.
          const std::int64_t jp = S.lazy ? (first + jj) % P.b_panels : jj;
          next.prefetch(jj, P.b_panels);
          tile(P, ip, jp, q, kb, {a_rows}, B.operand(jp));
        }
      }
      continue;
    }
    // op(A) = A^T (a packed A is never anything else): each panel is packed by its first tile.
    for (std::int64_t ic = lo; ic < hi; ic += panels_per_block) {
      const std::int64_t ie = std::min(hi, ic + panels_per_block);
      // The block of A packed next: the following rows, or the first rows of the next k block.
      Upcoming next;
      if (ie < hi)
        next = upcoming_a(P, ie * kMR, std::min(P.m, std::min(hi, ie + panels_per_block) * kMR), p0, kb);
      else if (q + 1 < P.k_blocks)
        next = upcoming_a(P, lo * kMR, std::min(P.m, std::min(hi, lo + panels_per_block) * kMR), block_begin(P, q + 1),
                          block_size(P, q + 1));
      const std::int64_t tiles = P.b_panels * (ie - ic);
      for (std::int64_t jj = 0; jj < P.b_panels; ++jj) {
        const std::int64_t jp = (first + jj) % P.b_panels;
        for (std::int64_t ip = ic; ip < ie; ++ip) {
          next.prefetch(jj * (ie - ic) + ip - ic, tiles);
          float* panel = ap + (ip - ic) * kb * kAS;
          const Panel a = jj == 0 ? Panel{P.a + p0 * P.lda + ip * kMR, panel} : Panel{panel};
          tile(P, ip, jp, q, kb, a, B.operand(jp));
        }
      }
    }
  }
}

// Column panels [lo, hi) of C against the shared op(A).
void run_cols(const Problem& P, const Shared& S, std::int64_t lo, std::int64_t hi, std::int64_t first) {
  thread_local Scratch scratch;
  thread_local std::vector<const float*> shared;
  float* bp = scratch.get(static_cast<std::size_t>(std::min(P.kc, P.k) * kNC));
  const std::int64_t panels_per_block = kNC / kNR;
  // op(B) = B: each panel is packed by its first tile; B^T is packed up front (a transposition).
  const bool pack_b_in_tiles = !P.tb;
  for (std::int64_t q = 0; q < P.k_blocks; ++q) {
    const std::int64_t p0 = block_begin(P, q), kb = block_size(P, q);
    SharedBlock A(P, S, q, shared);
    if (!P.direct_a && !S.lazy) A.pack_all(first);
    for (std::int64_t jc = lo; jc < hi; jc += panels_per_block) {
      const std::int64_t je = std::min(hi, jc + panels_per_block);
      if (!pack_b_in_tiles)
        for (std::int64_t jp = jc; jp < je; ++jp) pack_b(P, jp, p0, kb, bp + (jp - jc) * kb * kNR);
      Upcoming next;
      if (je < hi)
        next = upcoming_b(P, je * kNR, std::min(P.n, std::min(hi, je + panels_per_block) * kNR), p0, kb);
      else if (q + 1 < P.k_blocks)
        next = upcoming_b(P, lo * kNR, std::min(P.n, std::min(hi, lo + panels_per_block) * kNR), block_begin(P, q + 1),
                          block_size(P, q + 1));
      const std::int64_t tiles = P.a_panels * (je - jc);
      for (std::int64_t jp = jc; jp < je; ++jp)
        for (std::int64_t ii = 0; ii < P.a_panels; ++ii) {
          const std::int64_t ip = P.direct_a ? ii : (first + ii) % P.a_panels;
          next.prefetch((jp - jc) * P.a_panels + ii, tiles);
          float* panel = bp + (jp - jc) * kb * kNR;
          const Panel b = pack_b_in_tiles && ii == 0 ? Panel{P.b + p0 * P.ldb + jp * kNR, panel} : Panel{panel};
          const Panel a = P.direct_a ? Panel{P.a + ip * kMR * P.lda + p0} : A.operand(ip);
          tile(P, ip, jp, q, kb, a, b);
        }
    }
  }
}

}  // namespace

bool sgemm_avx512_available() {
  static const bool available = __builtin_cpu_supports("avx512f");
  return available;
}

void sgemm_avx512(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a,
                  std::int64_t lda, const float* b, std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
  Problem P{ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, false, false, 0, 0, 0, 0};
  // A C with fewer columns than a vector (the MLP's 10 logits) would leave most lanes of the
  // micro-tile idle: compute C^T = op(B)^T op(A)^T instead, whose rows are long. (Tried and
  // dropped: the same for X W^T with fewer rows than columns, so that the smaller operand is the
  // one transposed into panels: 6-12% faster on one thread at batch 64, 0-15% slower on two; and
  // reading B in place when op(B) = B and m is small: no clear gain either way.)
  const bool transposed = n <= 16 && m > n;
  if (transposed) P = {!tb, !ta, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc, true, false, 0, 0, 0, 0};
  P.direct_a = !P.ta;
  P.k_blocks = (P.k + kMaxKC - 1) / kMaxKC;
  P.kc = (P.k + P.k_blocks - 1) / P.k_blocks;
  P.a_panels = (P.m + kMR - 1) / kMR;
  P.b_panels = (P.n + kNR - 1) / kNR;

  const double flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  // Row blocks share op(B), column blocks op(A): cut the longer side, so that each thread packs
  // its own part of the larger operand.
  const bool by_rows = P.m >= P.n;
  const std::int64_t own_panels = by_rows ? P.a_panels : P.b_panels;
  const int threads =
      flops < kMinParallelFlops ? 1 : static_cast<int>(std::min<std::int64_t>(num_threads(), own_panels));

  // The shared operand's panels are packed by the tiles that first use them when they are rows of
  // its source (op(B) = B, op(A) = A^T); a transposition is packed up front.
  const bool lazy = by_rows ? !P.tb : P.ta;
  Shared S{by_rows, lazy, by_rows ? P.b_panels : P.a_panels, by_rows ? kNR : kAS, nullptr, nullptr};
  thread_local Scratch shared_scratch;
  thread_local std::vector<std::atomic<std::uint8_t>> state;
  if (!by_rows && P.direct_a) S.panels = 0;  // nothing shared to pack
  S.data = shared_scratch.get(static_cast<std::size_t>(std::max<std::int64_t>(1, P.k * S.panels * S.width)));
  const std::size_t units = static_cast<std::size_t>(P.k_blocks * S.panels);
  if (state.size() < units) state = std::vector<std::atomic<std::uint8_t>>(units);
  for (std::size_t u = 0; u < units; ++u) state[u].store(0, std::memory_order_relaxed);
  S.state = state.data();

  const auto run = [&](int t) {
    const std::int64_t lo = own_panels * t / threads, hi = own_panels * (t + 1) / threads;
    const std::int64_t first = S.panels * t / threads;
    if (lo >= hi) return;
    if (by_rows)
      run_rows(P, S, lo, hi, first);
    else
      run_cols(P, S, lo, hi, first);
  };
  if (threads <= 1)
    run(0);
  else
    parallel_for(threads, run);
}

}  // namespace chaingrad::kernels
