#pragma once
// Neural-network modules: named parameters and buffers (PyTorch's names, so a checkpoint's keys
// read `0.weight`, `3.running_mean`), train/eval mode, the usual layers, initializers, and a
// one-line model spec ("linear(256) relu linear(10)") that builds a Sequential.
//
// Note [parameter handles]: a module keeps each parameter both as a public member (`weight`)
// and in its registry; the two are handles to one TensorImpl. Everything that changes a
// parameter (load_state_dict, to(DType), the optimizers, the initializers) therefore updates the
// TensorImpl in place and never replaces the handle, so optimizers and user code holding the
// tensors keep seeing the live values. Copying a module copies handles: the copy shares its
// parameters with the original.
#include <concepts>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "chaingrad/ops.hpp"
#include "chaingrad/tensor.hpp"

namespace chaingrad::nn {

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

class Module;
using ModulePtr = std::shared_ptr<Module>;
using NamedModules = std::vector<std::pair<std::string, ModulePtr>>;

// ---------------------------------------------------------------- Module
class Module {
 public:
  Module() = default;
  Module(const Module&) = default;
  Module& operator=(const Module&) = default;
  virtual ~Module() = default;

  virtual Tensor forward(const Tensor& x) = 0;
  Tensor operator()(const Tensor& x) { return forward(x); }

  // The class name as PyTorch prints it ("Linear", "Conv2d").
  virtual std::string type_name() const = 0;
  // What goes between the parentheses of describe() for a layer without children
  // ("in_features=784, out_features=256, bias=True").
  virtual std::string extra_repr() const { return ""; }
  // PyTorch's repr: one line per layer, children indented under their name.
  std::string describe() const;

  // ---- parameters and buffers, recursively, with dotted names ("0.weight") ----
  NamedTensors named_parameters(bool recurse = true) const;
  NamedTensors named_buffers(bool recurse = true) const;
  std::vector<Tensor> parameters(bool recurse = true) const;
  std::vector<Tensor> buffers(bool recurse = true) const;
  std::int64_t num_parameters() const;  // total number of parameter elements
  // Parameters then buffers, module by module in registration order (PyTorch's state_dict order).
  // The tensors are the live ones, not copies (detach() or clone() them to keep a snapshot).
  NamedTensors state_dict() const;
  // Copies values into the existing tensors (dtype converted). Shape mismatches are always an
  // error naming the tensor and both shapes; with `strict`, so are missing and unexpected keys.
  // Everything is checked before anything is written.
  void load_state_dict(const NamedTensors& state, bool strict = true);

  // ---- submodules ----
  const NamedModules& named_children() const { return children_; }
  std::vector<ModulePtr> children() const;
  // This module ("") and all descendants, depth first, with dotted names.
  std::vector<std::pair<std::string, const Module*>> named_modules() const;

  // ---- mode and bookkeeping ----
  virtual void train(bool on = true);
  void eval() { train(false); }
  bool is_training() const { return training_; }
  // Sets every parameter's gradient to undefined.
  void zero_grad();
  // Converts floating parameters and buffers in place (see Note [parameter handles]); int64
  // buffers (num_batches_tracked) stay int64. Gradients are dropped.
  Module& to(DType dtype);

  // ---- registration (normally called by a module's constructor) ----
  // Registers `t` under `name` and returns it (the same handle). Parameters are made to
  // require grad. An undefined tensor registers nothing (PyTorch's `bias=None`).
  Tensor register_parameter(const std::string& name, Tensor t);
  Tensor register_buffer(const std::string& name, Tensor t);
  template <class M>
    requires std::derived_from<M, Module>
  std::shared_ptr<M> register_module(const std::string& name, std::shared_ptr<M> m) {
    add_child(name, m);
    return m;
  }
  void add_child(const std::string& name, ModulePtr m);

 protected:
  NamedTensors params_;
  NamedTensors buffers_;
  NamedModules children_;
  bool training_ = true;
};

// ---------------------------------------------------------------- layers
struct LinearOptions {
  std::int64_t in = 0;
  std::int64_t out = 0;
  bool bias = true;
};

// y = x W^T + b over the last dimension; W [out, in]. PyTorch's default init: W and b from
// U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform with a = sqrt(5) for W).
class Linear : public Module {
 public:
  explicit Linear(LinearOptions options, Generator* gen = nullptr);
  Linear(std::int64_t in, std::int64_t out, bool bias = true, Generator* gen = nullptr)
      : Linear(LinearOptions{.in = in, .out = out, .bias = bias}, gen) {}
  Tensor forward(const Tensor& x) override;
  std::string type_name() const override { return "Linear"; }
  std::string extra_repr() const override;
  void reset_parameters(Generator* gen = nullptr);
  const LinearOptions& options() const { return options_; }

  Tensor weight;  // [out, in]
  Tensor bias;    // [out], undefined without bias

 private:
  LinearOptions options_;
};

struct Conv2dOptions {
  std::int64_t in = 0;
  std::int64_t out = 0;
  std::int64_t kernel = 3;
  std::int64_t stride = 1;
  std::int64_t padding = 0;
  std::int64_t dilation = 1;
  bool bias = true;
};

// NCHW convolution with a square kernel; weight [out, in, k, k]. Default init as PyTorch's.
class Conv2d : public Module {
 public:
  explicit Conv2d(Conv2dOptions options, Generator* gen = nullptr);
  Tensor forward(const Tensor& x) override;
  std::string type_name() const override { return "Conv2d"; }
  std::string extra_repr() const override;
  void reset_parameters(Generator* gen = nullptr);
  const Conv2dOptions& options() const { return options_; }
  // Spatial output size for an input extent `size`.
  std::int64_t output_size(std::int64_t size) const;

  Tensor weight;  // [out, in, kernel, kernel]
  Tensor bias;    // [out]

 private:
  Conv2dOptions options_;
};

struct Pool2dOptions {
  std::int64_t kernel = 2;
  std::int64_t stride = 0;  // 0 = kernel
};

class MaxPool2d : public Module {
 public:
  explicit MaxPool2d(Pool2dOptions options = {});
  explicit MaxPool2d(std::int64_t kernel, std::int64_t stride = 0) : MaxPool2d(Pool2dOptions{kernel, stride}) {}
  Tensor forward(const Tensor& x) override;
  std::string type_name() const override { return "MaxPool2d"; }
  std::string extra_repr() const override;
  const Pool2dOptions& options() const { return options_; }
  std::int64_t output_size(std::int64_t size) const;

 private:
  Pool2dOptions options_;
};

class AvgPool2d : public Module {
 public:
  explicit AvgPool2d(Pool2dOptions options = {});
  explicit AvgPool2d(std::int64_t kernel, std::int64_t stride = 0) : AvgPool2d(Pool2dOptions{kernel, stride}) {}
  Tensor forward(const Tensor& x) override;
  std::string type_name() const override { return "AvgPool2d"; }
  std::string extra_repr() const override;
  const Pool2dOptions& options() const { return options_; }
  std::int64_t output_size(std::int64_t size) const;

 private:
  Pool2dOptions options_;
};

class Flatten : public Module {
 public:
  explicit Flatten(std::int64_t start_dim = 1, std::int64_t end_dim = -1) : start_(start_dim), end_(end_dim) {}
  Tensor forward(const Tensor& x) override { return flatten(x, start_, end_); }
  std::string type_name() const override { return "Flatten"; }
  std::string extra_repr() const override;

 private:
  std::int64_t start_, end_;
};

struct DropoutOptions {
  double p = 0.5;
};

// Training: zeroes each element with probability p and scales the rest by 1/(1-p); the mask
// comes from the module's own Generator, seeded at construction from `gen` (or the default
// generator), so a seeded model drops the same elements on every run. Eval: identity.
class Dropout : public Module {
 public:
  explicit Dropout(DropoutOptions options = {}, Generator* gen = nullptr);
  explicit Dropout(double p, Generator* gen = nullptr) : Dropout(DropoutOptions{p}, gen) {}
  Tensor forward(const Tensor& x) override;
  std::string type_name() const override { return "Dropout"; }
  std::string extra_repr() const override;
  void seed(std::uint64_t s) { gen_.seed(s); }
  Generator& generator() { return gen_; }
  double p() const { return options_.p; }

 private:
  DropoutOptions options_;
  Generator gen_;
};

struct BatchNormOptions {
  std::int64_t num_features = 0;
  double eps = 1e-5;
  double momentum = 0.1;
  bool affine = true;
  bool track_running_stats = true;
};

// Normalizes each channel (dimension 1) over the batch and the remaining dimensions.
// Training: batch mean and biased variance normalize; the running stats move by `momentum`
// toward the batch mean and the *unbiased* batch variance (as PyTorch), and
// num_batches_tracked counts batches. Eval: the running stats normalize.
// Buffers: running_mean [C] (0), running_var [C] (1), num_batches_tracked (int64, 0-d).
class BatchNorm : public Module {
 public:
  Tensor forward(const Tensor& x) override;
  std::string extra_repr() const override;
  const BatchNormOptions& options() const { return options_; }

  Tensor weight, bias;  // [C] (1 and 0), undefined without affine
  Tensor running_mean, running_var, num_batches_tracked;

 protected:
  BatchNorm(BatchNormOptions options, int min_dim, int max_dim);
  virtual const char* expected_shapes() const = 0;

 private:
  BatchNormOptions options_;
  int min_dim_, max_dim_;
};

class BatchNorm1d : public BatchNorm {  // [N, C] or [N, C, L]
 public:
  explicit BatchNorm1d(BatchNormOptions options) : BatchNorm(options, 2, 3) {}
  explicit BatchNorm1d(std::int64_t num_features) : BatchNorm1d(BatchNormOptions{.num_features = num_features}) {}
  std::string type_name() const override { return "BatchNorm1d"; }

 protected:
  const char* expected_shapes() const override { return "[N, C] or [N, C, L]"; }
};

class BatchNorm2d : public BatchNorm {  // [N, C, H, W]
 public:
  explicit BatchNorm2d(BatchNormOptions options) : BatchNorm(options, 4, 4) {}
  explicit BatchNorm2d(std::int64_t num_features) : BatchNorm2d(BatchNormOptions{.num_features = num_features}) {}
  std::string type_name() const override { return "BatchNorm2d"; }

 protected:
  const char* expected_shapes() const override { return "[N, C, H, W]"; }
};

struct LayerNormOptions {
  Dims normalized_shape;  // the trailing dimensions normalized together
  double eps = 1e-5;
  bool elementwise_affine = true;
};

// y = (x - mean) / sqrt(var + eps) * weight + bias over the trailing normalized_shape dims
// (biased variance); weight (1) and bias (0) have normalized_shape.
class LayerNorm : public Module {
 public:
  explicit LayerNorm(LayerNormOptions options);
  explicit LayerNorm(std::int64_t features) : LayerNorm(LayerNormOptions{.normalized_shape = {features}}) {}
  Tensor forward(const Tensor& x) override;
  std::string type_name() const override { return "LayerNorm"; }
  std::string extra_repr() const override;

  Tensor weight, bias;

 private:
  LayerNormOptions options_;
};

struct EmbeddingOptions {
  std::int64_t num_embeddings = 0;
  std::int64_t embedding_dim = 0;
};

// Rows of weight [num, dim] (init N(0, 1)) picked by int64 indices of any shape.
class Embedding : public Module {
 public:
  explicit Embedding(EmbeddingOptions options, Generator* gen = nullptr);
  Embedding(std::int64_t num, std::int64_t dim, Generator* gen = nullptr)
      : Embedding(EmbeddingOptions{num, dim}, gen) {}
  Tensor forward(const Tensor& indices) override { return embedding(weight, indices); }
  std::string type_name() const override { return "Embedding"; }
  std::string extra_repr() const override;

  Tensor weight;

 private:
  EmbeddingOptions options_;
};

// ---- activations ----
class ReLU : public Module {
 public:
  Tensor forward(const Tensor& x) override { return relu(x); }
  std::string type_name() const override { return "ReLU"; }
};
class LeakyReLU : public Module {
 public:
  explicit LeakyReLU(double negative_slope = 0.01) : slope_(negative_slope) {}
  Tensor forward(const Tensor& x) override { return leaky_relu(x, slope_); }
  std::string type_name() const override { return "LeakyReLU"; }
  std::string extra_repr() const override;
  double negative_slope() const { return slope_; }

 private:
  double slope_;
};
class Sigmoid : public Module {
 public:
  Tensor forward(const Tensor& x) override { return sigmoid(x); }
  std::string type_name() const override { return "Sigmoid"; }
};
class Tanh : public Module {
 public:
  Tensor forward(const Tensor& x) override { return tanh(x); }
  std::string type_name() const override { return "Tanh"; }
};
class GELU : public Module {  // exact: x * Phi(x)
 public:
  Tensor forward(const Tensor& x) override { return gelu(x); }
  std::string type_name() const override { return "GELU"; }
  std::string extra_repr() const override { return "approximate='none'"; }
};
class Softmax : public Module {
 public:
  explicit Softmax(std::int64_t dim = -1) : dim_(dim) {}
  Tensor forward(const Tensor& x) override { return softmax(x, dim_); }
  std::string type_name() const override { return "Softmax"; }
  std::string extra_repr() const override;

 private:
  std::int64_t dim_;
};

// ---------------------------------------------------------------- Sequential
// Children are named "0", "1", ... in order, as in PyTorch. Holds modules by shared_ptr; the
// brace form accepts modules by value too: Sequential{Linear(784, 256), ReLU(), Linear(256, 10)}.
class Sequential : public Module {
 public:
  // Implicitly made from a shared_ptr to any module or from a module value (copied; see Note
  // [parameter handles]).
  class Item {
   public:
    template <class M>
      requires std::derived_from<M, Module>
    Item(std::shared_ptr<M> m) : ptr_(std::move(m)) {}  // NOLINT: implicit on purpose
    template <class M>
      requires std::derived_from<std::remove_cvref_t<M>, Module>
    Item(M&& m) : ptr_(std::make_shared<std::remove_cvref_t<M>>(std::forward<M>(m))) {}  // NOLINT
    const ModulePtr& ptr() const { return ptr_; }

   private:
    ModulePtr ptr_;
  };

  Sequential() = default;
  Sequential(std::initializer_list<Item> items);

  Tensor forward(const Tensor& x) override;
  std::string type_name() const override { return "Sequential"; }
  std::string extra_repr() const override { return flatten_input_ ? "flatten_input=True" : ""; }

  void push_back(ModulePtr m);
  void add(ModulePtr m) { push_back(std::move(m)); }
  std::size_t size() const { return children_.size(); }
  bool empty() const { return children_.empty(); }
  const ModulePtr& operator[](std::size_t i) const;
  // The i-th layer as M, or an error naming its actual type.
  template <class M>
  std::shared_ptr<M> at(std::size_t i) const {
    auto p = std::dynamic_pointer_cast<M>((*this)[i]);
    if (!p) throw_wrong_type(i);
    return p;
  }

  // When on, forward flattens an input of more than two dimensions to [N, features] before the
  // first layer. build_model turns it on for a model whose first layer is linear on an image
  // input, so "linear(256) relu linear(10)" keeps PyTorch's names 0.weight, 2.weight.
  void set_flatten_input(bool on) { flatten_input_ = on; }
  bool flatten_input() const { return flatten_input_; }

 private:
  [[noreturn]] void throw_wrong_type(std::size_t i) const;
  bool flatten_input_ = false;
};

// ---------------------------------------------------------------- initializers
// Each writes in place under NoGradGuard (see Note [parameter handles]) and draws from `gen`
// (the default generator when null). Fan-in/out follow PyTorch: for a weight [out, in, k...],
// fan_in = in * prod(k), fan_out = out * prod(k).
namespace init {

enum class FanMode { FanIn, FanOut };
enum class Nonlinearity { Linear, Sigmoid, Tanh, ReLU, LeakyReLU };

// PyTorch's calculate_gain: linear/sigmoid 1, tanh 5/3, relu sqrt(2), leaky_relu sqrt(2/(1+a^2)).
double calculate_gain(Nonlinearity nonlinearity, double param = 0.01);
std::pair<std::int64_t, std::int64_t> fan_in_and_fan_out(const Tensor& t);

struct KaimingOptions {
  double a = 0.0;  // negative slope of the leaky_relu that follows
  FanMode mode = FanMode::FanIn;
  Nonlinearity nonlinearity = Nonlinearity::LeakyReLU;
};

Tensor uniform_(const Tensor& t, double lo = 0.0, double hi = 1.0, Generator* gen = nullptr);
Tensor normal_(const Tensor& t, double mean = 0.0, double std = 1.0, Generator* gen = nullptr);
Tensor constant_(const Tensor& t, double value);
Tensor zeros_(const Tensor& t);
Tensor ones_(const Tensor& t);
// U(-b, b), b = gain * sqrt(3 / fan).
Tensor kaiming_uniform_(const Tensor& t, KaimingOptions options = {}, Generator* gen = nullptr);
// N(0, s^2), s = gain / sqrt(fan).
Tensor kaiming_normal_(const Tensor& t, KaimingOptions options = {}, Generator* gen = nullptr);
// U(-b, b), b = gain * sqrt(6 / (fan_in + fan_out)).
Tensor xavier_uniform_(const Tensor& t, double gain = 1.0, Generator* gen = nullptr);
// N(0, s^2), s = gain * sqrt(2 / (fan_in + fan_out)).
Tensor xavier_normal_(const Tensor& t, double gain = 1.0, Generator* gen = nullptr);

}  // namespace init

// ---------------------------------------------------------------- model spec
// A whitespace-separated list of layers:
//   linear(N[,bias=false])  conv2d(C,K[,stride=S][,pad=P][,dilation=D][,bias=false])
//   maxpool2d(K[,S])  avgpool2d(K[,S])  flatten  dropout(P)  batchnorm  layernorm
//   relu  sigmoid  tanh  gelu  leaky_relu[(SLOPE)]  softmax
// Positional conv2d arguments follow PyTorch's order (out, kernel, stride, pad, dilation);
// `padding=` is accepted for `pad=`.
struct LayerSpec {
  std::string kind;  // "linear", "conv2d", ...
  // Numeric arguments by name: linear {out, bias}; conv2d {out, kernel, stride, pad, dilation,
  // bias}; pools {kernel, stride}; dropout {p}; leaky_relu {slope}; norms {eps(, momentum)}.
  std::vector<std::pair<std::string, double>> args;
  double arg(const std::string& name, double fallback) const;
  std::string canonical() const;  // "conv2d(32,3,pad=1)": defaults left out
};

struct ModelSpec {
  std::vector<LayerSpec> layers;
  // Syntax and argument errors name the token, its 1-based position and what was expected.
  static ModelSpec parse(const std::string& spec);
  std::string canonical() const;  // space-separated canonical layers; parse(canonical()) == *this
};

// The canonical form of a spec (after parsing it), for storing next to a checkpoint.
std::string canonical_spec(const std::string& spec);

// Builds the layers, inferring each one's input size from the per-sample shape (e.g. {1, 28, 28}
// or {20}) tracked through the spec; parameters are drawn from a Generator seeded with `seed`.
// A linear first layer (after any elementwise layers) on a multi-dimensional input flattens the
// input inside the Sequential (see Sequential::set_flatten_input); elsewhere a linear layer on a
// multi-dimensional shape needs an explicit flatten. Shape errors name the token.
std::shared_ptr<Sequential> build_model(const ModelSpec& spec, const Dims& input_shape, std::uint64_t seed);
std::shared_ptr<Sequential> build_model(const std::string& spec, const Dims& input_shape, std::uint64_t seed);
// The per-sample output shape the spec produces for `input_shape` (validates like build_model).
Dims output_shape(const ModelSpec& spec, const Dims& input_shape);

}  // namespace chaingrad::nn
