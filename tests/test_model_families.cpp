// Every family of model/family.h against transformers + PEFT + bitsandbytes on tiny random
// models (golden files from scripts/golden/families.py under tests/data/families/): RoPE
// frequencies, per-layer windows, fp32 logits on padded and packed rows, the loss, NF4 bytes,
// a PEFT adapter's logits and every LoRA gradient, and `qlora merge` against merge_and_unload.
#include <gtest/gtest.h>
#include <ATen/ATen.h>

#include <cstdio>
#include <string>
#include <vector>

#include "qlora/io/model_dir.h"
#include "qlora/io/torch_io.h"
#include "qlora/lora/adapter_io.h"
#include "qlora/lora/lora.h"
#include "qlora/lora/merge.h"
#include "qlora/model/decoder.h"
#include "qlora/model/family.h"
#include "qlora/model/loss.h"
#include "qlora/model/nf4_linear.h"
#include "qlora/quant/nf4.h"
#include "qlora/common/text.h"
#include "support/tensor_checks.h"
#include "support/test_support.h"

namespace {

using namespace qlora;
using namespace qlora::model;

// fp32 logits vs transformers, relative to the largest |logit| (the 1e-4).
constexpr double kLogitRtol = 1e-4;
// Loss sums and LoRA gradients vs transformers / PEFT: relative (the 1e-4).
constexpr double kLossRtol = 1e-5;
constexpr double kGradRtol = 1e-4;
// A merged fp32 weight vs PEFT's merge_and_unload (W + s·B·A in fp32, other summation order).
constexpr double kMergeAtol = 1e-5;

const char* kVariants[] = {"qwen2",         "qwen2_window", "qwen3",  "mistral", "smollm2", "llama_linear",
                           "llama_dynamic", "gemma2",       "gemma3", "phi3",    "phi3_longrope"};

std::string dir_of(const std::string& v) { return qlora::testing::source_path("tests/data/families/" + v); }

DecoderModel load(const std::string& v, LoadOptions opt = {}) {
  const io::ModelDir dir = io::ModelDir::open(dir_of(v));
  const DecoderConfig cfg = read_decoder_config(dir.config_path());
  WeightSource src{dir.dir(), dir.tensor_names(), [&dir](const std::string& n) { return dir.tensor(n); }};
  return DecoderModel::load(cfg, src, opt);
}

std::map<std::string, at::Tensor> golden(const std::string& v, const std::string& file = "golden.safetensors") {
  return io::load_safetensors(dir_of(v) + "/" + file);
}

using qlora::testing::rel_err;

at::Tensor mean_loss(const DecoderModel& m, const at::Tensor& hidden, const at::Tensor& labels) {
  TokenLoss loss = chunked_cross_entropy(hidden.reshape({-1, hidden.size(-1)}), m.lm_head_weight(),
                                         shift_labels(labels).reshape({-1}), 16,
                                         m.config().final_logit_softcapping);
  return loss.sum / loss.count.to(at::kFloat);
}

TEST(ModelFamilies, ConfigRopeAndWindowsEqualTransformers) {
  for (const char* v : kVariants) {
    SCOPED_TRACE(v);
    const DecoderConfig c = read_decoder_config(dir_of(v) + "/config.json");
    EXPECT_TRUE(c.unread_keys.empty()) << join(c.unread_keys);
    auto g = golden(v);
    std::vector<int64_t> windows(static_cast<size_t>(c.num_hidden_layers));
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) windows[static_cast<size_t>(l)] = c.window_of(l);
    const at::Tensor want = g.at("layer_window");
    EXPECT_EQ(windows, std::vector<int64_t>(want.data_ptr<int64_t>(), want.data_ptr<int64_t>() + want.numel()));
    // The frequencies at load time, bit for bit; dynamic scaling's for the batch's length.
    EXPECT_TRUE(at::equal(rope_inv_freq(c), g.at("inv_freq_init"))) << rope_inv_freq(c) << g.at("inv_freq_init");
    const int64_t len = g.at("input_ids").size(1);
    const double err = (rope_inv_freq(c, len) - g.at("inv_freq")).abs().max().item<double>() /
                       g.at("inv_freq").abs().max().item<double>();
    EXPECT_LT(err, 1e-6) << rope_inv_freq(c, len) << g.at("inv_freq");
    EXPECT_NEAR(c.rope.attention_factor, g.at("attention_scaling").item<double>(), 1e-6);
    if (c.rope_local_theta > 0) {  // Gemma 3's local layers: their own base, unscaled
      DecoderConfig local = c;
      local.rope_theta = c.rope_local_theta;
      local.rope = RopeScaling{};
      EXPECT_TRUE(at::equal(rope_inv_freq(local), g.at("inv_freq_sliding"))) << rope_inv_freq(local);
    }
  }
}

TEST(ModelFamilies, LogitsAndLossEqualTransformersOnPaddedAndPackedRows) {
  for (const char* v : kVariants) {
    SCOPED_TRACE(v);
    DecoderModel m = load(v);
    auto g = golden(v);
    const at::Tensor mask = g.at("attention_mask");
    at::Tensor hidden = m.forward_hidden(g.at("input_ids"), padded_attention(mask));
    // Padding queries that see no key in a windowed layer differ by design (they see
    // themselves here, nothing in transformers); nothing reads them.
    const double padded = rel_err(m.logits(hidden), g.at("logits"), mask);
    EXPECT_LT(padded, kLogitRtol);
    TokenLoss loss = chunked_cross_entropy(hidden.reshape({-1, hidden.size(-1)}), m.lm_head_weight(),
                                           shift_labels(g.at("labels")).reshape({-1}), 16,
                                         m.config().final_logit_softcapping);
    EXPECT_NEAR(loss.sum.item<double>(), g.at("loss_sum").item<double>(), kLossRtol * g.at("loss_sum").item<double>());
    EXPECT_EQ(loss.count.item<int64_t>(), g.at("loss_count").item<int64_t>());

    AttentionInputs packed = packed_attention(g.at("packed_segment_ids"), g.at("packed_position_ids"));
    at::Tensor ph = m.forward_hidden(g.at("packed_input_ids"), packed);
    const double packed_err = rel_err(m.logits(ph), g.at("packed_logits"));
    EXPECT_LT(packed_err, kLogitRtol);
    TokenLoss pl = chunked_cross_entropy(ph.reshape({-1, ph.size(-1)}), m.lm_head_weight(),
                                         shift_labels(g.at("packed_labels")).reshape({-1}), 16,
                                         m.config().final_logit_softcapping);
    EXPECT_NEAR(pl.sum.item<double>(), g.at("packed_loss_sum").item<double>(),
                kLossRtol * g.at("packed_loss_sum").item<double>());
    std::printf("  %-14s logits rel err: padded %.2e, packed %.2e; loss %.6f\n", v, padded, packed_err,
                (loss.sum / loss.count.to(at::kFloat)).item<double>());
  }
}

// bitsandbytes' NF4 (blocksize 64, double quantization) of each family's weights, byte for
// byte, and the logits of the model whose projections went through it.
TEST(ModelFamilies, Nf4BytesAndLogitsEqualBitsandbytes) {
  for (const char* v : kVariants) {
    SCOPED_TRACE(v);
    auto weights = io::load_safetensors(dir_of(v) + "/model.safetensors");
    auto nf4 = golden(v, "nf4.safetensors");
    int checked = 0;  // the weights the golden holds (Phi-3's fused qkv_proj and gate_up_proj too)
    for (const auto& [key, value] : nf4) {
      if (!ends_with(key, ".packed")) continue;
      const std::string c = key.substr(0, key.size() - std::string(".packed").size());
      ++checked;
      const quant::Nf4Tensor q = quant::quantize_nf4(weights.at(c), /*double_quant=*/true);
      EXPECT_TRUE(at::equal(q.packed, nf4.at(c + ".packed"))) << c;
      EXPECT_TRUE(at::equal(q.absmax_q, nf4.at(c + ".absmax_q"))) << c;
      EXPECT_TRUE(at::equal(q.absmax2, nf4.at(c + ".absmax2"))) << c;
      EXPECT_EQ(q.offset, nf4.at(c + ".offset").item<float>()) << c;
    }
    EXPECT_GE(checked, 2);
    LoadOptions opt;
    opt.make_linear = nf4_linear_factory(true, at::kFloat);
    DecoderModel m = load(v, opt);
    auto g = golden(v);
    const at::Tensor mask = g.at("attention_mask");
    EXPECT_LT(rel_err(m.forward(g.at("input_ids"), padded_attention(mask)), g.at("logits_nf4"), mask), kLogitRtol);
  }
}

// PEFT's adapter loads with PEFT's logits, and one backward gives PEFT's gradient for every
// LoRA weight.
TEST(ModelFamilies, PeftAdapterLogitsAndLoraGradientsEqualPeft) {
  for (const char* v : kVariants) {
    SCOPED_TRACE(v);
    DecoderModel m = load(v);
    lora::LoraAdapter a = lora::load_adapter(m, dir_of(v) + "/lora/adapter");
    auto g = golden(v);
    auto lg = golden(v, "lora/golden.safetensors");
    const at::Tensor mask = g.at("attention_mask");
    at::Tensor hidden = m.forward_hidden(g.at("input_ids"), padded_attention(mask));
    const double logit_err = rel_err(m.logits(hidden), lg.at("lora_logits"), mask);
    EXPECT_LT(logit_err, kLogitRtol);
    at::Tensor loss = mean_loss(m, hidden, g.at("labels"));
    EXPECT_NEAR(loss.item<double>(), lg.at("lora_loss").item<double>(), kLossRtol * lg.at("lora_loss").item<double>());
    loss.backward();
    double worst = 0;
    size_t checked = 0;
    for (const auto& [key, param] : a.named_parameters()) {
      auto it = lg.find("grad." + key);
      ASSERT_NE(it, lg.end()) << key;
      ASSERT_TRUE(param.grad().defined()) << key;
      const double rel = rel_err(param.grad(), it->second);
      EXPECT_LT(rel, kGradRtol) << key;
      worst = std::max(worst, rel);
      ++checked;
    }
    size_t golden_grads = 0;
    for (const auto& kv : lg) golden_grads += kv.first.rfind("grad.", 0) == 0;
    EXPECT_EQ(checked, golden_grads);
    std::printf("  %-14s %zu LoRA gradients, worst rel err %.2e; logits %.2e\n", v, checked, worst, logit_err);
  }
}

// `qlora merge` of PEFT's adapter into the fp32 base equals merge_and_unload, biases kept.
TEST(ModelFamilies, MergeEqualsPeftMergeAndUnload) {
  for (const char* v : kVariants) {
    SCOPED_TRACE(v);
    const std::string out = qlora::testing::make_temp_dir(std::string("merge_") + v);
    lora::MergeOptions o;
    o.adapter_dir = dir_of(v) + "/lora/adapter";
    o.base_dir = dir_of(v);
    o.out_dir = out + "/merged";
    o.dtype = "fp32";
    lora::merge_adapter(o);
    auto merged = io::load_safetensors(out + "/merged/model.safetensors");
    auto base = io::load_safetensors(dir_of(v) + "/model.safetensors");
    auto want = golden(v, "lora/merged.safetensors");
    size_t compared = 0;
    for (const auto& [key, t] : want) {
      const std::string name = key.substr(std::string("merged.").size());
      ASSERT_TRUE(merged.count(name)) << name;
      EXPECT_LT((merged.at(name) - t).abs().max().item<double>(), kMergeAtol) << name;
      ++compared;
    }
    for (const auto& [name, t] : base) {  // everything the merge did not change, unchanged
      if (want.count("merged." + name)) continue;
      ASSERT_TRUE(merged.count(name)) << name;
      EXPECT_TRUE(at::equal(merged.at(name), t)) << name;
    }
    EXPECT_GT(compared, 0u);
  }
}

}  // namespace
