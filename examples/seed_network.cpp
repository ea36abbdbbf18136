// The seed network: one input, one hidden sigmoid neuron, one sigmoid output, trained by
// gradient descent on a single example. Prints the loss falling and, for the first step, each
// chain-rule factor of dL/dw1 next to the gradient autograd computed.
//
//   z1 = w1 x + b1,  h = σ(z1),  z2 = w2 h + b2,  y = σ(z2),  L = (y - t)^2
//   dL/dw1 = dL/dy · dy/dz2 · dz2/dh · dh/dz1 · dz1/dw1 = 2(y - t) · σ'(z2) · w2 · σ'(z1) · x
#include <chaingrad/chaingrad.hpp>
#include <cstdio>

namespace cg = chaingrad;

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 1000;
  const double lr = 0.5;
  const cg::Tensor x = cg::scalar(0.5), t = cg::scalar(1.0);
  cg::Tensor w1 = cg::scalar(0.3, {.dtype = cg::DType::Float64, .requires_grad = true});
  cg::Tensor b1 = cg::scalar(0.1, {.dtype = cg::DType::Float64, .requires_grad = true});
  cg::Tensor w2 = cg::scalar(-0.4, {.dtype = cg::DType::Float64, .requires_grad = true});
  cg::Tensor b2 = cg::scalar(0.2, {.dtype = cg::DType::Float64, .requires_grad = true});

  for (int step = 0; step <= steps; ++step) {
    const cg::Tensor z1 = w1 * x + b1, h = cg::sigmoid(z1);
    const cg::Tensor z2 = w2 * h + b2, y = cg::sigmoid(z2);
    const cg::Tensor L = cg::pow(y - t, 2);
    L.backward();

    if (step == 0) {
      const double dL_dy = 2 * (y.item() - t.item());
      const double dy_dz2 = y.item() * (1 - y.item());
      const double dz2_dh = w2.item();
      const double dh_dz1 = h.item() * (1 - h.item());
      const double dz1_dw1 = x.item();
      std::printf("chain rule for dL/dw1 at step 0:\n");
      std::printf("  dL/dy   = 2(y - t)  = %+.6f\n", dL_dy);
      std::printf("  dy/dz2  = σ'(z2)    = %+.6f\n", dy_dz2);
      std::printf("  dz2/dh  = w2        = %+.6f\n", dz2_dh);
      std::printf("  dh/dz1  = σ'(z1)    = %+.6f\n", dh_dz1);
      std::printf("  dz1/dw1 = x         = %+.6f\n", dz1_dw1);
      std::printf("  product             = %+.12f\n", dL_dy * dy_dz2 * dz2_dh * dh_dz1 * dz1_dw1);
      std::printf("  autograd dL/dw1     = %+.12f\n\n", w1.grad().item());
    }
    if (step % (steps / 10 > 0 ? steps / 10 : 1) == 0)
      std::printf("step %5d  loss %.8f  y %.6f\n", step, L.item(), y.item());

    cg::NoGradGuard no_grad;  // the update itself is not part of the graph
    for (cg::Tensor* p : {&w1, &b1, &w2, &b2}) {
      p->add_(p->grad(), -lr);
      p->zero_grad();
    }
  }
  return 0;
}
