#include <atomic>
#include <cmath>

#include "chaingrad/autograd.hpp"
#include "chaingrad/ops.hpp"

namespace chaingrad {

namespace {
std::atomic<std::uint64_t> next_sequence_nr{0};
// A node frees the nodes only it owns by recursion, up to kRecursionLimit destructors deep (a
// scalar formula's graph, a network's); below that, a teardown parks them here instead, so a chain
// of 100,000 nodes frees in a loop (pattern 4).
thread_local std::vector<NodePtr>* pending_deletes = nullptr;
thread_local bool delete_stack_dead = false;
struct DeleteStack {
  std::vector<NodePtr> nodes;
  ~DeleteStack() { delete_stack_dead = true; }
};
thread_local DeleteStack delete_stack;
thread_local int delete_depth = 0;
constexpr int kRecursionLimit = 64;
}  // namespace

thread_local constinit bool detail::grad_mode_enabled = true;
thread_local constinit bool detail::anomaly_mode_enabled = false;
thread_local constinit bool detail::updates_in_backward_allowed = false;

namespace {
// Sequence numbers are handed to each thread in blocks, so recording a node costs no atomic
// read-modify-write; within a thread they increase with creation order, which is all the engine's
// tie-break (most recent op first) and the explainer's numbering need.
std::uint64_t next_sequence() {
  constexpr std::uint64_t kBlock = 1024;
  thread_local std::uint64_t next = 0, end = 0;
  if (next == end) {
    next = next_sequence_nr.fetch_add(kBlock, std::memory_order_relaxed);
    end = next + kBlock;
  }
  return next++;
}
}  // namespace

Node::Node() : sequence_nr_(next_sequence()) {}

const std::string& Node::label() const {
  static const std::string unlabelled;
  return extras_ ? extras_->label : unlabelled;
}

void Node::destroy() noexcept {
  const std::size_t bytes = block_bytes_;
  this->~Node();
  if (bytes <= allocator::kMaxPooledObject)
    allocator::deallocate_object(this, bytes);
  else
    ::operator delete(this);
}

Node::~Node() {
  // An edge this node does not own alone is just released: no recursion can follow from it.
  if (pending_deletes) {
    for (auto& e : next_edges_) {
      if (!e) continue;
      if (e.use_count() > 1)
        e.reset();
      else
        pending_deletes->push_back(std::move(e));
    }
    return;
  }
  // Recursion costs no work list (the scalar step ran 1.5% fewer instructions for it).
  if (delete_depth < kRecursionLimit) {
    ++delete_depth;
    next_edges_.clear();  // (so the member's own destructor finds nothing left to visit)
    --delete_depth;
    return;
  }
  bool last_owner = false;
  for (auto& e : next_edges_) {
    if (e && e.use_count() > 1) e.reset();
    last_owner = last_owner || e != nullptr;
  }
  if (!last_owner) return;
  // The work list is reused (one per thread) so freeing a graph allocates nothing once warm.
  DeleteStack& reusable = delete_stack;
  std::vector<NodePtr> local;
  std::vector<NodePtr>& stack = delete_stack_dead ? local : reusable.nodes;
  pending_deletes = &stack;
  for (auto& e : next_edges_)
    if (e) stack.push_back(std::move(e));
  while (!stack.empty()) {
    NodePtr n = std::move(stack.back());
    stack.pop_back();
    n.reset();  // if this was the last owner, its destructor appends its own edges to `stack`
  }
  pending_deletes = nullptr;
}

InBackwardUpdate* Node::update_in_backward(std::size_t i) const {
  if (!detail::updates_in_backward_allowed || i >= next_edges_.size()) return nullptr;
  const Node* next = next_edges_[i].get();
  // The last edge into the accumulator: every other one has delivered (dependencies_ counts the
  // edges still to come, this one included), and none brought anything.
  if (!next || !next->is_accumulate_grad() || next->dependencies_ != 1 || next->input_buffer_.defined() ||
      next->has_pre_hooks())
    return nullptr;
  return static_cast<const AccumulateGrad&>(*next).update_in_backward();
}

// ---------------------------------------------------------------- RunningNode
namespace {
thread_local detail::RunningNode* running_node = nullptr;
}
detail::RunningNode::RunningNode(const NodePtr& node) : owner_(node), previous_(running_node) {
  running_node = this;
}
detail::RunningNode::~RunningNode() {
  running_node = previous_;
  while (const SavedTensor* s = reattached_) {
    reattached_ = s->next_reattached_;
    s->next_reattached_ = nullptr;
    s->reattached_ = Tensor();
  }
}
void detail::RunningNode::keep_until_done(const SavedTensor& saved) {
  saved.next_reattached_ = reattached_;
  reattached_ = &saved;
}
detail::RunningNode* detail::RunningNode::current() { return running_node; }

// ---------------------------------------------------------------- SavedTensor
const Tensor& SavedTensor::unpack(const Node& owner) const {
  if (!data_.defined()) return data_;
  CG_CHECK(data_.version() == version_, AutogradError, owner.name(),
           ": a tensor it saved for backward (shape ", data_.shape(), ") was modified by an in-place operation "
           "after the forward pass (its version is ", data_.version(), ", expected ", version_,
           "); clone it before modifying it, or modify it before using it");
  if (!reattach_ || !GradMode::is_enabled()) return data_;
  // create_graph: give the output back its place in the graph so gradients can flow through it.
  // Grad mode on outside a create_graph backward (a hook that enables it, say): no graph is being
  // built for this node, so the detached output is the answer.
  detail::RunningNode* running = detail::RunningNode::current();
  if (!running) return data_;
  CG_CHECK(running->owner().get() == &owner, InternalError, owner.name(),
           ": a saved output was unpacked outside its node's backward");
  if (!reattached_.defined()) {
    reattached_ = data_.detach();
    reattached_.impl()->grad_fn = running->owner();
    reattached_.impl()->requires_grad = true;
    running->keep_until_done(*this);
  }
  return reattached_;
}

// ---------------------------------------------------------------- AccumulateGrad
AccumulateGrad::AccumulateGrad(TensorImpl& leaf) : leaf_(&leaf) {
  next_edges_.clear();
  output_meta_ = {leaf.shape, leaf.dtype};
  if (leaf.shape.numel() == 1 && is_floating(leaf.dtype)) value_rule_ = ValueRule::accumulate;
}

bool AccumulateGrad::accumulates_value() const {
  const TensorImpl* leaf = leaf_;
  if (!leaf) return true;  // (the gradient is dropped)
  if (leaf->extras && !leaf->extras->hooks.empty()) return false;
  const TensorImpl* g = leaf->grad_impl.get();
  return !g || (g->dtype == leaf->dtype && g->shape.numel() == 1 && !g->requires_grad && !g->grad_fn);
}

InBackwardUpdate* AccumulateGrad::update_in_backward() const {
  const TensorImpl* leaf = leaf_;
  if (!leaf || !leaf->extras || !leaf->extras->hooks.empty() || leaf->grad_impl) return nullptr;
  return leaf->extras->update_in_backward;
}

namespace {
// Whether `spare` may become the leaf's new `.grad`: nobody else holds the head or its storage (so
// nobody can tell it from a new tensor), and nothing was attached to it while it was `.grad`.
bool reusable_spare(const TensorImpl* spare, const TensorImpl& leaf) {
  return spare && intrusive_use_count(spare) == 1 && spare->storage.use_count() == 1 && spare->offset == 0 &&
         spare->dtype == leaf.dtype && spare->shape == leaf.shape && !spare->requires_grad && !spare->grad_fn &&
         !spare->grad_impl && !spare->grad_accumulator && !spare->extras;
}
}  // namespace

void AccumulateGrad::accumulate_value(double g) {
  TensorImpl* const leaf = leaf_;
  if (!leaf) return;
  if (!leaf->grad_impl) {
    if (!reusable_spare(spare_grad_.get(), *leaf)) spare_grad_ = empty(leaf->shape, leaf->dtype).take_impl();
    TensorImpl& grad = *spare_grad_;
    if (leaf->dtype == DType::Float32)
      *static_cast<float*>(grad.storage->data()) = static_cast<float>(g);
    else
      *static_cast<double*>(grad.storage->data()) = g;
    leaf->grad_impl = spare_grad_;
    return;
  }
  // In place, as apply() adds into an existing `.grad` (a user's handle on it sees the sum).
  TensorImpl& grad = *leaf->grad_impl;
  void* p = static_cast<char*>(grad.storage->data()) + grad.offset * element_size(grad.dtype);
  if (grad.dtype == DType::Float32)
    *static_cast<float*>(p) += static_cast<float>(g);
  else
    *static_cast<double*>(p) += g;
  grad.storage->bump_version();
}

GradList AccumulateGrad::apply(Tensor&& grad_output) {
  TensorImpl* const leaf = leaf_;  // (the leaf's owner keeps it alive; its destruction clears leaf_)
  if (!leaf) return {};
  Tensor grad = std::move(grad_output);
  ImplPtr keep;
  if (leaf->extras) {
    keep = ImplPtr::retain(leaf);  // a hook could drop the last other reference to the leaf
    for (auto& hook : leaf->extras->hooks) {
      Tensor r = hook(grad);
      if (r.defined()) grad = r;
    }
  }
  if (!leaf->grad_impl) {
    if (GradMode::is_enabled()) {
      leaf->grad_impl = std::move(grad).take_impl();  // create_graph: .grad keeps its own graph
    } else if (grad.storage().use_count() == 1 && grad.is_contiguous() && grad.impl_ptr().use_count() == 1) {
      // Nobody else sees this buffer: take it (the handle itself when it is outside any graph).
      const bool plain = !grad.requires_grad() && !grad.grad_fn() && grad.offset() == 0 && !grad.impl()->extras;
      leaf->grad_impl = plain ? std::move(grad).take_impl() : grad.detach().take_impl();
    } else {
      leaf->grad_impl = grad.clone().take_impl();  // grad mode is off: clone records nothing
    }
  } else if (GradMode::is_enabled()) {
    leaf->grad_impl = add(Tensor(leaf->grad_impl), grad).take_impl();
  } else {
    Tensor(leaf->grad_impl).add_(grad);
  }
  return {};
}

NodePtr detail::new_accumulator_edge(const Tensor& t) {
  TensorImpl* impl = t.impl();
  const NodePtr& cached = impl->grad_accumulator;
  // A leaf whose shape or dtype changed (Module::to) gets a new accumulator; graphs recorded before
  // the change no longer reach the leaf through the old one.
  if (cached) static_cast<AccumulateGrad&>(*cached).forget_leaf();
  impl->grad_accumulator = detail::make_node<AccumulateGrad>(*impl);
  return impl->grad_accumulator;
}

// ---------------------------------------------------------------- recording
namespace detail {

bool any_requires_grad(std::span<const Tensor> inputs) {
  if (!GradMode::is_enabled()) return false;
  for (const Tensor& t : inputs)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

void record_node(NodePtr node, std::span<const Tensor> inputs, Tensor& output) {
  std::vector<TensorRef> refs;
  refs.reserve(inputs.size());
  for (const Tensor& t : inputs) refs.emplace_back(t);
  record_node(std::move(node), std::span<const TensorRef>(refs), output);
}

namespace {
// (Out of line and cold: the stream it builds would otherwise cost every recorded op a larger frame.)
[[noreturn, gnu::cold, gnu::noinline]] void throw_non_finite_output(const Node& n, std::span<const TensorRef> inputs,
                                                                     const Tensor& output) {
  std::ostringstream shapes;
  for (std::size_t i = 0; i < inputs.size(); ++i)
    shapes << (i ? ", " : "") << (inputs[i].get().defined() ? to_string(inputs[i].get().shape()) : "none");
  throw_error<ValueError>("anomaly detected: ", n.name(), " produced a non-finite value (NaN or Inf) in its ",
                          "forward output of shape ", output.shape(), "; inputs' shapes: ", shapes.str(), "; op #",
                          n.sequence_nr(), " of this process");
}
}  // namespace

void record_node(NodePtr node, std::span<const TensorRef> inputs, Tensor& output, bool one_element) {
  node->next_edges_.reserve(inputs.size());
  for (const TensorRef& ref : inputs) node->next_edges_.push_back(gradient_edge(ref.get()));
  if (!one_element) {
    node->input_meta_.reserve(inputs.size());
    for (const TensorRef& ref : inputs) {
      const Tensor& t = ref.get();
      node->input_meta_.push_back(t.defined() ? InputMeta{t.shape(), t.dtype()} : InputMeta{{}, DType::Float64});
    }
  }
  node->output_meta_ = {output.shape(), output.dtype()};
  if (output.impl()->extras && !output.name().empty()) node->set_label(output.name());
  Node& recorded = *node;
  output.impl()->grad_fn = std::move(node);
  output.impl()->requires_grad = true;
  if (AnomalyMode::is_enabled() && is_floating(output.dtype()) && !isfinite_all(output))
    throw_non_finite_output(recorded, inputs, output);
}

}  // namespace detail
}  // namespace chaingrad
