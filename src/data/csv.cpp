// CSV tables: a header row, one label column, every other column a float feature.
// Fields may be double-quoted ("a ""b"" c"); quoted fields may not span lines. Blank lines are
// skipped; "\r\n" line ends are accepted. Every error names the file, the 1-based line and the
// column, so a user can jump straight to the bad cell.
#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "chaingrad/data.hpp"
#include "chaingrad/error.hpp"

namespace chaingrad::data {
namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// Splits one line into fields, unquoting as it goes.
std::vector<std::string> split_fields(std::string_view line, const std::string& path, std::int64_t line_no) {
  std::vector<std::string> fields;
  std::string cur;
  std::size_t i = 0;
  while (true) {
    cur.clear();
    // Skip blanks before a possible opening quote.
    std::size_t j = i;
    while (j < line.size() && (line[j] == ' ' || line[j] == '\t')) ++j;
    if (j < line.size() && line[j] == '"') {
      i = j + 1;
      bool closed = false;
      while (i < line.size()) {
        if (line[i] == '"') {
          if (i + 1 < line.size() && line[i + 1] == '"') {
            cur += '"';
            i += 2;
            continue;
          }
          closed = true;
          ++i;
          break;
        }
        cur += line[i++];
      }
      CG_CHECK(closed, IoError, "load_csv: ", path, ": line ", line_no, ", field ", fields.size() + 1,
               " opens a quote that is not closed on the same line");
      while (i < line.size() && (line[i] == ' ' || line[i] == '\t')) ++i;
      CG_CHECK(i == line.size() || line[i] == ',', IoError, "load_csv: ", path, ": line ", line_no, ", field ",
               fields.size() + 1, " has text after its closing quote");
      fields.push_back(cur);
    } else {
      const std::size_t comma = line.find(',', i);
      const std::size_t end = comma == std::string_view::npos ? line.size() : comma;
      fields.emplace_back(trim(line.substr(i, end - i)));
      i = end;
    }
    if (i >= line.size()) break;
    ++i;  // the comma
    if (i == line.size()) {  // trailing comma: an empty last field
      fields.emplace_back();
      break;
    }
  }
  return fields;
}

bool all_digits(const std::string& s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

std::string list_header(const std::vector<std::string>& header) {
  std::string s;
  for (std::size_t i = 0; i < header.size(); ++i) s += (i ? ", \"" : "\"") + header[i] + "\"";
  return s;
}

}  // namespace

Dataset load_csv(const std::string& path, const std::string& label_column) {
  std::ifstream in(path, std::ios::binary);
  CG_CHECK(in.is_open(), IoError, "load_csv: cannot open '", path, "': ", std::strerror(errno));

  std::string line;
  std::int64_t line_no = 0;
  // Reads the next non-blank line, stripping a trailing '\r'.
  auto next_line = [&]() -> bool {
    while (std::getline(in, line)) {
      ++line_no;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (!trim(line).empty()) return true;
    }
    return false;
  };

  CG_CHECK(next_line(), IoError, "load_csv: '", path, "' is empty; expected a header row naming the columns");
  if (line_no == 1 && line.size() >= 3 && line.compare(0, 3, "\xEF\xBB\xBF") == 0) line.erase(0, 3);  // UTF-8 BOM
  const std::vector<std::string> header = split_fields(line, path, line_no);
  const std::size_t ncols = header.size();

  std::int64_t label = -1;
  for (std::size_t c = 0; c < ncols; ++c) {
    if (header[c] != label_column) continue;
    CG_CHECK(label < 0, IoError, "load_csv: ", path, ": label column \"", label_column,
             "\" appears more than once in the header (columns ", label + 1, " and ", c + 1, ")");
    label = static_cast<std::int64_t>(c);
  }
  if (label < 0 && all_digits(label_column)) {
    std::int64_t idx = -1;
    std::from_chars(label_column.data(), label_column.data() + label_column.size(), idx);
    CG_CHECK(idx >= 0 && idx < static_cast<std::int64_t>(ncols), IoError, "load_csv: ", path,
             ": label column index ", label_column, " is out of range; the header has ", ncols,
             " columns (0-based indices 0..", ncols - 1, "): ", list_header(header));
    label = idx;
  }
  CG_CHECK(label >= 0, IoError, "load_csv: ", path, ": no label column named \"", label_column,
           "\"; the header has ", list_header(header));
  CG_CHECK(ncols >= 2, IoError, "load_csv: ", path, ": the header has only the label column \"", header[label],
           "\"; expected at least one feature column");

  const std::size_t nfeat = ncols - 1;
  std::vector<float> features;
  std::vector<std::int64_t> labels;
  std::int64_t max_label = -1;
  while (next_line()) {
    const std::vector<std::string> fields = split_fields(line, path, line_no);
    CG_CHECK(fields.size() == ncols, IoError, "load_csv: ", path, ": line ", line_no, " has ", fields.size(),
             " fields; the header has ", ncols);
    for (std::size_t c = 0; c < ncols; ++c) {
      const std::string& f = fields[c];
      const std::string_view num = trim(f);  // quoted fields keep their blanks; numbers do not
      const char* b = num.data();
      const char* e = num.data() + num.size();
      if (b != e && *b == '+') ++b;  // from_chars refuses an explicit plus sign
      if (static_cast<std::int64_t>(c) == label) {
        std::int64_t v = -1;
        auto [p, ec] = std::from_chars(b, e, v);
        if (ec != std::errc() || p != e) {
          // Accept integral floats such as "3.0", which spreadsheet exports produce.
          double d = 0.0;
          auto [pd, ecd] = std::from_chars(b, e, d);
          const bool integral = ecd == std::errc() && pd == e && std::isfinite(d) && d == std::floor(d) &&
                                std::fabs(d) < 9.0e15;
          CG_CHECK(integral, IoError, "load_csv: ", path, ": line ", line_no, ", column ", c + 1, " (\"",
                   header[c], "\"): label \"", f, "\" is not an integer; labels must be non-negative integers");
          v = static_cast<std::int64_t>(d);
        }
        CG_CHECK(v >= 0, IoError, "load_csv: ", path, ": line ", line_no, ", column ", c + 1, " (\"", header[c],
                 "\"): label \"", f, "\" is negative; labels must be non-negative integers");
        labels.push_back(v);
        max_label = std::max(max_label, v);
      } else {
        float v = 0.0f;
        auto [p, ec] = std::from_chars(b, e, v);
        // NaN and infinity are refused too: a missing value must not silently poison training.
        CG_CHECK(b != e && ec == std::errc() && p == e && std::isfinite(v), IoError, "load_csv: ", path,
                 ": line ", line_no, ", column ", c + 1, " (\"", header[c], "\"): \"", f,
                 "\" is not a finite number",
                 ec == std::errc::result_out_of_range ? " (out of float32 range)" : "");
        features.push_back(v);
      }
    }
  }
  CG_CHECK(!labels.empty(), IoError, "load_csv: '", path, "' has a header but no data rows");

  const auto n = static_cast<std::int64_t>(labels.size());
  Dataset ds;
  ds.inputs = from_vector(std::span<const float>(features), Dims{n, static_cast<std::int64_t>(nfeat)});
  ds.labels = from_vector(std::span<const std::int64_t>(labels), Dims{n});
  ds.num_classes = max_label + 1;
  return ds;
}

}  // namespace chaingrad::data
