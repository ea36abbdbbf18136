// The distributed sampler: each rank's share of every global batch, and the dataset split used
// for evaluation. Pure functions of (loader order, rank, world): no MPI here.
#include <algorithm>
#include <cstring>

#include "chaingrad/distributed.hpp"
#include "chaingrad/error.hpp"

namespace chaingrad::distributed {
namespace {

std::size_t row_bytes(const Tensor& t) {
  const std::int64_t n = t.size(0);
  return n == 0 ? 0 : static_cast<std::size_t>(t.numel() / n) * element_size(t.dtype());
}

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
  inputs_ = dataset.inputs.detach().contiguous();
  labels_ = dataset.labels.detach().contiguous();
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

  const auto b = static_cast<std::int64_t>(rows.size());
  Dims in_shape = inputs_.shape();
  in_shape[0] = b;
  Dims lab_shape = labels_.shape();
  lab_shape[0] = b;
  out.batch = {empty(in_shape, inputs_.dtype()), empty(lab_shape, labels_.dtype())};
  const std::size_t in_row = row_bytes(inputs_), lab_row = row_bytes(labels_);
  const auto* in_src = static_cast<const char*>(inputs_.raw_data());
  const auto* lab_src = static_cast<const char*>(labels_.raw_data());
  auto* in_dst = static_cast<char*>(out.batch.inputs.raw_data());
  auto* lab_dst = static_cast<char*>(out.batch.labels.raw_data());
  for (std::size_t r = 0; r < rows.size(); ++r) {
    const auto src = static_cast<std::size_t>(rows[r]);
    std::memcpy(in_dst + r * in_row, in_src + src * in_row, in_row);
    std::memcpy(lab_dst + r * lab_row, lab_src + src * lab_row, lab_row);
  }
  return out;
}

data::Dataset shard(const data::Dataset& dataset, int rank, int world) {
  const Range r = shard_range(dataset.size(), rank, world);
  data::Dataset out;
  out.inputs = dataset.inputs.detach().slice(0, r.begin, r.end);
  out.labels = dataset.labels.detach().slice(0, r.begin, r.end);
  out.num_classes = dataset.num_classes;
  return out;
}

}  // namespace chaingrad::distributed
