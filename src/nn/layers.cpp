// The layers of nn.hpp. Each forward is a composition of differentiable ops (no autograd nodes of
// its own), so gradients of gradients work through every layer.
#include <charconv>
#include <cmath>
#include <sstream>
#include <typeinfo>

#include "chaingrad/autograd.hpp"
#include "chaingrad/nn.hpp"

namespace chaingrad::nn {

namespace {

// A double as Python's repr prints it (0.25, 1e-05, 1.0), for PyTorch-identical describe().
std::string py_float(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, v);
  std::string s(buf, res.ptr);
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

const char* py_bool(bool b) { return b ? "True" : "False"; }

// [1, C, 1, ...] with `ndim` dimensions: a per-channel vector broadcast against NC... input.
Dims channel_shape(std::int64_t c, int ndim) {
  Dims d = Dims::filled(ndim, 1);
  d[1] = c;
  return d;
}

}  // namespace

// ---------------------------------------------------------------- Linear
Linear::Linear(LinearOptions options, Generator* gen) : options_(options) {
  CG_CHECK(options.in > 0 && options.out > 0, ValueError,
           "Linear: in and out features must be positive; got in=", options.in, ", out=", options.out);
  weight = register_parameter("weight", empty({options.out, options.in}));
  if (options.bias) bias = register_parameter("bias", empty({options.out}));
  reset_parameters(gen);
}

void Linear::reset_parameters(Generator* gen) {
  // PyTorch: kaiming_uniform_(W, a=sqrt(5)) == U(-1/sqrt(in), 1/sqrt(in)); bias the same bound.
  init::kaiming_uniform_(weight, {.a = std::sqrt(5.0)}, gen);
  if (bias.defined()) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(options_.in));
    init::uniform_(bias, -bound, bound, gen);
  }
}

Tensor Linear::forward(const Tensor& x) { return linear(x, weight, bias); }

std::string Linear::extra_repr() const {
  std::ostringstream os;
  os << "in_features=" << options_.in << ", out_features=" << options_.out << ", bias=" << py_bool(options_.bias);
  return os.str();
}

// ---------------------------------------------------------------- Conv2d
Conv2d::Conv2d(Conv2dOptions o, Generator* gen) : options_(o) {
  CG_CHECK(o.in > 0 && o.out > 0 && o.kernel > 0 && o.stride > 0 && o.padding >= 0 && o.dilation > 0, ValueError,
           "Conv2d: channels, kernel, stride and dilation must be positive and padding non-negative; got in=", o.in,
           ", out=", o.out, ", kernel=", o.kernel, ", stride=", o.stride, ", padding=", o.padding,
           ", dilation=", o.dilation);
  weight = register_parameter("weight", empty({o.out, o.in, o.kernel, o.kernel}));
  if (o.bias) bias = register_parameter("bias", empty({o.out}));
  reset_parameters(gen);
}

void Conv2d::reset_parameters(Generator* gen) {
  init::kaiming_uniform_(weight, {.a = std::sqrt(5.0)}, gen);
  if (bias.defined()) {
    const double fan_in = static_cast<double>(options_.in * options_.kernel * options_.kernel);
    const double bound = 1.0 / std::sqrt(fan_in);
    init::uniform_(bias, -bound, bound, gen);
  }
}

Tensor Conv2d::forward(const Tensor& x) {
  CG_CHECK(x.dim() == 4 && x.shape()[1] == options_.in, ShapeError, "Conv2d: expected input of shape [N, ",
           options_.in, ", H, W]; got ", x.shape());
  return conv2d(x, weight, bias, options_.stride, options_.padding, options_.dilation);
}

std::int64_t Conv2d::output_size(std::int64_t size) const {
  const auto& o = options_;
  return (size + 2 * o.padding - o.dilation * (o.kernel - 1) - 1) / o.stride + 1;
}

std::string Conv2d::extra_repr() const {
  const auto& o = options_;
  std::ostringstream os;
  os << o.in << ", " << o.out << ", kernel_size=(" << o.kernel << ", " << o.kernel << "), stride=(" << o.stride
     << ", " << o.stride << ")";
  if (o.padding != 0) os << ", padding=(" << o.padding << ", " << o.padding << ")";
  if (o.dilation != 1) os << ", dilation=(" << o.dilation << ", " << o.dilation << ")";
  if (!o.bias) os << ", bias=False";
  return os.str();
}

// ---------------------------------------------------------------- pooling
namespace {
Pool2dOptions check_pool(Pool2dOptions o, const char* name) {
  if (o.stride == 0) o.stride = o.kernel;
  CG_CHECK(o.kernel > 0 && o.stride > 0, ValueError, name, ": kernel and stride must be positive; got kernel=",
           o.kernel, ", stride=", o.stride);
  return o;
}
std::int64_t pool_output(const Pool2dOptions& o, std::int64_t size) { return (size - o.kernel) / o.stride + 1; }
}  // namespace

MaxPool2d::MaxPool2d(Pool2dOptions options) : options_(check_pool(options, "MaxPool2d")) {}
Tensor MaxPool2d::forward(const Tensor& x) { return max_pool2d(x, options_.kernel, options_.stride); }
std::int64_t MaxPool2d::output_size(std::int64_t size) const { return pool_output(options_, size); }
std::string MaxPool2d::extra_repr() const {
  std::ostringstream os;
  os << "kernel_size=" << options_.kernel << ", stride=" << options_.stride
     << ", padding=0, dilation=1, ceil_mode=False";
  return os.str();
}

AvgPool2d::AvgPool2d(Pool2dOptions options) : options_(check_pool(options, "AvgPool2d")) {}
Tensor AvgPool2d::forward(const Tensor& x) { return avg_pool2d(x, options_.kernel, options_.stride); }
std::int64_t AvgPool2d::output_size(std::int64_t size) const { return pool_output(options_, size); }
std::string AvgPool2d::extra_repr() const {
  std::ostringstream os;
  os << "kernel_size=" << options_.kernel << ", stride=" << options_.stride << ", padding=0";
  return os.str();
}

std::string Flatten::extra_repr() const {
  std::ostringstream os;
  os << "start_dim=" << start_ << ", end_dim=" << end_;
  return os.str();
}

// ---------------------------------------------------------------- Dropout
Dropout::Dropout(DropoutOptions options, Generator* gen)
    : options_(options), gen_((gen ? *gen : default_generator()).next_u64()) {
  CG_CHECK(options.p >= 0.0 && options.p <= 1.0, ValueError, "Dropout: p must be in [0, 1]; got ", options.p);
}

Tensor Dropout::forward(const Tensor& x) {
  const double p = options_.p;
  if (!training_ || p == 0.0) return x;
  if (p == 1.0) return x * 0.0;
  // mask = keep / (1 - p) with keep ~ Bernoulli(1 - p); one uniform draw per element.
  Tensor mask = empty(x.shape(), x.dtype());
  dispatch_float(x.dtype(), "Dropout", [&]<class T>() {
    T* m = mask.data<T>();
    const T scale = static_cast<T>(1.0 / (1.0 - p));
    // Compare raw 53-bit draws with a threshold: u = r * 2^-53 >= p  <=>  r >= ceil(p * 2^53).
    const auto threshold = static_cast<std::uint64_t>(std::ceil(p * 0x1.0p53));
    for (std::int64_t i = 0, n = mask.numel(); i < n; ++i)
      m[i] = (gen_.next_u64() >> 11) >= threshold ? scale : T(0);
  });
  return x * mask;
}

std::string Dropout::extra_repr() const { return "p=" + py_float(options_.p) + ", inplace=False"; }

// ---------------------------------------------------------------- BatchNorm
BatchNorm::BatchNorm(BatchNormOptions o, int min_dim, int max_dim) : options_(o), min_dim_(min_dim), max_dim_(max_dim) {
  CG_CHECK(o.num_features > 0, ValueError, "BatchNorm: num_features must be positive; got ", o.num_features);
  CG_CHECK(o.eps > 0.0 && o.momentum >= 0.0 && o.momentum <= 1.0, ValueError,
           "BatchNorm: expected eps > 0 and momentum in [0, 1]; got eps=", o.eps, ", momentum=", o.momentum);
  if (o.affine) {
    weight = register_parameter("weight", ones({o.num_features}));
    bias = register_parameter("bias", zeros({o.num_features}));
  }
  if (o.track_running_stats) {
    running_mean = register_buffer("running_mean", zeros({o.num_features}));
    running_var = register_buffer("running_var", ones({o.num_features}));
    num_batches_tracked = register_buffer("num_batches_tracked", zeros({}, {.dtype = DType::Int64}));
  }
}

Tensor BatchNorm::forward(const Tensor& x) {
  const std::int64_t C = options_.num_features;
  CG_CHECK(x.dim() >= min_dim_ && x.dim() <= max_dim_ && x.shape()[1] == C, ShapeError, type_name(),
           ": expected input of shape ", expected_shapes(), " with C = ", C, "; got ", x.shape());
  const Dims cshape = channel_shape(C, x.dim());
  const bool use_batch_stats = training_ || !options_.track_running_stats;

  Tensor y;
  if (use_batch_stats) {
    const std::int64_t n = x.numel() / C;
    CG_CHECK(n > 1, ValueError, type_name(), ": training needs more than one value per channel; got input of shape ",
             x.shape());
    // y = (x - mean) / sqrt(var_biased + eps) * weight + bias
    Tensor mu, var_b;
    y = batch_norm(x, options_.affine ? weight : Tensor(), options_.affine ? bias : Tensor(), options_.eps, &mu, &var_b);
    if (training_ && options_.track_running_stats) {
      // running = (1 - m) * running + m * batch, with the unbiased variance (as PyTorch).
      NoGradGuard no_grad;
      const Tensor bm = mu.detach().to(running_mean.dtype()).contiguous();
      const Tensor bv = var_b.detach().to(running_var.dtype()).contiguous();
      const double m = options_.momentum, unbias = static_cast<double>(n) / static_cast<double>(n - 1);
      dispatch_float(running_mean.dtype(), "BatchNorm", [&]<class T>() {
        T* rm = running_mean.data<T>();
        T* rv = running_var.data<T>();
        const T* pm = bm.data<T>();
        const T* pv = bv.data<T>();
        for (std::int64_t c = 0; c < C; ++c) {
          rm[c] = static_cast<T>((1.0 - m) * rm[c] + m * pm[c]);
          rv[c] = static_cast<T>((1.0 - m) * rv[c] + m * unbias * pv[c]);
        }
      });
      running_mean.bump_version();
      running_var.bump_version();
      num_batches_tracked.data<std::int64_t>()[0] += 1;
      num_batches_tracked.bump_version();
    }
    return y;
  }
  // Eval: y = x * scale + shift, scale = weight / sqrt(running_var + eps), shift = bias - running_mean * scale.
  Tensor scale = rsqrt(running_var + options_.eps);
  if (options_.affine) scale = scale * weight;
  Tensor shift = -(running_mean * scale);
  if (options_.affine) shift = shift + bias;
  return x * scale.reshape(cshape) + shift.reshape(cshape);
}

std::string BatchNorm::extra_repr() const {
  const auto& o = options_;
  std::ostringstream os;
  os << o.num_features << ", eps=" << py_float(o.eps) << ", momentum=" << py_float(o.momentum)
     << ", affine=" << py_bool(o.affine) << ", track_running_stats=" << py_bool(o.track_running_stats);
  return os.str();
}

// ---------------------------------------------------------------- LayerNorm
LayerNorm::LayerNorm(LayerNormOptions o) : options_(std::move(o)) {
  CG_CHECK(!options_.normalized_shape.empty() && options_.normalized_shape.numel() > 0, ValueError,
           "LayerNorm: normalized_shape must be non-empty with positive extents; got ", options_.normalized_shape);
  CG_CHECK(options_.eps > 0.0, ValueError, "LayerNorm: eps must be positive; got ", options_.eps);
  if (options_.elementwise_affine) {
    weight = register_parameter("weight", ones(options_.normalized_shape));
    bias = register_parameter("bias", zeros(options_.normalized_shape));
  }
}

Tensor LayerNorm::forward(const Tensor& x) {
  const Dims& ns = options_.normalized_shape;
  const int k = ns.size();
  bool ok = x.dim() >= k;
  for (int i = 0; ok && i < k; ++i) ok = x.shape()[x.dim() - k + i] == ns[i];
  CG_CHECK(ok, ShapeError, "LayerNorm: expected input whose trailing dimensions are ", ns, "; got ", x.shape());
  const bool affine = options_.elementwise_affine;
  return layer_norm(x, ns, affine ? weight : Tensor(), affine ? bias : Tensor(), options_.eps);
}

std::string LayerNorm::extra_repr() const {
  // Python's tuple: (128,) or (4, 5).
  const Dims& ns = options_.normalized_shape;
  std::ostringstream os;
  os << "(";
  for (int i = 0; i < ns.size(); ++i) os << (i ? ", " : "") << ns[i];
  if (ns.size() == 1) os << ",";
  os << "), eps=" << py_float(options_.eps) << ", elementwise_affine=" << py_bool(options_.elementwise_affine);
  return os.str();
}

// ---------------------------------------------------------------- Embedding
Embedding::Embedding(EmbeddingOptions o, Generator* gen) : options_(o) {
  CG_CHECK(o.num_embeddings > 0 && o.embedding_dim > 0, ValueError,
           "Embedding: num_embeddings and embedding_dim must be positive; got ", o.num_embeddings, " and ",
           o.embedding_dim);
  weight = register_parameter("weight", empty({o.num_embeddings, o.embedding_dim}));
  init::normal_(weight, 0.0, 1.0, gen);
}

std::string Embedding::extra_repr() const {
  std::ostringstream os;
  os << options_.num_embeddings << ", " << options_.embedding_dim;
  return os.str();
}

// ---------------------------------------------------------------- activations
std::string LeakyReLU::extra_repr() const { return "negative_slope=" + py_float(slope_); }
std::string Softmax::extra_repr() const { return "dim=" + std::to_string(dim_); }

// ---------------------------------------------------------------- Sequential
Sequential::Sequential(std::initializer_list<Item> items) {
  for (const Item& item : items) push_back(item.ptr());
}

void Sequential::push_back(ModulePtr m) { add_child(std::to_string(children_.size()), std::move(m)); }

const ModulePtr& Sequential::operator[](std::size_t i) const {
  CG_CHECK(i < children_.size(), ValueError, "Sequential: index ", i, " is out of range for ", children_.size(),
           " layers");
  return children_[i].second;
}

void Sequential::throw_wrong_type(std::size_t i) const {
  detail::throw_error<TypeError>("Sequential::at: layer ", i, " is a ", children_[i].second->type_name(),
                                 ", not the requested type");
}

Tensor Sequential::forward(const Tensor& x) {
  Tensor h = x;
  if (flatten_input_ && h.dim() > 2) h = flatten(h, 1);
  for (std::size_t i = 0; i < children_.size(); ++i) {
    Module& m = *children_[i].second;
    // A Linear followed by a ReLU runs as one op, which applies the bias and relu as the product is
    // written and keeps one tensor and one node fewer (BENCHMARKS.md, "Session 20: the MLP step on
    // the Zen 4"). (Exactly these types: a subclass may do more in its forward.)
    if (i + 1 < children_.size() && typeid(m) == typeid(Linear) && typeid(*children_[i + 1].second) == typeid(ReLU)) {
      const auto& lin = static_cast<const Linear&>(m);
      h = linear_relu(h, lin.weight, lin.bias);
      ++i;
      continue;
    }
    h = m.forward(h);
  }
  return h;
}

}  // namespace chaingrad::nn
