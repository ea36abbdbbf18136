#pragma once
// Reverse-mode automatic differentiation.
//
// Every differentiable op that sees an input needing a gradient records one Node. A Node has
// exactly one output (multi-output functions such as split are compositions of single-output
// views) and one edge per input: the input's own grad_fn, the AccumulateGrad node of a leaf, or
// null when that input needs no gradient. The Engine walks the graph iteratively in reverse
// topological order using dependency counts, sums gradients at fan-out, reduces broadcast
// gradients to each input's shape, and stores leaf gradients in `.grad`.
//
// Note [saved tensors]: a saved input is kept as it is, grad_fn included: that grad_fn is one of
// the node's own edges already, so this adds no ownership. A saved output must not keep its
// grad_fn (the node itself: a cycle), so SavedTensor keeps a detached alias of it and re-attaches
// the node on unpack under create_graph, so that gradients can flow through saved values.
// unpack() hands out a reference, so reading a saved value costs no reference count; a re-attached
// output lives until the node's backward returns (detail::RunningNode drops it), which keeps the
// node from owning itself through it.
//
// Note [version counter]: SavedTensor remembers the storage version at save time; unpacking a
// tensor that was modified in place since then is an error that names the op.
#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "chaingrad/small_vector.hpp"
#include "chaingrad/tensor.hpp"

namespace chaingrad {

using GradList = SmallVector<Tensor, 3>;
namespace detail {
class RunningNode;
// A node of type T from the per-thread object pool (storage.hpp), counted in place.
template <class T, class... Args>
NodePtr make_node(Args&&... args);
}  // namespace detail

class SavedTensor {
 public:
  SavedTensor() = default;
  // (Inline, and members constructed rather than assigned: every recorded op saves one or two.
  // Ops save their output before recording it, so it does not require grad yet.)
  SavedTensor(const Tensor& t, bool is_output)
      : data_(is_output && t.defined() ? t.detach() : t),
        version_(t.defined() ? t.version() : 0),
        reattach_(is_output && t.defined()) {}
  // `owner` is the node that saved it (needed to re-attach a saved output to its own node). The
  // reference is valid while the owner's backward runs (and, outside backward, until the next
  // unpack or reset).
  const Tensor& unpack(const Node& owner) const;
  bool defined() const { return data_.defined(); }
  void reset() {
    data_ = Tensor();
    reattached_ = Tensor();
  }

 private:
  friend class detail::RunningNode;
  Tensor data_;
  mutable Tensor reattached_;  // an output given back its grad_fn under create_graph
  mutable const SavedTensor* next_reattached_ = nullptr;
  std::uint32_t version_ = 0;
  bool reattach_ = false;  // data_ is a detached output; re-attach its node on unpack under create_graph
};

struct InputMeta {
  Dims shape;
  DType dtype = DType::Float32;
};

class Node;
namespace detail {
// A non-owning reference to an op's input, so that `record("mul", {a, b}, ...)` and
// `any_requires_grad({a, b})` copy no Tensor handles (each copy is an atomic increment and
// decrement). Binding a temporary is fine: it lives to the end of the full expression.
struct TensorRef {
  TensorRef(const Tensor& t) : tensor(&t) {}  // NOLINT: implicit by design
  const Tensor& get() const { return *tensor; }
  const Tensor* tensor;
};
// `one_element`: the op's inputs and output are one element of one shape and dtype
// (one_element_op), so the node keeps only the output's metadata.
void record_node(NodePtr node, std::span<const TensorRef> inputs, Tensor& output, bool one_element = false);
void set_partials(Node& node, std::span<const double> partials);

// The engine marks the node whose backward is running, as the reference that owns it, so that a
// saved output can be re-attached to its own node under create_graph, and the outputs re-attached
// there are dropped when that backward returns (a node must not own itself through them).
class RunningNode {
 public:
  explicit RunningNode(const NodePtr& node);
  ~RunningNode();  // drops the outputs re-attached during the node's backward
  RunningNode(const RunningNode&) = delete;
  RunningNode& operator=(const RunningNode&) = delete;
  static RunningNode* current();
  const NodePtr& owner() const { return owner_; }
  void keep_until_done(const SavedTensor& saved);

 private:
  const NodePtr& owner_;
  RunningNode* previous_;
  const SavedTensor* reattached_ = nullptr;  // a list through SavedTensor::next_reattached_
};
}  // namespace detail

// Note [updates in backward]
// An optimizer's step reads every gradient back from memory after backward() wrote it: for SGD
// on an MLP, a whole extra pass over the weights and their gradients each step. Where one node
// computes a parameter's whole gradient as a matrix product (linear's G^T X), that node can
// instead hand the product to the optimizer, which has it written where the step wants it: plain
// SGD into the weight itself, p <- decay * p - lr * G^T X, so no gradient tensor is made at all;
// momentum SGD into its buffer, b <- momentum * b + G^T X, then p <- p - lr * b while b is still
// in cache; any other optimizer into a scratch gradient that its update reads at once.
// An optimizer offers this by registering itself on its parameters (Optimizer::set_in_backward). A
// node asks Node::update_in_backward(i) and gets the update only when the result would be exactly
// the step: the backward is a plain one (no grad() capture, create_graph, observer or anomaly
// mode), input i is a leaf with no `.grad` yet and no hooks, and this node's edge is the last of
// the edges into the leaf's accumulator with nothing accumulated so far. Otherwise the gradient is
// made as usual and step() applies it. The updated parameter's `.grad` stays undefined and its
// version goes up, so a node that saved it and runs later fails loudly rather than reading the
// new values.
class InBackwardUpdate {
 public:
  // The parameter's gradient as a product the node has not run yet.
  class Product {
   public:
    // c <- alpha * gradient + beta * c, for c contiguous, of the parameter's shape and dtype (beta
    // 0 overwrites c, NaN included).
    virtual void into(const Tensor& c, double alpha, double beta) const = 0;

   protected:
    ~Product() = default;
  };
  // Steps `param` with the gradient `product` makes, and returns true; false leaves `param` as it
  // is and has the node make the gradient instead. Called at most once per parameter and backward.
  virtual bool apply(const Tensor& param, const Product& product) = 0;

 protected:
  ~InBackwardUpdate() = default;
};

class Node {
 public:
  Node();
  Node(const Node&) = delete;
  Node& operator=(const Node&) = delete;

  // The op's name as users know it ("mul", "matmul", ...).
  virtual const char* name() const = 0;
  // Vector-Jacobian product: one gradient per input (undefined where !needs_grad(i) or zero).
  // The engine hands over its summed gradient, so a node may keep the buffer (AccumulateGrad does).
  virtual GradList apply(Tensor&& grad_output) = 0;
  // Frees saved tensors once backward has used them (unless retain_graph).
  virtual void release_saved() {}
  virtual bool is_accumulate_grad() const { return false; }

  std::size_t num_inputs() const { return next_edges_.size(); }
  bool needs_grad(std::size_t i) const { return next_edges_[i] != nullptr; }
  using Edges = SmallVector<NodePtr, 3>;
  using InputMetas = SmallVector<InputMeta, 3>;
  const Edges& next_edges() const { return next_edges_; }
  // Shape and dtype of input i, recorded at creation (a one-element node's inputs all share its
  // output's, which is all it keeps: Note [one-element graphs]).
  const InputMeta& input_meta(std::size_t i) const { return input_meta_.empty() ? output_meta_ : input_meta_[i]; }
  std::uint64_t sequence_nr() const { return sequence_nr_; }
  bool released() const { return released_; }
  // Output's shape and dtype, recorded at creation.
  const InputMeta& output_meta() const { return output_meta_; }
  // Note [updates in backward]: the update to fold into input i's gradient, or null to make the
  // gradient. Only meaningful inside this node's apply().
  InBackwardUpdate* update_in_backward(std::size_t i) const;
  // Hooks on the gradient w.r.t. this node's output (i.e. a non-leaf tensor's hooks).
  std::vector<GradHook>& pre_hooks() { return extra().pre_hooks; }
  bool has_pre_hooks() const { return extras_ && !extras_->pre_hooks.empty(); }
  // Optional label of the output tensor, used by the explainer ("" when unlabelled).
  const std::string& label() const;
  void set_label(std::string l) { extra().label = std::move(l); }

 protected:
  friend class Engine;
  friend void detail::record_node(NodePtr, std::span<const detail::TensorRef>, Tensor&, bool);
  template <class T, class... Args>
  friend NodePtr detail::make_node(Args&&... args);
  friend void detail::set_partials(Node& node, std::span<const double> partials);
  // What the engine touches on every node comes first, in the node's first cache lines; the
  // input metadata (80 bytes an input) comes after, and the rarely set hooks and label out of line.
  Edges next_edges_;
  std::uint64_t sequence_nr_;
  // Engine scratch space (one backward runs at a time on a given graph).
  std::int64_t dependencies_ = 0;
  Tensor input_buffer_;
  bool needed_ = false;
  bool visited_ = false;
  bool released_ = false;
  // Note [one-element graphs] (engine.cpp): how this node runs when the whole graph is one-element
  // values, and the engine's summed gradient for it then (in the output's dtype, held as a double).
  enum class ValueRule : std::uint8_t { none, partials, accumulate };
  ValueRule value_rule_ = ValueRule::none;
  double value_grad_ = 0;
  double partials_[2];  // d output / d input i, set with value_rule_ == partials
  InputMetas input_meta_;
  InputMeta output_meta_;  // (not `{}`: that would zero all of its Dims' slots first)
  struct Extras {
    std::vector<GradHook> pre_hooks;
    std::string label;
  };
  std::unique_ptr<Extras> extras_;
  Extras& extra() {
    if (!extras_) extras_ = std::make_unique<Extras>();
    return *extras_;
  }

  // Only the last NodePtr destroys a node (destroy()).
  virtual ~Node();

 private:
  friend void intrusive_retain(Node* n) noexcept;
  friend void intrusive_release(Node* n) noexcept;
  friend long intrusive_use_count(const Node* n) noexcept;
  void destroy() noexcept;
  std::atomic<std::int32_t> refs_{1};
  std::uint32_t block_bytes_ = 0;  // the size make_node allocated
};

// (Inline, and a loop rather than std::copy, which calls memcpy for one or two doubles.)
inline void detail::set_partials(Node& node, std::span<const double> partials) {
  CG_ASSERT(partials.size() <= 2);
  for (std::size_t i = 0; i < partials.size(); ++i) node.partials_[i] = partials[i];
  node.value_rule_ = Node::ValueRule::partials;
}

inline void intrusive_retain(Node* n) noexcept { n->refs_.fetch_add(1, std::memory_order_relaxed); }
// A sole owner frees without an atomic read-modify-write (as for tensors, tensor.hpp).
inline void intrusive_release(Node* n) noexcept {
  if (n->refs_.load(std::memory_order_acquire) == 1 || n->refs_.fetch_sub(1, std::memory_order_acq_rel) == 1)
    n->destroy();
}
inline long intrusive_use_count(const Node* n) noexcept { return n->refs_.load(std::memory_order_relaxed); }

namespace detail {
template <class T, class... Args>
NodePtr make_node(Args&&... args) {
  static_assert(alignof(T) <= 16, "make_node: pooled blocks are 16-byte aligned");
  constexpr std::size_t bytes = sizeof(T);
  void* block = bytes <= allocator::kMaxPooledObject ? allocator::allocate_object(bytes) : ::operator new(bytes);
  T* node = nullptr;
  try {
    node = new (block) T(std::forward<Args>(args)...);
  } catch (...) {
    if (bytes <= allocator::kMaxPooledObject)
      allocator::deallocate_object(block, bytes);
    else
      ::operator delete(block);
    throw;
  }
  static_cast<Node*>(node)->block_bytes_ = static_cast<std::uint32_t>(bytes);
  return NodePtr::adopt(node);
}
}  // namespace detail

// Node for a leaf that requires grad: adds the incoming gradient into the leaf's `.grad`.
// It refers to the leaf without owning it (the leaf owns it); the leaf's destruction clears that
// reference, after which the node drops what reaches it. A leaf must therefore not be destroyed
// while a backward on another thread is running this node.
class AccumulateGrad final : public Node {
 public:
  explicit AccumulateGrad(TensorImpl& leaf);
  const char* name() const override { return "AccumulateGrad"; }
  GradList apply(Tensor&& grad_output) override;
  bool is_accumulate_grad() const override { return true; }
  // Null once the leaf is gone.
  ImplPtr leaf() const { return ImplPtr::retain(leaf_); }
  void forget_leaf() { leaf_ = nullptr; }
  // Note [one-element graphs]: whether apply() would only add a number into a one-element `.grad`
  // (no hooks, no graph on `.grad`), and that addition.
  bool accumulates_value() const;
  void accumulate_value(double g);
  // Note [updates in backward]: the leaf's registered update when apply() would otherwise store the
  // gradient it is given as a new `.grad` (no `.grad` yet, no hooks).
  InBackwardUpdate* update_in_backward() const;

 private:
  TensorImpl* leaf_;
  // The last one-element `.grad` accumulate_value made. When the user has dropped it (zero_grad,
  // every step of a scalar training loop) and nothing else holds it, the next backward fills it
  // again instead of making a new tensor.
  ImplPtr spare_grad_;
};

namespace detail {
// Set by the engine while it runs a backward in which nodes may apply updates (Note [updates in
// backward]).
extern thread_local constinit bool updates_in_backward_allowed;
// gradient_edge for a leaf that requires grad and has no accumulator of its shape and dtype yet:
// makes it (the first use, or after Module::to).
NodePtr new_accumulator_edge(const Tensor& t);
}  // namespace detail
// The edge through which a gradient reaches `t`: its grad_fn, its accumulator if it is a leaf
// requiring grad, or null. (Inline: recording an op asks once per input.)
inline NodePtr gradient_edge(const Tensor& t) {
  if (!t.defined() || !t.requires_grad()) return nullptr;
  if (t.grad_fn()) return t.grad_fn();
  const TensorImpl& leaf = *t.impl();  // (its accumulator, when still of the leaf's shape and dtype)
  const NodePtr& cached = leaf.grad_accumulator;
  if (cached && cached->output_meta().dtype == leaf.dtype && cached->output_meta().shape == leaf.shape) return cached;
  return detail::new_accumulator_edge(t);
}

// ---- grad mode ----
namespace detail {
// Per-thread modes, read by every op: inline, and constinit so that reading them from another
// translation unit needs no call to a thread-local initializer.
extern thread_local constinit bool grad_mode_enabled;
extern thread_local constinit bool anomaly_mode_enabled;
}  // namespace detail
class GradMode {
 public:
  static bool is_enabled() { return detail::grad_mode_enabled; }
  static void set_enabled(bool on) { detail::grad_mode_enabled = on; }
};
class NoGradGuard {
 public:
  NoGradGuard() : prev_(GradMode::is_enabled()) { GradMode::set_enabled(false); }
  ~NoGradGuard() { GradMode::set_enabled(prev_); }
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool prev_;
};
class EnableGradGuard {
 public:
  explicit EnableGradGuard(bool on) : prev_(GradMode::is_enabled()) { GradMode::set_enabled(on); }
  ~EnableGradGuard() { GradMode::set_enabled(prev_); }
  EnableGradGuard(const EnableGradGuard&) = delete;
  EnableGradGuard& operator=(const EnableGradGuard&) = delete;

 private:
  bool prev_;
};

// Anomaly mode: every recorded op checks its output, and backward checks every gradient, for
// NaN/Inf; the error names the op, its inputs' shapes and where it was created.
class AnomalyMode {
 public:
  static bool is_enabled() { return detail::anomaly_mode_enabled; }
  static void set_enabled(bool on) { detail::anomaly_mode_enabled = on; }
};
class DetectAnomalyGuard {
 public:
  DetectAnomalyGuard() : prev_(AnomalyMode::is_enabled()) { AnomalyMode::set_enabled(true); }
  ~DetectAnomalyGuard() { AnomalyMode::set_enabled(prev_); }
  DetectAnomalyGuard(const DetectAnomalyGuard&) = delete;
  DetectAnomalyGuard& operator=(const DetectAnomalyGuard&) = delete;

 private:
  bool prev_;
};

// Observes the engine as it runs (the explainer's --trace uses it).
struct BackwardObserver {
  virtual ~BackwardObserver() = default;
  // A node is about to run with its fully summed upstream gradient.
  virtual void on_node(const Node& node, const Tensor& grad_output) { (void)node, (void)grad_output; }
  // The node produced `grad` for input `i` (already reduced to the input's shape).
  virtual void on_input_grad(const Node& node, std::size_t i, const Tensor& grad) {
    (void)node, (void)i, (void)grad;
  }
  // A second (or later) contribution arrived for `target`: fan-out summation.
  virtual void on_accumulate(const Node& target, const Tensor& before, const Tensor& added) {
    (void)target, (void)before, (void)added;
  }
};

namespace autograd {

struct BackwardOptions {
  bool retain_graph = false;
  bool create_graph = false;
  BackwardObserver* observer = nullptr;
};

// Backpropagates from `outputs` (with upstream gradients; undefined = ones for one-element outputs),
// accumulating into the `.grad` of the leaves.
void backward(const std::vector<Tensor>& outputs, const std::vector<Tensor>& grad_outputs = {},
              BackwardOptions options = {});

// Gradients of `outputs` w.r.t. `inputs`, returned rather than stored in `.grad`.
// An input the outputs do not depend on is an error, or an undefined Tensor with allow_unused.
std::vector<Tensor> grad(const std::vector<Tensor>& outputs, const std::vector<Tensor>& inputs,
                         const std::vector<Tensor>& grad_outputs = {}, bool retain_graph = false,
                         bool create_graph = false, bool allow_unused = false);

// How many backward runs on this thread moved numbers rather than tensors (Note [one-element
// graphs] in engine.cpp): for tests and benchmarks that need to know which path ran.
std::uint64_t value_backward_runs();

}  // namespace autograd

// ---- recording ops (the one mechanism every op uses) ----
namespace detail {

// True when grad mode is on and some input requires grad.
bool any_requires_grad(std::span<const Tensor> inputs);
inline bool any_requires_grad(std::initializer_list<TensorRef> inputs) {
  if (!GradMode::is_enabled()) return false;
  for (const TensorRef& r : inputs)
    if (r.get().defined() && r.get().requires_grad()) return true;
  return false;
}

// A node whose backward is a lambda `GradList(const Tensor& grad_output, const Node& self)`;
// the lambda captures what backward needs (SavedTensors, sizes). Its captures are released after
// backward unless retain_graph.
template <class F>
class FunctionNode final : public Node {
 public:
  // (forwarded: the rule's captures, saved tensors among them, are moved once, into the node)
  template <class G>
  FunctionNode(const char* name, G&& fn) : name_(name), fn_(std::forward<G>(fn)) {}
  const char* name() const override { return name_; }
  GradList apply(Tensor&& grad_output) override {
    if (!fn_) {
      throw_error<AutogradError>(
          name_, ": trying to backward through the graph a second time (its saved values were freed); "
                 "pass retain_graph=true to the first backward if you need to backward twice");
    }
    // Moved in, so a rule taking the gradient by value can pass it on without a copy.
    return (*fn_)(std::move(grad_output), static_cast<const Node&>(*this));
  }
  void release_saved() override { fn_.reset(); }

 private:
  const char* name_;
  std::optional<F> fn_;
};

void record_node(NodePtr node, std::span<const Tensor> inputs, Tensor& output);

// Records `output = name(inputs...)` with backward `fn` when any input requires grad. The node
// comes from the per-thread object pool (make_node).
template <class F>
void record(const char* name, std::initializer_list<TensorRef> inputs, Tensor& output, F&& fn) {
  record_node(make_node<FunctionNode<std::decay_t<F>>>(name, std::forward<F>(fn)),
              std::span<const TensorRef>(inputs.begin(), inputs.size()), output);
}
template <class F>
void record(const char* name, std::span<const Tensor> inputs, Tensor& output, F&& fn) {
  record_node(make_node<FunctionNode<std::decay_t<F>>>(name, std::forward<F>(fn)), inputs, output);
}

// True when the op's output and every input are one element of one shape and floating dtype.
inline bool one_element_op(std::initializer_list<TensorRef> inputs, const Tensor& output) {
  const Dims& shape = output.shape();
  if (!is_floating(output.dtype()) || (!shape.empty() && shape.numel() != 1)) return false;
  for (const TensorRef& r : inputs) {
    const Tensor& t = r.get();
    if (!t.defined() || t.dtype() != output.dtype() || !(t.shape() == shape)) return false;
  }
  return true;
}

// record() for an elementwise op of one or two inputs that also knows its local derivatives:
// `partials(x..., y)` returns d y / d x_i for each input x_i, as std::array, in the inputs' dtype.
// At one element they are evaluated now, so that a backward over a graph of such nodes moves
// numbers instead of tensors (Note [one-element graphs] in engine.cpp); `fn` serves every other
// backward. The op registry checks both against finite differences.
template <class F, class P>
void record(const char* name, std::initializer_list<TensorRef> inputs, Tensor& output, F&& fn, P partials) {
  NodePtr node = make_node<FunctionNode<std::decay_t<F>>>(name, std::forward<F>(fn));
  const bool one_element = one_element_op(inputs, output);
  if (one_element) {
    auto evaluate = [&]<class T>() {
      constexpr std::size_t arity = std::is_invocable_v<P&, T, T, T> ? 2 : 1;
      CG_ASSERT(inputs.size() == arity);  // (one partial derivative per input)
      auto x = [&](std::size_t i) { return *inputs.begin()[i].get().template data<T>(); };
      const T y = *output.template data<T>();
      auto store = [&](const std::array<T, arity>& d) {
        double as_double[arity];
        for (std::size_t i = 0; i < d.size(); ++i) as_double[i] = static_cast<double>(d[i]);
        set_partials(*node, as_double);
      };
      if constexpr (arity == 2)
        store(partials(x(0), x(1), y));
      else
        store(partials(x(0), y));
    };
    if (output.dtype() == DType::Float32)
      evaluate.template operator()<float>();
    else
      evaluate.template operator()<double>();
  }
  record_node(std::move(node), std::span<const TensorRef>(inputs.begin(), inputs.size()), output, one_element);
}

}  // namespace detail
}  // namespace chaingrad
