// The --model spec parser (nn::ModelSpec::parse), its canonical form and the shape walk.
// Property: parse(canonical()) gives the same canonical form.
#include "chaingrad/nn.hpp"
#include "fuzz_common.hpp"

namespace cg = chaingrad;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  cg::nn::ModelSpec spec;
  try {
    spec = cg::nn::ModelSpec::parse(text);
  } catch (const cg::Error&) {
    return 0;
  }
  const std::string canonical = spec.canonical();
  try {
    if (cg::nn::ModelSpec::parse(canonical).canonical() != canonical)
      fuzz::property_failed("parse(canonical()) changes the canonical form");
  } catch (const cg::Error&) {
    fuzz::property_failed("the canonical form does not parse");
  }
  // Shapes only: build_model would allocate the parameters, and linear(1e12) is a valid spec.
  for (const cg::Dims& input : {cg::Dims{1, 28, 28}, cg::Dims{20}, cg::Dims{3, 8, 8}}) {
    try {
      (void)cg::nn::output_shape(spec, input);
    } catch (const cg::Error&) {
    }
  }
  return 0;
}
