// trace_mlp: the chain rule for one weight of a real multilayer perceptron on one input.
//
// Every neuron is a named value: z_l[j] (before the activation) and a_l[j] (after). A path from
// the loss down to W_layer[row, col] passes one neuron of each following layer, so there are
// prod(widths) paths; like the formula explainer, a k-best dynamic program finds the largest
// without enumerating them, and a layer-by-layer sum gives the exact total.
#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <sstream>

#include "chaingrad/autograd.hpp"
#include "chaingrad/explain.hpp"
#include "chaingrad/ops.hpp"
#include "explain/model.hpp"

namespace chaingrad::explain {

using detail::fmt;
using detail::partial_name;

namespace {

enum class Act { None, Relu, Sigmoid, Tanh };

Act parse_activation(const std::string& name, std::size_t l) {
  if (name.empty() || name == "none" || name == "identity" || name == "linear") return Act::None;
  if (name == "relu") return Act::Relu;
  if (name == "sigmoid") return Act::Sigmoid;
  if (name == "tanh") return Act::Tanh;
  ::chaingrad::detail::throw_error<ValueError>("trace_mlp: activation ", l, " is '", name,
                                  "'; expected relu, sigmoid, tanh or none");
}

Tensor apply(Act a, const Tensor& z) {
  switch (a) {
    case Act::Relu: return relu(z);
    case Act::Sigmoid: return sigmoid(z);
    case Act::Tanh: return tanh(z);
    case Act::None: break;
  }
  return z;
}

std::string slope_formula(Act a, const std::string& z) {
  switch (a) {
    case Act::Relu: return "[" + z + " > 0]";
    case Act::Sigmoid: return "σ'(" + z + ")";
    case Act::Tanh: return "1 - tanh(" + z + ")^2";
    case Act::None: break;
  }
  return "1";
}

const char* slope_legend(Act a) {
  switch (a) {
    case Act::Relu: return "[u > 0] = 1 when u > 0, else 0 (relu's slope; the engine takes 0 at u = 0)";
    case Act::Sigmoid: return "σ'(u) = σ(u)·(1 - σ(u)), where σ = sigmoid";
    default: return nullptr;
  }
}

using detail::cat;
std::string idx(const std::string& base, std::int64_t i) { return cat(base, "[", std::to_string(i), "]"); }
std::string idx(const std::string& base, std::int64_t i, std::int64_t j) {
  return cat(base, "[", std::to_string(i), ",", std::to_string(j), "]");
}
std::string layer_name(const char* prefix, std::size_t l) { return cat(prefix, std::to_string(l)); }

// Partial derivatives of an elementwise or scalar function, by the engine: f applied to a leaf
// copy of `x` (shape [1, n]), then autograd::grad of sum(f).
std::vector<double> engine_grad(const Tensor& x, const std::function<Tensor(const Tensor&)>& f) {
  EnableGradGuard grad_on(true);
  Tensor leaf = x.detach().clone();
  leaf.requires_grad_(true);
  Tensor y = f(leaf);
  if (y.numel() != 1) y = sum(y);
  if (!y.requires_grad()) return std::vector<double>(x.numel(), 0.0);
  return autograd::grad({y}, {leaf})[0].to_vector<double>();
}

struct Entry {
  double product;
  int pred;  // position in the previous level
  int rank;
};

struct Level {
  std::vector<std::string> names;    // one per position
  std::vector<std::int64_t> index;   // the neuron's index in its layer
  std::vector<std::vector<Entry>> best;
  std::vector<double> sum;           // sum over all paths from the parameter up to this neuron
  // How this level is reached from the previous one.
  enum class Step { Start, Elementwise, Dense, Loss } step = Step::Start;
  std::size_t layer = 0;
};

}  // namespace

NetworkTrace trace_mlp(const std::vector<Tensor>& weights, const std::vector<Tensor>& biases,
                       const std::vector<std::string>& activations, const Tensor& input, const Tensor& target,
                       const std::string& loss, std::size_t layer, std::int64_t row, std::int64_t col,
                       std::size_t top_k) {
  const std::size_t nl = weights.size();
  CG_CHECK(nl > 0, ValueError, "trace_mlp: expected at least one layer");
  CG_CHECK(activations.size() == nl, ValueError, "trace_mlp: got ", nl, " weights but ", activations.size(),
           " activations (one per layer; use \"none\" for none)");
  CG_CHECK(biases.empty() || biases.size() == nl, ValueError, "trace_mlp: got ", nl, " weights but ", biases.size(),
           " biases (one per layer, or none at all)");
  CG_CHECK(loss == "cross_entropy" || loss == "mse", ValueError, "trace_mlp: loss is '", loss,
           "'; expected cross_entropy or mse");
  CG_CHECK(layer < nl, ValueError, "trace_mlp: layer ", layer, " does not exist; the network has ", nl, " layers");
  CG_CHECK(input.defined(), ValueError, "trace_mlp: input is undefined");

  // float64 copies of everything, so sums over paths can be compared with autograd to 1e-12.
  std::vector<Tensor> W, B;
  std::vector<Act> act;
  std::int64_t width = input.numel();
  for (std::size_t l = 0; l < nl; ++l) {
    CG_CHECK(weights[l].defined() && weights[l].dim() == 2, ShapeError, "trace_mlp: weights[", l,
             "] must be 2-D [out, in]; got shape ", weights[l].defined() ? to_string(weights[l].shape()) : "undefined");
    CG_CHECK(weights[l].shape()[1] == width, ShapeError, "trace_mlp: weights[", l, "] has shape ",
             weights[l].shape(), " but its input has ", width, " features");
    W.push_back(weights[l].detach().to(DType::Float64).contiguous());
    W.back().requires_grad_(true);
    width = weights[l].shape()[0];
    if (!biases.empty()) {
      CG_CHECK(biases[l].defined() && biases[l].dim() == 1 && biases[l].shape()[0] == width, ShapeError,
               "trace_mlp: biases[", l, "] must have shape [", width, "]; got ",
               biases[l].defined() ? to_string(biases[l].shape()) : "undefined");
      B.push_back(biases[l].detach().to(DType::Float64).contiguous());
      B.back().requires_grad_(true);
    }
    act.push_back(parse_activation(activations[l], l));
  }
  const std::int64_t out_rows = weights[layer].shape()[0], out_cols = weights[layer].shape()[1];
  CG_CHECK(row >= 0 && row < out_rows, ValueError, "trace_mlp: row ", row, " is outside weights[", layer,
           "] of shape ", weights[layer].shape());
  const bool is_bias = col < 0;
  CG_CHECK(!is_bias || !B.empty(), ValueError, "trace_mlp: col < 0 asks about a bias, but the network has none");
  CG_CHECK(is_bias || col < out_cols, ValueError, "trace_mlp: col ", col, " is outside weights[", layer,
           "] of shape ", weights[layer].shape());

  const Tensor x = input.detach().to(DType::Float64).reshape({1, input.numel()});
  const std::int64_t classes = width;
  Tensor ce_target, mse_target;
  std::int64_t target_class = -1;
  if (loss == "cross_entropy") {
    CG_CHECK(target.defined() && target.numel() == 1, ValueError,
             "trace_mlp: cross_entropy needs one class index as the target; got ",
             target.defined() ? std::to_string(target.numel()) + " values" : "none");
    const double t = target.to(DType::Float64).item();
    CG_CHECK(t == std::floor(t) && t >= 0 && t < static_cast<double>(classes), ValueError,
             "trace_mlp: target ", t, " is not a class index in [0, ", classes, ")");
    target_class = static_cast<std::int64_t>(t);
    const std::int64_t tc = target_class;
    ce_target = from_vector(std::span<const std::int64_t>(&tc, 1), {1});
  } else {
    CG_CHECK(target.defined() && target.numel() == classes, ShapeError, "trace_mlp: mse needs a target of ",
             classes, " values; got ", target.defined() ? target.numel() : 0);
    mse_target = target.detach().to(DType::Float64).reshape({1, classes});
  }
  auto loss_of = [&](const Tensor& out) {
    return loss == "cross_entropy" ? cross_entropy(out, ce_target) : mse_loss(out, mse_target);
  };

  // Forward with the engine, keeping every layer's z and a.
  std::vector<Tensor> Z, A;
  Tensor a = x;
  for (std::size_t l = 0; l < nl; ++l) {
    Tensor z = linear(a, W[l], B.empty() ? Tensor() : B[l]);
    a = apply(act[l], z);
    Z.push_back(z);
    A.push_back(a);
  }
  const Tensor L = loss_of(A.back());

  NetworkTrace tr;
  tr.parameter = is_bias ? idx(layer_name("b", layer), row) : idx(layer_name("W", layer), row, col);
  tr.parameter_value = is_bias ? B[layer].at({row}) : W[layer].at({row, col});
  tr.loss = loss;
  tr.loss_value = L.item();
  {
    const Tensor p = is_bias ? B[layer] : W[layer];
    const Tensor g = autograd::grad({L}, {p})[0];
    tr.autograd = is_bias ? g.at({row}) : g.at({row, col});
  }

  // Local factors, each from the engine.
  const std::vector<double> dloss = engine_grad(A.back(), loss_of);
  std::vector<std::vector<double>> slope(nl), zval(nl), aval(nl);
  for (std::size_t l = 0; l < nl; ++l) {
    zval[l] = Z[l].to_vector<double>();
    aval[l] = A[l].to_vector<double>();
    if (act[l] != Act::None) slope[l] = engine_grad(Z[l], [&](const Tensor& t) { return apply(act[l], t); });
  }
  const std::vector<double> xval = x.to_vector<double>();
  std::vector<std::vector<double>> wval(nl);
  for (std::size_t l = 0; l < nl; ++l) wval[l] = W[l].detach().to_vector<double>();
  auto z_name = [&](std::size_t l, std::int64_t j) { return idx(layer_name("z", l), j); };
  auto a_name = [&](std::size_t l, std::int64_t j) {
    return act[l] == Act::None ? z_name(l, j) : idx(layer_name("a", l), j);
  };
  auto in_name = [&](std::size_t l, std::int64_t j) { return l == 0 ? idx("x", j) : a_name(l - 1, j); };
  auto in_value = [&](std::size_t l, std::int64_t j) { return l == 0 ? xval[j] : aval[l - 1][j]; };

  // Levels from the parameter up to the loss.
  const std::size_t K = std::max<std::size_t>(top_k, 1);
  std::vector<Level> levels;
  {
    Level start;
    start.names = {z_name(layer, row)};
    start.index = {row};
    start.layer = layer;
    const double first = is_bias ? 1.0 : in_value(layer, col);
    start.best = {{{first, -1, -1}}};
    start.sum = {first};
    levels.push_back(std::move(start));
  }
  auto top = [&](std::vector<Entry>& cand) {
    const std::size_t keep = std::min(K, cand.size());
    std::partial_sort(cand.begin(), cand.begin() + static_cast<std::ptrdiff_t>(keep), cand.end(),
                      [](const Entry& p, const Entry& q) {
                        const double x1 = std::abs(p.product), y1 = std::abs(q.product);
                        if (x1 != y1) return x1 > y1;
                        return p.pred != q.pred ? p.pred < q.pred : p.rank < q.rank;
                      });
    cand.resize(keep);
  };
  auto elementwise = [&](std::size_t l) {
    const Level& prev = levels.back();
    Level next;
    next.step = Level::Step::Elementwise;
    next.layer = l;
    for (std::size_t p = 0; p < prev.names.size(); ++p) {
      const std::int64_t j = prev.index[p];
      next.names.push_back(a_name(l, j));
      next.index.push_back(j);
      std::vector<Entry> cand;
      for (std::size_t r = 0; r < prev.best[p].size(); ++r)
        cand.push_back({slope[l][j] * prev.best[p][r].product, static_cast<int>(p), static_cast<int>(r)});
      next.best.push_back(std::move(cand));
      next.sum.push_back(slope[l][j] * prev.sum[p]);
    }
    levels.push_back(std::move(next));
  };
  if (act[layer] != Act::None) elementwise(layer);
  std::vector<std::size_t> widths;
  for (std::size_t l = layer + 1; l < nl; ++l) {
    const Level& prev = levels.back();
    const std::int64_t n_out = W[l].shape()[0], n_in = W[l].shape()[1];
    Level next;
    next.step = Level::Step::Dense;
    next.layer = l;
    for (std::int64_t k = 0; k < n_out; ++k) {
      next.names.push_back(z_name(l, k));
      next.index.push_back(k);
      std::vector<Entry> cand;
      double s = 0;
      for (std::size_t p = 0; p < prev.names.size(); ++p) {
        const double w = wval[l][k * n_in + prev.index[p]];
        s += w * prev.sum[p];
        for (std::size_t r = 0; r < prev.best[p].size(); ++r)
          cand.push_back({w * prev.best[p][r].product, static_cast<int>(p), static_cast<int>(r)});
      }
      top(cand);
      next.best.push_back(std::move(cand));
      next.sum.push_back(s);
    }
    widths.push_back(static_cast<std::size_t>(n_out));
    levels.push_back(std::move(next));
    if (act[l] != Act::None) elementwise(l);
  }
  {
    const Level& prev = levels.back();
    Level last;
    last.step = Level::Step::Loss;
    last.names = {"L"};
    last.index = {0};
    std::vector<Entry> cand;
    double s = 0;
    for (std::size_t p = 0; p < prev.names.size(); ++p) {
      const double d = dloss[prev.index[p]];
      s += d * prev.sum[p];
      for (std::size_t r = 0; r < prev.best[p].size(); ++r)
        cand.push_back({d * prev.best[p][r].product, static_cast<int>(p), static_cast<int>(r)});
    }
    top(cand);
    last.best = {std::move(cand)};
    last.sum = {s};
    levels.push_back(std::move(last));
  }
  tr.path_sum = levels.back().sum[0];
  tr.widths = widths;
  tr.total_paths = 1;
  for (std::size_t w : widths) tr.total_paths *= static_cast<double>(w);

  // The factor for reaching level i (position p) from level i-1 (position q).
  const std::string last_out = a_name(nl - 1, 0).substr(0, a_name(nl - 1, 0).find('['));
  auto factor = [&](std::size_t i, std::size_t p, std::size_t q) {
    const Level& lv = levels[i];
    const Level& below = levels[i - 1];
    Factor f;
    f.of = lv.names[p];
    f.wrt = below.names[q];
    const std::int64_t k = lv.index[p], j = below.index[q];
    switch (lv.step) {
      case Level::Step::Elementwise:
        f.formula = slope_formula(act[lv.layer], z_name(lv.layer, k));
        f.value = slope[lv.layer][k];
        break;
      case Level::Step::Dense:
        f.formula = idx(layer_name("W", lv.layer), k, j);
        f.value = wval[lv.layer][k * W[lv.layer].shape()[1] + j];
        break;
      case Level::Step::Loss:
        if (loss == "cross_entropy")
          f.formula = "softmax(" + last_out + ")[" + std::to_string(j) + "]" + (j == target_class ? " - 1" : "");
        else
          f.formula = "2*(" + below.names[q] + " - t[" + std::to_string(j) + "])/" + std::to_string(classes);
        f.value = dloss[j];
        break;
      case Level::Step::Start:
        break;
    }
    return f;
  };
  for (const Entry& start : levels.back().best[0]) {
    Path path;
    std::size_t i = levels.size() - 1, p = 0;
    Entry e = start;
    path.nodes.push_back("L");
    while (i > 0) {
      path.factors.push_back(factor(i, p, static_cast<std::size_t>(e.pred)));
      const std::size_t q = static_cast<std::size_t>(e.pred);
      path.nodes.push_back(levels[i - 1].names[q]);
      e = levels[i - 1].best[q][e.rank];
      p = q;
      --i;
    }
    // The last step: from z_layer[row] to the parameter itself.
    Factor f;
    f.of = levels[0].names[0];
    f.wrt = tr.parameter;
    f.formula = is_bias ? "1" : in_name(layer, col);
    f.value = is_bias ? 1.0 : in_value(layer, col);
    path.factors.push_back(f);
    path.nodes.push_back(tr.parameter);
    path.product = start.product;
    tr.shown_sum += path.product;
    tr.paths.push_back(std::move(path));
  }
  if (top_k == 0) {
    tr.paths.clear();
    tr.shown_sum = 0;
  }
  const double rest = tr.total_paths - static_cast<double>(tr.paths.size());
  tr.folded_paths = rest >= 1.8e19 ? UINT64_MAX : static_cast<std::uint64_t>(rest);
  for (std::size_t l = layer; l < nl; ++l)
    if (const char* legend = slope_legend(act[l]))
      if (std::find(tr.legend.begin(), tr.legend.end(), legend) == tr.legend.end()) tr.legend.emplace_back(legend);
  if (loss == "cross_entropy")
    tr.legend.emplace_back("cross_entropy: ∂L/∂logit[k] = softmax(logits)[k] - [k = target]");
  else
    tr.legend.emplace_back("mse: L = mean over n outputs of (y - t)^2, so ∂L/∂y[k] = 2*(y[k] - t[k])/n");
  return tr;
}

std::string to_text(const NetworkTrace& t) {
  std::ostringstream os;
  const std::string d = "∂L/∂" + t.parameter;
  os << d << " on one input: how the loss responds to one " << (t.parameter[0] == 'b' ? "bias" : "weight") << "\n";
  os << "  " << t.parameter << " = " << fmt(t.parameter_value) << "; loss (" << t.loss << ") L = " << fmt(t.loss_value, 10)
     << "\n";
  os << "  Each path from L down to " << t.parameter << " passes one neuron of each following layer: ";
  if (t.widths.empty()) {
    os << "1 path.\n";
  } else {
    for (std::size_t i = 0; i < t.widths.size(); ++i) os << (i ? " × " : "") << t.widths[i];
    os << " = " << fmt(t.total_paths, 15) << " paths.\n";
  }
  if (t.folded_paths > 0)
    os << "  The " << t.paths.size() << " largest by magnitude:\n";
  for (std::size_t i = 0; i < t.paths.size(); ++i) {
    const Path& p = t.paths[i];
    os << "    path " << i + 1 << ": ";
    for (std::size_t k = 0; k < p.nodes.size(); ++k) os << (k ? " → " : "") << p.nodes[k];
    os << "\n      = ";
    for (std::size_t k = 0; k < p.factors.size(); ++k) {
      const std::string& f = p.factors[k].formula;
      const bool simple = f.find(' ') == std::string::npos || (f.front() == '[' && f.back() == ']');
      os << (k ? " · " : "") << (simple ? f : "(" + f + ")");
    }
    os << "\n      = ";
    for (std::size_t k = 0; k < p.factors.size(); ++k) {
      const double v = p.factors[k].value;
      os << (k ? " · " : "") << (v < 0 ? cat("(", fmt(v), ")") : fmt(v));
    }
    os << " = " << fmt(p.product) << "\n";
  }
  if (t.folded_paths > 0)
    os << "  The " << t.paths.size() << " paths listed sum to " << fmt(t.shown_sum, 10) << "; the other "
       << fmt(static_cast<double>(t.folded_paths), 15) << " are folded.\n";
  os << "  " << d << " summed over all paths (layer by layer): " << fmt(t.path_sum, 15) << "\n";
  os << "  " << d << " by autograd:                            " << fmt(t.autograd, 15) << "\n";
  os << "  difference: " << fmt(t.path_sum - t.autograd, 3) << "\n";
  if (!t.legend.empty()) {
    os << "Notation\n";
    for (const auto& l : t.legend) os << "  " << l << "\n";
  }
  return os.str();
}

std::string to_json(const NetworkTrace& t, int indent) {
  using ojson = nlohmann::ordered_json;
  ojson paths = ojson::array();
  for (const Path& p : t.paths) {
    ojson fs = ojson::array();
    for (const Factor& f : p.factors)
      fs.push_back(ojson{{"of", f.of}, {"wrt", f.wrt}, {"formula", f.formula}, {"value", f.value}});
    paths.push_back(ojson{{"nodes", p.nodes}, {"factors", std::move(fs)}, {"product", p.product}});
  }
  ojson j{{"parameter", t.parameter}, {"value", t.parameter_value}, {"loss", t.loss}, {"loss_value", t.loss_value},
          {"autograd", t.autograd}, {"sum_over_paths", t.path_sum}, {"shown_sum", t.shown_sum},
          {"total_paths", t.total_paths}, {"folded_paths", t.folded_paths}, {"widths", t.widths},
          {"paths", std::move(paths)}, {"legend", t.legend}};
  return j.dump(indent);
}

}  // namespace chaingrad::explain
