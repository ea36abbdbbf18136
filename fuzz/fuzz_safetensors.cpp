// safetensors reader (load_safetensors): header length, JSON, dtypes, shapes, offsets, metadata.
#include <cstring>

#include "chaingrad/io.hpp"
#include "fuzz_common.hpp"

namespace cg = chaingrad;

static volatile unsigned char sink_ = 0;  // keeps the reads from being optimized away

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string& path = fuzz::scratch_path(".safetensors");
  fuzz::write_file(path, data, size);
  try {
    const cg::io::SafetensorsFile f = cg::io::load_safetensors(path);
    std::size_t bytes = 0;
    for (const auto& [name, t] : f.tensors) {
      if (!t.defined()) fuzz::property_failed("an undefined tensor was returned");
      if (f.find(name) == nullptr) fuzz::property_failed("find() misses a loaded tensor");
      bytes += static_cast<std::size_t>(t.numel()) * cg::element_size(t.dtype());
      // Read every element (ASan checks the bounds).
      const cg::Tensor c = t.contiguous();
      const auto* p = static_cast<const unsigned char*>(c.raw_data());
      unsigned char x = 0;
      for (std::size_t i = 0; i < static_cast<std::size_t>(c.numel()) * cg::element_size(c.dtype()); ++i) x ^= p[i];
      sink_ = x;
    }
    // F16/BF16 widen to 4 bytes per element; nothing else can exceed the file.
    if (bytes > 2 * size) fuzz::property_failed("more tensor bytes than the file could hold");
  } catch (const cg::Error&) {
  }
  return 0;
}
