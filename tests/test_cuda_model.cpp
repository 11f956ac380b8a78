// model on a GPU (label cuda): the Llama forward, the NF4 base, LoRA
// gradients and the chunked loss on CUDA tensors equal the CPU golden / the CPU
// run; skipped where torch sees no CUDA device (every CPU-only build).
#include <gtest/gtest.h>
#include <ATen/ATen.h>
#include <torch/cuda.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <algorithm>
#include <cstdio>
#include <string>

#include "qlora/io/torch_io.h"
#include "qlora/lora/adapter_io.h"
#include "qlora/lora/lora.h"
#include "qlora/model/decoder.h"
#include "qlora/model/decoder_config.h"
#include "qlora/model/family.h"
#include "qlora/model/loss.h"
#include "qlora/model/nf4_linear.h"

namespace {

using namespace qlora;
using namespace qlora::model;

// The CPU tests' bounds (tests/test_model_llama.cpp says how they were chosen).
constexpr double kLogitAtol = 1e-4;
constexpr double kLossRtol = 1e-5;
constexpr double kBf16Rtol = 0.05;

std::string data_dir(const std::string& v) { return std::string(QLORA_SOURCE_DIR) + "/tests/data/model/" + v; }

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// The same code on a GPU: runs where torch sees CUDA (a QLORA_CUDA=ON build),
// skipped elsewhere. fp32 with TF32 off must match the CPU golden; the NF4
// base, LoRA gradients and the chunked loss must match the CPU run.
TEST(LlamaCuda, ForwardLossNf4AndLoraMatchTheCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  at::globalContext().setAllowTF32CuBLAS(false);
  const c10::Device gpu(c10::kCUDA, 0);
  const std::string dir = data_dir("llama3_untied");
  const DecoderConfig cfg = read_decoder_config(dir + "/config.json");
  auto weights = io::load_safetensors(dir + "/model.safetensors");
  auto g = io::load_safetensors(dir + "/golden.safetensors");
  at::Tensor ids = g.at("input_ids").to(gpu), mask = g.at("attention_mask").to(gpu);
  at::Tensor labels = shift_labels(g.at("labels")).reshape({-1}).to(gpu);

  std::vector<double> errs;
  for (bool use_nf4 : {false, true}) {
    LoadOptions opt;
    opt.device = gpu;
    if (use_nf4) opt.make_linear = nf4_linear_factory(true, at::kFloat);
    DecoderModel m = DecoderModel::load(cfg, weights_from_map(weights, dir), opt);
    at::Tensor logits = m.forward(ids, padded_attention(mask));
    ASSERT_TRUE(logits.is_cuda());
    const double err = max_abs_diff(logits.cpu(), g.at(use_nf4 ? "logits_nf4" : "logits"));
    std::printf("  cuda %s fp32 logits max |err| vs golden = %.3e\n", use_nf4 ? "nf4  " : "dense", err);
    EXPECT_LT(err, kLogitAtol);

    // LoRA on top (PEFT's adapter), loss and gradients vs the same on the CPU.
    const std::string adir = data_dir("lora_qkvo") + "/adapter";
    lora::LoraAdapter a = lora::load_adapter(m, adir);
    at::Tensor hidden = m.forward_hidden(ids, padded_attention(mask));
    TokenLoss loss = chunked_cross_entropy(hidden.reshape({-1, hidden.size(-1)}), m.lm_head_weight(), labels, 8);
    loss.sum.backward();

    LoadOptions cpu_opt;
    if (use_nf4) cpu_opt.make_linear = nf4_linear_factory(true, at::kFloat);
    DecoderModel mc = DecoderModel::load(cfg, weights_from_map(weights, dir), cpu_opt);
    lora::LoraAdapter ac = lora::load_adapter(mc, adir);
    at::Tensor hc = mc.forward_hidden(g.at("input_ids"), padded_attention(g.at("attention_mask")));
    TokenLoss lc = chunked_cross_entropy(hc.reshape({-1, hc.size(-1)}), mc.lm_head_weight(), labels.cpu(), 8);
    lc.sum.backward();
    EXPECT_NEAR(loss.sum.item<double>(), lc.sum.item<double>(), kLossRtol * lc.sum.item<double>());
    double worst = 0;
    for (size_t i = 0; i < a.parameters().size(); ++i) {
      const at::Tensor& ref = ac.parameters()[i].grad();
      worst = std::max(worst, max_abs_diff(a.parameters()[i].grad().cpu(), ref) / ref.abs().max().item<double>());
    }
    std::printf("  cuda %s LoRA grads worst rel diff vs cpu = %.3e\n", use_nf4 ? "nf4  " : "dense", worst);
    EXPECT_LT(worst, 1e-4);
  }
  // bf16 on the GPU vs transformers' bf16 on the CPU: different kernels, so the
  // bf16 vs fp32 bound applies.
  LoadOptions bf;
  bf.device = gpu;
  bf.dtype = at::kBFloat16;
  DecoderModel m = DecoderModel::load(cfg, weights_from_map(weights, dir), bf);
  at::Tensor logits = m.forward(ids, padded_attention(mask)).cpu();
  const double scale = g.at("logits").abs().max().item<double>();
  const double err = max_abs_diff(logits, g.at("logits_bf16"));
  std::printf("  cuda bf16 logits max |err| vs transformers bf16 (cpu) = %.3e (%.2f%%)\n", err, 100 * err / scale);
  EXPECT_LT(err, kBf16Rtol * scale);
}

}  // namespace

namespace {

// Note [fused RMSNorm on GPUs]: the fused kernel against transformers' op
// order, both in bf16 on the GPU. They differ by where the product with the
// weight is rounded: one bf16 rounding (2^-8 relative) on the output, a few on
// the gradients, which sum over the hidden size.
constexpr double kFusedNormRtol = 1e-2;

double rel(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>() / b.to(at::kDouble).abs().max().item<double>();
}

TEST(LlamaCuda, FusedRmsNormMatchesTheReferenceOrderInBf16) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  const auto opts = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
  torch::manual_seed(3);
  const at::Tensor x0 = torch::randn({3, 37, 2048}, opts) * 3;
  const at::Tensor w0 = 1 + 0.1 * torch::randn({2048}, opts);
  const at::Tensor g = torch::randn({3, 37, 2048}, opts);
  std::vector<at::Tensor> outs, gx, gw;
  for (bool fused : {true, false}) {
    at::Tensor x = x0.clone().requires_grad_(true), w = w0.clone().requires_grad_(true);
    at::Tensor y = fused ? rms_norm(x, w, 1e-5) : rms_norm_reference(x, w, 1e-5);
    ASSERT_EQ(y.scalar_type(), at::kBFloat16);
    y.backward(g);
    outs.push_back(y.detach());
    gx.push_back(x.grad());
    gw.push_back(w.grad());
  }
  const double e_out = rel(outs[0], outs[1]), e_gx = rel(gx[0], gx[1]), e_gw = rel(gw[0], gw[1]);
  std::printf("  fused vs reference bf16 RMSNorm: output %.2e, grad x %.2e, grad weight %.2e (relative to max)\n",
              e_out, e_gx, e_gw);
  EXPECT_LE(e_out, kFusedNormRtol);
  EXPECT_LE(e_gx, kFusedNormRtol);
  EXPECT_LE(e_gw, kFusedNormRtol);
}

}  // namespace
