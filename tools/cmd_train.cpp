// `chaingrad train`: trains a classifier (by default an MLP on Fashion-MNIST), evaluates after
// every epoch, and leaves a checkpoint, a metrics file and a plot in --out.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "chaingrad/chaingrad.hpp"
#include "chaingrad/data.hpp"
#include "chaingrad/io.hpp"
#include "chaingrad/nn.hpp"
#include "chaingrad/optim.hpp"
#include "chaingrad/gradflow.hpp"
#include "chaingrad/report.hpp"
#include "checkpoint.hpp"
#include "commands.hpp"
#include "plot.hpp"
#include "train_distributed.hpp"

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
  std::string normalize = "standard";  // standard: (x - mean) / std of the training set; none: as loaded
  double lr = -1, momentum = 0.9, weight_decay = 0;
  std::int64_t batch_size = 64;
  int epochs = 5;
  std::uint64_t seed = 0;
  int threads = 0;
  std::string out = "runs/latest";
  std::string resume;
  bool json = false;
  bool detect_anomaly = false;
  std::string report;                // --report FILE: HTML training report, rewritten after each epoch
  bool gradflow = false;             // --gradflow: per-layer gradient-flow table at each epoch's end
  std::int64_t gradflow_every = 50;  // steps between gradient-flow recordings
  std::int64_t save_every = 0;  // steps between mid-epoch saves of last.safetensors; 0: epoch ends only
  std::set<std::string> given;  // options given on the command line (single names: "seed", "lr")
  bool distributed = false;     // --distributed: one rank of an mpirun job (docs/distributed.md)
  bool overlap_comm = false;    // --overlap-comm: allreduce gradient buckets during backward
  double bucket_mb = 25;        // --bucket-mb: gradient bucket size
  bool step_in_backward = true;  // --no-step-in-backward: --optimizer sgd makes every gradient, then steps
};

// ---- resume and reliability (docs/reliability.md) ----
// A checkpoint records the training position: `chaingrad.epoch` (completed epochs),
// `chaingrad.batch` (batches done in the next epoch; 0 at an epoch's end), `chaingrad.step`
// (optimizer steps in all), the running sums of the epoch in progress, the history for
// metrics.json, the reference loss of the divergence check, Dropout generator states and the
// hyperparameters below. A resume takes these hyperparameters from the checkpoint unless given.
struct ResumableOption {
  const char* name;  // CLI single name and `chaingrad.<key>` with '-' as '_'
  std::string TrainOptions::*text = nullptr;
  double TrainOptions::*real = nullptr;
  std::int64_t TrainOptions::*integer = nullptr;
};
const ResumableOption kResumable[] = {
    {"optimizer", &TrainOptions::optimizer},     {"schedule", &TrainOptions::schedule},
    {"normalize", &TrainOptions::normalize},
    {"lr", nullptr, &TrainOptions::lr},          {"momentum", nullptr, &TrainOptions::momentum},
    {"weight-decay", nullptr, &TrainOptions::weight_decay}, {"batch-size", nullptr, nullptr, &TrainOptions::batch_size},
};

std::string meta_key(const char* name) {
  std::string k = std::string("chaingrad.") + name;
  for (char& c : k)
    if (c == '-') c = '_';
  return k;
}

std::string exact(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

double meta_number(const std::map<std::string, std::string>& meta, const std::string& key, double fallback) {
  const auto it = meta.find(key);
  if (it == meta.end() || it->second.empty()) return fallback;
  try {
    return std::stod(it->second);
  } catch (const std::exception&) {
    throw cg::ValueError("--resume: the checkpoint's " + key + " is not a number: '" + it->second + "'");
  }
}

// Loss monitor: stops on a NaN/Inf loss, or on a sustained blow-up: the mean loss of the last
// kBlowUpSteps steps above kBlowUpFactor times the reference, the loss of the run's first step
// (recorded in the checkpoint, so a resumed run keeps it). The reference is the first step's
// loss because a too-large learning rate can blow the loss up within a few dozen steps, and a
// mean over them would hide the blow-up. A mean over the window (not a median, not a streak):
// with large weights most batches can be classified with a huge margin at loss ~0 while the few
// others have astronomical losses; the mean sees that, a median or a streak does not.
// Checkpoints are not written right after a step whose loss is above that threshold.
constexpr double kBlowUpFactor = 1e3;
constexpr std::size_t kBlowUpSteps = 50;
constexpr int kReferenceSteps = 1;

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
  const bool csv = !o.csv.empty();
  CG_CHECK(!csv || !o.test_csv.empty(), ValueError, "train: --csv needs --test-csv FILE for evaluation");
  // The test set loads on a second thread while this one loads the training set. A failure of the
  // training set is reported first, as when they loaded in turn. IDX images stay bytes (a quarter
  // of the memory; batches are converted as they are gathered).
  auto test_set = std::async(std::launch::async, [&o, csv] {
    return csv ? cg::data::load_csv(o.test_csv, o.label) : cg::data::load_idx(o.data_dir, false, /*keep_bytes=*/true);
  });
  train = csv ? cg::data::load_csv(o.csv, o.label) : cg::data::load_idx(o.data_dir, true, /*keep_bytes=*/true);
  test = test_set.get();
  CG_CHECK(train.inputs.shape().size() == test.inputs.shape().size(), ShapeError,
           "train: training and test samples differ in shape: ", train.inputs.shape(), " vs ", test.inputs.shape());
}

// A resume continues the run as it was configured: options not given now come from the checkpoint.
void apply_resume_options(TrainOptions& o) {
  const std::map<std::string, std::string> meta = cli::read_safetensors_metadata(o.resume);
  for (const ResumableOption& r : kResumable) {
    const auto it = meta.find(meta_key(r.name));
    if (o.given.count(r.name) || it == meta.end()) continue;
    if (r.text) o.*r.text = it->second;
    if (r.real) o.*r.real = meta_number(meta, it->first, o.*r.real);
    if (r.integer) o.*r.integer = static_cast<std::int64_t>(meta_number(meta, it->first, 0));
  }
  if (!o.given.count("seed") && meta.count("chaingrad.seed"))
    o.seed = static_cast<std::uint64_t>(std::stoull(meta.at("chaingrad.seed")));
  if (!o.given.count("epochs") && meta.count("chaingrad.epochs"))
    o.epochs = static_cast<int>(meta_number(meta, "chaingrad.epochs", o.epochs));
  CG_CHECK(o.batch_size > 0 && o.epochs > 0 && (o.optimizer == "sgd" || o.optimizer == "momentum" ||
                                                o.optimizer == "adam" || o.optimizer == "adamw"),
           ValueError, o.resume, ": the checkpoint records invalid training options (batch size ", o.batch_size,
           ", epochs ", o.epochs, ", optimizer '", o.optimizer, "')");
  CG_CHECK(o.normalize == "standard" || o.normalize == "none", ValueError, o.resume,
           ": the checkpoint records an unknown input scaling '", o.normalize, "' (expected standard or none)");
}

void run_train(const TrainOptions& o_in) {
  TrainOptions o = o_in;
  if (!o.resume.empty()) apply_resume_options(o);
  // --distributed: --batch-size is per rank; from here on o.batch_size is the global batch (what
  // checkpoints record), and rank 0 alone prints and writes files.
  std::unique_ptr<cli::DistributedTraining> dist;
  if (o.distributed)
    dist = std::make_unique<cli::DistributedTraining>(
        o.batch_size, !o.resume.empty() && !o.given.count("batch-size"), o.threads,
        cli::DistributedOptions{.overlap = o.overlap_comm, .bucket_mb = o.bucket_mb, .quiet = o.json});
  const bool is_root = !dist || dist->is_root();
  if (o.lr < 0) o.lr = default_lr(o.optimizer);
  if (o.threads > 0) cg::set_num_threads(o.threads);
  if (o.detect_anomaly) cg::AnomalyMode::set_enabled(true);

  cg::data::Dataset train, test;
  {
    // The kernels' code generation (about 30 ms, cg::warm_up) happens on another thread while the
    // data sets load, not inside the first training step.
    std::jthread warm_up([] { cg::warm_up(); });
    load_data(o, train, test);
  }
  cli::CheckpointInfo info;
  if (o.normalize == "standard") {
    info.norm = cg::data::compute_normalization(train);
    cg::data::normalize_(train, info.norm);
    cg::data::normalize_(test, info.norm);
  }
  info.num_classes = std::max(train.num_classes, test.num_classes);
  info.input_shape = cg::Dims(std::span<const std::int64_t>(train.inputs.shape().begin() + 1, train.inputs.shape().end()));

  std::shared_ptr<cg::nn::Sequential> model;
  int start_epoch = 1;
  std::int64_t start_batch = 0, start_step = -1;  // -1: the checkpoint records no step
  if (!o.resume.empty()) {
    // An explicit --model must fit the checkpoint's tensors (load_state_dict names any mismatch).
    model = cli::load_checkpoint(o.resume, info, o.given.count("model") ? cg::nn::canonical_spec(o.model) : "");
    start_epoch = static_cast<int>(meta_number(info.extra, "chaingrad.epoch", 0)) + 1;
    start_batch = static_cast<std::int64_t>(meta_number(info.extra, "chaingrad.batch", 0));
    start_step = static_cast<std::int64_t>(meta_number(info.extra, "chaingrad.step", -1));
    cli::restore_generator_states(*model, info.extra);
  } else {
    info.spec = cg::nn::canonical_spec(o.model);
    model = cg::nn::build_model(info.spec, info.input_shape, o.seed);
  }
  const cg::Dims out_shape = cg::nn::output_shape(cg::nn::ModelSpec::parse(info.spec), info.input_shape);
  CG_CHECK(out_shape.size() == 1 && out_shape[0] == info.num_classes, ShapeError, "train: the model '", info.spec,
           "' outputs shape ", out_shape, " per sample but the data has ", info.num_classes,
           " classes (end the model with linear(", info.num_classes, "))");
  // The recorded step is exact; a checkpoint without one (or a changed --batch-size) resumes at
  // the start of its next epoch.
  const bool same_batches = meta_number(info.extra, "chaingrad.batch_size", static_cast<double>(o.batch_size)) ==
                            static_cast<double>(o.batch_size);
  CG_CHECK(same_batches || start_batch == 0, ValueError, o.resume,
           ": the checkpoint was saved in the middle of an epoch with --batch-size ",
           info.extra["chaingrad.batch_size"], "; resume it with that batch size, or from an epoch-N checkpoint");
  auto opt = make_optimizer(o, model->parameters());
  // SGD steps the weights inside backward, as the products that make their gradients come out
  // (Note [updates in backward], autograd.hpp), except where gradients must be seen whole: averaged
  // over the ranks, or on a step that --gradflow records. Adam's steps in backward measured slower
  // (BENCHMARKS.md, "Session 21"): its update is bound by its own passes, not by the gradient's.
  const bool in_backward = (o.optimizer == "sgd" || o.optimizer == "momentum") && o.step_in_backward && !dist;
  opt->set_in_backward(in_backward);
  if (!o.resume.empty()) {
    bool found = false;
    auto state = cli::load_optimizer_state(o.resume, start_step < 0 ? "" : std::to_string(start_step), found);
    if (found) {
      try {
        opt->load_state(state);
      } catch (const cg::Error& e) {
        throw cg::ValueError(cli::optimizer_path(o.resume) + ": " + e.what());
      }
    } else if (!o.json) {
      std::fprintf(stderr, "warning: no optimizer state beside %s; the optimizer starts afresh\n", o.resume.c_str());
    }
  }

  if (is_root) {
    fs::create_directories(o.out);
    cli::remove_stale_temp_files(o.out);  // left by a run that was killed while saving
  }
  if (!o.json)
    std::fprintf(stderr, "model: %s (%lld parameters)\ndata: %lld training and %lld test samples of shape %s\n",
                 info.spec.c_str(), static_cast<long long>(model->num_parameters()),
                 static_cast<long long>(train.size()), static_cast<long long>(test.size()),
                 cg::to_string(info.input_shape).c_str());

  cg::data::DataLoader loader(train, {.batch_size = o.batch_size, .shuffle = true, .seed = o.seed});
  if (dist) {  // rank 0's parameters to every rank; this rank's share of each batch
    dist->attach(*model, train, loader);
    if (!o.json) std::fprintf(stderr, "%s\n", dist->describe().c_str());
  }
  // Schedules advance once per batch, so a resumed run lands on the same learning rate.
  std::unique_ptr<cg::optim::LRScheduler> schedule;
  const std::int64_t total_steps = static_cast<std::int64_t>(o.epochs) * loader.num_batches();
  if (o.schedule == "cosine")
    schedule = std::make_unique<cg::optim::CosineAnnealingLR>(*opt, total_steps);
  else if (o.schedule == "step")
    schedule = std::make_unique<cg::optim::StepLR>(*opt, std::max<std::int64_t>(total_steps / 3, 1), 0.1);
  if (start_step < 0) start_batch = 0;
  CG_CHECK(start_batch <= loader.num_batches(), ValueError, o.resume, ": the checkpoint stopped after batch ",
           start_batch, " of an epoch, but an epoch has ", loader.num_batches(), " batches here (different data?)");
  std::int64_t step = start_step >= 0 && same_batches
                          ? start_step
                          : static_cast<std::int64_t>(start_epoch - 1) * loader.num_batches() + start_batch;
  if (schedule) schedule->set_step(step);
  std::vector<cli::EpochRecord> history;
  // ---- bookkeeping for resume, the divergence check and interruption ----
  const auto history_json = [&] {
    nlohmann::json metrics = nlohmann::json::array();
    for (const auto& r : history)
      metrics.push_back({{"epoch", r.epoch}, {"train_loss", r.train_loss}, {"test_loss", r.test_loss},
                         {"test_accuracy", r.test_accuracy}, {"epoch_seconds", r.epoch_seconds},
                         {"samples_per_second", r.samples_per_second}});
    return metrics;
  };
  if (!o.resume.empty() && info.extra.count("chaingrad.history")) {
    const auto j = nlohmann::json::parse(info.extra["chaingrad.history"], nullptr, false);
    if (j.is_array())
      for (const auto& r : j)
        if (r.is_object() && r.value("epoch", 0) < start_epoch)
          history.push_back({r.value("epoch", 0), r.value("train_loss", 0.0), r.value("test_loss", 0.0),
                             r.value("test_accuracy", 0.0), r.value("epoch_seconds", 0.0),
                             r.value("samples_per_second", 0.0)});
  }
  const bool resumed_mid_epoch = start_batch > 0;
  const double resumed_loss_sum = resumed_mid_epoch ? meta_number(info.extra, "chaingrad.epoch_loss_sum", 0) : 0;
  const auto resumed_seen =
      resumed_mid_epoch ? static_cast<std::int64_t>(meta_number(info.extra, "chaingrad.epoch_seen", 0)) : 0;
  int ref_count = o.resume.empty() ? 0 : static_cast<int>(meta_number(info.extra, "chaingrad.reference_steps", 0));
  double ref_sum = ref_count * meta_number(info.extra, "chaingrad.reference_loss", 0);
  std::vector<double> recent;  // the last kBlowUpSteps losses, a ring
  std::size_t recent_next = 0;
  bool above_threshold = false;  // the latest loss is far above the reference: do not save now
  const std::string last_path = (fs::path(o.out) / "last.safetensors").string();
  std::string last_good = o.resume.empty() ? "" : o.resume + " (the checkpoint this run resumed from)";

  // Records the position (epochs done, batches done in the next one) and writes `paths`.
  const auto save = [&](const std::vector<std::string>& paths, int epochs_done, std::int64_t batch, double loss_sum,
                        std::int64_t seen) {
    CG_CHECK(cli::state_is_finite(*model), ValueError, "train: training diverged: a parameter became NaN or infinite",
             " after step ", step, "; nothing was saved (try a smaller --lr). ",
             last_good.empty() ? std::string("No checkpoint was written") : "The last good checkpoint is " + last_good);
    auto& x = info.extra;
    x["chaingrad.epoch"] = std::to_string(epochs_done);
    x["chaingrad.batch"] = std::to_string(batch);
    x["chaingrad.step"] = std::to_string(step);
    x["chaingrad.epoch_loss_sum"] = exact(loss_sum);
    x["chaingrad.epoch_seen"] = std::to_string(seen);
    x["chaingrad.reference_loss"] = exact(ref_count ? ref_sum / ref_count : 0.0);
    x["chaingrad.reference_steps"] = std::to_string(ref_count);
    x["chaingrad.history"] = history_json().dump();
    x["chaingrad.seed"] = std::to_string(o.seed);
    x["chaingrad.epochs"] = std::to_string(o.epochs);
    for (const ResumableOption& r : kResumable)
      x[meta_key(r.name)] = r.text ? o.*r.text : r.real ? exact(o.*r.real) : std::to_string(o.*r.integer);
    for (const auto& [k, v] : cli::generator_states(*model)) x[k] = v;
    const auto state = opt->state();
    if (is_root)
      for (const std::string& p : paths) cli::save_training_checkpoint(p, *model, info, state);
    last_good = last_path + " (epoch " + std::to_string(epochs_done) +
                (batch ? " + " + std::to_string(batch) + " batches" : "") + ", step " + std::to_string(step) + ")";
  };
  // Throws when the loss is NaN/Inf or has stayed far above the reference (see kBlowUpFactor).
  const auto check_loss = [&](double l, int epoch, std::int64_t b) {
    std::ostringstream what;
    what.precision(6);
    if (!std::isfinite(l)) {
      what << "the loss became " << l;
    } else if (ref_count < kReferenceSteps) {
      ref_sum += l;
      ++ref_count;
      return;
    } else {
      const double threshold = kBlowUpFactor * std::max(ref_sum / ref_count, 1e-3);
      above_threshold = l > threshold;
      if (recent.size() < kBlowUpSteps) {
        recent.push_back(l);
      } else {
        recent[recent_next] = l;
        recent_next = (recent_next + 1) % kBlowUpSteps;
      }
      if (recent.size() < kBlowUpSteps) return;
      double mean = 0;
      for (double v : recent) mean += v / static_cast<double>(kBlowUpSteps);
      if (mean <= threshold) return;
      what << "the mean loss of the last " << kBlowUpSteps << " steps, " << mean << ", is above " << threshold
           << " (" << kBlowUpFactor << " x the loss of the run's first step)";
    }
    what << " at epoch " << epoch << ", batch " << b + 1 << " of " << loader.num_batches() << " (step " << step + 1
         << "); try a smaller --lr. "
         << (last_good.empty() ? std::string("No checkpoint was written") : "The last good checkpoint is " + last_good);
    throw cg::ValueError("train: training diverged: " + what.str());
  };
  const auto exit_interrupted = [&](int sig, bool saved) {
    std::fflush(stdout);
    std::fprintf(stderr, "\n%s: stopped after step %lld; %s\ncontinue with: chaingrad train [the same data options] --resume %s\n",
                 sig == SIGINT ? "interrupted (SIGINT)" : "terminated (SIGTERM)", static_cast<long long>(step),
                 saved ? ("saved " + last_good).c_str()
                       : ("not saved (the loss was blowing up); the last good checkpoint is " +
                          (last_good.empty() ? std::string("none") : last_good))
                             .c_str(),
                 last_path.c_str());
    std::fflush(stderr);
    std::exit(128 + sig);
  };
  const cli::StopSignals stop_signals;  // SIGINT/SIGTERM: finish the step, save, exit 128 + signal

  // Gradient flow (--gradflow, --report; gradflow.hpp) and the HTML report (report.hpp).
  std::unique_ptr<cg::gradflow::Recorder> flow;
  if (o.gradflow || !o.report.empty())
    flow = std::make_unique<cg::gradflow::Recorder>(*model,
                                                    cg::gradflow::Options{.every = o.gradflow_every, .first_step = step});
  std::unique_ptr<cg::report::Report> report;
  if (!o.report.empty() && is_root) {
    const auto num = [](double v) {
      std::ostringstream s;
      s << v;
      return s.str();
    };
    const std::string momentum = o.optimizer == "momentum" ? ", momentum " + num(o.momentum) : "";
    report = std::make_unique<cg::report::Report>(
        "chaingrad training report",
        std::vector<std::pair<std::string, std::string>>{
            {"model", info.spec},
            {"data", (o.csv.empty() ? o.data_dir : o.csv + ", " + o.test_csv) + " (" + std::to_string(train.size()) +
                         " training, " + std::to_string(test.size()) + " test samples of shape " +
                         cg::to_string(info.input_shape) + ")"},
            {"optimizer", o.optimizer + ", lr " + num(o.lr) + momentum + ", weight decay " + num(o.weight_decay) +
                              ", schedule " + o.schedule},
            {"batches", "batch size " + std::to_string(o.batch_size) + ", " + std::to_string(loader.num_batches()) +
                            " steps per epoch, " + std::to_string(o.epochs) + " epochs, seed " + std::to_string(o.seed)},
            {"resumed from", o.resume.empty() ? "-" : o.resume}},
        *model, flow.get());
    for (const auto& r : history)  // epochs of a resumed run
      report->add_epoch(
          {r.epoch, r.epoch * loader.num_batches(), r.train_loss, r.test_loss, r.test_accuracy, r.epoch_seconds});
  }
  for (int epoch = start_epoch; epoch <= o.epochs; ++epoch) {
    loader.set_epoch(epoch);
    model->train();
    Progress progress(epoch, o.epochs, train.size());
    const bool first = epoch == start_epoch && resumed_mid_epoch;
    double loss_sum = first ? resumed_loss_sum : 0;
    std::int64_t seen = first ? resumed_seen : 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (std::int64_t b = first ? start_batch : 0; b < loader.num_batches(); ++b) {
      const cg::data::Batch batch = dist ? dist->batch(b) : loader.batch(b);
      const cg::Tensor loss = cg::cross_entropy((*model)(batch.inputs), batch.labels);
      opt->zero_grad();
      if (in_backward && flow) opt->set_in_backward(!flow->due());
      if (dist) dist->before_backward();
      loss.backward();
      if (dist) dist->after_backward();  // gradients averaged over the ranks
      if (flow) flow->before_step(batch.inputs, batch.labels);  // a branch, except every --gradflow-every steps
      opt->step();
      if (schedule) schedule->step();
      const double l = dist ? dist->reduce_loss(loss.item(), cli::StopSignals::received()) : loss.item();
      if (flow) flow->after_step(l);
      check_loss(l, epoch, b);
      const std::int64_t batch_samples = dist ? dist->global_count() : batch.labels.numel();
      loss_sum += l * static_cast<double>(batch_samples);
      seen += batch_samples;
      progress.update(seen, loss_sum / static_cast<double>(seen));
      ++step;
      // Mid-epoch saves: every --save-every steps and on SIGINT/SIGTERM; none while the loss is
      // blowing up, so last.safetensors stays the last good state.
      const int sig = dist ? dist->agreed_signal() : cli::StopSignals::received();  // all ranks stop together
      const bool periodic = o.save_every > 0 && step % o.save_every == 0 && b + 1 < loader.num_batches();
      if ((sig || periodic) && !above_threshold) save({last_path}, epoch - 1, b + 1, loss_sum, seen);
      if (sig) exit_interrupted(sig, !above_threshold);
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const cli::Evaluation ev =
        dist ? dist->evaluate(*model, test, info.num_classes) : cli::evaluate(*model, test, info.num_classes);
    cli::EpochRecord rec{epoch, loss_sum / static_cast<double>(seen), ev.loss, ev.accuracy, seconds,
                         static_cast<double>(seen - (first ? resumed_seen : 0)) / seconds};
    history.push_back(rec);

    const std::string epoch_path = (fs::path(o.out) / ("epoch-" + std::to_string(epoch) + ".safetensors")).string();
    if (!above_threshold)
      save({epoch_path, last_path}, epoch, 0, 0.0, 0);
    else
      std::fprintf(stderr, "epoch %d: not saved: the last loss is over %g x the run's first step's\n", epoch,
                   kBlowUpFactor);
    const nlohmann::json metrics = history_json();
    if (is_root) {
      cg::io::write_file_atomic((fs::path(o.out) / "metrics.json").string(),
                                nlohmann::json{{"model", info.spec}, {"epochs", metrics}}.dump(2) + "\n");
      cg::io::write_file_atomic((fs::path(o.out) / "training.svg").string(), cli::training_plot_svg(history));
    }
    if (report) {
      report->add_epoch({epoch, step, rec.train_loss, rec.test_loss, rec.test_accuracy, seconds});
      const bool fashion = o.csv.empty() && info.num_classes == 10 && o.data_dir.find("fashion") != std::string::npos;
      report->set_confusion(ev.confusion, fashion ? cg::report::fashion_mnist_classes() : std::vector<std::string>{});
      report->set_progress(epoch < o.epochs ? "epoch " + std::to_string(epoch) + " of " + std::to_string(o.epochs)
                                            : "finished after " + std::to_string(o.epochs) + (o.epochs == 1 ? " epoch" : " epochs"),
                           epoch < o.epochs);
      report->write(o.report);
    }
    if (o.gradflow) std::fprintf(stderr, "%s", flow->epoch_summary().c_str());

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
    if (const int sig = dist ? dist->agree_signal(cli::StopSignals::received()) : cli::StopSignals::received();
        sig && epoch < o.epochs)
      exit_interrupted(sig, true);
  }
  if (!o.json && !history.empty()) {
    std::printf("\n epoch | train loss | test loss | test acc | seconds\n-------+------------+-----------+----------+--------\n");
    for (const auto& r : history)
      std::printf(" %5d | %10.4f | %9.4f | %7.2f%% | %7.2f\n", r.epoch, r.train_loss, r.test_loss, 100 * r.test_accuracy,
                  r.epoch_seconds);
    std::printf("\ncheckpoint: %s\nmetrics:    %s\nplot:       %s\n", (fs::path(o.out) / "last.safetensors").c_str(),
                (fs::path(o.out) / "metrics.json").c_str(), (fs::path(o.out) / "training.svg").c_str());
  }
  if (!o.json && report) std::printf("report:     %s\n", o.report.c_str());
}

}  // namespace

// CLI11's PositiveNumber reports "not in range 0 to 1.79e308" with every digit of DBL_MAX.
CLI::Validator integer_at_least(long long low) {
  return CLI::Validator(
      [low](std::string& in) -> std::string {
        std::size_t used = 0;
        long long v = 0;
        try {
          v = std::stoll(in, &used);
        } catch (const std::exception&) {
          used = 0;
        }
        if (used != in.size() || used == 0 || v < low)
          return "expected an integer of at least " + std::to_string(low) + "; got '" + in + "'";
        return "";
      },
      low > 0 ? "POSITIVE" : "NON-NEGATIVE");
}

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
  cmd->add_option("--normalize", o->normalize,
                  "Input scaling: standard (subtract the training set's mean, divide by its std) | none "
                  "(pixels in [0, 1], as PyTorch's reference scripts feed them)")
      ->check(CLI::IsMember({"standard", "none"}))
      ->capture_default_str();
  cmd->add_option("--lr", o->lr, "Learning rate (default: 0.1 sgd, 0.02 momentum, 1e-3 adam/adamw)");
  cmd->add_option("--momentum", o->momentum, "Momentum for --optimizer momentum")->capture_default_str();
  cmd->add_option("--weight-decay", o->weight_decay, "Weight decay")->capture_default_str();
  cmd->add_option("--batch-size", o->batch_size, "Batch size")->check(integer_at_least(1))->capture_default_str();
  cmd->add_option("--epochs", o->epochs, "Epochs")->check(integer_at_least(1))->capture_default_str();
  cmd->add_option("--seed", o->seed, "Seed for initialization and shuffling")->capture_default_str();
  cmd->add_option("--threads", o->threads, "Threads (default: all cores)")->check(integer_at_least(1));
  cmd->add_option("--out", o->out, "Output folder for checkpoints, metrics and plot")->capture_default_str();
  cmd->add_option("--resume", o->resume,
                  "Continue from a checkpoint written by train (its model, optimizer, schedule, data order and "
                  "step; options not given are taken from it)");
  cmd->add_flag("--json", o->json, "One JSON object per epoch on stdout; progress on stderr");
  cmd->add_flag("--detect-anomaly", o->detect_anomaly, "Stop at the first NaN/Inf, naming the op");
  cmd->add_flag("--distributed", o->distributed,
                "Data-parallel training as one rank of an MPI job: mpirun -np N chaingrad train --distributed ... "
                "(--batch-size is per rank; rank 0 prints and writes; docs/distributed.md)");
  cmd->add_flag("--overlap-comm", o->overlap_comm,
                "With --distributed: start each gradient bucket's allreduce while backward still runs");
  cmd->add_option("--bucket-mb", o->bucket_mb, "With --distributed: gradient bucket size in MB")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_flag("!--no-step-in-backward", o->step_in_backward,
                "With --optimizer sgd or momentum: make every weight's gradient and step after backward, rather "
                "than step the linear layers' weights inside backward as the products that make their gradients "
                "come out (the same update, with less memory traffic; for comparisons)");
  cmd->add_option("--report", o->report,
                  "Write a self-contained HTML training report (curves, gradient flow, warnings, confusion matrix) "
                  "to FILE, rewritten after each epoch")
      ->type_name("FILE");
  cmd->add_flag("--gradflow", o->gradflow,
                "Print per-layer gradient norms, update/weight ratios, activation statistics and gradient-flow "
                "warnings at each epoch's end");
  cmd->add_option("--gradflow-every", o->gradflow_every, "Steps between gradient-flow recordings (--gradflow, --report)")
      ->check(integer_at_least(1))
      ->capture_default_str();
  cmd->add_option("--save-every", o->save_every,
                  "Also save last.safetensors every N steps (mid-epoch; --resume continues from that step)")
      ->check(integer_at_least(0));
  cmd->callback([o, cmd] {
    // --resume takes the options not given here from the checkpoint.
    for (const CLI::Option* opt : cmd->get_options())
      if (opt->count() > 0) o->given.insert(opt->get_single_name());
    if (o->distributed)
      cli::run_distributed([&] { run_train(*o); });  // an error on any rank ends all of them
    else
      run_train(*o);
  });
}
