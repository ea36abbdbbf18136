#include "kernels/cpu/conv_onednn.hpp"

#include <dnnl.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string_view>

#include "chaingrad/error.hpp"
#include "kernels/cpu/openmp_control.hpp"
#include "kernels/cpu/parallel.hpp"

namespace chaingrad::kernels::onednn {
namespace {

void check(dnnl_status_t st, const char* what) {
  CG_CHECK(st == dnnl_success, InternalError, "conv2d: oneDNN ", what, " failed with status ", static_cast<int>(st));
}

dnnl_engine_t engine() {
  static const dnnl_engine_t e = [] {
    dnnl_engine_t r = nullptr;
    if (dnnl_engine_create(&r, dnnl_cpu, 0) != dnnl_success) r = nullptr;
    return r;
  }();
  return e;
}

// One stream per thread: a oneDNN stream is used by one thread at a time.
dnnl_stream_t stream() {
  struct Holder {
    dnnl_stream_t s = nullptr;
    ~Holder() {
      if (s) dnnl_stream_destroy(s);
    }
  };
  thread_local Holder h;
  if (!h.s) check(dnnl_stream_create(&h.s, engine(), dnnl_stream_default_flags), "stream creation");
  return h.s;
}

// A 64-byte-aligned buffer that grows to the largest request and is then reused.
class Buffer {
 public:
  float* get(std::size_t bytes) {
    if (bytes > size_) {
      data_.reset(static_cast<std::byte*>(::operator new(bytes, std::align_val_t{64})));
      size_ = bytes;
    }
    return reinterpret_cast<float*>(data_.get());
  }

 private:
  struct Free {
    void operator()(std::byte* p) const { ::operator delete(p, std::align_val_t{64}); }
  };
  std::unique_ptr<std::byte, Free> data_;
  std::size_t size_ = 0;
};

// Per-thread scratch: 0 and 1 a block's operands in oneDNN's layouts, 2 the primitive's
// scratchpad, 3 a block's weight gradient in oneDNN's layout, 4 the same in OIHW; 5 to 7 belong to
// the thread that called the convolution: the weights in the layouts of the two plans, and the
// weight gradient's lane sums.
template <int kSlot>
float* scratch(std::size_t bytes) {
  thread_local Buffer b;
  return b.get(std::max<std::size_t>(bytes, 64));
}

class Memory {
 public:
  Memory(const dnnl_memory_desc_t& md, const void* data) {
    check(dnnl_memory_create(&m_, &md, engine(), const_cast<void*>(data)), "memory creation");
  }
  ~Memory() { dnnl_memory_destroy(m_); }
  Memory(const Memory&) = delete;
  Memory& operator=(const Memory&) = delete;
  dnnl_memory_t get() const { return m_; }

 private:
  dnnl_memory_t m_ = nullptr;
};

void execute(dnnl_primitive_t p, std::initializer_list<dnnl_exec_arg_t> args) {
  check(dnnl_primitive_execute(p, stream(), static_cast<int>(args.size()), args.begin()), "execution");
}

// from -> to, where the two buffers hold one tensor in the layouts of the reorder `r`.
void reorder(dnnl_primitive_t r, const dnnl_memory_desc_t& from_md, const void* from, const dnnl_memory_desc_t& to_md,
             void* to) {
  const Memory a(from_md, from), b(to_md, to);
  execute(r, {{DNNL_ARG_FROM, a.get()}, {DNNL_ARG_TO, b.get()}});
}

enum class Pass { kForward, kBackwardInput, kBackwardWeight };

// One convolution pass over a block of `n` samples: the primitive, the tensors' plain (NCHW, OIHW)
// and oneDNN-chosen layouts, and the reorders between them (null where the layouts are the same).
// x is src or diff_src, w weights or diff_weights, y dst or diff_dst.
struct Plan {
  dnnl_primitive_t conv = nullptr;
  dnnl_memory_desc_t x_plain{}, w_plain{}, y_plain{}, bias{};
  dnnl_memory_desc_t x_md{}, w_md{}, y_md{}, scratch_md{};
  dnnl_primitive_t x_reorder = nullptr, w_reorder = nullptr, y_reorder = nullptr;
  std::size_t x_bytes = 0, w_bytes = 0, y_bytes = 0, scratch_bytes = 0;
};

// Owns primitive descriptors while a plan is built.
struct PrimitiveDesc {
  dnnl_primitive_desc_t pd = nullptr;
  ~PrimitiveDesc() {
    if (pd) dnnl_primitive_desc_destroy(pd);
  }
};

dnnl_memory_desc_t desc4(std::int64_t a, std::int64_t b, std::int64_t c, std::int64_t d, dnnl_format_tag_t tag) {
  dnnl_memory_desc_t md;
  const dnnl_dims_t dims = {a, b, c, d};
  check(dnnl_memory_desc_init_by_tag(&md, 4, dims, dnnl_f32, tag), "memory descriptor");
  return md;
}

// The reorder from -> to, or null when the layouts are the same.
dnnl_primitive_t make_reorder(const dnnl_memory_desc_t& from, const dnnl_memory_desc_t& to) {
  if (dnnl_memory_desc_equal(&from, &to)) return nullptr;
  PrimitiveDesc pd;
  check(dnnl_reorder_primitive_desc_create(&pd.pd, &from, engine(), &to, engine(), nullptr), "reorder creation");
  dnnl_primitive_t p = nullptr;
  check(dnnl_primitive_create(&p, pd.pd), "reorder creation");
  return p;
}

// Only oneDNN's direct JIT kernels are worth a reorder: its GEMM-based convolution is im2col +
// GEMM again, and its reference one is slow.
bool fast_implementation(const_dnnl_primitive_desc_t pd) {
  const char* name = nullptr;
  if (dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &name) != dnnl_success || !name) return false;
  const std::string_view s(name);
  return s.starts_with("jit") || s.starts_with("brg");
}

// The plan for `pass` over blocks of n samples of shape s, or null where oneDNN has no fast kernel.
std::unique_ptr<Plan> make_plan(const ConvShape& s, Pass pass, std::int64_t n, bool with_bias) {
  if (!engine()) return nullptr;
  SingleThreadedOpenMp one_thread;  // kernels are chosen for the thread count at creation
  auto p = std::make_unique<Plan>();
  p->x_plain = desc4(n, s.C, s.H, s.W, dnnl_nchw);
  p->w_plain = desc4(s.O, s.C, s.kh, s.kw, dnnl_oihw);
  p->y_plain = desc4(n, s.O, s.Ho, s.Wo, dnnl_nchw);
  const dnnl_memory_desc_t x_any = desc4(n, s.C, s.H, s.W, dnnl_format_tag_any);
  const dnnl_memory_desc_t w_any = desc4(s.O, s.C, s.kh, s.kw, dnnl_format_tag_any);
  const dnnl_memory_desc_t y_any = desc4(n, s.O, s.Ho, s.Wo, dnnl_format_tag_any);
  {
    const dnnl_dims_t dims = {s.O};
    check(dnnl_memory_desc_init_by_tag(&p->bias, 1, dims, dnnl_f32, dnnl_x), "memory descriptor");
  }
  // oneDNN's dilation counts the gaps (0 = dense); its right padding is what makes the output
  // size exact.
  const dnnl_dims_t strides = {s.stride, s.stride}, dilates = {s.dil - 1, s.dil - 1}, pad_l = {s.pad, s.pad};
  const dnnl_dims_t pad_r = {(s.Ho - 1) * s.stride + (s.kh - 1) * s.dil + 1 - s.H - s.pad,
                             (s.Wo - 1) * s.stride + (s.kw - 1) * s.dil + 1 - s.W - s.pad};

  dnnl_primitive_attr_t attr = nullptr;
  check(dnnl_primitive_attr_create(&attr), "attribute creation");
  struct AttrFree {
    dnnl_primitive_attr_t a;
    ~AttrFree() { dnnl_primitive_attr_destroy(a); }
  } attr_free{attr};
  // A scratchpad per thread, passed in: a primitive that owns one may not run on two threads at once.
  check(dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user), "attribute");

  dnnl_convolution_desc_t fwd_desc;
  if (dnnl_dilated_convolution_forward_desc_init(&fwd_desc, dnnl_forward_training, dnnl_convolution_direct, &x_any,
                                                 &w_any, pass == Pass::kForward && with_bias ? &p->bias : nullptr,
                                                 &y_any, strides, dilates, pad_l, pad_r) != dnnl_success)
    return nullptr;
  PrimitiveDesc fwd;
  if (dnnl_primitive_desc_create(&fwd.pd, &fwd_desc, attr, engine(), nullptr) != dnnl_success) return nullptr;
  PrimitiveDesc bwd;
  if (pass == Pass::kBackwardInput) {
    dnnl_convolution_desc_t d;
    if (dnnl_dilated_convolution_backward_data_desc_init(&d, dnnl_convolution_direct, &x_any, &w_any, &y_any, strides,
                                                         dilates, pad_l, pad_r) != dnnl_success ||
        dnnl_primitive_desc_create(&bwd.pd, &d, attr, engine(), fwd.pd) != dnnl_success)
      return nullptr;
  } else if (pass == Pass::kBackwardWeight) {
    dnnl_convolution_desc_t d;
    if (dnnl_dilated_convolution_backward_weights_desc_init(&d, dnnl_convolution_direct, &x_any, &w_any,
                                                            with_bias ? &p->bias : nullptr, &y_any, strides, dilates, pad_l, pad_r) != dnnl_success ||
        dnnl_primitive_desc_create(&bwd.pd, &d, attr, engine(), fwd.pd) != dnnl_success)
      return nullptr;
  }
  const_dnnl_primitive_desc_t pd = pass == Pass::kForward ? fwd.pd : bwd.pd;
  if (!fast_implementation(pd)) return nullptr;
  const auto md = [&](dnnl_query_t what) { return *dnnl_primitive_desc_query_md(pd, what, 0); };
  switch (pass) {
    case Pass::kForward:
      p->x_md = md(dnnl_query_src_md), p->w_md = md(dnnl_query_weights_md), p->y_md = md(dnnl_query_dst_md);
      p->x_reorder = make_reorder(p->x_plain, p->x_md);
      p->w_reorder = make_reorder(p->w_plain, p->w_md);
      p->y_reorder = make_reorder(p->y_md, p->y_plain);
      break;
    case Pass::kBackwardInput:
      p->x_md = md(dnnl_query_diff_src_md), p->w_md = md(dnnl_query_weights_md), p->y_md = md(dnnl_query_diff_dst_md);
      p->x_reorder = make_reorder(p->x_md, p->x_plain);
      p->w_reorder = make_reorder(p->w_plain, p->w_md);
      p->y_reorder = make_reorder(p->y_plain, p->y_md);
      break;
    case Pass::kBackwardWeight:
      p->x_md = md(dnnl_query_src_md), p->w_md = md(dnnl_query_diff_weights_md), p->y_md = md(dnnl_query_diff_dst_md);
      p->x_reorder = make_reorder(p->x_plain, p->x_md);
      p->w_reorder = make_reorder(p->w_md, p->w_plain);
      p->y_reorder = make_reorder(p->y_plain, p->y_md);
      break;
  }
  p->x_bytes = dnnl_memory_desc_get_size(&p->x_md);
  p->w_bytes = dnnl_memory_desc_get_size(&p->w_md);
  p->y_bytes = dnnl_memory_desc_get_size(&p->y_md);
  p->scratch_md = md(dnnl_query_scratchpad_md);
  p->scratch_bytes = dnnl_memory_desc_get_size(&p->scratch_md);
  check(dnnl_primitive_create(&p->conv, pd), "primitive creation");
  return p;
}

// The cached plan (null: not supported). Plans are never destroyed: they are few (a pass and a block
// size or two per layer) and primitives may be running on other threads at exit.
const Plan* plan_for(const ConvShape& s, Pass pass, std::int64_t n, bool with_bias) {
  using Key = std::array<std::int64_t, 12>;
  struct Cache {
    std::mutex mu;
    std::map<Key, std::unique_ptr<Plan>> plans;
  };
  static Cache* const cache = new Cache;
  const Key key{static_cast<std::int64_t>(pass), n, s.C, s.H, s.W, s.O, s.kh, s.kw, s.stride, s.pad, s.dil, with_bias};
  std::lock_guard lock(cache->mu);
  auto [it, fresh] = cache->plans.try_emplace(key);
  if (fresh) it->second = make_plan(s, pass, n, with_bias);
  return it->second.get();
}

// The batch cut into `count` blocks of `size` samples (the last one shorter), from the shape alone.
// Up to kBlocks blocks, so that the pool has work to share, with at least kBlockBytes of operands
// each so that oneDNN's per-call costs stay small; no more samples per block than fit in L2 while
// the block is reordered and convolved, unless a single sample is larger.
struct Blocks {
  std::int64_t size, count;
  std::int64_t samples(std::int64_t b, std::int64_t n) const { return std::min(size, n - b * size); }
};

constexpr std::int64_t kBlocks = 8;
constexpr std::int64_t kBlockBytes = 64 << 10;
constexpr std::int64_t kMaxBlockBytes = 1 << 20;

Blocks blocks(const ConvShape& s) {
  const std::int64_t sample_bytes = std::max<std::int64_t>(
      static_cast<std::int64_t>(sizeof(float)) * (s.C * s.H * s.W + s.O * s.Ho * s.Wo), 1);
  std::int64_t size = (s.N + kBlocks - 1) / kBlocks;
  size = std::max(size, (kBlockBytes + sample_bytes - 1) / sample_bytes);
  size = std::min(size, std::max<std::int64_t>(kMaxBlockBytes / sample_bytes, 1));
  size = std::clamp<std::int64_t>(size, 1, s.N);
  return {size, (s.N + size - 1) / size};
}

// Empty tensors, and 1x1 kernels with unit stride and no padding, stay on im2col + GEMM: there the
// image is its own column matrix, one GEMM straight from and to NCHW with no reorder.
bool covered(const ConvShape& s) {
  return s.N > 0 && s.C > 0 && s.O > 0 && s.Ho > 0 && s.Wo > 0 && s.H > 0 && s.W > 0 && !s.pointwise();
}

// The plans for the full blocks and for the last one (the same plan when the blocks are equal), or
// {null, null} when either is unsupported.
std::array<const Plan*, 2> plans_for(const ConvShape& s, Pass pass, const Blocks& bl, bool with_bias) {
  const Plan* full = plan_for(s, pass, bl.size, with_bias);
  const std::int64_t last_n = bl.samples(bl.count - 1, s.N);
  const Plan* last = last_n == bl.size ? full : plan_for(s, pass, last_n, with_bias);
  if (!full || !last) return {nullptr, nullptr};
  return {full, last};
}

// The weights in a plan's layout (w itself where it is plain already), in the caller's slot kSlot.
template <int kSlot>
const float* weights_for(const Plan& p, const float* w) {
  if (!p.w_reorder) return w;
  float* wb = scratch<kSlot>(p.w_bytes);
  SingleThreadedOpenMp one_thread;
  reorder(p.w_reorder, p.w_plain, w, p.w_md, wb);
  return wb;
}

// Runs p.conv on one block: x, w, y are the block's tensors in the plan's layouts; bias (the bias,
// or its gradient for kBackwardWeight) is null where the plan has none.
void run_conv(const Plan& p, Pass pass, const void* x, const void* w, const void* y, const void* bias) {
  const Memory mx(p.x_md, x), mw(p.w_md, w), my(p.y_md, y), mp(p.scratch_md, scratch<2>(p.scratch_bytes));
  switch (pass) {
    case Pass::kForward:
      if (bias) {
        const Memory mb(p.bias, bias);
        execute(p.conv, {{DNNL_ARG_SRC, mx.get()}, {DNNL_ARG_WEIGHTS, mw.get()}, {DNNL_ARG_BIAS, mb.get()},
                         {DNNL_ARG_DST, my.get()}, {DNNL_ARG_SCRATCHPAD, mp.get()}});
      } else {
        execute(p.conv, {{DNNL_ARG_SRC, mx.get()}, {DNNL_ARG_WEIGHTS, mw.get()}, {DNNL_ARG_DST, my.get()},
                         {DNNL_ARG_SCRATCHPAD, mp.get()}});
      }
      break;
    case Pass::kBackwardInput:
      execute(p.conv, {{DNNL_ARG_DIFF_SRC, mx.get()}, {DNNL_ARG_WEIGHTS, mw.get()}, {DNNL_ARG_DIFF_DST, my.get()},
                       {DNNL_ARG_SCRATCHPAD, mp.get()}});
      break;
    case Pass::kBackwardWeight:
      if (bias) {
        const Memory mb(p.bias, bias);
        execute(p.conv, {{DNNL_ARG_SRC, mx.get()}, {DNNL_ARG_DIFF_WEIGHTS, mw.get()}, {DNNL_ARG_DIFF_BIAS, mb.get()},
                         {DNNL_ARG_DIFF_DST, my.get()}, {DNNL_ARG_SCRATCHPAD, mp.get()}});
      } else {
        execute(p.conv, {{DNNL_ARG_SRC, mx.get()}, {DNNL_ARG_DIFF_WEIGHTS, mw.get()}, {DNNL_ARG_DIFF_DST, my.get()},
                         {DNNL_ARG_SCRATCHPAD, mp.get()}});
      }
      break;
  }
}

// A plain operand in a plan's layout: the pointer itself where no reorder is needed, else a copy in
// the thread's slot kSlot.
template <int kSlot>
const void* reordered_in(dnnl_primitive_t r, const dnnl_memory_desc_t& plain, const float* data,
                         const dnnl_memory_desc_t& md, std::size_t bytes) {
  if (!r) return data;
  float* t = scratch<kSlot>(bytes);
  reorder(r, plain, data, md, t);
  return t;
}

}  // namespace

bool conv2d_forward(const ConvShape& s, const float* x, const float* w, const float* bias, float* out) {
  if (!covered(s)) return false;
  const Blocks bl = blocks(s);
  const auto plans = plans_for(s, Pass::kForward, bl, bias != nullptr);
  if (!plans[0]) return false;
  const float* wb[2] = {weights_for<5>(*plans[0], w), nullptr};
  wb[1] = plans[1] == plans[0] ? wb[0] : weights_for<6>(*plans[1], w);
  const std::int64_t in_size = s.C * s.H * s.W, out_size = s.O * s.Ho * s.Wo;
  parallel_for(static_cast<int>(bl.count), [&](int b) {
    const int which = b == bl.count - 1 ? 1 : 0;
    const Plan& p = *plans[which];
    SingleThreadedOpenMp one_thread;
    float* yb = out + b * bl.size * out_size;
    const void* src = reordered_in<0>(p.x_reorder, p.x_plain, x + b * bl.size * in_size, p.x_md, p.x_bytes);
    void* dst = p.y_reorder ? static_cast<void*>(scratch<1>(p.y_bytes)) : yb;
    run_conv(p, Pass::kForward, src, wb[which], dst, bias);
    if (p.y_reorder) reorder(p.y_reorder, p.y_md, dst, p.y_plain, yb);
  });
  return true;
}

// oneDNN's input gradient pads the input channels to its block of 16 and costs about the same for
// 1 to 16 of them; im2col + GEMM grows with C. Measured on bench_core's 28x28 layer with 32 output
// channels, batch 64, 2 threads: C = 1: 359 vs 1590 µs (im2col vs oneDNN), C = 3: 922 vs 1570,
// C = 8: 2300 vs 1610, C = 16 (14x14): 1490 vs 402. Below 8 channels it stays on im2col.
constexpr std::int64_t kMinChannelsBackwardInput = 8;

bool conv2d_backward_input(const ConvShape& s, const float* g, const float* w, float* dx) {
  if (!covered(s) || s.C < kMinChannelsBackwardInput) return false;
  const Blocks bl = blocks(s);
  const auto plans = plans_for(s, Pass::kBackwardInput, bl, false);
  if (!plans[0]) return false;
  const float* wb[2] = {weights_for<5>(*plans[0], w), nullptr};
  wb[1] = plans[1] == plans[0] ? wb[0] : weights_for<6>(*plans[1], w);
  const std::int64_t in_size = s.C * s.H * s.W, out_size = s.O * s.Ho * s.Wo;
  parallel_for(static_cast<int>(bl.count), [&](int b) {
    const int which = b == bl.count - 1 ? 1 : 0;
    const Plan& p = *plans[which];
    SingleThreadedOpenMp one_thread;
    float* dxb = dx + b * bl.size * in_size;
    const void* gy = reordered_in<1>(p.y_reorder, p.y_plain, g + b * bl.size * out_size, p.y_md, p.y_bytes);
    void* gx = p.x_reorder ? static_cast<void*>(scratch<0>(p.x_bytes)) : dxb;
    run_conv(p, Pass::kBackwardInput, gx, wb[which], gy, nullptr);
    if (p.x_reorder) reorder(p.x_reorder, p.x_md, gx, p.x_plain, dxb);
  });
  return true;
}

// The weight and bias gradients are sums over the batch. Block b adds its part into lane
// b % lanes, lanes being at most kBlocks and fixed by the shape; the lanes are then summed in order.
// Each lane's sum runs in block order on whichever thread takes it, so the rounding is the same for
// any thread count. A lane holds [dw (OIHW), db].
bool conv2d_backward_weight(const ConvShape& s, const float* g, const float* x, float* dw, float* db) {
  if (!covered(s)) return false;
  const Blocks bl = blocks(s);
  const auto plans = plans_for(s, Pass::kBackwardWeight, bl, db != nullptr);
  if (!plans[0]) return false;
  const std::int64_t in_size = s.C * s.H * s.W, out_size = s.O * s.Ho * s.Wo, w_size = s.O * s.ckk();
  const std::int64_t b_size = db ? s.O : 0, lane_size = w_size + b_size;
  const std::int64_t lanes = std::min(bl.count, kBlocks);
  float* lane_sums = lanes == 1 ? nullptr : scratch<7>(sizeof(float) * static_cast<std::size_t>(lanes * lane_size));
  parallel_for(static_cast<int>(lanes), [&](int lane) {
    SingleThreadedOpenMp one_thread;
    float* acc_w = lanes == 1 ? dw : lane_sums + lane * lane_size;
    float* acc_b = lanes == 1 ? db : acc_w + w_size;
    for (std::int64_t b = lane; b < bl.count; b += lanes) {
      const Plan& p = *plans[b == bl.count - 1 ? 1 : 0];
      const void* xs = reordered_in<0>(p.x_reorder, p.x_plain, x + b * bl.size * in_size, p.x_md, p.x_bytes);
      const void* gy = reordered_in<1>(p.y_reorder, p.y_plain, g + b * bl.size * out_size, p.y_md, p.y_bytes);
      const bool first = b == lane;
      // The block's gradients, dw in OIHW: straight into the lane's sums for its first block.
      float* part_w = first ? acc_w : scratch<4>(sizeof(float) * static_cast<std::size_t>(lane_size));
      float* part_b = first ? acc_b : part_w + w_size;
      void* gw = p.w_reorder ? static_cast<void*>(scratch<3>(p.w_bytes)) : part_w;
      run_conv(p, Pass::kBackwardWeight, xs, gw, gy, db ? part_b : nullptr);
      if (p.w_reorder) reorder(p.w_reorder, p.w_md, gw, p.w_plain, part_w);
      if (!first) {
        for (std::int64_t k = 0; k < w_size; ++k) acc_w[k] += part_w[k];
        for (std::int64_t k = 0; k < b_size; ++k) acc_b[k] += part_b[k];
      }
    }
  });
  if (lanes > 1) {
    parallel_range(lane_size, [&](std::int64_t lo, std::int64_t hi) {
      for (std::int64_t k = lo; k < hi; ++k) {
        float v = lane_sums[k];
        for (std::int64_t l = 1; l < lanes; ++l) v += lane_sums[l * lane_size + k];
        (k < w_size ? dw[k] : db[k - w_size]) = v;
      }
    });
  }
  return true;
}

}  // namespace chaingrad::kernels::onednn
