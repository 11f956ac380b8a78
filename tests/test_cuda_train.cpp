// `qlora train` on a GPU against the same run on the CPU (label cuda; skipped without a GPU):
// the first step's loss. The same small random Llama (the demo's assets at a
// smaller size), the same data and the same seed: step 1's loss is the model at its initial
// weights (LoRA B is zero), so the two runs differ only by the device's kernels and precision.
// LoRA dropout is 0: the CPU and CUDA generators draw different masks.
#include <gtest/gtest.h>
#include <ATen/ATen.h>
#include <torch/cuda.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "qlora/config/config.h"
#include "qlora/model/decoder_config.h"
#include "qlora/train/demo.h"
#include "qlora/train/run.h"
#include "support/test_support.h"
#include "support/train_fixtures.h"

namespace qlora {
namespace {

// fp32 on both sides with TF32 off (LibTorch's default for cuBLAS): only summation orders differ.
constexpr double kFp32LossRtol = 1e-5;
// bf16 on the GPU (weights, activations and the dequantized NF4 base rounded to 8 bits of
// mantissa, 2^-8 = 3.9e-3 relative each) against fp32 on the CPU: the loss is a mean over
// every target token of lse - logit, where those roundings partly cancel; 1e-2 allows a few
// of them to add up and is still far below what a wrong mask or a wrong shift changes (the
// loss of a random model moves by whole units of ln(vocab) then).
constexpr double kBf16LossRtol = 1e-2;

Config small_run(const std::string& tmp, const std::string& out, Precision precision) {
  Config cfg = default_config();
  cfg.model.path = testing::small_model_dir();
  cfg.data.path = testing::small_alpaca_data(tmp, 32, 100);
  cfg.data.max_seq_length = 256;  // as test_train_run: the longest prompt of the fixture fits
  cfg.lora.target_modules = {"all-linear"};
  cfg.lora.dropout = 0.0;
  cfg.train.micro_batch_size = 4;
  cfg.train.gradient_accumulation_steps = 2;
  cfg.train.max_steps = 2;
  cfg.train.precision = precision;
  cfg.train.gradient_checkpointing = true;
  cfg.output.dir = tmp + "/" + out;
  cfg.output.save_steps = 1000;
  return cfg;
}

train::RunResult run_on(const Config& cfg, const std::string& device) {
  train::RunOptions o;
  o.device = device;
  o.evaluate_at_start = false;
  o.handle_signals = false;
  return train::run_training(cfg, o);
}

TEST(CudaTrain, FirstStepLossEqualsTheCpuRun) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  const std::string tmp = testing::make_temp_dir("cuda_train");
  const double cpu = run_on(small_run(tmp, "cpu", Precision::kFp32), "cpu").first_loss;
  ASSERT_TRUE(std::isfinite(cpu));
  const double gpu32 = run_on(small_run(tmp, "gpu-fp32", Precision::kFp32), "cuda").first_loss;
  const double gpu16 = run_on(small_run(tmp, "gpu-bf16", Precision::kBf16), "cuda").first_loss;
  std::printf("  step 1 loss: cpu fp32 %.6f, cuda fp32 %.6f (%.2e), cuda bf16 %.6f (%.2e)\n", cpu, gpu32,
              std::fabs(gpu32 - cpu) / cpu, gpu16, std::fabs(gpu16 - cpu) / cpu);
  EXPECT_NEAR(gpu32, cpu, kFp32LossRtol * cpu);
  EXPECT_NEAR(gpu16, cpu, kBf16LossRtol * cpu);
}

// The same check on a small random model of each other family, so its pieces run on the GPU
// before the benchmarks train one (scripts/gpu.sh --suite families): Qwen2's q/k/v biases,
// Qwen3's q/k norms, Mistral's sliding window (16 tokens, shorter than the rows). The weights
// are write_random_llama's in the family's layout (biases zero, norms one, as transformers
// draws them).
TEST(CudaTrain, EachFamilyFirstStepLossEqualsTheCpuRun) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  for (const std::string type : {"qwen2", "qwen3", "mistral"}) {
    SCOPED_TRACE(type);
    const std::string tmp = testing::make_temp_dir("cuda_train_" + type);
    const std::string model = tmp + "/model";
    train::write_demo_tokenizer(model);
    DecoderConfig shape = testing::small_llama_shape();
    shape.model_type = type;
    shape.pieces.qkv_bias = type == "qwen2";
    shape.pieces.qk_norm = type == "qwen3";
    if (type == "mistral") shape.layer_window.assign(static_cast<size_t>(shape.num_hidden_layers), 16);
    train::write_random_llama(model, shape, 7);
    const auto run = [&](const std::string& out, Precision precision, const std::string& device) {
      Config cfg = small_run(tmp, out, precision);
      cfg.model.path = model;
      return run_on(cfg, device).first_loss;
    };
    const double cpu = run("cpu", Precision::kFp32, "cpu");
    ASSERT_TRUE(std::isfinite(cpu));
    const double gpu32 = run("gpu-fp32", Precision::kFp32, "cuda");
    const double gpu16 = run("gpu-bf16", Precision::kBf16, "cuda");
    std::printf("  %-7s step 1 loss: cpu fp32 %.6f, cuda fp32 %.6f (%.2e), cuda bf16 %.6f (%.2e)\n", type.c_str(), cpu,
                gpu32, std::fabs(gpu32 - cpu) / cpu, gpu16, std::fabs(gpu16 - cpu) / cpu);
    EXPECT_NEAR(gpu32, cpu, kFp32LossRtol * cpu);
    EXPECT_NEAR(gpu16, cpu, kBf16LossRtol * cpu);
  }
}

// train.offload_checkpoints: true through the whole recipe (bf16, the fused layer, two micro
// batches a step, two steps): every step's loss the same bits as the run that keeps its
// checkpoints on the GPU (Note [offloaded checkpoints]); LoRA dropout on, drawn alike.
TEST(CudaTrain, OffloadedCheckpointsTrainTheSameBits) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  const std::string tmp = testing::make_temp_dir("cuda_train_offload");
  const auto run = [&](const std::string& out, Offload offload) {
    Config cfg = small_run(tmp, out, Precision::kBf16);
    cfg.lora.dropout = 0.1;
    cfg.train.offload_checkpoints = offload;
    return run_on(cfg, "cuda").losses;
  };
  const std::vector<double> kept = run("kept", Offload::kOff);
  const std::vector<double> moved = run("moved", Offload::kOn);
  ASSERT_EQ(kept.size(), 2u);
  EXPECT_EQ(kept, moved);
}

}  // namespace
}  // namespace qlora
