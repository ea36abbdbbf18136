// Losses, all compositions of primitives (so they need no backward rules of their own), written
// in the numerically stable forms.
#include "ops/common.hpp"

namespace chaingrad {

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

// nll(log_softmax(logits)); with smoothing eps the target distribution is (1-eps) one-hot + eps/C.
Tensor cross_entropy(const Tensor& logits, const Tensor& target, double label_smoothing) {
  check_classification(logits, target, "cross_entropy");
  CG_CHECK(label_smoothing >= 0 && label_smoothing <= 1, ValueError,
           "cross_entropy: label_smoothing must be in [0, 1]; got ", label_smoothing);
  const Tensor logp = log_softmax(logits, 1);
  const Tensor nll = neg(mean(gather(logp, 1, unsqueeze(target, 1))));
  if (label_smoothing == 0) return nll;
  const Tensor uniform = neg(mean(logp));  // mean over batch and classes = (1/C) sum_c, averaged
  return nll * (1.0 - label_smoothing) + uniform * label_smoothing;
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
