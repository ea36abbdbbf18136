// CSV reader (load_csv). The first byte picks the label column: by name ("label") or by index.
#include <cmath>
#include <vector>

#include "chaingrad/data.hpp"
#include "fuzz_common.hpp"

namespace cg = chaingrad;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  static const char* const kLabels[] = {"label", "0", "1", "y"};
  const char* label = kLabels[data[0] % 4];
  const std::string& path = fuzz::scratch_path(".csv");
  fuzz::write_file(path, data + 1, size - 1);
  try {
    const cg::data::Dataset d = cg::data::load_csv(path, label);
    if (d.inputs.dim() != 2 || d.labels.dim() != 1 || d.inputs.size(0) != d.labels.size(0))
      fuzz::property_failed("CSV dataset shapes disagree");
    std::int64_t max_label = -1;
    for (std::int64_t y : d.labels.numel() ? d.labels.to_vector<std::int64_t>() : std::vector<std::int64_t>{}) {
      if (y < 0) fuzz::property_failed("a negative CSV label was accepted");
      max_label = std::max(max_label, y);
    }
    if (d.num_classes != max_label + 1) fuzz::property_failed("num_classes is not max label + 1");
    if (d.inputs.numel()) (void)d.inputs.contiguous().to_vector<float>();  // see fuzz_idx.cpp
  } catch (const cg::Error&) {
  }
  return 0;
}
