// train/plot: the loss curve's SVG holds one point per train step and per evaluation, survives a
// line cut short by a kill, and refuses a run with nothing to draw; `qlora plot` writes it.
#include <gtest/gtest.h>

#include <string>

#include "qlora/train/plot.h"
#include "support/test_support.h"

namespace qlora {
namespace {

size_t count(const std::string& s, const std::string& what) {
  size_t n = 0;
  for (size_t at = s.find(what); at != std::string::npos; at = s.find(what, at + 1)) ++n;
  return n;
}

// The points of the index-th polyline.
size_t points_of(const std::string& svg, size_t index) {
  size_t at = 0;
  for (size_t i = 0; i <= index; ++i) at = svg.find("<polyline", at + 1);
  const size_t from = svg.find("points=\"", at) + 8, to = svg.find('"', from);
  return count(svg.substr(from, to - from), ",");
}

TEST(Plot, OnePointPerStepAndEvaluation) {
  const std::string dir = testing::make_temp_dir("plot");
  std::string lines;
  for (int s = 1; s <= 5; ++s)
    lines += R"({"type":"train","step":)" + std::to_string(s) + R"(,"loss":)" + std::to_string(3.0 - 0.4 * s) +
             R"(,"lr":)" + std::to_string(1e-4 * s) + "}\n";
  lines += R"({"type":"eval","step":0,"loss":3.1})" "\n" R"({"type":"eval","step":5,"loss":1.2})" "\n";
  lines += R"({"type":"train","step":6,"lo)";  // cut short by a kill
  const std::string path = testing::write_file(dir, "metrics.jsonl", lines);
  const std::string svg = train::loss_plot_svg(path, "run <a&b>");
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_NE(svg.find("run &lt;a&amp;b&gt;"), std::string::npos);
  ASSERT_EQ(count(svg, "<polyline"), 3u);  // learning rate, train loss, held-out loss
  EXPECT_EQ(points_of(svg, 0), 5u);
  EXPECT_EQ(points_of(svg, 1), 5u);
  EXPECT_EQ(points_of(svg, 2), 2u);
  EXPECT_EQ(count(svg, "<circle"), 2u);

  const std::string empty = testing::write_file(dir, "empty.jsonl", R"({"type":"eval","step":0,"loss":3.1})" "\n");
  EXPECT_NE(testing::error_of([&] { train::loss_plot_svg(empty, "x"); }).find("no training step"), std::string::npos);
  EXPECT_NE(testing::error_of([&] { train::loss_plot_svg(dir + "/none.jsonl", "x"); }).find("none.jsonl"),
            std::string::npos);

  auto r = testing::run_qlora("plot '" + dir + "' --out '" + dir + "/curve.svg'");
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(testing::slurp(dir + "/curve.svg"), train::loss_plot_svg(path, dir));
  r = testing::run_qlora("plot '" + dir + "/nothing'");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("metrics.jsonl"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace qlora
