#pragma once
// Data-parallel training across processes and machines, on MPI (docs/distributed.md).
//
// Every rank holds a full replica of the model and trains on its own share of each global batch;
// after backward, GradientSynchronizer averages the gradients over all ranks, so every replica
// takes the same optimizer step and the replicas stay identical. With the same seed, N ranks with
// per-rank batch B follow the same trajectory as one process with batch N*B, up to the order of
// floating-point summation (tests/test_distributed.cpp states and checks the tolerance).
//
//   chaingrad::distributed::Session session;                    // MPI_Init ... MPI_Finalize
//   session.run([&] {                                           // an exception aborts every rank
//     data::DataLoader loader(train, {.batch_size = B * session.world_size(), .seed = seed});
//     distributed::DistributedSampler sampler(train, loader);   // this rank's share of each batch
//     distributed::GradientSynchronizer sync(model.parameters());
//     for (epoch ...) {
//       loader.set_epoch(epoch);
//       for (std::int64_t b = 0; b < sampler.num_batches(); ++b) {
//         const distributed::LocalBatch lb = sampler.batch(b);
//         opt.zero_grad();
//         sync.prepare(lb.weight);                              // before backward (overlap mode)
//         cross_entropy(model(lb.batch.inputs), lb.batch.labels).backward();
//         sync.finish();                                        // .grad now holds the global mean
//         opt.step();
//       }
//     }
//   });
//
// Built on MPI when CMake finds it (CHAINGRAD_WITH_MPI, which defines CHAINGRAD_HAVE_MPI). Without
// MPI everything here still compiles: the sampler works, rank() is 0, world_size() is 1, and
// Session's constructor throws a ValueError saying that this build has no MPI.
//
// Threading: MPI is initialized with MPI_THREAD_FUNNELED; call these functions from the thread
// that created the Session (the kernels' worker threads never call MPI).
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "chaingrad/data.hpp"
#include "chaingrad/tensor.hpp"

namespace chaingrad::distributed {

// True when this build of chaingrad has MPI.
bool available() noexcept;

// ---------------------------------------------------------------- process group
struct SessionOptions {
  // Ranks other than 0 write stdout and stderr to /dev/null, so that only rank 0 prints;
  // error messages from abort_all() still reach the original stderr of every rank.
  bool quiet_non_root = false;
};

// Initializes MPI for the lifetime of the object (MPI_Init_thread, FUNNELED) and finalizes it on
// destruction. Sessions nest: only the outermost one initializes and finalizes, and a Session
// created when MPI was already initialized by the program leaves finalization to the program.
// Started without mpirun, the process is a world of one (MPI's singleton mode).
class Session {
 public:
  explicit Session(SessionOptions options = {});
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  int rank() const;
  int world_size() const;
  bool is_root() const { return rank() == 0; }

  // Runs `f`. An exception escaping it on any rank prints `error: rank R of N (host H, pid P):
  // <what>` on that rank's stderr and aborts the whole job (MPI_Abort), so that no other rank
  // waits forever in a collective for a peer that has given up.
  void run(const std::function<void()>& f) const;
};

bool is_initialized();
int rank();        // this process's rank in the world, 0 without a Session
int world_size();  // number of ranks, 1 without a Session
int local_rank();  // rank among the ranks on this machine
int local_size();  // ranks on this machine
std::string processor_name();
// Threads per rank that share this machine's cores without oversubscribing them:
// max(1, hardware threads / local_size()).
int default_threads_per_rank();
void barrier();

// Prints `error: rank R of N (host H, pid P): <message>` on stderr and ends every rank of the job
// with `exit_code` (MPI_Abort). Without a Session it prints `error: <message>` and exits.
[[noreturn]] void abort_all(const std::string& message, int exit_code = 1);

// ---------------------------------------------------------------- collectives
enum class Op { Sum, Average, Max, Min };

// In place, over every rank: t = op(t on rank 0, t on rank 1, ...). Every rank must call it with
// the same shape and dtype. float32, float64 and int64 (not Average) tensors; a non-contiguous
// tensor is reduced through a contiguous copy. Average divides the sum by world_size().
// Tensors of any size (split into chunks of at most 2^30 elements per MPI call).
void allreduce_(Tensor& t, Op op = Op::Sum);
void allreduce_(std::span<double> values, Op op = Op::Sum);
void allreduce_(std::span<std::int64_t> values, Op op = Op::Sum);
// In place: every rank receives root's values.
void broadcast_(Tensor& t, int root = 0);
void broadcast_(std::span<double> values, int root = 0);

// ---------------------------------------------------------------- gradient averaging
struct GradientSynchronizerOptions {
  // Gradients are flattened into buckets of about this size (one MPI_Allreduce each). A parameter
  // larger than this gets a bucket of its own.
  std::size_t bucket_bytes = std::size_t{25} << 20;
  // Start a bucket's allreduce (MPI_Iallreduce) from gradient hooks as soon as backward has
  // produced all of its gradients, while backward still works on earlier layers. Buckets are
  // filled in reverse parameter order, the order backward produces them. Needs .grad cleared
  // before each backward (opt.zero_grad()); a step that starts with gradients present falls back
  // to the blocking path, as does the first step (it learns how many contributions each
  // parameter receives).
  bool overlap = false;
  // Copy rank 0's parameter values to every rank at construction, so replicas start equal even
  // when they were initialized or loaded differently.
  bool broadcast_parameters = true;
};

struct SynchronizerStats {
  std::int64_t steps = 0;
  std::int64_t allreduces = 0;       // MPI calls, all buckets and steps
  std::int64_t bytes = 0;            // reduced bytes, all buckets and steps
  double wait_seconds = 0;           // blocked in MPI (launch + wait) outside backward
  double hook_seconds = 0;           // spent inside gradient hooks (copies, launches, progress)
  double copy_seconds = 0;           // flattening and copying back outside backward
};

// Averages every parameter's gradient over all ranks, in buckets. A parameter whose gradient is
// undefined on every rank keeps an undefined gradient (so the optimizer skips it, as a single
// process would); one that has a gradient on some ranks gets the average with zeros elsewhere.
class GradientSynchronizer {
 public:
  explicit GradientSynchronizer(std::vector<Tensor> parameters, GradientSynchronizerOptions options = {});
  ~GradientSynchronizer();
  GradientSynchronizer(const GradientSynchronizer&) = delete;
  GradientSynchronizer& operator=(const GradientSynchronizer&) = delete;

  // Call before backward. `weight` is this rank's share of the global batch: the number of
  // samples it holds over the number in the global batch (LocalBatch::weight), so that ranks with
  // unequal shares still produce the mean over the global batch. Negative: 1 / world_size().
  void prepare(double weight = -1);
  // Call after backward: completes every bucket's allreduce and writes the averaged gradients
  // into .grad. Without a preceding prepare(), uses weight 1 / world_size().
  void finish();
  // prepare() + finish(), both after backward (no overlap).
  void synchronize(double weight = -1) {
    prepare(weight);
    finish();
  }

  std::size_t num_buckets() const;
  // Bytes of gradient (without the per-parameter flags) in each bucket, in launch order.
  std::vector<std::size_t> bucket_bytes() const;
  const SynchronizerStats& stats() const;
  void reset_stats();

  struct State;

 private:
  std::shared_ptr<State> state_;
};

// ---------------------------------------------------------------- data
// Positions [begin, end) of a batch of n samples that `rank` of `world` takes: contiguous and
// balanced (sizes differ by at most one), disjoint across ranks, together exactly [0, n).
struct Range {
  std::int64_t begin = 0, end = 0;
  std::int64_t size() const { return end - begin; }
};
Range shard_range(std::int64_t n, int rank, int world);

// This rank's rows of one global batch.
struct LocalBatch {
  data::Batch batch;              // the rows (see local_count == 0 below)
  std::int64_t local_count = 0;   // samples this rank holds
  std::int64_t global_count = 0;  // samples in the global batch, over all ranks
  double weight = 0;              // local_count / global_count: GradientSynchronizer::prepare's argument
};

// Splits each epoch's seeded shuffle between the ranks. `loader` orders the whole dataset and cuts
// it into global batches (its batch_size is the per-rank batch times world_size(), its shuffle
// order a pure function of seed and epoch); global batch i goes to the ranks in contiguous,
// balanced slices (shard_range). Each rank therefore sees a disjoint shard of every epoch,
// together the ranks see every sample exactly once, and the union of the slices of batch i is the
// batch i a single process with the same loader would train on.
//
// The sampler reads the loader's current order, so loader.set_epoch(e) moves both. Both
// references must outlive the sampler. When a (last, short) global batch has fewer samples than
// there are ranks, a rank left without any gets one row of that batch to run through the model
// and weight 0, so that every rank still takes part in the collective calls.
class DistributedSampler {
 public:
  DistributedSampler(const data::Dataset& dataset, const data::DataLoader& loader, int rank = distributed::rank(),
                     int world = distributed::world_size());

  std::int64_t num_batches() const { return loader_->num_batches(); }
  int rank() const { return rank_; }
  int world_size() const { return world_; }
  // Dataset rows this rank takes from global batch i (empty when it has none).
  std::vector<std::int64_t> indices(std::int64_t i) const;
  // Copies this rank's rows of global batch i.
  LocalBatch batch(std::int64_t i) const;

 private:
  const data::DataLoader* loader_;
  data::Dataset source_;  // the dataset's tensors, contiguous
  int rank_, world_;
};

// Rows shard_range(dataset.size(), rank, world) of `dataset`, as views (no copy): the split used
// to evaluate on all ranks at once.
data::Dataset shard(const data::Dataset& dataset, int rank = distributed::rank(), int world = distributed::world_size());

}  // namespace chaingrad::distributed
