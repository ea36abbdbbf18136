// Checkpoints cross the PyTorch boundary both ways: a model trained by PyTorch (Debian's
// python3-torch) and saved as safetensors predicts the same logits in chaingrad, and PyTorch
// predicts the same logits from a checkpoint chaingrad trained. Skipped, with the reason, where
// PyTorch or the Fashion-MNIST package is missing.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

namespace fs = std::filesystem;

namespace {

const std::string kCli = std::string(CHAINGRAD_BINARY_DIR) + "/chaingrad";
const std::string kScript = std::string(CHAINGRAD_SOURCE_DIR) + "/tests/interop/torch_interop.py";
const std::string kData = "/usr/share/datasets/fashion-mnist";

std::string run(const std::string& cmd, int* status = nullptr) {
  std::string out;
  std::unique_ptr<FILE, int (*)(FILE*)> p(popen((cmd + " 2>&1").c_str(), "r"), pclose);
  char buf[4096];
  while (p && fgets(buf, sizeof buf, p.get())) out += buf;
  const int rc = p ? pclose(p.release()) : -1;
  if (status) *status = rc;
  return out;
}

bool have_torch() {
  int rc = 0;
  run("/usr/bin/python3 -c 'import torch, numpy'", &rc);
  return rc == 0;
}

class Interop : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(kCli)) GTEST_SKIP() << "the chaingrad CLI is not built at " << kCli;
    if (!fs::exists(kData + "/t10k-images-idx3-ubyte.gz")) GTEST_SKIP() << "dataset-fashion-mnist is not installed";
    if (!have_torch()) GTEST_SKIP() << "python3-torch is not installed (scripts/deps.sh test installs it)";
    dir_ = fs::temp_directory_path() / ("chaingrad-interop-" + std::to_string(::getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override {
    if (!dir_.empty()) fs::remove_all(dir_);
  }
  nlohmann::json read_json(const fs::path& p) {
    std::ifstream in(p);
    return nlohmann::json::parse(in);
  }
  // chaingrad's logits for test image i.
  std::vector<double> chaingrad_logits(const fs::path& ckpt, int i, const std::string& extra = "") {
    int rc = 0;
    const std::string out = run(kCli + " predict " + ckpt.string() + " --index " + std::to_string(i) + " --json " + extra, &rc);
    EXPECT_EQ(rc, 0) << out;
    return nlohmann::json::parse(out)["logits"].get<std::vector<double>>();
  }
  fs::path dir_;
};

TEST_F(Interop, PyTorchCheckpointPredictsTheSameInChaingrad) {
  const fs::path ckpt = dir_ / "torch.safetensors", logits = dir_ / "torch.json";
  int rc = 0;
  const std::string out = run("/usr/bin/python3 " + kScript + " write " + ckpt.string() + " " + logits.string(), &rc);
  ASSERT_EQ(rc, 0) << out;
  const auto expected = read_json(logits);
  for (int i = 0; i < 8; ++i) {
    const auto got = chaingrad_logits(ckpt, i, "--model 'linear(32) relu linear(10)'");
    const auto want = expected["logits"][i].get<std::vector<double>>();
    ASSERT_EQ(got.size(), want.size());
    for (std::size_t c = 0; c < got.size(); ++c) EXPECT_NEAR(got[c], want[c], 1e-5) << "image " << i << " class " << c;
  }
}

TEST_F(Interop, ChaingradCheckpointPredictsTheSameInPyTorch) {
  int rc = 0;
  const std::string train = run(kCli + " train --model 'linear(32) relu linear(10)' --epochs 1 --batch-size 256 --json --out " +
                                    dir_.string(),
                                &rc);
  ASSERT_EQ(rc, 0) << train;
  const fs::path ckpt = dir_ / "last.safetensors", logits = dir_ / "from-chaingrad.json";
  const std::string out = run("/usr/bin/python3 " + kScript + " read " + ckpt.string() + " " + logits.string(), &rc);
  ASSERT_EQ(rc, 0) << out;
  const auto torch_side = read_json(logits);
  for (int i = 0; i < 8; ++i) {
    const auto got = chaingrad_logits(ckpt, i);
    const auto want = torch_side["logits"][i].get<std::vector<double>>();
    for (std::size_t c = 0; c < got.size(); ++c) EXPECT_NEAR(got[c], want[c], 1e-5) << "image " << i << " class " << c;
  }
}

}  // namespace
