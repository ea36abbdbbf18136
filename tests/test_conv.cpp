// conv2d, its adjoints and max_pool2d on CNN-sized shapes, against compositions of simpler ops.
// The op registry gradient-checks every op on small shapes; these cases are large enough to reach
// the kernels' chunking (several samples per GEMM, a short last chunk), the flat-row im2col, the
// single-sample path and the 2x2 pooling fast path, in float64 and float32.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "chaingrad/chaingrad.hpp"
#include "test_util.hpp"

namespace chaingrad {
namespace {

struct ConvCase {
  Dims x, w;
  std::int64_t stride, pad, dil;
  bool bias;
};

// conv2d as the composition it used to be: one GEMM over all im2col columns, then a permute.
Tensor reference_conv(const Tensor& x, const Tensor& w, const Tensor& b, std::int64_t stride, std::int64_t pad,
                      std::int64_t dil) {
  const std::int64_t O = w.shape()[0], kh = w.shape()[2], kw = w.shape()[3];
  const Tensor cols = im2col(x, kh, kw, stride, pad, dil);
  const std::int64_t Ho = (x.shape()[2] + 2 * pad - dil * (kh - 1) - 1) / stride + 1;
  const std::int64_t Wo = (x.shape()[3] + 2 * pad - dil * (kw - 1) - 1) / stride + 1;
  Tensor y = permute(reshape(mm(reshape(w, {O, -1}), cols), {O, x.shape()[0], Ho, Wo}), {1, 0, 2, 3});
  return b.defined() ? y + reshape(b, {1, O, 1, 1}) : contiguous(y);
}

const ConvCase kCases[] = {
    {{5, 1, 28, 28}, {32, 1, 3, 3}, 1, 1, 1, true},   // the CNN's first layer; N = 5 leaves a short chunk
    {{5, 32, 14, 14}, {64, 32, 3, 3}, 1, 1, 1, true},  // the second layer
    {{1, 32, 14, 14}, {16, 32, 3, 3}, 1, 1, 1, true},  // one sample: the GEMM writes NCHW directly
    {{3, 4, 9, 8}, {6, 4, 3, 3}, 2, 1, 1, false},     // stride 2: the general im2col
    {{4, 8, 7, 7}, {5, 8, 1, 1}, 1, 0, 1, true},       // 1x1 kernel
    {{3, 24, 5, 5}, {6, 24, 1, 1}, 1, 0, 1, true},     // 1x1 kernel, 3 samples in one chunk
    {{1, 24, 5, 5}, {6, 24, 1, 1}, 1, 0, 1, false},    // 1x1, one sample: the image is the column matrix
    {{3, 3, 10, 11}, {4, 3, 3, 3}, 1, 2, 2, true},     // dilation 2, "same" padding: flat rows shifted by 2
    {{2, 2, 6, 5}, {3, 2, 5, 3}, 1, 1, 1, true},       // uneven kernel, Wo != W
};

class ConvAgainstReference : public ::testing::TestWithParam<int> {};

TEST_P(ConvAgainstReference, ForwardAndGradientsMatchTheComposition) {
  const ConvCase& c = kCases[GetParam()];
  Generator gen(100 + GetParam());
  const TensorOptions f64{.dtype = DType::Float64};
  Tensor x = randn(c.x, f64, &gen).requires_grad_();
  Tensor w = randn(c.w, f64, &gen).requires_grad_();
  Tensor b = c.bias ? randn({c.w[0]}, f64, &gen).requires_grad_() : Tensor();
  const Tensor y = conv2d(x, w, b, c.stride, c.pad, c.dil);
  const Tensor y_ref = reference_conv(x, w, b, c.stride, c.pad, c.dil);
  ASSERT_EQ(y.shape(), y_ref.shape());
  EXPECT_TRUE(allclose(y, y_ref, 1e-10, 1e-10));

  const Tensor r = randn(y.shape(), f64, &gen);
  std::vector<Tensor> wrt{x, w};
  if (b.defined()) wrt.push_back(b);
  const auto g = autograd::grad({sum(y * r)}, wrt);
  const auto g_ref = autograd::grad({sum(y_ref * r)}, wrt);
  for (std::size_t i = 0; i < wrt.size(); ++i)
    EXPECT_TRUE(allclose(g[i], g_ref[i], 1e-10, 1e-10)) << "gradient " << i;

  // float32 runs the same kernels in single precision.
  NoGradGuard ng;
  const Tensor y32 = conv2d(x.to(DType::Float32), w.to(DType::Float32), b.defined() ? b.to(DType::Float32) : Tensor(),
                            c.stride, c.pad, c.dil);
  EXPECT_EQ(y32.dtype(), DType::Float32);
  EXPECT_TRUE(allclose(y32.to(DType::Float64), y.detach(), 1e-4, 1e-4));
  const Tensor gx32 = conv2d_backward_input(r.to(DType::Float32), w.detach().to(DType::Float32), c.x, c.stride,
                                            c.pad, c.dil);
  EXPECT_TRUE(allclose(gx32.to(DType::Float64), g[0], 1e-4, 1e-4));
  const Tensor gw32 = conv2d_backward_weight(r.to(DType::Float32), x.detach().to(DType::Float32), c.w, c.stride,
                                             c.pad, c.dil);
  EXPECT_TRUE(allclose(gw32.to(DType::Float64), g[1], 1e-4, 1e-3));
}

INSTANTIATE_TEST_SUITE_P(Shapes, ConvAgainstReference,
                         ::testing::Range(0, static_cast<int>(std::size(kCases))));

TEST(Conv2d, InputGradientIsNotComputedForAConstantInput) {
  // The first layer of a CNN sees the data, which needs no gradient: its node must not ask for one.
  const Tensor x = randn({2, 1, 6, 6});
  Tensor w = randn({3, 1, 3, 3}).requires_grad_();
  const Tensor y = conv2d(x, w, {}, 1, 1);
  ASSERT_TRUE(y.grad_fn());
  EXPECT_FALSE(y.grad_fn()->needs_grad(0));
  EXPECT_TRUE(y.grad_fn()->needs_grad(1));
  sum(y).backward();
  EXPECT_FALSE(x.grad().defined());
  EXPECT_TRUE(w.grad().defined());
}

TEST(Conv2d, ErrorsNameTheShapesAndDtypes) {
  const Tensor x = randn({2, 3, 5, 5}), w = randn({4, 3, 3, 3});
  testing::expect_error<ShapeError>([&] { conv2d(x, randn({4, 2, 3, 3})); }, {"conv2d", "[2, 3, 5, 5]", "[4, 2, 3, 3]"});
  testing::expect_error<ShapeError>([&] { conv2d(x, w, randn({3})); }, {"conv2d", "bias", "[3]", "4"});
  testing::expect_error<TypeError>([&] { conv2d(x, w.to(DType::Float64)); }, {"conv2d", "float32", "float64"});
  testing::expect_error<ShapeError>([&] { conv2d_backward_input(randn({2, 4, 5, 5}), w, {2, 3, 5, 5}); },
                                    {"conv2d_backward_input", "[2, 4, 5, 5]", "[2, 4, 3, 3]"});
  testing::expect_error<ShapeError>([&] { conv2d_backward_weight(randn({2, 4, 3, 3}), x, {4, 3, 3, 3}, 1, 1); },
                                    {"conv2d_backward_weight", "[2, 4, 3, 3]", "[2, 4, 5, 5]"});
}

// Max pooling as a composition: the maximum over each window's im2col column.
Tensor reference_max_pool(const Tensor& x, std::int64_t k, std::int64_t s) {
  const Dims& d = x.shape();
  const std::int64_t Ho = (d[2] - k) / s + 1, Wo = (d[3] - k) / s + 1;
  return reshape(amax(im2col(reshape(x, {d[0] * d[1], 1, d[2], d[3]}), k, k, s, 0, 1), {0}), {d[0], d[1], Ho, Wo});
}

TEST(MaxPool2d, MatchesTheCompositionOnCnnShapes) {
  Generator gen(7);
  for (const auto& [shape, k, s] : {std::tuple{Dims{4, 32, 28, 28}, 2, 2}, std::tuple{Dims{3, 5, 15, 13}, 2, 2},
                                    std::tuple{Dims{2, 3, 11, 9}, 3, 2}}) {
    for (DType dt : {DType::Float64, DType::Float32}) {
      Tensor x = randn(shape, {.dtype = dt}, &gen).requires_grad_();
      const Tensor y = max_pool2d(x, k, s), y_ref = reference_max_pool(x, k, s);
      ASSERT_EQ(y.shape(), y_ref.shape());
      EXPECT_TRUE(allclose(y, y_ref, 0, 0)) << shape;
      // Random data has no ties, so amax's shared-gradient rule and first-max agree.
      const Tensor r = randn(y.shape(), {.dtype = dt}, &gen);
      const auto g = autograd::grad({sum(y * r)}, {x});
      const auto g_ref = autograd::grad({sum(y_ref * r)}, {x});
      EXPECT_TRUE(allclose(g[0], g_ref[0], 1e-6, 1e-6)) << shape;  // overlapping windows sum in another order
    }
  }
}

TEST(MaxPool2d, TwoByTwoTakesTheFirstMaximumAndSkipsNaN) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  // Windows: [1 5; 5 0] (a tie: the first 5 wins), [nan 1; 1 2] (a leading NaN stays, as in the
  // general loop), [2 2; 3 2] and [2 0; nan 7] (a later NaN is skipped).
  const std::vector<double> v{1, 5, nan, 1, 5, 0, 1, 2, 2, 2, 2, 0, 3, 2, nan, 7};
  Tensor x = from_vector(std::span<const double>(v), {1, 1, 4, 4}, {.dtype = DType::Float64}).requires_grad_();
  const Tensor y = max_pool2d(x, 2);
  const double* py = y.data<double>();
  EXPECT_EQ(py[0], 5);
  EXPECT_TRUE(std::isnan(py[1]));
  EXPECT_EQ(py[2], 3);
  EXPECT_EQ(py[3], 7);
  const auto g = autograd::grad({sum(y)}, {x});
  const std::vector<double> expected{0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1};
  EXPECT_TRUE(allclose(g[0], from_vector(std::span<const double>(expected), {1, 1, 4, 4}, {.dtype = DType::Float64}), 0, 0));
}

TEST(MaxPool2d, BackwardChecksItsIndices) {
  const Tensor g = randn({1, 1, 1, 2});
  testing::expect_error<ShapeError>(
      [&] { max_pool2d_backward(g, from_vector(std::span<const std::int64_t>(std::vector<std::int64_t>{0, 16}), {1, 1, 1, 2}), {1, 1, 4, 4}); },
      {"max_pool2d_backward", "16", "[0, 16)"});
  testing::expect_error<TypeError>([&] { max_pool2d_backward(g, g, {1, 1, 4, 4}); }, {"max_pool2d_backward", "int64"});
}

}  // namespace
}  // namespace chaingrad
