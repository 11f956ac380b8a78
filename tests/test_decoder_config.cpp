// model/decoder_config: config.json as transformers writes it (both layouts),
// the presets, parameter counts against the published figures, bad files.
#include <gtest/gtest.h>

#include "qlora/common/errors.h"
#include "qlora/config/config.h"
#include "qlora/model/decoder_config.h"
#include "qlora/model/family.h"
#include "support/decoder_config_checks.h"
#include "support/test_support.h"

namespace qlora {
namespace {

using testing::make_temp_dir;
using testing::source_path;
using testing::write_file;

std::string model_config(const std::string& name) { return source_path("tests/data/model_configs/" + name + ".json"); }

// The same model, windows spelled the same way.
void expect_same_model(const DecoderConfig& a, const DecoderConfig& b) {
  testing::expect_same_shape(a, b);
  EXPECT_EQ(a.layer_window, b.layer_window);
}

// The files transformers 5.17 wrote (scripts/golden/model_configs.py), in its
// own layout (rope_parameters) and in the transformers 4 layout, read to the
// same shapes as the presets.
TEST(DecoderConfig, TransformersFilesEqualPresets) {
  for (const char* name : {"llama-3.2-1b", "llama-3.1-8b", "llama-2-7b", "mistral-7b"}) {
    SCOPED_TRACE(name);
    const DecoderConfig preset = model_preset(name);
    expect_same_model(read_decoder_config(model_config(name)), preset);
    expect_same_model(read_decoder_config(model_config(std::string("hf4_") + name)), preset);
  }
}

// Parameter counts as the model cards and PEFT's print_trainable_parameters
// publish them (all params of the base model).
TEST(DecoderConfig, TotalParamsMatchPublishedCounts) {
  EXPECT_EQ(total_params(model_preset("llama-3.2-1b")), 1'235'814'400);
  EXPECT_EQ(total_params(model_preset("llama-3.2-3b")), 3'212'749'824);
  EXPECT_EQ(total_params(model_preset("llama-3.1-8b")), 8'030'261'248);
  EXPECT_EQ(total_params(model_preset("llama-2-7b")), 6'738'415'616);
  EXPECT_EQ(total_params(model_preset("mistral-7b")), 7'241'732'096);
  EXPECT_EQ(total_params(model_preset("llama-3.1-70b")), 70'553'706'496);
}

TEST(DecoderConfig, LinearShapesOf8B) {
  const auto shapes = decoder_linear_shapes(model_preset("llama-3.1-8b"));
  ASSERT_EQ(shapes.size(), 7u);
  EXPECT_EQ(shapes[1].name, "k_proj");
  EXPECT_EQ(shapes[1].in_features, 4096);
  EXPECT_EQ(shapes[1].out_features, 1024);  // 8 kv heads × 128
  EXPECT_EQ(shapes[6].name, "down_proj");
  EXPECT_EQ(shapes[6].in_features, 14336);
  // 8,030,261,248 - 2 × 128,256 × 4,096 (embeddings, lm_head) - 65 × 4,096 (norms)
  EXPECT_EQ(decoder_linear_params(model_preset("llama-3.1-8b")), 6'979'321'856);
}

TEST(DecoderConfig, UnknownPresetSuggests) {
  try {
    model_preset("llama-3.2-1");
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("did you mean \"llama-3.2-1b\""), std::string::npos) << e.what();
  }
}

struct BadModelConfig {
  const char* name;
  const char* text;
  const char* expect;  // in the message, besides the file name
};

class BadModelConfigTest : public ::testing::TestWithParam<BadModelConfig> {};

TEST_P(BadModelConfigTest, NamesFileAndKey) {
  const auto& c = GetParam();
  const std::string path = write_file(make_temp_dir("llama-config"), "config.json", c.text);
  try {
    read_decoder_config(path);
    FAIL() << "expected InputError for " << c.name;
  } catch (const InputError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_NE(msg.find(c.expect), std::string::npos) << "expected \"" << c.expect << "\" in: " << msg;
  }
}

constexpr const char* kGood =
    R"("model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
       "num_hidden_layers": 2, "num_attention_heads": 4)";

std::string with(const std::string& extra) { return "{" + std::string(kGood) + ", " + extra + "}"; }

const std::string kRopeLongrope = with(R"("rope_scaling": {"rope_type": "longrope", "factor": 4.0})");
const std::string kRopeMrope = with(R"("rope_scaling": {"type": "mrope", "factor": 4.0})");
const std::string kAttentionDropout = with(R"("attention_dropout": 0.1)");
const std::string kQuantized = with(R"("quantization_config": {"quant_method": "gptq", "bits": 4})");
const std::string kPartialRotary = with(R"("partial_rotary_factor": 0.5)");
const std::string kClassifier = with(R"("architectures": ["LlamaForSequenceClassification"])");
const std::string kMrope = R"({"model_type": "qwen2", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "use_mrope": true})";
const std::string kLayerTypes = R"({"model_type": "qwen3", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "layer_types": ["full_attention"]})";
const std::string kQwen = R"({"model_type": "qwen", "vocab_size": 256})";
const std::string kKvNotDividing = with(R"("num_key_value_heads": 3)");
const std::string kLayersString = R"({"model_type": "llama", "vocab_size": 256, "hidden_size": 64,
  "intermediate_size": 128, "num_hidden_layers": "2", "num_attention_heads": 4})";
const std::string kNoHidden = R"({"model_type": "llama", "vocab_size": 256, "intermediate_size": 128,
  "num_hidden_layers": 2, "num_attention_heads": 4})";
const std::string kGpt2 = R"({"model_type": "gpt2", "vocab_size": 256})";
const std::string kLlama3Incomplete = with(R"("rope_scaling": {"rope_type": "llama3", "factor": 8.0})");
const std::string kBosPastVocab = with(R"("bos_token_id": 256)");
const std::string kEosListPastVocab = with(R"("eos_token_id": [1, 300])");
const std::string kPadString = with(R"("pad_token_id": "0")");
const std::string kGelu = with(R"("hidden_act": "gelu_pytorch_tanh")");
const std::string kNegativeVocab = R"({"model_type": "llama", "vocab_size": -5, "hidden_size": 64,
  "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4})";

INSTANTIATE_TEST_SUITE_P(
    Table, BadModelConfigTest,
    ::testing::Values(BadModelConfig{"not_json", "{\"model_type\": \"llama\",", "not valid JSON"},
                      BadModelConfig{"array", "[1, 2]", "expected a JSON object"},
                      BadModelConfig{"no_model_type", "{\"vocab_size\": 3}", "model_type"},
                      BadModelConfig{"gpt2", kGpt2.c_str(), "\"gpt2\""},
                      BadModelConfig{"missing_hidden", kNoHidden.c_str(), "\"hidden_size\": missing"},
                      BadModelConfig{"string_layers", kLayersString.c_str(), "\"num_hidden_layers\": expected a positive integer"},
                      BadModelConfig{"negative_vocab", kNegativeVocab.c_str(), "\"vocab_size\""},
                      BadModelConfig{"kv_not_dividing", kKvNotDividing.c_str(), "num_key_value_heads"},
                      BadModelConfig{"qwen_v1", kQwen.c_str(), "did you mean \"qwen2\"?); supported: llama ("},
                      BadModelConfig{"longrope", kRopeLongrope.c_str(), "\"rope_scaling.short_factor\": expected a list of 8 numbers"},
                      BadModelConfig{"mrope", kRopeMrope.c_str(), "\"mrope\" is not supported"},
                      BadModelConfig{"attention_dropout", kAttentionDropout.c_str(), "\"attention_dropout\": is 0.1"},
                      BadModelConfig{"quantized", kQuantized.c_str(), "\"quantization_config\": this checkpoint is already quantized"},
                      BadModelConfig{"partial_rotary", kPartialRotary.c_str(), "\"partial_rotary_factor\": is 0.5"},
                      BadModelConfig{"classifier", kClassifier.c_str(), "\"architectures\": lists \"LlamaForSequenceClassification\""},
                      BadModelConfig{"use_mrope", kMrope.c_str(), "\"use_mrope\": is true"},
                      BadModelConfig{"layer_types", kLayerTypes.c_str(), "\"layer_types\": expected a list of 2 entries"},
                      BadModelConfig{"llama3_incomplete", kLlama3Incomplete.c_str(), "low_freq_factor"},
                      BadModelConfig{"bos_past_vocab", kBosPastVocab.c_str(),
                                     "\"bos_token_id\": 256 is not a token of the model: its embedding has "
                                     "vocab_size 256"},
                      BadModelConfig{"eos_list_past_vocab", kEosListPastVocab.c_str(), "\"eos_token_id\": 300"},
                      BadModelConfig{"pad_string", kPadString.c_str(), "\"pad_token_id\": expected a token id"},
                      BadModelConfig{"gelu", kGelu.c_str(), "\"hidden_act\": is \"gelu_pytorch_tanh\""}),
    [](const auto& info) { return std::string(info.param.name); });

// bos/eos/pad ids as transformers writes them: one id, a list for eos (Llama 3.1 Instruct),
// null or -1 (old conversions) for none.
TEST(DecoderConfig, SpecialTokenIds) {
  const std::string dir = make_temp_dir("llama-config-ids");
  DecoderConfig c = read_decoder_config(
      write_file(dir, "config.json", with(R"("bos_token_id": 0, "eos_token_id": [1, 255], "pad_token_id": -1)")));
  EXPECT_EQ(c.bos_token_id, 0);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{1, 255}));
  EXPECT_EQ(c.pad_token_id, -1);
  c = read_decoder_config(write_file(dir, "config.json", with(R"("eos_token_id": 7, "pad_token_id": null)")));
  EXPECT_EQ(c.bos_token_id, -1);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{7}));
  EXPECT_EQ(c.pad_token_id, -1);
}

TEST(DecoderConfig, MissingFileSaysWhatAModelDirHolds) {
  try {
    read_decoder_config("/nonexistent/dir/config.json");
    FAIL();
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("config.json and *.safetensors"), std::string::npos) << e.what();
  }
}

TEST(DecoderConfig, ResolveFromConfigPathOrPreset) {
  const std::string dir = make_temp_dir("model-dir");
  write_file(dir, "config.json", with(R"("tie_word_embeddings": true)"));
  Config cfg = default_config({"model.path=" + dir});
  const DecoderConfig m = resolve_model_shape(cfg);
  EXPECT_EQ(m.hidden_size, 64);
  EXPECT_EQ(m.head_dim, 16);
  EXPECT_EQ(m.num_key_value_heads, 4);  // defaults to the attention heads
  EXPECT_TRUE(m.tie_word_embeddings);
  EXPECT_EQ(resolve_model_shape(default_config({"model.preset=llama-2-7b"})).vocab_size, 32000);
  const std::string gguf = write_file(dir, "model.Q4_0.gguf", "GGUF\3");
  try {
    resolve_model_shape(default_config({"model.path=" + gguf}));
    ADD_FAILURE() << "a GGUF file was taken for a model directory";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find(gguf + ": is a GGUF file; qlora reads Hugging Face model directories"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(resolve_model_shape(default_config()), ConfigError);
}

}  // namespace
}  // namespace qlora
