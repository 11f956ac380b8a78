// plan: what train.recompute keeps and saves: selective recompute (each layer's gate/up
// output), train.selective_layers, layers kept whole (train.no_recompute_layers, Note [layers
// not recomputed]), and train.recompute: auto, which chooses both from the memory budget.
#include <gtest/gtest.h>

#include <cstdio>

#include <cmath>
#include <string>
#include <vector>

#include "qlora/common/errors.h"
#include "qlora/config/config.h"
#include "qlora/plan/plan.h"
#include "support/plan_fixtures.h"

namespace qlora::plan {
namespace {

using testing::component;
using testing::plan_for;

// ---------------------------------------------------------------- selective

TEST(Plan, SelectiveRecomputeKeepsGateUpAndSavesItsGemm) {
  // As LayerPhasePeakAtLongSequences (test_plan.cpp), with train.recompute: selective (Note [selective recompute]).
  // Kept besides x and h1: each layer's gate/up output 16 × 16,384 × 2 × 8,192 × 2 = 8,589,934,592
  //   → 10,737,418,240. The MLP half no longer allocates gate|up: 57,348 − 2×2×8,192 = 24,580 per
  //   token, and n2 is gone (no gate/up LoRA): 20,484 → 335,609,856 + [Wg;Wu] alone (dequantized
  //   after Wd is freed) 67,108,864 = 402,718,720, below the attention half's 914,423,808.
  // → activations 10,737,418,240 + 4,800,512 + 893,452,288 = 11,635,671,040; loss phase
  //   2,821,865,472 + 8,589,934,592 = 11,411,800,064, lower.
  // Compute: the gate/up GEMMs leave the recompute, 2 × 16 × 2,048 × 2 × 8,192 = 1,073,741,824 per token.
  const std::vector<std::string> sets = {"train.micro_batch_size=8", "data.max_seq_length=2048",
                                         "train.precision=bf16"};
  auto sel = sets;
  sel.push_back("train.recompute=selective");
  const Plan full = plan_for("llama-3.2-1b", "h100", sets);
  const Plan p = plan_for("llama-3.2-1b", "h100", sel);
  EXPECT_DOUBLE_EQ(component(p, "activations").bytes, 11'635'671'040.0);
  EXPECT_DOUBLE_EQ(component(p, "backward_workspace").bytes, 20'971'520.0);
  EXPECT_NE(component(p, "activations").formula.find("gate/up outputs kept (selective recompute)"), std::string::npos)
      << component(p, "activations").formula;
  ASSERT_TRUE(p.time.available && full.time.available);
  EXPECT_DOUBLE_EQ(full.time.flops_per_token - p.time.flops_per_token, 1'073'741'824.0);
  // fp32 runs the generic checkpoint, which recomputes everything: selective changes nothing.
  auto fp32 = sets, fp32_sel = sel;
  fp32.back() = fp32_sel[2] = "train.precision=fp32";
  EXPECT_DOUBLE_EQ(plan_for("llama-3.2-1b", "h100", fp32_sel).total_bytes,
                   plan_for("llama-3.2-1b", "h100", fp32).total_bytes);
}

TEST(Plan, SelectiveInSomeLayersKeepsOnlyTheirGateUp) {
  // The run above with train.selective_layers: 8 of 16: half the kept gate/up outputs,
  // 8 × 536,870,912 B = 4,294,967,296 less → 7,340,703,744 (the layer phase still peaks: the
  // loss phase is 2,821,865,472 + 4,294,967,296 = 7,116,832,768), half the FLOPs saved.
  const std::vector<std::string> sets = {"train.micro_batch_size=8", "data.max_seq_length=2048",
                                         "train.precision=bf16", "train.recompute=selective"};
  auto half = sets;
  half.push_back("train.selective_layers=8");
  const Plan all = plan_for("llama-3.2-1b", "h100", sets);
  const Plan p = plan_for("llama-3.2-1b", "h100", half);
  EXPECT_DOUBLE_EQ(component(p, "activations").bytes, 7'340'703'744.0);
  EXPECT_EQ(p.recompute, "selective");
  EXPECT_EQ(p.selective_layers, 8);
  EXPECT_EQ(all.selective_layers, 16);
  EXPECT_DOUBLE_EQ(p.time.flops_per_token - all.time.flops_per_token, 536'870'912.0);
  // 0 layers is full recompute; more layers than the model has is all of them.
  auto none = sets, more = sets;
  none.push_back("train.selective_layers=0");
  more.push_back("train.selective_layers=99");
  auto full_sets = sets;
  full_sets.back() = "train.recompute=full";
  EXPECT_DOUBLE_EQ(plan_for("llama-3.2-1b", "h100", none).total_bytes,
                   plan_for("llama-3.2-1b", "h100", full_sets).total_bytes);
  EXPECT_EQ(plan_for("llama-3.2-1b", "h100", none).recompute, "full");
  EXPECT_DOUBLE_EQ(plan_for("llama-3.2-1b", "h100", more).total_bytes, all.total_bytes);
}

TEST(Plan, AutoRecomputeKeepsAsManyLayersAsFit) {
  // 8B at 2 × 2048, bf16: on an 80 GB H100 every layer's gate/up fits; under 13 GB only some,
  // the most that leave 5% of it free; without a GPU, auto plans as full.
  const std::vector<std::string> sets = {"train.micro_batch_size=2", "data.max_seq_length=2048",
                                         "train.precision=bf16", "train.recompute=auto"};
  const Plan big = plan_for("llama-3.1-8b", "h100", sets);
  EXPECT_EQ(big.recompute, "selective");
  EXPECT_EQ(big.selective_layers, 32);
  const Plan capped = plan_for("llama-3.1-8b", "13GB", sets);
  const double limit = resolve_gpu("13GB").memory_bytes * (1 - 0.05);  // kTightHeadroomFraction, src/plan/constants.h
  ASSERT_GT(capped.selective_layers, 0);
  ASSERT_LT(capped.selective_layers, 32);
  EXPECT_LE(capped.total_bytes, limit);
  auto one_more = sets;
  one_more.back() = "train.recompute=selective";
  one_more.push_back("train.selective_layers=" + std::to_string(capped.selective_layers + 1));
  EXPECT_GT(plan_for("llama-3.1-8b", "13GB", one_more).total_bytes, limit)
      << "auto stopped at " << capped.selective_layers << " layers though one more fits";
  bool noted = false;
  for (const auto& n : capped.notes)
    noted |= n.find("train.recompute: auto keeps the gate/up output in") != std::string::npos;
  EXPECT_TRUE(noted);
  const Plan none = plan_for("llama-3.1-8b", "", sets);
  EXPECT_EQ(none.recompute, "full");
  auto fp32 = sets;
  fp32[2] = "train.precision=fp32";
  EXPECT_EQ(plan_for("llama-3.2-1b", "h100", fp32).recompute, "full");
  // Too small for even full recompute: auto keeps nothing, and the usual advice follows.
  const Plan tiny = plan_for("llama-3.1-8b", "6GiB", sets);
  EXPECT_EQ(tiny.selective_layers, 0);
  EXPECT_FALSE(tiny.fits);
}

TEST(Plan, OverWithSelectiveRecomputeAdvisesFullFirst) {
  // The same run on a 12 GiB GPU: selective does not fit, full recompute does (the table above).
  const Plan p = plan_for("llama-3.2-1b", "12GiB",
                          {"train.micro_batch_size=8", "data.max_seq_length=2048", "train.precision=bf16",
                           "train.recompute=selective"});
  ASSERT_FALSE(p.fits);
  ASSERT_FALSE(p.advice.empty());
  EXPECT_EQ(p.advice.front().kind, "recompute") << p.advice.front().text;
  EXPECT_NE(p.advice.front().text.find("set train.recompute: full"), std::string::npos) << p.advice.front().text;
  EXPECT_TRUE(p.advice.front().fits) << p.advice.front().text;
  EXPECT_EQ(p.advice.size(), 1u);
}

// ---------------------------------------------------------------- layers kept whole

// 1B at 8 × 2048, bf16, r 16 on q,k,v,o with dropout: the runs these tests vary.
std::vector<std::string> long_run(std::vector<std::string> more) {
  std::vector<std::string> sets = {"train.micro_batch_size=8", "data.max_seq_length=2048", "train.precision=bf16",
                                   "lora.dropout=0.05"};
  sets.insert(sets.end(), more.begin(), more.end());
  return sets;
}

// Every layer kept whole under checkpointing is the layer without checkpointing: the same
// bytes in every component and the same FLOPs.
TEST(PlanRecompute, EveryLayerKeptWholeIsNoCheckpointing) {
  const Plan whole = plan_for("llama-3.2-1b", "h100", long_run({"train.no_recompute_layers=16"}));
  const Plan none = plan_for("llama-3.2-1b", "h100", long_run({"train.gradient_checkpointing=false"}));
  ASSERT_EQ(whole.components.size(), none.components.size());
  for (size_t k = 0; k < whole.components.size(); ++k)
    EXPECT_DOUBLE_EQ(whole.components[k].bytes, none.components[k].bytes) << whole.components[k].key;
  EXPECT_DOUBLE_EQ(whole.time.flops_per_token, none.time.flops_per_token);
  EXPECT_EQ(whole.no_recompute_layers, 16);
  EXPECT_EQ(whole.recompute, "full");  // the mode; the count says nothing is recomputed
  // More than the model has is all of them; with selective too (gate/up is kept with the rest).
  const Plan more =
      plan_for("llama-3.2-1b", "h100", long_run({"train.recompute=selective", "train.no_recompute_layers=99"}));
  EXPECT_DOUBLE_EQ(more.total_bytes, none.total_bytes);
  EXPECT_EQ(more.no_recompute_layers, 16);
}

// Between none and all: each layer kept whole costs memory and saves its recompute, and the
// top layer's backward is then one without checkpointing. Each layer more kept whole adds the
// no-checkpointing layer's bytes less what the checkpointed layer kept of it (x and h1,
// 2 × 16,384 × 2,048 × 2 = 134,217,728): per token norms 8,200 + attention 10,368 + gate|up
// 32,768 + LoRA 5,248 (as in test_plan.cpp's ActivationsWithAndWithoutCheckpointing) = 56,584
// → 16,384 × 56,584 + 2 × 212,992 = 927,498,240, less 134,217,728 = 793,280,512 a layer; and
// one layer's recompute FLOPs fewer, a sixteenth of the fused layer's (q,k,v, gate/up and LoRA
// GEMMs, attention's forward).
TEST(PlanRecompute, EachLayerKeptWholeAddsItsActivationsAndSavesItsRecompute) {
  const Plan full = plan_for("llama-3.2-1b", "h100", long_run({}));
  const Plan none = plan_for("llama-3.2-1b", "h100", long_run({"train.gradient_checkpointing=false"}));
  const Plan zero = plan_for("llama-3.2-1b", "h100", long_run({"train.no_recompute_layers=0"}));
  EXPECT_DOUBLE_EQ(zero.total_bytes, full.total_bytes);
  Plan prev = plan_for("llama-3.2-1b", "h100", long_run({"train.no_recompute_layers=1"}));
  EXPECT_GT(prev.total_bytes, full.total_bytes);
  const double per_layer_flops = (full.time.flops_per_token - none.time.flops_per_token) / 16.0;
  EXPECT_NEAR(full.time.flops_per_token - prev.time.flops_per_token, per_layer_flops, 1.0);
  for (int64_t m = 2; m <= 16; ++m) {
    const Plan p = plan_for("llama-3.2-1b", "h100", long_run({"train.no_recompute_layers=" + std::to_string(m)}));
    SCOPED_TRACE("no_recompute_layers " + std::to_string(m));
    EXPECT_NEAR(prev.time.flops_per_token - p.time.flops_per_token, per_layer_flops, 1.0);
    EXPECT_DOUBLE_EQ(component(p, "activations").bytes - component(prev, "activations").bytes, 793'280'512.0);
    prev = p;
  }
  const std::string formula = component(plan_for("llama-3.2-1b", "h100", long_run({"train.no_recompute_layers=4"})),
                                        "activations").formula;
  EXPECT_NE(formula.find("the last 4 of 16 layers kept whole"), std::string::npos) << formula;
}

// The plan's recompute line says which layers recompute what.
TEST(PlanRecompute, TheRecomputeLineNamesEachKindOfLayer) {
  const auto line = [](const std::vector<std::string>& more) {
    const std::string text = render_text(plan_for("llama-3.2-1b", "h100", long_run(more)));
    const size_t at = text.find("  recompute   ");
    return at == std::string::npos ? text : text.substr(at, text.find('\n', at) - at);
  };
  EXPECT_EQ(line({}), "  recompute   full: each layer recomputed in backward");
  EXPECT_EQ(line({"train.recompute=selective", "train.selective_layers=6"}),
            "  recompute   selective: gate/up outputs kept in 6 of 16 layers, the rest recomputed");
  EXPECT_EQ(line({"train.recompute=selective", "train.selective_layers=6", "train.no_recompute_layers=2"}),
            "  recompute   the last 2 of 16 layers kept whole (nothing recomputed), gate/up outputs kept in the 4 "
            "below them, 10 recomputed in full");
  EXPECT_EQ(line({"train.no_recompute_layers=3"}),
            "  recompute   the last 3 of 16 layers kept whole (nothing recomputed), 13 recomputed in full");
  EXPECT_EQ(line({"train.no_recompute_layers=16"}),
            "  recompute   none: every layer kept whole (train.no_recompute_layers), as without checkpointing");
  EXPECT_EQ(line({"train.gradient_checkpointing=false"}), "  recompute   none (no activation checkpointing)");
}

// Only the GPU's 16-bit fused layer keeps layers whole; fp32 (the generic checkpoint) and a run
// without checkpointing plan as if the key were absent, and the plan says so.
TEST(PlanRecompute, LayersKeptWholeNeedTheFusedLayer) {
  auto fp32 = long_run({"train.no_recompute_layers=4"});
  fp32[2] = "train.precision=fp32";
  auto fp32_plain = long_run({});
  fp32_plain[2] = "train.precision=fp32";
  const Plan p = plan_for("llama-3.2-1b", "h100", fp32);
  EXPECT_DOUBLE_EQ(p.total_bytes, plan_for("llama-3.2-1b", "h100", fp32_plain).total_bytes);
  EXPECT_EQ(p.no_recompute_layers, 0);
  bool noted = false;
  for (const auto& n : p.notes) noted |= n.find("train.no_recompute_layers: 4 has no effect here") != std::string::npos;
  EXPECT_TRUE(noted);
}

// auto: gate/up in every layer first; with memory left, layers kept whole, from the top, as many
// as leave 5% free; none while gate/up does not fit everywhere.
TEST(PlanRecompute, AutoKeepsLayersWholeOnceGateUpFitsEverywhere) {
  const auto sets = long_run({"train.recompute=auto"});
  const Plan big = plan_for("llama-3.2-1b", "h100", sets);  // 80 GB: everything fits
  EXPECT_EQ(big.selective_layers, 16);
  EXPECT_EQ(big.no_recompute_layers, 16);
  bool noted = false;
  for (const auto& n : big.notes) noted |= n.find("and recomputes nothing in the last 16") != std::string::npos;
  EXPECT_TRUE(noted);
  // A GPU between "gate/up everywhere" and "everything": some layers kept whole.
  const Plan sel = plan_for("llama-3.2-1b", "h100", long_run({"train.recompute=selective"}));
  const Plan none = plan_for("llama-3.2-1b", "h100", long_run({"train.gradient_checkpointing=false"}));
  const double between = (sel.total_bytes + none.total_bytes) / 2 / (1 - 0.05);  // kTightHeadroomFraction
  const std::string size = std::to_string(int64_t(between / 1e9 * 1000) / 1000.0) + "GB";
  const Plan mid = plan_for("llama-3.2-1b", size, sets);
  SCOPED_TRACE(size);
  EXPECT_EQ(mid.selective_layers, 16);
  ASSERT_GT(mid.no_recompute_layers, 0);
  ASSERT_LT(mid.no_recompute_layers, 16);
  const double limit = resolve_gpu(size).memory_bytes * (1 - 0.05);
  EXPECT_LE(mid.total_bytes, limit);
  auto one_more = long_run({"train.recompute=selective"});
  one_more.push_back("train.no_recompute_layers=" + std::to_string(mid.no_recompute_layers + 1));
  EXPECT_GT(plan_for("llama-3.2-1b", size, one_more).total_bytes, limit)
      << "auto stopped at " << mid.no_recompute_layers << " layers though one more fits";
  // Under a cap where not every gate/up fits, nothing is kept whole.
  const Plan capped = plan_for("llama-3.1-8b", "13GB",
                               {"train.micro_batch_size=2", "data.max_seq_length=2048", "train.precision=bf16",
                                "train.recompute=auto"});
  ASSERT_LT(capped.selective_layers, 32);
  EXPECT_EQ(capped.no_recompute_layers, 0);
}

// With room left, the plan says what auto would keep, and what it saves.
TEST(PlanRecompute, RoomToRecomputeLessIsAdvised) {
  const Plan full = plan_for("llama-3.2-1b", "h100", long_run({}));
  ASSERT_TRUE(full.fits);
  const Advice* less = nullptr;
  for (const auto& a : full.advice)
    if (a.kind == "recompute_less") less = &a;
  ASSERT_NE(less, nullptr);
  const Plan whole = plan_for("llama-3.2-1b", "h100", long_run({"train.no_recompute_layers=16"}));
  EXPECT_DOUBLE_EQ(less->total_bytes, whole.total_bytes);  // on 80 GB auto keeps every layer whole
  EXPECT_TRUE(less->fits);
  EXPECT_NE(less->text.find("room to recompute less: train.recompute: auto would have none: every layer kept whole"),
            std::string::npos)
      << less->text;
  const int saved = static_cast<int>(std::lround(100.0 * (1.0 - whole.time.flops_per_token / full.time.flops_per_token)));
  EXPECT_NE(less->text.find("(" + std::to_string(saved) + "% fewer FLOPs a step; ~"), std::string::npos) << less->text;
  // The estimated step times of the two (Note [plan time model]), the one that recomputes less faster.
  char times[96];
  std::snprintf(times, sizeof times, "~%.2f s a step against ~%.2f)", whole.time.seconds_per_step,
                full.time.seconds_per_step);
  EXPECT_NE(less->text.find(times), std::string::npos) << less->text;
  EXPECT_LT(whole.time.seconds_per_step, full.time.seconds_per_step);
  // Nothing to advise under auto itself, nor where no more fits, nor without a GPU.
  for (const Plan& p : {plan_for("llama-3.2-1b", "h100", long_run({"train.recompute=auto"})),
                        plan_for("llama-3.2-1b", "h100", long_run({"train.no_recompute_layers=16"})),
                        plan_for("llama-3.2-1b", "", long_run({}))})
    for (const auto& a : p.advice) EXPECT_NE(a.kind, "recompute_less") << a.text;
}

// Over the GPU with layers kept whole: the first advice is full recompute, naming both keys.
TEST(PlanRecompute, OverWithLayersKeptWholeAdvisesFullFirst) {
  const Plan p = plan_for("llama-3.2-1b", "12GiB", long_run({"train.no_recompute_layers=16"}));
  ASSERT_FALSE(p.fits);
  ASSERT_FALSE(p.advice.empty());
  EXPECT_EQ(p.advice.front().kind, "recompute") << p.advice.front().text;
  EXPECT_NE(p.advice.front().text.find("set train.recompute: full and train.no_recompute_layers: 0"), std::string::npos)
      << p.advice.front().text;
  EXPECT_TRUE(p.advice.front().fits) << p.advice.front().text;
}

// auto chooses train.no_recompute_layers: naming both is refused, with the key and what to do.
TEST(PlanRecompute, NoRecomputeLayersWithAutoIsRefused) {
  try {
    (void)default_config({"train.recompute=auto", "train.no_recompute_layers=4"});
    FAIL() << "accepted train.no_recompute_layers beside train.recompute: auto";
  } catch (const InputError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("train.no_recompute_layers: train.recompute: auto chooses it"), std::string::npos) << what;
  }
  EXPECT_THROW((void)default_config({"train.no_recompute_layers=-1"}), InputError);
}

}  // namespace
}  // namespace qlora::plan
