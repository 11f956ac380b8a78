// Generation on a GPU (label cuda): decoding's two fast paths against the plain ones. The fused
// NF4 GEMV (quant/linear4bit.h, Note [NF4 GEMV for decoding]) against dequantize + matmul, and
// the decoding step replayed as a CUDA graph (train/decode_graph.h) against the model's forward
// over the whole sequence and against eager decoding. Skipped where torch sees no CUDA device.
#include <gtest/gtest.h>
#include <ATen/ATen.h>
#include <torch/cuda.h>
#include <torch/utils.h>

#include <cstdio>
#include <string>
#include <vector>

#include "qlora/lora/lora.h"
#include "qlora/model/decoder.h"
#include "qlora/model/family.h"
#include "qlora/model/nf4_linear.h"
#include "qlora/quant/linear4bit.h"
#include "qlora/quant/nf4.h"
#include "qlora/quant/nf4_cuda.h"
#include "qlora/train/decode_graph.h"
#include "qlora/train/demo.h"
#include "qlora/train/generate.h"
#include "support/fused_layer_fixtures.h"
#include "support/train_fixtures.h"

namespace {

using namespace qlora;
using qlora::DecoderConfig;
using model::DecoderModel;

double max_rel(const at::Tensor& got, const at::Tensor& want) {
  const at::Tensor w = want.to(at::kDouble);
  return (got.to(at::kDouble) - w).abs().max().item<double>() / std::max(1e-12, w.abs().max().item<double>());
}

struct Rig {
  DecoderModel model;
  lora::LoraAdapter adapter;
};

// A random NF4 model of `shape` on the GPU in `dtype`, LoRA r 8 on every projection with B drawn
// (so the adapter changes the output).
Rig make_rig(const DecoderConfig& shape, at::ScalarType dtype) {
  quant::register_cuda_kernels();
  model::LoadOptions opt;
  opt.device = c10::Device(c10::kCUDA, 0);
  opt.dtype = dtype;
  opt.make_linear = model::nf4_linear_factory(true, dtype);
  Rig r{DecoderModel::load(shape, train::random_llama_weights(shape, 5, c10::kCPU), opt), {}};
  lora::LoraSettings ls;
  ls.r = 8;
  ls.alpha = 16;
  ls.target_modules = {"all-linear"};
  torch::manual_seed(2);
  r.adapter = lora::LoraAdapter::attach(r.model, ls);
  qlora::testing::give_lora_b_values(r.adapter);
  r.adapter.set_training(false);
  return r;
}

DecoderConfig llama_shape() { return qlora::testing::small_shape(train::demo_model_config(), 256); }

DecoderConfig gemma2_shape() {
  // Gemma 2's pieces (soft-capped attention and logits, (1 + w) norms, sandwich norms, GeGLU,
  // scaled embeddings) at the small size; its window (4096) is longer than any cache here.
  const std::string dir = std::string(QLORA_SOURCE_DIR) + "/tests/data/families/gemma2";
  DecoderConfig c = qlora::testing::small_shape(read_decoder_config(dir + "/config.json"), 256);
  c.vocab_size = train::demo_model_config().vocab_size;
  for (auto& w : c.layer_window) w = w > 0 ? 4096 : 0;  // the golden config's window is 5
  return c;
}

// Rows 1..16 through the whole model without a gradient: the GEMV path's logits against
// dequantize + matmul's, and no weight dequantized on the GEMV path.
TEST(CudaGenerate, Nf4GemvMatchesDequantizeAndMatmul) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
    Rig rig = make_rig(llama_shape(), dtype);
    at::NoGradGuard no_grad;
    for (int64_t rows : {1, 5, 16}) {
      const at::Tensor ids = at::randint(0, 200, {rows, 1}, at::TensorOptions().dtype(at::kLong).device(at::kCUDA));
      const auto attn = model::causal_attention(rows, 1, ids.device());
      quant::set_nf4_gemv_enabled(false);
      const at::Tensor want = rig.model.forward(ids, attn);
      quant::set_nf4_gemv_enabled(true);
      const uint64_t before = quant::nf4_dequantize_calls();
      const at::Tensor got = rig.model.forward(ids, attn);
      EXPECT_EQ(quant::nf4_dequantize_calls(), before) << "a weight was dequantized on the GEMV path";
      const double e = max_rel(got, want);
      std::printf("  %s, %lld rows: GEMV logits vs dequantize + matmul %.2e (relative to max |logit|)\n",
                  std::string(c10::toString(dtype)).c_str(), static_cast<long long>(rows), e);
      EXPECT_LT(e, 2e-2);
    }
  }
}

// Teacher-forced: a prefill of 9 tokens, then DecodeGraph steps feeding the rest of the sequence;
// each step's logits equal the model's forward over the whole sequence at that position.
void graph_matches_forward(const DecoderConfig& shape, at::ScalarType dtype, double tol) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  Rig rig = make_rig(shape, dtype);
  const DecoderModel& m = rig.model;
  at::NoGradGuard no_grad;
  const int64_t prompt = 9, total = 24, capacity = 32;
  ASSERT_EQ(train::decode_graph_unavailable(m, capacity), "");
  const auto gpu = at::TensorOptions().device(at::kCUDA);
  torch::manual_seed(4);
  const at::Tensor ids = at::randint(0, 200, {1, total}, gpu.dtype(at::kLong));
  const at::Tensor want = m.forward(ids, model::causal_attention(1, total, ids.device())).to(at::kFloat);

  model::KvCache cache = m.new_cache(1, capacity);
  model::AttentionInputs a = model::causal_attention(1, prompt, ids.device());
  at::Tensor hidden = m.embed(ids.narrow(1, 0, prompt));
  const auto cos_sin = m.rope(a.position_ids);
  for (int64_t l = 0; l < m.num_layers(); ++l) hidden = m.layer_forward(l, hidden, cos_sin, a, &cache);
  cache.length = prompt;
  train::DecodeGraph graph(m, cache, at::ones({1, capacity}, gpu.dtype(at::kBool)),
                           at::full({1}, prompt - 1, gpu.dtype(at::kLong)));
  double worst = 0;
  for (int64_t p = prompt; p < total; ++p) {
    const at::Tensor got = graph.step(ids.select(1, p));  // the logits after token p
    worst = std::max(worst, max_rel(got, want.select(1, p)));
  }
  EXPECT_EQ(cache.length, total);
  std::printf("  %s %s: graph decoding vs the whole-sequence forward, worst %.2e (relative to max |logit|)\n",
              shape.model_type.c_str(), std::string(c10::toString(dtype)).c_str(), worst);
  EXPECT_LT(worst, tol);
}

TEST(CudaGenerate, GraphStepsMatchTheForwardFp32) { graph_matches_forward(llama_shape(), at::kFloat, 1e-4); }
TEST(CudaGenerate, GraphStepsMatchTheForwardBf16) { graph_matches_forward(llama_shape(), at::kBFloat16, 3e-2); }
TEST(CudaGenerate, GraphStepsMatchTheForwardGemma2) { graph_matches_forward(gemma2_shape(), at::kFloat, 1e-4); }

// A window shorter than the cache keeps decoding eager (the fixed-shape cache cannot slide).
TEST(CudaGenerate, ShortWindowsDecodeEagerly) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  DecoderConfig c = gemma2_shape();
  for (auto& w : c.layer_window) w = w > 0 ? 5 : 0;
  Rig rig = make_rig(c, at::kFloat);
  EXPECT_NE(train::decode_graph_unavailable(rig.model, 32).find("sliding window"), std::string::npos);
  train::SamplingOptions o;
  o.max_new_tokens = 12;
  EXPECT_EQ(train::generate(rig.model, {{3, 4, 5, 6, 7, 8, 9}}, o).at(0).size(), 12u);
}

// Whole generations, left-padded batch of three prompt lengths, greedy: the graph gives the eager
// steps' tokens (fp32, where no rounding can flip an argmax between the two).
TEST(CudaGenerate, GraphGenerationEqualsEagerGeneration) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  Rig rig = make_rig(llama_shape(), at::kFloat);
  const std::vector<std::vector<int32_t>> prompts = {{5, 17, 33, 2, 90}, {7}, {11, 12, 13, 14, 15, 16, 17, 18, 19}};
  train::SamplingOptions o;
  o.max_new_tokens = 20;
  o.cuda_graph = false;
  const auto eager = train::generate(rig.model, prompts, o);
  o.cuda_graph = true;
  const auto graphed = train::generate(rig.model, prompts, o);
  ASSERT_EQ(graphed.size(), eager.size());
  for (size_t r = 0; r < eager.size(); ++r) {
    EXPECT_EQ(eager[r].size(), 20u) << "row " << r;
    EXPECT_EQ(graphed[r], eager[r]) << "row " << r;
  }
}

}  // namespace
