// The engine against hand-derived chain-rule products: the seed network, fan-out, a 2-3-2
// network element by element, plus the engine's contracts (retain_graph, hooks, no_grad,
// create_graph, version counter, deep graphs).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#include "chaingrad/chaingrad.hpp"
#include "gradcheck.hpp"

namespace cg = chaingrad;
using cg::Tensor;

namespace {
double sig(double v) { return 1.0 / (1.0 + std::exp(-v)); }
double dsig(double v) { return sig(v) * (1.0 - sig(v)); }
Tensor s(double v, bool rg = false) { return cg::scalar(v, {.dtype = cg::DType::Float64, .requires_grad = rg}); }
}  // namespace

// z1 = w1 x + b1, h = σ(z1), z2 = w2 h + b2, y = σ(z2), L = (y - t)^2
TEST(SeedNetwork, GradientsEqualHandDerivedProducts) {
  const double xv = 0.5, w1v = 0.3, b1v = -0.1, w2v = 0.8, b2v = 0.2, tv = 1.0;
  Tensor x = s(xv, true), w1 = s(w1v, true), b1 = s(b1v, true), w2 = s(w2v, true), b2 = s(b2v, true), t = s(tv);
  Tensor z1 = w1 * x + b1, h = cg::sigmoid(z1), z2 = w2 * h + b2, y = cg::sigmoid(z2), L = cg::pow(y - t, 2);
  L.backward();
  const double Z1 = w1v * xv + b1v, H = sig(Z1), Z2 = w2v * H + b2v, Y = sig(Z2);
  const double dL_dy = 2 * (Y - tv), dy_dz2 = dsig(Z2), dz2_dh = w2v, dh_dz1 = dsig(Z1);
  EXPECT_NEAR(L.item(), (Y - tv) * (Y - tv), 1e-15);
  EXPECT_NEAR(w1.grad().item(), dL_dy * dy_dz2 * dz2_dh * dh_dz1 * xv, 1e-12);
  EXPECT_NEAR(b1.grad().item(), dL_dy * dy_dz2 * dz2_dh * dh_dz1 * 1.0, 1e-12);
  EXPECT_NEAR(w2.grad().item(), dL_dy * dy_dz2 * H, 1e-12);
  EXPECT_NEAR(b2.grad().item(), dL_dy * dy_dz2, 1e-12);
  EXPECT_NEAR(x.grad().item(), dL_dy * dy_dz2 * dz2_dh * dh_dz1 * w1v, 1e-12);
}

// L = a*b + sin(a): a fans out, so dL/da = b + cos(a), the sum of both paths' products.
TEST(FanOut, SumsBothPaths) {
  Tensor a = s(0.7, true), b = s(-1.3, true);
  Tensor L = a * b + cg::sin(a);
  L.backward();
  EXPECT_NEAR(a.grad().item(), -1.3 + std::cos(0.7), 1e-15);
  EXPECT_NEAR(b.grad().item(), 0.7, 1e-15);
}

TEST(FanOut, SameTensorTwiceInOneOp) {
  Tensor a = s(3.0, true);
  Tensor L = a * a + a;  // 2a + 1
  L.backward();
  EXPECT_DOUBLE_EQ(a.grad().item(), 7.0);
}

// A 2-3-2 sigmoid network with MSE loss, every weight's gradient against the hand-derived sum
// over the paths through the three hidden neurons.
TEST(MultiNeuron, TwoThreeTwoElementByElement) {
  const double X[2] = {0.4, -0.7}, T[2] = {1.0, 0.0};
  const double W1[3][2] = {{0.1, -0.2}, {0.4, 0.3}, {-0.5, 0.6}}, B1[3] = {0.01, -0.02, 0.03};
  const double W2[2][3] = {{0.7, -0.1, 0.2}, {-0.3, 0.5, 0.9}}, B2[2] = {-0.05, 0.04};
  Tensor x = cg::tensor({X[0], X[1]});
  Tensor w1 = cg::tensor({{W1[0][0], W1[0][1]}, {W1[1][0], W1[1][1]}, {W1[2][0], W1[2][1]}}, true);
  Tensor b1 = cg::tensor({B1[0], B1[1], B1[2]}, true);
  Tensor w2 = cg::tensor({{W2[0][0], W2[0][1], W2[0][2]}, {W2[1][0], W2[1][1], W2[1][2]}}, true);
  Tensor b2 = cg::tensor({B2[0], B2[1]}, true);
  Tensor t = cg::tensor({T[0], T[1]});
  Tensor h = cg::sigmoid(cg::linear(x, w1, b1));
  Tensor y = cg::sigmoid(cg::linear(h, w2, b2));
  Tensor L = cg::sum(cg::square(y - t));
  L.backward();

  double z1[3], hv[3], z2[2], yv[2], delta2[2], delta1[3];
  for (int j = 0; j < 3; ++j) {
    z1[j] = W1[j][0] * X[0] + W1[j][1] * X[1] + B1[j];
    hv[j] = sig(z1[j]);
  }
  for (int k = 0; k < 2; ++k) {
    z2[k] = B2[k];
    for (int j = 0; j < 3; ++j) z2[k] += W2[k][j] * hv[j];
    yv[k] = sig(z2[k]);
    delta2[k] = 2 * (yv[k] - T[k]) * dsig(z2[k]);  // dL/dz2_k
  }
  for (int j = 0; j < 3; ++j) {
    delta1[j] = 0;  // sum over the two output paths
    for (int k = 0; k < 2; ++k) delta1[j] += delta2[k] * W2[k][j];
    delta1[j] *= dsig(z1[j]);
  }
  for (int k = 0; k < 2; ++k) {
    EXPECT_NEAR(b2.grad().at({k}), delta2[k], 1e-14);
    for (int j = 0; j < 3; ++j) EXPECT_NEAR(w2.grad().at({k, j}), delta2[k] * hv[j], 1e-14);
  }
  for (int j = 0; j < 3; ++j) {
    EXPECT_NEAR(b1.grad().at({j}), delta1[j], 1e-14);
    for (int i = 0; i < 2; ++i) EXPECT_NEAR(w1.grad().at({j, i}), delta1[j] * X[i], 1e-14);
  }
}

TEST(Engine, DeepChainDoesNotOverflowTheStack) {
  Tensor x = s(1.0, true);
  Tensor y = x;
  for (int i = 0; i < 100000; ++i) y = y * 1.0000001 + 0.0;
  y.backward();
  EXPECT_NEAR(x.grad().item(), std::pow(1.0000001, 100000), 1e-9);
  y = Tensor();  // tearing the 200,000-node graph down must not recurse either
}

TEST(Engine, GradientsAccumulateAcrossBackwardCalls) {
  Tensor a = s(2.0, true);
  (a * 3.0).backward();
  (a * 4.0).backward();
  EXPECT_DOUBLE_EQ(a.grad().item(), 7.0);
  a.zero_grad();
  EXPECT_FALSE(a.grad().defined());
}

TEST(Engine, SecondBackwardThroughFreedGraphIsAnError) {
  Tensor a = s(2.0, true);
  Tensor L = cg::exp(a);
  L.backward();
  try {
    L.backward();
    FAIL() << "expected an error";
  } catch (const cg::AutogradError& e) {
    EXPECT_NE(std::string(e.what()).find("second time"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("exp"), std::string::npos) << e.what();
  }
}

TEST(Engine, RetainGraphAllowsASecondBackward) {
  Tensor a = s(2.0, true);
  Tensor L = cg::exp(a);
  L.backward({}, /*retain_graph=*/true);
  L.backward();
  EXPECT_NEAR(a.grad().item(), 2 * std::exp(2.0), 1e-12);
}

TEST(Engine, NoGradRecordsNothing) {
  Tensor a = s(2.0, true);
  cg::NoGradGuard guard;
  Tensor b = a * a;
  EXPECT_FALSE(b.requires_grad());
  EXPECT_EQ(b.grad_fn(), nullptr);
}

TEST(Engine, DetachCutsTheGraph) {
  Tensor a = s(2.0, true);
  Tensor L = a * a.detach();
  L.backward();
  EXPECT_DOUBLE_EQ(a.grad().item(), 2.0);
}

TEST(Engine, RequiresGradPropagates) {
  Tensor a = s(1.0, true), c = s(2.0);
  EXPECT_TRUE((a + c).requires_grad());
  EXPECT_FALSE((c * c).requires_grad());
  EXPECT_TRUE((a + c).grad_fn() != nullptr);
  EXPECT_TRUE(a.is_leaf());
  EXPECT_FALSE((a + c).is_leaf());
}

TEST(Engine, BackwardOnNonScalarNeedsGradOutput) {
  Tensor a = cg::tensor({1.0, 2.0}, true);
  Tensor y = a * 3.0;
  EXPECT_THROW(y.backward(), cg::ValueError);
  y.backward(cg::tensor({1.0, -1.0}));
  EXPECT_DOUBLE_EQ(a.grad().at({0}), 3.0);
  EXPECT_DOUBLE_EQ(a.grad().at({1}), -3.0);
}

TEST(Engine, BackwardWithoutGradIsAClearError) {
  Tensor a = s(1.0);
  EXPECT_THROW((a * 2.0).backward(), cg::AutogradError);
}

TEST(Engine, HessianVectorProductWithCreateGraph) {
  // f(x) = sum(x^3): grad = 3x^2, Hessian = diag(6x), Hv = 6 x v
  Tensor x = cg::tensor({1.0, -2.0, 0.5}, true);
  Tensor v = cg::tensor({0.3, 0.1, -1.0});
  Tensor f = cg::sum(cg::pow(x, 3.0));
  auto g = cg::autograd::grad({f}, {x}, {}, true, /*create_graph=*/true);
  ASSERT_TRUE(g[0].requires_grad());
  auto hv = cg::autograd::grad({cg::sum(g[0] * v)}, {x});
  EXPECT_NEAR(hv[0].at({0}), 6 * 1.0 * 0.3, 1e-12);
  EXPECT_NEAR(hv[0].at({1}), 6 * -2.0 * 0.1, 1e-12);
  EXPECT_NEAR(hv[0].at({2}), 6 * 0.5 * -1.0, 1e-12);
}

TEST(Engine, ThirdDerivativeOfSigmoid) {
  Tensor x = s(0.3, true);
  Tensor y = cg::sigmoid(x);
  auto d1 = cg::autograd::grad({y}, {x}, {}, true, true);
  auto d2 = cg::autograd::grad({d1[0]}, {x}, {}, true, true);
  auto d3 = cg::autograd::grad({d2[0]}, {x});
  const double sv = sig(0.3);
  EXPECT_NEAR(d1[0].item(), sv * (1 - sv), 1e-14);
  EXPECT_NEAR(d2[0].item(), sv * (1 - sv) * (1 - 2 * sv), 1e-14);
  EXPECT_NEAR(d3[0].item(), sv * (1 - sv) * (1 - 6 * sv + 6 * sv * sv), 1e-13);
}

TEST(Engine, GradDoesNotTouchDotGrad) {
  Tensor a = s(2.0, true), b = s(5.0, true);
  auto g = cg::autograd::grad({a * b}, {a});
  EXPECT_DOUBLE_EQ(g[0].item(), 5.0);
  EXPECT_FALSE(a.grad().defined());
  EXPECT_FALSE(b.grad().defined());
}

TEST(Engine, GradOfUnusedInput) {
  Tensor a = s(2.0, true), b = s(5.0, true);
  EXPECT_THROW(cg::autograd::grad({a * 2.0}, {b}), cg::AutogradError);
  auto g = cg::autograd::grad({a * 2.0}, {b}, {}, false, false, /*allow_unused=*/true);
  EXPECT_FALSE(g[0].defined());
}

TEST(Engine, GradWithRespectToIntermediate) {
  Tensor a = s(2.0, true);
  Tensor m = a * 3.0;
  Tensor L = m * m;
  auto g = cg::autograd::grad({L}, {m, a});
  EXPECT_DOUBLE_EQ(g[0].item(), 12.0);
  EXPECT_DOUBLE_EQ(g[1].item(), 36.0);
}

TEST(Hooks, LeafHookSeesAndReplacesGradient) {
  Tensor a = s(2.0, true);
  double seen = 0;
  a.register_hook([&](const Tensor& g) {
    seen = g.item();
    return g * 10.0;
  });
  (a * 3.0).backward();
  EXPECT_DOUBLE_EQ(seen, 3.0);
  EXPECT_DOUBLE_EQ(a.grad().item(), 30.0);
}

TEST(Hooks, NonLeafHookAndRetainGrad) {
  Tensor a = s(2.0, true);
  Tensor m = a * 3.0;
  m.retain_grad();
  double seen = 0;
  m.register_hook([&](const Tensor& g) {
    seen = g.item();
    return Tensor();
  });
  (m * m).backward();
  EXPECT_DOUBLE_EQ(seen, 12.0);
  EXPECT_DOUBLE_EQ(m.grad().item(), 12.0);
  EXPECT_DOUBLE_EQ(a.grad().item(), 36.0);
}

TEST(VersionCounter, InPlaceChangeOfSavedTensorIsAnError) {
  Tensor a = cg::tensor({1.0, 2.0}, true);
  Tensor b = cg::tensor({3.0, 4.0});
  Tensor y = cg::sum(a * b);
  b.add_(cg::tensor({1.0, 1.0}));
  try {
    y.backward();
    FAIL() << "expected an error";
  } catch (const cg::AutogradError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("mul"), std::string::npos) << m;
    EXPECT_NE(m.find("in-place"), std::string::npos) << m;
  }
}

TEST(VersionCounter, InPlaceOnLeafRequiringGradIsRefused) {
  Tensor a = cg::tensor({1.0, 2.0}, true);
  EXPECT_THROW(a.add_(cg::tensor({1.0, 1.0})), cg::AutogradError);
  cg::NoGradGuard ng;
  a.add_(cg::tensor({1.0, 1.0}));
  EXPECT_DOUBLE_EQ(a.at({1}), 3.0);
}

TEST(Broadcast, GradientSummedBackToInputShape) {
  Tensor a = cg::ones({2, 3}, {.dtype = cg::DType::Float64, .requires_grad = true});
  Tensor b = cg::tensor({1.0, 2.0, 3.0}, true);
  cg::sum(a * b).backward();
  ASSERT_EQ(b.grad().shape(), (cg::Dims{3}));
  EXPECT_DOUBLE_EQ(b.grad().at({0}), 2.0);
  EXPECT_DOUBLE_EQ(a.grad().at({1, 2}), 3.0);
}

TEST(Broadcast, MixedDtypesPromoteAndGradientsKeepTheirDtype) {
  Tensor a = cg::ones({2}, {.dtype = cg::DType::Float32, .requires_grad = true});
  Tensor b = cg::ones({2}, {.dtype = cg::DType::Float64, .requires_grad = true});
  Tensor y = a * b;
  EXPECT_EQ(y.dtype(), cg::DType::Float64);
  cg::sum(y).backward();
  EXPECT_EQ(a.grad().dtype(), cg::DType::Float32);
  EXPECT_EQ(b.grad().dtype(), cg::DType::Float64);
}

TEST(ShapeErrors, MessagesNameTheOpAndBothShapes) {
  Tensor a = cg::zeros({64, 784}), b = cg::zeros({256, 10});
  try {
    cg::matmul(a, b);
    FAIL();
  } catch (const cg::ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("matmul: shapes [64, 784] and [256, 10] cannot be multiplied"),
              std::string::npos)
        << e.what();
  }
  try {
    cg::add(cg::zeros({2, 3}), cg::zeros({4}));
    FAIL();
  } catch (const cg::ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("add: shapes [2, 3] and [4] cannot be broadcast"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(cg::mm(cg::zeros({2, 3}), cg::zeros({2, 3})), cg::ShapeError);
  EXPECT_THROW(cg::reshape(cg::zeros({2, 3}), {4}), cg::ShapeError);
  EXPECT_THROW(cg::cross_entropy(cg::zeros({2, 3}), cg::from_vector(std::vector<std::int64_t>{0, 3}, {2})),
               cg::ValueError);
}

TEST(Anomaly, NonFiniteForwardNamesTheOp) {
  cg::DetectAnomalyGuard guard;
  Tensor a = cg::tensor({-1.0, 1.0}, true);
  try {
    cg::log(a);
    FAIL();
  } catch (const cg::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("log"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("[2]"), std::string::npos) << e.what();
  }
}

TEST(Numerics, StableAtExtremes) {
  Tensor x = cg::tensor({-1000.0, 1000.0}, false, cg::DType::Float32);
  EXPECT_TRUE(cg::isfinite_all(cg::sigmoid(x)));
  EXPECT_TRUE(cg::isfinite_all(cg::softplus(x)));
  EXPECT_FLOAT_EQ(static_cast<float>(cg::softplus(x).at({1})), 1000.0f);
  Tensor logits = cg::reshape(x, {1, 2});
  EXPECT_TRUE(cg::isfinite_all(cg::log_softmax(logits, 1)));
  EXPECT_FLOAT_EQ(static_cast<float>(cg::logsumexp(logits, 1).item()), 1000.0f);
  auto label = cg::from_vector(std::vector<std::int64_t>{0}, {1});
  EXPECT_NEAR(cg::cross_entropy(logits, label).item(), 2000.0, 1e-3);
  EXPECT_NEAR(cg::bce_with_logits(x, cg::tensor({1.0, 0.0}, false, cg::DType::Float32)).item(), 1000.0, 1e-3);
  EXPECT_DOUBLE_EQ(cg::var(cg::full({5}, 3.0)).item(), 0.0);
}

TEST(Numerics, PowWithTensorExponentAtZeroBase) {
  // d(x^e)/de = x^e log x is taken as 0 at x = 0 (x^e is constant in e there for e > 0).
  Tensor x = s(0.0, true), e = s(2.0, true);
  cg::pow(x, e).backward();
  EXPECT_DOUBLE_EQ(e.grad().item(), 0.0);
  EXPECT_DOUBLE_EQ(x.grad().item(), 0.0);
}

// ---- the scalar fast paths (pooled objects, inline storage, fused backward, stolen gradients)

// The seed network on float32 0-d tensors, the scalar benchmark's workload: every step after the
// first reuses pooled tensor heads, storages and nodes, and must give the same gradients.
TEST(ScalarFastPath, RepeatedStepsGiveTheSameGradients) {
  const cg::TensorOptions rg{.dtype = cg::DType::Float32, .requires_grad = true};
  Tensor w1 = cg::scalar(0.5, rg), b1 = cg::scalar(0.1, rg), w2 = cg::scalar(-0.3, rg), b2 = cg::scalar(0.2, rg);
  const Tensor x = cg::scalar(1.5, {.dtype = cg::DType::Float32}), t = cg::scalar(0.8, {.dtype = cg::DType::Float32});
  const double Z1 = 0.5 * 1.5 + 0.1, H = sig(Z1), Z2 = -0.3 * H + 0.2, Y = sig(Z2);
  const double d = 2 * (Y - 0.8) * dsig(Z2);
  for (int step = 0; step < 5; ++step) {
    Tensor L = cg::pow(cg::sigmoid(w2 * cg::sigmoid(w1 * x + b1) + b2) - t, 2.0);
    L.backward();
    EXPECT_NEAR(w1.grad().item(), d * -0.3 * dsig(Z1) * 1.5, 1e-6);
    EXPECT_NEAR(b1.grad().item(), d * -0.3 * dsig(Z1), 1e-6);
    EXPECT_NEAR(w2.grad().item(), d * H, 1e-6);
    EXPECT_NEAR(b2.grad().item(), d, 1e-6);
    EXPECT_EQ(w1.grad().dtype(), cg::DType::Float32);
    for (Tensor* p : {&w1, &b1, &w2, &b2}) p->zero_grad();
  }
}

// add's backward hands the same gradient to both inputs: each leaf must get its own buffer.
TEST(ScalarFastPath, SharedGradientIsNotAliasedIntoTwoLeaves) {
  Tensor a = s(1.0, true), b = s(2.0, true);
  (a + b).backward();
  EXPECT_NE(a.grad().storage(), b.grad().storage());
  {
    cg::NoGradGuard ng;
    a.grad().mul_(5.0);
  }
  EXPECT_DOUBLE_EQ(a.grad().item(), 5.0);
  EXPECT_DOUBLE_EQ(b.grad().item(), 1.0);
  // A second backward accumulates in place into the (owned) buffers.
  Tensor c = a * b;
  c.backward();
  EXPECT_DOUBLE_EQ(a.grad().item(), 7.0);
  EXPECT_DOUBLE_EQ(b.grad().item(), 2.0);
}

// Elementwise backwards write over their incoming gradient when nothing else can see it
// (detail::grad_map). A gradient that is still seen elsewhere must come through unchanged: a
// retained .grad, a hook's copy, the caller's grad_output, the other input of an add.
TEST(GradientReuse, SharedGradientsAreNotOverwritten) {
  const std::vector<double> xv{-1.5, 0.25, 2.0};
  auto fresh = [&] { return cg::from_vector(std::span<const double>(xv), cg::Dims{3}, {.dtype = cg::DType::Float64}).requires_grad_(); };
  auto expect_x_grad = [&](const Tensor& x, const std::vector<double>& upstream) {
    const auto g = x.grad().to_vector<double>();
    for (std::size_t i = 0; i < xv.size(); ++i) EXPECT_NEAR(g[i], upstream[i] * dsig(xv[i]), 1e-12) << i;
  };
  {  // retain_grad on the sigmoid's output
    Tensor x = fresh();
    Tensor y = cg::sigmoid(x);
    y.retain_grad();
    cg::sum(y * 3.0).backward();
    EXPECT_EQ(y.grad().to_vector<double>(), (std::vector<double>{3.0, 3.0, 3.0}));
    expect_x_grad(x, {3.0, 3.0, 3.0});
  }
  {  // a hook keeps the gradient it saw
    Tensor x = fresh();
    Tensor y = cg::relu(cg::tanh(x));
    Tensor seen;
    y.register_hook([&](const Tensor& g) {
      seen = g;
      return Tensor();
    });
    cg::sum(y * 2.0).backward();
    EXPECT_EQ(seen.to_vector<double>(), (std::vector<double>{2.0, 2.0, 2.0}));
  }
  {  // the caller's grad_output
    Tensor x = fresh();
    const std::vector<double> gv{1.0, -2.0, 0.5};
    const Tensor go = cg::from_vector(std::span<const double>(gv), cg::Dims{3}, {.dtype = cg::DType::Float64});
    cg::sigmoid(x).backward(go);
    EXPECT_EQ(go.to_vector<double>(), gv);
    expect_x_grad(x, gv);
  }
  {  // add hands one gradient to both inputs; mul's rule may not overwrite it for the other
    Tensor x = fresh(), w = s(0.5, true);
    const Tensor y = cg::sigmoid(x);
    Tensor z = w * y + y;  // y's gradient: w + 1 from two paths; w's: sum(y)
    cg::sum(z).backward();
    expect_x_grad(x, {1.5, 1.5, 1.5});
    double sum_y = 0;
    for (double v : xv) sum_y += sig(v);
    EXPECT_NEAR(w.grad().item(), sum_y, 1e-12);
  }
}

// mul and div keep an input only for the other input's gradient: multiplying by a constant does
// not keep the other factor alive through the graph, and the gradients are unchanged.
TEST(SavedInputs, OnlyWhatAGradientNeedsIsKept) {
  Tensor w = s(0.5, true);
  const Tensor c = s(3.0), d = s(4.0, true);
  Tensor h = w * 2.0;
  Tensor by_constant = cg::mul(h, c), over_constant = cg::div(h, c);
  EXPECT_EQ(h.impl_ptr().use_count(), 1);  // neither node saved h
  Tensor by_variable = cg::mul(h, d);
  EXPECT_EQ(h.impl_ptr().use_count(), 2);  // d's gradient needs h
  (by_constant + over_constant + by_variable).backward();
  EXPECT_DOUBLE_EQ(w.grad().item(), 2.0 * (3.0 + 1.0 / 3.0 + 4.0));
  EXPECT_DOUBLE_EQ(d.grad().item(), 1.0);
}

// pow's backward without create_graph is one fused pass; it must agree with the composed rule
// that create_graph uses, for the special-cased exponents and a general one.
TEST(ScalarFastPath, FusedPowBackwardMatchesComposedRule) {
  for (double p : {2.0, 3.0, 0.5, -1.5, 1.0}) {
    for (cg::DType dt : {cg::DType::Float32, cg::DType::Float64}) {
      Tensor x = cg::tensor({0.7, 1.3, 2.1}, true, dt);
      cg::sum(cg::pow(x, p) * 1.5).backward();  // fused
      Tensor fused = x.grad();
      x.zero_grad();
      cg::sum(cg::pow(x, p) * 1.5).backward({}, false, /*create_graph=*/true);  // composed
      for (std::int64_t i = 0; i < 3; ++i) {
        const double xv = x.at({i});
        EXPECT_NEAR(fused.at({i}), 1.5 * p * std::pow(xv, p - 1.0), dt == cg::DType::Float32 ? 1e-5 : 1e-12)
            << "p=" << p;
        EXPECT_NEAR(fused.at({i}), x.grad().at({i}), dt == cg::DType::Float32 ? 1e-5 : 1e-12) << "p=" << p;
      }
      x.zero_grad();  // .grad from create_graph holds a graph that saved x: break the cycle
    }
  }
}

// Tiny tensors keep their data inside the Storage; bigger ones use the caching allocator. Both
// are aligned for any element type, and views share them.
TEST(ScalarFastPath, InlineAndHeapStorageAcrossTheBoundary) {
  for (std::int64_t n : {0, 1, 3, 4, 5, 8, 64}) {
    Tensor t = cg::arange(0.0, static_cast<double>(n), 1.0, {.dtype = cg::DType::Float64});
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(t.raw_data()) % 16, 0u) << n;
    std::vector<double> v = t.to_vector<double>();
    ASSERT_EQ(static_cast<std::int64_t>(v.size()), n);
    for (std::int64_t i = 0; i < n; ++i) EXPECT_EQ(v[i], static_cast<double>(i));
    if (n >= 2) {
      Tensor view = t.slice(0, 1, n);
      EXPECT_EQ(view.storage(), t.storage());
      EXPECT_EQ(view.at({0}), 1.0);
    }
  }
}

// Ops with more than three inputs spill the node's inline edge list to the heap.
TEST(ScalarFastPath, NodeWithManyInputs) {
  std::vector<Tensor> xs;
  for (int i = 0; i < 7; ++i) xs.push_back(s(i + 1.0, true));
  Tensor L = cg::sum(cg::stack(xs, 0) * cg::stack(xs, 0));
  L.backward();
  for (int i = 0; i < 7; ++i) EXPECT_DOUBLE_EQ(xs[i].grad().item(), 2.0 * (i + 1.0));
}

// Tensors, nodes and their pooled blocks may be made on one thread and freed on another.
TEST(ScalarFastPath, GraphsCrossThreads) {
  Tensor w = s(0.5, true);
  Tensor L;
  std::thread([&] { L = cg::pow(cg::sigmoid(w * 3.0) - 1.0, 2.0); }).join();
  std::thread([&] { L.backward(); }).join();
  const double y = sig(1.5);
  EXPECT_NEAR(w.grad().item(), 2 * (y - 1.0) * dsig(1.5) * 3.0, 1e-12);
  std::thread([&] {
    L = Tensor();
    w.zero_grad();
    for (int i = 0; i < 1000; ++i) (w * 2.0).backward();  // this thread's pool, many blocks
  }).join();
  EXPECT_DOUBLE_EQ(w.grad().item(), 2000.0);
}

// A tensor of at most 32 bytes has its head, storage and data in one block. The block must stay
// while a view, a saved alias or a reassigned head still uses the data, and go with the last of
// them (AddressSanitizer, in CI, reports any use after free here).
TEST(ScalarFastPath, SharedBlockOutlivesItsHead) {
  Tensor view, alias;
  {
    Tensor t = cg::tensor({1.0, 2.0, 3.0});  // 24 bytes: inline
    view = t.slice(0, 1, 3);
    alias = t.detach();
    EXPECT_EQ(t.storage().use_count(), 3);  // (the head's own hold on its block is not a user)
  }
  EXPECT_EQ(view.storage().use_count(), 2);
  EXPECT_EQ(view.at({1}), 3.0);
  alias.fill_(7.0);
  EXPECT_EQ(view.at({0}), 7.0);
  alias = Tensor();
  EXPECT_EQ(view.storage().use_count(), 1);
  EXPECT_EQ(view.to_vector<double>(), (std::vector<double>{7.0, 7.0}));

  // A head whose storage is replaced (Module::to does this) keeps its block until it dies.
  Tensor small = cg::scalar(4.0);
  small.impl()->storage = cg::full({8}, 5.0, {.dtype = cg::DType::Float64}).storage();
  small.impl()->shape = {8};
  small.impl()->strides = {1};
  EXPECT_EQ(small.sum().item(), 40.0);

  // Made on one thread, freed on another.
  std::vector<Tensor> made;
  std::thread([&] {
    for (int i = 0; i < 100; ++i) made.push_back(cg::scalar(i).reshape({1}));
  }).join();
  for (int i = 0; i < 100; ++i) EXPECT_EQ(made[i].item(), i);
  std::thread([&] { made.clear(); }).join();
}

// Graphs refer to leaves without owning them: a graph that outlives its leaf drops the gradient
// for it, and retain_grad on a tensor that is gone does nothing, rather than touching freed memory.
TEST(ScalarFastPath, GraphOutlivesItsTensors) {
  Tensor kept = s(2.0, true);
  Tensor L;
  {
    Tensor gone = s(3.0, true);
    Tensor h = gone * kept;
    h.retain_grad();
    L = h * 2.0;
  }
  L.backward();
  EXPECT_DOUBLE_EQ(kept.grad().item(), 6.0);
}

// Note [one-element graphs]: a graph of one-element values backpropagates numbers. These check
// that path against hand-derived products and against grad() (which always moves tensors), and
// that whatever it cannot serve goes down the tensor path.
namespace {
Tensor f32(double v, bool rg = false) {
  return cg::scalar(v, {.dtype = cg::DType::Float32, .requires_grad = rg});
}
}  // namespace

TEST(OneElementGraph, SeedNetworkInBothDtypesMatchesHandDerivedProducts) {
  for (const cg::DType dt : {cg::DType::Float32, cg::DType::Float64}) {
    auto mk = [&](double v, bool rg) { return cg::scalar(v, {.dtype = dt, .requires_grad = rg}); };
    const double xv = 1.5, w1v = 0.5, b1v = 0.1, w2v = -0.3, b2v = 0.2, tv = 0.8;
    Tensor w1 = mk(w1v, true), b1 = mk(b1v, true), w2 = mk(w2v, true), b2 = mk(b2v, true);
    const Tensor x = mk(xv, false), t = mk(tv, false);
    const std::uint64_t runs = cg::autograd::value_backward_runs();
    cg::pow(cg::sigmoid(w2 * cg::sigmoid(w1 * x + b1) + b2) - t, 2.0).backward();
    EXPECT_EQ(cg::autograd::value_backward_runs(), runs + 1) << "the seed network should run by value";
    const double H = sig(w1v * xv + b1v), Z2 = w2v * H + b2v, Y = sig(Z2);
    const double d_z2 = 2 * (Y - tv) * dsig(Z2), d_z1 = d_z2 * w2v * dsig(w1v * xv + b1v);
    const double tol = dt == cg::DType::Float32 ? 1e-6 : 1e-14;
    EXPECT_NEAR(w2.grad().item(), d_z2 * H, tol);
    EXPECT_NEAR(b2.grad().item(), d_z2, tol);
    EXPECT_NEAR(w1.grad().item(), d_z1 * xv, tol);
    EXPECT_NEAR(b1.grad().item(), d_z1, tol);
    EXPECT_EQ(w1.grad().dtype(), dt);
    EXPECT_TRUE(w1.grad().shape().empty());
    EXPECT_FALSE(w1.grad().requires_grad());
  }
}

// Every op that records partials, in one formula with fan-out: the same gradients as grad().
TEST(OneElementGraph, EveryPartialsOpAgreesWithTheTensorPath) {
  for (const cg::DType dt : {cg::DType::Float32, cg::DType::Float64}) {
    Tensor a = cg::scalar(0.7, {.dtype = dt, .requires_grad = true});
    Tensor b = cg::scalar(1.3, {.dtype = dt, .requires_grad = true});
    auto f = [&] {
      const Tensor u = cg::tanh(cg::sin(a) / b) - cg::cos(cg::log(a)) * cg::exp(-b);
      return cg::relu(u + cg::sqrt(a)) + cg::pow(a - b, 3.0) + cg::sigmoid(a * b);
    };
    const std::vector<Tensor> expected = cg::autograd::grad({f()}, {a, b});
    const std::uint64_t runs = cg::autograd::value_backward_runs();
    f().backward();
    EXPECT_EQ(cg::autograd::value_backward_runs(), runs + 1);
    const double tol = dt == cg::DType::Float32 ? 1e-5 : 1e-13;
    EXPECT_NEAR(a.grad().item(), expected[0].item(), tol);
    EXPECT_NEAR(b.grad().item(), expected[1].item(), tol);
  }
}

TEST(OneElementGraph, GradientsAddIntoAnExistingGradInPlace) {
  Tensor w = s(2.0, true);
  (w * w).backward();
  const Tensor g = w.grad();  // a user's handle on .grad sees later sums, as on the tensor path
  (w * s(3.0)).backward();
  EXPECT_DOUBLE_EQ(g.item(), 7.0);
  EXPECT_DOUBLE_EQ(w.grad().item(), 7.0);
}

// After zero_grad, the next backward may refill the dropped `.grad` tensor, but only when nobody
// can tell: a handle the user kept (or a view of it, or a name put on it) keeps its value.
TEST(OneElementGraph, ADroppedGradIsRefilledOnlyWhenNobodyHoldsIt) {
  Tensor w = s(2.0, true);
  (w * s(3.0)).backward();
  const Tensor kept = w.grad();
  w.zero_grad();
  (w * s(5.0)).backward();
  EXPECT_DOUBLE_EQ(kept.item(), 3.0);
  EXPECT_DOUBLE_EQ(w.grad().item(), 5.0);
  EXPECT_FALSE(w.grad().same(kept));

  const Tensor view = w.grad().reshape({1});
  w.zero_grad();
  (w * s(7.0)).backward();
  EXPECT_DOUBLE_EQ(view.item(), 5.0);
  EXPECT_DOUBLE_EQ(w.grad().item(), 7.0);

  w.grad().set_name("g");
  w.zero_grad();
  (w * s(9.0)).backward();
  EXPECT_DOUBLE_EQ(w.grad().item(), 9.0);
  EXPECT_EQ(w.grad().name(), "");  // a new tensor: nothing carried over

  const cg::TensorImpl* dropped = w.grad().impl();
  w.zero_grad();
  (w * s(4.0)).backward();
  EXPECT_EQ(w.grad().impl(), dropped) << "a .grad nobody holds should be refilled, not remade";
  EXPECT_DOUBLE_EQ(w.grad().item(), 4.0);
  (w * s(1.0)).backward();
  EXPECT_DOUBLE_EQ(w.grad().item(), 5.0);
}

TEST(OneElementGraph, RetainGraphAndSecondBackward) {
  Tensor w = s(0.5, true);
  Tensor L = cg::sigmoid(w) * w;
  L.backward({}, /*retain_graph=*/true);
  L.backward();
  const double d = sig(0.5) + 0.5 * dsig(0.5);
  EXPECT_NEAR(w.grad().item(), 2 * d, 1e-14);
  EXPECT_THROW(L.backward(), cg::AutogradError);  // its saved values were freed
}

TEST(OneElementGraph, HooksObserversAndCreateGraphTakeTheTensorPath) {
  Tensor w = s(3.0, true);
  double seen = 0;
  w.register_hook([&](const Tensor& g) {
    seen = g.item();
    return Tensor();
  });
  const std::uint64_t runs = cg::autograd::value_backward_runs();
  (w * w).backward();
  EXPECT_DOUBLE_EQ(seen, 6.0);
  Tensor v = s(3.0, true);
  Tensor dv = cg::autograd::grad({v * v * v}, {v}, {}, /*retain_graph=*/true, /*create_graph=*/true)[0];
  EXPECT_DOUBLE_EQ(dv.item(), 27.0);
  dv.backward();  // d/dv 3v^2 = 6v: dv's graph is the tensor rules' own
  EXPECT_DOUBLE_EQ(v.grad().item(), 18.0);
  EXPECT_EQ(cg::autograd::value_backward_runs(), runs + 1);  // only dv.backward() ran by value
}

// A node without partials (a reduction) anywhere sends the whole graph down the tensor path.
TEST(OneElementGraph, MixedGraphTakesTheTensorPath) {
  Tensor w = s(2.0, true);
  Tensor v = cg::tensor({1.0, 2.0}, true);
  const std::uint64_t runs = cg::autograd::value_backward_runs();
  (cg::sum(v * v) * w).backward();
  EXPECT_EQ(cg::autograd::value_backward_runs(), runs);
  EXPECT_DOUBLE_EQ(w.grad().item(), 5.0);
  EXPECT_EQ(v.grad().to_vector<double>(), (std::vector<double>{4.0, 8.0}));
}

// The one-element path reads no saved tensor, so a change made after the forward does not touch
// the gradient: it is the derivative at the values the forward saw (the tensor path refuses).
TEST(OneElementGraph, InPlaceChangeAfterForwardKeepsTheForwardsDerivative) {
  Tensor w = s(2.0, true), x = s(3.0);
  Tensor y = w * x;
  x.add_(s(1.0));
  y.backward();
  EXPECT_DOUBLE_EQ(w.grad().item(), 3.0);
}

// Sequence numbers come in per-thread blocks, so a node recorded on a new thread can number above
// the node that consumes it on an older one. The walk on numbers runs nodes by number; it must
// notice and leave the graph to the tensor path, which orders by dependency counts.
TEST(OneElementGraph, InputRecordedOnAnotherThreadWithAHigherNumber) {
  for (int attempt = 0; attempt < 3; ++attempt) {
    // Make sure this thread's block of numbers does not run out between p and q below.
    for (int i = 0; i < 2; ++i) (void)(s(1.0, true) * s(2.0));
    Tensor w = s(0.5, true), v = s(2.0, true);
    Tensor p;
    std::thread([&] { p = cg::sin(w * 3.0); }).join();  // numbered from the new thread's block
    const Tensor q = p * v + p;                          // on this thread: consumers of p
    if (!(q.grad_fn()->sequence_nr() < p.grad_fn()->sequence_nr())) continue;
    Tensor L = cg::sigmoid(q);
    const std::uint64_t runs = cg::autograd::value_backward_runs();
    L.backward();
    EXPECT_EQ(cg::autograd::value_backward_runs(), runs);
    const double P = std::sin(1.5), Q = P * 2.0 + P;
    EXPECT_NEAR(v.grad().item(), dsig(Q) * P, 1e-14);
    EXPECT_NEAR(w.grad().item(), dsig(Q) * 3.0 * std::cos(1.5) * 3.0, 1e-14);
    return;
  }
  GTEST_SKIP() << "could not record a consumer numbered below its input";
}

TEST(OneElementGraph, FloatGradientIsRoundedLikeTheTensorPath) {
  Tensor w = f32(0.1, true);
  Tensor L = w * f32(0.3) + w * f32(0.7);
  const Tensor expected = cg::autograd::grad({L}, {w})[0];
  (w * f32(0.3) + w * f32(0.7)).backward();
  EXPECT_EQ(w.grad().item(), expected.item());  // same float32 products and sum, bit for bit
  // Inexact products summed at fan-in: a fused multiply-add would round once where the tensor path
  // rounds twice (a quarter of these cases differed in the last bit when the engine had FMAs).
  cg::Generator gen(7);
  for (int k = 0; k < 200; ++k) {
    float c[4];
    for (float& v : c) v = static_cast<float>(gen.uniform() * 2 - 1);
    Tensor v = f32(0.37, true);
    auto f = [&] { return (v * f32(c[0])) * f32(c[1]) + (v * f32(c[2])) * f32(c[3]); };
    const double want = cg::autograd::grad({f()}, {v})[0].item();
    f().backward();
    ASSERT_EQ(v.grad().item(), want) << "case " << k;
  }
}
