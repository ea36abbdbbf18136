// Losses in their numerically stable forms. All but cross_entropy are compositions of primitives
// and need no backward rule of their own.
#include <cmath>

#include "kernels/cpu/reduce.hpp"
#include "kernels/cpu/vector_math.hpp"
#include "ops/common.hpp"

namespace chaingrad {

using detail::record;

namespace {
void check_classification(const Tensor& input, const Tensor& target, const char* op) {
  CG_CHECK(input.dim() == 2, ShapeError, op, ": expected input of shape [N, C]; got ", input.shape());
  CG_CHECK(target.dtype() == DType::Int64, TypeError, op, ": target must hold int64 class indices; got ",
           target.dtype());
  CG_CHECK(target.dim() == 1 && target.shape()[0] == input.shape()[0], ShapeError, op, ": target of shape ",
           target.shape(), " does not match input of shape ", input.shape(), " (expected [", input.shape()[0], "])");
  const std::int64_t C = input.shape()[1];
  const Tensor t = target.contiguous();
  const std::int64_t* p = t.data<std::int64_t>();
  for (std::int64_t i = 0; i < t.numel(); ++i)
    CG_CHECK(p[i] >= 0 && p[i] < C, ValueError, op, ": target ", p[i], " at position ", i,
             " is not a class index in [0, ", C, ")");
}
}  // namespace

// -mean_i log_probs[i, target_i]
Tensor nll_loss(const Tensor& log_probs, const Tensor& target) {
  check_classification(log_probs, target, "nll_loss");
  return neg(mean(gather(log_probs, 1, unsqueeze(target, 1))));
}

// Note [cross_entropy in one node]: nll(log_softmax(logits)) with the target distribution q =
// (1 - eps) onehot(target) + eps / C, as one op: L = mean_n [lse_n - sum_c q_nc z_nc] with lse_n the
// row's log-sum-exp, and dL/dz = (softmax(z) - q) g / N. The composition took five nodes and as
// many small tensors each way (11 us forward and backward for 256 x 10 logits on two threads,
// where this takes half of that). Its backward records a graph (for second derivatives) only
// under create_graph.
namespace {

// The target distribution q as a tensor of z's shape and dtype (for the recorded backward).
Tensor target_distribution(const Tensor& z, const Tensor& target, double eps) {
  const std::int64_t C = z.shape()[1];
  Tensor q = full(z.shape(), eps / static_cast<double>(C), {.dtype = z.dtype()});
  const std::int64_t* t = target.data<std::int64_t>();
  dispatch_float(z.dtype(), "cross_entropy", [&]<class T>() {
    T* pq = q.data<T>();
    for (std::int64_t n = 0; n < z.shape()[0]; ++n) pq[n * C + t[n]] += static_cast<T>(1.0 - eps);
  });
  return q;
}

// dL/dz = (exp(z - lse) - q) * scale, for contiguous z.
template <class T>
void cross_entropy_grad(const T* z, const T* lse, const std::int64_t* target, std::int64_t N, std::int64_t C,
                        double eps, T scale, T* out) {
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t c = 0; c < C; ++c) out[n * C + c] = z[n * C + c] - lse[n];
  if constexpr (std::is_same_v<T, float>) {
    kernels::vexp(out, out, N * C);
  } else {
    for (std::int64_t i = 0; i < N * C; ++i) out[i] = std::exp(out[i]);
  }
  // (Flat, so it runs in vectors whatever C is; then the target's share, one element a row.)
  const T spread = static_cast<T>(eps / static_cast<double>(C)), hit = static_cast<T>(1.0 - eps) * scale;
  for (std::int64_t i = 0; i < N * C; ++i) out[i] = (out[i] - spread) * scale;
  for (std::int64_t n = 0; n < N; ++n) out[n * C + target[n]] -= hit;
}

}  // namespace

Tensor cross_entropy(const Tensor& logits, const Tensor& target, double label_smoothing) {
  check_classification(logits, target, "cross_entropy");
  CG_CHECK(label_smoothing >= 0 && label_smoothing <= 1, ValueError,
           "cross_entropy: label_smoothing must be in [0, 1]; got ", label_smoothing);
  const std::int64_t N = logits.shape()[0], C = logits.shape()[1];
  const Tensor z = logits.is_contiguous() ? logits : logits.detach().contiguous();
  const Tensor t = target.contiguous();
  Tensor lse = empty({N}, z.dtype());
  Tensor out = empty({}, z.dtype());
  dispatch_float(z.dtype(), "cross_entropy", [&]<class T>() {
    const T* pz = z.data<T>();
    T* pl = lse.data<T>();
    kernels::softmax_axis<T, 2>(pz, pl, N, C, 1);
    const std::int64_t* pt = t.data<std::int64_t>();
    // Each row's term rounded to T, as log_softmax's entries are, then the rows summed in double.
    double total = 0;
    for (std::int64_t n = 0; n < N; ++n) {
      const T* row = pz + n * C;
      double term = static_cast<double>(static_cast<T>(pl[n] - row[pt[n]]));
      if (label_smoothing != 0) {
        double mean_z = 0;
        for (std::int64_t c = 0; c < C; ++c) mean_z += static_cast<double>(row[c]);
        mean_z /= static_cast<double>(C);
        term = (1.0 - label_smoothing) * term + label_smoothing * (static_cast<double>(pl[n]) - mean_z);
      }
      total += term;
    }
    *out.data<T>() = static_cast<T>(total / static_cast<double>(N));
  });
  if (detail::any_requires_grad({logits}))
    record("cross_entropy", {logits}, out,
           [sz = SavedTensor(logits, false), st = SavedTensor(t, false), lse, label_smoothing, N, C](
               const Tensor& g, const Node& self) {
             const Tensor& logits_v = sz.unpack(self);
             const Tensor& tv = st.unpack(self);
             if (GradMode::is_enabled())
               return GradList{mul(softmax(logits_v, 1) - target_distribution(logits_v, tv, label_smoothing),
                                   div(g, detail::scalar_like(g, static_cast<double>(N))))};
             const Tensor zv = logits_v.is_contiguous() ? logits_v : logits_v.detach().contiguous();
             Tensor dz = empty(zv.shape(), zv.dtype());
             dispatch_float(zv.dtype(), "cross_entropy", [&]<class T>() {
               cross_entropy_grad<T>(zv.data<T>(), lse.data<T>(), tv.data<std::int64_t>(), N, C, label_smoothing,
                                     static_cast<T>(g.item() / static_cast<double>(N)), dz.data<T>());
             });
             return GradList{dz};
           });
  return out;
}

namespace {
void check_same_shape(const Tensor& a, const Tensor& b, const char* op) {
  CG_CHECK(a.shape() == b.shape(), ShapeError, op, ": input shape ", a.shape(), " and target shape ", b.shape(),
           " differ");
}
}  // namespace

Tensor mse_loss(const Tensor& input, const Tensor& target) {
  check_same_shape(input, target, "mse_loss");
  return mean(square(input - target));
}

Tensor l1_loss(const Tensor& input, const Tensor& target) {
  check_same_shape(input, target, "l1_loss");
  return mean(abs(input - target));
}

// mean(softplus(x) - x t): equal to -[t log sigma(x) + (1-t) log(1 - sigma(x))], finite at |x| = 1000.
Tensor bce_with_logits(const Tensor& logits, const Tensor& target) {
  check_same_shape(logits, target, "bce_with_logits");
  return mean(softplus(logits) - logits * target);
}

}  // namespace chaingrad
