// `chaingrad bench scalar`: the seed network's forward+backward on 0-d tensors, the per-op
// overhead workload of the peers' scalar_autograd (mode fb: forward, backward, reset grads).
#include <chrono>
#include <cstdio>

#include <nlohmann/json.hpp>

#include "chaingrad/chaingrad.hpp"
#include "commands.hpp"

namespace cg = chaingrad;

namespace {
double scalar_us_per_step(long iters, const std::string& mode) {
  const cg::TensorOptions rg{.dtype = cg::DType::Float32, .requires_grad = true};
  cg::Tensor w1 = cg::scalar(0.5, rg), b1 = cg::scalar(0.1, rg), w2 = cg::scalar(-0.3, rg), b2 = cg::scalar(0.2, rg);
  const cg::Tensor x = cg::scalar(1.5, {.dtype = cg::DType::Float32}), t = cg::scalar(0.8, {.dtype = cg::DType::Float32});
  auto forward = [&] {
    const cg::Tensor h = cg::sigmoid(w1 * x + b1);
    const cg::Tensor y = cg::sigmoid(w2 * h + b2);
    return cg::pow(y - t, 2.0);
  };
  // The mode is decided once, so the timed loop compares no strings.
  const bool record = mode != "f_nograd", backward = record && mode != "f", step = mode == "step";
  auto one = [&] {
    if (!record) {
      cg::NoGradGuard ng;
      forward();
      return;
    }
    cg::Tensor L = forward();
    if (!backward) return;
    L.backward();
    if (step) {
      cg::NoGradGuard ng;
      for (cg::Tensor* p : {&w1, &b1, &w2, &b2}) p->add_(p->grad(), -0.1);
    }
    for (cg::Tensor* p : {&w1, &b1, &w2, &b2}) p->zero_grad();
  };
  for (int i = 0; i < 1000; ++i) one();
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < iters; ++i) one();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return s / static_cast<double>(iters) * 1e6;
}
}  // namespace

void add_bench_command(CLI::App& app) {
  auto* bench = app.add_subcommand("bench", "Micro-workloads for side-by-side comparisons (see bench/compare.py)");
  bench->require_subcommand(1);
  auto* scalar = bench->add_subcommand("scalar", "Seed network forward+backward on 0-d tensors");
  struct Opts {
    long iters = 100000;
    std::string mode = "fb";
    bool json = false;
    int threads = 1;
  };
  auto o = std::make_shared<Opts>();
  scalar->add_option("--iters", o->iters, "Timed iterations")->check(CLI::PositiveNumber);
  scalar->add_option("--mode", o->mode, "f_nograd | f | fb | step")->check(CLI::IsMember({"f_nograd", "f", "fb", "step"}));
  scalar->add_option("--threads", o->threads, "Threads")->check(CLI::PositiveNumber);
  scalar->add_flag("--json", o->json, "Print one JSON object");
  scalar->callback([o] {
    cg::set_num_threads(o->threads);
    const double us = scalar_us_per_step(o->iters, o->mode);
    if (o->json)
      std::printf("%s\n", nlohmann::json{{"workload", "scalar"}, {"mode", o->mode}, {"iters", o->iters},
                                         {"us_per_step", us}}.dump().c_str());
    else
      std::printf("scalar seed network, mode %s: %.3f us per step (%ld iterations)\n", o->mode.c_str(), us, o->iters);
  });
}
