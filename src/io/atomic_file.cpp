// Atomic replacement of a file: write a sibling temp file, fsync it, rename it over the target,
// fsync the directory. rename(2) within one directory is atomic, so readers (and a machine that
// loses power) see either the complete old file or the complete new one, never a torn mix. The
// temp file must live in the target's directory: rename across filesystems is a copy.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>
#include <sstream>
#include <string>
#include <utility>

#include "chaingrad/error.hpp"
#include "chaingrad/io.hpp"

namespace chaingrad::io {
namespace {

std::string random_suffix() {
  std::random_device rd;
  const std::uint64_t r = (std::uint64_t{rd()} << 32) ^ rd();
  std::ostringstream os;
  os << ".tmp." << ::getpid() << '.' << std::hex << r;
  return os.str();
}

std::string directory_of(const std::string& path) {
  const std::filesystem::path dir = std::filesystem::path(path).parent_path();
  return dir.empty() ? std::string(".") : dir.string();
}

}  // namespace

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)) {
  CG_CHECK(!path_.empty(), IoError, "write_file_atomic: expected a file path; got an empty string");
  // O_EXCL makes a name clash fail instead of two writers sharing one temp file.
  for (int attempt = 0; attempt < 8 && fd_ < 0; ++attempt) {
    temp_path_ = path_ + random_suffix();
    fd_ = ::open(temp_path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd_ < 0 && errno != EEXIST) break;
  }
  if (fd_ < 0) {
    const int err = errno;
    const std::string temp = temp_path_;
    temp_path_.clear();
    detail::throw_error<IoError>("write_file_atomic: cannot write '", path_, "': cannot create the temporary file '",
                                 temp, "': ", std::strerror(err));
  }
  // Replacing a file should not change who may read it.
  struct stat st {};
  if (::stat(path_.c_str(), &st) == 0 && S_ISREG(st.st_mode)) ::fchmod(fd_, st.st_mode & 07777);
}

AtomicFile::~AtomicFile() { discard(); }

void AtomicFile::discard() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  if (!temp_path_.empty()) ::unlink(temp_path_.c_str());
  temp_path_.clear();
}

void AtomicFile::write(const void* data, std::size_t nbytes) {
  CG_CHECK(fd_ >= 0, IoError, "write_file_atomic: cannot write '", path_,
           "': the file was already committed or a previous write failed");
  const auto* p = static_cast<const char*>(data);
  while (nbytes > 0) {
    const ssize_t r = ::write(fd_, p, nbytes);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      const int err = r < 0 ? errno : EIO;
      discard();
      detail::throw_error<IoError>("write_file_atomic: cannot write '", path_, "': ", std::strerror(err));
    }
    p += r;
    nbytes -= static_cast<std::size_t>(r);
  }
}

void AtomicFile::commit() {
  CG_CHECK(fd_ >= 0, IoError, "write_file_atomic: cannot commit '", path_,
           "': the file was already committed or a previous write failed");
  auto fail = [&](const char* what) {
    const int err = errno;
    discard();
    detail::throw_error<IoError>("write_file_atomic: cannot write '", path_, "': ", what, ": ", std::strerror(err));
  };
  if (::fsync(fd_) != 0) fail("fsync of the temporary file failed");
  const int fd = fd_;
  fd_ = -1;
  // close() can report a deferred write error (NFS); treat it like a failed write.
  if (::close(fd) != 0) fail("closing the temporary file failed");
  if (::rename(temp_path_.c_str(), path_.c_str()) != 0) fail("renaming the temporary file over it failed");
  temp_path_.clear();

  // Make the rename itself durable. Some filesystems cannot fsync a directory (EINVAL); the
  // rename has still happened, so that is not worth failing over.
  const std::string dir = directory_of(path_);
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  CG_CHECK(dfd >= 0, IoError, "write_file_atomic: wrote '", path_, "' but cannot open its directory '", dir,
           "' to fsync it: ", std::strerror(errno));
  const int r = ::fsync(dfd);
  const int err = errno;
  ::close(dfd);
  CG_CHECK(r == 0 || err == EINVAL, IoError, "write_file_atomic: wrote '", path_, "' but fsync of its directory '",
           dir, "' failed: ", std::strerror(err));
}

void write_file_atomic(const std::string& path, std::string_view bytes) {
  AtomicFile f(path);
  f.write(bytes);
  f.commit();
}

}  // namespace chaingrad::io
