// Atomic file writes and safetensors: round trips, layout, hostile headers, and a cross-check
// against a reader/writer written independently in Python (json + struct only).
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <numbers>
#include <numeric>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "chaingrad/error.hpp"
#include "chaingrad/io.hpp"
#include "chaingrad/tensor.hpp"
#include "test_util.hpp"

namespace cg = chaingrad;
namespace cio = chaingrad::io;
namespace fs = std::filesystem;

namespace {

class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    path_ = fs::temp_directory_path() / ("chaingrad_test_io_" + std::to_string(rd()) + std::to_string(rd()));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::permissions(path_, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::string str() const { return path_.string(); }
  std::vector<std::string> listing() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(path_)) names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }

 private:
  fs::path path_;
};

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

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

std::string le64(std::uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>(v >> (8 * i));
  return s;
}

std::uint64_t read_le64(std::string_view s) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(s[i]);
  return v;
}

// ---- atomic writes ----

TEST(AtomicFile, WritesAndReplacesLeavingNoTempFiles) {
  TempDir dir;
  const std::string p = dir.file("report.json");
  cio::write_file_atomic(p, "hello");
  EXPECT_EQ(read_all(p), "hello");
  cio::write_file_atomic(p, std::string_view("new\0contents", 12));
  EXPECT_EQ(read_all(p), std::string("new\0contents", 12));
  cio::write_file_atomic(p, "");
  EXPECT_EQ(read_all(p), "");
  EXPECT_EQ(dir.listing(), std::vector<std::string>{"report.json"});
}

TEST(AtomicFile, StreamsLargeWrites) {
  TempDir dir;
  std::string big(5'000'003, '\0');
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 31 + 7);
  {
    cio::AtomicFile f(dir.file("big.bin"));
    for (std::size_t pos = 0; pos < big.size(); pos += 65536)
      f.write(std::string_view(big).substr(pos, 65536));
    f.commit();
  }
  EXPECT_EQ(read_all(dir.file("big.bin")), big);
}

TEST(AtomicFile, UncommittedWriteLeavesTargetUntouched) {
  TempDir dir;
  const std::string p = dir.file("ckpt");
  cio::write_file_atomic(p, "old");
  {
    cio::AtomicFile f(p);
    f.write("partial new contents");
    EXPECT_EQ(f.temp_path().rfind(p + ".tmp.", 0), 0u) << f.temp_path();
    EXPECT_TRUE(fs::exists(f.temp_path()));
    EXPECT_EQ(read_all(p), "old");
  }  // destroyed without commit: an interrupted save
  EXPECT_EQ(read_all(p), "old");
  EXPECT_EQ(dir.listing(), std::vector<std::string>{"ckpt"});
}

TEST(AtomicFile, MissingDirectoryNamesPathAndReason) {
  TempDir dir;
  const std::string p = dir.file("no/such/dir/out.txt");
  expect_error([&] { cio::write_file_atomic(p, "x"); }, {p, "No such file or directory"});
  cio::write_file_atomic(dir.file("plain"), "x");
  expect_error([&] { cio::write_file_atomic(dir.file("plain/inside"), "x"); },
               {dir.file("plain/inside"), "Not a directory"});
}

TEST(AtomicFile, FailedRenameRemovesTheTempFile) {
  TempDir dir;
  const std::string p = dir.file("occupied");
  fs::create_directory(p);
  fs::create_directory(p + "/child");  // rename(2) cannot replace a non-empty directory
  expect_error([&] { cio::write_file_atomic(p, "x"); }, {p, "renaming"});
  EXPECT_EQ(dir.listing(), std::vector<std::string>{"occupied"});
}

TEST(AtomicFile, UnwritableDirectory) {
  if (::geteuid() == 0) GTEST_SKIP() << "root ignores directory permissions";
  TempDir dir;
  fs::create_directory(dir.file("ro"));
  fs::permissions(dir.file("ro"), fs::perms::owner_read | fs::perms::owner_exec);
  expect_error([&] { cio::write_file_atomic(dir.file("ro/f"), "x"); }, {dir.file("ro/f"), "Permission denied"});
}

TEST(AtomicFile, MisuseIsAnError) {
  TempDir dir;
  cio::AtomicFile f(dir.file("a"));
  f.write("1");
  f.commit();
  expect_error([&] { f.write("2"); }, {"already committed"});
  expect_error([&] { f.commit(); }, {"already committed"});
  EXPECT_EQ(read_all(dir.file("a")), "1");
  expect_error([&] { cio::write_file_atomic("", "x"); }, {"empty"});
}

TEST(AtomicFile, KeepsTheReplacedFilesPermissions) {
  TempDir dir;
  const std::string p = dir.file("secret");
  cio::write_file_atomic(p, "v1");
  fs::permissions(p, fs::perms::owner_read | fs::perms::owner_write);
  cio::write_file_atomic(p, "v2");
  EXPECT_EQ(fs::status(p).permissions() & fs::perms::all, fs::perms::owner_read | fs::perms::owner_write);
  EXPECT_EQ(read_all(p), "v2");
}

// ---- safetensors round trip ----

cg::Tensor f32(std::vector<float> v, const cg::Dims& shape) { return cg::from_vector(std::span<const float>(v), shape); }

void expect_same(const cg::Tensor& a, const cg::Tensor& b, const std::string& name) {
  ASSERT_TRUE(b.defined()) << name;
  EXPECT_EQ(a.dtype(), b.dtype()) << name;
  EXPECT_EQ(a.shape(), b.shape()) << name;
  EXPECT_TRUE(b.is_contiguous()) << name;
  if (a.dtype() == cg::DType::Int64) {
    const cg::Tensor ac = a.contiguous();
    const std::int64_t* pa = ac.data<std::int64_t>();
    const std::int64_t* pb = b.data<std::int64_t>();
    EXPECT_EQ(std::vector<std::int64_t>(pa, pa + a.numel()), std::vector<std::int64_t>(pb, pb + b.numel())) << name;
  } else {
    EXPECT_EQ(a.to_vector<double>(), b.to_vector<double>()) << name;
  }
}

TEST(Safetensors, RoundTripsEveryDtypeViewsAndMetadata) {
  TempDir dir;
  const std::string p = dir.file("model.safetensors");
  const cg::Tensor base = f32({1, 2, 3, 4, 5, 6}, {3, 2});
  std::vector<double> dv{std::numbers::pi, -0.0, 1e-310, std::numeric_limits<double>::infinity()};
  std::vector<std::int64_t> iv{-1, 0, std::int64_t{1} << 40, std::numeric_limits<std::int64_t>::max()};
  const std::vector<std::pair<std::string, cg::Tensor>> tensors = {
      {"odd", f32({0.1f, 0.2f, 0.3f}, {3})},
      {"layers.0.weight", f32({-0.5f, 0.5f, 1.5f, 2.5f, 3.5f, 4.5f}, {2, 3})},
      {"transposed", base.t()},
      {"d", cg::from_vector(std::span<const double>(dv), {4}, {.dtype = cg::DType::Float64})},
      {"idx", cg::from_vector(std::span<const std::int64_t>(iv), {2, 2})},
      {"bytes", cg::from_vector(std::vector<double>{0, 7, 255}, {3}, {.dtype = cg::DType::UInt8})},
      {"scalar", cg::scalar(2.5)},
      {"empty", cg::zeros({0, 5})},
  };
  ASSERT_FALSE(tensors[2].second.is_contiguous());
  const std::map<std::string, std::string> meta{{"format", "pt"}, {"epoch", "3"}, {"note", "\xC3\xBC \"quoted\""}};
  cio::save_safetensors(p, tensors, meta);
  EXPECT_EQ(dir.listing(), std::vector<std::string>{"model.safetensors"});

  const cio::SafetensorsFile f = cio::load_safetensors(p);
  EXPECT_EQ(f.metadata, meta);
  ASSERT_EQ(f.tensors.size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    const cg::Tensor* got = f.find(name);
    ASSERT_NE(got, nullptr) << name;
    expect_same(t, *got, name);
  }
  EXPECT_EQ(f.find("missing"), nullptr);
  const float* tr = f.find("transposed")->data<float>();
  EXPECT_EQ(std::vector<float>(tr, tr + 6), (std::vector<float>{1, 3, 5, 2, 4, 6}));

  // Layout: 8-byte elements first (stable), so every tensor starts aligned to its element size.
  std::vector<std::string> order;
  for (const auto& [name, _] : f.tensors) order.push_back(name);
  EXPECT_EQ(order,
            (std::vector<std::string>{"d", "idx", "scalar", "odd", "layers.0.weight", "transposed", "empty", "bytes"}));
  const std::string bytes = read_all(p);
  const std::uint64_t header_len = read_le64(bytes);
  EXPECT_EQ(header_len % 8, 0u);
  EXPECT_EQ(bytes[8], '{');
  const std::string header = bytes.substr(8, header_len);
  EXPECT_NE(header.find("\"__metadata__\""), std::string::npos);
  EXPECT_NE(header.find("\"dtype\":\"I64\""), std::string::npos);
  EXPECT_NE(header.find("\"dtype\":\"U8\""), std::string::npos);
  EXPECT_EQ(bytes.size(), 8 + header_len + 4 * 8 + 4 * 8 + 8 + 3 * 4 + 6 * 4 + 6 * 4 + 3);
}

TEST(Safetensors, OverwritesAtomicallyAndRejectsBadInput) {
  TempDir dir;
  const std::string p = dir.file("m.safetensors");
  cio::save_safetensors(p, {{"a", f32({1}, {1})}});
  cio::save_safetensors(p, {{"b", f32({2, 3}, {2})}});
  const cio::SafetensorsFile f = cio::load_safetensors(p);
  ASSERT_EQ(f.tensors.size(), 1u);
  EXPECT_EQ(f.tensors[0].first, "b");
  EXPECT_TRUE(f.metadata.empty());

  expect_error<cg::ValueError>([&] { cio::save_safetensors(p, {{"x", f32({1}, {1})}, {"x", f32({2}, {1})}}); },
                               {p, "\"x\" appears more than once"});
  expect_error<cg::ValueError>([&] { cio::save_safetensors(p, {{"u", cg::Tensor()}}); }, {"\"u\" is undefined"});
  expect_error<cg::ValueError>([&] { cio::save_safetensors(p, {{"__metadata__", f32({1}, {1})}}); }, {"reserved"});
  EXPECT_EQ(cio::load_safetensors(p).tensors[0].first, "b");  // failed saves left the file alone
  EXPECT_EQ(dir.listing(), std::vector<std::string>{"m.safetensors"});
}

TEST(Safetensors, EmptyFileOfTensors) {
  TempDir dir;
  cio::save_safetensors(dir.file("e"), {});
  const cio::SafetensorsFile f = cio::load_safetensors(dir.file("e"));
  EXPECT_TRUE(f.tensors.empty());
  EXPECT_TRUE(f.metadata.empty());
}

TEST(Safetensors, ReadsHalfAndBfloat16AsFloat32) {
  TempDir dir;
  const std::string header =
      R"({"h":{"dtype":"F16","shape":[5],"data_offsets":[0,10]},"b":{"dtype":"BF16","shape":[2],"data_offsets":[10,14]}})";
  std::string data;
  for (std::uint16_t v : {0x3c00, 0xc000, 0x3800, 0x0001, 0x7c00, 0x3f80, 0xc049}) {
    data += static_cast<char>(v & 0xff);
    data += static_cast<char>(v >> 8);
  }
  write_bytes(dir.file("h"), le64(header.size()) + header + data);
  const cio::SafetensorsFile f = cio::load_safetensors(dir.file("h"));
  const cg::Tensor* h = f.find("h");
  ASSERT_NE(h, nullptr);
  EXPECT_EQ(h->dtype(), cg::DType::Float32);
  const float* hp = h->data<float>();
  EXPECT_EQ(hp[0], 1.0f);
  EXPECT_EQ(hp[1], -2.0f);
  EXPECT_EQ(hp[2], 0.5f);
  EXPECT_EQ(hp[3], std::ldexp(1.0f, -24));  // the smallest half subnormal
  EXPECT_TRUE(std::isinf(hp[4]) && hp[4] > 0);
  const float* bp = f.find("b")->data<float>();
  EXPECT_EQ(bp[0], 1.0f);
  EXPECT_EQ(bp[1], -3.140625f);
}

// ---- hostile files ----

// A safetensors file from raw parts; `declared_len` overrides the header length prefix.
std::string hostile(const TempDir& dir, const std::string& header, const std::string& data,
                    std::optional<std::uint64_t> declared_len = std::nullopt) {
  static int counter = 0;
  const std::string p = dir.file("hostile" + std::to_string(counter++) + ".safetensors");
  write_bytes(p, le64(declared_len.value_or(header.size())) + header + data);
  return p;
}

void expect_load_error(const std::string& path, std::initializer_list<std::string_view> words) {
  SCOPED_TRACE(path);
  expect_error([&] { cio::load_safetensors(path); }, words);
  // Every message names the file.
  try {
    cio::load_safetensors(path);
  } catch (const cg::IoError& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
}

const std::string kEight(8, '\0');

TEST(SafetensorsHostile, FileAndHeaderLength) {
  TempDir dir;
  expect_error([&] { cio::load_safetensors(dir.file("absent")); }, {dir.file("absent"), "no such file"});
  write_bytes(dir.file("tiny"), "abc");
  expect_load_error(dir.file("tiny"), {"is 3 bytes", "8-byte header length"});
  expect_load_error(hostile(dir, "{}", "", 200'000'000), {"header length 200000000", "100 MB"});
  expect_load_error(hostile(dir, "{}", "", 50), {"header length 50", "runs past the end", "at most 2"});
  expect_load_error(hostile(dir, "", ""), {"empty header"});
  expect_load_error(hostile(dir, "[1, 2]", ""), {"JSON object starting with '{'", "[1, 2]"});
}

TEST(SafetensorsHostile, InvalidJson) {
  TempDir dir;
  expect_load_error(hostile(dir, R"({"a": {"dtype": "F32", )", ""), {"not valid JSON"});
  expect_load_error(hostile(dir, "{}\x01", ""), {"not valid JSON"});
}

TEST(SafetensorsHostile, EntryStructure) {
  TempDir dir;
  expect_load_error(hostile(dir, R"({"a": 5})", ""), {"tensor \"a\"", "must map to an object", "got 5"});
  expect_load_error(hostile(dir, R"({"a": {"dtype":"F32","shape":[1]}})", ""), {"no \"data_offsets\" field"});
  expect_load_error(hostile(dir, R"({"a": {"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}})", "abcd"),
                    {"unexpected field \"x\""});
  expect_load_error(hostile(dir, R"({"a": {"dtype":7,"shape":[1],"data_offsets":[0,4]}})", "abcd"),
                    {"dtype must be a string"});
  expect_load_error(hostile(dir, R"({"a": {"dtype":"F32","shape":3,"data_offsets":[0,4]}})", "abcd"),
                    {"shape must be an array"});
  expect_load_error(hostile(dir, R"({"a": {"dtype":"F32","shape":[1],"data_offsets":[0]}})", "abcd"),
                    {"data_offsets must be [begin, end]", "[0]"});
  expect_load_error(hostile(dir, R"({"__metadata__": {"k": 1}})", ""), {"metadata \"k\" must be a string"});
  expect_load_error(hostile(dir, R"({"__metadata__": []})", ""), {"\"__metadata__\" must be an object"});
}

TEST(SafetensorsHostile, UnknownDtypeIsNamed) {
  TempDir dir;
  expect_load_error(hostile(dir, R"({"w": {"dtype":"I32","shape":[1],"data_offsets":[0,4]}})", "abcd"),
                    {"tensor \"w\"", "\"I32\"", "F32, F64, I64"});
}

TEST(SafetensorsHostile, BadDims) {
  TempDir dir;
  expect_load_error(hostile(dir, R"({"w": {"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", "abcd"),
                    {"shape[0]", "non-negative", "-1"});
  expect_load_error(hostile(dir, R"({"w": {"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", "abcd"),
                    {"shape[0]", "integer", "1.5"});
  expect_load_error(
      hostile(dir, R"({"w": {"dtype":"F32","shape":[1,1,1,1,1,1,1,1,1],"data_offsets":[0,4]}})", "abcd"),
      {"9 dimensions", "at most 8"});
  expect_load_error(
      hostile(dir, R"({"w": {"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,4]}})", "abcd"),
      {"more than 2^64", "span 4"});
}

TEST(SafetensorsHostile, ShapeMustMatchByteRange) {
  TempDir dir;
  expect_load_error(hostile(dir, R"({"w": {"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", kEight),
                    {"tensor \"w\"", "[3]", "need 12 bytes", "span 8"});
}

TEST(SafetensorsHostile, OffsetsOutOfBoundsOrReversed) {
  TempDir dir;
  expect_load_error(hostile(dir, R"({"w": {"dtype":"F32","shape":[25],"data_offsets":[0,100]}})", kEight),
                    {"out of bounds", "[0, 100]", "has 8 bytes"});
  expect_load_error(hostile(dir, R"({"w": {"dtype":"F32","shape":[0],"data_offsets":[8,4]}})", kEight),
                    {"begin <= end"});
  expect_load_error(hostile(dir, R"({"w": {"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", kEight),
                    {"data_offsets[0]", "non-negative"});
}

TEST(SafetensorsHostile, RangesMustTileTheDataSection) {
  TempDir dir;
  const std::string twelve(12, '\0');
  expect_load_error(hostile(dir,
                            R"({"a": {"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                                "b": {"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                            twelve),
                    {"tensor \"b\"", "overlap tensor \"a\""});
  expect_load_error(hostile(dir,
                            R"({"a": {"dtype":"F32","shape":[1],"data_offsets":[0,4]},
                                "b": {"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                            twelve),
                    {"tensor \"b\" starts at byte 8", "previous tensor ends at 4", "contiguous"});
  expect_load_error(hostile(dir, R"({"a": {"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", kEight),
                    {"starts at byte 4", "ends at 0"});
  expect_load_error(hostile(dir, R"({"a": {"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", kEight),
                    {"data section has 8 bytes", "cover only 4"});
}

TEST(SafetensorsHostile, DuplicateKeysAtAnyDepth) {
  TempDir dir;
  expect_load_error(hostile(dir,
                            R"({"a": {"dtype":"F32","shape":[1],"data_offsets":[0,4]},
                                "a": {"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                            kEight),
                    {"key \"a\" more than once"});
  expect_load_error(
      hostile(dir, R"({"a": {"dtype":"F64","dtype":"F32","shape":[1],"data_offsets":[0,4]}})", "abcd"),
      {"key \"dtype\" more than once"});
}

TEST(SafetensorsHostile, HeaderPaddingWithSpacesIsFine) {
  TempDir dir;
  const std::string p = hostile(dir, R"({"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}      )",
                                std::string("\0\0\x80\x3f", 4));
  const cio::SafetensorsFile f = cio::load_safetensors(p);
  ASSERT_NE(f.find("a"), nullptr);
  EXPECT_EQ(f.find("a")->dim(), 0);
  EXPECT_EQ(f.find("a")->data<float>()[0], 1.0f);
}

TEST(SafetensorsHostile, RandomCorruptionThrowsIoErrorOrLoads) {
  // Whatever the bytes, the reader either loads or throws IoError: never crashes, never throws
  // anything else (a json type_error escaping would mean a missing check).
  TempDir dir;
  const std::string p = dir.file("valid");
  std::vector<std::int64_t> iv{1, 2, 3};
  cio::save_safetensors(p, {{"a", f32({1, 2, 3, 4}, {2, 2})}, {"b", cg::from_vector(std::span<const std::int64_t>(iv), {3})}},
                        {{"k", "v"}});
  const std::string good = read_all(p);
  std::mt19937_64 rng(1234);
  int loaded = 0, rejected = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    std::string bad = good;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < edits; ++k) {
      const std::size_t pos = rng() % bad.size();
      switch (rng() % 4) {
        case 0: bad[pos] = static_cast<char>(rng()); break;
        case 1: bad[pos] = "{}[]\":,0123456789-.e \\"[rng() % 20]; break;
        case 2: bad.resize(pos); break;
        default: bad.insert(pos, 1, "0123456789\",-"[rng() % 13]); break;
      }
      if (bad.empty()) bad.push_back('x');  // not `bad = "x"`: GCC 12 warns falsely (-Wrestrict)
    }
    const std::string q = dir.file("fuzz");
    write_bytes(q, bad);
    try {
      cio::load_safetensors(q);
      ++loaded;
    } catch (const cg::IoError& e) {
      ++rejected;
      ASSERT_NE(std::string(e.what()).find(q), std::string::npos) << e.what();
    }
  }
  EXPECT_GT(rejected, 1000);
  EXPECT_GT(loaded, 0);  // e.g. edits inside the data section
}

// ---- cross-check with an independent implementation ----

bool have_python() { return fs::exists("/usr/bin/python3"); }

std::string run_capture(const std::string& cmd) {
  std::string out;
  FILE* pipe = ::popen(cmd.c_str(), "r");
  if (!pipe) return out;
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, pipe)) > 0) out.append(buf, n);
  const int status = ::pclose(pipe);
  if (status != 0) out += "\n[exit status " + std::to_string(status) + "]";
  return out;
}

TEST(SafetensorsCrossCheck, ReadsAFileWrittenByPython) {
  if (!have_python()) GTEST_SKIP() << "/usr/bin/python3 not found";
  TempDir dir;
  write_bytes(dir.file("w.py"), R"(import json, struct, sys
f32 = struct.pack('<3f', 1.5, -2.0, 0.25)
i64 = struct.pack('<2q', -7, 1 << 40)
f64 = struct.pack('<d', 3.141592653589793)
hdr = {"__metadata__": {"format": "pt"},
       "w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
       "idx": {"dtype": "I64", "shape": [2, 1], "data_offsets": [12, 28]},
       "pi": {"dtype": "F64", "shape": [], "data_offsets": [28, 36]}}
h = json.dumps(hdr).encode()
open(sys.argv[1], 'wb').write(struct.pack('<Q', len(h)) + h + f32 + i64 + f64)
)");
  const std::string out = run_capture("/usr/bin/python3 " + dir.file("w.py") + " " + dir.file("py.safetensors") + " 2>&1");
  ASSERT_EQ(out, "");
  const cio::SafetensorsFile f = cio::load_safetensors(dir.file("py.safetensors"));
  EXPECT_EQ(f.metadata.at("format"), "pt");
  EXPECT_EQ(f.find("w")->to_vector<double>(), (std::vector<double>{1.5, -2.0, 0.25}));
  EXPECT_EQ(f.find("idx")->shape(), (cg::Dims{2, 1}));
  EXPECT_EQ(f.find("idx")->data<std::int64_t>()[0], -7);
  EXPECT_EQ(f.find("idx")->data<std::int64_t>()[1], std::int64_t{1} << 40);
  EXPECT_EQ(f.find("pi")->item(), 3.141592653589793);
  EXPECT_EQ(f.find("pi")->dtype(), cg::DType::Float64);
}

TEST(SafetensorsCrossCheck, PythonReadsOurFile) {
  if (!have_python()) GTEST_SKIP() << "/usr/bin/python3 not found";
  TempDir dir;
  const cg::Tensor base = f32({1, 2, 3, 4, 5, 6}, {2, 3});
  std::vector<std::int64_t> iv{-3, 9};
  cio::save_safetensors(dir.file("ours.safetensors"),
                        {{"t", base.t()},
                         {"i", cg::from_vector(std::span<const std::int64_t>(iv), {2})},
                         {"s", cg::scalar(0.125)}},
                        {{"k", "v"}});
  write_bytes(dir.file("r.py"), R"(import json, struct, sys
b = open(sys.argv[1], 'rb').read()
n = struct.unpack('<Q', b[:8])[0]
assert n % 8 == 0, n
h = json.loads(b[8:8 + n])
data = b[8 + n:]
fmt = {'F32': 'f', 'F64': 'd', 'I64': 'q'}
ends = []
for name in sorted(k for k in h if k != '__metadata__'):
    e = h[name]
    s, t = e['data_offsets']
    ends.append((s, t))
    c = fmt[e['dtype']]
    vals = struct.unpack('<%d%s' % ((t - s) // struct.calcsize(c), c), data[s:t])
    print(name, e['dtype'], e['shape'], list(vals))
ends.sort()
assert ends[0][0] == 0 and ends[-1][1] == len(data)
print(h['__metadata__'])
)");
  const std::string out = run_capture("/usr/bin/python3 " + dir.file("r.py") + " " + dir.file("ours.safetensors") + " 2>&1");
  EXPECT_EQ(out,
            "i I64 [2] [-3, 9]\n"
            "s F64 [] [0.125]\n"
            "t F32 [3, 2] [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]\n"
            "{'k': 'v'}\n");
}

}  // namespace
