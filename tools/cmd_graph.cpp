// chaingrad graph FORMULA --at x=0.5,w=0.3 [-o FILE.svg|.png|.dot] [--wrt v] [--of L]
//
// The computational graph the formula builds: one box per engine node with its op, forward value
// and the output's gradient, edges labelled with local derivatives, the paths to --wrt in red.
// .dot needs nothing; .svg and .png are drawn by Graphviz's `dot`. Without -o the DOT text is
// printed. Files are written atomically (temp file + rename).
#include <CLI/CLI.hpp>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "chaingrad/explain.hpp"
#if __has_include("commands.hpp")
#include "commands.hpp"
#endif

void add_graph_command(CLI::App& app);

namespace explain_cli {  // defined in cmd_explain.cpp
std::string read_formula_argument(const std::string& arg);
chaingrad::explain::Values parse_at_arguments(const std::vector<std::string>& at);
}  // namespace explain_cli

namespace {

struct GraphArgs {
  std::string formula;
  std::vector<std::string> at;
  std::vector<std::string> wrt;
  std::string of;
  std::string output;
};

void run_graph(const GraphArgs& a) {
  namespace ex = chaingrad::explain;
  ex::Options opt;
  opt.at = explain_cli::parse_at_arguments(a.at);
  for (const auto& w : a.wrt)
    for (auto& name : ex::parse_names(w)) opt.wrt.push_back(name);
  opt.of = a.of;
  const std::string formula = explain_cli::read_formula_argument(a.formula);
  if (a.output.empty() || a.output == "-") {
    std::cout << ex::to_dot(formula, opt);
    return;
  }
  ex::write_graph(formula, opt, a.output);
  std::cout << "wrote " << a.output << "\n";
}

}  // namespace

void add_graph_command(CLI::App& app) {
  auto args = std::make_shared<GraphArgs>();
  CLI::App* cmd = app.add_subcommand(
      "graph", "Draw a formula's computational graph (DOT, or SVG/PNG through Graphviz) with values and gradients");
  cmd->add_option("formula", args->formula,
                  "statements 'name = expression' separated by ';' or new lines (or @FILE, or - for standard input)")
      ->required();
  cmd->add_option("--at", args->at, "input values, e.g. x=0.5,w=0.3 (may repeat)")->allow_extra_args(false);
  cmd->add_option("-o,--output", args->output, "FILE.dot, FILE.svg or FILE.png (default: print DOT)");
  cmd->add_option("--wrt", args->wrt, "highlight the paths from the output to these variables")
      ->allow_extra_args(false);
  cmd->add_option("--of", args->of, "the output (default: the last assigned name)");
  cmd->callback([args] { run_graph(*args); });
}
