// nn::Module: the parameter/buffer registry, state_dict, train/eval, dtype conversion and
// PyTorch-style printing. See Note [parameter handles] in nn.hpp.
#include <algorithm>
#include <map>
#include <sstream>

#include "chaingrad/autograd.hpp"
#include "chaingrad/nn.hpp"

namespace chaingrad::nn {

namespace {

void check_name(const std::string& name, const char* what) {
  CG_CHECK(!name.empty() && name.find('.') == std::string::npos, ValueError, what,
           ": a name must be non-empty and contain no '.'; got '", name, "'");
}

template <class T>
bool has_name(const std::vector<std::pair<std::string, T>>& v, const std::string& name) {
  return std::any_of(v.begin(), v.end(), [&](const auto& kv) { return kv.first == name; });
}

// Visits (prefix + name, tensor) of `field` (params_ or buffers_) over the module tree.
template <class Get>
void collect(const Module& m, const std::string& prefix, bool recurse, Get get, NamedTensors& out) {
  for (const auto& [name, t] : get(m)) out.emplace_back(prefix + name, t);
  if (!recurse) return;
  for (const auto& [name, child] : m.named_children()) collect(*child, prefix + name + ".", true, get, out);
}

// Replaces the contents of t's TensorImpl by a contiguous `dtype` copy, keeping the handle.
void convert_in_place(const Tensor& t, DType dtype) {
  if (t.dtype() == dtype || !is_floating(t.dtype())) return;
  Tensor converted;
  {
    NoGradGuard no_grad;
    converted = t.detach().to(dtype).contiguous();
  }
  TensorImpl* impl = t.impl();
  impl->storage = converted.storage();
  impl->dtype = dtype;
  impl->shape = converted.shape();
  impl->strides = converted.strides();
  impl->offset = converted.offset();
  impl->grad_impl.reset();
}

std::string indent_lines(const std::string& s) {
  std::string out;
  for (char c : s) {
    out += c;
    if (c == '\n') out += "  ";
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------- registration
Tensor Module::register_parameter(const std::string& name, Tensor t) {
  check_name(name, "register_parameter");
  CG_CHECK(!has_name(params_, name) && !has_name(buffers_, name) && !has_name(children_, name), ValueError,
           "register_parameter: '", name, "' is already registered in ", type_name());
  if (!t.defined()) return t;
  CG_CHECK(is_floating(t.dtype()), TypeError, "register_parameter: parameter '", name,
           "' must be float32 or float64; got ", t.dtype());
  CG_CHECK(t.is_leaf(), ValueError, "register_parameter: parameter '", name,
           "' must be a leaf tensor (detach() it first)");
  t.requires_grad_(true);
  params_.emplace_back(name, t);
  return t;
}

Tensor Module::register_buffer(const std::string& name, Tensor t) {
  check_name(name, "register_buffer");
  CG_CHECK(!has_name(params_, name) && !has_name(buffers_, name) && !has_name(children_, name), ValueError,
           "register_buffer: '", name, "' is already registered in ", type_name());
  if (!t.defined()) return t;
  buffers_.emplace_back(name, t);
  return t;
}

void Module::add_child(const std::string& name, ModulePtr m) {
  check_name(name, "register_module");
  CG_CHECK(m != nullptr, ValueError, "register_module: module '", name, "' is null");
  CG_CHECK(!has_name(params_, name) && !has_name(buffers_, name) && !has_name(children_, name), ValueError,
           "register_module: '", name, "' is already registered in ", type_name());
  children_.emplace_back(name, std::move(m));
}

// ---------------------------------------------------------------- queries
NamedTensors Module::named_parameters(bool recurse) const {
  NamedTensors out;
  collect(*this, "", recurse, [](const Module& m) -> const NamedTensors& { return m.params_; }, out);
  return out;
}

NamedTensors Module::named_buffers(bool recurse) const {
  NamedTensors out;
  collect(*this, "", recurse, [](const Module& m) -> const NamedTensors& { return m.buffers_; }, out);
  return out;
}

std::vector<Tensor> Module::parameters(bool recurse) const {
  std::vector<Tensor> out;
  for (auto& [name, t] : named_parameters(recurse)) out.push_back(t);
  return out;
}

std::vector<Tensor> Module::buffers(bool recurse) const {
  std::vector<Tensor> out;
  for (auto& [name, t] : named_buffers(recurse)) out.push_back(t);
  return out;
}

std::int64_t Module::num_parameters() const {
  std::int64_t n = 0;
  for (const Tensor& t : parameters()) n += t.numel();
  return n;
}

NamedTensors Module::state_dict() const {
  // Module by module: own parameters, own buffers, then the children (PyTorch's order).
  NamedTensors out;
  auto visit = [&out](auto& self, const Module& m, const std::string& prefix) -> void {
    for (const auto& [name, t] : m.params_) out.emplace_back(prefix + name, t);
    for (const auto& [name, t] : m.buffers_) out.emplace_back(prefix + name, t);
    for (const auto& [name, child] : m.children_) self(self, *child, prefix + name + ".");
  };
  visit(visit, *this, "");
  return out;
}

std::vector<ModulePtr> Module::children() const {
  std::vector<ModulePtr> out;
  for (const auto& [name, m] : children_) out.push_back(m);
  return out;
}

std::vector<std::pair<std::string, const Module*>> Module::named_modules() const {
  std::vector<std::pair<std::string, const Module*>> out;
  std::vector<std::pair<std::string, const Module*>> stack{{"", this}};
  while (!stack.empty()) {
    auto [name, m] = stack.back();
    stack.pop_back();
    out.emplace_back(name, m);
    const auto& kids = m->named_children();
    for (auto it = kids.rbegin(); it != kids.rend(); ++it)
      stack.emplace_back(name.empty() ? it->first : name + "." + it->first, it->second.get());
  }
  return out;
}

// ---------------------------------------------------------------- load_state_dict
void Module::load_state_dict(const NamedTensors& state, bool strict) {
  const NamedTensors own = state_dict();
  std::map<std::string, const Tensor*> given;
  for (const auto& [name, t] : state) given[name] = &t;

  std::vector<std::string> missing, unexpected, mismatched;
  for (const auto& [name, t] : own) {
    auto it = given.find(name);
    if (it == given.end()) {
      missing.push_back(name);
      continue;
    }
    const Tensor& src = *it->second;
    if (!src.defined()) {
      mismatched.push_back("the value for " + name + " is undefined");
    } else if (!(src.shape() == t.shape())) {
      mismatched.push_back("size mismatch for " + name + ": copying a tensor of shape " + to_string(src.shape()) +
                           " from the checkpoint, the shape in the current model is " + to_string(t.shape()));
    } else if (is_floating(src.dtype()) != is_floating(t.dtype())) {
      std::ostringstream os;
      os << "dtype mismatch for " << name << ": the checkpoint holds " << src.dtype() << ", the model " << t.dtype();
      mismatched.push_back(os.str());
    }
  }
  for (const auto& [name, t] : state)
    if (!std::any_of(own.begin(), own.end(), [&name = name](const auto& kv) { return kv.first == name; }))
      unexpected.push_back(name);

  const bool fail = !mismatched.empty() || (strict && (!missing.empty() || !unexpected.empty()));
  if (fail) {
    std::ostringstream os;
    os << "load_state_dict: error(s) loading the state into " << type_name() << ":";
    for (const auto& m : mismatched) os << "\n  " << m;
    auto list = [&](const char* what, const std::vector<std::string>& keys) {
      if (keys.empty()) return;
      os << "\n  " << what << " key(s): ";
      for (std::size_t i = 0; i < keys.size(); ++i) os << (i ? ", " : "") << '"' << keys[i] << '"';
    };
    if (strict) {
      list("missing", missing);
      list("unexpected", unexpected);
    }
    throw ValueError(os.str());
  }

  NoGradGuard no_grad;
  for (const auto& [name, t] : own) {
    auto it = given.find(name);
    if (it == given.end()) continue;
    Tensor dst = t;
    dst.copy_(*it->second);
  }
}

// ---------------------------------------------------------------- mode, grads, dtype
void Module::train(bool on) {
  training_ = on;
  for (auto& [name, child] : children_) child->train(on);
}

void Module::zero_grad() {
  for (Tensor& p : parameters()) p.zero_grad();
}

Module& Module::to(DType dtype) {
  CG_CHECK(is_floating(dtype), TypeError, "Module::to: parameters must be float32 or float64; got ", dtype);
  for (const Tensor& t : parameters()) convert_in_place(t, dtype);
  for (const Tensor& t : buffers()) convert_in_place(t, dtype);
  return *this;
}

// ---------------------------------------------------------------- printing
std::string Module::describe() const {
  std::ostringstream os;
  os << type_name() << "(";
  const std::string extra = extra_repr();
  if (children_.empty()) {
    os << extra << ")";
    return os.str();
  }
  if (!extra.empty()) os << "\n  " << indent_lines(extra);
  for (const auto& [name, child] : children_) os << "\n  (" << name << "): " << indent_lines(child->describe());
  os << "\n)";
  return os.str();
}

}  // namespace chaingrad::nn
