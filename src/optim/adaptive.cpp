// The adaptive optimizers: Adam, AdamW (PyTorch's torch.optim.Adam / AdamW, with amsgrad) and
// RMSprop (centered and momentum variants).
//
// Note [optimizer simd]: their per-element updates need sqrt. GCC only vectorizes sqrt under
// -fno-math-errno (otherwise each call keeps a branch to set errno), and neither a pragma nor an
// attribute changes that for one file, so the loops are written once over a tiny vector
// interface (Lanes<T>) and instantiated for AVX registers and for plain scalars (the tail, and
// machines without AVX). Both use the same operations in the same order (no FMA: the project
// compiles with -std=c++20, where contraction is off), so results do not depend on where an
// element falls.
#include <cmath>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "chaingrad/autograd.hpp"
#include "chaingrad/optim.hpp"
#include "kernels/cpu/parallel.hpp"

namespace chaingrad::optim {

namespace {

template <class T>
struct Scalar {
  using V = T;
  static constexpr std::int64_t kWidth = 1;
  static V load(const T* p) { return *p; }
  static void store(T* p, V v) { *p = v; }
  static V set1(T x) { return x; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V div(V a, V b) { return a / b; }
  static V sqrt(V a) { return std::sqrt(a); }
  static V max(V a, V b) { return a > b ? a : b; }
};

#if defined(__AVX__)
template <class T>
struct Avx;
template <>
struct Avx<float> {
  using V = __m256;
  static constexpr std::int64_t kWidth = 8;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V sqrt(V a) { return _mm256_sqrt_ps(a); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }  // a > b ? a : b
};
template <>
struct Avx<double> {
  using V = __m256d;
  static constexpr std::int64_t kWidth = 4;
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static V set1(double x) { return _mm256_set1_pd(x); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
  static V sub(V a, V b) { return _mm256_sub_pd(a, b); }
  static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  static V div(V a, V b) { return _mm256_div_pd(a, b); }
  static V sqrt(V a) { return _mm256_sqrt_pd(a); }
  static V max(V a, V b) { return _mm256_max_pd(a, b); }
};
#endif

// Runs `loop.template run<Lanes>(lo, hi)` with vector lanes where available, then finishes the
// tail with scalars; large parameters are cut into one range per thread (the update is
// elementwise, so the result does not depend on the cut).
template <class T, class Loop>
void for_lanes(std::int64_t n, const Loop& loop) {
  kernels::parallel_range(n, [&](std::int64_t lo, std::int64_t hi) {
    std::int64_t i = lo;
#if defined(__AVX__)
    i = loop.template run<Avx<T>>(lo, hi);
#endif
    loop.template run<Scalar<T>>(i, hi);
  });
}

// ---------------------------------------------------------------- Adam
template <class T, bool kAmsgrad>
struct AdamLoop {
  T* p;
  const T* g;
  T* m;
  T* v;
  T* vmax;
  T step_size, bc2_sqrt, b1, b2, omb1, omb2, eps, l2, decay;

  // p' = p * decay; g' = g + l2 p'; m = b1 m + (1 - b1) g'; v = b2 v + (1 - b2) g'^2;
  // p = p' - step_size * m / (sqrt(v or vmax) / sqrt(bc2) + eps)
  template <class L>
  std::int64_t run(std::int64_t i, std::int64_t n) const {
    using V = typename L::V;
    const V vstep = L::set1(step_size), vbc2 = L::set1(bc2_sqrt), vb1 = L::set1(b1), vb2 = L::set1(b2);
    const V vomb1 = L::set1(omb1), vomb2 = L::set1(omb2), veps = L::set1(eps), vl2 = L::set1(l2);
    const V vdecay = L::set1(decay);
    for (; i + L::kWidth <= n; i += L::kWidth) {
      const V pi = L::mul(L::load(p + i), vdecay);
      const V gi = L::add(L::load(g + i), L::mul(vl2, pi));
      const V mi = L::add(L::mul(vb1, L::load(m + i)), L::mul(vomb1, gi));
      const V vi = L::add(L::mul(vb2, L::load(v + i)), L::mul(L::mul(vomb2, gi), gi));
      L::store(m + i, mi);
      L::store(v + i, vi);
      V vd = vi;
      if constexpr (kAmsgrad) {
        vd = L::max(L::load(vmax + i), vi);
        L::store(vmax + i, vd);
      }
      const V denom = L::add(L::div(L::sqrt(vd), vbc2), veps);
      L::store(p + i, L::sub(pi, L::div(L::mul(vstep, mi), denom)));
    }
    return i;
  }
};

std::vector<std::string> adam_slots(bool amsgrad) {
  if (amsgrad) return {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
  return {"exp_avg", "exp_avg_sq"};
}

// ---------------------------------------------------------------- RMSprop
template <class T, bool kCentered, bool kMomentum>
struct RMSpropLoop {
  T* p;
  const T* g;
  T* sq;
  T* avg;
  T* buf;
  T lr, alpha, oma, eps, wd, mom;

  // g' = g + wd p; s = alpha s + (1 - alpha) g'^2; [a = alpha a + (1 - alpha) g']
  // d = sqrt(s [- a^2]) + eps; momentum: b = mom b + g' / d, p -= lr b; else p -= lr g' / d
  template <class L>
  std::int64_t run(std::int64_t i, std::int64_t n) const {
    using V = typename L::V;
    const V vlr = L::set1(lr), valpha = L::set1(alpha), voma = L::set1(oma), veps = L::set1(eps);
    const V vwd = L::set1(wd), vmom = L::set1(mom);
    for (; i + L::kWidth <= n; i += L::kWidth) {
      const V pi = L::load(p + i);
      const V gi = L::add(L::load(g + i), L::mul(vwd, pi));
      const V s = L::add(L::mul(valpha, L::load(sq + i)), L::mul(L::mul(voma, gi), gi));
      L::store(sq + i, s);
      V d;
      if constexpr (kCentered) {
        const V a = L::add(L::mul(valpha, L::load(avg + i)), L::mul(voma, gi));
        L::store(avg + i, a);
        d = L::add(L::sqrt(L::sub(s, L::mul(a, a))), veps);
      } else {
        d = L::add(L::sqrt(s), veps);
      }
      if constexpr (kMomentum) {
        const V b = L::add(L::mul(vmom, L::load(buf + i)), L::div(gi, d));
        L::store(buf + i, b);
        L::store(p + i, L::sub(pi, L::mul(vlr, b)));
      } else {
        L::store(p + i, L::sub(pi, L::div(L::mul(vlr, gi), d)));
      }
    }
    return i;
  }
};

std::vector<std::string> rmsprop_slots(const RMSpropOptions& o) {
  std::vector<std::string> names{"square_avg"};
  if (o.momentum > 0.0) names.push_back("momentum_buffer");
  if (o.centered) names.push_back("grad_avg");
  return names;
}

}  // namespace

// ---------------------------------------------------------------- Adam / AdamW
Adam::Adam(std::vector<Tensor> params, AdamOptions o, bool decoupled)
    : Optimizer(std::move(params), o.lr, decoupled ? "AdamW" : "Adam", adam_slots(o.amsgrad), /*counts_steps=*/true),
      options_(o),
      decoupled_(decoupled) {
  CG_CHECK(o.beta1 >= 0.0 && o.beta1 < 1.0 && o.beta2 >= 0.0 && o.beta2 < 1.0, ValueError, name(),
           ": betas must be in [0, 1); got beta1=", o.beta1, ", beta2=", o.beta2);
  CG_CHECK(o.eps >= 0.0 && o.weight_decay >= 0.0, ValueError, name(),
           ": eps and weight_decay must be non-negative; got eps=", o.eps, ", weight_decay=", o.weight_decay);
  set_in_backward(o.in_backward);
}

Adam::Adam(std::vector<Tensor> params, AdamOptions o) : Adam(std::move(params), o, false) {}

AdamW::AdamW(std::vector<Tensor> params, AdamWOptions o)
    : Adam(std::move(params),
           AdamOptions{.lr = o.lr, .beta1 = o.beta1, .beta2 = o.beta2, .eps = o.eps, .weight_decay = o.weight_decay,
                       .amsgrad = o.amsgrad, .in_backward = o.in_backward},
           true) {}

void Adam::update(std::size_t i, const Tensor& g) {
  const AdamOptions& o = options_;
  const Tensor& p = params_[i];
  const auto t = static_cast<double>(++steps_[i]);
  const double bc1 = 1.0 - std::pow(o.beta1, t), bc2 = 1.0 - std::pow(o.beta2, t);
  Tensor& m = slot(i, 0);
  Tensor& v = slot(i, 1);
  dispatch_float(p.dtype(), name(), [&]<class T>() {
    auto c = [](double x) { return static_cast<T>(x); };
    T* vmax = o.amsgrad ? slot(i, 2).data<T>() : nullptr;
    const T step_size = c(lr_ / bc1), bc2_sqrt = c(std::sqrt(bc2)), l2 = decoupled_ ? T(0) : c(o.weight_decay);
    const T decay = c(decoupled_ ? 1.0 - lr_ * o.weight_decay : 1.0);
    if (o.amsgrad)
      for_lanes<T>(p.numel(), AdamLoop<T, true>{p.data<T>(), g.data<T>(), m.data<T>(), v.data<T>(), vmax,
                                                step_size, bc2_sqrt, c(o.beta1), c(o.beta2), c(1.0 - o.beta1),
                                                c(1.0 - o.beta2), c(o.eps), l2, decay});
    else
      for_lanes<T>(p.numel(), AdamLoop<T, false>{p.data<T>(), g.data<T>(), m.data<T>(), v.data<T>(), nullptr,
                                                 step_size, bc2_sqrt, c(o.beta1), c(o.beta2), c(1.0 - o.beta1),
                                                 c(1.0 - o.beta2), c(o.eps), l2, decay});
  });
}

// ---------------------------------------------------------------- RMSprop
RMSprop::RMSprop(std::vector<Tensor> params, RMSpropOptions o)
    : Optimizer(std::move(params), o.lr, "RMSprop", rmsprop_slots(o), /*counts_steps=*/true), options_(o) {
  CG_CHECK(o.alpha >= 0.0 && o.alpha <= 1.0, ValueError, "RMSprop: alpha must be in [0, 1]; got ", o.alpha);
  CG_CHECK(o.eps >= 0.0 && o.weight_decay >= 0.0 && o.momentum >= 0.0, ValueError,
           "RMSprop: eps, weight_decay and momentum must be non-negative; got eps=", o.eps,
           ", weight_decay=", o.weight_decay, ", momentum=", o.momentum);
  set_in_backward(o.in_backward);
}

void RMSprop::update(std::size_t i, const Tensor& g) {
  const RMSpropOptions& o = options_;
  const bool momentum = o.momentum > 0.0, centered = o.centered;
  // Slot indices follow rmsprop_slots: square_avg, [momentum_buffer], [grad_avg].
  const std::size_t k_buf = 1, k_avg = momentum ? 2 : 1;
  const Tensor& p = params_[i];
  ++steps_[i];
  dispatch_float(p.dtype(), "RMSprop", [&]<class T>() {
    auto c = [](double x) { return static_cast<T>(x); };
    T* sq = slot(i, 0).data<T>();
    T* avg = centered ? slot(i, k_avg).data<T>() : nullptr;
    T* buf = momentum ? slot(i, k_buf).data<T>() : nullptr;
    const std::int64_t n = p.numel();
    auto run = [&]<bool kCentered, bool kMomentum>() {
      for_lanes<T>(n, RMSpropLoop<T, kCentered, kMomentum>{p.data<T>(), g.data<T>(), sq, avg, buf, c(lr_),
                                                           c(o.alpha), c(1.0 - o.alpha), c(o.eps),
                                                           c(o.weight_decay), c(o.momentum)});
    };
    if (centered && momentum)
      run.template operator()<true, true>();
    else if (centered)
      run.template operator()<true, false>();
    else if (momentum)
      run.template operator()<false, true>();
    else
      run.template operator()<false, false>();
  });
}

}  // namespace chaingrad::optim
