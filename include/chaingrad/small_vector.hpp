#pragma once
// SmallVector: a vector whose first N elements live inline. Nodes keep their edges, input
// metadata and returned gradients in these, so recording an op and running its backward cost no
// heap allocation for the usual one to three inputs.
#include <algorithm>
#include <cstddef>
#include <initializer_list>
#include <utility>
#include <vector>

namespace chaingrad {

template <class T, std::size_t N>
class SmallVector {
 public:
  SmallVector() = default;
  SmallVector(std::initializer_list<T> init) {
    reserve(init.size());
    for (const T& v : init) push_back(v);
  }
  explicit SmallVector(std::size_t n) { resize(n); }
  SmallVector(const SmallVector& o) { *this = o; }
  SmallVector(SmallVector&& o) noexcept { *this = std::move(o); }
  SmallVector& operator=(const SmallVector& o) {
    if (this == &o) return *this;
    clear();
    reserve(o.size());
    for (const T& v : o) push_back(v);
    return *this;
  }
  SmallVector& operator=(SmallVector&& o) noexcept {
    if (this == &o) return *this;
    clear();
    if (o.on_heap_) {
      heap_ = std::move(o.heap_);
      on_heap_ = true;
      size_ = heap_.size();
    } else {
      for (std::size_t i = 0; i < o.size_; ++i) inline_[i] = std::move(o.inline_[i]);
      size_ = o.size_;
    }
    o.clear();
    return *this;
  }

  std::size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  T* data() { return on_heap_ ? heap_.data() : inline_; }
  const T* data() const { return on_heap_ ? heap_.data() : inline_; }
  T& operator[](std::size_t i) { return data()[i]; }
  const T& operator[](std::size_t i) const { return data()[i]; }
  T* begin() { return data(); }
  T* end() { return data() + size_; }
  const T* begin() const { return data(); }
  const T* end() const { return data() + size_; }
  T& back() { return data()[size_ - 1]; }

  void reserve(std::size_t n) {
    if (n <= N || on_heap_) {
      if (on_heap_) heap_.reserve(n);
      return;
    }
    spill(n);
  }
  void push_back(T v) {
    if (!on_heap_ && size_ == N) spill(N * 2);
    if (on_heap_) {
      heap_.push_back(std::move(v));
    } else {
      inline_[size_] = std::move(v);
    }
    ++size_;
  }
  void resize(std::size_t n) {
    if (n > N && !on_heap_) spill(n);
    if (on_heap_) {
      heap_.resize(n);
    } else {
      for (std::size_t i = n; i < size_; ++i) inline_[i] = T();
    }
    size_ = n;
  }
  void clear() {
    if (on_heap_) {
      heap_.clear();
      on_heap_ = false;
    }
    for (std::size_t i = 0; i < size_ && i < N; ++i) inline_[i] = T();
    size_ = 0;
  }

 private:
  void spill(std::size_t capacity) {
    heap_.reserve(std::max(capacity, size_));
    for (std::size_t i = 0; i < size_; ++i) {
      heap_.push_back(std::move(inline_[i]));
      inline_[i] = T();
    }
    on_heap_ = true;
  }

  T inline_[N] = {};
  std::vector<T> heap_;
  std::size_t size_ = 0;
  bool on_heap_ = false;
};

}  // namespace chaingrad
