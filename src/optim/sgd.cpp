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

// Note [updates in backward], momentum: the two passes around the product that adds the gradient
// into the buffer b (b <- momentum b + (1 - dampening) g). Before it, weight decay's share of the
// gradient, b <- momentum b + (1 - dampening) wd p, so the product runs with beta 1. After it, the
// step p <- p - lr b.
template <class T>
void decay_into_buffer(const T* __restrict p, T* __restrict buf, std::int64_t n, const SGDOptions& o) {
  const T mom = static_cast<T>(o.momentum), dwd = static_cast<T>((1.0 - o.dampening) * o.weight_decay);
  for (std::int64_t i = 0; i < n; ++i) buf[i] = mom * buf[i] + dwd * p[i];
}

template <class T>
void step_from_buffer(T* __restrict p, const T* __restrict buf, std::int64_t n, double lr_d) {
  const T lr = static_cast<T>(lr_d);
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
  set_in_backward(o.in_backward);
}

void SGD::update(std::size_t i, const Tensor& g) {
  const Tensor& p = params_[i];
  const bool use_momentum = options_.momentum != 0.0;
  const bool first = use_momentum && !has_slot(i, 0);
  Tensor* buf = use_momentum ? &slot(i, 0) : nullptr;
  dispatch_float(p.dtype(), "SGD", [&]<class T>() {
    T *pp = p.data<T>(), *pb = buf ? buf->data<T>() : nullptr;
    const T* pg = g.data<T>();
    kernels::parallel_range(p.numel(), [&](std::int64_t lo, std::int64_t hi) {
      sgd_kernel<T>(pp + lo, pg + lo, pb ? pb + lo : nullptr, hi - lo, options_, lr_, first);
    });
  });
  ++steps_[i];
}

// Note [updates in backward]: the product writes straight into the weight without momentum, and
// into the momentum buffer with it. The default way (a scratch gradient, then update()) takes the
// rest: a momentum buffer's first step, which starts it as the gradient itself (once a parameter),
// and Nesterov's step, which needs the gradient apart from the buffer.
void SGD::update_in_backward(std::size_t i, const InBackwardUpdate::Product& product) {
  const SGDOptions& o = options_;
  const Tensor& param = params_[i];
  if (o.nesterov || (o.momentum != 0.0 && !has_slot(i, 0))) return Optimizer::update_in_backward(i, product);
  if (o.momentum == 0.0) {
    product.into(param, -lr_, 1.0 - lr_ * o.weight_decay);
  } else {
    NoGradGuard no_grad;
    const Tensor& buf = slot(i, 0);
    dispatch_float(param.dtype(), "SGD", [&]<class T>() {
      T *pp = param.data<T>(), *pb = buf.data<T>();
      if (o.weight_decay != 0.0)
        kernels::parallel_range(param.numel(), [&](std::int64_t lo, std::int64_t hi) {
          decay_into_buffer<T>(pp + lo, pb + lo, hi - lo, o);
        });
      product.into(buf, 1.0 - o.dampening, o.weight_decay != 0.0 ? 1.0 : o.momentum);
      kernels::parallel_range(param.numel(), [&](std::int64_t lo, std::int64_t hi) {
        step_from_buffer<T>(pp + lo, pb + lo, hi - lo, lr_);
      });
    });
  }
  ++steps_[i];
}

}  // namespace chaingrad::optim
