// The safetensors format (https://github.com/huggingface/safetensors):
//   u64 little-endian N | N bytes of JSON header | data section
// The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
// relative to the data section) plus an optional "__metadata__" object of string values.
//
// Note [untrusted safetensors header]: the reader validates everything before it allocates or
// reads any tensor data: the header length against a cap and the file size, the JSON itself
// (duplicate keys included, which a plain json::parse would silently collapse), each entry's
// fields, and that the byte ranges tile the data section exactly, with no gap, overlap or
// trailing bytes, as the reference implementation requires.
#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "chaingrad/error.hpp"
#include "chaingrad/io.hpp"

namespace chaingrad::io {
namespace {

static_assert(std::endian::native == std::endian::little,
              "safetensors stores little-endian data; chaingrad does not byte-swap on big-endian hosts");

using nlohmann::json;
using ordered_json = nlohmann::ordered_json;

constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;  // the reference implementation's cap
constexpr const char* kMetadataKey = "__metadata__";

// What a file dtype becomes in memory.
struct FileDType {
  const char* name;
  std::size_t file_size;  // bytes per element in the file
  DType dtype;            // in memory
};
constexpr FileDType kFileDTypes[] = {
    {"F32", 4, DType::Float32}, {"F64", 8, DType::Float64}, {"I64", 8, DType::Int64},
    {"U8", 1, DType::UInt8},    {"F16", 2, DType::Float32}, {"BF16", 2, DType::Float32},
};

const char* file_dtype_name(DType t) {
  switch (t) {
    case DType::Float32: return "F32";
    case DType::Float64: return "F64";
    case DType::Int64: return "I64";
    case DType::UInt8: return "U8";
  }
  return "?";
}

// IEEE binary16 -> binary32, exact (every half is representable as a float).
float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t mant = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0 && mant == 0) {
    bits = sign;
  } else if (exp == 0) {  // subnormal: renormalize into a float's wider exponent range
    exp = 127 - 15 + 1;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  } else if (exp == 31) {  // inf / NaN
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  return std::bit_cast<float>(bits);
}

float bf16_to_float(std::uint16_t h) { return std::bit_cast<float>(static_cast<std::uint32_t>(h) << 16); }

struct Entry {
  std::string name;
  const FileDType* dtype;
  std::vector<std::int64_t> shape;
  std::uint64_t begin, end;
};

// Reads a non-negative integer JSON value, or explains why it is not one.
std::uint64_t read_uint(const json& v, const std::string& path, const std::string& what) {
  CG_CHECK(v.is_number_integer(), IoError, "load_safetensors: '", path, "': ", what,
           " must be a non-negative integer; got ", v.dump());
  CG_CHECK(v.is_number_unsigned() || v.get<std::int64_t>() >= 0, IoError, "load_safetensors: '", path, "': ",
           what, " must be non-negative; got ", v.dump());
  return v.get<std::uint64_t>();
}

Entry parse_entry(const std::string& name, const json& v, std::uint64_t data_len, const std::string& path) {
  const std::string where = "tensor \"" + name + "\"";
  CG_CHECK(v.is_object(), IoError, "load_safetensors: '", path, "': ", where,
           " must map to an object with dtype, shape and data_offsets; got ", v.dump());
  for (const auto& [k, _] : v.items())
    CG_CHECK(k == "dtype" || k == "shape" || k == "data_offsets", IoError, "load_safetensors: '", path, "': ",
             where, " has an unexpected field \"", k, "\"; expected only dtype, shape and data_offsets");
  for (const char* k : {"dtype", "shape", "data_offsets"})
    CG_CHECK(v.contains(k), IoError, "load_safetensors: '", path, "': ", where, " has no \"", k, "\" field");

  Entry e{name, nullptr, {}, 0, 0};
  const json& dt = v["dtype"];
  CG_CHECK(dt.is_string(), IoError, "load_safetensors: '", path, "': ", where, " dtype must be a string; got ",
           dt.dump());
  const std::string dts = dt.get<std::string>();
  for (const FileDType& f : kFileDTypes)
    if (dts == f.name) e.dtype = &f;
  CG_CHECK(e.dtype != nullptr, IoError, "load_safetensors: '", path, "': ", where, " has dtype \"", dts,
           "\", which chaingrad cannot read; expected one of F32, F64, I64, U8, F16, BF16");

  const json& shape = v["shape"];
  CG_CHECK(shape.is_array(), IoError, "load_safetensors: '", path, "': ", where,
           " shape must be an array of dimensions; got ", shape.dump());
  CG_CHECK(shape.size() <= static_cast<std::size_t>(kMaxDims), IoError, "load_safetensors: '", path, "': ", where,
           " has ", shape.size(), " dimensions; chaingrad tensors have at most ", kMaxDims);
  std::uint64_t nbytes = e.dtype->file_size;
  bool overflow = false;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    const std::uint64_t d = read_uint(shape[i], path, where + " shape[" + std::to_string(i) + "]");
    CG_CHECK(d <= static_cast<std::uint64_t>(INT64_MAX), IoError, "load_safetensors: '", path, "': ", where,
             " shape[", i, "] = ", d, " is too large");
    e.shape.push_back(static_cast<std::int64_t>(d));
    overflow = overflow || __builtin_mul_overflow(nbytes, d, &nbytes);
  }

  const json& off = v["data_offsets"];
  CG_CHECK(off.is_array() && off.size() == 2, IoError, "load_safetensors: '", path, "': ", where,
           " data_offsets must be [begin, end]; got ", off.dump());
  e.begin = read_uint(off[0], path, where + " data_offsets[0]");
  e.end = read_uint(off[1], path, where + " data_offsets[1]");
  CG_CHECK(e.begin <= e.end, IoError, "load_safetensors: '", path, "': ", where, " data_offsets [", e.begin, ", ",
           e.end, "] must satisfy begin <= end");
  CG_CHECK(e.end <= data_len, IoError, "load_safetensors: '", path, "': ", where, " data_offsets [", e.begin, ", ",
           e.end, "] are out of bounds; the data section has ", data_len, " bytes");
  CG_CHECK(!overflow && nbytes == e.end - e.begin, IoError, "load_safetensors: '", path, "': ", where, " has shape ",
           shape.dump(), " and dtype ", dts, ", which need ",
           overflow ? std::string("more than 2^64") : std::to_string(nbytes), " bytes; data_offsets [", e.begin,
           ", ", e.end, "] span ", e.end - e.begin);
  return e;
}

// Parses the header, failing on duplicate keys at any depth (see Note [untrusted safetensors header]).
json parse_header(const std::string& text, const std::string& path) {
  std::vector<std::set<std::string>> keys;  // one set per open object
  std::string duplicate;
  json::parser_callback_t on_event = [&](int /*depth*/, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start: keys.emplace_back(); break;
      case json::parse_event_t::object_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case json::parse_event_t::key:
        if (!keys.empty() && !keys.back().insert(parsed.get<std::string>()).second && duplicate.empty())
          duplicate = parsed.get<std::string>();
        break;
      default: break;
    }
    return true;
  };
  json j;
  try {
    j = json::parse(text, on_event);
  } catch (const json::exception& e) {
    detail::throw_error<IoError>("load_safetensors: '", path, "': the header is not valid JSON: ", e.what());
  }
  CG_CHECK(duplicate.empty(), IoError, "load_safetensors: '", path, "': the header has the key \"", duplicate,
           "\" more than once; every tensor name must be unique");
  return j;
}

}  // namespace

// ---- writing ----

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  struct Out {
    const std::string* name;
    Tensor data;  // contiguous
  };
  std::vector<Out> outs;
  std::set<std::string> names;
  for (const auto& [name, t] : tensors) {
    CG_CHECK(t.defined(), ValueError, "save_safetensors: '", path, "': tensor \"", name, "\" is undefined");
    CG_CHECK(name != kMetadataKey, ValueError, "save_safetensors: '", path, "': \"", kMetadataKey,
             "\" is reserved for metadata and cannot name a tensor");
    CG_CHECK(names.insert(name).second, ValueError, "save_safetensors: '", path, "': tensor name \"", name,
             "\" appears more than once; names must be unique");
    outs.push_back({&name, t.detach().contiguous()});
  }
  // Widest elements first keeps every tensor aligned to its element size, as the reference does.
  std::stable_sort(outs.begin(), outs.end(), [](const Out& a, const Out& b) {
    return element_size(a.data.dtype()) > element_size(b.data.dtype());
  });

  ordered_json header = ordered_json::object();
  if (!metadata.empty()) {
    ordered_json m = ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    header[kMetadataKey] = std::move(m);
  }
  std::uint64_t offset = 0;
  for (const Out& o : outs) {
    const std::uint64_t nbytes = static_cast<std::uint64_t>(o.data.numel()) * element_size(o.data.dtype());
    header[*o.name] = {{"dtype", file_dtype_name(o.data.dtype())},
                       {"shape", o.data.shape().vec()},
                       {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {
    detail::throw_error<ValueError>("save_safetensors: '", path, "': a tensor name or metadata string is not valid UTF-8: ",
                                    e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');  // the data section starts 8-byte aligned

  AtomicFile f(path);
  unsigned char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(static_cast<std::uint64_t>(text.size()) >> (8 * i));
  f.write(len, 8);
  f.write(text);
  for (const Out& o : outs)
    f.write(o.data.raw_data(), static_cast<std::size_t>(o.data.numel()) * element_size(o.data.dtype()));
  f.commit();
}

// ---- reading ----

const Tensor* SafetensorsFile::find(const std::string& name) const {
  for (const auto& [n, t] : tensors)
    if (n == name) return &t;
  return nullptr;
}

SafetensorsFile load_safetensors(const std::string& path) {
  std::error_code ec;
  CG_CHECK(std::filesystem::is_regular_file(path, ec), IoError, "load_safetensors: cannot open '", path,
           "': ", std::filesystem::exists(path, ec) ? "not a regular file" : "no such file");
  const std::uint64_t file_size = std::filesystem::file_size(path, ec);
  CG_CHECK(!ec, IoError, "load_safetensors: cannot read the size of '", path, "': ", ec.message());
  std::ifstream in(path, std::ios::binary);
  CG_CHECK(in.is_open(), IoError, "load_safetensors: cannot open '", path, "': ", std::strerror(errno));

  CG_CHECK(file_size >= 8, IoError, "load_safetensors: '", path, "' is ", file_size,
           " bytes; a safetensors file starts with an 8-byte header length");
  unsigned char len[8];
  in.read(reinterpret_cast<char*>(len), 8);
  CG_CHECK(in.gcount() == 8, IoError, "load_safetensors: cannot read '", path, "'");
  std::uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len[i];
  CG_CHECK(header_len <= kMaxHeaderBytes, IoError, "load_safetensors: '", path, "': header length ", header_len,
           " exceeds the ", kMaxHeaderBytes / 1'000'000, " MB limit; the file is corrupt or not safetensors");
  CG_CHECK(header_len <= file_size - 8, IoError, "load_safetensors: '", path, "': header length ", header_len,
           " runs past the end of the file (", file_size, " bytes, so at most ", file_size - 8, " are available)");

  std::string text(static_cast<std::size_t>(header_len), '\0');
  in.read(text.data(), static_cast<std::streamsize>(header_len));
  CG_CHECK(static_cast<std::uint64_t>(in.gcount()) == header_len, IoError, "load_safetensors: '", path,
           "': could not read the ", header_len, "-byte header");
  CG_CHECK(!text.empty() && text[0] == '{', IoError, "load_safetensors: '", path,
           "': the header must be a JSON object starting with '{'; got ",
           text.empty() ? std::string("an empty header") : "'" + text.substr(0, 16) + "'");

  const json header = parse_header(text, path);
  CG_CHECK(header.is_object(), IoError, "load_safetensors: '", path, "': the header must be a JSON object");
  const std::uint64_t data_len = file_size - 8 - header_len;

  SafetensorsFile out;
  std::vector<Entry> entries;
  for (const auto& [key, value] : header.items()) {
    if (key == kMetadataKey) {
      CG_CHECK(value.is_object(), IoError, "load_safetensors: '", path, "': \"", kMetadataKey,
               "\" must be an object of strings; got ", value.dump());
      for (const auto& [mk, mv] : value.items()) {
        CG_CHECK(mv.is_string(), IoError, "load_safetensors: '", path, "': metadata \"", mk,
                 "\" must be a string; got ", mv.dump());
        out.metadata[mk] = mv.get<std::string>();
      }
      continue;
    }
    entries.push_back(parse_entry(key, value, data_len, path));
  }

  std::stable_sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  std::uint64_t covered = 0;
  const std::string* prev = nullptr;
  for (const Entry& e : entries) {
    CG_CHECK(e.begin >= covered, IoError, "load_safetensors: '", path, "': tensor \"", e.name, "\" bytes [",
             e.begin, ", ", e.end, ") overlap tensor \"", prev ? *prev : std::string(), "\", which ends at ", covered,
             "; ranges must not overlap");
    CG_CHECK(e.begin == covered, IoError, "load_safetensors: '", path, "': tensor \"", e.name, "\" starts at byte ",
             e.begin, " but the previous tensor ends at ", covered, "; the data ranges must be contiguous");
    covered = e.end;
    prev = &e.name;
  }
  CG_CHECK(covered == data_len, IoError, "load_safetensors: '", path, "': the data section has ", data_len,
           " bytes but the tensors cover only ", covered, "; expected them to cover it exactly");

  // Only now, with every range known to lie inside the file, is anything allocated.
  std::vector<std::uint16_t> halves;
  for (const Entry& e : entries) {
    Tensor t = empty(Dims(e.shape), e.dtype->dtype);
    const std::uint64_t nbytes = e.end - e.begin;
    char* dst = static_cast<char*>(t.raw_data());
    if (e.dtype->file_size == 2) {
      halves.resize(static_cast<std::size_t>(nbytes / 2));
      dst = reinterpret_cast<char*>(halves.data());
    }
    in.read(dst, static_cast<std::streamsize>(nbytes));
    CG_CHECK(static_cast<std::uint64_t>(in.gcount()) == nbytes, IoError, "load_safetensors: '", path,
             "': could not read the ", nbytes, " bytes of tensor \"", e.name, "\" (file changed while reading?)");
    if (e.dtype->file_size == 2) {
      float* f = t.data<float>();
      const bool bf16 = std::strcmp(e.dtype->name, "BF16") == 0;
      for (std::size_t i = 0; i < halves.size(); ++i) f[i] = bf16 ? bf16_to_float(halves[i]) : half_to_float(halves[i]);
    }
    out.tensors.emplace_back(e.name, std::move(t));
  }
  return out;
}

}  // namespace chaingrad::io
