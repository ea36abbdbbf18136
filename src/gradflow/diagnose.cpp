// Turning one gradient-flow snapshot into warnings that give the reason in chain-rule terms, and
// into a text table. Thresholds: gradflow.hpp, Note [gradflow thresholds].
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "chaingrad/gradflow.hpp"

namespace chaingrad::gradflow {

namespace {

std::string sci(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1e", v);
  return buf;
}

std::string fixed(double v, int digits) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

std::string percent(double fraction) { return fixed(100 * fraction, 0) + "%"; }

// "0.21" for one value, "0.19-0.24" for a range.
std::string value_range(const std::vector<double>& v, int digits) {
  if (v.empty()) return "";
  const auto [lo, hi] = std::minmax_element(v.begin(), v.end());
  if (fixed(*lo, digits) == fixed(*hi, digits)) return fixed(*lo, digits);
  return fixed(*lo, digits) + "-" + fixed(*hi, digits);
}

std::string sci_range(const std::vector<double>& v) {
  if (v.empty()) return "";
  const auto [lo, hi] = std::minmax_element(v.begin(), v.end());
  if (sci(*lo) == sci(*hi)) return sci(*lo);
  return sci(*lo) + " to " + sci(*hi);
}

// "10^5" for a ratio of 3.2e5.
std::string power_of_ten(double ratio) {
  return "10^" + std::to_string(static_cast<int>(std::floor(std::log10(ratio))));
}

std::string plural(std::size_t n, const std::string& word) {
  if (n == 1) return "1 " + word;
  if (word.size() > 6 && word.compare(word.size() - 6, 6, "matrix") == 0)
    return std::to_string(n) + " " + word.substr(0, word.size() - 1) + "ces";
  return std::to_string(n) + " " + word + "s";
}

bool is_weight(const ParamStats& p) { return p.shape.size() >= 2; }

// What lies above (nearer the loss than) layer `layer`: the activation layers' statistics and the
// weights' norms, by kind.
struct Above {
  std::size_t sigmoid = 0, tanh = 0, relu = 0;
  std::vector<double> sigmoid_derivative, tanh_derivative, relu_active, relu_dead;
  std::vector<double> weight_norms;
  bool known = false;  // the layer was found in `layers`
};

Above layers_above(const std::string& layer, const Snapshot& s, const std::vector<LayerInfo>& layers) {
  Above a;
  std::size_t index = layers.size();
  for (std::size_t i = 0; i < layers.size(); ++i)
    if (!layer.empty() && layers[i].name == layer) index = i;
  if (index == layers.size()) return a;
  a.known = true;
  for (std::size_t i = index + 1; i < layers.size(); ++i) {
    const LayerInfo& l = layers[i];
    const ActivationStats* stats = nullptr;
    for (const auto& st : s.activations)
      if (st.layer == l.name) stats = &st;
    if (l.type == "Sigmoid") {
      ++a.sigmoid;
      if (stats) a.sigmoid_derivative.push_back(stats->mean_derivative);
    } else if (l.type == "Tanh") {
      ++a.tanh;
      if (stats) a.tanh_derivative.push_back(stats->mean_derivative);
    } else if (l.type == "ReLU") {
      ++a.relu;
      if (stats) {
        a.relu_active.push_back(stats->mean_derivative);
        a.relu_dead.push_back(stats->inactive_fraction);
      }
    }
    for (const auto& p : s.params)
      if (p.layer == l.name && is_weight(p)) a.weight_norms.push_back(p.weight_norm);
  }
  return a;
}

// Why the gradient reaching a layer is small: the local derivatives above it.
std::string vanishing_reason(const Above& a) {
  std::vector<std::string> parts;
  if (a.sigmoid) {
    std::string p = plural(a.sigmoid, "sigmoid layer") +
                    " above it each scale gradients by at most 0.25 (σ' = y(1-y) " + "≤ 1/4; 0.25^" +
                    std::to_string(a.sigmoid) + " = " + sci(std::pow(0.25, double(a.sigmoid)));
    if (!a.sigmoid_derivative.empty()) p += "; measured mean σ' " + value_range(a.sigmoid_derivative, 3);
    parts.push_back(p + ")");
  }
  if (a.tanh) {
    std::string p = plural(a.tanh, "tanh layer") + " above it scale gradients by 1-y² ≤ 1";
    if (!a.tanh_derivative.empty()) p += " (measured mean " + value_range(a.tanh_derivative, 3) + ")";
    parts.push_back(p);
  }
  if (a.relu && !a.relu_active.empty()) {
    const double worst = *std::min_element(a.relu_active.begin(), a.relu_active.end());
    if (worst < 0.5)
      parts.push_back(plural(a.relu, "ReLU layer") + " above it pass gradient only through active units (measured " +
                      "active fraction " + value_range(a.relu_active, 2) + ")");
  }
  if (!a.weight_norms.empty()) {
    double product = 1;
    for (double n : a.weight_norms) product *= n;
    if (parts.empty() || product < 1)
      parts.push_back(plural(a.weight_norms.size(), "weight matrix") + " above it multiply it by Wᵀ on the way down " +
                      "(norms " + sci_range(a.weight_norms) + "; small weights shrink it at every layer)");
  }
  if (parts.empty()) return "";
  std::string out;
  for (const auto& part : parts) out += "; " + part;  // follows the warning's first clause
  return out;
}

std::string exploding_reason(const Above& a) {
  if (a.weight_norms.empty()) return "; lower the learning rate or clip gradients";
  double product = 1;
  for (double n : a.weight_norms) product *= n;
  return "; " + plural(a.weight_norms.size(), "weight matrix") + " above it multiply it by Wᵀ on the way down " +
         "(norms " + sci_range(a.weight_norms) + ", product " + sci(product) +
         ": each can grow it by up to its largest singular value); lower the learning rate, clip gradients or "
         "scale the initialization down";
}

Warning make(Warning::Kind kind, const std::string& subject, std::string message, std::int64_t step) {
  Warning w;
  w.kind = kind;
  w.subject = subject;
  w.message = std::move(message);
  w.first_step = w.last_step = step;
  w.count = 1;
  return w;
}

}  // namespace

const char* warning_kind_name(Warning::Kind kind) {
  switch (kind) {
    case Warning::Kind::Vanishing:
      return "vanishing";
    case Warning::Kind::Exploding:
      return "exploding";
    case Warning::Kind::LargeUpdate:
      return "large update";
    case Warning::Kind::DeadReLU:
      return "dead ReLU";
    case Warning::Kind::Saturated:
      return "saturated";
  }
  return "?";
}

std::vector<Warning> diagnose(const Snapshot& s, const std::vector<LayerInfo>& layers, const Thresholds& th) {
  std::vector<Warning> out;
  // The output layer's weight: the last weight (in forward order) with a finite gradient.
  const ParamStats* output = nullptr;
  for (const auto& p : s.params)
    if (is_weight(p) && p.has_grad && std::isfinite(p.grad_norm)) output = &p;
  for (std::size_t i = 0; i < s.params.size(); ++i) {
    const ParamStats& p = s.params[i];
    if (!is_weight(p) || !p.has_grad) continue;
    const std::string head = p.name + ": gradient norm " + sci(p.grad_norm);
    if (!std::isfinite(p.grad_norm)) {
      out.push_back(make(Warning::Kind::Exploding, p.name,
                         p.name + ": gradient norm is " + (std::isnan(p.grad_norm) ? "NaN" : "infinite") +
                             "; a NaN or Inf entered the backward pass at or above this layer (--detect-anomaly "
                             "names the op)",
                         s.step));
      continue;
    }
    // The largest gradient among the weights above it (later in forward order, nearer the loss).
    const ParamStats* largest = nullptr;
    for (std::size_t j = i + 1; j < s.params.size(); ++j) {
      const ParamStats& q = s.params[j];
      if (is_weight(q) && q.has_grad && std::isfinite(q.grad_norm) && (!largest || q.grad_norm > largest->grad_norm))
        largest = &q;
    }
    if (largest && largest->grad_norm > 0 && p.grad_norm < th.vanishing_ratio * largest->grad_norm) {
      const std::string times = p.grad_norm > 0
                                    ? power_of_ten(largest->grad_norm / p.grad_norm) + " times smaller than "
                                    : "no gradient reaches it, against ";
      out.push_back(make(Warning::Kind::Vanishing, p.name,
                         head + ", " + times + largest->name + " (" + sci(largest->grad_norm) + ")" +
                             vanishing_reason(layers_above(p.layer, s, layers)),
                         s.step));
    } else if (p.grad_norm > th.exploding_norm) {
      out.push_back(make(
          Warning::Kind::Exploding, p.name,
          head + ", above " + sci(th.exploding_norm) + exploding_reason(layers_above(p.layer, s, layers)), s.step));
    } else if (output && output != &p && output->grad_norm > 0 &&
               p.grad_norm > th.exploding_ratio * output->grad_norm) {
      out.push_back(make(Warning::Kind::Exploding, p.name,
                         head + ", " + power_of_ten(p.grad_norm / output->grad_norm) + " times larger than " +
                             output->name + " at the output (" + sci(output->grad_norm) + ")" +
                             exploding_reason(layers_above(p.layer, s, layers)),
                         s.step));
    }
    if (std::isfinite(p.update_ratio) && p.update_ratio > th.update_ratio_high)
      out.push_back(make(Warning::Kind::LargeUpdate, p.name,
                         p.name + ": one step changed the weights by " + percent(p.update_ratio) +
                             " of their norm (update/weight " + sci(p.update_ratio) +
                             "; healthy training sits near 1e-3): the learning rate is too high for this layer",
                         s.step));
  }
  for (const auto& a : s.activations) {
    const std::string name = a.layer + " (" + activation_name(a.kind) + ")";
    if (a.kind == ActivationKind::ReLU && a.inactive_fraction > th.dead_fraction) {
      out.push_back(make(Warning::Kind::DeadReLU, a.layer,
                         name + ": " + percent(a.inactive_fraction) + " of its " + std::to_string(a.units) +
                             " units output 0 for every sample in the batch; ReLU'(x) = 0 there, so the chain rule "
                             "passes no gradient to the weights feeding them (lower the learning rate, or use "
                             "leaky_relu)",
                         s.step));
    } else if (a.kind == ActivationKind::Sigmoid && a.inactive_fraction > th.saturated_fraction) {
      const double d = th.sigmoid_saturation * (1 - th.sigmoid_saturation);
      out.push_back(make(Warning::Kind::Saturated, a.layer,
                         name + ": " + percent(a.inactive_fraction) + " of its outputs are saturated (y < " +
                             fixed(th.sigmoid_saturation, 2) + " or y > " + fixed(1 - th.sigmoid_saturation, 2) +
                             ", where σ' = y(1-y) < " + fixed(d, 4) + "; mean σ' " + fixed(a.mean_derivative, 3) +
                             "); every gradient passing down through it is multiplied by σ', so little reaches "
                             "the layers below",
                         s.step));
    } else if (a.kind == ActivationKind::Tanh && a.inactive_fraction > th.saturated_fraction) {
      const double d = 1 - th.tanh_saturation * th.tanh_saturation;
      out.push_back(make(Warning::Kind::Saturated, a.layer,
                         name + ": " + percent(a.inactive_fraction) + " of its outputs are saturated (|y| > " +
                             fixed(th.tanh_saturation, 2) + ", where 1-y² < " + fixed(d, 3) + "; mean 1-y² " +
                             fixed(a.mean_derivative, 3) +
                             "); every gradient passing down through it is multiplied by 1-y², so little reaches "
                             "the layers below",
                         s.step));
    }
  }
  return out;
}

std::string format_table(const Snapshot& s) {
  std::ostringstream os;
  std::size_t width = 9;
  for (const auto& p : s.params) width = std::max(width, p.name.size());
  auto pad = [](std::string v, std::size_t w, bool right) {
    if (v.size() >= w) return v;
    return right ? std::string(w - v.size(), ' ') + v : v + std::string(w - v.size(), ' ');
  };
  os << "  " << pad("parameter", width, false) << "  " << pad("shape", 12, false) << "  " << pad("grad norm", 9, true)
     << "  " << pad("weight norm", 11, true) << "  " << pad("update/weight", 13, true) << "\n";
  for (const auto& p : s.params) {
    os << "  " << pad(p.name, width, false) << "  " << pad(to_string(p.shape), 12, false) << "  "
       << pad(p.has_grad ? sci(p.grad_norm) : "-", 9, true) << "  " << pad(sci(p.weight_norm), 11, true) << "  "
       << pad(std::isnan(p.update_ratio) ? "-" : sci(p.update_ratio), 13, true) << "\n";
  }
  if (!s.activations.empty()) {
    os << "  " << pad("layer", width, false) << "  " << pad("activation", 12, false) << "  " << pad("units", 9, true)
       << "  " << pad("dead/satur.", 11, true) << "  " << pad("mean f'(x)", 13, true) << "\n";
    for (const auto& a : s.activations)
      os << "  " << pad(a.layer, width, false) << "  " << pad(activation_name(a.kind), 12, false) << "  "
         << pad(std::to_string(a.units), 9, true) << "  " << pad(fixed(100 * a.inactive_fraction, 1) + "%", 11, true)
         << "  " << pad(fixed(a.mean_derivative, 3), 13, true) << "\n";
  }
  return os.str();
}

}  // namespace chaingrad::gradflow
