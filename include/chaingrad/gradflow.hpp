#pragma once
// Gradient flow during training. The chain rule makes a layer's gradient the product of the
// local derivatives of everything above it (closer to the loss): a stack of sigmoids, each with
// σ'(x) = y(1 − y) ≤ 1/4, shrinks the gradient of the first layers geometrically (vanishing);
// weight matrices with large singular values grow it (exploding). The Recorder watches this as a
// model trains: every `every` steps it captures
//   * per parameter tensor: the gradient norm ‖g‖₂, the weight norm ‖w‖₂ before the step, and
//     the update-to-weight ratio ‖w_after − w_before‖₂ / ‖w_before‖₂ of that step;
//   * per activation layer (ReLU, Sigmoid, Tanh children of a Sequential): the fraction of dead
//     ReLU units (output exactly 0 for every sample of the batch) or of saturated sigmoid/tanh
//     outputs (see Note [gradflow thresholds]), and the mean local derivative, i.e. the factor
//     the chain rule multiplies the gradient by when it passes through that layer;
// and turns what it sees into warnings that give the reason in chain-rule terms, e.g.
//   0.weight: gradient norm 1.2e-07, 10^5 times smaller than 16.weight (3.4e-02); 8 sigmoid
//   layers above it each scale gradients by at most 0.25 (0.25^8 = 1.5e-05; measured mean σ' ...)
//
// In a training loop (the optimizer updates parameters in place, see nn.hpp Note [parameter
// handles], so the recorder sees the update through the same tensors):
//   gradflow::Recorder flow(model);
//   ...
//   loss.backward();
//   flow.before_step(batch.inputs, batch.labels);  // recording steps: norms, weight snapshot, activations
//   opt.step();
//   flow.after_step(loss.item());                  // recording steps: update ratios; counts the step
//
// Cost: on other steps both calls are a branch and an addition. On a recording step the
// recorder reads every gradient and weight once, copies the weights, and runs one extra forward
// pass of the batch under NoGradGuard to see the activations (about a third of a training
// step), so at the default interval of 50 the overhead is about 1% of training time (tests
// measure it; seconds() reports the time spent).
//
// The extra forward pass leaves training unchanged: it runs under NoGradGuard, skips Dropout
// (identity, so the dropout generators do not advance) and restores the buffers of any layer that
// updates them in training mode (BatchNorm's running statistics). Training with and without a
// recorder produces the same parameters, bit for bit.
//
// Note [gradflow thresholds]
// Warnings fire on a recording step when (defaults in Thresholds):
//   vanishing    a weight's (dim >= 2) gradient norm is below vanishing_ratio = 1e-3 times the
//                largest gradient norm of the weights above it (later in forward order, nearer
//                the loss): the gradient shrank 1000-fold on its way down, and with SGD that layer
//                learns 1000 times more slowly than the one above;
//   exploding    a weight's gradient norm is non-finite, above exploding_norm = 1e3, or above
//                exploding_ratio = 1e3 times the gradient norm of the output layer's weight (the
//                last weight, nearest the loss): the layers above it amplify the gradient;
//   large update one step changed a parameter tensor by more than update_ratio_high = 0.1 of its
//                norm (healthy training sits near 1e-3; this much means the learning rate is too
//                high for that layer);
//   dead ReLU    more than dead_fraction = 0.5 of a ReLU layer's units output 0 for every sample of
//                the batch: ReLU'(x) = 0 there, so no gradient reaches the weights feeding them;
//   saturated    more than saturated_fraction = 0.5 of a sigmoid layer's outputs are below
//                sigmoid_saturation = 0.01 or above 1 − 0.01 (σ' < 0.0099), or of a tanh layer's
//                outputs have |y| > tanh_saturation = 0.99 (1 − y² < 0.02).
// Each warning is kept once per (kind, subject) with the first and last step it was seen and how
// many recordings showed it; its message carries the numbers of the latest one.
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "chaingrad/nn.hpp"
#include "chaingrad/tensor.hpp"

namespace chaingrad::gradflow {

inline constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

struct Thresholds {
  double vanishing_ratio = 1e-3;
  double exploding_ratio = 1e3;
  double exploding_norm = 1e3;
  double update_ratio_high = 0.1;
  double dead_fraction = 0.5;
  double saturated_fraction = 0.5;
  double sigmoid_saturation = 0.01;
  double tanh_saturation = 0.99;
};

struct Options {
  std::int64_t every = 50;  // record on the steps that are multiples of `every` (step 0 first)
  bool activations = true;  // run the extra forward pass for activation statistics
  Thresholds thresholds{};
  std::int64_t first_step = 0;  // the number of the first step (a resumed run continues its count)
};

// One layer of the model: a child of a Sequential, or the model itself when it is not one.
struct LayerInfo {
  std::string name;         // "0"
  std::string type;         // "Linear"
  std::string description;  // "in_features=784, out_features=128, bias=True"
  std::int64_t num_parameters = 0;
  Dims output_shape;  // per sample; filled by the first recording with activations
  bool has_output_shape = false;
};
// The layers of `model` in forward order (its children for a Sequential).
std::vector<LayerInfo> describe_layers(const nn::Module& model);

struct ParamStats {
  std::string name;   // "0.weight"
  std::string layer;  // "0": the Sequential child it belongs to ("" when unknown)
  Dims shape;
  bool has_grad = false;       // false when the parameter had no gradient this step
  double grad_norm = kNaN;     // ‖g‖₂ (NaN without a gradient, or when g holds a NaN)
  double weight_norm = 0;      // ‖w‖₂ before the step
  double update_norm = kNaN;   // ‖w_after − w_before‖₂
  double update_ratio = kNaN;  // update_norm / weight_norm (0 for a zero weight that did not move)
};

enum class ActivationKind { ReLU, Sigmoid, Tanh };
const char* activation_name(ActivationKind kind);  // "ReLU", "Sigmoid", "Tanh"

struct ActivationStats {
  std::string layer;  // "1"
  ActivationKind kind = ActivationKind::ReLU;
  std::int64_t units = 0;  // outputs per sample
  // ReLU: fraction of units that are 0 for every sample of the batch (dead).
  // Sigmoid/Tanh: fraction of all outputs (samples × units) in the saturated range.
  double inactive_fraction = 0;
  // The mean over the batch of the local derivative: ReLU the fraction of outputs > 0,
  // Sigmoid y(1 − y) (at most 1/4), Tanh 1 − y² (at most 1).
  double mean_derivative = 0;
};

struct Snapshot {
  std::int64_t step = 0;
  double loss = kNaN;              // mean training loss of the steps since the previous snapshot, this one included
  double batch_loss = kNaN;        // cross entropy of the recorded batch before the update (classifiers)
  double batch_accuracy = kNaN;    // accuracy of the recorded batch before the update (classifiers)
  std::vector<ParamStats> params;  // in named_parameters() order
  std::vector<ActivationStats> activations;  // in layer order
};

struct Warning {
  enum class Kind { Vanishing, Exploding, LargeUpdate, DeadReLU, Saturated };
  Kind kind = Kind::Vanishing;
  std::string subject;  // a parameter ("0.weight") or an activation layer ("1")
  std::string message;  // the latest recording's message
  std::int64_t first_step = 0, last_step = 0, count = 0;
};
const char* warning_kind_name(Warning::Kind kind);  // "vanishing", "exploding", ...

// The warnings one snapshot gives (see Note [gradflow thresholds]); `layers` (in forward order)
// lets the messages name the layers above a parameter. first_step = last_step = s.step, count = 1.
std::vector<Warning> diagnose(const Snapshot& s, const std::vector<LayerInfo>& layers,
                              const Thresholds& thresholds = {});

// A fixed-width text table of one snapshot: one row per parameter (gradient norm, weight norm,
// update/weight), then one row per activation layer.
std::string format_table(const Snapshot& s);

class Recorder {
 public:
  // Keeps references to `model`'s parameters (the live tensors); the model must outlive it.
  explicit Recorder(nn::Module& model, Options options = {});

  // Whether the current step is a recording step.
  bool due() const { return step_ % options_.every == 0; }
  // After backward, before the optimizer step. On a recording step: gradient and weight norms, a
  // copy of the weights, and (for a Sequential, with Options::activations) the activation
  // statistics of `inputs`; `labels` (int64 class indices) add the batch's loss and accuracy.
  void before_step(const Tensor& inputs, const Tensor& labels = {});
  // After the optimizer step, with this step's training loss. On a recording step: the update
  // norms; the snapshot is stored and diagnosed. Always advances the step count.
  void after_step(double loss = kNaN);

  std::int64_t step() const { return step_; }  // the next step's number
  const Options& options() const { return options_; }
  const std::vector<LayerInfo>& layers() const { return layers_; }
  const std::vector<Snapshot>& snapshots() const { return snapshots_; }
  // Every warning seen so far, in the order first seen.
  const std::vector<Warning>& warnings() const { return warnings_; }
  // Wall-clock seconds spent inside before_step/after_step.
  double seconds() const { return seconds_; }

  // The latest snapshot's table followed by the warnings seen since the previous call (for a
  // per-epoch printout); empty before the first recording.
  std::string epoch_summary();

 private:
  void record_activations(const Tensor& inputs, const Tensor& labels, Snapshot& s);

  nn::Module& model_;
  Options options_;
  std::vector<LayerInfo> layers_;
  std::vector<std::pair<std::string, Tensor>> params_;
  std::vector<std::string> param_layers_;
  std::vector<std::vector<unsigned char>> before_;  // weight copies of the pending recording step
  std::vector<Snapshot> snapshots_;
  std::vector<Warning> warnings_;
  Snapshot pending_;
  bool has_pending_ = false;
  std::int64_t step_ = 0;
  double loss_sum_ = 0;
  std::int64_t loss_count_ = 0;
  double seconds_ = 0;
  std::int64_t summary_step_ = std::numeric_limits<std::int64_t>::min();
};

}  // namespace chaingrad::gradflow
