// Micro-benchmarks of the hot kernels, with GFLOP/s or GB/s counters so a regression shows.
// Peak references for this machine are in BENCHMARKS.md.
#include <benchmark/benchmark.h>

#include "chaingrad/chaingrad.hpp"

namespace cg = chaingrad;

static void BM_Add(benchmark::State& state) {
  const auto n = state.range(0);
  cg::Tensor a = cg::randn({n}), b = cg::randn({n});
  for (auto _ : state) benchmark::DoNotOptimize(cg::add(a, b));
  state.counters["GB/s"] = benchmark::Counter(static_cast<double>(3 * n * 4) * state.iterations(),
                                              benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
}
BENCHMARK(BM_Add)->Arg(1 << 10)->Arg(1 << 16)->Arg(1 << 20);

// p += alpha g in place, as a hand-written SGD update or a gradient summed into a buffer does.
static void BM_AddInplace(benchmark::State& state) {
  const auto n = state.range(0);
  cg::Tensor p = cg::randn({n}), g = cg::randn({n});
  for (auto _ : state) {
    p.add_(g, -1e-3);
    benchmark::ClobberMemory();
  }
  state.counters["GB/s"] = benchmark::Counter(static_cast<double>(3 * n * 4) * state.iterations(),
                                              benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
}
BENCHMARK(BM_AddInplace)->Arg(1 << 16)->Arg(200704)->Arg(1 << 20);

static void BM_BiasAddBroadcast(benchmark::State& state) {
  cg::Tensor a = cg::randn({state.range(0), 256}), b = cg::randn({256});
  for (auto _ : state) benchmark::DoNotOptimize(cg::add(a, b));
  state.counters["GB/s"] = benchmark::Counter(static_cast<double>(2 * a.numel() * 4) * state.iterations(),
                                              benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
}
BENCHMARK(BM_BiasAddBroadcast)->Arg(64)->Arg(1024);

// A strided operand (a transposed view): the run-by-run walk rather than the flat loop.
static void BM_ReluTransposed(benchmark::State& state) {
  cg::Tensor a = cg::randn({state.range(0), 256});
  for (auto _ : state) benchmark::DoNotOptimize(cg::relu(a.t()));
  state.counters["GB/s"] = benchmark::Counter(static_cast<double>(2 * a.numel() * 4) * state.iterations(),
                                              benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
}
BENCHMARK(BM_ReluTransposed)->Arg(64)->Arg(1024);

static void BM_Relu(benchmark::State& state) {
  cg::Tensor a = cg::randn({state.range(0)});
  for (auto _ : state) benchmark::DoNotOptimize(cg::relu(a));
  state.counters["GB/s"] = benchmark::Counter(static_cast<double>(2 * a.numel() * 4) * state.iterations(),
                                              benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
}
BENCHMARK(BM_Relu)->Arg(1 << 16)->Arg(1 << 20);

static void BM_Sum(benchmark::State& state) {
  cg::Tensor a = cg::randn({state.range(0), 256});
  for (auto _ : state) benchmark::DoNotOptimize(cg::sum(a, {0}));
  state.counters["GB/s"] = benchmark::Counter(static_cast<double>(a.numel() * 4) * state.iterations(),
                                              benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
}
BENCHMARK(BM_Sum)->Arg(64)->Arg(1024);

// The MLP's GEMM shapes: forward of layer 1 at batch B ([B,784] x [784,256]^T).
static void BM_Linear(benchmark::State& state) {
  const auto B = state.range(0), in = state.range(1), out = state.range(2);
  cg::Tensor x = cg::randn({B, in}), w = cg::randn({out, in}), b = cg::randn({out});
  for (auto _ : state) benchmark::DoNotOptimize(cg::linear(x, w, b));
  state.counters["GFLOP/s"] = benchmark::Counter(static_cast<double>(2 * B * in * out) * state.iterations(),
                                                 benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
}
BENCHMARK(BM_Linear)->Args({64, 784, 256})->Args({64, 256, 256})->Args({1024, 784, 256})->Args({1024, 256, 10});

static void BM_Matmul(benchmark::State& state) {
  const auto n = state.range(0);
  cg::Tensor a = cg::randn({n, n}), b = cg::randn({n, n});
  for (auto _ : state) benchmark::DoNotOptimize(cg::matmul(a, b));
  state.counters["GFLOP/s"] = benchmark::Counter(static_cast<double>(2 * n * n * n) * state.iterations(),
                                                 benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
}
BENCHMARK(BM_Matmul)->Arg(256)->Arg(1024);

// One forward+backward step of the seed network on 0-d tensors: the per-op overhead.
static void BM_SeedNetworkStep(benchmark::State& state) {
  const cg::TensorOptions rg{.dtype = cg::DType::Float32, .requires_grad = true};
  cg::Tensor w1 = cg::scalar(0.5, rg), b1 = cg::scalar(0.1, rg), w2 = cg::scalar(-0.3, rg), b2 = cg::scalar(0.2, rg);
  const cg::Tensor x = cg::scalar(1.5, {.dtype = cg::DType::Float32}), t = cg::scalar(0.8, {.dtype = cg::DType::Float32});
  for (auto _ : state) {
    cg::Tensor L = cg::pow(cg::sigmoid(w2 * cg::sigmoid(w1 * x + b1) + b2) - t, 2.0);
    L.backward();
    for (cg::Tensor* p : {&w1, &b1, &w2, &b2}) p->zero_grad();
  }
}
BENCHMARK(BM_SeedNetworkStep);

// One SGD step of the 784-256-256-10 MLP at batch 64 (forward, backward, update).
static void BM_MlpStep(benchmark::State& state) {
  const auto B = state.range(0);
  cg::Generator g(0);
  auto param = [&](cg::Dims s) { return (cg::randn(s, {}, &g) * 0.05).detach().requires_grad_(); };
  cg::Tensor w1 = param({256, 784}), b1 = param({256}), w2 = param({256, 256}), b2 = param({256}), w3 = param({10, 256}),
             b3 = param({10});
  cg::Tensor x = cg::rand({B, 784}, {}, &g);
  cg::Tensor y = cg::randint(0, 10, {B}, &g);
  for (auto _ : state) {
    cg::Tensor logits = cg::linear(cg::relu(cg::linear(cg::relu(cg::linear(x, w1, b1)), w2, b2)), w3, b3);
    cg::cross_entropy(logits, y).backward();
    cg::NoGradGuard ng;
    for (cg::Tensor* p : {&w1, &b1, &w2, &b2, &w3, &b3}) {
      p->add_(p->grad(), -0.1);
      p->zero_grad();
    }
  }
  state.SetItemsProcessed(state.iterations() * B);
}
BENCHMARK(BM_MlpStep)->Arg(64)->Arg(256)->Arg(1024);

// One SGD step of the reference CNN at batch B (conv-relu-pool x2, linear-relu-linear).
static void BM_CnnStep(benchmark::State& state) {
  const auto B = state.range(0);
  cg::Generator g(0);
  auto param = [&](cg::Dims s, double scale) { return (cg::randn(s, {}, &g) * scale).detach().requires_grad_(); };
  cg::Tensor c1 = param({32, 1, 3, 3}, 0.3), cb1 = param({32}, 0.01), c2 = param({64, 32, 3, 3}, 0.05),
             cb2 = param({64}, 0.01), w1 = param({128, 3136}, 0.02), b1 = param({128}, 0.01), w2 = param({10, 128}, 0.1),
             b2 = param({10}, 0.01);
  cg::Tensor x = cg::rand({B, 1, 28, 28}, {}, &g);
  cg::Tensor y = cg::randint(0, 10, {B}, &g);
  for (auto _ : state) {
    cg::Tensor h = cg::max_pool2d(cg::relu(cg::conv2d(x, c1, cb1, 1, 1)), 2);
    h = cg::max_pool2d(cg::relu(cg::conv2d(h, c2, cb2, 1, 1)), 2);
    cg::Tensor logits = cg::linear(cg::relu(cg::linear(cg::flatten(h, 1), w1, b1)), w2, b2);
    cg::cross_entropy(logits, y).backward();
    cg::NoGradGuard ng;
    for (cg::Tensor* p : {&c1, &cb1, &c2, &cb2, &w1, &b1, &w2, &b2}) {
      p->add_(p->grad(), -0.01);
      p->zero_grad();
    }
  }
  state.SetItemsProcessed(state.iterations() * B);
}
BENCHMARK(BM_CnnStep)->Arg(64)->Unit(benchmark::kMillisecond);

// The reference CNN's layers one at a time, batch 64, 3x3 kernels with padding 1:
// args (C, H = W, O) = (1, 28, 32) for the first conv layer and (32, 14, 64) for the second.
// GFLOP/s counts 2*N*O*C*9*H*W per product (the forward and each of the two adjoints).
namespace {
struct ConvLayer {
  cg::Tensor x, w, b, g;
  double flops;
};
ConvLayer conv_layer(const benchmark::State& state) {
  const std::int64_t C = state.range(0), H = state.range(1), O = state.range(2), N = 64;
  cg::Generator gen(0);
  return {cg::randn({N, C, H, H}, {}, &gen), cg::randn({O, C, 3, 3}, {}, &gen), cg::randn({O}, {}, &gen),
          cg::randn({N, O, H, H}, {}, &gen), 2.0 * N * O * C * 9 * H * H};
}
void set_gflops(benchmark::State& state, double flops) {
  state.counters["GFLOP/s"] = benchmark::Counter(flops * state.iterations(), benchmark::Counter::kIsRate,
                                                 benchmark::Counter::kIs1000);
}
}  // namespace

static void BM_Conv2dForward(benchmark::State& state) {
  const ConvLayer l = conv_layer(state);
  for (auto _ : state) benchmark::DoNotOptimize(cg::conv2d(l.x, l.w, l.b, 1, 1));
  set_gflops(state, l.flops);
}
BENCHMARK(BM_Conv2dForward)->Args({1, 28, 32})->Args({32, 14, 64})->Unit(benchmark::kMicrosecond);

static void BM_Conv2dBackwardInput(benchmark::State& state) {
  const ConvLayer l = conv_layer(state);
  for (auto _ : state) benchmark::DoNotOptimize(cg::conv2d_backward_input(l.g, l.w, l.x.shape(), 1, 1));
  set_gflops(state, l.flops);
}
BENCHMARK(BM_Conv2dBackwardInput)->Args({1, 28, 32})->Args({32, 14, 64})->Unit(benchmark::kMicrosecond);

static void BM_Conv2dBackwardWeight(benchmark::State& state) {
  const ConvLayer l = conv_layer(state);
  for (auto _ : state) benchmark::DoNotOptimize(cg::conv2d_backward_weight(l.g, l.x, l.w.shape(), 1, 1));
  set_gflops(state, l.flops);
}
BENCHMARK(BM_Conv2dBackwardWeight)->Args({1, 28, 32})->Args({32, 14, 64})->Unit(benchmark::kMicrosecond);

// 2x2 max pooling of the two conv layers' activations, forward and backward (args C, H).
static void BM_MaxPool2d(benchmark::State& state) {
  cg::Tensor x = cg::randn({64, state.range(0), state.range(1), state.range(1)}).requires_grad_();
  cg::Tensor g;
  for (auto _ : state) {
    cg::Tensor y = cg::max_pool2d(x, 2);
    if (!g.defined()) g = cg::randn(y.shape());
    benchmark::DoNotOptimize(cg::autograd::grad({y}, {x}, {g}));
  }
  state.counters["GB/s"] = benchmark::Counter(static_cast<double>(x.numel()) * 4 * 2 * state.iterations(),
                                              benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
}
BENCHMARK(BM_MaxPool2d)->Args({32, 28})->Args({64, 14})->Unit(benchmark::kMicrosecond);

// A shuffled batch out of a Fashion-MNIST-sized training set (60,000 rows of 1x28x28), as
// `chaingrad train` gathers one per step: range(0) = 0 for float32 inputs, 1 for uint8 inputs
// standing for b / 255 (the images as stored in their file); range(1) = batch size.
static void BM_DataLoaderBatch(benchmark::State& state) {
  const bool bytes = state.range(0) == 1;
  const std::int64_t B = state.range(1), rows = 60000;
  cg::Generator gen(11);
  std::vector<double> pixels(static_cast<std::size_t>(rows * 784));
  for (double& p : pixels) p = static_cast<double>(gen.next_u64() % 256);
  cg::data::Dataset ds;
  ds.inputs = cg::from_vector(pixels, {rows, 1, 28, 28}, {.dtype = bytes ? cg::DType::UInt8 : cg::DType::Float32});
  if (!bytes) ds.inputs.mul_(1.0 / 255.0);
  ds.labels = cg::randint(0, 10, {rows}, &gen);
  ds.num_classes = 10;
  cg::data::DataLoader loader(ds, {.batch_size = B, .shuffle = true, .seed = 1});
  std::int64_t i = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(loader.batch(i));
    if (++i == loader.num_batches()) i = 0;
  }
  state.SetLabel(bytes ? "uint8" : "float32");
  state.counters["rows/s"] = benchmark::Counter(static_cast<double>(B) * static_cast<double>(state.iterations()),
                                                benchmark::Counter::kIsRate);
}
BENCHMARK(BM_DataLoaderBatch)->ArgsProduct({{0, 1}, {256, 1024}})->Unit(benchmark::kMicrosecond);

BENCHMARK_MAIN();
