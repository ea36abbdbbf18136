// The distributed sampler: each rank's share of every global batch, and the dataset split used
// for evaluation. Pure functions of (loader order, rank, world): no MPI here.
#include <algorithm>

#include "chaingrad/distributed.hpp"
#include "chaingrad/error.hpp"

namespace chaingrad::distributed {
namespace {

void check_rank(int rank, int world, const char* op) {
  CG_CHECK(world >= 1 && rank >= 0 && rank < world, ValueError, op, ": rank must be in [0, world) with world >= 1; got rank ",
           rank, " of world ", world);
}

}  // namespace

Range shard_range(std::int64_t n, int rank, int world) {
  check_rank(rank, world, "shard_range");
  CG_CHECK(n >= 0, ValueError, "shard_range: n must be non-negative; got ", n);
  // floor(n r / w): consecutive, balanced, and exactly [0, n) over all ranks.
  // With n = q w + s: floor(n r / w) = q r + floor(s r / w), free of overflow.
  const std::int64_t q = n / world, s = n % world;
  const auto at = [&](int r) { return q * r + s * r / world; };
  return {at(rank), at(rank + 1)};
}

DistributedSampler::DistributedSampler(const data::Dataset& dataset, const data::DataLoader& loader, int rank,
                                       int world)
    : loader_(&loader), rank_(rank), world_(world) {
  check_rank(rank, world, "DistributedSampler");
  CG_CHECK(dataset.inputs.defined() && dataset.labels.defined() && dataset.inputs.dim() >= 1 &&
               dataset.inputs.size(0) == dataset.labels.size(0),
           ShapeError, "DistributedSampler: the dataset needs inputs and labels with the same first dimension");
  CG_CHECK(dataset.size() == loader.size(), ValueError, "DistributedSampler: the loader batches ", loader.size(),
           " samples but the dataset has ", dataset.size(), "; pass the dataset the loader was built on");
  source_ = dataset;
  source_.inputs = dataset.inputs.detach().contiguous();
  source_.labels = dataset.labels.detach().contiguous();
}

std::vector<std::int64_t> DistributedSampler::indices(std::int64_t i) const {
  const std::int64_t nb = loader_->num_batches();
  CG_CHECK(i >= 0 && i < nb, ValueError, "DistributedSampler::batch: index must be in [0, ", nb, "); got ", i);
  const std::int64_t global = loader_->options().batch_size;
  const std::int64_t begin = i * global;
  const std::int64_t m = std::min(global, loader_->size() - begin);
  const Range r = shard_range(m, rank_, world_);
  const auto& order = loader_->order();
  return {order.begin() + begin + r.begin, order.begin() + begin + r.end};
}

LocalBatch DistributedSampler::batch(std::int64_t i) const {
  std::vector<std::int64_t> rows = indices(i);
  const std::int64_t global = loader_->options().batch_size;
  LocalBatch out;
  out.global_count = std::min(global, loader_->size() - i * global);
  out.local_count = static_cast<std::int64_t>(rows.size());
  out.weight = static_cast<double>(out.local_count) / static_cast<double>(out.global_count);
  // A rank without samples in a short last batch runs the batch's first row with weight 0.
  if (rows.empty()) rows.push_back(loader_->order()[static_cast<std::size_t>(i * global)]);

  out.batch = data::gather_rows(source_, rows);
  return out;
}

data::Dataset shard(const data::Dataset& dataset, int rank, int world) {
  const Range r = shard_range(dataset.size(), rank, world);
  data::Dataset out;
  out.inputs = dataset.inputs.detach().slice(0, r.begin, r.end);
  out.labels = dataset.labels.detach().slice(0, r.begin, r.end);
  out.num_classes = dataset.num_classes;
  out.byte_scaling = dataset.byte_scaling;
  return out;
}

}  // namespace chaingrad::distributed
