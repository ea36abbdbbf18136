#pragma once
// Gradient checking against central finite differences, in float64.
#include <functional>
#include <string>
#include <vector>

#include "chaingrad/chaingrad.hpp"

namespace chaingrad::testing {

using OpFn = std::function<Tensor(const std::vector<Tensor>&)>;

struct GradcheckOptions {
  double eps = 1e-6;
  double atol = 1e-6;
  double rtol = 1e-4;
  std::uint64_t seed = 1234;
};

// First order: the gradient of sum(f(x) * r) for a random r, from autograd, against central
// differences for every element of every input that requires grad. Returns "" on success,
// otherwise a description of the first mismatch.
std::string gradcheck(const OpFn& f, const std::vector<Tensor>& inputs, GradcheckOptions opt = {});

// Second order: the gradient of sum_i <grad_i(x), v_i> (first-order gradients built with
// create_graph) against central differences of that same quantity.
std::string gradgradcheck(const OpFn& f, const std::vector<Tensor>& inputs, GradcheckOptions opt = {});

// Compares analytic gradients (zeros where undefined) with central differences of `scalar`, for
// every element of every tensor in `wrt`. Returns "" or the first mismatch, named with `what`.
std::string compare_with_finite_differences(const std::function<double()>& scalar, const std::vector<Tensor>& wrt,
                                            const std::vector<Tensor>& analytic, const GradcheckOptions& opt,
                                            const char* what);

// Reference to element k (row-major logical order) of a float64 tensor of any strides.
double& element(const Tensor& t, std::int64_t k);

}  // namespace chaingrad::testing
