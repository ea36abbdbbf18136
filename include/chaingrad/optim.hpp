#pragma once
// Optimizers, learning-rate schedules and gradient clipping.
//
// Every optimizer follows PyTorch's published update formulas (torch.optim docs) and updates
// parameters in place under NoGradGuard with one fused loop per parameter over contiguous
// memory: a warm step allocates nothing. Per-parameter state lives in named tensors,
// `state.<i>.<name>` with PyTorch's names (momentum_buffer, exp_avg, exp_avg_sq, max_exp_avg_sq,
// square_avg, grad_avg, step), so it can be checkpointed and restored with load_state.
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "chaingrad/autograd.hpp"
#include "chaingrad/tensor.hpp"

namespace chaingrad::optim {

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

class Optimizer {
 public:
  virtual ~Optimizer();
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  // One update of every parameter that has a gradient (others are skipped, as in PyTorch).
  void step();
  // Sets every parameter's gradient to undefined (PyTorch's set_to_none=True).
  void zero_grad();

  double lr() const { return lr_; }
  void set_lr(double lr);
  // The lr given at construction: schedules scale this.
  double initial_lr() const { return initial_lr_; }
  const std::vector<Tensor>& params() const { return params_; }
  virtual const char* name() const = 0;

  // The state as named tensors: per-parameter buffers are returned as the live tensors (not
  // copies); `state.<i>.step` is a fresh 0-d float64. Parameters that have not stepped yet have
  // no entries.
  NamedTensors state() const;
  // Restores state() output: shapes must match the parameters and names must be known; the
  // values are copied (converted to each parameter's dtype).
  void load_state(const NamedTensors& state);

  // Steps each parameter inside backward() wherever its whole gradient is one matrix product
  // (linear layers' weights), from the next backward on, and makes no `.grad` for it (Note
  // [updates in backward], autograd.hpp); step() then updates the rest. A training loop runs
  // unchanged: zero_grad(), backward(), step(). Each backward() steps those weights, so a loop that
  // accumulates gradients over several backward() calls before one step() must leave this off, as
  // must one that looks at the weights' gradients (clipping, logging). Off unless the options say.
  void set_in_backward(bool on);
  bool in_backward() const { return in_backward_on_; }

 protected:
  // `slot_names`: the per-parameter buffers this optimizer keeps, in slot order.
  Optimizer(std::vector<Tensor> params, double lr, const char* name, std::vector<std::string> slot_names,
            bool counts_steps);

  // The slot buffer k of parameter i, created zero-filled in the parameter's dtype on first use.
  Tensor& slot(std::size_t i, std::size_t k);
  bool has_slot(std::size_t i, std::size_t k) const { return slots_[i][k].defined(); }
  // Parameter i's gradient as a contiguous tensor of its dtype, or undefined when it has none.
  Tensor grad_of(std::size_t i) const;
  // One update of parameter i with its gradient g (contiguous, of the parameter's shape and dtype);
  // the caller bumps the parameter's version.
  virtual void update(std::size_t i, const Tensor& g) = 0;
  // The same with the gradient still a product (Note [updates in backward]). By default the
  // product is made into a scratch gradient, which update() reads while it is still in cache.
  virtual void update_in_backward(std::size_t i, const InBackwardUpdate::Product& product);

  std::vector<Tensor> params_;
  std::vector<std::vector<Tensor>> slots_;  // [param][slot]
  std::vector<std::int64_t> steps_;         // per parameter, as PyTorch
  std::vector<std::string> slot_names_;
  bool counts_steps_;
  double lr_;
  double initial_lr_;

 private:
  // What backward hands this optimizer for its parameters while in_backward() is on.
  class InBackward final : public InBackwardUpdate {
   public:
    explicit InBackward(Optimizer& opt) : opt_(opt) {}
    bool apply(const Tensor& param, const Product& product) override;

   private:
    Optimizer& opt_;
  };
  InBackward in_backward_{*this};
  bool in_backward_on_ = false;
};

// ---------------------------------------------------------------- SGD
struct SGDOptions {
  double lr = 0.01;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
  // Optimizer::set_in_backward at construction. Without momentum the product subtracts lr *
  // gradient from the weight directly; with momentum (not Nesterov's) it is added into the momentum
  // buffer, and the weight steps right after.
  bool in_backward = false;
};

// g = grad + wd * p
// momentum: b = g on the first step, else b = momentum * b + (1 - dampening) * g;
//           g = nesterov ? g + momentum * b : b
// p = p - lr * g
class SGD : public Optimizer {
 public:
  SGD(std::vector<Tensor> params, SGDOptions options = {});
  const char* name() const override { return "SGD"; }
  // options().lr is the initial lr (see lr()); options().in_backward the initial in_backward().
  SGDOptions& options() { return options_; }

 protected:
  void update(std::size_t i, const Tensor& g) override;
  void update_in_backward(std::size_t i, const InBackwardUpdate::Product& product) override;

 private:
  SGDOptions options_;
};

// ---------------------------------------------------------------- Adam / AdamW
struct AdamOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool amsgrad = false;
  bool in_backward = false;  // Optimizer::set_in_backward at construction
};

// t += 1; g = grad (+ wd * p for Adam; AdamW instead first sets p = p * (1 - lr * wd))
// m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  (amsgrad: vmax = max(vmax, v), used for v)
// p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
class Adam : public Optimizer {
 public:
  Adam(std::vector<Tensor> params, AdamOptions options = {});
  const char* name() const override { return decoupled_ ? "AdamW" : "Adam"; }
  AdamOptions& options() { return options_; }

 protected:
  Adam(std::vector<Tensor> params, AdamOptions options, bool decoupled);
  void update(std::size_t i, const Tensor& g) override;

 private:
  AdamOptions options_;
  bool decoupled_;
};

struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
  bool amsgrad = false;
  bool in_backward = false;  // Optimizer::set_in_backward at construction
};

// Adam with decoupled weight decay (Loshchilov & Hutter): p = p * (1 - lr * wd) before the step.
class AdamW : public Adam {
 public:
  AdamW(std::vector<Tensor> params, AdamWOptions options = {});
};

// ---------------------------------------------------------------- RMSprop
struct RMSpropOptions {
  double lr = 0.01;
  double alpha = 0.99;
  double eps = 1e-8;
  double weight_decay = 0.0;
  double momentum = 0.0;
  bool centered = false;
  bool in_backward = false;  // Optimizer::set_in_backward at construction
};

// g = grad + wd * p;  s = alpha s + (1 - alpha) g^2
// centered: a = alpha a + (1 - alpha) g;  d = sqrt(s - a^2) + eps;  else d = sqrt(s) + eps
// momentum > 0: b = momentum b + g / d;  p = p - lr b;   else p = p - lr g / d
class RMSprop : public Optimizer {
 public:
  RMSprop(std::vector<Tensor> params, RMSpropOptions options = {});
  const char* name() const override { return "RMSprop"; }
  RMSpropOptions& options() { return options_; }

 protected:
  void update(std::size_t i, const Tensor& g) override;

 private:
  RMSpropOptions options_;
};

// ---------------------------------------------------------------- schedules
// A schedule is a function of its step count t (0 at construction), lr(t), scaling the
// optimizer's initial_lr. Construction sets the optimizer's lr to lr(0); each step() advances t
// and sets lr(t). Call it once per epoch or once per batch, as the schedule's units mean.
class LRScheduler {
 public:
  explicit LRScheduler(Optimizer& optimizer);
  virtual ~LRScheduler() = default;
  void step();
  std::int64_t last_step() const { return t_; }
  // Jumps to step t (for resuming) and sets the optimizer's lr.
  void set_step(std::int64_t t);
  // The lr at step t.
  virtual double lr_at(std::int64_t t) const = 0;
  double base_lr() const { return base_lr_; }

 protected:
  void apply();  // sets the optimizer's lr to lr_at(t_); derived constructors call it
  Optimizer* optimizer_;
  double base_lr_;
  std::int64_t t_ = 0;
};

// lr = base * gamma^floor(t / step_size)
class StepLR : public LRScheduler {
 public:
  StepLR(Optimizer& optimizer, std::int64_t step_size, double gamma = 0.1);
  double lr_at(std::int64_t t) const override;

 private:
  std::int64_t step_size_;
  double gamma_;
};

// lr = eta_min + (base - eta_min) * (1 + cos(pi * t / T_max)) / 2   (PyTorch's closed form)
class CosineAnnealingLR : public LRScheduler {
 public:
  CosineAnnealingLR(Optimizer& optimizer, std::int64_t t_max, double eta_min = 0.0);
  double lr_at(std::int64_t t) const override;

 private:
  std::int64_t t_max_;
  double eta_min_;
};

// lr = base * (t + 1) / warmup_steps for t < warmup_steps; afterwards `after`'s lr at
// t - warmup_steps (or base when there is none). E.g.
//   LinearWarmup warm(opt, 500, std::make_unique<CosineAnnealingLR>(opt, 9500));
class LinearWarmup : public LRScheduler {
 public:
  LinearWarmup(Optimizer& optimizer, std::int64_t warmup_steps, std::unique_ptr<LRScheduler> after = nullptr);
  double lr_at(std::int64_t t) const override;

 private:
  std::int64_t warmup_;
  std::unique_ptr<LRScheduler> after_;
};

// ---------------------------------------------------------------- clipping
// Scales all gradients together so that their joint norm (of `norm_type`; infinity for the max
// norm) is at most max_norm: g *= max_norm / (total + 1e-6) when that factor is below 1.
// Returns the total norm before clipping. Parameters without a gradient are ignored.
double clip_grad_norm_(const std::vector<Tensor>& params, double max_norm, double norm_type = 2.0);
// Clamps every gradient element to [-clip_value, clip_value].
void clip_grad_value_(const std::vector<Tensor>& params, double clip_value);

}  // namespace chaingrad::optim
