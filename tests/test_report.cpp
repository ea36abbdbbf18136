// The HTML training report: its sections, self-containment, atomic writing, and a real browser
// (headless Chromium) that runs the page's script, counts the points it plotted and takes a
// screenshot that must not be blank.
#include <gtest/gtest.h>
#include <stb/stb_image.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <regex>
#include <set>
#include <sstream>

#include "chaingrad/gradflow.hpp"
#include "chaingrad/nn.hpp"
#include "chaingrad/ops.hpp"
#include "chaingrad/optim.hpp"
#include "chaingrad/report.hpp"

namespace cg = chaingrad;
namespace nn = chaingrad::nn;
namespace fs = std::filesystem;

namespace {

class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    path_ = fs::temp_directory_path() / ("chaingrad_test_report_" + std::to_string(rd()) + std::to_string(rd()));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::ostringstream os;
  os << f.rdbuf();
  return os.str();
}

// A small training run: 3 epochs of 40 steps on random data, recorded every 5 steps.
struct TrainingRun {
  std::shared_ptr<nn::Sequential> model;
  std::unique_ptr<cg::gradflow::Recorder> flow;
  std::unique_ptr<cg::report::Report> report;

  explicit TrainingRun(const std::string& spec = "linear(32) sigmoid linear(32) relu linear(4)") {
    cg::manual_seed(9);
    model = nn::build_model(spec, {12}, 3);
    flow = std::make_unique<cg::gradflow::Recorder>(*model, cg::gradflow::Options{.every = 5});
    report = std::make_unique<cg::report::Report>(
        "test report", std::vector<std::pair<std::string, std::string>>{{"model", spec}, {"note", "</script><b>x</b>"}},
        *model, flow.get());
    cg::optim::SGD opt(model->parameters(), {.lr = 0.1, .momentum = 0.9});
    const cg::Tensor x = cg::randn({32, 12});
    const cg::Tensor y = cg::randint(0, 4, {32});
    std::int64_t step = 0;
    for (int epoch = 1; epoch <= 3; ++epoch) {
      double sum = 0;
      for (int b = 0; b < 40; ++b, ++step) {
        const cg::Tensor loss = cg::cross_entropy((*model)(x), y);
        opt.zero_grad();
        loss.backward();
        flow->before_step(x, y);
        opt.step();
        flow->after_step(loss.item());
        sum += loss.item();
      }
      report->add_epoch({epoch, step, sum / 40, sum / 40 + 0.1, 0.3 + 0.1 * epoch, 0.5});
    }
    report->set_confusion({{5, 1, 0, 0}, {0, 7, 1, 0}, {2, 0, 4, 0}, {0, 0, 1, 9}}, {"a", "b", "c", "d"});
  }
};

std::string chromium() {
  if (const char* env = std::getenv("CHAINGRAD_CHROMIUM"); env && *env) return fs::exists(env) ? env : "";
  for (const char* p : {"/usr/bin/chromium", "/usr/bin/chromium-browser"})
    if (fs::exists(p)) return p;
  return "";
}

// Runs headless Chromium with no network (every host name fails to resolve) and a throwaway
// profile; returns stdout.
std::string run_chromium(const std::string& args, const fs::path& dir) {
  const std::string cmd =
      "timeout 120 '" + chromium() +
      "' --headless --no-sandbox --disable-gpu --disable-background-networking "
      "--disable-component-update --disable-sync --no-first-run --disable-extensions --hide-scrollbars "
      "'--host-resolver-rules=MAP * ~NOTFOUND' '--user-data-dir=" +
      (dir / "profile").string() + "' " + args + " 2>/dev/null";
  std::string out;
  FILE* f = popen(cmd.c_str(), "r");
  if (!f) return out;
  char buf[65536];
  for (std::size_t n; (n = fread(buf, 1, sizeof buf, f)) > 0;) out.append(buf, n);
  pclose(f);
  return out;
}

struct Pixels {
  int width = 0, height = 0;
  std::vector<unsigned char> rgb;
  double fraction(auto pred) const {
    std::int64_t n = 0;
    for (std::size_t i = 0; i + 2 < rgb.size(); i += 3) n += pred(rgb[i], rgb[i + 1], rgb[i + 2]);
    return static_cast<double>(n) / (static_cast<double>(width) * height);
  }
};

Pixels load_png(const fs::path& p) {
  Pixels px;
  int channels = 0;
  unsigned char* data = stbi_load(p.string().c_str(), &px.width, &px.height, &channels, 3);
  if (!data) return px;
  px.rgb.assign(data, data + static_cast<std::size_t>(px.width) * px.height * 3);
  stbi_image_free(data);
  return px;
}

}  // namespace

TEST(Report, HtmlHasEverySection) {
  TrainingRun run;
  const std::string html = run.report->html();
  for (const char* id :
       {"id=\"config\"", "id=\"warnings\"", "id=\"curves\"", "id=\"loss-chart\"", "id=\"accuracy-chart\"",
        "id=\"gradflow\"", "id=\"gradflow-heatmap\"", "id=\"gradflow-profile\"", "id=\"gradflow-table\"",
        "id=\"activations\"", "id=\"activation-heatmap\"", "id=\"graph\"", "id=\"layer-graph\"", "id=\"confusion\"",
        "id=\"confusion-matrix\"", "id=\"plotted-points\"", "id=\"report-data\""})
    EXPECT_NE(html.find(id), std::string::npos) << id;
  EXPECT_EQ(html.rfind("<!DOCTYPE html>", 0), 0u);
  EXPECT_NE(html.find("Run configuration"), std::string::npos);
  EXPECT_NE(html.find("0  Linear(in_features=12, out_features=32, bias=True)"), std::string::npos);
  EXPECT_NE(html.find("1  Sigmoid"), std::string::npos);
  EXPECT_NE(html.find("<th>recall</th>"), std::string::npos);
  EXPECT_NE(html.find(">9</td>"), std::string::npos);  // a confusion-matrix cell
  // User text is escaped; the JSON cannot close its script element.
  EXPECT_EQ(html.find("</script><b>"), std::string::npos);
  EXPECT_NE(html.find("&lt;/script&gt;&lt;b&gt;x&lt;/b&gt;"), std::string::npos);
  // Self-contained: the only URL is the SVG namespace; no external scripts, styles or images.
  for (const std::string scheme : {"http://", "https://"})
    for (auto pos = html.find(scheme); pos != std::string::npos; pos = html.find(scheme, pos + 1))
      EXPECT_EQ(html.compare(pos, scheme.size() + 19, scheme + "www.w3.org/2000/svg"), 0) << html.substr(pos, 60);
  EXPECT_EQ(html.find("<link"), std::string::npos);
  EXPECT_EQ(html.find("src="), std::string::npos);
  EXPECT_EQ(html.find("@import"), std::string::npos);
  // 24 recordings: 24 train-loss and 24 batch-accuracy points, 3 epochs × 3 test/train points,
  // 3 weights × 24 heatmap cells and 3 profile bars, 2 activation layers × 24 cells.
  EXPECT_EQ(run.flow->snapshots().size(), 24u);
  EXPECT_EQ(run.report->expected_points(), 24 + 24 + 9 + 72 + 3 + 48);
}

TEST(Report, ShowsWarningsAndProgress) {
  std::string spec;
  for (int i = 0; i < 6; ++i) spec += "linear(16) sigmoid ";
  TrainingRun run(spec + "linear(4)");
  ASSERT_FALSE(run.flow->warnings().empty());
  std::string html = run.report->html();
  EXPECT_NE(html.find("<ul class=\"warnings\">"), std::string::npos);
  EXPECT_NE(html.find("sigmoid layers above it each scale gradients by at most 0.25"), std::string::npos);
  EXPECT_EQ(html.find("http-equiv=\"refresh\""), std::string::npos);
  run.report->set_progress("epoch 1 of 3", true);
  html = run.report->html();
  EXPECT_NE(html.find("http-equiv=\"refresh\""), std::string::npos);
  EXPECT_NE(html.find("epoch 1 of 3"), std::string::npos);

  TrainingRun healthy("linear(16) relu linear(4)");
  EXPECT_NE(healthy.report->html().find("No gradient-flow warnings"), std::string::npos);
}

TEST(Report, WriteReplacesTheFileAtomically) {
  TempDir dir;
  TrainingRun run;
  const fs::path path = dir.path() / "report.html";
  std::ofstream(path) << "old";
  run.report->write(path.string());
  EXPECT_EQ(read_file(path), run.report->html());
  std::size_t files = 0;
  for (const auto& e : fs::directory_iterator(dir.path())) files += e.is_regular_file();
  EXPECT_EQ(files, 1u);  // no temp file left behind
}

TEST(Report, WithoutRecorderStillRenders) {
  nn::Sequential model{nn::Linear(3, 2)};
  cg::report::Report r("plain", {}, model);
  r.add_epoch({1, 10, 0.9, 1.0, 0.5, 1.0});
  const std::string html = r.html();
  EXPECT_NE(html.find("Gradient flow was not recorded"), std::string::npos);
  EXPECT_NE(html.find("id=\"layer-graph\""), std::string::npos);
  EXPECT_EQ(r.expected_points(), 3);
}

// Opens the report in headless Chromium: the script must have drawn every point (the count it
// writes into #plotted-points), and the screenshots must show charts, not a blank page.
TEST(Report, RendersInHeadlessChromium) {
  if (chromium().empty())
    GTEST_SKIP()
        << "Chromium is not installed (looked for /usr/bin/chromium and /usr/bin/chromium-browser; or the path "
           "in CHAINGRAD_CHROMIUM): the browser test needs it. `bash scripts/deps.sh test` or "
           "`apt-get install chromium` installs it.";
  TempDir dir;
  std::string spec;
  for (int i = 0; i < 6; ++i) spec += "linear(16) sigmoid ";
  TrainingRun run(spec + "linear(4)");
  const fs::path page = dir.path() / "report.html";
  run.report->write(page.string());
  const std::string url = "file://" + page.string();

  const std::string dom = run_chromium("--dump-dom '" + url + "'", dir.path());
  ASSERT_FALSE(dom.empty()) << "chromium printed nothing for --dump-dom " << url;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(dom, m, std::regex("id=\"plotted-points\">([0-9]+)<"))) << dom.substr(0, 2000);
  const long long points = std::stoll(m[1]);
  EXPECT_GT(points, 0);
  EXPECT_EQ(points, run.report->expected_points());
  EXPECT_NE(dom.find("data-rendered=\"true\""), std::string::npos);
  for (const char* chart :
       {"loss-chart", "accuracy-chart", "gradflow-heatmap", "gradflow-profile", "activation-heatmap"}) {
    std::smatch c;
    ASSERT_TRUE(std::regex_search(dom, c, std::regex(std::string("id=\"") + chart + "\"[^>]*data-points=\"([0-9]+)\"")))
        << chart;
    EXPECT_GT(std::stoll(c[1]), 0) << chart;
  }

  const fs::path shot = dir.path() / "page.png";
  run_chromium("--screenshot='" + shot.string() + "' --window-size=1200,1600 '" + url + "'", dir.path());
  ASSERT_TRUE(fs::exists(shot)) << "chromium wrote no screenshot";
  const Pixels px = load_png(shot);
  ASSERT_EQ(px.width, 1200);
  ASSERT_EQ(px.height, 1600);
  std::set<int> colours;
  for (std::size_t i = 0; i + 2 < px.rgb.size(); i += 3)
    colours.insert((px.rgb[i] >> 3) << 10 | (px.rgb[i + 1] >> 3) << 5 | (px.rgb[i + 2] >> 3));
  const double ink = px.fraction([](int r, int g, int b) { return r < 235 || g < 235 || b < 235; });
  std::printf("[ browser  ] %lld points plotted; screenshot %dx%d, %.1f%% non-white, %zu colours\n", points, px.width,
              px.height, 100 * ink, colours.size());
  EXPECT_GT(ink, 0.03);
  EXPECT_GT(colours.size(), 50u);

  // The gradient-flow section alone: the heatmap's cells are strongly coloured.
  const fs::path flow_shot = dir.path() / "gradflow.png";
  run_chromium("--screenshot='" + flow_shot.string() + "' --window-size=1000,700 '" + url + "#only=gradflow'",
               dir.path());
  const Pixels fp = load_png(flow_shot);
  ASSERT_EQ(fp.width, 1000);
  const double coloured = fp.fraction([](int r, int g, int b) {
    return std::max({r, g, b}) - std::min({r, g, b}) > 60;
  });
  std::printf("[ browser  ] gradient-flow view: %.1f%% strongly coloured pixels\n", 100 * coloured);
  EXPECT_GT(coloured, 0.05);
}
