#pragma once
// The chain rule, shown.
//
// A small formula language (`z1 = w1*x + b1; h = sigmoid(z1); L = (h - t)^2`) is parsed into the
// same autograd graph the library trains with: 0-d float64 tensors and chaingrad's own ops. The
// explainer then shows what the engine computes:
//
//  * the forward pass, every named value in evaluation order;
//  * for each variable asked about, every path from the output down to it through *named*
//    values; each step of a path is one local partial derivative, given with its symbolic form
//    (from differentiating the statement's expression) and its value (from the engine: the
//    statement rebuilt with its named operands as fresh leaves, then autograd::grad); the
//    product along each path; the sum over paths; and the gradient from autograd and from a
//    central finite difference.
//  * Paths multiply out exponentially when values fan out repeatedly. Past `max_paths` only the
//    largest paths (by magnitude) are listed, found with a k-best search over the DAG, and the
//    total is still exact: a dynamic program over the graph visits each edge once.
//
// `trace_backward` replays the engine's own backward pass node by node (BackwardObserver);
// `check_local_derivatives` holds every local derivative to a finite difference of its node;
// `to_dot` draws the graph; `trace_mlp` explains one weight of a real multilayer perceptron.
//
// Formula language: statements `name = expression` separated by `;` or new lines, `#` starts a
// comment. Expressions: numbers, names, + - * / ^ (also **), unary minus, parentheses and the
// functions sigmoid tanh relu softplus exp log sqrt abs sin cos max(a, b) min(a, b). A name used
// but never assigned is an input. The last assigned name is the output.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "chaingrad/error.hpp"
#include "chaingrad/tensor.hpp"

namespace chaingrad::explain {

// A problem with a formula at a place in its source (1-based line and column, counted in
// characters). For syntax errors what() also shows the source line with a caret under the
// offending character; other formula errors (an unknown function, a name used before it is
// assigned) are one line.
class FormulaError : public ValueError {
 public:
  FormulaError(const std::string& message, int line, int column, const std::string& source_line = {});
  int line() const { return line_; }
  int column() const { return column_; }

 private:
  int line_, column_;
};

// name=value pairs, in the order given.
using Values = std::vector<std::pair<std::string, double>>;

// Parses "x=0.5,w1=0.3" (commas, semicolons or spaces between pairs). Errors name the pair.
Values parse_values(std::string_view text);
// Parses "w1,b1" (commas or spaces).
std::vector<std::string> parse_names(std::string_view text);

struct Options {
  Values at;                     // a value for every input
  std::vector<std::string> wrt;  // variables to explain; empty means every input
  std::string of;                // the output; empty means the last assigned name
  bool expand = false;           // every node of the graph, unnamed subexpressions included
  std::size_t max_paths = 64;    // paths listed per variable before the rest are folded
};

// One value of the forward pass.
struct Value {
  std::string name;        // an assigned name, an input, or (expanded) the text of a subexpression
  std::string kind;        // "input", "assigned" or "intermediate"
  std::string expression;  // what it is computed from ("" for inputs)
  std::string op;          // the engine node that computes it ("mul", "sigmoid", ...; "" for inputs)
  double value = 0;
  int line = 0;            // the statement's line (0 for inputs)
};

// ∂of/∂wrt: one step of the chain rule.
struct Factor {
  std::string of, wrt;
  std::string formula;  // symbolic form, e.g. "2*(y - t)", "σ'(z1)", "x"
  double value = 0;     // computed by the engine
};

struct Path {
  std::vector<std::string> nodes;  // from the output down to the variable
  std::vector<Factor> factors;     // factors[i] = ∂nodes[i]/∂nodes[i+1]
  double product = 0;
};

struct Gradient {
  std::string wrt;
  double autograd = 0;           // autograd::grad on the whole graph
  double finite_difference = 0;  // central difference of the output
  double step = 0;               // its step h
  double path_sum = 0;           // the sum over all paths, by dynamic programming over the graph
  double shown_sum = 0;          // the sum of the products of `paths`
  double total_paths = 0;        // number of paths from the output to `wrt` (a double: it can be huge)
  std::uint64_t folded_paths = 0;  // paths not listed
  std::vector<Path> paths;       // all paths, or the max_paths largest by |product| when folded
  std::vector<Factor> local;     // every local derivative on some path, from the output down
};

struct Explanation {
  std::vector<std::string> statements;  // the formula as parsed, one statement each
  std::vector<std::string> inputs;
  std::string output;
  double output_value = 0;
  bool expanded = false;
  std::vector<Value> values;  // evaluation order: inputs first
  std::vector<Gradient> gradients;
  std::vector<std::string> legend;  // notations used in the factor formulas (σ', [u > 0], ...)
};

Explanation explain(std::string_view formula, const Options& options);
std::string to_text(const Explanation& e);
std::string to_json(const Explanation& e, int indent = 2);

// ---- the backward pass as the engine runs it ----
struct TraceSend {
  std::string to;        // the input the gradient goes to
  int argument = 0;      // which argument of the op it is (x*x sends to x twice: arguments 0 and 1)
  std::string formula;   // local derivative ∂node/∂input, symbolic
  double local = 0;      // its value (engine, this input slot alone)
  double sent = 0;       // what the engine sent: upstream × local
  bool accumulated = false;  // `to` already held a gradient: fan-out, the two are added
  double before = 0, after = 0;
};
struct TraceStep {
  std::string node;        // the value this node computed
  std::string op;          // engine node name ("mul", "AccumulateGrad", ...)
  std::string expression;
  std::uint64_t sequence_nr = 0;
  double value = 0;        // forward value
  double upstream = 0;     // ∂output/∂node, fully summed, as it arrives
  bool leaf = false;       // an input: the gradient is stored in .grad
  std::vector<TraceSend> sends;
};
struct BackwardTrace {
  std::string output;
  std::vector<TraceStep> steps;
};
BackwardTrace trace_backward(std::string_view formula, const Options& options);
std::string to_text(const BackwardTrace& t);
std::string to_json(const BackwardTrace& t, int indent = 2);

// ---- local derivatives against finite differences ----
struct LocalCheck {
  std::string node;      // the node (or, for statement factors, the named value)
  std::string op;        // the engine op whose backward rule produced `engine`
  std::string wrt;
  std::string formula;
  double engine = 0;             // backward rule's value
  double finite_difference = 0;  // central difference of this node's forward alone
  double symbolic = 0;           // `formula` evaluated in plain doubles
  bool at_kink = false;          // not differentiable here (relu at 0, a tie in max): not held to the difference
  bool ok = true;
};
struct CheckReport {
  std::vector<LocalCheck> statements;  // named factors (a statement against its operands)
  std::vector<LocalCheck> ops;         // every op node against each input
  std::vector<std::string> failing_ops;
  bool ok() const { return failing_ops.empty(); }
};
CheckReport check_local_derivatives(std::string_view formula, const Options& options);
std::string to_text(const CheckReport& r);
std::string to_json(const CheckReport& r, int indent = 2);

// The check --check runs on each node, for any function of scalars: the backward of `f` at
// `at` (one 0-d float64 leaf per argument) against central differences of its forward.
// `op` names it in the results.
using ScalarFunction = std::function<Tensor(const std::vector<Tensor>&)>;
std::vector<LocalCheck> check_function(const std::string& op, const ScalarFunction& f, const std::vector<double>& at);

// ---- graph drawing ----
// Graphviz DOT of the computational graph: one node per engine node (name, op, forward value,
// gradient of the output), inputs and constants; the paths to each `options.wrt` highlighted.
std::string to_dot(std::string_view formula, const Options& options);
// Writes the graph to `path` atomically: `.dot` as text; `.svg` and `.png` through Graphviz's
// `dot` program (an error says so when it is not installed).
void write_graph(std::string_view formula, const Options& options, const std::string& path);

// ---- one weight of a real network ----
// For a chain of linear layers with elementwise activations on one input:
//   z_l = W_l a_{l-1} + b_l, a_l = act_l(z_l), a_{-1} = input, loss on the last a (logits for
//   cross_entropy). Each neuron (element of each z and a) is a named value; the local factors
//   are W entries, activation slopes and the loss's partials.
struct NetworkTrace {
  std::string parameter;  // "W1[3,17]" or "b1[3]"
  double parameter_value = 0;
  std::string loss;
  double loss_value = 0;
  double autograd = 0;     // the engine's gradient for this element
  double path_sum = 0;     // sum over all paths, by dynamic programming layer by layer
  double shown_sum = 0;    // sum over `paths`
  double total_paths = 0;
  std::uint64_t folded_paths = 0;
  std::vector<std::size_t> widths;  // neurons per layer after the parameter's (the paths' branching)
  std::vector<Path> paths;  // the top_k largest by |product|
  std::vector<std::string> legend;
};
// weights[l] is [out, in]; biases[l] is [out] (or biases is empty: no biases); activations[l]
// is "relu", "sigmoid", "tanh" or "none"/"" (identity); input is [in] or [1, in]; loss is
// "cross_entropy" (target: one class index) or "mse" (target: [out] or [1, out]). The element
// explained is weights[layer][row, col], or biases[layer][row] when col < 0. Any float dtype;
// the explanation is computed in float64.
NetworkTrace trace_mlp(const std::vector<Tensor>& weights, const std::vector<Tensor>& biases,
                       const std::vector<std::string>& activations, const Tensor& input, const Tensor& target,
                       const std::string& loss, std::size_t layer, std::int64_t row, std::int64_t col,
                       std::size_t top_k = 10);
std::string to_text(const NetworkTrace& t);
std::string to_json(const NetworkTrace& t, int indent = 2);

}  // namespace chaingrad::explain
