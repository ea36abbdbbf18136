// Elementwise functions. Each comment gives the definition's derivative; backward rules are
// written with ops so they can be differentiated again (create_graph).
#include <cmath>

#include "kernels/cpu/vector_math.hpp"
#include "ops/common.hpp"

namespace chaingrad {

using detail::record;
using detail::scalar_like;
using detail::unary_map;

namespace {
// A derivative factor that is piecewise constant in x (relu's step, clamp's window): computed
// without a graph, since its own derivative is zero almost everywhere.
template <class F>
Tensor constant_factor(const Tensor& x, F f) {
  return unary_map(x, "factor", f);
}
// float32 goes through the vector math kernels (any layout: a strided input is packed first, so
// the result never depends on the layout); float64 keeps libm's correctly rounded-or-nearly path.
// `vec(x, y, n)` maps a float32 array; `scalar` is the rule for every other dtype.
template <class V, class F>
Tensor vector_unary(const Tensor& x, const char* op, V vec, F scalar) {
  if (!x.defined() || x.dtype() != DType::Float32) return unary_map(x, op, scalar);
  Tensor packed;  // (bound by reference otherwise: a copy of the handle is an atomic increment)
  const Tensor& c = x.is_contiguous() ? x : (packed = x.detach().contiguous());
  Tensor out = empty(c.shape(), DType::Float32);
  const float* px = c.data<float>();
  float* po = out.data<float>();
  kernels::parallel_range(c.numel(), [&](std::int64_t lo, std::int64_t hi) { vec(px + lo, po + lo, hi - lo); });
  return out;
}
// The elementwise backward formulas, shared by the ops and by the rules' no-graph paths.
constexpr auto sigmoid_grad = [](auto g, auto s) { return g * s * (1 - s); };
constexpr auto tanh_grad = [](auto g, auto t) { return g * (1 - t * t); };
constexpr auto relu_grad = [](auto g, auto y) { return y > 0 ? g : decltype(g)(0); };

template <class T>
T stable_sigmoid(T v) {
  if (v >= T(0)) return T(1) / (T(1) + std::exp(-v));
  const T e = std::exp(v);
  return e / (T(1) + e);
}
}  // namespace

// d/dx e^x = e^x
Tensor exp(const Tensor& x) {
  Tensor out = vector_unary(x, "exp", kernels::vexp, [](auto v) { return std::exp(v); });
  if (detail::any_requires_grad({x})) {
    record(
        "exp", {x}, out,
        [so = SavedTensor(out, true)](const Tensor& g, const Node& self) { return GradList{mul(g, so.unpack(self))}; },
        [](auto, auto y) { return std::array{y}; });
  }
  return out;
}

// d/dx log x = 1/x
Tensor log(const Tensor& x) {
  Tensor out = vector_unary(x, "log", kernels::vlog, [](auto v) { return std::log(v); });
  if (detail::any_requires_grad({x})) {
    record(
        "log", {x}, out,
        [sx = SavedTensor(x, false)](const Tensor& g, const Node& self) { return GradList{div(g, sx.unpack(self))}; },
        [](auto v, auto) { return std::array{1 / v}; });
  }
  return out;
}

// d/dx log(1+x) = 1/(1+x)
Tensor log1p(const Tensor& x) {
  Tensor out = vector_unary(x, "log1p", kernels::vlog1p, [](auto v) { return std::log1p(v); });
  if (detail::any_requires_grad({x}))
    record("log1p", {x}, out, [sx = SavedTensor(x, false)](const Tensor& g, const Node& self) {
      return GradList{div(g, sx.unpack(self) + 1.0)};
    });
  return out;
}

// d/dx sqrt x = 1/(2 sqrt x)
Tensor sqrt(const Tensor& x) {
  Tensor out = unary_map(x, "sqrt", [](auto v) { return std::sqrt(v); });
  if (detail::any_requires_grad({x})) {
    record(
        "sqrt", {x}, out,
        [so = SavedTensor(out, true)](const Tensor& g, const Node& self) {
          return GradList{div(g, so.unpack(self) * 2.0)};
        },
        [](auto, auto y) { return std::array{1 / (y * 2)}; });
  }
  return out;
}

// d/dx x^(-1/2) = -1/2 x^(-3/2) = -1/2 rsqrt(x)^3
Tensor rsqrt(const Tensor& x) {
  Tensor out = unary_map(x, "rsqrt", [](auto v) { return decltype(v)(1) / std::sqrt(v); });
  if (detail::any_requires_grad({x}))
    record("rsqrt", {x}, out, [so = SavedTensor(out, true)](const Tensor& g, const Node& self) {
      const Tensor& y = so.unpack(self);
      return GradList{mul(g, mul(square(y), y) * -0.5)};
    });
  return out;
}

// d/dx |x| = sign(x)
Tensor abs(const Tensor& x) {
  Tensor out = unary_map(x, "abs", [](auto v) { return std::abs(v); });
  if (detail::any_requires_grad({x}))
    record("abs", {x}, out, [sx = SavedTensor(x, false)](const Tensor& g, const Node& self) {
      return GradList{mul(g, sign(sx.unpack(self)))};
    });
  return out;
}

// d/dx sin x = cos x
Tensor sin(const Tensor& x) {
  Tensor out = unary_map(x, "sin", [](auto v) { return std::sin(v); });
  if (detail::any_requires_grad({x})) {
    record(
        "sin", {x}, out,
        [sx = SavedTensor(x, false)](const Tensor& g, const Node& self) {
          return GradList{mul(g, cos(sx.unpack(self)))};
        },
        [](auto v, auto) { return std::array{std::cos(v)}; });
  }
  return out;
}

// d/dx cos x = -sin x
Tensor cos(const Tensor& x) {
  Tensor out = unary_map(x, "cos", [](auto v) { return std::cos(v); });
  if (detail::any_requires_grad({x})) {
    record(
        "cos", {x}, out,
        [sx = SavedTensor(x, false)](const Tensor& g, const Node& self) {
          return GradList{neg(mul(g, sin(sx.unpack(self))))};
        },
        [](auto v, auto) { return std::array{-std::sin(v)}; });
  }
  return out;
}

// d/dx tanh x = 1 - tanh(x)^2
Tensor tanh(const Tensor& x) {
  Tensor out = vector_unary(x, "tanh", kernels::vtanh, [](auto v) { return std::tanh(v); });
  if (detail::any_requires_grad({x})) {
    record(
        "tanh", {x}, out,
        [so = SavedTensor(out, true)](Tensor g, const Node& self) {
          const Tensor& y = so.unpack(self);
          if (!GradMode::is_enabled()) return GradList{detail::grad_map(std::move(g), y, "tanh_backward", tanh_grad)};
          return GradList{tanh_backward(g, y)};
        },
        [](auto, auto y) { return std::array{tanh_grad(decltype(y)(1), y)}; });
  }
  return out;
}

// d/dx erf x = 2/sqrt(pi) e^(-x^2)
Tensor erf(const Tensor& x) {
  Tensor out = vector_unary(x, "erf", kernels::verf, [](auto v) { return std::erf(v); });
  if (detail::any_requires_grad({x}))
    record("erf", {x}, out, [sx = SavedTensor(x, false)](const Tensor& g, const Node& self) {
      const Tensor& xv = sx.unpack(self);
      return GradList{mul(g, exp(neg(square(xv))) * (2.0 / std::sqrt(M_PI)))};
    });
  return out;
}

// sigma(x) = 1/(1+e^-x), evaluated without overflow on either side; d/dx sigma = sigma (1 - sigma)
Tensor sigmoid(const Tensor& x) {
  Tensor out = vector_unary(x, "sigmoid", kernels::vsigmoid, [](auto v) { return stable_sigmoid(v); });
  if (!detail::any_requires_grad({x})) return out;
  // One element (a scalar formula): keeping the input costs a reference, where keeping the output
  // costs a detached alias (a new head, Note [saved tensors]); y is then recomputed on the rare
  // tensor-path backward. Differentiating through that sigmoid gives the same second derivatives
  // as through the re-attached output.
  const bool keep_input = out.numel() == 1;
  record(
      "sigmoid", {x}, out,
      [s = SavedTensor(keep_input ? x : out, !keep_input), keep_input](Tensor g, const Node& self) {
        const Tensor& saved = s.unpack(self);
        const Tensor y = keep_input ? sigmoid(saved) : saved;
        if (!GradMode::is_enabled())
          return GradList{detail::grad_map(std::move(g), y, "sigmoid_backward", sigmoid_grad)};
        return GradList{sigmoid_backward(g, y)};
      },
      [](auto, auto y) { return std::array{sigmoid_grad(decltype(y)(1), y)}; });
  return out;
}

// g y (1 - y). d/dg = y (1 - y); d/dy = g (1 - 2y)
Tensor sigmoid_backward(const Tensor& grad_output, const Tensor& y) {
  Tensor out = detail::binary_map(grad_output, y, "sigmoid_backward", sigmoid_grad);
  if (detail::any_requires_grad({grad_output, y}))
    record("sigmoid_backward", {grad_output, y}, out,
           [sg = SavedTensor(grad_output, false), sy = SavedTensor(y, false)](const Tensor& gg, const Node& self) {
             const Tensor& yv = sy.unpack(self);
             return GradList{self.needs_grad(0) ? sigmoid_backward(gg, yv) : Tensor(),
                             self.needs_grad(1) ? mul(mul(gg, sg.unpack(self)), 1.0 - yv * 2.0) : Tensor()};
           });
  return out;
}

// g (1 - y^2). d/dg = 1 - y^2; d/dy = -2 g y
Tensor tanh_backward(const Tensor& grad_output, const Tensor& y) {
  Tensor out = detail::binary_map(grad_output, y, "tanh_backward", tanh_grad);
  if (detail::any_requires_grad({grad_output, y}))
    record("tanh_backward", {grad_output, y}, out,
           [sg = SavedTensor(grad_output, false), sy = SavedTensor(y, false)](const Tensor& gg, const Node& self) {
             const Tensor& yv = sy.unpack(self);
             return GradList{self.needs_grad(0) ? tanh_backward(gg, yv) : Tensor(),
                             self.needs_grad(1) ? mul(mul(gg, sg.unpack(self)), yv * -2.0) : Tensor()};
           });
  return out;
}

// d/dx max(x, 0) = [x > 0]
Tensor relu(const Tensor& x) {
  Tensor out = unary_map(x, "relu", [](auto v) { return v > 0 ? v : decltype(v)(0); });
  if (detail::any_requires_grad({x})) {
    record(
        "relu", {x}, out,
        [so = SavedTensor(out, true)](Tensor g, const Node& self) {
          // The output is positive exactly where the input is, so the mask can come from either.
          const Tensor y = so.unpack(self).detach();
          // No graph to record (no create_graph): one pass, no mask tensor. It is the hot backward of
          // every ReLU network; the composed rule below is the same function, and stays differentiable.
          if (!GradMode::is_enabled()) return GradList{detail::grad_map(std::move(g), y, "relu_backward", relu_grad)};
          const Tensor mask = constant_factor(y, [](auto v) { return decltype(v)(v > 0); });
          return GradList{mul(g, mask)};
        },
        [](auto, auto y) { return std::array{relu_grad(decltype(y)(1), y)}; });
  }
  return out;
}

// d/dx = 1 for x > 0, else negative_slope
Tensor leaky_relu(const Tensor& x, double slope) {
  Tensor out = unary_map(x, "leaky_relu", [slope](auto v) { return v > 0 ? v : static_cast<decltype(v)>(slope) * v; });
  if (detail::any_requires_grad({x}))
    record("leaky_relu", {x}, out, [sx = SavedTensor(x, false), slope](const Tensor& g, const Node& self) {
      const Tensor f = constant_factor(sx.unpack(self).detach(), [slope](auto v) {
        return v > 0 ? decltype(v)(1) : static_cast<decltype(v)>(slope);
      });
      return GradList{mul(g, f)};
    });
  return out;
}

// elu(x) = x for x > 0, alpha (e^x - 1) otherwise; d/dx = 1 or elu(x) + alpha
Tensor elu(const Tensor& x, double alpha) {
  const auto a = static_cast<float>(alpha);
  auto vec = [a](const float* in, float* y, std::int64_t n) {
    kernels::vexpm1(in, y, n);
    for (std::int64_t i = 0; i < n; ++i) y[i] = in[i] > 0 ? in[i] : a * y[i];
  };
  Tensor out = vector_unary(x, "elu", vec, [alpha](auto v) {
    return v > 0 ? v : static_cast<decltype(v)>(alpha) * std::expm1(v);
  });
  if (detail::any_requires_grad({x}))
    record("elu", {x}, out, [sx = SavedTensor(x, false), so = SavedTensor(out, true), alpha](const Tensor& g,
                                                                                                const Node& self) {
      const Tensor positive = constant_factor(sx.unpack(self).detach(), [](auto v) { return decltype(v)(v > 0); });
      return GradList{mul(g, where(positive, scalar_like(g, 1.0), so.unpack(self) + alpha))};
    });
  return out;
}

// gelu(x) = x Phi(x) = x/2 (1 + erf(x/sqrt 2)); d/dx = Phi(x) + x phi(x), with the normal density
// phi(x) = e^(-x^2/2) / sqrt(2 pi). One op rather than five (the composition took 2.8x libtorch's
// time on 1M float32 elements).
namespace {
Tensor gelu_backward(const Tensor& g, const Tensor& x) {
  if (g.dtype() == DType::Float32 && x.dtype() == DType::Float32 && g.shape() == x.shape()) {
    const Tensor gc = g.is_contiguous() ? g : g.detach().contiguous(), xc = x.is_contiguous() ? x : x.detach().contiguous();
    Tensor out = empty(x.shape(), DType::Float32);
    const float *pg = gc.data<float>(), *px = xc.data<float>();
    float* po = out.data<float>();
    kernels::parallel_range(x.numel(), [&](std::int64_t lo, std::int64_t hi) {
      kernels::vgelu_backward(pg + lo, px + lo, po + lo, hi - lo);
    });
    return out;
  }
  return detail::binary_map(g, x, "gelu_backward", [](auto gv, auto v) {
    using T = decltype(v);
    const T cdf = T(0.5) * (T(1) + std::erf(v * static_cast<T>(M_SQRT1_2)));
    const T pdf = std::exp(T(-0.5) * v * v) * static_cast<T>(0.5 * M_2_SQRTPI * M_SQRT1_2);
    return gv * (cdf + v * pdf);
  });
}
}  // namespace

Tensor gelu(const Tensor& x) {
  Tensor out = vector_unary(x, "gelu", kernels::vgelu, [](auto v) {
    using T = decltype(v);
    return T(0.5) * v * (T(1) + std::erf(v * static_cast<T>(M_SQRT1_2)));
  });
  if (detail::any_requires_grad({x}))
    record("gelu", {x}, out, [sx = SavedTensor(x, false)](const Tensor& g, const Node& self) {
      const Tensor& xv = sx.unpack(self);
      if (!GradMode::is_enabled()) return GradList{gelu_backward(g, xv)};  // one fused pass
      // create_graph: the same derivative from differentiable ops
      const Tensor cdf = (erf(xv * M_SQRT1_2) + 1.0) * 0.5;
      const Tensor pdf = exp(square(xv) * -0.5) * (0.5 * M_2_SQRTPI * M_SQRT1_2);
      return GradList{mul(g, cdf + xv * pdf)};
    });
  return out;
}

// softplus(x) = log(1 + e^x) = max(x, 0) + log1p(e^-|x|); d/dx = sigma(x)
Tensor softplus(const Tensor& x) {
  Tensor out = vector_unary(x, "softplus", kernels::vsoftplus, [](auto v) {
    return (v > 0 ? v : decltype(v)(0)) + std::log1p(std::exp(-std::abs(v)));
  });
  if (detail::any_requires_grad({x}))
    record("softplus", {x}, out, [sx = SavedTensor(x, false)](const Tensor& g, const Node& self) {
      return GradList{mul(g, sigmoid(sx.unpack(self)))};
    });
  return out;
}

// d/dx clamp(x, lo, hi) = [lo <= x <= hi]
Tensor clamp(const Tensor& x, std::optional<double> lo, std::optional<double> hi) {
  const double l = lo.value_or(-INFINITY), h = hi.value_or(INFINITY);
  CG_CHECK(!(l > h), ValueError, "clamp: expected lo <= hi; got ", l, " and ", h);
  Tensor out = unary_map(x, "clamp", [l, h](auto v) {
    using T = decltype(v);
    return v < static_cast<T>(l) ? static_cast<T>(l) : (v > static_cast<T>(h) ? static_cast<T>(h) : v);
  });
  if (detail::any_requires_grad({x}))
    record("clamp", {x}, out, [sx = SavedTensor(x, false), l, h](const Tensor& g, const Node& self) {
      const Tensor f = constant_factor(sx.unpack(self).detach(), [l, h](auto v) {
        return static_cast<decltype(v)>(v >= l && v <= h);
      });
      return GradList{mul(g, f)};
    });
  return out;
}

// d/dx x^2 = 2x
Tensor square(const Tensor& x) {
  Tensor out = unary_map(x, "square", [](auto v) { return v * v; });
  if (detail::any_requires_grad({x}))
    record("square", {x}, out, [sx = SavedTensor(x, false)](const Tensor& g, const Node& self) {
      return GradList{mul(g, sx.unpack(self) * 2.0)};
    });
  return out;
}

}  // namespace chaingrad
