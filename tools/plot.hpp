#pragma once
#include <string>
#include <vector>

namespace cli {
struct EpochRecord {
  int epoch = 0;
  double train_loss = 0, test_loss = 0, test_accuracy = 0, epoch_seconds = 0, samples_per_second = 0;
};
// A self-contained SVG with the loss (train and test) and test-accuracy curves per epoch.
std::string training_plot_svg(const std::vector<EpochRecord>& history);
}  // namespace cli
