// The named and expanded graphs of a program, evaluated with chaingrad ops; local partials by the
// engine and by symbolic differentiation; finite differences.
#include "explain/model.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>

#include "chaingrad/autograd.hpp"
#include "chaingrad/ops.hpp"

namespace chaingrad::explain::detail {

const char* kind_name(Unit::Kind k) {
  switch (k) {
    case Unit::Kind::Input: return "input";
    case Unit::Kind::Assigned: return "assigned";
    case Unit::Kind::Intermediate: return "intermediate";
  }
  return "?";
}

RefNamer Graph::namer() const {
  return [this](int id) {
    CG_ASSERT(id >= 0 && id < static_cast<int>(units.size()));
    return RefText{units[id].name, units[id].prec};
  };
}

std::string Graph::expression(int u) const {
  return units[u].expr ? to_string(*units[u].expr, namer()) : std::string();
}

int Graph::find(std::string_view name) const {
  for (std::size_t i = 0; i < units.size(); ++i)
    if (units[i].name == name) return static_cast<int>(i);
  return -1;
}

namespace {

// A copy of `e` with Refs renamed by `map` (keeps source positions).
ExprPtr remap(const ExprPtr& e, const std::function<int(int)>& map) {
  if (e->op == Op::Number) return e;
  if (e->op == Op::Ref) {
    auto r = std::make_shared<Expr>(*e);
    r->ref = map(e->ref);
    return r;
  }
  std::vector<ExprPtr> args;
  for (const auto& a : e->args) args.push_back(remap(a, map));
  return raw(e->op, std::move(args), e->line, e->column);
}

void add_inputs(const Program& p, Graph& g, std::vector<int>& unit_of_symbol) {
  unit_of_symbol.assign(p.symbols.size(), -1);
  for (int s : p.inputs) {
    Unit u;
    u.name = p.symbols[s];
    u.kind = Unit::Kind::Input;
    unit_of_symbol[s] = static_cast<int>(g.units.size());
    g.inputs.push_back(unit_of_symbol[s]);
    g.units.push_back(std::move(u));
  }
}

}  // namespace

Graph named_graph(const Program& p, int output) {
  Graph g;
  std::vector<int> unit_of;
  add_inputs(p, g, unit_of);
  for (std::size_t k = 0; k < p.statements.size(); ++k) {
    const Statement& s = p.statements[k];
    Unit u;
    u.name = s.name;
    u.kind = Unit::Kind::Assigned;
    u.statement = static_cast<int>(k);
    u.expr = remap(s.expr, [&](int sym) { return unit_of[sym]; });
    collect_refs(*u.expr, u.operands);
    unit_of[p.find(s.name)] = static_cast<int>(g.units.size());
    g.units.push_back(std::move(u));
  }
  g.output = unit_of[output];
  return g;
}

Graph expanded_graph(const Program& p, int output) {
  Graph g;
  g.expanded = true;
  std::vector<int> unit_of;
  add_inputs(p, g, unit_of);
  std::map<std::string, int> seen;  // unnamed texts, to tell repeated subexpressions apart
  for (std::size_t k = 0; k < p.statements.size(); ++k) {
    const Statement& s = p.statements[k];
    auto add_unit = [&](ExprPtr expr, std::string name, Unit::Kind kind) {
      Unit u;
      u.kind = kind;
      u.statement = static_cast<int>(k);
      u.expr = std::move(expr);
      collect_refs(*u.expr, u.operands);
      if (kind == Unit::Kind::Intermediate) {
        u.prec = precedence(*u.expr, g.namer());
        const int n = ++seen[name];
        if (n > 1) {
          name = (u.prec < kPrecAtom ? "(" + name + ")" : name) + "#" + std::to_string(n);
          u.prec = kPrecAtom;
        }
      }
      u.name = std::move(name);
      g.units.push_back(std::move(u));
      return static_cast<int>(g.units.size()) - 1;
    };
    // Post-order: each op node with a variable below it becomes a unit; constants stay inline.
    std::function<ExprPtr(const ExprPtr&, bool)> build = [&](const ExprPtr& e, bool root) -> ExprPtr {
      if (e->op == Op::Number || is_constant(*e)) return e;
      if (e->op == Op::Ref) return ref(unit_of[e->ref]);
      std::vector<ExprPtr> args;
      for (const auto& a : e->args) args.push_back(build(a, false));
      ExprPtr node = raw(e->op, std::move(args), e->line, e->column);
      if (root) return node;
      return ref(add_unit(node, to_string(*node, g.namer()), Unit::Kind::Intermediate));
    };
    ExprPtr root = build(s.expr, true);  // an op, a constant, or a Ref for an alias `h = z1`
    unit_of[p.find(s.name)] = add_unit(root, s.name, Unit::Kind::Assigned);
  }
  g.output = unit_of[output];
  return g;
}

Resolved resolve(const Program& p, const Options& options) {
  Resolved r;
  if (options.of.empty()) {
    r.output = p.find(p.statements.back().name);
  } else {
    r.output = p.find(options.of);
    std::string assigned;
    for (const auto& s : p.statements) assigned += (assigned.empty() ? "" : ", ") + s.name;
    CG_CHECK(r.output >= 0, ValueError, "--of: '", options.of, "' is not in the formula (assigned names: ", assigned,
             ")");
    CG_CHECK(p.assigned_by[r.output] >= 0, ValueError, "--of: '", options.of,
             "' is an input; the output must be an assigned name (", assigned, ")");
  }
  std::string inputs;
  for (int s : p.inputs) inputs += (inputs.empty() ? "" : ", ") + p.symbols[s];
  for (const auto& [name, value] : options.at) {
    const int s = p.find(name);
    CG_CHECK(s >= 0, ValueError, "--at: '", name, "' does not appear in the formula (its inputs: ",
             inputs.empty() ? "none" : inputs, ")");
    CG_CHECK(p.assigned_by[s] < 0, ValueError, "--at: '", name, "' is computed by the formula (line ",
             p.statements[p.assigned_by[s]].line, "), so it cannot be given a value");
  }
  for (int s : p.inputs) {
    const std::string& name = p.symbols[s];
    auto it = std::find_if(options.at.begin(), options.at.end(), [&](const auto& kv) { return kv.first == name; });
    CG_CHECK(it != options.at.end(), ValueError, "no value for the input '", name, "': give it with --at ", name,
             "=<number> (inputs: ", inputs, ")");
    r.input_values.push_back(it->second);
  }
  return r;
}

namespace {

[[noreturn]] void non_finite(const Graph& g, const Program& p, const Expr& e, const Tensor& out,
                             std::span<const Tensor> args, int unit) {
  const RefNamer namer = g.namer();
  const std::string text = to_string(e, namer);
  std::string why;
  auto arg = [&](int i) { return args[i].item(); };
  switch (e.op) {
    case Op::Log:
      if (arg(0) <= 0) why = "log needs a positive argument";
      break;
    case Op::Sqrt:
      if (arg(0) < 0) why = "sqrt needs a non-negative argument";
      break;
    case Op::Div:
      if (arg(1) == 0) why = "division by zero";
      break;
    case Op::Pow:
      if (arg(0) < 0 && std::floor(arg(1)) != arg(1)) why = "a negative base needs a whole-number exponent";
      else if (arg(0) == 0 && arg(1) < 0) why = "zero to a negative power";
      break;
    case Op::Exp:
      why = "exp overflows float64 above 709.78";
      break;
    default:
      break;
  }
  std::string operands;
  for (std::size_t i = 0; i < e.args.size(); ++i) {
    if (e.args[i]->op == Op::Number) continue;  // "2 = 2" tells nothing
    operands += cat(operands.empty() ? "" : ", ", to_string(*e.args[i], namer), " = ", fmt(args[i].item(), 10));
  }
  const Unit& u = g.units[unit];
  const Statement& s = p.statements[u.statement];
  ::chaingrad::detail::throw_error<ValueError>("non-finite value: ", text, " = ", fmt(out.item()), " in the statement '", s.name,
                                  " = ", to_string(*s.expr, [&](int id) { return RefText{p.symbols[id]}; }),
                                  "' (line ", s.line, ")", why.empty() ? "" : cat(": ", why),
                                  operands.empty() ? "" : cat("; its operands: ", operands));
}

}  // namespace

Evaluation evaluate(const Graph& g, const Program& p, const std::vector<double>& input_values,
                    const EvalOptions& opt) {
  std::optional<NoGradGuard> no_grad;
  if (!opt.grad) no_grad.emplace();
  Evaluation ev;
  ev.tensors.resize(g.units.size());
  ev.values.resize(g.units.size());
  const RefNamer namer = g.namer();
  for (std::size_t i = 0; i < g.units.size(); ++i) {
    const Unit& u = g.units[i];
    Tensor t;
    if (u.kind == Unit::Kind::Input) {
      t = scalar(input_values[i], {.dtype = DType::Float64, .requires_grad = opt.grad});
    } else {
      auto tensor_of = [&](int id) { return ev.tensors[id]; };
      OnOp on_op = [&](const Expr& e, const Tensor& out, std::span<const Tensor> args) {
        if (opt.check_finite && !std::isfinite(out.item())) non_finite(g, p, e, out, args, static_cast<int>(i));
        if (opt.label && out.grad_fn()) {
          const std::string text = to_string(e, namer);
          out.grad_fn()->set_label(text);
        }
      };
      if (u.expr->op == Op::Ref) {
        t = ev.tensors[u.expr->ref].clone();  // an alias gets a node of its own
      } else {
        t = eval_tensor(*u.expr, tensor_of, on_op);
        if (is_constant(*u.expr)) {
          t = t.detach();
          if (opt.grad) t.requires_grad_(true);  // a named constant is a leaf one may ask about
        }
      }
    }
    if (opt.override_unit == static_cast<int>(i)) t = scalar(opt.override_value);
    if (opt.label) {
      t.set_name(u.name);
      if (t.grad_fn()) t.grad_fn()->set_label(u.name);
    }
    ev.values[i] = t.item();
    ev.tensors[i] = std::move(t);
  }
  return ev;
}

std::vector<double> local_partials(const Graph& g, int u, const std::vector<double>& values) {
  const Unit& unit = g.units[u];
  std::vector<double> out(unit.operands.size(), 0.0);
  if (unit.operands.empty()) return out;
  EnableGradGuard grad_on(true);
  std::vector<Tensor> leaves;
  std::map<int, Tensor> leaf_of;
  for (int w : unit.operands) {
    leaves.push_back(scalar(values[w], {.dtype = DType::Float64, .requires_grad = true}));
    leaf_of[w] = leaves.back();
  }
  Tensor result = unit.expr->op == Op::Ref ? leaf_of[unit.expr->ref].clone()
                                           : eval_tensor(*unit.expr, [&](int id) { return leaf_of.at(id); });
  if (!result.requires_grad()) return out;
  const auto grads = autograd::grad({result}, leaves, {}, false, false, /*allow_unused=*/true);
  for (std::size_t k = 0; k < grads.size(); ++k) out[k] = grads[k].defined() ? grads[k].item() : 0.0;
  return out;
}

ExprPtr local_form(const Graph& g, int u, int operand) { return differentiate(g.units[u].expr, operand); }

double fd_step(double x) {
  // cbrt(machine epsilon) balances truncation (h^2) against rounding (eps/h) for central differences.
  static const double kCbrtEps = std::cbrt(std::numeric_limits<double>::epsilon());
  return kCbrtEps * std::max(1.0, std::abs(x));
}

double finite_difference(const Graph& g, const Program& p, const std::vector<double>& input_values, int v,
                         double value, double* step) {
  const double h = fd_step(value);
  if (step) *step = h;
  EvalOptions opt{.grad = false, .check_finite = false, .label = false, .override_unit = v};
  opt.override_value = value + h;
  const double plus = evaluate(g, p, input_values, opt).values[g.output];
  opt.override_value = value - h;
  const double minus = evaluate(g, p, input_values, opt).values[g.output];
  return (plus - minus) / (2 * h);
}

std::vector<Slot> slots(const Graph& g, int u) {
  const Unit& unit = g.units[u];
  std::vector<Slot> out;
  if (!unit.expr) return out;
  if (unit.expr->op == Op::Ref) return {Slot{0, unit.expr->ref}};
  for (std::size_t i = 0; i < unit.expr->args.size(); ++i) {
    const ExprPtr& a = unit.expr->args[i];
    if (a->op == Op::Ref) out.push_back({static_cast<int>(i), a->ref});
  }
  return out;
}

ExprPtr slot_expr(const Graph& g, int u) {
  const Unit& unit = g.units[u];
  if (unit.expr->op == Op::Ref) return ref(-1);
  std::vector<ExprPtr> args = unit.expr->args;
  const auto ss = slots(g, u);
  for (std::size_t k = 0; k < ss.size(); ++k) args[ss[k].arg] = ref(-1 - static_cast<int>(k));
  return raw(unit.expr->op, std::move(args));
}

std::vector<double> slot_partials(const Graph& g, int u, const std::vector<double>& values) {
  const auto ss = slots(g, u);
  std::vector<double> out(ss.size(), 0.0);
  if (ss.empty()) return out;
  EnableGradGuard grad_on(true);
  std::vector<Tensor> leaves;
  for (const Slot& s : ss) leaves.push_back(scalar(values[s.unit], {.dtype = DType::Float64, .requires_grad = true}));
  const ExprPtr e = slot_expr(g, u);
  Tensor result = e->op == Op::Ref ? leaves[0].clone() : eval_tensor(*e, [&](int id) { return leaves[-1 - id]; });
  if (!result.requires_grad()) return out;
  const auto grads = autograd::grad({result}, leaves, {}, false, false, true);
  for (std::size_t k = 0; k < grads.size(); ++k) out[k] = grads[k].defined() ? grads[k].item() : 0.0;
  return out;
}

ExprPtr slot_form(const Graph& g, int u, int slot) { return differentiate(slot_expr(g, u), -1 - slot); }

std::string fmt(double v, int digits) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  if (v == 0) return "0";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*g", digits, v);
  return buf;
}

std::size_t text_width(std::string_view s) {
  std::size_t chars = 0;
  for (unsigned char c : s) chars += (c & 0xC0) != 0x80;
  return chars;
}

std::string pad_right(const std::string& s, std::size_t width) {
  const std::size_t w = text_width(s);
  return w >= width ? s : s + std::string(width - w, ' ');
}

std::string partial_name(const std::string& of, const std::string& wrt) {
  auto wrap = [](const std::string& s) { return is_identifier(s) ? s : "(" + s + ")"; };
  return "∂" + wrap(of) + "/∂" + wrap(wrt);
}

}  // namespace chaingrad::explain::detail
