#pragma once
// Shared by the libFuzzer targets (fuzz/README in docs/reliability.md): the readers take paths,
// so each input is written to a file in memory-backed /dev/shm (or $TMPDIR) first.
//
// Contract checked by every target: malformed input throws chaingrad::Error (IoError,
// ValueError, ...) and nothing else; no crash, no sanitizer report, no leak, no hang. Any other
// exception escapes LLVMFuzzerTestOneInput, which libFuzzer reports as a crash.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "chaingrad/error.hpp"

namespace fuzz {

// A per-process scratch file, `suffix` appended (".gz" for the gzip target); removed at exit.
inline const std::string& scratch_path(const char* suffix = "") {
  struct Scratch {
    std::string path;
    ~Scratch() { ::unlink(path.c_str()); }
  };
  static const Scratch scratch{[&] {
    const char* tmp = std::getenv("TMPDIR");
    const std::string dir = ::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : tmp ? tmp : "/tmp";
    return dir + "/chaingrad-fuzz-" + std::to_string(::getpid()) + suffix;
  }()};
  return scratch.path;
}

inline void write_file(const std::string& path, const void* data, std::size_t size) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();
  if (size && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);
}

// A failed property: a bug, reported as a crash with the input saved by libFuzzer.
[[noreturn]] inline void property_failed(const char* what) {
  std::fprintf(stderr, "property failed: %s\n", what);
  std::abort();
}

}  // namespace fuzz
