// IDX reader (the MNIST family). Layout: magic 00 00 <type> <ndim>, then ndim big-endian u32
// dims, then the elements row-major. Files are read through zlib, which decompresses .gz and
// passes plain files through unchanged; a .gz file of one gzip member is first tried whole with
// libdeflate, which inflates it 2.7 times as fast (see inflate_whole).
//
// Note [untrusted IDX header]: the dims come from the file, so their product may be absurd.
// For a plain file we compare it with the file size before allocating anything; a gzip file
// inflated whole has its true size known before its elements are read; for a gzip stream read
// through zlib the size is unknowable up front, so the buffer grows chunk by chunk as data
// actually arrives and a short stream fails before a huge allocation happens.
#include <libdeflate.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <new>
#include <sstream>
#include <string>
#include <vector>

#include "chaingrad/data.hpp"
#include "chaingrad/error.hpp"

namespace chaingrad::data {
namespace {

namespace fs = std::filesystem;

constexpr std::size_t kChunk = std::size_t{64} << 20;         // bytes read per gzread call
constexpr std::uint64_t kMaxElements = std::uint64_t{1} << 40;  // far beyond any real IDX file

// Note [in-place widening]: an inflated file of S bytes (header and elements) goes into the last
// S bytes of a tensor of S elements of w bytes each (float32 for images, int64 for labels), and
// each element is widened in place, front to back: element i's bytes of width w go to w (H + i),
// where H is the header's length, and its source byte lies at (w - 1) S + H + i. A write never
// reaches a source byte not yet read (w (H + i + 1) <= (w - 1) S + H + i + 1 as long as i < S - H),
// so the result needs no buffer besides the tensor: the training images peak at 188 MB, not at
// 188 + 47. The tensor is a view from element H on.
struct Inflated {
  Tensor storage;                // S elements
  std::uint8_t* bytes = nullptr; // the file's S bytes, in the storage's last S bytes
  std::size_t size = 0;          // S
};

struct IdxArray {
  std::vector<std::int64_t> dims;
  std::vector<std::uint8_t> streamed;  // the elements, read through zlib
  Inflated whole;                      // or the whole inflated file, the elements from `offset` on
  std::size_t offset = 0;
  const std::uint8_t* data() const { return whole.bytes ? whole.bytes + offset : streamed.data(); }
  std::size_t size() const { return whole.bytes ? whole.size - offset : streamed.size(); }
};

std::string hex_bytes(const unsigned char* b, std::size_t n) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (std::size_t i = 0; i < n; ++i) {
    if (i) s += ' ';
    s += digits[b[i] >> 4];
    s += digits[b[i] & 15];
  }
  return s;
}

const char* idx_type_name(unsigned t) {
  switch (t) {
    case 0x08: return "unsigned byte";
    case 0x09: return "signed byte";
    case 0x0B: return "int16";
    case 0x0C: return "int32";
    case 0x0D: return "float32";
    case 0x0E: return "float64";
    default: return "unknown";
  }
}

struct GzCloser {
  void operator()(gzFile_s* f) const { gzclose(f); }
};
struct DecompressorFree {
  void operator()(libdeflate_decompressor* d) const { libdeflate_free_decompressor(d); }
};

// The whole of a single-member gzip file, inflated by libdeflate: 94 ms for the Fashion-MNIST
// training images on an AMD EPYC, against 250 ms for zlib's inflate. It succeeds only when the
// file is one gzip member that inflates, checksum included, to exactly the size its trailer
// declares; otherwise it returns false and the caller reads the file through zlib, which handles
// every other case (plain files, several members, more than 4 GiB) and words every error. The
// trailer's size is trusted only up to deflate's largest expansion of the file's own size.
bool inflate_whole(const std::string& path, std::uint64_t file_size, DType widen_to, Inflated& out) {
  constexpr std::uint64_t kGzipFraming = 18;  // the smallest header plus the trailer
  constexpr std::uint64_t kMaxExpansion = 1032;
  if (file_size <= kGzipFraming) return false;
  // (Read, not mapped: a file truncated while mapped would kill the process with SIGBUS.)
  std::unique_ptr<std::FILE, decltype(&std::fclose)> file(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!file) return false;
  unsigned char magic[2] = {};
  if (std::fread(magic, 1, 2, file.get()) != 2 || magic[0] != 0x1f || magic[1] != 0x8b) return false;
  const auto n = static_cast<std::size_t>(file_size);
  const std::unique_ptr<unsigned char[]> buffer(new (std::nothrow) unsigned char[n]);
  if (!buffer) return false;
  buffer[0] = magic[0];
  buffer[1] = magic[1];
  if (std::fread(buffer.get() + 2, 1, n - 2, file.get()) != n - 2) return false;
  const unsigned char* packed = buffer.get();
  const unsigned char* t = packed + file_size - 4;
  const std::uint64_t size = std::uint64_t{t[0]} | (std::uint64_t{t[1]} << 8) | (std::uint64_t{t[2]} << 16) |
                             (std::uint64_t{t[3]} << 24);
  if (size == 0 || size > kMaxExpansion * file_size) return false;
  const std::unique_ptr<libdeflate_decompressor, DecompressorFree> d(libdeflate_alloc_decompressor());
  if (!d) return false;
  Inflated whole;
  whole.size = static_cast<std::size_t>(size);
  try {  // (uninitialized: a claimed size that is never filled is never touched)
    whole.storage = empty({static_cast<std::int64_t>(size)}, widen_to);
  } catch (const std::exception&) {
    return false;  // too large to hold at once: zlib streams it
  }
  whole.bytes = static_cast<std::uint8_t*>(whole.storage.raw_data()) + (element_size(widen_to) - 1) * whole.size;
  std::size_t used = 0, made = 0;
  const libdeflate_result r =
      libdeflate_gzip_decompress_ex(d.get(), packed, n, whole.bytes, whole.size, &used, &made);
  if (r != LIBDEFLATE_SUCCESS || used != n || made != whole.size) return false;
  out = std::move(whole);
  return true;
}

class IdxFile {
 public:
  // `widen_to`: the dtype the elements become (Note [in-place widening]).
  IdxFile(const std::string& path, const char* op, DType widen_to) : path_(path), op_(op) {
    std::error_code ec;
    CG_CHECK(fs::exists(path, ec), IoError, op, ": cannot open '", path, "': no such file");
    CG_CHECK(!fs::is_directory(path, ec), IoError, op, ": '", path, "' is a directory; expected an IDX file");
    file_size_ = fs::file_size(path, ec);
    CG_CHECK(!ec, IoError, op, ": cannot read the size of '", path, "': ", ec.message());
    if (inflate_whole(path, file_size_, widen_to, whole_)) return;
    errno = 0;
    f_.reset(gzopen(path.c_str(), "rb"));
    CG_CHECK(f_ != nullptr, IoError, op, ": cannot open '", path, "': ", std::strerror(errno ? errno : ENOMEM));
    gzbuffer(f_.get(), 1 << 17);
  }

  // Reads up to n bytes; returns how many arrived (short only at end of stream).
  std::size_t read(void* dst, std::size_t n) {
    if (!f_) {  // inflated whole
      const std::size_t got = std::min(n, remaining());
      std::memcpy(dst, whole_.bytes + consumed_, got);
      consumed_ += got;
      return got;
    }
    auto* out = static_cast<unsigned char*>(dst);
    std::size_t got = 0;
    while (got < n) {
      const auto want = static_cast<unsigned>(std::min(n - got, kChunk));
      const int r = gzread(f_.get(), out + got, want);
      if (r < 0) {
        int errnum = 0;
        const char* msg = gzerror(f_.get(), &errnum);
        detail::throw_error<IoError>(op_, ": '", path_, "' is corrupt or truncated after ", consumed_ + got,
                                     " decompressed bytes: ", msg);
      }
      if (r == 0) break;
      got += static_cast<std::size_t>(r);
    }
    consumed_ += got;
    return got;
  }

  bool compressed() const { return !f_ || gzdirect(f_.get()) == 0; }
  // Inflated whole (inflate_whole): the rest of the data is in memory, and take_whole() hands it
  // over without a copy (the unread part starts at consumed()).
  bool in_memory() const { return !f_; }
  std::size_t remaining() const { return whole_.size - static_cast<std::size_t>(consumed_); }
  Inflated take_whole() { return std::move(whole_); }
  std::uint64_t file_size() const { return file_size_; }
  std::uint64_t consumed() const { return consumed_; }
  const std::string& path() const { return path_; }
  const char* op() const { return op_; }

 private:
  std::string path_;
  const char* op_;
  std::unique_ptr<gzFile_s, GzCloser> f_;  // null when inflated whole
  Inflated whole_;
  std::uint64_t file_size_ = 0;
  std::uint64_t consumed_ = 0;
};

std::string where(const IdxFile& f) { return f.compressed() ? " (after decompression)" : ""; }

IdxArray read_idx(const std::string& path, const char* op, DType widen_to) {
  IdxFile f(path, op, widen_to);
  unsigned char magic[4];
  const std::size_t got_magic = f.read(magic, 4);
  CG_CHECK(got_magic == 4, IoError, op, ": '", path, "' is truncated: an IDX header needs at least 4 bytes; found ",
           got_magic);
  CG_CHECK(magic[0] == 0 && magic[1] == 0 && magic[2] == 0x08 && magic[3] >= 1, IoError, op, ": '", path,
           "' is not an unsigned-byte IDX file: magic number bytes are ", hex_bytes(magic, 4),
           "; expected 00 00 08 <ndim >= 1>",
           (magic[0] == 0 && magic[1] == 0 && magic[2] != 0x08
                ? std::string(" (element type 0x") + hex_bytes(magic + 2, 1) + " = " + idx_type_name(magic[2]) +
                      " is not supported; only 0x08 = unsigned byte is)"
                : std::string()));
  const int ndim = magic[3];
  CG_CHECK(ndim <= kMaxDims - 1, IoError, op, ": '", path, "' has ", ndim, " dimensions; at most ", kMaxDims - 1,
           " are supported");

  std::array<unsigned char, 4 * kMaxDims> raw{};
  const std::size_t header_dims = 4 * static_cast<std::size_t>(ndim);
  const std::size_t got_dims = f.read(raw.data(), header_dims);
  CG_CHECK(got_dims == header_dims, IoError, op, ": '", path, "' is truncated: the header declares ", ndim,
           " dimensions (", 4 + header_dims, " header bytes) but only ", 4 + got_dims, " bytes are present",
           where(f));

  IdxArray a;
  std::uint64_t numel = 1;
  bool absurd = false;
  for (int i = 0; i < ndim; ++i) {
    const unsigned char* p = raw.data() + 4 * i;
    const std::uint64_t d = (std::uint64_t{p[0]} << 24) | (std::uint64_t{p[1]} << 16) |
                            (std::uint64_t{p[2]} << 8) | std::uint64_t{p[3]};
    a.dims.push_back(static_cast<std::int64_t>(d));
    if (d != 0 && numel > kMaxElements / d) absurd = true;
    numel *= d;
  }
  std::ostringstream dims_text;
  dims_text << Dims(a.dims);
  CG_CHECK(!absurd && numel <= kMaxElements, IoError, op, ": '", path, "' header declares dims ",
           dims_text.str(), ", more than ", kMaxElements, " elements; the header is corrupt");

  const std::uint64_t expected = 4 + header_dims + numel;
  // See Note [untrusted IDX header].
  if (!f.compressed()) {
    CG_CHECK(f.file_size() >= expected, IoError, op, ": '", path, "' is truncated: dims ", dims_text.str(),
             " need ", expected, " bytes (", 4 + header_dims, " header + ", numel, " data); the file has ",
             f.file_size());
    CG_CHECK(f.file_size() == expected, IoError, op, ": '", path, "' has ", f.file_size() - expected,
             " trailing bytes: dims ", dims_text.str(), " need exactly ", expected, " bytes; the file has ",
             f.file_size());
  }
  auto truncated = [&](std::uint64_t have) {
    detail::throw_error<IoError>(op, ": '", path, "' is truncated: dims ", dims_text.str(), " need ", expected,
                                 " bytes (", 4 + header_dims, " header + ", numel, " data) but only ",
                                 4 + header_dims + have, " are present", where(f));
  };
  if (f.in_memory()) {  // the same checks as the loop below, on data whose size is known
    if (f.remaining() < numel) truncated(f.remaining());
    CG_CHECK(f.remaining() == numel, IoError, op, ": '", path, "' has trailing data after the ", expected,
             " bytes that dims ", dims_text.str(), " need", where(f));
    a.offset = static_cast<std::size_t>(f.consumed());
    a.whole = f.take_whole();
    return a;
  }
  std::uint64_t have = 0;
  while (have < numel) {
    const std::size_t chunk = static_cast<std::size_t>(std::min<std::uint64_t>(numel - have, kChunk));
    a.streamed.resize(static_cast<std::size_t>(have) + chunk);
    const std::size_t r = f.read(a.streamed.data() + have, chunk);
    have += r;
    if (r != chunk) truncated(have);
  }
  if (f.compressed()) {
    unsigned char extra;
    CG_CHECK(f.read(&extra, 1) == 0, IoError, op, ": '", path, "' has trailing data after the ", expected,
             " bytes that dims ", dims_text.str(), " need", where(f));
  }
  return a;
}

std::string join_path(const std::string& dir, const std::string& name) {
  return (fs::path(dir) / name).string();
}

// Prefers the plain file, then the .gz one; returns "" when neither exists.
std::string find_idx_file(const std::string& dir, const std::string& stem) {
  std::error_code ec;
  for (const std::string& name : {stem, stem + ".gz"}) {
    const std::string p = join_path(dir, name);
    if (fs::is_regular_file(p, ec)) return p;
  }
  return "";
}

bool is_default_dir(const std::string& dir) {
  fs::path p = fs::path(dir).lexically_normal();
  if (!p.has_filename()) p = p.parent_path();  // "dir/" -> "dir"
  return p == fs::path(kFashionMnistDir);
}

// The tensor the elements widen into: in place over the inflated file (Note [in-place widening]),
// else a fresh one.
Tensor widened(const IdxArray& a, const Dims& shape, DType dtype) {
  if (!a.whole.bytes) return empty(shape, dtype);
  const auto h = static_cast<std::int64_t>(a.offset);
  return a.whole.storage.slice(0, h, h + static_cast<std::int64_t>(a.size())).view(shape);
}

}  // namespace

Tensor read_idx_bytes(const std::string& path) {
  IdxArray a = read_idx(path, "read_idx_bytes", DType::UInt8);
  Dims shape(a.dims);
  if (shape.size() == 3) shape.insert(1, 1);  // [N, H, W] -> [N, 1, H, W]
  Tensor out = widened(a, shape, DType::UInt8);
  std::uint8_t* dst = out.data<std::uint8_t>();
  // Read in place unless zlib streamed it; an empty array may have no buffer at all.
  if (a.size() != 0 && dst != a.data()) std::memcpy(dst, a.data(), a.size());
  return out;
}

Tensor read_idx_images(const std::string& path) {
  IdxArray a = read_idx(path, "read_idx_images", DType::Float32);
  Dims shape(a.dims);
  if (shape.size() == 3) shape.insert(1, 1);  // [N, H, W] -> [N, 1, H, W]
  Tensor out = widened(a, shape, DType::Float32);
  // A table of correctly rounded b/255 gives the same floats as numpy's (x / 255).astype(f32).
  std::array<float, 256> scale{};
  for (int b = 0; b < 256; ++b) scale[b] = static_cast<float>(b / 255.0);
  float* dst = out.data<float>();
  const std::uint8_t* src = a.data();  // (may lie in dst's storage, ahead of it: front to back is safe)
  const std::size_t n = a.size();
  for (std::size_t i = 0; i < n; ++i) dst[i] = scale[src[i]];
  return out;
}

Tensor read_idx_labels(const std::string& path) {
  IdxArray a = read_idx(path, "read_idx_labels", DType::Int64);
  CG_CHECK(a.dims.size() == 1, IoError, "read_idx_labels: '", path, "' must hold a 1-D label array; got dims ",
           Dims(a.dims));
  Tensor out = widened(a, Dims(a.dims), DType::Int64);
  std::int64_t* dst = out.data<std::int64_t>();
  const std::uint8_t* src = a.data();
  for (std::size_t i = 0; i < a.size(); ++i) dst[i] = src[i];
  return out;
}

Dataset load_idx(const std::string& dir, bool train, bool keep_bytes) {
  const std::string prefix = train ? "train" : "t10k";
  const std::string images_stem = prefix + "-images-idx3-ubyte";
  const std::string labels_stem = prefix + "-labels-idx1-ubyte";
  const std::string hint = is_default_dir(dir)
                               ? "; install Debian's dataset-fashion-mnist package (apt-get install "
                                 "dataset-fashion-mnist) or pass --data DIR"
                               : "";
  const std::string images_path = find_idx_file(dir, images_stem);
  CG_CHECK(!images_path.empty(), IoError, "load_idx: cannot find ", join_path(dir, images_stem), " or ",
           join_path(dir, images_stem + ".gz"), hint);
  const std::string labels_path = find_idx_file(dir, labels_stem);
  CG_CHECK(!labels_path.empty(), IoError, "load_idx: cannot find ", join_path(dir, labels_stem), " or ",
           join_path(dir, labels_stem + ".gz"), hint);

  Dataset ds;
  if (keep_bytes) {
    ds.inputs = read_idx_bytes(images_path);  // (standing for b / 255: ByteScaling's default)
  } else {
    ds.inputs = read_idx_images(images_path);
  }
  ds.labels = read_idx_labels(labels_path);
  CG_CHECK(ds.inputs.dim() >= 1 && ds.inputs.size(0) == ds.labels.size(0), IoError,
           "load_idx: image and label counts must match; got ", ds.inputs.dim() >= 1 ? ds.inputs.size(0) : 0,
           " images in '", images_path, "' and ", ds.labels.size(0), " labels in '", labels_path, "'");
  const std::int64_t* lab = ds.labels.data<std::int64_t>();
  std::int64_t max_label = -1;
  for (std::int64_t i = 0; i < ds.labels.numel(); ++i) max_label = std::max(max_label, lab[i]);
  ds.num_classes = max_label + 1;
  return ds;
}

}  // namespace chaingrad::data
