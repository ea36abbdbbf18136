// Walks the op registry: every op is gradient-checked (first and second order) on its own
// samples and on generated variants: non-contiguous inputs, the same tensor passed twice, mixed
// requires_grad, and a float32 forward that must agree with float64.
#include <gtest/gtest.h>

#include <fstream>
#include <regex>
#include <set>
#include <sstream>

#include "op_registry.hpp"

namespace chaingrad::testing {
namespace {

// Same values, non-contiguous layout: a transposed buffer for 2+ dims, every other element for 1-D.
Tensor non_contiguous_copy(const Tensor& t) {
  NoGradGuard ng;
  Tensor r;
  if (t.dim() >= 2) {
    r = contiguous(transpose(t, -1, -2)).transpose(-1, -2);
  } else if (t.dim() == 1) {
    Tensor big = zeros({t.shape()[0] * 2}, {.dtype = t.dtype()});
    r = big.slice(0, 0, t.shape()[0] * 2, 2);
    r.copy_(t);
  } else {
    return t;
  }
  r = r.detach();
  r.requires_grad_(t.requires_grad());
  return r;
}

class OpRegistryTest : public ::testing::TestWithParam<std::size_t> {
 protected:
  const OpCase& op() const { return op_registry()[GetParam()]; }
  GradcheckOptions options() const { return {.eps = op().eps, .atol = op().atol}; }
};

TEST_P(OpRegistryTest, FirstOrder) {
  const auto inputs = sample_inputs(op(), 42 + GetParam());
  EXPECT_EQ(gradcheck(op().fn, inputs, options()), "") << op().name << " " << op().note;
}

TEST_P(OpRegistryTest, SecondOrder) {
  if (!op().second_order) GTEST_SKIP() << op().name << " is not twice differentiable in its registry entry";
  const auto inputs = sample_inputs(op(), 42 + GetParam());
  EXPECT_EQ(gradgradcheck(op().fn, inputs, {.eps = 1e-5, .atol = 1e-5, .rtol = 1e-3}), "")
      << op().name << " " << op().note;
}

TEST_P(OpRegistryTest, NonContiguousInputs) {
  auto inputs = sample_inputs(op(), 42 + GetParam());
  const Tensor expected = [&] {
    NoGradGuard ng;
    return op().fn(inputs).detach();
  }();
  for (auto& t : inputs) t = non_contiguous_copy(t);
  {
    NoGradGuard ng;
    const Tensor got = op().fn(inputs);
    EXPECT_TRUE(allclose(got, expected, 1e-12, 1e-12)) << op().name << ": forward differs on non-contiguous inputs";
  }
  EXPECT_EQ(gradcheck(op().fn, inputs, options()), "") << op().name;
}

TEST_P(OpRegistryTest, SameTensorTwice) {
  const auto& shapes = op().shapes;
  if (shapes.size() < 2 || !(shapes[0] == shapes[1])) GTEST_SKIP() << "needs two inputs of one shape";
  auto inputs = sample_inputs(op(), 7 + GetParam());
  inputs[1] = inputs[0];
  EXPECT_EQ(gradcheck(op().fn, inputs, options()), "") << op().name;
}

TEST_P(OpRegistryTest, MixedRequiresGrad) {
  if (op().shapes.size() < 2) GTEST_SKIP() << "needs two inputs";
  for (std::size_t off = 0; off < op().shapes.size(); ++off) {
    auto inputs = sample_inputs(op(), 9 + GetParam());
    inputs[off] = inputs[off].detach();
    EXPECT_EQ(gradcheck(op().fn, inputs, options()), "") << op().name << " with input " << off << " constant";
  }
}

TEST_P(OpRegistryTest, Float32ForwardMatchesFloat64) {
  if (op().name == "cast") GTEST_SKIP() << "cast's registry entry already mixes dtypes";
  const auto inputs = sample_inputs(op(), 11 + GetParam());
  NoGradGuard ng;
  std::vector<Tensor> f32;
  for (const auto& t : inputs) f32.push_back(t.detach().to(DType::Float32));
  const Tensor a = op().fn(inputs);
  Tensor b;
  try {
    b = op().fn(f32);
  } catch (const TypeError&) {
    GTEST_SKIP() << "entry builds float64 constants";  // e.g. where() with a float64 condition
  }
  EXPECT_EQ(b.dtype(), a.dtype() == DType::Float64 && !(b.dtype() == DType::Float64) ? DType::Float32 : b.dtype());
  EXPECT_TRUE(allclose(b.to(DType::Float64), a, 1e-4, 1e-5)) << op().name;
}

// Every op once more with all of its inputs 0-d, where the op accepts them: backward() takes the
// one-element path when every node knows its partial derivatives (Note [one-element graphs]), so
// each op's partials are checked against central differences and against grad() (which always
// moves tensors).
TEST_P(OpRegistryTest, OneElementBackward) {
  OpCase c = op();
  for (Dims& d : c.shapes) d = Dims();
  const auto inputs = sample_inputs(c, 13 + GetParam());
  Tensor y;
  try {
    y = c.fn(inputs);
  } catch (const Error&) {
    GTEST_SKIP() << op().name << " does not take 0-d inputs";
  }
  if (y.numel() != 1 || !y.requires_grad()) GTEST_SKIP() << op().name << " gives no one-element output here";
  const std::vector<Tensor> by_tensor = autograd::grad({y}, inputs, {}, false, false, /*allow_unused=*/true);
  c.fn(inputs).backward();
  std::vector<Tensor> by_backward;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    by_backward.push_back(inputs[i].grad());
    const double got = by_backward[i].defined() ? by_backward[i].item() : 0.0;
    const double tensor_path = by_tensor[i].defined() ? by_tensor[i].item() : 0.0;
    EXPECT_NEAR(got, tensor_path, 1e-12 * (1 + std::abs(tensor_path))) << op().name << " input " << i;
  }
  auto value = [&] {
    NoGradGuard ng;
    return c.fn(inputs).item();
  };
  EXPECT_EQ(compare_with_finite_differences(value, inputs, by_backward, {.eps = c.eps, .atol = c.atol, .rtol = 1e-6},
                                            "one-element gradient"),
            "")
      << op().name;
}

std::string case_name(const ::testing::TestParamInfo<std::size_t>& info) {
  std::string n = op_registry()[info.param].name + "_" + std::to_string(info.param);
  return n;
}

INSTANTIATE_TEST_SUITE_P(Ops, OpRegistryTest, ::testing::Range<std::size_t>(0, op_registry().size()), case_name);

// The registry must list every differentiable op that ops.hpp declares, so adding an op without
// a gradient check fails here.
TEST(OpRegistry, CoversEveryDeclaredOp) {
  std::ifstream in(std::string(CHAINGRAD_SOURCE_DIR) + "/include/chaingrad/ops.hpp");
  ASSERT_TRUE(in) << "cannot read ops.hpp";
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  const auto begin = text.find("// BEGIN DIFFERENTIABLE OPS"), end = text.find("// END DIFFERENTIABLE OPS");
  ASSERT_NE(begin, std::string::npos);
  ASSERT_NE(end, std::string::npos);
  const std::string section = text.substr(begin, end - begin);
  std::set<std::string> declared;
  const std::regex decl(R"((?:^|\n)(?:Tensor|std::vector<Tensor>)\s+(\w+)\()");
  for (auto it = std::sregex_iterator(section.begin(), section.end(), decl); it != std::sregex_iterator(); ++it)
    declared.insert((*it)[1]);
  std::set<std::string> registered;
  for (const auto& c : op_registry()) registered.insert(c.name);
  for (const auto& name : declared) EXPECT_TRUE(registered.count(name)) << name << " is declared in ops.hpp but has no registry entry";
  for (const auto& name : registered) EXPECT_TRUE(declared.count(name)) << name << " is in the registry but not declared in ops.hpp";
  EXPECT_GE(declared.size(), 45u);
}

}  // namespace
}  // namespace chaingrad::testing
