// Dynamic loss scaler against PyTorch's GradScaler (scripts/golden/amp.py), the skipped
// step leaving parameters and optimizer state untouched, the inf/nan policy, and the
// precision auto-selection.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <limits>

#include "qlora/amp/precision.h"
#include "qlora/amp/scaler.h"
#include "qlora/common/errors.h"
#include "qlora/optim/optimizer.h"

namespace {

using qlora::Precision;
using namespace qlora::amp;

// The scale is a power-of-two-times-init fp32 value and the unscale one fp32 multiply:
// everything is compared bit for bit (tolerance 0).

nlohmann::json load_golden() {
  std::ifstream f(std::string(QLORA_SOURCE_DIR) + "/tests/data/amp/scaler.json");
  EXPECT_TRUE(f.good()) << "missing tests/data/amp/scaler.json; run scripts/golden/amp.py";
  return nlohmann::json::parse(f);
}

float from_json(const nlohmann::json& v) {
  if (v.is_number()) return v.get<float>();
  const std::string s = v.get<std::string>();   // amp.py writes non-finite values as strings
  if (s == "inf") return std::numeric_limits<float>::infinity();
  if (s == "-inf") return -std::numeric_limits<float>::infinity();
  return std::numeric_limits<float>::quiet_NaN();
}

// A step's gradient: finite values, or the injected inf/nan of the golden run.
at::Tensor grad_for(int64_t step, const std::string& kind) {
  at::Tensor g = at::full({8}, 0.25f) * static_cast<float>(1 + step % 5);
  float* p = g.data_ptr<float>();
  if (kind == "inf") p[step % 8] = std::numeric_limits<float>::infinity();
  if (kind == "-inf") p[step % 8] = -std::numeric_limits<float>::infinity();
  if (kind == "nan") p[step % 8] = std::numeric_limits<float>::quiet_NaN();
  if (kind == "loss_inf")
    for (int i = 0; i < 8; ++i) p[i] = i % 2 ? std::numeric_limits<float>::infinity() : NAN;
  return g;
}

TEST(LossScaler, ScaleSequenceEqualsGradScaler) {
  const auto doc = load_golden();
  for (const auto& run : doc["runs"]) {
    LossScalerOptions o;
    o.init_scale = run["init_scale"];
    o.growth_interval = run["growth_interval"];
    o.growth_factor = run["growth_factor"];
    o.backoff_factor = run["backoff_factor"];
    LossScaler scaler(o);
    const int64_t n = run["steps"];
    int64_t skipped = 0, growths = 0;
    for (int64_t s = 0; s < n; ++s) {
      const std::string key = std::to_string(s);
      const std::string kind = run["bad_steps"].contains(key) ? run["bad_steps"][key].get<std::string>() : "";
      ASSERT_EQ(scaler.current_scale(), run["scale_used"][s].get<float>())
          << "interval " << o.growth_interval << " step " << s;
      const float before = scaler.current_scale();
      const bool bad = scaler.unscale({grad_for(s, kind)});
      ASSERT_EQ(bad, run["skipped"][s].get<bool>()) << "interval " << o.growth_interval << " step " << s;
      scaler.update();
      ASSERT_EQ(scaler.current_scale(), run["scale_after"][s].get<float>())
          << "interval " << o.growth_interval << " step " << s;
      skipped += bad;
      growths += scaler.current_scale() > before;
    }
    std::printf("[scaler] %lld steps, interval %lld: %lld skipped, %lld growths, final scale %g: identical\n",
                static_cast<long long>(n), static_cast<long long>(o.growth_interval),
                static_cast<long long>(skipped), static_cast<long long>(growths), scaler.current_scale());
    EXPECT_GT(skipped, 0);
    EXPECT_GT(growths, 0);
  }
}

TEST(LossScaler, UnscaleIsBitIdenticalToGradScaler) {
  const auto doc = load_golden();
  const auto& run = doc["runs"][2];
  ASSERT_EQ(run["init_scale"].get<double>(), 3.0);   // 1/3 is inexact: the rounding matters
  LossScalerOptions o;
  o.init_scale = 3.0;
  o.growth_interval = run["growth_interval"];
  LossScaler scaler(o);
  int64_t compared = 0;
  for (size_t s = 0; s < run["grads"].size(); ++s) {
    const auto& rec = run["grads"][s];
    at::Tensor g = at::empty({8}, at::kFloat);
    for (int i = 0; i < 8; ++i) g.data_ptr<float>()[i] = from_json(rec["scaled"][i]);
    const bool bad = scaler.unscale({g});
    EXPECT_EQ(bad, run["skipped"][s].get<bool>());
    for (int i = 0; i < 8; ++i) {
      const float want = from_json(rec["unscaled"][i]);
      const float got = g.data_ptr<float>()[i];
      if (std::isnan(want)) {
        EXPECT_TRUE(std::isnan(got));
      } else {
        EXPECT_EQ(got, want) << "step " << s << " element " << i;
        ++compared;
      }
    }
    EXPECT_TRUE(scaler.unscale({g}) == bad);   // a second call does not unscale again
    scaler.update();
  }
  EXPECT_GT(compared, 50);
}

TEST(LossScaler, SkippedStepLeavesParamsAndOptimizerStateUntouched) {
  at::manual_seed(7);
  for (const bool eight_bit : {false, true}) {
    std::vector<qlora::optim::NamedParam> params{{"a", at::randn({64, 80})}, {"b", at::randn({300})}};
    auto opt = eight_bit ? qlora::optim::make_adamw8bit(params, {}) : qlora::optim::make_adamw(params, {});
    LossScaler scaler;
    auto train_step = [&](bool inject) {
      std::vector<at::Tensor> grads;
      for (auto& p : params) {
        p.param.mutable_grad() = at::randn(p.param.sizes()) * scaler.current_scale();
        grads.push_back(p.param.grad());
      }
      if (inject) grads[1].data_ptr<float>()[7] = std::numeric_limits<float>::infinity();
      const bool bad = scaler.unscale(grads);
      if (!bad) opt->step(1e-3);
      scaler.update();
      return bad;
    };
    EXPECT_FALSE(train_step(false));
    EXPECT_FALSE(train_step(false));
    const auto state_before = opt->state();
    std::vector<at::Tensor> params_before;
    for (const auto& p : params) params_before.push_back(p.param.clone());
    const float scale_before = scaler.current_scale();

    EXPECT_TRUE(train_step(true));

    EXPECT_EQ(scaler.current_scale(), scale_before * 0.5f);
    for (size_t i = 0; i < params.size(); ++i) EXPECT_TRUE(at::equal(params[i].param, params_before[i]));
    const auto state_after = opt->state();
    ASSERT_EQ(state_after.tensors.size(), state_before.tensors.size());
    for (size_t i = 0; i < state_after.tensors.size(); ++i)
      EXPECT_TRUE(at::equal(state_after.tensors[i].second, state_before.tensors[i].second))
          << state_after.tensors[i].first;
    EXPECT_EQ(state_after.scalars_json, state_before.scalars_json);
    EXPECT_FALSE(train_step(false));   // and training goes on
    EXPECT_FALSE(at::equal(params[0].param, params_before[0]));
  }
}

TEST(LossScaler, DisabledScalerPassesThroughButStillFindsInf) {
  LossScalerOptions o;
  o.enabled = false;
  LossScaler scaler(o);
  EXPECT_EQ(scaler.current_scale(), 1.0f);
  const at::Tensor loss = at::full({}, 2.5f);
  EXPECT_EQ(scaler.scale(loss).item<float>(), 2.5f);
  at::Tensor g = at::full({4}, 3.0f);
  EXPECT_FALSE(scaler.unscale({g}));
  EXPECT_EQ(g[0].item<float>(), 3.0f);
  scaler.update();
  g[2] = NAN;
  EXPECT_TRUE(scaler.unscale({g}));
  scaler.update();
  EXPECT_EQ(scaler.current_scale(), 1.0f);
}

// The trainer's one-read step checks the gradients itself (their norm) and tells a disabled
// scaler the verdict; an enabled scaler must divide, so it refuses.
TEST(LossScaler, DisabledScalerTakesACheckMadeElsewhere) {
  LossScalerOptions o;
  o.enabled = false;
  LossScaler scaler(o);
  EXPECT_TRUE(scaler.unscale_checked(true));
  EXPECT_TRUE(scaler.found_inf());
  EXPECT_TRUE(scaler.unscale_checked(false)) << "a second call in the step keeps the first verdict";
  scaler.update();
  EXPECT_FALSE(scaler.unscale_checked(false));
  scaler.update();
  EXPECT_EQ(scaler.current_scale(), 1.0f);
  LossScaler enabled;
  EXPECT_THROW(enabled.unscale_checked(false), c10::Error);
}

TEST(LossScaler, ScalesTheLossAndRoundTripsItsState) {
  LossScaler scaler;
  EXPECT_EQ(scaler.scale(at::full({}, 0.5f)).item<float>(), 32768.0f);
  LossScalerState s{1024.0f, 17};
  scaler.load_state(s);
  EXPECT_EQ(scaler.state().scale, 1024.0f);
  EXPECT_EQ(scaler.state().growth_tracker, 17);
  EXPECT_THROW(scaler.load_state({-1.0f, 0}), c10::Error);
}

TEST(BadStepPolicy, SkipsCountsAndAbortsAfterNInARow) {
  BadStepPolicy policy(3);
  EXPECT_TRUE(policy.record(true));
  EXPECT_TRUE(policy.record(true));
  EXPECT_FALSE(policy.record(false));   // a clean step resets the run
  EXPECT_EQ(policy.in_a_row(), 0);
  EXPECT_TRUE(policy.record(true));
  EXPECT_TRUE(policy.record(true));
  try {
    policy.record(true, 41);
    ADD_FAILURE() << "expected TrainingDiverged";
  } catch (const TrainingDiverged& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("3 optimizer steps in a row"), std::string::npos) << msg;
    EXPECT_NE(msg.find("step 41"), std::string::npos) << msg;
    EXPECT_NE(msg.find("train.max_bad_steps"), std::string::npos) << msg;
  }
  EXPECT_EQ(policy.total(), 5);
  BadStepPolicy never(0);
  for (int i = 0; i < 100; ++i) never.record(true);
  EXPECT_EQ(never.in_a_row(), 100);
}

TEST(Precision, AutoPicksBf16FromAmpereFp16BeforeFp32OnCpu) {
  EXPECT_EQ(resolve_precision(Precision::kAuto, true, 9), Precision::kBf16);   // H100
  EXPECT_EQ(resolve_precision(Precision::kAuto, true, 8), Precision::kBf16);   // A100, A10, L4 (8.9)
  EXPECT_EQ(resolve_precision(Precision::kAuto, true, 7), Precision::kFp16);   // T4, V100
  EXPECT_EQ(resolve_precision(Precision::kAuto, false, 0), Precision::kFp32);
  EXPECT_EQ(resolve_precision(Precision::kFp16, true, 9), Precision::kFp16);
  EXPECT_EQ(resolve_precision(Precision::kBf16, false, 0), Precision::kBf16);
  EXPECT_EQ(resolve_precision(Precision::kFp32, true, 9), Precision::kFp32);
  EXPECT_THROW(resolve_precision(Precision::kBf16, true, 7), qlora::InputError);
  EXPECT_TRUE(needs_loss_scaling(Precision::kFp16));
  EXPECT_FALSE(needs_loss_scaling(Precision::kBf16));
  EXPECT_FALSE(needs_loss_scaling(Precision::kFp32));
}

}  // namespace
