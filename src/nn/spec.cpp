// The model spec: "conv2d(32,3,pad=1) relu maxpool2d(2) flatten linear(10)" parsed into
// LayerSpecs, printed back canonically, and built into a Sequential by tracking the per-sample
// shape through the layers.
#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <limits>
#include <sstream>

#include "chaingrad/nn.hpp"

namespace chaingrad::nn {

namespace {

constexpr const char* kExpected =
    "linear(N), conv2d(C,K[,stride=S][,pad=P][,dilation=D]), maxpool2d(K), avgpool2d(K), flatten, dropout(P), "
    "batchnorm, layernorm, relu, sigmoid, tanh, gelu, leaky_relu[(SLOPE)], softmax";

enum class ArgKind { PositiveInt, NonNegativeInt, Probability, Real, PositiveReal, Unit, Bool };

struct ArgDef {
  const char* name;
  ArgKind kind;
  double fallback;  // NaN: required
  bool positional;
  const char* what;  // for messages: "the number of output features"
};

struct LayerDef {
  const char* kind;
  const char* usage;
  std::vector<ArgDef> args;
};

constexpr double kRequired = std::numeric_limits<double>::quiet_NaN();

const std::vector<LayerDef>& layer_defs() {
  static const std::vector<LayerDef> defs = {
      {"linear",
       "linear(N[,bias=false])",
       {{"out", ArgKind::PositiveInt, kRequired, true, "the number of output features"},
        {"bias", ArgKind::Bool, 1.0, false, "bias"}}},
      {"conv2d",
       "conv2d(C,K[,stride=S][,pad=P][,dilation=D][,bias=false])",
       {{"out", ArgKind::PositiveInt, kRequired, true, "the number of output channels"},
        {"kernel", ArgKind::PositiveInt, kRequired, true, "the kernel size"},
        {"stride", ArgKind::PositiveInt, 1.0, true, "the stride"},
        {"pad", ArgKind::NonNegativeInt, 0.0, true, "the padding"},
        {"dilation", ArgKind::PositiveInt, 1.0, true, "the dilation"},
        {"bias", ArgKind::Bool, 1.0, false, "bias"}}},
      {"maxpool2d",
       "maxpool2d(K[,stride=S])",
       {{"kernel", ArgKind::PositiveInt, kRequired, true, "the kernel size"},
        {"stride", ArgKind::NonNegativeInt, 0.0, true, "the stride"}}},
      {"avgpool2d",
       "avgpool2d(K[,stride=S])",
       {{"kernel", ArgKind::PositiveInt, kRequired, true, "the kernel size"},
        {"stride", ArgKind::NonNegativeInt, 0.0, true, "the stride"}}},
      {"flatten", "flatten", {}},
      {"dropout", "dropout(P)", {{"p", ArgKind::Probability, 0.5, true, "the drop probability"}}},
      {"batchnorm",
       "batchnorm[(eps=E,momentum=M)]",
       {{"eps", ArgKind::PositiveReal, 1e-5, false, "eps"}, {"momentum", ArgKind::Unit, 0.1, false, "momentum"}}},
      {"layernorm", "layernorm[(eps=E)]", {{"eps", ArgKind::PositiveReal, 1e-5, false, "eps"}}},
      {"relu", "relu", {}},
      {"sigmoid", "sigmoid", {}},
      {"tanh", "tanh", {}},
      {"gelu", "gelu", {}},
      {"leaky_relu", "leaky_relu[(SLOPE)]", {{"slope", ArgKind::Real, 0.01, true, "the negative slope"}}},
      {"softmax", "softmax", {}},
  };
  return defs;
}

const LayerDef* find_def(const std::string& kind) {
  for (const LayerDef& d : layer_defs())
    if (kind == d.kind) return &d;
  return nullptr;
}

std::size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diag = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

std::string format_number(double v) {
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, res.ptr);
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  const auto e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

struct Token {
  std::string text;
  int position;  // 1-based
};

// Whitespace separates layers except inside parentheses, so "conv2d(32, 3)" is one token.
std::vector<Token> tokenize(const std::string& spec) {
  std::vector<Token> tokens;
  std::string cur;
  int depth = 0;
  auto flush = [&] {
    if (!cur.empty()) tokens.push_back({cur, static_cast<int>(tokens.size()) + 1});
    cur.clear();
  };
  for (char c : spec) {
    if (std::isspace(static_cast<unsigned char>(c)) && depth == 0) {
      flush();
      continue;
    }
    if (c == '(') ++depth;
    if (c == ')') {
      CG_CHECK(depth > 0, ValueError, "model spec: unbalanced ')' in token ", tokens.size() + 1, " ('", cur, c,
               "')");
      --depth;
    }
    cur += c;
  }
  CG_CHECK(depth == 0, ValueError, "model spec: missing ')' in token ", tokens.size() + 1, " ('", cur, "')");
  flush();
  return tokens;
}

[[noreturn]] void token_error(const Token& tok, const LayerDef& def, const std::string& what) {
  detail::throw_error<ValueError>("model spec: ", what, " in '", tok.text, "' at token ", tok.position, " (usage: ",
                                  def.usage, ")");
}

double parse_value(const Token& tok, const LayerDef& def, const ArgDef& arg, const std::string& text) {
  double v = 0;
  if (arg.kind == ArgKind::Bool) {
    std::string t = text;
    std::transform(t.begin(), t.end(), t.begin(), [](unsigned char c) { return std::tolower(c); });
    if (t == "true" || t == "1") return 1.0;
    if (t == "false" || t == "0") return 0.0;
    token_error(tok, def, std::string(arg.what) + " must be true or false; got '" + text + "'");
  }
  const char* first = text.data();
  const char* last = text.data() + text.size();
  if (first != last && *first == '+') ++first;
  auto res = std::from_chars(first, last, v);
  if (text.empty() || res.ec != std::errc() || res.ptr != last || !std::isfinite(v))
    token_error(tok, def, std::string(arg.what) + " must be a number; got '" + text + "'");
  const bool integral = v == std::floor(v) && std::abs(v) < 9e15;
  switch (arg.kind) {
    case ArgKind::PositiveInt:
      if (!integral || v <= 0)
        token_error(tok, def, std::string(arg.what) + " must be a positive integer; got " + text);
      break;
    case ArgKind::NonNegativeInt:
      if (!integral || v < 0)
        token_error(tok, def, std::string(arg.what) + " must be a non-negative integer; got " + text);
      break;
    case ArgKind::Probability:
      if (v < 0 || v >= 1) token_error(tok, def, std::string(arg.what) + " must be in [0, 1); got " + text);
      break;
    case ArgKind::PositiveReal:
      if (v <= 0) token_error(tok, def, std::string(arg.what) + " must be positive; got " + text);
      break;
    case ArgKind::Unit:
      if (v < 0 || v > 1) token_error(tok, def, std::string(arg.what) + " must be in [0, 1]; got " + text);
      break;
    case ArgKind::Real:
    case ArgKind::Bool: break;
  }
  return v;
}

LayerSpec parse_token(const Token& tok) {
  std::string name = tok.text, inner;
  bool has_parens = false;
  if (auto open = tok.text.find('('); open != std::string::npos) {
    name = tok.text.substr(0, open);
    has_parens = true;
    CG_CHECK(tok.text.back() == ')', ValueError, "model spec: text after ')' in '", tok.text, "' at token ",
             tok.position);
    inner = tok.text.substr(open + 1, tok.text.size() - open - 2);
  }
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::tolower(c); });
  if (name == "leakyrelu") name = "leaky_relu";
  if (name == "batchnorm1d" || name == "batchnorm2d") name = "batchnorm";
  const LayerDef* def = find_def(name);
  if (!def) {
    std::ostringstream os;
    os << "model spec: unknown layer '" << tok.text << "' at token " << tok.position << "; expected one of "
       << kExpected;
    std::string best;
    std::size_t best_d = 3;
    for (const LayerDef& d : layer_defs())
      if (auto dist = edit_distance(name, d.kind); dist < best_d) best_d = dist, best = d.kind;
    if (!best.empty()) os << " (did you mean '" << best << "'?)";
    throw ValueError(os.str());
  }

  LayerSpec layer{def->kind, {}};
  std::vector<bool> given(def->args.size(), false);
  std::vector<double> values(def->args.size());
  if (has_parens) {
    if (def->args.empty()) token_error(tok, *def, std::string("'") + def->kind + "' takes no arguments");
    std::vector<std::string> parts;
    std::stringstream ss(inner);
    for (std::string part; std::getline(ss, part, ',');) parts.push_back(trim(part));
    if (!inner.empty() && inner.back() == ',') parts.push_back("");
    std::size_t next_positional = 0;
    bool seen_keyword = false;
    for (const std::string& part : parts) {
      if (part.empty()) token_error(tok, *def, "an empty argument");
      std::size_t idx = def->args.size();
      std::string value = part;
      if (auto eq = part.find('='); eq != std::string::npos) {
        std::string key = trim(part.substr(0, eq));
        value = trim(part.substr(eq + 1));
        if (key == "padding") key = "pad";
        if (key == "k" || key == "kernel_size") key = "kernel";
        if (key == "negative_slope") key = "slope";
        for (std::size_t a = 0; a < def->args.size(); ++a)
          if (key == def->args[a].name) idx = a;
        if (idx == def->args.size()) {
          std::string names;
          for (const ArgDef& a : def->args) {
            if (!names.empty()) names += ", ";
            names += a.name;
          }
          token_error(tok, *def, "unknown argument '" + key + "' (expected one of " + names + ")");
        }
        seen_keyword = true;
      } else {
        if (seen_keyword) token_error(tok, *def, "a positional argument after a keyword argument");
        while (next_positional < def->args.size() && !def->args[next_positional].positional) ++next_positional;
        if (next_positional >= def->args.size()) token_error(tok, *def, "too many arguments");
        idx = next_positional++;
      }
      if (given[idx]) token_error(tok, *def, std::string(def->args[idx].name) + " given twice");
      given[idx] = true;
      values[idx] = parse_value(tok, *def, def->args[idx], value);
    }
  }
  for (std::size_t a = 0; a < def->args.size(); ++a) {
    if (!given[a]) {
      if (std::isnan(def->args[a].fallback)) token_error(tok, *def, std::string("missing ") + def->args[a].what);
      values[a] = def->args[a].fallback;
    }
    layer.args.emplace_back(def->args[a].name, values[a]);
  }
  // A pool's stride defaults to its kernel.
  if ((layer.kind == "maxpool2d" || layer.kind == "avgpool2d") && layer.args[1].second == 0)
    layer.args[1].second = layer.args[0].second;
  return layer;
}

}  // namespace

// ---------------------------------------------------------------- LayerSpec / ModelSpec
double LayerSpec::arg(const std::string& name, double fallback) const {
  for (const auto& [k, v] : args)
    if (k == name) return v;
  return fallback;
}

std::string LayerSpec::canonical() const {
  const LayerDef* def = find_def(kind);
  CG_ASSERT(def != nullptr);
  std::vector<std::string> parts;
  // Required arguments (and a lone leading one: dropout's p) print positionally, the rest by name.
  bool keyword = false;
  for (std::size_t index = 0; index < def->args.size(); ++index) {
    const ArgDef& a = def->args[index];
    double v = arg(a.name, a.fallback);
    double fallback = a.fallback;
    if ((kind == "maxpool2d" || kind == "avgpool2d") && std::string(a.name) == "stride") fallback = arg("kernel", 0);
    const bool required = std::isnan(a.fallback);
    // dropout always shows p: "dropout" alone reads as if it had no argument.
    const bool show = required || v != fallback || kind == "dropout";
    if (!show) {
      keyword = true;
      continue;
    }
    std::string text = a.kind == ArgKind::Bool ? (v != 0 ? "true" : "false") : format_number(v);
    if (keyword || !a.positional || !(required || index == 0)) {
      text.insert(0, "=");
      text.insert(0, a.name);
      keyword = true;
    }
    parts.push_back(text);
  }
  std::string out = kind;
  if (!parts.empty()) {
    out += "(";
    for (std::size_t i = 0; i < parts.size(); ++i) {
      if (i) out += ",";
      out += parts[i];
    }
    out += ")";
  }
  return out;
}

ModelSpec ModelSpec::parse(const std::string& spec) {
  const std::vector<Token> tokens = tokenize(spec);
  CG_CHECK(!tokens.empty(), ValueError,
           "model spec: no layers given; expected a list such as 'linear(256) relu linear(10)'");
  ModelSpec out;
  for (const Token& tok : tokens) out.layers.push_back(parse_token(tok));
  return out;
}

std::string ModelSpec::canonical() const {
  std::string out;
  for (const LayerSpec& l : layers) {
    if (!out.empty()) out += " ";
    out += l.canonical();
  }
  return out;
}

std::string canonical_spec(const std::string& spec) { return ModelSpec::parse(spec).canonical(); }

// ---------------------------------------------------------------- building
namespace {

bool is_elementwise(const std::string& kind) {
  return kind == "relu" || kind == "sigmoid" || kind == "tanh" || kind == "gelu" || kind == "leaky_relu" ||
         kind == "dropout";
}

// Walks the spec tracking the per-sample shape; adds the layers to `model` when it is non-null.
Dims walk(const ModelSpec& spec, const Dims& input_shape, Sequential* model, Generator* gen) {
  CG_CHECK(!input_shape.empty() && input_shape.numel() > 0, ValueError,
           "model spec: the per-sample input shape must be non-empty with positive extents; got ", input_shape);
  Dims s = input_shape;
  bool only_elementwise = true;
  std::string last_shape_change = "the input";
  auto where = [&](std::size_t i) {
    std::string s = "'";
    s += spec.layers[i].canonical();
    s += "' at token ";
    s += std::to_string(i + 1);
    return s;
  };
  auto i64 = [](double v) { return static_cast<std::int64_t>(v); };

  for (std::size_t i = 0; i < spec.layers.size(); ++i) {
    const LayerSpec& l = spec.layers[i];
    const std::string& k = l.kind;
    ModulePtr m;
    auto need_image = [&] {
      CG_CHECK(s.size() == 3, ValueError, "model spec: ", where(i), " needs a per-sample input of shape [C, H, W]; got ",
               s, " (from ", last_shape_change, ")");
    };
    if (k == "linear") {
      if (s.size() > 1) {
        CG_CHECK(only_elementwise, ValueError, "model spec: ", where(i),
                 " needs a flat per-sample input; got shape ", s, " (from ", last_shape_change,
                 "); insert 'flatten' before it");
        if (model) model->set_flatten_input(true);
        s = Dims{s.numel()};
      }
      const LinearOptions o{.in = s[0], .out = i64(l.arg("out", 0)), .bias = l.arg("bias", 1) != 0};
      if (model) m = std::make_shared<Linear>(o, gen);
      s = Dims{o.out};
    } else if (k == "conv2d") {
      need_image();
      const Conv2dOptions o{.in = s[0],
                            .out = i64(l.arg("out", 0)),
                            .kernel = i64(l.arg("kernel", 0)),
                            .stride = i64(l.arg("stride", 1)),
                            .padding = i64(l.arg("pad", 0)),
                            .dilation = i64(l.arg("dilation", 1)),
                            .bias = l.arg("bias", 1) != 0};
      auto out_size = [&](std::int64_t n) {
        return (n + 2 * o.padding - o.dilation * (o.kernel - 1) - 1) / o.stride + 1;
      };
      const std::int64_t ho = out_size(s[1]), wo = out_size(s[2]);
      CG_CHECK(ho > 0 && wo > 0, ValueError, "model spec: ", where(i), ": the input of shape ", s,
               " is too small for this kernel");
      if (model) m = std::make_shared<Conv2d>(o, gen);
      s = Dims{o.out, ho, wo};
    } else if (k == "maxpool2d" || k == "avgpool2d") {
      need_image();
      const Pool2dOptions o{.kernel = i64(l.arg("kernel", 2)), .stride = i64(l.arg("stride", 0))};
      const std::int64_t ho = (s[1] - o.kernel) / o.stride + 1, wo = (s[2] - o.kernel) / o.stride + 1;
      CG_CHECK(s[1] >= o.kernel && s[2] >= o.kernel, ValueError, "model spec: ", where(i), ": the input of shape ", s,
               " is smaller than the pooling window");
      if (model) {
        if (k == "maxpool2d")
          m = std::make_shared<MaxPool2d>(o);
        else
          m = std::make_shared<AvgPool2d>(o);
      }
      s = Dims{s[0], ho, wo};
    } else if (k == "flatten") {
      if (model) m = std::make_shared<Flatten>();
      s = Dims{s.numel()};
    } else if (k == "dropout") {
      if (model) m = std::make_shared<Dropout>(DropoutOptions{l.arg("p", 0.5)}, gen);
    } else if (k == "batchnorm") {
      const BatchNormOptions o{.num_features = s[0], .eps = l.arg("eps", 1e-5), .momentum = l.arg("momentum", 0.1)};
      CG_CHECK(s.size() <= 3, ValueError, "model spec: ", where(i), " needs a per-sample shape [F], [C, L] or [C, H, W]; got ",
               s);
      if (model) {
        if (s.size() == 3)
          m = std::make_shared<BatchNorm2d>(o);
        else
          m = std::make_shared<BatchNorm1d>(o);
      }
    } else if (k == "layernorm") {
      if (model) m = std::make_shared<LayerNorm>(LayerNormOptions{.normalized_shape = s, .eps = l.arg("eps", 1e-5)});
    } else if (k == "relu") {
      if (model) m = std::make_shared<ReLU>();
    } else if (k == "sigmoid") {
      if (model) m = std::make_shared<Sigmoid>();
    } else if (k == "tanh") {
      if (model) m = std::make_shared<Tanh>();
    } else if (k == "gelu") {
      if (model) m = std::make_shared<GELU>();
    } else if (k == "leaky_relu") {
      if (model) m = std::make_shared<LeakyReLU>(l.arg("slope", 0.01));
    } else if (k == "softmax") {
      if (model) m = std::make_shared<Softmax>(1);
    } else {
      detail::throw_error<ValueError>("model spec: unknown layer '", k, "' at token ", i + 1, "; expected one of ",
                                      kExpected);
    }
    if (!is_elementwise(k)) only_elementwise = false;
    if (k == "linear" || k == "conv2d" || k == "maxpool2d" || k == "avgpool2d" || k == "flatten")
      last_shape_change = where(i);
    if (model) model->push_back(std::move(m));
  }
  return s;
}

}  // namespace

std::shared_ptr<Sequential> build_model(const ModelSpec& spec, const Dims& input_shape, std::uint64_t seed) {
  Generator gen(seed);
  auto model = std::make_shared<Sequential>();
  walk(spec, input_shape, model.get(), &gen);
  return model;
}

std::shared_ptr<Sequential> build_model(const std::string& spec, const Dims& input_shape, std::uint64_t seed) {
  return build_model(ModelSpec::parse(spec), input_shape, seed);
}

Dims output_shape(const ModelSpec& spec, const Dims& input_shape) { return walk(spec, input_shape, nullptr, nullptr); }

}  // namespace chaingrad::nn
