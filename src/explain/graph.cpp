// The computational graph as Graphviz DOT, and writing it as .dot, .svg or .png.
#include <fcntl.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "chaingrad/autograd.hpp"
#include "chaingrad/explain.hpp"
#include "chaingrad/io.hpp"
#include "explain/model.hpp"

extern char** environ;

namespace chaingrad::explain {

using namespace detail;

namespace {

std::string html(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string dot_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"') out += '\\';  // names and expressions hold no backslashes; "\\n" stays a DOT line break
    out += c == '\n' ? ' ' : c;
  }
  return out + "\"";
}

constexpr const char* kHighlight = "#d62728";

}  // namespace

std::string to_dot(std::string_view formula, const Options& options) {
  const Program p = parse(formula);
  const Resolved r = resolve(p, options);
  const Graph g = expanded_graph(p, r.output);
  const int n = static_cast<int>(g.units.size());

  // Forward values, and every node's gradient from one backward (retain_grad on the non-leaves).
  const Evaluation ev = evaluate(g, p, r.input_values);
  for (const Tensor& t : ev.tensors)
    if (!t.is_leaf()) t.retain_grad();
  autograd::backward({ev.tensors[g.output]});
  std::vector<double> grad(n, 0.0);
  std::vector<char> has_grad(n, 0);
  for (int u = 0; u < n; ++u) {
    const Tensor gr = ev.tensors[u].grad();
    if (gr.defined()) {
      grad[u] = gr.item();
      has_grad[u] = 1;
    }
  }

  // Units and edges on the paths from the output to each variable asked about.
  std::vector<char> on(n, 0);
  std::vector<std::string> highlighted;
  for (const std::string& name : options.wrt) {
    const int v = g.find(name);
    CG_CHECK(v >= 0, ValueError, "--wrt: '", name, "' is not a value of the formula");
    highlighted.push_back(name);
    std::vector<char> down(n, 0), up(n, 0);
    down[v] = 1;
    for (int u = v + 1; u < n; ++u)
      for (int w : g.units[u].operands) down[u] |= down[w];
    up[g.output] = 1;
    for (int u = g.output; u >= 0; --u)
      if (up[u])
        for (int w : g.units[u].operands) up[w] = 1;
    for (int u = 0; u < n; ++u) on[u] |= down[u] && up[u];
  }

  std::ostringstream os;
  std::string title;
  for (const auto& s : p.statements)
    title += (title.empty() ? "" : "; ") + s.name + " = " +
             to_string(*s.expr, [&](int id) { return RefText{p.symbols[id]}; });
  os << "// chaingrad graph: " << title << "\n";
  std::string caption = title + "\\nedges carry values forward and are labelled with the local derivative "
                                "∂(result)/∂(input)";
  if (!highlighted.empty()) {
    caption += "; in red: the paths from " + g.units[g.output].name + " to ";
    for (std::size_t i = 0; i < highlighted.size(); ++i) caption += (i ? ", " : "") + highlighted[i];
  }
  os << "digraph chaingrad {\n"
     << "  rankdir=LR;\n"
     << "  labelloc=t;\n"
     << "  label=" << dot_string(caption) << ";\n"
     << "  fontname=\"Helvetica\"; fontsize=12;\n"
     << "  node [shape=box, style=\"rounded,filled\", fillcolor=\"#ffffff\", fontname=\"Helvetica\", fontsize=11];\n"
     << "  edge [fontname=\"Helvetica\", fontsize=9, color=\"#666666\", fontcolor=\"#444444\"];\n";
  const std::string d_out = g.units[g.output].name;
  for (int u = 0; u < n; ++u) {
    const Unit& unit = g.units[u];
    std::ostringstream label;
    label << "<b>" << html(unit.name) << "</b>";
    if (unit.kind == Unit::Kind::Assigned && unit.expr) label << " = " << html(g.expression(u));
    const auto& fn = ev.tensors[u].grad_fn();
    label << "<br/><font point-size=\"9\" color=\"#555555\">"
          << (unit.kind == Unit::Kind::Input ? "input" : fn ? fn->name() : "constant") << "</font>";
    label << "<br/>value " << html(fmt(ev.values[u]));
    label << "<br/>" << html(partial_name(d_out, unit.name)) << " = " << (has_grad[u] ? html(fmt(grad[u])) : "0");
    std::string fill = unit.kind == Unit::Kind::Input ? "#e8f1fb"
                       : unit.kind == Unit::Kind::Assigned ? "#fff4dc"
                                                           : "#ffffff";
    if (u == g.output) fill = "#fde0dc";
    os << "  n" << u << " [label=<" << label.str() << ">, fillcolor=\"" << fill << "\"";
    if (u == g.output) os << ", peripheries=2";
    if (on[u]) os << ", color=\"" << kHighlight << "\", penwidth=2";
    os << "];\n";
  }
  int constant_id = 0;
  for (int u = 0; u < n; ++u) {
    const Unit& unit = g.units[u];
    if (!unit.expr) continue;
    const auto ss = slots(g, u);
    const auto local = slot_partials(g, u, ev.values);
    for (std::size_t k = 0; k < ss.size(); ++k) {
      const int w = ss[k].unit;
      os << "  n" << w << " -> n" << u << " [label=" << dot_string(fmt(local[k]));
      if (on[u] && on[w]) os << ", color=\"" << kHighlight << "\", fontcolor=\"" << kHighlight << "\", penwidth=2";
      os << "];\n";
    }
    if (unit.expr->op != Op::Ref && !is_constant(*unit.expr)) {
      for (const auto& a : unit.expr->args) {
        if (a->op == Op::Ref) continue;
        os << "  c" << constant_id << " [label=" << dot_string(to_string(*a, g.namer()))
           << ", shape=plaintext, style=\"\", fontcolor=\"#777777\"];\n";
        os << "  c" << constant_id << " -> n" << u << " [style=dashed, color=\"#aaaaaa\"];\n";
        ++constant_id;
      }
    }
  }
  os << "}\n";
  return os.str();
}

namespace {

std::string find_on_path(const std::string& program) {
  const char* path = std::getenv("PATH");
  if (!path) return {};
  std::stringstream dirs(path);
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    const std::string candidate = cat(dir.empty() ? std::string_view(".") : std::string_view(dir), "/", program);
    struct stat st {};
    if (::stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(candidate.c_str(), X_OK) == 0)
      return candidate;
  }
  return {};
}

// A temporary file removed when this goes out of scope.
struct TempFile {
  std::string path;
  explicit TempFile(const std::string& suffix) {
    std::string pattern = (std::filesystem::temp_directory_path() / ("chaingrad-graph-XXXXXX" + suffix)).string();
    std::vector<char> buf(pattern.begin(), pattern.end());
    buf.push_back('\0');
    const int fd = ::mkstemps(buf.data(), static_cast<int>(suffix.size()));
    if (fd < 0) ::chaingrad::detail::throw_error<IoError>("graph: cannot create a temporary file: ", std::strerror(errno));
    ::close(fd);
    path = buf.data();
  }
  ~TempFile() { std::remove(path.c_str()); }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
};

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

}  // namespace

void write_graph(std::string_view formula, const Options& options, const std::string& path) {
  std::string ext = std::filesystem::path(path).extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  CG_CHECK(ext == ".dot" || ext == ".gv" || ext == ".svg" || ext == ".png", ValueError, "graph: cannot tell the format of '",
           path, "' from its extension; use .dot, .svg or .png");
  const std::string dot = to_dot(formula, options);
  if (ext == ".dot" || ext == ".gv") {
    io::write_file_atomic(path, dot);
    return;
  }
  const std::string program = find_on_path("dot");
  CG_CHECK(!program.empty(), IoError, "graph: writing '", path, "' needs Graphviz's 'dot' program, which is not on ",
           "PATH; install Graphviz (e.g. apt-get install graphviz), or write a .dot file instead");
  TempFile in(".dot"), out(ext), err(".txt");
  io::write_file_atomic(in.path, dot);
  const std::string format = "-T" + ext.substr(1);
  std::vector<std::string> args = {"dot", format, "-o", out.path, in.path};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 2, err.path.c_str(), O_WRONLY | O_TRUNC, 0);
  pid_t pid = 0;
  const int rc = ::posix_spawn(&pid, program.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  CG_CHECK(rc == 0, IoError, "graph: cannot run '", program, "': ", std::strerror(rc));
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    std::string message = read_all(err.path);
    while (!message.empty() && (message.back() == '\n' || message.back() == ' ')) message.pop_back();
    ::chaingrad::detail::throw_error<IoError>("graph: Graphviz's dot failed to write ", ext.substr(1), " (exit status ",
                                 WIFEXITED(status) ? WEXITSTATUS(status) : -1, ")",
                                 message.empty() ? "" : ": " + message);
  }
  const std::string bytes = read_all(out.path);
  CG_CHECK(!bytes.empty(), IoError, "graph: Graphviz's dot produced an empty ", ext.substr(1), " file");
  io::write_file_atomic(path, bytes);
}

}  // namespace chaingrad::explain
