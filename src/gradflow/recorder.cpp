// The gradient-flow recorder: what it measures on a recording step and how it stays cheap on the
// others (see gradflow.hpp).
#include <chrono>
#include <cmath>
#include <cstring>
#include <sstream>

#include "chaingrad/autograd.hpp"
#include "chaingrad/error.hpp"
#include "chaingrad/gradflow.hpp"
#include "chaingrad/ops.hpp"

namespace chaingrad::gradflow {

namespace {

using Clock = std::chrono::steady_clock;

// Adds the elapsed time to `total` when it goes out of scope.
class ScopedTimer {
 public:
  explicit ScopedTimer(double& total) : total_(total), start_(Clock::now()) {}
  ~ScopedTimer() { total_ += std::chrono::duration<double>(Clock::now() - start_).count(); }
  ScopedTimer(const ScopedTimer&) = delete;
  ScopedTimer& operator=(const ScopedTimer&) = delete;

 private:
  double& total_;
  Clock::time_point start_;
};

// The reductions below keep kLanes independent partial sums, so the compiler can vectorize them
// (a single running double sum is a serial dependency chain without -ffast-math); they are most
// of a recording step's cost.
constexpr std::int64_t kLanes = 8;

template <class T>
double sum_of_squares(const T* p, std::int64_t n) {
  double acc[kLanes] = {};
  std::int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (std::int64_t k = 0; k < kLanes; ++k) acc[k] += static_cast<double>(p[i + k]) * static_cast<double>(p[i + k]);
  double s = 0;
  for (; i < n; ++i) s += static_cast<double>(p[i]) * static_cast<double>(p[i]);
  for (double a : acc) s += a;
  return s;
}

// Copies `n` values to `dst` and returns their sum of squares, in one pass.
template <class T>
double copy_sum_of_squares(const T* p, T* dst, std::int64_t n) {
  double acc[kLanes] = {};
  std::int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (std::int64_t k = 0; k < kLanes; ++k) {
      dst[i + k] = p[i + k];
      acc[k] += static_cast<double>(p[i + k]) * static_cast<double>(p[i + k]);
    }
  double s = 0;
  for (; i < n; ++i) {
    dst[i] = p[i];
    s += static_cast<double>(p[i]) * static_cast<double>(p[i]);
  }
  for (double a : acc) s += a;
  return s;
}

template <class T>
double diff_sum_of_squares(const T* now, const T* before, std::int64_t n) {
  double acc[kLanes] = {};
  std::int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (std::int64_t k = 0; k < kLanes; ++k) {
      const double d = static_cast<double>(now[i + k]) - static_cast<double>(before[i + k]);
      acc[k] += d * d;
    }
  double s = 0;
  for (; i < n; ++i) {
    const double d = static_cast<double>(now[i]) - static_cast<double>(before[i]);
    s += d * d;
  }
  for (double a : acc) s += a;
  return s;
}

// ‖t‖₂ over all elements, accumulated in double (float32 and float64 tensors).
double l2_norm(const Tensor& t) {
  const Tensor c = t.contiguous();
  switch (c.dtype()) {
    case DType::Float32:
      return std::sqrt(sum_of_squares(c.data<float>(), c.numel()));
    case DType::Float64:
      return std::sqrt(sum_of_squares(c.data<double>(), c.numel()));
    default:
      return kNaN;
  }
}

// ‖t‖₂, copying t's values into `copy` on the way.
double l2_norm_and_copy(const Tensor& t, std::vector<unsigned char>& copy) {
  const Tensor c = t.contiguous();
  copy.resize(static_cast<std::size_t>(c.numel()) * element_size(c.dtype()));
  switch (c.dtype()) {
    case DType::Float32:
      return std::sqrt(copy_sum_of_squares(c.data<float>(), reinterpret_cast<float*>(copy.data()), c.numel()));
    case DType::Float64:
      return std::sqrt(copy_sum_of_squares(c.data<double>(), reinterpret_cast<double*>(copy.data()), c.numel()));
    default:
      if (!copy.empty()) std::memcpy(copy.data(), c.raw_data(), copy.size());
      return kNaN;
  }
}

double diff_norm(const Tensor& t, const std::vector<unsigned char>& before) {
  const Tensor c = t.contiguous();
  CG_ASSERT(before.size() == static_cast<std::size_t>(c.numel()) * element_size(c.dtype()));
  switch (c.dtype()) {
    case DType::Float32:
      return std::sqrt(diff_sum_of_squares(c.data<float>(), reinterpret_cast<const float*>(before.data()), c.numel()));
    case DType::Float64:
      return std::sqrt(
          diff_sum_of_squares(c.data<double>(), reinterpret_cast<const double*>(before.data()), c.numel()));
    default:
      return kNaN;
  }
}

// Dead units (ReLU) or saturated outputs (sigmoid, tanh) of one activation layer's output [N, ...].
template <class T>
void activation_stats(const T* y, std::int64_t n, std::int64_t units, const Thresholds& th, ActivationStats& out) {
  const double total = static_cast<double>(n) * static_cast<double>(units);
  double inactive = 0, derivative = 0;
  switch (out.kind) {
    case ActivationKind::ReLU: {
      // A unit is dead on this batch when it is 0 for every sample: ReLU'(x) = 0 for all of them.
      std::vector<unsigned char> alive(static_cast<std::size_t>(units), 0);
      std::int64_t active = 0;
      for (std::int64_t i = 0; i < n; ++i) {
        const T* row = y + i * units;
        for (std::int64_t u = 0; u < units; ++u) {
          const bool on = row[u] > T(0);
          alive[u] |= on;
          active += on;
        }
      }
      std::int64_t dead = 0;
      for (unsigned char a : alive) dead += !a;
      inactive = static_cast<double>(dead) / static_cast<double>(units);
      derivative = static_cast<double>(active) / total;
      break;
    }
    case ActivationKind::Sigmoid: {
      // σ'(x) = y (1 - y): below 0.0099 when y < 0.01 or y > 0.99.
      const double lo = th.sigmoid_saturation, hi = 1.0 - th.sigmoid_saturation;
      std::int64_t saturated = 0;
      for (std::int64_t i = 0; i < n * units; ++i) {
        const double v = static_cast<double>(y[i]);
        saturated += (v < lo) | (v > hi);
        derivative += v * (1.0 - v);
      }
      inactive = static_cast<double>(saturated) / total;
      derivative /= total;
      break;
    }
    case ActivationKind::Tanh: {
      // tanh'(x) = 1 - y^2: below 0.02 when |y| > 0.99.
      std::int64_t saturated = 0;
      for (std::int64_t i = 0; i < n * units; ++i) {
        const double v = static_cast<double>(y[i]);
        saturated += std::abs(v) > th.tanh_saturation;
        derivative += 1.0 - v * v;
      }
      inactive = static_cast<double>(saturated) / total;
      derivative /= total;
      break;
    }
  }
  out.inactive_fraction = inactive;
  out.mean_derivative = derivative;
}

bool activation_kind(const nn::Module& m, ActivationKind& kind) {
  if (dynamic_cast<const nn::ReLU*>(&m)) {
    kind = ActivationKind::ReLU;
  } else if (dynamic_cast<const nn::Sigmoid*>(&m)) {
    kind = ActivationKind::Sigmoid;
  } else if (dynamic_cast<const nn::Tanh*>(&m)) {
    kind = ActivationKind::Tanh;
  } else {
    return false;
  }
  return true;
}

// "0.weight" -> "0".
std::string first_component(const std::string& name) {
  const auto dot = name.find('.');
  return dot == std::string::npos ? std::string() : name.substr(0, dot);
}

}  // namespace

const char* activation_name(ActivationKind kind) {
  switch (kind) {
    case ActivationKind::ReLU:
      return "ReLU";
    case ActivationKind::Sigmoid:
      return "Sigmoid";
    case ActivationKind::Tanh:
      return "Tanh";
  }
  return "?";
}

std::vector<LayerInfo> describe_layers(const nn::Module& model) {
  std::vector<LayerInfo> out;
  auto info = [](const std::string& name, const nn::Module& m) {
    LayerInfo l;
    l.name = name;
    l.type = m.type_name();
    l.description = m.extra_repr();
    l.num_parameters = m.num_parameters();
    return l;
  };
  if (dynamic_cast<const nn::Sequential*>(&model)) {
    for (const auto& [name, child] : model.named_children()) out.push_back(info(name, *child));
  } else {
    out.push_back(info("", model));
  }
  return out;
}

Recorder::Recorder(nn::Module& model, Options options)
    : model_(model), options_(options), layers_(describe_layers(model)), params_(model.named_parameters()) {
  CG_CHECK(options_.every >= 1, ValueError, "gradflow::Recorder: the recording interval must be at least 1; got ",
           options_.every);
  step_ = options_.first_step;
  for (const auto& [name, t] : params_) {
    std::string layer = first_component(name);
    bool known = false;
    for (const auto& l : layers_) known = known || l.name == layer;
    param_layers_.push_back(known ? layer : std::string());
  }
  before_.resize(params_.size());
}

void Recorder::before_step(const Tensor& inputs, const Tensor& labels) {
  if (!due()) return;
  ScopedTimer timer(seconds_);
  NoGradGuard no_grad;
  pending_ = Snapshot{};
  pending_.step = step_;
  pending_.params.reserve(params_.size());
  for (std::size_t i = 0; i < params_.size(); ++i) {
    const Tensor& p = params_[i].second;
    ParamStats ps;
    ps.name = params_[i].first;
    ps.layer = param_layers_[i];
    ps.shape = p.shape();
    ps.weight_norm = l2_norm_and_copy(p, before_[i]);
    const Tensor g = p.grad();
    ps.has_grad = g.defined();
    if (g.defined()) ps.grad_norm = l2_norm(g);
    pending_.params.push_back(std::move(ps));
  }
  if (options_.activations && inputs.defined()) record_activations(inputs, labels, pending_);
  has_pending_ = true;
}

void Recorder::record_activations(const Tensor& inputs, const Tensor& labels, Snapshot& s) {
  auto* seq = dynamic_cast<nn::Sequential*>(&model_);
  if (!seq) return;
  Tensor h = inputs;
  if (seq->flatten_input() && h.dim() > 2) h = flatten(h, 1);
  for (std::size_t i = 0; i < seq->size(); ++i) {
    nn::Module& m = *(*seq)[i];
    if (!dynamic_cast<nn::Dropout*>(&m)) {  // Dropout: identity here, so its generator does not advance
      // Layers that update buffers in training mode (BatchNorm's running statistics) get them back.
      nn::NamedTensors buffers = m.is_training() ? m.named_buffers() : nn::NamedTensors{};
      std::vector<Tensor> saved;
      saved.reserve(buffers.size());
      for (const auto& [name, b] : buffers) saved.push_back(b.clone());
      h = m.forward(h);
      for (std::size_t j = 0; j < buffers.size(); ++j) buffers[j].second.copy_(saved[j]);
    }
    if (h.dim() >= 1) {
      layers_[i].output_shape = Dims(std::span<const std::int64_t>(h.shape().begin() + 1, h.shape().end()));
      layers_[i].has_output_shape = true;
    }
    ActivationStats a;
    if (!activation_kind(m, a.kind) || h.dim() < 1 || h.numel() == 0) continue;
    a.layer = layers_[i].name;
    const Tensor y = h.contiguous();
    const std::int64_t n = y.size(0);
    a.units = y.numel() / n;
    if (y.dtype() == DType::Float32)
      activation_stats(y.data<float>(), n, a.units, options_.thresholds, a);
    else if (y.dtype() == DType::Float64)
      activation_stats(y.data<double>(), n, a.units, options_.thresholds, a);
    else
      continue;
    s.activations.push_back(a);
  }
  // A classifier's logits [N, C] with int64 labels [N]: the batch's loss and accuracy.
  if (labels.defined() && labels.dtype() == DType::Int64 && h.dim() == 2 && labels.dim() == 1 &&
      labels.size(0) == h.size(0) && h.size(0) > 0) {
    s.batch_loss = cross_entropy(h, labels).item();
    const auto pred = argmax(h, 1).to_vector<std::int64_t>();
    const auto truth = labels.to_vector<std::int64_t>();
    std::int64_t correct = 0;
    for (std::size_t k = 0; k < pred.size(); ++k) correct += pred[k] == truth[k];
    s.batch_accuracy = static_cast<double>(correct) / static_cast<double>(pred.size());
  }
}

void Recorder::after_step(double loss) {
  if (!std::isnan(loss)) {
    loss_sum_ += loss;
    ++loss_count_;
  }
  if (has_pending_ && pending_.step == step_) {
    ScopedTimer timer(seconds_);
    NoGradGuard no_grad;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      ParamStats& ps = pending_.params[i];
      ps.update_norm = diff_norm(params_[i].second, before_[i]);
      ps.update_ratio = ps.weight_norm > 0 ? ps.update_norm / ps.weight_norm
                                           : (ps.update_norm == 0 ? 0.0 : std::numeric_limits<double>::infinity());
    }
    pending_.loss = loss_count_ ? loss_sum_ / static_cast<double>(loss_count_) : kNaN;
    loss_sum_ = 0;
    loss_count_ = 0;
    for (Warning& w : diagnose(pending_, layers_, options_.thresholds)) {
      Warning* existing = nullptr;
      for (Warning& e : warnings_)
        if (e.kind == w.kind && e.subject == w.subject) existing = &e;
      if (existing) {
        existing->message = std::move(w.message);
        existing->last_step = w.last_step;
        existing->count += 1;
      } else {
        warnings_.push_back(std::move(w));
      }
    }
    snapshots_.push_back(std::move(pending_));
    pending_ = Snapshot{};
    has_pending_ = false;
  }
  ++step_;
}

std::string Recorder::epoch_summary() {
  if (snapshots_.empty()) return "";
  const Snapshot& s = snapshots_.back();
  std::ostringstream os;
  os << "gradient flow at step " << s.step << " (recorded every " << options_.every << " steps):\n" << format_table(s);
  bool header = false;
  for (const Warning& w : warnings_) {
    if (w.last_step < summary_step_) continue;
    if (!header) os << "warnings:\n";
    header = true;
    os << "  [" << warning_kind_name(w.kind) << "] " << w.message << " (steps " << w.first_step << "-" << w.last_step
       << ", " << w.count << (w.count == 1 ? " recording" : " recordings") << ")\n";
  }
  if (!header) os << "no gradient-flow warnings\n";
  summary_step_ = step_;
  return os.str();
}

}  // namespace chaingrad::gradflow
