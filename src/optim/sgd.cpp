// SGD with momentum, dampening, Nesterov and L2 weight decay (PyTorch's torch.optim.SGD).
#include <algorithm>
#include <cmath>

#include "chaingrad/autograd.hpp"
#include "chaingrad/optim.hpp"
#include "kernels/cpu/parallel.hpp"

namespace chaingrad::optim {

namespace {

// One fused pass over a parameter. `first`: the momentum buffer is uninitialized and becomes g.
template <class T>
void sgd_kernel(T* __restrict p, const T* __restrict g, T* __restrict buf, std::int64_t n, const SGDOptions& o,
                double lr_d, bool first) {
  const T lr = static_cast<T>(lr_d), wd = static_cast<T>(o.weight_decay), mom = static_cast<T>(o.momentum);
  const T damp = static_cast<T>(1.0 - o.dampening);
  if (buf == nullptr) {
    if (o.weight_decay == 0.0) {
      for (std::int64_t i = 0; i < n; ++i) p[i] -= lr * g[i];
    } else {
      for (std::int64_t i = 0; i < n; ++i) p[i] -= lr * (g[i] + wd * p[i]);
    }
    return;
  }
  if (first) {
    for (std::int64_t i = 0; i < n; ++i) {
      const T gi = g[i] + wd * p[i];
      buf[i] = gi;
      p[i] -= lr * (o.nesterov ? gi + mom * gi : gi);
    }
    return;
  }
  if (o.nesterov) {
    for (std::int64_t i = 0; i < n; ++i) {
      const T gi = g[i] + wd * p[i];
      const T b = mom * buf[i] + damp * gi;
      buf[i] = b;
      p[i] -= lr * (gi + mom * b);
    }
  } else {
    for (std::int64_t i = 0; i < n; ++i) {
      const T gi = g[i] + wd * p[i];
      const T b = mom * buf[i] + damp * gi;
      buf[i] = b;
      p[i] -= lr * b;
    }
  }
}

// Note [updates in backward], momentum: the two passes around the product that adds the gradient
// into the buffer b (b <- beta b + alpha g). Before it, weight decay's share of the gradient:
// b <- momentum b + (1 - dampening) wd p, so the product runs with beta 1. After it, the step
// p <- p - lr b, and on the first step (b = g + wd p, undamped as PyTorch's) decay's share first.
template <class T>
void decay_into_buffer(const T* __restrict p, T* __restrict buf, std::int64_t n, const SGDOptions& o) {
  const T mom = static_cast<T>(o.momentum), dwd = static_cast<T>((1.0 - o.dampening) * o.weight_decay);
  for (std::int64_t i = 0; i < n; ++i) buf[i] = mom * buf[i] + dwd * p[i];
}

template <class T>
void step_from_buffer(T* __restrict p, T* __restrict buf, std::int64_t n, const SGDOptions& o, double lr_d,
                      bool first) {
  const T lr = static_cast<T>(lr_d), wd = static_cast<T>(o.weight_decay);
  if (first && o.weight_decay != 0.0) {
    for (std::int64_t i = 0; i < n; ++i) {
      const T b = buf[i] + wd * p[i];
      buf[i] = b;
      p[i] -= lr * b;
    }
    return;
  }
  for (std::int64_t i = 0; i < n; ++i) p[i] -= lr * buf[i];
}

}  // namespace

SGD::SGD(std::vector<Tensor> params, SGDOptions o)
    : Optimizer(std::move(params), o.lr, "SGD", {"momentum_buffer"}, /*counts_steps=*/false), options_(o) {
  CG_CHECK(o.momentum >= 0.0 && o.weight_decay >= 0.0 && std::isfinite(o.dampening), ValueError,
           "SGD: momentum and weight_decay must be non-negative; got momentum=", o.momentum,
           ", weight_decay=", o.weight_decay);
  CG_CHECK(!o.nesterov || (o.momentum > 0.0 && o.dampening == 0.0), ValueError,
           "SGD: Nesterov momentum requires momentum > 0 and dampening = 0; got momentum=", o.momentum,
           ", dampening=", o.dampening);
  options_.in_backward = false;
  set_in_backward(o.in_backward);
}

SGD::~SGD() { set_in_backward(false); }

void SGD::set_in_backward(bool on) {
  CG_CHECK(!on || !options_.nesterov, ValueError,
           "SGD: in_backward does not apply Nesterov momentum, whose step needs each gradient apart from the "
           "momentum buffer; turn off nesterov or in_backward");
  if (on) {
    for (const Tensor& p : params_) {
      const InBackwardUpdate* other = p.impl()->extras ? p.impl()->extras->update_in_backward : nullptr;
      CG_CHECK(other == nullptr || other == &in_backward_, ValueError, "SGD: in_backward: parameter of shape ",
               p.shape(), " is already updated in backward by another optimizer");
    }
  }
  for (const Tensor& p : params_) {
    TensorImpl& impl = *p.impl();
    if (on)
      impl.extra().update_in_backward = &in_backward_;
    else if (impl.extras && impl.extras->update_in_backward == &in_backward_)
      impl.extras->update_in_backward = nullptr;
  }
  options_.in_backward = on;
}

void SGD::step() {
  NoGradGuard no_grad;
  const bool use_momentum = options_.momentum != 0.0;
  for (std::size_t i = 0; i < params_.size(); ++i) {
    const Tensor g = grad_of(i);
    if (!g.defined()) continue;
    const Tensor& p = params_[i];
    const bool first = use_momentum && !has_slot(i, 0);
    Tensor* buf = use_momentum ? &slot(i, 0) : nullptr;
    dispatch_float(p.dtype(), "SGD", [&]<class T>() {
      T *pp = p.data<T>(), *pb = buf ? buf->data<T>() : nullptr;
      const T* pg = g.data<T>();
      kernels::parallel_range(p.numel(), [&](std::int64_t lo, std::int64_t hi) {
        sgd_kernel<T>(pp + lo, pg + lo, pb ? pb + lo : nullptr, hi - lo, options_, lr_, first);
      });
    });
    p.bump_version();
    ++steps_[i];
  }
}

// Note [updates in backward]: the product writes straight into the weight without momentum, and
// into the momentum buffer with it.
bool SGD::step_in_backward(const Tensor& param, const InBackwardUpdate::Product& product) {
  // (A linear search: a backward asks once per weight, and models have tens of parameters.)
  const auto it = std::find_if(params_.begin(), params_.end(),
                               [&](const Tensor& p) { return p.impl() == param.impl(); });
  if (it == params_.end()) return false;
  const auto i = static_cast<std::size_t>(it - params_.begin());
  const SGDOptions& o = options_;
  if (o.momentum == 0.0) {
    product.into(param, -lr_, 1.0 - lr_ * o.weight_decay);
  } else {
    NoGradGuard no_grad;
    const bool first = !has_slot(i, 0);
    const Tensor& buf = slot(i, 0);
    dispatch_float(param.dtype(), "SGD", [&]<class T>() {
      T *pp = param.data<T>(), *pb = buf.data<T>();
      if (!first && o.weight_decay != 0.0)
        kernels::parallel_range(param.numel(), [&](std::int64_t lo, std::int64_t hi) {
          decay_into_buffer<T>(pp + lo, pb + lo, hi - lo, o);
        });
      product.into(buf, first ? 1.0 : 1.0 - o.dampening, first ? 0.0 : o.weight_decay != 0.0 ? 1.0 : o.momentum);
      kernels::parallel_range(param.numel(), [&](std::int64_t lo, std::int64_t hi) {
        step_from_buffer<T>(pp + lo, pb + lo, hi - lo, o, lr_, first);
      });
    });
  }
  ++steps_[i];
  return true;
}

}  // namespace chaingrad::optim
