// The backward engine: an iterative walk in reverse topological order (no recursion, so a chain
// of 100,000 ops is fine), dependency counts for readiness, gradient sums at fan-out, broadcast
// reduction and dtype restoration for every input gradient (pattern 3: the engine owns plumbing).
// A graph of one-element values runs on numbers, in sequence-number order (Note [one-element graphs]).
#include <algorithm>
#include <memory>
#include <optional>
#include <span>
#include <unordered_map>

#include "chaingrad/autograd.hpp"
#include "chaingrad/ops.hpp"

namespace chaingrad {

class Engine {
 public:
  struct Capture {
    std::vector<Node*> targets;  // grad(): stop at these nodes and return their gradients
    std::vector<Tensor> results;
  };

  // A ready node, with its sequence number at hand so the queue's comparisons read no node.
  struct Ready {
    std::uint64_t sequence_nr;
    // The edge (or root) that owns the node: a node's backward may need a strong reference to
    // itself (a saved output re-attached under create_graph), and nodes keep none.
    const NodePtr* owner;
    friend bool operator<(const Ready& a, const Ready& b) { return a.sequence_nr < b.sequence_nr; }
  };

  // The nodes ready to run; the most recent op (highest sequence number) runs first. Usually a
  // handful (one along a chain, two or three where a sum meets its bias's accumulator), so it is
  // kept sorted, where a push is a compare or two and a pop takes the back; past kSortedMax
  // entries (a wide graph) it turns into a heap until it drains. Both give the same order.
  class ReadyQueue {
   public:
    explicit ReadyQueue(std::vector<Ready>& v) : v_(v) {}
    bool empty() const { return v_.empty(); }
    void push(Ready r) {
      v_.push_back(r);
      if (heap_) {
        std::push_heap(v_.begin(), v_.end());
      } else if (v_.size() > kSortedMax) {
        std::make_heap(v_.begin(), v_.end());
        heap_ = true;
      } else {
        std::size_t i = v_.size() - 1;
        for (; i > 0 && r < v_[i - 1]; --i) v_[i] = v_[i - 1];
        v_[i] = r;
      }
    }
    Ready pop() {
      if (heap_) {
        std::pop_heap(v_.begin(), v_.end());
        heap_ = v_.size() > 2;  // (one entry left is sorted too)
      }
      const Ready r = v_.back();
      v_.pop_back();
      return r;
    }

   private:
    static constexpr std::size_t kSortedMax = 16;
    std::vector<Ready>& v_;
    bool heap_ = false;
  };

  // Work lists reused across calls so a backward allocates nothing once warm; one set per
  // nesting level, since a hook may itself call backward.
  struct Scratch {
    std::vector<Node*> nodes, seeded;
    std::vector<Ready> ready;  // ReadyQueue's entries
  };
  static Scratch& acquire_scratch(int depth) {
    static thread_local std::vector<std::unique_ptr<Scratch>> pool;
    while (static_cast<int>(pool.size()) <= depth) pool.push_back(std::make_unique<Scratch>());
    Scratch& s = *pool[depth];
    s.nodes.clear();
    s.seeded.clear();
    s.ready.clear();
    return s;
  }

  static void run(std::span<const NodePtr> roots, std::span<Tensor> root_grads,  // (moved from)
                  const autograd::BackwardOptions& opt, Capture* capture) {
    static thread_local int depth = 0;
    Scratch& scratch = acquire_scratch(depth);
    struct DepthGuard {
      int& d;
      explicit DepthGuard(int& x) : d(x) { ++d; }
      ~DepthGuard() { --d; }
    } depth_guard(depth);
    // Each node's scratch is reset as it runs, and every node reached runs; this puts back the
    // scratch of the nodes a failed backward (a throwing hook or rule) did not reach.
    std::vector<Node*>& nodes = scratch.nodes;
    struct ResetOnError {
      std::vector<Node*>& nodes;
      bool done = false;
      ~ResetOnError() {
        if (done) return;
        for (Node* n : nodes) reset_scratch(*n);
      }
    } reset{nodes};

    // 0. A graph of one-element values may run on numbers (Note [one-element graphs]).
    if (!capture && !opt.observer && !opt.create_graph && !AnomalyMode::is_enabled() &&
        run_by_value(roots, root_grads, opt.retain_graph, scratch)) {
      reset.done = true;
      return;
    }

    // 1. Discover the graph and count, for each node, the edges that point into it. `nodes` is its
    // own work list (breadth first): each node is visited once, in the order it was found.
    auto visit = [&](Node* n) {
      n->visited_ = true;
      nodes.push_back(n);
    };
    for (const auto& r : roots)
      if (!r->visited_) visit(r.get());
    for (std::size_t i = 0; i < nodes.size(); ++i) {
      for (const auto& e : nodes[i]->next_edges_) {
        if (!e) continue;
        e->dependencies_++;
        if (!e->visited_) visit(e.get());
      }
    }

    // 2. For grad(): run only nodes that lead to a requested input; backward() runs everything.
    if (capture) mark_needed(nodes, capture->targets);

    // 3. Seed the roots' buffers; among nodes of equal readiness the most recent op runs first.
    ReadyQueue ready(scratch.ready);
    auto push_ready = [&](const NodePtr& n) { ready.push({n->sequence_nr_, &n}); };
    for (std::size_t i = 0; i < roots.size(); ++i) {
      const InputMeta& out = roots[i]->output_meta_;  // (an implicit gradient: ones, check_root)
      accumulate(*roots[i], root_grads[i].defined() ? std::move(root_grads[i]) : ones(out.shape, {.dtype = out.dtype}),
                 opt);
    }
    push_roots(roots, ready, scratch.seeded);

    EnableGradGuard grad_mode(opt.create_graph);
    const bool anomaly = AnomalyMode::is_enabled();
    // Note [updates in backward]: a node may fold an optimizer's step into a gradient only where
    // nobody asked to see the gradient. (Restored on the way out: a hook may run a backward of its own.)
    struct UpdatesAllowed {
      bool previous = detail::updates_in_backward_allowed;
      explicit UpdatesAllowed(bool on) { detail::updates_in_backward_allowed = on; }
      ~UpdatesAllowed() { detail::updates_in_backward_allowed = previous; }
    } updates_allowed(!capture && !opt.observer && !opt.create_graph && !anomaly);
    while (!ready.empty()) {
      const NodePtr& owner = *ready.pop().owner;
      Node* node = owner.get();
      Tensor grad = std::move(node->input_buffer_);  // (leaves the buffer empty)

      if (capture) {
        auto it = std::find(capture->targets.begin(), capture->targets.end(), node);
        if (it != capture->targets.end()) {
          for (std::size_t k = 0; k < capture->targets.size(); ++k)
            if (capture->targets[k] == node) capture->results[k] = grad;
        }
      }

      const bool needed = capture ? node->needed_ && !node->is_accumulate_grad() : true;
      // Initialized in place from apply()'s result (no default construction and move).
      GradList grads = grad.defined() && needed ? run_one(owner, grad, opt) : GradList();

      const std::size_t num_edges = node->next_edges_.size();
      for (std::size_t i = 0; i < num_edges; ++i) {
        const NodePtr& edge = node->next_edges_[i];
        Node* next = edge.get();
        if (!next) continue;
        if (i < grads.size() && grads[i].defined()) {
          Tensor& g = grads[i];
          fit_to_input(*node, i, g, anomaly);
          if (opt.observer) {
            opt.observer->on_input_grad(*node, i, g);
            if (next->input_buffer_.defined()) opt.observer->on_accumulate(*next, next->input_buffer_, g);
          }
          accumulate(*next, std::move(g), opt);
        }
        if (--next->dependencies_ == 0) push_ready(edge);
      }
      node->needed_ = false;
      node->visited_ = false;
    }
    reset.done = true;
  }

 private:
  // The roots that wait on no other root, each once.
  static void push_roots(std::span<const NodePtr> roots, ReadyQueue& ready, std::vector<Node*>& seeded) {
    for (const auto& r : roots) {
      if (r->dependencies_ == 0 && std::find(seeded.begin(), seeded.end(), r.get()) == seeded.end()) {
        ready.push({r->sequence_nr_, &r});
        seeded.push_back(r.get());
      }
    }
  }

  // Note [one-element graphs]
  // A graph of one-element values (a scalar formula, the seed network) is mostly bookkeeping when
  // its gradients are tensors: each edge makes, checks and frees a 0-d tensor, and each node runs
  // a rule written for any shape. When every node knows its local derivatives as numbers (ops that
  // pass them to record(), evaluated at one element) or adds into a one-element `.grad`, and
  // nothing watches the gradients as tensors (no hooks, observer, anomaly mode, create_graph or
  // grad()'s capture), the backward moves numbers instead: the gradient for input i is
  // g * d y / d x_i, computed and summed at fan-out in the node's dtype, in the same order as the
  // tensor path. The saved tensors are not read, so an input modified in place after the forward
  // is not an error here: the gradient is that of the values the forward saw. Any other node sends
  // the whole graph down the tensor path, which gives the same gradients to within rounding.
  static bool runs_by_value(const Node& n) {
    switch (n.value_rule_) {
      case Node::ValueRule::partials:
        return !n.released_ && !n.has_pre_hooks();
      case Node::ValueRule::accumulate:
        return !n.has_pre_hooks() && static_cast<const AccumulateGrad&>(n).accumulates_value();
      case Node::ValueRule::none:
        return false;
    }
    return false;
  }

  template <class T>
  static void add_product(double& sum, double g, double partial) {
    sum = static_cast<double>(static_cast<T>(sum) + static_cast<T>(g) * static_cast<T>(partial));
  }

  static inline thread_local std::uint64_t value_runs = 0;

  // The walk on numbers. It needs no discovery pass or dependency counts: within a thread, a node
  // is recorded after the nodes of its inputs, so running the reached nodes from the highest
  // sequence number down runs each one after all of its consumers, in the order the tensor path
  // runs them (its ready queue also takes the most recent op first). Accumulators are the
  // exception (one is made when its leaf is first used, after the node that uses it), but they
  // only sum, so they are not queued: each adds its total into `.grad` at the end. A graph built
  // on several threads can break that order; the walk then gives up, as it does at a node that
  // cannot run on numbers, having changed nothing but the nodes' scratch, and the tensor path
  // runs instead.
  static bool run_by_value(std::span<const NodePtr> roots, std::span<const Tensor> root_grads, bool retain_graph,
                           Scratch& scratch) {
    std::vector<Node*>& reached = scratch.nodes;
    ReadyQueue ready(scratch.ready);
    auto reach = [&](const NodePtr& edge) {
      Node* n = edge.get();
      if (n->visited_) return true;
      if (!runs_by_value(*n)) return false;
      n->visited_ = true;
      n->value_grad_ = 0;
      reached.push_back(n);
      if (n->value_rule_ != Node::ValueRule::accumulate) ready.push({n->sequence_nr_, &edge});
      return true;
    };
    auto give_up = [&] {
      for (Node* n : reached) n->visited_ = false;
      reached.clear();
      scratch.ready.clear();
      return false;
    };
    for (const NodePtr& r : roots)
      if (!reach(r)) return give_up();
    for (std::size_t i = 0; i < roots.size(); ++i) {
      Node& r = *roots[i];
      const double g = root_grads[i].defined() ? root_grads[i].item() : 1.0;  // (implicit: check_root)
      if (r.output_meta_.dtype == DType::Float32)
        add_product<float>(r.value_grad_, g, 1.0);
      else
        add_product<double>(r.value_grad_, g, 1.0);
    }
    while (!ready.empty()) {
      const Node* node = ready.pop().owner->get();
      const double g = node->value_grad_;
      const bool single = node->output_meta_.dtype == DType::Float32;
      const std::size_t num_edges = node->next_edges_.size();
      for (std::size_t i = 0; i < num_edges; ++i) {
        const NodePtr& edge = node->next_edges_[i];
        Node* next = edge.get();
        if (!next) continue;
        if (!reach(edge)) return give_up();
        if (next->sequence_nr_ > node->sequence_nr_ && next->value_rule_ != Node::ValueRule::accumulate)
          return give_up();  // an input recorded after its consumer (another thread's block of numbers)
        if (single)
          add_product<float>(next->value_grad_, g, node->partials_[i]);
        else
          add_product<double>(next->value_grad_, g, node->partials_[i]);
      }
    }
    ++value_runs;
    for (Node* node : reached) {
      if (node->value_rule_ == Node::ValueRule::accumulate) {
        static_cast<AccumulateGrad*>(node)->accumulate_value(node->value_grad_);
      } else if (!retain_graph) {
        node->release_saved();
        node->released_ = true;
      }
      node->visited_ = false;
    }
    return true;
  }

  static void reset_scratch(Node& n) {
    n.dependencies_ = 0;
    n.input_buffer_ = Tensor();
    n.needed_ = false;
    n.visited_ = false;
  }

  // Runs the node's hooks and backward on its summed upstream gradient; frees its saved values.
  static GradList run_one(const NodePtr& owner, Tensor& grad, const autograd::BackwardOptions& opt) {
    Node& node = *owner;
    if (node.has_pre_hooks()) {
      for (auto& hook : node.extras_->pre_hooks) {
        Tensor r = hook(grad);
        if (r.defined()) grad = r;
      }
    }
    if (opt.observer) opt.observer->on_node(node, grad);
    // Only create_graph re-attaches saved outputs, so only it needs the node marked as running.
    std::optional<detail::RunningNode> running;
    if (opt.create_graph) running.emplace(owner);
    GradList grads = node.apply(std::move(grad));
    if (!opt.retain_graph) {
      node.release_saved();
      node.released_ = true;
    }
    CG_ASSERT(grads.empty() || grads.size() == node.next_edges_.size());
    return grads;
  }

  // Reduces a broadcast gradient to the input's shape and restores its dtype, in place.
  static void fit_to_input(const Node& node, std::size_t i, Tensor& g, bool anomaly) {
    const InputMeta& meta = node.input_meta(i);
    if (!(g.shape() == meta.shape)) {
      CG_CHECK(g.numel() >= meta.shape.numel(), InternalError, node.name(), ": backward returned a gradient of shape ",
               g.shape(), " for input ", i, " of shape ", meta.shape);
      g = sum_to(g, meta.shape);
    }
    if (g.dtype() != meta.dtype) g = cast(g, meta.dtype);
    if (anomaly && !isfinite_all(g)) {
      detail::throw_error<ValueError>("anomaly detected: the backward of ", node.name(),
                                      " produced a non-finite gradient (NaN or Inf) for its input ", i, " of shape ",
                                      meta.shape, " (op #", node.sequence_nr(), ")");
    }
  }

  static void accumulate(Node& target, Tensor&& g, const autograd::BackwardOptions& opt) {
    if (!g.defined()) return;
    Tensor& buf = target.input_buffer_;
    if (!buf.defined()) {
      buf = std::move(g);
    } else if (!opt.create_graph && buf.impl_ptr().use_count() == 1 && buf.storage().use_count() == 1 &&
               !buf.requires_grad() && buf.shape() == g.shape() && buf.is_contiguous()) {
      buf.add_(g);  // the buffer is ours alone: sum in place
    } else {
      buf = add(buf, g);
    }
  }

  // needed_ = some path from this node reaches a target. Post-order over the discovered nodes.
  static void mark_needed(const std::vector<Node*>& nodes, const std::vector<Node*>& targets) {
    for (Node* n : nodes) n->needed_ = false;
    std::unordered_map<Node*, int> state;  // 0 unseen, 1 open, 2 done
    for (Node* start : nodes) {
      if (state[start] == 2) continue;
      std::vector<std::pair<Node*, std::size_t>> st{{start, 0}};
      state[start] = 1;
      while (!st.empty()) {
        auto& [n, i] = st.back();
        if (i < n->next_edges_.size()) {
          Node* c = n->next_edges_[i++].get();
          if (c && state[c] == 0) {
            state[c] = 1;
            st.push_back({c, 0});
          }
          continue;
        }
        bool needed = std::find(targets.begin(), targets.end(), n) != targets.end();
        for (const auto& e : n->next_edges_) needed = needed || (e && e->needed_);
        n->needed_ = needed;
        state[n] = 2;
        st.pop_back();
      }
    }
  }

  friend void autograd::backward(const std::vector<Tensor>&, const std::vector<Tensor>&, autograd::BackwardOptions);
  friend std::uint64_t autograd::value_backward_runs();
  friend std::vector<Tensor> autograd::grad(const std::vector<Tensor>&, const std::vector<Tensor>&,
                                            const std::vector<Tensor>&, bool, bool, bool);
};

namespace autograd {
std::uint64_t value_backward_runs() { return Engine::value_runs; }

namespace {

// Checks output `i` and its upstream gradient. `g` stays undefined for the implicit gradient of a
// one-element output: the engine seeds it with one (a tensor of ones only on the tensor path).
void check_root(const Tensor& out, const Tensor& grad_output, std::size_t i, Tensor& g) {
  CG_CHECK(out.defined(), ValueError, "backward: output ", i, " is undefined");
  CG_CHECK(out.requires_grad(), AutogradError, "backward: output ", i,
           " does not require grad and has no grad_fn (was it computed under no_grad, or from tensors "
           "without requires_grad?)");
  g = grad_output;
  if (!g.defined()) {
    CG_CHECK(out.numel() == 1, ValueError,
             "backward: a gradient can be created implicitly only for one-element outputs; got shape ",
             out.shape(), " (pass grad_output)");
  } else {
    CG_CHECK(g.shape() == out.shape(), ShapeError, "backward: grad_output has shape ", g.shape(),
             " but the output has shape ", out.shape());
  }
}

void prepare_root(const Tensor& out, const Tensor& grad_output, std::size_t i, NodePtr& root, Tensor& g) {
  check_root(out, grad_output, i, g);
  root = gradient_edge(out);
}

void prepare_roots(const std::vector<Tensor>& outputs, const std::vector<Tensor>& grad_outputs,
                   std::vector<NodePtr>& roots, std::vector<Tensor>& grads) {
  CG_CHECK(grad_outputs.empty() || grad_outputs.size() == outputs.size(), ValueError, "backward: got ",
           outputs.size(), " outputs but ", grad_outputs.size(), " gradients");
  roots.resize(outputs.size());
  grads.resize(outputs.size());
  for (std::size_t i = 0; i < outputs.size(); ++i)
    prepare_root(outputs[i], grad_outputs.empty() ? Tensor() : grad_outputs[i], i, roots[i], grads[i]);
}

}  // namespace

void backward(const std::vector<Tensor>& outputs, const std::vector<Tensor>& grad_outputs, BackwardOptions options) {
  std::vector<NodePtr> roots;
  std::vector<Tensor> grads;
  prepare_roots(outputs, grad_outputs, roots, grads);
  Engine::run(roots, grads, options, nullptr);
}

std::vector<Tensor> grad(const std::vector<Tensor>& outputs, const std::vector<Tensor>& inputs,
                         const std::vector<Tensor>& grad_outputs, bool retain_graph, bool create_graph,
                         bool allow_unused) {
  std::vector<NodePtr> roots;
  std::vector<Tensor> grads;
  prepare_roots(outputs, grad_outputs, roots, grads);
  Engine::Capture capture;
  std::vector<NodePtr> keep;  // accumulators created here must live through the run
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    CG_CHECK(inputs[i].defined() && inputs[i].requires_grad(), AutogradError, "grad: input ", i,
             " does not require grad");
    keep.push_back(gradient_edge(inputs[i]));
    capture.targets.push_back(keep.back().get());
  }
  capture.results.resize(inputs.size());
  Engine::run(roots, grads, {.retain_graph = retain_graph, .create_graph = create_graph}, &capture);
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    Tensor& r = capture.results[i];
    if (!r.defined()) {
      CG_CHECK(allow_unused, AutogradError, "grad: input ", i,
               " was not used to compute the outputs (pass allow_unused=true to get an undefined tensor)");
      continue;
    }
    if (!create_graph) r = r.detach();
  }
  return capture.results;
}

}  // namespace autograd

// The usual case, one output: no vectors for the roots and their gradients.
void Tensor::backward(const Tensor& grad_output, bool retain_graph, bool create_graph) const {
  Tensor g;
  autograd::check_root(*this, grad_output, 0, g);
  // The root's own grad_fn is the owning reference for the run (this tensor outlives the call); a
  // leaf root runs its accumulator, which the leaf keeps.
  if (!impl_->grad_fn) gradient_edge(*this);  // makes (or refreshes) the leaf's accumulator
  const NodePtr& root = impl_->grad_fn ? impl_->grad_fn : impl_->grad_accumulator;
  Engine::run(std::span<const NodePtr>(&root, 1), std::span<Tensor>(&g, 1),
              {.retain_graph = retain_graph, .create_graph = create_graph}, nullptr);
}

}  // namespace chaingrad
