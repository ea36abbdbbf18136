// Broadcasting arithmetic. Each backward returns gradients in the broadcast output's shape; the
// engine sums them back to each input's shape.
#include <cmath>

#include "ops/common.hpp"

namespace chaingrad {

using detail::binary_map;
using detail::record;
using detail::scalar_like;

namespace {
constexpr auto times = [](auto x, auto y) { return x * y; };
// An input that only another input's gradient needs is saved only when that input needs one.
SavedTensor save_if(bool needed, const Tensor& t) { return needed ? SavedTensor(t, false) : SavedTensor(); }
}  // namespace

// d(a+b)/da = 1, d(a+b)/db = 1
Tensor add(const Tensor& a, const Tensor& b) {
  Tensor out = binary_map(a, b, "add", [](auto x, auto y) { return x + y; });
  if (detail::any_requires_grad({a, b})) {
    record(
        "add", {a, b}, out,
        [](Tensor g, const Node&) { return GradList{g, std::move(g)}; },
        [](auto x, auto, auto) { return std::array{decltype(x)(1), decltype(x)(1)}; });
  }
  return out;
}

// d(a-b)/da = 1, d(a-b)/db = -1
Tensor sub(const Tensor& a, const Tensor& b) {
  Tensor out = binary_map(a, b, "sub", [](auto x, auto y) { return x - y; });
  if (detail::any_requires_grad({a, b})) {
    record(
        "sub", {a, b}, out,
        [](Tensor g, const Node& self) {
          Tensor gb = self.needs_grad(1) ? neg(g) : Tensor();
          return GradList{std::move(g), std::move(gb)};
        },
        [](auto x, auto, auto) { return std::array{decltype(x)(1), decltype(x)(-1)}; });
  }
  return out;
}

// d(ab)/da = b, d(ab)/db = a
Tensor mul(const Tensor& a, const Tensor& b) {
  Tensor out = binary_map(a, b, "mul", times);
  if (detail::any_requires_grad({a, b})) {
    // Each input is needed only for the other's gradient (w x with a constant x keeps no w).
    record(
        "mul", {a, b}, out,
        [sa = save_if(b.requires_grad(), a), sb = save_if(a.requires_grad(), b)](Tensor g, const Node& self) {
          const bool na = self.needs_grad(0), nb = self.needs_grad(1);
          if (!GradMode::is_enabled()) {  // the last product may be written over g (grad_map)
            Tensor ga =
                na ? (nb ? mul(g, sb.unpack(self)) : detail::grad_map(std::move(g), sb.unpack(self), "mul", times))
                   : Tensor();
            Tensor gb = nb ? detail::grad_map(std::move(g), sa.unpack(self), "mul", times) : Tensor();
            return GradList{std::move(ga), std::move(gb)};
          }
          return GradList{na ? mul(g, sb.unpack(self)) : Tensor(), nb ? mul(g, sa.unpack(self)) : Tensor()};
        },
        [](auto x, auto y, auto) { return std::array{y, x}; });
  }
  return out;
}

// d(a/b)/da = 1/b, d(a/b)/db = -a/b^2
Tensor div(const Tensor& a, const Tensor& b) {
  Tensor out = binary_map(a, b, "div", [](auto x, auto y) { return x / y; });
  if (detail::any_requires_grad({a, b})) {
    record(
        "div", {a, b}, out,
        [sa = save_if(b.requires_grad(), a), sb = SavedTensor(b, false)](const Tensor& g, const Node& self) {
          const Tensor& bv = sb.unpack(self);
          return GradList{self.needs_grad(0) ? div(g, bv) : Tensor(),
                          self.needs_grad(1) ? neg(div(mul(g, sa.unpack(self)), square(bv))) : Tensor()};
        },
        [](auto x, auto y, auto) { return std::array{1 / y, -x / (y * y)}; });
  }
  return out;
}

// d(-x)/dx = -1
Tensor neg(const Tensor& x) {
  Tensor out = detail::unary_map(x, "neg", [](auto v) { return -v; });
  if (detail::any_requires_grad({x})) {
    record(
        "neg", {x}, out, [](const Tensor& g, const Node&) { return GradList{neg(g)}; },
        [](auto v, auto) { return std::array{-decltype(v)(1)}; });
  }
  return out;
}

// d(x^p)/dx = p x^(p-1)
Tensor pow(const Tensor& x, double p) {
  Tensor out;
  if (p == 2.0)
    out = detail::unary_map(x, "pow", [](auto v) { return v * v; });
  else
    out = detail::unary_map(x, "pow", [p](auto v) { return static_cast<decltype(v)>(std::pow(v, p)); });
  if (detail::any_requires_grad({x})) {
    // p x^(p-1) at one element, with the arithmetic of the composed rule below.
    auto derivative = [p](auto v) {
      using T = decltype(v);
      const double q = p - 1.0;
      if (p == 0.0) return T(0);
      if (p == 2.0) return v * T(2);
      return (q == 1.0 ? v : (q == 2.0 ? v * v : static_cast<T>(std::pow(v, q)))) * static_cast<T>(p);
    };
    record(
        "pow", {x}, out,
        [sx = SavedTensor(x, false), p, derivative](Tensor g, const Node& self) {
          const Tensor& xv = sx.unpack(self);
          if (p == 0.0) return GradList{zeros_like(g)};
          if (!GradMode::is_enabled()) {  // no graph to record (no create_graph): one fused pass
            return GradList{detail::grad_map(std::move(g), xv, "pow_backward",
                                             [derivative](auto gv, auto v) { return gv * derivative(v); })};
          }
          const Tensor dx = p == 2.0 ? mul(xv, scalar_like(xv, 2.0)) : mul(pow(xv, p - 1.0), scalar_like(xv, p));
          return GradList{mul(g, dx)};
        },
        [derivative](auto v, auto) { return std::array{derivative(v)}; });
  }
  return out;
}

// d(x^e)/dx = e x^(e-1), d(x^e)/de = x^e log x (taken as 0 at x = 0, where x^e is 0 or 1 for
// every e >= 0, as PyTorch does)
Tensor pow(const Tensor& x, const Tensor& e) {
  Tensor out = binary_map(x, e, "pow", [](auto a, auto b) { return static_cast<decltype(a)>(std::pow(a, b)); });
  if (detail::any_requires_grad({x, e}))
    record("pow", {x, e}, out,
           [sx = SavedTensor(x, false), se = SavedTensor(e, false), so = SavedTensor(out, true)](const Tensor& g,
                                                                                                 const Node& self) {
             const Tensor &xv = sx.unpack(self), &ev = se.unpack(self);
             return GradList{self.needs_grad(0) ? mul(g, mul(ev, pow(xv, sub(ev, scalar_like(ev, 1.0))))) : Tensor(),
                             self.needs_grad(1)
                                 ? mul(g, where(eq(xv, scalar_like(xv, 0.0)), scalar_like(xv, 0.0),
                                                mul(so.unpack(self), log(xv))))
                                 : Tensor()};
           });
  return out;
}

Tensor maximum(const Tensor& a, const Tensor& b) { return where(ge(a, b), a, b); }
Tensor minimum(const Tensor& a, const Tensor& b) { return where(le(a, b), a, b); }

// d/da where(c, a, b) = c, d/db = 1 - c
Tensor where(const Tensor& condition, const Tensor& a, const Tensor& b) {
  CG_CHECK(condition.defined() && a.defined() && b.defined(), ValueError, "where: an input is undefined");
  const Dims shape = broadcast_shapes(broadcast_shapes(condition.shape(), a.shape(), "where"), b.shape(), "where");
  DType dt = promote(a.dtype(), b.dtype());
  if (!is_floating(dt)) dt = DType::Float32;
  auto prep = [&](const Tensor& t) {
    Tensor c = t.dtype() == dt ? t : t.detach().to(dt);
    return detail::make_view(c, shape, Dims(), -1);
  };
  Tensor c = prep(condition), av = prep(a), bv = prep(b);
  Tensor out = empty(shape, dt);
  dispatch_float(dt, "where", [&]<class T>() {
    kernels::map_ternary<T>(c, av, bv, out.data<T>(), [](T cv, T x, T y) { return cv != T(0) ? x : y; });
  });
  if (detail::any_requires_grad({a, b}))
    record("where", {condition, a, b}, out, [sc = SavedTensor(condition, false)](const Tensor& g, const Node& self) {
      const Tensor& cv = sc.unpack(self);
      const Tensor zero = scalar_like(g, 0.0);
      return GradList{Tensor(), self.needs_grad(1) ? where(cv, g, zero) : Tensor(),
                      self.needs_grad(2) ? where(cv, zero, g) : Tensor()};
    });
  return out;
}

// ---- comparisons and sign: piecewise constant, so not differentiable (no node is recorded)
Tensor gt(const Tensor& a, const Tensor& b) {
  return binary_map(a, b, "gt", [](auto x, auto y) { return static_cast<decltype(x)>(x > y); });
}
Tensor lt(const Tensor& a, const Tensor& b) {
  return binary_map(a, b, "lt", [](auto x, auto y) { return static_cast<decltype(x)>(x < y); });
}
Tensor ge(const Tensor& a, const Tensor& b) {
  return binary_map(a, b, "ge", [](auto x, auto y) { return static_cast<decltype(x)>(x >= y); });
}
Tensor le(const Tensor& a, const Tensor& b) {
  return binary_map(a, b, "le", [](auto x, auto y) { return static_cast<decltype(x)>(x <= y); });
}
Tensor eq(const Tensor& a, const Tensor& b) {
  return binary_map(a, b, "eq", [](auto x, auto y) { return static_cast<decltype(x)>(x == y); });
}
Tensor sign(const Tensor& x) {
  return detail::unary_map(x, "sign", [](auto v) { return static_cast<decltype(v)>((v > 0) - (v < 0)); });
}

bool isfinite_all(const Tensor& x) {
  if (!is_floating(x.dtype())) return true;
  return dispatch_float(x.dtype(), "isfinite", [&]<class T>() {
    bool ok = true;
    Tensor c = x.is_contiguous() ? x : x.detach().contiguous();
    const T* p = c.data<T>();
    for (std::int64_t i = 0, n = c.numel(); i < n; ++i) ok &= std::isfinite(p[i]);
    return ok;
  });
}

bool allclose(const Tensor& a, const Tensor& b, double rtol, double atol) {
  if (!(a.shape() == b.shape())) return false;
  const auto va = a.to_vector<double>(), vb = b.to_vector<double>();
  for (std::size_t i = 0; i < va.size(); ++i)
    if (!(std::abs(va[i] - vb[i]) <= atol + rtol * std::abs(vb[i]))) return false;
  return true;
}

// ---- operators
Tensor operator+(const Tensor& a, const Tensor& b) { return add(a, b); }
Tensor operator-(const Tensor& a, const Tensor& b) { return sub(a, b); }
Tensor operator*(const Tensor& a, const Tensor& b) { return mul(a, b); }
Tensor operator/(const Tensor& a, const Tensor& b) { return div(a, b); }
Tensor operator-(const Tensor& x) { return neg(x); }
Tensor operator+(const Tensor& a, double b) { return add(a, scalar_like(a, b)); }
Tensor operator+(double a, const Tensor& b) { return add(scalar_like(b, a), b); }
Tensor operator-(const Tensor& a, double b) { return sub(a, scalar_like(a, b)); }
Tensor operator-(double a, const Tensor& b) { return sub(scalar_like(b, a), b); }
Tensor operator*(const Tensor& a, double b) { return mul(a, scalar_like(a, b)); }
Tensor operator*(double a, const Tensor& b) { return mul(scalar_like(b, a), b); }
Tensor operator/(const Tensor& a, double b) { return div(a, scalar_like(a, b)); }
Tensor operator/(double a, const Tensor& b) { return div(scalar_like(b, a), b); }

}  // namespace chaingrad
