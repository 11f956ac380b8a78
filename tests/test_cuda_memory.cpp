// Out-of-memory that never costs a run, on the GPU (label cuda; skipped
// without one): with the CUDA allocator capped (per-process memory fraction)
// below what micro batch 16 needs, `qlora train`'s recipe retries the step at
// fewer rows per micro batch and ends with the losses of the uncapped run; the
// finder picks a micro batch under the same cap; the process stays healthy.
#include <gtest/gtest.h>
#include <ATen/ATen.h>
#include <torch/cuda.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <random>
#include <string>

#include "qlora/lora/lora.h"
#include "qlora/train/measure.h"
#include "qlora/train/memory.h"
#include "qlora/train/run.h"
#include "qlora/train/setup.h"
#include "support/test_support.h"
#include "qlora/train/demo.h"

namespace qlora {
namespace {

// fp32 on both sides; the capped run sums the same rows in smaller pieces:
// only the summation order differs.
constexpr double kLossRtol = 1e-5;
constexpr int64_t kMicro = 16;
constexpr int64_t kSeq = 512;

struct Rig {
  std::string dir;
  Config cfg;
};

// A 4-layer hidden-512 random Llama with a byte-level tokenizer, and rows of
// random letters long enough to fill kSeq tokens.
Rig make_rig() {
  Rig r;
  r.dir = testing::make_temp_dir("cuda_memory");
  const std::string model = r.dir + "/model";
  const int64_t vocab = train::write_demo_tokenizer(model);
  DecoderConfig shape = train::demo_model_config(vocab);
  shape.hidden_size = 512;
  shape.intermediate_size = 1536;
  shape.num_hidden_layers = 4;
  shape.num_attention_heads = 8;
  shape.num_key_value_heads = 4;
  shape.head_dim = 64;
  train::write_random_llama(model, shape, 3);
  std::mt19937 rng(5);
  std::string jsonl;
  for (int i = 0; i < 64; ++i) {
    std::string text;
    for (int c = 0; c < 700; ++c) text += static_cast<char>('a' + rng() % 26);
    jsonl += "{\"text\": \"" + text + "\"}\n";
  }
  r.cfg = default_config();
  r.cfg.source = r.dir + "/run.yaml";
  r.cfg.model.path = model;
  r.cfg.data.path = testing::write_file(r.dir, "train.jsonl", jsonl);
  r.cfg.data.max_seq_length = kSeq;
  r.cfg.lora.r = 8;
  r.cfg.lora.alpha = 16;
  r.cfg.lora.dropout = 0.0;
  r.cfg.lora.target_modules = {"all-linear"};
  r.cfg.train.micro_batch_size = kMicro;
  r.cfg.train.gradient_accumulation_steps = 1;
  r.cfg.train.max_steps = 3;
  r.cfg.train.precision = Precision::kFp32;
  r.cfg.train.gradient_checkpointing = false;
  r.cfg.train.optimizer = OptimizerKind::kAdamW;
  r.cfg.output.save_steps = 1000;
  r.cfg.output.logging_steps = 1;
  return r;
}

train::RunOptions quiet(double cap) {
  train::RunOptions o;
  o.device = "cuda";
  o.evaluate_at_start = false;
  o.handle_signals = false;
  o.memory_cap_bytes = cap;
  return o;
}

TEST(CudaMemory, OutOfMemoryRetriesAtFewerRowsAndTrainsTheSameSteps) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  const c10::Device gpu(c10::kCUDA, 0);
  Rig rig = make_rig();

  // Peaks of one forward + backward at micro 16 and 4, on the run's own model.
  double p16 = 0, p4 = 0;
  {
    const train::DeviceChoice dev = train::choose_device(rig.cfg, "cuda");
    train::BaseModel base = train::load_base_model(rig.cfg, dev);
    lora::LoraAdapter adapter = lora::LoraAdapter::attach(base.model, lora::settings_from_config(rig.cfg.lora));
    const auto r16 = train::probe_micro_batch(base.model, adapter.parameters(), {}, kMicro, kSeq, 0);
    const auto r4 = train::probe_micro_batch(base.model, adapter.parameters(), {}, 4, kSeq, 0);
    ASSERT_TRUE(r16.fits && r4.fits) << r16.error << r4.error;
    p16 = r16.peak_reserved_bytes;
    p4 = r4.peak_reserved_bytes;
    std::printf("  probe peaks reserved: micro 16 %.3f GiB, micro 4 %.3f GiB\n", p16 / (1 << 30), p4 / (1 << 30));
    ASSERT_GT(p16, 1.5 * p4) << "the rig's micro 16 must need clearly more than micro 4";
  }
  train::release_cached_memory(gpu);

  rig.cfg.output.dir = rig.dir + "/free";
  const train::RunResult free_run = train::run_training(rig.cfg, quiet(0));
  EXPECT_EQ(free_run.max_micro_rows, 0);

  // The finder under the cap: a micro batch below 16 that fits.
  const double cap = 0.5 * (p4 + p16);
  {
    train::MeasureOptions mo;
    mo.device = "cuda";
    mo.memory_cap_bytes = cap;
    mo.seq = kSeq;
    const plan::FinderResult f = train::find_micro_batch_for(rig.cfg, mo, 1);
    std::printf("  finder under a %.3f GiB cap: %s\n", cap / (1 << 30), f.message.c_str());
    EXPECT_TRUE(f.found);
    EXPECT_GE(f.largest_fitting, 4);
    EXPECT_LT(f.largest_fitting, kMicro);
    EXPECT_EQ(kMicro % f.micro, 0);
  }
  train::set_memory_fraction(gpu, 1.0);
  train::release_cached_memory(gpu);

  rig.cfg.output.dir = rig.dir + "/capped";
  const train::RunResult capped = train::run_training(rig.cfg, quiet(cap));
  train::set_memory_fraction(gpu, 1.0);
  std::printf("  capped at %.3f GiB: ran at %lld rows per micro batch\n", cap / (1 << 30),
              static_cast<long long>(capped.max_micro_rows));
  EXPECT_GT(capped.max_micro_rows, 0);
  EXPECT_LT(capped.max_micro_rows, kMicro);
  ASSERT_EQ(capped.losses.size(), free_run.losses.size());
  for (size_t i = 0; i < capped.losses.size(); ++i)
    EXPECT_NEAR(capped.losses[i], free_run.losses[i], kLossRtol * free_run.losses[i]) << "step " << i + 1;

  // --micro-batch auto under the same cap: a micro batch that divides 16, the
  // effective batch kept; a resume keeps the choice without searching again.
  rig.cfg.output.dir = rig.dir + "/auto";
  rig.cfg.train.max_steps = 2;
  train::RunOptions automatic = quiet(cap);
  automatic.micro_batch_auto = true;
  const train::RunResult a = train::run_training(rig.cfg, automatic);
  std::printf("  --micro-batch auto under the cap: micro %lld × accumulation %lld\n",
              static_cast<long long>(a.micro_batch_size), static_cast<long long>(a.gradient_accumulation_steps));
  EXPECT_LT(a.micro_batch_size, kMicro);
  EXPECT_EQ(a.micro_batch_size * a.gradient_accumulation_steps, kMicro);
  rig.cfg.train.max_steps = 3;
  automatic.resume = "auto";
  const train::RunResult b = train::run_training(rig.cfg, automatic);
  EXPECT_EQ(b.start_step, 2);
  EXPECT_EQ(b.micro_batch_size, a.micro_batch_size);
  EXPECT_EQ(b.gradient_accumulation_steps, a.gradient_accumulation_steps);
  train::set_memory_fraction(gpu, 1.0);

  // Healthy afterwards: a new uncapped run in the same process trains.
  rig.cfg.output.dir = rig.dir + "/after";
  rig.cfg.train.max_steps = 3;
  const train::RunResult after = train::run_training(rig.cfg, quiet(0));
  EXPECT_EQ(after.steps, 3);
}

}  // namespace
}  // namespace qlora
