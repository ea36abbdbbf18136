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

#include <regex>

#include "chaingrad/data.hpp"
#include "chaingrad/error.hpp"
#include "chaingrad/explain.hpp"
#include "chaingrad/nn.hpp"
#include "checkpoint.hpp"
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
  // Network mode: one weight of a trained MLP on one test sample.
  std::string model;
  std::string param;
  std::int64_t input = 0;
  std::string data_dir = chaingrad::data::kFashionMnistDir;
  std::size_t top = 10;
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

namespace cg = chaingrad;

// `--model CHECKPOINT --param '0.weight[3,17]' --input N`: the paths from one weight of an MLP
// (linear layers with relu/sigmoid/tanh between them) through every later neuron to the loss.
void run_network(const ExplainArgs& a) {
  cli::CheckpointInfo info;
  auto model = cli::load_checkpoint(a.model, info);
  std::smatch m;
  const std::regex param_re(R"(^(\d+)\.(weight|bias)\[(\d+)(?:,\s*(\d+))?\]$)");
  CG_CHECK(std::regex_match(a.param, m, param_re), ValueError, "explain: --param must look like '0.weight[3,17]' or ",
           "'0.bias[3]'; got '", a.param, "'");
  const std::size_t child = std::stoul(m[1]);
  const bool is_bias = m[2] == "bias";
  CG_CHECK(is_bias == !m[4].matched, ValueError, "explain: ", a.param, ": a weight takes [row,col], a bias takes [row]");
  std::vector<cg::Tensor> weights, biases;
  std::vector<std::string> activations;
  std::size_t layer = 0;
  bool found = false;
  for (std::size_t i = 0; i < model->size(); ++i) {
    const auto& mod = (*model)[i];
    const std::string type = mod->type_name();
    if (type == "Linear") {
      auto lin = std::dynamic_pointer_cast<cg::nn::Linear>(mod);
      if (i == child) {
        layer = weights.size();
        found = true;
      }
      weights.push_back(lin->weight);
      biases.push_back(lin->bias.defined() ? lin->bias : cg::zeros({lin->weight.size(0)}, {.dtype = lin->weight.dtype()}));
      activations.push_back("none");
    } else if (type == "ReLU" || type == "Sigmoid" || type == "Tanh") {
      CG_CHECK(!activations.empty() && activations.back() == "none", ValueError, "explain --model: layer ", i, " (",
               type, ") must follow a linear layer");
      std::string name = type;
      for (auto& c : name) c = static_cast<char>(std::tolower(c));
      activations.back() = name;
    } else if (type != "Flatten" && type != "Dropout") {
      throw cg::ValueError("explain --model: layer " + std::to_string(i) + " is " + type +
                           "; only linear layers with relu, sigmoid or tanh are supported");
    }
  }
  CG_CHECK(found, ValueError, "explain: --param ", a.param, " does not name a linear layer of '", info.spec, "'");
  cg::data::Dataset test = cg::data::load_idx(a.data_dir, false, /*keep_bytes=*/true);
  CG_CHECK(a.input >= 0 && a.input < test.size(), ValueError, "explain: --input ", a.input,
           " is out of range; the test set has ", test.size(), " samples");
  cg::Tensor x = cg::data::float_inputs(test, a.input, a.input + 1);
  cg::data::normalize_(x, info.norm);
  const std::int64_t label = static_cast<std::int64_t>(test.labels.at({a.input}));
  const cg::Tensor target = cg::from_vector(std::vector<std::int64_t>{label}, {1});
  const auto trace = ex::trace_mlp(weights, biases, activations, cg::reshape(x, {-1}), target, "cross_entropy", layer,
                                   std::stoll(m[3]), is_bias ? -1 : std::stoll(m[4]), a.top);
  std::cout << (a.json ? ex::to_json(trace) + "\n" : ex::to_text(trace));
}

void run_explain(const ExplainArgs& a) {
  if (!a.model.empty()) {
    CG_CHECK(!a.param.empty(), ValueError, "explain: --model needs --param, e.g. --param '0.weight[3,17]'");
    run_network(a);
    return;
  }
  CG_CHECK(!a.formula.empty(), ValueError, "explain: give a FORMULA, or --model CHECKPOINT --param NAME[i,j]");
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
                  "'z = w*x + b; y = sigmoid(z); L = (y - t)^2' (or @FILE, or - for standard input)");
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
  cmd->add_option("--model", args->model, "a checkpoint of an MLP: explain one of its weights instead of a formula");
  cmd->add_option("--param", args->param, "with --model: the element, e.g. '0.weight[3,17]' or '2.bias[4]'");
  cmd->add_option("--input", args->input, "with --model: the test-set sample to explain it on")->capture_default_str();
  cmd->add_option("--data", args->data_dir, "with --model: folder with the IDX test files");
  cmd->add_option("--top", args->top, "with --model: how many of the largest paths to show")->capture_default_str();
  cmd->callback([args] { run_explain(*args); });
}
