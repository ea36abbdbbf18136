#pragma once
// Every differentiable function of chaingrad. Each is defined in exactly one place in src/ops/
// (forward + backward rule together) and has an entry in tests/op_registry.cpp, which
// gradient-checks it; tests/test_op_registry.cpp fails if a function declared between the
// BEGIN/END markers below has no registry entry.
//
// Shapes follow numpy broadcasting. `dims` arguments accept negative values; an empty `dims`
// means all dimensions.
#include <cstdint>
#include <optional>
#include <vector>

#include "chaingrad/autograd.hpp"
#include "chaingrad/tensor.hpp"

namespace chaingrad {

using DimList = std::vector<std::int64_t>;

// BEGIN DIFFERENTIABLE OPS
// ---- arithmetic (broadcasting) ----
Tensor add(const Tensor& a, const Tensor& b);
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);
Tensor neg(const Tensor& x);
Tensor pow(const Tensor& x, double exponent);
Tensor pow(const Tensor& x, const Tensor& exponent);
Tensor maximum(const Tensor& a, const Tensor& b);
Tensor minimum(const Tensor& a, const Tensor& b);
Tensor where(const Tensor& condition, const Tensor& a, const Tensor& b);  // condition != 0 picks a

// ---- elementwise functions ----
Tensor exp(const Tensor& x);
Tensor log(const Tensor& x);
Tensor log1p(const Tensor& x);
Tensor sqrt(const Tensor& x);
Tensor rsqrt(const Tensor& x);
Tensor abs(const Tensor& x);
Tensor sin(const Tensor& x);
Tensor cos(const Tensor& x);
Tensor tanh(const Tensor& x);
Tensor erf(const Tensor& x);
Tensor sigmoid(const Tensor& x);
Tensor relu(const Tensor& x);
Tensor leaky_relu(const Tensor& x, double negative_slope = 0.01);
Tensor elu(const Tensor& x, double alpha = 1.0);
Tensor gelu(const Tensor& x);  // exact: x * Phi(x)
Tensor softplus(const Tensor& x);
Tensor clamp(const Tensor& x, std::optional<double> lo, std::optional<double> hi);
Tensor square(const Tensor& x);
// Backward helpers that are ops in their own right, so their gradients are gradients too.
Tensor sigmoid_backward(const Tensor& grad_output, const Tensor& y);  // g * y * (1 - y)
Tensor tanh_backward(const Tensor& grad_output, const Tensor& y);     // g * (1 - y^2)

// ---- reductions ----
Tensor sum(const Tensor& x, const DimList& dims = {}, bool keepdim = false);
Tensor mean(const Tensor& x, const DimList& dims = {}, bool keepdim = false);
Tensor amax(const Tensor& x, const DimList& dims = {}, bool keepdim = false);  // ties share the gradient
Tensor amin(const Tensor& x, const DimList& dims = {}, bool keepdim = false);
Tensor var(const Tensor& x, const DimList& dims = {}, bool keepdim = false, std::int64_t correction = 1);
Tensor std(const Tensor& x, const DimList& dims = {}, bool keepdim = false, std::int64_t correction = 1);
Tensor logsumexp(const Tensor& x, std::int64_t dim, bool keepdim = false);
Tensor softmax(const Tensor& x, std::int64_t dim);
Tensor log_softmax(const Tensor& x, std::int64_t dim);
// Sums a gradient of a broadcast shape back to `shape` (the backward of expand).
Tensor sum_to(const Tensor& x, const Dims& shape);
Tensor norm(const Tensor& x);  // Frobenius / L2 over all elements

// ---- linear algebra ----
Tensor mm(const Tensor& a, const Tensor& b);   // [n,k] x [k,m]
Tensor bmm(const Tensor& a, const Tensor& b);  // [B,n,k] x [B,k,m]
// numpy matmul: 1-D, 2-D and batched with broadcast batch dimensions.
Tensor matmul(const Tensor& a, const Tensor& b);
// x [..., in] * weight[out, in]^T + bias[out]; one GEMM with the bias fused.
Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias = {});
// relu(linear(x, weight, bias)) as one op: the bias and relu applied as the product is written.
Tensor linear_relu(const Tensor& x, const Tensor& weight, const Tensor& bias = {});
// (x - mean) / sqrt(var + eps) * weight + bias over the trailing normalized_shape dims (biased
// variance); weight and bias, of normalized_shape, are optional. One fused op with its own backward.
Tensor layer_norm(const Tensor& x, const Dims& normalized_shape, const Tensor& weight = {}, const Tensor& bias = {},
                  double eps = 1e-5);
// Normalizes each channel (dim 1) of x [N, C, ...] with the batch's statistics (biased variance),
// then * weight[C] + bias[C] (both optional). The batch mean and biased variance, [C], are stored
// in *batch_mean and *batch_var when given (for running statistics). One fused op.
Tensor batch_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps, Tensor* batch_mean = nullptr,
                  Tensor* batch_var = nullptr);

// ---- views and shape ----
Tensor reshape(const Tensor& x, const Dims& shape);  // one -1 allowed; a view when strides allow
Tensor transpose(const Tensor& x, std::int64_t d0, std::int64_t d1);
Tensor permute(const Tensor& x, const Dims& order);
Tensor slice(const Tensor& x, std::int64_t dim, std::int64_t start, std::int64_t end, std::int64_t step = 1);
Tensor slice_backward(const Tensor& grad, const Dims& input_shape, std::int64_t dim, std::int64_t start,
                      std::int64_t step);  // zeros of input_shape with grad written into the slice
Tensor select(const Tensor& x, std::int64_t dim, std::int64_t index);
Tensor expand(const Tensor& x, const Dims& shape);  // broadcast_to
Tensor squeeze(const Tensor& x, std::optional<std::int64_t> dim = std::nullopt);
Tensor unsqueeze(const Tensor& x, std::int64_t dim);
Tensor flatten(const Tensor& x, std::int64_t start = 0, std::int64_t end = -1);
Tensor contiguous(const Tensor& x);
Tensor cast(const Tensor& x, DType dtype);
Tensor cat(const std::vector<Tensor>& xs, std::int64_t dim = 0);
Tensor stack(const std::vector<Tensor>& xs, std::int64_t dim = 0);
std::vector<Tensor> split(const Tensor& x, std::int64_t split_size, std::int64_t dim = 0);

// ---- indexing (index tensors are int64) ----
Tensor gather(const Tensor& x, std::int64_t dim, const Tensor& index);
Tensor scatter_add(const Tensor& x, std::int64_t dim, const Tensor& index, const Tensor& src);
Tensor index_select(const Tensor& x, std::int64_t dim, const Tensor& index);
Tensor index_add(const Tensor& x, std::int64_t dim, const Tensor& index, const Tensor& src);
Tensor embedding(const Tensor& weight, const Tensor& indices);  // weight[num, dim], any index shape

// ---- losses (mean over the batch) ----
Tensor nll_loss(const Tensor& log_probs, const Tensor& target);  // [N,C] and int64 [N]
Tensor cross_entropy(const Tensor& logits, const Tensor& target, double label_smoothing = 0.0);
Tensor mse_loss(const Tensor& input, const Tensor& target);
Tensor l1_loss(const Tensor& input, const Tensor& target);
Tensor bce_with_logits(const Tensor& logits, const Tensor& target);

// ---- convolution and pooling (NCHW) ----
// Patches of x [N, C, H, W] as columns [C*kh*kw, N*Ho*Wo] (row (c, i, j), column (n, ho, wo)).
Tensor im2col(const Tensor& x, std::int64_t kh, std::int64_t kw, std::int64_t stride, std::int64_t padding,
              std::int64_t dilation);
// The adjoint of im2col: sums columns back into an image of `input_shape`.
Tensor col2im(const Tensor& cols, const Dims& input_shape, std::int64_t kh, std::int64_t kw, std::int64_t stride,
              std::int64_t padding, std::int64_t dilation);
Tensor conv2d(const Tensor& x, const Tensor& weight, const Tensor& bias = {}, std::int64_t stride = 1,
              std::int64_t padding = 0, std::int64_t dilation = 1);
// conv2d's adjoints (its backward rules, and each other's): <conv2d(x, W), g> equals both
// <x, conv2d_backward_input(g, W, shape of x)> and <W, conv2d_backward_weight(g, x, shape of W)>.
Tensor conv2d_backward_input(const Tensor& grad_output, const Tensor& weight, const Dims& input_shape,
                             std::int64_t stride = 1, std::int64_t padding = 0, std::int64_t dilation = 1);
Tensor conv2d_backward_weight(const Tensor& grad_output, const Tensor& input, const Dims& weight_shape,
                              std::int64_t stride = 1, std::int64_t padding = 0, std::int64_t dilation = 1);
Tensor max_pool2d(const Tensor& x, std::int64_t kernel, std::int64_t stride = 0);  // stride 0 = kernel
// max_pool2d's backward: zeros of input_shape [N, C, H, W] with grad_output [N, C, Ho, Wo] added at
// `indices` (int64, grad_output's shape, flat positions h * W + w within each plane).
Tensor max_pool2d_backward(const Tensor& grad_output, const Tensor& indices, const Dims& input_shape);
Tensor avg_pool2d(const Tensor& x, std::int64_t kernel, std::int64_t stride = 0);
// END DIFFERENTIABLE OPS

// ---- not differentiable: comparisons give 0/1 in the inputs' dtype; indices are int64 ----
Tensor gt(const Tensor& a, const Tensor& b);
Tensor lt(const Tensor& a, const Tensor& b);
Tensor ge(const Tensor& a, const Tensor& b);
Tensor le(const Tensor& a, const Tensor& b);
Tensor eq(const Tensor& a, const Tensor& b);
Tensor sign(const Tensor& x);
Tensor argmax(const Tensor& x, std::int64_t dim, bool keepdim = false);
Tensor argmin(const Tensor& x, std::int64_t dim, bool keepdim = false);
Tensor one_hot(const Tensor& index, std::int64_t num_classes, DType dtype = DType::Float32);
bool allclose(const Tensor& a, const Tensor& b, double rtol = 1e-5, double atol = 1e-8);
bool isfinite_all(const Tensor& x);

// ---- operators ----
Tensor operator+(const Tensor& a, const Tensor& b);
Tensor operator-(const Tensor& a, const Tensor& b);
Tensor operator*(const Tensor& a, const Tensor& b);
Tensor operator/(const Tensor& a, const Tensor& b);
Tensor operator-(const Tensor& x);
// A double operand becomes a 0-d tensor of the other operand's dtype (it does not promote).
Tensor operator+(const Tensor& a, double b);
Tensor operator+(double a, const Tensor& b);
Tensor operator-(const Tensor& a, double b);
Tensor operator-(double a, const Tensor& b);
Tensor operator*(const Tensor& a, double b);
Tensor operator*(double a, const Tensor& b);
Tensor operator/(const Tensor& a, double b);
Tensor operator/(double a, const Tensor& b);

}  // namespace chaingrad
