#pragma once
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "chaingrad/dtype.hpp"
#include "chaingrad/shape.hpp"
#include "chaingrad/storage.hpp"

namespace chaingrad {

class Node;
class Tensor;
class InBackwardUpdate;
// Graph nodes are counted in place too; these are defined in autograd.hpp, which any code that
// copies or drops a NodePtr includes.
using NodePtr = IntrusivePtr<Node>;
inline void intrusive_retain(Node* n) noexcept;
inline void intrusive_release(Node* n) noexcept;
inline long intrusive_use_count(const Node* n) noexcept;
using GradHook = std::function<Tensor(const Tensor&)>;

struct TensorImpl;
using ImplPtr = IntrusivePtr<TensorImpl>;

// The state behind a Tensor handle. Views share `storage`; autograd state lives inline. Heads come
// from the per-thread object pool and are counted in place (IntrusivePtr); a tensor of at most
// Storage::kInlineBytes of data gets its head, storage and data in one pooled block (make_with_storage).
struct TensorImpl {
  // A head over `storage` (a view's or alias's: shared).
  static ImplPtr make(StoragePtr storage);
  // A head over fresh contiguous storage of `nbytes`.
  static ImplPtr make_with_storage(std::size_t nbytes);

  // Over `s`, every other member empty. User-provided, so that construction does not zero the
  // whole object before the member initializers run; out of line (tensor.cpp, where make() inlines
  // it), since it names the destructors of its NodePtr members, which need autograd.hpp.
  explicit TensorImpl(StoragePtr s) noexcept;
  TensorImpl(const TensorImpl&) = delete;
  TensorImpl& operator=(const TensorImpl&) = delete;

  StoragePtr storage;
  Dims shape;
  Dims strides;
  std::int64_t offset = 0;  // in elements
  DType dtype = DType::Float32;

  // autograd
  bool requires_grad = false;
  bool retains_grad = false;
  NodePtr grad_fn;    // null for leaves and for tensors outside the graph
  ImplPtr grad_impl;  // .grad, as an impl so Tensor stays incomplete-free here
  // Leaves: the node that adds into .grad, made on first use and kept, so recording an op on a
  // parameter creates no node for it. It points back at the leaf without owning it (no cycle);
  // the leaf's destruction clears that pointer.
  NodePtr grad_accumulator;

  // Seldom set, so kept out of line: making and freeing a tensor then skips them.
  struct Extras {
    std::vector<GradHook> hooks;  // leaves only; non-leaf hooks live on grad_fn
    std::string name;             // optional label, shown by the explainer and in errors
    // retain_grad's hook reaches the tensor through this cell, which the tensor's destruction
    // empties (the hook lives on grad_fn, which may outlive the tensor).
    std::shared_ptr<TensorImpl*> self_cell;
    // The optimizer that updates this leaf during backward where it can (Note [updates in
    // backward], autograd.hpp); it clears this before it is destroyed.
    InBackwardUpdate* update_in_backward = nullptr;
  };
  std::unique_ptr<Extras> extras;
  Extras& extra() {
    if (!extras) extras = std::make_unique<Extras>();
    return *extras;
  }
  const std::string& name() const;  // "" when unnamed

 private:
  ~TensorImpl();
  void destroy() noexcept;
  friend void intrusive_retain(TensorImpl* t) noexcept { t->refs_.fetch_add(1, std::memory_order_relaxed); }
  friend void intrusive_release(TensorImpl* t) noexcept {  // (a sole owner needs no atomic, as in Storage)
    if (t->refs_.load(std::memory_order_acquire) == 1 || t->refs_.fetch_sub(1, std::memory_order_acq_rel) == 1)
      t->destroy();
  }
  friend long intrusive_use_count(const TensorImpl* t) noexcept { return t->refs_.load(std::memory_order_relaxed); }

  std::atomic<std::int32_t> refs_{1};
  // The head's block also holds its storage (make_with_storage): the head keeps one reference to
  // that storage for as long as it lives, besides `storage` (which may be reassigned).
  Storage* own_storage_ = nullptr;
};

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(ImplPtr impl) : impl_(std::move(impl)) {}

  // ---- metadata ----
  bool defined() const { return impl_ != nullptr; }
  const Dims& shape() const { return impl_->shape; }
  const Dims& strides() const { return impl_->strides; }
  std::int64_t offset() const { return impl_->offset; }
  int dim() const { return impl_->shape.size(); }
  std::int64_t size(std::int64_t d) const;
  std::int64_t numel() const { return impl_->shape.numel(); }
  DType dtype() const { return impl_->dtype; }
  // Inline: every op asks, most often of a 0-d tensor, where the loop does not run.
  bool is_contiguous() const {
    std::int64_t expected = 1;
    for (int i = dim() - 1; i >= 0; --i) {
      const std::int64_t n = impl_->shape[i];
      if (n == 1) continue;
      if (impl_->strides[i] != expected) return false;
      expected *= n;
    }
    return true;
  }
  const StoragePtr& storage() const { return impl_->storage; }
  std::uint32_t version() const { return impl_->storage->version(); }
  TensorImpl* impl() const { return impl_.get(); }
  const ImplPtr& impl_ptr() const { return impl_; }
  bool same(const Tensor& other) const { return impl_ == other.impl_; }
  // Moves the handle's reference out (no reference-count traffic); the Tensor becomes undefined.
  ImplPtr take_impl() && { return std::move(impl_); }

  // ---- raw data ----
  template <class T>
  T* data() const {
    CG_CHECK(DTypeOf<T>::value == dtype(), TypeError, "data<", dtype_name(DTypeOf<T>::value),
             ">: tensor holds ", dtype_name(dtype()));
    return static_cast<T*>(impl_->storage->data()) + impl_->offset;
  }
  void* raw_data() const {
    return static_cast<char*>(impl_->storage->data()) + impl_->offset * element_size(dtype());
  }
  // The single value of a one-element tensor, as double.
  double item() const;
  // Element at a full index (negative indices wrap), as double.
  double at(std::initializer_list<std::int64_t> index) const;
  // All elements in row-major order, converted to T.
  template <class T>
  std::vector<T> to_vector() const;

  // ---- autograd ----
  bool requires_grad() const { return impl_->requires_grad; }
  Tensor& requires_grad_(bool on = true);
  bool is_leaf() const { return impl_->grad_fn == nullptr; }
  const NodePtr& grad_fn() const { return impl_->grad_fn; }
  Tensor grad() const { return Tensor(impl_->grad_impl); }
  void set_grad(const Tensor& g);
  void zero_grad() { impl_->grad_impl.reset(); }
  // Backward from this tensor: a one-element tensor needs no `grad_output`.
  void backward(const Tensor& grad_output = {}, bool retain_graph = false, bool create_graph = false) const;
  // Called with the gradient w.r.t. this tensor; may return a replacement (or an undefined Tensor to keep it).
  void register_hook(GradHook hook) const;
  // Keep .grad on a non-leaf after backward.
  void retain_grad() const;
  // Same data, cut from the graph.
  Tensor detach() const;
  const std::string& name() const { return impl_->name(); }
  Tensor& set_name(std::string n) {
    impl_->extra().name = std::move(n);
    return *this;
  }

  // ---- in-place (not recorded by autograd; refused on tensors that need grad while grad mode is on) ----
  Tensor& fill_(double value);
  Tensor& zero_() { return fill_(0.0); }
  Tensor& copy_(const Tensor& src);        // broadcasting, with dtype conversion
  Tensor& add_(const Tensor& other, double alpha = 1.0);
  Tensor& mul_(double factor);
  Tensor& mul_(const Tensor& other);
  void bump_version() const { impl_->storage->bump_version(); }

  // ---- conversions and copies ----
  Tensor to(DType dtype) const;      // differentiable cast
  Tensor contiguous() const;         // differentiable; returns *this when already contiguous
  Tensor clone() const;              // differentiable copy with fresh storage

  // ---- method forms of common ops (defined in ops.cpp, documented in ops.hpp) ----
  Tensor reshape(const Dims& shape) const;
  Tensor view(const Dims& shape) const;
  Tensor transpose(std::int64_t d0, std::int64_t d1) const;
  Tensor t() const;
  Tensor permute(const Dims& order) const;
  Tensor slice(std::int64_t dim, std::int64_t start, std::int64_t end, std::int64_t step = 1) const;
  Tensor select(std::int64_t dim, std::int64_t index) const;
  Tensor expand(const Dims& shape) const;
  Tensor squeeze(std::optional<std::int64_t> dim = std::nullopt) const;
  Tensor unsqueeze(std::int64_t dim) const;
  Tensor flatten(std::int64_t start = 0, std::int64_t end = -1) const;
  Tensor sum(const std::vector<std::int64_t>& dims = {}, bool keepdim = false) const;
  Tensor mean(const std::vector<std::int64_t>& dims = {}, bool keepdim = false) const;
  Tensor pow(double exponent) const;
  Tensor matmul(const Tensor& other) const;

  std::string to_string() const;  // numpy/PyTorch-style printing

 private:
  ImplPtr impl_;
};

std::ostream& operator<<(std::ostream& os, const Tensor& t);

// ---- creation ----
struct TensorOptions {
  DType dtype = DType::Float32;
  bool requires_grad = false;
};

namespace detail {
Tensor empty_0d(DType dtype);
Tensor empty_shaped(const Dims& shape, DType dtype);
}  // namespace detail
// A tensor over fresh (uninitialized) storage. (Inline, so that the 0-d case, each value of a
// scalar formula, pays no call into the general one.)
inline Tensor empty(const Dims& shape, DType dtype = DType::Float32) {
  return shape.empty() ? detail::empty_0d(dtype) : detail::empty_shaped(shape, dtype);
}
Tensor zeros(const Dims& shape, TensorOptions opt = {});
Tensor ones(const Dims& shape, TensorOptions opt = {});
Tensor full(const Dims& shape, double value, TensorOptions opt = {});
Tensor zeros_like(const Tensor& t);
Tensor ones_like(const Tensor& t);
Tensor full_like(const Tensor& t, double value);
Tensor arange(double start, double end, double step = 1.0, TensorOptions opt = {});
Tensor linspace(double start, double end, std::int64_t steps, TensorOptions opt = {});
Tensor eye(std::int64_t n, TensorOptions opt = {});
// Copies `values` into a new tensor of `shape` (1-D of values.size() when shape is empty and values are not 1).
Tensor from_vector(std::span<const double> values, const Dims& shape, TensorOptions opt = {});
Tensor from_vector(std::span<const float> values, const Dims& shape, TensorOptions opt = {});
Tensor from_vector(std::span<const std::int64_t> values, const Dims& shape);
// 0-d scalar.
Tensor scalar(double value, TensorOptions opt = {.dtype = DType::Float64});
// 1-D from a list: `tensor({0.5})`, defaulting to float64 as the explainer wants exact arithmetic.
Tensor tensor(std::initializer_list<double> values, bool requires_grad = false, DType dtype = DType::Float64);
// 2-D from nested lists.
Tensor tensor(std::initializer_list<std::initializer_list<double>> rows, bool requires_grad = false,
              DType dtype = DType::Float64);

// ---- seeded random numbers ----
class Generator {
 public:
  explicit Generator(std::uint64_t seed = 0x5eed) : state_(seed) {}
  void seed(std::uint64_t s) { state_ = s; }
  std::uint64_t state() const { return state_; }
  std::uint64_t next_u64();    // splitmix64: fast, seedable, well distributed
  double uniform();            // [0, 1)
  double normal();             // standard normal (Box–Muller)

 private:
  std::uint64_t state_;
};
Generator& default_generator();
void manual_seed(std::uint64_t seed);

Tensor rand(const Dims& shape, TensorOptions opt = {}, Generator* gen = nullptr);   // U[0,1)
Tensor randn(const Dims& shape, TensorOptions opt = {}, Generator* gen = nullptr);  // N(0,1)
Tensor uniform(const Dims& shape, double lo, double hi, TensorOptions opt = {}, Generator* gen = nullptr);
Tensor randint(std::int64_t low, std::int64_t high, const Dims& shape, Generator* gen = nullptr);  // int64
Tensor randperm(std::int64_t n, Generator* gen = nullptr);  // int64

// Number of threads used by kernels and the BLAS.
void set_num_threads(int n);
int get_num_threads();
// Generates the kernels' machine code ahead of use: oneDNN compiles its matrix-product kernels the
// first time each kind runs (about 30 ms), which would otherwise land in the first training step.
// Any thread may call it, while other work runs; calls after the first return at once.
void warm_up();

}  // namespace chaingrad
