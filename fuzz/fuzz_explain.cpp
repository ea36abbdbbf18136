// The formula language of `chaingrad explain`, through the public explain(): parser, symbolic
// derivatives, evaluation, path enumeration, text and JSON output. An input is a formula,
// optionally followed by a NUL byte and `--at` text ("x=0.5,w1=0.3", fed to parse_values).
// Inputs still without a value get one (from a small table) and the formula is explained again.
#include <string>
#include <string_view>

#include "chaingrad/explain.hpp"
#include "fuzz_common.hpp"

namespace cg = chaingrad;
namespace ex = chaingrad::explain;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view all(reinterpret_cast<const char*>(data), size);
  const auto nul = all.find('\0');
  const std::string_view formula = all.substr(0, nul);
  ex::Options options;
  options.max_paths = 8;
  if (nul != std::string_view::npos) {
    try {
      options.at = ex::parse_values(all.substr(nul + 1));
    } catch (const cg::Error&) {
      return 0;
    }
  }
  static const double kValues[] = {0.5, -1.25, 2.0, 0.0, 1e-3, 3.0, -0.75};
  for (int attempt = 0; attempt < 16; ++attempt) {
    try {
      const ex::Explanation e = ex::explain(formula, options);
      (void)ex::to_text(e);
      (void)ex::to_json(e);
      return 0;
    } catch (const cg::Error& err) {
      // "no value for the input 'NAME': ..." -> give NAME a value and try again.
      const std::string_view msg = err.what();
      constexpr std::string_view kMissing = "no value for the input '";
      const auto at = msg.find(kMissing);
      if (at == std::string_view::npos) return 0;
      const auto begin = at + kMissing.size();
      const auto end = msg.find('\'', begin);
      if (end == std::string_view::npos) return 0;
      options.at.emplace_back(std::string(msg.substr(begin, end - begin)), kValues[attempt % 7]);
    }
  }
  return 0;
}
