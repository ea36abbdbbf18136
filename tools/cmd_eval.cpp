// `chaingrad eval` and `chaingrad predict`: reuse a checkpoint written by `train` (or, with
// --model, one written elsewhere, e.g. by PyTorch).
#include <stb/stb_image.h>

#include <cstdio>

#include <nlohmann/json.hpp>

#include "chaingrad/chaingrad.hpp"
#include "chaingrad/data.hpp"
#include "checkpoint.hpp"
#include "commands.hpp"

namespace cg = chaingrad;

namespace {

struct EvalOptions {
  std::string checkpoint, data_dir = cg::data::kFashionMnistDir, model;
  bool json = false;
};

void run_eval(const EvalOptions& o) {
  cli::CheckpointInfo info;
  auto model = cli::load_checkpoint(o.checkpoint, info, o.model);
  cg::data::Dataset test = cg::data::load_idx(o.data_dir, false, /*keep_bytes=*/true);
  cg::data::normalize_(test, info.norm);
  const std::int64_t classes = info.num_classes ? info.num_classes : test.num_classes;
  const cli::Evaluation ev = cli::evaluate(*model, test, classes);
  if (o.json) {
    nlohmann::json per_class = nlohmann::json::array();
    for (std::int64_t c = 0; c < classes; ++c) {
      std::int64_t total = 0;
      for (auto v : ev.confusion[c]) total += v;
      per_class.push_back(total ? static_cast<double>(ev.confusion[c][c]) / static_cast<double>(total) : 0.0);
    }
    std::printf("%s\n", nlohmann::json{{"loss", ev.loss}, {"accuracy", ev.accuracy}, {"per_class_accuracy", per_class},
                                       {"confusion_matrix", ev.confusion}}
                            .dump()
                            .c_str());
    return;
  }
  std::printf("model:    %s\nsamples:  %lld\nloss:     %.4f\naccuracy: %.2f%%\n\nper class:\n", info.spec.c_str(),
              static_cast<long long>(test.size()), ev.loss, 100 * ev.accuracy);
  for (std::int64_t c = 0; c < classes; ++c) {
    std::int64_t total = 0;
    for (auto v : ev.confusion[c]) total += v;
    std::printf("  class %2lld: %6.2f%% of %lld\n", static_cast<long long>(c),
                total ? 100.0 * static_cast<double>(ev.confusion[c][c]) / static_cast<double>(total) : 0.0,
                static_cast<long long>(total));
  }
  std::printf("\nconfusion matrix (rows: true class, columns: predicted):\n      ");
  for (std::int64_t c = 0; c < classes; ++c) std::printf("%5lld", static_cast<long long>(c));
  std::printf("\n");
  for (std::int64_t r = 0; r < classes; ++r) {
    std::printf("  %2lld: ", static_cast<long long>(r));
    for (std::int64_t c = 0; c < classes; ++c) std::printf("%5lld", static_cast<long long>(ev.confusion[r][c]));
    std::printf("\n");
  }
}

struct PredictOptions {
  std::string checkpoint, image, data_dir = cg::data::kFashionMnistDir, model;
  std::int64_t index = -1;
  int top = 3;
  bool json = false;
};

// A grayscale PNG/JPEG/BMP resized to nothing: it must already have the model's input size.
cg::Tensor load_image(const std::string& path, const cg::Dims& input_shape) {
  int w = 0, h = 0, channels = 0;
  unsigned char* pixels = stbi_load(path.c_str(), &w, &h, &channels, 1);
  CG_CHECK(pixels != nullptr, IoError, path, ": cannot read image (", stbi_failure_reason(), ")");
  std::unique_ptr<unsigned char, void (*)(void*)> guard(pixels, stbi_image_free);
  const cg::Dims expected = input_shape;
  CG_CHECK(expected.size() == 3 && expected[0] == 1 && expected[1] == h && expected[2] == w, ShapeError, path,
           ": image is ", w, "x", h, " but the model expects input of shape ", expected);
  std::vector<float> v(static_cast<std::size_t>(w) * h);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(pixels[i]) / 255.0f;
  return cg::from_vector(std::span<const float>(v), {1, 1, h, w});
}

void run_predict(const PredictOptions& o) {
  CG_CHECK(o.image.empty() != (o.index < 0), ValueError, "predict: give either an IMAGE file or --index N");
  cli::CheckpointInfo info;
  auto model = cli::load_checkpoint(o.checkpoint, info, o.model);
  model->eval();
  cg::Tensor x;
  std::int64_t label = -1;
  if (o.index >= 0) {
    cg::data::Dataset test = cg::data::load_idx(o.data_dir, false, /*keep_bytes=*/true);
    CG_CHECK(o.index < test.size(), ValueError, "predict: --index ", o.index, " is out of range; the test set has ",
             test.size(), " samples");
    x = cg::data::float_inputs(test, o.index, o.index + 1);
    label = static_cast<std::int64_t>(test.labels.at({o.index}));
  } else {
    x = load_image(o.image, info.input_shape);
  }
  cg::data::normalize_(x, info.norm);
  cg::NoGradGuard ng;
  const cg::Tensor logits = (*model)(x).select(0, 0);
  const cg::Tensor probs = cg::softmax(logits, 0);
  const auto p = probs.to_vector<double>(), l = logits.to_vector<double>();
  std::vector<std::size_t> order(p.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](auto a, auto b) { return p[a] > p[b]; });
  if (o.json) {
    nlohmann::json j{{"predicted", order[0]}, {"probabilities", p}, {"logits", l}};
    if (o.index >= 0) {
      j["index"] = o.index;
      j["label"] = label;
    }
    std::printf("%s\n", j.dump().c_str());
    return;
  }
  if (label >= 0) std::printf("test sample %lld, true class %lld\n", static_cast<long long>(o.index), static_cast<long long>(label));
  for (int k = 0; k < std::min<int>(o.top, static_cast<int>(order.size())); ++k)
    std::printf("  class %zu: %6.2f%%\n", order[k], 100 * p[order[k]]);
}

}  // namespace

void add_eval_command(CLI::App& app) {
  auto o = std::make_shared<EvalOptions>();
  auto* cmd = app.add_subcommand("eval", "Loss, accuracy, per-class accuracy and confusion matrix of a checkpoint");
  cmd->add_option("checkpoint", o->checkpoint, "A .safetensors checkpoint")->required();
  cmd->add_option("--data", o->data_dir, "Folder with the IDX test files");
  cmd->add_option("--model", o->model, "Model spec, for checkpoints that do not record one");
  cmd->add_flag("--json", o->json, "Print one JSON object");
  cmd->callback([o] { run_eval(*o); });
}

void add_predict_command(CLI::App& app) {
  auto o = std::make_shared<PredictOptions>();
  auto* cmd = app.add_subcommand("predict", "Classify one image (PNG) or one test sample (--index N)");
  cmd->add_option("checkpoint", o->checkpoint, "A .safetensors checkpoint")->required();
  cmd->add_option("image", o->image, "A grayscale image of the model's input size");
  cmd->add_option("--index", o->index, "A test-set sample instead of an image")->check(CLI::NonNegativeNumber);
  cmd->add_option("--data", o->data_dir, "Folder with the IDX test files");
  cmd->add_option("--model", o->model, "Model spec, for checkpoints that do not record one");
  cmd->add_option("--top", o->top, "How many classes to show")->check(CLI::PositiveNumber);
  cmd->add_flag("--json", o->json, "Print one JSON object");
  cmd->callback([o] { run_predict(*o); });
}
