// Trains y = 3x - 1 with a Linear layer through the installed headers and library.
#include <chaingrad/chaingrad.hpp>
#include <cmath>
#include <cstdio>

namespace cg = chaingrad;

int main() {
  cg::Generator gen(1);
  cg::nn::Linear layer(1, 1, true, &gen);
  cg::optim::SGD opt(layer.parameters(), {.lr = 0.1});
  const cg::Tensor x = cg::linspace(-1, 1, 32).reshape({32, 1});
  const cg::Tensor y = x * 3.0 - 1.0;
  double loss = 0;
  for (int i = 0; i < 300; ++i) {
    const cg::Tensor l = cg::mse_loss(layer(x), y);
    opt.zero_grad();
    l.backward();
    opt.step();
    loss = l.item();
  }
  std::printf("loss %.3g, w %.4f, b %.4f\n", loss, layer.weight.item(), layer.bias.item());
  return loss < 1e-6 && std::abs(layer.weight.item() - 3.0) < 1e-3 ? 0 : 1;
}
