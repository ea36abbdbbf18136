#include "chaingrad/tensor.hpp"
#include "kernels/cpu/gemm.hpp"
#include "kernels/cpu/parallel.hpp"

namespace chaingrad {

void set_num_threads(int n) { kernels::set_num_threads(n); }
int get_num_threads() { return kernels::num_threads(); }
void warm_up() { kernels::warm_up_gemm(); }

}  // namespace chaingrad
