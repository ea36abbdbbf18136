// The gradient-flow recorder: its numbers against hand-computed norms, its warnings on a deep
// sigmoid MLP and their absence on a healthy ReLU net, training left unchanged, and its overhead.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>

#include "chaingrad/autograd.hpp"
#include "chaingrad/gradflow.hpp"
#include "chaingrad/nn.hpp"
#include "chaingrad/ops.hpp"
#include "chaingrad/optim.hpp"

namespace cg = chaingrad;
namespace nn = chaingrad::nn;
namespace gf = chaingrad::gradflow;

namespace {

void set_values(cg::Tensor t, std::initializer_list<double> values) {
  cg::NoGradGuard no_grad;
  std::vector<double> v(values);
  t.copy_(cg::from_vector(v, t.shape(), {.dtype = cg::DType::Float64}));
}

const gf::ParamStats& param(const gf::Snapshot& s, const std::string& name) {
  for (const auto& p : s.params)
    if (p.name == name) return p;
  throw std::runtime_error("no parameter " + name);
}

bool has_warning(const gf::Recorder& r, gf::Warning::Kind kind, const std::string& subject) {
  for (const auto& w : r.warnings())
    if (w.kind == kind && w.subject == subject) return true;
  return false;
}

std::string all_warnings(const gf::Recorder& r) {
  std::string s;
  for (const auto& w : r.warnings()) s += std::string(gf::warning_kind_name(w.kind)) + ": " + w.message + "\n";
  return s;
}

// One SGD step of cross-entropy training, recorded.
void train_step(nn::Module& model, cg::optim::Optimizer& opt, gf::Recorder* flow, const cg::Tensor& x,
                const cg::Tensor& y) {
  const cg::Tensor loss = cg::cross_entropy(model(x), y);
  opt.zero_grad();
  loss.backward();
  if (flow) flow->before_step(x, y);
  opt.step();
  if (flow) flow->after_step(loss.item());
}

}  // namespace

// W1 = [[-1, -1], [0.5, 2]], W2 = [[1, 3]], x = [[1, 2], [2, 1]], L = mean(relu(x W1ᵀ) W2ᵀ):
//   h = [[-3, 4.5], [-3, 3]], r = relu(h) = [[0, 4.5], [0, 3]], y = [13.5, 9], dL/dy = 1/2;
//   dL/dW2 = ½ Σ r = [0, 3.75]                       -> ‖·‖ = 3.75
//   dL/dh = ½ W2 ⊙ relu'(h) = [0, 1.5] per sample;   dL/dW1 = [[0, 0], [4.5, 4.5]] -> ‖·‖ = 4.5 √2
//   ‖W1‖ = √6.25 = 2.5, ‖W2‖ = √10; SGD lr 0.1 moves each by 0.1 ‖g‖.
//   Unit 0 of the ReLU is 0 on both samples (dead): dead fraction 1/2, mean ReLU' = 2/4.
TEST(GradFlow, NormsAndRatiosMatchHandComputedValues) {
  nn::Sequential model{nn::Linear(2, 2, /*bias=*/false), nn::ReLU(), nn::Linear(2, 1, /*bias=*/false)};
  model.to(cg::DType::Float64);
  set_values(model.at<nn::Linear>(0)->weight, {-1, -1, 0.5, 2});
  set_values(model.at<nn::Linear>(2)->weight, {1, 3});
  const cg::Tensor x = cg::tensor({{1, 2}, {2, 1}});
  cg::optim::SGD opt(model.parameters(), {.lr = 0.1});
  gf::Recorder flow(model, {.every = 1});

  const cg::Tensor loss = model(x).mean();
  EXPECT_DOUBLE_EQ(loss.item(), 11.25);
  loss.backward();
  flow.before_step(x);
  opt.step();
  flow.after_step(loss.item());

  ASSERT_EQ(flow.snapshots().size(), 1u);
  const gf::Snapshot& s = flow.snapshots()[0];
  EXPECT_EQ(s.step, 0);
  EXPECT_DOUBLE_EQ(s.loss, 11.25);
  const auto& w1 = param(s, "0.weight");
  const auto& w2 = param(s, "2.weight");
  EXPECT_EQ(w1.layer, "0");
  EXPECT_EQ(w2.layer, "2");
  EXPECT_TRUE(w1.has_grad);
  EXPECT_NEAR(w1.grad_norm, 4.5 * std::sqrt(2.0), 1e-12);
  EXPECT_NEAR(w2.grad_norm, 3.75, 1e-12);
  EXPECT_NEAR(w1.weight_norm, 2.5, 1e-12);
  EXPECT_NEAR(w2.weight_norm, std::sqrt(10.0), 1e-12);
  EXPECT_NEAR(w1.update_norm, 0.45 * std::sqrt(2.0), 1e-12);
  EXPECT_NEAR(w2.update_norm, 0.375, 1e-12);
  EXPECT_NEAR(w1.update_ratio, 0.45 * std::sqrt(2.0) / 2.5, 1e-12);
  EXPECT_NEAR(w2.update_ratio, 0.375 / std::sqrt(10.0), 1e-12);

  ASSERT_EQ(s.activations.size(), 1u);
  EXPECT_EQ(s.activations[0].layer, "1");
  EXPECT_EQ(s.activations[0].kind, gf::ActivationKind::ReLU);
  EXPECT_EQ(s.activations[0].units, 2);
  EXPECT_DOUBLE_EQ(s.activations[0].inactive_fraction, 0.5);
  EXPECT_DOUBLE_EQ(s.activations[0].mean_derivative, 0.5);

  // Output shapes come from the activation pass.
  ASSERT_EQ(flow.layers().size(), 3u);
  EXPECT_TRUE(flow.layers()[0].has_output_shape);
  EXPECT_EQ(flow.layers()[2].output_shape, cg::Dims({1}));

  // Both steps move their weight by more than 10% of its norm (0.25 and 0.12): large updates.
  // Half the ReLU units dead is not more than half: no dead-ReLU warning.
  EXPECT_TRUE(has_warning(flow, gf::Warning::Kind::LargeUpdate, "0.weight")) << all_warnings(flow);
  EXPECT_TRUE(has_warning(flow, gf::Warning::Kind::LargeUpdate, "2.weight")) << all_warnings(flow);
  EXPECT_FALSE(has_warning(flow, gf::Warning::Kind::DeadReLU, "1")) << all_warnings(flow);
  EXPECT_FALSE(has_warning(flow, gf::Warning::Kind::Vanishing, "0.weight")) << all_warnings(flow);
}

// Sigmoid of [[-10, 0, 10], [0, 0, 10]]: outputs below 0.01 or above 0.99 are saturated (3 of
// 6); mean σ' = (σ'(-10) + 3 σ'(0) + 2 σ'(10)) / 6. Tanh of [[-3, 0, 0.5], [3, 0, 0]]: |y| > 0.99 for ±3.
TEST(GradFlow, SaturationOfSigmoidAndTanh) {
  const auto sig = [](double v) { return 1 / (1 + std::exp(-v)); };
  {
    nn::Sequential model{nn::Sigmoid()};
    gf::Recorder flow(model, {.every = 1});
    flow.before_step(cg::tensor({{-10, 0, 10}, {0, 0, 10}}));
    flow.after_step();
    const auto& a = flow.snapshots().at(0).activations.at(0);
    EXPECT_EQ(a.kind, gf::ActivationKind::Sigmoid);
    EXPECT_EQ(a.units, 3);
    EXPECT_DOUBLE_EQ(a.inactive_fraction, 0.5);
    const double d = (sig(-10) * (1 - sig(-10)) + 3 * 0.25 + 2 * sig(10) * (1 - sig(10))) / 6;
    EXPECT_NEAR(a.mean_derivative, d, 1e-12);
    EXPECT_FALSE(has_warning(flow, gf::Warning::Kind::Saturated, "0"));  // 50% is not more than half
  }
  {
    nn::Sequential model{nn::Tanh()};
    gf::Recorder flow(model, {.every = 1});
    flow.before_step(cg::tensor({{-3, 0, 0.5}, {3, 0, 0}}));
    flow.after_step();
    const auto& a = flow.snapshots().at(0).activations.at(0);
    EXPECT_EQ(a.kind, gf::ActivationKind::Tanh);
    EXPECT_NEAR(a.inactive_fraction, 2.0 / 6, 1e-12);
    const double t3 = std::tanh(3.0), th = std::tanh(0.5);
    EXPECT_NEAR(a.mean_derivative, (2 * (1 - t3 * t3) + 3 + (1 - th * th)) / 6, 1e-12);
  }
  {
    nn::Sequential model{nn::Sigmoid()};
    gf::Recorder flow(model, {.every = 1});
    flow.before_step(cg::tensor({{-10, 20, 10}, {0, 30, 10}}));  // 5 of 6 saturated
    flow.after_step();
    ASSERT_TRUE(has_warning(flow, gf::Warning::Kind::Saturated, "0")) << all_warnings(flow);
    EXPECT_NE(flow.warnings()[0].message.find("83% of its outputs are saturated"), std::string::npos)
        << flow.warnings()[0].message;
  }
}

TEST(GradFlow, RecordsEveryNthStepWithIntervalMeanLoss) {
  nn::Sequential model{nn::Linear(3, 2)};
  gf::Recorder flow(model, {.every = 3});
  const cg::Tensor x = cg::ones({4, 3});
  for (int step = 0; step < 7; ++step) {
    EXPECT_EQ(flow.due(), step % 3 == 0) << step;
    model(x).sum().backward();
    flow.before_step(x);
    flow.after_step(static_cast<double>(step));
    model.zero_grad();
  }
  ASSERT_EQ(flow.snapshots().size(), 3u);
  EXPECT_EQ(flow.snapshots()[0].step, 0);
  EXPECT_EQ(flow.snapshots()[1].step, 3);
  EXPECT_EQ(flow.snapshots()[2].step, 6);
  EXPECT_DOUBLE_EQ(flow.snapshots()[0].loss, 0.0);
  EXPECT_DOUBLE_EQ(flow.snapshots()[1].loss, 2.0);  // steps 1, 2, 3
  EXPECT_DOUBLE_EQ(flow.snapshots()[2].loss, 5.0);  // steps 4, 5, 6
  EXPECT_EQ(flow.step(), 7);
  // No optimizer step: the weights did not move.
  EXPECT_DOUBLE_EQ(flow.snapshots()[1].params[0].update_ratio, 0.0);
  EXPECT_THROW(gf::Recorder(model, {.every = 0}), cg::ValueError);
  // A resumed run continues its step count and keeps recording on multiples of `every`.
  gf::Recorder resumed(model, {.every = 3, .first_step = 4});
  EXPECT_FALSE(resumed.due());
  resumed.after_step(1.0);
  resumed.after_step(1.0);
  EXPECT_TRUE(resumed.due());
}

// 8 hidden sigmoid layers with weights from N(0, 0.1²): each layer scales the backward signal by
// about σ' ‖W‖ ≈ 0.25 · 0.1 · √32 ≈ 0.14, so the first layers' gradients vanish.
TEST(GradFlow, WarnsOfVanishingGradientsInADeepSigmoidMlp) {
  cg::manual_seed(7);
  std::string spec;
  for (int i = 0; i < 8; ++i) spec += "linear(32) sigmoid ";
  auto model = nn::build_model(spec + "linear(10)", {32}, 1);
  for (const auto& [name, p] : model->named_parameters())
    if (p.dim() == 2) nn::init::normal_(p, 0.0, 0.1);
  cg::optim::SGD opt(model->parameters(), {.lr = 0.1});
  gf::Recorder flow(*model, {.every = 2});
  const cg::Tensor x = cg::randn({64, 32});
  const cg::Tensor y = cg::randint(0, 10, {64});
  for (int i = 0; i < 4; ++i) train_step(*model, opt, &flow, x, y);

  ASSERT_TRUE(has_warning(flow, gf::Warning::Kind::Vanishing, "0.weight")) << all_warnings(flow);
  ASSERT_TRUE(has_warning(flow, gf::Warning::Kind::Vanishing, "2.weight")) << all_warnings(flow);
  EXPECT_FALSE(has_warning(flow, gf::Warning::Kind::Vanishing, "16.weight")) << all_warnings(flow);
  const gf::Warning* w = nullptr;
  for (const auto& v : flow.warnings())
    if (v.subject == "0.weight") w = &v;
  // "0.weight: gradient norm 1.2e-07, 10^5 times smaller than 16.weight (3.4e-02); 8 sigmoid
  // layers above it each scale gradients by at most 0.25 (...)"
  EXPECT_EQ(w->message.rfind("0.weight: gradient norm ", 0), 0u) << w->message;
  EXPECT_NE(w->message.find(" times smaller than 16.weight ("), std::string::npos) << w->message;
  EXPECT_NE(w->message.find("8 sigmoid layers above it each scale gradients by at most 0.25"), std::string::npos)
      << w->message;
  EXPECT_NE(w->message.find("measured mean σ'"), std::string::npos) << w->message;
  EXPECT_EQ(w->first_step, 0);
  EXPECT_EQ(w->last_step, 2);
  EXPECT_EQ(w->count, 2);
  const gf::Snapshot& s = flow.snapshots().back();
  EXPECT_LT(param(s, "0.weight").grad_norm, 1e-3 * param(s, "16.weight").grad_norm);

  // The per-epoch printout: the table, then the warnings seen since the previous call.
  const std::string summary = flow.epoch_summary();
  EXPECT_NE(summary.find("gradient flow at step 2"), std::string::npos) << summary;
  EXPECT_NE(summary.find("16.weight"), std::string::npos) << summary;
  EXPECT_NE(summary.find("[vanishing] 0.weight"), std::string::npos) << summary;
  EXPECT_EQ(flow.epoch_summary().find("[vanishing]"), std::string::npos);  // nothing recorded since
}

TEST(GradFlow, NoWarningsOnAHealthyReluNet) {
  cg::manual_seed(3);
  auto model = nn::build_model("linear(64) relu linear(64) relu linear(10)", {32}, 5);
  cg::optim::SGD opt(model->parameters(), {.lr = 0.05, .momentum = 0.9});
  gf::Recorder flow(*model, {.every = 5});
  const cg::Tensor x = cg::randn({64, 32});
  const cg::Tensor y = cg::randint(0, 10, {64});
  for (int i = 0; i < 40; ++i) train_step(*model, opt, &flow, x, y);
  EXPECT_EQ(flow.snapshots().size(), 8u);
  EXPECT_TRUE(flow.warnings().empty()) << all_warnings(flow);
  EXPECT_NE(flow.epoch_summary().find("no gradient-flow warnings"), std::string::npos);
  // The recorder also scored the recorded batches.
  EXPECT_TRUE(std::isfinite(flow.snapshots().back().batch_accuracy));
  EXPECT_GT(flow.snapshots().back().batch_accuracy, flow.snapshots().front().batch_accuracy);
}

// Built from synthetic snapshots: each threshold of Note [gradflow thresholds].
TEST(GradFlow, DiagnoseExplodingAndNonFinite) {
  std::vector<gf::LayerInfo> layers(5);
  const char* types[] = {"Linear", "Tanh", "Linear", "Tanh", "Linear"};
  for (int i = 0; i < 5; ++i) {
    layers[i].name = std::to_string(i);
    layers[i].type = types[i];
  }
  auto p = [](const std::string& name, double grad, double weight) {
    gf::ParamStats s;
    s.name = name;
    s.layer = name.substr(0, 1);
    s.shape = {4, 4};
    s.has_grad = true;
    s.grad_norm = grad;
    s.weight_norm = weight;
    s.update_ratio = 1e-3;
    return s;
  };
  gf::Snapshot s;
  s.step = 100;
  s.params = {p("0.weight", 5e2, 30), p("2.weight", 2.0, 30), p("4.weight", 0.1, 1)};
  auto w = gf::diagnose(s, layers);
  ASSERT_EQ(w.size(), 1u);
  EXPECT_EQ(w[0].kind, gf::Warning::Kind::Exploding);
  EXPECT_EQ(w[0].subject, "0.weight");
  EXPECT_NE(w[0].message.find("10^3 times larger than 4.weight at the output"), std::string::npos) << w[0].message;
  EXPECT_NE(w[0].message.find("2 weight matrices above it multiply it by Wᵀ"), std::string::npos) << w[0].message;

  s.params = {p("0.weight", 2e3, 30), p("2.weight", 1e3, 30), p("4.weight", 5e2, 1)};
  w = gf::diagnose(s, layers);
  ASSERT_EQ(w.size(), 1u);  // only the first is above exploding_norm = 1e3
  EXPECT_NE(w[0].message.find("above 1.0e+03"), std::string::npos) << w[0].message;

  s.params = {p("0.weight", std::nan(""), 30), p("2.weight", 1.0, 30), p("4.weight", 1.0, 1)};
  w = gf::diagnose(s, layers);
  ASSERT_EQ(w.size(), 1u);
  EXPECT_NE(w[0].message.find("gradient norm is NaN"), std::string::npos) << w[0].message;

  // A layer without gradient (frozen) is neither vanishing nor compared against.
  s.params = {p("0.weight", 1.0, 30), p("2.weight", 1.0, 30), p("4.weight", 1.0, 1)};
  s.params[0].has_grad = false;
  s.params[0].grad_norm = gf::kNaN;
  EXPECT_TRUE(gf::diagnose(s, layers).empty());

  // Dead ReLUs.
  s.activations = {
      {.layer = "1", .kind = gf::ActivationKind::ReLU, .units = 8, .inactive_fraction = 0.75, .mean_derivative = 0.1}};
  w = gf::diagnose(s, layers);
  ASSERT_EQ(w.size(), 1u);
  EXPECT_EQ(w[0].kind, gf::Warning::Kind::DeadReLU);
  EXPECT_NE(w[0].message.find("75% of its 8 units output 0 for every sample"), std::string::npos) << w[0].message;
}

// The activation pass runs in training mode but must not disturb training: Dropout is skipped
// (its generator does not advance) and BatchNorm's running statistics are restored.
TEST(GradFlow, RecordingLeavesTrainingUnchanged) {
  const std::string spec = "linear(32) batchnorm relu dropout(0.5) linear(4)";
  auto a = nn::build_model(spec, {16}, 11);
  auto b = nn::build_model(spec, {16}, 11);
  cg::optim::SGD opt_a(a->parameters(), {.lr = 0.1, .momentum = 0.9});
  cg::optim::SGD opt_b(b->parameters(), {.lr = 0.1, .momentum = 0.9});
  gf::Recorder flow(*b, {.every = 2});
  cg::Generator gen(5);
  for (int i = 0; i < 9; ++i) {
    const cg::Tensor x = cg::randn({32, 16}, {}, &gen);
    const cg::Tensor y = cg::randint(0, 4, {32}, &gen);
    train_step(*a, opt_a, nullptr, x, y);
    train_step(*b, opt_b, &flow, x, y);
  }
  EXPECT_EQ(flow.snapshots().size(), 5u);
  const auto sa = a->state_dict(), sb = b->state_dict();
  ASSERT_EQ(sa.size(), sb.size());
  for (std::size_t i = 0; i < sa.size(); ++i) {
    EXPECT_EQ(sa[i].first, sb[i].first);
    EXPECT_EQ(sa[i].second.to_vector<double>(), sb[i].second.to_vector<double>()) << sa[i].first;
  }
  EXPECT_EQ(a->at<nn::Dropout>(3)->generator().state(), b->at<nn::Dropout>(3)->generator().state());
}

// Overhead at the default interval on the default CLI model (784-256-256-10, batch 64): the time
// spent inside the recorder against the time of the steps. A recording step costs about one extra
// forward pass plus a read of every gradient and weight; at every = 50 that is about 1%.
TEST(GradFlow, OverheadAtTheDefaultIntervalIsUnderFivePercent) {
  cg::manual_seed(1);
  auto model = nn::build_model("linear(256) relu linear(256) relu linear(10)", {1, 28, 28}, 2);
  cg::optim::SGD opt(model->parameters(), {.lr = 0.02, .momentum = 0.9});
  const cg::Tensor x = cg::randn({64, 1, 28, 28});
  const cg::Tensor y = cg::randint(0, 10, {64});
  const int steps = 400;
  using Clock = std::chrono::steady_clock;
  for (int i = 0; i < 20; ++i) train_step(*model, opt, nullptr, x, y);  // warm the allocator

  gf::Recorder flow(*model);  // default: every 50 steps
  EXPECT_EQ(flow.options().every, 50);
  double with = 0, without = 0;
  // Alternate blocks, so a change in machine load hits both alike.
  for (int block = 0; block < 4; ++block) {
    auto t0 = Clock::now();
    for (int i = 0; i < steps / 4; ++i) train_step(*model, opt, nullptr, x, y);
    without += std::chrono::duration<double>(Clock::now() - t0).count();
    t0 = Clock::now();
    for (int i = 0; i < steps / 4; ++i) train_step(*model, opt, &flow, x, y);
    with += std::chrono::duration<double>(Clock::now() - t0).count();
  }
  EXPECT_EQ(flow.snapshots().size(), static_cast<std::size_t>(steps / 50));
  const double inside = flow.seconds() / with;
  const double per_recording_ms = 1e3 * flow.seconds() / static_cast<double>(flow.snapshots().size());
  const double per_step_ms = 1e3 * without / steps;
  std::printf(
      "[ overhead ] %d steps: %.3f s without, %.3f s with the recorder (every 50): wall-clock difference "
      "%+.2f%%; time inside the recorder %.2f%% of training (%.2f ms per recording, %.2f ms per step)\n",
      steps, without, with, 100 * (with - without) / without, 100 * inside, per_recording_ms, per_step_ms);
  RecordProperty("recorder_overhead_percent", std::to_string(100 * inside));
  EXPECT_LT(inside, 0.05);
}
