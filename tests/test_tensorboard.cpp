// TensorBoard event files: the record format's CRCs, and a run's scalars as TensorBoard's own
// reader sees them (every train and eval value of metrics.jsonl, each step once across a resume).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <map>
#include <string>

#include "qlora/train/run.h"
#include "qlora/train/tensorboard.h"
#include "support/test_support.h"
#include "support/train_fixtures.h"

namespace qlora {
namespace {

TEST(Tensorboard, Crc32cKnownValues) {
  EXPECT_EQ(train::crc32c("123456789"), 0xE3069283u);  // the CRC-32C check value
  EXPECT_EQ(train::crc32c(""), 0u);
  // TensorFlow's mask of it.
  const uint32_t c = 0xE3069283u;
  EXPECT_EQ(train::masked_crc32c("123456789"), ((c >> 15) | (c << 17)) + 0xa282ead8u);
}

TEST(Tensorboard, TensorboardReadsEveryMetricOnceAcrossAResume) {
  std::string why;
  const std::string py = testing::python_with("tensorboard", &why);
  if (py.empty()) GTEST_SKIP() << why;
  const std::string tmp = testing::make_temp_dir("tensorboard");
  Config cfg = testing::small_run_config(tmp, 16, 4);
  cfg.train.gradient_accumulation_steps = 1;
  cfg.train.max_steps = 4;
  cfg.train.eval_steps = 2;
  cfg.train.precision = Precision::kFp32;
  cfg.output.dir = tmp + "/out";
  train::RunOptions ro = testing::cpu_run_options();
  ro.eval.generate_examples = 0;
  ro.stop_when = [](int64_t next_step, int64_t) { return next_step > 2; };  // stop after step 2, saved
  const train::RunResult first = train::run_training(cfg, ro);
  ASSERT_TRUE(first.interrupted);
  ro.stop_when = {};
  ro.resume = "auto";
  const train::RunResult second = train::run_training(cfg, ro);
  ASSERT_EQ(second.total_steps, 4);

  int status = -1;
  const std::string out = testing::run_capture(
      "'" + py + "' '" + testing::source_path("tests/scripts/read_tfevents.py") + "' '" + cfg.output.dir + "/runs' 2>&1",
      &status);
  ASSERT_EQ(status, 0) << out;
  const nlohmann::json got = nlohmann::json::parse(out.substr(out.rfind("{\"files\"")));
  EXPECT_EQ(got["files"], 1);  // the resumed run rewrote the history into one file
  // Every metrics.jsonl value, at its step, once.
  std::map<std::string, std::vector<std::pair<int64_t, double>>> want;
  std::ifstream in(second.metrics_path);
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    const std::string prefix = j["type"] == "train" ? "train/" : "eval/";
    want[prefix + "loss"].push_back({j["step"].get<int64_t>(), j["loss"].get<double>()});
    if (j["type"] == "train") want["train/learning_rate"].push_back({j["step"].get<int64_t>(), j["lr"].get<double>()});
  }
  EXPECT_EQ(want["train/loss"].size(), 4u);
  EXPECT_EQ(want["eval/loss"].size(), 2u);  // steps 2 (before the stop) and 4
  for (const auto& [tag, points] : want) {
    ASSERT_TRUE(got["scalars"].contains(tag)) << tag << ": " << out;
    const auto& seen = got["scalars"][tag];
    ASSERT_EQ(seen.size(), points.size()) << tag << ": " << seen.dump();
    for (size_t i = 0; i < points.size(); ++i) {
      EXPECT_EQ(seen[i][0].get<int64_t>(), points[i].first) << tag;
      EXPECT_EQ(seen[i][1].get<float>(), static_cast<float>(points[i].second)) << tag;  // stored as float
    }
  }
}

}  // namespace
}  // namespace qlora
