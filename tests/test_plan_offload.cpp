// plan: train.offload_checkpoints (Note [offloaded checkpoints] in src/layer/offload.cpp): what
// the GPU keeps when each layer's checkpoint waits in host memory, the host memory it needs,
// the transfer in the time estimate, auto's choice and the advice.
#include <gtest/gtest.h>

#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "qlora/model/decoder_config.h"
#include "qlora/plan/finder.h"
#include "qlora/plan/plan.h"
#include "support/plan_fixtures.h"

namespace qlora::plan {
namespace {

using testing::component;
using testing::plan_for;

// Llama-3.1-8B, one sequence of 32,768 tokens, bf16: the fused layer keeps x and h1 of each of
// 32 layers, 2 × 32 × 32,768 × 4,096 × 2 B = 17,179,869,184 B (16 GiB). Offloaded, the GPU holds
// two layers' worth (1 GiB) and the host all of it.
const std::vector<std::string> kLong = {"train.micro_batch_size=1", "train.gradient_accumulation_steps=1",
                                        "data.max_seq_length=32768", "train.precision=bf16", "train.recompute=full"};

std::vector<std::string> with(std::vector<std::string> sets, const std::string& more) {
  sets.push_back(more);
  return sets;
}

TEST(PlanOffload, TheGpuKeepsTwoLayersOfCheckpointsAndTheHostAll) {
  // LoRA dropout 0: no dropped copies for the recompute to shed (that saving: the next test).
  const auto sets = with(kLong, "lora.dropout=0");
  const Plan kept = plan_for("llama-3.1-8b", "h100", with(sets, "train.offload_checkpoints=false"));
  const Plan moved = plan_for("llama-3.1-8b", "h100", with(sets, "train.offload_checkpoints=true"));
  EXPECT_FALSE(kept.offload);
  EXPECT_TRUE(moved.offload);
  EXPECT_DOUBLE_EQ(moved.offload_host_bytes, 17'179'869'184.0);
  // Both peaks carry the checkpoints: whichever phase peaks, 30 of 32 layers' worth leave the GPU.
  EXPECT_DOUBLE_EQ(kept.allocated_bytes - moved.allocated_bytes, 17'179'869'184.0 * 30.0 / 32.0);
  EXPECT_NE(component(moved, "activations").formula.find("offloaded to host memory"), std::string::npos)
      << component(moved, "activations").formula;
  // The transfer: out and back, at the assumed host link rate, beside the compute.
  EXPECT_DOUBLE_EQ(moved.time.offload_seconds_per_step, 2.0 * 17'179'869'184.0 / 25e9);
  EXPECT_GE(moved.time.seconds_per_step, moved.time.offload_seconds_per_step);
  EXPECT_EQ(kept.time.offload_seconds_per_step, 0.0);
  const nlohmann::json j = nlohmann::json::parse(render_json(moved));
  EXPECT_EQ(j["offload"]["enabled"], true);
  EXPECT_EQ(j["offload"]["host_bytes"].get<int64_t>(), 17'179'869'184);
  EXPECT_NE(render_text(moved).find("of host memory (train.offload_checkpoints)"), std::string::npos);
}

// With LoRA dropout, an offloaded run's recompute sheds its dropped LoRA inputs (Note [shed LoRA
// inputs]): q, k, v's three copies of n1 become n1 once and three bit masks, gate and up's two of
// n2 the same; the top layer's backward half holds that much less a token.
TEST(PlanOffload, TheRecomputeShedsDroppedLoraInputs) {
  const auto dropped = with(with(kLong, "lora.dropout=0.05"), "train.offload_checkpoints=true");
  const auto plain = with(with(kLong, "lora.dropout=0"), "train.offload_checkpoints=true");
  const double per_token_dropped = component(plan_for("llama-3.1-8b", "h100", dropped), "activations").bytes;
  const double per_token_plain = component(plan_for("llama-3.1-8b", "h100", plain), "activations").bytes;
  // Dropout then costs only the bit masks (and o_proj's / down_proj's own): far less than the
  // copies, 2 × 4,096 × 2 B a token for q, k, v alone.
  EXPECT_LT(per_token_dropped - per_token_plain, 32768.0 * 2 * 4096 * 2);
}

// auto: on for one sequence that does not fit without it and does with it; off where it fits
// anyway, and for micro batches of several sequences (a smaller one is the cheaper fix).
TEST(PlanOffload, AutoOffloadsOnlyWhereItMakesOneSequenceFit) {
  const Plan cap = plan_for("llama-3.1-8b", "24GiB", kLong);
  EXPECT_TRUE(cap.offload);
  EXPECT_TRUE(cap.fits);
  EXPECT_FALSE(plan_for("llama-3.1-8b", "24GiB", with(kLong, "train.offload_checkpoints=false")).fits);
  EXPECT_FALSE(plan_for("llama-3.1-8b", "h200", kLong).offload);  // fits without
  const Plan two = plan_for("llama-3.1-8b", "24GiB",
                            {"train.micro_batch_size=2", "data.max_seq_length=16384", "train.precision=bf16"});
  EXPECT_FALSE(two.offload);
  EXPECT_FALSE(plan_for("llama-3.1-8b", "", kLong).offload);  // no GPU: nothing to decide against
  const Plan no_ckpt = plan_for("llama-3.1-8b", "h100",
                                with(with(kLong, "train.offload_checkpoints=true"), "train.gradient_checkpointing=false"));
  EXPECT_FALSE(no_ckpt.offload);  // nothing is checkpointed
}

// With it off by hand, the advice names it where it alone makes the run fit.
TEST(PlanOffload, AdvisedWhereItAloneFits) {
  const Plan p = plan_for("llama-3.1-8b", "24GiB", with(kLong, "train.offload_checkpoints=false"));
  ASSERT_FALSE(p.fits);
  ASSERT_FALSE(p.advice.empty());
  EXPECT_EQ(p.advice.front().kind, "offload") << p.advice.front().text;
  EXPECT_TRUE(p.advice.front().fits);
  EXPECT_DOUBLE_EQ(p.advice.front().total_bytes, plan_for("llama-3.1-8b", "24GiB", kLong).total_bytes);
}

// The plan's guess for --find-max-seq: the longest multiple of the step whose plan fits, with and
// without offloading; longer checkpoints in host memory reach further.
TEST(PlanOffload, LongestFittingSequence) {
  const DecoderConfig m = model_preset("llama-3.1-8b");
  const Config cfg = default_config({"train.micro_batch_size=1", "train.gradient_accumulation_steps=1",
                                     "train.precision=bf16"});
  BudgetInputs in = budget_inputs(cfg, m, "bf16");
  const GpuSpec gpu = resolve_gpu("22GiB");
  const int64_t kept = largest_fitting_seq(m, in, gpu, 1 << 20, 1024);
  in.offload = true;
  const int64_t moved = largest_fitting_seq(m, in, gpu, 1 << 20, 1024);
  std::printf("  llama-3.1-8b on 22 GiB, plan: %lld tokens with the checkpoints on the GPU, %lld offloaded\n",
              static_cast<long long>(kept), static_cast<long long>(moved));
  EXPECT_GT(moved, kept);
  EXPECT_EQ(moved % 1024, 0);
  for (const auto& [seq, fit] : {std::pair<int64_t, bool>{moved, true}, {moved + 1024, false}}) {
    in.seq_length = seq;
    EXPECT_EQ(total_bytes(memory_components(m, in)) <= gpu.memory_bytes, fit) << seq;
  }
  EXPECT_EQ(largest_fitting_seq(m, in, resolve_gpu("4GiB"), 1 << 20, 1024), 0);  // the base alone is more
}

}  // namespace
}  // namespace qlora::plan
