#pragma once
// SmallVector: a vector whose first N elements live inline. Nodes keep their edges, input
// metadata and returned gradients in these, so recording an op and running its backward cost no
// heap allocation for the usual one to three inputs. Inline slots are raw storage: only the
// elements in use are constructed, so an empty SmallVector costs three stores to make and a
// compare to destroy (a node and a gradient list are made and destroyed for every op).
#include <algorithm>
#include <cstddef>
#include <type_traits>
#include <memory>
#include <new>
#include <utility>

namespace chaingrad {

template <class T, std::size_t N>
class SmallVector {
  static_assert(N > 0, "SmallVector needs at least one inline slot");

 public:
  SmallVector() noexcept = default;
  // `GradList{a, std::move(b)}`: each element is forwarded, so moved-in handles are not copied
  // (an initializer_list could only copy them: each copy of a Tensor is an atomic increment).
  template <class... U>
    requires(sizeof...(U) > 0 && (std::is_constructible_v<T, U &&> && ...))
  SmallVector(U&&... values) {  // NOLINT: implicit, as an initializer list would be
    reserve(sizeof...(U));
    (::new (data_ + size_++) T(std::forward<U>(values)), ...);
  }
  explicit SmallVector(std::size_t n) { resize(n); }
  SmallVector(const SmallVector& o) {
    reserve(o.size_);
    for (const T& v : o) ::new (data_ + size_++) T(v);
  }
  SmallVector(SmallVector&& o) noexcept { take(std::move(o)); }
  SmallVector& operator=(const SmallVector& o) {
    if (this == &o) return *this;
    clear();
    reserve(o.size_);
    for (const T& v : o) ::new (data_ + size_++) T(v);
    return *this;
  }
  SmallVector& operator=(SmallVector&& o) noexcept {
    if (this == &o) return *this;
    clear();
    release_heap();
    take(std::move(o));
    return *this;
  }
  ~SmallVector() {
    destroy_range(0, size_);
    release_heap();
  }

  std::size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  T* data() { return data_; }
  const T* data() const { return data_; }
  T& operator[](std::size_t i) { return data_[i]; }
  const T& operator[](std::size_t i) const { return data_[i]; }
  T* begin() { return data_; }
  T* end() { return data_ + size_; }
  const T* begin() const { return data_; }
  const T* end() const { return data_ + size_; }
  T& back() { return data_[size_ - 1]; }

  void reserve(std::size_t n) {
    if (n > capacity_) grow(n);
  }
  void push_back(T v) {
    if (size_ == capacity_) grow(capacity_ * 2);
    ::new (data_ + size_) T(std::move(v));
    ++size_;
  }
  void resize(std::size_t n) {
    reserve(n);
    for (std::size_t i = size_; i < n; ++i) ::new (data_ + i) T();
    destroy_range(n, size_);
    size_ = n;
  }
  void clear() {
    destroy_range(0, size_);
    size_ = 0;
  }

 private:
  T* inline_data() { return std::launder(reinterpret_cast<T*>(inline_)); }
  bool on_heap() const { return capacity_ != N; }

  void destroy_range(std::size_t from, std::size_t to) {
    for (std::size_t i = from; i < to; ++i) data_[i].~T();
  }
  void release_heap() {
    if (on_heap()) {
      std::allocator<T>().deallocate(data_, capacity_);
      data_ = inline_data();
      capacity_ = N;
    }
  }
  void grow(std::size_t capacity) {
    capacity = std::max(capacity, size_);
    T* fresh = std::allocator<T>().allocate(capacity);
    for (std::size_t i = 0; i < size_; ++i) {
      ::new (fresh + i) T(std::move(data_[i]));
      data_[i].~T();
    }
    release_heap();
    data_ = fresh;
    capacity_ = capacity;
  }
  // Precondition: this is empty with inline storage.
  void take(SmallVector&& o) noexcept {
    if (o.on_heap()) {
      data_ = o.data_;
      capacity_ = o.capacity_;
      size_ = o.size_;
      o.data_ = o.inline_data();
      o.capacity_ = N;
      o.size_ = 0;
      return;
    }
    for (std::size_t i = 0; i < o.size_; ++i) {
      ::new (data_ + i) T(std::move(o.data_[i]));
      o.data_[i].~T();
    }
    size_ = o.size_;
    o.size_ = 0;
  }

  T* data_ = inline_data();
  std::size_t size_ = 0;
  std::size_t capacity_ = N;  // N exactly when the elements are inline
  alignas(T) unsigned char inline_[N * sizeof(T)];
};

}  // namespace chaingrad
