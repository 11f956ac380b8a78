// Offloaded checkpoints on a GPU (Note [offloaded checkpoints] in src/layer/offload.cpp): the
// fused layer and the generic checkpoint give the same bits with each layer's kept tensors in
// pinned host memory as without, in every recompute mode, over two micro batches (the
// offloader reused); and between forward and backward the device holds the top two layers'
// kept tensors instead of every layer's.
#include <gtest/gtest.h>
#include <ATen/ATen.h>
#include <torch/cuda.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "qlora/layer/fused_layer.h"
#include "qlora/layer/offload.h"
#include "qlora/lora/lora.h"
#include "qlora/model/decoder.h"
#include "qlora/model/nf4_linear.h"
#include "qlora/quant/nf4_cuda.h"
#include "qlora/train/checkpoint.h"
#include "qlora/train/demo.h"
#include "qlora/train/memory.h"
#include "support/fused_layer_fixtures.h"
#include "support/train_fixtures.h"

namespace qlora {
namespace {

using model::DecoderModel;

constexpr int64_t kLayers = 8, kBatch = 2, kSeq = 1024;

struct Result {
  at::Tensor y, dx;
  std::vector<at::Tensor> grads;
  int64_t kept_bytes = 0;  // allocated after forward (copies done) less before it
};

// Two micro batches through `layer` (their gradients accumulate, as in a step).
Result run(const DecoderModel& m, const lora::LoraAdapter& adapter, const train::LayerForwardFn& layer,
           at::ScalarType dtype) {
  for (auto& p : adapter.parameters()) p.mutable_grad() = at::Tensor();
  const c10::Device gpu(c10::kCUDA, 0);
  torch::manual_seed(11);
  Result r;
  for (int micro = 0; micro < 2; ++micro) {
    at::Tensor x = at::randn({kBatch, kSeq, m.config().hidden_size}, at::TensorOptions().device(gpu)).to(dtype);
    at::Tensor w = at::randn_like(x);
    x.requires_grad_(true);
    const auto attn = model::causal_attention(kBatch, kSeq, gpu);
    const auto cos_sin = m.rope(attn.position_ids);
    torch::cuda::synchronize();
    const int64_t before = train::memory_stats(gpu).allocated;
    at::Tensor y = x;
    for (int64_t l = 0; l < m.num_layers(); ++l) y = layer(l, y, cos_sin, attn);
    torch::cuda::synchronize();
    // Blocks a side stream used are freed once its events have passed, which the allocator
    // checks when it next allocates.
    (void)at::empty({1}, at::TensorOptions().device(gpu));
    r.kept_bytes = std::max(r.kept_bytes, train::memory_stats(gpu).allocated - before);
    (y.to(at::kFloat) * w.to(at::kFloat)).sum().backward();
    r.y = y.detach();
    r.dx = x.grad();
  }
  for (const auto& p : adapter.parameters()) r.grads.push_back(p.grad().clone());
  return r;
}

DecoderModel make_model(at::ScalarType dtype) {
  quant::register_cuda_kernels();
  DecoderConfig shape = testing::small_shape(train::demo_model_config(), 256);
  shape.num_hidden_layers = kLayers;
  model::LoadOptions opt;
  opt.device = c10::Device(c10::kCUDA, 0);
  opt.dtype = dtype;
  opt.make_linear = model::nf4_linear_factory(true, dtype);
  return DecoderModel::load(shape, train::random_llama_weights(shape, 5, c10::kCPU), opt);
}

void expect_same_bits(const Result& kept, const Result& moved, const std::string& what) {
  EXPECT_TRUE(at::equal(kept.y, moved.y)) << what << ": outputs";
  EXPECT_TRUE(at::equal(kept.dx, moved.dx)) << what << ": input gradient";
  ASSERT_EQ(kept.grads.size(), moved.grads.size());
  for (size_t i = 0; i < kept.grads.size(); ++i) EXPECT_TRUE(at::equal(kept.grads[i], moved.grads[i])) << what << " " << i;
}

TEST(CudaOffload, FusedLayerSameBitsAndTwoLayersOnTheDevice) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  DecoderModel m = make_model(at::kBFloat16);
  const lora::LoraAdapter adapter = testing::attach_all_linear_lora(m);
  // x and h1 of a layer: 2 × B × T × h × 2 B.
  const int64_t layer_bytes = 2 * kBatch * kSeq * m.config().hidden_size * 2;
  struct Mode {
    const char* name;
    layer::FusedRecompute what;
    int64_t selective, whole;
  };
  for (const Mode& mode : {Mode{"full", layer::FusedRecompute::kFull, -1, 0},
                           Mode{"selective, last layer whole", layer::FusedRecompute::kSelective, -1, 1}}) {
    auto offload = std::make_shared<layer::CheckpointOffload>();
    const Result kept =
        run(m, adapter, layer::fused_layer_forward(m, mode.what, mode.selective, mode.whole), at::kBFloat16);
    const Result moved =
        run(m, adapter, layer::fused_layer_forward(m, mode.what, mode.selective, mode.whole, offload), at::kBFloat16);
    expect_same_bits(kept, moved, mode.name);
    EXPECT_EQ(offload->host_bytes(), 0) << mode.name;
    std::printf("  %s: kept on the device after forward %.1f MiB, offloaded %.1f MiB (one layer's x and h1 %.1f MiB)\n",
                mode.name, kept.kept_bytes / 1048576.0, moved.kept_bytes / 1048576.0, layer_bytes / 1048576.0);
    if (mode.whole == 0) {
      // Kept: the inputs of layers 1..7 and every h1, 7.5 layers' worth; offloaded: the top two
      // layers' (they never leave the device), 2. Everything else a forward leaves is the same.
      EXPECT_GE(kept.kept_bytes - moved.kept_bytes, (kLayers - 3) * layer_bytes) << mode.name;
      EXPECT_EQ(offload->peak_host_bytes(), kLayers * layer_bytes);
    }
  }
}

TEST(CudaOffload, GenericCheckpointSameBits) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  DecoderModel m = make_model(at::kFloat);
  const lora::LoraAdapter adapter = testing::attach_all_linear_lora(m);
  train::CheckpointOptions offloaded;
  offloaded.offload = std::make_shared<layer::CheckpointOffload>();
  const Result kept = run(m, adapter, train::checkpointed_layer_forward(m), at::kFloat);
  const Result moved = run(m, adapter, train::checkpointed_layer_forward(m, offloaded), at::kFloat);
  expect_same_bits(kept, moved, "generic checkpoint, fp32");
  EXPECT_EQ(offloaded.offload->host_bytes(), 0);
  EXPECT_EQ(offloaded.offload->peak_host_bytes(), kLayers * kBatch * kSeq * m.config().hidden_size * 4);
}

}  // namespace
}  // namespace qlora
