// Trains a small convolutional network on Fashion-MNIST with chaingrad's C++ API:
//   conv 3x3 (32) -> ReLU -> maxpool 2 -> conv 3x3 (64) -> ReLU -> maxpool 2 -> flatten
//   -> linear 128 -> ReLU -> dropout 0.25 -> linear 10; Adam, lr 1e-3 cosine-annealed to 0.
// Reaches about 91.8% test accuracy in 5 epochs (measured: 88.9, 90.4, 91.0, 91.8, 91.8), at
// about 1.5 to 2 minutes per epoch on 2 shared cores.
//
// usage: fashion_cnn [epochs=5] [batch_size=64] [data_dir=/usr/share/datasets/fashion-mnist]
#include <chrono>
#include <cstdio>
#include <exception>
#include <string>

#include "chaingrad/chaingrad.hpp"
#include "chaingrad/data.hpp"
#include "chaingrad/nn.hpp"
#include "chaingrad/optim.hpp"

namespace cg = chaingrad;
namespace nn = chaingrad::nn;
namespace optim = chaingrad::optim;

namespace {

double accuracy(nn::Module& model, const cg::data::Dataset& ds) {
  model.eval();  // dropout off
  cg::NoGradGuard no_grad;
  std::int64_t correct = 0;
  const std::int64_t n = ds.size(), chunk = 500;
  for (std::int64_t start = 0; start < n; start += chunk) {
    const std::int64_t end = std::min(n, start + chunk);
    const auto pred = cg::argmax(model(cg::data::float_inputs(ds, start, end)), 1).to_vector<std::int64_t>();
    const auto label = ds.labels.slice(0, start, end).to_vector<std::int64_t>();
    for (std::size_t i = 0; i < pred.size(); ++i) correct += pred[i] == label[i];
  }
  model.train();
  return static_cast<double>(correct) / static_cast<double>(n);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const int epochs = argc > 1 ? std::stoi(argv[1]) : 5;
    const std::int64_t batch_size = argc > 2 ? std::stoll(argv[2]) : 64;
    const std::string dir = argc > 3 ? argv[3] : cg::data::kFashionMnistDir;

    // The images stay bytes; batches come out as standardized float32 (fashion_mlp.cpp says more).
    cg::data::Dataset train = cg::data::load_idx(dir, /*train=*/true, /*keep_bytes=*/true);
    cg::data::Dataset test = cg::data::load_idx(dir, /*train=*/false, /*keep_bytes=*/true);
    const cg::data::Normalization norm = cg::data::compute_normalization(train);
    cg::data::normalize_(train, norm);
    cg::data::normalize_(test, norm);

    // The same network as `chaingrad train --model "conv2d(32,3,pad=1) relu maxpool2d(2)
    // conv2d(64,3,pad=1) relu maxpool2d(2) flatten linear(128) relu dropout(0.25) linear(10)"`,
    // built layer by layer; nn::build_model(spec, {1, 28, 28}, seed) gives the same structure.
    cg::Generator gen(42);
    nn::Sequential model{
        nn::Conv2d({.in = 1, .out = 32, .kernel = 3, .padding = 1}, &gen),   // 0: [N, 32, 28, 28]
        nn::ReLU(),                                                          // 1
        nn::MaxPool2d(2),                                                    // 2: [N, 32, 14, 14]
        nn::Conv2d({.in = 32, .out = 64, .kernel = 3, .padding = 1}, &gen),  // 3: [N, 64, 14, 14]
        nn::ReLU(),                                                          // 4
        nn::MaxPool2d(2),                                                    // 5: [N, 64, 7, 7]
        nn::Flatten(),                                                       // 6: [N, 3136]
        nn::Linear(64 * 7 * 7, 128, true, &gen),                             // 7
        nn::ReLU(),                                                          // 8
        nn::Dropout(0.25, &gen),                                             // 9
        nn::Linear(128, 10, true, &gen),                                     // 10
    };
    std::printf("%s\n%lld parameters\n", model.describe().c_str(), static_cast<long long>(model.num_parameters()));

    optim::Adam opt(model.parameters(), {.lr = 1e-3});
    cg::data::DataLoader loader(train, {.batch_size = batch_size, .shuffle = true, .seed = 0});
    // The lr follows a cosine from 1e-3 down to 0 over the whole run, stepped once per batch.
    optim::CosineAnnealingLR schedule(opt, epochs * loader.num_batches());

    for (int epoch = 0; epoch < epochs; ++epoch) {
      const auto t0 = std::chrono::steady_clock::now();
      loader.set_epoch(epoch);
      double loss_sum = 0.0;
      std::int64_t batches = 0;
      for (const cg::data::Batch& batch : loader) {
        const cg::Tensor loss = cg::cross_entropy(model(batch.inputs), batch.labels);
        opt.zero_grad();
        loss.backward();
        opt.step();
        schedule.step();
        loss_sum += loss.item();
        if (++batches % 100 == 0) {
          std::printf("\r  batch %lld/%lld  loss %.4f", static_cast<long long>(batches),
                      static_cast<long long>(loader.num_batches()), loss_sum / static_cast<double>(batches));
          std::fflush(stdout);
        }
      }
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("\repoch %d/%d  loss %.4f  test accuracy %.2f%%  (%.1f s)\n", epoch + 1, epochs,
                  loss_sum / static_cast<double>(batches), 100.0 * accuracy(model, test), seconds);
      std::fflush(stdout);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
