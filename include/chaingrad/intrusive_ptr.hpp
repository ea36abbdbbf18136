#pragma once
// IntrusivePtr: a shared owner whose count lives in the object itself. Tensor heads, storages
// and graph nodes use it instead of std::shared_ptr: no control block to set up, no weak count to
// drop, and a small tensor's head, storage and data can share one pooled block (tensor.hpp). The
// object type provides intrusive_retain(T*), intrusive_release(T*) and intrusive_use_count(const
// T*), found by argument-dependent lookup.
#include <cstddef>
#include <utility>

namespace chaingrad {

template <class T>
class IntrusivePtr {
 public:
  IntrusivePtr() = default;
  IntrusivePtr(std::nullptr_t) {}  // NOLINT: implicit, as for shared_ptr
  // Takes over a reference the caller holds (a new object starts with a count of one).
  static IntrusivePtr adopt(T* p) noexcept {
    IntrusivePtr r;
    r.p_ = p;
    return r;
  }
  // Adds a reference to an object some other owner keeps alive.
  static IntrusivePtr retain(T* p) noexcept {
    if (p) intrusive_retain(p);
    return adopt(p);
  }
  IntrusivePtr(const IntrusivePtr& o) noexcept : p_(o.p_) {
    if (p_) intrusive_retain(p_);
  }
  IntrusivePtr(IntrusivePtr&& o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
  IntrusivePtr& operator=(const IntrusivePtr& o) noexcept {
    IntrusivePtr(o).swap(*this);
    return *this;
  }
  IntrusivePtr& operator=(IntrusivePtr&& o) noexcept {
    IntrusivePtr(std::move(o)).swap(*this);
    return *this;
  }
  ~IntrusivePtr() {
    if (p_) intrusive_release(p_);
  }

  T* get() const noexcept { return p_; }
  T& operator*() const noexcept { return *p_; }
  T* operator->() const noexcept { return p_; }
  explicit operator bool() const noexcept { return p_ != nullptr; }
  long use_count() const noexcept { return p_ ? intrusive_use_count(p_) : 0; }
  void reset() noexcept { IntrusivePtr().swap(*this); }
  // Hands the reference to the caller, who must drop it (intrusive_release) later.
  T* release() noexcept { return std::exchange(p_, nullptr); }
  void swap(IntrusivePtr& o) noexcept { std::swap(p_, o.p_); }

  friend bool operator==(const IntrusivePtr& a, const IntrusivePtr& b) noexcept { return a.p_ == b.p_; }
  friend bool operator==(const IntrusivePtr& a, std::nullptr_t) noexcept { return a.p_ == nullptr; }

 private:
  T* p_ = nullptr;
};

}  // namespace chaingrad
