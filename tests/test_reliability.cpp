// Reliability (issue 6; docs/reliability.md): bit-exact resume, SIGINT, SIGKILL during saves,
// divergence, memory over a long run, numerics at extremes and the CLI's error lines.
//
// The training tests run the real `chaingrad` binary on a small CSV data set (512 samples) in a
// temporary folder, single-threaded, so each run takes a fraction of a second.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "chaingrad/chaingrad.hpp"
#include "chaingrad/data.hpp"
#include "chaingrad/io.hpp"
#include "chaingrad/nn.hpp"
#include "chaingrad/optim.hpp"

namespace cg = chaingrad;
namespace fs = std::filesystem;

#if defined(__SANITIZE_ADDRESS__)
#define CHAINGRAD_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CHAINGRAD_TEST_ASAN 1
#endif
#endif

namespace {

const std::string kCli = std::string(CHAINGRAD_BINARY_DIR) + "/chaingrad";

class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    path_ = fs::temp_directory_path() / ("chaingrad_test_reliability_" + std::to_string(rd()) + std::to_string(rd()));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

void write_all(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out << bytes;
}

// Three Gaussian blobs in `features` dimensions; train and test share the centers.
void write_csv(const std::string& path, int n, int features, int classes, std::uint64_t seed) {
  cg::Generator centers_gen(12345);
  std::vector<std::vector<double>> centers(classes, std::vector<double>(features));
  for (auto& c : centers)
    for (double& v : c) v = 2 * centers_gen.normal();
  cg::Generator gen(seed);
  std::ostringstream os;
  for (int j = 0; j < features; ++j) os << "x" << j << ",";
  os << "label\n";
  char buf[32];
  for (int i = 0; i < n; ++i) {
    const int y = static_cast<int>(gen.next_u64() % static_cast<std::uint64_t>(classes));
    for (int j = 0; j < features; ++j) {
      std::snprintf(buf, sizeof buf, "%.4f,", centers[y][j] + 1.5 * gen.normal());
      os << buf;
    }
    os << y << "\n";
  }
  write_all(path, os.str());
}

// ---- running the CLI ----

struct Outcome {
  int exit_code = -1;  // -1 when a signal ended it
  int signal = 0;
  std::string out, err;
};

class Child {
 public:
  Child(const std::vector<std::string>& args, const std::string& log_prefix)
      : out_path_(log_prefix + ".out"), err_path_(log_prefix + ".err") {
    std::vector<std::string> argv_s{kCli};
    argv_s.insert(argv_s.end(), args.begin(), args.end());
    // Everything the child needs is built before fork: other threads may hold malloc's lock.
    std::vector<char*> argv;
    for (auto& a : argv_s) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_ = ::fork();
    if (pid_ == 0) {
      const int in = ::open("/dev/null", O_RDONLY);
      const int out = ::open(out_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      const int err = ::open(err_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(in, 0);
      ::dup2(out, 1);
      ::dup2(err, 2);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
  }
  ~Child() {
    if (pid_ > 0 && !done_) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  pid_t pid() const { return pid_; }
  void signal(int sig) const { ::kill(pid_, sig); }
  bool running() {
    if (done_) return false;
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) finish(status);
    return !done_;
  }
  // Waits (at most `timeout`, then SIGKILL and a test failure) and returns the outcome.
  Outcome wait(std::chrono::seconds timeout = std::chrono::seconds(300)) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (running()) {
      if (std::chrono::steady_clock::now() > deadline) {
        ADD_FAILURE() << "chaingrad did not finish within " << timeout.count() << " s; killing it";
        ::kill(pid_, SIGKILL);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    run_.out = read_all(out_path_);
    run_.err = read_all(err_path_);
    return run_;
  }

 private:
  void finish(int status) {
    done_ = true;
    if (WIFEXITED(status)) run_.exit_code = WEXITSTATUS(status);
    if (WIFSIGNALED(status)) run_.signal = WTERMSIG(status);
  }
  std::string out_path_, err_path_;
  pid_t pid_ = -1;
  bool done_ = false;
  Outcome run_;
};

std::vector<std::string> lines_of(const std::string& s) {
  std::vector<std::string> out;
  std::istringstream in(s);
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) out.push_back(line);
  return out;
}

// ---- comparing checkpoints ----

// Tensors (names, dtypes, shapes and every byte) equal; metadata (timings) may differ.
::testing::AssertionResult same_tensors(const std::string& a, const std::string& b) {
  const auto fa = cg::io::load_safetensors(a), fb = cg::io::load_safetensors(b);
  if (fa.tensors.size() != fb.tensors.size())
    return ::testing::AssertionFailure() << a << " has " << fa.tensors.size() << " tensors, " << b << " has "
                                         << fb.tensors.size();
  for (std::size_t i = 0; i < fa.tensors.size(); ++i) {
    const auto& [na, ta] = fa.tensors[i];
    const auto& [nb, tb] = fb.tensors[i];
    if (na != nb || ta.dtype() != tb.dtype() || ta.shape() != tb.shape())
      return ::testing::AssertionFailure() << "tensor " << i << ": " << na << " vs " << nb;
    const std::size_t bytes = static_cast<std::size_t>(ta.numel()) * cg::element_size(ta.dtype());
    if (std::memcmp(ta.contiguous().raw_data(), tb.contiguous().raw_data(), bytes) != 0)
      return ::testing::AssertionFailure() << "tensor " << na << " differs between " << a << " and " << b;
  }
  return ::testing::AssertionSuccess();
}

std::string meta(const std::string& path, const std::string& key) {
  const auto f = cg::io::load_safetensors(path);
  const auto it = f.metadata.find(key);
  return it == f.metadata.end() ? "" : it->second;
}

long long step_of(const std::string& path) {
  const std::string s = meta(path, "chaingrad.step");
  return s.empty() ? -1 : std::stoll(s);
}

std::vector<std::string> temp_files(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;  // a run killed early may not have made its folder yet
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (e.path().filename().string().find(".tmp.") != std::string::npos) out.push_back(e.path().string());
  return out;
}

// ---- fixture: data and the common training options ----

class Training : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(fs::exists(kCli)) << kCli << " is missing: build the chaingrad_cli target before the tests";
    write_csv(dir_.file("train.csv"), 512, 8, 3, 1);
    write_csv(dir_.file("test.csv"), 128, 8, 3, 2);
  }
  // The data and the thread count: what every run (and every resume) must give.
  std::vector<std::string> data() const {
    return {"--csv", dir_.file("train.csv"), "--test-csv", dir_.file("test.csv"), "--label", "label", "--threads", "1"};
  }
  std::vector<std::string> args(std::vector<std::string> extra) const {
    auto a = data();
    a.insert(a.begin(), "train");
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }
  Outcome train(const std::vector<std::string>& extra, const std::string& log = "log") {
    return Child(args(extra), dir_.file(log)).wait();
  }
  std::string out(const std::string& name) const { return dir_.file(name); }
  std::string last(const std::string& run) const { return dir_.file(run) + "/last.safetensors"; }
  std::string last_optim(const std::string& run) const { return dir_.file(run) + "/last.optim.safetensors"; }

  TempDir dir_;
};

std::string describe(const Outcome& r) {
  return "exit " + std::to_string(r.exit_code) + (r.signal ? ", signal " + std::to_string(r.signal) : "") +
         "\nstderr:\n" + r.err;
}

// ================================================================ resume exactness

// Two epochs, then `--resume last.safetensors --epochs 3`, ends bit-identical to three epochs:
// parameters, Dropout's generator, the optimizer's buffers and step counts, the data order.
// (A schedule that spans the whole run, cosine or step, is planned over --epochs, so extending a
// run changes it; the interrupted-run tests below cover those.)
class ResumeExact : public Training, public ::testing::WithParamInterface<const char*> {};

TEST_P(ResumeExact, TwoEpochsThenResumeEqualsThreeEpochs) {
  const std::vector<std::string> common{"--model", "linear(32) relu dropout(0.2) linear(3)", "--batch-size", "16",
                                        "--seed",  "7",  "--schedule", "constant", "--optimizer", GetParam()};
  auto with = [&](std::vector<std::string> extra) {
    extra.insert(extra.begin(), common.begin(), common.end());
    return extra;
  };
  Outcome a = train(with({"--epochs", "3", "--out", out("a")}));
  ASSERT_EQ(a.exit_code, 0) << describe(a);
  Outcome b1 = train(with({"--epochs", "2", "--out", out("b")}));
  ASSERT_EQ(b1.exit_code, 0) << describe(b1);
  EXPECT_FALSE(same_tensors(last("a"), last("b")));  // two epochs are not three
  // Only the data and the new epoch count: the rest comes from the checkpoint.
  Outcome b2 = train({"--resume", last("b"), "--epochs", "3", "--out", out("b")});
  ASSERT_EQ(b2.exit_code, 0) << describe(b2);
  EXPECT_TRUE(same_tensors(last("a"), last("b")));
  EXPECT_TRUE(same_tensors(last_optim("a"), last_optim("b")));
  EXPECT_TRUE(same_tensors(out("a") + "/epoch-3.safetensors", out("b") + "/epoch-3.safetensors"));
  EXPECT_EQ(step_of(last("a")), 3 * 32);
  EXPECT_EQ(step_of(last("b")), 3 * 32);
  // metrics.json keeps the epochs of the first invocation.
  const std::string metrics = read_all(out("b") + "/metrics.json");
  EXPECT_NE(metrics.find("\"epoch\": 1"), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("\"epoch\": 3"), std::string::npos) << metrics;
}

INSTANTIATE_TEST_SUITE_P(Optimizers, ResumeExact, ::testing::Values("momentum", "adam", "sgd"));

// --normalize none feeds the inputs as loaded (what the PyTorch peers do); the checkpoint records
// the identity scaling, and a resume keeps the choice without being told again.
TEST_F(Training, NormalizeNoneIsRecordedAndKeptOnResume) {
  const std::vector<std::string> common{"--model", "linear(16) relu linear(3)", "--batch-size", "16",
                                        "--schedule", "constant"};
  auto with = [&](std::vector<std::string> extra) {
    extra.insert(extra.begin(), common.begin(), common.end());
    return extra;
  };
  Outcome standard = train(with({"--epochs", "1", "--out", out("standard")}));
  ASSERT_EQ(standard.exit_code, 0) << describe(standard);
  EXPECT_NE(meta(last("standard"), "chaingrad.normalization"), "0,1");
  EXPECT_EQ(meta(last("standard"), "chaingrad.normalize"), "standard");

  Outcome none = train(with({"--epochs", "1", "--normalize", "none", "--out", out("none")}));
  ASSERT_EQ(none.exit_code, 0) << describe(none);
  EXPECT_EQ(meta(last("none"), "chaingrad.normalization"), "0,1");
  EXPECT_FALSE(same_tensors(last("standard"), last("none")));  // other inputs, other weights

  Outcome resumed = train({"--resume", last("none"), "--epochs", "2", "--out", out("none")});
  ASSERT_EQ(resumed.exit_code, 0) << describe(resumed);
  EXPECT_EQ(meta(last("none"), "chaingrad.normalize"), "none");
  EXPECT_EQ(meta(last("none"), "chaingrad.normalization"), "0,1");

  Outcome bad = train(with({"--normalize", "zscore", "--out", out("bad")}));
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("--normalize"), std::string::npos) << bad.err;
}

// A checkpoint saved in the middle of an epoch (--save-every) resumes at that batch. To stop the
// run right after the save of step 40 (of 64 per epoch), a folder squats on epoch-1.safetensors:
// the end-of-epoch save fails, which must leave last.safetensors (written after it) at step 40.
TEST_F(Training, SaveEveryResumesMidEpochExactly) {
  const std::vector<std::string> common{"--model", "linear(32) relu dropout(0.2) linear(3)", "--batch-size", "8",
                                        "--optimizer", "adam", "--schedule", "cosine", "--epochs", "2"};
  auto with = [&](std::vector<std::string> extra) {
    extra.insert(extra.begin(), common.begin(), common.end());
    return extra;
  };
  Outcome ref = train(with({"--out", out("ref")}));
  ASSERT_EQ(ref.exit_code, 0) << describe(ref);
  Outcome saving = train(with({"--out", out("saving"), "--save-every", "7"}));
  ASSERT_EQ(saving.exit_code, 0) << describe(saving);
  EXPECT_TRUE(same_tensors(last("ref"), last("saving")));  // saving changes nothing

  fs::create_directories(out("mid") + "/epoch-1.safetensors");
  Outcome stopped = train(with({"--out", out("mid"), "--save-every", "40"}));
  ASSERT_EQ(stopped.exit_code, 1) << describe(stopped);
  EXPECT_NE(stopped.err.find("epoch-1.safetensors"), std::string::npos) << stopped.err;
  ASSERT_EQ(step_of(last("mid")), 40);
  EXPECT_EQ(meta(last("mid"), "chaingrad.epoch"), "0");
  EXPECT_EQ(meta(last("mid"), "chaingrad.batch"), "40");
  EXPECT_TRUE(temp_files(out("mid")).empty());

  fs::remove(out("mid") + "/epoch-1.safetensors");
  Outcome resumed = train({"--resume", last("mid"), "--out", out("mid")});
  ASSERT_EQ(resumed.exit_code, 0) << describe(resumed);
  EXPECT_TRUE(same_tensors(last("ref"), last("mid")));
  EXPECT_TRUE(same_tensors(last_optim("ref"), last_optim("mid")));
  EXPECT_TRUE(same_tensors(out("ref") + "/epoch-1.safetensors", out("mid") + "/epoch-1.safetensors"));
  // The epoch's training loss is the whole epoch's, not just the resumed part's.
  const std::string ref_metrics = read_all(out("ref") + "/metrics.json");
  const std::string mid_metrics = read_all(out("mid") + "/metrics.json");
  auto train_loss_1 = [](const std::string& m) {
    const auto at = m.find("\"train_loss\"");
    return at == std::string::npos ? std::string() : m.substr(at, 40);
  };
  EXPECT_EQ(train_loss_1(ref_metrics), train_loss_1(mid_metrics));
}

// ================================================================ SIGINT

TEST_F(Training, SigintFinishesTheStepSavesAndResumesExactly) {
  const std::vector<std::string> common{"--model", "linear(32) relu dropout(0.2) linear(3)", "--batch-size", "8",
                                        "--optimizer", "adam", "--schedule", "cosine", "--epochs", "3"};
  auto with = [&](std::vector<std::string> extra) {
    extra.insert(extra.begin(), common.begin(), common.end());
    return extra;
  };
  Outcome ref = train(with({"--out", out("ref")}));
  ASSERT_EQ(ref.exit_code, 0) << describe(ref);

  // --save-every 10 writes (and fsyncs) a checkpoint every 10 steps, which slows the run down
  // enough for the signal to land in the middle; the waits shrink if the run was too quick.
  long long stopped_at = -1;
  for (int attempt = 0; attempt < 6 && stopped_at < 0; ++attempt) {
    const std::string run = "int" + std::to_string(attempt);
    Child child(args(with({"--out", out(run), "--save-every", "10"})), out(run + ".log"));
    // Wait for the first periodic save, then a little more.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (!fs::exists(last(run)) && child.running() && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    std::this_thread::sleep_for(std::chrono::milliseconds(30 >> attempt));
    child.signal(SIGINT);
    const Outcome r = child.wait();
    if (r.exit_code == 0) continue;  // finished before the signal arrived
    ASSERT_EQ(r.exit_code, 130) << describe(r);
    EXPECT_NE(r.err.find("interrupted (SIGINT)"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("--resume " + last(run)), std::string::npos) << r.err;
    stopped_at = step_of(last(run));
    ASSERT_GT(stopped_at, 0);
    ASSERT_LT(stopped_at, 3 * 64);
    EXPECT_EQ(std::stoll(meta(last(run), "chaingrad.step")), stopped_at);
    std::printf("SIGINT stopped the run after step %lld of %d (epoch %s, batch %s)\n", stopped_at, 3 * 64,
                meta(last(run), "chaingrad.epoch").c_str(), meta(last(run), "chaingrad.batch").c_str());
    // Resume with nothing but the data: the epochs, optimizer, schedule, seed come along.
    Outcome resumed = train({"--resume", last(run), "--out", out(run)});
    ASSERT_EQ(resumed.exit_code, 0) << describe(resumed);
    EXPECT_TRUE(same_tensors(last("ref"), last(run)));
    EXPECT_TRUE(same_tensors(last_optim("ref"), last_optim(run)));
    EXPECT_EQ(step_of(last(run)), 3 * 64);
  }
  ASSERT_GE(stopped_at, 0) << "every run finished before SIGINT arrived";
}

// ================================================================ SIGKILL during saves

// Kills the trainer with SIGKILL at random moments, 30 times. With --save-every 1 a step is mostly
// a save (the fsyncs dominate), so most kills land inside one. After each kill every checkpoint
// left behind must load; last.safetensors must be the old or a newer state, with an optimizer
// file of the same step; every epoch-N file must equal the uninterrupted run's. The next run
// resumes from what the kill left. Afterwards every snapshot of last.safetensors, resumed to the
// end, must reproduce the uninterrupted run bit for bit.
TEST_F(Training, SigkillDuringSavesLeavesOldOrNewCheckpoints) {
  constexpr int kKills = 30, kEpochs = 6;
  const std::vector<std::string> common{"--model", "linear(32) relu dropout(0.2) linear(3)", "--batch-size", "8",
                                        "--optimizer", "momentum", "--schedule", "cosine",
                                        "--epochs", std::to_string(kEpochs)};
  auto with = [&](std::vector<std::string> extra) {
    extra.insert(extra.begin(), common.begin(), common.end());
    return extra;
  };
  Outcome ref = train(with({"--out", out("ref")}));
  ASSERT_EQ(ref.exit_code, 0) << describe(ref);

  std::mt19937 rng(20240611);
  std::uniform_int_distribution<int> delay_ms(5, 150);
  int kills = 0, mid_write = 0, rounds = 0, completed = 0;
  std::vector<std::string> snapshots;
  std::string run;
  long long prev_step = -1;
  while (kills < kKills) {
    if (run.empty()) {
      run = "kill" + std::to_string(rounds++);
      prev_step = -1;
    }
    auto a = with({"--out", out(run), "--save-every", "1"});
    if (fs::exists(last(run))) a.insert(a.end(), {"--resume", last(run)});
    Child child(args(a), out(run + ".log"));
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms(rng)));
    child.signal(SIGKILL);
    const Outcome r = child.wait();
    if (r.signal == 0) {  // it finished (or failed) before the kill
      ASSERT_EQ(r.exit_code, 0) << describe(r);
      EXPECT_TRUE(same_tensors(last("ref"), last(run)));
      EXPECT_TRUE(temp_files(out(run)).empty());
      ++completed;
      run.clear();
      continue;
    }
    ASSERT_EQ(r.signal, SIGKILL);
    ++kills;
    if (!temp_files(out(run)).empty()) ++mid_write;
    if (!fs::exists(last(run))) continue;  // killed before its first save
    // Everything left behind loads.
    for (const auto& e : fs::directory_iterator(out(run))) {
      const std::string name = e.path().filename().string();
      if (name.find(".tmp.") != std::string::npos || !name.ends_with(".safetensors")) continue;
      EXPECT_NO_THROW(cg::io::load_safetensors(e.path().string())) << "kill " << kills << ": " << name;
      if (name.starts_with("epoch-") && name.find(".optim") == std::string::npos) {
        EXPECT_TRUE(same_tensors(e.path().string(), out("ref") + "/" + name)) << "kill " << kills;
      }
    }
    // last.safetensors is the old state or a newer one, and its optimizer state is on disk.
    const long long step = step_of(last(run));
    EXPECT_GE(step, prev_step) << "kill " << kills;
    prev_step = step;
    const std::string o1 = last_optim(run), o2 = out(run) + "/last.optim.prev.safetensors";
    EXPECT_TRUE((fs::exists(o1) && step_of(o1) == step) || (fs::exists(o2) && step_of(o2) == step))
        << "kill " << kills << ": no optimizer file of step " << step;
    // Keep a copy of the triple to resume from later.
    const std::string snap = out("snap" + std::to_string(kills));
    fs::create_directories(snap);
    for (const std::string& f : {std::string("last.safetensors"), std::string("last.optim.safetensors"),
                                 std::string("last.optim.prev.safetensors")})
      if (fs::exists(out(run) + "/" + f)) fs::copy_file(out(run) + "/" + f, snap + "/" + f);
    snapshots.push_back(snap);
  }
  // Finish the current round: it resumes from what the last kill left and removes stale temp files.
  if (!run.empty() && fs::exists(last(run))) {
    Outcome r = train({"--resume", last(run), "--out", out(run)});
    ASSERT_EQ(r.exit_code, 0) << describe(r);
    EXPECT_TRUE(same_tensors(last("ref"), last(run)));
    EXPECT_TRUE(temp_files(out(run)).empty());
  }
  // Every snapshot resumes to the uninterrupted run's parameters.
  int resumes = 0;
  for (const std::string& snap : snapshots) {
    Outcome r = train({"--resume", snap + "/last.safetensors", "--out", snap}, "snaplog");
    ASSERT_EQ(r.exit_code, 0) << snap << ": " << describe(r);
    EXPECT_TRUE(same_tensors(last("ref"), snap + "/last.safetensors")) << snap;
    ++resumes;
  }
  std::printf("%d kills (%d left a temporary file: killed mid-write), %d rounds completed, %d snapshots resumed "
              "to bit-identical parameters\n",
              kills, mid_write, completed, resumes);
  RecordProperty("kills", kills);
  RecordProperty("kills_mid_write", mid_write);
  RecordProperty("resumes", resumes);
}

// ================================================================ SGD's step in backward

// Tensors of the same names and shapes, equal to within `tol` relative.
::testing::AssertionResult close_tensors(const std::string& a, const std::string& b, double tol) {
  const auto fa = cg::io::load_safetensors(a), fb = cg::io::load_safetensors(b);
  if (fa.tensors.size() != fb.tensors.size()) return ::testing::AssertionFailure() << "tensor counts differ";
  for (std::size_t i = 0; i < fa.tensors.size(); ++i) {
    const auto& [na, ta] = fa.tensors[i];
    const auto& [nb, tb] = fb.tensors[i];
    if (na != nb || ta.shape() != tb.shape()) return ::testing::AssertionFailure() << na << " vs " << nb;
    const auto va = ta.to_vector<double>(), vb = tb.to_vector<double>();
    for (std::size_t j = 0; j < va.size(); ++j)
      if (std::abs(va[j] - vb[j]) > tol * (1 + std::abs(va[j])))
        return ::testing::AssertionFailure() << na << "[" << j << "]: " << va[j] << " vs " << vb[j];
  }
  return ::testing::AssertionSuccess();
}

// --optimizer sgd and momentum fold their step into the products that make the weights'
// gradients (Note [updates in backward]): training goes as with the step after backward, to
// rounding. On the steps that --gradflow records, the gradients are made, so the table has the
// weights' norms.
TEST_F(Training, SgdStepInBackwardTrainsLikeTheStepAfterIt) {
  for (const std::string optimizer : {"sgd", "momentum"}) {
    SCOPED_TRACE("--optimizer " + optimizer);
    const std::vector<std::string> common{"--model",    "linear(32) relu linear(3)", "--batch-size", "16", "--epochs", "2",
                                          "--optimizer", optimizer, "--schedule", "cosine"};
    auto with = [&](std::vector<std::string> extra) {
      extra.insert(extra.begin(), common.begin(), common.end());
      return extra;
    };
    const std::string folded_dir = optimizer + "-folded", plain_dir = optimizer + "-plain", flow_dir = optimizer + "-flow";
    const Outcome folded = train(with({"--out", out(folded_dir)}));
    ASSERT_EQ(folded.exit_code, 0) << describe(folded);
    const Outcome plain = train(with({"--no-step-in-backward", "--out", out(plain_dir)}));
    ASSERT_EQ(plain.exit_code, 0) << describe(plain);
    EXPECT_TRUE(close_tensors(last(plain_dir), last(folded_dir), 1e-4));
    // (The momentum buffers too: a run resumed from either goes on alike.)
    EXPECT_TRUE(close_tensors(last_optim(plain_dir), last_optim(folded_dir), 1e-4));
    const Outcome flow = train(with({"--gradflow", "--gradflow-every", "4", "--out", out(flow_dir)}));
    ASSERT_EQ(flow.exit_code, 0) << describe(flow);
    EXPECT_TRUE(close_tensors(last(plain_dir), last(flow_dir), 1e-4));
    int weight_rows = 0;
    for (const std::string& line : lines_of(flow.out + flow.err)) {
      std::istringstream row(line);
      std::string name, shape_a, shape_b, grad_norm;
      row >> name >> shape_a >> shape_b >> grad_norm;  // "0.weight [32, 8] 1.2e-01 ..."
      if (!name.ends_with(".weight")) continue;
      ++weight_rows;
      EXPECT_NE(grad_norm, "-") << "no gradient recorded: " << line;
    }
    EXPECT_EQ(weight_rows, 2 * 2) << flow.out;  // two layers, a table at each epoch's end
  }
}

// ================================================================ divergence

TEST_F(Training, DivergingLossStopsAndLeavesTheLastGoodCheckpoint) {
  const std::vector<std::string> common{"--model", "linear(32) relu linear(3)", "--batch-size", "8",
                                        "--optimizer", "sgd"};
  auto with = [&](std::vector<std::string> extra) {
    extra.insert(extra.begin(), common.begin(), common.end());
    return extra;
  };
  Outcome good = train(with({"--epochs", "1", "--lr", "0.1", "--out", out("d")}));
  ASSERT_EQ(good.exit_code, 0) << describe(good);
  const std::string model_bytes = read_all(last("d")), optim_bytes = read_all(last_optim("d"));

  // A huge learning rate: the loss overflows within a few steps.
  Outcome bad = train({"--resume", last("d"), "--epochs", "3", "--lr", "1e4", "--out", out("d")});
  EXPECT_EQ(bad.exit_code, 1) << describe(bad);
  const auto err = lines_of(bad.err);
  ASSERT_FALSE(err.empty());
  EXPECT_TRUE(err.back().starts_with("error: train: training diverged: the loss became ")) << bad.err;
  EXPECT_NE(err.back().find("The last good checkpoint is " + last("d")), std::string::npos) << bad.err;
  EXPECT_EQ(read_all(last("d")), model_bytes);
  EXPECT_EQ(read_all(last_optim("d")), optim_bytes);
  EXPECT_FALSE(fs::exists(out("d") + "/epoch-2.safetensors"));

  // Adam bounds each step, so the loss grows large without overflowing: the sustained blow-up
  // check (the mean of 50 steps above 1000 x the first loss) stops it.
  Outcome blow = train({"--model", "linear(32) relu linear(3)", "--batch-size", "8", "--optimizer", "adam", "--lr", "1e4",
                    "--epochs", "3", "--out", out("e")});
  EXPECT_EQ(blow.exit_code, 1) << describe(blow);
  EXPECT_NE(blow.err.find("training diverged: the mean loss of the last 50 steps"), std::string::npos) << blow.err;
  EXPECT_NE(blow.err.find("No checkpoint was written"), std::string::npos) << blow.err;
  EXPECT_FALSE(fs::exists(last("e")));
}

// ================================================================ long runs

long long rss_bytes() {
  std::ifstream statm("/proc/self/statm");
  long long pages_total = 0, pages_resident = 0;
  statm >> pages_total >> pages_resident;
  return pages_resident * ::sysconf(_SC_PAGESIZE);
}

long long peak_rss_bytes() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return static_cast<long long>(u.ru_maxrss) * 1024;
}

// 20,000 training steps of a small MLP (with Dropout, momentum, a schedule, clipping and an
// evaluation under NoGradGuard every 1,000 steps): the graph of each step must be freed.
TEST(LongRun, TwentyThousandStepsKeepRssFlat) {
#ifdef CHAINGRAD_TEST_ASAN
  GTEST_SKIP() << "AddressSanitizer's quarantine holds freed memory; RSS says nothing here";
#endif
  constexpr int kSteps = 20000, kWarmup = 1000;
  cg::Generator gen(3);
  auto net = std::make_shared<cg::nn::Sequential>(std::initializer_list<cg::nn::Sequential::Item>{
      cg::nn::Linear(32, 64, true, &gen), cg::nn::ReLU(), cg::nn::Dropout(0.1, &gen), cg::nn::Linear(64, 10, true, &gen)});
  cg::optim::SGD opt(net->parameters(), {.lr = 0.05, .momentum = 0.9});
  cg::optim::CosineAnnealingLR schedule(opt, kSteps);
  std::vector<cg::Tensor> xs, ys;
  for (int i = 0; i < 16; ++i) {
    xs.push_back(cg::randn({32, 32}, {}, &gen));
    ys.push_back(cg::randint(0, 10, {32}, &gen));
  }
  long long rss_warm = 0, peak_warm = 0, rss_max = 0;
  double loss_sum = 0;
  for (int step = 0; step < kSteps; ++step) {
    const auto& x = xs[step % xs.size()];
    const auto& y = ys[step % ys.size()];
    cg::Tensor loss = cg::cross_entropy((*net)(x), y);
    opt.zero_grad();
    loss.backward();
    cg::optim::clip_grad_norm_(net->parameters(), 5.0);
    opt.step();
    schedule.step();
    loss_sum += loss.item();
    if ((step + 1) % 1000 == 0) {
      cg::NoGradGuard no_grad;
      net->eval();
      (void)cg::cross_entropy((*net)(xs[0]), ys[0]).item();
      net->train();
    }
    if (step + 1 == kWarmup) {
      rss_warm = rss_bytes();
      peak_warm = peak_rss_bytes();
    }
    if (step >= kWarmup && step % 500 == 0) rss_max = std::max(rss_max, rss_bytes());
  }
  const long long rss_end = rss_bytes(), peak_end = peak_rss_bytes();
  rss_max = std::max(rss_max, rss_end);
  EXPECT_TRUE(std::isfinite(loss_sum));
  const double mib = 1024.0 * 1024.0;
  std::printf("RSS after %d warm-up steps %.2f MiB, highest after %.2f MiB, at step %d %.2f MiB; peak RSS %.2f -> "
              "%.2f MiB\n",
              kWarmup, rss_warm / mib, rss_max / mib, kSteps, rss_end / mib, peak_warm / mib, peak_end / mib);
  RecordProperty("rss_warm_kib", static_cast<int>(rss_warm / 1024));
  RecordProperty("rss_end_kib", static_cast<int>(rss_end / 1024));
  RecordProperty("peak_growth_kib", static_cast<int>((peak_end - peak_warm) / 1024));
  constexpr long long kBound = 5LL << 20;
  EXPECT_LT(rss_max - rss_warm, kBound) << "RSS grew by " << (rss_max - rss_warm) / mib << " MiB";
  EXPECT_LT(peak_end - peak_warm, kBound) << "peak RSS grew by " << (peak_end - peak_warm) / mib << " MiB";
}

// ================================================================ numerics at extremes

class Extremes : public ::testing::TestWithParam<cg::DType> {
 protected:
  cg::Tensor logits() const {  // [[1000, 0, -1000]], requiring grad
    cg::Tensor x = cg::tensor({{1000.0, 0.0, -1000.0}}, false, GetParam());
    x.requires_grad_(true);
    return x;
  }
  cg::Tensor row(std::initializer_list<double> v) const { return cg::tensor({v}, false, GetParam()); }
  static std::vector<double> values(const cg::Tensor& t) { return t.to(cg::DType::Float64).contiguous().to_vector<double>(); }
  static void expect_near(const cg::Tensor& t, const std::vector<double>& want, double tol, const char* what) {
    const auto got = values(t);
    ASSERT_EQ(got.size(), want.size()) << what;
    for (std::size_t i = 0; i < got.size(); ++i) {
      EXPECT_TRUE(std::isfinite(got[i])) << what << "[" << i << "] = " << got[i];
      EXPECT_NEAR(got[i], want[i], tol) << what << "[" << i << "]";
    }
  }
};

TEST_P(Extremes, LogSoftmaxAndLogsumexp) {
  auto x = logits();
  auto y = cg::log_softmax(x, 1);
  expect_near(y, {0, -1000, -2000}, 1e-3, "log_softmax");
  cg::sum(y * row({1, 2, 3})).backward();  // d/dx_j sum_i w_i log_softmax_i = w_j - softmax_j * sum(w)
  expect_near(x.grad(), {1 - 6, 2, 3}, 1e-6, "log_softmax grad");

  auto x2 = logits();
  auto l = cg::logsumexp(x2, 1);
  expect_near(l, {1000}, 1e-3, "logsumexp");
  l.sum().backward();  // softmax
  expect_near(x2.grad(), {1, 0, 0}, 1e-6, "logsumexp grad");

  auto x3 = logits();
  auto s = cg::softmax(x3, 1);
  expect_near(s, {1, 0, 0}, 1e-6, "softmax");
  cg::sum(s * row({1, 2, 3})).backward();
  expect_near(x3.grad(), {0, 0, 0}, 1e-6, "softmax grad");
}

TEST_P(Extremes, CrossEntropyAndBceWithLogits) {
  for (std::int64_t target : {0, 2}) {
    auto x = logits();
    auto loss = cg::cross_entropy(x, cg::from_vector(std::vector<std::int64_t>{target}, {1}));
    expect_near(loss, {target == 0 ? 0.0 : 2000.0}, 1e-3, "cross_entropy");
    loss.backward();  // softmax - onehot
    expect_near(x.grad(), target == 0 ? std::vector<double>{0, 0, 0} : std::vector<double>{1, 0, -1}, 1e-6,
                "cross_entropy grad");
  }
  auto x = logits();
  auto bce = cg::bce_with_logits(x, row({0, 1, 1}));  // mean of softplus(1000), ln 2, softplus(1000)
  expect_near(bce, {(2000 + std::log(2.0)) / 3}, 1e-3, "bce_with_logits");
  bce.backward();  // (sigmoid(x) - t) / n
  expect_near(x.grad(), {1.0 / 3, -0.5 / 3, -1.0 / 3}, 1e-6, "bce_with_logits grad");

  auto x2 = logits();
  auto right = cg::bce_with_logits(x2, row({1, 0.5, 0}));
  expect_near(right, {std::log(2.0) / 3}, 1e-6, "bce_with_logits, confident and right");
  right.backward();
  expect_near(x2.grad(), {0, 0, 0}, 1e-6, "bce_with_logits grad, confident and right");
}

TEST_P(Extremes, SigmoidAndSoftplus) {
  auto x = logits();
  auto s = cg::sigmoid(x);
  expect_near(s, {1, 0.5, 0}, 1e-7, "sigmoid");
  s.sum().backward();
  expect_near(x.grad(), {0, 0.25, 0}, 1e-7, "sigmoid grad");
  auto x2 = logits();
  auto p = cg::softplus(x2);
  expect_near(p, {1000, std::log(2.0), 0}, 1e-3, "softplus");
  p.sum().backward();
  expect_near(x2.grad(), {1, 0.5, 0}, 1e-7, "softplus grad");
}

TEST_P(Extremes, PowAtZero) {
  // d/dx x^p = p x^(p-1): at 0 that is 0 for p > 1, 1 for p = 1, and 0 for p = 0 (x^0 is constant).
  for (double p : {0.0, 1.0, 2.0, 3.0}) {
    cg::Tensor x = cg::full({2}, 0.0, {.dtype = GetParam(), .requires_grad = true});
    auto y = cg::pow(x, p);
    expect_near(y, {p == 0 ? 1.0 : 0.0, p == 0 ? 1.0 : 0.0}, 0, "pow(0, p)");
    y.sum().backward();
    expect_near(x.grad(), {p == 1 ? 1.0 : 0.0, p == 1 ? 1.0 : 0.0}, 0, "d pow(0, p) / dx");
  }
  // p = 0.5: the derivative is +infinity, as in PyTorch; the value is still exact.
  cg::Tensor x = cg::full({1}, 0.0, {.dtype = GetParam(), .requires_grad = true});
  auto y = cg::pow(x, 0.5);
  expect_near(y, {0}, 0, "pow(0, 0.5)");
  y.sum().backward();
  EXPECT_EQ(values(x.grad())[0], std::numeric_limits<double>::infinity());
}

TEST_P(Extremes, VarAndStdOfConstantData) {
  for (double c : {0.0, 3.0, 1e6}) {
    cg::Tensor x = cg::full({7}, c, {.dtype = GetParam(), .requires_grad = true});
    auto v = cg::var(x);
    expect_near(v, {0}, 0, "var of constant data");
    v.backward();  // 2 (x - mean) / (n - 1) = 0
    expect_near(x.grad(), std::vector<double>(7, 0.0), 0, "var grad");
    cg::Tensor x2 = cg::full({7}, c, {.dtype = GetParam()});
    expect_near(cg::std(x2), {0}, 0, "std of constant data");
    expect_near(cg::var(x2, {0}, false, 0), {0}, 0, "population var");
    // (std's derivative at zero spread is 0/0; PyTorch returns NaN there too, so it is not held.)
  }
  // One element: n - 1 = 0, the unbiased variance is undefined: a clear error (PyTorch: NaN).
  EXPECT_THROW((void)cg::var(cg::full({1}, 2.0, {.dtype = GetParam()})), cg::ValueError);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, Extremes, ::testing::Values(cg::DType::Float32, cg::DType::Float64),
                         [](const auto& info) { return std::string(cg::dtype_name(info.param)); });

// ================================================================ found by the fuzzers

// fuzz_idx's first find: an IDX file with a zero dimension loads as an empty tensor, and
// to_vector() of an empty tensor passed nullptr to memcpy (undefined even for 0 bytes; UBSan
// reports it). The sanitizer build of this test holds it.
TEST(FuzzFinds, ToVectorOfAnEmptyTensor) {
  EXPECT_TRUE(cg::empty({0}, cg::DType::Float32).to_vector<float>().empty());
  EXPECT_TRUE(cg::empty({3, 0}, cg::DType::Float64).to_vector<double>().empty());
  EXPECT_TRUE(cg::empty({0}, cg::DType::Int64).to_vector<std::int64_t>().empty());
}

// A zero dimension makes the element count 0, so the byte-range checks pass, but the other
// dimensions' product (the strides) overflows int64: signed overflow, undefined. Readers must
// reject such shapes (found by fuzz_idx; the same holds for safetensors).
TEST(FuzzFinds, ZeroDimensionBesideHugeOnesIsRejected) {
  TempDir dir;
  std::string idx{'\0', '\0', '\x08', '\x04'};
  for (std::uint32_t d : {0u, 1u << 30, 1u << 30, 1u << 30})
    for (int k = 3; k >= 0; --k) idx += static_cast<char>((d >> (8 * k)) & 0xff);
  write_all(dir.file("huge.idx"), idx);
  EXPECT_THROW((void)cg::data::read_idx_images(dir.file("huge.idx")), cg::Error);

  const std::string header = R"({"z":{"dtype":"F32","shape":[0,1099511627776,1099511627776],"data_offsets":[0,0]}})";
  std::string st(8, '\0');
  for (int k = 0; k < 8; ++k) st[k] = static_cast<char>((header.size() >> (8 * k)) & 0xff);
  write_all(dir.file("huge.safetensors"), st + header);
  EXPECT_THROW((void)cg::io::load_safetensors(dir.file("huge.safetensors")), cg::Error);
}

// ================================================================ CLI error lines

struct ErrorCase {
  const char* name;
  std::vector<std::string> args;  // after the binary; "@" expands to the temp folder
  const char* expect;             // a part of the message
};

class CliErrors : public Training {
 protected:
  std::vector<std::string> expand(std::vector<std::string> a) const {
    for (auto& s : a)
      for (std::size_t i = s.find('@'); i != std::string::npos; i = s.find('@', i + 1)) {
        const std::string folder = dir_.file("");
        s.replace(i, 1, folder.substr(0, folder.size() - 1));
      }
    return a;
  }
  void expect_one_error_line(const ErrorCase& c);
};

// Every failure: a non-zero exit (not a signal), nothing on stdout, and exactly one line on
// stderr, `error: ...`, that says what was wrong.
TEST_F(CliErrors, EveryErrorIsOneLineAndANonZeroExit) {
  // A good checkpoint to corrupt and to resume with the wrong model.
  Outcome good = train({"--model", "linear(32) relu linear(3)", "--epochs", "1", "--out", out("good")});
  ASSERT_EQ(good.exit_code, 0) << describe(good);
  const std::string ckpt = read_all(last("good"));
  write_all(out("truncated.safetensors"), ckpt.substr(0, ckpt.size() / 2));
  write_all(out("garbage.safetensors"), "this is not a checkpoint\n");
  write_all(out("bad.csv"), "x0,x1,label\n1,2,0\n3,oops,1\n");
  write_all(out("ragged.csv"), "x0,x1,label\n1,2,0\n3,1\n");
  write_all(out("empty.csv"), "");
  fs::create_directories(out("emptydir"));
  // A checkpoint stopped in the middle of an epoch: resuming it needs the same batch size.
  {
    auto f = cg::io::load_safetensors(last("good"));
    f.metadata["chaingrad.batch"] = "5";
    f.metadata["chaingrad.epoch"] = "0";
    f.metadata["chaingrad.step"] = "5";
    cg::io::save_safetensors(out("mid.safetensors"), f.tensors, f.metadata);
  }
  const std::string csv = "--csv=@/train.csv", test_csv = "--test-csv=@/test.csv";
  const std::vector<ErrorCase> cases = {
      {"missing csv", {"train", "--csv=@/absent.csv", test_csv}, "absent.csv"},
      {"csv without test csv", {"train", csv}, "--test-csv"},
      {"malformed csv", {"train", "--csv=@/bad.csv", test_csv}, "bad.csv"},
      {"ragged csv", {"train", "--csv=@/ragged.csv", test_csv}, "ragged.csv"},
      {"empty csv", {"train", "--csv=@/empty.csv", test_csv}, "empty.csv"},
      {"missing label column", {"train", csv, test_csv, "--label", "nolabel"}, "nolabel"},
      {"missing IDX folder", {"train", "--data=@/emptydir"}, "emptydir"},
      {"bad model spec", {"train", csv, test_csv, "--model", "linear(32) bogus"}, "bogus"},
      {"model output mismatch", {"train", csv, test_csv, "--model", "linear(5)"}, "classes"},
      {"eval: missing checkpoint", {"eval", "@/absent.safetensors"}, "absent.safetensors"},
      {"eval: garbage checkpoint", {"eval", "@/garbage.safetensors"}, "garbage.safetensors"},
      {"eval: truncated checkpoint", {"eval", "@/truncated.safetensors"}, "truncated.safetensors"},
      {"resume: garbage", {"train", csv, test_csv, "--resume=@/garbage.safetensors", "--out=@/r1"}, "garbage"},
      {"resume: truncated", {"train", csv, test_csv, "--resume=@/truncated.safetensors", "--out=@/r2"}, "truncated"},
      {"resume: another model",
       {"train", csv, test_csv, "--resume=@/good/last.safetensors", "--model", "linear(16) relu linear(3)",
        "--out=@/r3"},
       "size mismatch for 0.weight"},
      {"resume: mid-epoch with another batch size",
       {"train", csv, test_csv, "--resume=@/mid.safetensors", "--batch-size", "4", "--out=@/r4"},
       "--batch-size"},
      {"predict: no such image", {"predict", "@/good/last.safetensors", "@/absent.png"}, "absent.png"},
  };
  for (const ErrorCase& c : cases) expect_one_error_line(c);
}

// Errors found while parsing the command line (CLI11's) read the same way.
TEST_F(CliErrors, ArgumentErrorsAreOneErrorLine) {
  const std::vector<ErrorCase> cases = {
      {"unknown flag", {"train", "--bogus"}, "--bogus"},
      {"no subcommand", {}, "subcommand"},
      {"unknown subcommand", {"frobnicate"}, "subcommand"},
      {"epochs 0", {"train", "--epochs", "0"}, "--epochs"},
      {"epochs not a number", {"train", "--epochs", "many"}, "--epochs"},
      {"save-every negative", {"train", "--save-every", "-3"}, "--save-every"},
      {"bad optimizer", {"train", "--optimizer", "rmsprop2"}, "--optimizer"},
      {"missing value", {"train", "--lr"}, "--lr"},
      {"eval without checkpoint", {"eval"}, "checkpoint"},
  };
  for (const ErrorCase& c : cases) expect_one_error_line(c);
}

void CliErrors::expect_one_error_line(const ErrorCase& c) {
  {
    SCOPED_TRACE(c.name);
    const Outcome r = Child(expand(c.args), out("errlog")).wait();
    EXPECT_EQ(r.signal, 0) << describe(r);
    EXPECT_NE(r.exit_code, 0) << describe(r);
    EXPECT_EQ(r.out, "") << describe(r);
    const auto lines = lines_of(r.err);
    EXPECT_EQ(lines.size(), 1u) << describe(r);
    if (lines.empty()) return;
    EXPECT_TRUE(lines[0].starts_with("error: ")) << describe(r);
    EXPECT_NE(lines[0].find(c.expect), std::string::npos) << "expected '" << c.expect << "' in: " << lines[0];
    EXPECT_LT(lines[0].size(), 1000u) << lines[0];
  }
}

// A formula error shows the formula line with a caret under the problem: the first line is the
// error, the rest points at it.
TEST_F(CliErrors, FormulaErrorsStartWithOneErrorLine) {
  const Outcome r = Child({"explain", "y = x *"}, out("explainlog")).wait();
  EXPECT_EQ(r.exit_code, 1) << describe(r);
  const auto lines = lines_of(r.err);
  ASSERT_FALSE(lines.empty());
  EXPECT_TRUE(lines[0].starts_with("error: ")) << r.err;
}

}  // namespace
