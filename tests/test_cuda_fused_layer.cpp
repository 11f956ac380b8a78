// The fused decoder layer on a GPU against the generic checkpointed layer on the
// same GPU (with selective recompute too; without checkpointing against the generic
// layer without it): NF4 base, LoRA on every projection with dropout, grouped kv heads,
// in fp32 (TF32 off: agreement to summation order), bf16 and fp16 (agreement to
// the roundings the two orders take). The dropout masks are the same in both:
// the same generator, drawn in the same order (checked by the outputs).
#include <gtest/gtest.h>
#include <ATen/ATen.h>
#include <torch/cuda.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <cstdio>
#include <string>
#include <vector>

#include "qlora/lora/lora.h"
#include "qlora/model/decoder.h"
#include "qlora/model/nf4_linear.h"
#include "qlora/quant/nf4_cuda.h"
#include "qlora/train/checkpoint.h"
#include "qlora/train/demo.h"
#include "qlora/layer/fused_layer.h"

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
  DecoderConfig shape = train::demo_model_config();
  shape.hidden_size = 256;
  shape.intermediate_size = 512;
  shape.num_hidden_layers = 2;
  shape.num_attention_heads = 4;
  shape.num_key_value_heads = 2;
  shape.head_dim = 64;
  model::LoadOptions opt;
  opt.device = c10::Device(c10::kCUDA, 0);
  opt.dtype = dtype;
  opt.make_linear = model::nf4_linear_factory(true, dtype);
  DecoderModel m = DecoderModel::load(shape, train::random_llama_weights(shape, 5, c10::kCPU), opt);
  lora::LoraSettings ls;
  ls.r = 8;
  ls.alpha = 16;
  ls.dropout = 0.1;
  ls.target_modules = {"all-linear"};
  torch::manual_seed(2);
  lora::LoraAdapter adapter = lora::LoraAdapter::attach(m, ls);
  {
    at::NoGradGuard no_grad;
    for (const auto& l : adapter.layers()) l->lora_b().normal_(0.0, 0.05);
  }
  // Without checkpointing the reference is the model's own layer under autograd.
  const train::LayerForwardFn generic =
      what == layer::FusedRecompute::kNothing
          ? train::LayerForwardFn([&m](int64_t l, const at::Tensor& h, const std::pair<at::Tensor, at::Tensor>& cs,
                                       const model::AttentionInputs& a) { return m.layer_forward(l, h, cs, a); })
          : train::checkpointed_layer_forward(m);
  const Result want = run(m, adapter, generic, dtype);
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

}  // namespace
}  // namespace qlora
