#include "checkpoint.hpp"

#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "chaingrad/chaingrad.hpp"
#include "chaingrad/io.hpp"

namespace cg = chaingrad;

namespace cli {

std::string optimizer_path(const std::string& p) {
  const auto dot = p.rfind(".safetensors");
  return (dot == std::string::npos ? p : p.substr(0, dot)) + ".optim.safetensors";
}

cg::Dims parse_dims(const std::string& s) {
  cg::Dims d;
  std::string tok;
  for (char c : s + ",") {
    if (c == '[' || c == ']' || c == ' ') continue;
    if (c == ',') {
      if (!tok.empty()) {
        try {
          d.push_back(std::stoll(tok));
        } catch (const std::exception&) {
          throw cg::ValueError("not a list of dimensions: '" + s + "'");
        }
      }
      tok.clear();
    } else {
      tok += c;
    }
  }
  return d;
}

std::string format_dims(const cg::Dims& d) {
  std::ostringstream os;
  for (int i = 0; i < d.size(); ++i) os << (i ? "," : "") << d[i];
  return os.str();
}

void save_checkpoint(const std::string& path, const cg::nn::Module& model, const CheckpointInfo& info) {
  std::map<std::string, std::string> meta = info.extra;
  meta["format"] = "pt";
  meta["chaingrad.model"] = info.spec;
  meta["chaingrad.input_shape"] = format_dims(info.input_shape);
  meta["chaingrad.num_classes"] = std::to_string(info.num_classes);
  std::ostringstream norm;
  norm.precision(17);
  norm << info.norm.mean << "," << info.norm.std;
  meta["chaingrad.normalization"] = norm.str();
  cg::io::save_safetensors(path, model.state_dict(), meta);
}

std::shared_ptr<cg::nn::Sequential> load_checkpoint(const std::string& path, CheckpointInfo& info,
                                                    const std::string& spec_override) {
  const cg::io::SafetensorsFile file = cg::io::load_safetensors(path);
  auto get = [&](const std::string& key) -> std::string {
    auto it = file.metadata.find(key);
    return it == file.metadata.end() ? "" : it->second;
  };
  info.spec = spec_override.empty() ? get("chaingrad.model") : spec_override;
  CG_CHECK(!info.spec.empty(), ValueError, path,
           ": the checkpoint records no model spec (written outside chaingrad?); pass --model SPEC");
  const std::string shape = get("chaingrad.input_shape");
  info.input_shape = shape.empty() ? cg::Dims{1, 28, 28} : parse_dims(shape);
  const std::string classes = get("chaingrad.num_classes");
  info.num_classes = classes.empty() ? 0 : std::stoll(classes);
  const std::string norm = get("chaingrad.normalization");
  if (!norm.empty()) {
    const auto comma = norm.find(',');
    info.norm = {std::stod(norm.substr(0, comma)), std::stod(norm.substr(comma + 1))};
  } else {
    info.norm = {0.0, 1.0};
  }
  for (const auto& [k, v] : file.metadata) info.extra[k] = v;
  auto model = cg::nn::build_model(info.spec, info.input_shape, 0);
  try {
    model->load_state_dict(file.tensors);
  } catch (const cg::Error& e) {
    // One line for the CLI: load_state_dict lists each problem on a line of its own.
    std::string what = e.what();
    for (std::size_t i = what.find('\n'); i != std::string::npos; i = what.find('\n', i)) {
      std::size_t j = i + 1;
      while (j < what.size() && what[j] == ' ') ++j;
      what.replace(i, j - i, i > 0 && what[i - 1] == ':' ? " " : "; ");
    }
    const std::string recorded = get("chaingrad.model");
    if (!spec_override.empty() && !recorded.empty() && recorded != info.spec)
      what += " (the checkpoint holds the model '" + recorded + "'; leave out --model to use it)";
    throw cg::ValueError(path + ": " + what);
  }
  return model;
}

Evaluation evaluate(cg::nn::Module& model, const cg::data::Dataset& data, std::int64_t num_classes) {
  const bool was_training = model.is_training();
  model.eval();
  cg::NoGradGuard no_grad;
  Evaluation ev;
  ev.confusion.assign(num_classes, std::vector<std::int64_t>(num_classes, 0));
  // Small evaluation batches keep peak memory near training's (a CNN's activations at 1000 images
  // are hundreds of MB, and the caching allocator keeps the peak).
  cg::data::DataLoader loader(data, {.batch_size = 250, .shuffle = false});
  double loss_sum = 0;
  std::int64_t correct = 0;
  for (std::int64_t b = 0; b < loader.num_batches(); ++b) {
    const cg::data::Batch batch = loader.batch(b);
    const cg::Tensor logits = model(batch.inputs);
    CG_CHECK(logits.dim() == 2 && logits.size(1) == num_classes, ShapeError, "evaluate: the model outputs shape ",
             logits.shape(), " but the data has ", num_classes, " classes");
    loss_sum += cg::cross_entropy(logits, batch.labels).item() * static_cast<double>(batch.labels.numel());
    const auto pred = cg::argmax(logits, 1).to_vector<std::int64_t>();
    const auto truth = batch.labels.to_vector<std::int64_t>();
    for (std::size_t i = 0; i < pred.size(); ++i) {
      correct += pred[i] == truth[i];
      ev.confusion[truth[i]][pred[i]]++;
    }
  }
  ev.loss = loss_sum / static_cast<double>(data.size());
  ev.accuracy = static_cast<double>(correct) / static_cast<double>(data.size());
  model.train(was_training);
  return ev;
}

// ---- resumable training ----

std::string previous_optimizer_path(const std::string& p) {
  const auto dot = p.rfind(".safetensors");
  return (dot == std::string::npos ? p : p.substr(0, dot)) + ".optim.prev.safetensors";
}

std::map<std::string, std::string> read_safetensors_metadata(const std::string& path) {
  std::map<std::string, std::string> out;
  std::ifstream in(path, std::ios::binary);
  unsigned char len_bytes[8];
  if (!in.read(reinterpret_cast<char*>(len_bytes), 8)) return out;
  std::uint64_t len = 0;
  for (int i = 7; i >= 0; --i) len = (len << 8) | len_bytes[i];
  std::error_code ec;
  const auto size = std::filesystem::file_size(path, ec);
  if (ec || len > size - 8 || len > (std::uint64_t{100} << 20)) return out;
  std::string header(static_cast<std::size_t>(len), '\0');
  if (!in.read(header.data(), static_cast<std::streamsize>(len))) return out;
  const nlohmann::json j = nlohmann::json::parse(header, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains("__metadata__") || !j["__metadata__"].is_object()) return out;
  for (const auto& [k, v] : j["__metadata__"].items())
    if (v.is_string()) out[k] = v.get<std::string>();
  return out;
}

namespace {

std::string step_of(const std::string& path) {
  const auto meta = read_safetensors_metadata(path);
  const auto it = meta.find("chaingrad.step");
  return it == meta.end() ? "" : it->second;
}

}  // namespace

void save_training_checkpoint(const std::string& path, const cg::nn::Module& model, const CheckpointInfo& info,
                              const std::vector<std::pair<std::string, cg::Tensor>>& optimizer_state) {
  namespace fs = std::filesystem;
  const std::string opt_path = optimizer_path(path), prev_path = previous_optimizer_path(path);
  const auto step_it = info.extra.find("chaingrad.step");
  const std::string step = step_it == info.extra.end() ? "" : step_it->second;
  // See Note [checkpoint pairs]: keep the optimizer state that matches the model file on disk
  // until the new model file has replaced it.
  std::error_code ec;
  if (fs::exists(path, ec) && fs::exists(opt_path, ec)) {
    const std::string on_disk = step_of(path);
    if (!on_disk.empty() && on_disk == step_of(opt_path)) {
      ::unlink(prev_path.c_str());
      if (::link(opt_path.c_str(), prev_path.c_str()) != 0) {
        // No hard links on this filesystem: copy, atomically.
        std::ifstream in(opt_path, std::ios::binary);
        std::ostringstream bytes;
        bytes << in.rdbuf();
        cg::io::write_file_atomic(prev_path, bytes.str());
      }
    }
  }
  std::map<std::string, std::string> opt_meta{{"format", "pt"}};
  if (!step.empty()) opt_meta["chaingrad.step"] = step;
  cg::io::save_safetensors(opt_path, optimizer_state, opt_meta);
  save_checkpoint(path, model, info);
}

std::vector<std::pair<std::string, cg::Tensor>> load_optimizer_state(const std::string& path, const std::string& step,
                                                                     bool& found) {
  namespace fs = std::filesystem;
  const std::string opt_path = optimizer_path(path), prev_path = previous_optimizer_path(path);
  std::error_code ec;
  found = fs::exists(opt_path, ec) || fs::exists(prev_path, ec);
  if (!found) return {};
  std::string seen;
  for (const std::string& candidate : {opt_path, prev_path}) {
    if (!fs::exists(candidate, ec)) continue;
    const std::string s = step_of(candidate);
    if (s == step || (step.empty() && candidate == opt_path)) return cg::io::load_safetensors(candidate).tensors;
    seen += (seen.empty() ? "" : ", ") + candidate + " is from step " + (s.empty() ? "?" : s);
  }
  throw cg::ValueError(path + ": no optimizer state for its step " + step + " (" + seen +
                       "); resume from an epoch-N.safetensors checkpoint instead");
}

namespace {

template <class F>
void for_each_module(cg::nn::Module& m, const std::string& name, F&& f) {
  f(name, m);
  for (const auto& [child_name, child] : m.named_children())
    for_each_module(*child, name.empty() ? child_name : name + "." + child_name, f);
}

}  // namespace

std::map<std::string, std::string> generator_states(cg::nn::Module& model) {
  std::map<std::string, std::string> out;
  for_each_module(model, "", [&](const std::string& name, cg::nn::Module& m) {
    if (auto* d = dynamic_cast<cg::nn::Dropout*>(&m)) out["chaingrad.rng." + name] = std::to_string(d->generator().state());
  });
  return out;
}

void restore_generator_states(cg::nn::Module& model, const std::map<std::string, std::string>& metadata) {
  for_each_module(model, "", [&](const std::string& name, cg::nn::Module& m) {
    auto* d = dynamic_cast<cg::nn::Dropout*>(&m);
    if (!d) return;
    const auto it = metadata.find("chaingrad.rng." + name);
    if (it == metadata.end()) return;
    try {
      d->seed(std::stoull(it->second));
    } catch (const std::exception&) {
      throw cg::ValueError("checkpoint: chaingrad.rng." + name + " is not a generator state: '" + it->second + "'");
    }
  });
}

bool state_is_finite(const cg::nn::Module& model) {
  for (const auto& [name, t] : model.state_dict())
    if (cg::is_floating(t.dtype()) && !cg::isfinite_all(t.detach())) return false;
  return true;
}

int remove_stale_temp_files(const std::string& dir) {
  namespace fs = std::filesystem;
  int removed = 0;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    // AtomicFile's temporary names: <target>.tmp.<pid>.<hex>
    const auto tmp = name.rfind(".tmp.");
    if (tmp == std::string::npos || !entry.is_regular_file(ec)) continue;
    const std::string rest = name.substr(tmp + 5);
    const auto dot = rest.find('.');
    if (dot == std::string::npos || dot == 0 || dot + 1 == rest.size()) continue;
    const std::string pid_text = rest.substr(0, dot), hex = rest.substr(dot + 1);
    if (pid_text.find_first_not_of("0123456789") != std::string::npos || pid_text.size() > 9 ||
        hex.find_first_not_of("0123456789abcdef") != std::string::npos)
      continue;
    const auto pid = static_cast<pid_t>(std::stol(pid_text));
    if (pid == ::getpid() || ::kill(pid, 0) == 0 || errno != ESRCH) continue;  // its writer may be alive
    if (fs::remove(entry.path(), ec)) ++removed;
  }
  return removed;
}

namespace {

volatile std::sig_atomic_t g_stop_signal = 0;
struct sigaction g_old_int {}, g_old_term {};

extern "C" void on_stop_signal(int sig) { g_stop_signal = sig; }

}  // namespace

StopSignals::StopSignals() {
  g_stop_signal = 0;
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART | SA_RESETHAND;  // a second signal takes the default action
  ::sigaction(SIGINT, &sa, &g_old_int);
  ::sigaction(SIGTERM, &sa, &g_old_term);
}

StopSignals::~StopSignals() {
  ::sigaction(SIGINT, &g_old_int, nullptr);
  ::sigaction(SIGTERM, &g_old_term, nullptr);
}

int StopSignals::received() { return g_stop_signal; }

}  // namespace cli
