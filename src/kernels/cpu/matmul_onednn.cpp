#include "kernels/cpu/matmul_onednn.hpp"

#include <dnnl.hpp>

#include <map>
#include <mutex>
#include <optional>
#include <tuple>

namespace chaingrad::kernels {

namespace {

dnnl::engine& engine() {
  static auto* e = new dnnl::engine(dnnl::engine::kind::cpu, 0);  // (never destroyed: threads may outlive statics)
  return *e;
}

// A primitive for one shape, layout, alpha and beta, with memory objects whose data handles are
// pointed at each call's operands.
struct Plan {
  dnnl::matmul primitive;
  dnnl::memory a, b, c, bias;
};

using Key = std::tuple<bool, bool, std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t,
                       float, float, bool, bool>;

std::optional<Plan> make_plan(const Key& key) {
  const auto [ta, tb, m, n, k, lda, ldb, ldc, alpha, beta, has_bias, relu] = key;
  using dims = dnnl::memory::dims;
  const auto f32 = dnnl::memory::data_type::f32;
  // Row-major operands, or row-major transposes: strides say which.
  const dnnl::memory::desc ad({m, k}, f32, ta ? dims{1, lda} : dims{lda, 1});
  const dnnl::memory::desc bd({k, n}, f32, tb ? dims{1, ldb} : dims{ldb, 1});
  const dnnl::memory::desc cd({m, n}, f32, dims{ldc, 1});
  const dnnl::memory::desc biasd({1, n}, f32, dims{n, 1});
  try {
    dnnl::primitive_attr attr;
    if (alpha != 1.0f) attr.set_output_scales(0, {alpha});
    dnnl::post_ops post;
    if (beta != 0.0f) post.append_sum(beta);  // (no sum: C is overwritten, NaNs included, as BLAS does for beta = 0)
    if (relu) post.append_eltwise(1.0f, dnnl::algorithm::eltwise_relu, 0.0f, 0.0f);
    attr.set_post_ops(post);
    const auto desc = has_bias ? dnnl::matmul::desc(ad, bd, biasd, cd) : dnnl::matmul::desc(ad, bd, cd);
    const dnnl::matmul::primitive_desc pd(desc, attr, engine());
    return Plan{dnnl::matmul(pd), dnnl::memory(ad, engine(), nullptr), dnnl::memory(bd, engine(), nullptr),
                dnnl::memory(cd, engine(), nullptr), dnnl::memory(biasd, engine(), nullptr)};
  } catch (const dnnl::error&) {
    return std::nullopt;
  }
}

}  // namespace

bool matmul_onednn(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a,
                   std::int64_t lda, const float* b, std::int64_t ldb, float beta, float* c, std::int64_t ldc,
                   Epilogue epilogue) {
  // Plans per thread: a oneDNN stream and memory objects serve one thread at a time, and the
  // thread's blocks come in few shapes (a model's layers, cut one way). A program whose shapes keep
  // changing starts over every kMaxPlans shapes rather than grow without bound.
  constexpr std::size_t kMaxPlans = 64;
  thread_local std::map<Key, std::optional<Plan>> plans;
  thread_local dnnl::stream stream(engine());
  const Key key{ta, tb, m, n, k, lda, ldb, ldc, alpha, beta, epilogue.bias != nullptr, epilogue.relu};
  auto it = plans.find(key);
  if (it == plans.end()) {
    if (plans.size() >= kMaxPlans) plans.clear();
    // One creation at a time: oneDNN shares a primitive cache between threads, whose
    // synchronization ThreadSanitizer cannot see (libdnnl is not instrumented) and reported as a
    // race on its keys. A thread creates a plan once per shape, so the lock costs nothing after.
    static std::mutex creating;
    std::lock_guard lock(creating);
    it = plans.emplace(key, make_plan(key)).first;
  }
  if (!it->second) return false;
  Plan& p = *it->second;
  p.a.set_data_handle(const_cast<float*>(a));
  p.b.set_data_handle(const_cast<float*>(b));
  p.c.set_data_handle(c);
  if (epilogue.bias) {
    p.bias.set_data_handle(const_cast<float*>(epilogue.bias));
    p.primitive.execute(stream,
                        {{DNNL_ARG_SRC, p.a}, {DNNL_ARG_WEIGHTS, p.b}, {DNNL_ARG_BIAS, p.bias}, {DNNL_ARG_DST, p.c}});
  } else {
    p.primitive.execute(stream, {{DNNL_ARG_SRC, p.a}, {DNNL_ARG_WEIGHTS, p.b}, {DNNL_ARG_DST, p.c}});
  }
  return true;
}

}  // namespace chaingrad::kernels
