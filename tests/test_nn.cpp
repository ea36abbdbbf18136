// nn: module registry and names, layers (gradient-checked in float64), BatchNorm statistics,
// Dropout, initializers, load_state_dict, describe(), and the model spec.
#include <gtest/gtest.h>

#include "test_util.hpp"

#include <cmath>
#include <string>
#include <string_view>
#include <vector>

#include "chaingrad/chaingrad.hpp"
#include "chaingrad/nn.hpp"
#include "gradcheck.hpp"

namespace cg = chaingrad;
namespace nn = chaingrad::nn;
using cg::DType;
using cg::Tensor;

namespace {

using chaingrad::testing::expect_error;

std::vector<std::string> names_of(const nn::NamedTensors& v) {
  std::vector<std::string> out;
  for (const auto& [k, t] : v) out.push_back(k);
  return out;
}

Tensor randn64(const cg::Dims& shape, std::uint64_t seed) {
  cg::Generator g(seed);
  return cg::randn(shape, {.dtype = DType::Float64, .requires_grad = true}, &g);
}

// Gradient-checks m(x) in float64 w.r.t. x (when it requires grad) and every parameter.
void expect_gradcheck(nn::Module& m, const Tensor& x, const std::function<void()>& before = {}) {
  m.to(DType::Float64);
  std::vector<Tensor> inputs{x};
  for (const Tensor& p : m.parameters()) inputs.push_back(p);
  const std::string r = cg::testing::gradcheck(
      [&](const std::vector<Tensor>& in) {
        if (before) before();
        return m.forward(in[0]);
      },
      inputs);
  EXPECT_EQ(r, "") << m.describe();
}

}  // namespace

// ---------------------------------------------------------------- names
TEST(NnNames, MlpSpecHasPyTorchNames) {
  auto model = nn::build_model("linear(256) relu linear(256) relu linear(10)", {1, 28, 28}, 0);
  const auto sd = model->state_dict();
  ASSERT_EQ(names_of(sd), (std::vector<std::string>{"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}));
  EXPECT_EQ(sd[0].second.shape(), (cg::Dims{256, 784}));
  EXPECT_EQ(sd[1].second.shape(), (cg::Dims{256}));
  EXPECT_EQ(sd[2].second.shape(), (cg::Dims{256, 256}));
  EXPECT_EQ(sd[4].second.shape(), (cg::Dims{10, 256}));
  EXPECT_EQ(sd[5].second.shape(), (cg::Dims{10}));
  EXPECT_EQ(model->num_parameters(), 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10);
  EXPECT_TRUE(model->flatten_input());
  // Images go straight in: the Sequential flattens [N, 1, 28, 28] to [N, 784].
  const Tensor y = model->forward(cg::zeros({3, 1, 28, 28}));
  EXPECT_EQ(y.shape(), (cg::Dims{3, 10}));
}

TEST(NnNames, CnnSpecHasPyTorchNames) {
  auto model = nn::build_model(
      "conv2d(32,3,pad=1) relu maxpool2d(2) conv2d(64,3,pad=1) relu maxpool2d(2) flatten linear(128) relu "
      "dropout(0.25) linear(10)",
      {1, 28, 28}, 1);
  const auto sd = model->state_dict();
  ASSERT_EQ(names_of(sd), (std::vector<std::string>{"0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias",
                                                    "10.weight", "10.bias"}));
  EXPECT_EQ(sd[0].second.shape(), (cg::Dims{32, 1, 3, 3}));
  EXPECT_EQ(sd[2].second.shape(), (cg::Dims{64, 32, 3, 3}));
  EXPECT_EQ(sd[4].second.shape(), (cg::Dims{128, 3136}));
  EXPECT_EQ(sd[6].second.shape(), (cg::Dims{10, 128}));
  EXPECT_FALSE(model->flatten_input());
  EXPECT_EQ(model->forward(cg::zeros({2, 1, 28, 28})).shape(), (cg::Dims{2, 10}));
  EXPECT_EQ(model->size(), 11u);
  EXPECT_EQ((*model)[3]->type_name(), "Conv2d");
  EXPECT_EQ(model->at<nn::Linear>(7)->weight.shape(), (cg::Dims{128, 3136}));
  expect_error<cg::TypeError>([&] { model->at<nn::Linear>(0); }, {"layer 0 is a Conv2d"});
}

TEST(NnNames, BatchNormBuffersFollowParameters) {
  auto model = nn::build_model("conv2d(4,3) batchnorm relu flatten linear(16) batchnorm linear(3)", {2, 6, 6}, 0);
  EXPECT_EQ(names_of(model->state_dict()),
            (std::vector<std::string>{"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                                      "1.num_batches_tracked", "4.weight", "4.bias", "5.weight", "5.bias",
                                      "5.running_mean", "5.running_var", "5.num_batches_tracked", "6.weight",
                                      "6.bias"}));
  EXPECT_EQ((*model)[1]->type_name(), "BatchNorm2d");
  EXPECT_EQ((*model)[5]->type_name(), "BatchNorm1d");
  const auto buffers = model->named_buffers();
  ASSERT_EQ(buffers.size(), 6u);
  EXPECT_EQ(buffers[2].second.dtype(), DType::Int64);
  EXPECT_EQ(buffers[2].second.dim(), 0);
  EXPECT_EQ(model->parameters().size(), 10u);
}

TEST(NnNames, NestedModulesUseDottedPrefixes) {
  struct Block : nn::Module {
    std::shared_ptr<nn::Linear> fc;
    std::shared_ptr<nn::Sequential> head;
    Block() {
      fc = register_module("fc", std::make_shared<nn::Linear>(4, 3));
      head = register_module("head", std::make_shared<nn::Sequential>(
                                         std::initializer_list<nn::Sequential::Item>{nn::ReLU(), nn::Linear(3, 2)}));
      register_buffer("scale", cg::ones({1}));
    }
    Tensor forward(const Tensor& x) override { return head->forward(fc->forward(x)); }
    std::string type_name() const override { return "Block"; }
    void register_fc_again() { register_module("fc", std::make_shared<nn::Linear>(1, 1)); }
  };
  Block b;
  EXPECT_EQ(names_of(b.named_parameters()), (std::vector<std::string>{"fc.weight", "fc.bias", "head.1.weight", "head.1.bias"}));
  EXPECT_EQ(names_of(b.state_dict()),
            (std::vector<std::string>{"scale", "fc.weight", "fc.bias", "head.1.weight", "head.1.bias"}));
  EXPECT_EQ(names_of(b.named_parameters(/*recurse=*/false)).size(), 0u);
  std::vector<std::string> modules;
  for (auto& [name, m] : b.named_modules()) modules.push_back(name + ":" + m->type_name());
  EXPECT_EQ(modules, (std::vector<std::string>{":Block", "fc:Linear", "head:Sequential", "head.0:ReLU",
                                               "head.1:Linear"}));
  expect_error<cg::ValueError>([&] { b.register_fc_again(); },
                               {"'fc' is already registered"});
}

TEST(NnNames, SequentialBraceFormAcceptsValuesAndPointers) {
  auto fc = std::make_shared<nn::Linear>(nn::LinearOptions{.in = 784, .out = 256});
  nn::Sequential net{fc, nn::ReLU(), nn::Linear(256, 10)};
  EXPECT_EQ(names_of(net.named_parameters()), (std::vector<std::string>{"0.weight", "0.bias", "2.weight", "2.bias"}));
  EXPECT_TRUE(net.parameters()[0].same(fc->weight));  // shared, not copied
  EXPECT_EQ(net.forward(cg::zeros({5, 784})).shape(), (cg::Dims{5, 10}));
}

// ---------------------------------------------------------------- describe
TEST(NnDescribe, MatchesPyTorchRepr) {
  auto model = nn::build_model(
      "conv2d(32,3,pad=1) batchnorm relu maxpool2d(2) flatten dropout(0.25) linear(10) layernorm leaky_relu softmax",
      {1, 28, 28}, 0);
  EXPECT_EQ(model->describe(),
            "Sequential(\n"
            "  (0): Conv2d(1, 32, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))\n"
            "  (1): BatchNorm2d(32, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)\n"
            "  (2): ReLU()\n"
            "  (3): MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)\n"
            "  (4): Flatten(start_dim=1, end_dim=-1)\n"
            "  (5): Dropout(p=0.25, inplace=False)\n"
            "  (6): Linear(in_features=6272, out_features=10, bias=True)\n"
            "  (7): LayerNorm((10,), eps=1e-05, elementwise_affine=True)\n"
            "  (8): LeakyReLU(negative_slope=0.01)\n"
            "  (9): Softmax(dim=1)\n"
            ")");
  EXPECT_EQ(nn::build_model("linear(4,bias=false) gelu", {3}, 0)->describe(),
            "Sequential(\n  (0): Linear(in_features=3, out_features=4, bias=False)\n  (1): GELU(approximate='none')\n)");
  EXPECT_EQ(nn::build_model("linear(4)", {1, 2, 2}, 0)->describe(),
            "Sequential(\n  flatten_input=True\n  (0): Linear(in_features=4, out_features=4, bias=True)\n)");
}

// ---------------------------------------------------------------- gradients of every layer
TEST(NnGradcheck, Linear) {
  nn::Linear fc(5, 3);
  expect_gradcheck(fc, randn64({4, 5}, 1));
  nn::Linear nobias(nn::LinearOptions{.in = 5, .out = 2, .bias = false});
  EXPECT_EQ(nobias.parameters().size(), 1u);
  expect_gradcheck(nobias, randn64({2, 3, 5}, 2));  // leading batch dims
}

TEST(NnGradcheck, Conv2d) {
  nn::Conv2d conv({.in = 2, .out = 3, .kernel = 3, .stride = 2, .padding = 1, .dilation = 1});
  expect_gradcheck(conv, randn64({2, 2, 5, 5}, 3));
  nn::Conv2d dilated({.in = 1, .out = 2, .kernel = 2, .stride = 1, .padding = 0, .dilation = 2, .bias = false});
  expect_gradcheck(dilated, randn64({1, 1, 5, 4}, 4));
  EXPECT_EQ(conv.output_size(5), 3);
  expect_error<cg::ShapeError>([&] { conv.forward(cg::zeros({1, 3, 5, 5}, {.dtype = DType::Float64})); },
                               {"Conv2d", "[N, 2, H, W]", "[1, 3, 5, 5]"});
}

TEST(NnGradcheck, Pooling) {
  nn::MaxPool2d maxpool(2);
  expect_gradcheck(maxpool, randn64({2, 2, 4, 6}, 5));
  nn::AvgPool2d avgpool(3, 2);
  expect_gradcheck(avgpool, randn64({1, 2, 7, 5}, 6));
  nn::Flatten flat;
  expect_gradcheck(flat, randn64({2, 3, 2}, 7));
}

TEST(NnGradcheck, Activations) {
  nn::ReLU relu;
  nn::LeakyReLU leaky(0.2);
  nn::Sigmoid sig;
  nn::Tanh tanh_;
  nn::GELU gelu_;
  nn::Softmax soft(1);
  for (nn::Module* m : std::vector<nn::Module*>{&relu, &leaky, &sig, &tanh_, &gelu_, &soft})
    expect_gradcheck(*m, randn64({3, 4}, 8));
}

TEST(NnGradcheck, DropoutWithFixedMask) {
  nn::Dropout drop(0.4);
  expect_gradcheck(drop, randn64({4, 6}, 9), [&] { drop.seed(11); });
}

TEST(NnGradcheck, BatchNormTrainAndEval) {
  nn::BatchNorm1d bn1(3);
  expect_gradcheck(bn1, randn64({5, 3}, 10));
  expect_gradcheck(bn1, randn64({4, 3, 2}, 11));
  nn::BatchNorm2d bn2(2);
  {
    cg::NoGradGuard ng;
    bn2.to(DType::Float64);
    nn::init::uniform_(bn2.weight, 0.5, 1.5);
  }
  expect_gradcheck(bn2, randn64({3, 2, 3, 2}, 12));
  bn2.eval();
  {
    cg::NoGradGuard ng;
    bn2.running_mean.copy_(cg::tensor({0.3, -0.2}));
    bn2.running_var.copy_(cg::tensor({1.5, 0.7}));
  }
  expect_gradcheck(bn2, randn64({3, 2, 3, 2}, 13));
}

TEST(NnGradcheck, LayerNormAndEmbedding) {
  nn::LayerNorm ln(nn::LayerNormOptions{.normalized_shape = {3, 4}});
  {
    ln.to(DType::Float64);
    nn::init::uniform_(ln.weight, 0.5, 1.5);
    nn::init::uniform_(ln.bias, -0.5, 0.5);
  }
  expect_gradcheck(ln, randn64({2, 3, 4}, 14));
  nn::Embedding emb(5, 3);
  Tensor idx = cg::from_vector(std::vector<std::int64_t>{0, 4, 4, 2, 1, 0}, {2, 3});
  expect_gradcheck(emb, idx);
  EXPECT_EQ(emb.forward(idx).shape(), (cg::Dims{2, 3, 3}));
}

TEST(NnGradcheck, SequentialSecondOrder) {
  auto model = nn::build_model("linear(4) tanh linear(3) gelu linear(2)", {3}, 5);
  model->to(DType::Float64);
  std::vector<Tensor> inputs{randn64({2, 3}, 15)};
  for (const Tensor& p : model->parameters()) inputs.push_back(p);
  auto f = [&](const std::vector<Tensor>& in) { return model->forward(in[0]); };
  EXPECT_EQ(cg::testing::gradcheck(f, inputs), "");
  EXPECT_EQ(cg::testing::gradgradcheck(f, inputs), "");
}

// ---------------------------------------------------------------- BatchNorm statistics
TEST(NnBatchNorm, RunningStatsByHand) {
  nn::BatchNorm1d bn(2);
  // channel 0: {1, 3}: mean 2, biased var 1, unbiased var 2
  // channel 1: {2, 6}: mean 4, biased var 4, unbiased var 8
  const Tensor x = cg::tensor({{1.0, 2.0}, {3.0, 6.0}}, false, DType::Float32);
  const Tensor y = bn.forward(x);
  // Training output normalizes with the batch's biased variance.
  EXPECT_NEAR(y.at({0, 0}), -1.0 / std::sqrt(1.0 + 1e-5), 1e-6);
  EXPECT_NEAR(y.at({1, 0}), 1.0 / std::sqrt(1.0 + 1e-5), 1e-6);
  EXPECT_NEAR(y.at({0, 1}), -2.0 / std::sqrt(4.0 + 1e-5), 1e-6);
  // running_mean = 0.9 * 0 + 0.1 * [2, 4]; running_var = 0.9 * 1 + 0.1 * [2, 8] (unbiased)
  EXPECT_NEAR(bn.running_mean.at({0}), 0.2, 1e-7);
  EXPECT_NEAR(bn.running_mean.at({1}), 0.4, 1e-7);
  EXPECT_NEAR(bn.running_var.at({0}), 1.1, 1e-6);
  EXPECT_NEAR(bn.running_var.at({1}), 1.7, 1e-6);
  EXPECT_EQ(bn.num_batches_tracked.item(), 1.0);
  // A second batch: {0, 4} (mean 2, unbiased var 8) and {1, 1} (mean 1, unbiased var 0).
  bn.forward(cg::tensor({{0.0, 1.0}, {4.0, 1.0}}, false, DType::Float32));
  EXPECT_NEAR(bn.running_mean.at({0}), 0.9 * 0.2 + 0.1 * 2.0, 1e-6);
  EXPECT_NEAR(bn.running_mean.at({1}), 0.9 * 0.4 + 0.1 * 1.0, 1e-6);
  EXPECT_NEAR(bn.running_var.at({0}), 0.9 * 1.1 + 0.1 * 8.0, 1e-6);
  EXPECT_NEAR(bn.running_var.at({1}), 0.9 * 1.7 + 0.1 * 0.0, 1e-6);
  EXPECT_EQ(bn.num_batches_tracked.item(), 2.0);

  // Eval normalizes with the running stats and leaves them alone.
  bn.eval();
  const Tensor z = bn.forward(cg::tensor({{1.0, 2.0}}, false, DType::Float32));
  const double rm0 = 0.38, rv0 = 1.79;
  EXPECT_NEAR(z.at({0, 0}), (1.0 - rm0) / std::sqrt(rv0 + 1e-5), 1e-6);
  EXPECT_EQ(bn.num_batches_tracked.item(), 2.0);
  EXPECT_NEAR(bn.running_mean.at({0}), rm0, 1e-6);
}

TEST(NnBatchNorm, TwoDimensionalStatsAndErrors) {
  nn::BatchNorm2d bn(nn::BatchNormOptions{.num_features = 2, .momentum = 0.5});
  // channel 0 holds 0..7 (mean 3.5, unbiased var 6), channel 1 holds 10 everywhere.
  std::vector<float> v(16);
  for (int n = 0; n < 2; ++n)
    for (int i = 0; i < 4; ++i) {
      v[n * 8 + i] = static_cast<float>(n * 4 + i);
      v[n * 8 + 4 + i] = 10.0f;
    }
  bn.forward(cg::from_vector(std::span<const float>(v), {2, 2, 2, 2}));
  EXPECT_NEAR(bn.running_mean.at({0}), 0.5 * 3.5, 1e-6);
  EXPECT_NEAR(bn.running_mean.at({1}), 0.5 * 10.0, 1e-6);
  EXPECT_NEAR(bn.running_var.at({0}), 0.5 + 0.5 * 6.0, 1e-5);
  EXPECT_NEAR(bn.running_var.at({1}), 0.5, 1e-6);
  expect_error<cg::ShapeError>([&] { bn.forward(cg::zeros({2, 3, 2, 2})); }, {"BatchNorm2d", "[N, C, H, W]", "C = 2"});
  nn::BatchNorm1d bn1(3);
  expect_error<cg::ValueError>([&] { bn1.forward(cg::zeros({1, 3})); }, {"more than one value per channel"});
}

// ---------------------------------------------------------------- Dropout
TEST(NnDropout, TrainDropsAndScalesEvalIsIdentity) {
  cg::Generator gen(42);
  nn::Dropout drop(0.25, &gen);
  const Tensor x = cg::ones({100000});
  const Tensor y = drop.forward(x);
  const auto v = y.to_vector<double>();
  std::int64_t zeros = 0;
  for (double e : v) {
    if (e == 0.0)
      ++zeros;
    else
      EXPECT_NEAR(e, 1.0 / 0.75, 1e-6);
  }
  EXPECT_NEAR(static_cast<double>(zeros) / 100000.0, 0.25, 0.01);
  // A fresh mask each call.
  EXPECT_FALSE(cg::allclose(drop.forward(x), y));
  drop.eval();
  EXPECT_TRUE(drop.forward(x).same(x));
  // Seeded: the same seed gives the same mask.
  cg::Generator g1(7), g2(7);
  nn::Dropout a(0.5, &g1), b(0.5, &g2);
  EXPECT_TRUE(cg::allclose(a.forward(x), b.forward(x)));
  expect_error<cg::ValueError>([] { nn::Dropout bad(1.5); }, {"p must be in [0, 1]", "1.5"});
}

TEST(NnDropout, ModelEvalSwitchesEveryLayer) {
  auto model = nn::build_model("linear(8) dropout(0.5) linear(2)", {4}, 3);
  EXPECT_TRUE(model->is_training());
  model->eval();
  EXPECT_FALSE((*model)[1]->is_training());
  const Tensor x = cg::ones({3, 4});
  EXPECT_TRUE(cg::allclose(model->forward(x), model->forward(x)));
  model->train();
  EXPECT_TRUE((*model)[1]->is_training());
}

// ---------------------------------------------------------------- init
TEST(NnInit, DefaultLinearInitMatchesPyTorchBounds) {
  cg::Generator gen(0);
  nn::Linear fc(nn::LinearOptions{.in = 400, .out = 300}, &gen);
  const double bound = 1.0 / std::sqrt(400.0);
  double sum2 = 0.0;
  for (double w : fc.weight.to_vector<double>()) {
    EXPECT_LE(std::abs(w), bound);
    sum2 += w * w;
  }
  // U(-b, b) has standard deviation b / sqrt(3).
  EXPECT_NEAR(std::sqrt(sum2 / 120000.0), bound / std::sqrt(3.0), 0.01 * bound);
  for (double b : fc.bias.to_vector<double>()) EXPECT_LE(std::abs(b), bound);
  // Same seed, same weights.
  cg::Generator gen2(0);
  nn::Linear fc2(nn::LinearOptions{.in = 400, .out = 300}, &gen2);
  EXPECT_TRUE(cg::allclose(fc.weight, fc2.weight, 0, 0));
}

TEST(NnInit, Initializers) {
  cg::Generator gen(1);
  Tensor w = cg::empty({200, 100, 3, 3});  // fan_in 900, fan_out 1800
  const auto [fi, fo] = nn::init::fan_in_and_fan_out(w);
  EXPECT_EQ(fi, 900);
  EXPECT_EQ(fo, 1800);
  auto stddev = [](const Tensor& t) {
    double s = 0, s2 = 0;
    const auto v = t.to_vector<double>();
    for (double e : v) s += e, s2 += e * e;
    const double m = s / static_cast<double>(v.size());
    return std::sqrt(s2 / static_cast<double>(v.size()) - m * m);
  };
  nn::init::kaiming_normal_(w, {.nonlinearity = nn::init::Nonlinearity::ReLU}, &gen);
  EXPECT_NEAR(stddev(w), std::sqrt(2.0 / 900.0), 0.01 * std::sqrt(2.0 / 900.0));
  nn::init::kaiming_uniform_(w, {.mode = nn::init::FanMode::FanOut, .nonlinearity = nn::init::Nonlinearity::ReLU},
                             &gen);
  EXPECT_NEAR(stddev(w), std::sqrt(2.0 / 1800.0), 0.01 * std::sqrt(2.0 / 1800.0));
  nn::init::xavier_uniform_(w, 1.0, &gen);
  EXPECT_NEAR(stddev(w), std::sqrt(2.0 / 2700.0), 0.01 * std::sqrt(2.0 / 2700.0));
  nn::init::xavier_normal_(w, 2.0, &gen);
  EXPECT_NEAR(stddev(w), 2.0 * std::sqrt(2.0 / 2700.0), 0.02 * std::sqrt(2.0 / 2700.0));
  nn::init::normal_(w, 3.0, 0.5, &gen);
  EXPECT_NEAR(cg::mean(w).item(), 3.0, 0.01);
  nn::init::zeros_(w);
  EXPECT_EQ(cg::abs(w).sum().item(), 0.0);
  EXPECT_NEAR(nn::init::calculate_gain(nn::init::Nonlinearity::Tanh), 5.0 / 3.0, 1e-12);
  EXPECT_NEAR(nn::init::calculate_gain(nn::init::Nonlinearity::LeakyReLU, std::sqrt(5.0)), std::sqrt(1.0 / 3.0), 1e-12);
  // Initializers write into parameters even while grad mode is on.
  nn::Linear fc(3, 2);
  nn::init::ones_(fc.weight);
  EXPECT_EQ(fc.weight.sum().item(), 6.0);
  EXPECT_TRUE(fc.weight.requires_grad());
  expect_error<cg::ValueError>([] { nn::init::xavier_uniform_(cg::empty({5})); }, {"at least 2 dimensions", "[5]"});
}

// ---------------------------------------------------------------- state dict
TEST(NnStateDict, RoundTripsAndReportsMismatches) {
  auto a = nn::build_model("linear(16) relu linear(3)", {5}, 1);
  auto b = nn::build_model("linear(16) relu linear(3)", {5}, 2);
  const Tensor x = cg::randn({4, 5});
  EXPECT_FALSE(cg::allclose(a->forward(x), b->forward(x)));
  const Tensor b_weight = b->parameters()[0];
  b->load_state_dict(a->state_dict());
  EXPECT_TRUE(cg::allclose(a->forward(x), b->forward(x), 0, 0));
  EXPECT_TRUE(b->parameters()[0].same(b_weight));  // copied in place, not replaced
  EXPECT_TRUE(b_weight.requires_grad());

  auto mlp = nn::build_model("linear(256) relu linear(256) relu linear(10)", {1, 28, 28}, 0);
  auto other = nn::build_model("linear(10)", {1, 28, 28}, 0);
  expect_error<cg::ValueError>([&] { mlp->load_state_dict(other->state_dict(), /*strict=*/false); },
                               {"size mismatch for 0.weight", "[10, 784]", "[256, 784]", "0.bias", "[10]", "[256]"});
  // Nothing was written by the failed load.
  EXPECT_EQ(mlp->parameters()[1].shape(), (cg::Dims{256}));

  auto small = nn::build_model("linear(16) relu linear(3)", {5}, 3);
  nn::NamedTensors partial = a->state_dict();
  partial.pop_back();                                     // 2.bias missing
  partial.emplace_back("9.weight", cg::zeros({1}));       // unexpected
  expect_error<cg::ValueError>([&] { small->load_state_dict(partial); },
                               {"missing key(s): \"2.bias\"", "unexpected key(s): \"9.weight\""});
  partial.pop_back();
  small->load_state_dict(partial, /*strict=*/false);  // missing keys are fine when not strict
  EXPECT_TRUE(cg::allclose(small->parameters()[0], a->parameters()[0], 0, 0));
}

TEST(NnStateDict, ToDtypeKeepsHandlesAndConvertsBuffers) {
  auto model = nn::build_model("linear(4) batchnorm relu linear(2)", {3}, 0);
  const Tensor w0 = model->parameters()[0];
  model->forward(cg::randn({5, 3}));
  const double rm = model->named_buffers()[0].second.at({1});
  model->to(DType::Float64);
  EXPECT_EQ(w0.dtype(), DType::Float64);  // the same handle now holds float64
  EXPECT_TRUE(model->at<nn::Linear>(0)->weight.same(w0));
  const auto buffers = model->named_buffers();
  EXPECT_EQ(buffers[0].second.dtype(), DType::Float64);
  EXPECT_NEAR(buffers[0].second.at({1}), rm, 1e-7);
  EXPECT_EQ(buffers[2].second.dtype(), DType::Int64);  // num_batches_tracked stays int64
  const Tensor y = model->forward(cg::randn({5, 3}, {.dtype = DType::Float64}));
  EXPECT_EQ(y.dtype(), DType::Float64);
  y.sum().backward();
  EXPECT_EQ(w0.grad().dtype(), DType::Float64);
  model->zero_grad();
  EXPECT_FALSE(w0.grad().defined());
}

// ---------------------------------------------------------------- model spec
TEST(NnSpec, CanonicalRoundTrip) {
  const std::string messy =
      "Conv2d(32, 3, padding=1)  relu maxpool2d(2,2) conv2d(8,5,2,1,bias=false) flatten dropout "
      "linear(10, bias=false) leaky_relu(0.01) leaky_relu(0.2) batchnorm(eps=0.001) softmax";
  const std::string canonical = nn::canonical_spec(messy);
  EXPECT_EQ(canonical,
            "conv2d(32,3,pad=1) relu maxpool2d(2) conv2d(8,5,stride=2,pad=1,bias=false) flatten dropout(0.5) "
            "linear(10,bias=false) leaky_relu leaky_relu(0.2) batchnorm(eps=0.001) softmax");
  EXPECT_EQ(nn::canonical_spec(canonical), canonical);
  EXPECT_EQ(nn::canonical_spec("maxpool2d(3,stride=1) avgpool2d(2, 1)"), "maxpool2d(3,stride=1) avgpool2d(2,stride=1)");
  const auto spec = nn::ModelSpec::parse("conv2d(8,3,stride=2,pad=1,dilation=2)");
  ASSERT_EQ(spec.layers.size(), 1u);
  EXPECT_EQ(spec.layers[0].arg("dilation", 0), 2.0);
  EXPECT_EQ(nn::output_shape(nn::ModelSpec::parse("conv2d(8,3,stride=2,pad=1) maxpool2d(2) flatten"), {3, 32, 32}),
            (cg::Dims{8 * 8 * 8}));
}

TEST(NnSpec, ErrorsNameTheToken) {
  auto bad = [](const std::string& spec, std::initializer_list<std::string_view> words, cg::Dims shape = {1, 28, 28}) {
    expect_error<cg::ValueError>([&] { nn::build_model(spec, shape, 0); }, words);
  };
  bad("lineer(256) relu", {"unknown layer 'lineer(256)' at token 1", "expected one of linear(N)", "did you mean 'linear'"});
  bad("linear(256) rleu", {"unknown layer 'rleu' at token 2"});
  bad("linear(-3)", {"'linear(-3)' at token 1", "positive integer", "-3", "usage: linear(N"});
  bad("linear(2.5)", {"positive integer", "2.5"});
  bad("linear(abc)", {"must be a number", "'abc'"});
  bad("linear", {"missing the number of output features", "token 1"});
  bad("conv2d(32)", {"missing the kernel size", "'conv2d(32)' at token 1", "usage: conv2d(C,K"});
  bad("conv2d(32,3,foo=1)", {"unknown argument 'foo'", "stride"});
  bad("conv2d(32,3,pad=1,4)", {"positional argument after a keyword"});
  bad("linear(3,4)", {"too many arguments"});
  bad("relu(3)", {"'relu' takes no arguments"});
  bad("dropout(1.5)", {"in [0, 1)", "1.5"});
  bad("conv2d(8,3", {"missing ')'"});
  bad("", {"no layers given"});
  bad("flatten conv2d(8,3)", {"'conv2d(8,3)' at token 2", "[C, H, W]", "[784]", "'flatten' at token 1"});
  bad("conv2d(8,3) linear(10)", {"'linear(10)' at token 2", "flat per-sample input", "[8, 26, 26]", "insert 'flatten'"});
  bad("conv2d(8,29)", {"too small"});
  bad("maxpool2d(2) maxpool2d(2) maxpool2d(2) maxpool2d(2) maxpool2d(2)", {"token 5", "smaller than the pooling window"});
  bad("linear(10) conv2d(8,3)", {"[C, H, W]", "[10]"});
  bad("linear(10)", {"per-sample input shape"}, cg::Dims{});
}

TEST(NnSpec, AutoFlattenOnlyAfterElementwiseLayers) {
  auto m = nn::build_model("dropout(0.1) linear(5)", {2, 3}, 0);
  EXPECT_TRUE(m->flatten_input());
  EXPECT_EQ(names_of(m->state_dict()), (std::vector<std::string>{"1.weight", "1.bias"}));
  EXPECT_EQ(m->forward(cg::zeros({4, 2, 3})).shape(), (cg::Dims{4, 5}));
  auto flat = nn::build_model("linear(5) relu", {6}, 0);
  EXPECT_FALSE(flat->flatten_input());
  // A seeded build is reproducible.
  auto a = nn::build_model("linear(5)", {6}, 9), b = nn::build_model("linear(5)", {6}, 9);
  EXPECT_TRUE(cg::allclose(a->parameters()[0], b->parameters()[0], 0, 0));
}

// ---------------------------------------------------------------- fused linear + relu
// linear_relu against relu(linear(...)): values and all three gradients, in both dtypes, with and
// without a bias, on the shapes where float32 runs on the matmul primitive with the bias and relu
// in its epilogue (64 rows and more, dense) and where it does not (5 rows; float64), 2-D and 3-D,
// on one and two threads.
TEST(Fusion, LinearReluMatchesItsComposition) {
  const int saved = cg::get_num_threads();
  cg::Generator gen(21);
  struct Shape {
    cg::Dims x;
    std::int64_t out;
  };
  for (const int threads : {1, 2}) {
    cg::set_num_threads(threads);
    for (const DType dtype : {DType::Float32, DType::Float64}) {
      for (const Shape& s : {Shape{{64, 70}, 48}, Shape{{2, 40, 70}, 48}, Shape{{5, 7}, 3}}) {
        for (const bool with_bias : {true, false}) {
          const std::int64_t in = s.x.back();
          const cg::TensorOptions o{.dtype = dtype, .requires_grad = true};
          Tensor x = cg::randn(s.x, o, &gen), w = cg::randn({s.out, in}, o, &gen);
          Tensor b = with_bias ? cg::randn({s.out}, o, &gen) : Tensor();
          const Tensor r = cg::randn(s.x.size() == 2 ? cg::Dims{s.x[0], s.out} : cg::Dims{s.x[0], s.x[1], s.out},
                                     {.dtype = dtype}, &gen);
          std::vector<Tensor> fused, composed;
          for (const bool fuse : {true, false}) {
            const Tensor y = fuse ? cg::linear_relu(x, w, b) : cg::relu(cg::linear(x, w, b));
            std::vector<Tensor> inputs{x, w};
            if (with_bias) inputs.push_back(b);
            auto g = cg::autograd::grad({cg::sum(cg::mul(y, r))}, inputs);
            g.insert(g.begin(), y.detach());
            (fuse ? fused : composed) = g;
          }
          const double tol = dtype == DType::Float32 ? 1e-5 : 1e-12;
          const char* names[] = {"y", "dx", "dW", "db"};
          for (std::size_t i = 0; i < fused.size(); ++i)
            EXPECT_TRUE(cg::allclose(fused[i], composed[i], tol, tol))
                << names[i] << ", " << dtype << ", x " << cg::to_string(s.x) << (with_bias ? "" : ", no bias") << ", "
                << threads << " threads";
        }
      }
    }
  }
  cg::set_num_threads(saved);
}

// cross_entropy is one node (Note [cross_entropy in one node], loss.cpp): its loss and its
// gradient match nll(log_softmax(z)) built from primitives, and the gradient matches the formula
// (softmax(z) - q) g / N worked out in double, with and without label smoothing, on contiguous
// and transposed logits, on the plain backward's path and under create_graph.
TEST(Fusion, CrossEntropyMatchesItsCompositionAndTheFormula) {
  cg::Generator gen(23);
  const std::int64_t N = 37, C = 10;
  std::vector<std::int64_t> labels(N);
  for (std::int64_t n = 0; n < N; ++n) labels[static_cast<std::size_t>(n)] = (n * 7) % C;
  const Tensor target = cg::from_vector(labels, {N});
  for (const DType dtype : {DType::Float32, DType::Float64}) {
    for (const double eps : {0.0, 0.1}) {
      for (const bool transposed : {false, true}) {
        for (const bool create_graph : {false, true}) {
          const Tensor base = cg::mul(cg::randn(transposed ? cg::Dims{C, N} : cg::Dims{N, C}, {.dtype = dtype}, &gen),
                                      cg::full({}, 3.0, {.dtype = dtype}));
          Tensor z = (transposed ? cg::transpose(base, 0, 1) : base).detach();
          z.requires_grad_();
          const std::string where = std::string(cg::dtype_name(dtype)) + ", smoothing " + std::to_string(eps) +
                                    (transposed ? ", transposed" : "") + (create_graph ? ", create_graph" : "");
          const Tensor fused = cg::cross_entropy(z, target, eps);
          const Tensor logp = cg::log_softmax(z, 1);
          const Tensor composed = cg::add(
              cg::mul(cg::neg(cg::mean(cg::gather(logp, 1, cg::unsqueeze(target, 1)))), cg::full({}, 1.0 - eps, {.dtype = dtype})),
              cg::mul(cg::neg(cg::mean(logp)), cg::full({}, eps, {.dtype = dtype})));
          const double tol = dtype == DType::Float32 ? 2e-6 : 1e-13;
          EXPECT_NEAR(fused.item(), composed.item(), tol * std::abs(composed.item())) << where;
          const Tensor g_fused = cg::autograd::grad({cg::mul(fused, cg::full({}, 2.5, {.dtype = dtype}))}, {z}, {},
                                                    false, create_graph)[0];
          const Tensor g_composed = cg::autograd::grad({cg::mul(composed, cg::full({}, 2.5, {.dtype = dtype}))}, {z})[0];
          EXPECT_TRUE(cg::allclose(g_fused, g_composed, tol, tol)) << where;
          EXPECT_EQ(g_fused.requires_grad(), create_graph) << where;
          // The formula, from z's values in double.
          const auto zv = z.to_vector<double>(), gv = g_fused.to_vector<double>();
          for (std::int64_t n = 0; n < N; ++n) {
            double m = -INFINITY, s = 0;
            for (std::int64_t c = 0; c < C; ++c) m = std::max(m, zv[static_cast<std::size_t>(n * C + c)]);
            for (std::int64_t c = 0; c < C; ++c) s += std::exp(zv[static_cast<std::size_t>(n * C + c)] - m);
            for (std::int64_t c = 0; c < C; ++c) {
              const double p = std::exp(zv[static_cast<std::size_t>(n * C + c)] - m) / s;
              const double q = (c == labels[static_cast<std::size_t>(n)] ? 1.0 - eps : 0.0) + eps / C;
              ASSERT_NEAR(gv[static_cast<std::size_t>(n * C + c)], 2.5 * (p - q) / N, tol * 10)
                  << where << ", row " << n << ", class " << c;
            }
          }
        }
      }
    }
  }
}

// A NaN reaching linear_relu comes out 0, as from relu, on the matmul primitive's path (float32,
// 64 rows, 32 outputs: oneDNN's relu) and on the other (float64: chaingrad's pass after the product).
TEST(Fusion, LinearReluGivesZeroForANaNAsReluDoes) {
  for (const DType dtype : {DType::Float32, DType::Float64}) {
    std::vector<double> xs(64 * 8, 1.0);
    xs[8] = std::nan("");  // row 1
    const Tensor x = cg::from_vector(xs, {64, 8}, {.dtype = dtype}), w = cg::ones({32, 8}, {.dtype = dtype});
    const auto y = cg::linear_relu(x, w).to_vector<double>();
    const auto composed = cg::relu(cg::linear(x, w)).to_vector<double>();
    for (int j = 0; j < 32; ++j) {
      EXPECT_EQ(y[32 + j], 0.0) << dtype << ", column " << j;
      EXPECT_EQ(composed[32 + j], 0.0) << dtype << ", column " << j;
      EXPECT_EQ(y[j], 8.0) << dtype;
    }
  }
}

// Sequential runs a Linear followed by a ReLU as one linear_relu node, with the values and
// gradients of the two; other pairs run as they are.
TEST(Fusion, SequentialRunsLinearThenReluAsOneOp) {
  cg::Generator g1(5), g2(5), data(6);
  nn::Sequential fused{nn::Linear(6, 8, true, &g1), nn::ReLU(), nn::Linear(8, 3, true, &g1), nn::Sigmoid()};
  nn::Linear a(6, 8, true, &g2), b(8, 3, true, &g2);
  const Tensor x = cg::randn({40, 6}, {}, &data);
  const Tensor y = fused(x);
  ASSERT_TRUE(y.grad_fn());
  EXPECT_STREQ(y.grad_fn()->name(), "sigmoid");
  const cg::Node* second = y.grad_fn()->next_edges()[0].get();
  EXPECT_STREQ(second->name(), "linear");
  EXPECT_STREQ(second->next_edges()[0]->name(), "linear_relu");
  const Tensor expected = cg::sigmoid(b.forward(cg::relu(a.forward(x))));
  EXPECT_TRUE(cg::allclose(y, expected, 1e-6, 1e-7));
  cg::sum(y).backward();
  cg::sum(expected).backward();
  const auto fp = fused.parameters();
  const std::vector<Tensor> ep{a.weight, a.bias, b.weight, b.bias};
  for (std::size_t i = 0; i < ep.size(); ++i)
    EXPECT_TRUE(cg::allclose(fp[i].grad(), ep[i].grad(), 1e-5, 1e-7)) << "parameter " << i;
}
