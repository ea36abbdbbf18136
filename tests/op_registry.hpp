#pragma once
// The op registry: one entry per differentiable op of ops.hpp. tests/test_op_registry.cpp walks it
// (first- and second-order gradcheck, generated variants) and fails when ops.hpp declares an op
// that has no entry here.
#include <string>
#include <vector>

#include "gradcheck.hpp"

namespace chaingrad::testing {

struct OpCase {
  std::string name;           // the op's name in ops.hpp
  std::vector<Dims> shapes;   // one per tensor input; all inputs are float64 and require grad
  OpFn fn;                    // inputs -> output
  double lo = -2.0, hi = 2.0; // sampling range of the inputs
  std::vector<double> kinks;  // values where the op is not differentiable; inputs are kept 0.05 away
  bool second_order = true;   // also run gradgradcheck
  std::string note;           // which variant this entry covers (broadcast, keepdim, ...)
  double eps = 1e-6;          // finite-difference step
  double atol = 1e-6;         // absolute tolerance of the first-order check
};

const std::vector<OpCase>& op_registry();

// Samples the inputs of a case (deterministic per seed), moved away from kinks.
std::vector<Tensor> sample_inputs(const OpCase& c, std::uint64_t seed);

}  // namespace chaingrad::testing
