// optim: each optimizer's update against its published formula on hand-worked steps, state
// save/restore, learning-rate schedules, gradient clipping, and convergence on XOR.
#include <gtest/gtest.h>

#include "test_util.hpp"

#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "chaingrad/chaingrad.hpp"
#include "chaingrad/nn.hpp"
#include "chaingrad/optim.hpp"

namespace cg = chaingrad;
namespace nn = chaingrad::nn;
namespace optim = chaingrad::optim;
using cg::DType;
using cg::Tensor;

namespace {

using chaingrad::testing::expect_error;

// A float64 parameter holding `values`.
Tensor param(std::initializer_list<double> values) { return cg::tensor(values, /*requires_grad=*/true); }

void set_grad(Tensor& p, std::initializer_list<double> values) { p.set_grad(cg::tensor(values)); }

}  // namespace

// ---------------------------------------------------------------- SGD
TEST(OptimSGD, PlainStep) {
  Tensor p = param({1.0, -2.0});
  optim::SGD opt({p}, {.lr = 0.1});
  set_grad(p, {0.5, 0.25});
  opt.step();
  // p - lr * g = [1 - 0.05, -2 - 0.025]
  EXPECT_DOUBLE_EQ(p.at({0}), 0.95);
  EXPECT_DOUBLE_EQ(p.at({1}), -2.025);
  EXPECT_TRUE(opt.state().empty());  // no momentum, no state
}

TEST(OptimSGD, MomentumWithWeightDecayTwoSteps) {
  Tensor p = param({1.0});
  optim::SGD opt({p}, {.lr = 0.1, .momentum = 0.9, .weight_decay = 0.1});
  // step 1: g = 0.5 + 0.1 * 1 = 0.6; b = g = 0.6; p = 1 - 0.1 * 0.6 = 0.94
  set_grad(p, {0.5});
  opt.step();
  EXPECT_NEAR(p.item(), 0.94, 1e-12);
  // step 2: g = 0.5 + 0.1 * 0.94 = 0.594; b = 0.9 * 0.6 + 0.594 = 1.134; p = 0.94 - 0.1134 = 0.8266
  set_grad(p, {0.5});
  opt.step();
  EXPECT_NEAR(p.item(), 0.8266, 1e-12);
  const auto st = opt.state();
  ASSERT_EQ(st.size(), 1u);
  EXPECT_EQ(st[0].first, "state.0.momentum_buffer");
  EXPECT_NEAR(st[0].second.item(), 1.134, 1e-12);
}

TEST(OptimSGD, NesterovTwoSteps) {
  Tensor p = param({1.0});
  optim::SGD opt({p}, {.lr = 0.1, .momentum = 0.9, .weight_decay = 0.1, .nesterov = true});
  // step 1: g = 0.6; b = 0.6; d = g + 0.9 b = 1.14; p = 1 - 0.114 = 0.886
  set_grad(p, {0.5});
  opt.step();
  EXPECT_NEAR(p.item(), 0.886, 1e-12);
  // step 2: g = 0.5 + 0.0886 = 0.5886; b = 0.54 + 0.5886 = 1.1286; d = 0.5886 + 1.01574 = 1.60434;
  //         p = 0.886 - 0.160434 = 0.725566
  set_grad(p, {0.5});
  opt.step();
  EXPECT_NEAR(p.item(), 0.725566, 1e-12);
}

TEST(OptimSGD, DampeningSkipsTheFirstStep) {
  Tensor p = param({1.0});
  optim::SGD opt({p}, {.lr = 0.1, .momentum = 0.9, .dampening = 0.5});
  // step 1: b = g = 0.5 (no dampening on the first step); p = 0.95
  // step 2: b = 0.9 * 0.5 + 0.5 * 0.5 = 0.7; p = 0.95 - 0.07 = 0.88
  set_grad(p, {0.5});
  opt.step();
  set_grad(p, {0.5});
  opt.step();
  EXPECT_NEAR(p.item(), 0.88, 1e-12);
}

TEST(OptimSGD, Float32SkipsMissingGradsAndValidates) {
  Tensor a = cg::ones({3}, {.requires_grad = true});
  Tensor b = cg::ones({2}, {.requires_grad = true});
  optim::SGD opt({a, b}, {.lr = 0.5, .momentum = 0.5});
  a.set_grad(cg::full({3}, 2.0));
  opt.step();  // b has no gradient: untouched, no state
  EXPECT_FLOAT_EQ(static_cast<float>(a.at({2})), 0.0f);
  EXPECT_FLOAT_EQ(static_cast<float>(b.at({0})), 1.0f);
  EXPECT_EQ(opt.state().size(), 1u);
  opt.zero_grad();
  EXPECT_FALSE(a.grad().defined());
  expect_error<cg::ValueError>([&] { optim::SGD bad({a}, {.lr = 0.1, .nesterov = true}); },
                               {"Nesterov", "momentum > 0"});
  expect_error<cg::ValueError>([&] { optim::SGD bad({a, a}); }, {"appears more than once"});
  expect_error<cg::ValueError>([&] { optim::SGD bad({cg::ones({2})}); }, {"requires grad"});
  expect_error<cg::ValueError>([&] { optim::SGD bad({a}, {.lr = -1}); }, {"lr must be"});
}

// ---------------------------------------------------------------- steps in backward
namespace {

// A two-layer perceptron and its loss on a batch, in `dtype`; the same seed gives the same weights.
struct TinyMlp {
  cg::Generator gen;
  nn::Linear l1, l2;
  TinyMlp(std::uint64_t seed, DType dtype) : gen(seed), l1(5, 7, true, &gen), l2(7, 3, true, &gen) {
    l1.to(dtype);
    l2.to(dtype);
  }
  std::vector<Tensor> params() { return {l1.weight, l1.bias, l2.weight, l2.bias}; }
  // x: [..., 5]; a 3-D batch runs the linear layers' reshaping path.
  Tensor loss(const Tensor& x) { return cg::sum(cg::square(l2.forward(cg::relu(l1.forward(x))))); }
};

}  // namespace

// The folded step gives the parameters and state that backward + step() give, for every optimizer
// and its variants (SGD's own ways, the others through a scratch gradient), through weight decay
// and a schedule that changes lr every step; the weights are updated by backward itself and get no
// `.grad`.
TEST(OptimInBackward, MatchesTheStepAfterBackward) {
  using Make = std::function<std::unique_ptr<optim::Optimizer>(std::vector<Tensor>, bool)>;
  const std::vector<std::pair<std::string, Make>> settings{
      {"SGD, weight decay",
       [](auto p, bool b) {
         return std::make_unique<optim::SGD>(p, optim::SGDOptions{.lr = 0.1, .weight_decay = 0.01, .in_backward = b});
       }},
      {"SGD, momentum",
       [](auto p, bool b) {
         return std::make_unique<optim::SGD>(p, optim::SGDOptions{.lr = 0.1, .momentum = 0.9, .in_backward = b});
       }},
      {"SGD, momentum, weight decay",
       [](auto p, bool b) {
         return std::make_unique<optim::SGD>(
             p, optim::SGDOptions{.lr = 0.1, .momentum = 0.9, .weight_decay = 0.01, .in_backward = b});
       }},
      {"SGD, momentum, dampening, weight decay",
       [](auto p, bool b) {
         return std::make_unique<optim::SGD>(p, optim::SGDOptions{.lr = 0.1,
                                                                  .momentum = 0.5,
                                                                  .dampening = 0.3,
                                                                  .weight_decay = 0.02,
                                                                  .in_backward = b});
       }},
      {"SGD, Nesterov",
       [](auto p, bool b) {
         return std::make_unique<optim::SGD>(
             p, optim::SGDOptions{.lr = 0.1, .momentum = 0.9, .weight_decay = 0.01, .nesterov = true, .in_backward = b});
       }},
      {"Adam, weight decay",
       [](auto p, bool b) {
         return std::make_unique<optim::Adam>(p, optim::AdamOptions{.lr = 0.01, .weight_decay = 0.01, .in_backward = b});
       }},
      {"AdamW, amsgrad",
       [](auto p, bool b) {
         return std::make_unique<optim::AdamW>(p, optim::AdamWOptions{.lr = 0.01, .amsgrad = true, .in_backward = b});
       }},
      {"RMSprop, centered, momentum",
       [](auto p, bool b) {
         return std::make_unique<optim::RMSprop>(
             p, optim::RMSpropOptions{.lr = 0.01, .momentum = 0.5, .centered = true, .in_backward = b});
       }},
  };
  const int saved = cg::get_num_threads();
  for (const auto& [setting, make] : settings) {
    for (const DType dtype : {DType::Float64, DType::Float32}) {
      for (const int threads : {1, 2}) {
        cg::set_num_threads(threads);
        TinyMlp plain(3, dtype), folded(3, dtype);
        const auto plain_opt = make(plain.params(), false), folded_opt = make(folded.params(), true);
        EXPECT_TRUE(folded_opt->in_backward());
        optim::StepLR plain_sched(*plain_opt, 1, 0.5), folded_sched(*folded_opt, 1, 0.5);
        cg::Generator data(7);
        const double tol = dtype == DType::Float64 ? 1e-12 : 1e-5;
        const std::string where =
            setting + ", " + std::string(cg::dtype_name(dtype)) + ", " + std::to_string(threads) + " threads";
        for (int step = 0; step < 4; ++step) {
          const Tensor x = cg::randn(step % 2 ? cg::Dims{2, 3, 5} : cg::Dims{6, 5}, {.dtype = dtype}, &data);
          const Tensor w1_before = folded.l1.weight.detach().clone();
          for (TinyMlp* m : {&plain, &folded}) {
            optim::Optimizer& opt = m == &plain ? *plain_opt : *folded_opt;
            opt.zero_grad();
            m->loss(x).backward();
          }
          EXPECT_FALSE(folded.l1.weight.grad().defined()) << where;
          EXPECT_FALSE(folded.l2.weight.grad().defined()) << where;
          EXPECT_TRUE(folded.l1.bias.grad().defined());  // (a sum, not a product: step() updates biases)
          EXPECT_FALSE(cg::allclose(folded.l1.weight, w1_before, 0, 0)) << where << ": backward left the weight";
          plain_opt->step();
          folded_opt->step();
          plain_sched.step();
          folded_sched.step();
          const auto expect_near = [&](const std::vector<double>& a, const std::vector<double>& b,
                                       const std::string& what) {
            ASSERT_EQ(a.size(), b.size()) << where << ", " << what;
            for (std::size_t j = 0; j < a.size(); ++j)
              ASSERT_NEAR(b[j], a[j], tol * (1 + std::abs(a[j])))
                  << where << ", step " << step << ", " << what << ", element " << j;
          };
          const auto pp = plain.params(), fp = folded.params();
          for (std::size_t i = 0; i < pp.size(); ++i)
            expect_near(pp[i].to_vector<double>(), fp[i].to_vector<double>(), "parameter " + std::to_string(i));
          const optim::NamedTensors ps = plain_opt->state(), fs = folded_opt->state();
          ASSERT_EQ(ps.size(), fs.size()) << where;
          for (std::size_t i = 0; i < ps.size(); ++i) {
            EXPECT_EQ(ps[i].first, fs[i].first) << where;
            expect_near(ps[i].second.to_vector<double>(), fs[i].second.to_vector<double>(), ps[i].first);
          }
        }
      }
    }
  }
  cg::set_num_threads(saved);
}

// Wherever somebody may look at a weight's gradient, or it does not come from one product alone,
// backward makes it as usual and leaves the weight alone.
TEST(OptimInBackward, MakesTheGradientWhereItIsWanted) {
  cg::Generator gen(5);
  const Tensor x = cg::randn({4, 6}, {}, &gen);
  struct Case {
    const char* name;
    std::function<void(Tensor& w, Tensor& b)> run;  // a backward that must leave w.grad defined
  };
  const std::vector<Case> cases{
      {"the weight used twice", [&](Tensor& w, Tensor& b) { cg::sum(cg::linear(cg::linear(x, w, b), w, b)).backward(); }},
      {"a .grad already there",
       [&](Tensor& w, Tensor& b) {
         w.set_grad(cg::zeros_like(w));
         cg::sum(cg::linear(x, w, b)).backward();
       }},
      {"a hook on the weight",
       [&](Tensor& w, Tensor& b) {
         w.register_hook([](const Tensor& g) { return g; });
         cg::sum(cg::linear(x, w, b)).backward();
       }},
      {"create_graph", [&](Tensor& w, Tensor& b) { cg::sum(cg::linear(x, w, b)).backward({}, false, true); }},
      {"anomaly mode",
       [&](Tensor& w, Tensor& b) {
         cg::DetectAnomalyGuard anomaly;
         cg::sum(cg::linear(x, w, b)).backward();
       }},
      {"grad()",
       [&](Tensor& w, Tensor& b) {
         w.set_grad(cg::autograd::grad({cg::sum(cg::linear(x, w, b))}, {w})[0]);
       }},
  };
  for (const Case& c : cases) {
    Tensor w = cg::randn({6, 6}, {.requires_grad = true}, &gen), b = cg::zeros({6}, {.requires_grad = true});
    optim::SGD opt({w, b}, {.lr = 0.1, .in_backward = true});
    const Tensor before = w.detach().clone();
    c.run(w, b);
    EXPECT_TRUE(w.grad().defined()) << c.name;
    EXPECT_TRUE(cg::allclose(w, before, 0, 0)) << c.name << ": backward changed the weight";
  }
  // Turned off, and after the optimizer is gone.
  Tensor w = cg::randn({6, 6}, {.requires_grad = true}, &gen), b = cg::zeros({6}, {.requires_grad = true});
  {
    optim::SGD opt({w, b}, {.lr = 0.1, .in_backward = true});
    opt.set_in_backward(false);
    cg::sum(cg::linear(x, w, b)).backward();
    EXPECT_TRUE(w.grad().defined());
    opt.zero_grad();
    opt.set_in_backward(true);
    cg::sum(cg::linear(x, w, b)).backward();
    EXPECT_FALSE(w.grad().defined());
  }
  cg::sum(cg::linear(x, w, b)).backward();
  EXPECT_TRUE(w.grad().defined());
}

// A node that saved the weight and runs after the folded update would read the new values: it
// fails, naming the in-place change, as it would after any other.
TEST(OptimInBackward, ANodeThatReadsTheWeightAfterTheUpdateFails) {
  Tensor w = cg::ones({2, 3}, {.requires_grad = true});
  const Tensor u = cg::ones({2, 3}, {.requires_grad = true});
  optim::SGD opt({w}, {.lr = 0.1, .in_backward = true});
  const Tensor early = cg::sum(cg::mul(u, w.detach()));  // recorded first, so it runs last
  const Tensor late = cg::sum(cg::linear(cg::ones({4, 3}), w));
  expect_error<cg::AutogradError>([&] { cg::add(early, late).backward(); }, {"mul", "in-place", "version"});
}

TEST(OptimInBackward, ValidatesItsUse) {
  Tensor w = cg::ones({2, 3}, {.requires_grad = true});
  optim::SGD first({w}, {.lr = 0.1, .in_backward = true});
  expect_error<cg::ValueError>([&] { optim::SGD second({w}, {.lr = 0.1, .in_backward = true}); },
                               {"SGD", "[2, 3]", "already updated in backward"});
  expect_error<cg::ValueError>([&] { optim::Adam second({w}, {.in_backward = true}); },
                               {"Adam", "[2, 3]", "already updated in backward"});
}

// ---------------------------------------------------------------- Adam
TEST(OptimAdam, TwoStepsByHand) {
  Tensor p = param({1.0});
  optim::Adam opt({p}, {.lr = 0.1});
  // step 1 (g = 0.5): m = 0.05, v = 0.00025; m^ = 0.05 / 0.1 = 0.5, v^ = 0.00025 / 0.001 = 0.25;
  //   p = 1 - 0.1 * 0.5 / (sqrt(0.25) + 1e-8) = 0.900000002
  set_grad(p, {0.5});
  opt.step();
  EXPECT_NEAR(p.item(), 0.900000002, 1e-12);
  // step 2 (g = -0.25): m = 0.045 - 0.025 = 0.02; v = 0.00024975 + 0.0000625 = 0.00031225;
  //   m^ = 0.02 / 0.19 = 0.10526316; v^ = 0.00031225 / 0.001999 = 0.15620310, sqrt 0.39522538;
  //   p = 0.900000002 - 0.1 * 0.10526316 / 0.39522538 = 0.87336630
  set_grad(p, {-0.25});
  opt.step();
  EXPECT_NEAR(p.item(), 0.8733663, 1e-7);
  const auto st = opt.state();
  ASSERT_EQ(st.size(), 3u);
  EXPECT_EQ(st[0].first, "state.0.step");
  EXPECT_EQ(st[0].second.item(), 2.0);
  EXPECT_EQ(st[1].first, "state.0.exp_avg");
  EXPECT_NEAR(st[1].second.item(), 0.02, 1e-15);
  EXPECT_EQ(st[2].first, "state.0.exp_avg_sq");
  EXPECT_NEAR(st[2].second.item(), 0.00031225, 1e-15);
}

TEST(OptimAdam, L2WeightDecayAddsToTheGradient) {
  Tensor p = param({1.0});
  optim::Adam opt({p}, {.lr = 0.1, .weight_decay = 0.1});
  // step 1: g = 0.5 + 0.1 * 1 = 0.6; m^ = 0.6, v^ = 0.36; p = 1 - 0.1 * 0.6 / (0.6 + 1e-8) = 0.9000000016667
  set_grad(p, {0.5});
  opt.step();
  EXPECT_NEAR(p.item(), 0.9000000016667, 1e-12);
  // step 2: g = -0.25 + 0.09 = -0.16; m = 0.054 - 0.016 = 0.038; v = 0.00035964 + 0.0000256 = 0.00038524;
  //   p = 0.9 - 0.1 * (0.038 / 0.19) / sqrt(0.00038524 / 0.001999) = 0.9 - 0.1 * 0.2 / 0.43899 = 0.854441
  set_grad(p, {-0.25});
  opt.step();
  EXPECT_NEAR(p.item(), 0.8544414, 1e-6);
}

TEST(OptimAdam, AdamWDecouplesWeightDecay) {
  Tensor p = param({1.0});
  optim::AdamW opt({p}, {.lr = 0.1, .weight_decay = 0.1});
  EXPECT_STREQ(opt.name(), "AdamW");
  // step 1: p = 1 * (1 - 0.1 * 0.1) = 0.99, then the Adam step of 0.099999998: 0.890000002
  set_grad(p, {0.5});
  opt.step();
  EXPECT_NEAR(p.item(), 0.890000002, 1e-12);
  // step 2: p = 0.890000002 * 0.99 = 0.881100002, minus 0.1 * 0.10526316 / 0.39522538 = 0.8544663
  set_grad(p, {-0.25});
  opt.step();
  EXPECT_NEAR(p.item(), 0.8544663, 1e-7);
}

TEST(OptimAdam, AmsgradKeepsTheMaximum) {
  Tensor p = param({1.0});
  optim::Adam opt({p}, {.lr = 0.1, .amsgrad = true});
  set_grad(p, {0.5});
  opt.step();
  // step 2 (g = 0.01): v = 0.999 * 0.00025 + 0.001 * 0.0001 = 0.00024985 < vmax = 0.00025;
  //   m = 0.045 + 0.001 = 0.046; p = 0.900000002 - 0.1 * (0.046 / 0.19) / sqrt(0.00025 / 0.001999)
  //     = 0.900000002 - 0.1 * 0.24210526 / 0.35364 = 0.8315394
  set_grad(p, {0.01});
  opt.step();
  EXPECT_NEAR(p.item(), 0.8315394, 1e-7);
  const auto st = opt.state();
  ASSERT_EQ(st.size(), 4u);
  EXPECT_EQ(st[3].first, "state.0.max_exp_avg_sq");
  EXPECT_NEAR(st[3].second.item(), 0.00025, 1e-15);
}

TEST(OptimAdam, Float32MatchesFloat64AndLanesMatchTail) {
  // 13 elements: vector lanes for the first 8 (or 12) and the scalar tail for the rest must agree
  // exactly (see Note [optimizer simd]).
  Tensor p32 = cg::full({13}, 0.3, {.dtype = DType::Float32, .requires_grad = true});
  Tensor p64 = cg::full({13}, 0.3, {.dtype = DType::Float64, .requires_grad = true});
  optim::Adam a({p32}, {.lr = 0.01, .weight_decay = 0.01, .amsgrad = true});
  optim::Adam b({p64}, {.lr = 0.01, .weight_decay = 0.01, .amsgrad = true});
  optim::RMSprop c({p32.detach().clone().requires_grad_()}, {.momentum = 0.5, .centered = true});
  for (int i = 0; i < 10; ++i) {
    p32.set_grad(cg::full({13}, 0.1 * i - 0.3, {.dtype = DType::Float32}));
    p64.set_grad(cg::full({13}, 0.1 * i - 0.3, {.dtype = DType::Float64}));
    Tensor q = c.params()[0];
    q.set_grad(cg::full({13}, 0.3 - 0.05 * i, {.dtype = DType::Float32}));
    a.step();
    b.step();
    c.step();
  }
  for (std::int64_t k = 0; k < 13; ++k) {
    EXPECT_EQ(p32.at({k}), p32.at({0})) << k;
    EXPECT_EQ(p64.at({k}), p64.at({0})) << k;
    EXPECT_EQ(c.params()[0].at({k}), c.params()[0].at({0})) << k;
  }
  EXPECT_NEAR(p32.at({12}), p64.at({12}), 1e-6);
}

// ---------------------------------------------------------------- RMSprop
TEST(OptimRMSprop, PlainTwoSteps) {
  Tensor p = param({1.0});
  optim::RMSprop opt({p}, {.lr = 0.01});
  // step 1: s = 0.01 * 0.25 = 0.0025; p = 1 - 0.01 * 0.5 / (0.05 + 1e-8) = 0.90000002
  set_grad(p, {0.5});
  opt.step();
  EXPECT_NEAR(p.item(), 0.90000002, 1e-10);
  // step 2: s = 0.99 * 0.0025 + 0.0025 = 0.004975, sqrt 0.07053368; p = 0.9 - 0.005 / 0.07053368 = 0.8291119
  set_grad(p, {0.5});
  opt.step();
  EXPECT_NEAR(p.item(), 0.8291119, 1e-7);
  const auto st = opt.state();
  ASSERT_EQ(st.size(), 2u);
  EXPECT_EQ(st[1].first, "state.0.square_avg");
  EXPECT_NEAR(st[1].second.item(), 0.004975, 1e-15);
}

TEST(OptimRMSprop, CenteredWithMomentumTwoSteps) {
  Tensor p = param({1.0});
  optim::RMSprop opt({p}, {.lr = 0.01, .momentum = 0.9, .centered = true});
  // step 1 (g = 0.5): s = 0.0025, a = 0.005, d = sqrt(0.0025 - 0.000025) = 0.04974937;
  //   b = 0.5 / d = 10.0503761; p = 1 - 0.01 * b = 0.89949624
  set_grad(p, {0.5});
  opt.step();
  EXPECT_NEAR(p.item(), 0.89949624, 1e-8);
  // step 2 (g = -0.25): s = 0.002475 + 0.000625 = 0.0031; a = 0.00495 - 0.0025 = 0.00245;
  //   d = sqrt(0.0031 - 0.0000060025) = 0.05562371; b = 9.04533851 - 4.49448516 = 4.55085335;
  //   p = 0.89949624 - 0.0455085335 = 0.85398771
  set_grad(p, {-0.25});
  opt.step();
  EXPECT_NEAR(p.item(), 0.85398771, 1e-8);
  std::vector<std::string> names;
  for (auto& [k, v] : opt.state()) names.push_back(k);
  EXPECT_EQ(names, (std::vector<std::string>{"state.0.step", "state.0.square_avg", "state.0.momentum_buffer",
                                             "state.0.grad_avg"}));
}

// ---------------------------------------------------------------- state
TEST(OptimState, SaveAndRestoreContinuesIdentically) {
  auto make = [] { return std::vector<Tensor>{param({1.0, 2.0}), param({-1.0})}; };
  auto a_params = make(), b_params = make();
  optim::Adam a(a_params, {.lr = 0.05});
  auto grads = [](std::vector<Tensor>& ps, double s) {
    ps[0].set_grad(cg::tensor({0.3 * s, -0.1}));
    ps[1].set_grad(cg::tensor({0.7 * s}));
  };
  for (int i = 1; i <= 3; ++i) {
    grads(a_params, i);
    a.step();
  }
  // b: same parameter values and state, then one more identical step each.
  {
    cg::NoGradGuard ng;
    for (std::size_t i = 0; i < 2; ++i) b_params[i].copy_(a_params[i]);
  }
  optim::Adam b(b_params, {.lr = 0.05});
  b.load_state(a.state());
  EXPECT_EQ(b.state().size(), a.state().size());
  grads(a_params, 4);
  grads(b_params, 4);
  a.step();
  b.step();
  EXPECT_TRUE(cg::allclose(a_params[0], b_params[0], 0, 0));
  EXPECT_TRUE(cg::allclose(a_params[1], b_params[1], 0, 0));

  // The returned buffers are the live state: the step reuses them (no reallocation).
  const Tensor m_before = a.state()[1].second;
  grads(a_params, 5);
  a.step();
  EXPECT_EQ(a.state()[1].second.raw_data(), m_before.raw_data());

  optim::Adam c(make(), {.lr = 0.05});
  optim::NamedTensors bad = a.state();
  bad[1].second = cg::zeros({3}, {.dtype = DType::Float64});
  bad.emplace_back("state.7.exp_avg", cg::zeros({1}));
  bad.emplace_back("state.0.momentum_buffer", cg::zeros({2}));
  expect_error<cg::ValueError>([&] { c.load_state(bad); },
                               {"size mismatch for \"state.0.exp_avg\"", "[3]", "[2]", "\"state.7.exp_avg\"",
                                "\"state.0.momentum_buffer\"", "exp_avg_sq"});
}

// ---------------------------------------------------------------- schedules
TEST(OptimSchedule, StepLR) {
  Tensor p = param({1.0});
  optim::SGD opt({p}, {.lr = 0.1});
  optim::StepLR sched(opt, 2, 0.5);
  std::vector<double> lrs;
  for (int t = 0; t < 6; ++t) {
    lrs.push_back(opt.lr());
    sched.step();
  }
  const std::vector<double> expected{0.1, 0.1, 0.05, 0.05, 0.025, 0.025};
  for (std::size_t i = 0; i < lrs.size(); ++i) EXPECT_NEAR(lrs[i], expected[i], 1e-15) << i;
  sched.set_step(0);
  EXPECT_DOUBLE_EQ(opt.lr(), 0.1);
}

TEST(OptimSchedule, CosineAnnealing) {
  Tensor p = param({1.0});
  optim::SGD opt({p}, {.lr = 0.1});
  optim::CosineAnnealingLR sched(opt, 4, 0.01);
  // eta_min + (base - eta_min) (1 + cos(pi t / 4)) / 2, t = 0..4
  const std::vector<double> expected{0.1, 0.01 + 0.09 * (1 + std::sqrt(0.5)) / 2, 0.055,
                                     0.01 + 0.09 * (1 - std::sqrt(0.5)) / 2, 0.01};
  for (std::size_t t = 0; t < expected.size(); ++t) {
    EXPECT_NEAR(opt.lr(), expected[t], 1e-15) << t;
    sched.step();
  }
}

TEST(OptimSchedule, LinearWarmupThenCosine) {
  Tensor p = param({1.0});
  optim::Adam opt({p}, {.lr = 0.3});
  optim::LinearWarmup sched(opt, 3, std::make_unique<optim::CosineAnnealingLR>(opt, 2));
  // warmup: 0.3 * 1/3, 2/3, 3/3; then cosine over 2 steps: 0.3, 0.15, 0
  const std::vector<double> expected{0.1, 0.2, 0.3, 0.3, 0.15, 0.0};
  for (std::size_t t = 0; t < expected.size(); ++t) {
    EXPECT_NEAR(opt.lr(), expected[t], 1e-15) << t;
    sched.step();
  }
  sched.set_step(1);
  EXPECT_NEAR(opt.lr(), 0.2, 1e-15);
  EXPECT_DOUBLE_EQ(opt.initial_lr(), 0.3);
  optim::LinearWarmup alone(opt, 4);
  EXPECT_NEAR(opt.lr(), 0.075, 1e-15);
  EXPECT_NEAR(alone.lr_at(10), 0.3, 1e-15);
}

// ---------------------------------------------------------------- clipping
TEST(OptimClip, GradNormScalesJointly) {
  Tensor a = param({0.0, 0.0}), b = param({0.0}), c = param({0.0});
  set_grad(a, {3.0, 4.0});
  set_grad(b, {12.0});  // joint norm sqrt(9 + 16 + 144) = 13; c has no gradient
  const double total = optim::clip_grad_norm_({a, b, c}, 6.5);
  EXPECT_DOUBLE_EQ(total, 13.0);
  const double k = 6.5 / (13.0 + 1e-6);
  EXPECT_NEAR(a.grad().at({0}), 3.0 * k, 1e-12);
  EXPECT_NEAR(a.grad().at({1}), 4.0 * k, 1e-12);
  EXPECT_NEAR(b.grad().at({0}), 12.0 * k, 1e-12);
  // Below the limit: untouched, norm reported.
  EXPECT_NEAR(optim::clip_grad_norm_({a, b}, 100.0), 6.5, 1e-5);
  EXPECT_NEAR(b.grad().at({0}), 12.0 * k, 1e-12);
  // Max norm.
  set_grad(a, {3.0, -4.0});
  EXPECT_DOUBLE_EQ(optim::clip_grad_norm_({a}, 2.0, INFINITY), 4.0);
  EXPECT_NEAR(a.grad().at({1}), -2.0, 1e-6);
  set_grad(a, {3.0, -4.0});
  optim::clip_grad_value_({a}, 3.5);
  EXPECT_DOUBLE_EQ(a.grad().at({0}), 3.0);
  EXPECT_DOUBLE_EQ(a.grad().at({1}), -3.5);
}

// ---------------------------------------------------------------- convergence
namespace {
double train_xor(bool adam) {
  auto model = nn::build_model("linear(8) tanh linear(1)", {2}, 4);
  const Tensor x = cg::tensor({{0.0, 0.0}, {0.0, 1.0}, {1.0, 0.0}, {1.0, 1.0}}, false, DType::Float32);
  const Tensor y = cg::from_vector(std::vector<float>{0, 1, 1, 0}, {4, 1});
  std::unique_ptr<optim::Optimizer> opt;
  if (adam)
    opt = std::make_unique<optim::Adam>(model->parameters(), optim::AdamOptions{.lr = 0.05});
  else
    opt = std::make_unique<optim::SGD>(model->parameters(), optim::SGDOptions{.lr = 0.2, .momentum = 0.9});
  double loss = 0;
  for (int it = 0; it < 500; ++it) {
    opt->zero_grad();
    Tensor l = cg::bce_with_logits(model->forward(x), y);
    l.backward();
    opt->step();
    loss = l.item();
  }
  return loss;
}
}  // namespace

TEST(OptimConvergence, XorWithSGD) { EXPECT_LT(train_xor(false), 0.05); }
TEST(OptimConvergence, XorWithAdam) { EXPECT_LT(train_xor(true), 0.05); }
