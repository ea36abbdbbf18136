// chaingrad explain FORMULA --at x=0.5,w1=0.3 --wrt w1 [--of L] [--expand] [--trace] [--check] [--json]
//
// The chain rule, shown with the engine's own numbers: the forward pass, every path from the
// output down to each variable with its local derivatives (symbolic form and value), the sum over
// paths, and the gradient from autograd and from a central finite difference. --trace replays the
// engine's backward pass node by node; --check holds every local derivative to a finite
// difference and fails (exit 1) naming the op whose backward rule disagrees.
#include <CLI/CLI.hpp>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "chaingrad/error.hpp"
#include "chaingrad/explain.hpp"
#if __has_include("commands.hpp")
#include "commands.hpp"
#endif

void add_explain_command(CLI::App& app);

namespace {

namespace ex = chaingrad::explain;

struct ExplainArgs {
  std::string formula;
  std::vector<std::string> at;
  std::vector<std::string> wrt;
  std::string of;
  std::size_t max_paths = 64;
  bool expand = false;
  bool trace = false;
  bool check = false;
  bool json = false;
};

}  // namespace

// Shared with cmd_graph.cpp (declared there too).
namespace explain_cli {
// A formula given inline, as @FILE, or as - (standard input).
std::string read_formula_argument(const std::string& arg);
// Joins repeated --at options into one list of values.
chaingrad::explain::Values parse_at_arguments(const std::vector<std::string>& at);

std::string read_formula_argument(const std::string& arg) {
  if (arg == "-") return std::string(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
  if (arg.size() > 1 && arg[0] == '@') {
    std::ifstream in(arg.substr(1), std::ios::binary);
    CG_CHECK(in.good(), IoError, "cannot read the formula file '", arg.substr(1), "'");
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  return arg;
}

chaingrad::explain::Values parse_at_arguments(const std::vector<std::string>& at) {
  std::string joined;
  for (const auto& a : at) joined += (joined.empty() ? "" : ",") + a;
  return chaingrad::explain::parse_values(joined);
}
}  // namespace explain_cli

namespace {

void run_explain(const ExplainArgs& a) {
  ex::Options opt;
  opt.at = explain_cli::parse_at_arguments(a.at);
  for (const auto& w : a.wrt)
    for (auto& name : ex::parse_names(w)) opt.wrt.push_back(name);
  opt.of = a.of;
  opt.expand = a.expand;
  opt.max_paths = a.max_paths;
  const std::string formula = explain_cli::read_formula_argument(a.formula);

  if (a.json) {
    nlohmann::ordered_json j = nlohmann::ordered_json::parse(ex::to_json(ex::explain(formula, opt)));
    std::optional<ex::CheckReport> report;
    if (a.trace) j["backward"] = nlohmann::ordered_json::parse(ex::to_json(ex::trace_backward(formula, opt)))["backward"];
    if (a.check) {
      report = ex::check_local_derivatives(formula, opt);
      j["check"] = nlohmann::ordered_json::parse(ex::to_json(*report));
    }
    std::cout << j.dump(2) << "\n";
    CG_CHECK(!report || report->ok(), Error, "check failed: the backward rule of ",
             report->failing_ops.empty() ? std::string("?") : report->failing_ops.front(),
             " disagrees with a finite difference of its forward");
    return;
  }

  if (!a.trace && !a.check) {
    std::cout << ex::to_text(ex::explain(formula, opt));
    return;
  }
  if (a.trace) std::cout << ex::to_text(ex::trace_backward(formula, opt));
  if (a.check) {
    if (a.trace) std::cout << "\n";
    const ex::CheckReport report = ex::check_local_derivatives(formula, opt);
    std::cout << ex::to_text(report);
    std::cout.flush();
    if (!report.ok()) {
      std::string ops;
      for (const auto& o : report.failing_ops) ops += (ops.empty() ? "" : ", ") + o;
      throw chaingrad::Error("check failed: " + ops + " disagrees with a finite difference of the forward pass");
    }
  }
}

}  // namespace

void add_explain_command(CLI::App& app) {
  auto args = std::make_shared<ExplainArgs>();
  CLI::App* cmd = app.add_subcommand(
      "explain", "Show the chain rule for a formula: forward pass, every path's local derivatives, their sum, "
                 "autograd and a finite difference");
  cmd->add_option("formula", args->formula,
                  "statements 'name = expression' separated by ';' or new lines, e.g. "
                  "'z = w*x + b; y = sigmoid(z); L = (y - t)^2' (or @FILE, or - for standard input)")
      ->required();
  cmd->add_option("--at", args->at, "input values, e.g. x=0.5,w=0.3,b=0.1,t=1 (may repeat)")
      ->allow_extra_args(false);
  cmd->add_option("--wrt", args->wrt, "variables to explain, e.g. w,b (default: every input)")
      ->allow_extra_args(false);
  cmd->add_option("--of", args->of, "the output (default: the last assigned name)");
  cmd->add_flag("--expand", args->expand, "show every node of the graph, unnamed subexpressions included");
  cmd->add_flag("--trace", args->trace, "print the backward pass node by node, in the order the engine runs it");
  cmd->add_flag("--check", args->check,
                "check every local derivative against a finite difference of its node (exit 1 on a mismatch)");
  cmd->add_flag("--json", args->json, "print one JSON object");
  cmd->add_option("--max-paths", args->max_paths, "paths listed per variable before the rest are folded")
      ->capture_default_str();
  cmd->callback([args] { run_explain(*args); });
}
