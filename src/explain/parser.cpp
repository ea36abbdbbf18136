// The formula language: a hand-written lexer and recursive-descent parser. Errors carry the line
// and column of the offending character; syntax errors show the line with a caret under it.
//
//   program   := { sep } [ statement { sep { sep } statement } ] { sep }
//   statement := NAME '=' expr
//   expr      := term { ('+' | '-') term }
//   term      := unary { ('*' | '/') unary }
//   unary     := ('-' | '+') unary | power
//   power     := primary [ ('^' | '**') unary ]          (right associative; -x^2 = -(x^2))
//   primary   := NUMBER | NAME | NAME '(' expr { ',' expr } ')' | '(' expr ')'
//   sep       := ';' | newline                            (newlines inside parentheses are spaces)
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <sstream>
#include <unordered_map>

#include "explain/model.hpp"

namespace chaingrad::explain {

namespace {
std::string caret_block(const std::string& source_line, int column) {
  // Echo the line and put the caret under `column` (characters, 1-based); tabs stay tabs so the
  // caret lines up in a terminal.
  std::string pad;
  int chars = 0;
  for (std::size_t i = 0; i < source_line.size() && chars < column - 1; ++i) {
    const unsigned char c = source_line[i];
    if ((c & 0xC0) == 0x80) continue;  // UTF-8 continuation byte
    pad += c == '\t' ? '\t' : ' ';
    ++chars;
  }
  while (chars < column - 1) {
    pad += ' ';
    ++chars;
  }
  return "\n  " + source_line + "\n  " + pad + "^";
}
}  // namespace

FormulaError::FormulaError(const std::string& message, int line, int column, const std::string& source_line)
    : ValueError(source_line.empty() ? message : message + caret_block(source_line, column)),
      line_(line),
      column_(column) {}

namespace detail {
namespace {

enum class Tok { Number, Name, Plus, Minus, Star, Slash, Caret, LParen, RParen, Comma, Equals, Sep, End };

struct Token {
  Tok kind;
  std::string text;
  double number = 0;
  int line = 1, column = 1;
};

std::string describe(const Token& t) {
  switch (t.kind) {
    case Tok::End: return "the end of the formula";
    case Tok::Sep: return t.text == ";" ? "';'" : "the end of the line";
    default: return "'" + t.text + "'";
  }
}

std::size_t utf8_length(std::string_view s) {
  return static_cast<std::size_t>(std::count_if(s.begin(), s.end(), [](char c) {
    return (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  }));
}

class Lexer {
 public:
  Lexer(std::string_view src, const std::vector<std::string>& lines) : src_(src), lines_(lines) {}

  std::vector<Token> run() {
    std::vector<Token> out;
    int depth = 0;
    while (true) {
      skip_space(depth > 0);
      Token t;
      t.line = line_;
      t.column = column_;
      if (pos_ >= src_.size()) {
        // Point just past the last token, so "y = x *" shows the caret on that line.
        if (!out.empty()) {
          const Token& last = out.back();
          t.line = last.line;
          t.column = last.column + static_cast<int>(last.kind == Tok::Sep ? 0 : utf8_length(last.text));
        }
        t.kind = Tok::End;
        out.push_back(t);
        return out;
      }
      const char c = src_[pos_];
      if (c == '\n' || c == ';') {
        t.kind = Tok::Sep;
        t.text.assign(1, c);
        advance();
      } else if (std::isdigit(static_cast<unsigned char>(c)) ||
                 (c == '.' && pos_ + 1 < src_.size() && std::isdigit(static_cast<unsigned char>(src_[pos_ + 1])))) {
        lex_number(t);
      } else if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        t.kind = Tok::Name;
        while (pos_ < src_.size() && (std::isalnum(static_cast<unsigned char>(src_[pos_])) || src_[pos_] == '_')) {
          t.text += src_[pos_];
          advance();
        }
      } else {
        t.text = std::string(1, c);
        switch (c) {
          case '+': t.kind = Tok::Plus; break;
          case '-': t.kind = Tok::Minus; break;
          case '*':
            t.kind = Tok::Star;
            if (pos_ + 1 < src_.size() && src_[pos_ + 1] == '*') {
              t.kind = Tok::Caret;
              t.text = "**";
              advance();
            }
            break;
          case '/': t.kind = Tok::Slash; break;
          case '^': t.kind = Tok::Caret; break;
          case '(': t.kind = Tok::LParen; ++depth; break;
          case ')': t.kind = Tok::RParen; depth = std::max(0, depth - 1); break;
          case ',': t.kind = Tok::Comma; break;
          case '=': t.kind = Tok::Equals; break;
          default: {
            std::string shown = t.text;
            // Show a whole UTF-8 character rather than its first byte.
            const unsigned char u = static_cast<unsigned char>(c);
            if (u >= 0x80) {
              std::size_t n = u >= 0xF0 ? 4 : u >= 0xE0 ? 3 : u >= 0xC0 ? 2 : 1;
              shown = std::string(src_.substr(pos_, n));
            }
            throw FormulaError("syntax error at line " + std::to_string(line_) + ", column " +
                                   std::to_string(column_) + ": unexpected character '" + shown + "'",
                               line_, column_, lines_[line_ - 1]);
          }
        }
        advance();
      }
      out.push_back(std::move(t));
    }
  }

 private:
  // Columns count characters, not bytes: a UTF-8 continuation byte does not move the column.
  void advance() {
    const unsigned char c = src_[pos_++];
    if (c == '\n') {
      ++line_;
      column_ = 1;
    } else if ((c & 0xC0) != 0x80) {
      ++column_;
    }
  }
  void skip_space(bool newlines_too) {
    while (pos_ < src_.size()) {
      const char c = src_[pos_];
      if (c == ' ' || c == '\t' || c == '\r' || (newlines_too && c == '\n')) {
        advance();
      } else if (c == '#') {
        while (pos_ < src_.size() && src_[pos_] != '\n') advance();
      } else {
        break;
      }
    }
  }
  void lex_number(Token& t) {
    t.kind = Tok::Number;
    const std::size_t start = pos_;
    while (pos_ < src_.size() && (std::isdigit(static_cast<unsigned char>(src_[pos_])) || src_[pos_] == '.')) advance();
    if (pos_ < src_.size() && (src_[pos_] == 'e' || src_[pos_] == 'E')) {
      std::size_t look = pos_ + 1;
      if (look < src_.size() && (src_[look] == '+' || src_[look] == '-')) ++look;
      if (look < src_.size() && std::isdigit(static_cast<unsigned char>(src_[look]))) {
        while (pos_ < look) advance();
        while (pos_ < src_.size() && std::isdigit(static_cast<unsigned char>(src_[pos_]))) advance();
      }
    }
    t.text = std::string(src_.substr(start, pos_ - start));
    char* end = nullptr;
    errno = 0;
    t.number = std::strtod(t.text.c_str(), &end);
    if (end != t.text.c_str() + t.text.size() || !std::isfinite(t.number)) {
      throw FormulaError("syntax error at line " + std::to_string(t.line) + ", column " + std::to_string(t.column) +
                             ": '" + t.text + "' is not a number",
                         t.line, t.column, lines_[t.line - 1]);
    }
  }

  std::string_view src_;
  const std::vector<std::string>& lines_;
  std::size_t pos_ = 0;
  int line_ = 1, column_ = 1;
};

struct Use {
  int symbol, statement, line, column;
};

class Parser {
 public:
  Parser(std::vector<Token> toks, Program& p) : toks_(std::move(toks)), p_(p) {}

  void run() {
    skip_seps();
    while (peek().kind != Tok::End) {
      statement();
      if (peek().kind != Tok::Sep && peek().kind != Tok::End) {
        const bool juxtaposed = toks_[i_ - 1].kind == Tok::Number &&
                                (peek().kind == Tok::Name || peek().kind == Tok::LParen);
        syntax_error(peek(), cat("expected ';' or a new line after the expression; got ", describe(peek()),
                                 juxtaposed ? cat(" (write ", toks_[i_ - 1].text, "*", peek().text, " for a product)")
                                            : std::string()));
      }
      skip_seps();
    }
    if (p_.statements.empty())
      throw FormulaError("the formula has no statements; write one like 'y = w*x + b'", 0, 0);
    check_uses();
  }

 private:
  const Token& peek() const { return toks_[i_]; }
  const Token& next() { return toks_[i_++]; }
  void skip_seps() {
    while (peek().kind == Tok::Sep) ++i_;
  }
  [[noreturn]] void syntax_error(const Token& at, const std::string& what) const {
    throw FormulaError("syntax error at line " + std::to_string(at.line) + ", column " + std::to_string(at.column) +
                           ": " + what,
                       at.line, at.column, p_.lines[at.line - 1]);
  }

  int symbol(const std::string& name) {
    auto it = ids_.find(name);
    if (it != ids_.end()) return it->second;
    const int id = static_cast<int>(p_.symbols.size());
    p_.symbols.push_back(name);
    p_.assigned_by.push_back(-1);
    ids_.emplace(name, id);
    return id;
  }

  void statement() {
    const Token& name = peek();
    if (name.kind != Tok::Name) syntax_error(name, "expected a statement 'name = expression'; got " + describe(name));
    ++i_;
    if (peek().kind != Tok::Equals) {
      syntax_error(peek(), "expected '=' after '" + name.text + "' (each statement is 'name = expression'); got " +
                               describe(peek()));
    }
    ++i_;
    const int id = symbol(name.text);
    if (p_.assigned_by[id] >= 0) {
      const Statement& first = p_.statements[p_.assigned_by[id]];
      throw FormulaError(cat("'", name.text, "' is assigned twice (line ", std::to_string(first.line), ", column ",
                             std::to_string(first.column), " and line ", std::to_string(name.line), ", column ",
                             std::to_string(name.column), "); give the second value its own name"),
                         name.line, name.column);
    }
    Statement s;
    s.name = name.text;
    s.line = name.line;
    s.column = name.column;
    current_ = static_cast<int>(p_.statements.size());
    s.expr = expr();
    if (depth_of(s.expr) > kMaxDepth)
      throw FormulaError(cat("the statement '", s.name, "' at line ", std::to_string(s.line), " is more than ",
                             std::to_string(kMaxDepth), " operations deep; split it into named steps"),
                         s.line, s.column);
    p_.assigned_by[id] = current_;
    p_.statements.push_back(std::move(s));
  }

  ExprPtr expr() {
    ExprPtr left = term();
    while (peek().kind == Tok::Plus || peek().kind == Tok::Minus) {
      const Token& op = next();
      ExprPtr right = term();
      left = raw(op.kind == Tok::Plus ? Op::Add : Op::Sub, {left, right}, left->line, left->column);
    }
    return left;
  }

  ExprPtr term() {
    ExprPtr left = unary();
    while (peek().kind == Tok::Star || peek().kind == Tok::Slash) {
      const Token& op = next();
      ExprPtr right = unary();
      left = raw(op.kind == Tok::Star ? Op::Mul : Op::Div, {left, right}, left->line, left->column);
    }
    return left;
  }

  // Nesting (parentheses, calls, unary signs, exponents) is bounded so that no formula can
  // exhaust the stack of this recursive-descent parser or of the recursive walks over a
  // statement's expression; long flat sums are fine, their depth is checked after parsing.
  static constexpr int kMaxNesting = 200;
  static constexpr int kMaxDepth = 2000;
  struct Nest {
    Parser& p;
    explicit Nest(Parser& parser, const Token& at) : p(parser) {
      if (++p.nesting_ > kMaxNesting)
        p.syntax_error(at, cat("the expression is nested more than ", std::to_string(kMaxNesting),
                               " levels deep; give parts of it names"));
    }
    ~Nest() { --p.nesting_; }
    Nest(const Nest&) = delete;
    Nest& operator=(const Nest&) = delete;
  };

  static int depth_of(const ExprPtr& root) {  // iterative: the tree may be deep
    int deepest = 0;
    std::vector<std::pair<const Expr*, int>> stack{{root.get(), 1}};
    while (!stack.empty()) {
      auto [e, d] = stack.back();
      stack.pop_back();
      deepest = std::max(deepest, d);
      for (const auto& a : e->args) stack.push_back({a.get(), d + 1});
    }
    return deepest;
  }

  ExprPtr unary() {
    Nest nest(*this, peek());
    if (peek().kind == Tok::Minus) {
      const Token& op = next();
      return raw(Op::Neg, {unary()}, op.line, op.column);
    }
    if (peek().kind == Tok::Plus) {
      next();
      return unary();
    }
    return power();
  }

  ExprPtr power() {
    ExprPtr base = primary();
    if (peek().kind == Tok::Caret) {
      next();
      ExprPtr exponent = unary();
      return raw(Op::Pow, {base, exponent}, base->line, base->column);
    }
    return base;
  }

  ExprPtr primary() {
    const Token& t = peek();
    switch (t.kind) {
      case Tok::Number: {
        ++i_;
        ExprPtr e = number(t.number);
        auto m = std::const_pointer_cast<Expr>(e);
        m->line = t.line;
        m->column = t.column;
        return e;
      }
      case Tok::Name: {
        ++i_;
        if (peek().kind == Tok::LParen) return call(t);
        const int id = symbol(t.text);
        uses_.push_back({id, current_, t.line, t.column});
        ExprPtr e = ref(id);
        auto m = std::const_pointer_cast<Expr>(e);
        m->line = t.line;
        m->column = t.column;
        return e;
      }
      case Tok::LParen: {
        ++i_;
        ExprPtr inner = expr();
        if (peek().kind != Tok::RParen)
          syntax_error(peek(), "expected ')' to close the '(' at column " + std::to_string(t.column) + "; got " +
                                   describe(peek()));
        ++i_;
        return inner;
      }
      default:
        if (i_ > 0 && is_operator(toks_[i_ - 1].kind))
          syntax_error(t, "expected an expression after '" + toks_[i_ - 1].text + "'; got " + describe(t));
        syntax_error(t, "expected an expression; got " + describe(t));
    }
  }

  static bool is_operator(Tok k) {
    return k == Tok::Plus || k == Tok::Minus || k == Tok::Star || k == Tok::Slash || k == Tok::Caret ||
           k == Tok::Equals || k == Tok::Comma || k == Tok::LParen;
  }

  ExprPtr call(const Token& name) {
    const Token& open = next();  // '('
    std::vector<ExprPtr> args;
    if (peek().kind != Tok::RParen) {
      args.push_back(expr());
      while (peek().kind == Tok::Comma) {
        next();
        args.push_back(expr());
      }
    }
    if (peek().kind != Tok::RParen)
      syntax_error(peek(), "expected ',' or ')' in the call to '" + name.text + "' opened at column " +
                               std::to_string(open.column) + "; got " + describe(peek()));
    ++i_;
    const OpInfo* f = find_function(name.text);
    if (!f) {
      std::string hint;
      const std::string suggestion = closest_function(name.text);
      if (!suggestion.empty()) hint = "; did you mean '" + suggestion + "'?";
      throw FormulaError("unknown function '" + name.text + "' at line " + std::to_string(name.line) + ", column " +
                             std::to_string(name.column) + hint + " (functions: " + function_names() + ")",
                         name.line, name.column);
    }
    if (static_cast<int>(args.size()) != f->arity) {
      syntax_error(name, std::string(f->name) + " takes " + std::to_string(f->arity) + " argument" +
                             (f->arity == 1 ? "" : "s") + "; got " + std::to_string(args.size()));
    }
    return raw(f->op, std::move(args), name.line, name.column);
  }

  static std::size_t edit_distance(std::string_view a, std::string_view b) {
    std::vector<std::size_t> prev(b.size() + 1), cur(b.size() + 1);
    for (std::size_t j = 0; j <= b.size(); ++j) prev[j] = j;
    for (std::size_t i = 1; i <= a.size(); ++i) {
      cur[0] = i;
      for (std::size_t j = 1; j <= b.size(); ++j)
        cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
      std::swap(prev, cur);
    }
    return prev[b.size()];
  }
  static std::string closest_function(const std::string& name) {
    std::string best;
    std::size_t best_d = 3;  // suggest only close misspellings
    std::stringstream names(function_names());
    std::string f;
    while (std::getline(names, f, ',')) {
      if (!f.empty() && f[0] == ' ') f.erase(0, 1);
      const std::size_t d = edit_distance(name, f);
      if (d < best_d) {
        best_d = d;
        best = f;
      }
    }
    return best;
  }

  // A name used before the statement that assigns it (or by that statement itself).
  void check_uses() {
    for (const Use& u : uses_) {
      const int s = p_.assigned_by[u.symbol];
      if (s >= 0 && s >= u.statement) {
        const std::string& name = p_.symbols[u.symbol];
        throw FormulaError(cat("'", name, "' is used at line ", std::to_string(u.line), ", column ",
                               std::to_string(u.column), " before it is assigned (line ",
                               std::to_string(p_.statements[s].line), ", column ",
                               std::to_string(p_.statements[s].column), "); statements run in order"),
                           u.line, u.column);
      }
    }
    for (const Use& u : uses_) {
      if (p_.assigned_by[u.symbol] < 0 &&
          std::find(p_.inputs.begin(), p_.inputs.end(), u.symbol) == p_.inputs.end())
        p_.inputs.push_back(u.symbol);
    }
  }

  std::vector<Token> toks_;
  std::size_t i_ = 0;
  Program& p_;
  std::unordered_map<std::string, int> ids_;
  std::vector<Use> uses_;
  int current_ = 0;
  int nesting_ = 0;
};

}  // namespace

int Program::find(std::string_view name) const {
  for (std::size_t i = 0; i < symbols.size(); ++i)
    if (symbols[i] == name) return static_cast<int>(i);
  return -1;
}

Program parse(std::string_view source) {
  Program p;
  std::string line;
  for (char c : source) {
    if (c == '\n') {
      p.lines.push_back(line);
      line.clear();
    } else if (c != '\r') {
      line += c;
    }
  }
  p.lines.push_back(line);
  Lexer lexer(source, p.lines);
  Parser parser(lexer.run(), p);
  parser.run();
  return p;
}

bool is_identifier(std::string_view s) {
  if (s.empty() || !(std::isalpha(static_cast<unsigned char>(s[0])) || s[0] == '_')) return false;
  return std::all_of(s.begin(), s.end(),
                     [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; });
}

}  // namespace detail

// ---------------------------------------------------------------- --at and --wrt
namespace {
std::vector<std::string> split_list(std::string_view text) {
  std::vector<std::string> out;
  std::string cur;
  auto flush = [&] {
    if (!cur.empty()) out.push_back(cur);
    cur.clear();
  };
  for (char c : text) {
    if (c == ',' || c == ';' || c == ' ' || c == '\t' || c == '\n') {
      flush();
    } else {
      cur += c;
    }
  }
  flush();
  return out;
}
}  // namespace

Values parse_values(std::string_view text) {
  Values out;
  for (const std::string& item : split_list(text)) {
    const auto eq = item.find('=');
    CG_CHECK(eq != std::string::npos, ValueError, "--at: expected name=value; got '", item, "'");
    const std::string name = item.substr(0, eq), value = item.substr(eq + 1);
    CG_CHECK(detail::is_identifier(name), ValueError, "--at: '", name, "' in '", item, "' is not a name");
    CG_CHECK(!value.empty(), ValueError, "--at: no value after '", name, "='");
    char* end = nullptr;
    const double v = std::strtod(value.c_str(), &end);
    CG_CHECK(end == value.c_str() + value.size(), ValueError, "--at: the value of '", name, "' is not a number: '",
             value, "'");
    CG_CHECK(std::isfinite(v), ValueError, "--at: the value of '", name, "' must be finite; got '", value, "'");
    for (const auto& [n, _] : out)
      CG_CHECK(n != name, ValueError, "--at: '", name, "' is given twice");
    out.emplace_back(name, v);
  }
  return out;
}

std::vector<std::string> parse_names(std::string_view text) {
  std::vector<std::string> out;
  for (const std::string& item : split_list(text)) {
    CG_CHECK(detail::is_identifier(item), ValueError, "'", item, "' is not a name");
    if (std::find(out.begin(), out.end(), item) == out.end()) out.push_back(item);
  }
  return out;
}

}  // namespace chaingrad::explain
