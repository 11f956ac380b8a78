// plan: the time estimate (FLOPs a token, NF4 dequant traffic, steps and hours an epoch).
#include <gtest/gtest.h>

#include "qlora/config/config.h"
#include "qlora/model/llama_config.h"
#include "qlora/plan/plan.h"
#include "support/plan_fixtures.h"

namespace qlora::plan {
namespace {

using testing::plan_for;

TEST(Plan, TimeEstimateScalesWithTokens) {
  const Plan a = plan_for("llama-3.2-1b", "h100", {"train.micro_batch_size=1", "train.gradient_accumulation_steps=8"});
  const Plan b = plan_for("llama-3.2-1b", "h100", {"train.micro_batch_size=1", "train.gradient_accumulation_steps=16"});
  ASSERT_TRUE(a.time.available);
  EXPECT_NEAR(b.time.seconds_per_step / a.time.seconds_per_step, 2.0, 1e-9);
  // 1B: forward ≈ 2 × 1.24e9 FLOP per token, the input-gradient backward the same, and the fused
  // layer's recompute 2 × 0.64e9 (q, k, v and gate/up), plus attention.
  EXPECT_GT(a.time.flops_per_token, 4 * 1.2e9 + 2 * 0.6e9);
  EXPECT_LT(a.time.flops_per_token, 4 * 1.4e9 + 2 * 0.7e9);
}

// The fused layer (bf16/fp16 on a GPU) keeps each layer's input and attention residual, so its
// recompute runs neither o_proj nor down_proj, and its backward reuses the weights its recompute
// dequantized; the generic checkpoint (fp32) recomputes the whole layer and dequantizes a third
// time.
TEST(Plan, FusedLayerRecomputesNeitherOProjNorDownProj) {
  const Plan fused = plan_for("llama-3.2-1b", "h100", {"train.precision=bf16"});
  const Plan generic = plan_for("llama-3.2-1b", "h100", {"train.precision=fp32"});
  ASSERT_TRUE(fused.time.available && generic.time.available);
  // 2 FLOP × 16 layers × 2,048 × (o_proj's 2,048 + down_proj's 8,192) = 671,088,640 per token.
  EXPECT_DOUBLE_EQ(generic.time.flops_per_token - fused.time.flops_per_token, 671'088'640.0);
  EXPECT_NE(fused.time.formula.find("recompute without o_proj and down_proj"), std::string::npos)
      << fused.time.formula;
  // Three passes against two, each writing fp32 (4 B) against bf16 (2 B) weights beside the
  // 4-bit codes (0.5 B) and an absmax byte per 64.
  const double per_pass = (0.5 + 4 + 1.0 / 64) / (0.5 + 2 + 1.0 / 64);
  EXPECT_NEAR(generic.time.dequant_seconds_per_step / fused.time.dequant_seconds_per_step, 1.5 * per_pass, 1e-12);
  // Without checkpointing nothing is recomputed: forward and backward only, two passes each way.
  const Plan none = plan_for("llama-3.2-1b", "h100", {"train.precision=bf16", "train.gradient_checkpointing=false"});
  EXPECT_NEAR(none.time.dequant_seconds_per_step, fused.time.dequant_seconds_per_step, 1e-15);
  EXPECT_LT(none.time.flops_per_token, fused.time.flops_per_token);
}

TEST(Plan, EpochEstimateFromTheNumberOfExamples) {
  const Config cfg = default_config({"model.preset=llama-3.2-1b", "train.micro_batch_size=2",
                                     "train.gradient_accumulation_steps=16", "train.epochs=3"});
  const GpuSpec g = resolve_gpu("h100");
  Plan p = make_plan(cfg, resolve_model_shape(cfg), &g, 1);
  set_dataset_size(p, cfg, 1000);  // 1000 / 32 → 32 steps (the last one partial), × 3 epochs
  EXPECT_EQ(p.time.steps_per_epoch, 32);
  EXPECT_EQ(p.time.total_steps, 96);
  EXPECT_NEAR(p.time.hours_per_epoch, 32 * p.time.seconds_per_step / 3600, 1e-12);
  const Config capped = default_config({"model.preset=llama-3.2-1b", "train.max_steps=10"});
  Plan q = make_plan(capped, resolve_model_shape(capped), &g, 1);
  set_dataset_size(q, capped, 1000);
  EXPECT_EQ(q.time.total_steps, 10);
}

}  // namespace
}  // namespace qlora::plan
