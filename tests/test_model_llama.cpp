// The Llama decoder and the chunked cross-entropy against transformers 5.17
// (golden files from scripts/golden/model.py under tests/data/model/).
#include <gtest/gtest.h>
#include <ATen/ATen.h>
#include <torch/cuda.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <limits>
#include <map>
#include <string>

#include "qlora/common/errors.h"
#include "qlora/io/model_dir.h"
#include "qlora/io/torch_io.h"
#include "qlora/model/decoder.h"
#include "qlora/model/decoder_config.h"
#include "qlora/model/family.h"
#include "qlora/model/loss.h"
#include "qlora/model/nf4_linear.h"
#include "qlora/lora/lora.h"
#include "qlora/lora/adapter_io.h"

namespace {

using namespace qlora;
using namespace qlora::model;

// fp32 logits vs transformers: within 1e-4. Measured max error 0 (same ops, same order;
// 1.9e-6 for packed rows, whose SDPA shapes differ); logits are O(1-10).
constexpr double kLogitAtol = 1e-4;
// Loss sums vs fp32 references: relative, a few ulps of accumulated fp32 error.
constexpr double kLossRtol = 1e-5;
// Chunked vs dense cross-entropy gradients: relative to the largest element.
constexpr double kGradRtol = 1e-5;
// bf16 / fp16 forward vs fp32 transformers: relative to the largest |logit|.
// bf16 keeps 8 mantissa bits (2^-8 = 0.4%); errors compound over 2 layers and
// the lm_head product. Measured 1.8-2.1% for bf16, 0.21% for fp16.
constexpr double kBf16Rtol = 0.05;
constexpr double kFp16Rtol = 0.01;
// NF4 base (our quantize + linear4bit, fp32 compute) vs transformers with
// bitsandbytes' NF4 round trip of each projection: the same dequantized weights
// (the quant tests check them bit for bit), so the fp32 bound applies.
constexpr double kNf4LogitAtol = 1e-4;
// bf16 / fp16 forward vs transformers run in the same dtype: relative to the
// largest |logit|. Same ops in the same order give near-identical roundings;
// the bound allows a few ulps of the dtype at the largest logit (measured: 0,
// bit-identical, on the machine that wrote the golden files; another CPU may
// pick other SIMD kernels).
constexpr double kBf16SameRtol = 0.02;
constexpr double kFp16SameRtol = 0.003;

const char* kVariants[] = {"llama3_tied", "llama3_untied", "llama2"};

std::string data_dir(const std::string& v) { return std::string(QLORA_SOURCE_DIR) + "/tests/data/model/" + v; }

// Through the io module's ModelDir, as the trainer loads a model directory.
DecoderModel load_variant(const std::string& v, at::ScalarType dtype = at::kFloat) {
  const io::ModelDir dir = io::ModelDir::open(data_dir(v));
  const DecoderConfig cfg = read_decoder_config(dir.config_path());
  WeightSource src{dir.dir(), dir.tensor_names(), [&dir](const std::string& n) { return dir.tensor(n); }};
  LoadOptions opt;
  opt.dtype = dtype;
  return DecoderModel::load(cfg, src, opt);
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

TEST(LlamaRope, InvFreqEqualsTransformersBitForBit) {
  for (const char* v : kVariants) {
    const DecoderConfig cfg = read_decoder_config(data_dir(v) + "/config.json");
    auto golden = io::load_safetensors(data_dir(v) + "/golden.safetensors");
    at::Tensor ours = rope_inv_freq(cfg);
    ASSERT_EQ(ours.scalar_type(), at::kFloat);
    EXPECT_TRUE(at::equal(ours, golden.at("inv_freq"))) << v << ": " << ours << " vs " << golden.at("inv_freq");
  }
}

TEST(LlamaForward, Fp32LogitsMatchTransformersWithPadding) {
  for (const char* v : kVariants) {
    DecoderModel m = load_variant(v);
    auto g = io::load_safetensors(data_dir(v) + "/golden.safetensors");
    at::Tensor logits = m.forward(g.at("input_ids"), padded_attention(g.at("attention_mask")));
    ASSERT_EQ(logits.sizes(), g.at("logits").sizes());
    const double err = max_abs_diff(logits, g.at("logits"));
    std::printf("  %-14s fp32 logits max |err| = %.3e (|logits| max %.2f)\n", v, err,
                g.at("logits").abs().max().item<double>());
    EXPECT_LT(err, kLogitAtol) << v;
  }
}

TEST(LlamaForward, CausalFastPathEqualsMaskPath) {
  DecoderModel m = load_variant("llama3_untied");
  at::Tensor ids = at::randint(3, 256, {2, 9}, at::TensorOptions().dtype(at::kLong));
  at::Tensor a = m.forward(ids, causal_attention(2, 9, ids.device()));
  at::Tensor b = m.forward(ids, padded_attention(at::ones({2, 9}, at::kLong)));
  EXPECT_LT(max_abs_diff(a, b), 1e-5);
}

TEST(LlamaForward, LeftPaddingAndEmptyRowsStayFinite) {
  DecoderModel m = load_variant("llama3_untied");
  at::Tensor ids = at::randint(3, 256, {3, 6}, at::TensorOptions().dtype(at::kLong));
  at::Tensor mask = torch::tensor({1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0}, at::kLong).view({3, 6});
  const AttentionInputs attn = padded_attention(mask);
  // Every query sees at least one key (CPU SDPA happens to return finite
  // values for a blind row; other kernels return NaN).
  EXPECT_TRUE(attn.mask.any(-1).all().item<bool>());
  at::Tensor logits = m.forward(ids, attn);
  EXPECT_TRUE(at::isfinite(logits).all().item<bool>());
  // The real tokens of the left-padded row see only real tokens: row 0's
  // logits are untouched by the fix-up.
  at::Tensor alone = m.forward(ids.narrow(0, 0, 1), causal_attention(1, 6, ids.device()));
  EXPECT_LT(max_abs_diff(logits[0], alone[0]), 1e-5);
}

TEST(LlamaForward, PackedRowEqualsSeparateExamples) {
  // The golden batch's rows, unpadded and packed into one row: each example
  // must see only itself, and positions restart at 0.
  for (const char* v : {"llama3_untied", "llama2"}) {
    DecoderModel m = load_variant(v);
    auto g = io::load_safetensors(data_dir(v) + "/golden.safetensors");
    at::Tensor mask = g.at("attention_mask");
    std::vector<at::Tensor> ids, seg, pos;
    std::vector<int64_t> lengths;
    for (int64_t b = 0; b < mask.size(0); ++b) {
      const int64_t n = mask[b].sum().item<int64_t>();
      lengths.push_back(n);
      ids.push_back(g.at("input_ids")[b].narrow(0, 0, n));
      seg.push_back(at::full({n}, b, at::kLong));
      pos.push_back(at::arange(n, at::kLong));
    }
    // Two padding tokens at the end, in their own segment.
    ids.push_back(at::zeros({2}, at::kLong));
    seg.push_back(at::full({2}, -1, at::kLong));
    pos.push_back(at::arange(2, at::kLong));
    at::Tensor logits = m.forward(at::cat(ids).unsqueeze(0),
                                  packed_attention(at::cat(seg).unsqueeze(0), at::cat(pos).unsqueeze(0)));
    int64_t offset = 0;
    double err = 0;
    for (size_t b = 0; b < lengths.size(); ++b) {
      at::Tensor ours = logits[0].narrow(0, offset, lengths[b]);
      at::Tensor ref = g.at("logits")[static_cast<int64_t>(b)].narrow(0, 0, lengths[b]);
      err = std::max(err, max_abs_diff(ours, ref));
      offset += lengths[b];
    }
    std::printf("  %-14s packed fp32 logits max |err| = %.3e\n", v, err);
    EXPECT_LT(err, kLogitAtol) << v;
  }
}

TEST(LlamaForward, HalfPrecisionForwardMatchesTransformers) {
  for (const char* v : kVariants) {
    auto g = io::load_safetensors(data_dir(v) + "/golden.safetensors");
    const at::Tensor& ref32 = g.at("logits");
    const double scale = ref32.abs().max().item<double>();
    struct Case {
      at::ScalarType dtype;
      const char* key;
      double vs_fp32, vs_same;
    };
    for (const Case& c : {Case{at::kBFloat16, "logits_bf16", kBf16Rtol, kBf16SameRtol},
                          Case{at::kHalf, "logits_fp16", kFp16Rtol, kFp16SameRtol}}) {
      DecoderModel m = load_variant(v, c.dtype);
      at::Tensor logits = m.forward(g.at("input_ids"), padded_attention(g.at("attention_mask")));
      ASSERT_EQ(logits.scalar_type(), c.dtype);
      const double err32 = max_abs_diff(logits, ref32);
      const double err = max_abs_diff(logits, g.at(c.key));
      std::printf("  %-14s %-8s logits max |err| vs transformers %s: %.3e (%.3f%% of max |logit|), vs fp32: %.3e (%.2f%%)\n",
                  v, c10::toString(c.dtype), c10::toString(c.dtype), err, 100 * err / scale, err32, 100 * err32 / scale);
      EXPECT_LT(err, c.vs_same * scale) << v << " " << c10::toString(c.dtype);
      EXPECT_LT(err32, c.vs_fp32 * scale) << v << " " << c10::toString(c.dtype);
    }
  }
}

TEST(LlamaForward, Nf4BaseMatchesBitsandbytesDequantizedModel) {
  const io::ModelDir dir = io::ModelDir::open(data_dir("llama3_untied"));
  WeightSource src{dir.dir(), dir.tensor_names(), [&dir](const std::string& n) { return dir.tensor(n); }};
  LoadOptions opt;
  opt.make_linear = nf4_linear_factory(/*double_quant=*/true, at::kFloat);
  DecoderModel m = DecoderModel::load(read_decoder_config(dir.config_path()), src, opt);
  ASSERT_EQ(std::dynamic_pointer_cast<FrozenLinear>(m.linear("model.layers.0.mlp.down_proj"))->kind(), "nf4");
  auto g = io::load_safetensors(data_dir("llama3_untied") + "/golden.safetensors");
  at::Tensor logits = m.forward(g.at("input_ids"), padded_attention(g.at("attention_mask")));
  const double err = max_abs_diff(logits, g.at("logits_nf4"));
  std::printf("  llama3_untied  NF4 logits max |err| vs transformers + bitsandbytes = %.3e (NF4 moved logits by %.3f)\n",
              err, max_abs_diff(g.at("logits_nf4"), g.at("logits")));
  EXPECT_LT(err, kNf4LogitAtol);
}

TEST(LlamaLoss, ChunkedLossEqualsTransformers) {
  for (const char* v : kVariants) {
    DecoderModel m = load_variant(v);
    auto g = io::load_safetensors(data_dir(v) + "/golden.safetensors");
    at::Tensor hidden = m.forward_hidden(g.at("input_ids"), padded_attention(g.at("attention_mask")));
    at::Tensor labels = shift_labels(g.at("labels")).reshape({-1});
    TokenLoss loss = chunked_cross_entropy(hidden.reshape({-1, hidden.size(-1)}), m.lm_head_weight(), labels, 5);
    const double sum = loss.sum.item<double>(), ref = g.at("loss_sum").item<double>();
    const double mean = sum / static_cast<double>(loss.count.item<int64_t>());
    std::printf("  %-14s loss sum rel err %.3e, mean %.6f vs transformers %.6f\n", v, std::abs(sum - ref) / ref, mean,
                g.at("loss").item<double>());
    EXPECT_EQ(loss.count.item<int64_t>(), g.at("loss_count").item<int64_t>());
    EXPECT_NEAR(sum, ref, kLossRtol * ref) << v;
    EXPECT_NEAR(mean, g.at("loss").item<double>(), kLossRtol * g.at("loss").item<double>()) << v;
  }
}

TEST(LlamaLoss, ChunkedEqualsDenseInValueAndGradients) {
  torch::manual_seed(3);
  const int64_t n = 37, h = 24, vocab = 301;
  at::Tensor hidden0 = torch::randn({n, h});
  at::Tensor weight0 = torch::randn({vocab, h}) * 0.5;
  at::Tensor labels = torch::randint(0, vocab, {n}, at::kLong);
  labels.index_put_({torch::randint(0, 2, {n}, at::kLong).to(at::kBool)}, kIgnoreIndex);

  at::Tensor hd = hidden0.clone().requires_grad_(true), wd = weight0.clone().requires_grad_(true);
  TokenLoss dense = dense_cross_entropy(hd, wd, labels);
  (dense.sum * 0.7).backward();
  for (int64_t chunk : {1, 7, 36, 37, 1000}) {
    at::Tensor hc = hidden0.clone().requires_grad_(true), wc = weight0.clone().requires_grad_(true);
    TokenLoss ours = chunked_cross_entropy(hc, wc, labels, chunk);
    (ours.sum * 0.7).backward();
    EXPECT_EQ(ours.count.item<int64_t>(), dense.count.item<int64_t>());
    const double ref = dense.sum.item<double>();
    EXPECT_NEAR(ours.sum.item<double>(), ref, kLossRtol * std::abs(ref)) << "chunk " << chunk;
    const double gh = max_abs_diff(hc.grad(), hd.grad()) / hd.grad().abs().max().item<double>();
    const double gw = max_abs_diff(wc.grad(), wd.grad()) / wd.grad().abs().max().item<double>();
    EXPECT_LT(gh, kGradRtol) << "chunk " << chunk;
    EXPECT_LT(gw, kGradRtol) << "chunk " << chunk;
    if (chunk == 7) std::printf("  chunk 7: grad hidden rel err %.3e, grad weight rel err %.3e\n", gh, gw);
  }
  // A frozen lm_head: only the hidden gradient is formed.
  at::Tensor hc = hidden0.clone().requires_grad_(true);
  chunked_cross_entropy(hc, weight0, labels, 8).sum.backward();
  EXPECT_LT(max_abs_diff(hc.grad() * 0.7, hd.grad()), 1e-5);
}

TEST(LlamaLoss, RejectsLabelsOutsideTheVocabulary) {
  at::Tensor hidden = torch::randn({4, 8}), weight = torch::randn({10, 8});
  at::Tensor labels = torch::tensor({1, 2, 10, -100}, at::kLong);
  EXPECT_THROW(chunked_cross_entropy(hidden, weight, labels, 2), c10::Error);
}

TEST(LlamaLoad, ListsMissingUnexpectedAndMisshapedWeights) {
  const std::string dir = data_dir("llama3_untied");
  const DecoderConfig cfg = read_decoder_config(dir + "/config.json");
  auto weights = io::load_safetensors(dir + "/model.safetensors");

  auto expect_error = [&](std::map<std::string, at::Tensor> w, std::vector<std::string> needles) {
    try {
      DecoderModel::load(cfg, weights_from_map(std::move(w), "x/model.safetensors"));
      ADD_FAILURE() << "no error";
    } catch (const InputError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("x/model.safetensors"), std::string::npos) << msg;
      for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << n << " not in: " << msg;
    }
  };
  {
    auto w = weights;
    w.erase("model.layers.1.mlp.up_proj.weight");
    w.erase("lm_head.weight");
    w["model.layers.2.mlp.up_proj.weight"] = at::zeros({1});
    expect_error(w, {"missing", "model.layers.1.mlp.up_proj.weight [128, 64]", "lm_head.weight",
                     "unexpected: model.layers.2.mlp.up_proj.weight"});
  }
  {
    auto w = weights;
    w["model.layers.0.self_attn.k_proj.weight"] = at::zeros({64, 64});
    expect_error(w, {"model.layers.0.self_attn.k_proj.weight is [64, 64], expected [32, 64]"});
  }
  {
    auto w = weights;
    w["model.norm.weight"] = at::zeros({64}, at::kLong);
    expect_error(w, {"model.norm.weight has dtype Long"});
  }
}

// Note [non-finite base weights]: NaN / inf anywhere in the base is refused with the file, the
// tensor and the count, whether the weight is quantized (counted by quantize_nf4) or kept dense
// (one reduction); a value fine in the file but beyond fp16 is told apart.
TEST(LlamaLoad, RefusesNonFiniteWeightsNamingFileTensorAndCount) {
  const std::string dir = data_dir("llama3_untied");
  const DecoderConfig cfg = read_decoder_config(dir + "/config.json");
  const auto weights = io::load_safetensors(dir + "/model.safetensors");
  LoadOptions nf4;
  nf4.make_linear = nf4_linear_factory(/*double_quant=*/true, at::kFloat);
  LoadOptions half;
  half.dtype = at::kHalf;
  struct Case {
    const char* tensor;
    std::vector<float> values;  // written at elements 0, 1, ...
    const LoadOptions* options;
    std::string expect;
  };
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const std::vector<Case> cases = {
      {"model.layers.1.mlp.down_proj.weight", {nan, 1, inf}, &nf4, "holds 2 non-finite values (NaN or inf)"},
      {"model.layers.0.self_attn.q_proj.weight", {-inf}, nullptr, "holds 1 non-finite value (NaN or inf)"},
      {"model.layers.1.post_attention_layernorm.weight", {inf}, &nf4, "holds 1 non-finite value"},
      {"model.embed_tokens.weight", {nan, nan}, &nf4, "holds 2 non-finite values"},
      {"lm_head.weight", {nan}, &nf4, "holds 1 non-finite value"},
      {"model.norm.weight", {1e5f, -7e4f}, &half,
       "has 2 value(s) beyond the range of float16 (largest magnitude 100000)"},
      {"model.layers.0.mlp.up_proj.weight", {1e5f}, &half, "beyond the range of float16"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.tensor);
    auto w = weights;
    at::Tensor t = w.at(c.tensor).clone();
    for (size_t i = 0; i < c.values.size(); ++i) t.view(-1)[static_cast<int64_t>(i)] = c.values[i];
    w[c.tensor] = t;
    try {
      const LoadOptions options = c.options ? *c.options : LoadOptions{};
      DecoderModel::load(cfg, weights_from_map(std::move(w), "x/model.safetensors"), options);
      ADD_FAILURE() << "loaded without an error";
    } catch (const InputError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("x/model.safetensors: tensor \"" + std::string(c.tensor) + "\""), std::string::npos) << msg;
      EXPECT_NE(msg.find(c.expect), std::string::npos) << "expected \"" << c.expect << "\" in: " << msg;
    }
  }
  // Finite weights whose sum overflows fp32 are fine (the sum is a filter, the count decides).
  auto w = weights;
  w["model.norm.weight"] = at::full({64}, 3e37f);
  EXPECT_NO_THROW(DecoderModel::load(cfg, weights_from_map(std::move(w), "x/model.safetensors")));
}

TEST(LlamaLoad, TiedModelSharesTheEmbeddingAndSlotsAreNamed) {
  DecoderModel m = load_variant("llama3_tied");
  EXPECT_TRUE(m.lm_head_weight().is_same(m.embedding_weight()));
  const auto names = m.linear_names();
  ASSERT_EQ(names.size(), 14u);
  EXPECT_EQ(names[0], "model.layers.0.self_attn.q_proj");
  EXPECT_EQ(names[13], "model.layers.1.mlp.down_proj");
  EXPECT_EQ(m.linear("model.layers.1.self_attn.k_proj")->out_features(), 32);
  EXPECT_FALSE(m.has_linear("lm_head"));
  EXPECT_THROW(m.linear("model.layers.2.self_attn.q_proj"), std::out_of_range);
}

}  // namespace
