// model/family: each family's config.json read key by key with its config class's defaults,
// the layer pieces and windows it implies, the keys reported as unread, and the presets'
// parameter counts against transformers + PEFT (scripts/golden/preset_params.py).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "qlora/config/config.h"
#include "qlora/model/decoder_config.h"
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
  nlohmann::json g = small("gemma3_text");
  try {
    read_json(g);
    FAIL() << "gemma3_text was accepted";
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
    lora.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};
    EXPECT_EQ(plan::lora_trainable_params(m, lora), want.at("lora_qkvo_r16").get<int64_t>());
    lora.target_modules = {"all-linear"};
    EXPECT_EQ(plan::lora_trainable_params(m, lora), want.at("lora_all_r16").get<int64_t>());
  }
}

}  // namespace
}  // namespace qlora
