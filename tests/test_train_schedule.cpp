// LR schedules against transformers' LambdaLR schedulers (scripts/golden/schedule.py).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>

#include "qlora/common/errors.h"
#include "qlora/train/schedule.h"

namespace {

using qlora::LrSchedule;
using qlora::train::LrScheduler;

// The C++ follows transformers' double-precision expressions operation for operation,
// so the values should be identical; 1e-12 relative (the brief's bound) leaves room for a
// libm cos that differs in the last bit, nothing more.
constexpr double kRelTol = 1e-12;

nlohmann::json load_golden() {
  std::ifstream f(std::string(QLORA_SOURCE_DIR) + "/tests/data/schedule/lr.json");
  EXPECT_TRUE(f.good()) << "missing tests/data/schedule/lr.json; run scripts/golden/schedule.py";
  return nlohmann::json::parse(f);
}

LrSchedule kind_of(const std::string& s) {
  if (s == "constant") return LrSchedule::kConstant;
  if (s == "linear") return LrSchedule::kLinear;
  return LrSchedule::kCosine;
}

TEST(Schedule, MatchesTransformersEveryStep) {
  const auto doc = load_golden();
  ASSERT_GE(doc["cases"].size(), 10u);
  double worst = 0.0;
  int64_t values = 0, exact = 0;
  for (const auto& c : doc["cases"]) {
    const int64_t total = c["total_steps"];
    const int64_t warmup = qlora::train::resolve_warmup_steps(c["warmup_steps"], c["warmup_ratio"], total);
    ASSERT_EQ(warmup, c["resolved_warmup"].get<int64_t>())
        << c["schedule"] << " total " << total << " ratio " << c["warmup_ratio"];
    const LrScheduler sched(kind_of(c["schedule"]), c["base_lr"], total, warmup);
    const auto& lrs = c["lrs"];
    ASSERT_EQ(lrs.size(), static_cast<size_t>(total + 1));
    for (int64_t s = 0; s <= total; ++s) {
      const double want = lrs[s];
      const double got = sched.lr_at(s);
      const double rel = want == 0.0 ? std::fabs(got) : std::fabs(got - want) / std::fabs(want);
      worst = std::max(worst, rel);
      ++values;
      exact += got == want;
      EXPECT_LE(rel, kRelTol) << c["hf_name"] << " total " << total << " warmup " << warmup << " step " << s
                              << ": got " << got << ", transformers " << want;
    }
  }
  std::printf("[schedule] %lld values, %lld bit-identical, max relative difference %.3g\n",
              static_cast<long long>(values), static_cast<long long>(exact), worst);
}

TEST(Schedule, WarmupRatioRoundsUpLikeTransformers) {
  EXPECT_EQ(qlora::train::resolve_warmup_steps(0, 0.07, 100), 8);   // 7.000000000000001
  EXPECT_EQ(qlora::train::resolve_warmup_steps(0, 0.03, 100), 3);
  EXPECT_EQ(qlora::train::resolve_warmup_steps(5, 0.5, 100), 5);    // steps win over the ratio
  EXPECT_EQ(qlora::train::resolve_warmup_steps(0, 0.0, 100), 0);
}

TEST(Schedule, FromConfig) {
  qlora::TrainConfig t;
  t.lr_scheduler = LrSchedule::kCosine;
  t.learning_rate = 1e-3;
  t.warmup_ratio = 0.1;
  const auto s = qlora::train::make_lr_scheduler(t, 50);
  EXPECT_EQ(s.warmup_steps(), 5);
  EXPECT_DOUBLE_EQ(s.lr_at(0), 0.0);
  EXPECT_DOUBLE_EQ(s.lr_at(5), 1e-3);
  EXPECT_DOUBLE_EQ(s.lr_at(50), 0.0);
  EXPECT_GT(s.lr_at(20), s.lr_at(30));
}

TEST(Schedule, BadInputIsAnInputError) {
  EXPECT_THROW(qlora::train::resolve_warmup_steps(-1, 0.0, 10), qlora::InputError);
  EXPECT_THROW(qlora::train::resolve_warmup_steps(0, 1.5, 10), qlora::InputError);
  EXPECT_THROW(LrScheduler(LrSchedule::kLinear, 1e-3, 0, 0), qlora::InputError);
  EXPECT_THROW(LrScheduler(LrSchedule::kLinear, -1.0, 10, 0), qlora::InputError);
}

}  // namespace
