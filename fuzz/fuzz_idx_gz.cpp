// IDX reader through gzip: each input is compressed (gzip format) before it is read, so the
// fuzzer explores IDX headers and payloads behind zlib's decompression rather than the (almost
// always rejected) compressed byte stream itself.
#include <zlib.h>

#include <vector>

#include "chaingrad/data.hpp"
#include "fuzz_common.hpp"

namespace cg = chaingrad;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  z_stream zs{};
  // windowBits 15 + 16: a gzip wrapper.
  if (deflateInit2(&zs, 1, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK) std::abort();
  std::vector<unsigned char> out(deflateBound(&zs, size) + 64);
  zs.next_in = const_cast<Bytef*>(data);
  zs.avail_in = static_cast<uInt>(size);
  zs.next_out = out.data();
  zs.avail_out = static_cast<uInt>(out.size());
  if (deflate(&zs, Z_FINISH) != Z_STREAM_END) std::abort();
  out.resize(zs.total_out);
  deflateEnd(&zs);

  const std::string& path = fuzz::scratch_path(".idx.gz");
  fuzz::write_file(path, out.data(), out.size());
  try {
    const cg::Tensor images = cg::data::read_idx_images(path);
    if (images.numel()) (void)images.contiguous().to_vector<float>();  // see fuzz_idx.cpp
  } catch (const cg::Error&) {
  }
  try {
    const cg::Tensor labels = cg::data::read_idx_labels(path);
    if (labels.numel()) (void)labels.to_vector<std::int64_t>();
  } catch (const cg::Error&) {
  }
  return 0;
}
