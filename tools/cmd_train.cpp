// `chaingrad train`: trains a classifier (by default an MLP on Fashion-MNIST), evaluates after
// every epoch, and leaves a checkpoint, a metrics file and a plot in --out.
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "chaingrad/chaingrad.hpp"
#include "chaingrad/data.hpp"
#include "chaingrad/io.hpp"
#include "chaingrad/nn.hpp"
#include "chaingrad/optim.hpp"
#include "checkpoint.hpp"
#include "commands.hpp"
#include "plot.hpp"

namespace cg = chaingrad;
namespace fs = std::filesystem;

namespace {

constexpr const char* kDefaultModel = "linear(256) relu linear(256) relu linear(10)";

struct TrainOptions {
  std::string data_dir = cg::data::kFashionMnistDir;
  std::string csv, label = "label", test_csv;
  std::string model = kDefaultModel;
  std::string optimizer = "momentum";
  std::string schedule = "cosine";
  double lr = -1, momentum = 0.9, weight_decay = 0;
  std::int64_t batch_size = 64;
  int epochs = 5;
  std::uint64_t seed = 0;
  int threads = 0;
  std::string out = "runs/latest";
  std::string resume;
  bool json = false;
  bool detect_anomaly = false;
};

std::unique_ptr<cg::optim::Optimizer> make_optimizer(const TrainOptions& o, const std::vector<cg::Tensor>& params) {
  if (o.optimizer == "sgd")
    return std::make_unique<cg::optim::SGD>(params, cg::optim::SGDOptions{.lr = o.lr, .weight_decay = o.weight_decay});
  if (o.optimizer == "momentum")
    return std::make_unique<cg::optim::SGD>(
        params, cg::optim::SGDOptions{.lr = o.lr, .momentum = o.momentum, .weight_decay = o.weight_decay});
  if (o.optimizer == "adam")
    return std::make_unique<cg::optim::Adam>(params, cg::optim::AdamOptions{.lr = o.lr, .weight_decay = o.weight_decay});
  return std::make_unique<cg::optim::AdamW>(params,
                                            cg::optim::AdamWOptions{.lr = o.lr, .weight_decay = o.weight_decay});
}

double default_lr(const std::string& optimizer) {
  if (optimizer == "sgd") return 0.1;
  if (optimizer == "momentum") return 0.02;
  return 1e-3;
}

// Progress on stderr: redrawn in place on a terminal, silent otherwise (logs stay readable).
class Progress {
 public:
  Progress(int epoch, int epochs, std::int64_t total) : epoch_(epoch), epochs_(epochs), total_(total) {
    tty_ = isatty(STDERR_FILENO);
    start_ = std::chrono::steady_clock::now();
  }
  void update(std::int64_t done, double loss) {
    if (!tty_) return;
    const auto now = std::chrono::steady_clock::now();
    if (done < total_ && now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    const double s = std::chrono::duration<double>(now - start_).count();
    const double rate = s > 0 ? static_cast<double>(done) / s : 0;
    const int width = 30, filled = static_cast<int>(width * done / std::max<std::int64_t>(total_, 1));
    std::fprintf(stderr, "\repoch %d/%d [%s%s] %6lld/%lld  %7.0f samples/s  loss %.4f  ETA %4.1fs ", epoch_, epochs_,
                 std::string(filled, '#').c_str(), std::string(width - filled, '.').c_str(), static_cast<long long>(done),
                 static_cast<long long>(total_), rate, loss, rate > 0 ? static_cast<double>(total_ - done) / rate : 0.0);
    if (done >= total_) std::fprintf(stderr, "\n");
  }

 private:
  int epoch_, epochs_;
  std::int64_t total_;
  bool tty_;
  std::chrono::steady_clock::time_point start_, last_{};
};

void load_data(const TrainOptions& o, cg::data::Dataset& train, cg::data::Dataset& test) {
  if (!o.csv.empty()) {
    train = cg::data::load_csv(o.csv, o.label);
    CG_CHECK(!o.test_csv.empty(), ValueError, "train: --csv needs --test-csv FILE for evaluation");
    test = cg::data::load_csv(o.test_csv, o.label);
  } else {
    train = cg::data::load_idx(o.data_dir, true);
    test = cg::data::load_idx(o.data_dir, false);
  }
  CG_CHECK(train.inputs.shape().size() == test.inputs.shape().size(), ShapeError,
           "train: training and test samples differ in shape: ", train.inputs.shape(), " vs ", test.inputs.shape());
}

void run_train(const TrainOptions& o_in) {
  TrainOptions o = o_in;
  if (o.lr < 0) o.lr = default_lr(o.optimizer);
  if (o.threads > 0) cg::set_num_threads(o.threads);
  if (o.detect_anomaly) cg::AnomalyMode::set_enabled(true);

  cg::data::Dataset train, test;
  load_data(o, train, test);
  cli::CheckpointInfo info;
  info.norm = cg::data::compute_normalization(train.inputs);
  cg::data::normalize_(train.inputs, info.norm);
  cg::data::normalize_(test.inputs, info.norm);
  info.num_classes = std::max(train.num_classes, test.num_classes);
  info.input_shape = cg::Dims(std::span<const std::int64_t>(train.inputs.shape().begin() + 1, train.inputs.shape().end()));

  std::shared_ptr<cg::nn::Sequential> model;
  int start_epoch = 1;
  if (!o.resume.empty()) {
    model = cli::load_checkpoint(o.resume, info);
    start_epoch = std::stoi(info.extra.count("chaingrad.epoch") ? info.extra["chaingrad.epoch"] : "0") + 1;
  } else {
    info.spec = cg::nn::canonical_spec(o.model);
    model = cg::nn::build_model(info.spec, info.input_shape, o.seed);
  }
  const cg::Dims out_shape = cg::nn::output_shape(cg::nn::ModelSpec::parse(info.spec), info.input_shape);
  CG_CHECK(out_shape.size() == 1 && out_shape[0] == info.num_classes, ShapeError, "train: the model '", info.spec,
           "' outputs shape ", out_shape, " per sample but the data has ", info.num_classes,
           " classes (end the model with linear(", info.num_classes, "))");
  auto opt = make_optimizer(o, model->parameters());
  if (!o.resume.empty() && fs::exists(cli::optimizer_path(o.resume)))
    opt->load_state(cg::io::load_safetensors(cli::optimizer_path(o.resume)).tensors);

  fs::create_directories(o.out);
  if (!o.json)
    std::fprintf(stderr, "model: %s (%lld parameters)\ndata: %lld training and %lld test samples of shape %s\n",
                 info.spec.c_str(), static_cast<long long>(model->num_parameters()),
                 static_cast<long long>(train.size()), static_cast<long long>(test.size()),
                 cg::to_string(info.input_shape).c_str());

  cg::data::DataLoader loader(train, {.batch_size = o.batch_size, .shuffle = true, .seed = o.seed});
  // Schedules advance once per batch, so a resumed run lands on the same learning rate.
  std::unique_ptr<cg::optim::LRScheduler> schedule;
  const std::int64_t total_steps = static_cast<std::int64_t>(o.epochs) * loader.num_batches();
  if (o.schedule == "cosine")
    schedule = std::make_unique<cg::optim::CosineAnnealingLR>(*opt, total_steps);
  else if (o.schedule == "step")
    schedule = std::make_unique<cg::optim::StepLR>(*opt, std::max<std::int64_t>(total_steps / 3, 1), 0.1);
  if (schedule) schedule->set_step(static_cast<std::int64_t>(start_epoch - 1) * loader.num_batches());
  std::vector<cli::EpochRecord> history;
  for (int epoch = start_epoch; epoch <= o.epochs; ++epoch) {
    loader.set_epoch(epoch);
    model->train();
    Progress progress(epoch, o.epochs, train.size());
    double loss_sum = 0;
    std::int64_t seen = 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (std::int64_t b = 0; b < loader.num_batches(); ++b) {
      const cg::data::Batch batch = loader.batch(b);
      const cg::Tensor loss = cg::cross_entropy((*model)(batch.inputs), batch.labels);
      opt->zero_grad();
      loss.backward();
      opt->step();
      if (schedule) schedule->step();
      const double l = loss.item();
      CG_CHECK(std::isfinite(l), ValueError, "train: the loss became ", l, " at epoch ", epoch, ", batch ", b,
               "; training diverged (try a smaller --lr). The last good checkpoint is in ", o.out);
      loss_sum += l * static_cast<double>(batch.labels.numel());
      seen += batch.labels.numel();
      progress.update(seen, loss_sum / static_cast<double>(seen));
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const cli::Evaluation ev = cli::evaluate(*model, test, info.num_classes);
    cli::EpochRecord rec{epoch, loss_sum / static_cast<double>(seen), ev.loss, ev.accuracy, seconds,
                         static_cast<double>(seen) / seconds};
    history.push_back(rec);

    info.extra["chaingrad.epoch"] = std::to_string(epoch);
    info.extra["chaingrad.seed"] = std::to_string(o.seed);
    const std::string epoch_path = (fs::path(o.out) / ("epoch-" + std::to_string(epoch) + ".safetensors")).string();
    const std::string last_path = (fs::path(o.out) / "last.safetensors").string();
    for (const std::string& p : {epoch_path, last_path}) {
      cli::save_checkpoint(p, *model, info);
      cg::io::save_safetensors(cli::optimizer_path(p), opt->state());
    }
    nlohmann::json metrics = nlohmann::json::array();
    for (const auto& r : history)
      metrics.push_back({{"epoch", r.epoch}, {"train_loss", r.train_loss}, {"test_loss", r.test_loss},
                         {"test_accuracy", r.test_accuracy}, {"epoch_seconds", r.epoch_seconds},
                         {"samples_per_second", r.samples_per_second}});
    cg::io::write_file_atomic((fs::path(o.out) / "metrics.json").string(),
                              nlohmann::json{{"model", info.spec}, {"epochs", metrics}}.dump(2) + "\n");
    cg::io::write_file_atomic((fs::path(o.out) / "training.svg").string(), cli::training_plot_svg(history));

    if (o.json) {
      std::printf("%s\n", nlohmann::json{{"epoch", epoch}, {"train_loss", rec.train_loss}, {"test_loss", rec.test_loss},
                                         {"test_accuracy", rec.test_accuracy}, {"epoch_seconds", rec.epoch_seconds},
                                         {"samples_per_second", rec.samples_per_second}}
                              .dump()
                              .c_str());
      std::fflush(stdout);
    } else {
      std::fprintf(stderr, "epoch %d: train loss %.4f, test loss %.4f, test accuracy %.2f%% (%.2fs, %.0f samples/s)\n",
                   epoch, rec.train_loss, rec.test_loss, 100 * rec.test_accuracy, seconds, rec.samples_per_second);
    }
  }
  if (!o.json && !history.empty()) {
    std::printf("\n epoch | train loss | test loss | test acc | seconds\n-------+------------+-----------+----------+--------\n");
    for (const auto& r : history)
      std::printf(" %5d | %10.4f | %9.4f | %7.2f%% | %7.2f\n", r.epoch, r.train_loss, r.test_loss, 100 * r.test_accuracy,
                  r.epoch_seconds);
    std::printf("\ncheckpoint: %s\nmetrics:    %s\nplot:       %s\n", (fs::path(o.out) / "last.safetensors").c_str(),
                (fs::path(o.out) / "metrics.json").c_str(), (fs::path(o.out) / "training.svg").c_str());
  }
}

}  // namespace

void add_train_command(CLI::App& app) {
  auto o = std::make_shared<TrainOptions>();
  auto* cmd = app.add_subcommand("train", "Train a classifier (default: an MLP on Fashion-MNIST)");
  cmd->add_option("--data", o->data_dir, "Folder with IDX files (train-images-idx3-ubyte[.gz], ...)");
  cmd->add_option("--csv", o->csv, "Training data as CSV with a header (use with --label, --test-csv)");
  cmd->add_option("--test-csv", o->test_csv, "Test data as CSV");
  cmd->add_option("--label", o->label, "Label column of the CSV files");
  cmd->add_option("--model", o->model, "Layer list, e.g. \"linear(256) relu linear(10)\"")->capture_default_str();
  cmd->add_option("--optimizer", o->optimizer, "sgd | momentum | adam | adamw")
      ->check(CLI::IsMember({"sgd", "momentum", "adam", "adamw"}))
      ->capture_default_str();
  cmd->add_option("--schedule", o->schedule, "Learning-rate schedule over the whole run: cosine | step | constant")
      ->check(CLI::IsMember({"cosine", "step", "constant"}))
      ->capture_default_str();
  cmd->add_option("--lr", o->lr, "Learning rate (default: 0.1 sgd, 0.02 momentum, 1e-3 adam/adamw)");
  cmd->add_option("--momentum", o->momentum, "Momentum for --optimizer momentum")->capture_default_str();
  cmd->add_option("--weight-decay", o->weight_decay, "Weight decay")->capture_default_str();
  cmd->add_option("--batch-size", o->batch_size, "Batch size")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--epochs", o->epochs, "Epochs")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--seed", o->seed, "Seed for initialization and shuffling")->capture_default_str();
  cmd->add_option("--threads", o->threads, "Threads (default: all cores)")->check(CLI::PositiveNumber);
  cmd->add_option("--out", o->out, "Output folder for checkpoints, metrics and plot")->capture_default_str();
  cmd->add_option("--resume", o->resume, "Continue from a checkpoint written by train");
  cmd->add_flag("--json", o->json, "One JSON object per epoch on stdout; progress on stderr");
  cmd->add_flag("--detect-anomaly", o->detect_anomaly, "Stop at the first NaN/Inf, naming the op");
  cmd->callback([o] { run_train(*o); });
}
