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

// ---- resumable training (see docs/reliability.md) ----
// Note [checkpoint pairs]: the model file and its optimizer sibling are two atomic writes, and a
// crash can fall between them. Both carry `chaingrad.step`. A save writes the optimizer file
// first and the model file second; before that, when the sibling matches the model on disk, it
// is hard-linked to `<name>.optim.prev.safetensors`. Whatever moment a crash picks, the model
// file on disk (old or new) has a matching optimizer file among those two, and
// load_optimizer_state finds it.
void save_training_checkpoint(const std::string& path, const chaingrad::nn::Module& model, const CheckpointInfo& info,
                              const std::vector<std::pair<std::string, chaingrad::Tensor>>& optimizer_state);
// The optimizer state saved with the checkpoint at `path` whose step is `step` (or, for files
// without a step, the plain sibling). `found` is false when no optimizer file exists at all;
// an optimizer file for another step is an error naming both steps.
std::vector<std::pair<std::string, chaingrad::Tensor>> load_optimizer_state(const std::string& path,
                                                                            const std::string& step, bool& found);
std::string previous_optimizer_path(const std::string& checkpoint_path);
// Only the `__metadata__` of a safetensors file (its JSON header); empty when unreadable.
std::map<std::string, std::string> read_safetensors_metadata(const std::string& path);

// Random-generator states of the model's modules (Dropout) as metadata entries
// `chaingrad.rng.<module name>`, and their restoration, so a resumed run draws the same masks.
std::map<std::string, std::string> generator_states(chaingrad::nn::Module& model);
void restore_generator_states(chaingrad::nn::Module& model, const std::map<std::string, std::string>& metadata);
// False when any parameter or buffer holds a NaN or an infinity.
bool state_is_finite(const chaingrad::nn::Module& model);
// Removes temporary files `<name>.tmp.<pid>.<hex>` left in `dir` by writers that were killed
// (their process no longer exists). Returns how many were removed.
int remove_stale_temp_files(const std::string& dir);

// SIGINT and SIGTERM, while one of these lives, set a flag instead of ending the process; a
// second signal ends it as usual (SA_RESETHAND). The training loop polls received() between
// steps, saves and exits with 128 + the signal.
class StopSignals {
 public:
  StopSignals();
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;
  static int received();  // the signal number, or 0
};

}  // namespace cli
