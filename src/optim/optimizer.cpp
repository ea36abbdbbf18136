// The Optimizer base (parameter list, named state, lr) and gradient clipping.
#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <set>
#include <sstream>

#include "chaingrad/autograd.hpp"
#include "chaingrad/optim.hpp"

namespace chaingrad::optim {

Optimizer::Optimizer(std::vector<Tensor> params, double lr, const char* name, std::vector<std::string> slot_names,
                     bool counts_steps)
    : params_(std::move(params)),
      slot_names_(std::move(slot_names)),
      counts_steps_(counts_steps),
      lr_(lr),
      initial_lr_(lr) {
  CG_CHECK(std::isfinite(lr) && lr >= 0.0, ValueError, name, ": lr must be a non-negative number; got ", lr);
  CG_CHECK(!params_.empty(), ValueError, name, ": got an empty parameter list");
  std::set<const TensorImpl*> seen;
  for (std::size_t i = 0; i < params_.size(); ++i) {
    const Tensor& p = params_[i];
    CG_CHECK(p.defined(), ValueError, name, ": parameter ", i, " is undefined");
    CG_CHECK(is_floating(p.dtype()), TypeError, name, ": parameter ", i, " must be float32 or float64; got ",
             p.dtype());
    CG_CHECK(p.is_leaf() && p.requires_grad(), ValueError, name, ": parameter ", i,
             " must be a leaf tensor that requires grad");
    CG_CHECK(p.is_contiguous(), ValueError, name, ": parameter ", i, " (shape ", p.shape(),
             ") must be contiguous");
    CG_CHECK(seen.insert(p.impl()).second, ValueError, name, ": parameter ", i, " appears more than once");
  }
  slots_.assign(params_.size(), std::vector<Tensor>(slot_names_.size()));
  steps_.assign(params_.size(), 0);
}

Optimizer::~Optimizer() { set_in_backward(false); }

void Optimizer::step() {
  NoGradGuard no_grad;
  for (std::size_t i = 0; i < params_.size(); ++i) {
    const Tensor g = grad_of(i);
    if (!g.defined()) continue;
    update(i, g);
    params_[i].bump_version();
  }
}

// ---------------------------------------------------------------- updates in backward
void Optimizer::set_in_backward(bool on) {
  if (on) {
    for (const Tensor& p : params_) {
      const InBackwardUpdate* other = p.impl()->extras ? p.impl()->extras->update_in_backward : nullptr;
      CG_CHECK(other == nullptr || other == &in_backward_, ValueError, name(), ": in_backward: parameter of shape ",
               p.shape(), " is already updated in backward by another optimizer");
    }
  }
  for (const Tensor& p : params_) {
    TensorImpl& impl = *p.impl();
    if (on)
      impl.extra().update_in_backward = &in_backward_;
    else if (impl.extras && impl.extras->update_in_backward == &in_backward_)
      impl.extras->update_in_backward = nullptr;
  }
  in_backward_on_ = on;
}

bool Optimizer::InBackward::apply(const Tensor& param, const Product& product) {
  // (A linear search: a backward asks once per weight, and models have tens of parameters.)
  const std::vector<Tensor>& ps = opt_.params_;
  const auto it = std::find_if(ps.begin(), ps.end(), [&](const Tensor& p) { return p.impl() == param.impl(); });
  if (it == ps.end()) return false;
  opt_.update_in_backward(static_cast<std::size_t>(it - ps.begin()), product);
  return true;
}

void Optimizer::update_in_backward(std::size_t i, const InBackwardUpdate::Product& product) {
  NoGradGuard no_grad;
  const Tensor& p = params_[i];
  const Tensor g = empty(p.shape(), p.dtype());
  product.into(g, 1.0, 0.0);
  update(i, g);
}

void Optimizer::zero_grad() {
  for (Tensor& p : params_) p.zero_grad();
}

void Optimizer::set_lr(double lr) {
  CG_CHECK(std::isfinite(lr) && lr >= 0.0, ValueError, name(), ": lr must be a non-negative number; got ", lr);
  lr_ = lr;
}

Tensor& Optimizer::slot(std::size_t i, std::size_t k) {
  Tensor& s = slots_[i][k];
  const Tensor& p = params_[i];
  if (!s.defined()) {
    s = zeros(p.shape(), {.dtype = p.dtype()});
  } else if (s.dtype() != p.dtype()) {  // the module was converted with to(dtype) after construction
    s = s.to(p.dtype()).contiguous();
  }
  return s;
}

Tensor Optimizer::grad_of(std::size_t i) const {
  const Tensor& p = params_[i];
  CG_CHECK(p.is_contiguous(), ValueError, name(), ": parameter ", i, " (shape ", p.shape(),
           ") is no longer contiguous");
  Tensor g = p.grad();
  if (!g.defined()) return g;
  CG_CHECK(g.shape() == p.shape(), ShapeError, name(), ": gradient of parameter ", i, " has shape ", g.shape(),
           ", the parameter ", p.shape());
  if (g.dtype() != p.dtype()) {
    NoGradGuard no_grad;
    g = g.detach().to(p.dtype());
  }
  if (!g.is_contiguous()) {
    NoGradGuard no_grad;
    g = g.detach().contiguous();
  }
  return g;
}

// ---------------------------------------------------------------- state
NamedTensors Optimizer::state() const {
  NamedTensors out;
  for (std::size_t i = 0; i < params_.size(); ++i) {
    const std::string prefix = "state." + std::to_string(i) + ".";
    if (counts_steps_ && steps_[i] > 0)
      out.emplace_back(prefix + "step", scalar(static_cast<double>(steps_[i]), {.dtype = DType::Float64}));
    for (std::size_t k = 0; k < slot_names_.size(); ++k)
      if (slots_[i][k].defined()) out.emplace_back(prefix + slot_names_[k], slots_[i][k]);
  }
  return out;
}

void Optimizer::load_state(const NamedTensors& state) {
  struct Entry {
    std::size_t param;
    std::ptrdiff_t slot;  // -1: step
    const Tensor* value;
  };
  std::vector<Entry> entries;
  std::vector<std::string> errors;
  for (const auto& [key, value] : state) {
    // state.<i>.<name>
    std::size_t i = 0;
    std::string rest;
    bool ok = key.rfind("state.", 0) == 0;
    if (ok) {
      const char* first = key.data() + 6;
      const char* last = key.data() + key.size();
      auto res = std::from_chars(first, last, i);
      ok = res.ec == std::errc() && res.ptr != last && *res.ptr == '.' && i < params_.size();
      if (ok) rest = std::string(res.ptr + 1, last);
    }
    if (!ok) {
      errors.push_back("unexpected key \"" + key + "\" (expected state.<i>.<name> with i < " +
                       std::to_string(params_.size()) + ")");
      continue;
    }
    if (!value.defined()) {
      errors.push_back("\"" + key + "\" is undefined");
      continue;
    }
    if (rest == "step" && counts_steps_) {
      if (value.numel() != 1 || value.item() < 0 || value.item() != std::floor(value.item()))
        errors.push_back("\"" + key + "\" must hold one non-negative integer");
      else
        entries.push_back({i, -1, &value});
      continue;
    }
    auto it = std::find(slot_names_.begin(), slot_names_.end(), rest);
    if (it == slot_names_.end()) {
      std::string names = counts_steps_ ? "step" : "";
      for (const auto& n : slot_names_) {
        if (!names.empty()) names += ", ";
        names += n;
      }
      errors.push_back("unexpected key \"" + key + "\" (" + name() + " keeps " + names + ")");
      continue;
    }
    if (!(value.shape() == params_[i].shape())) {
      std::ostringstream os;
      os << "size mismatch for \"" << key << "\": the state has shape " << value.shape() << ", parameter " << i
         << " has shape " << params_[i].shape();
      errors.push_back(os.str());
      continue;
    }
    if (!is_floating(value.dtype())) {
      errors.push_back("\"" + key + "\" must be a float tensor");
      continue;
    }
    entries.push_back({i, it - slot_names_.begin(), &value});
  }
  if (!errors.empty()) {
    std::ostringstream os;
    os << name() << ".load_state: cannot restore the optimizer state:";
    for (const auto& e : errors) os << "\n  " << e;
    throw ValueError(os.str());
  }
  NoGradGuard no_grad;
  for (auto& row : slots_)
    for (Tensor& s : row) s = Tensor();
  std::fill(steps_.begin(), steps_.end(), 0);
  for (const Entry& e : entries) {
    if (e.slot < 0) {
      steps_[e.param] = static_cast<std::int64_t>(e.value->item());
    } else {
      Tensor& s = slot(e.param, static_cast<std::size_t>(e.slot));
      s.copy_(*e.value);
    }
  }
}

// ---------------------------------------------------------------- clipping
double clip_grad_norm_(const std::vector<Tensor>& params, double max_norm, double norm_type) {
  CG_CHECK(max_norm >= 0.0, ValueError, "clip_grad_norm_: max_norm must be non-negative; got ", max_norm);
  CG_CHECK(norm_type > 0.0, ValueError, "clip_grad_norm_: norm_type must be positive; got ", norm_type);
  const bool inf_norm = std::isinf(norm_type);
  std::vector<Tensor> grads;
  for (const Tensor& p : params) {
    if (!p.defined()) continue;
    Tensor g = p.grad();
    if (!g.defined()) continue;
    if (!g.is_contiguous()) {  // make it contiguous in place, so scaling below reaches .grad
      NoGradGuard no_grad;
      Tensor c = g.detach().contiguous();
      Tensor handle = p;
      handle.set_grad(c);
      g = c;
    }
    grads.push_back(g);
  }
  double acc = 0.0;
  for (const Tensor& g : grads) {
    dispatch_float(g.dtype(), "clip_grad_norm_", [&]<class T>() {
      const T* d = g.data<T>();
      const std::int64_t n = g.numel();
      if (inf_norm) {
        for (std::int64_t i = 0; i < n; ++i) acc = std::max(acc, static_cast<double>(std::abs(d[i])));
      } else if (norm_type == 2.0) {
        double s = 0.0;
        for (std::int64_t i = 0; i < n; ++i) s += static_cast<double>(d[i]) * static_cast<double>(d[i]);
        acc += s;
      } else {
        double s = 0.0;
        for (std::int64_t i = 0; i < n; ++i) s += std::pow(std::abs(static_cast<double>(d[i])), norm_type);
        acc += s;
      }
    });
  }
  const double total = inf_norm ? acc : (norm_type == 2.0 ? std::sqrt(acc) : std::pow(acc, 1.0 / norm_type));
  const double coef = max_norm / (total + 1e-6);
  if (coef < 1.0) {
    NoGradGuard no_grad;
    for (Tensor& g : grads) g.mul_(coef);
  }
  return total;
}

void clip_grad_value_(const std::vector<Tensor>& params, double clip_value) {
  CG_CHECK(clip_value >= 0.0, ValueError, "clip_grad_value_: clip_value must be non-negative; got ", clip_value);
  NoGradGuard no_grad;
  for (const Tensor& p : params) {
    if (!p.defined()) continue;
    Tensor g = p.grad();
    if (!g.defined()) continue;
    if (!g.is_contiguous()) {
      g = g.detach().contiguous();
      Tensor handle = p;
      handle.set_grad(g);
    }
    dispatch_float(g.dtype(), "clip_grad_value_", [&]<class T>() {
      T* d = g.data<T>();
      const T c = static_cast<T>(clip_value);
      for (std::int64_t i = 0, n = g.numel(); i < n; ++i) d[i] = std::clamp(d[i], -c, c);
    });
    g.bump_version();
  }
}

}  // namespace chaingrad::optim
