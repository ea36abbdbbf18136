// The hot kernels of the reference workloads, chaingrad against libtorch (the peer) in one process,
// both on one thread by default, so each ratio compares kernels and per-op overhead, not threading;
// --threads=N gives both sides N threads (the ceilings are then left out: they are one thread's).
// Repetitions are randomly interleaved (A B B A ...), and the table at the end gives each side's
// median, the ratio, and chaingrad's GB/s or GFLOP/s next to the ceiling measured in the same run
// (memcpy bandwidth at the kernel's footprint, or the FMA peak).
//
//   cmake -S . -B build -DCHAINGRAD_BENCH_LIBTORCH=ON && cmake --build build --target bench_vs_libtorch
//   build/bench/bench_vs_libtorch [--threads=N] [--benchmark_repetitions=5] [--benchmark_filter=...]
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "chaingrad/chaingrad.hpp"
#include "peaks.hpp"

namespace cg = chaingrad;

extern "C" void openblas_set_num_threads(int);

namespace {

enum class Bound { Memory, Compute, Overhead };

struct Case {
  std::string name;
  Bound bound;
  double work;  // bytes moved (Memory), flops (Compute), or ops per iteration (Overhead)
  std::function<void(benchmark::State&)> chaingrad, libtorch;
};

constexpr std::int64_t kM = std::int64_t{1} << 20;

// The seed network of the scalar workload: forward, backward, reset of the four parameters.
void seed_step_chaingrad(benchmark::State& state) {
  const cg::TensorOptions rg{.dtype = cg::DType::Float32, .requires_grad = true};
  cg::Tensor w1 = cg::scalar(0.5, rg), b1 = cg::scalar(0.1, rg), w2 = cg::scalar(-0.3, rg), b2 = cg::scalar(0.2, rg);
  const cg::Tensor x = cg::scalar(1.5, {.dtype = cg::DType::Float32}), t = cg::scalar(0.8, {.dtype = cg::DType::Float32});
  for (auto _ : state) {
    cg::pow(cg::sigmoid(w2 * cg::sigmoid(w1 * x + b1) + b2) - t, 2.0).backward();
    for (cg::Tensor* p : {&w1, &b1, &w2, &b2}) p->zero_grad();
  }
}
void seed_step_libtorch(benchmark::State& state) {
  const auto rg = torch::TensorOptions().requires_grad(true);
  torch::Tensor w1 = torch::tensor(0.5f, rg), b1 = torch::tensor(0.1f, rg), w2 = torch::tensor(-0.3f, rg),
                b2 = torch::tensor(0.2f, rg);
  const torch::Tensor x = torch::tensor(1.5f), t = torch::tensor(0.8f);
  for (auto _ : state) {
    (torch::sigmoid(w2 * torch::sigmoid(w1 * x + b1) + b2) - t).pow(2).backward();
    for (torch::Tensor* p : {&w1, &b1, &w2, &b2}) p->mutable_grad() = torch::Tensor();
  }
}

// One SGD step of the 784-256-256-10 MLP at batch 64.
void mlp_step_chaingrad(benchmark::State& state) {
  cg::Generator g(0);
  auto param = [&](cg::Dims s) { return (cg::randn(s, {}, &g) * 0.05).detach().requires_grad_(); };
  cg::Tensor w1 = param({256, 784}), b1 = param({256}), w2 = param({256, 256}), b2 = param({256}),
             w3 = param({10, 256}), b3 = param({10});
  const cg::Tensor x = cg::rand({64, 784}, {}, &g), y = cg::randint(0, 10, {64}, &g);
  for (auto _ : state) {
    const cg::Tensor h = cg::relu(cg::linear(cg::relu(cg::linear(x, w1, b1)), w2, b2));
    cg::cross_entropy(cg::linear(h, w3, b3), y).backward();
    cg::NoGradGuard ng;
    for (cg::Tensor* p : {&w1, &b1, &w2, &b2, &w3, &b3}) {
      p->add_(p->grad(), -0.1);
      p->zero_grad();
    }
  }
}
void mlp_step_libtorch(benchmark::State& state) {
  torch::manual_seed(0);
  auto param = [](std::vector<std::int64_t> s) { return (torch::randn(s) * 0.05).requires_grad_(); };
  torch::Tensor w1 = param({256, 784}), b1 = param({256}), w2 = param({256, 256}), b2 = param({256}),
                w3 = param({10, 256}), b3 = param({10});
  const torch::Tensor x = torch::rand({64, 784}), y = torch::randint(0, 10, {64});
  for (auto _ : state) {
    const torch::Tensor h = torch::relu(torch::linear(torch::relu(torch::linear(x, w1, b1)), w2, b2));
    torch::nn::functional::cross_entropy(torch::linear(h, w3, b3), y).backward();
    torch::NoGradGuard ng;
    for (torch::Tensor* p : {&w1, &b1, &w2, &b2, &w3, &b3}) {
      p->add_(p->grad(), -0.1);
      p->mutable_grad() = torch::Tensor();
    }
  }
}

std::vector<Case> cases() {
  std::vector<Case> c;
  // Memory-bound elementwise and reduction kernels (bytes = operands read + result written).
  c.push_back({"add_1M", Bound::Memory, 12.0 * kM,
               [](benchmark::State& s) {
                 const cg::Tensor a = cg::randn({kM}), b = cg::randn({kM});
                 for (auto _ : s) benchmark::DoNotOptimize(cg::add(a, b));
               },
               [](benchmark::State& s) {
                 const torch::Tensor a = torch::randn({kM}), b = torch::randn({kM});
                 for (auto _ : s) benchmark::DoNotOptimize(torch::add(a, b));
               }});
  c.push_back({"bias_add_1024x256", Bound::Memory, 8.0 * 1024 * 256,
               [](benchmark::State& s) {
                 const cg::Tensor a = cg::randn({1024, 256}), b = cg::randn({256});
                 for (auto _ : s) benchmark::DoNotOptimize(cg::add(a, b));
               },
               [](benchmark::State& s) {
                 const torch::Tensor a = torch::randn({1024, 256}), b = torch::randn({256});
                 for (auto _ : s) benchmark::DoNotOptimize(torch::add(a, b));
               }});
  c.push_back({"relu_1M", Bound::Memory, 8.0 * kM,
               [](benchmark::State& s) {
                 const cg::Tensor a = cg::randn({kM});
                 for (auto _ : s) benchmark::DoNotOptimize(cg::relu(a));
               },
               [](benchmark::State& s) {
                 const torch::Tensor a = torch::randn({kM});
                 for (auto _ : s) benchmark::DoNotOptimize(torch::relu(a));
               }});
  // Forward and backward through autograd: the relu mask pass and the graph around it.
  c.push_back({"relu_fwd_bwd_1M", Bound::Memory, 20.0 * kM,
               [](benchmark::State& s) {
                 cg::Tensor a = cg::randn({kM}).requires_grad_();
                 const cg::Tensor g = cg::randn({kM});
                 for (auto _ : s) {
                   cg::relu(a).backward(g);
                   a.zero_grad();
                 }
               },
               [](benchmark::State& s) {
                 torch::Tensor a = torch::randn({kM}).requires_grad_();
                 const torch::Tensor g = torch::randn({kM});
                 for (auto _ : s) {
                   torch::relu(a).backward(g);
                   a.mutable_grad() = torch::Tensor();
                 }
               }});
  c.push_back({"sigmoid_1M", Bound::Memory, 8.0 * kM,
               [](benchmark::State& s) {
                 const cg::Tensor a = cg::randn({kM});
                 for (auto _ : s) benchmark::DoNotOptimize(cg::sigmoid(a));
               },
               [](benchmark::State& s) {
                 const torch::Tensor a = torch::randn({kM});
                 for (auto _ : s) benchmark::DoNotOptimize(torch::sigmoid(a));
               }});
  c.push_back({"sum_dim0_1024x256", Bound::Memory, 4.0 * 1024 * 256,
               [](benchmark::State& s) {
                 const cg::Tensor a = cg::randn({1024, 256});
                 for (auto _ : s) benchmark::DoNotOptimize(cg::sum(a, {0}));
               },
               [](benchmark::State& s) {
                 const torch::Tensor a = torch::randn({1024, 256});
                 for (auto _ : s) benchmark::DoNotOptimize(a.sum(0));
               }});
  c.push_back({"cross_entropy_1024x10", Bound::Memory, 4.0 * 1024 * 10,
               [](benchmark::State& s) {
                 const cg::Tensor a = cg::randn({1024, 10}), y = cg::randint(0, 10, {1024});
                 for (auto _ : s) benchmark::DoNotOptimize(cg::cross_entropy(a, y));
               },
               [](benchmark::State& s) {
                 const torch::Tensor a = torch::randn({1024, 10}), y = torch::randint(0, 10, {1024});
                 for (auto _ : s) benchmark::DoNotOptimize(torch::nn::functional::cross_entropy(a, y));
               }});
  c.push_back({"exp_1M", Bound::Memory, 8.0 * kM,
               [](benchmark::State& s) {
                 const cg::Tensor a = cg::randn({kM});
                 for (auto _ : s) benchmark::DoNotOptimize(cg::exp(a));
               },
               [](benchmark::State& s) {
                 const torch::Tensor a = torch::randn({kM});
                 for (auto _ : s) benchmark::DoNotOptimize(torch::exp(a));
               }});
  c.push_back({"tanh_1M", Bound::Memory, 8.0 * kM,
               [](benchmark::State& s) {
                 const cg::Tensor a = cg::randn({kM});
                 for (auto _ : s) benchmark::DoNotOptimize(cg::tanh(a));
               },
               [](benchmark::State& s) {
                 const torch::Tensor a = torch::randn({kM});
                 for (auto _ : s) benchmark::DoNotOptimize(torch::tanh(a));
               }});
  c.push_back({"gelu_1M", Bound::Memory, 8.0 * kM,
               [](benchmark::State& s) {
                 const cg::Tensor a = cg::randn({kM});
                 for (auto _ : s) benchmark::DoNotOptimize(cg::gelu(a));
               },
               [](benchmark::State& s) {
                 const torch::Tensor a = torch::randn({kM});
                 for (auto _ : s) benchmark::DoNotOptimize(torch::gelu(a));
               }});
  // Forward, then the fused backward's one pass over x and the incoming gradient.
  c.push_back({"gelu_fwd_bwd_1M", Bound::Memory, 20.0 * kM,
               [](benchmark::State& s) {
                 cg::Tensor a = cg::randn({kM}).requires_grad_();
                 const cg::Tensor g = cg::randn({kM});
                 for (auto _ : s) {
                   cg::gelu(a).backward(g);
                   a.zero_grad();
                 }
               },
               [](benchmark::State& s) {
                 torch::Tensor a = torch::randn({kM}).requires_grad_();
                 const torch::Tensor g = torch::randn({kM});
                 for (auto _ : s) {
                   torch::gelu(a).backward(g);
                   a.mutable_grad() = torch::Tensor();
                 }
               }});
  c.push_back({"softmax_1024x1000", Bound::Memory, 8.0 * 1024 * 1000,
               [](benchmark::State& s) {
                 const cg::Tensor a = cg::randn({1024, 1000});
                 for (auto _ : s) benchmark::DoNotOptimize(cg::softmax(a, 1));
               },
               [](benchmark::State& s) {
                 const torch::Tensor a = torch::randn({1024, 1000});
                 for (auto _ : s) benchmark::DoNotOptimize(torch::softmax(a, 1));
               }});
  c.push_back({"mean_var_dim1_1024x1024", Bound::Memory, 8.0 * kM,
               [](benchmark::State& s) {
                 const cg::Tensor a = cg::randn({1024, 1024});
                 for (auto _ : s) {
                   benchmark::DoNotOptimize(cg::mean(a, {1}));
                   benchmark::DoNotOptimize(cg::var(a, {1}));
                 }
               },
               [](benchmark::State& s) {
                 const torch::Tensor a = torch::randn({1024, 1024});
                 for (auto _ : s) {
                   benchmark::DoNotOptimize(a.mean(1));
                   benchmark::DoNotOptimize(a.var(1));
                 }
               }});
  c.push_back({"transpose_copy_1024x1024", Bound::Memory, 8.0 * kM,
               [](benchmark::State& s) {
                 const cg::Tensor a = cg::randn({1024, 1024});
                 for (auto _ : s) benchmark::DoNotOptimize(a.t().contiguous());
               },
               [](benchmark::State& s) {
                 const torch::Tensor a = torch::randn({1024, 1024});
                 for (auto _ : s) benchmark::DoNotOptimize(a.t().contiguous());
               }});
  c.push_back({"index_select_1024_of_10000x128", Bound::Memory, 8.0 * 1024 * 128,
               [](benchmark::State& s) {
                 const cg::Tensor a = cg::randn({10000, 128}), i = cg::randint(0, 10000, {1024});
                 for (auto _ : s) benchmark::DoNotOptimize(cg::index_select(a, 0, i));
               },
               [](benchmark::State& s) {
                 const torch::Tensor a = torch::randn({10000, 128}), i = torch::randint(0, 10000, {1024});
                 for (auto _ : s) benchmark::DoNotOptimize(torch::index_select(a, 0, i));
               }});
  // An embedding's backward: 1024 rows of gradient added into a 10000 x 128 table (repeats add up).
  c.push_back({"index_add_1024_into_10000x128", Bound::Memory, 4.0 * 10000 * 128 * 2 + 8.0 * 1024 * 128,
               [](benchmark::State& s) {
                 const cg::Tensor a = cg::zeros({10000, 128}), g = cg::randn({1024, 128});
                 const cg::Tensor i = cg::randint(0, 10000, {1024});
                 for (auto _ : s) benchmark::DoNotOptimize(cg::index_add(a, 0, i, g));
               },
               [](benchmark::State& s) {
                 const torch::Tensor a = torch::zeros({10000, 128}), g = torch::randn({1024, 128});
                 const torch::Tensor i = torch::randint(0, 10000, {1024});
                 for (auto _ : s) benchmark::DoNotOptimize(a.index_add(0, i, g));
               }});
  c.push_back({"argmax_dim1_1024x1000", Bound::Memory, 4.0 * 1024 * 1000,
               [](benchmark::State& s) {
                 const cg::Tensor a = cg::randn({1024, 1000});
                 for (auto _ : s) benchmark::DoNotOptimize(cg::argmax(a, 1));
               },
               [](benchmark::State& s) {
                 const torch::Tensor a = torch::randn({1024, 1000});
                 for (auto _ : s) benchmark::DoNotOptimize(a.argmax(1));
               }});
  c.push_back({"layer_norm_1024x256", Bound::Memory, 8.0 * 1024 * 256,
               [](benchmark::State& s) {
                 cg::nn::LayerNorm ln(256);
                 const cg::Tensor a = cg::randn({1024, 256});
                 cg::NoGradGuard ng;
                 for (auto _ : s) benchmark::DoNotOptimize(ln.forward(a));
               },
               [](benchmark::State& s) {
                 torch::nn::LayerNorm ln(torch::nn::LayerNormOptions({256}));
                 const torch::Tensor a = torch::randn({1024, 256});
                 torch::NoGradGuard ng;
                 for (auto _ : s) benchmark::DoNotOptimize(ln->forward(a));
               }});
  c.push_back({"batch_norm_train_64x32x28x28", Bound::Memory, 8.0 * 64 * 32 * 28 * 28,
               [](benchmark::State& s) {
                 cg::nn::BatchNorm2d bn(32);
                 const cg::Tensor a = cg::randn({64, 32, 28, 28});
                 cg::NoGradGuard ng;
                 for (auto _ : s) benchmark::DoNotOptimize(bn.forward(a));
               },
               [](benchmark::State& s) {
                 torch::nn::BatchNorm2d bn(32);
                 const torch::Tensor a = torch::randn({64, 32, 28, 28});
                 torch::NoGradGuard ng;
                 for (auto _ : s) benchmark::DoNotOptimize(bn->forward(a));
               }});
  // One Adam step over the MLP's 235k parameters (gradients fixed).
  c.push_back({"adam_step_mlp_params", Bound::Memory, 4.0 * 7 * (784 * 256 + 256 + 256 * 256 + 256 + 2560 + 10),
               [](benchmark::State& s) {
                 std::vector<cg::Tensor> ps;
                 for (const cg::Dims& d : {cg::Dims{256, 784}, cg::Dims{256}, cg::Dims{256, 256}, cg::Dims{256},
                                           cg::Dims{10, 256}, cg::Dims{10}}) {
                   ps.push_back(cg::randn(d).requires_grad_());
                   ps.back().set_grad(cg::randn(d));
                 }
                 cg::optim::Adam opt(ps);
                 for (auto _ : s) opt.step();
               },
               [](benchmark::State& s) {
                 std::vector<torch::Tensor> ps;
                 for (const auto& d : std::vector<std::vector<std::int64_t>>{{256, 784}, {256}, {256, 256}, {256}, {10, 256}, {10}}) {
                   ps.push_back(torch::randn(d).requires_grad_());
                   ps.back().mutable_grad() = torch::randn(d);
                 }
                 torch::optim::Adam opt(ps);
                 for (auto _ : s) opt.step();
               }});
  c.push_back({"max_pool2d_64x32x28x28", Bound::Memory, 4.0 * 64 * 32 * 28 * 28 * 1.25,
               [](benchmark::State& s) {
                 const cg::Tensor a = cg::randn({64, 32, 28, 28});
                 for (auto _ : s) benchmark::DoNotOptimize(cg::max_pool2d(a, 2));
               },
               [](benchmark::State& s) {
                 const torch::Tensor a = torch::randn({64, 32, 28, 28});
                 for (auto _ : s) benchmark::DoNotOptimize(torch::max_pool2d(a, 2));
               }});
  // Compute-bound products.
  c.push_back({"linear_1024x784x256", Bound::Compute, 2.0 * 1024 * 784 * 256,
               [](benchmark::State& s) {
                 const cg::Tensor x = cg::randn({1024, 784}), w = cg::randn({256, 784}), b = cg::randn({256});
                 for (auto _ : s) benchmark::DoNotOptimize(cg::linear(x, w, b));
               },
               [](benchmark::State& s) {
                 const torch::Tensor x = torch::randn({1024, 784}), w = torch::randn({256, 784}), b = torch::randn({256});
                 for (auto _ : s) benchmark::DoNotOptimize(torch::linear(x, w, b));
               }});
  c.push_back({"matmul_256", Bound::Compute, 2.0 * 256 * 256 * 256,
               [](benchmark::State& s) {
                 const cg::Tensor a = cg::randn({256, 256}), b = cg::randn({256, 256});
                 for (auto _ : s) benchmark::DoNotOptimize(cg::matmul(a, b));
               },
               [](benchmark::State& s) {
                 const torch::Tensor a = torch::randn({256, 256}), b = torch::randn({256, 256});
                 for (auto _ : s) benchmark::DoNotOptimize(torch::matmul(a, b));
               }});
  c.push_back({"bmm_32x64x64", Bound::Compute, 2.0 * 32 * 64 * 64 * 64,
               [](benchmark::State& s) {
                 const cg::Tensor a = cg::randn({32, 64, 64}), b = cg::randn({32, 64, 64});
                 for (auto _ : s) benchmark::DoNotOptimize(cg::bmm(a, b));
               },
               [](benchmark::State& s) {
                 const torch::Tensor a = torch::randn({32, 64, 64}), b = torch::randn({32, 64, 64});
                 for (auto _ : s) benchmark::DoNotOptimize(torch::bmm(a, b));
               }});
  // The CNN's second convolution: [64, 32, 14, 14] -> 64 channels, 3x3, padding 1.
  c.push_back({"conv2d_64x32x14x14_to_64", Bound::Compute, 2.0 * 64 * 64 * 32 * 9 * 14 * 14,
               [](benchmark::State& s) {
                 const cg::Tensor x = cg::randn({64, 32, 14, 14}), w = cg::randn({64, 32, 3, 3}), b = cg::randn({64});
                 for (auto _ : s) benchmark::DoNotOptimize(cg::conv2d(x, w, b, 1, 1));
               },
               [](benchmark::State& s) {
                 const torch::Tensor x = torch::randn({64, 32, 14, 14}), w = torch::randn({64, 32, 3, 3}),
                                     b = torch::randn({64});
                 for (auto _ : s) benchmark::DoNotOptimize(torch::conv2d(x, w, b, 1, 1));
               }});
  // Per-op overhead on 0-d tensors: outside any graph, and recorded for backward.
  c.push_back({"mul_0d", Bound::Overhead, 1,
               [](benchmark::State& s) {
                 const cg::Tensor a = cg::scalar(1.5, {.dtype = cg::DType::Float32}), b = cg::scalar(0.5, {.dtype = cg::DType::Float32});
                 for (auto _ : s) benchmark::DoNotOptimize(cg::mul(a, b));
               },
               [](benchmark::State& s) {
                 const torch::Tensor a = torch::tensor(1.5f), b = torch::tensor(0.5f);
                 for (auto _ : s) benchmark::DoNotOptimize(torch::mul(a, b));
               }});
  c.push_back({"mul_0d_recorded", Bound::Overhead, 1,
               [](benchmark::State& s) {
                 const cg::Tensor a = cg::scalar(1.5, {.dtype = cg::DType::Float32, .requires_grad = true}),
                                  b = cg::scalar(0.5, {.dtype = cg::DType::Float32});
                 for (auto _ : s) benchmark::DoNotOptimize(cg::mul(a, b));
               },
               [](benchmark::State& s) {
                 const torch::Tensor a = torch::tensor(1.5f, torch::TensorOptions().requires_grad(true)),
                                     b = torch::tensor(0.5f);
                 for (auto _ : s) benchmark::DoNotOptimize(torch::mul(a, b));
               }});
  c.push_back({"seed_network_step", Bound::Overhead, 8, seed_step_chaingrad, seed_step_libtorch});
  c.push_back({"mlp_step_b64", Bound::Compute, 2.0 * 64 * (784 * 256 + 256 * 256 + 256 * 10) * 3 - 2.0 * 64 * 784 * 256,
               mlp_step_chaingrad, mlp_step_libtorch});
  return c;
}

// Keeps each benchmark's median (the aggregate over the interleaved repetitions) as it is printed.
class MedianCollector : public benchmark::ConsoleReporter {
 public:
  std::map<std::string, double> median_us, single_us;
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& r : runs) {
      const std::string name = r.run_name.function_name;
      if (r.run_type == Run::RT_Aggregate && r.aggregate_name == "median")
        median_us[name] = r.GetAdjustedRealTime();
      else if (r.run_type == Run::RT_Iteration)
        single_us[name] = r.GetAdjustedRealTime();  // with one repetition there is no aggregate
    }
    ConsoleReporter::ReportRuns(runs);
  }
  double time_us(const std::string& name) const {
    if (auto it = median_us.find(name); it != median_us.end()) return it->second;
    if (auto it = single_us.find(name); it != single_us.end()) return it->second;
    return 0;
  }
};

}  // namespace

int main(int argc, char** argv) {
  // Defaults that make the comparison fair on a noisy machine; flags given later win.
  std::vector<char*> args(argv, argv + argc);
  // --threads=N (ours, not Google Benchmark's): both sides on N threads; one by default.
  int threads = 1;
  for (auto it = args.begin() + 1; it != args.end();) {
    const std::string a = *it;
    if (a.rfind("--threads=", 0) != 0) {
      ++it;
      continue;
    }
    char* end = nullptr;
    const long t = std::strtol(a.c_str() + 10, &end, 10);
    if (end == a.c_str() + 10 || *end != '\0' || t < 1 || t > 256) {
      std::fprintf(stderr, "bench_vs_libtorch: --threads expects a whole number from 1 to 256; got '%s'\n", a.c_str() + 10);
      return 2;
    }
    threads = static_cast<int>(t);
    it = args.erase(it);
  }
  std::string reps = "--benchmark_repetitions=5", interleave = "--benchmark_enable_random_interleaving=true";
  args.insert(args.begin() + 1, {reps.data(), interleave.data()});
  int n = static_cast<int>(args.size());
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;

  cg::set_num_threads(threads);
  torch::set_num_threads(threads);
  openblas_set_num_threads(threads);  // libtorch's products run on OpenBLAS, which has threads of its own
  const double fma_peak = bench::fma_peak_gflops();

  const std::vector<Case> all = cases();
  for (const Case& c : all) {
    benchmark::RegisterBenchmark((c.name + "/chaingrad").c_str(), c.chaingrad)->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark((c.name + "/libtorch").c_str(), c.libtorch)->Unit(benchmark::kMicrosecond);
  }
  MedianCollector reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);

  std::printf("\n%d thread%s each; ratio = libtorch time / chaingrad time (> 1: chaingrad is faster).\n", threads,
              threads == 1 ? "" : "s");
  std::printf("FMA peak (1 thread): %.1f GFLOP/s. Memory-bound rows: memcpy at the same footprint.\n\n", fma_peak);
  std::printf("| kernel | chaingrad µs | libtorch µs | ratio | chaingrad rate | of ceiling |\n");
  std::printf("|---|---:|---:|---:|---:|---:|\n");
  for (const Case& c : all) {
    const double a = reporter.time_us(c.name + "/chaingrad"), b = reporter.time_us(c.name + "/libtorch");
    if (a <= 0 || b <= 0) continue;  // filtered out
    char rate[64] = "-", ceiling[32] = "-";
    if (c.bound == Bound::Memory) {
      const double gbs = c.work / (a * 1e-6) / 1e9;
      std::snprintf(rate, sizeof rate, "%.1f GB/s", gbs);
      if (threads == 1)
        std::snprintf(ceiling, sizeof ceiling, "%.0f%%",
                      100 * gbs / bench::copy_bandwidth_gbs(static_cast<std::size_t>(c.work)));
    } else if (c.bound == Bound::Compute) {
      const double gflops = c.work / (a * 1e-6) / 1e9;
      std::snprintf(rate, sizeof rate, "%.1f GFLOP/s", gflops);
      if (threads == 1) std::snprintf(ceiling, sizeof ceiling, "%.0f%%", 100 * gflops / fma_peak);
    } else {
      std::snprintf(rate, sizeof rate, "%.0f ns/op", a * 1e3 / c.work);
    }
    std::printf("| %s | %.3f | %.3f | %.2f | %s | %s |\n", c.name.c_str(), a, b, b / a, rate, ceiling);
  }
  benchmark::Shutdown();
  return 0;
}
