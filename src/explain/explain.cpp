// explain(): the forward pass, and for each variable the paths of the chain rule, with their
// factors (symbolic form + engine value), products and sums; autograd and finite differences.
//
// Note [paths without enumeration]: the number of paths from the output to a variable can grow
// as 2^depth. Three passes over the part of the DAG that lies between them never enumerate:
//  * count[u]   = number of paths u -> v       (sum over u's operands)
//  * adj[u]     = ∂out/∂u along those paths    (reverse mode: the sum over all paths, exactly)
//  * best[u]    = the K largest |products| of paths u -> v, each kept as (operand, rank in
//                 that operand's list): a k-best dynamic program, exact because a path's
//                 |product| is its first factor's times the rest's, so the rest is among the
//                 K best of that operand.
#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <sstream>

#include "chaingrad/autograd.hpp"
#include "chaingrad/explain.hpp"
#include "explain/model.hpp"

namespace chaingrad::explain {

using namespace detail;

namespace {

// The k-best search keeps up to max_paths entries per unit: bound it so memory stays small.
constexpr std::size_t kMaxListedPaths = 1000000;

struct PathEntry {
  double product;
  int operand;  // index into the unit's operands (-1 at v)
  int rank;     // index into that operand's list
};

// Local factors of every unit: values from the engine, forms from the expressions.
struct Factors {
  std::vector<std::vector<double>> value;  // [unit][operand index]
  std::vector<std::vector<Factor>> factor;
};

Factors local_factors(const Graph& g, const std::vector<double>& values) {
  Factors f;
  f.value.resize(g.units.size());
  f.factor.resize(g.units.size());
  const RefNamer namer = g.namer();
  for (std::size_t u = 0; u < g.units.size(); ++u) {
    const Unit& unit = g.units[u];
    if (unit.operands.empty()) continue;
    f.value[u] = local_partials(g, static_cast<int>(u), values);
    for (std::size_t k = 0; k < unit.operands.size(); ++k) {
      const int w = unit.operands[k];
      f.factor[u].push_back(Factor{unit.name, g.units[w].name,
                                   to_string(*local_form(g, static_cast<int>(u), w), namer), f.value[u][k]});
    }
  }
  return f;
}

// `used[u]` is set for every unit with a factor on some path.
Gradient paths_to(const Graph& g, const Factors& f, int v, std::size_t max_paths, std::vector<char>& used) {
  const int n = static_cast<int>(g.units.size()), out = g.output;
  Gradient grad;
  grad.wrt = g.units[v].name;
  // Units on some path out -> v: below out (reached from it) and above v (reaching it).
  std::vector<char> down(n, 0), up(n, 0), on(n, 0);
  down[v] = 1;
  for (int u = v + 1; u < n; ++u)
    for (int w : g.units[u].operands) down[u] |= down[w];
  up[out] = 1;
  for (int u = out; u >= 0; --u)
    if (up[u])
      for (int w : g.units[u].operands) up[w] = 1;
  for (int u = 0; u < n; ++u) on[u] = down[u] && up[u];
  for (int u = v + 1; u < n; ++u) used[u] |= on[u];
  if (!on[out]) return grad;  // no path: the output does not depend on v

  // Counts and the exact sum over paths (reverse mode over the subgraph).
  std::vector<double> count(n, 0.0), adj(n, 0.0);
  count[v] = 1;
  for (int u = v + 1; u <= out; ++u)
    if (on[u])
      for (int w : g.units[u].operands)
        if (on[w]) count[u] += count[w];
  adj[out] = 1;
  for (int u = out; u > v; --u) {
    if (!on[u]) continue;
    const auto& ops = g.units[u].operands;
    for (std::size_t k = 0; k < ops.size(); ++k)
      if (on[ops[k]]) adj[ops[k]] += adj[u] * f.value[u][k];
  }
  grad.total_paths = count[out];
  grad.path_sum = adj[v];
  for (int u = out; u >= v; --u) {
    if (!on[u]) continue;
    const auto& ops = g.units[u].operands;
    for (std::size_t k = 0; k < ops.size(); ++k)
      if (on[ops[k]]) grad.local.push_back(f.factor[u][k]);
  }

  // K best paths by |product| (Note [paths without enumeration]).
  const std::size_t K = max_paths;
  const bool folded = count[out] > static_cast<double>(K);
  std::vector<std::vector<PathEntry>> best(n);
  best[v] = {{1.0, -1, -1}};
  for (int u = v + 1; u <= out && K > 0; ++u) {
    if (!on[u]) continue;
    std::vector<PathEntry> cand;
    const auto& ops = g.units[u].operands;
    for (std::size_t k = 0; k < ops.size(); ++k) {
      if (!on[ops[k]]) continue;
      const auto& below = best[ops[k]];
      for (std::size_t r = 0; r < below.size(); ++r)
        cand.push_back({f.value[u][k] * below[r].product, static_cast<int>(k), static_cast<int>(r)});
    }
    auto larger = [](const PathEntry& a, const PathEntry& b) {
      const double x = std::abs(a.product), y = std::abs(b.product);
      if (x != y) return x > y;
      return a.operand != b.operand ? a.operand < b.operand : a.rank < b.rank;
    };
    const std::size_t keep = std::min(K, cand.size());
    std::partial_sort(cand.begin(), cand.begin() + static_cast<std::ptrdiff_t>(keep), cand.end(), larger);
    cand.resize(keep);
    best[u] = std::move(cand);
  }
  if (K == 0) best[out].clear();

  std::vector<std::pair<std::vector<int>, Path>> found;
  for (const PathEntry& start : best[out]) {
    Path path;
    std::vector<int> choices;
    int u = out;
    PathEntry e = start;
    path.nodes.push_back(g.units[u].name);
    while (u != v) {
      const int w = g.units[u].operands[e.operand];
      path.factors.push_back(f.factor[u][e.operand]);
      choices.push_back(e.operand);
      path.nodes.push_back(g.units[w].name);
      e = best[w][e.rank];
      u = w;
    }
    path.product = start.product;
    found.emplace_back(std::move(choices), std::move(path));
  }
  // All paths fit: list them in the order of the formula (operand order); else by magnitude.
  if (!folded) std::stable_sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (auto& [_, path] : found) {
    grad.shown_sum += path.product;
    grad.paths.push_back(std::move(path));
  }
  const double rest = count[out] - static_cast<double>(grad.paths.size());
  grad.folded_paths = rest >= 1.8e19 ? UINT64_MAX : static_cast<std::uint64_t>(rest);
  return grad;
}

std::string statement_text(const Program& p, const Statement& s) {
  return s.name + " = " + to_string(*s.expr, [&](int id) { return RefText{p.symbols[id]}; });
}

}  // namespace

Explanation explain(std::string_view formula, const Options& options) {
  CG_CHECK(options.max_paths <= kMaxListedPaths, ValueError, "--max-paths: at most ", kMaxListedPaths,
           " paths can be listed; got ", options.max_paths);
  const Program p = parse(formula);
  const Resolved r = resolve(p, options);
  const Graph g = options.expand ? expanded_graph(p, r.output) : named_graph(p, r.output);

  Explanation ex;
  ex.expanded = g.expanded;
  for (const auto& s : p.statements) ex.statements.push_back(statement_text(p, s));
  for (int s : p.inputs) ex.inputs.push_back(p.symbols[s]);

  std::vector<int> wrt;
  if (options.wrt.empty()) {
    wrt = g.inputs;
  } else {
    for (const std::string& name : options.wrt) {
      const int u = g.find(name);
      if (u < 0) {
        std::string names;
        for (const auto& unit : g.units) names += (names.empty() ? "" : ", ") + unit.name;
        ::chaingrad::detail::throw_error<ValueError>("--wrt: '", name, "' is not a value of the formula (its values: ", names, ")");
      }
      if (std::find(wrt.begin(), wrt.end(), u) == wrt.end()) wrt.push_back(u);
    }
  }

  const Evaluation ev = evaluate(g, p, r.input_values);
  ex.output = g.units[g.output].name;
  ex.output_value = ev.values[g.output];
  for (std::size_t u = 0; u < g.units.size(); ++u) {
    const Unit& unit = g.units[u];
    Value v;
    v.name = unit.name;
    v.kind = kind_name(unit.kind);
    v.expression = g.expression(static_cast<int>(u));
    if (unit.kind != Unit::Kind::Input) {
      const auto& fn = ev.tensors[u].grad_fn();
      v.op = fn ? fn->name() : "constant";
      v.line = p.statements[unit.statement].line;
    }
    v.value = ev.values[u];
    ex.values.push_back(std::move(v));
  }

  // The engine's gradients, all in one backward.
  std::vector<Tensor> targets;
  for (int u : wrt) targets.push_back(ev.tensors[u]);
  const auto grads = autograd::grad({ev.tensors[g.output]}, targets, {}, /*retain_graph=*/false,
                                    /*create_graph=*/false, /*allow_unused=*/true);

  const Factors f = local_factors(g, ev.values);
  std::vector<char> used(g.units.size(), 0);
  for (std::size_t i = 0; i < wrt.size(); ++i) {
    Gradient grad = paths_to(g, f, wrt[i], options.max_paths, used);
    grad.autograd = grads[i].defined() ? grads[i].item() : 0.0;
    grad.finite_difference = finite_difference(g, p, r.input_values, wrt[i], ev.values[wrt[i]], &grad.step);
    ex.gradients.push_back(std::move(grad));
  }
  // Legends for the notations the factor forms use.
  for (std::size_t u = 0; u < g.units.size(); ++u)
    if (used[u])
      for (int w : g.units[u].operands) collect_legends(*local_form(g, static_cast<int>(u), w), ex.legend);
  return ex;
}

// ---------------------------------------------------------------- text
namespace {

std::string pad(const std::string& s, std::size_t width) { return pad_right(s, width); }
std::size_t width_of(const std::string& s) { return text_width(s); }
std::string paren_if_negative(double v) { return v < 0 ? "(" + fmt(v) + ")" : fmt(v); }
std::string count_text(double n) {
  if (n < 1e15) {
    std::ostringstream os;
    os << static_cast<std::uint64_t>(n);
    return os.str();
  }
  return fmt(n, 6);
}
std::string plural(double n, const char* one, const char* many) { return n == 1 ? one : many; }

void write_factor_table(std::ostringstream& os, const std::vector<Factor>& factors, const std::string& indent) {
  std::size_t w1 = 0, w2 = 0;
  for (const Factor& f : factors) {
    w1 = std::max(w1, width_of(partial_name(f.of, f.wrt)));
    w2 = std::max(w2, std::min<std::size_t>(width_of(f.formula), 40));
  }
  for (const Factor& f : factors)
    os << indent << pad(partial_name(f.of, f.wrt), w1) << " = " << pad(f.formula, w2) << " = " << fmt(f.value) << "\n";
}

}  // namespace

std::string to_text(const Explanation& e) {
  std::ostringstream os;
  os << "Formula\n";
  for (const auto& s : e.statements) os << "  " << s << "\n";

  os << "\nForward pass (" << (e.expanded ? "every node of the graph, in the order the engine computes them"
                                          : "the inputs, then each named value in the order it is computed")
     << ")\n";
  std::size_t wn = 0, we = 0;
  for (const Value& v : e.values) {
    wn = std::max(wn, width_of(v.name));
    we = std::max(we, std::min<std::size_t>(width_of(v.expression), 36));
  }
  for (const Value& v : e.values) {
    os << "  " << pad(v.name, wn) << " = ";
    if (v.kind == "input")
      os << pad(fmt(v.value), we) << "   (input)\n";
    else
      os << pad(v.expression, we) << " = " << fmt(v.value) << "\n";
  }
  os << "\nOutput: " << e.output << " = " << fmt(e.output_value, 10) << "\n";

  for (const Gradient& g : e.gradients) {
    const std::string d = partial_name(e.output, g.wrt);
    os << "\n" << d << ": how " << e.output << " responds to " << g.wrt << "\n";
    if (g.total_paths == 0) {
      os << "  No path leads from " << e.output << " down to " << g.wrt << ": " << e.output << " does not depend on "
         << g.wrt << ", so " << d << " = 0.\n";
    } else {
      if (!g.local.empty()) {
        if (g.local.size() <= 40) {
          os << "  Local derivatives on the way (each one step of the chain rule; symbolic form = value):\n";
          write_factor_table(os, g.local, "    ");
        } else {
          os << "  " << g.local.size() << " local derivatives lie on the way (--json lists each path's factors).\n";
        }
      }
      const bool folded = g.folded_paths > 0;
      if (folded)
        os << "  " << count_text(g.total_paths) << " paths lead from " << e.output << " down to " << g.wrt
           << ", too many to list; the " << g.paths.size() << " largest by magnitude:\n";
      else
        os << "  " << count_text(g.total_paths) << " " << plural(g.total_paths, "path leads", "paths lead")
           << " from " << e.output << " down to " << g.wrt
           << (g.total_paths > 1 ? " (the chain rule sums over them):\n" : ":\n");
      for (std::size_t i = 0; i < g.paths.size(); ++i) {
        const Path& p = g.paths[i];
        os << "    path " << i + 1 << ": ";
        for (std::size_t k = 0; k < p.nodes.size(); ++k) os << (k ? " → " : "") << p.nodes[k];
        os << "\n";
        if (p.factors.empty()) {
          os << "      " << d << " = 1 (the output itself)\n";
        } else if (p.factors.size() == 1) {
          os << "      " << partial_name(p.factors[0].of, p.factors[0].wrt) << " = " << fmt(p.product) << "\n";
        } else if (p.factors.size() <= 20) {
          os << "      ";
          for (std::size_t k = 0; k < p.factors.size(); ++k)
            os << (k ? " · " : "") << partial_name(p.factors[k].of, p.factors[k].wrt);
          os << "\n      = ";
          for (std::size_t k = 0; k < p.factors.size(); ++k)
            os << (k ? " · " : "") << paren_if_negative(p.factors[k].value);
          os << " = " << fmt(p.product) << "\n";
        } else {
          os << "      product of its " << p.factors.size() << " factors = " << fmt(p.product) << "\n";
        }
      }
      if (folded) {
        os << "  The " << g.paths.size() << " paths listed sum to " << fmt(g.shown_sum, 10) << "; the other "
           << count_text(static_cast<double>(g.folded_paths)) << " are folded.\n";
        os << "  Sum over all " << count_text(g.total_paths) << " paths = " << fmt(g.path_sum, 15)
           << "  (dynamic programming over the graph: each local derivative used once, no path enumerated)\n";
      } else if (g.paths.size() > 1) {
        os << "  Sum over the " << g.paths.size() << " paths: ";
        if (g.paths.size() <= 8) {
          for (std::size_t i = 0; i < g.paths.size(); ++i)
            os << (i ? " + " : "") << paren_if_negative(g.paths[i].product);
          os << " = ";
        }
        os << fmt(g.shown_sum, 15) << "\n";
      }
    }
    os << "  " << d << " by the chain rule over paths: " << fmt(g.path_sum, 15) << "\n";
    os << "  " << d << " by autograd:                  " << fmt(g.autograd, 15) << "\n";
    os << "  " << d << " by central difference:        " << fmt(g.finite_difference, 15) << "  (step "
       << fmt(g.step, 3) << ")\n";
    os << "  autograd - finite difference = " << fmt(g.autograd - g.finite_difference, 3) << "\n";
  }
  if (!e.legend.empty()) {
    os << "\nNotation\n";
    for (const auto& l : e.legend) os << "  " << l << "\n";
  }
  return os.str();
}

// ---------------------------------------------------------------- JSON
namespace {
using ojson = nlohmann::ordered_json;

ojson factor_json(const Factor& f) {
  return ojson{{"of", f.of}, {"wrt", f.wrt}, {"formula", f.formula}, {"value", f.value}};
}
ojson count_json(double n) {
  if (n <= 9007199254740992.0) return ojson(static_cast<std::uint64_t>(n));
  return ojson(n);
}
}  // namespace

std::string to_json(const Explanation& e, int indent) {
  ojson j;
  j["formula"] = e.statements;
  j["inputs"] = e.inputs;
  j["output"] = {{"name", e.output}, {"value", e.output_value}};
  j["expanded"] = e.expanded;
  ojson values = ojson::object();
  ojson forward = ojson::array();
  for (const Value& v : e.values) {
    values[v.name] = v.value;
    ojson node{{"name", v.name}, {"kind", v.kind}, {"value", v.value}};
    if (v.kind != "input") {
      node["expression"] = v.expression;
      node["op"] = v.op;
      node["line"] = v.line;
    }
    forward.push_back(std::move(node));
  }
  j["values"] = std::move(values);
  j["forward"] = std::move(forward);
  ojson grads = ojson::object();
  for (const Gradient& g : e.gradients) {
    ojson gj;
    gj["autograd"] = g.autograd;
    gj["finite_difference"] = g.finite_difference;
    gj["difference"] = g.autograd - g.finite_difference;
    gj["step"] = g.step;
    gj["sum_over_paths"] = g.path_sum;
    gj["total_paths"] = count_json(g.total_paths);
    gj["folded_paths"] = g.folded_paths;
    gj["shown_sum"] = g.shown_sum;
    ojson paths = ojson::array();
    for (const Path& p : g.paths) {
      ojson pj;
      pj["nodes"] = p.nodes;
      ojson fs = ojson::array();
      for (const Factor& f : p.factors) fs.push_back(factor_json(f));
      pj["factors"] = std::move(fs);
      pj["product"] = p.product;
      paths.push_back(std::move(pj));
    }
    gj["paths"] = std::move(paths);
    ojson local = ojson::array();
    for (const Factor& f : g.local) local.push_back(factor_json(f));
    gj["local_derivatives"] = std::move(local);
    grads[g.wrt] = std::move(gj);
  }
  j["gradients"] = std::move(grads);
  j["legend"] = e.legend;
  return j.dump(indent);
}

}  // namespace chaingrad::explain
