// `chaingrad train --distributed`: see train_distributed.hpp and docs/distributed.md.
#include "train_distributed.hpp"

#include <csignal>
#include <cmath>
#include <cstdio>
#include <vector>

#include "chaingrad/chaingrad.hpp"

namespace cg = chaingrad;
namespace dist = chaingrad::distributed;

namespace cli {

void run_distributed(const std::function<void()>& f) {
  dist::Session session({.quiet_non_root = true});
  session.run(f);
}

struct DistributedTraining::Impl {
  DistributedOptions options;
  std::int64_t per_rank_batch = 0, global_batch = 0;
  int threads = 1;
  std::unique_ptr<dist::DistributedSampler> sampler;
  std::unique_ptr<dist::GradientSynchronizer> sync;
  chaingrad::nn::Module* model = nullptr;
  double weight = 0;
  std::int64_t local_count = 0;
  dist::SynchronizerStats reported;  // stats at the last summary
};

DistributedTraining::DistributedTraining(std::int64_t& batch_size, bool batch_from_checkpoint, int threads,
                                         DistributedOptions options)
    : impl_(std::make_unique<Impl>()) {
  CG_CHECK(dist::is_initialized(), ValueError, "train --distributed: no MPI session (a chaingrad bug)");
  CG_CHECK(options.bucket_mb > 0, ValueError, "train: --bucket-mb must be positive; got ", options.bucket_mb);
  impl_->options = options;
  const int n = dist::world_size();
  if (!batch_from_checkpoint) batch_size *= n;
  impl_->global_batch = batch_size;
  impl_->per_rank_batch = (batch_size + n - 1) / n;
  impl_->threads = threads > 0 ? threads : dist::default_threads_per_rank();
  if (threads <= 0) cg::set_num_threads(impl_->threads);
}

DistributedTraining::~DistributedTraining() = default;

bool DistributedTraining::is_root() const { return dist::rank() == 0; }
int DistributedTraining::world_size() const { return dist::world_size(); }

std::string DistributedTraining::describe() const {
  char buf[512];
  const Impl& m = *impl_;
  std::string buckets;
  if (m.sync) {
    double total = 0;
    for (std::size_t b : m.sync->bucket_bytes()) total += static_cast<double>(b);
    char bb[128];
    std::snprintf(bb, sizeof bb, "; gradients %.2f MB in %zu bucket%s%s", total / 1e6, m.sync->num_buckets(),
                  m.sync->num_buckets() == 1 ? "" : "s", m.options.overlap ? ", overlapped with backward" : "");
    buckets = bb;
  }
  std::snprintf(buf, sizeof buf, "distributed: %d ranks (%d on this machine), batch %lld per rank = %lld global, %d thread%s per rank%s",
                dist::world_size(), dist::local_size(), static_cast<long long>(m.per_rank_batch),
                static_cast<long long>(m.global_batch), m.threads, m.threads == 1 ? "" : "s", buckets.c_str());
  return buf;
}

void DistributedTraining::attach(cg::nn::Module& model, const cg::data::Dataset& train,
                                 const cg::data::DataLoader& loader) {
  impl_->model = &model;
  impl_->sampler = std::make_unique<dist::DistributedSampler>(train, loader);
  impl_->sync = std::make_unique<dist::GradientSynchronizer>(
      model.parameters(),
      dist::GradientSynchronizerOptions{
          .bucket_bytes = static_cast<std::size_t>(impl_->options.bucket_mb * 1e6),
          .overlap = impl_->options.overlap,
          .broadcast_parameters = true});
  for (cg::Tensor& b : model.buffers()) dist::broadcast_(b, 0);
}

cg::data::Batch DistributedTraining::batch(std::int64_t b) {
  dist::LocalBatch lb = impl_->sampler->batch(b);
  impl_->weight = lb.weight;
  impl_->local_count = lb.local_count;
  global_count_ = lb.global_count;
  return std::move(lb.batch);
}

void DistributedTraining::before_backward() { impl_->sync->prepare(impl_->weight); }
void DistributedTraining::after_backward() { impl_->sync->finish(); }

namespace {
int decode_signal(double sigint, double sigterm) { return sigint > 0 ? SIGINT : sigterm > 0 ? SIGTERM : 0; }
}  // namespace

double DistributedTraining::reduce_loss(double local_loss, int local_signal) {
  const double n = static_cast<double>(impl_->local_count);
  double v[4] = {n > 0 ? local_loss * n : 0.0, n, local_signal == SIGINT ? 1.0 : 0.0,
                 local_signal == SIGTERM ? 1.0 : 0.0};
  dist::allreduce_(std::span<double>(v), dist::Op::Sum);
  signal_ = decode_signal(v[2], v[3]);
  return v[1] > 0 ? v[0] / v[1] : 0.0;
}

int DistributedTraining::agree_signal(int local_signal) {
  double v[2] = {local_signal == SIGINT ? 1.0 : 0.0, local_signal == SIGTERM ? 1.0 : 0.0};
  dist::allreduce_(std::span<double>(v), dist::Op::Sum);
  signal_ = decode_signal(v[0], v[1]);
  return signal_;
}

Evaluation DistributedTraining::evaluate(cg::nn::Module& model, const cg::data::Dataset& test,
                                         std::int64_t num_classes) {
  // Buffers (BatchNorm running statistics) follow each rank's own batches: evaluate with rank 0's,
  // the ones its checkpoint holds.
  for (cg::Tensor& b : model.buffers()) dist::broadcast_(b, 0);
  const cg::data::Dataset part = dist::shard(test);
  const auto c = static_cast<std::size_t>(num_classes);
  std::vector<double> sums(3 + c * c, 0.0);  // loss sum, correct, count, confusion
  if (part.size() > 0) {
    const Evaluation ev = cli::evaluate(model, part, num_classes);
    const double n = static_cast<double>(part.size());
    sums[0] = ev.loss * n;
    sums[1] = std::round(ev.accuracy * n);
    sums[2] = n;
    for (std::size_t i = 0; i < c; ++i)
      for (std::size_t j = 0; j < c; ++j) sums[3 + i * c + j] = static_cast<double>(ev.confusion[i][j]);
  }
  dist::allreduce_(std::span<double>(sums), dist::Op::Sum);
  Evaluation out;
  out.loss = sums[2] > 0 ? sums[0] / sums[2] : 0.0;
  out.accuracy = sums[2] > 0 ? sums[1] / sums[2] : 0.0;
  out.confusion.assign(c, std::vector<std::int64_t>(c, 0));
  for (std::size_t i = 0; i < c; ++i)
    for (std::size_t j = 0; j < c; ++j) out.confusion[i][j] = static_cast<std::int64_t>(sums[3 + i * c + j]);

  // What the gradient averaging cost this epoch (rank 0's view).
  if (impl_->sync && is_root() && !impl_->options.quiet) {
    const dist::SynchronizerStats& s = impl_->sync->stats();
    const dist::SynchronizerStats& r = impl_->reported;
    const auto steps = static_cast<double>(std::max<std::int64_t>(s.steps - r.steps, 1));
    char hooks[64] = "";
    if (impl_->options.overlap)
      std::snprintf(hooks, sizeof hooks, ", in gradient hooks %.3f ms", 1e3 * (s.hook_seconds - r.hook_seconds) / steps);
    std::fprintf(stderr,
                 "distributed: %lld steps, allreduce %.2f MB per step; per step: waiting %.3f ms, copying %.3f ms%s\n",
                 static_cast<long long>(s.steps - r.steps), static_cast<double>(s.bytes - r.bytes) / steps / 1e6,
                 1e3 * (s.wait_seconds - r.wait_seconds) / steps, 1e3 * (s.copy_seconds - r.copy_seconds) / steps, hooks);
    impl_->reported = s;
  }
  return out;
}

}  // namespace cli
