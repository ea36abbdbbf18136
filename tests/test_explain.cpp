// The chain-rule explainer: formulas, paths, factors, sums, the engine trace, local checks, graph
// export, networks, and error messages.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "chaingrad/autograd.hpp"
#include "chaingrad/explain.hpp"
#include "chaingrad/ops.hpp"

namespace cg = chaingrad;
namespace ex = chaingrad::explain;

namespace {

const char* kSeed = "z1 = w1*x + b1; h = sigmoid(z1); z2 = w2*h + b2; y = sigmoid(z2); L = (y - t)^2";
const char* kSeedAt = "x=0.5,w1=0.3,b1=0.1,w2=-0.4,b2=0.2,t=1";

ex::Options options(const std::string& at, const std::string& wrt = "", bool expand = false) {
  ex::Options o;
  o.at = ex::parse_values(at);
  o.wrt = ex::parse_names(wrt);
  o.expand = expand;
  return o;
}

double sig(double z) { return 1 / (1 + std::exp(-z)); }
double dsig(double z) { return sig(z) * (1 - sig(z)); }

// |a - b| within 1e-12 relative (to the larger of the two and `scale`) or 1e-15 absolute.
void expect_close(double a, double b, double scale = 0, double rel = 1e-12) {
  const double tol = rel * std::max({std::abs(a), std::abs(b), scale}) + 1e-15;
  EXPECT_LE(std::abs(a - b), tol) << a << " vs " << b;
}

const ex::Value& value_of(const ex::Explanation& e, const std::string& name) {
  for (const auto& v : e.values)
    if (v.name == name) return v;
  throw std::runtime_error("no value " + name);
}

template <class F>
std::string error_of(F f) {
  try {
    f();
  } catch (const cg::Error& e) {
    return e.what();
  }
  return "(no error)";
}

// ---------------------------------------------------------------- the seed network
struct Seed {
  double x = 0.5, w1 = 0.3, b1 = 0.1, w2 = -0.4, b2 = 0.2, t = 1;
  double z1 = w1 * x + b1, h = sig(z1), z2 = w2 * h + b2, y = sig(z2), L = (y - t) * (y - t);
};

TEST(ExplainSeed, ForwardPassIsEveryNamedValueInOrder) {
  const auto e = ex::explain(kSeed, options(kSeedAt, "w1"));
  const Seed s;
  std::vector<std::string> names;
  for (const auto& v : e.values) names.push_back(v.name);
  EXPECT_EQ(names, (std::vector<std::string>{"w1", "x", "b1", "w2", "b2", "t", "z1", "h", "z2", "y", "L"}));
  expect_close(value_of(e, "z1").value, s.z1);
  expect_close(value_of(e, "h").value, s.h);
  expect_close(value_of(e, "z2").value, s.z2);
  expect_close(value_of(e, "y").value, s.y);
  expect_close(e.output_value, s.L);
  EXPECT_EQ(e.output, "L");
  EXPECT_EQ(value_of(e, "h").op, "sigmoid");
  EXPECT_EQ(value_of(e, "z1").expression, "w1*x + b1");
}

TEST(ExplainSeed, FactorsMatchTheHandFormulas) {
  const auto e = ex::explain(kSeed, options(kSeedAt, "w1"));
  const Seed s;
  ASSERT_EQ(e.gradients.size(), 1u);
  const ex::Gradient& g = e.gradients[0];
  ASSERT_EQ(g.paths.size(), 1u);
  const ex::Path& p = g.paths[0];
  EXPECT_EQ(p.nodes, (std::vector<std::string>{"L", "y", "z2", "h", "z1", "w1"}));
  ASSERT_EQ(p.factors.size(), 5u);
  const std::vector<std::string> forms = {"2*(y - t)", "σ'(z2)", "w2", "σ'(z1)", "x"};
  const std::vector<double> hand = {2 * (s.y - s.t), dsig(s.z2), s.w2, dsig(s.z1), s.x};
  for (std::size_t i = 0; i < 5; ++i) {
    EXPECT_EQ(p.factors[i].of, p.nodes[i]);
    EXPECT_EQ(p.factors[i].wrt, p.nodes[i + 1]);
    EXPECT_EQ(p.factors[i].formula, forms[i]);
    expect_close(p.factors[i].value, hand[i]);
  }
  // ∂L/∂w1 = 2(y − t)·σ'(z2)·w2·σ'(z1)·x
  const double expected = 2 * (s.y - s.t) * dsig(s.z2) * s.w2 * dsig(s.z1) * s.x;
  expect_close(p.product, expected);
  expect_close(g.path_sum, expected);
  expect_close(g.autograd, expected);
  EXPECT_NEAR(g.finite_difference, expected, 1e-9);
  EXPECT_EQ(g.total_paths, 1);
  EXPECT_EQ(g.folded_paths, 0u);
}

TEST(ExplainSeed, EveryInputByDefault) {
  const auto e = ex::explain(kSeed, options(kSeedAt));
  ASSERT_EQ(e.gradients.size(), 6u);
  const Seed s;
  const double dL_dz1 = 2 * (s.y - s.t) * dsig(s.z2) * s.w2 * dsig(s.z1);
  for (const auto& g : e.gradients) {
    expect_close(g.path_sum, g.autograd);
    EXPECT_NEAR(g.finite_difference, g.autograd, 1e-8);
  }
  expect_close(e.gradients[1].autograd, dL_dz1 * s.w1);  // x
  expect_close(e.gradients[2].autograd, dL_dz1);         // b1
  expect_close(e.gradients[5].autograd, -2 * (s.y - s.t));  // t
  EXPECT_EQ(e.gradients[2].paths[0].factors.back().formula, "1");  // ∂z1/∂b1 = 1
}

TEST(ExplainSeed, GoldenText) {
  const std::string text = ex::to_text(ex::explain(kSeed, options(kSeedAt, "w1")));
  for (const char* line : {
           "  z1 = w1*x + b1   = 0.25\n",
           "  h  = sigmoid(z1) = 0.562177\n",
           "  w1 = 0.3           (input)\n",
           "Output: L = 0.2562559848\n",
           "∂L/∂w1: how L responds to w1\n",
           "    ∂L/∂y   = 2*(y - t) = -1.01243\n",
           "    ∂y/∂z2  = σ'(z2)    = 0.249961\n",
           "    ∂z2/∂h  = w2        = -0.4\n",
           "    ∂h/∂z1  = σ'(z1)    = 0.246134\n",
           "    ∂z1/∂w1 = x         = 0.5\n",
           "  1 path leads from L down to w1:\n",
           "    path 1: L → y → z2 → h → z1 → w1\n",
           "      ∂L/∂y · ∂y/∂z2 · ∂z2/∂h · ∂h/∂z1 · ∂z1/∂w1\n",
           "      = (-1.01243) · 0.249961 · (-0.4) · 0.246134 · 0.5 = 0.0124578\n",
           "  ∂L/∂w1 by autograd:                  0.012457807275705\n",
           "  σ'(u) = σ(u)·(1 - σ(u)), where σ = sigmoid\n",
       }) {
    EXPECT_NE(text.find(line), std::string::npos) << "missing line: " << line << "\nin:\n" << text;
  }
}

TEST(ExplainSeed, Json) {
  const auto j = nlohmann::json::parse(ex::to_json(ex::explain(kSeed, options(kSeedAt, "w1"))));
  EXPECT_EQ(j["output"]["name"], "L");
  EXPECT_NEAR(j["output"]["value"].get<double>(), Seed{}.L, 1e-15);
  EXPECT_NEAR(j["values"]["z1"].get<double>(), 0.25, 1e-15);
  const auto& g = j["gradients"]["w1"];
  EXPECT_EQ(g["paths"].size(), 1u);
  EXPECT_EQ(g["paths"][0]["nodes"], nlohmann::json({"L", "y", "z2", "h", "z1", "w1"}));
  const auto& f0 = g["paths"][0]["factors"][0];
  EXPECT_EQ(f0["of"], "L");
  EXPECT_EQ(f0["wrt"], "y");
  EXPECT_EQ(f0["formula"], "2*(y - t)");
  EXPECT_EQ(g["folded_paths"], 0);
  EXPECT_NEAR(g["autograd"].get<double>(), g["paths"][0]["product"].get<double>(), 1e-15);
  EXPECT_TRUE(g.contains("finite_difference"));
}

TEST(ExplainSeed, ExpandShowsEveryNode) {
  const auto e = ex::explain(kSeed, options(kSeedAt, "w1", /*expand=*/true));
  EXPECT_TRUE(e.expanded);
  EXPECT_EQ(value_of(e, "w1*x").kind, "intermediate");
  EXPECT_EQ(value_of(e, "w1*x").op, "mul");
  EXPECT_EQ(value_of(e, "y - t").op, "sub");
  const ex::Path& p = e.gradients[0].paths.at(0);
  EXPECT_EQ(p.nodes, (std::vector<std::string>{"L", "y - t", "y", "z2", "w2*h", "h", "z1", "w1*x", "w1"}));
  expect_close(p.product, e.gradients[0].autograd);
}

// ---------------------------------------------------------------- symbolic forms
std::string form(const std::string& formula, const std::string& at, const std::string& of, const std::string& wrt) {
  const auto e = ex::explain(formula, options(at, wrt));
  for (const auto& f : e.gradients.at(0).local)
    if (f.of == of && f.wrt == wrt) return f.formula;
  return "(none)";
}

TEST(ExplainForms, SimplifiedDerivatives) {
  EXPECT_EQ(form("y = x/w", "x=1,w=2", "y", "w"), "-x/w^2");
  EXPECT_EQ(form("y = x/w", "x=1,w=2", "y", "x"), "1/w");
  EXPECT_EQ(form("y = log(x)", "x=2", "y", "x"), "1/x");
  EXPECT_EQ(form("y = sqrt(x)", "x=2", "y", "x"), "1/(2*sqrt(x))");
  EXPECT_EQ(form("y = tanh(x)", "x=2", "y", "x"), "1 - tanh(x)^2");
  EXPECT_EQ(form("y = relu(x)", "x=2", "y", "x"), "[x > 0]");
  EXPECT_EQ(form("y = max(a, b)", "a=1,b=2", "y", "a"), "[a >= b]");
  EXPECT_EQ(form("y = max(a, b)", "a=1,b=2", "y", "b"), "[a < b]");
  EXPECT_EQ(form("y = cos(x)", "x=1", "y", "x"), "-sin(x)");
  EXPECT_EQ(form("y = x^c", "x=2,c=3", "y", "c"), "x^c*log(x)");
  EXPECT_EQ(form("y = x^c", "x=2,c=3", "y", "x"), "c*x^(c - 1)");
  EXPECT_EQ(form("y = x^3", "x=2", "y", "x"), "3*x^2");
  EXPECT_EQ(form("y = 3*x", "x=2", "y", "x"), "3");
  EXPECT_EQ(form("y = -x", "x=2", "y", "x"), "-1");
  EXPECT_EQ(form("y = exp(2*x)", "x=1", "y", "x"), "2*exp(2*x)");
  EXPECT_EQ(form("y = abs(x)", "x=1", "y", "x"), "sign(x)");
  EXPECT_EQ(form("y = softplus(x)", "x=1", "y", "x"), "sigmoid(x)");
  EXPECT_EQ(form("y = x*x", "x=1", "y", "x"), "2*x");
  EXPECT_EQ(form("L = (y - t)^2", "y=1,t=2", "L", "t"), "-2*(y - t)");
}

// ---------------------------------------------------------------- fan-out
TEST(ExplainFanOut, OneFactorPerNamedPairAndSumOverPaths) {
  // a feeds L directly and through b: ∂L/∂a = 1 + b is one factor; the total adds the path via b.
  const auto e = ex::explain("b = a*c; L = a + a*b", options("a=2,c=3", "a"));
  const ex::Gradient& g = e.gradients.at(0);
  ASSERT_EQ(g.paths.size(), 2u);
  EXPECT_EQ(g.paths[0].nodes, (std::vector<std::string>{"L", "a"}));
  EXPECT_EQ(g.paths[0].factors[0].formula, "1 + b");
  expect_close(g.paths[0].product, 1 + 6);
  EXPECT_EQ(g.paths[1].nodes, (std::vector<std::string>{"L", "b", "a"}));
  EXPECT_EQ(g.paths[1].factors[0].formula, "a");
  EXPECT_EQ(g.paths[1].factors[1].formula, "c");
  expect_close(g.paths[1].product, 2 * 3);
  expect_close(g.shown_sum, 13);
  expect_close(g.autograd, 13);  // d/da (a + a^2 c) = 1 + 2ac
  const std::string text = ex::to_text(e);
  EXPECT_NE(text.find("Sum over the 2 paths: 7 + 6 = 13"), std::string::npos) << text;
}

TEST(ExplainFanOut, DiamondPaths) {
  const auto e = ex::explain("u = sin(x); v = cos(x); w = u*v; L = w + u", options("x=0.7", "x"));
  const ex::Gradient& g = e.gradients.at(0);
  EXPECT_EQ(g.total_paths, 3);
  ASSERT_EQ(g.paths.size(), 3u);
  double sum = 0;
  for (const auto& p : g.paths) sum += p.product;
  expect_close(sum, g.autograd);
  expect_close(g.autograd, std::cos(0.7) * std::cos(0.7) - std::sin(0.7) * std::sin(0.7) + std::cos(0.7));
}

TEST(ExplainFanOut, NoPathMeansZero) {
  const auto e = ex::explain("a = x*2; L = y + 1", options("x=1,y=2", "x"));
  const ex::Gradient& g = e.gradients.at(0);
  EXPECT_EQ(g.total_paths, 0);
  EXPECT_TRUE(g.paths.empty());
  EXPECT_EQ(g.autograd, 0);
  EXPECT_EQ(g.finite_difference, 0);
  EXPECT_NE(ex::to_text(e).find("does not depend on x"), std::string::npos);
}

TEST(ExplainFanOut, IntermediateAndOutputVariables) {
  const auto e = ex::explain(kSeed, options(kSeedAt, "h,L"));
  const Seed s;
  expect_close(e.gradients[0].autograd, 2 * (s.y - s.t) * dsig(s.z2) * s.w2);
  expect_close(e.gradients[0].path_sum, e.gradients[0].autograd);
  EXPECT_NEAR(e.gradients[0].finite_difference, e.gradients[0].autograd, 1e-9);
  EXPECT_EQ(e.gradients[1].autograd, 1);
  EXPECT_EQ(e.gradients[1].paths.at(0).nodes, std::vector<std::string>{"L"});
}

TEST(ExplainFanOut, AliasesConstantsAndOf) {
  const auto e = ex::explain("c = 2*3; h = x; y = c*h; other = x - 1", [] {
    auto o = options("x=0.5", "x,c");
    o.of = "y";
    return o;
  }());
  EXPECT_EQ(e.output, "y");
  expect_close(e.gradients[0].autograd, 6);
  expect_close(e.gradients[0].path_sum, 6);
  expect_close(e.gradients[1].autograd, 0.5);
  EXPECT_EQ(value_of(e, "h").op, "clone");
  EXPECT_EQ(value_of(e, "c").op, "constant");
}

// ---------------------------------------------------------------- exponential path counts
std::string doubling_chain(int n) {
  std::ostringstream f;
  for (int k = 1; k <= n; ++k) f << "a" << k << " = a" << k - 1 << " + a" << k - 1 << "*c\n";
  return f.str();
}

TEST(ExplainFolded, ThirtyLevelsOfFanOutFoldAndSumExactly) {
  const auto start = std::chrono::steady_clock::now();
  // Expanded, each level doubles the paths: a_k -> a_{k-1} directly and through a_{k-1}*c.
  const auto e = ex::explain(doubling_chain(30), options("a0=1.01,c=0.02", "a0", /*expand=*/true));
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 5.0);
  const ex::Gradient& g = e.gradients.at(0);
  EXPECT_EQ(g.total_paths, std::pow(2.0, 30));
  EXPECT_EQ(g.paths.size(), 64u);
  EXPECT_EQ(g.folded_paths, (1ull << 30) - 64);
  expect_close(g.path_sum, g.autograd);
  expect_close(g.autograd, std::pow(1.02, 30));
  // Listed by magnitude: the all-direct path (product 1) first.
  expect_close(g.paths[0].product, 1.0);
  for (std::size_t i = 1; i < g.paths.size(); ++i)
    EXPECT_GE(std::abs(g.paths[i - 1].product), std::abs(g.paths[i].product));
  const auto j = nlohmann::json::parse(ex::to_json(e));
  EXPECT_EQ(j["gradients"]["a0"]["folded_paths"].get<std::uint64_t>(), (1ull << 30) - 64);
  EXPECT_NE(ex::to_text(e).find("1073741760 are folded"), std::string::npos);
}

TEST(ExplainFolded, NamedValuesCanFanOutExponentiallyToo) {
  // Two chains that feed each other: 2^40 paths between named values.
  std::ostringstream f;
  for (int k = 1; k <= 40; ++k)
    f << "a" << k << " = 0.5*a" << k - 1 << " + 0.5*tanh(b" << k - 1 << "); b" << k << " = 0.5*b" << k - 1
      << " + 0.5*sin(a" << k - 1 << ")\n";
  f << "L = a40 + b40";
  const auto e = ex::explain(f.str(), options("a0=0.3,b0=-0.2", "a0"));
  const ex::Gradient& g = e.gradients.at(0);
  EXPECT_EQ(g.total_paths, std::pow(2.0, 40));
  expect_close(g.path_sum, g.autograd, 0, 1e-11);
  EXPECT_NEAR(g.finite_difference, g.autograd, 1e-8);
}

TEST(ExplainFolded, TopPathsAreTheLargest) {
  // Small enough to enumerate: the 5 listed must be the 5 largest of all 2^8.
  std::ostringstream f;
  for (int k = 1; k <= 8; ++k)
    f << "a" << k << " = sin(a" << k - 1 << ")*b" << k - 1 << " + 0.3*a" << k - 1 << "; b" << k << " = cos(b" << k - 1
      << ") + a" << k - 1 << "*0.7\n";
  f << "L = a8*b8";
  auto all_opts = options("a0=0.4,b0=1.3", "a0");
  all_opts.max_paths = 100000;
  const auto all = ex::explain(f.str(), all_opts);
  auto top_opts = all_opts;
  top_opts.max_paths = 5;
  const auto top = ex::explain(f.str(), top_opts);
  const auto& ga = all.gradients[0];
  const auto& gt = top.gradients[0];
  ASSERT_EQ(ga.folded_paths, 0u);
  ASSERT_EQ(static_cast<double>(ga.paths.size()), ga.total_paths);
  std::vector<double> mags;
  double sum = 0;
  for (const auto& p : ga.paths) {
    mags.push_back(std::abs(p.product));
    sum += p.product;
  }
  expect_close(sum, ga.autograd, 0, 1e-11);
  std::sort(mags.rbegin(), mags.rend());
  ASSERT_EQ(gt.paths.size(), 5u);
  EXPECT_EQ(static_cast<double>(gt.folded_paths), ga.total_paths - 5);
  for (std::size_t i = 0; i < 5; ++i) expect_close(std::abs(gt.paths[i].product), mags[i]);
  expect_close(gt.path_sum, ga.autograd, 0, 1e-11);
}

// ---------------------------------------------------------------- random formulas
class FormulaGen {
 public:
  explicit FormulaGen(std::uint64_t seed) : rng_(seed) {}

  std::string formula(int& n_inputs) {
    n_inputs = pick(2, 4);
    std::vector<std::string> names;
    for (int i = 0; i < n_inputs; ++i) names.push_back("x" + std::to_string(i));
    std::ostringstream f;
    const int statements = pick(2, 5);
    for (int s = 0; s < statements; ++s) {
      const std::string name = "s" + std::to_string(s);
      f << name << " = " << expr(names, pick(1, 3)) << (s + 1 < statements ? (coin() ? "; " : "\n") : "");
      names.push_back(name);
    }
    return f.str();
  }
  double value() { return std::uniform_real_distribution<double>(-1.5, 1.5)(rng_); }

 private:
  int pick(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }
  bool coin() { return pick(0, 1) == 1; }
  std::string expr(const std::vector<std::string>& names, int depth) {
    if (depth == 0 || pick(0, 9) < 2) {
      if (pick(0, 9) < 2) return std::to_string(pick(1, 9)) + ".5";
      // Prefer recent names so statements chain (and fan out).
      const int n = static_cast<int>(names.size());
      return names[pick(0, 9) < 6 ? pick(std::max(0, n - 3), n - 1) : pick(0, n - 1)];
    }
    const std::string a = expr(names, depth - 1);
    const std::string b = expr(names, depth - 1);
    switch (pick(0, 22)) {
      case 0: return a + " + " + b;
      case 1: return a + " - " + b;
      case 2: return "(" + a + ")*(" + b + ")";
      case 3: return "(" + a + ")/((" + b + ")^2 + 0.5)";
      case 4: return "-(" + a + ")";
      case 5: return "(" + a + ")^2";
      case 6: return "((" + a + ")^2 + 0.3)^0.5";
      case 7: return "sigmoid(" + a + ")";
      case 8: return "tanh(" + a + ")";
      case 9: return "relu(" + a + ")";
      case 10: return "softplus(" + a + ")";
      case 11: return "exp(tanh(" + a + "))";
      case 12: return "log((" + a + ")*(" + a + ") + 0.5)";
      case 13: return "sqrt((" + b + ")^2 + 0.2)";
      case 14: return "abs(" + a + ")";
      case 15: return "sin(" + a + ")";
      case 16: return "cos(" + a + ")";
      case 17: return "max(" + a + ", " + b + ")";
      case 18: return "min(" + a + ", " + b + ")";
      case 19: return "(" + a + ")^3";
      case 20: return "2^tanh(" + a + ")";
      case 21: return "(sigmoid(" + a + ") + 0.5)^tanh(" + b + ")";
      default: return "(" + a + ")*(" + a + ") + " + b;
    }
  }
  std::mt19937_64 rng_;
};

TEST(ExplainRandom, PathSumsEqualAutogradEqualFiniteDifferences) {
  FormulaGen gen(20240601);
  int checked = 0, fd_compared = 0;
  for (int trial = 0; trial < 300; ++trial) {
    int n_inputs = 0;
    const std::string f = gen.formula(n_inputs);
    std::ostringstream at;  // values for the inputs the formula uses (an unused one is an error)
    for (int i = 0; i < n_inputs; ++i) {
      const double v = gen.value();
      if (f.find("x" + std::to_string(i)) != std::string::npos) at << (at.tellp() > 0 ? "," : "") << "x" << i << "=" << v;
    }
    for (bool expand : {false, true}) {
      ex::Options o = options(at.str(), "", expand);
      ex::Explanation e;
      try {
        e = ex::explain(f, o);
      } catch (const cg::ValueError& err) {
        ADD_FAILURE() << f << " at " << at.str() << ": " << err.what();
        continue;
      }
      const ex::CheckReport check = ex::check_local_derivatives(f, o);
      bool kink = false;
      for (const auto& c : check.ops) kink = kink || c.at_kink;
      EXPECT_TRUE(check.ok()) << f << " at " << at.str() << "\n" << ex::to_text(check);
      for (const auto& g : e.gradients) {
        double scale = 0;  // the sum of |products| bounds the rounding of the sum
        for (const auto& p : g.paths) scale += std::abs(p.product);
        SCOPED_TRACE(f + " at " + at.str() + " wrt " + g.wrt + (expand ? " (expanded)" : ""));
        expect_close(g.path_sum, g.autograd, scale);
        if (g.folded_paths == 0) expect_close(g.shown_sum, g.autograd, scale);
        for (const auto& p : g.paths) {
          double product = 1;
          for (const auto& fac : p.factors) product *= fac.value;
          expect_close(product, p.product);
        }
        if (!kink) {
          EXPECT_NEAR(g.finite_difference, g.autograd, 1e-6 * std::max(1.0, std::abs(g.autograd)));
          ++fd_compared;
        }
        ++checked;
      }
    }
  }
  EXPECT_GT(checked, 1000);
  EXPECT_GT(fd_compared, checked * 9 / 10);
}

// ---------------------------------------------------------------- the backward trace
TEST(ExplainTrace, FollowsTheEngine) {
  const ex::BackwardTrace t = ex::trace_backward(kSeed, options(kSeedAt));
  ASSERT_FALSE(t.steps.empty());
  EXPECT_EQ(t.steps[0].node, "L");
  EXPECT_EQ(t.steps[0].op, "pow");
  EXPECT_EQ(t.steps[0].upstream, 1);
  const auto e = ex::explain(kSeed, options(kSeedAt));
  int leaves = 0;
  for (const auto& st : t.steps) {
    for (const auto& s : st.sends) expect_close(s.sent, st.upstream * s.local);
    if (st.leaf) {
      ++leaves;
      bool found = false;
      for (const auto& g : e.gradients)
        if (g.wrt == st.node) {
          expect_close(st.upstream, g.autograd);
          found = true;
        }
      EXPECT_TRUE(found) << st.node;
    }
  }
  EXPECT_EQ(leaves, 6);
  const std::string text = ex::to_text(t);
  EXPECT_NE(text.find("→ z2: local ∂y/∂z2 = σ'(z2) = 0.249961"), std::string::npos) << text;
  EXPECT_NE(text.find("arrives and is stored in w1.grad"), std::string::npos) << text;
}

TEST(ExplainTrace, ShowsFanOutSums) {
  const ex::BackwardTrace t = ex::trace_backward("y = x*x", options("x=3"));
  ASSERT_EQ(t.steps.size(), 2u);
  ASSERT_EQ(t.steps[0].sends.size(), 2u);
  EXPECT_FALSE(t.steps[0].sends[0].accumulated);
  EXPECT_TRUE(t.steps[0].sends[1].accumulated);
  EXPECT_EQ(t.steps[0].sends[1].before, 3);
  EXPECT_EQ(t.steps[0].sends[1].after, 6);
  EXPECT_EQ(t.steps[1].upstream, 6);
  EXPECT_NE(ex::to_text(t).find("fan-out: x already holds 3"), std::string::npos);
  EXPECT_NO_THROW(nlohmann::json::parse(ex::to_json(t)));
}

// ---------------------------------------------------------------- --check
TEST(ExplainCheck, SeedAgrees) {
  const ex::CheckReport r = ex::check_local_derivatives(kSeed, options(kSeedAt));
  EXPECT_TRUE(r.ok()) << ex::to_text(r);
  EXPECT_EQ(r.statements.size(), 10u);
  EXPECT_EQ(r.ops.size(), 13u);
  EXPECT_NE(ex::to_text(r).find("All 23 local derivatives agree"), std::string::npos);
}

TEST(ExplainCheck, KinksAreNotHeldToFiniteDifferences) {
  const ex::CheckReport r = ex::check_local_derivatives("y = relu(x) + max(x, z)", options("x=0,z=0"));
  EXPECT_TRUE(r.ok()) << ex::to_text(r);
  int kinks = 0;
  for (const auto& c : r.ops) kinks += c.at_kink;
  EXPECT_EQ(kinks, 3);
}

// An op whose backward rule is wrong on purpose: forward x^2, backward 3x.
cg::Tensor bad_square(const cg::Tensor& x) {
  cg::Tensor out;
  {
    cg::NoGradGuard no_grad;
    out = cg::mul(x, x);
  }
  if (cg::detail::any_requires_grad({x}))
    cg::detail::record("bad_square", {x}, out, [sx = cg::SavedTensor(x, false)](const cg::Tensor& g, const cg::Node& self) {
      return cg::GradList{cg::mul(g, sx.unpack(self) * 3.0)};
    });
  return out;
}

TEST(ExplainCheck, NamesTheOpWhoseRuleDisagrees) {
  const auto bad = ex::check_function("bad_square", [](const auto& a) { return bad_square(a[0]); }, {0.7});
  ASSERT_EQ(bad.size(), 1u);
  EXPECT_FALSE(bad[0].ok);
  EXPECT_EQ(bad[0].op, "bad_square");
  EXPECT_NEAR(bad[0].engine, 2.1, 1e-12);
  EXPECT_NEAR(bad[0].finite_difference, 1.4, 1e-8);
  const auto good = ex::check_function("mul", [](const auto& a) { return cg::mul(a[0], a[1]); }, {0.7, -2.0});
  ASSERT_EQ(good.size(), 2u);
  EXPECT_TRUE(good[0].ok && good[1].ok);
}

// ---------------------------------------------------------------- graph
TEST(ExplainGraph, DotHasNodesValuesGradientsAndHighlights) {
  const std::string dot = ex::to_dot(kSeed, options(kSeedAt, "w1"));
  EXPECT_EQ(dot.find("digraph chaingrad {"), dot.find("digraph"));
  EXPECT_NE(dot.find("<b>w1*x</b>"), std::string::npos);
  EXPECT_NE(dot.find("<b>z1</b> = w1*x + b1"), std::string::npos);
  EXPECT_NE(dot.find("value 0.25"), std::string::npos);
  EXPECT_NE(dot.find("∂L/∂w1 = 0.0124578"), std::string::npos) << dot;
  EXPECT_NE(dot.find("#d62728"), std::string::npos);
  EXPECT_NE(dot.find("peripheries=2"), std::string::npos);
  const std::string plain = ex::to_dot(kSeed, options(kSeedAt));
  EXPECT_EQ(plain.find("#d62728"), std::string::npos);
}

TEST(ExplainGraph, WritesFilesAtomically) {
  const auto dir = std::filesystem::temp_directory_path() / ("cg_explain_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string dot_path = (dir / "g.dot").string();
  ex::write_graph(kSeed, options(kSeedAt, "w1"), dot_path);
  std::ifstream in(dot_path);
  std::stringstream ss;
  ss << in.rdbuf();
  EXPECT_EQ(ss.str(), ex::to_dot(kSeed, options(kSeedAt, "w1")));
  EXPECT_NE(error_of([&] { ex::write_graph(kSeed, options(kSeedAt), (dir / "g.pdf").string()); })
                .find("use .dot, .svg or .png"),
            std::string::npos);
  if (std::system("command -v dot > /dev/null 2>&1") == 0) {
    const std::string svg_path = (dir / "g.svg").string();
    ex::write_graph(kSeed, options(kSeedAt, "w1"), svg_path);
    std::ifstream svg(svg_path);
    std::stringstream s2;
    s2 << svg.rdbuf();
    EXPECT_NE(s2.str().find("<svg"), std::string::npos);
  }
  // Without Graphviz on PATH the error says what to do, and no file appears.
  const std::string old_path = std::getenv("PATH") ? std::getenv("PATH") : "";
  ::setenv("PATH", "/nonexistent", 1);
  const std::string err = error_of([&] { ex::write_graph(kSeed, options(kSeedAt), (dir / "h.svg").string()); });
  ::setenv("PATH", old_path.c_str(), 1);
  EXPECT_NE(err.find("needs Graphviz's 'dot' program"), std::string::npos) << err;
  EXPECT_FALSE(std::filesystem::exists(dir / "h.svg"));
  for (const auto& entry : std::filesystem::directory_iterator(dir))
    EXPECT_EQ(entry.path().string().find(".tmp."), std::string::npos) << entry.path();
  std::filesystem::remove_all(dir);
}

// ---------------------------------------------------------------- bad input
TEST(ExplainErrors, SyntaxErrorsPointAtTheCharacter) {
  try {
    ex::explain("z = w1 * * x", options("w1=1,x=1"));
    FAIL();
  } catch (const ex::FormulaError& e) {
    EXPECT_EQ(e.line(), 1);
    EXPECT_EQ(e.column(), 10);
    EXPECT_EQ(std::string(e.what()),
              "syntax error at line 1, column 10: expected an expression after '*'; got '*'\n"
              "  z = w1 * * x\n"
              "           ^");
  }
  try {
    ex::explain("a = x\nb = a +* 2", options("x=1"));
    FAIL();
  } catch (const ex::FormulaError& e) {
    EXPECT_EQ(e.line(), 2);
    EXPECT_EQ(e.column(), 8);
    EXPECT_NE(std::string(e.what()).find("\n  b = a +* 2\n         ^"), std::string::npos) << e.what();
  }
  // Columns count characters: a UTF-8 comment before the error does not shift the caret.
  try {
    ex::explain("y = x # σ\nq = )", options("x=1"));
    FAIL();
  } catch (const ex::FormulaError& e) {
    EXPECT_EQ(e.line(), 2);
    EXPECT_EQ(e.column(), 5);
  }
  EXPECT_NE(error_of([] { ex::explain("y = x $ 2", options("x=1")); }).find("unexpected character '$'"),
            std::string::npos);
  EXPECT_NE(error_of([] { ex::explain("y = 2x", options("x=1")); }).find("write 2*x for a product"), std::string::npos);
  EXPECT_NE(error_of([] { ex::explain("y = (x + 1", options("x=1")); }).find("expected ')' to close the '('"),
            std::string::npos);
  EXPECT_NE(error_of([] { ex::explain("y = max(x)", options("x=1")); }).find("max takes 2 arguments; got 1"),
            std::string::npos);
  EXPECT_NE(error_of([] { ex::explain("", options("x=1")); }).find("no statements"), std::string::npos);
  // Bounded nesting and depth: no formula can exhaust the stack.
  const std::string deep = "y = " + std::string(100000, '(') + "x" + std::string(100000, ')');
  EXPECT_NE(error_of([&] { ex::explain(deep, options("x=1")); }).find("nested more than 200 levels"),
            std::string::npos);
  std::string flat = "y = x";
  for (int i = 0; i < 5000; ++i) flat += " + x";
  EXPECT_NE(error_of([&] { ex::explain(flat, options("x=1")); }).find("split it into named steps"),
            std::string::npos);
  auto many = options("x=1");
  many.max_paths = 10000000;
  EXPECT_NE(error_of([&] { ex::explain("y = x", many); }).find("--max-paths: at most"), std::string::npos);
}

TEST(ExplainErrors, OneLineErrors) {
  auto one_line = [](const std::string& msg) { return msg.find('\n') == std::string::npos; };
  const std::string unknown = error_of([] { ex::explain("y = sigmod(x)", options("x=1")); });
  EXPECT_EQ(unknown.rfind("unknown function 'sigmod' at line 1, column 5; did you mean 'sigmoid'?", 0), 0u) << unknown;
  EXPECT_TRUE(one_line(unknown));
  const std::string missing = error_of([] { ex::explain("y = w*x", options("x=1")); });
  EXPECT_EQ(missing, "no value for the input 'w': give it with --at w=<number> (inputs: w, x)");
  const std::string nan = error_of([] { ex::parse_values("x=abc"); });
  EXPECT_EQ(nan, "--at: the value of 'x' is not a number: 'abc'");
  EXPECT_EQ(error_of([] { ex::parse_values("x"); }), "--at: expected name=value; got 'x'");
  EXPECT_EQ(error_of([] { ex::parse_values("x=1,x=2"); }), "--at: 'x' is given twice");
  EXPECT_NE(error_of([] { ex::explain("y = x", options("x=1,q=2")); }).find("'q' does not appear"), std::string::npos);
  EXPECT_NE(error_of([] { ex::explain("y = x", options("x=1", "q")); }).find("--wrt: 'q' is not a value"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              auto o = options("x=1");
              o.of = "nope";
              ex::explain("y = x", o);
            }).find("--of: 'nope' is not in the formula"),
            std::string::npos);
  EXPECT_NE(error_of([] { ex::explain("y = x; y = 2*x", options("x=1")); }).find("'y' is assigned twice"),
            std::string::npos);
  EXPECT_NE(error_of([] { ex::explain("y = b*2; b = x", options("x=1")); }).find("'b' is used at line 1, column 5 before"),
            std::string::npos);
  EXPECT_NE(error_of([] { ex::explain("y = x", options("x=1,y=2")); }).find("computed by the formula"),
            std::string::npos);
}

TEST(ExplainErrors, NonFiniteValuesNameTheNode) {
  const std::string log_err = error_of([] { ex::explain("a = x + 1; y = log(x - 3)*a", options("x=0.5")); });
  EXPECT_EQ(log_err,
            "non-finite value: log(x - 3) = nan in the statement 'y = log(x - 3)*a' (line 1): log needs a positive "
            "argument; its operands: x - 3 = -2.5");
  const std::string div_err = error_of([] { ex::explain("a = 1\ny = 2/(x - 0.5)", options("x=0.5")); });
  EXPECT_NE(div_err.find("2/(x - 0.5) = inf in the statement 'y = 2/(x - 0.5)' (line 2): division by zero"),
            std::string::npos)
      << div_err;
  EXPECT_NE(error_of([] { ex::explain("y = exp(x)", options("x=1000")); }).find("exp overflows"), std::string::npos);
}

// ---------------------------------------------------------------- networks
struct Mlp {
  std::vector<cg::Tensor> w, b;
  std::vector<std::string> act;
  cg::Tensor input;
};

Mlp make_mlp(const std::vector<std::int64_t>& sizes, const std::vector<std::string>& act, std::uint64_t seed,
             cg::DType dtype = cg::DType::Float64) {
  cg::Generator gen(seed);
  Mlp m;
  for (std::size_t l = 0; l + 1 < sizes.size(); ++l) {
    m.w.push_back(cg::randn({sizes[l + 1], sizes[l]}, {.dtype = dtype}, &gen) * (1.0 / std::sqrt(sizes[l])));
    m.b.push_back(cg::randn({sizes[l + 1]}, {.dtype = dtype}, &gen) * 0.1);
  }
  m.act = act;
  m.input = cg::randn({sizes[0]}, {.dtype = dtype}, &gen);
  return m;
}

TEST(ExplainNetwork, PathSumEqualsAutogradForEveryWeightOfASmallNet) {
  const Mlp m = make_mlp({4, 5, 3, 3}, {"relu", "sigmoid", "none"}, 7);
  const cg::Tensor target = cg::from_vector(std::vector<std::int64_t>{2}, {1});
  // Reference gradients for every weight at once.
  std::vector<cg::Tensor> w, b;
  for (const auto& t : m.w) w.push_back(t.detach().clone().requires_grad_(true));
  for (const auto& t : m.b) b.push_back(t.detach().clone().requires_grad_(true));
  cg::Tensor a = m.input.reshape({1, 4});
  a = cg::sigmoid(cg::linear(cg::relu(cg::linear(a, w[0], b[0])), w[1], b[1]));
  const cg::Tensor logits = cg::linear(a, w[2], b[2]);
  cg::cross_entropy(logits, target).backward();
  for (std::size_t layer = 0; layer < 3; ++layer) {
    for (std::int64_t r = 0; r < m.w[layer].size(0); ++r) {
      for (std::int64_t c = -1; c < m.w[layer].size(1); ++c) {
        const ex::NetworkTrace t = ex::trace_mlp(m.w, m.b, m.act, m.input, target, "cross_entropy", layer, r, c, 4);
        const double ref = c < 0 ? b[layer].grad().at({r}) : w[layer].grad().at({r, c});
        SCOPED_TRACE(t.parameter);
        expect_close(t.autograd, ref);
        double scale = 0;
        for (const auto& p : t.paths) scale += std::abs(p.product);
        expect_close(t.path_sum, t.autograd, scale);
      }
    }
  }
}

TEST(ExplainNetwork, TopPathsAreTheLargestAndFactorsMultiply) {
  const Mlp m = make_mlp({6, 5, 4, 3}, {"tanh", "relu", "none"}, 11);
  const cg::Tensor target = cg::from_vector(std::vector<double>{0.1, -0.3, 0.7}, {3});
  const auto all = ex::trace_mlp(m.w, m.b, m.act, m.input, target, "mse", 0, 2, 3, 1000);
  EXPECT_EQ(all.total_paths, 12);  // 4 × 3
  EXPECT_EQ(all.widths, (std::vector<std::size_t>{4, 3}));
  ASSERT_EQ(all.paths.size(), 12u);
  EXPECT_EQ(all.folded_paths, 0u);
  expect_close(all.shown_sum, all.autograd, 0, 1e-11);
  for (const auto& p : all.paths) {
    double product = 1;
    for (const auto& f : p.factors) product *= f.value;
    expect_close(product, p.product);
    EXPECT_EQ(p.nodes.front(), "L");
    EXPECT_EQ(p.nodes.back(), "W0[2,3]");
    EXPECT_EQ(p.factors.back().formula, "x[3]");
    EXPECT_EQ(p.nodes.size(), p.factors.size() + 1);
  }
  const auto top = ex::trace_mlp(m.w, m.b, m.act, m.input, target, "mse", 0, 2, 3, 3);
  ASSERT_EQ(top.paths.size(), 3u);
  EXPECT_EQ(top.folded_paths, 9u);
  for (std::size_t i = 0; i < 3; ++i) expect_close(std::abs(top.paths[i].product), std::abs(all.paths[i].product));
  const std::string text = ex::to_text(top);
  EXPECT_NE(text.find("4 × 3 = 12 paths"), std::string::npos) << text;
  EXPECT_NO_THROW(nlohmann::json::parse(ex::to_json(top)));
}

TEST(ExplainNetwork, Float32NetworkAndWideLayerFold) {
  const Mlp m = make_mlp({32, 64, 48, 10}, {"relu", "relu", "none"}, 3, cg::DType::Float32);
  const cg::Tensor target = cg::from_vector(std::vector<std::int64_t>{4}, {1});
  const auto t = ex::trace_mlp(m.w, m.b, m.act, m.input, target, "cross_entropy", 0, 5, 17, 10);
  EXPECT_EQ(t.total_paths, 480);
  EXPECT_EQ(t.paths.size(), 10u);
  EXPECT_EQ(t.folded_paths, 470u);
  double scale = 0;
  for (const auto& p : t.paths) scale += std::abs(p.product);
  expect_close(t.path_sum, t.autograd, scale, 1e-11);
  EXPECT_EQ(t.parameter, "W0[5,17]");
}

TEST(ExplainNetwork, BadInput) {
  const Mlp m = make_mlp({4, 3}, {"relu"}, 1);
  const cg::Tensor target = cg::from_vector(std::vector<std::int64_t>{1}, {1});
  EXPECT_NE(error_of([&] { ex::trace_mlp(m.w, m.b, {"swish"}, m.input, target, "cross_entropy", 0, 0, 0); })
                .find("activation 0 is 'swish'"),
            std::string::npos);
  EXPECT_NE(error_of([&] { ex::trace_mlp(m.w, m.b, m.act, m.input, target, "cross_entropy", 1, 0, 0); })
                .find("layer 1 does not exist"),
            std::string::npos);
  EXPECT_NE(error_of([&] { ex::trace_mlp(m.w, m.b, m.act, m.input, target, "cross_entropy", 0, 3, 0); })
                .find("row 3 is outside"),
            std::string::npos);
  const cg::Tensor bad_target = cg::from_vector(std::vector<std::int64_t>{7}, {1});
  EXPECT_NE(error_of([&] { ex::trace_mlp(m.w, m.b, m.act, m.input, bad_target, "cross_entropy", 0, 0, 0); })
                .find("not a class index"),
            std::string::npos);
}

// ---------------------------------------------------------------- the CLI, when it is built
const std::string kCliExe = std::string(CHAINGRAD_BINARY_DIR) + "/chaingrad";

// Runs the CLI with `args`; returns its exit status and leaves stdout (and stderr when asked) in `out`.
int run_cli(const std::string& args, std::string& out, bool with_stderr = true) {
  const std::string cmd = kCliExe + " " + args + (with_stderr ? " 2>&1" : " 2>/dev/null");
  FILE* p = ::popen(cmd.c_str(), "r");
  out.clear();
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int status = ::pclose(p);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST(ExplainCli, ExplainAndGraphCommands) {
  if (!std::filesystem::exists(kCliExe)) GTEST_SKIP() << "the chaingrad CLI is not built";
  auto run = [](const std::string& args, std::string& out) { return run_cli(args, out); };
  std::string out;
  EXPECT_EQ(run(std::string("explain '") + kSeed + "' --at " + kSeedAt + " --wrt w1", out), 0) << out;
  EXPECT_NE(out.find("∂z1/∂w1 = x"), std::string::npos) << out;
  EXPECT_EQ(run(std::string("explain '") + kSeed + "' --at " + kSeedAt + " --wrt w1 --json", out), 0) << out;
  EXPECT_NO_THROW(nlohmann::json::parse(out)) << out;
  EXPECT_EQ(run("explain 'y = x * * 2' --at x=1", out), 1);
  EXPECT_NE(out.find("error: syntax error at line 1, column 9"), std::string::npos) << out;
  EXPECT_EQ(run("explain 'y = w*x' --at x=1", out), 1);
  EXPECT_NE(out.find("error: no value for the input 'w'"), std::string::npos) << out;
  EXPECT_EQ(run(std::string("explain '") + kSeed + "' --at " + kSeedAt + " --check", out), 0) << out;
  EXPECT_EQ(run(std::string("explain '") + kSeed + "' --at " + kSeedAt + " --trace", out), 0) << out;
  EXPECT_EQ(run(std::string("graph '") + kSeed + "' --at " + kSeedAt, out), 0) << out;
  EXPECT_NE(out.find("digraph chaingrad"), std::string::npos);
}

// explain --model: one weight of an MLP that `train` wrote, on one test image; the sum over all
// paths must equal autograd's gradient for that element.
TEST(ExplainCli, OneWeightOfATrainedNetwork) {
  if (!std::filesystem::exists(kCliExe)) GTEST_SKIP() << "the chaingrad CLI is not built";
  if (!std::filesystem::exists("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"))
    GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  const auto dir = std::filesystem::temp_directory_path() / ("cg-explain-model-" + std::to_string(::getpid()));
  auto run = [](const std::string& args, std::string& out) { return run_cli(args, out, /*with_stderr=*/false); };
  std::string out;
  ASSERT_EQ(run("train --model 'linear(16) sigmoid linear(12) tanh linear(10)' --epochs 1 --batch-size 256 --json --out " +
                    dir.string(),
                out),
            0)
      << out;
  for (const std::string param : {"0.weight[3,400]", "2.weight[5,7]", "4.bias[2]"}) {
    ASSERT_EQ(run("explain --model " + (dir / "last.safetensors").string() + " --param '" + param +
                      "' --input 3 --top 4 --json",
                  out),
              0)
        << out;
    const auto j = nlohmann::json::parse(out);
    const double autograd = j["autograd"], paths = j["sum_over_paths"];
    EXPECT_NEAR(paths, autograd, 1e-12 + 1e-9 * std::abs(autograd)) << param;
    EXPECT_NE(autograd, 0.0) << param;
  }
  EXPECT_EQ(run("explain --model " + (dir / "last.safetensors").string() + " --param '9.weight[0,0]'", out), 1);
  std::filesystem::remove_all(dir);
}

}  // namespace
