// IDX reader (read_idx_images, read_idx_bytes, read_idx_labels). The file goes through zlib, so this target
// also meets gzip streams when the input starts with the gzip magic (the seeds include some);
// fuzz_idx_gz compresses every input first.
#include <cmath>
#include <vector>

#include "chaingrad/data.hpp"
#include "fuzz_common.hpp"

namespace cg = chaingrad;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string& path = fuzz::scratch_path(".idx");
  fuzz::write_file(path, data, size);
  bool images_read = false;
  std::vector<float> v;
  try {
    const cg::Tensor images = cg::data::read_idx_images(path);
    images_read = true;
    // Every element was read from the file and scaled to [0, 1].
    // (to_vector of an empty tensor memcpy's to nullptr: UB, the fuzzer's first find; the
    // reliability test ToVector.OfAnEmptyTensor holds it, so it is not re-reported here.)
    v = images.numel() ? images.contiguous().to_vector<float>() : std::vector<float>{};
    for (float x : v)
      if (!(x >= 0.0f && x <= 1.0f)) fuzz::property_failed("an IDX image value outside [0, 1]");
  } catch (const cg::Error&) {
  }
  // The same file as bytes: read exactly when the floats are, and standing for the same floats.
  try {
    const cg::Tensor bytes = cg::data::read_idx_bytes(path);
    if (!images_read) fuzz::property_failed("read_idx_bytes read a file that read_idx_images refused");
    const auto b = bytes.numel() ? bytes.contiguous().to_vector<std::int64_t>() : std::vector<std::int64_t>{};
    if (b.size() != v.size()) fuzz::property_failed("IDX bytes and floats differ in count");
    const cg::data::ByteScaling as_loaded;
    for (std::size_t i = 0; i < b.size(); ++i)
      if (as_loaded(static_cast<std::uint8_t>(b[i])) != v[i]) fuzz::property_failed("an IDX byte stands for another float");
  } catch (const cg::Error&) {
    if (images_read) fuzz::property_failed("read_idx_bytes refused a file that read_idx_images read");
  }
  try {
    const cg::Tensor labels = cg::data::read_idx_labels(path);
    if (labels.dim() != 1) fuzz::property_failed("IDX labels are not 1-D");
    for (std::int64_t y : labels.numel() ? labels.to_vector<std::int64_t>() : std::vector<std::int64_t>{})
      if (y < 0 || y > 255) fuzz::property_failed("an IDX label outside [0, 255]");
  } catch (const cg::Error&) {
  }
  return 0;
}
