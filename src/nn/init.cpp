// nn::init: in-place initializers with PyTorch's fan and gain conventions.
#include <cmath>

#include "chaingrad/autograd.hpp"
#include "chaingrad/nn.hpp"

namespace chaingrad::nn::init {

namespace {

// Writes draw(gen) into every element of t in place (see Note [parameter handles]).
template <class Draw>
Tensor fill_with(const Tensor& t, const char* op, Generator* gen, Draw draw) {
  CG_CHECK(t.defined(), ValueError, op, ": tensor is undefined");
  Generator& g = gen ? *gen : default_generator();
  NoGradGuard no_grad;
  if (t.is_contiguous()) {
    dispatch_float(t.dtype(), op, [&]<class T>() {
      T* p = t.data<T>();
      for (std::int64_t i = 0, n = t.numel(); i < n; ++i) p[i] = static_cast<T>(draw(g));
    });
  } else {
    Tensor tmp = empty(t.shape(), DType::Float64);
    double* p = tmp.data<double>();
    for (std::int64_t i = 0, n = tmp.numel(); i < n; ++i) p[i] = draw(g);
    Tensor dst = t;
    dst.copy_(tmp);
  }
  t.bump_version();
  return t;
}

double fan(const Tensor& t, FanMode mode) {
  auto [in, out] = fan_in_and_fan_out(t);
  return static_cast<double>(mode == FanMode::FanIn ? in : out);
}

}  // namespace

double calculate_gain(Nonlinearity nonlinearity, double param) {
  switch (nonlinearity) {
    case Nonlinearity::Linear:
    case Nonlinearity::Sigmoid: return 1.0;
    case Nonlinearity::Tanh: return 5.0 / 3.0;
    case Nonlinearity::ReLU: return std::sqrt(2.0);
    case Nonlinearity::LeakyReLU: return std::sqrt(2.0 / (1.0 + param * param));
  }
  return 1.0;
}

std::pair<std::int64_t, std::int64_t> fan_in_and_fan_out(const Tensor& t) {
  CG_CHECK(t.defined() && t.dim() >= 2, ValueError,
           "init: fan in and fan out need a tensor of at least 2 dimensions; got shape ",
           t.defined() ? to_string(t.shape()) : std::string("(undefined)"));
  std::int64_t receptive = 1;
  for (int d = 2; d < t.dim(); ++d) receptive *= t.shape()[d];
  return {t.shape()[1] * receptive, t.shape()[0] * receptive};
}

Tensor uniform_(const Tensor& t, double lo, double hi, Generator* gen) {
  CG_CHECK(lo <= hi, ValueError, "uniform_: expected lo <= hi; got ", lo, " and ", hi);
  return fill_with(t, "uniform_", gen, [lo, hi](Generator& g) { return lo + (hi - lo) * g.uniform(); });
}

Tensor normal_(const Tensor& t, double mean, double std, Generator* gen) {
  CG_CHECK(std >= 0.0, ValueError, "normal_: expected std >= 0; got ", std);
  return fill_with(t, "normal_", gen, [mean, std](Generator& g) { return mean + std * g.normal(); });
}

Tensor constant_(const Tensor& t, double value) {
  CG_CHECK(t.defined(), ValueError, "constant_: tensor is undefined");
  NoGradGuard no_grad;
  Tensor dst = t;
  dst.fill_(value);
  return t;
}
Tensor zeros_(const Tensor& t) { return constant_(t, 0.0); }
Tensor ones_(const Tensor& t) { return constant_(t, 1.0); }

Tensor kaiming_uniform_(const Tensor& t, KaimingOptions o, Generator* gen) {
  const double f = fan(t, o.mode);
  CG_CHECK(f > 0, ValueError, "kaiming_uniform_: zero fan for a tensor of shape ", t.shape());
  const double bound = calculate_gain(o.nonlinearity, o.a) * std::sqrt(3.0 / f);
  return uniform_(t, -bound, bound, gen);
}

Tensor kaiming_normal_(const Tensor& t, KaimingOptions o, Generator* gen) {
  const double f = fan(t, o.mode);
  CG_CHECK(f > 0, ValueError, "kaiming_normal_: zero fan for a tensor of shape ", t.shape());
  return normal_(t, 0.0, calculate_gain(o.nonlinearity, o.a) / std::sqrt(f), gen);
}

Tensor xavier_uniform_(const Tensor& t, double gain, Generator* gen) {
  auto [in, out] = fan_in_and_fan_out(t);
  CG_CHECK(in + out > 0, ValueError, "xavier_uniform_: zero fan for a tensor of shape ", t.shape());
  const double bound = gain * std::sqrt(6.0 / static_cast<double>(in + out));
  return uniform_(t, -bound, bound, gen);
}

Tensor xavier_normal_(const Tensor& t, double gain, Generator* gen) {
  auto [in, out] = fan_in_and_fan_out(t);
  CG_CHECK(in + out > 0, ValueError, "xavier_normal_: zero fan for a tensor of shape ", t.shape());
  return normal_(t, 0.0, gain * std::sqrt(2.0 / static_cast<double>(in + out)), gen);
}

}  // namespace chaingrad::nn::init
