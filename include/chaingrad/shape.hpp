#pragma once
// Dims: a small inline vector of extents or strides, so a tensor's metadata costs no heap
// allocation (the scalar workload is bound by bookkeeping, not arithmetic).
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <ostream>
#include <span>
#include <string>
#include <vector>

#include "chaingrad/error.hpp"

namespace chaingrad {

constexpr int kMaxDims = 8;

class Dims {
 public:
  Dims() = default;
  Dims(std::initializer_list<std::int64_t> v) { assign(v.begin(), v.end()); }
  explicit Dims(std::span<const std::int64_t> v) { assign(v.begin(), v.end()); }
  // Copies only the used extents: a 0-d or 2-d shape costs a few moves, not 72 bytes.
  Dims(const Dims& o) noexcept : n_(o.n_) {
    for (int i = 0; i < n_; ++i) v_[i] = o.v_[i];
  }
  Dims& operator=(const Dims& o) noexcept {
    n_ = o.n_;
    for (int i = 0; i < n_; ++i) v_[i] = o.v_[i];
    return *this;
  }
  Dims(const std::vector<std::int64_t>& v) { assign(v.begin(), v.end()); }  // NOLINT: implicit is the point
  static Dims filled(int n, std::int64_t value) {
    Dims d;
    d.resize(n, value);
    return d;
  }

  int size() const { return n_; }
  bool empty() const { return n_ == 0; }
  std::int64_t operator[](int i) const { return v_[i]; }
  std::int64_t& operator[](int i) { return v_[i]; }
  std::int64_t back() const { return v_[n_ - 1]; }
  const std::int64_t* begin() const { return v_; }
  const std::int64_t* end() const { return v_ + n_; }
  std::int64_t* begin() { return v_; }
  std::int64_t* end() { return v_ + n_; }
  const std::int64_t* data() const { return v_; }

  void push_back(std::int64_t x) {
    CG_CHECK(n_ < kMaxDims, ShapeError, "tensors have at most ", kMaxDims, " dimensions");
    v_[n_++] = x;
  }
  void insert(int pos, std::int64_t x) {
    push_back(0);
    for (int i = n_ - 1; i > pos; --i) v_[i] = v_[i - 1];
    v_[pos] = x;
  }
  void erase(int pos) {
    for (int i = pos; i + 1 < n_; ++i) v_[i] = v_[i + 1];
    --n_;
  }
  void resize(int n, std::int64_t fill = 0) {
    CG_CHECK(n >= 0 && n <= kMaxDims, ShapeError, "tensors have at most ", kMaxDims, " dimensions; got ", n);
    for (int i = n_; i < n; ++i) v_[i] = fill;
    n_ = n;
  }
  std::int64_t numel() const {
    std::int64_t p = 1;
    for (int i = 0; i < n_; ++i)
      if (__builtin_mul_overflow(p, v_[i], &p)) [[unlikely]]
        detail::throw_error<ShapeError>("a tensor shape has more elements than int64 can count");
    return p;
  }
  std::vector<std::int64_t> vec() const { return {begin(), end()}; }

  friend bool operator==(const Dims& a, const Dims& b) {
    return a.n_ == b.n_ && std::equal(a.begin(), a.end(), b.begin());
  }

 private:
  template <class It>
  void assign(It first, It last) {
    n_ = 0;
    for (; first != last; ++first) push_back(*first);
  }
  // Only the first n_ entries are meaningful (and initialized); nothing reads past them.
  std::int64_t v_[kMaxDims];
  int n_ = 0;
};

inline std::ostream& operator<<(std::ostream& os, const Dims& d) {
  os << '[';
  for (int i = 0; i < d.size(); ++i) os << (i ? ", " : "") << d[i];
  return os << ']';
}
inline std::string to_string(const Dims& d) {
  std::ostringstream os;
  os << d;
  return os.str();
}

// Contiguous (row-major) strides for a shape. A shape whose strides do not fit in int64 (possible
// even with zero elements, e.g. [0, 2^40, 2^40] from a hostile file) is a ShapeError.
inline Dims contiguous_strides(const Dims& shape) {
  Dims s = Dims::filled(shape.size(), 1);
  for (int i = shape.size() - 2; i >= 0; --i) {
    std::int64_t v = 0;
    if (__builtin_mul_overflow(s[i + 1], std::max<std::int64_t>(shape[i + 1], 1), &v)) [[unlikely]]
      detail::throw_error<ShapeError>("shape ", shape, ": too many elements to index with int64");
    s[i] = v;
  }
  return s;
}

// numpy broadcasting: align from the right; each pair equal or one of them 1.
Dims broadcast_shapes(const Dims& a, const Dims& b, const char* op);

// Wraps a possibly negative dim into [0, ndim), naming `op` on failure.
int wrap_dim(std::int64_t dim, int ndim, const char* op);

}  // namespace chaingrad
