#pragma once
// Datasets and batching: IDX files (the MNIST family, plain or gzip'd), CSV tables, input
// normalization and a seeded DataLoader whose shuffle order is a pure function of
// (seed, epoch), so a resumed run replays exactly the batches it would have seen.
#include <cstdint>
#include <iterator>
#include <span>
#include <string>
#include <vector>

#include "chaingrad/tensor.hpp"

namespace chaingrad::data {

// Where Debian's dataset-fashion-mnist package puts its files.
inline constexpr const char* kFashionMnistDir = "/usr/share/datasets/fashion-mnist";

// What the bytes of a uint8 dataset stand for: value(b) = (b / divisor - mean) * scale, in float32,
// each operation rounded as written. As loaded, b / 255: the floats read_idx_images gives (each
// correctly rounded). normalize_ sets mean and scale to what it subtracts from float inputs and
// multiplies them by, so a byte dataset and a float32 one of the same file give the same floats.
struct ByteScaling {
  float divisor = 255.0f;
  float mean = 0.0f;
  float scale = 1.0f;
  float operator()(std::uint8_t b) const { return (static_cast<float>(b) / divisor - mean) * scale; }
};

// Rows of `inputs` pair with the entries of `labels` (both contiguous, same first dimension).
// Inputs are float32, or the bytes of an image file kept as they are (load_idx with keep_bytes):
// a quarter of the memory, and a batch reads a quarter of the bytes. DataLoader batches and
// float_inputs() convert them (byte_scaling), into the floats a float32 dataset would hold.
struct Dataset {
  Tensor inputs;                  // float32 [N, ...], or uint8 [N, ...]
  Tensor labels;                  // int64 [N]
  std::int64_t num_classes = 0;   // max label + 1
  ByteScaling byte_scaling{};     // what uint8 inputs stand for
  std::int64_t size() const { return labels.defined() ? labels.size(0) : 0; }
  bool holds_bytes() const { return inputs.defined() && inputs.dtype() == DType::UInt8; }
};

// Rows [begin, end) of the inputs as floats: a view of float inputs, a float32 copy of bytes.
Tensor float_inputs(const Dataset& dataset, std::int64_t begin, std::int64_t end);
inline Tensor float_inputs(const Dataset& dataset) { return float_inputs(dataset, 0, dataset.size()); }

// ---- IDX (http://yann.lecun.com/exdb/mnist/ layout; big-endian header) ----
// A path ending in anything is read through zlib, which passes plain files through, so
// `x.gz` and `x` are both fine. Only the unsigned-byte element type (0x08) is accepted.

// 3-D [N, H, W] files become float32 [N, 1, H, W] scaled to [0, 1]; other ranks keep their
// dims (still scaled by 1/255).
Tensor read_idx_images(const std::string& path);
// 1-D [N] files become int64 [N].
Tensor read_idx_labels(const std::string& path);
// The images of an IDX file as they are: uint8 [N, 1, H, W] for 3-D files, other ranks as stored.
Tensor read_idx_bytes(const std::string& path);
// Finds {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] in `dir`. With keep_bytes the images
// stay uint8 (standing for b / 255, the floats read_idx_images gives).
Dataset load_idx(const std::string& dir, bool train, bool keep_bytes = false);

// ---- CSV ----
// A header row is required. `label_column` is a header name, or a 0-based column index when it
// is all digits and no header matches it. Every other column is a float feature:
// inputs float32 [N, F], labels int64 [N] (non-negative integers).
Dataset load_csv(const std::string& path, const std::string& label_column);

// ---- normalization ----
struct Normalization {
  double mean = 0.0;
  double std = 1.0;
};
// Mean and (population) standard deviation over every element; a constant input gets std 1 so
// normalizing it yields zeros rather than NaNs.
Normalization compute_normalization(const Tensor& inputs);
// The same over a dataset's inputs; for bytes, from their histogram (exact counts).
Normalization compute_normalization(const Dataset& dataset);
// inputs = (inputs - mean) / std, in place; inputs must be a contiguous float tensor.
void normalize_(Tensor& inputs, Normalization n);
// The same for a dataset: its float inputs in place, or its byte_scaling, which gives the same
// floats. Bytes take one normalization: a second would round differently from float inputs.
void normalize_(Dataset& dataset, Normalization n);

// ---- batching ----
struct Batch {
  Tensor inputs;  // [B, ...] fresh contiguous copies of the dataset rows (float32 for bytes)
  Tensor labels;  // [B]
};

// The dataset's rows `rows` (each in [0, N)), in that order, as one batch.
Batch gather_rows(const Dataset& dataset, std::span<const std::int64_t> rows);

// At namespace scope (and aliased as DataLoader::Options) because a nested struct with default
// member initializers cannot be a default argument inside its own class.
struct DataLoaderOptions {
  std::int64_t batch_size = 64;
  bool shuffle = true;
  bool drop_last = false;  // drop the last batch when it is smaller than batch_size
  std::uint64_t seed = 0;
};

class DataLoader {
 public:
  using Options = DataLoaderOptions;

  explicit DataLoader(const Dataset& dataset, Options options = {});

  // Selects the shuffle order of epoch `e`: a pure function of (seed, e). Starts at epoch 0.
  void set_epoch(std::int64_t e);
  std::int64_t epoch() const { return epoch_; }

  std::int64_t num_batches() const;
  std::int64_t size() const { return n_; }  // number of examples in the dataset
  const Options& options() const { return options_; }
  // Dataset row indices in this epoch's order.
  const std::vector<std::int64_t>& order() const { return order_; }

  // Copies the rows of batch i (0 <= i < num_batches()) of the current epoch.
  Batch batch(std::int64_t i) const;

  // Range-for over the batches of the current epoch.
  class Iterator {
   public:
    using iterator_category = std::input_iterator_tag;
    using value_type = Batch;
    using difference_type = std::ptrdiff_t;
    Iterator(const DataLoader* loader, std::int64_t i) : loader_(loader), i_(i) {}
    Batch operator*() const { return loader_->batch(i_); }
    Iterator& operator++() {
      ++i_;
      return *this;
    }
    bool operator==(const Iterator& o) const { return i_ == o.i_; }

   private:
    const DataLoader* loader_;
    std::int64_t i_;
  };
  Iterator begin() const { return {this, 0}; }
  Iterator end() const { return {this, num_batches()}; }

 private:
  Dataset source_;  // the dataset's tensors, contiguous
  Options options_;
  std::int64_t n_ = 0;
  std::int64_t epoch_ = 0;
  std::vector<std::int64_t> order_;
};

}  // namespace chaingrad::data
