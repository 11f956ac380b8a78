// The fused decoder layer on a GPU against the generic checkpointed layer on the
// same GPU (with selective recompute too; without checkpointing against the generic
// layer without it): NF4 base, LoRA on every projection with dropout, grouped kv heads,
// in fp32 (TF32 off: agreement to summation order), bf16 and fp16 (agreement to
// the roundings the two orders take). The dropout masks are the same in both:
// the same generator, drawn in the same order (checked by the outputs).
// Each family's tiny model (tests/data/families/: Qwen2's q, k, v biases, Qwen3's q/k norms,
// Mistral's and Qwen2's sliding windows, SmolLM2, Phi-3, Gemma 2's and Gemma 3's pieces) and a
// Llama with attention_bias and mlp_bias:
// the fused layer in bf16, in every recompute mode, against the generic layer in fp32 on the CPU
// over the same bf16-rounded weights, inputs and LoRA matrices; and with dropout against the
// generic layer in bf16 on the GPU.
#include <gtest/gtest.h>
#include <ATen/ATen.h>
#include <torch/cuda.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "qlora/layer/fused_layer.h"
#include "qlora/lora/lora.h"
#include "qlora/model/decoder.h"
#include "qlora/model/family.h"
#include "qlora/model/nf4_linear.h"
#include "qlora/quant/nf4_cuda.h"
#include "qlora/train/checkpoint.h"
#include "qlora/train/demo.h"
#include "support/fused_layer_fixtures.h"
#include "support/train_fixtures.h"

namespace qlora {
namespace {

using model::DecoderModel;

// Relative to max|reference|. fp32: summation order over ~20 GEMMs. 16-bit: the
// fused RoPE / SwiGLU / addmm round once where the generic ops round two or three
// times; over two layers forward and backward that is a few bf16 ulps (2^-8) of
// the largest entry. A wrong or missing term is off by > 0.1.
constexpr double kFp32Tol = 1e-4;
constexpr double kHalfOutTol = 2e-2;
constexpr double kHalfGradTol = 4e-2;
// The families' models in bf16 against fp32 (and against the generic layer in bf16 with dropout
// and NF4), relative to max|reference|. Chosen from the same comparisons run on the CPU in bf16
// (reference ops, more roundings than the GPU's fused kernels): outputs within 1.4e-2, input
// gradients 2.3e-2, LoRA gradients 4.7e-2 (the biased Llama's layer-1 q_proj A: its biases,
// N(0, 0.5), are 25 times its weights, and its gradient sums terms that cancel). A missing
// piece (a bias, a q/k norm, a window) moves them by more than 0.2.
constexpr double kFamilyOutTol = 3e-2;
constexpr double kFamilyGradTol = 8e-2;

double max_rel(const at::Tensor& got, const at::Tensor& want) {
  const at::Tensor g = got.to(at::kDouble), w = want.to(at::kDouble);
  return (g - w).abs().max().item<double>() / std::max(w.abs().max().item<double>(), 1e-30);
}

struct Result {
  at::Tensor y, dx;
  std::vector<at::Tensor> grads;
};

Result run(const DecoderModel& m, const lora::LoraAdapter& adapter, const train::LayerForwardFn& layer,
           at::ScalarType dtype) {
  for (auto& p : adapter.parameters()) p.mutable_grad() = at::Tensor();
  const c10::Device gpu(c10::kCUDA, 0);
  torch::manual_seed(11);
  const int64_t b = 2, t = 128;
  at::Tensor x = at::randn({b, t, m.config().hidden_size}, at::TensorOptions().device(gpu)).to(dtype);
  at::Tensor w = at::randn_like(x);
  x.requires_grad_(true);
  const auto attn = model::causal_attention(b, t, gpu);
  const auto cos_sin = m.rope(attn.position_ids);
  at::Tensor y = x;
  for (int64_t l = 0; l < m.num_layers(); ++l) y = layer(l, y, cos_sin, attn);
  (y.to(at::kFloat) * w.to(at::kFloat)).sum().backward();
  Result r{y.detach(), x.grad(), {}};
  for (const auto& p : adapter.parameters()) r.grads.push_back(p.grad().clone());
  return r;
}

void compare(at::ScalarType dtype, layer::FusedRecompute what = layer::FusedRecompute::kFull,
             int64_t no_recompute_layers = 0) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  quant::register_cuda_kernels();
  at::globalContext().setAllowTF32CuBLAS(false);
  const DecoderConfig shape = testing::small_shape(train::demo_model_config(), 256);
  model::LoadOptions opt;
  opt.device = c10::Device(c10::kCUDA, 0);
  opt.dtype = dtype;
  opt.make_linear = model::nf4_linear_factory(true, dtype);
  DecoderModel m = DecoderModel::load(shape, train::random_llama_weights(shape, 5, c10::kCPU), opt);
  const lora::LoraAdapter adapter = testing::attach_all_linear_lora(m);
  const Result want = run(m, adapter, testing::generic_layer_forward(m, what), dtype);
  const Result got = run(m, adapter, layer::fused_layer_forward(m, what, -1, no_recompute_layers), dtype);
  const bool fp32 = dtype == at::kFloat;
  const double out_tol = fp32 ? kFp32Tol : kHalfOutTol, grad_tol = fp32 ? kFp32Tol : kHalfGradTol;
  const double ey = max_rel(got.y, want.y), ex = max_rel(got.dx, want.dx);
  double eg = 0;
  const auto names = adapter.named_parameters();
  for (size_t i = 0; i < got.grads.size(); ++i) {
    const double e = max_rel(got.grads[i], want.grads[i]);
    eg = std::max(eg, e);
    EXPECT_LT(e, grad_tol) << names[i].first;
  }
  std::printf("  %s%s: output %.2e, input grad %.2e, worst LoRA grad %.2e (relative to max |generic|)\n",
              std::string(c10::toString(dtype)).c_str(),
              no_recompute_layers > 0                  ? " last layer not recomputed"
              : what == layer::FusedRecompute::kSelective ? " selective"
              : what == layer::FusedRecompute::kNothing   ? " no checkpointing"
                                                          : "",
              ey, ex, eg);
  EXPECT_LT(ey, out_tol);
  EXPECT_LT(ex, grad_tol);
}

TEST(CudaFusedLayer, Fp32MatchesTheGenericLayer) { compare(at::kFloat); }
TEST(CudaFusedLayer, Bf16MatchesTheGenericLayer) { compare(at::kBFloat16); }
TEST(CudaFusedLayer, Fp16MatchesTheGenericLayer) { compare(at::kHalf); }
// Note [selective recompute]: gate/up kept, the rest recomputed with the forward's masks.
TEST(CudaFusedLayer, SelectiveRecomputeMatchesTheGenericLayer) { compare(at::kBFloat16, layer::FusedRecompute::kSelective); }
// Note [fused layer without checkpointing]: against the generic layer without checkpointing.
TEST(CudaFusedLayer, WithoutCheckpointingMatchesTheGenericLayer) { compare(at::kBFloat16, layer::FusedRecompute::kNothing); }
TEST(CudaFusedLayer, Fp32WithoutCheckpointing) { compare(at::kFloat, layer::FusedRecompute::kNothing); }
// Note [layers not recomputed]: the last of the two layers keeps everything (its LoRA inputs
// shed, Note [shed LoRA inputs]), the first recomputes; against the generic checkpoint.
TEST(CudaFusedLayer, LastLayerNotRecomputedMatchesTheGenericLayer) {
  compare(at::kBFloat16, layer::FusedRecompute::kFull, 1);
}
TEST(CudaFusedLayer, Fp32LastLayerNotRecomputed) { compare(at::kFloat, layer::FusedRecompute::kFull, 1); }

// ---------------------------------------------------------------- the families' pieces

// The weights a family's model is built from, each rounded to bf16 once, so the fp32 CPU
// reference and the bf16 GPU model hold the same values.
using WeightsFn = std::function<model::WeightSource()>;

model::WeightSource rounded(model::WeightSource src) {
  const auto get = src.get;
  src.get = [get](const std::string& name) { return get(name).to(at::kBFloat16).to(at::kFloat); };
  return src;
}

lora::LoraSettings family_lora(double dropout) {
  lora::LoraSettings ls;
  ls.r = 8;
  ls.alpha = 16;
  ls.dropout = dropout;
  ls.target_modules = {"all-linear"};
  return ls;
}

// x [B, T, h] and the loss weights, bf16 values (exact in fp32 too), on the CPU in fp32.
std::pair<at::Tensor, at::Tensor> family_inputs(int64_t hidden) {
  torch::manual_seed(11);
  const int64_t b = 2, t = 128;  // above the windowed families' 5: the band mask
  return {at::randn({b, t, hidden}).to(at::kBFloat16).to(at::kFloat),
          at::randn({b, t, hidden}).to(at::kBFloat16).to(at::kFloat)};
}

// Every layer of m through `layer` (empty: m.layer_forward) from x, the loss sum(y · w), its
// backward; results on the CPU in fp32.
Result run_family(const DecoderModel& m, const lora::LoraAdapter& adapter, const train::LayerForwardFn& layer,
                  const at::Tensor& x0, const at::Tensor& w0) {
  for (auto& p : adapter.parameters()) p.mutable_grad() = at::Tensor();
  at::Tensor x = x0.to(m.device(), m.dtype(), /*non_blocking=*/false, /*copy=*/true).requires_grad_(true);
  const auto attn = model::causal_attention(x.size(0), x.size(1), m.device());
  const auto cos_sin = m.rope(attn.position_ids);
  at::Tensor y = x;
  for (int64_t l = 0; l < m.num_layers(); ++l) y = layer ? layer(l, y, cos_sin, attn) : m.layer_forward(l, y, cos_sin, attn);
  (y.to(at::kFloat) * w0.to(m.device())).sum().backward();
  Result r{y.detach().to(at::kCPU, at::kFloat), x.grad().to(at::kCPU, at::kFloat), {}};
  for (const auto& p : adapter.parameters()) r.grads.push_back(p.grad().to(at::kCPU, at::kFloat));
  return r;
}

// got against want within the families' tolerances; prints the largest differences.
void expect_close(const Result& got, const Result& want, const lora::LoraAdapter& adapter, const std::string& what) {
  const double ey = max_rel(got.y, want.y), ex = max_rel(got.dx, want.dx);
  double eg = 0;
  const auto names = adapter.named_parameters();
  ASSERT_EQ(got.grads.size(), want.grads.size());
  for (size_t i = 0; i < got.grads.size(); ++i) {
    const double e = max_rel(got.grads[i], want.grads[i]);
    eg = std::max(eg, e);
    EXPECT_LT(e, kFamilyGradTol) << what << ": " << names[i].first;
  }
  std::printf("  %s: output %.2e, input grad %.2e, worst LoRA grad %.2e (relative to max |reference|)\n",
              what.c_str(), ey, ex, eg);
  EXPECT_LT(ey, kFamilyOutTol) << what;
  EXPECT_LT(ex, kFamilyGradTol) << what;
}

// The fused layer on the GPU in bf16 (dense weights), in every recompute mode, against the
// generic layer in fp32 on the CPU, without dropout (the GPU draws other masks than the CPU):
// same weights, inputs and LoRA matrices (B given values so A's gradient is not zero).
void compare_family_with_cpu(const std::string& name, const DecoderConfig& config, const WeightsFn& weights) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  quant::register_cuda_kernels();
  at::globalContext().setAllowTF32CuBLAS(false);
  EXPECT_EQ(fused_layer_gap(config), "") << name;
  DecoderModel cpu = DecoderModel::load(config, weights());
  torch::manual_seed(2);
  lora::LoraAdapter cpu_adapter = lora::LoraAdapter::attach(cpu, family_lora(0.0));
  testing::give_lora_b_values(cpu_adapter);
  {
    at::NoGradGuard no_grad;
    for (auto& p : cpu_adapter.parameters()) p.copy_(p.to(at::kBFloat16).to(at::kFloat));
  }
  const auto [x, w] = family_inputs(config.hidden_size);
  const Result want = run_family(cpu, cpu_adapter, {}, x, w);
  for (const testing::RecomputeMode& mode : testing::kRecomputeModes) {
    model::LoadOptions opt;
    opt.device = c10::Device(c10::kCUDA, 0);
    opt.dtype = at::kBFloat16;
    DecoderModel gpu = DecoderModel::load(config, weights(), opt);
    lora::LoraAdapter adapter = lora::LoraAdapter::attach(gpu, family_lora(0.0));
    {
      at::NoGradGuard no_grad;
      const auto from = cpu_adapter.parameters();
      const auto to = adapter.parameters();
      ASSERT_EQ(from.size(), to.size());
      for (size_t i = 0; i < to.size(); ++i) to[i].copy_(from[i]);
    }
    ASSERT_EQ(layer::fused_layer_unsupported(gpu), "");
    const Result got =
        run_family(gpu, adapter, layer::fused_layer_forward(gpu, mode.what, -1, mode.no_recompute_layers), x, w);
    expect_close(got, want, adapter, name + " bf16 vs CPU fp32, " + mode.name);
  }
}

// With LoRA dropout (0.1) and an NF4 base: the fused layer against the generic checkpoint, both
// in bf16 on the GPU, the masks drawn from the same generator in the same order.
void compare_family_on_gpu(const std::string& name, const DecoderConfig& config, const WeightsFn& weights) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  quant::register_cuda_kernels();
  model::LoadOptions opt;
  opt.device = c10::Device(c10::kCUDA, 0);
  opt.dtype = at::kBFloat16;
  opt.make_linear = model::nf4_linear_factory(true, at::kBFloat16);
  DecoderModel m = DecoderModel::load(config, weights(), opt);
  torch::manual_seed(2);
  lora::LoraAdapter adapter = lora::LoraAdapter::attach(m, family_lora(0.1));
  testing::give_lora_b_values(adapter);
  const auto [x, w] = family_inputs(config.hidden_size);
  torch::manual_seed(5);
  const Result want = run_family(m, adapter, train::checkpointed_layer_forward(m), x, w);
  torch::manual_seed(5);
  const Result got = run_family(m, adapter, layer::fused_layer_forward(m), x, w);
  expect_close(got, want, adapter, name + " nf4 bf16 with dropout vs the generic layer");
}

void compare_family(const std::string& variant) {
  const testing::FamilyDir f = testing::open_family(variant);
  const WeightsFn weights = [f] { return rounded(testing::family_weights(f)); };
  compare_family_with_cpu(variant, f.config, weights);
  compare_family_on_gpu(variant, f.config, weights);
}

TEST(CudaFusedLayerFamilies, Qwen2QkvBiases) { compare_family("qwen2"); }
// head_dim · heads (128) != hidden (64).
TEST(CudaFusedLayerFamilies, Qwen3QkNorms) { compare_family("qwen3"); }
TEST(CudaFusedLayerFamilies, MistralSlidingWindow) { compare_family("mistral"); }
// Layer 0 full, 1 and 2 windowed; q, k, v biases; yarn's attention factor.
TEST(CudaFusedLayerFamilies, Qwen2WindowOnSomeLayers) { compare_family("qwen2_window"); }
TEST(CudaFusedLayerFamilies, SmolLm2) { compare_family("smollm2"); }
// qkv_proj and gate_up_proj as the merged GEMMs (Note [fused projections]); partial rotary.
TEST(CudaFusedLayerFamilies, Phi3FusedProjections) { compare_family("phi3"); }
// Partial rotary (0.75) and LongRoPE past original_max_position_embeddings.
TEST(CudaFusedLayerFamilies, Phi3LongropeAndPartialRotary) { compare_family("phi3_longrope"); }
// GeGLU (the kernel), (1 + w) and sandwich norms, query_pre_attn_scalar 24 (head_dim 16),
// soft-capping at 2 (the eager attention), windows of 5 on every other layer.
TEST(CudaFusedLayerFamilies, Gemma2) { compare_family("gemma2"); }
// (1 + w) q/k norms, the windowed layers' local RoPE base beside the global layer's scaled one,
// GeGLU, sandwich norms, one kv head.
TEST(CudaFusedLayerFamilies, Gemma3) { compare_family("gemma3"); }
// A bias on every projection, N(0, 0.5).
TEST(CudaFusedLayerFamilies, LlamaWithAttentionAndMlpBiases) {
  const WeightsFn weights = [] { return rounded(testing::biased_llama_weights()); };
  compare_family_with_cpu("llama attention_bias mlp_bias", testing::biased_llama_shape(), weights);
  compare_family_on_gpu("llama attention_bias mlp_bias", testing::biased_llama_shape(), weights);
}

}  // namespace
}  // namespace qlora
