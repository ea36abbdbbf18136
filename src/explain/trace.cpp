// --trace: the engine's own backward pass, observed node by node (BackwardObserver).
// --check: every local derivative against a central difference of its node's forward.
#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "chaingrad/autograd.hpp"
#include "chaingrad/explain.hpp"
#include "chaingrad/ops.hpp"
#include "explain/model.hpp"

namespace chaingrad::explain {

using namespace detail;

namespace {
using ojson = nlohmann::ordered_json;

struct Setup {
  Program program;
  Resolved resolved;
  Graph graph;
};
Setup setup(std::string_view formula, const Options& options, bool expanded) {
  Setup s{parse(formula), {}, {}};
  s.resolved = resolve(s.program, options);
  s.graph = expanded ? expanded_graph(s.program, s.resolved.output) : named_graph(s.program, s.resolved.output);
  return s;
}

std::string wrap_name(const std::string& s) { return is_identifier(s) ? s : "(" + s + ")"; }

// ---------------------------------------------------------------- the observer
class Recorder final : public BackwardObserver {
 public:
  Recorder(const Graph& g, const Evaluation& ev, BackwardTrace& out) : g_(g), ev_(ev), out_(out) {
    const RefNamer namer = g.namer();
    for (std::size_t u = 0; u < g.units.size(); ++u) {
      const Tensor& t = ev.tensors[u];
      if (t.grad_fn()) {
        unit_of_[t.grad_fn().get()] = static_cast<int>(u);
      } else if (t.requires_grad()) {
        keep_.push_back(gradient_edge(t));  // a leaf's accumulator, held for the run
        unit_of_[keep_.back().get()] = static_cast<int>(u);
      }
      partials_.push_back(slot_partials(g, static_cast<int>(u), ev.values));
      std::vector<std::string> forms;
      const auto ss = slots(g, static_cast<int>(u));
      for (std::size_t k = 0; k < ss.size(); ++k) {
        forms.push_back(to_string(*slot_form(g, static_cast<int>(u), static_cast<int>(k)), [&](int id) {
          return id < 0 ? RefText{g.units[ss[-1 - id].unit].name, g.units[ss[-1 - id].unit].prec} : namer(id);
        }));
      }
      forms_.push_back(std::move(forms));
    }
  }

  void on_node(const Node& node, const Tensor& grad_output) override {
    TraceStep step;
    const int u = unit(node);
    current_ = u;
    step.node = u >= 0 ? g_.units[u].name : (node.label().empty() ? "?" : node.label());
    step.op = node.name();
    step.sequence_nr = node.sequence_nr();
    step.leaf = node.is_accumulate_grad();
    if (u >= 0) {
      step.expression = g_.expression(u);
      step.value = ev_.values[u];
    }
    step.upstream = grad_output.item();
    out_.steps.push_back(std::move(step));
    // Engine inputs that carry a gradient line up, in order, with the op's variable arguments.
    live_inputs_.clear();
    for (std::size_t i = 0; i < node.next_edges().size(); ++i)
      if (node.next_edges()[i]) live_inputs_.push_back(i);
  }

  void on_input_grad(const Node& node, std::size_t i, const Tensor& grad) override {
    TraceStep& step = out_.steps.back();
    TraceSend send;
    const int target = unit(*node.next_edges()[i]);
    send.to = target >= 0 ? g_.units[target].name : "?";
    send.sent = grad.item();
    const auto k = static_cast<std::size_t>(std::find(live_inputs_.begin(), live_inputs_.end(), i) - live_inputs_.begin());
    const auto ss = current_ >= 0 ? slots(g_, current_) : std::vector<Slot>{};
    if (k < ss.size() && ss[k].unit == target) {
      send.argument = ss[k].arg;
      send.formula = forms_[current_][k];
      send.local = partials_[current_][k];
    } else {  // should not happen; show what the engine did
      send.formula = "?";
      send.local = step.upstream != 0 ? send.sent / step.upstream : std::nan("");
    }
    step.sends.push_back(std::move(send));
  }

  void on_accumulate(const Node&, const Tensor& before, const Tensor& added) override {
    TraceSend& send = out_.steps.back().sends.back();
    send.accumulated = true;
    send.before = before.item();
    send.after = send.before + added.item();
  }

 private:
  int unit(const Node& n) const {
    auto it = unit_of_.find(&n);
    return it == unit_of_.end() ? -1 : it->second;
  }
  const Graph& g_;
  const Evaluation& ev_;
  BackwardTrace& out_;
  std::map<const Node*, int> unit_of_;
  std::vector<NodePtr> keep_;
  std::vector<std::vector<double>> partials_;
  std::vector<std::vector<std::string>> forms_;
  std::vector<std::size_t> live_inputs_;
  int current_ = -1;
};

}  // namespace

BackwardTrace trace_backward(std::string_view formula, const Options& options) {
  const Setup s = setup(formula, options, /*expanded=*/true);
  const Evaluation ev = evaluate(s.graph, s.program, s.resolved.input_values);
  BackwardTrace trace;
  trace.output = s.graph.units[s.graph.output].name;
  Recorder recorder(s.graph, ev, trace);
  autograd::backward({ev.tensors[s.graph.output]}, {}, {.observer = &recorder});
  return trace;
}

std::string to_text(const BackwardTrace& t) {
  std::ostringstream os;
  os << "Backward pass, node by node in the order the engine runs it\n"
     << "(upstream = ∂" << wrap_name(t.output) << "/∂node as it arrives, already summed over fan-out;\n"
     << " each input is sent upstream × local derivative)\n";
  auto head_of = [](const TraceStep& st) {
    return !st.expression.empty() && st.expression != st.node ? cat(st.node, " = ", st.expression) : st.node;
  };
  std::size_t w = 0;
  for (const auto& st : t.steps) w = std::max(w, text_width(head_of(st)));
  w = std::min<std::size_t>(w, 40);
  const std::size_t wi = std::to_string(t.steps.size()).size();
  for (std::size_t i = 0; i < t.steps.size(); ++i) {
    const TraceStep& st = t.steps[i];
    const std::string number = std::to_string(i + 1);
    os << "\n[" << number << "]" << std::string(wi - number.size() + 1, ' ') << pad_right(head_of(st), w) << "  ";
    if (st.leaf) {
      os << "input (" << st.op << ")\n";
      os << "    ∂" << wrap_name(t.output) << "/∂" << wrap_name(st.node) << " = " << fmt(st.upstream, 10)
         << " arrives and is stored in " << st.node << ".grad\n";
      continue;
    }
    os << st.op << " (node #" << st.sequence_nr << "), value " << fmt(st.value) << "\n";
    os << "    upstream ∂" << wrap_name(t.output) << "/∂" << wrap_name(st.node) << " = " << fmt(st.upstream, 10)
       << (i == 0 ? " (the seed)" : "") << "\n";
    for (const TraceSend& s : st.sends) {
      const std::string value = fmt(s.local);
      const bool repeated = std::count_if(st.sends.begin(), st.sends.end(),
                                          [&](const TraceSend& o) { return o.to == s.to; }) > 1;
      os << "    → " << s.to << (repeated ? cat(" (as argument ", std::to_string(s.argument + 1), ")") : "")
         << ": local " << partial_name(st.node, s.to) << " = " << s.formula
         << (s.formula == value ? "" : cat(" = ", value)) << "; sends " << fmt(st.upstream) << " × "
         << (s.local < 0 ? cat("(", value, ")") : value) << " = " << fmt(s.sent, 10) << "\n";
      if (s.accumulated)
        os << "      fan-out: " << s.to << " already holds " << fmt(s.before, 10) << " from another path; "
           << fmt(s.before, 10) << " + " << fmt(s.sent, 10) << " = " << fmt(s.after, 10) << "\n";
    }
  }
  return os.str();
}

std::string to_json(const BackwardTrace& t, int indent) {
  ojson steps = ojson::array();
  for (const TraceStep& st : t.steps) {
    ojson sj{{"node", st.node}, {"op", st.op}, {"sequence_nr", st.sequence_nr}, {"leaf", st.leaf},
             {"value", st.value}, {"upstream", st.upstream}};
    if (!st.expression.empty()) sj["expression"] = st.expression;
    ojson sends = ojson::array();
    for (const TraceSend& s : st.sends) {
      ojson x{{"to", s.to}, {"argument", s.argument}, {"formula", s.formula}, {"local", s.local}, {"sent", s.sent}};
      if (s.accumulated) x["accumulated"] = {{"before", s.before}, {"after", s.after}};
      sends.push_back(std::move(x));
    }
    sj["sends"] = std::move(sends);
    steps.push_back(std::move(sj));
  }
  return ojson{{"output", t.output}, {"backward", std::move(steps)}}.dump(indent);
}

// ---------------------------------------------------------------- --check
namespace {

// Is any op inside `e` at a point where it is not differentiable (within h)?
bool near_kink(const Expr& e, const std::function<double(int)>& value_of, double h) {
  if (e.op == Op::Number || e.op == Op::Ref) return false;
  std::vector<double> a;
  for (const auto& x : e.args) {
    if (near_kink(*x, value_of, h)) return true;
    a.push_back(eval_double(*x, value_of));
  }
  const OpInfo& op = info(e.op);
  return op.kink && op.kink(a, h);
}

// Holds `engine` to central differences of `forward` in argument k. Two steps: a mismatch must
// persist at both, so a step that happens to be poor for this function does not cry wolf.
void judge(LocalCheck& c, const std::function<double(double)>& forward, double x) {
  const double eps = std::numeric_limits<double>::epsilon();
  bool ok = false;
  double first = 0;
  for (double scale : {1.0, 0.1}) {
    const double h = fd_step(x) * scale;
    const double fd = (forward(x + h) - forward(x - h)) / (2 * h);
    if (scale == 1.0) first = fd;
    const double tol = 1e-6 * std::max({1.0, std::abs(c.engine), std::abs(fd)}) + 1e2 * eps * std::abs(forward(x)) / h;
    ok = ok || std::abs(c.engine - fd) <= tol;
  }
  c.finite_difference = first;
  c.ok = c.at_kink || ok;
}

bool symbolic_agrees(const LocalCheck& c) {
  return std::abs(c.symbolic - c.engine) <= 1e-9 * std::max(1.0, std::abs(c.engine)) ||
         (std::isnan(c.symbolic) && std::isnan(c.engine));
}

double eval_no_grad(const Expr& e, const std::function<double(int)>& value_of) {
  NoGradGuard no_grad;
  return eval_tensor(e, [&](int id) { return scalar(value_of(id)); }).item();
}

}  // namespace

CheckReport check_local_derivatives(std::string_view formula, const Options& options) {
  CheckReport report;
  const Program p = parse(formula);
  const Resolved r = resolve(p, options);

  // Statement factors: one named value against each named operand.
  {
    const Graph g = named_graph(p, r.output);
    const Evaluation ev = evaluate(g, p, r.input_values);
    const RefNamer namer = g.namer();
    for (std::size_t u = 0; u < g.units.size(); ++u) {
      const Unit& unit = g.units[u];
      if (unit.operands.empty()) continue;
      const auto engine = local_partials(g, static_cast<int>(u), ev.values);
      for (std::size_t k = 0; k < unit.operands.size(); ++k) {
        const int w = unit.operands[k];
        LocalCheck c;
        c.node = unit.name;
        c.op = ev.tensors[u].grad_fn() ? ev.tensors[u].grad_fn()->name() : "";
        c.wrt = g.units[w].name;
        const ExprPtr form = local_form(g, static_cast<int>(u), w);
        c.formula = to_string(*form, namer);
        c.engine = engine[k];
        auto value_of = [&](int id) { return ev.values[id]; };
        c.symbolic = eval_double(*form, value_of);
        c.at_kink = near_kink(*unit.expr, value_of, fd_step(ev.values[w]));
        judge(c, [&](double x) {
          if (unit.expr->op == Op::Ref) return x;
          return eval_no_grad(*unit.expr, [&](int id) { return id == w ? x : ev.values[id]; });
        }, ev.values[w]);
        c.ok = c.ok && symbolic_agrees(c);
        report.statements.push_back(std::move(c));
      }
    }
  }

  // Op rules: every engine node against each input slot.
  const Graph g = expanded_graph(p, r.output);
  const Evaluation ev = evaluate(g, p, r.input_values);
  for (std::size_t u = 0; u < g.units.size(); ++u) {
    const auto ss = slots(g, static_cast<int>(u));
    if (ss.empty()) continue;
    const auto engine = slot_partials(g, static_cast<int>(u), ev.values);
    const ExprPtr e = slot_expr(g, static_cast<int>(u));
    auto slot_value = [&](int id) { return ev.values[ss[-1 - id].unit]; };
    std::vector<double> args;
    if (e->op != Op::Ref)
      for (const auto& a : e->args) args.push_back(eval_double(*a, slot_value));
    const OpInfo& op = info(e->op);
    for (std::size_t k = 0; k < ss.size(); ++k) {
      LocalCheck c;
      c.node = g.units[u].name;
      c.op = ev.tensors[u].grad_fn() ? ev.tensors[u].grad_fn()->name() : "";
      if (e->op != Op::Ref && std::string(op.name) != c.op && op.callable)
        c.op = std::string(op.name) + " (engine node " + c.op + ")";
      c.wrt = g.units[ss[k].unit].name;
      const ExprPtr form = slot_form(g, static_cast<int>(u), static_cast<int>(k));
      c.formula = to_string(*form, [&](int id) {
        return id < 0 ? RefText{g.units[ss[-1 - id].unit].name, g.units[ss[-1 - id].unit].prec} : g.namer()(id);
      });
      c.engine = engine[k];
      c.symbolic = eval_double(*form, slot_value);
      const double x = ev.values[ss[k].unit];
      c.at_kink = op.kink && op.kink(args, fd_step(x));
      judge(c, [&](double v) {
        if (e->op == Op::Ref) return v;
        return eval_no_grad(*e, [&](int id) { return id == -1 - static_cast<int>(k) ? v : slot_value(id); });
      }, x);
      const bool rule_ok = c.ok;
      c.ok = c.ok && symbolic_agrees(c);
      if (!rule_ok && std::find(report.failing_ops.begin(), report.failing_ops.end(), c.op) == report.failing_ops.end())
        report.failing_ops.push_back(c.op);
      else if (rule_ok && !c.ok)
        report.failing_ops.push_back("the explainer's symbolic form for " + c.op);
      report.ops.push_back(std::move(c));
    }
  }
  for (const LocalCheck& c : report.statements)
    if (!c.ok && report.failing_ops.empty()) report.failing_ops.push_back("statement " + c.node);
  return report;
}

std::vector<LocalCheck> check_function(const std::string& op, const ScalarFunction& f, const std::vector<double>& at) {
  std::vector<LocalCheck> out;
  EnableGradGuard grad_on(true);
  std::vector<Tensor> leaves;
  for (double v : at) leaves.push_back(scalar(v, {.dtype = DType::Float64, .requires_grad = true}));
  const Tensor result = f(leaves);
  CG_CHECK(result.defined() && result.numel() == 1, ValueError, "check_function: ", op,
           " must return a one-element tensor");
  std::vector<Tensor> grads(at.size());
  if (result.requires_grad()) grads = autograd::grad({result}, leaves, {}, false, false, true);
  for (std::size_t k = 0; k < at.size(); ++k) {
    LocalCheck c;
    c.node = op;
    c.op = op;
    c.wrt = "argument " + std::to_string(k);
    c.engine = grads[k].defined() ? grads[k].item() : 0.0;
    c.symbolic = std::nan("");
    judge(c, [&](double v) {
      NoGradGuard no_grad;
      std::vector<Tensor> xs;
      for (std::size_t i = 0; i < at.size(); ++i) xs.push_back(scalar(i == k ? v : at[i]));
      return f(xs).item();
    }, at[k]);
    out.push_back(std::move(c));
  }
  return out;
}

std::string to_text(const CheckReport& r) {
  std::ostringstream os;
  auto table = [&](const std::vector<LocalCheck>& rows, bool show_op) {
    std::size_t wd = 0, wo = 0, we = 0;
    for (const auto& c : rows) {
      wd = std::max(wd, text_width(cat(partial_name(c.node, c.wrt), " = ", c.formula)));
      wo = std::max(wo, c.op.size());
      we = std::max(we, fmt(c.engine, 10).size());
    }
    wd = std::min<std::size_t>(wd, 48);
    for (const auto& c : rows) {
      os << "  " << pad_right(cat(partial_name(c.node, c.wrt), " = ", c.formula), wd);
      if (show_op) os << "  " << pad_right(c.op, wo);
      os << "  engine " << pad_right(fmt(c.engine, 10), we) << "  finite difference "
         << pad_right(fmt(c.finite_difference, 10), 16) << "  "
         << (c.at_kink ? "kink (not differentiable here; not compared)" : c.ok ? "ok" : "MISMATCH") << "\n";
    }
  };
  os << "Local derivatives against central finite differences of their own node\n";
  os << "\nStatement factors (each named value against the named values it is computed from):\n";
  table(r.statements, false);
  os << "\nOp rules (each engine node's backward against its forward, per input):\n";
  table(r.ops, true);
  const std::size_t n = r.statements.size() + r.ops.size();
  if (r.ok()) {
    os << "\nAll " << n << " local derivatives agree with finite differences and with their symbolic forms.\n";
  } else {
    os << "\nMISMATCH: ";
    for (std::size_t i = 0; i < r.failing_ops.size(); ++i) os << (i ? ", " : "") << r.failing_ops[i];
    os << (r.failing_ops.size() == 1 ? " disagrees" : " disagree")
       << " with a finite difference of the forward pass (rows marked MISMATCH above).\n";
  }
  return os.str();
}

std::string to_json(const CheckReport& r, int indent) {
  auto rows = [](const std::vector<LocalCheck>& v) {
    ojson a = ojson::array();
    for (const auto& c : v)
      a.push_back(ojson{{"node", c.node}, {"op", c.op}, {"wrt", c.wrt}, {"formula", c.formula},
                        {"engine", c.engine}, {"finite_difference", c.finite_difference}, {"symbolic", c.symbolic},
                        {"at_kink", c.at_kink}, {"ok", c.ok}});
    return a;
  };
  return ojson{{"ok", r.ok()}, {"statements", rows(r.statements)}, {"ops", rows(r.ops)},
               {"failing_ops", r.failing_ops}}
      .dump(indent);
}

}  // namespace chaingrad::explain
