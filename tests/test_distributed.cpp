// Data-parallel training (chaingrad/distributed.hpp).
//
// The sampler and the split are checked in-process. Everything that needs several ranks runs
// this same test binary under `mpirun --allow-run-as-root --oversubscribe -np N` on loopback, in
// worker mode: CHAINGRAD_TEST_WORKER=<mode> makes DistributedWorker.Run do that mode's work
// (it is skipped otherwise), and the parent test checks the outcome.
//
// Tolerance of "N ranks with per-rank batch B == 1 process with batch N*B": the two compute the
// same mean gradient with the sums grouped differently (each rank sums its B rows, then the
// ranks' partial means are added), so parameters agree to floating-point summation error:
// max |difference| <= 1e-12 in float64 and <= 1e-6 in float32 after the runs below (2 epochs,
// 10-14 steps, SGD with momentum; measured: ~1e-16 and ~6e-8). Both are far below what a wrong
// shard, a missing sample or a wrong weight does (1e-2 and more: see the uneven-shards test).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "chaingrad/chaingrad.hpp"
#include "chaingrad/data.hpp"
#include "chaingrad/distributed.hpp"
#include "chaingrad/io.hpp"
#include "chaingrad/nn.hpp"
#include "chaingrad/optim.hpp"

namespace cg = chaingrad;
namespace dist = chaingrad::distributed;
namespace fs = std::filesystem;

namespace {

// ---------------------------------------------------------------- a tiny synthetic task
// Features N(0,1); the label is the argmax of a fixed random linear map, so a small MLP learns it.
cg::data::Dataset make_dataset(std::int64_t n, std::int64_t features, std::int64_t classes, cg::DType dtype,
                               std::uint64_t seed = 7) {
  cg::Generator gen(seed);
  cg::data::Dataset d;
  const cg::Tensor x = cg::randn({n, features}, {.dtype = cg::DType::Float64}, &gen);
  const cg::Tensor w = cg::randn({features, classes}, {.dtype = cg::DType::Float64}, &gen);
  d.labels = cg::argmax(cg::matmul(x, w), 1).contiguous();
  d.inputs = x.to(dtype).contiguous();
  d.num_classes = classes;
  return d;
}

struct RunConfig {
  std::int64_t samples = 200;
  std::int64_t batch = 16;  // per rank
  int epochs = 2;
  cg::DType dtype = cg::DType::Float64;
  bool overlap = false;
  std::size_t bucket_bytes = std::size_t{25} << 20;
  std::uint64_t seed = 3;
};

std::shared_ptr<cg::nn::Sequential> make_model(const RunConfig& c) {
  cg::Generator gen(c.seed);
  auto model = std::make_shared<cg::nn::Sequential>(cg::nn::Sequential{
      cg::nn::Linear(6, 16, true, &gen), cg::nn::Tanh(), cg::nn::Linear(16, 16, true, &gen), cg::nn::Tanh(),
      cg::nn::Linear(16, 4, true, &gen)});
  model->to(c.dtype);
  return model;
}

// Trains with `world` ranks of per-rank batch c.batch when a Session is active, or as one process
// with batch world * c.batch when not. Returns the final parameters by name.
cg::nn::NamedTensors train(const RunConfig& c, int world) {
  const cg::data::Dataset data = make_dataset(c.samples, 6, 4, c.dtype);
  auto model = make_model(c);
  cg::optim::SGD opt(model->parameters(), {.lr = 0.1, .momentum = 0.9});
  cg::data::DataLoader loader(data, {.batch_size = c.batch * world, .shuffle = true, .seed = c.seed});
  const bool distributed = dist::is_initialized();
  std::unique_ptr<dist::DistributedSampler> sampler;
  std::unique_ptr<dist::GradientSynchronizer> sync;
  if (distributed) {
    sampler = std::make_unique<dist::DistributedSampler>(data, loader);
    sync = std::make_unique<dist::GradientSynchronizer>(
        model->parameters(), dist::GradientSynchronizerOptions{.bucket_bytes = c.bucket_bytes, .overlap = c.overlap});
  }
  for (int epoch = 0; epoch < c.epochs; ++epoch) {
    loader.set_epoch(epoch);
    for (std::int64_t b = 0; b < loader.num_batches(); ++b) {
      opt.zero_grad();
      if (distributed) {
        const dist::LocalBatch lb = sampler->batch(b);
        sync->prepare(lb.weight);
        cg::cross_entropy((*model)(lb.batch.inputs), lb.batch.labels).backward();
        sync->finish();
      } else {
        const cg::data::Batch batch = loader.batch(b);
        cg::cross_entropy((*model)(batch.inputs), batch.labels).backward();
      }
      opt.step();
    }
  }
  if (sync && c.overlap && dist::world_size() > 1)
    CG_CHECK(sync->stats().hook_seconds > 0, ValueError, "overlap mode never filled a bucket from a hook");
  cg::nn::NamedTensors out;
  for (const auto& [name, t] : model->named_parameters()) out.emplace_back(name, t.detach().clone());
  return out;
}

double max_abs_diff(const cg::Tensor& a, const cg::Tensor& b) {
  const auto x = a.to_vector<double>(), y = b.to_vector<double>();
  EXPECT_EQ(x.size(), y.size());
  double m = 0;
  for (std::size_t i = 0; i < x.size() && i < y.size(); ++i) m = std::max(m, std::abs(x[i] - y[i]));
  return m;
}

// ---------------------------------------------------------------- running mpirun
struct Outcome {
  int status = -1;  // exit status, or 128 + signal
  std::string output;
  double seconds = 0;
};

std::string self_exe() { return fs::read_symlink("/proc/self/exe").string(); }

bool have_mpirun() { return std::system("command -v mpirun >/dev/null 2>&1") == 0; }

// Runs `cmd` through the shell with stderr merged into stdout.
Outcome run(const std::string& cmd) {
  Outcome o;
  const auto t0 = std::chrono::steady_clock::now();
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return o;
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) o.output.append(buf, n);
  const int st = ::pclose(p);
  o.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  o.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  return o;
}

// `mpirun -np N` of this binary in worker `mode`; `env` adds VAR=value pairs for the workers.
// A hard `timeout` guards the suite against a hang.
std::string mpirun_worker(int np, const std::string& mode, const std::vector<std::string>& env = {}, int timeout = 120) {
  std::ostringstream cmd;
  cmd << "timeout -k 5 " << timeout << " env CHAINGRAD_TEST_WORKER=" << mode
      << " ASAN_OPTIONS=detect_leaks=0 OMPI_MCA_rmaps_base_oversubscribe=1";
  for (const auto& e : env) cmd << " " << e;
  cmd << " mpirun --allow-run-as-root --oversubscribe -np " << np << " -x CHAINGRAD_TEST_WORKER -x ASAN_OPTIONS";
  for (const auto& e : env) cmd << " -x " << e.substr(0, e.find('='));
  cmd << " " << self_exe() << " --gtest_filter=DistributedWorker.Run";
  return cmd.str();
}

fs::path temp_dir(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / ("chaingrad_test_distributed_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

const char* env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v ? v : fallback;
}

RunConfig config_from_env() {
  RunConfig c;
  c.samples = std::atoll(env_or("CG_SAMPLES", "200"));
  c.batch = std::atoll(env_or("CG_BATCH", "16"));
  c.dtype = std::string(env_or("CG_DTYPE", "f64")) == "f32" ? cg::DType::Float32 : cg::DType::Float64;
  c.overlap = std::string(env_or("CG_OVERLAP", "0")) == "1";
  c.bucket_bytes = static_cast<std::size_t>(std::atoll(env_or("CG_BUCKET", "26214400")));
  return c;
}

#define SKIP_WITHOUT_MPI()                                                             \
  do {                                                                                 \
    if (!dist::available()) GTEST_SKIP() << "this build has no MPI";                   \
    if (!have_mpirun()) GTEST_SKIP() << "mpirun is not installed (openmpi-bin)";       \
  } while (0)

// Checks the parameters rank 0 saved against a one-process run with batch world * B.
void expect_matches_one_process(const RunConfig& c, int world, const fs::path& saved, double tolerance) {
  const auto reference = train(c, world);  // no Session here: one process
  const auto file = cg::io::load_safetensors(saved.string());
  for (const auto& [name, ref] : reference) {
    const cg::Tensor* got = file.find(name);
    ASSERT_NE(got, nullptr) << name;
    const double d = max_abs_diff(*got, ref);
    EXPECT_LE(d, tolerance) << name << " differs by " << d;
    std::printf("  %-10s max |N ranks - 1 process| = %.3g\n", name.c_str(), d);
  }
}

// The figures of docs/distributed.md (not a test): CHAINGRAD_TEST_WORKER=bench under mpirun.
// Times MPI_Allreduce of float32 buffers from 4 bytes to 64 MB, then GradientSynchronizer on the
// gradients of the default MLP and of the CNN. Rank 0 prints medians and minima.
void bench_allreduce(int rank, int world) {
  using Clock = std::chrono::steady_clock;
  const std::string parts = env_or("CG_BENCH", "all");  // all | allreduce | steps
  if (parts != "steps") {
  if (rank == 0)
    std::printf("allreduce (MPI_SUM, float32, in place), %d ranks\n%12s %12s %12s %12s %14s\n", world, "bytes",
                "median us", "min us", "algbw GB/s", "busbw GB/s");
  for (std::int64_t bytes = 4; bytes <= (std::int64_t{64} << 20); bytes *= 4) {
    cg::Tensor t = cg::ones({bytes / 4});
    // Fixed repetition counts (same on every rank), sized to stay under a few seconds.
    const int reps = bytes <= (1 << 16) ? 400 : bytes <= (4 << 20) ? 60 : 10;
    std::vector<double> times;
    for (int i = 0; i < reps + 3; ++i) {
      dist::barrier();
      const auto t0 = Clock::now();
      dist::allreduce_(t, dist::Op::Sum);
      if (i >= 3) times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    }
    std::sort(times.begin(), times.end());
    const double med = times[times.size() / 2], mn = times[0];
    if (rank == 0)
      std::printf("%12lld %12.1f %12.1f %12.3f %14.3f\n", static_cast<long long>(bytes), med * 1e6, mn * 1e6,
                  static_cast<double>(bytes) / med / 1e9,
                  2.0 * (world - 1) / world * static_cast<double>(bytes) / med / 1e9);
  }
  for (const auto& [label, spec] : {std::pair<const char*, const char*>{"mlp", "linear(256) relu linear(256) relu linear(10)"},
                                    {"cnn", "conv2d(32,3,pad=1) relu maxpool2d(2) conv2d(64,3,pad=1) relu maxpool2d(2) "
                                            "flatten linear(128) relu linear(10)"}}) {
    auto model = cg::nn::build_model(spec, cg::Dims{1, 28, 28}, 0);
    for (double mb : {25.0, 0.25}) {
      dist::GradientSynchronizer sync(model->parameters(),
                                      {.bucket_bytes = static_cast<std::size_t>(mb * 1e6), .broadcast_parameters = false});
      std::vector<double> times;
      for (int i = 0; i < 103; ++i) {
        for (cg::Tensor& p : model->parameters()) p.set_grad(cg::ones_like(p));
        dist::barrier();
        const auto t0 = Clock::now();
        sync.synchronize();
        if (i >= 3) times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
        if (i == 2) sync.reset_stats();
      }
      std::sort(times.begin(), times.end());
      double total = 0;
      for (std::size_t b : sync.bucket_bytes()) total += static_cast<double>(b);
      if (rank == 0)
        std::printf("GradientSynchronizer %s: %.3f MB in %zu bucket(s) of <= %.2f MB: median %.1f us, min %.1f us "
                    "(%.3f GB/s); of which copying %.1f us\n",
                    label, total / 1e6, sync.num_buckets(), mb, times[times.size() / 2] * 1e6, times[0] * 1e6,
                    total / times[times.size() / 2] / 1e9,
                    sync.stats().copy_seconds / static_cast<double>(sync.stats().steps) * 1e6);
    }
  }
  }
  if (parts == "allreduce") return;
  // One SGD step (forward, backward, gradient averaging, update) at batch CG_BATCH per rank on
  // random Fashion-MNIST-shaped data, 1 thread per rank: the step without any averaging (what
  // the rank's compute costs while the other rank computes too), with one 25 MB bucket, with
  // 0.25 MB buckets, and with 0.25 MB buckets started from the gradient hooks (overlap).
  cg::set_num_threads(1);
  const std::int64_t batch = std::atoll(env_or("CG_BATCH", "64"));
  cg::Generator gen(static_cast<std::uint64_t>(rank) + 1);
  const cg::Tensor x = cg::randn({batch, 1, 28, 28}, {}, &gen);
  const cg::Tensor y = cg::randint(0, 10, {batch}, &gen);
  for (const auto& [label, spec] : {std::pair<const char*, const char*>{"mlp", "linear(256) relu linear(256) relu linear(10)"},
                                    {"cnn", "conv2d(32,3,pad=1) relu maxpool2d(2) conv2d(64,3,pad=1) relu maxpool2d(2) "
                                            "flatten linear(128) relu linear(10)"}}) {
    const int steps = std::string(label) == "mlp" ? 200 : 30;
    struct Variant {
      const char* name;
      bool sync;
      double mb;
      bool overlap;
    };
    for (const Variant v : {Variant{"no averaging", false, 25, false}, Variant{"1 bucket", true, 25, false},
                            Variant{"0.25 MB buckets", true, 0.25, false},
                            Variant{"0.25 MB buckets + overlap", true, 0.25, true}, Variant{"no averaging", false, 25, false}}) {
      auto model = cg::nn::build_model(spec, cg::Dims{1, 28, 28}, 0);
      cg::optim::SGD opt(model->parameters(), {.lr = 0.01, .momentum = 0.9});
      std::unique_ptr<dist::GradientSynchronizer> sync;
      if (v.sync)
        sync = std::make_unique<dist::GradientSynchronizer>(
            model->parameters(), dist::GradientSynchronizerOptions{.bucket_bytes = static_cast<std::size_t>(v.mb * 1e6),
                                                                   .overlap = v.overlap});
      std::vector<double> times;
      dist::barrier();
      for (int i = 0; i < steps + 3; ++i) {
        const auto t0 = Clock::now();
        opt.zero_grad();
        if (sync) sync->prepare();
        cg::cross_entropy((*model)(x), y).backward();
        if (sync) sync->finish();
        opt.step();
        if (i >= 3) times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
        if (i == 2 && sync) sync->reset_stats();
      }
      std::sort(times.begin(), times.end());
      if (rank == 0)
        std::printf("step %s, batch %lld per rank, %s: median %.3f ms, min %.3f ms%s\n", label,
                    static_cast<long long>(batch), v.name, times[times.size() / 2] * 1e3, times[0] * 1e3,
                    sync ? (", waiting " + std::to_string(sync->stats().wait_seconds / sync->stats().steps * 1e3).substr(0, 5) +
                            " ms, copying " + std::to_string(sync->stats().copy_seconds / sync->stats().steps * 1e3).substr(0, 5) +
                            " ms, hooks " + std::to_string(sync->stats().hook_seconds / sync->stats().steps * 1e3).substr(0, 5) +
                            " ms (means)")
                               .c_str()
                         : "");
    }
  }
}

}  // namespace

// ---------------------------------------------------------------- worker mode
TEST(DistributedWorker, Run) {
  const char* mode_env = std::getenv("CHAINGRAD_TEST_WORKER");
  if (!mode_env) GTEST_SKIP() << "runs only under mpirun, started by the other tests";
  const std::string mode = mode_env;
  dist::Session session;
  session.run([&] {
    const int r = session.rank(), n = session.world_size();
    if (mode == "train") {
      const auto params = train(config_from_env(), n);
      if (r == 0) cg::io::save_safetensors(env_or("CG_OUT", "params.safetensors"), params);
    } else if (mode == "collectives") {
      // float32 / float64 / int64, Sum / Average / Max / Min, a non-contiguous view, broadcast.
      cg::Tensor f = cg::full({3, 5}, r + 1.0, {.dtype = cg::DType::Float32});
      dist::allreduce_(f, dist::Op::Sum);
      CG_CHECK(f.at({2, 4}) == n * (n + 1) / 2.0, ValueError, "Sum gave ", f.at({2, 4}));
      cg::Tensor d = cg::full({4}, r + 1.0, {.dtype = cg::DType::Float64});
      dist::allreduce_(d, dist::Op::Average);
      CG_CHECK(d.at({0}) == (n + 1) / 2.0, ValueError, "Average gave ", d.at({0}));
      cg::Tensor m = cg::full({2}, static_cast<double>(r), {.dtype = cg::DType::Float64});
      dist::allreduce_(m, dist::Op::Max);
      CG_CHECK(m.at({1}) == n - 1, ValueError, "Max gave ", m.at({1}));
      dist::allreduce_(m, dist::Op::Min);
      CG_CHECK(m.at({1}) == n - 1, ValueError, "Min after Max gave ", m.at({1}));
      cg::Tensor base = cg::full({4, 6}, r + 1.0, {.dtype = cg::DType::Float32});
      cg::Tensor view = base.t();  // non-contiguous
      dist::allreduce_(view, dist::Op::Sum);
      CG_CHECK(base.at({3, 5}) == n * (n + 1) / 2.0, ValueError, "Sum through a view gave ", base.at({3, 5}));
      std::vector<std::int64_t> counts = {r, 1};
      dist::allreduce_(std::span<std::int64_t>(counts), dist::Op::Sum);
      CG_CHECK(counts[1] == n && counts[0] == n * (n - 1) / 2, ValueError, "int64 Sum gave ", counts[0]);
      cg::Tensor b = cg::full({7}, r == 0 ? 42.0 : -1.0, {.dtype = cg::DType::Float64});
      dist::broadcast_(b, 0);
      CG_CHECK(b.at({6}) == 42.0, ValueError, "broadcast gave ", b.at({6}));
      // Gradients: rank r holds r+1 everywhere; weights 1/n give the mean; an unused parameter
      // keeps an undefined gradient; one used on rank 0 only gets the mean with zeros elsewhere.
      std::vector<cg::Tensor> params;
      for (int k = 0; k < 5; ++k) params.push_back(cg::zeros({100 + k, 3}, {.requires_grad = true}));
      params.push_back(cg::zeros({2}, {.dtype = cg::DType::Float64, .requires_grad = true}));
      dist::GradientSynchronizer sync(params, {.bucket_bytes = 2048});
      CG_CHECK(sync.num_buckets() >= 4, ValueError, "expected several buckets; got ", sync.num_buckets());
      for (int k = 0; k < 4; ++k) params[static_cast<std::size_t>(k)].set_grad(cg::full({100 + k, 3}, r + 1.0));
      if (r == 0) params[5].set_grad(cg::full({2}, 8.0, {.dtype = cg::DType::Float64}));
      sync.synchronize();
      CG_CHECK(std::abs(params[2].grad().at({101, 2}) - (n + 1) / 2.0) < 1e-6, ValueError, "mean gradient ",
               params[2].grad().at({101, 2}));
      CG_CHECK(!params[4].grad().defined(), ValueError, "an unused parameter got a gradient");
      CG_CHECK(params[5].grad().defined() && params[5].grad().at({1}) == 8.0 / n, ValueError,
               "a gradient present on rank 0 only should average to ", 8.0 / n);
    } else if (mode == "throw") {
      // Bad data on one rank: rank 1 raises in its third step while the others wait for it.
      const RunConfig c = config_from_env();
      const cg::data::Dataset data = make_dataset(c.samples, 6, 4, c.dtype);
      auto model = make_model(c);
      dist::GradientSynchronizer sync(model->parameters());
      for (int step = 0;; ++step) {
        if (r == 1 && step == 3) throw cg::ValueError("bad data: sample 17 has label 9 but there are 4 classes");
        model->zero_grad();
        cg::cross_entropy((*model)(data.inputs), data.labels).backward();
        sync.synchronize();
      }
    } else if (mode == "hang") {
      // Steps forever (until killed); each rank leaves its pid in CG_OUT/pid.<rank>.
      const fs::path dir = env_or("CG_OUT", ".");
      std::ofstream(dir / ("pid." + std::to_string(r) + ".tmp")) << ::getpid() << "\n";
      fs::rename(dir / ("pid." + std::to_string(r) + ".tmp"), dir / ("pid." + std::to_string(r)));
      cg::Tensor t = cg::ones({1000});
      for (int i = 0; i < 600; ++i) {
        dist::allreduce_(t, dist::Op::Average);
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    } else if (mode == "bench") {
      bench_allreduce(r, n);
    } else {
      throw cg::ValueError("unknown CHAINGRAD_TEST_WORKER mode '" + mode + "'");
    }
  });
}

// ---------------------------------------------------------------- sharding (no MPI needed)
TEST(DistributedSampler, ShardRangeIsBalancedDisjointAndComplete) {
  for (int world : {1, 2, 3, 5, 8})
    for (std::int64_t n : {0, 1, 2, 7, 64, 97, 1000}) {
      std::int64_t expect_begin = 0;
      for (int r = 0; r < world; ++r) {
        const dist::Range rg = dist::shard_range(n, r, world);
        EXPECT_EQ(rg.begin, expect_begin);
        EXPECT_GE(rg.size(), n / world);
        EXPECT_LE(rg.size(), n / world + 1);
        expect_begin = rg.end;
      }
      EXPECT_EQ(expect_begin, n);
    }
  EXPECT_THROW(dist::shard_range(10, 2, 2), cg::ValueError);
  EXPECT_THROW(dist::shard_range(-1, 0, 2), cg::ValueError);
}

TEST(DistributedSampler, RanksSeeDisjointShardsCoveringEachEpochInTheGlobalBatchOrder) {
  const cg::data::Dataset data = make_dataset(203, 6, 4, cg::DType::Float32);
  for (int world : {1, 2, 3, 4}) {
    const std::int64_t per_rank = 8;
    cg::data::DataLoader loader(data, {.batch_size = per_rank * world, .shuffle = true, .seed = 11});
    std::vector<dist::DistributedSampler> samplers;
    for (int r = 0; r < world; ++r) samplers.emplace_back(data, loader, r, world);
    for (int epoch : {0, 1, 5}) {
      loader.set_epoch(epoch);
      std::multiset<std::int64_t> seen;
      for (std::int64_t b = 0; b < loader.num_batches(); ++b) {
        // The ranks' rows, in rank order, are exactly the single-process batch b.
        std::vector<std::int64_t> joined;
        double weights = 0;
        for (const auto& s : samplers) {
          const auto rows = s.indices(b);
          joined.insert(joined.end(), rows.begin(), rows.end());
          const dist::LocalBatch lb = s.batch(b);
          weights += lb.weight;
          EXPECT_EQ(lb.local_count, static_cast<std::int64_t>(rows.size()));
          EXPECT_LE(lb.local_count, per_rank);
          if (!rows.empty()) {
            EXPECT_EQ(lb.batch.labels.to_vector<std::int64_t>()[0], data.labels.to_vector<std::int64_t>()[rows[0]]);
          }
        }
        const auto& order = loader.order();
        const std::int64_t begin = b * per_rank * world;
        const std::vector<std::int64_t> expected(order.begin() + begin,
                                                 order.begin() + std::min<std::int64_t>(begin + per_rank * world, 203));
        EXPECT_EQ(joined, expected) << "world " << world << " batch " << b;
        EXPECT_NEAR(weights, 1.0, 1e-12);
        seen.insert(joined.begin(), joined.end());
      }
      EXPECT_EQ(seen.size(), 203u);
      EXPECT_EQ(std::set<std::int64_t>(seen.begin(), seen.end()).size(), 203u) << "a sample was seen twice";
    }
  }
}

TEST(DistributedSampler, ARankWithoutSamplesGetsOneRowOfWeightZero) {
  // 97 samples, global batch 3 x 8 = 24: the last batch has one sample; shard_range(1, r, 3)
  // gives it to rank 2, and ranks 0 and 1 get a stand-in row with weight 0.
  const cg::data::Dataset data = make_dataset(97, 6, 4, cg::DType::Float32);
  cg::data::DataLoader loader(data, {.batch_size = 24, .shuffle = true, .seed = 1});
  const std::int64_t last = loader.num_batches() - 1;
  double total = 0;
  for (int r = 0; r < 3; ++r) {
    const dist::LocalBatch lb = dist::DistributedSampler(data, loader, r, 3).batch(last);
    EXPECT_EQ(lb.global_count, 1);
    EXPECT_EQ(lb.batch.labels.numel(), 1);
    total += lb.weight;
    if (lb.local_count == 0) {
      EXPECT_EQ(lb.weight, 0.0);
    }
  }
  EXPECT_EQ(total, 1.0);
}

TEST(DistributedSampler, ShardSplitsAnEvaluationSetIntoViews) {
  const cg::data::Dataset data = make_dataset(10, 6, 4, cg::DType::Float32);
  const cg::data::Dataset a = dist::shard(data, 0, 3), b = dist::shard(data, 1, 3), c = dist::shard(data, 2, 3);
  EXPECT_EQ(a.size() + b.size() + c.size(), 10);
  EXPECT_EQ(b.inputs.at({0, 0}), data.inputs.at({a.size(), 0}));
  EXPECT_EQ(c.num_classes, 4);
  EXPECT_THROW(dist::DistributedSampler(make_dataset(9, 6, 4, cg::DType::Float32),
                                        cg::data::DataLoader(data, {.batch_size = 2}), 0, 1),
               cg::ValueError);
}

TEST(Distributed, WithoutASessionTheWorldIsOneProcess) {
  EXPECT_FALSE(dist::is_initialized());
  EXPECT_EQ(dist::rank(), 0);
  EXPECT_EQ(dist::world_size(), 1);
  cg::Tensor t = cg::full({3}, 2.0);
  dist::allreduce_(t, dist::Op::Average);
  EXPECT_EQ(t.at({1}), 2.0);
  // A synchronizer in a world of one leaves gradients alone (weight 1) or scales them.
  cg::Tensor p = cg::zeros({2}, {.requires_grad = true});
  p.set_grad(cg::full({2}, 4.0));
  dist::GradientSynchronizer sync({p});
  sync.synchronize();
  EXPECT_EQ(p.grad().at({0}), 4.0);
  sync.synchronize(0.5);
  EXPECT_EQ(p.grad().at({0}), 2.0);
  if (!dist::available()) {
    try {
      dist::Session s;
      FAIL() << "Session should refuse to start without MPI";
    } catch (const cg::ValueError& e) {
      EXPECT_NE(std::string(e.what()).find("built without MPI"), std::string::npos) << e.what();
    }
  }
}

// ---------------------------------------------------------------- several ranks, on loopback
TEST(Distributed, CollectivesOnTwoRanks) {
  SKIP_WITHOUT_MPI();
  for (int np : {2, 3}) {
    const Outcome o = run(mpirun_worker(np, "collectives"));
    EXPECT_EQ(o.status, 0) << o.output;
  }
}

TEST(Distributed, TwoRanksMatchOneProcessWithTheGlobalBatch) {
  SKIP_WITHOUT_MPI();
  // 200 samples, 2 x 16 per step: 7 global batches per epoch, the last one of 8 samples (4 + 4).
  const fs::path dir = temp_dir("match");
  RunConfig c;
  const Outcome o = run(mpirun_worker(2, "train", {"CG_OUT=" + (dir / "p.safetensors").string()}));
  ASSERT_EQ(o.status, 0) << o.output;
  expect_matches_one_process(c, 2, dir / "p.safetensors", 1e-12);
  fs::remove_all(dir);
}

TEST(Distributed, Float32WithOverlapAndSmallBucketsMatchesOneProcess) {
  SKIP_WITHOUT_MPI();
  // Buckets of 512 bytes: one per parameter or so, launched from gradient hooks during backward.
  const fs::path dir = temp_dir("overlap");
  RunConfig c;
  c.dtype = cg::DType::Float32;
  c.overlap = true;
  c.bucket_bytes = 512;
  const Outcome o = run(mpirun_worker(
      2, "train", {"CG_OUT=" + (dir / "p.safetensors").string(), "CG_DTYPE=f32", "CG_OVERLAP=1", "CG_BUCKET=512"}));
  ASSERT_EQ(o.status, 0) << o.output;
  expect_matches_one_process(c, 2, dir / "p.safetensors", 1e-6);
  fs::remove_all(dir);
}

TEST(Distributed, ThreeRanksWithUnevenAndEmptyShardsMatchOneProcess) {
  SKIP_WITHOUT_MPI();
  // 98 samples, 3 x 8 per step: the last global batch has 2 samples; rank 0 runs a stand-in row
  // with weight 0.
  const fs::path dir = temp_dir("uneven");
  RunConfig c;
  c.samples = 98;
  c.batch = 8;
  const Outcome o = run(mpirun_worker(
      3, "train", {"CG_OUT=" + (dir / "p.safetensors").string(), "CG_SAMPLES=98", "CG_BATCH=8", "CG_OVERLAP=1",
                   "CG_BUCKET=1024"}));
  ASSERT_EQ(o.status, 0) << o.output;
  c.overlap = true;
  expect_matches_one_process(c, 3, dir / "p.safetensors", 1e-12);
  fs::remove_all(dir);
}

TEST(Distributed, ARankThatRaisesEndsEveryRankNamingItself) {
  SKIP_WITHOUT_MPI();
  const Outcome o = run(mpirun_worker(2, "throw", {}, 60));
  EXPECT_NE(o.status, 0);
  EXPECT_NE(o.status, 124) << "timed out: the ranks hung\n" << o.output;
  EXPECT_NE(o.output.find("error: rank 1 of 2"), std::string::npos) << o.output;
  EXPECT_NE(o.output.find("bad data: sample 17"), std::string::npos) << o.output;
  EXPECT_LT(o.seconds, 30) << o.output;
}

TEST(Distributed, ARankThatDiesEndsEveryRankWithinSeconds) {
  SKIP_WITHOUT_MPI();
  const fs::path dir = temp_dir("kill");
  const std::string cmd = mpirun_worker(2, "hang", {"CG_OUT=" + dir.string()}, 90) + " > " +
                          (dir / "log").string() + " 2>&1";
  std::thread runner;
  Outcome o;
  runner = std::thread([&] { o = run(cmd); });
  // Wait for both ranks to be running, then kill rank 1.
  const auto t0 = std::chrono::steady_clock::now();
  while (!(fs::exists(dir / "pid.0") && fs::exists(dir / "pid.1")) &&
         std::chrono::steady_clock::now() - t0 < std::chrono::seconds(60))
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ASSERT_TRUE(fs::exists(dir / "pid.1")) << "the ranks did not start";
  pid_t victim = 0;
  std::ifstream(dir / "pid.1") >> victim;
  ASSERT_GT(victim, 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const auto killed = std::chrono::steady_clock::now();
  ASSERT_EQ(::kill(victim, SIGKILL), 0);
  runner.join();
  const double after_kill = std::chrono::duration<double>(std::chrono::steady_clock::now() - killed).count();
  std::ifstream log(dir / "log");
  const std::string text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
  EXPECT_NE(o.status, 0);
  EXPECT_NE(o.status, 124) << "timed out: the surviving rank hung\n" << text;
  EXPECT_LT(after_kill, 20) << text;
  EXPECT_NE(text.find("rank 1"), std::string::npos) << text;
  std::printf("  every rank ended %.2f s after rank 1 was killed\n", after_kill);
  fs::remove_all(dir);
}

// ---------------------------------------------------------------- the CLI: chaingrad train --distributed
namespace {

const std::string kCli = std::string(CHAINGRAD_BINARY_DIR) + "/chaingrad";

// A CSV classification task: 6 features, 3 classes from a fixed linear map.
void write_csv(const fs::path& path, std::int64_t n, std::uint64_t seed) {
  cg::Generator gen(seed);
  cg::Generator wgen(99);
  const cg::Tensor w = cg::randn({6, 3}, {.dtype = cg::DType::Float64}, &wgen);
  const cg::Tensor x = cg::randn({n, 6}, {.dtype = cg::DType::Float64}, &gen);
  const auto labels = cg::argmax(cg::matmul(x, w), 1).to_vector<std::int64_t>();
  const auto xs = x.to_vector<double>();
  std::ofstream f(path);
  f << "x0,x1,x2,x3,x4,x5,label\n";
  for (std::int64_t i = 0; i < n; ++i) {
    for (int j = 0; j < 6; ++j) f << xs[static_cast<std::size_t>(i * 6 + j)] << ",";
    f << labels[static_cast<std::size_t>(i)] << "\n";
  }
}

std::vector<std::string> json_lines(const std::string& out) {
  std::vector<std::string> lines;
  std::istringstream in(out);
  for (std::string l; std::getline(in, l);)
    if (!l.empty() && l[0] == '{') lines.push_back(l);
  return lines;
}

double json_number(const std::string& line, const std::string& key) {
  const auto at = line.find("\"" + key + "\":");
  if (at == std::string::npos) return NAN;
  return std::strtod(line.c_str() + at + key.size() + 3, nullptr);
}

double max_param_diff(const fs::path& a, const fs::path& b) {
  const auto fa = cg::io::load_safetensors(a.string()), fb = cg::io::load_safetensors(b.string());
  double m = 0;
  for (const auto& [name, t] : fa.tensors) {
    const cg::Tensor* u = fb.find(name);
    EXPECT_NE(u, nullptr) << name;
    if (u) m = std::max(m, max_abs_diff(t, *u));
  }
  return m;
}

}  // namespace

TEST(DistributedCli, TwoRanksMatchOneProcessOnlyRankZeroPrintsAndResumeContinues) {
  SKIP_WITHOUT_MPI();
  if (!fs::exists(kCli)) GTEST_SKIP() << "the CLI was not built";
  const fs::path dir = temp_dir("cli");
  write_csv(dir / "train.csv", 300, 1);
  write_csv(dir / "test.csv", 101, 2);
  const std::string data = " --csv " + (dir / "train.csv").string() + " --test-csv " + (dir / "test.csv").string() +
                           " --model 'linear(16) relu linear(3)' --epochs 3 --threads 1 --json";
  const std::string mpirun = "timeout -k 5 120 env ASAN_OPTIONS=detect_leaks=0 mpirun --allow-run-as-root --oversubscribe "
                             "-np 2 -x ASAN_OPTIONS ";
  // 2 ranks x 8 against 1 process x 16.
  const Outcome d = run(mpirun + kCli + " train --distributed --batch-size 8 --out " + (dir / "d").string() + data);
  ASSERT_EQ(d.status, 0) << d.output;
  const Outcome s = run(kCli + " train --batch-size 16 --out " + (dir / "s").string() + data);
  ASSERT_EQ(s.status, 0) << s.output;
  const auto dl = json_lines(d.output), sl = json_lines(s.output);
  ASSERT_EQ(dl.size(), 3u) << "rank 0 alone prints one line per epoch:\n" << d.output;
  ASSERT_EQ(sl.size(), 3u) << s.output;
  for (std::size_t e = 0; e < 3; ++e) {
    EXPECT_NEAR(json_number(dl[e], "train_loss"), json_number(sl[e], "train_loss"), 1e-6) << dl[e] << "\n" << sl[e];
    EXPECT_NEAR(json_number(dl[e], "test_loss"), json_number(sl[e], "test_loss"), 1e-6) << dl[e] << "\n" << sl[e];
    EXPECT_EQ(json_number(dl[e], "test_accuracy"), json_number(sl[e], "test_accuracy")) << dl[e] << "\n" << sl[e];
  }
  EXPECT_LE(max_param_diff(dir / "d" / "last.safetensors", dir / "s" / "last.safetensors"), 1e-6);
  // The checkpoint records the global batch, so a one-process resume and a two-rank resume from
  // epoch 1 both continue the same run.
  EXPECT_EQ(cg::io::load_safetensors((dir / "d" / "last.safetensors").string()).metadata.at("chaingrad.batch_size"),
            "16");
  const Outcome r = run(mpirun + kCli + " train --distributed --resume " + (dir / "d" / "epoch-1.safetensors").string() +
                        " --out " + (dir / "r").string() + data);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(json_lines(r.output).size(), 2u) << r.output;
  EXPECT_LE(max_param_diff(dir / "d" / "last.safetensors", dir / "r" / "last.safetensors"), 1e-7);
  const Outcome r1 = run(kCli + " train --resume " + (dir / "d" / "epoch-1.safetensors").string() + " --out " +
                         (dir / "r1").string() + data);
  ASSERT_EQ(r1.status, 0) << r1.output;
  EXPECT_LE(max_param_diff(dir / "d" / "last.safetensors", dir / "r1" / "last.safetensors"), 1e-6);
  fs::remove_all(dir);
}

TEST(DistributedCli, WithoutMpiDistributedIsAClearError) {
  if (dist::available()) GTEST_SKIP() << "this build has MPI";
  if (!fs::exists(kCli)) GTEST_SKIP() << "the CLI was not built";
  const Outcome o = run(kCli + " train --distributed --epochs 1");
  EXPECT_NE(o.status, 0);
  EXPECT_NE(o.output.find("error: distributed: this chaingrad was built without MPI"), std::string::npos) << o.output;
}

// A byte dataset's shards and local batches hold the floats of the same dataset as float32.
TEST(DistributedSampler, ByteInputsGiveTheFloatsOfFloatInputs) {
  cg::data::Dataset bytes = make_dataset(61, 10, 3, cg::DType::Float32);
  std::vector<double> pixels(61 * 10);
  for (std::size_t i = 0; i < pixels.size(); ++i) pixels[i] = static_cast<double>((i * 37) % 256);
  bytes.inputs = cg::from_vector(pixels, {61, 10}, {.dtype = cg::DType::UInt8});
  bytes.byte_scaling = {.divisor = 255.0f, .mean = 0.25f, .scale = 4.0f};
  cg::data::Dataset floats = bytes;
  floats.inputs = cg::data::float_inputs(bytes).contiguous();
  cg::data::DataLoader loader(floats, {.batch_size = 12, .shuffle = true, .seed = 2});
  for (int r = 0; r < 3; ++r) {
    const dist::DistributedSampler sb(bytes, loader, r, 3), sf(floats, loader, r, 3);
    for (std::int64_t b = 0; b < loader.num_batches(); ++b)
      EXPECT_EQ(sb.batch(b).batch.inputs.to_vector<float>(), sf.batch(b).batch.inputs.to_vector<float>());
    const cg::data::Dataset part = dist::shard(bytes, r, 3);
    EXPECT_TRUE(part.holds_bytes());
    EXPECT_EQ(cg::data::float_inputs(part).to_vector<float>(), dist::shard(floats, r, 3).inputs.to_vector<float>());
  }
}
