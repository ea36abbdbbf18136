#pragma once
// Files that must never be seen half-written (reports, checkpoints) and the safetensors format
// (https://github.com/huggingface/safetensors), so PyTorch and numpy users can read our weights.
#include <cstddef>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "chaingrad/tensor.hpp"

namespace chaingrad::io {

// ---- atomic writes ----
// Writes go to `path.tmp.<pid>.<random>` in the same directory; commit() fsyncs it, renames it
// over `path` and fsyncs the directory, so a crash leaves either the old file or the new one.
// Destroying an uncommitted AtomicFile removes the temp file and leaves `path` untouched.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, std::size_t nbytes);
  void write(std::string_view bytes) { write(bytes.data(), bytes.size()); }
  void commit();

  const std::string& path() const { return path_; }
  const std::string& temp_path() const { return temp_path_; }

 private:
  void discard() noexcept;
  std::string path_;
  std::string temp_path_;
  int fd_ = -1;
};

void write_file_atomic(const std::string& path, std::string_view bytes);

// ---- safetensors ----
// Writes F32/F64/I64 tensors (any strides; stored row-major) atomically. As the reference
// implementation does, tensors are laid out by descending element size (stable otherwise) and
// the JSON header is padded with spaces, so every tensor's data is aligned to its element size.
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

struct SafetensorsFile {
  std::vector<std::pair<std::string, Tensor>> tensors;  // in file (data offset) order
  std::map<std::string, std::string> metadata;
  const Tensor* find(const std::string& name) const;  // nullptr when absent
};

// Validates the whole header before reading any data: F32, F64, I64 load as themselves;
// F16 and BF16 are widened to float32. Any malformed input throws IoError naming the file.
SafetensorsFile load_safetensors(const std::string& path);

}  // namespace chaingrad::io
