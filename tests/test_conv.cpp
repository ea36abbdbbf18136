// conv2d, its adjoints and max_pool2d on CNN-sized shapes, against compositions of simpler ops.
// The op registry gradient-checks every op on small shapes; these cases are large enough to reach
// the kernels' chunking (several samples per GEMM, a short last chunk), the flat-row im2col, the
// single-sample path and the 2x2 pooling fast path, in float64 and float32.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "chaingrad/chaingrad.hpp"
// The kernels themselves, to hold the float32 oneDNN path against im2col + GEMM on raw buffers.
#include "kernels/cpu/conv_kernels.hpp"
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

TEST_P(ConvAgainstReference, Float32GradientsThroughTheGraph) {
  // conv2d's node computes the weight and bias gradients in one kernel call when no graph is built
  // through them; in float32 that call is oneDNN's, with the bias gradient summed by oneDNN.
  const ConvCase& c = kCases[GetParam()];
  Generator gen(300 + GetParam());
  const TensorOptions f64{.dtype = DType::Float64};
  Tensor x = randn(c.x, f64, &gen).requires_grad_(), w = randn(c.w, f64, &gen).requires_grad_();
  Tensor b = randn({c.w[0]}, f64, &gen).requires_grad_();
  const Tensor y = conv2d(x, w, b, c.stride, c.pad, c.dil);
  const Tensor r = randn(y.shape(), f64, &gen);
  const auto g = autograd::grad({sum(y * r)}, {x, w, b});
  Tensor x32 = x.detach().to(DType::Float32).requires_grad_(), w32 = w.detach().to(DType::Float32).requires_grad_();
  Tensor b32 = b.detach().to(DType::Float32).requires_grad_();
  const Tensor y32 = conv2d(x32, w32, b32, c.stride, c.pad, c.dil);
  const auto g32 = autograd::grad({sum(y32 * r.to(DType::Float32))}, {x32, w32, b32});
  EXPECT_TRUE(allclose(g32[0].to(DType::Float64), g[0], 1e-4, 1e-4));
  EXPECT_TRUE(allclose(g32[1].to(DType::Float64), g[1], 1e-4, 1e-3));
  EXPECT_TRUE(allclose(g32[2].to(DType::Float64), g[2], 1e-4, 1e-3));
  // Without the input's gradient the node takes the same fused call.
  const Tensor y32c = conv2d(x32.detach(), w32, b32, c.stride, c.pad, c.dil);
  const auto g32c = autograd::grad({sum(y32c * r.to(DType::Float32))}, {w32, b32});
  EXPECT_TRUE(allclose(g32c[0], g32[1], 0, 0));
  EXPECT_TRUE(allclose(g32c[1], g32[2], 0, 0));
}

INSTANTIATE_TEST_SUITE_P(Shapes, ConvAgainstReference,
                         ::testing::Range(0, static_cast<int>(std::size(kCases))));

// float32 conv2d runs on oneDNN's direct convolution where it takes the shape, in blocks of samples
// over chaingrad's pool (src/kernels/cpu/conv_onednn.hpp). Each pass is held against the im2col +
// GEMM kernels on the same float32 data, and must give bitwise the same result on 1, 2 and 3
// threads (the blocks and the order of the weight gradient's sum depend on the shape only).
// The op has no groups; stride, padding and dilation are covered.
struct KernelCase {
  std::int64_t N, C, H, W, O, kh, kw, stride, pad, dil;
};

const KernelCase kKernelCases[] = {
    {64, 1, 28, 28, 32, 3, 3, 1, 1, 1},   // the CNN's first layer, a full batch: 8 blocks of 8
    {64, 32, 14, 14, 64, 3, 3, 1, 1, 1},  // the second layer
    {13, 32, 14, 14, 64, 3, 3, 1, 1, 1},  // blocks of 2 and a last block of 1
    {1, 32, 14, 14, 16, 3, 3, 1, 1, 1},   // one sample
    {1, 1, 28, 28, 32, 3, 3, 1, 1, 1},    // one sample, one channel
    {5, 3, 11, 9, 7, 3, 3, 2, 1, 1},      // odd sizes and channel counts, stride 2
    {4, 17, 9, 13, 19, 3, 5, 1, 2, 1},    // uneven kernel, channels past one block of 16
    {3, 5, 10, 11, 6, 3, 3, 1, 2, 2},     // dilation 2
    {6, 8, 15, 15, 12, 5, 5, 3, 2, 2},    // stride 3 with dilation 2
    {9, 24, 7, 7, 40, 1, 1, 1, 0, 1},     // 1x1 kernel
    {2, 16, 8, 8, 16, 2, 2, 2, 0, 1},     // 2x2 stride 2, no padding
    {7, 2, 5, 6, 3, 5, 5, 1, 0, 1},       // a kernel as large as the image
    {3, 4, 6, 6, 5, 3, 3, 1, 4, 1},       // padding larger than the kernel
};

std::vector<float> random_floats(std::int64_t n, Generator& gen) {
  const Tensor t = randn({n}, {}, &gen);
  return std::vector<float>(t.data<float>(), t.data<float>() + n);
}

// |a - b| <= tol * (largest |b| + 1), elementwise, over vectors of one length.
::testing::AssertionResult close_to(const std::vector<float>& a, const std::vector<float>& b, double tol) {
  double scale = 1;
  for (float v : b) scale = std::max(scale, static_cast<double>(std::fabs(v)));
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!(std::fabs(static_cast<double>(a[i]) - b[i]) <= tol * scale))
      return ::testing::AssertionFailure() << "element " << i << ": " << a[i] << " vs " << b[i] << " (scale " << scale
                                           << ")";
  return ::testing::AssertionSuccess();
}

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

class ConvKernels : public ::testing::TestWithParam<int> {};

TEST_P(ConvKernels, Float32MatchesIm2colOnAnyThreadCount) {
  const KernelCase& c = kKernelCases[GetParam()];
  kernels::ConvShape s{c.N, c.C, c.H, c.W, c.O, c.kh, c.kw, c.stride, c.pad, c.dil, 0, 0};
  s.Ho = (c.H + 2 * c.pad - c.dil * (c.kh - 1) - 1) / c.stride + 1;
  s.Wo = (c.W + 2 * c.pad - c.dil * (c.kw - 1) - 1) / c.stride + 1;
  ASSERT_GT(s.Ho, 0);
  ASSERT_GT(s.Wo, 0);
  Generator gen(500 + GetParam());
  const std::int64_t nx = s.N * s.C * s.H * s.W, nw = s.O * s.ckk(), ny = s.N * s.O * s.Ho * s.Wo;
  const std::vector<float> x = random_floats(nx, gen), w = random_floats(nw, gen), b = random_floats(s.O, gen),
                           g = random_floats(ny, gen);
  // Sums of K = C*kh*kw (forward, input gradient) or N*Ho*Wo (weight gradient) products in another
  // order: float32 rounding grows like sqrt(K).
  const double tol = 1e-5;
  std::vector<float> y_ref(ny), dx_ref(nx), dw_ref(nw), db_ref(s.O);
  kernels::conv2d_forward_im2col<float>(s, x.data(), w.data(), b.data(), y_ref.data());
  kernels::conv2d_backward_input_im2col<float>(s, g.data(), w.data(), dx_ref.data());
  kernels::conv2d_backward_weight_im2col<float>(s, g.data(), x.data(), dw_ref.data());
  kernels::conv2d_backward_bias<float>(s, g.data(), db_ref.data());

  const int saved = get_num_threads();
  std::vector<float> y1, dx1, dw1, y1_nobias, dwb1, db1;
  for (int threads : {1, 2, 3}) {
    set_num_threads(threads);
    std::vector<float> y(ny, std::nanf("")), y_nobias(ny, std::nanf("")), dx(nx, std::nanf("")),
        dw(nw, std::nanf("")), dwb(nw, std::nanf("")), db(s.O, std::nanf(""));
    kernels::conv2d_forward<float>(s, x.data(), w.data(), b.data(), y.data());
    kernels::conv2d_forward<float>(s, x.data(), w.data(), nullptr, y_nobias.data());
    kernels::conv2d_backward_input<float>(s, g.data(), w.data(), dx.data());
    kernels::conv2d_backward_weight<float>(s, g.data(), x.data(), dw.data());
    kernels::conv2d_backward_weight<float>(s, g.data(), x.data(), dwb.data(), db.data());  // with the bias gradient
    EXPECT_TRUE(close_to(y, y_ref, tol)) << "forward, " << threads << " threads";
    std::vector<float> y_ref_nobias = y_ref;
    for (std::int64_t n = 0; n < s.N; ++n)
      for (std::int64_t o = 0; o < s.O; ++o)
        for (std::int64_t p = 0; p < s.Ho * s.Wo; ++p) y_ref_nobias[(n * s.O + o) * s.Ho * s.Wo + p] -= b[o];
    EXPECT_TRUE(close_to(y_nobias, y_ref_nobias, tol)) << "forward without bias, " << threads << " threads";
    EXPECT_TRUE(close_to(dx, dx_ref, tol)) << "input gradient, " << threads << " threads";
    EXPECT_TRUE(close_to(dw, dw_ref, 10 * tol)) << "weight gradient, " << threads << " threads";
    EXPECT_TRUE(bitwise_equal(dwb, dw)) << "weight gradient with the bias gradient, " << threads << " threads";
    EXPECT_TRUE(close_to(db, db_ref, 10 * tol)) << "bias gradient, " << threads << " threads";
    if (threads == 1) {
      y1 = y, y1_nobias = y_nobias, dx1 = dx, dw1 = dw, dwb1 = dwb, db1 = db;
    } else {
      EXPECT_TRUE(bitwise_equal(y, y1)) << "forward differs between 1 and " << threads << " threads";
      EXPECT_TRUE(bitwise_equal(y_nobias, y1_nobias)) << "forward differs between 1 and " << threads << " threads";
      EXPECT_TRUE(bitwise_equal(dx, dx1)) << "input gradient differs between 1 and " << threads << " threads";
      EXPECT_TRUE(bitwise_equal(dw, dw1)) << "weight gradient differs between 1 and " << threads << " threads";
      EXPECT_TRUE(bitwise_equal(db, db1)) << "bias gradient differs between 1 and " << threads << " threads";
    }
  }
  set_num_threads(saved);
}

INSTANTIATE_TEST_SUITE_P(Shapes, ConvKernels, ::testing::Range(0, static_cast<int>(std::size(kKernelCases))));

// A naive float64 loop, the definition itself, against the float32 kernels on one odd case.
TEST(ConvKernels, Float32MatchesTheDefinition) {
  const kernels::ConvShape s{3, 5, 9, 8, 6, 3, 3, 2, 1, 2, 4, 3};  // Ho = (9+2-4-1)/2+1 = 4, Wo = (8+2-4-1)/2+1 = 3
  Generator gen(77);
  const std::vector<float> x = random_floats(s.N * s.C * s.H * s.W, gen), w = random_floats(s.O * s.ckk(), gen),
                           g = random_floats(s.N * s.O * s.Ho * s.Wo, gen);
  std::vector<double> y_def(g.size(), 0.0), dx_def(x.size(), 0.0), dw_def(w.size(), 0.0);
  for (std::int64_t n = 0; n < s.N; ++n)
    for (std::int64_t o = 0; o < s.O; ++o)
      for (std::int64_t oh = 0; oh < s.Ho; ++oh)
        for (std::int64_t ow = 0; ow < s.Wo; ++ow)
          for (std::int64_t c = 0; c < s.C; ++c)
            for (std::int64_t i = 0; i < s.kh; ++i)
              for (std::int64_t j = 0; j < s.kw; ++j) {
                const std::int64_t ih = oh * s.stride - s.pad + i * s.dil, iw = ow * s.stride - s.pad + j * s.dil;
                if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) continue;
                const std::int64_t xi = ((n * s.C + c) * s.H + ih) * s.W + iw, wi = ((o * s.C + c) * s.kh + i) * s.kw + j;
                const std::int64_t yi = ((n * s.O + o) * s.Ho + oh) * s.Wo + ow;
                y_def[yi] += static_cast<double>(w[wi]) * x[xi];
                dx_def[xi] += static_cast<double>(w[wi]) * g[yi];
                dw_def[wi] += static_cast<double>(x[xi]) * g[yi];
              }
  std::vector<float> y(g.size()), dx(x.size()), dw(w.size());
  kernels::conv2d_forward<float>(s, x.data(), w.data(), nullptr, y.data());
  kernels::conv2d_backward_input<float>(s, g.data(), w.data(), dx.data());
  kernels::conv2d_backward_weight<float>(s, g.data(), x.data(), dw.data());
  const auto as_float = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
  EXPECT_TRUE(close_to(y, as_float(y_def), 1e-5));
  EXPECT_TRUE(close_to(dx, as_float(dx_def), 1e-5));
  EXPECT_TRUE(close_to(dw, as_float(dw_def), 1e-5));
}

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
