// Expressions: the table of operations (Note [one table of functions] in expr.hpp), simplifying
// constructors, symbolic differentiation, printing and evaluation.
#include "explain/expr.hpp"

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>

#include "chaingrad/autograd.hpp"
#include "chaingrad/ops.hpp"

namespace chaingrad::explain::detail {

namespace {

// ---- small builders for derivative forms (simplifying) ----
ExprPtr N(double v) { return number(v); }
ExprPtr mk(Op op, ExprPtr a) { return make(op, {std::move(a)}); }
ExprPtr mk(Op op, ExprPtr a, ExprPtr b) { return make(op, {std::move(a), std::move(b)}); }

double stable_sigmoid(double v) {
  if (v >= 0) return 1 / (1 + std::exp(-v));
  const double e = std::exp(v);
  return e / (1 + e);
}

bool near_zero(std::span<const double> a, double h) { return std::abs(a[0]) <= h; }
bool near_tie(std::span<const double> a, double h) { return std::abs(a[0] - a[1]) <= h; }

ExprPtr zero_partial(std::span<const ExprPtr>, int) { return N(0); }

// clang-format off
const std::array<OpInfo, 27> kOps = {{
  {Op::Number, "number", 0, false, nullptr, nullptr, zero_partial, nullptr, nullptr},
  {Op::Ref, "ref", 0, false, nullptr, nullptr, zero_partial, nullptr, nullptr},
  // d(-a) = -1
  {Op::Neg, "-", 1, false, [](auto a) { return -a[0]; },
   [](auto a) { return neg(a[0]); },
   [](auto, int) { return N(-1); }, nullptr, nullptr},
  // d(a+b) = 1, 1
  {Op::Add, "+", 2, false, [](auto a) { return a[0] + a[1]; },
   [](auto a) { return add(a[0], a[1]); },
   [](auto, int) { return N(1); }, nullptr, nullptr},
  // d(a-b) = 1, -1
  {Op::Sub, "-", 2, false, [](auto a) { return a[0] - a[1]; },
   [](auto a) { return sub(a[0], a[1]); },
   [](auto, int i) { return N(i == 0 ? 1 : -1); }, nullptr, nullptr},
  // d(ab) = b, a
  {Op::Mul, "*", 2, false, [](auto a) { return a[0] * a[1]; },
   [](auto a) { return mul(a[0], a[1]); },
   [](auto a, int i) { return a[1 - i]; }, nullptr, nullptr},
  // d(a/b) = 1/b, -a/b^2
  {Op::Div, "/", 2, false, [](auto a) { return a[0] / a[1]; },
   [](auto a) { return div(a[0], a[1]); },
   [](auto a, int i) {
     return i == 0 ? mk(Op::Div, N(1), a[1]) : mk(Op::Neg, mk(Op::Div, a[0], mk(Op::Pow, a[1], N(2))));
   }, nullptr, nullptr},
  // d(a^b) = b a^(b-1), a^b log a
  {Op::Pow, "^", 2, false, [](auto a) { return std::pow(a[0], a[1]); },
   [](auto a) { return pow(a[0], a[1]); },
   [](auto a, int i) {
     return i == 0 ? mk(Op::Mul, a[1], mk(Op::Pow, a[0], mk(Op::Sub, a[1], N(1))))
                   : mk(Op::Mul, mk(Op::Pow, a[0], a[1]), mk(Op::Log, a[0]));
   }, nullptr, nullptr},
  // σ' = σ(1 - σ)
  {Op::Sigmoid, "sigmoid", 1, true, [](auto a) { return stable_sigmoid(a[0]); },
   [](auto a) { return sigmoid(a[0]); },
   [](auto a, int) { return mk(Op::DSigmoid, a[0]); }, nullptr, nullptr},
  // tanh' = 1 - tanh^2
  {Op::Tanh, "tanh", 1, true, [](auto a) { return std::tanh(a[0]); },
   [](auto a) { return tanh(a[0]); },
   [](auto a, int) { return mk(Op::Sub, N(1), mk(Op::Pow, mk(Op::Tanh, a[0]), N(2))); }, nullptr, nullptr},
  // relu' = [a > 0]
  {Op::Relu, "relu", 1, true, [](auto a) { return a[0] > 0 ? a[0] : 0.0; },
   [](auto a) { return relu(a[0]); },
   [](auto a, int) { return mk(Op::Step, a[0]); }, near_zero, nullptr},
  // softplus' = σ
  {Op::Softplus, "softplus", 1, true,
   [](auto a) { return (a[0] > 0 ? a[0] : 0.0) + std::log1p(std::exp(-std::abs(a[0]))); },
   [](auto a) { return softplus(a[0]); },
   [](auto a, int) { return mk(Op::Sigmoid, a[0]); }, nullptr, nullptr},
  // exp' = exp
  {Op::Exp, "exp", 1, true, [](auto a) { return std::exp(a[0]); },
   [](auto a) { return exp(a[0]); },
   [](auto a, int) { return mk(Op::Exp, a[0]); }, nullptr, nullptr},
  // log' = 1/a
  {Op::Log, "log", 1, true, [](auto a) { return std::log(a[0]); },
   [](auto a) { return log(a[0]); },
   [](auto a, int) { return mk(Op::Div, N(1), a[0]); }, nullptr, nullptr},
  // sqrt' = 1/(2 sqrt a)
  {Op::Sqrt, "sqrt", 1, true, [](auto a) { return std::sqrt(a[0]); },
   [](auto a) { return sqrt(a[0]); },
   [](auto a, int) { return mk(Op::Div, N(1), mk(Op::Mul, N(2), mk(Op::Sqrt, a[0]))); }, nullptr, nullptr},
  // abs' = sign
  {Op::Abs, "abs", 1, true, [](auto a) { return std::abs(a[0]); },
   [](auto a) { return abs(a[0]); },
   [](auto a, int) { return mk(Op::Sign, a[0]); }, near_zero, nullptr},
  // sin' = cos
  {Op::Sin, "sin", 1, true, [](auto a) { return std::sin(a[0]); },
   [](auto a) { return sin(a[0]); },
   [](auto a, int) { return mk(Op::Cos, a[0]); }, nullptr, nullptr},
  // cos' = -sin
  {Op::Cos, "cos", 1, true, [](auto a) { return std::cos(a[0]); },
   [](auto a) { return cos(a[0]); },
   [](auto a, int) { return mk(Op::Neg, mk(Op::Sin, a[0])); }, nullptr, nullptr},
  // max(a, b): the gradient goes to a when a >= b (the engine's tie rule), else to b
  {Op::Max, "max", 2, true, [](auto a) { return a[0] >= a[1] ? a[0] : a[1]; },
   [](auto a) { return maximum(a[0], a[1]); },
   [](auto a, int i) { return mk(i == 0 ? Op::Ge : Op::Lt, a[0], a[1]); }, near_tie, nullptr},
  // min(a, b): to a when a <= b
  {Op::Min, "min", 2, true, [](auto a) { return a[0] <= a[1] ? a[0] : a[1]; },
   [](auto a) { return minimum(a[0], a[1]); },
   [](auto a, int i) { return mk(i == 0 ? Op::Le : Op::Gt, a[0], a[1]); }, near_tie, nullptr},
  // derivative-only forms
  {Op::DSigmoid, "σ'", 1, false,
   [](auto a) { const double s = stable_sigmoid(a[0]); return s * (1 - s); }, nullptr,
   [](auto a, int) { return mk(Op::Mul, mk(Op::DSigmoid, a[0]), mk(Op::Sub, N(1), mk(Op::Mul, N(2), mk(Op::Sigmoid, a[0])))); },
   nullptr, "σ'(u) = σ(u)·(1 - σ(u)), where σ = sigmoid"},
  {Op::Sign, "sign", 1, false, [](auto a) { return double((a[0] > 0) - (a[0] < 0)); }, nullptr, zero_partial, near_zero,
   "sign(u) = 1, 0 or -1 as u > 0, u = 0, u < 0 (abs's slope; the engine takes 0 at u = 0)"},
  {Op::Step, "step", 1, false, [](auto a) { return a[0] > 0 ? 1.0 : 0.0; }, nullptr, zero_partial, near_zero,
   "[u > 0] = 1 when u > 0, else 0 (relu's slope; the engine takes 0 at u = 0)"},
  {Op::Ge, ">=", 2, false, [](auto a) { return a[0] >= a[1] ? 1.0 : 0.0; }, nullptr, zero_partial, near_tie,
   "[a >= b] = 1 when it holds, else 0 (max gives a tie's gradient to its first argument)"},
  {Op::Gt, ">", 2, false, [](auto a) { return a[0] > a[1] ? 1.0 : 0.0; }, nullptr, zero_partial, near_tie,
   "[a > b] = 1 when it holds, else 0"},
  {Op::Le, "<=", 2, false, [](auto a) { return a[0] <= a[1] ? 1.0 : 0.0; }, nullptr, zero_partial, near_tie,
   "[a <= b] = 1 when it holds, else 0 (min gives a tie's gradient to its first argument)"},
  {Op::Lt, "<", 2, false, [](auto a) { return a[0] < a[1] ? 1.0 : 0.0; }, nullptr, zero_partial, near_tie,
   "[a < b] = 1 when it holds, else 0"},
}};
// clang-format on

bool is_comparison(Op op) { return op == Op::Ge || op == Op::Gt || op == Op::Le || op == Op::Lt; }
bool is_neg_number(const ExprPtr& e) { return e->op == Op::Number && std::signbit(e->number) && e->number != 0; }

bool equal(const Expr& a, const Expr& b) {
  if (a.op != b.op || a.args.size() != b.args.size()) return false;
  if (a.op == Op::Number) return a.number == b.number;
  if (a.op == Op::Ref) return a.ref == b.ref;
  for (std::size_t i = 0; i < a.args.size(); ++i)
    if (!equal(*a.args[i], *b.args[i])) return false;
  return true;
}

// Folds numbers only where the result stays short (1/3 is clearer than 0.333333333).
bool foldable(Op op, double v) {
  if (!std::isfinite(v)) return false;
  if (op == Op::Neg || op == Op::Add || op == Op::Sub || op == Op::Mul) return true;
  if (op == Op::Div || op == Op::Pow) return format_number(v).size() <= 8;
  return false;
}

}  // namespace

const OpInfo& info(Op op) {
  const auto& row = kOps[static_cast<std::size_t>(op)];
  CG_ASSERT(row.op == op);
  return row;
}

const OpInfo* find_function(std::string_view name) {
  for (const auto& row : kOps)
    if (row.callable && name == row.name) return &row;
  return nullptr;
}

std::string function_names() {
  std::string s;
  for (const auto& row : kOps)
    if (row.callable) s += (s.empty() ? "" : ", ") + std::string(row.name);
  return s;
}

// ---------------------------------------------------------------- construction
ExprPtr number(double v) {
  auto e = std::make_shared<Expr>();
  e->op = Op::Number;
  e->number = v == 0 ? 0.0 : v;  // no -0 in printed forms
  return e;
}

ExprPtr ref(int id) {
  auto e = std::make_shared<Expr>();
  e->op = Op::Ref;
  e->ref = id;
  return e;
}

ExprPtr raw(Op op, std::vector<ExprPtr> args, int line, int column) {
  auto e = std::make_shared<Expr>();
  e->op = op;
  e->args = std::move(args);
  e->line = line;
  e->column = column;
  return e;
}

bool is_number(const ExprPtr& e, double v) { return e->op == Op::Number && e->number == v; }

ExprPtr make(Op op, std::vector<ExprPtr> a) {
  // Fold numbers.
  if (op != Op::Number && op != Op::Ref && !a.empty() &&
      std::all_of(a.begin(), a.end(), [](const ExprPtr& x) { return x->op == Op::Number; })) {
    std::vector<double> v;
    for (const auto& x : a) v.push_back(x->number);
    const double r = info(op).eval(v);
    if (foldable(op, r)) return number(r);
  }
  switch (op) {
    case Op::Neg:
      if (a[0]->op == Op::Neg) return a[0]->args[0];
      break;
    case Op::Add:
      if (is_number(a[0], 0)) return a[1];
      if (is_number(a[1], 0)) return a[0];
      if (a[1]->op == Op::Neg) return make(Op::Sub, {a[0], a[1]->args[0]});
      if (is_neg_number(a[1])) return make(Op::Sub, {a[0], number(-a[1]->number)});
      if (a[0]->op == Op::Neg) return make(Op::Sub, {a[1], a[0]->args[0]});
      if (equal(*a[0], *a[1])) return make(Op::Mul, {number(2), a[0]});
      break;
    case Op::Sub:
      if (is_number(a[1], 0)) return a[0];
      if (is_number(a[0], 0)) return make(Op::Neg, {a[1]});
      if (a[1]->op == Op::Neg) return make(Op::Add, {a[0], a[1]->args[0]});
      if (is_neg_number(a[1])) return make(Op::Add, {a[0], number(-a[1]->number)});
      if (equal(*a[0], *a[1])) return number(0);
      break;
    case Op::Mul:
      if (is_number(a[0], 0) || is_number(a[1], 0)) return number(0);
      if (is_number(a[0], 1)) return a[1];
      if (is_number(a[1], 1)) return a[0];
      if (is_number(a[0], -1)) return make(Op::Neg, {a[1]});
      if (is_number(a[1], -1)) return make(Op::Neg, {a[0]});
      if (a[1]->op == Op::Number) return make(Op::Mul, {a[1], a[0]});  // coefficient first
      if (a[0]->op == Op::Number && a[1]->op == Op::Mul && a[1]->args[0]->op == Op::Number)
        return make(Op::Mul, {make(Op::Mul, {a[0], a[1]->args[0]}), a[1]->args[1]});
      if (a[0]->op == Op::Neg) return make(Op::Neg, {make(Op::Mul, {a[0]->args[0], a[1]})});
      if (a[1]->op == Op::Neg) return make(Op::Neg, {make(Op::Mul, {a[0], a[1]->args[0]})});
      if (is_neg_number(a[0])) return make(Op::Neg, {make(Op::Mul, {number(-a[0]->number), a[1]})});
      break;
    case Op::Div:
      if (is_number(a[1], 1)) return a[0];
      if (is_number(a[0], 0)) return number(0);
      if (a[0]->op == Op::Neg) return make(Op::Neg, {make(Op::Div, {a[0]->args[0], a[1]})});
      break;
    case Op::Pow:
      if (is_number(a[1], 1)) return a[0];
      if (is_number(a[1], 0)) return number(1);
      break;
    default:
      break;
  }
  return raw(op, std::move(a));
}

ExprPtr simplify(const ExprPtr& e) {
  if (e->op == Op::Number || e->op == Op::Ref) return e;
  std::vector<ExprPtr> args;
  for (const auto& x : e->args) args.push_back(simplify(x));
  return make(e->op, std::move(args));
}

bool is_constant(const Expr& e) {
  if (e.op == Op::Ref) return false;
  for (const auto& x : e.args)
    if (!is_constant(*x)) return false;
  return true;
}

bool contains_ref(const Expr& e, int id) {
  if (e.op == Op::Ref) return e.ref == id;
  for (const auto& x : e.args)
    if (contains_ref(*x, id)) return true;
  return false;
}

void collect_refs(const Expr& e, std::vector<int>& out) {
  if (e.op == Op::Ref) {
    if (std::find(out.begin(), out.end(), e.ref) == out.end()) out.push_back(e.ref);
    return;
  }
  for (const auto& x : e.args) collect_refs(*x, out);
}

ExprPtr differentiate(const ExprPtr& e, int id) {
  if (!contains_ref(*e, id)) return number(0);
  if (e->op == Op::Ref) return number(1);
  // Chain rule inside one expression: sum over the arguments that contain `id`.
  ExprPtr total = number(0);
  for (std::size_t i = 0; i < e->args.size(); ++i) {
    if (!contains_ref(*e->args[i], id)) continue;
    std::vector<ExprPtr> args;
    for (const auto& x : e->args) args.push_back(simplify(x));
    ExprPtr term = make(Op::Mul, {simplify(info(e->op).partial(args, static_cast<int>(i))),
                                  differentiate(e->args[i], id)});
    total = make(Op::Add, {total, term});
  }
  return total;
}

// ---------------------------------------------------------------- printing
std::string format_number(double v) {
  if (v == 0) return "0";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

int precedence(const Expr& e, const RefNamer& namer) {
  switch (e.op) {
    case Op::Number: return e.number < 0 ? kPrecMul : kPrecAtom;
    case Op::Ref: return namer(e.ref).prec;
    case Op::Neg: return kPrecMul;
    case Op::Add:
    case Op::Sub: return kPrecAdd;
    case Op::Mul:
    case Op::Div: return kPrecMul;
    case Op::Pow: return kPrecPow;
    default: return kPrecAtom;
  }
}

namespace {
std::string wrap(const Expr& e, const RefNamer& namer, bool parens) {
  std::string s = to_string(e, namer);
  return parens ? cat("(", s, ")") : s;
}
}  // namespace

std::string to_string(const Expr& e, const RefNamer& namer) {
  auto prec = [&](const ExprPtr& x) { return precedence(*x, namer); };
  switch (e.op) {
    case Op::Number: return format_number(e.number);
    case Op::Ref: return namer(e.ref).text;
    case Op::Neg: {
      std::string s = to_string(*e.args[0], namer);
      const bool parens = prec(e.args[0]) < kPrecMul || s.starts_with('-');
      return parens ? cat("-(", s, ")") : cat("-", s);
    }
    case Op::Add:
    case Op::Sub:
      return wrap(*e.args[0], namer, prec(e.args[0]) < kPrecAdd) + (e.op == Op::Add ? " + " : " - ") +
             wrap(*e.args[1], namer, prec(e.args[1]) <= kPrecAdd);
    case Op::Mul:
    case Op::Div:
      return wrap(*e.args[0], namer, prec(e.args[0]) < kPrecMul) + (e.op == Op::Mul ? "*" : "/") +
             wrap(*e.args[1], namer, prec(e.args[1]) <= kPrecMul);
    case Op::Pow:
      return wrap(*e.args[0], namer, prec(e.args[0]) <= kPrecPow) + "^" +
             wrap(*e.args[1], namer, prec(e.args[1]) < kPrecPow);
    case Op::DSigmoid: return cat("σ'(", to_string(*e.args[0], namer), ")");
    case Op::Step: return cat("[", to_string(*e.args[0], namer), " > 0]");
    default:
      if (is_comparison(e.op))
        return cat("[", to_string(*e.args[0], namer), " ", info(e.op).name, " ", to_string(*e.args[1], namer), "]");
      {
        std::string s = std::string(info(e.op).name) + "(";
        for (std::size_t i = 0; i < e.args.size(); ++i) s += (i ? ", " : "") + to_string(*e.args[i], namer);
        return s + ")";
      }
  }
}

void collect_legends(const Expr& e, std::vector<std::string>& out) {
  if (const char* l = info(e.op).legend) {
    if (std::find(out.begin(), out.end(), l) == out.end()) out.emplace_back(l);
  }
  for (const auto& x : e.args) collect_legends(*x, out);
}

// ---------------------------------------------------------------- evaluation
double eval_double(const Expr& e, const std::function<double(int)>& value_of) {
  if (e.op == Op::Number) return e.number;
  if (e.op == Op::Ref) return value_of(e.ref);
  std::vector<double> a;
  for (const auto& x : e.args) a.push_back(eval_double(*x, value_of));
  return info(e.op).eval(a);
}

Tensor eval_tensor(const Expr& e, const std::function<Tensor(int)>& tensor_of, const OnOp& on_op) {
  if (e.op == Op::Number) return scalar(e.number);
  if (e.op == Op::Ref) return tensor_of(e.ref);
  const OpInfo& op = info(e.op);
  CG_ASSERT(op.forward != nullptr);
  std::vector<Tensor> a;
  for (const auto& x : e.args) a.push_back(eval_tensor(*x, tensor_of, on_op));
  Tensor out;
  if (e.op == Op::Pow && is_constant(*e.args[1])) {
    // A constant exponent is a number, as in x^2: pow(x, 2.0), whose rule is 2x.
    out = pow(a[0], a[1].item());
  } else {
    out = op.forward(a);
  }
  if (on_op) on_op(e, out, a);
  return out;
}

}  // namespace chaingrad::explain::detail
