#pragma once
// `chaingrad train --distributed` (docs/distributed.md): the data-parallel parts of a training
// run, kept out of cmd_train.cpp's loop. Each rank trains on its share of every global batch
// (DistributedSampler), gradients are averaged after backward (GradientSynchronizer), the loss
// and the stop signals are agreed on every step, and evaluation is split over the ranks and
// reduced. Rank 0 alone prints and writes files.
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "chaingrad/data.hpp"
#include "chaingrad/distributed.hpp"
#include "chaingrad/nn.hpp"
#include "checkpoint.hpp"

namespace cli {

// Runs `f` inside a distributed::Session whose ranks other than 0 print nothing; an exception on
// any rank prints `error: rank R of N ...` and ends every rank (no rank waits forever).
// Without MPI it throws ValueError naming the missing MPI.
void run_distributed(const std::function<void()>& f);

struct DistributedOptions {
  bool overlap = false;      // --overlap-comm: allreduce buckets while backward runs
  double bucket_mb = 25;     // --bucket-mb
  bool quiet = false;        // --json: no distributed summary lines on stderr
};

class DistributedTraining {
 public:
  // Inside run_distributed. `batch_size` is the per-rank batch (--batch-size) and becomes the
  // global batch (per-rank x ranks), which is what checkpoints record, unless it came from a
  // checkpoint (already global). `threads` <= 0: cores / ranks on this machine.
  DistributedTraining(std::int64_t& batch_size, bool batch_from_checkpoint, int threads, DistributedOptions options);
  ~DistributedTraining();

  bool is_root() const;
  int world_size() const;
  std::string describe() const;  // one line for the start of the run

  // Once the model (parameters loaded), the training set and the global-batch loader exist:
  // copies rank 0's parameters to every rank and sets up the sampler and the synchronizer.
  void attach(chaingrad::nn::Module& model, const chaingrad::data::Dataset& train,
              const chaingrad::data::DataLoader& loader);

  // This rank's share of global batch b (see DistributedSampler).
  chaingrad::data::Batch batch(std::int64_t b);
  void before_backward();  // GradientSynchronizer::prepare with this batch's weight
  void after_backward();   // gradients averaged over all ranks
  // The mean loss of the whole global batch; also agrees on SIGINT/SIGTERM received by any rank
  // (see agreed_signal), so that every rank stops after the same step.
  double reduce_loss(double local_loss, int local_signal);
  std::int64_t global_count() const { return global_count_; }  // samples in the current global batch
  int agreed_signal() const { return signal_; }
  // For checks outside the step: the signal any rank received (every rank calls it).
  int agree_signal(int local_signal);

  // Each rank evaluates its shard of `test`; the sums are reduced (same result on every rank).
  Evaluation evaluate(chaingrad::nn::Module& model, const chaingrad::data::Dataset& test, std::int64_t num_classes);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::int64_t global_count_ = 0;
  int signal_ = 0;
};

}  // namespace cli
