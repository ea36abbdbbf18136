#pragma once
// Expressions of the formula language, shared by the parser, the symbolic differentiator, the
// printer and the two evaluators (plain doubles for derivative forms, chaingrad ops for values).
//
// Note [one table of functions]: everything that depends on an operation -- its name, arity,
// how it prints, its value in doubles, the chaingrad op that computes it, and its partial
// derivatives as expressions -- lives in one row of the table in expr.cpp. Adding a function
// to the formula language is one row there.
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "chaingrad/tensor.hpp"

namespace chaingrad::explain::detail {

enum class Op : std::uint8_t {
  Number,
  Ref,  // a named value (or, in the expanded graph, a node); `ref` says which
  Neg,
  Add,
  Sub,
  Mul,
  Div,
  Pow,
  // functions callable in formulas
  Sigmoid,
  Tanh,
  Relu,
  Softplus,
  Exp,
  Log,
  Sqrt,
  Abs,
  Sin,
  Cos,
  Max,
  Min,
  // appear only in derivative forms
  DSigmoid,  // σ'(u) = σ(u)(1 - σ(u))
  Sign,
  Step,  // [u > 0]
  Ge,    // [a >= b]
  Gt,
  Le,
  Lt,
};

struct Expr;
using ExprPtr = std::shared_ptr<const Expr>;

struct Expr {
  Op op = Op::Number;
  double number = 0;  // Op::Number
  int ref = -1;       // Op::Ref
  std::vector<ExprPtr> args;
  int line = 0, column = 0;  // where it starts in the source (0 when synthesized)
};

// Printing precedence: the loosest operator at the top of an expression's text.
constexpr int kPrecAdd = 1, kPrecMul = 2, kPrecPow = 4, kPrecAtom = 5;

struct OpInfo {
  Op op;
  const char* name;  // function name ("sigmoid") or operator symbol ("+")
  int arity;
  bool callable;  // may be called by name in a formula
  double (*eval)(std::span<const double> a);
  // The chaingrad op computing it; null for derivative-only forms. Pow is special-cased (a
  // constant exponent uses pow(x, double)), see eval_tensor.
  Tensor (*forward)(std::span<const Tensor> a);
  // ∂op/∂a[i] as an expression of the arguments (without the chain factor).
  ExprPtr (*partial)(std::span<const ExprPtr> a, int i);
  // Not differentiable at these arguments (within h): --check does not hold them to a finite difference.
  bool (*kink)(std::span<const double> a, double h);
  const char* legend;  // explains a notation used in derivative forms, or nullptr
};

const OpInfo& info(Op op);
// The function called `name` in formulas, or nullptr.
const OpInfo* find_function(std::string_view name);
// Names of the functions callable in formulas, comma separated.
std::string function_names();

// ---- construction (simplifying: 0*x = 0, 1*x = x, x + 0 = x, number folding, ...) ----
ExprPtr number(double v);
ExprPtr ref(int id);
ExprPtr make(Op op, std::vector<ExprPtr> args);  // simplifies
ExprPtr raw(Op op, std::vector<ExprPtr> args, int line = 0, int column = 0);  // as written
ExprPtr simplify(const ExprPtr& e);

bool is_number(const ExprPtr& e, double v);
bool is_constant(const Expr& e);  // no Ref anywhere below
bool contains_ref(const Expr& e, int id);
void collect_refs(const Expr& e, std::vector<int>& out);  // distinct, in order of first appearance

// d e / d ref(id), simplified.
ExprPtr differentiate(const ExprPtr& e, int id);

// ---- printing ----
struct RefText {
  std::string text;
  int prec = kPrecAtom;
};
using RefNamer = std::function<RefText(int id)>;
std::string to_string(const Expr& e, const RefNamer& namer);
int precedence(const Expr& e, const RefNamer& namer);
std::string format_number(double v);
// Concatenation by appending (GCC 12 warns falsely, -Wrestrict, on "literal" + std::string&&).
template <class... Parts>
std::string cat(const Parts&... parts) {
  std::string s;
  (s.append(std::string_view(parts)), ...);
  return s;
}  // shortest text that reads back as v
// Legends for the notations used in `e` (σ', [u > 0], ...), appended to `out` without repeats.
void collect_legends(const Expr& e, std::vector<std::string>& out);

// ---- evaluation ----
double eval_double(const Expr& e, const std::function<double(int)>& value_of);

// Evaluates with chaingrad ops. `on_op` (optional) sees every op node's result as it is made,
// with its arguments' tensors, before its parent uses it (labels, finiteness checks).
using OnOp = std::function<void(const Expr&, const Tensor& result, std::span<const Tensor> args)>;
Tensor eval_tensor(const Expr& e, const std::function<Tensor(int)>& tensor_of, const OnOp& on_op = {});

}  // namespace chaingrad::explain::detail
