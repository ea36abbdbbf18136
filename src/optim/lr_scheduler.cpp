// Learning-rate schedules: closed-form functions of the step count.
#include <cmath>
#include <numbers>

#include "chaingrad/optim.hpp"

namespace chaingrad::optim {

LRScheduler::LRScheduler(Optimizer& optimizer) : optimizer_(&optimizer), base_lr_(optimizer.initial_lr()) {}

void LRScheduler::step() {
  ++t_;
  apply();
}

void LRScheduler::set_step(std::int64_t t) {
  CG_CHECK(t >= 0, ValueError, "LRScheduler::set_step: the step must be non-negative; got ", t);
  t_ = t;
  apply();
}

void LRScheduler::apply() { optimizer_->set_lr(lr_at(t_)); }

StepLR::StepLR(Optimizer& optimizer, std::int64_t step_size, double gamma)
    : LRScheduler(optimizer), step_size_(step_size), gamma_(gamma) {
  CG_CHECK(step_size > 0 && gamma > 0.0, ValueError, "StepLR: step_size and gamma must be positive; got step_size=",
           step_size, ", gamma=", gamma);
  apply();
}

double StepLR::lr_at(std::int64_t t) const {
  return base_lr_ * std::pow(gamma_, static_cast<double>(t / step_size_));
}

CosineAnnealingLR::CosineAnnealingLR(Optimizer& optimizer, std::int64_t t_max, double eta_min)
    : LRScheduler(optimizer), t_max_(t_max), eta_min_(eta_min) {
  CG_CHECK(t_max > 0 && eta_min >= 0.0, ValueError,
           "CosineAnnealingLR: T_max must be positive and eta_min non-negative; got T_max=", t_max,
           ", eta_min=", eta_min);
  apply();
}

double CosineAnnealingLR::lr_at(std::int64_t t) const {
  const double c = std::cos(std::numbers::pi * static_cast<double>(t) / static_cast<double>(t_max_));
  return eta_min_ + (base_lr_ - eta_min_) * (1.0 + c) / 2.0;
}

LinearWarmup::LinearWarmup(Optimizer& optimizer, std::int64_t warmup_steps, std::unique_ptr<LRScheduler> after)
    : LRScheduler(optimizer), warmup_(warmup_steps), after_(std::move(after)) {
  CG_CHECK(warmup_steps > 0, ValueError, "LinearWarmup: warmup_steps must be positive; got ", warmup_steps);
  apply();
}

double LinearWarmup::lr_at(std::int64_t t) const {
  if (t < warmup_) return base_lr_ * static_cast<double>(t + 1) / static_cast<double>(warmup_);
  return after_ ? after_->lr_at(t - warmup_) : base_lr_;
}

}  // namespace chaingrad::optim
