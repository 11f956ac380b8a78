// plan: the time estimate (FLOPs a token, NF4 dequant traffic, Note [plan time model]'s parts
// and the host's floor, against the H200's measurements; steps and hours an epoch).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "qlora/config/config.h"
#include "qlora/model/decoder_config.h"
#include "qlora/plan/plan.h"
#include "support/plan_fixtures.h"

namespace qlora::plan {
namespace {

using testing::plan_for;

// Note [plan time model]: on the GPU the parts add up; a small step waits for the host.
TEST(Plan, TimeIsTheSumOfItsPartsOrTheHostsFloor) {
  const Plan big = plan_for("llama-3.1-8b", "h200",
                            {"train.micro_batch_size=2", "data.max_seq_length=2048", "train.precision=bf16",
                             "lora.target_modules=[q_proj, k_proj, v_proj, o_proj]", "train.recompute=full"});
  ASSERT_TRUE(big.time.available);
  const TimeEstimate& t = big.time;
  EXPECT_FALSE(t.host_bound);
  EXPECT_NEAR(t.seconds_per_step,
              t.gemm_seconds_per_step + t.attention_seconds_per_step + t.memory_seconds_per_step +
                  t.dequant_seconds_per_step + t.gap_seconds_per_step,
              1e-12);
  EXPECT_GT(t.gemm_seconds_per_step, 0.5 * t.seconds_per_step);  // the 8B step is GEMM-bound
  EXPECT_NEAR(t.utilisation, t.flops_per_step / (t.peak_tflops * 1e12 * t.seconds_per_step), 1e-12);

  const Plan small = plan_for("llama-3.2-1b", "h200",
                              {"train.micro_batch_size=1", "data.max_seq_length=256", "train.precision=bf16"});
  ASSERT_TRUE(small.time.available);
  EXPECT_TRUE(small.time.host_bound);
  EXPECT_DOUBLE_EQ(small.time.seconds_per_step, small.time.host_seconds_per_step);
  EXPECT_NE(small.time.formula.find("the host is the floor"), std::string::npos) << small.time.formula;
  // Twice the tokens a micro batch: the same kernels, so the host-bound step costs the same.
  const Plan twice = plan_for("llama-3.2-1b", "h200",
                              {"train.micro_batch_size=2", "data.max_seq_length=256", "train.precision=bf16"});
  EXPECT_DOUBLE_EQ(twice.time.seconds_per_step, small.time.seconds_per_step);
}

// More LoRA projections: more element-wise passes and kernels for the same GEMM FLOPs (to within
// the LoRA products).
TEST(Plan, AllLinearLoraCostsPassesAndKernels) {
  const std::vector<std::string> base = {"train.micro_batch_size=4", "data.max_seq_length=1024", "train.precision=bf16",
                                         "train.recompute=full"};
  auto qkvo = base, all = base;
  qkvo.push_back("lora.target_modules=[q_proj, k_proj, v_proj, o_proj]");
  all.push_back("lora.target_modules=all-linear");
  const Plan a = plan_for("llama-3.2-1b", "h200", qkvo), b = plan_for("llama-3.2-1b", "h200", all);
  EXPECT_GT(b.time.memory_bytes_per_step, 1.3 * a.time.memory_bytes_per_step);
  EXPECT_GT(b.time.kernels_per_step, a.time.kernels_per_step + 16 * 3 * 20);  // 3 projections × 16 layers
  EXPECT_LT(b.time.gemm_seconds_per_step, 1.02 * a.time.gemm_seconds_per_step);
}

// The oracle is the GPU: the bench_train rows of the comparison suites measured on an H200 on
// 2026-12-02 and 2026-12-03 (copied from bench/results into tests/data/plan/h200_rows.json, whose
// README names the files), each planned for the H200 with the run's own settings. Rows the
// estimate calls host-bound get a wider band: the host's speed moved 37% between two runs on the
// same shape (bench/results/2026-12-02-h200-gemm-backends/README.md), and 2 × 512 without
// checkpointing read 62,043 tok/s on 2026-12-02, 45,892 on 2026-12-03 (the estimate, 55,602, is
// -10% and +21% of those): the host's speed, not the model, sets that band.
constexpr double kGpuBoundTolerance = 0.10;
constexpr double kHostBoundTolerance = 0.25;

TEST(PlanMeasured, TimeWithinTenPercentOfTheH200) {
  const std::string path = std::string(QLORA_SOURCE_DIR) + "/tests/data/plan/h200_rows.json";
  std::ifstream f(path);
  ASSERT_TRUE(f) << "cannot read " << path;
  const nlohmann::json data = nlohmann::json::parse(f);
  int rows = 0;
  for (const nlohmann::json& file : data.at("files")) {
    const std::string source = file.at("source").get<std::string>();
    for (const nlohmann::json& j : file.at("rows")) {
      const std::string lora = j.at("lora").get<std::string>();
      const bool ckpt = j.at("gradient_checkpointing").get<bool>();
      const Plan p = plan_for(
          j.at("model").get<std::string>(), "h200",
          {"train.micro_batch_size=" + std::to_string(j.at("micro").get<int64_t>()),
           "data.max_seq_length=" + std::to_string(j.at("seq").get<int64_t>()), "lora.r=16", "lora.dropout=0.05",
           lora.find("all-linear") != std::string::npos ? "lora.target_modules=all-linear"
                                                        : "lora.target_modules=[q_proj, k_proj, v_proj, o_proj]",
           "train.precision=" + j.at("precision").get<std::string>(),
           std::string("train.gradient_checkpointing=") + (ckpt ? "true" : "false"),
           "train.recompute=" + (ckpt ? j.at("recompute_as_run").get<std::string>() : std::string("full")),
           "train.selective_layers=" + std::to_string(j.at("selective_layers").get<int64_t>()),
           "train.no_recompute_layers=" + std::to_string(j.at("no_recompute_layers").get<int64_t>()),
           "train.optimizer=paged_adamw_8bit"});
      ASSERT_TRUE(p.time.available);
      const double measured = j.at("tokens_per_second").get<double>();
      const double error = p.time.tokens_per_second / measured - 1.0;
      const std::string what = source + " " + j.at("config").get<std::string>() + ": predicted " +
                               std::to_string(p.time.tokens_per_second) + " tok/s, measured " +
                               std::to_string(measured) + (p.time.host_bound ? " (host-bound)" : "");
      std::printf("  %s (%+.1f%%)\n", what.c_str(), 100.0 * error);
      EXPECT_LE(std::fabs(error), p.time.host_bound ? kHostBoundTolerance : kGpuBoundTolerance) << what;
      ++rows;
    }
  }
  EXPECT_EQ(rows, 28);  // 6 + 6 + 4 + 6 + 6 rows: none was skipped
}

TEST(Plan, TimeEstimateScalesWithTokens) {
  const Plan a = plan_for("llama-3.2-1b", "h100", {"train.micro_batch_size=1", "train.gradient_accumulation_steps=8"});
  const Plan b = plan_for("llama-3.2-1b", "h100", {"train.micro_batch_size=1", "train.gradient_accumulation_steps=16"});
  ASSERT_TRUE(a.time.available);
  // Twice the micro batches: twice the step, less the optimizer's few kernels a step.
  EXPECT_NEAR(b.time.seconds_per_step / a.time.seconds_per_step, 2.0, 1e-3);
  EXPECT_LT(b.time.seconds_per_step / a.time.seconds_per_step, 2.0);
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

// Gemma's sandwich norms make the fused layer recompute o_proj (its output is the post-attention
// norm's input; down_proj's is kept instead): 2·L·h·(H·d) FLOPs a token more than without them.
TEST(PlanTime, SandwichNormsRecomputeOProj) {
  const Config cfg = default_config({"train.micro_batch_size=2", "data.max_seq_length=1024", "train.precision=bf16",
                                     "train.gradient_accumulation_steps=1"});
  DecoderConfig m = model_preset("gemma-2-2b");
  ASSERT_TRUE(m.pieces.sandwich_norms);
  const GpuSpec gpu = resolve_gpu("h100");
  const double with = make_plan(cfg, m, &gpu, 1).time.flops_per_token;
  m.pieces.sandwich_norms = false;
  const double without = make_plan(cfg, m, &gpu, 1).time.flops_per_token;
  EXPECT_DOUBLE_EQ(with - without, 2.0 * double(m.num_hidden_layers) * double(m.hidden_size) *
                                       double(m.num_attention_heads * m.head_dim));
}

}  // namespace
}  // namespace qlora::plan
