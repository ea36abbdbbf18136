#include "checkpoint.hpp"

#include <sstream>

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
    throw cg::ValueError(path + ": " + e.what());
  }
  return model;
}

Evaluation evaluate(cg::nn::Module& model, const cg::data::Dataset& data, std::int64_t num_classes) {
  const bool was_training = model.is_training();
  model.eval();
  cg::NoGradGuard no_grad;
  Evaluation ev;
  ev.confusion.assign(num_classes, std::vector<std::int64_t>(num_classes, 0));
  cg::data::DataLoader loader(data, {.batch_size = 1000, .shuffle = false});
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

}  // namespace cli
