#pragma once
// A parsed formula (Program) and the two graphs the explainer walks:
//  * the named graph: one unit per input and per statement; a statement's expression refers to
//    the named units it uses, so a factor ∂z1/∂w1 is one local partial (x), not a product
//    through the unnamed w1*x;
//  * the expanded graph: one unit per engine node (every op of every statement), so a factor
//    is exactly one node's backward rule.
// Both evaluate to the same engine graph: the same ops, in the same order.
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "chaingrad/explain.hpp"
#include "explain/expr.hpp"

namespace chaingrad::explain::detail {

struct Statement {
  std::string name;
  ExprPtr expr;  // Ref ids are symbol ids
  int line = 0, column = 0;
};

struct Program {
  std::vector<std::string> symbols;  // symbol id -> name
  std::vector<Statement> statements;
  std::vector<int> inputs;       // symbol ids never assigned, in order of first appearance
  std::vector<int> assigned_by;  // symbol id -> statement index, or -1 for inputs
  std::vector<std::string> lines;  // the source, for error messages
  int find(std::string_view name) const;  // symbol id or -1
};

// Throws FormulaError (with a caret for syntax errors).
Program parse(std::string_view source);

struct Unit {
  enum class Kind { Input, Assigned, Intermediate };
  std::string name;
  Kind kind = Kind::Input;
  ExprPtr expr;               // null for inputs; Refs are unit ids (always lower than this unit's)
  std::vector<int> operands;  // distinct units referred to, in order of first appearance
  int statement = -1;         // the statement that defines it
  int prec = kPrecAtom;       // precedence of `name` when it appears inside another expression
};

const char* kind_name(Unit::Kind k);

struct Graph {
  std::vector<Unit> units;  // inputs first, then in evaluation order
  std::vector<int> inputs;  // unit ids of the inputs (== 0..n-1)
  int output = -1;
  bool expanded = false;
  RefNamer namer() const;
  std::string expression(int u) const;  // its defining expression, "" for inputs
  int find(std::string_view name) const;
};

// `output`: symbol id of the output statement's name.
Graph named_graph(const Program& p, int output);
Graph expanded_graph(const Program& p, int output);

// Resolves options against the program: the output symbol, the inputs' values (by input
// order), the variables asked about (unit names). Throws one-line errors.
struct Resolved {
  int output = -1;                    // symbol id
  std::vector<double> input_values;   // by Program::inputs order
};
Resolved resolve(const Program& p, const Options& options);

struct EvalOptions {
  bool grad = true;         // inputs require grad; ops record nodes
  bool check_finite = true; // a non-finite value is an error naming the node that made it
  bool label = true;        // name tensors and label nodes with their units' names
  int override_unit = -1;   // finite differences: this unit takes `override_value`
  double override_value = 0;
};
struct Evaluation {
  std::vector<Tensor> tensors;  // by unit
  std::vector<double> values;
};
Evaluation evaluate(const Graph& g, const Program& p, const std::vector<double>& input_values,
                    const EvalOptions& options = {});

// ∂unit/∂operand for each of u's operands (same order), by the engine: u's expression rebuilt
// with its operands as fresh leaves, then autograd::grad.
std::vector<double> local_partials(const Graph& g, int u, const std::vector<double>& values);
// The same partial, symbolic: d expression(u) / d operand, simplified and printed.
ExprPtr local_form(const Graph& g, int u, int operand);

// Central difference of the output with respect to unit v (re-evaluating everything after v).
double finite_difference(const Graph& g, const Program& p, const std::vector<double>& input_values, int v,
                         double value, double* step = nullptr);
double fd_step(double x);

// For an expanded-graph op unit: the arguments of its op that carry a gradient, one slot each
// even when two arguments are the same unit (x*x has two slots), and their partials.
struct Slot {
  int arg = 0;   // argument position in the op
  int unit = 0;  // the unit that argument refers to
};
std::vector<Slot> slots(const Graph& g, int u);
// Per-slot partials by the engine (distinct leaves per slot) and as forms.
std::vector<double> slot_partials(const Graph& g, int u, const std::vector<double>& values);
ExprPtr slot_form(const Graph& g, int u, int slot);
// The op's own expression over placeholder refs (-1 - slot) and constants, for evaluating one slot.
ExprPtr slot_expr(const Graph& g, int u);

// Shared formatting.
std::string fmt(double v, int digits = 6);
std::string partial_name(const std::string& of, const std::string& wrt);  // "∂L/∂y", "∂L/∂(y - t)"
bool is_identifier(std::string_view s);
std::size_t text_width(std::string_view s);                  // in characters (UTF-8: ∂ and σ are one each)
std::string pad_right(const std::string& s, std::size_t width);  // to `width` characters

}  // namespace chaingrad::explain::detail
