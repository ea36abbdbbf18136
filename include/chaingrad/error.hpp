#pragma once
// Two failure mechanisms (see STYLE.md, pattern 6):
//  * user errors throw a typed chaingrad::Error whose message reads
//    "<op>: <what must hold>; got <values>", built only when the check fails;
//  * internal bugs use CG_ASSERT, always on, which throws InternalError with file:line.
#include <sstream>
#include <stdexcept>
#include <string>

namespace chaingrad {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
class ShapeError : public Error {
 public:
  using Error::Error;
};
class TypeError : public Error {
 public:
  using Error::Error;
};
class ValueError : public Error {
 public:
  using Error::Error;
};
class IoError : public Error {
 public:
  using Error::Error;
};
class AutogradError : public Error {
 public:
  using Error::Error;
};
class InternalError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

namespace detail {
template <class E, class... Args>
[[noreturn]] [[gnu::cold]] [[gnu::noinline]] void throw_error(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw E(os.str());
}
}  // namespace detail
}  // namespace chaingrad

// CG_CHECK(cond, ErrorType, message parts...): user-facing check.
#define CG_CHECK(cond, E, ...)                                   \
  do {                                                           \
    if (!(cond)) [[unlikely]]                                    \
      ::chaingrad::detail::throw_error<::chaingrad::E>(__VA_ARGS__); \
  } while (0)

#define CG_ASSERT(cond)                                                                   \
  do {                                                                                    \
    if (!(cond)) [[unlikely]]                                                             \
      ::chaingrad::detail::throw_error<::chaingrad::InternalError>(                       \
          "internal error: ", #cond, " failed at ", __FILE__, ":", __LINE__,             \
          " (a chaingrad bug; please report it)");                                         \
  } while (0)
