// plan/finder: the micro-batch search against brute force over fake probes
// (a memory threshold), the probes it makes (first the plan's prediction, none
// twice, logarithmically many), the divisor rule, the log line, nothing
// fitting, several GPUs, and the OOM fallback sequence.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <set>

#include "qlora/common/errors.h"
#include "qlora/config/config.h"
#include "qlora/model/decoder_config.h"
#include "qlora/plan/finder.h"

namespace qlora::plan {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// A fake GPU: micro m fits when m <= threshold; the peak grows linearly
// (1 GiB fixed + 0.5 GiB per sequence), so messages have numbers to print.
struct ThresholdProbe {
  int64_t threshold = 0;
  std::vector<int64_t> asked;
  ProbeResult operator()(int64_t m) {
    asked.push_back(m);
    ProbeResult r;
    r.fits = m <= threshold;
    r.peak_allocated_bytes = (1.0 + 0.5 * double(m)) * kGiB;
    r.peak_reserved_bytes = r.peak_allocated_bytes + 0.25 * kGiB;
    if (!r.fits) r.error = "CUDA out of memory. Tried to allocate 2.00 GiB";
    return r;
  }
};

FinderResult run(ThresholdProbe& p, int64_t start, int64_t micro, int64_t acc, int64_t world = 1,
                 double capacity = 15.0 * kGiB) {
  FinderInputs in;
  in.predicted_micro = start;
  in.config_micro = micro;
  in.config_accumulation = acc;
  in.world = world;
  in.device_capacity_bytes = capacity;
  return find_micro_batch(in, [&p](int64_t m) { return p(m); });
}

// ---------------------------------------------------------------- the search

// Every threshold 0..E+2 and every start 1..E for per-GPU batches 1..40:
// the answer is the brute-force one, the first probe is the start, no size
// is probed twice, and the probes are logarithmic.
TEST(Finder, FindsTheTrueThresholdExhaustively) {
  for (int64_t E = 1; E <= 40; ++E)
    for (int64_t threshold = 0; threshold <= E + 2; ++threshold)
      for (int64_t start = 1; start <= E; ++start) {
        SCOPED_TRACE("E " + std::to_string(E) + " threshold " + std::to_string(threshold) + " start " +
                     std::to_string(start));
        ThresholdProbe p{threshold, {}};
        const FinderResult r = run(p, start, 1, E);
        int64_t brute = 0;  // largest m in 1..E with m <= threshold
        for (int64_t m = 1; m <= E; ++m)
          if (m <= threshold) brute = m;
        ASSERT_EQ(r.largest_fitting, brute);
        ASSERT_EQ(r.found, brute > 0);
        ASSERT_FALSE(p.asked.empty());
        ASSERT_EQ(p.asked.front(), start);
        ASSERT_EQ(std::set<int64_t>(p.asked.begin(), p.asked.end()).size(), p.asked.size());
        ASSERT_EQ(r.trials.size(), p.asked.size());
        // Up: doubling from start then bisecting; down: bisecting (0, start).
        // Both are within 2·ceil(log2 E) + 2 probes.
        ASSERT_LE(double(p.asked.size()), 2 * std::ceil(std::log2(double(E))) + 2);
        for (int64_t m : p.asked) ASSERT_TRUE(m >= 1 && m <= E);
      }
}

TEST(Finder, ProbesAreLogarithmicForLargeBatches) {
  // E = 4096, threshold 1000: from a prediction of 900 it brackets [900, 1800)
  // and bisects 900 values: 2 + ~10 probes, against 1000 for a linear walk.
  ThresholdProbe p{1000, {}};
  const FinderResult r = run(p, 900, 1, 4096);
  EXPECT_EQ(r.largest_fitting, 1000);
  EXPECT_LE(p.asked.size(), 2u + 11u);
  // An exact prediction still bisects the bracket [1000, 2000) that its
  // double opens: the search cannot know the prediction was exact.
  ThresholdProbe exact{1000, {}};
  run(exact, 1000, 1, 4096);
  EXPECT_EQ(exact.asked, (std::vector<int64_t>{1000, 2000, 1500, 1250, 1125, 1062, 1031, 1015, 1007, 1003, 1001}));
}

TEST(Finder, StartsFromThePredictionAndStopsAtTheUpperBound) {
  // Everything fits: one probe at the per-GPU batch when predicted there.
  ThresholdProbe all{1000, {}};
  FinderResult r = run(all, 32, 2, 16);
  EXPECT_EQ(all.asked, std::vector<int64_t>{32});
  EXPECT_EQ(r.micro, 32);
  EXPECT_EQ(r.accumulation, 1);
  // A prediction above the bound is clamped to it.
  ThresholdProbe clamp{1000, {}};
  run(clamp, 500, 2, 16);
  EXPECT_EQ(clamp.asked.front(), 32);
  // An explicit upper bound below the per-GPU batch is respected.
  ThresholdProbe bounded{1000, {}};
  FinderInputs in;
  in.predicted_micro = 3;
  in.config_micro = 2;
  in.config_accumulation = 16;
  in.upper_bound = 8;
  r = find_micro_batch(in, [&](int64_t m) { return bounded(m); });
  EXPECT_EQ(bounded.asked, (std::vector<int64_t>{3, 6, 8}));
  EXPECT_EQ(r.micro, 8);
  EXPECT_EQ(r.accumulation, 4);
}

TEST(Finder, AProbeThatNeverFitsIsNotAnException) {
  int calls = 0;
  FinderInputs in;
  in.predicted_micro = 6;
  in.config_micro = 2;
  in.config_accumulation = 16;
  in.device_capacity_bytes = 15.0 * kGiB;
  const FinderResult r = find_micro_batch(in, [&](int64_t) {
    ++calls;
    ProbeResult p;
    p.error = "CUDA out of memory";
    return p;
  });
  EXPECT_FALSE(r.found);
  EXPECT_EQ(r.micro, 0);
  EXPECT_EQ(r.largest_fitting, 0);
  EXPECT_EQ(calls, 3);  // 6, 3, 1
  EXPECT_EQ(r.trials.back().micro, 1);
  EXPECT_NE(r.message.find("micro batch 1 does not fit"), std::string::npos) << r.message;
  EXPECT_NE(r.message.find("max_seq_length"), std::string::npos) << r.message;
  EXPECT_NE(r.message.find("gradient_checkpointing"), std::string::npos) << r.message;
  EXPECT_NE(r.message.find("CUDA out of memory"), std::string::npos) << r.message;
}

TEST(Finder, BadInputsThrow) {
  FinderInputs in;
  in.config_accumulation = 0;
  EXPECT_THROW(find_micro_batch(in, [](int64_t) { return ProbeResult{}; }), InputError);
}

// ---------------------------------------------------------------- divisor rule and message

TEST(Finder, DivisorRuleKeepsTheEffectiveBatch) {
  for (int64_t E : {1, 7, 12, 24, 32, 36, 97})
    for (int64_t threshold = 1; threshold <= E; ++threshold) {
      ThresholdProbe p{threshold, {}};
      const FinderResult r = run(p, 1, 1, E);
      EXPECT_EQ(r.micro * r.accumulation, E);
      EXPECT_LE(r.micro, threshold);
      EXPECT_EQ(r.micro, largest_divisor_at_most(E, threshold));
    }
  EXPECT_EQ(largest_divisor_at_most(32, 6), 4);
  EXPECT_EQ(largest_divisor_at_most(36, 8), 6);
  EXPECT_EQ(largest_divisor_at_most(97, 96), 1);
  EXPECT_EQ(largest_divisor_at_most(32, 0), 1);
}

TEST(Finder, MessageWhenTheLargestFitDividesTheBatch) {
  // threshold 8, config 2 × 16: peak at 8 is 1 + 4 = 5.0 GiB.
  ThresholdProbe p{8, {}};
  const FinderResult r = run(p, 4, 2, 16);
  EXPECT_EQ(r.micro, 8);
  EXPECT_EQ(r.accumulation, 4);
  EXPECT_DOUBLE_EQ(r.peak_allocated_bytes, 5.0 * kGiB);
  EXPECT_DOUBLE_EQ(r.peak_reserved_bytes, 5.25 * kGiB);
  EXPECT_EQ(r.message,
            "micro batch 8 fits (peak 5.0 of 15.0 GiB): using micro 8 × accumulation 4 = 32 "
            "(config: micro 2 × accumulation 16)");
}

TEST(Finder, MessageWhenItDoesNot) {
  ThresholdProbe p{6, {}};
  const FinderResult r = run(p, 4, 2, 16);
  EXPECT_EQ(r.largest_fitting, 6);
  EXPECT_EQ(r.micro, 4);
  EXPECT_EQ(r.accumulation, 8);
  EXPECT_EQ(r.message,
            "micro batch 6 fits (peak 4.0 of 15.0 GiB); accumulation 32 / 6 = 5.33 is not whole: "
            "using micro 4 × accumulation 8 = 32 (config: micro 2 × accumulation 16)");
}

TEST(Finder, SeveralGpusAndUnknownCapacity) {
  ThresholdProbe p{6, {}};
  const FinderResult r = run(p, 6, 2, 16, /*world=*/2, /*capacity=*/0);
  EXPECT_EQ(r.micro * r.accumulation * 2, 64);
  EXPECT_EQ(r.message,
            "micro batch 6 fits (peak 4.0 GiB); accumulation 32 / 6 = 5.33 is not whole: "
            "using micro 4 × accumulation 8 × GPUs 2 = 64 (config: micro 2 × accumulation 16)");
  ThresholdProbe all{100, {}};
  const FinderResult whole = run(all, 32, 2, 16, 2);
  EXPECT_NE(whole.message.find("using micro 32 × accumulation 1 × GPUs 2 = 64, the whole batch per GPU"),
            std::string::npos)
      << whole.message;
}

TEST(Finder, InputsFromAPlan) {
  const Config cfg = default_config({"model.preset=llama-3.1-8b", "train.micro_batch_size=2",
                                     "train.gradient_accumulation_steps=16", "data.max_seq_length=2048"});
  const GpuSpec t4 = resolve_gpu("t4");
  const Plan p = make_plan(cfg, resolve_model_shape(cfg), &t4, 2);
  const FinderInputs in = finder_inputs(p);
  EXPECT_EQ(in.predicted_micro, p.largest_micro_batch);
  EXPECT_GE(in.predicted_micro, 1);
  EXPECT_EQ(in.config_micro, 2);
  EXPECT_EQ(in.config_accumulation, 16);
  EXPECT_EQ(in.world, 2);
  EXPECT_DOUBLE_EQ(in.device_capacity_bytes, t4.memory_bytes);
  // Without a GPU the plan has no prediction: start from the configured micro batch.
  const Plan blind = make_plan(cfg, resolve_model_shape(cfg), nullptr, 1);
  EXPECT_EQ(finder_inputs(blind).predicted_micro, 2);
  EXPECT_DOUBLE_EQ(finder_inputs(blind).device_capacity_bytes, 0.0);
}

// ---------------------------------------------------------------- OOM fallback

std::vector<int64_t> fallback_micros(int64_t micro, int64_t acc) {
  std::vector<int64_t> seq{micro};
  while (auto next = oom_fallback(micro, acc)) {
    EXPECT_EQ(next->micro * next->accumulation, micro * acc);
    EXPECT_LT(next->micro, micro);
    EXPECT_EQ(micro % next->micro, 0);  // each micro batch splits into whole pieces
    micro = next->micro;
    acc = next->accumulation;
    seq.push_back(micro);
  }
  return seq;
}

TEST(Finder, OomFallbackSequences) {
  EXPECT_EQ(fallback_micros(8, 4), (std::vector<int64_t>{8, 4, 2, 1}));
  EXPECT_EQ(fallback_micros(12, 1), (std::vector<int64_t>{12, 6, 3, 1}));
  EXPECT_EQ(fallback_micros(7, 3), (std::vector<int64_t>{7, 1}));
  EXPECT_EQ(fallback_micros(9, 2), (std::vector<int64_t>{9, 3, 1}));
  EXPECT_FALSE(oom_fallback(1, 32).has_value());
  const auto a = oom_fallback(6, 5);
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(a->micro, 3);
  EXPECT_EQ(a->accumulation, 10);
  for (int64_t m = 2; m <= 200; ++m) fallback_micros(m, 3);
}

// --find-max-seq: the same search over lengths, in steps: the longest multiple of the step
// under a threshold, for every start and threshold, each length asked once.
TEST(SeqFinder, FindsTheLongestLengthInSteps) {
  for (int64_t threshold : {0, 1000, 1024, 5000, 32768, 100000, 131072})
    for (int64_t predicted : {0, 1024, 20000, 131072}) {
      ThresholdProbe p;
      p.threshold = threshold;
      SeqFinderInputs in;
      in.predicted_seq = predicted;
      in.upper_seq = 131072;
      in.step = 1024;
      in.device_capacity_bytes = 80 * kGiB;
      const SeqFinderResult r = find_max_seq(in, std::ref(p));
      const int64_t want = std::min<int64_t>(threshold, 131072) / 1024 * 1024;
      EXPECT_EQ(r.found, want > 0) << threshold << " from " << predicted;
      EXPECT_EQ(r.seq, want) << threshold << " from " << predicted;
      const std::set<int64_t> distinct(p.asked.begin(), p.asked.end());
      EXPECT_EQ(distinct.size(), p.asked.size()) << "a length asked twice";
      for (int64_t a : p.asked) EXPECT_EQ(a % 1024, 0);
      EXPECT_EQ(r.trials.size(), p.asked.size());
      if (want == 131072) EXPECT_NE(r.message.find("the longest tried (131072)"), std::string::npos) << r.message;
      if (want > 0 && want < 131072)
        EXPECT_NE(r.message.find(std::to_string(want) + " tokens (peak"), std::string::npos) << r.message;
      if (want == 0) EXPECT_NE(r.message.find("not even 1024 tokens fit"), std::string::npos) << r.message;
    }
  SeqFinderInputs bad;
  bad.upper_seq = 512;  // shorter than the step
  ThresholdProbe p;
  EXPECT_THROW(find_max_seq(bad, std::ref(p)), InputError);
}

}  // namespace
}  // namespace qlora::plan
