// model/family: each family's config.json read key by key with its config class's defaults,
// the layer pieces and windows it implies, the keys reported as unread, and the presets'
// parameter counts against transformers + PEFT (scripts/golden/preset_params.py).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <set>

#include "qlora/config/config.h"
#include "qlora/model/decoder_config.h"
#include "qlora/model/decoder.h"
#include "qlora/model/family.h"
#include "qlora/plan/plan.h"
#include "support/test_support.h"

namespace qlora {
namespace {

using testing::make_temp_dir;
using testing::write_file;

DecoderConfig read_json(const nlohmann::json& j) {
  return read_decoder_config(write_file(make_temp_dir("family"), "config.json", j.dump()));
}

nlohmann::json small(const std::string& type) {
  return {{"model_type", type},         {"vocab_size", 256},        {"hidden_size", 64},
          {"intermediate_size", 128},   {"num_hidden_layers", 3},   {"num_attention_heads", 4},
          {"num_key_value_heads", 2}};
}

TEST(ModelFamily, DefaultsFollowEachConfigClass) {
  // Qwen3Config: head_dim 128 and 32 kv heads when absent; q/k norms; no biases.
  DecoderConfig q3 = read_json(small("qwen3"));
  EXPECT_EQ(q3.head_dim, 128);
  EXPECT_TRUE(q3.pieces.qk_norm);
  EXPECT_FALSE(q3.pieces.qkv_bias);
  EXPECT_TRUE(q3.layer_window.empty());
  // Qwen2: q, k, v biases, o none; head_dim hidden / heads.
  DecoderConfig q2 = read_json(small("qwen2"));
  EXPECT_EQ(q2.head_dim, 16);
  EXPECT_TRUE(q2.pieces.qkv_bias);
  EXPECT_FALSE(q2.pieces.o_bias);
  EXPECT_FALSE(q2.pieces.qk_norm);
  // MistralConfig: an absent sliding_window is 4096 on every layer; null is none.
  nlohmann::json m = small("mistral");
  m["num_key_value_heads"] = 2;
  EXPECT_EQ(read_json(m).layer_window, (std::vector<int64_t>{4096, 4096, 4096}));
  m["sliding_window"] = nullptr;
  EXPECT_TRUE(read_json(m).layer_window.empty());
  // Llama: attention_bias puts a bias on q, k, v and o; mlp_bias on the MLP.
  nlohmann::json l = small("llama");
  l["attention_bias"] = true;
  l["mlp_bias"] = true;
  const DecoderConfig llama = read_json(l);
  EXPECT_TRUE(llama.pieces.qkv_bias && llama.pieces.o_bias && llama.pieces.mlp_bias);
  EXPECT_EQ(total_params(llama) - total_params(read_json(small("llama"))),
            3 * (64 + 32 + 32 + 64 + 128 + 128 + 64));  // q [64], k v [32] (2 kv heads), o, gate, up, down
}

// Gemma2Config / Gemma3TextConfig defaults: GeGLU, (1 + w) sandwich norms, the embedding scale,
// query_pre_attn_scalar 256, Gemma 2's soft caps 50 / 30 and alternating windows, Gemma 3's q/k
// norms, five local layers to a global one and the local RoPE base 10000 (global 1e6).
TEST(ModelFamily, GemmaDefaultsFollowEachConfigClass) {
  nlohmann::json g2 = small("gemma2");
  g2["num_hidden_layers"] = 4;
  const DecoderConfig a = read_json(g2);
  EXPECT_EQ(a.head_dim, 256);
  EXPECT_EQ(a.pieces.act, Activation::kGeluTanh);
  EXPECT_TRUE(a.pieces.norm_plus_one && a.pieces.sandwich_norms && a.scale_embeddings);
  EXPECT_FALSE(a.pieces.qk_norm);
  EXPECT_EQ(a.query_pre_attn_scalar, 256);
  EXPECT_EQ(a.attn_logit_softcapping, 50);
  EXPECT_EQ(a.final_logit_softcapping, 30);
  EXPECT_EQ(a.layer_window, (std::vector<int64_t>{4096, 0, 4096, 0}));
  EXPECT_EQ(a.rope_theta, 10000);
  EXPECT_EQ(a.rope_local_theta, 0);
  EXPECT_EQ(fused_layer_gap(a), "");  // the fused layer has every Gemma piece
  g2["attn_logit_softcapping"] = nullptr;  // null: no cap
  EXPECT_EQ(read_json(g2).attn_logit_softcapping, 0);

  nlohmann::json g3 = small("gemma3_text");
  g3["num_hidden_layers"] = 7;
  const DecoderConfig b = read_json(g3);
  EXPECT_TRUE(b.pieces.qk_norm);
  EXPECT_EQ(b.attn_logit_softcapping, 0);
  EXPECT_EQ(b.final_logit_softcapping, 0);
  EXPECT_EQ(b.layer_window, (std::vector<int64_t>{4096, 4096, 4096, 4096, 4096, 0, 4096}));
  EXPECT_EQ(b.rope_theta, 1000000);
  EXPECT_EQ(b.rope_local_theta, 10000);
  // transformers 5 spells the two RoPEs per layer type.
  g3["rope_parameters"] = {{"full_attention", {{"rope_type", "linear"}, {"factor", 8.0}, {"rope_theta", 1e6}}},
                           {"sliding_attention", {{"rope_type", "default"}, {"rope_theta", 10000.0}}}};
  const DecoderConfig c = read_json(g3);
  EXPECT_EQ(c.rope.type, RopeType::kLinear);
  EXPECT_EQ(c.rope.factor, 8.0);
  EXPECT_EQ(c.rope_local_theta, 10000);
  // Four norms a layer, and Gemma 3's q/k norms over head_dim.
  std::set<std::string> names;
  for (const auto& [name, shape] : model::decoder_weight_shapes(b)) names.insert(name);
  for (const char* n : {"model.layers.0.pre_feedforward_layernorm.weight", "model.layers.0.post_feedforward_layernorm.weight",
                        "model.layers.0.self_attn.q_norm.weight"})
    EXPECT_TRUE(names.count(n)) << n;
}

TEST(ModelFamily, GemmaRefusesWhatItDoesNotCompute) {
  nlohmann::json g = small("gemma2");
  g["hidden_activation"] = "gelu";
  EXPECT_NE(testing::error_of([&] { read_json(g); }).find("\"hidden_activation\""), std::string::npos);
  g = small("gemma3_text");
  g["use_bidirectional_attention"] = true;
  EXPECT_NE(testing::error_of([&] { read_json(g); }).find("use_bidirectional_attention"), std::string::npos);
  g = small("gemma3_text");
  g["rope_parameters"] = {{"full_attention", {{"rope_type", "default"}, {"rope_theta", 1e6}}},
                          {"sliding_attention", {{"rope_type", "linear"}, {"factor", 2.0}, {"rope_theta", 1e4}}}};
  EXPECT_NE(testing::error_of([&] { read_json(g); }).find("sliding_attention"), std::string::npos);
  g = small("gemma3");  // the multimodal checkpoint keeps its text model's keys in text_config
  EXPECT_NE(testing::error_of([&] { read_json(g); }).find("\"text_config\": missing"), std::string::npos);
}

// Phi3Config: q|k|v and gate|up fused (what PEFT targets), partial rotary, LongRoPE with the
// top-level original_max_position_embeddings, dropout refused; q_proj is not a module there.
TEST(ModelFamily, Phi3FusesProjectionsAndReadsLongRope) {
  nlohmann::json p = small("phi3");
  p["partial_rotary_factor"] = 0.75;
  p["max_position_embeddings"] = 131072;
  p["original_max_position_embeddings"] = 4096;
  p["rope_scaling"] = {{"type", "longrope"},
                       {"short_factor", std::vector<double>(6, 1.0)},
                       {"long_factor", std::vector<double>(6, 2.0)}};
  const DecoderConfig c = read_json(p);
  EXPECT_TRUE(c.pieces.fused_projections);
  EXPECT_EQ(c.rotary_dim(), 12);
  EXPECT_EQ(c.rope.type, RopeType::kLongrope);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 4096);
  EXPECT_NEAR(c.rope.attention_factor, std::sqrt(1 + std::log(32.0) / std::log(4096.0)), 1e-12);
  EXPECT_EQ(projection_names(c), (std::vector<std::string>{"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}));
  EXPECT_EQ(decoder_linear_shapes(c)[0].out_features, 64 + 2 * 32);
  EXPECT_EQ(decoder_linear_shapes(c)[2].out_features, 2 * 128);
  EXPECT_EQ(plan::resolve_lora_targets({"all-linear"}, c), projection_names(c));
  const std::string msg = testing::error_of([&] { plan::resolve_lora_targets({"q_proj", "o_proj"}, c); });
  EXPECT_NE(msg.find("qkv_proj"), std::string::npos) << msg;
  // The factor lists must cover half the rotary dims; dropout must be off.
  p["rope_scaling"]["long_factor"] = std::vector<double>(8, 2.0);
  EXPECT_NE(testing::error_of([&] { read_json(p); }).find("long_factor"), std::string::npos);
  nlohmann::json d = small("phi3");
  d["resid_pdrop"] = 0.1;
  EXPECT_NE(testing::error_of([&] { read_json(d); }).find("resid_pdrop"), std::string::npos);
  // Other families still rotate the whole head.
  nlohmann::json l = small("llama");
  l["partial_rotary_factor"] = 0.5;
  EXPECT_NE(testing::error_of([&] { read_json(l); }).find("partial_rotary_factor"), std::string::npos);
}

// Qwen2/Qwen3: the window applies only with use_sliding_window, to layers >= max_window_layers
// or to those layer_types calls sliding (transformers' config classes).
TEST(ModelFamily, QwenWindowsFollowMaxWindowLayersAndLayerTypes) {
  nlohmann::json q = small("qwen2");
  q["sliding_window"] = 5;
  q["max_window_layers"] = 1;
  EXPECT_TRUE(read_json(q).layer_window.empty());  // use_sliding_window false
  q["use_sliding_window"] = true;
  EXPECT_EQ(read_json(q).layer_window, (std::vector<int64_t>{0, 5, 5}));
  q["layer_types"] = {"sliding_attention", "full_attention", "sliding_attention"};
  EXPECT_EQ(read_json(q).layer_window, (std::vector<int64_t>{5, 0, 5}));
  EXPECT_EQ(read_json(q).min_window(), 5);
}

TEST(ModelFamily, RopeScalingTypes) {
  nlohmann::json l = small("llama");
  l["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 2.0}};
  EXPECT_EQ(read_json(l).rope.type, RopeType::kLinear);
  l["rope_scaling"] = {{"type", "dynamic"}, {"factor", 2.0}};
  EXPECT_EQ(read_json(l).rope.type, RopeType::kDynamic);
  // Qwen2.5's long-context yarn: attention factor 0.1 ln(4) + 1.
  nlohmann::json q = small("qwen2");
  q["rope_scaling"] = {{"type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 32768}};
  const DecoderConfig y = read_json(q);
  EXPECT_EQ(y.rope.type, RopeType::kYarn);
  EXPECT_DOUBLE_EQ(y.rope.attention_factor, 0.1 * std::log(4.0) + 1.0);
  EXPECT_EQ(y.rope.original_max_position_embeddings, 32768);
}

// Keys nobody reads are listed (and logged); bookkeeping keys are not.
TEST(ModelFamily, UnreadKeysAreReported) {
  nlohmann::json l = small("llama");
  l["use_cache"] = true;
  l["transformers_version"] = "4.40.1";
  l["initializer_range"] = 0.02;
  l["my_custom_scaling"] = 3;
  l["attention_bias"] = false;
  EXPECT_EQ(read_json(l).unread_keys, (std::vector<std::string>{"my_custom_scaling"}));
  nlohmann::json q = small("qwen2");
  q["attention_bias"] = true;  // Qwen2Attention never reads it
  EXPECT_EQ(read_json(q).unread_keys, (std::vector<std::string>{"attention_bias"}));
}

TEST(ModelFamily, UnknownModelTypeNamesTheSupportedOnes) {
  nlohmann::json g = small("phimoe");
  try {
    read_json(g);
    FAIL() << "phimoe was accepted";
  } catch (const InputError& e) {
    const std::string msg = e.what();
    for (const Family& f : families()) EXPECT_NE(msg.find(f.model_type + " ("), std::string::npos) << msg;
  }
}

// Every preset: all parameters as transformers counts them, and LoRA r 16 on q,k,v,o and on
// all-linear as PEFT counts what it trains.
TEST(ModelFamily, PresetsCountLikeTransformersAndPeft) {
  const nlohmann::json golden =
      nlohmann::json::parse(testing::slurp(testing::source_path("tests/data/model_configs/preset_params.json")));
  ASSERT_GE(golden.size(), 13u);
  for (const auto& [name, want] : golden.items()) {
    SCOPED_TRACE(name);
    const DecoderConfig m = model_preset(name);
    EXPECT_EQ(total_params(m), want.at("total").get<int64_t>());
    LoraConfig lora;
    lora.r = 16;
    lora.target_modules = m.pieces.fused_projections ? std::vector<std::string>{"qkv_proj", "o_proj"}
                                                     : std::vector<std::string>{"q_proj", "k_proj", "v_proj", "o_proj"};
    EXPECT_EQ(plan::lora_trainable_params(m, lora), want.at("lora_qkvo_r16").get<int64_t>());
    lora.target_modules = {"all-linear"};
    EXPECT_EQ(plan::lora_trainable_params(m, lora), want.at("lora_all_r16").get<int64_t>());
  }
}

// How far a config's positions reach (the check of data.max_seq_length at the start of a run).
TEST(ModelFamily, MaxPositionsFollowRopeScaling) {
  DecoderConfig c;
  c.max_position_embeddings = 32768;
  EXPECT_EQ(c.max_positions(), 32768);
  c.rope.type = RopeType::kYarn;  // Qwen2.5's long-context setting
  c.rope.factor = 4.0;
  c.rope.original_max_position_embeddings = 32768;
  EXPECT_EQ(c.max_positions(), 131072);
  c.rope.type = RopeType::kLinear;
  c.rope.factor = 2.0;
  EXPECT_EQ(c.max_positions(), 65536);  // the original named: twice it
  c.rope.original_max_position_embeddings = 0;
  c.rope.factor = 8.0;  // Gemma 3: 131072 positions are already the scaled length
  c.max_position_embeddings = 131072;
  EXPECT_EQ(c.max_positions(), 131072);
  c.rope.type = RopeType::kDynamic;  // dynamic NTK grows the base past max_position_embeddings
  c.rope.factor = 2.0;
  c.max_position_embeddings = 4096;
  EXPECT_EQ(c.max_positions(), 8192);
  c.rope.type = RopeType::kLlama3;  // Llama 3.1: max_position_embeddings is already the extended length
  c.rope.factor = 8.0;
  c.max_position_embeddings = 131072;
  EXPECT_EQ(c.max_positions(), 131072);
}

}  // namespace
}  // namespace qlora
