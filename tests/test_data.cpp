// Datasets: IDX (plain and gzip), CSV, normalization and the DataLoader.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "chaingrad/data.hpp"
#include "chaingrad/error.hpp"
#include "chaingrad/tensor.hpp"
#include "test_util.hpp"

namespace cg = chaingrad;
namespace cd = chaingrad::data;
namespace fs = std::filesystem;

namespace {

// A fresh directory under the system temp dir, removed with everything in it.
class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    path_ = fs::temp_directory_path() / ("chaingrad_test_data_" + std::to_string(rd()) + std::to_string(rd()));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::string str() const { return path_.string(); }

 private:
  fs::path path_;
};

void write_bytes(const std::string& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

// test_util.hpp's expect_error, expecting an IoError unless told otherwise.
template <class E = cg::IoError, class F>
void expect_error(F&& f, std::initializer_list<std::string_view> words) {
  chaingrad::testing::expect_error<E>(std::forward<F>(f), words);
}

// ---- IDX and gzip builders ----

std::string be32(std::uint32_t v) {
  return {static_cast<char>(v >> 24), static_cast<char>(v >> 16), static_cast<char>(v >> 8), static_cast<char>(v)};
}

std::string idx_bytes(const std::vector<std::uint32_t>& dims, const std::vector<std::uint8_t>& data,
                      std::uint8_t type = 0x08) {
  std::string s{'\0', '\0', static_cast<char>(type), static_cast<char>(dims.size())};
  for (std::uint32_t d : dims) s += be32(d);
  s.append(data.begin(), data.end());
  return s;
}

std::uint32_t crc32(std::string_view s) {
  std::uint32_t c = 0xffffffffu;
  for (unsigned char b : s) {
    c ^= b;
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1u)));
  }
  return ~c;
}

std::string le32(std::uint32_t v) {
  return {static_cast<char>(v), static_cast<char>(v >> 8), static_cast<char>(v >> 16), static_cast<char>(v >> 24)};
}

// A valid gzip member built from deflate "stored" blocks, so the tests need no compressor.
std::string gzip_stored(std::string_view data) {
  std::string s{'\x1f', '\x8b', '\x08', '\0', '\0', '\0', '\0', '\0', '\0', '\xff'};
  std::size_t pos = 0;
  do {
    const std::size_t n = std::min<std::size_t>(data.size() - pos, 65535);
    const bool final = pos + n == data.size();
    s += static_cast<char>(final ? 1 : 0);
    s += static_cast<char>(n & 0xff);
    s += static_cast<char>(n >> 8);
    s += static_cast<char>(~n & 0xff);
    s += static_cast<char>((~n >> 8) & 0xff);
    s.append(data.substr(pos, n));
    pos += n;
  } while (pos < data.size());
  s += le32(crc32(data));
  s += le32(static_cast<std::uint32_t>(data.size()));
  return s;
}

float scaled(std::uint8_t b) { return static_cast<float>(b / 255.0); }

const std::vector<std::uint8_t> kPixels = {0, 51, 102, 153, 204, 255, 1, 2, 3, 4, 5, 6};

// ---- IDX: happy paths ----

TEST(Idx, ReadsPlainImagesAsScaledNchw) {
  TempDir dir;
  write_bytes(dir.file("img"), idx_bytes({2, 2, 3}, kPixels));
  const cg::Tensor t = cd::read_idx_images(dir.file("img"));
  EXPECT_EQ(t.dtype(), cg::DType::Float32);
  EXPECT_EQ(t.shape(), (cg::Dims{2, 1, 2, 3}));
  const float* p = t.data<float>();
  for (std::size_t i = 0; i < kPixels.size(); ++i) EXPECT_EQ(p[i], scaled(kPixels[i])) << i;
  EXPECT_EQ(p[5], 1.0f);
  EXPECT_EQ(p[0], 0.0f);
}

TEST(Idx, ReadsGzipImagesIdentically) {
  TempDir dir;
  write_bytes(dir.file("img.gz"), gzip_stored(idx_bytes({2, 2, 3}, kPixels)));
  const cg::Tensor t = cd::read_idx_images(dir.file("img.gz"));
  EXPECT_EQ(t.shape(), (cg::Dims{2, 1, 2, 3}));
  const float* p = t.data<float>();
  for (std::size_t i = 0; i < kPixels.size(); ++i) EXPECT_EQ(p[i], scaled(kPixels[i])) << i;
}

// One gzip member is inflated whole (libdeflate); anything else goes through zlib. Both must give
// the same tensor: two members, and one member behind a second file of the same bytes.
TEST(Idx, GzipOfTwoMembersReadsLikeOne) {
  TempDir dir;
  const std::string plain = idx_bytes({2, 2, 3}, kPixels);
  write_bytes(dir.file("one.gz"), gzip_stored(plain));
  write_bytes(dir.file("two.gz"), gzip_stored(plain.substr(0, 7)) + gzip_stored(plain.substr(7)));
  const cg::Tensor one = cd::read_idx_images(dir.file("one.gz"));
  const cg::Tensor two = cd::read_idx_images(dir.file("two.gz"));
  ASSERT_EQ(two.shape(), (cg::Dims{2, 1, 2, 3}));
  EXPECT_EQ(one.to_vector<float>(), two.to_vector<float>());
  for (std::size_t i = 0; i < kPixels.size(); ++i) EXPECT_EQ(two.data<float>()[i], scaled(kPixels[i])) << i;
}

// A trailer whose size or checksum is wrong fails the whole-file inflate; zlib then reads the file
// and names the fault.
TEST(Idx, GzipWithWrongTrailerIsAClearError) {
  TempDir dir;
  std::string gz = gzip_stored(idx_bytes({2, 2, 3}, kPixels));
  std::string bad_size = gz, bad_crc = gz;
  bad_size[bad_size.size() - 4] ^= 1;
  bad_crc[bad_crc.size() - 8] ^= 1;
  write_bytes(dir.file("size.gz"), bad_size);
  write_bytes(dir.file("crc.gz"), bad_crc);
  expect_error([&] { cd::read_idx_images(dir.file("size.gz")); }, {"corrupt or truncated", dir.file("size.gz")});
  expect_error([&] { cd::read_idx_images(dir.file("crc.gz")); }, {"corrupt or truncated", dir.file("crc.gz")});
}

TEST(Idx, GzipSpanningManyDeflateBlocks) {
  TempDir dir;
  std::vector<std::uint8_t> data(3 * 300 * 301);
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::uint8_t>(i * 7 + i / 13);
  write_bytes(dir.file("big.gz"), gzip_stored(idx_bytes({3, 300, 301}, data)));
  const cg::Tensor t = cd::read_idx_images(dir.file("big.gz"));
  ASSERT_EQ(t.shape(), (cg::Dims{3, 1, 300, 301}));
  const float* p = t.data<float>();
  for (std::size_t i = 0; i < data.size(); i += 997) EXPECT_EQ(p[i], scaled(data[i])) << i;
  EXPECT_EQ(p[data.size() - 1], scaled(data.back()));
}

TEST(Idx, NonImageRankKeepsDims) {
  TempDir dir;
  write_bytes(dir.file("m"), idx_bytes({3, 4}, kPixels));
  const cg::Tensor t = cd::read_idx_images(dir.file("m"));
  EXPECT_EQ(t.shape(), (cg::Dims{3, 4}));
  EXPECT_EQ(t.data<float>()[11], scaled(6));
}

TEST(Idx, ReadsLabelsPlainAndGzip) {
  TempDir dir;
  const std::string bytes = idx_bytes({5}, {3, 0, 9, 1, 255});
  write_bytes(dir.file("lab"), bytes);
  write_bytes(dir.file("lab.gz"), gzip_stored(bytes));
  for (const std::string name : {"lab", "lab.gz"}) {
    const cg::Tensor t = cd::read_idx_labels(dir.file(name));
    EXPECT_EQ(t.dtype(), cg::DType::Int64);
    ASSERT_EQ(t.shape(), (cg::Dims{5}));
    const std::int64_t* p = t.data<std::int64_t>();
    EXPECT_EQ(std::vector<std::int64_t>(p, p + 5), (std::vector<std::int64_t>{3, 0, 9, 1, 255})) << name;
  }
}

TEST(Idx, LoadIdxFindsTrainAndTestFilesPlainOrGzip) {
  TempDir dir;
  write_bytes(dir.file("train-images-idx3-ubyte"), idx_bytes({3, 2, 2}, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}));
  write_bytes(dir.file("train-labels-idx1-ubyte.gz"), gzip_stored(idx_bytes({3}, {4, 0, 2})));
  write_bytes(dir.file("t10k-images-idx3-ubyte.gz"), gzip_stored(idx_bytes({1, 2, 2}, {9, 9, 9, 9})));
  write_bytes(dir.file("t10k-labels-idx1-ubyte"), idx_bytes({1}, {1}));

  const cd::Dataset train = cd::load_idx(dir.str(), true);
  EXPECT_EQ(train.size(), 3);
  EXPECT_EQ(train.inputs.shape(), (cg::Dims{3, 1, 2, 2}));
  EXPECT_EQ(train.num_classes, 5);
  EXPECT_EQ(train.labels.data<std::int64_t>()[0], 4);
  EXPECT_EQ(train.inputs.data<float>()[11], scaled(11));

  const cd::Dataset test = cd::load_idx(dir.str() + "/", false);
  EXPECT_EQ(test.size(), 1);
  EXPECT_EQ(test.num_classes, 2);
  EXPECT_EQ(test.inputs.data<float>()[3], scaled(9));
}

// ---- IDX images kept as bytes ----

// A train/test pair of random images, 9 x 13 (117 bytes a row: eight lanes and a tail of five).
struct ByteFiles {
  TempDir dir;
  std::vector<std::uint8_t> pixels;
  explicit ByteFiles(std::uint32_t n = 1200) {
    std::mt19937 gen(5);
    pixels.resize(static_cast<std::size_t>(n) * 117);
    for (auto& p : pixels) p = static_cast<std::uint8_t>(gen() & 0xff);
    pixels[0] = 0;
    pixels[1] = 255;
    std::vector<std::uint8_t> labels(n);
    for (std::uint32_t i = 0; i < n; ++i) labels[i] = static_cast<std::uint8_t>(i % 10);
    write_bytes(dir.file("train-images-idx3-ubyte.gz"), gzip_stored(idx_bytes({n, 9, 13}, pixels)));
    write_bytes(dir.file("train-labels-idx1-ubyte"), idx_bytes({n}, labels));
    write_bytes(dir.file("t10k-images-idx3-ubyte"), idx_bytes({n, 9, 13}, pixels));
    write_bytes(dir.file("t10k-labels-idx1-ubyte.gz"), gzip_stored(idx_bytes({n}, labels)));
  }
};

std::vector<float> floats_of(const cg::Tensor& t) {
  const cg::Tensor c = t.contiguous();
  return {c.data<float>(), c.data<float>() + c.numel()};
}

TEST(ByteDatasets, KeepTheFileBytesAndStandForTheFloatsOfAFloatDataset) {
  ByteFiles files;
  for (bool train : {true, false}) {  // (the training images are gzip'd, the test images plain)
    const cd::Dataset f = cd::load_idx(files.dir.str(), train);
    const cd::Dataset b = cd::load_idx(files.dir.str(), train, /*keep_bytes=*/true);
    ASSERT_TRUE(b.holds_bytes());
    EXPECT_FALSE(f.holds_bytes());
    EXPECT_EQ(b.inputs.shape(), (cg::Dims{1200, 1, 9, 13}));
    EXPECT_EQ(b.num_classes, 10);
    const std::uint8_t* p = b.inputs.contiguous().data<std::uint8_t>();
    EXPECT_EQ(std::vector<std::uint8_t>(p, p + b.inputs.numel()), files.pixels);
    EXPECT_EQ(floats_of(cd::float_inputs(b)), floats_of(f.inputs));
    EXPECT_EQ(floats_of(cd::float_inputs(b, 7, 9)), floats_of(f.inputs.slice(0, 7, 9)));
  }
}

TEST(ByteDatasets, BatchesMatchAFloatDatasetBeforeAndAfterNormalizingOnAnyThreadCount) {
  ByteFiles files;
  cd::Dataset f = cd::load_idx(files.dir.str(), true);
  cd::Dataset b = cd::load_idx(files.dir.str(), true, /*keep_bytes=*/true);
  const int saved = cg::get_num_threads();
  auto compare = [&] {
    // 700 rows of 117 floats: the pool gathers them; 33 rows: the calling thread alone.
    for (std::int64_t batch : {700, 33}) {
      cd::DataLoader lf(f, {.batch_size = batch, .shuffle = true, .seed = 9});
      cd::DataLoader lb(b, {.batch_size = batch, .shuffle = true, .seed = 9});
      for (int threads : {1, 2, 3}) {
        cg::set_num_threads(threads);
        for (std::int64_t i : {std::int64_t{0}, lf.num_batches() - 1}) {
          const cd::Batch x = lf.batch(i), y = lb.batch(i);
          EXPECT_EQ(y.inputs.dtype(), cg::DType::Float32);
          EXPECT_EQ(y.inputs.shape(), x.inputs.shape());
          EXPECT_EQ(floats_of(y.inputs), floats_of(x.inputs)) << "batch " << batch << ", threads " << threads;
          EXPECT_EQ(y.labels.to_vector<std::int64_t>(), x.labels.to_vector<std::int64_t>());
        }
      }
      cg::set_num_threads(saved);
    }
  };
  compare();
  // The histogram's statistics agree with the float path's to double rounding, and give the same
  // float32 mean and scale.
  const cd::Normalization nf = cd::compute_normalization(f), nb = cd::compute_normalization(b);
  EXPECT_NEAR(nb.mean, nf.mean, 1e-12 * nf.mean);
  EXPECT_NEAR(nb.std, nf.std, 1e-12 * nf.std);
  EXPECT_EQ(static_cast<float>(nb.mean), static_cast<float>(nf.mean));
  EXPECT_EQ(static_cast<float>(1.0 / nb.std), static_cast<float>(1.0 / nf.std));
  cd::normalize_(f, nf);
  cd::normalize_(b, nf);
  EXPECT_EQ(b.byte_scaling.mean, static_cast<float>(nf.mean));
  compare();
  EXPECT_EQ(floats_of(cd::float_inputs(b)), floats_of(f.inputs));
  // A second normalization would round differently from float inputs, so it is refused.
  expect_error<cg::ValueError>([&] { cd::normalize_(b, nf); }, {"normalized already"});
}

// (fuzz_idx's first find: an empty array streamed through zlib has no buffer to copy from.)
TEST(ByteDatasets, AFileOfNoImagesReadsAsNoBytes) {
  TempDir dir;
  write_bytes(dir.file("empty"), idx_bytes({0, 2, 2}, {}));
  const cg::Tensor b = cd::read_idx_bytes(dir.file("empty"));
  EXPECT_EQ(b.dtype(), cg::DType::UInt8);
  EXPECT_EQ(b.shape(), (cg::Dims{0, 1, 2, 2}));
  EXPECT_EQ(cd::read_idx_images(dir.file("empty")).shape(), (cg::Dims{0, 1, 2, 2}));
}

TEST(ByteDatasets, BadRowsAndScalingAreClearErrors) {
  ByteFiles files(20);
  cd::Dataset b = cd::load_idx(files.dir.str(), true, /*keep_bytes=*/true);
  const std::vector<std::int64_t> rows{3, 20};
  expect_error<cg::ValueError>([&] { cd::gather_rows(b, rows); }, {"gather_rows", "row 20", "entry 1", "20 samples"});
  expect_error<cg::ValueError>([&] { cd::float_inputs(b, 5, 21); }, {"float_inputs", "[5, 21)", "20 samples"});
  b.byte_scaling.divisor = 0.0f;
  expect_error<cg::ValueError>([&] { cd::DataLoader loader(b); }, {"DataLoader", "divisor"});
  b.byte_scaling.divisor = 255.0f;
  const cd::Batch x = cd::gather_rows(b, std::vector<std::int64_t>{19, 0});
  EXPECT_EQ(x.labels.to_vector<std::int64_t>(), (std::vector<std::int64_t>{9, 0}));
  EXPECT_EQ(x.inputs.data<float>()[117], 0.0f);  // row 0's first byte
  EXPECT_EQ(x.inputs.data<float>()[118], 1.0f);  // and its second, 255
}

// ---- IDX: malformed files ----

TEST(IdxErrors, MissingFileNamesThePath) {
  TempDir dir;
  expect_error([&] { cd::read_idx_images(dir.file("nope")); }, {"read_idx_images", dir.file("nope"), "no such file"});
  expect_error([&] { cd::load_idx(dir.str(), true); },
               {"cannot find", dir.file("train-images-idx3-ubyte"), "train-images-idx3-ubyte.gz"});
  write_bytes(dir.file("t10k-images-idx3-ubyte"), idx_bytes({1, 1, 1}, {0}));
  expect_error([&] { cd::load_idx(dir.str(), false); }, {"cannot find", "t10k-labels-idx1-ubyte"});
  try {
    cd::load_idx(dir.str(), true);
  } catch (const cg::IoError& e) {
    EXPECT_EQ(std::string(e.what()).find("apt-get"), std::string::npos) << "hint is only for the default dir";
  }
}

TEST(IdxErrors, DefaultDirectoryHintsAtThePackage) {
  if (fs::exists(std::string(cd::kFashionMnistDir) + "/train-images-idx3-ubyte.gz"))
    GTEST_SKIP() << "dataset-fashion-mnist is installed, so the missing-file hint cannot be provoked";
  expect_error([&] { cd::load_idx(cd::kFashionMnistDir, true); },
               {"apt-get install dataset-fashion-mnist", "--data DIR"});
}

TEST(IdxErrors, WrongMagicShowsFoundAndExpectedBytes) {
  TempDir dir;
  write_bytes(dir.file("bad"), std::string("\x12\x34\x56\x78xxxxxxxx", 12));
  expect_error([&] { cd::read_idx_images(dir.file("bad")); }, {dir.file("bad"), "12 34 56 78", "expected 00 00 08"});
}

TEST(IdxErrors, UnsupportedElementTypeIsNamed) {
  TempDir dir;
  write_bytes(dir.file("f32"), idx_bytes({1}, {0, 0, 0, 0}, 0x0D));
  expect_error([&] { cd::read_idx_labels(dir.file("f32")); }, {"00 00 0d 01", "float32", "only 0x08"});
}

TEST(IdxErrors, TruncatedHeader) {
  TempDir dir;
  write_bytes(dir.file("short"), std::string("\0\0\x08", 3));
  expect_error([&] { cd::read_idx_images(dir.file("short")); }, {"truncated", "at least 4 bytes", "found 3"});
  write_bytes(dir.file("dims"), idx_bytes({2, 2, 2}, {}).substr(0, 10));
  expect_error([&] { cd::read_idx_images(dir.file("dims")); }, {"truncated", "16 header bytes", "only 10"});
}

TEST(IdxErrors, TruncatedPlainDataGivesBothSizes) {
  TempDir dir;
  write_bytes(dir.file("t"), idx_bytes({2, 2, 2}, {1, 2, 3, 4, 5}));
  expect_error([&] { cd::read_idx_images(dir.file("t")); }, {"truncated", "need 24 bytes", "the file has 21"});
}

TEST(IdxErrors, TruncatedGzipDataGivesBothSizes) {
  TempDir dir;
  write_bytes(dir.file("t.gz"), gzip_stored(idx_bytes({2, 2, 2}, {1, 2, 3, 4, 5})));
  expect_error([&] { cd::read_idx_images(dir.file("t.gz")); },
               {"truncated", "need 24 bytes", "only 21 are present", "after decompression"});
}

TEST(IdxErrors, CutOffGzipStream) {
  TempDir dir;
  std::vector<std::uint8_t> data(1000, 7);
  const std::string gz = gzip_stored(idx_bytes({10, 10, 10}, data));
  write_bytes(dir.file("cut.gz"), gz.substr(0, gz.size() / 2));
  expect_error([&] { cd::read_idx_images(dir.file("cut.gz")); }, {"truncated", dir.file("cut.gz")});
}

TEST(IdxErrors, TrailingBytesAreRejected) {
  TempDir dir;
  write_bytes(dir.file("x"), idx_bytes({2}, {1, 2, 3}));
  expect_error([&] { cd::read_idx_labels(dir.file("x")); }, {"1 trailing bytes", "need exactly 10"});
  write_bytes(dir.file("x.gz"), gzip_stored(idx_bytes({2}, {1, 2, 3})));
  expect_error([&] { cd::read_idx_labels(dir.file("x.gz")); }, {"trailing data"});
}

TEST(IdxErrors, GiganticHeaderFailsBeforeAllocating) {
  TempDir dir;
  // 2^96 elements: rejected from the header alone.
  write_bytes(dir.file("huge"), idx_bytes({0xffffffffu, 0xffffffffu, 0xffffffffu}, {1, 2, 3}));
  expect_error([&] { cd::read_idx_images(dir.file("huge")); }, {"header declares dims", "corrupt"});
  // 10^12 bytes claimed by a 19-byte plain file: the size check fires first.
  write_bytes(dir.file("big"), idx_bytes({1000000, 1000, 1000}, {1, 2, 3}));
  expect_error([&] { cd::read_idx_images(dir.file("big")); }, {"truncated", "need 1000000000016 bytes", "has 19"});
  // The same claim inside a gzip stream: read incrementally, failing on the short stream.
  write_bytes(dir.file("big.gz"), gzip_stored(idx_bytes({1000000, 1000, 1000}, {1, 2, 3})));
  expect_error([&] { cd::read_idx_images(dir.file("big.gz")); }, {"truncated", "only 19 are present"});
}

TEST(IdxErrors, LabelsMustBeOneDimensional) {
  TempDir dir;
  write_bytes(dir.file("l"), idx_bytes({2, 2}, {1, 2, 3, 4}));
  expect_error([&] { cd::read_idx_labels(dir.file("l")); }, {"1-D", "[2, 2]"});
}

TEST(IdxErrors, CountMismatchNamesBothFilesAndCounts) {
  TempDir dir;
  write_bytes(dir.file("train-images-idx3-ubyte"), idx_bytes({3, 1, 1}, {1, 2, 3}));
  write_bytes(dir.file("train-labels-idx1-ubyte"), idx_bytes({2}, {0, 1}));
  expect_error([&] { cd::load_idx(dir.str(), true); },
               {"3 images", "2 labels", dir.file("train-images-idx3-ubyte"), dir.file("train-labels-idx1-ubyte")});
}

TEST(IdxErrors, RandomCorruptionThrowsIoErrorOrLoads) {
  TempDir dir;
  std::vector<std::uint8_t> px(2 * 5 * 7);
  for (std::size_t i = 0; i < px.size(); ++i) px[i] = static_cast<std::uint8_t>(i * 3);
  const std::string plain = idx_bytes({2, 5, 7}, px);
  const std::string gz = gzip_stored(plain);
  std::mt19937_64 rng(99);
  int rejected = 0;
  for (int iter = 0; iter < 2000; ++iter) {
    std::string bad = iter % 2 ? gz : plain;
    const std::size_t pos = rng() % bad.size();
    if (rng() % 3 == 0)
      bad.resize(pos);
    else
      bad[pos] = static_cast<char>(rng());
    const std::string p = dir.file(iter % 2 ? "f.gz" : "f");
    write_bytes(p, bad);
    try {
      const cg::Tensor t = cd::read_idx_images(p);
      EXPECT_LE(t.numel(), static_cast<std::int64_t>(px.size()) * 256);
    } catch (const cg::IoError& e) {
      ++rejected;
      ASSERT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
    }
  }
  EXPECT_GT(rejected, 500);
}

// ---- the real Fashion-MNIST ----

TEST(FashionMnist, TestSetLoadsWithKnownValues) {
  const std::string dir = cd::kFashionMnistDir;
  if (!fs::exists(dir + "/t10k-images-idx3-ubyte.gz") && !fs::exists(dir + "/t10k-images-idx3-ubyte"))
    GTEST_SKIP() << "Fashion-MNIST not found in " << dir << " (apt-get install dataset-fashion-mnist)";
  const cd::Dataset ds = cd::load_idx(dir, false);
  EXPECT_EQ(ds.size(), 10000);
  EXPECT_EQ(ds.inputs.shape(), (cg::Dims{10000, 1, 28, 28}));
  EXPECT_EQ(ds.num_classes, 10);
  const std::int64_t* lab = ds.labels.data<std::int64_t>();
  // First ten labels, read with `zcat t10k-labels-idx1-ubyte.gz | od -t u1 -j 8`.
  EXPECT_EQ(std::vector<std::int64_t>(lab, lab + 10), (std::vector<std::int64_t>{9, 2, 1, 1, 6, 1, 4, 6, 5, 7}));
  std::vector<int> counts(10, 0);
  for (std::int64_t i = 0; i < ds.size(); ++i) {
    ASSERT_TRUE(lab[i] >= 0 && lab[i] <= 9) << i;
    ++counts[static_cast<std::size_t>(lab[i])];
  }
  EXPECT_EQ(counts, std::vector<int>(10, 1000));  // the test set is balanced
  // Image 0: byte sum 33456, row 8 column 16 holds 27.
  const float* img = ds.inputs.data<float>();
  double sum = 0.0;
  for (int i = 0; i < 784; ++i) sum += img[i];
  EXPECT_NEAR(sum * 255.0, 33456.0, 1e-2);
  EXPECT_EQ(img[8 * 28 + 16], scaled(27));
  const auto [lo, hi] = std::minmax_element(img, img + ds.inputs.numel());
  EXPECT_EQ(*lo, 0.0f);
  EXPECT_EQ(*hi, 1.0f);
}

TEST(FashionMnist, TrainSetShape) {
  const std::string dir = cd::kFashionMnistDir;
  if (!fs::exists(dir + "/train-images-idx3-ubyte.gz") && !fs::exists(dir + "/train-images-idx3-ubyte"))
    GTEST_SKIP() << "Fashion-MNIST not found in " << dir << " (apt-get install dataset-fashion-mnist)";
  const cd::Dataset ds = cd::load_idx(dir, true);
  EXPECT_EQ(ds.inputs.shape(), (cg::Dims{60000, 1, 28, 28}));
  EXPECT_EQ(ds.labels.shape(), (cg::Dims{60000}));
  EXPECT_EQ(ds.num_classes, 10);
}

// ---- CSV ----

TEST(Csv, HappyPathWithCrlfQuotesAndBlankLines) {
  TempDir dir;
  write_bytes(dir.file("d.csv"),
              "a, \"b\" ,label,c\r\n"
              "1,2,0,3\r\n"
              "\r\n"
              "4.5,-1e3,2,+6\r\n"
              "\"7\",0.25, 1 ,-0\r\n");
  const cd::Dataset ds = cd::load_csv(dir.file("d.csv"), "label");
  ASSERT_EQ(ds.inputs.shape(), (cg::Dims{3, 3}));
  EXPECT_EQ(ds.inputs.dtype(), cg::DType::Float32);
  const float* x = ds.inputs.data<float>();
  EXPECT_EQ(std::vector<float>(x, x + 9), (std::vector<float>{1, 2, 3, 4.5f, -1000, 6, 7, 0.25f, -0.0f}));
  ASSERT_EQ(ds.labels.shape(), (cg::Dims{3}));
  const std::int64_t* y = ds.labels.data<std::int64_t>();
  EXPECT_EQ(std::vector<std::int64_t>(y, y + 3), (std::vector<std::int64_t>{0, 2, 1}));
  EXPECT_EQ(ds.num_classes, 3);
  EXPECT_EQ(ds.size(), 3);
}

TEST(Csv, LabelColumnByIndexUnlessAHeaderMatches) {
  TempDir dir;
  write_bytes(dir.file("i.csv"), "x,y,z\n1,5,2\n3,6,4\n");
  const cd::Dataset by_index = cd::load_csv(dir.file("i.csv"), "1");
  const std::int64_t* y = by_index.labels.data<std::int64_t>();
  EXPECT_EQ(y[0], 5);
  EXPECT_EQ(y[1], 6);
  EXPECT_EQ(by_index.num_classes, 7);
  EXPECT_EQ(by_index.inputs.data<float>()[1], 2.0f);

  write_bytes(dir.file("n.csv"), "x,2,z\n1,5,2\n3,6,4.0\n");
  const cd::Dataset by_name = cd::load_csv(dir.file("n.csv"), "2");  // header "2" wins over index 2
  EXPECT_EQ(by_name.labels.data<std::int64_t>()[1], 6);
  const cd::Dataset integral = cd::load_csv(dir.file("n.csv"), "z");  // "4.0" is an integer label
  EXPECT_EQ(integral.labels.data<std::int64_t>()[1], 4);
}

TEST(CsvErrors, RaggedRow) {
  TempDir dir;
  write_bytes(dir.file("r.csv"), "a,b,c,d,label\n1,2,3,4,0\n\n1,2,3\n");
  expect_error([&] { cd::load_csv(dir.file("r.csv"), "label"); },
               {dir.file("r.csv"), "line 4 has 3 fields; the header has 5"});
}

TEST(CsvErrors, NonNumericFieldIsQuoted) {
  TempDir dir;
  write_bytes(dir.file("n.csv"), "a,b,label\n1,2,0\n1,abc,1\n");
  expect_error([&] { cd::load_csv(dir.file("n.csv"), "label"); },
               {dir.file("n.csv"), "line 3", "column 2", "(\"b\")", "\"abc\" is not a finite number"});
  write_bytes(dir.file("e.csv"), "a,b,label\n1,,0\n");
  expect_error([&] { cd::load_csv(dir.file("e.csv"), "label"); }, {"line 2", "column 2", "\"\" is not"});
  write_bytes(dir.file("nan.csv"), "a,label\nnan,0\n");
  expect_error([&] { cd::load_csv(dir.file("nan.csv"), "label"); }, {"\"nan\" is not a finite number"});
}

TEST(CsvErrors, BadLabels) {
  TempDir dir;
  write_bytes(dir.file("neg.csv"), "a,label\n1,-1\n");
  expect_error([&] { cd::load_csv(dir.file("neg.csv"), "label"); }, {"line 2", "column 2", "\"-1\" is negative"});
  write_bytes(dir.file("frac.csv"), "a,label\n1,1.5\n");
  expect_error([&] { cd::load_csv(dir.file("frac.csv"), "label"); }, {"\"1.5\" is not an integer"});
}

TEST(CsvErrors, MissingLabelColumnListsTheHeader) {
  TempDir dir;
  write_bytes(dir.file("m.csv"), "alpha,beta\n1,2\n");
  expect_error([&] { cd::load_csv(dir.file("m.csv"), "target"); },
               {dir.file("m.csv"), "no label column named \"target\"", "\"alpha\", \"beta\""});
  expect_error([&] { cd::load_csv(dir.file("m.csv"), "5"); }, {"index 5 is out of range", "2 columns"});
}

TEST(CsvErrors, EmptyFileHeaderOnlyAndMissingFile) {
  TempDir dir;
  write_bytes(dir.file("empty.csv"), "");
  expect_error([&] { cd::load_csv(dir.file("empty.csv"), "label"); }, {dir.file("empty.csv"), "is empty", "header"});
  write_bytes(dir.file("blank.csv"), "\r\n\n");
  expect_error([&] { cd::load_csv(dir.file("blank.csv"), "label"); }, {"is empty"});
  write_bytes(dir.file("hdr.csv"), "a,label\n");
  expect_error([&] { cd::load_csv(dir.file("hdr.csv"), "label"); }, {"no data rows"});
  expect_error([&] { cd::load_csv(dir.file("absent.csv"), "label"); }, {"cannot open", dir.file("absent.csv")});
  write_bytes(dir.file("q.csv"), "a,\"label\n1,2\n");
  expect_error([&] { cd::load_csv(dir.file("q.csv"), "label"); }, {"line 1", "quote"});
}

// ---- normalization ----

TEST(Normalization, ComputesPopulationMeanAndStd) {
  const std::vector<float> v{1, 2, 3, 4};
  const cg::Tensor x = cg::from_vector(std::span<const float>(v), cg::Dims{2, 2});
  const cd::Normalization n = cd::compute_normalization(x);
  EXPECT_DOUBLE_EQ(n.mean, 2.5);
  EXPECT_DOUBLE_EQ(n.std, std::sqrt(1.25));
}

TEST(Normalization, NormalizesInPlace) {
  const std::vector<float> v{1, 2, 3, 4};
  cg::Tensor x = cg::from_vector(std::span<const float>(v), cg::Dims{4});
  const std::uint32_t version = x.version();
  cd::normalize_(x, {2.0, 0.5});
  const float* p = x.data<float>();
  EXPECT_EQ(std::vector<float>(p, p + 4), (std::vector<float>{-2, 0, 2, 4}));
  EXPECT_GT(x.version(), version);
  const cd::Normalization after = cd::compute_normalization(x);
  EXPECT_NEAR(after.mean, 1.0, 1e-12);
}

// Several blocks of ordered_sum, a tail, and a mean far from zero next to a small spread (where a
// one-pass formula would cancel), against a long double reference; the same bits on 1 and 2 threads.
TEST(Normalization, ManyBlocksMatchReferenceOnAnyThreadCount) {
  const std::size_t n = 3 * 65536 + 13;
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = 1000.0f + 0.01f * static_cast<float>((i * 7919) % 251);
  long double sum = 0;
  for (float f : v) sum += f;
  const long double mean = sum / n;
  long double sq = 0;
  for (float f : v) sq += (f - mean) * (f - mean);
  const double ref_std = static_cast<double>(std::sqrt(sq / n));
  const cg::Tensor x = cg::from_vector(std::span<const float>(v), cg::Dims{static_cast<std::int64_t>(n)});
  const int threads = cg::get_num_threads();
  cg::set_num_threads(1);
  const cd::Normalization one = cd::compute_normalization(x);
  cg::set_num_threads(2);
  const cd::Normalization two = cd::compute_normalization(x);
  cg::set_num_threads(threads);
  EXPECT_NEAR(one.mean, static_cast<double>(mean), 1e-12 * 1000);
  EXPECT_NEAR(one.std, ref_std, 1e-9 * ref_std);
  EXPECT_EQ(one.mean, two.mean);
  EXPECT_EQ(one.std, two.std);
}

TEST(Normalization, ConstantInputGetsUnitStd) {
  const cg::Tensor x = cg::full({5}, 3.0);
  const cd::Normalization n = cd::compute_normalization(x);
  EXPECT_DOUBLE_EQ(n.mean, 3.0);
  EXPECT_DOUBLE_EQ(n.std, 1.0);
}

TEST(Normalization, RejectsBadInput) {
  cg::Tensor ints = cg::zeros({3}, {.dtype = cg::DType::Int64});
  expect_error<cg::TypeError>([&] { cd::compute_normalization(ints); }, {"compute_normalization", "int64"});
  cg::Tensor x = cg::zeros({2, 3});
  expect_error<cg::ValueError>([&] { cd::normalize_(x, {0.0, 0.0}); }, {"std must be positive"});
  cg::Tensor xt = x.t();
  expect_error<cg::ValueError>([&] { cd::normalize_(xt, {0.0, 1.0}); }, {"contiguous"});
}

// ---- DataLoader ----

// n examples with inputs[i] = {10i, 10i+1, 10i+2} and labels[i] = i, so every batch row can be
// traced back to the example it came from.
cd::Dataset indexed_dataset(std::int64_t n) {
  std::vector<float> x;
  std::vector<std::int64_t> y;
  for (std::int64_t i = 0; i < n; ++i) {
    for (int j = 0; j < 3; ++j) x.push_back(static_cast<float>(10 * i + j));
    y.push_back(i);
  }
  return {cg::from_vector(std::span<const float>(x), cg::Dims{n, 3}), cg::from_vector(std::span<const std::int64_t>(y), cg::Dims{n}),
          n};
}

// The labels of every batch of the current epoch, in order, checking each row against its label.
std::vector<std::int64_t> epoch_labels(const cd::DataLoader& loader, std::vector<std::int64_t>* sizes = nullptr) {
  std::vector<std::int64_t> seen;
  for (std::int64_t b = 0; b < loader.num_batches(); ++b) {
    const cd::Batch batch = loader.batch(b);
    EXPECT_EQ(batch.inputs.size(0), batch.labels.size(0));
    EXPECT_EQ(batch.inputs.size(1), 3);
    if (sizes) sizes->push_back(batch.labels.size(0));
    const float* x = batch.inputs.data<float>();
    const std::int64_t* y = batch.labels.data<std::int64_t>();
    for (std::int64_t r = 0; r < batch.labels.size(0); ++r) {
      for (int j = 0; j < 3; ++j) EXPECT_EQ(x[r * 3 + j], static_cast<float>(10 * y[r] + j));
      seen.push_back(y[r]);
    }
  }
  return seen;
}

TEST(DataLoader, EachIndexExactlyOncePerEpochWithPartialLastBatch) {
  const cd::Dataset ds = indexed_dataset(10);
  cd::DataLoader loader(ds, {.batch_size = 3, .shuffle = true, .seed = 42});
  EXPECT_EQ(loader.num_batches(), 4);
  for (std::int64_t epoch = 0; epoch < 3; ++epoch) {
    loader.set_epoch(epoch);
    std::vector<std::int64_t> sizes;
    std::vector<std::int64_t> seen = epoch_labels(loader, &sizes);
    EXPECT_EQ(sizes, (std::vector<std::int64_t>{3, 3, 3, 1}));
    EXPECT_EQ(seen, loader.order());
    std::sort(seen.begin(), seen.end());
    std::vector<std::int64_t> all(10);
    std::iota(all.begin(), all.end(), 0);
    EXPECT_EQ(seen, all) << "epoch " << epoch;
  }
}

TEST(DataLoader, OrderIsAPureFunctionOfSeedAndEpoch) {
  const cd::Dataset ds = indexed_dataset(100);
  cd::DataLoader a(ds, {.batch_size = 8, .seed = 7});
  cd::DataLoader b(ds, {.batch_size = 8, .seed = 7});
  const std::vector<std::int64_t> epoch0 = a.order();
  EXPECT_EQ(a.order(), b.order());
  a.set_epoch(5);
  const std::vector<std::int64_t> epoch5 = a.order();
  EXPECT_NE(epoch5, epoch0);
  a.set_epoch(6);
  EXPECT_NE(a.order(), epoch5);
  // A resumed run jumps straight to epoch 5 and sees the same batches.
  b.set_epoch(5);
  EXPECT_EQ(b.order(), epoch5);
  EXPECT_EQ(epoch_labels(b), epoch5);
  a.set_epoch(0);
  EXPECT_EQ(a.order(), epoch0);
  cd::DataLoader c(ds, {.batch_size = 8, .seed = 8});
  EXPECT_NE(c.order(), epoch0);
  std::vector<std::int64_t> identity(100);
  std::iota(identity.begin(), identity.end(), 0);
  EXPECT_NE(epoch0, identity);
}

TEST(DataLoader, NoShuffleKeepsDatasetOrder) {
  const cd::Dataset ds = indexed_dataset(7);
  cd::DataLoader loader(ds, {.batch_size = 4, .shuffle = false});
  loader.set_epoch(3);
  EXPECT_EQ(epoch_labels(loader), (std::vector<std::int64_t>{0, 1, 2, 3, 4, 5, 6}));
}

TEST(DataLoader, DropLast) {
  const cd::Dataset ds = indexed_dataset(10);
  cd::DataLoader loader(ds, {.batch_size = 3, .drop_last = true, .seed = 1});
  EXPECT_EQ(loader.num_batches(), 3);
  std::vector<std::int64_t> sizes;
  const std::vector<std::int64_t> seen = epoch_labels(loader, &sizes);
  EXPECT_EQ(sizes, (std::vector<std::int64_t>{3, 3, 3}));
  EXPECT_EQ(std::set<std::int64_t>(seen.begin(), seen.end()).size(), 9u);
  cd::DataLoader exact(indexed_dataset(9), {.batch_size = 3, .drop_last = true});
  EXPECT_EQ(exact.num_batches(), 3);
  cd::DataLoader tiny(indexed_dataset(2), {.batch_size = 3, .drop_last = true});
  EXPECT_EQ(tiny.num_batches(), 0);
}

TEST(DataLoader, RangeForVisitsEveryBatch) {
  const cd::Dataset ds = indexed_dataset(11);
  cd::DataLoader loader(ds, {.batch_size = 4, .seed = 3});
  std::int64_t batches = 0, rows = 0;
  std::vector<std::int64_t> seen;
  for (const cd::Batch& b : loader) {
    ++batches;
    rows += b.labels.size(0);
    const std::int64_t* y = b.labels.data<std::int64_t>();
    seen.insert(seen.end(), y, y + b.labels.size(0));
  }
  EXPECT_EQ(batches, 3);
  EXPECT_EQ(rows, 11);
  EXPECT_EQ(seen, loader.order());
}

TEST(DataLoader, MultiDimensionalAndNonContiguousInputs) {
  // Images [N, 1, 2, 2] whose pixels encode their example index.
  std::vector<float> px;
  for (int i = 0; i < 5; ++i)
    for (int k = 0; k < 4; ++k) px.push_back(static_cast<float>(100 * i + k));
  std::vector<std::int64_t> y{0, 1, 2, 3, 4};
  cd::Dataset ds{cg::from_vector(std::span<const float>(px), cg::Dims{5, 1, 2, 2}),
                 cg::from_vector(std::span<const std::int64_t>(y), cg::Dims{5}), 5};
  cd::DataLoader loader(ds, {.batch_size = 2, .seed = 9});
  const cd::Batch b = loader.batch(2);
  EXPECT_EQ(b.inputs.shape(), (cg::Dims{1, 1, 2, 2}));
  const std::int64_t who = b.labels.data<std::int64_t>()[0];
  EXPECT_EQ(b.inputs.data<float>()[3], static_cast<float>(100 * who + 3));

  // A transposed [3, 4] -> [4, 3] view: rows of the view, not of the storage.
  std::vector<float> base_v(12);
  std::iota(base_v.begin(), base_v.end(), 0.0f);
  const cg::Tensor base = cg::from_vector(std::span<const float>(base_v), cg::Dims{3, 4});
  std::vector<std::int64_t> y4{0, 1, 2, 3};
  cd::Dataset tds{base.t(), cg::from_vector(std::span<const std::int64_t>(y4), cg::Dims{4}), 4};
  cd::DataLoader tl(tds, {.batch_size = 4, .shuffle = false});
  const float* x = tl.batch(0).inputs.data<float>();
  EXPECT_EQ(std::vector<float>(x, x + 6), (std::vector<float>{0, 4, 8, 1, 5, 9}));
}

TEST(DataLoader, RejectsBadArguments) {
  const cd::Dataset ds = indexed_dataset(4);
  expect_error<cg::ValueError>([&] { cd::DataLoader l(ds, {.batch_size = 0}); }, {"batch_size must be positive", "0"});
  cd::Dataset bad = ds;
  bad.labels = cg::zeros({3}, {.dtype = cg::DType::Int64});
  expect_error<cg::ShapeError>([&] { cd::DataLoader l(bad, {}); }, {"same first dimension", "[4, 3]", "[3]"});
  cd::DataLoader loader(ds, {.batch_size = 3});
  expect_error<cg::ValueError>([&] { loader.batch(2); }, {"[0, 2)", "got 2"});
  expect_error<cg::ValueError>([&] { loader.set_epoch(-1); }, {"non-negative"});
}

TEST(DataLoader, EmptyDataset) {
  cd::DataLoader loader(indexed_dataset(0), {.batch_size = 4});
  EXPECT_EQ(loader.num_batches(), 0);
  int n = 0;
  for (const cd::Batch& b : loader) n += static_cast<int>(b.labels.numel());
  EXPECT_EQ(n, 0);
}

}  // namespace

// A batch large enough to be gathered on several threads holds the same rows, in the same order,
// as one gathered on one thread.
TEST(DataLoader, LargeBatchesAreTheSameForAnyThreadCount) {
  const std::int64_t n = 1000, features = 784;
  cd::Dataset ds;
  ds.inputs = cg::empty({n, features});
  ds.labels = cg::empty({n}, cg::DType::Int64);
  float* x = ds.inputs.data<float>();
  std::int64_t* y = ds.labels.data<std::int64_t>();
  for (std::int64_t i = 0; i < n * features; ++i) x[i] = static_cast<float>(i % 9973);
  for (std::int64_t i = 0; i < n; ++i) y[i] = i;
  ds.num_classes = n;
  cd::DataLoader loader(ds, {.batch_size = 300, .shuffle = true, .seed = 3});
  const int saved = cg::get_num_threads();
  std::vector<std::vector<float>> inputs;
  std::vector<std::vector<std::int64_t>> labels;
  for (int threads : {1, 2, 3}) {
    cg::set_num_threads(threads);
    const cd::Batch b = loader.batch(1);
    ASSERT_EQ(b.inputs.shape(), (cg::Dims{300, features}));
    inputs.emplace_back(b.inputs.data<float>(), b.inputs.data<float>() + b.inputs.numel());
    labels.emplace_back(b.labels.data<std::int64_t>(), b.labels.data<std::int64_t>() + b.labels.numel());
  }
  cg::set_num_threads(saved);
  for (std::size_t t = 1; t < inputs.size(); ++t) {
    EXPECT_EQ(inputs[t], inputs[0]);
    EXPECT_EQ(labels[t], labels[0]);
  }
  // Each row is the dataset row its label names.
  for (std::int64_t r = 0; r < 300; ++r) {
    const std::int64_t src = labels[0][static_cast<std::size_t>(r)];
    EXPECT_EQ(inputs[0][static_cast<std::size_t>(r * features + 5)], x[src * features + 5]);
  }
}
