// SGD with momentum, dampening, Nesterov and L2 weight decay (PyTorch's torch.optim.SGD).
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
  CG_CHECK(!on || options_.momentum == 0.0, ValueError,
           "SGD: in_backward applies plain SGD steps and needs momentum 0; got momentum=", options_.momentum);
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

}  // namespace chaingrad::optim
