// The HTML training report (see report.hpp): static parts (configuration, warnings, layer graph,
// confusion matrix, latest gradient-flow table) are written here; the charts are drawn in the
// browser by assets.cpp's script from the JSON embedded in the page.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <sstream>

#include <nlohmann/json.hpp>

#include "assets.hpp"
#include "chaingrad/io.hpp"
#include "chaingrad/report.hpp"

namespace chaingrad::report {

namespace {

using nlohmann::json;

std::string escape(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&#39;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

std::string sci(double v) {
  if (!std::isfinite(v)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2e", v);
  return buf;
}

std::string fixed(double v, int digits) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

std::string with_commas(std::int64_t n) {
  std::string s = std::to_string(n), out;
  const int lead = static_cast<int>(s.size()) % 3;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (i && static_cast<int>(i) % 3 == lead % 3 && s[i - 1] != '-') out += ',';
    out += s[i];
  }
  return out;
}

json number(double v) { return std::isfinite(v) ? json(v) : json(nullptr); }

bool is_activation(const std::string& type) { return type == "ReLU" || type == "Sigmoid" || type == "Tanh"; }

// The parameters shown as heatmap rows: the weights (dim >= 2), or every parameter when the
// model has no weight matrix.
std::vector<std::size_t> heatmap_rows(const gradflow::Snapshot& s) {
  std::vector<std::size_t> rows;
  for (std::size_t i = 0; i < s.params.size(); ++i)
    if (s.params[i].shape.size() >= 2) rows.push_back(i);
  if (rows.empty())
    for (std::size_t i = 0; i < s.params.size(); ++i) rows.push_back(i);
  return rows;
}

// The activation layers with statistics in at least one snapshot, in layer order.
std::vector<std::string> activation_rows(const gradflow::Recorder& flow) {
  std::vector<std::string> rows;
  for (const auto& l : flow.layers()) {
    if (!is_activation(l.type)) continue;
    bool seen = false;
    for (const auto& s : flow.snapshots())
      for (const auto& a : s.activations) seen = seen || a.layer == l.name;
    if (seen) rows.push_back(l.name);
  }
  return rows;
}

const gradflow::ActivationStats* find_activation(const gradflow::Snapshot& s, const std::string& layer) {
  for (const auto& a : s.activations)
    if (a.layer == layer) return &a;
  return nullptr;
}

// A vertical chain of boxes, input at the top, loss at the bottom.
std::string layer_graph_svg(const std::vector<gradflow::LayerInfo>& layers, const gradflow::Snapshot* latest) {
  const int box_h = 28, gap = 16, width = 760, box_w = 470, x0 = 20;
  const int n = static_cast<int>(layers.size()) + 2;
  const int height = n * box_h + (n - 1) * gap + 10;
  std::ostringstream os;
  os << "<svg id=\"layer-graph\" xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width << "\" height=\"" << height
     << "\" viewBox=\"0 0 " << width << " " << height << "\">\n"
     << "<defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" "
        "orient=\"auto\"><path d=\"M0 0L10 5L0 10z\" fill=\"#8a94a6\"/></marker></defs>\n";
  auto box = [&](int i, const std::string& fill, const std::string& label, const std::string& right) {
    const int y = 5 + i * (box_h + gap);
    if (i > 0)
      os << "<line x1=\"" << x0 + box_w / 2 << "\" y1=\"" << y - gap << "\" x2=\"" << x0 + box_w / 2 << "\" y2=\""
         << y - 1 << "\" stroke=\"#8a94a6\" stroke-width=\"1.5\" marker-end=\"url(#arrow)\"/>\n";
    os << "<rect x=\"" << x0 << "\" y=\"" << y << "\" width=\"" << box_w << "\" height=\"" << box_h
       << "\" rx=\"6\" fill=\"" << fill << "\" stroke=\"#9aa5b8\"/>\n"
       << "<text x=\"" << x0 + 10 << "\" y=\"" << y + 18 << "\" style=\"font-size:12px\">" << escape(label)
       << "</text>\n";
    if (!right.empty())
      os << "<text x=\"" << x0 + box_w + 12 << "\" y=\"" << y + 18 << "\" class=\"label\">" << escape(right)
         << "</text>\n";
  };
  box(0, "#eef2f7", "input batch", "");
  for (std::size_t i = 0; i < layers.size(); ++i) {
    const auto& l = layers[i];
    std::string fill = "#ffffff";
    if (l.type == "Sigmoid" || l.type == "Tanh") fill = "#fde7d1";
    if (l.type == "ReLU") fill = "#dcfce7";
    if (l.num_parameters > 0) fill = "#dbeafe";
    std::string label = (l.name.empty() ? "" : l.name + "  ") + l.type;
    if (!l.description.empty()) label += "(" + l.description + ")";
    std::string right;
    if (l.has_output_shape) right += "out " + to_string(l.output_shape);
    if (l.num_parameters > 0) right += (right.empty() ? "" : " · ") + with_commas(l.num_parameters) + " params";
    if (latest)
      for (const auto& p : latest->params)
        if (p.layer == l.name && p.shape.size() >= 2 && p.has_grad) right += " · ‖∇W‖ " + sci(p.grad_norm);
    box(static_cast<int>(i) + 1, fill, label, right);
  }
  box(n - 1, "#eef2f7", "cross_entropy(logits, labels) → loss", "");
  os << "</svg>\n";
  return os.str();
}

std::string confusion_table(const std::vector<std::vector<std::int64_t>>& m, const std::vector<std::string>& names) {
  std::ostringstream os;
  const std::size_t k = m.size();
  auto name = [&](std::size_t i) { return i < names.size() ? names[i] : std::to_string(i); };
  os << "<table class=\"grid confusion\" id=\"confusion-matrix\">\n<tr><th class=\"name\">true \\ predicted</th>";
  for (std::size_t j = 0; j < k; ++j) os << "<th>" << escape(name(j)) << "</th>";
  os << "<th>recall</th></tr>\n";
  std::int64_t correct = 0, all = 0;
  for (std::size_t i = 0; i < k; ++i) {
    std::int64_t row = 0;
    for (std::int64_t v : m[i]) row += v;
    os << "<tr><th class=\"name\">" << escape(name(i)) << "</th>";
    for (std::size_t j = 0; j < m[i].size(); ++j) {
      const double f = row ? static_cast<double>(m[i][j]) / static_cast<double>(row) : 0.0;
      const char* rgb = i == j ? "22,163,74" : "220,38,38";
      os << "<td class=\"cell\" style=\"background:rgba(" << rgb << "," << fixed(std::min(1.0, i == j ? f : 3 * f), 3)
         << ")" << (f > 0.6 ? ";color:#fff" : "") << "\" title=\"" << escape(name(i)) << " predicted as "
         << escape(name(j)) << ": " << m[i][j] << " (" << fixed(100 * f, 1) << "% of the row)\">" << m[i][j] << "</td>";
    }
    correct += i < m[i].size() ? m[i][i] : 0;
    all += row;
    os << "<td>" << (row ? fixed(100.0 * static_cast<double>(i < m[i].size() ? m[i][i] : 0) / row, 1) + "%" : "-")
       << "</td></tr>\n";
  }
  os << "</table>\n<p class=\"note\">Rows: the true class; columns: the predicted class. " << with_commas(correct)
     << " of " << with_commas(all) << " test samples on the diagonal ("
     << (all ? fixed(100.0 * static_cast<double>(correct) / static_cast<double>(all), 2) : "0") << "%).</p>\n";
  return os.str();
}

std::string param_table(const gradflow::Snapshot& s) {
  std::ostringstream os;
  os << "<table class=\"grid\" id=\"gradflow-table\">\n<tr><th class=\"name\">parameter</th><th class=\"name\">shape"
        "</th><th>gradient norm</th><th>weight norm</th><th>update / weight</th></tr>\n";
  for (const auto& p : s.params)
    os << "<tr><td class=\"name\"><code>" << escape(p.name) << "</code></td><td class=\"name\">"
       << escape(to_string(p.shape)) << "</td><td>" << (p.has_grad ? sci(p.grad_norm) : "-") << "</td><td>"
       << sci(p.weight_norm) << "</td><td>" << sci(p.update_ratio) << "</td></tr>\n";
  os << "</table>\n";
  if (!s.activations.empty()) {
    os << "<table class=\"grid\" id=\"activation-table\" style=\"margin-top:10px\">\n<tr><th class=\"name\">layer</th>"
          "<th class=\"name\">activation</th><th>units</th><th>dead (ReLU) / saturated</th><th>mean local "
          "derivative</th></tr>\n";
    for (const auto& a : s.activations)
      os << "<tr><td class=\"name\">" << escape(a.layer) << "</td><td class=\"name\">"
         << gradflow::activation_name(a.kind) << "</td><td>" << a.units << "</td><td>"
         << fixed(100 * a.inactive_fraction, 1) << "%</td><td>" << fixed(a.mean_derivative, 3) << "</td></tr>\n";
    os << "</table>\n";
  }
  return os.str();
}

std::string kind_class(gradflow::Warning::Kind k) {
  std::string s = gradflow::warning_kind_name(k);
  std::replace(s.begin(), s.end(), ' ', '-');
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return "kind-" + s;
}

}  // namespace

const std::vector<std::string>& fashion_mnist_classes() {
  static const std::vector<std::string> names = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                                 "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};
  return names;
}

Report::Report(std::string title, std::vector<std::pair<std::string, std::string>> config, const nn::Module& model,
               const gradflow::Recorder* flow)
    : title_(std::move(title)), config_(std::move(config)), model_(model), flow_(flow) {}

void Report::set_confusion(std::vector<std::vector<std::int64_t>> confusion, std::vector<std::string> class_names) {
  confusion_ = std::move(confusion);
  class_names_ = std::move(class_names);
}

void Report::set_progress(std::string status, bool in_progress) {
  status_ = std::move(status);
  in_progress_ = in_progress;
}

std::int64_t Report::expected_points() const {
  std::int64_t n = 0;
  for (const auto& e : epochs_)
    n += std::isfinite(e.train_loss) + std::isfinite(e.test_loss) + std::isfinite(e.test_accuracy);
  if (!flow_ || flow_->snapshots().empty()) return n;
  const auto& snaps = flow_->snapshots();
  for (const auto& s : snaps) n += std::isfinite(s.loss) + std::isfinite(s.batch_accuracy);
  const auto rows = heatmap_rows(snaps.front());
  for (const auto& s : snaps)
    for (std::size_t r : rows) n += r < s.params.size() && std::isfinite(s.params[r].grad_norm);
  for (std::size_t r : rows) n += r < snaps.back().params.size() && std::isfinite(snaps.back().params[r].grad_norm);
  for (const auto& layer : activation_rows(*flow_))
    for (const auto& s : snaps) {
      const auto* a = find_activation(s, layer);
      n += a && std::isfinite(a->inactive_fraction);
    }
  return n;
}

std::string Report::html() const {
  // ---- the data the script draws ----
  json data;
  data["every"] = flow_ ? flow_->options().every : 0;
  data["epochs"] = json::array();
  for (const auto& e : epochs_)
    data["epochs"].push_back({{"epoch", e.epoch},
                              {"step", e.step},
                              {"train_loss", number(e.train_loss)},
                              {"test_loss", number(e.test_loss)},
                              {"test_accuracy", number(e.test_accuracy)},
                              {"seconds", number(e.seconds)}});
  data["steps"] = json::array();
  data["train_loss"] = json::array();
  data["train_accuracy"] = json::array();
  data["weights"] = json::array();
  data["activations"] = json::array();
  const gradflow::Snapshot* latest = nullptr;
  if (flow_ && !flow_->snapshots().empty()) {
    const auto& snaps = flow_->snapshots();
    latest = &snaps.back();
    for (const auto& s : snaps) {
      data["steps"].push_back(s.step);
      data["train_loss"].push_back(number(s.loss));
      data["train_accuracy"].push_back(number(s.batch_accuracy));
    }
    for (std::size_t r : heatmap_rows(snaps.front())) {
      json w{{"name", snaps.front().params[r].name}, {"shape", to_string(snaps.front().params[r].shape)}};
      json grad = json::array(), weight = json::array(), update = json::array();
      for (const auto& s : snaps) {
        const bool ok = r < s.params.size();
        grad.push_back(ok ? number(s.params[r].grad_norm) : json(nullptr));
        weight.push_back(ok ? number(s.params[r].weight_norm) : json(nullptr));
        update.push_back(ok ? number(s.params[r].update_ratio) : json(nullptr));
      }
      w["grad"] = std::move(grad);
      w["weight"] = std::move(weight);
      w["update"] = std::move(update);
      data["weights"].push_back(std::move(w));
    }
    for (const auto& layer : activation_rows(*flow_)) {
      json inactive = json::array(), derivative = json::array();
      std::string kind;
      for (const auto& s : snaps) {
        const auto* a = find_activation(s, layer);
        inactive.push_back(a ? number(a->inactive_fraction) : json(nullptr));
        derivative.push_back(a ? number(a->mean_derivative) : json(nullptr));
        if (a) kind = gradflow::activation_name(a->kind);
      }
      data["activations"].push_back(
          {{"layer", layer}, {"kind", kind}, {"inactive", std::move(inactive)}, {"derivative", std::move(derivative)}});
    }
  }
  // '<' only occurs inside JSON strings, where \u003c means the same; it keeps "</script>" out.
  std::string payload;
  for (char c : data.dump()) payload += c == '<' ? std::string("\\u003c") : std::string(1, c);

  // ---- the page ----
  std::ostringstream os;
  os << "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
     << "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n";
  if (in_progress_) os << "<meta http-equiv=\"refresh\" content=\"30\">\n";
  os << "<title>" << escape(title_) << "</title>\n<style>" << detail::kStyle << "</style>\n</head>\n<body>\n";
  os << "<header>\n<h1>" << escape(title_) << "</h1>\n<p class=\"status" << (in_progress_ ? " running" : "")
     << "\" id=\"status\">" << escape(status_)
     << (in_progress_ ? " · training in progress; this page reloads every 30 s" : "") << "</p>\n</header>\n<main>\n";

  // Run configuration.
  os << "<section id=\"config\">\n<h2>Run configuration</h2>\n<table class=\"kv\">\n";
  for (const auto& [k, v] : config_) os << "<tr><td>" << escape(k) << "</td><td>" << escape(v) << "</td></tr>\n";
  os << "<tr><td>parameters</td><td>" << with_commas(model_.num_parameters()) << "</td></tr>\n";
  if (flow_) {
    double train_seconds = 0;
    for (const auto& e : epochs_) train_seconds += e.seconds;
    os << "<tr><td>gradient flow</td><td>recorded every " << flow_->options().every << " steps ("
       << flow_->snapshots().size() << " recordings); recorder time " << fixed(flow_->seconds(), 2) << " s";
    if (train_seconds > 0) os << " (" << fixed(100 * flow_->seconds() / train_seconds, 2) << "% of training time)";
    os << "</td></tr>\n";
  }
  os << "</table>\n</section>\n";

  // Warnings.
  os << "<section id=\"warnings\">\n<h2>Warnings</h2>\n";
  if (!flow_) {
    os << "<p class=\"note\">Gradient flow was not recorded.</p>\n";
  } else if (flow_->warnings().empty()) {
    os << "<p class=\"ok\">No gradient-flow warnings: no weight's gradient norm fell below 1/1000 of the largest above "
          "it or grew past 1000 times the output layer's, no step moved a weight by more than 10% of its norm, and no "
          "activation layer had more than half its units dead or saturated.</p>\n";
  } else {
    os << "<ul class=\"warnings\">\n";
    for (const auto& w : flow_->warnings())
      os << "<li class=\"" << kind_class(w.kind) << "\"><span class=\"kind\">" << gradflow::warning_kind_name(w.kind)
         << "</span>" << escape(w.message) << " <span class=\"when\">(steps " << w.first_step << "–" << w.last_step
         << ", " << w.count << (w.count == 1 ? " recording" : " recordings")
         << "; numbers from the latest)</span></li>\n";
    os << "</ul>\n";
  }
  os << "</section>\n";

  // Curves.
  os << "<section id=\"curves\">\n<h2>Loss and accuracy</h2>\n<div class=\"charts\">\n"
     << "<svg id=\"loss-chart\" xmlns=\"http://www.w3.org/2000/svg\"></svg>\n"
     << "<svg id=\"accuracy-chart\" xmlns=\"http://www.w3.org/2000/svg\"></svg>\n</div>\n"
     << "<p class=\"note\">Training loss is the mean over each recording interval and each epoch; training accuracy "
        "is measured on the batch of each recording step, before its update; test loss and accuracy are measured on "
        "the whole test set after each epoch.</p>\n</section>\n";

  // Gradient flow.
  os << "<section id=\"gradflow\">\n<h2>Gradient flow</h2>\n";
  if (latest) {
    os << "<p class=\"note\">Gradient norm ‖∂L/∂W‖ of each weight tensor (rows, input layer at the top) at each "
          "recording step (columns). By the chain rule a layer's gradient is the product of the local derivatives of "
          "everything above it, so rows that darken toward the top mean the gradient vanishes on its way down "
          "(sigmoid: σ' ≤ 0.25 per layer). The colour scale is fixed from 1e-8 to 1e1 (widened if needed), so "
          "reports compare by eye.</p>\n"
       << "<svg id=\"gradflow-heatmap\" xmlns=\"http://www.w3.org/2000/svg\"></svg>\n"
       << "<h3 style=\"font-size:14px;margin:14px 0 4px\">Gradient norm per weight at step " << latest->step
       << "</h3>\n<svg id=\"gradflow-profile\" xmlns=\"http://www.w3.org/2000/svg\"></svg>\n"
       << "</section>\n<section id=\"gradflow-latest\">\n<h2>Latest gradient-flow recording (step " << latest->step
       << ")</h2>\n"
       << param_table(*latest);
  } else {
    os << "<p class=\"note\">No gradient-flow recording yet.</p>\n";
  }
  os << "</section>\n";

  // Activations.
  if (flow_ && !activation_rows(*flow_).empty()) {
    os << "<section id=\"activations\">\n<h2>Activations</h2>\n<p class=\"note\">Per activation layer and recording "
          "step: the fraction of dead ReLU units (0 for every sample of the batch, so ReLU' = 0 and no gradient "
          "passes) or of saturated sigmoid/tanh outputs (σ' or 1−y² near 0). Hover a cell for the mean local "
          "derivative, the factor the chain rule applies at that layer.</p>\n"
       << "<svg id=\"activation-heatmap\" xmlns=\"http://www.w3.org/2000/svg\"></svg>\n</section>\n";
  }

  // Layer graph.
  os << "<section id=\"graph\">\n<h2>Model</h2>\n"
     << layer_graph_svg(flow_ ? flow_->layers() : gradflow::describe_layers(model_), latest) << "</section>\n";

  // Confusion matrix.
  os << "<section id=\"confusion\">\n<h2>Confusion matrix (test set"
     << (epochs_.empty() ? "" : ", after epoch " + std::to_string(epochs_.back().epoch)) << ")</h2>\n";
  if (confusion_.empty())
    os << "<p class=\"note\">Not evaluated yet.</p>\n";
  else
    os << confusion_table(confusion_, class_names_);
  os << "</section>\n</main>\n";

  os << "<footer style=\"padding:0 28px 24px;color:#5b6575;font-size:12px\" id=\"points-line\">Written by chaingrad · "
        "<span id=\"plotted-points\">0</span> points plotted</footer>\n"
     << "<script type=\"application/json\" id=\"report-data\">" << payload << "</script>\n"
     << "<script>" << detail::kScript << "</script>\n</body>\n</html>\n";
  return os.str();
}

void Report::write(const std::string& path) const { io::write_file_atomic(path, html()); }

}  // namespace chaingrad::report
