#include "plot.hpp"

#include <algorithm>
#include <iomanip>
#include <sstream>

namespace cli {

namespace {
// One panel: x = epoch, y scaled to [lo, hi], each series a polyline with dots.
void panel(std::ostringstream& os, double x0, double y0, double w, double h, const std::string& title,
           const std::vector<std::pair<std::string, std::vector<double>>>& series, const char* const* colors) {
  double lo = 1e300, hi = -1e300;
  std::size_t n = 0;
  for (const auto& [name, v] : series) {
    for (double y : v) lo = std::min(lo, y), hi = std::max(hi, y);
    n = std::max(n, v.size());
  }
  if (!(hi > lo)) hi = lo + 1;
  const double pad = (hi - lo) * 0.08;
  lo -= pad, hi += pad;
  os << "<g><rect x='" << x0 << "' y='" << y0 << "' width='" << w << "' height='" << h
     << "' fill='white' stroke='#999'/>\n<text x='" << x0 + w / 2 << "' y='" << y0 - 8
     << "' text-anchor='middle' font-size='14'>" << title << "</text>\n";
  for (int k = 0; k <= 4; ++k) {
    const double yv = lo + (hi - lo) * k / 4, py = y0 + h - h * k / 4;
    os << "<line x1='" << x0 << "' x2='" << x0 + w << "' y1='" << py << "' y2='" << py << "' stroke='#eee'/>"
       << "<text x='" << x0 - 6 << "' y='" << py + 4 << "' text-anchor='end' font-size='11'>" << std::fixed
       << std::setprecision(3) << yv << "</text>\n";
  }
  auto px = [&](std::size_t i) { return x0 + (n <= 1 ? w / 2 : w * static_cast<double>(i) / static_cast<double>(n - 1)); };
  for (std::size_t i = 0; i < n; ++i)
    os << "<text x='" << px(i) << "' y='" << y0 + h + 16 << "' text-anchor='middle' font-size='11'>" << i + 1 << "</text>";
  int c = 0;
  for (const auto& [name, v] : series) {
    os << "<polyline fill='none' stroke-width='2' stroke='" << colors[c] << "' points='";
    for (std::size_t i = 0; i < v.size(); ++i) os << px(i) << "," << y0 + h - h * (v[i] - lo) / (hi - lo) << " ";
    os << "'/>\n";
    for (std::size_t i = 0; i < v.size(); ++i)
      os << "<circle r='3' fill='" << colors[c] << "' cx='" << px(i) << "' cy='" << y0 + h - h * (v[i] - lo) / (hi - lo)
         << "'/>";
    os << "<text x='" << x0 + w - 4 << "' y='" << y0 + 16 + 14 * c << "' text-anchor='end' font-size='12' fill='"
       << colors[c] << "'>" << name << "</text>\n";
    ++c;
  }
  os << "<text x='" << x0 + w / 2 << "' y='" << y0 + h + 32 << "' text-anchor='middle' font-size='12'>epoch</text></g>\n";
}
}  // namespace

std::string training_plot_svg(const std::vector<EpochRecord>& history) {
  std::vector<double> tl, vl, acc;
  for (const auto& r : history) {
    tl.push_back(r.train_loss);
    vl.push_back(r.test_loss);
    acc.push_back(r.test_accuracy * 100);
  }
  std::ostringstream os;
  os << "<svg xmlns='http://www.w3.org/2000/svg' width='900' height='360' font-family='sans-serif'>\n"
     << "<rect width='100%' height='100%' fill='#fafafa'/>\n";
  static const char* loss_colors[] = {"#1f77b4", "#ff7f0e"};
  static const char* acc_colors[] = {"#2ca02c"};
  panel(os, 70, 40, 340, 260, "loss", {{"train", tl}, {"test", vl}}, loss_colors);
  panel(os, 520, 40, 340, 260, "test accuracy (%)", {{"test", acc}}, acc_colors);
  os << "</svg>\n";
  return os.str();
}

}  // namespace cli
