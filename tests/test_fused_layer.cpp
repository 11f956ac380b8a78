// The fused decoder layer (layer/fused_layer.h) against the generic checkpointed
// layer, which runs the model's own forward under autograd: same outputs, same
// input gradient, same LoRA gradients, the same dropout masks, and the generators
// left where the generic layer leaves them. fp32 on the CPU, where the two differ
// only by the order of additions (the residual, the bias and the LoRA update inside one
// GEMM, the RMSNorm backward written out). A Llama built here, and each family's tiny
// model (tests/data/families/, scripts/golden/families.py) with its pieces: Qwen2's q, k, v
// biases, Qwen3's q/k norms, Mistral's and Qwen2's sliding windows, SmolLM2, Phi-3's fused
// projections, Gemma 2's and Gemma 3's pieces, and a Llama with attention_bias and mlp_bias, in
// every recompute mode.
#include <gtest/gtest.h>
#include <ATen/ATen.h>
#include <torch/cuda.h>
#include <torch/types.h>
#include <torch/csrc/autograd/function.h>
#include <torch/utils.h>

#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "qlora/layer/fused_layer.h"
#include "qlora/layer/offload.h"
#include "qlora/lora/lora.h"
#include "qlora/model/decoder.h"
#include "qlora/model/family.h"
#include "qlora/model/nf4_linear.h"
#include "qlora/train/demo.h"
#include "qlora/train/layer_choice.h"
#include "support/fused_layer_fixtures.h"
#include "support/train_fixtures.h"

namespace qlora {
namespace {

using model::DecoderModel;

// fp32 results that differ by summation order: a few ulps of the largest entry
// over a chain of ~10 GEMMs; 2e-5 of max|reference| leaves room without hiding
// a wrong term (a dropped LoRA or residual term moves them by > 1e-2).
constexpr double kRelTol = 2e-5;

struct Setup {
  bool nf4 = false;
  double dropout = 0.0;
  bool padded = false;       // a padding mask (one row shorter) instead of causal only
  bool input_grad = true;    // false: the input is a frozen embedding's output
  layer::FusedRecompute recompute = layer::FusedRecompute::kFull;
  int64_t selective_layers = -1;  // with kSelective: how many (the last) layers keep gate/up
  int64_t no_recompute_layers = 0;  // how many (the last) layers recompute nothing
  std::vector<std::string> targets = {"all-linear"};
  int64_t t = 7;  // sequence length (above a sliding window to reach its mask)
};

// The largest differences of one comparison, relative to max |generic|.
struct Measured {
  double y = 0, dx = 0, grad = 0;  // outputs, input gradient, worst LoRA gradient
};

struct Result {
  at::Tensor y, dx, after;  // after: a draw from the generator once the step is done
  std::vector<at::Tensor> grads;
};

double max_rel(const at::Tensor& got, const at::Tensor& want) {
  const double scale = std::max(want.abs().max().item<double>(), 1e-30);
  return (got - want).abs().max().item<double>() / scale;
}

Result run(DecoderModel& m, lora::LoraAdapter& adapter, const train::LayerForwardFn& layer, const Setup& s) {
  for (auto& p : adapter.parameters()) p.mutable_grad() = at::Tensor();
  torch::manual_seed(99);
  const int64_t b = 2, t = s.t, h = m.config().hidden_size;
  at::Tensor x = at::randn({b, t, h});
  at::Tensor w = at::randn({b, t, h});
  if (s.input_grad) x.requires_grad_(true);
  model::AttentionInputs attn = model::causal_attention(b, t, c10::kCPU);
  if (s.padded) {
    at::Tensor mask = at::ones({b, t}, at::kLong);
    mask[1].narrow(0, t - 2, 2).fill_(0);
    attn = model::padded_attention(mask);
  }
  const auto cos_sin = m.rope(attn.position_ids);
  at::Tensor y = x;
  for (int64_t l = 0; l < m.num_layers(); ++l) y = layer(l, y, cos_sin, attn);
  (y * w).sum().backward();
  Result r;
  r.y = y.detach();
  if (s.input_grad) r.dx = x.grad();
  r.after = at::rand({4});
  for (const auto& p : adapter.parameters()) r.grads.push_back(p.grad().defined() ? p.grad().clone() : at::Tensor());
  return r;
}

// The fused layer against the generic one on `m` (LoRA attached here, as `s` says).
Measured compare(DecoderModel& m, const Setup& s) {
  lora::LoraSettings ls;
  ls.r = 4;
  ls.alpha = 8;
  ls.dropout = s.dropout;
  ls.target_modules = s.targets;
  torch::manual_seed(1);
  lora::LoraAdapter adapter = lora::LoraAdapter::attach(m, ls);
  testing::give_lora_b_values(adapter);
  EXPECT_EQ(layer::fused_layer_unsupported(m), "");
  const Result want = run(m, adapter, testing::generic_layer_forward(m, s.recompute), s);
  const Result got =
      run(m, adapter, layer::fused_layer_forward(m, s.recompute, s.selective_layers, s.no_recompute_layers), s);
  if (s.recompute != layer::FusedRecompute::kFull || s.no_recompute_layers > 0) {
    // What is kept is what the full recompute would make again (Note [selective recompute],
    // Note [fused layer without checkpointing], Note [layers not recomputed]), so the fused runs
    // agree bit for bit.
    const Result full = run(m, adapter, layer::fused_layer_forward(m, layer::FusedRecompute::kFull), s);
    EXPECT_TRUE(at::equal(got.y, full.y)) << "kept vs full recompute: layer outputs";
    if (s.input_grad) {
      EXPECT_TRUE(at::equal(got.dx, full.dx)) << "kept vs full recompute: input gradient";
    }
    for (size_t i = 0; i < got.grads.size(); ++i)
      EXPECT_TRUE(at::equal(got.grads[i], full.grads[i])) << "kept vs full recompute: gradient " << i;
  }
  Measured e;
  e.y = max_rel(got.y, want.y);
  EXPECT_LT(e.y, kRelTol) << "layer outputs";
  if (s.input_grad) {
    e.dx = max_rel(got.dx, want.dx);
    EXPECT_LT(e.dx, kRelTol) << "input gradient";
  }
  EXPECT_TRUE(at::equal(got.after, want.after)) << "the generator must be left where the generic layer leaves it";
  const auto names = adapter.named_parameters();
  EXPECT_EQ(got.grads.size(), want.grads.size());
  for (size_t i = 0; i < got.grads.size() && i < want.grads.size(); ++i) {
    if (!want.grads[i].defined() || !got.grads[i].defined()) {
      ADD_FAILURE() << names[i].first << ": no gradient";
      continue;
    }
    const double g = max_rel(got.grads[i], want.grads[i]);
    e.grad = std::max(e.grad, g);
    EXPECT_LT(g, kRelTol) << names[i].first;
  }
  return e;
}

void compare(const Setup& s) {
  const DecoderConfig shape = testing::small_llama_shape();
  model::LoadOptions opt;
  if (s.nf4) opt.make_linear = model::nf4_linear_factory(true, at::kFloat);
  DecoderModel m = DecoderModel::load(shape, train::random_llama_weights(shape, 3, c10::kCPU), opt);
  compare(m, s);
}

TEST(FusedLayer, MatchesTheGenericLayerWithoutDropout) { compare({}); }

TEST(FusedLayer, DrawsTheSameDropoutMasks) { compare({false, 0.2, false, true}); }

// Some projections of a merged GEMM without LoRA (k, gate; down): Note [LoRA before the base
// GEMM] keeps the base GEMM first there, and writes the LoRA products first for o.
TEST(FusedLayer, LoraOnSomeProjectionsOfAMergedGemm) {
  ::qlora::Setup s{false, 0.2, false, true};
  s.targets = {"q_proj", "v_proj", "o_proj", "up_proj"};
  compare(s);
}

TEST(FusedLayer, Nf4BaseAndPaddingMask) { compare({true, 0.1, true, true}); }

TEST(FusedLayer, InputWithoutGradStillTrainsTheAdapter) { compare({false, 0.0, false, false}); }

// gate/up kept from forward; LoRA (with dropout) on gate, up and down, whose masks must be
// drawn again in the forward's order.
TEST(FusedLayer, SelectiveRecomputeDrawsTheSameMasks) {
  compare({true, 0.2, true, true, layer::FusedRecompute::kSelective});
}

// train.selective_layers: the last layer keeps gate/up, the ones below recompute it; the
// masks of both kinds of layer must be the forward's.
TEST(FusedLayer, SelectiveInTheLastLayerOnly) {
  ASSERT_GE(testing::small_llama_shape().num_hidden_layers, 2);
  compare({true, 0.2, false, true, layer::FusedRecompute::kSelective, 1});
}

TEST(FusedLayer, SelectiveRecomputeWithoutDropout) {
  compare({false, 0.0, false, true, layer::FusedRecompute::kSelective});
}

// No checkpointing: both halves kept from forward, every mask drawn once, in the generic
// layer's order.
TEST(FusedLayer, WithoutCheckpointingMatchesTheGenericLayer) {
  compare({true, 0.2, true, true, layer::FusedRecompute::kNothing});
}

// Note [layers not recomputed]: the last layer keeps everything, the one below recomputes (in
// full, or all but gate/up); the masks of both kinds of layer must be the forward's.
TEST(FusedLayer, LastLayerNotRecomputed) {
  ASSERT_GE(testing::small_llama_shape().num_hidden_layers, 2);
  compare({true, 0.2, true, true, layer::FusedRecompute::kFull, -1, 1});
}

TEST(FusedLayer, LastLayerNotRecomputedTheRestSelective) {
  compare({false, 0.2, false, true, layer::FusedRecompute::kSelective, -1, 1});
}

TEST(FusedLayer, NoLayerRecomputedUnderCheckpointing) {
  compare({true, 0.2, false, true, layer::FusedRecompute::kSelective, -1, 99});
}

TEST(FusedLayer, WithoutCheckpointingOrDropout) { compare({false, 0.0, false, false, layer::FusedRecompute::kNothing}); }

TEST(FusedLayer, GradModeOffIsThePlainForward) {
  const DecoderConfig shape = testing::small_llama_shape();
  DecoderModel m = DecoderModel::load(shape, train::random_llama_weights(shape, 3, c10::kCPU));
  at::NoGradGuard no_grad;
  at::Tensor x = at::randn({1, 4, shape.hidden_size});
  const auto attn = model::causal_attention(1, 4, c10::kCPU);
  const auto cos_sin = m.rope(attn.position_ids);
  EXPECT_TRUE(at::equal(layer::fused_layer_forward(m)(0, x, cos_sin, attn), m.layer_forward(0, x, cos_sin, attn)));
}

TEST(FusedLayer, TheCpuRunKeepsTheGenericLayer) {
  // fp32 on the CPU: the path the golden tests pin stays the generic one.
  const DecoderConfig shape = testing::small_llama_shape();
  DecoderModel m = DecoderModel::load(shape, train::random_llama_weights(shape, 3, c10::kCPU));
  lora::LoraSettings ls;
  ls.target_modules = {"q_proj"};
  lora::LoraAdapter adapter = lora::LoraAdapter::attach(m, ls);
  torch::manual_seed(5);
  at::Tensor x = at::randn({1, 3, shape.hidden_size}).requires_grad_(true);
  const auto attn = model::causal_attention(1, 3, c10::kCPU);
  const auto cos_sin = m.rope(attn.position_ids);
  const at::Tensor y = train::training_layer_forward(m, true)(0, x, cos_sin, attn);
  ASSERT_TRUE(y.grad_fn());
  EXPECT_NE(y.grad_fn()->name().find("CheckpointFunction"), std::string::npos) << y.grad_fn()->name();
  // Without checkpointing: no layer function, the model's own forward.
  EXPECT_FALSE(train::training_layer_forward(m, false, Recompute::kSelective));
}

// ---------------------------------------------------------------- the families' pieces

// A family's tiny model from tests/data/families/<variant>.
DecoderModel load_family(const std::string& variant, bool nf4) {
  const testing::FamilyDir f = testing::open_family(variant);
  model::LoadOptions opt;
  if (nf4) opt.make_linear = model::nf4_linear_factory(true, at::kFloat);
  return DecoderModel::load(f.config, testing::family_weights(f), opt);
}

DecoderModel load_biased_llama() {
  return DecoderModel::load(testing::biased_llama_shape(), testing::biased_llama_weights());
}

// Every recompute mode (full, selective, none, the last layer kept whole), LoRA with dropout
// on every projection, against the generic layer, a model from `load` each (an adapter
// attaches once); prints the largest differences.
void compare_family(const std::string& name, const std::function<DecoderModel()>& load, Setup s) {
  for (const testing::RecomputeMode& mode : testing::kRecomputeModes) {
    SCOPED_TRACE(name + ", " + mode.name);
    s.recompute = mode.what;
    s.no_recompute_layers = mode.no_recompute_layers;
    DecoderModel m = load();
    EXPECT_EQ(fused_layer_gap(m.config()), "");
    const Measured e = compare(m, s);
    std::printf("  %s, %s: output %.2e, input grad %.2e, worst LoRA grad %.2e (relative to max |generic|)\n",
                name.c_str(), mode.name, e.y, e.dx, e.grad);
  }
}

Setup family_setup() {
  Setup s;
  s.dropout = 0.1;
  s.t = 12;  // above the windowed families' 5
  return s;
}

TEST(FusedLayerFamilies, Qwen2QkvBiases) {
  ASSERT_TRUE(load_family("qwen2", false).config().pieces.qkv_bias);
  compare_family("qwen2", [] { return load_family("qwen2", false); }, family_setup());
}

TEST(FusedLayerFamilies, Qwen2QkvBiasesOverNf4WithPadding) {
  auto s = family_setup();
  s.padded = true;
  compare_family("qwen2 nf4 padded", [] { return load_family("qwen2", true); }, s);
}

// head_dim · heads (128) != hidden (64): q_proj [128, 64], o_proj [64, 128].
TEST(FusedLayerFamilies, Qwen3QkNorms) {
  const DecoderConfig c = load_family("qwen3", false).config();
  ASSERT_TRUE(c.pieces.qk_norm);
  ASSERT_NE(c.num_attention_heads * c.head_dim, c.hidden_size);
  compare_family("qwen3", [] { return load_family("qwen3", false); }, family_setup());
}

// Windows of 5 over 12 tokens: the band mask.
TEST(FusedLayerFamilies, MistralSlidingWindow) {
  ASSERT_EQ(load_family("mistral", false).config().min_window(), 5);
  compare_family("mistral", [] { return load_family("mistral", false); }, family_setup());
}

// Layer 0 full, layers 1 and 2 windowed (max_window_layers 1), with q, k, v biases and yarn's
// attention factor in cos / sin; once causal only, once with a padding mask beside the band.
TEST(FusedLayerFamilies, Qwen2WindowOnSomeLayers) {
  const DecoderConfig c = load_family("qwen2_window", false).config();
  ASSERT_EQ(c.window_of(0), 0);
  ASSERT_EQ(c.window_of(1), 5);
  const auto load = [] { return load_family("qwen2_window", false); };
  compare_family("qwen2_window", load, family_setup());
  auto s = family_setup();
  s.padded = true;
  compare_family("qwen2_window padded", load, s);
}

TEST(FusedLayerFamilies, SmolLm2) {
  compare_family("smollm2", [] { return load_family("smollm2", false); }, family_setup());
}

TEST(FusedLayerFamilies, LlamaWithAttentionAndMlpBiases) {
  compare_family("llama attention_bias mlp_bias", load_biased_llama, family_setup());
  // LoRA on some projections of each merged GEMM: the bias with the base GEMM first.
  auto s = family_setup();
  s.targets = {"q_proj", "v_proj", "o_proj", "up_proj"};
  compare_family("llama biases, LoRA on q v o up", load_biased_llama, s);
}

// Phi-3: qkv_proj and gate_up_proj are the merged GEMMs themselves (Note [fused projections] in
// src/layer/fused_projections.h); once with LoRA on some projections only.
TEST(FusedLayerFamilies, Phi3FusedProjections) {
  ASSERT_TRUE(load_family("phi3", false).config().pieces.fused_projections);
  compare_family("phi3", [] { return load_family("phi3", false); }, family_setup());
  auto s = family_setup();
  s.targets = {"qkv_proj", "down_proj"};
  compare_family("phi3, LoRA on qkv down", [] { return load_family("phi3", true); }, s);
}

// Phi-4-mini's pieces: partial rotary (0.75 of each head turns) and LongRoPE, whose long factors
// the 12 tokens reach (original_max_position_embeddings 10); padded once.
TEST(FusedLayerFamilies, Phi3LongropeAndPartialRotary) {
  const DecoderConfig c = load_family("phi3_longrope", false).config();
  ASSERT_LT(c.rotary_dim(), c.head_dim);
  ASSERT_EQ(c.rope.type, RopeType::kLongrope);
  const auto load = [] { return load_family("phi3_longrope", false); };
  compare_family("phi3_longrope", load, family_setup());
  auto s = family_setup();
  s.padded = true;
  compare_family("phi3_longrope padded", load, s);
}

// Gemma 2: GeGLU, (1 + w) norms, the sandwich norms around attention and the MLP,
// query_pre_attn_scalar 24 against head_dim 16, attention soft-capping at 2 (most scores
// capped), windows of 5 on every other layer; once with a padding mask over NF4, once with LoRA
// on some projections (o_proj's, before the post-attention norm; none on down_proj).
TEST(FusedLayerFamilies, Gemma2) {
  const DecoderConfig c = load_family("gemma2", false).config();
  ASSERT_EQ(c.pieces.act, Activation::kGeluTanh);
  ASSERT_TRUE(c.pieces.norm_plus_one && c.pieces.sandwich_norms);
  ASSERT_FALSE(c.pieces.qk_norm);
  ASSERT_GT(c.query_pre_attn_scalar, 0);
  ASSERT_NE(c.query_pre_attn_scalar, static_cast<double>(c.head_dim));
  ASSERT_GT(c.attn_logit_softcapping, 0);
  ASSERT_EQ(c.window_of(0), 5);
  ASSERT_EQ(c.window_of(1), 0);
  compare_family("gemma2", [] { return load_family("gemma2", false); }, family_setup());
  auto s = family_setup();
  s.targets = {"q_proj", "v_proj", "o_proj", "up_proj"};
  compare_family("gemma2, LoRA on q v o up", [] { return load_family("gemma2", false); }, s);
}

TEST(FusedLayerFamilies, Gemma2OverNf4WithPadding) {
  auto s = family_setup();
  s.padded = true;
  compare_family("gemma2 nf4 padded", [] { return load_family("gemma2", true); }, s);
}

// Gemma 3: its (1 + w) q/k norms, the local RoPE base of its windowed layers (0 and 1; layer 2
// is global, with linear RoPE scaling), GeGLU, sandwich norms, query_pre_attn_scalar, one kv
// head; once with a padding mask over NF4.
TEST(FusedLayerFamilies, Gemma3) {
  const DecoderConfig c = load_family("gemma3", false).config();
  ASSERT_TRUE(c.pieces.qk_norm && c.pieces.norm_plus_one && c.pieces.sandwich_norms);
  ASSERT_GT(c.rope_local_theta, 0);
  ASSERT_NE(c.rope_local_theta, c.rope_theta);
  ASSERT_NE(c.query_pre_attn_scalar, static_cast<double>(c.head_dim));
  ASSERT_EQ(c.attn_logit_softcapping, 0);
  ASSERT_EQ(c.window_of(0), 5);
  ASSERT_EQ(c.window_of(2), 0);
  compare_family("gemma3", [] { return load_family("gemma3", false); }, family_setup());
  auto s = family_setup();
  s.padded = true;
  compare_family("gemma3 nf4 padded", [] { return load_family("gemma3", true); }, s);
}

// selective_layers: the last layer keeps its gate/up output, the ones below recompute it; the
// kept down_proj output of Note [sandwich norms] in both kinds of layer.
TEST(FusedLayerFamilies, Gemma2SelectiveInTheLastLayerOnly) {
  DecoderModel m = load_family("gemma2", true);
  auto s = family_setup();
  s.recompute = layer::FusedRecompute::kSelective;
  s.selective_layers = 1;
  const Measured e = compare(m, s);
  std::printf("  gemma2 nf4, selective in the last layer: output %.2e, input grad %.2e, worst LoRA grad %.2e\n", e.y,
              e.dx, e.grad);
}

// Note [offloaded checkpoints]: what a recomputed layer keeps (x, h1; gate/up when selective;
// Gemma's down_proj output) goes to its own host buffer and comes back for its backward; a layer
// kept whole keeps its own. The results are the same bits as without.
// `modes`: the recompute settings to compare, on one adapter (the dropout and targets of the first).
void expect_offload_changes_nothing(DecoderModel& m, const std::vector<Setup>& modes) {
  lora::LoraSettings ls;
  ls.r = 4;
  ls.alpha = 8;
  ls.dropout = modes.front().dropout;
  ls.target_modules = modes.front().targets;
  torch::manual_seed(1);
  lora::LoraAdapter adapter = lora::LoraAdapter::attach(m, ls);
  testing::give_lora_b_values(adapter);
  for (const Setup& s : modes) {
    auto offload = std::make_shared<layer::CheckpointOffload>(/*copy_on_cpu=*/true);
    const Result kept =
        run(m, adapter, layer::fused_layer_forward(m, s.recompute, s.selective_layers, s.no_recompute_layers), s);
    const Result moved = run(
        m, adapter, layer::fused_layer_forward(m, s.recompute, s.selective_layers, s.no_recompute_layers, offload), s);
    EXPECT_TRUE(at::equal(kept.y, moved.y));
    EXPECT_TRUE(at::equal(kept.dx, moved.dx));
    EXPECT_TRUE(at::equal(kept.after, moved.after));
    ASSERT_EQ(kept.grads.size(), moved.grads.size());
    for (size_t i = 0; i < kept.grads.size(); ++i) EXPECT_TRUE(at::equal(kept.grads[i], moved.grads[i])) << i;
    EXPECT_GT(offload->peak_host_bytes(), 0);
    EXPECT_EQ(offload->host_bytes(), 0);  // every layer's came back
  }
}

TEST(FusedLayer, OffloadedCheckpointsChangeNothing) {
  const DecoderConfig shape = testing::small_llama_shape();
  DecoderModel m = DecoderModel::load(shape, train::random_llama_weights(shape, 3, c10::kCPU), {});
  auto full = family_setup();  // dropout 0.1
  full.t = 7;
  auto selective = full;
  selective.recompute = layer::FusedRecompute::kSelective;
  selective.selective_layers = 1;
  selective.no_recompute_layers = 1;
  expect_offload_changes_nothing(m, {full, selective});
}

TEST(FusedLayerFamilies, Gemma2OffloadedCheckpointsChangeNothing) {
  DecoderModel m = load_family("gemma2", true);
  auto selective = family_setup();
  selective.recompute = layer::FusedRecompute::kSelective;
  expect_offload_changes_nothing(m, {family_setup(), selective});
}

}  // namespace
}  // namespace qlora
