#include "gradcheck.hpp"

#include <cmath>
#include <sstream>

namespace chaingrad::testing {

double& element(const Tensor& t, std::int64_t k) {
  std::int64_t off = t.offset();
  for (int d = t.dim() - 1; d >= 0; --d) {
    off += (k % t.shape()[d]) * t.strides()[d];
    k /= t.shape()[d];
  }
  return static_cast<double*>(t.storage()->data())[off];
}

namespace {

std::vector<Tensor> differentiable(const std::vector<Tensor>& inputs) {
  std::vector<Tensor> out;
  for (const Tensor& t : inputs)
    if (t.defined() && t.requires_grad()) out.push_back(t);
  return out;
}

Tensor random_like(const Tensor& t, Generator& g) {
  return uniform(t.shape(), -1.0, 1.0, {.dtype = DType::Float64}, &g);
}

double dot(const Tensor& a, const Tensor& b) {
  NoGradGuard ng;
  return sum(mul(a, b)).item();
}

}  // namespace

std::string compare_with_finite_differences(const std::function<double()>& scalar, const std::vector<Tensor>& wrt,
                                            const std::vector<Tensor>& analytic, const GradcheckOptions& opt,
                                            const char* what) {
  for (std::size_t i = 0; i < wrt.size(); ++i) {
    const Tensor& x = wrt[i];
    for (std::int64_t k = 0; k < x.numel(); ++k) {
      double& v = element(x, k);
      const double orig = v;
      v = orig + opt.eps;
      const double plus = scalar();
      v = orig - opt.eps;
      const double minus = scalar();
      v = orig;
      const double numeric = (plus - minus) / (2 * opt.eps);
      const double a = analytic[i].defined() ? element(analytic[i].contiguous(), k) : 0.0;
      if (!(std::abs(a - numeric) <= opt.atol + opt.rtol * std::abs(numeric))) {
        std::ostringstream os;
        os << what << " mismatch for input " << i << " (shape " << x.shape() << ") element " << k
           << ": autograd " << a << ", finite difference " << numeric << ", difference " << a - numeric;
        return os.str();
      }
    }
  }
  return "";
}

std::string gradcheck(const OpFn& f, const std::vector<Tensor>& inputs, GradcheckOptions opt) {
  const std::vector<Tensor> wrt = differentiable(inputs);
  Generator gen(opt.seed);
  Tensor y = f(inputs);
  if (!y.requires_grad()) return wrt.empty() ? "" : "output does not require grad although inputs do";
  const Tensor r = random_like(y, gen);
  const Tensor s = sum(mul(y, r));
  std::vector<Tensor> analytic = autograd::grad({s}, wrt, {}, false, false, /*allow_unused=*/true);
  for (std::size_t i = 0; i < wrt.size(); ++i) {
    if (analytic[i].defined() && !(analytic[i].shape() == wrt[i].shape()))
      return "gradient shape " + to_string(analytic[i].shape()) + " differs from input shape " +
             to_string(wrt[i].shape());
    if (analytic[i].defined() && analytic[i].dtype() != wrt[i].dtype()) return "gradient dtype differs from input's";
  }
  auto scalar = [&] {
    NoGradGuard ng;
    return dot(f(inputs), r);
  };
  return compare_with_finite_differences(scalar, wrt, analytic, opt, "gradient");
}

std::string gradgradcheck(const OpFn& f, const std::vector<Tensor>& inputs, GradcheckOptions opt) {
  const std::vector<Tensor> wrt = differentiable(inputs);
  if (wrt.empty()) return "";
  Generator gen(opt.seed + 1);
  Tensor r;
  std::vector<Tensor> v;
  // G(x) = sum_i <d/dx_i sum(f(x) r), v_i>, built with create_graph so it can be differentiated.
  auto G = [&](bool build_graph) -> Tensor {
    Tensor y = f(inputs);
    if (!r.defined()) {
      r = random_like(y, gen);
      for (const Tensor& x : wrt) v.push_back(random_like(x, gen));
    }
    std::vector<Tensor> g = autograd::grad({sum(mul(y, r))}, wrt, {}, build_graph, build_graph, true);
    Tensor total = zeros({}, {.dtype = DType::Float64});
    for (std::size_t i = 0; i < g.size(); ++i)
      if (g[i].defined()) total = add(total, sum(mul(g[i], v[i])));
    return total;
  };
  Tensor g = G(true);
  std::vector<Tensor> analytic(wrt.size());
  if (g.requires_grad()) analytic = autograd::grad({g}, wrt, {}, false, false, true);
  auto scalar = [&] { return G(false).item(); };
  return compare_with_finite_differences(scalar, wrt, analytic, opt, "second-order gradient");
}

}  // namespace chaingrad::testing
