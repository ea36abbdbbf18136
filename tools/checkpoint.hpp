#pragma once
// Checkpoints: the model's state_dict in safetensors (PyTorch names), with the model spec,
// input shape, normalization and training progress in __metadata__; the optimizer's state in a
// sibling `<name>.optim.safetensors`. Both are written atomically.
#include <map>
#include <memory>
#include <string>

#include "chaingrad/data.hpp"
#include "chaingrad/nn.hpp"

namespace cli {

struct CheckpointInfo {
  std::string spec;            // canonical model spec
  chaingrad::Dims input_shape; // one sample
  std::int64_t num_classes = 0;
  chaingrad::data::Normalization norm;
  std::map<std::string, std::string> extra;  // epoch, step, seed, ...
};

void save_checkpoint(const std::string& path, const chaingrad::nn::Module& model, const CheckpointInfo& info);
// Loads model and info; `spec_override` supplies the spec for files written elsewhere (PyTorch).
std::shared_ptr<chaingrad::nn::Sequential> load_checkpoint(const std::string& path, CheckpointInfo& info,
                                                           const std::string& spec_override = "");
std::string optimizer_path(const std::string& checkpoint_path);

// Evaluates a classifier: mean loss, accuracy, and the confusion matrix [true][predicted].
struct Evaluation {
  double loss = 0, accuracy = 0;
  std::vector<std::vector<std::int64_t>> confusion;
};
Evaluation evaluate(chaingrad::nn::Module& model, const chaingrad::data::Dataset& data, std::int64_t num_classes);

// Parses "1,28,28" / "[1, 28, 28]".
chaingrad::Dims parse_dims(const std::string& s);
std::string format_dims(const chaingrad::Dims& d);

}  // namespace cli
