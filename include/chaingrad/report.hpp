#pragma once
// The training report: one self-contained HTML file (inline CSS, SVG and JavaScript; nothing is
// fetched, so it opens offline and from a file:// URL) with
//   * the run configuration,
//   * the gradient-flow warnings (gradflow.hpp) with their chain-rule reasons,
//   * loss and accuracy curves for training and test, over steps, epochs marked,
//   * the gradient-flow heatmap: one row per weight tensor (input layer at the top), one column
//     per recording step, colour = log10 of the gradient norm on a fixed scale of 1e-8 to 1e1
//     (widened when values fall outside), so reports of different runs compare by eye;
//     the latest per-layer profile as bars, and the dead/saturated fraction of each activation
//     layer over time,
//   * the model's layer graph (each layer with its output shape and parameter count),
//   * the confusion matrix of the test set.
// The data travels as JSON inside the page; a small script draws the charts and writes the
// number of points it drew into <span id="plotted-points">, so a headless browser can check
// that the page rendered. Opening the file with `#only=<section id>` (e.g. `#only=gradflow`)
// shows that section alone, for screenshots.
//
// A training loop refreshes the file after every epoch: write() replaces it atomically
// (io::write_file_atomic), so a reader never sees half a page; while `in_progress`, the page
// reloads itself every 30 seconds.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "chaingrad/gradflow.hpp"
#include "chaingrad/nn.hpp"

namespace chaingrad::report {

struct EpochResult {
  int epoch = 0;
  std::int64_t step = 0;  // steps done when the epoch ended (the x position of test points)
  double train_loss = 0, test_loss = 0, test_accuracy = 0, seconds = 0;
};

// Fashion-MNIST's ten class names, in label order.
const std::vector<std::string>& fashion_mnist_classes();

class Report {
 public:
  // `config`: the run configuration as (name, value) rows. `flow` may be null (no gradient-flow
  // sections); model and flow must outlive the Report.
  Report(std::string title, std::vector<std::pair<std::string, std::string>> config, const nn::Module& model,
         const gradflow::Recorder* flow = nullptr);

  void add_epoch(const EpochResult& e) { epochs_.push_back(e); }
  // [true][predicted] counts; `class_names` label the rows (indices when empty).
  void set_confusion(std::vector<std::vector<std::int64_t>> confusion, std::vector<std::string> class_names = {});
  // "epoch 2 of 5"; while in progress the page says so and reloads itself every 30 seconds.
  void set_progress(std::string status, bool in_progress);

  std::string html() const;
  // html(), written atomically.
  void write(const std::string& path) const;
  // The number of points the page's script will draw (curve points, heatmap cells, bars):
  // what it writes into #plotted-points.
  std::int64_t expected_points() const;

 private:
  std::string title_;
  std::vector<std::pair<std::string, std::string>> config_;
  const nn::Module& model_;
  const gradflow::Recorder* flow_;
  std::vector<EpochResult> epochs_;
  std::vector<std::vector<std::int64_t>> confusion_;
  std::vector<std::string> class_names_;
  std::string status_ = "finished";
  bool in_progress_ = false;
};

}  // namespace chaingrad::report
