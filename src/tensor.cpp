#include "chaingrad/tensor.hpp"

#include <cmath>
#include <cstring>
#include <functional>
#include <iomanip>
#include <sstream>

#include "chaingrad/autograd.hpp"
#include "chaingrad/ops.hpp"
#include "kernels/cpu/loops.hpp"
#include "kernels/cpu/parallel.hpp"

namespace chaingrad {

// ---------------------------------------------------------------- metadata
std::int64_t Tensor::size(std::int64_t d) const { return shape()[wrap_dim(d, dim(), "size")]; }

double Tensor::item() const {
  CG_CHECK(defined(), ValueError, "item: tensor is undefined");
  CG_CHECK(numel() == 1, ValueError, "item: only one-element tensors can be converted to a number; got shape ",
           shape());
  return dispatch(dtype(), [&]<class T>() { return static_cast<double>(*data<T>()); });
}

double Tensor::at(std::initializer_list<std::int64_t> index) const {
  CG_CHECK(static_cast<int>(index.size()) == dim(), ShapeError, "at: expected ", dim(), " indices for shape ",
           shape(), "; got ", index.size());
  std::int64_t off = 0;
  int d = 0;
  for (std::int64_t i : index) {
    const std::int64_t n = shape()[d];
    CG_CHECK(i >= -n && i < n, ShapeError, "at: index ", i, " is out of range for dimension ", d, " of size ", n);
    off += (i < 0 ? i + n : i) * strides()[d];
    ++d;
  }
  return dispatch(dtype(), [&]<class T>() { return static_cast<double>(data<T>()[off]); });
}

template <class T>
std::vector<T> Tensor::to_vector() const {
  std::vector<T> out(static_cast<std::size_t>(numel()));
  kernels::copy_to(*this, out.data(), DTypeOf<T>::value);
  return out;
}
template std::vector<float> Tensor::to_vector<float>() const;
template std::vector<double> Tensor::to_vector<double>() const;
template std::vector<std::int64_t> Tensor::to_vector<std::int64_t>() const;

// ---------------------------------------------------------------- autograd glue
Tensor& Tensor::requires_grad_(bool on) {
  CG_CHECK(!on || is_floating(dtype()), TypeError,
           "requires_grad_: only float32 and float64 tensors can require gradients; got ", dtype());
  CG_CHECK(is_leaf() || on, AutogradError,
           "requires_grad_: cannot turn off requires_grad on a non-leaf tensor; use detach()");
  impl_->requires_grad = on;
  return *this;
}

void Tensor::set_grad(const Tensor& g) {
  if (g.defined()) {
    CG_CHECK(g.shape() == shape(), ShapeError, "set_grad: gradient shape ", g.shape(),
             " does not match the tensor's shape ", shape());
  }
  impl_->grad_impl = g.impl_ptr();
}

// Tensor::backward is defined in autograd/engine.cpp.

void Tensor::register_hook(GradHook hook) const {
  CG_CHECK(requires_grad(), AutogradError,
           "register_hook: cannot register a hook on a tensor that does not require grad");
  if (impl_->grad_fn)
    impl_->grad_fn->pre_hooks().push_back(std::move(hook));
  else
    impl_->extra().hooks.push_back(std::move(hook));
}

void Tensor::retain_grad() const {
  CG_CHECK(requires_grad(), AutogradError, "retain_grad: the tensor does not require grad");
  if (is_leaf() || impl_->retains_grad) return;
  impl_->retains_grad = true;
  std::shared_ptr<TensorImpl*>& cell = impl_->extra().self_cell;
  if (!cell) cell = std::make_shared<TensorImpl*>(impl_.get());
  impl_->grad_fn->pre_hooks().push_back([cell = cell](const Tensor& g) {
    if (TensorImpl* self = *cell) {
      if (!self->grad_impl) {
        self->grad_impl = g.detach().clone().impl_ptr();
      } else {
        Tensor acc(self->grad_impl);
        NoGradGuard ng;
        acc.add_(g);
      }
    }
    return Tensor();
  });
}

// ---------------------------------------------------------------- heads
namespace {
// make_with_storage's block: the head, then its storage at a 16-byte boundary.
constexpr std::size_t kHeadBytes = (sizeof(TensorImpl) + 15) / 16 * 16;
constexpr std::size_t kHeadWithStorageBytes = kHeadBytes + sizeof(Storage);
static_assert(kHeadWithStorageBytes <= allocator::kMaxPooledObject);
}  // namespace

// (The storage is constructed in place, not assigned: assigning would first release a null one.)
TensorImpl::TensorImpl(StoragePtr s) noexcept : storage(std::move(s)) {}

ImplPtr TensorImpl::make(StoragePtr storage) {
  return ImplPtr::adopt(new (allocator::allocate_object(sizeof(TensorImpl))) TensorImpl(std::move(storage)));
}

ImplPtr TensorImpl::make_with_storage(std::size_t nbytes) {
  if (nbytes > Storage::kInlineBytes) return make(Storage::make(nbytes));
  void* block = allocator::allocate_object(kHeadWithStorageBytes);
  // (inline data: constructing the storage allocates nothing and cannot throw)
  Storage* s = Storage::make_in(static_cast<char*>(block) + kHeadBytes, nbytes, block, kHeadWithStorageBytes);
  auto* t = new (block) TensorImpl(StoragePtr::adopt(s));
  t->own_storage_ = s;
  return ImplPtr::adopt(t);
}

TensorImpl::~TensorImpl() {
  // The accumulator may outlive the leaf (graphs keep it); it must stop reaching for it.
  if (grad_accumulator) static_cast<AccumulateGrad&>(*grad_accumulator).forget_leaf();
  if (extras && extras->self_cell) *extras->self_cell = nullptr;
}

void TensorImpl::destroy() noexcept {
  Storage* own = own_storage_;
  Storage* held = storage.release();  // dropped below, with the head's own reference when it is that one
  void* block = this;
  // Most heads never joined a graph: then every member left is empty or trivial, and the
  // destructor would only test them. Most of the others are an op's output, with only a node to drop.
  if (grad_impl || grad_accumulator || extras)
    this->~TensorImpl();
  else if (grad_fn)
    grad_fn.reset();
  if (held && held != own) intrusive_release(held);
  if (own) {
    // The block goes with the last of the head and the views of its storage (a view's release
    // frees it through Storage::destroy). Its size is known here, so its free list is too.
    if (own->release_head_reference(held == own ? 1 : 0)) allocator::deallocate_object(block, kHeadWithStorageBytes);
  } else
    allocator::deallocate_object(block, sizeof(TensorImpl));
}

const std::string& TensorImpl::name() const {
  static const std::string unnamed;
  return extras ? extras->name : unnamed;
}

Tensor Tensor::detach() const {
  ImplPtr impl = TensorImpl::make(impl_->storage);
  impl->shape = impl_->shape;
  impl->strides = impl_->strides;
  impl->offset = impl_->offset;
  impl->dtype = impl_->dtype;
  return Tensor(std::move(impl));
}

// ---------------------------------------------------------------- in-place
namespace {
void check_inplace(const Tensor& t, const char* op) {
  CG_CHECK(t.defined(), ValueError, op, ": tensor is undefined");
  CG_CHECK(!(GradMode::is_enabled() && t.requires_grad()), AutogradError, op,
           ": in-place update of a tensor that requires grad; wrap it in NoGradGuard (as optimizers do)");
}
}  // namespace

Tensor& Tensor::fill_(double value) {
  check_inplace(*this, "fill_");
  dispatch(dtype(), [&]<class T>() {
    const T v = element_cast<T>(value);
    Tensor self = *this;
    if (is_contiguous()) {
      T* p = data<T>();
      kernels::parallel_range(numel(), [&](std::int64_t lo, std::int64_t hi) { std::fill(p + lo, p + hi, v); });
    } else {
      T* p = static_cast<T*>(storage()->data()) + offset();
      kernels::for_each_run<1>(shape(), {&strides()}, [&](auto off, std::int64_t n, auto st) {
        for (std::int64_t i = 0; i < n; ++i) p[off[0] + i * st[0]] = v;
      });
    }
  });
  bump_version();
  return *this;
}

namespace {
// dst[i] = f(dst[i], src[i]) with src broadcast to dst's shape and converted to dst's dtype.
template <class F>
void update_inplace(Tensor& dst, const Tensor& src_in, const char* op, F f) {
  check_inplace(dst, op);
  Dims bs = broadcast_shapes(dst.shape(), src_in.shape(), op);
  CG_CHECK(bs == dst.shape(), ShapeError, op, ": cannot broadcast ", src_in.shape(), " into ", dst.shape());
  Tensor src = src_in.dtype() == dst.dtype() ? src_in : src_in.detach().to(dst.dtype());
  src = src.detach().expand(dst.shape());
  dispatch(dst.dtype(), [&]<class T>() {
    T* p = static_cast<T*>(dst.storage()->data()) + dst.offset();
    const T* s = static_cast<const T*>(src.storage()->data()) + src.offset();
    if (dst.is_contiguous() && src.is_contiguous()) {
      const std::int64_t n = dst.numel();
      // Split across the pool like the out-of-place maps (an optimizer's update written by hand, a
      // gradient summed into a buffer), unless the source overlaps the destination at an offset:
      // then which value an element reads would depend on the cut.
      const std::less<const T*> before;  // (a total order, also across allocations)
      const bool shifted_overlap = s != p && before(s, p + n) && before(p, s + n);
      const auto update = [&](std::int64_t lo, std::int64_t hi) {
        for (std::int64_t i = lo; i < hi; ++i) p[i] = f(p[i], s[i]);
      };
      if (shifted_overlap)
        update(0, n);
      else
        kernels::parallel_range(n, update);
      return;
    }
    kernels::for_each_run<2>(dst.shape(), {&dst.strides(), &src.strides()}, [&](auto off, std::int64_t n, auto st) {
      for (std::int64_t i = 0; i < n; ++i) {
        T& d = p[off[0] + i * st[0]];
        d = f(d, s[off[1] + i * st[1]]);
      }
    });
  });
  dst.bump_version();
}
}  // namespace

Tensor& Tensor::copy_(const Tensor& src) {
  if (src.same(*this)) return *this;
  update_inplace(*this, src, "copy_", [](auto, auto s) { return s; });
  return *this;
}
Tensor& Tensor::add_(const Tensor& other, double alpha) {
  if (alpha == 1.0) {
    update_inplace(*this, other, "add_", [](auto d, auto s) { return d + s; });
  } else {
    update_inplace(*this, other, "add_", [alpha](auto d, auto s) { return d + static_cast<decltype(d)>(alpha) * s; });
  }
  return *this;
}
Tensor& Tensor::mul_(const Tensor& other) {
  update_inplace(*this, other, "mul_", [](auto d, auto s) { return d * s; });
  return *this;
}
Tensor& Tensor::mul_(double factor) {
  check_inplace(*this, "mul_");
  if (is_contiguous()) {
    dispatch(dtype(), [&]<class T>() {
      T* p = data<T>();
      const T f = element_cast<T>(factor);
      kernels::parallel_range(numel(), [&](std::int64_t lo, std::int64_t hi) {
        for (std::int64_t i = lo; i < hi; ++i) p[i] *= f;
      });
    });
    bump_version();
    return *this;
  }
  return mul_(full({}, factor, {.dtype = dtype()}));
}

// ---------------------------------------------------------------- method forms
Tensor Tensor::to(DType t) const { return cast(*this, t); }
Tensor Tensor::contiguous() const { return chaingrad::contiguous(*this); }
Tensor Tensor::clone() const {
  // A copy through the contiguous op's kernel, recorded as an identity for autograd.
  Tensor out = empty(shape(), dtype());
  kernels::copy_to(*this, out.raw_data(), dtype());
  if (detail::any_requires_grad({*this}))
    detail::record("clone", {*this}, out, [](const Tensor& g, const Node&) { return GradList{g}; });
  return out;
}
Tensor Tensor::reshape(const Dims& s) const { return chaingrad::reshape(*this, s); }
Tensor Tensor::view(const Dims& s) const {
  Tensor r = chaingrad::reshape(*this, s);
  CG_CHECK(r.storage() == storage(), ShapeError, "view: shape ", s, " is not compatible with the input's strides ",
           strides(), " (shape ", shape(), "); use reshape() to copy");
  return r;
}
Tensor Tensor::transpose(std::int64_t d0, std::int64_t d1) const { return chaingrad::transpose(*this, d0, d1); }
Tensor Tensor::t() const {
  CG_CHECK(dim() <= 2, ShapeError, "t: expects a tensor with at most 2 dimensions; got shape ", shape());
  return dim() < 2 ? *this : transpose(0, 1);
}
Tensor Tensor::permute(const Dims& order) const { return chaingrad::permute(*this, order); }
Tensor Tensor::slice(std::int64_t d, std::int64_t s, std::int64_t e, std::int64_t st) const {
  return chaingrad::slice(*this, d, s, e, st);
}
Tensor Tensor::select(std::int64_t d, std::int64_t i) const { return chaingrad::select(*this, d, i); }
Tensor Tensor::expand(const Dims& s) const { return chaingrad::expand(*this, s); }
Tensor Tensor::squeeze(std::optional<std::int64_t> d) const { return chaingrad::squeeze(*this, d); }
Tensor Tensor::unsqueeze(std::int64_t d) const { return chaingrad::unsqueeze(*this, d); }
Tensor Tensor::flatten(std::int64_t s, std::int64_t e) const { return chaingrad::flatten(*this, s, e); }
Tensor Tensor::sum(const std::vector<std::int64_t>& d, bool k) const { return chaingrad::sum(*this, d, k); }
Tensor Tensor::mean(const std::vector<std::int64_t>& d, bool k) const { return chaingrad::mean(*this, d, k); }
Tensor Tensor::pow(double e) const { return chaingrad::pow(*this, e); }
Tensor Tensor::matmul(const Tensor& o) const { return chaingrad::matmul(*this, o); }

// ---------------------------------------------------------------- printing
namespace {
void print_rec(std::ostream& os, const Tensor& t, int d, std::int64_t off, int indent, bool is_float,
               int precision, int width) {
  const std::int64_t n = t.shape()[d];
  const std::int64_t stride = t.strides()[d];
  os << '[';
  const bool summarize = n > 12;
  for (std::int64_t i = 0; i < n; ++i) {
    if (summarize && i == 3) {
      os << (d + 1 == t.dim() ? "..., " : "...,\n" + std::string(indent + 1, ' '));
      i = n - 3;
    }
    const std::int64_t o = off + i * stride;
    if (d + 1 == t.dim()) {
      dispatch(t.dtype(), [&]<class T>() {
        const T v = static_cast<const T*>(t.storage()->data())[o];
        if (is_float)
          os << std::setw(width) << std::fixed << std::setprecision(precision) << static_cast<double>(v);
        else
          os << static_cast<std::int64_t>(v);  // (a uint8 would print as a character)
      });
    } else {
      print_rec(os, t, d + 1, o, indent + 1, is_float, precision, width);
    }
    if (i + 1 < n) os << (d + 1 == t.dim() ? ", " : ",\n" + std::string(indent + 1, ' '));
  }
  os << ']';
}
}  // namespace

std::string Tensor::to_string() const {
  std::ostringstream os;
  if (!defined()) return "tensor(undefined)";
  os << "tensor(";
  const bool is_float = is_floating(dtype());
  const int precision = 4;
  if (dim() == 0) {
    dispatch(dtype(), [&]<class T>() {
      if (is_float) os << std::setprecision(precision + 2);
      os << static_cast<double>(*static_cast<const T*>(raw_data()));
    });
  } else {
    // One column width for all elements, as numpy does: wide enough for the largest magnitude.
    double max_abs = 0;
    bool negative = false;
    if (is_float && numel() > 0)
      for (double v : to_vector<double>()) {
        if (std::isfinite(v)) max_abs = std::max(max_abs, std::abs(v));
        negative |= v < 0 || std::isnan(v);
      }
    const int int_digits = max_abs >= 1 ? static_cast<int>(std::floor(std::log10(max_abs))) + 1 : 1;
    const int width = int_digits + 1 + precision + (negative ? 1 : 0);
    print_rec(os, *this, 0, offset(), 7, is_float, precision, width);
  }
  if (dim() > 1) os << ", shape=" << shape();
  if (dtype() != DType::Float32) os << ", dtype=" << dtype();
  if (grad_fn())
    os << ", grad_fn=<" << grad_fn()->name() << ">";
  else if (requires_grad())
    os << ", requires_grad=true";
  os << ')';
  return os.str();
}
std::ostream& operator<<(std::ostream& os, const Tensor& t) { return os << t.to_string(); }

// ---------------------------------------------------------------- creation
Tensor detail::empty_0d(DType dtype) {  // no extents to check or copy
  ImplPtr impl = TensorImpl::make_with_storage(element_size(dtype));
  impl->dtype = dtype;
  return Tensor(std::move(impl));
}

Tensor detail::empty_shaped(const Dims& shape, DType dtype) {
  for (int i = 0; i < shape.size(); ++i)
    CG_CHECK(shape[i] >= 0, ShapeError, "empty: negative dimension ", shape[i], " in shape ", shape);
  const std::size_t nbytes = static_cast<std::size_t>(shape.numel()) * element_size(dtype);
  const Dims strides = contiguous_strides(shape);
  ImplPtr impl = TensorImpl::make_with_storage(nbytes);
  impl->shape = shape;
  impl->strides = strides;
  impl->dtype = dtype;
  return Tensor(std::move(impl));
}

Tensor full(const Dims& shape, double value, TensorOptions opt) {
  Tensor t = empty(shape, opt.dtype);
  dispatch(opt.dtype, [&]<class T>() {
    T* p = t.data<T>();
    std::fill(p, p + t.numel(), element_cast<T>(value));
  });
  if (opt.requires_grad) t.requires_grad_();
  return t;
}
Tensor zeros(const Dims& shape, TensorOptions opt) {
  Tensor t = empty(shape, opt.dtype);
  std::memset(t.raw_data(), 0, t.numel() * element_size(opt.dtype));
  if (opt.requires_grad) t.requires_grad_();
  return t;
}
Tensor ones(const Dims& shape, TensorOptions opt) { return full(shape, 1.0, opt); }
Tensor zeros_like(const Tensor& t) { return zeros(t.shape(), {.dtype = t.dtype()}); }
Tensor ones_like(const Tensor& t) { return ones(t.shape(), {.dtype = t.dtype()}); }
Tensor full_like(const Tensor& t, double v) { return full(t.shape(), v, {.dtype = t.dtype()}); }

Tensor arange(double start, double end, double step, TensorOptions opt) {
  CG_CHECK(step != 0 && std::isfinite(step), ValueError, "arange: step must be finite and non-zero; got ", step);
  const double count = std::ceil((end - start) / step);
  const auto n = static_cast<std::int64_t>(std::max(0.0, count));
  Tensor t = empty({n}, opt.dtype);
  dispatch(opt.dtype, [&]<class T>() {
    T* p = t.data<T>();
    for (std::int64_t i = 0; i < n; ++i) p[i] = element_cast<T>(start + static_cast<double>(i) * step);
  });
  if (opt.requires_grad) t.requires_grad_();
  return t;
}

Tensor linspace(double start, double end, std::int64_t steps, TensorOptions opt) {
  CG_CHECK(steps >= 0, ValueError, "linspace: steps must be non-negative; got ", steps);
  Tensor t = empty({steps}, opt.dtype);
  const double h = steps > 1 ? (end - start) / static_cast<double>(steps - 1) : 0.0;
  dispatch(opt.dtype, [&]<class T>() {
    T* p = t.data<T>();
    for (std::int64_t i = 0; i < steps; ++i)
      p[i] = element_cast<T>(i + 1 == steps && steps > 1 ? end : start + h * static_cast<double>(i));
  });
  if (opt.requires_grad) t.requires_grad_();
  return t;
}

Tensor eye(std::int64_t n, TensorOptions opt) {
  Tensor t = zeros({n, n}, {.dtype = opt.dtype});
  dispatch(opt.dtype, [&]<class T>() {
    T* p = t.data<T>();
    for (std::int64_t i = 0; i < n; ++i) p[i * n + i] = T(1);
  });
  if (opt.requires_grad) t.requires_grad_();
  return t;
}

namespace {
template <class S>
Tensor from_values(std::span<const S> values, const Dims& shape_in, DType dtype, bool requires_grad) {
  Dims shape = shape_in;
  if (shape.empty() && values.size() != 1) shape = Dims{static_cast<std::int64_t>(values.size())};
  CG_CHECK(shape.numel() == static_cast<std::int64_t>(values.size()), ShapeError, "from_vector: ", values.size(),
           " values do not fill shape ", shape, " (", shape.numel(), " elements)");
  Tensor t = empty(shape, dtype);
  dispatch(dtype, [&]<class T>() {
    T* p = t.data<T>();
    for (std::size_t i = 0; i < values.size(); ++i) p[i] = element_cast<T>(values[i]);
  });
  if (requires_grad) t.requires_grad_();
  return t;
}
}  // namespace

Tensor from_vector(std::span<const double> v, const Dims& s, TensorOptions o) {
  return from_values(v, s, o.dtype, o.requires_grad);
}
Tensor from_vector(std::span<const float> v, const Dims& s, TensorOptions o) {
  return from_values(v, s, o.dtype, o.requires_grad);
}
Tensor from_vector(std::span<const std::int64_t> v, const Dims& s) {
  return from_values(v, s, DType::Int64, false);
}
Tensor scalar(double value, TensorOptions opt) { return full({}, value, opt); }
Tensor tensor(std::initializer_list<double> values, bool requires_grad, DType dtype) {
  return from_values(std::span<const double>(values.begin(), values.size()),
                     Dims{static_cast<std::int64_t>(values.size())}, dtype, requires_grad);
}
Tensor tensor(std::initializer_list<std::initializer_list<double>> rows, bool requires_grad, DType dtype) {
  std::vector<double> flat;
  const std::size_t cols = rows.size() ? rows.begin()->size() : 0;
  for (const auto& r : rows) {
    CG_CHECK(r.size() == cols, ShapeError, "tensor: ragged nested list (row of ", r.size(), " values; expected ",
             cols, ")");
    flat.insert(flat.end(), r.begin(), r.end());
  }
  return from_values(std::span<const double>(flat),
                     Dims{static_cast<std::int64_t>(rows.size()), static_cast<std::int64_t>(cols)}, dtype,
                     requires_grad);
}

// ---------------------------------------------------------------- random
std::uint64_t Generator::next_u64() {
  std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
double Generator::uniform() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }
double Generator::normal() {
  double u1 = uniform();
  while (u1 <= 0.0) u1 = uniform();
  const double u2 = uniform();
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}
Generator& default_generator() {
  static thread_local Generator g;
  return g;
}
void manual_seed(std::uint64_t seed) { default_generator().seed(seed); }

namespace {
template <class F>
Tensor random_fill(const Dims& shape, TensorOptions opt, Generator* gen, const char* op, F draw) {
  Generator& g = gen ? *gen : default_generator();
  Tensor t = empty(shape, opt.dtype);
  dispatch_float(opt.dtype, op, [&]<class T>() {
    T* p = t.data<T>();
    for (std::int64_t i = 0, n = t.numel(); i < n; ++i) p[i] = static_cast<T>(draw(g));
  });
  if (opt.requires_grad) t.requires_grad_();
  return t;
}
}  // namespace

Tensor rand(const Dims& s, TensorOptions o, Generator* g) {
  return random_fill(s, o, g, "rand", [](Generator& r) { return r.uniform(); });
}
Tensor randn(const Dims& s, TensorOptions o, Generator* g) {
  return random_fill(s, o, g, "randn", [](Generator& r) { return r.normal(); });
}
Tensor uniform(const Dims& s, double lo, double hi, TensorOptions o, Generator* g) {
  CG_CHECK(lo <= hi, ValueError, "uniform: expected lo <= hi; got ", lo, " and ", hi);
  return random_fill(s, o, g, "uniform", [lo, hi](Generator& r) { return lo + (hi - lo) * r.uniform(); });
}
Tensor randint(std::int64_t low, std::int64_t high, const Dims& shape, Generator* gen) {
  CG_CHECK(low < high, ValueError, "randint: expected low < high; got ", low, " and ", high);
  Generator& g = gen ? *gen : default_generator();
  Tensor t = empty(shape, DType::Int64);
  auto* p = t.data<std::int64_t>();
  const auto range = static_cast<std::uint64_t>(high - low);
  for (std::int64_t i = 0, n = t.numel(); i < n; ++i) p[i] = low + static_cast<std::int64_t>(g.next_u64() % range);
  return t;
}
Tensor randperm(std::int64_t n, Generator* gen) {
  Generator& g = gen ? *gen : default_generator();
  Tensor t = empty({n}, DType::Int64);
  auto* p = t.data<std::int64_t>();
  for (std::int64_t i = 0; i < n; ++i) p[i] = i;
  for (std::int64_t i = n - 1; i > 0; --i) std::swap(p[i], p[g.next_u64() % static_cast<std::uint64_t>(i + 1)]);
  return t;
}

}  // namespace chaingrad
