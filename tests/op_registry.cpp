#include "op_registry.hpp"

#include <cmath>

namespace chaingrad::testing {

namespace {
using V = const std::vector<Tensor>&;
Tensor idx(std::vector<std::int64_t> v, Dims shape) { return from_vector(std::span<const std::int64_t>(v), shape); }

std::vector<OpCase> build() {
  std::vector<OpCase> r;
  auto add_case = [&](OpCase c) { r.push_back(std::move(c)); };

  // ---- arithmetic with broadcasting
  add_case({"add", {{2, 3}, {3}}, [](V x) { return add(x[0], x[1]); }, -2, 2, {}, true, "row broadcast"});
  add_case({"add", {{2, 1, 3}, {4, 1}}, [](V x) { return add(x[0], x[1]); }, -2, 2, {}, true, "both broadcast"});
  add_case({"sub", {{3, 2}, {3, 1}}, [](V x) { return sub(x[0], x[1]); }});
  add_case({"mul", {{2, 3}, {2, 3}}, [](V x) { return mul(x[0], x[1]); }});
  add_case({"mul", {{}, {2, 3}}, [](V x) { return mul(x[0], x[1]); }, -2, 2, {}, true, "0-d operand"});
  add_case({"div", {{2, 3}, {1, 3}}, [](V x) { return div(x[0], x[1]); }, 0.5, 2.0});
  add_case({"neg", {{2, 3}}, [](V x) { return neg(x[0]); }});
  add_case({"pow", {{2, 3}}, [](V x) { return pow(x[0], 3.0); }});
  add_case({"pow", {{2, 3}}, [](V x) { return pow(x[0], 2.0); }, -2, 2, {}, true, "square exponent"});
  add_case({"pow", {{2, 3}, {2, 3}}, [](V x) { return pow(x[0], x[1]); }, 0.5, 2.0, {}, true, "tensor exponent"});
  add_case({"maximum", {{2, 3}, {3}}, [](V x) { return maximum(x[0], x[1]); }});
  add_case({"minimum", {{2, 3}, {2, 3}}, [](V x) { return minimum(x[0], x[1]); }});
  add_case({"where", {{2, 3}, {3}},
            [](V x) { return where(tensor({{1, 0, 1}, {0, 0, 1}}), x[0], x[1]); }});

  // ---- elementwise
  add_case({"exp", {{2, 3}}, [](V x) { return exp(x[0]); }});
  add_case({"log", {{2, 3}}, [](V x) { return log(x[0]); }, 0.3, 2.0});
  add_case({"log1p", {{2, 3}}, [](V x) { return log1p(x[0]); }, -0.5, 2.0});
  add_case({"sqrt", {{2, 3}}, [](V x) { return sqrt(x[0]); }, 0.3, 2.0});
  add_case({"rsqrt", {{2, 3}}, [](V x) { return rsqrt(x[0]); }, 0.3, 2.0});
  add_case({"abs", {{2, 3}}, [](V x) { return abs(x[0]); }, -2, 2, {0.0}});
  add_case({"sin", {{2, 3}}, [](V x) { return sin(x[0]); }});
  add_case({"cos", {{2, 3}}, [](V x) { return cos(x[0]); }});
  add_case({"tanh", {{2, 3}}, [](V x) { return tanh(x[0]); }});
  add_case({"erf", {{2, 3}}, [](V x) { return erf(x[0]); }});
  add_case({"sigmoid", {{2, 3}}, [](V x) { return sigmoid(x[0]); }, -4, 4});
  add_case({"sigmoid", {{}}, [](V x) { return sigmoid(x[0]); }, -4, 4, {}, true, "0-d (saves its input)"});
  add_case({"relu", {{2, 3}}, [](V x) { return relu(x[0]); }, -2, 2, {0.0}});
  add_case({"leaky_relu", {{2, 3}}, [](V x) { return leaky_relu(x[0], 0.1); }, -2, 2, {0.0}});
  add_case({"elu", {{2, 3}}, [](V x) { return elu(x[0], 0.7); }, -2, 2, {0.0}});
  add_case({"gelu", {{2, 3}}, [](V x) { return gelu(x[0]); }, -3, 3});
  add_case({"softplus", {{2, 3}}, [](V x) { return softplus(x[0]); }, -4, 4});
  add_case({"clamp", {{3, 4}}, [](V x) { return clamp(x[0], -0.5, 1.0); }, -2, 2, {-0.5, 1.0}});
  add_case({"square", {{2, 3}}, [](V x) { return square(x[0]); }});
  add_case({"sigmoid_backward", {{2, 3}, {2, 3}}, [](V x) { return sigmoid_backward(x[0], x[1]); }, 0.1, 0.9});
  add_case({"tanh_backward", {{2, 3}, {2, 3}}, [](V x) { return tanh_backward(x[0], x[1]); }, -0.9, 0.9});

  // ---- reductions
  add_case({"sum", {{2, 3, 4}}, [](V x) { return sum(x[0]); }, -2, 2, {}, true, "all dims"});
  add_case({"sum", {{2, 3, 4}}, [](V x) { return sum(x[0], {0, 2}, true); }, -2, 2, {}, true, "dims 0,2 keepdim"});
  add_case({"sum", {{2, 3, 4}}, [](V x) { return sum(x[0], {-1}); }, -2, 2, {}, true, "last dim"});
  add_case({"mean", {{3, 4}}, [](V x) { return mean(x[0], {1}); }});
  add_case({"amax", {{3, 4}}, [](V x) { return amax(x[0], {1}); }});
  add_case({"amax", {{2, 3, 2}}, [](V x) { return amax(x[0], {0, 2}, true); }, -2, 2, {}, true, "two dims keepdim"});
  add_case({"amin", {{3, 4}}, [](V x) { return amin(x[0], {0}, true); }});
  add_case({"var", {{3, 4}}, [](V x) { return var(x[0], {1}); }});
  add_case({"var", {{3, 4}}, [](V x) { return var(x[0], {}, false, 0); }, -2, 2, {}, true, "population, all"});
  add_case({"std", {{3, 4}}, [](V x) { return std(x[0], {0}, true); }});
  add_case({"logsumexp", {{3, 4}}, [](V x) { return logsumexp(x[0], 1); }});
  add_case({"logsumexp", {{3, 4}}, [](V x) { return logsumexp(x[0], 0, true); }, -2, 2, {}, true, "dim 0 keepdim"});
  add_case({"softmax", {{3, 4}}, [](V x) { return softmax(x[0], 1); }});
  add_case({"softmax", {{3, 4}}, [](V x) { return softmax(x[0], 0); }, -2, 2, {}, true, "dim 0"});
  add_case({"log_softmax", {{3, 4}}, [](V x) { return log_softmax(x[0], -1); }});
  add_case({"sum_to", {{2, 3, 4}}, [](V x) { return sum_to(x[0], {3, 1}); }});
  add_case({"norm", {{2, 3}}, [](V x) { return norm(x[0]); }, 0.2, 2.0});

  // ---- linear algebra
  add_case({"mm", {{2, 3}, {3, 4}}, [](V x) { return mm(x[0], x[1]); }});
  add_case({"bmm", {{2, 2, 3}, {2, 3, 2}}, [](V x) { return bmm(x[0], x[1]); }});
  add_case({"matmul", {{3}, {3}}, [](V x) { return matmul(x[0], x[1]); }, -2, 2, {}, true, "dot"});
  add_case({"matmul", {{3}, {3, 2}}, [](V x) { return matmul(x[0], x[1]); }, -2, 2, {}, true, "vector-matrix"});
  add_case({"matmul", {{2, 3}, {3}}, [](V x) { return matmul(x[0], x[1]); }, -2, 2, {}, true, "matrix-vector"});
  add_case({"matmul", {{2, 2, 3}, {3, 2}}, [](V x) { return matmul(x[0], x[1]); }, -2, 2, {}, true, "batched x 2-D"});
  add_case({"matmul", {{2, 1, 2, 3}, {3, 3, 2}}, [](V x) { return matmul(x[0], x[1]); }, -2, 2, {}, true,
            "broadcast batch"});
  add_case({"linear", {{4, 3}, {2, 3}, {2}}, [](V x) { return linear(x[0], x[1], x[2]); }});
  add_case({"linear", {{2, 2, 3}, {2, 3}}, [](V x) { return linear(x[0], x[1]); }, -2, 2, {}, true, "3-D, no bias"});
  add_case({"linear_relu", {{4, 3}, {2, 3}, {2}}, [](V x) { return linear_relu(x[0], x[1], x[2]); }});
  add_case({"linear_relu", {{2, 2, 3}, {2, 3}}, [](V x) { return linear_relu(x[0], x[1]); }, -2, 2, {}, true,
            "3-D, no bias"});
  add_case({"layer_norm", {{3, 4, 5}, {5}, {5}}, [](V x) { return layer_norm(x[0], {5}, x[1], x[2]); }});
  add_case({"layer_norm", {{2, 3, 4}, {3, 4}}, [](V x) { return layer_norm(x[0], {3, 4}, x[1]); }, -2, 2, {}, true,
            "two normalized dims, no bias"});
  add_case({"layer_norm", {{4, 6}}, [](V x) { return layer_norm(x[0], {6}); }, -2, 2, {}, true, "no affine"});
  add_case({"batch_norm", {{4, 3, 2, 2}, {3}, {3}}, [](V x) { return batch_norm(x[0], x[1], x[2], 1e-5); }});
  add_case({"batch_norm", {{5, 2}}, [](V x) { return batch_norm(x[0], {}, {}, 1e-5); }, -2, 2, {}, true,
            "[N, C], no affine"});

  // ---- views and shape
  add_case({"reshape", {{2, 6}}, [](V x) { return reshape(x[0], {3, -1}); }});
  add_case({"transpose", {{2, 3, 4}}, [](V x) { return transpose(x[0], 0, 2); }});
  add_case({"permute", {{2, 3, 4}}, [](V x) { return permute(x[0], {1, 2, 0}); }});
  add_case({"slice", {{5, 3}}, [](V x) { return slice(x[0], 0, 1, 5, 2); }});
  add_case({"slice_backward", {{2, 3}}, [](V x) { return slice_backward(x[0], {5, 3}, 0, 1, 2); }});
  add_case({"select", {{3, 4}}, [](V x) { return select(x[0], 1, -1); }});
  add_case({"expand", {{3, 1}}, [](V x) { return expand(x[0], {2, 3, 4}); }});
  add_case({"squeeze", {{3, 1, 2}}, [](V x) { return squeeze(x[0]); }});
  add_case({"unsqueeze", {{3, 2}}, [](V x) { return unsqueeze(x[0], 1); }});
  add_case({"flatten", {{2, 3, 2}}, [](V x) { return flatten(x[0], 1); }});
  add_case({"contiguous", {{3, 4}}, [](V x) { return contiguous(transpose(x[0], 0, 1)); }});
  // A float32 round trip is only accurate to ~1e-7, so this check uses a wide step.
  add_case({"cast", {{2, 3}}, [](V x) { return cast(x[0], DType::Float32); }, -2, 2, {}, false, "to float32", 1e-2,
            1e-4});
  add_case({"cat", {{2, 3}, {1, 3}}, [](V x) { return cat({x[0], x[1]}, 0); }});
  add_case({"stack", {{2, 3}, {2, 3}}, [](V x) { return stack({x[0], x[1]}, 1); }});
  add_case({"split", {{5, 2}}, [](V x) { return split(x[0], 2, 0)[2] * split(x[0], 2, 0)[0].slice(0, 0, 1); }});

  // ---- indexing
  add_case({"gather", {{3, 4}}, [](V x) { return gather(x[0], 1, idx({0, 3, 1, 1, 2, 0}, {3, 2})); }});
  add_case({"scatter_add", {{3, 4}, {3, 2}},
            [](V x) { return scatter_add(x[0], 1, idx({0, 3, 1, 1, 2, 0}, {3, 2}), x[1]); }});
  add_case({"index_select", {{4, 3}}, [](V x) { return index_select(x[0], 0, idx({3, 0, 3}, {3})); }});
  add_case({"index_add", {{4, 3}, {3, 3}}, [](V x) { return index_add(x[0], 0, idx({3, 0, 3}, {3}), x[1]); }});
  add_case({"embedding", {{5, 3}}, [](V x) { return embedding(x[0], idx({4, 0, 2, 4}, {2, 2})); }});

  // ---- losses
  add_case({"nll_loss", {{3, 4}}, [](V x) { return nll_loss(x[0], idx({1, 0, 3}, {3})); }});
  add_case({"cross_entropy", {{3, 4}}, [](V x) { return cross_entropy(x[0], idx({1, 0, 3}, {3})); }});
  add_case({"cross_entropy", {{3, 4}}, [](V x) { return cross_entropy(x[0], idx({1, 0, 3}, {3}), 0.1); }, -2, 2, {},
            true, "label smoothing"});
  add_case({"mse_loss", {{3, 2}, {3, 2}}, [](V x) { return mse_loss(x[0], x[1]); }});
  add_case({"l1_loss", {{3, 2}}, [](V x) { return l1_loss(x[0], full({3, 2}, 0.25, {.dtype = DType::Float64})); },
            -2, 2, {0.25}});
  add_case({"bce_with_logits", {{3, 2}, {3, 2}}, [](V x) { return bce_with_logits(x[0], x[1]); }, -2, 2});

  // ---- convolution and pooling
  add_case({"im2col", {{1, 2, 4, 4}}, [](V x) { return im2col(x[0], 3, 2, 1, 1, 1); }});
  add_case({"col2im", {{8, 6}}, [](V x) { return col2im(x[0], {1, 2, 3, 4}, 2, 2, 2, 1, 1); }});
  add_case({"conv2d", {{2, 2, 5, 5}, {3, 2, 3, 3}, {3}}, [](V x) { return conv2d(x[0], x[1], x[2], 1, 1); }});
  add_case({"conv2d", {{1, 2, 6, 6}, {2, 2, 3, 3}}, [](V x) { return conv2d(x[0], x[1], {}, 2, 1, 2); }, -2, 2, {},
            true, "stride 2, dilation 2"});
  add_case({"conv2d", {{2, 1, 6, 5}, {3, 1, 3, 3}, {3}}, [](V x) { return conv2d(x[0], x[1], x[2], 1, 1); }, -2, 2,
            {}, true, "one input channel (the first layer of a CNN)"});
  add_case({"conv2d", {{2, 3, 4, 3}, {2, 3, 1, 1}, {2}}, [](V x) { return conv2d(x[0], x[1], x[2]); }, -2, 2, {}, true,
            "1x1 kernel (the image is its own column matrix)"});
  add_case({"conv2d", {{1, 17, 2, 3}, {2, 17, 1, 1}, {2}}, [](V x) { return conv2d(x[0], x[1], x[2]); }, -2, 2, {},
            true, "1x1 kernel, one sample (the GEMM reads the image in place)"});
  add_case({"conv2d", {{1, 2, 7, 6}, {2, 2, 3, 2}, {2}}, [](V x) { return conv2d(x[0], x[1], x[2], 2, 1); }, -2, 2, {},
            true, "odd sizes, 3x2 kernel, stride 2, padding 1"});
  add_case({"conv2d", {{1, 1, 3, 4}, {2, 1, 3, 3}}, [](V x) { return conv2d(x[0], x[1], {}, 1, 2); }, -2, 2, {}, true,
            "padding 2 (rows and columns of pure padding)"});
  add_case({"conv2d", {{2, 2, 5, 6}, {3, 2, 3, 3}, {3}}, [](V x) { return conv2d(x[0], x[1], x[2], 1, 2, 2); }, -2,
            2, {}, true, "dilation 2, padding 2 (same size, columns shifted by 2)"});
  add_case({"conv2d", {{1, 2, 2, 3}, {2, 2, 5, 5}}, [](V x) { return conv2d(x[0], x[1], {}, 1, 2); }, -2, 2, {}, true,
            "kernel larger than the image (whole rows of padding)"});
  add_case({"conv2d_backward_input", {{2, 3, 5, 5}, {3, 2, 3, 3}},
            [](V x) { return conv2d_backward_input(x[0], x[1], {2, 2, 5, 5}, 1, 1); }});
  add_case({"conv2d_backward_input", {{1, 2, 4, 3}, {2, 2, 3, 3}},
            [](V x) { return conv2d_backward_input(x[0], x[1], {1, 2, 7, 6}, 2, 1); }, -2, 2, {}, true,
            "stride 2, odd input (a row and a column no window reaches)"});
  add_case({"conv2d_backward_input", {{2, 2, 3, 3}, {2, 3, 1, 1}},
            [](V x) { return conv2d_backward_input(x[0], x[1], {2, 3, 3, 3}); }, -2, 2, {}, true, "1x1 kernel"});
  add_case({"conv2d_backward_input", {{1, 2, 4, 5}, {2, 1, 3, 3}},
            [](V x) { return conv2d_backward_input(x[0], x[1], {1, 1, 4, 5}, 1, 2, 2); }, -2, 2, {}, true,
            "dilation 2, padding 2, one input channel"});
  add_case({"conv2d_backward_weight", {{2, 3, 5, 5}, {2, 2, 5, 5}},
            [](V x) { return conv2d_backward_weight(x[0], x[1], {3, 2, 3, 3}, 1, 1); }});
  add_case({"conv2d_backward_weight", {{1, 2, 2, 3}, {1, 1, 6, 7}},
            [](V x) { return conv2d_backward_weight(x[0], x[1], {2, 1, 3, 3}, 2, 1, 2); }, -2, 2, {}, true,
            "one input channel, stride 2, dilation 2"});
  add_case({"conv2d_backward_weight", {{2, 2, 3, 3}, {2, 3, 3, 3}},
            [](V x) { return conv2d_backward_weight(x[0], x[1], {2, 3, 1, 1}); }, -2, 2, {}, true, "1x1 kernel"});
  add_case({"max_pool2d", {{2, 2, 4, 4}}, [](V x) { return max_pool2d(x[0], 2); }});
  add_case({"max_pool2d", {{1, 2, 5, 5}}, [](V x) { return max_pool2d(x[0], 3, 2); }, -2, 2, {}, true,
            "3x3 windows, stride 2 (overlapping; the general kernel)"});
  add_case({"max_pool2d", {{1, 3, 5, 7}}, [](V x) { return max_pool2d(x[0], 2); }, -2, 2, {}, true,
            "2x2 on odd sizes (the last row and column are dropped)"});
  add_case({"max_pool2d_backward", {{1, 2, 2, 2}},
            [](V x) { return max_pool2d_backward(x[0], idx({0, 3, 9, 15, 5, 5, 10, 6}, {1, 2, 2, 2}), {1, 2, 4, 4}); },
            -2, 2, {}, true, "a repeated index accumulates (overlapping windows)"});
  add_case({"avg_pool2d", {{1, 2, 4, 6}}, [](V x) { return avg_pool2d(x[0], 2); }});
  return r;
}
}  // namespace

const std::vector<OpCase>& op_registry() {
  static const std::vector<OpCase> r = build();
  return r;
}

std::vector<Tensor> sample_inputs(const OpCase& c, std::uint64_t seed) {
  Generator g(seed);
  std::vector<Tensor> inputs;
  for (const Dims& s : c.shapes) {
    Tensor t = uniform(s, c.lo, c.hi, {.dtype = DType::Float64}, &g);
    double* p = t.data<double>();
    for (std::int64_t i = 0; i < t.numel(); ++i)
      for (double k : c.kinks)
        if (std::abs(p[i] - k) < 0.05) p[i] = k + (p[i] >= k ? 0.05 : -0.05);
    t.requires_grad_();
    inputs.push_back(t);
  }
  return inputs;
}

}  // namespace chaingrad::testing
