// Random weights of every family (train/demo.h): bench_train and `qlora plan --measure` train on a
// model directory that holds only config.json. write_llama_config must write a config.json that
// read_decoder_config reads back as the same model (family, biases, q/k norms, RoPE scaling,
// windows), and the random weights must include every tensor DecoderModel::load expects: Qwen2's
// q/k/v biases, Qwen3's q/k norm weights. Each preset's family at a size that loads at once.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <memory>
#include <stdexcept>
#include <string>

#include "qlora/common/text.h"
#include "qlora/config/config.h"
#include "qlora/model/decoder.h"
#include "qlora/model/decoder_config.h"
#include "qlora/model/family.h"
#include "qlora/model/linear.h"
#include "qlora/train/demo.h"
#include "qlora/train/setup.h"
#include "qlora/train/vocab_check.h"
#include "support/decoder_config_checks.h"
#include "support/test_support.h"
#include "support/train_fixtures.h"

namespace qlora {
namespace {

using testing::make_temp_dir;

// One preset of each family, with what sets it apart: Llama 3's RoPE scaling and tied
// embeddings, Mistral's sliding window, Qwen2's q/k/v biases, Qwen3's q/k norms.
const char* const kPresets[] = {"llama-3.2-1b", "mistral-7b", "qwen2.5-1.5b", "qwen3-8b", "gemma-3-1b", "phi-4-mini"};

// The preset's family, pieces, RoPE and windows at a tiny size.
DecoderConfig tiny(const std::string& preset) {
  DecoderConfig c = testing::small_shape(model_preset(preset));
  c.vocab_size = 320;
  if (!c.layer_window.empty()) c.layer_window.assign(2, c.layer_window.front());
  return c;
}

// Loads `dir` as the trainer does (NF4 base on the CPU, fp32), random weights allowed.
train::BaseModel load(const std::string& dir) {
  Config cfg = default_config();
  cfg.model.path = dir;
  return train::load_base_model(cfg, train::DeviceChoice{}, /*allow_random_weights=*/true);
}

// What each family's layer holds: biases where projection_has_bias says, q/k norms for Qwen3,
// drawn as transformers initializes them (zeros, ones); and a forward with finite logits.
void expect_family_tensors(const train::BaseModel& base, const std::string& preset) {
  const model::DecoderModel& m = base.model;
  const DecoderConfig& c = m.config();
  EXPECT_EQ(c.model_type, model_preset(preset).model_type) << preset;
  for (int64_t l = 0; l < m.num_layers(); ++l) {
    for (size_t i = 0; i < projection_names(c).size(); ++i) {
      const std::string& proj = projection_names(c)[i];
      const auto frozen = std::dynamic_pointer_cast<model::FrozenLinear>(m.projection(l, i));
      ASSERT_TRUE(frozen) << preset << " layer " << l << " " << proj;
      const bool want = projection_has_bias(c, proj);
      EXPECT_EQ(frozen->bias().defined(), want) << preset << " layer " << l << " " << proj;
      if (want && frozen->bias().defined()) {
        EXPECT_EQ(frozen->bias().abs().sum().item<double>(), 0.0) << proj;
      }
    }
    EXPECT_EQ(m.q_norm_weight(l).defined(), c.pieces.qk_norm) << preset;
    EXPECT_EQ(m.k_norm_weight(l).defined(), c.pieces.qk_norm) << preset;
    if (c.pieces.qk_norm) {
      EXPECT_EQ(m.q_norm_weight(l).sizes(), at::IntArrayRef({c.head_dim})) << preset;
      EXPECT_TRUE(at::equal(m.k_norm_weight(l), at::ones({c.head_dim}, m.k_norm_weight(l).options()))) << preset;
    }
  }
  const at::Tensor ids = at::arange(8, at::kLong).remainder(c.vocab_size).view({1, 8});
  const at::Tensor logits = m.forward(ids, model::causal_attention(1, 8, m.device()));
  EXPECT_EQ(logits.sizes(), at::IntArrayRef({1, 8, c.vocab_size})) << preset;
  EXPECT_TRUE(at::isfinite(logits).all().item<bool>()) << preset;
}

TEST(RandomWeights, ConfigJsonReadsBackAsTheSameModel) {
  for (const char* preset : kPresets) {
    const DecoderConfig want = tiny(preset);
    const std::string dir = make_temp_dir("random_weights_config");
    train::write_llama_config(dir, want);
    const DecoderConfig got = read_decoder_config(dir + "/config.json");
    SCOPED_TRACE(preset);
    testing::expect_same_shape(got, want);
    EXPECT_EQ(got.min_window(), want.min_window());
    for (int64_t l = 0; l < want.num_hidden_layers; ++l) EXPECT_EQ(got.window_of(l), want.window_of(l)) << l;
    EXPECT_TRUE(got.unread_keys.empty()) << join(got.unread_keys);
  }
}

// `plan --measure` on a preset (no model.path): the preset's own DecoderConfig and random weights.
TEST(RandomWeights, PresetShapeLoadsEveryFamily) {
  for (const char* preset : kPresets) {
    const DecoderConfig shape = tiny(preset);
    train::BaseModel base{shape, "", true,
                          model::DecoderModel::load(shape, train::random_llama_weights(shape, 0, c10::kCPU))};
    expect_family_tensors(base, preset);
  }
}

// The path of bench_train and `plan --measure` on a directory with config.json only.
TEST(RandomWeights, ConfigOnlyDirectoryLoadsEveryFamily) {
  for (const char* preset : kPresets) {
    const std::string dir = make_temp_dir("random_weights_config_only");
    train::write_llama_config(dir, tiny(preset));
    const train::BaseModel base = load(dir);
    EXPECT_TRUE(base.random_weights) << preset;
    EXPECT_EQ(base.shape.model_type, tiny(preset).model_type);
    expect_family_tensors(base, preset);
  }
}

// What bench_train trains on: a preset's config.json beside the demo's tokenizer, whose ids
// config.json's bos/eos must be (the run checks them against the tokenizer before loading).
TEST(RandomWeights, BenchDirectoryPassesTheTokenizerCheck) {
  for (const char* preset : kPresets) {
    const std::string dir = make_temp_dir("random_weights_bench");
    train::write_config_with_demo_tokenizer(dir, model_preset(preset));
    EXPECT_NO_THROW(train::load_checked_tokenizer(dir)) << preset;
  }
}

// write_random_llama's safetensors hold exactly the names DecoderModel::load expects (it refuses
// missing and unexpected ones alike).
TEST(RandomWeights, WrittenCheckpointLoadsEveryFamily) {
  for (const char* preset : kPresets) {
    const std::string dir = make_temp_dir("random_weights_written");
    train::write_random_llama(dir, tiny(preset), 7);
    const train::BaseModel base = load(dir);
    EXPECT_FALSE(base.random_weights) << preset;
    expect_family_tensors(base, preset);
  }
}

TEST(RandomWeights, PiecesTheFamilyCannotSayAreRefusedAndWindowsAreWritten) {
  DecoderConfig q2 = tiny("qwen2.5-1.5b");
  q2.pieces.qkv_bias = false;  // Qwen2 always has q/k/v biases
  EXPECT_THROW(train::write_llama_config(make_temp_dir("random_weights_refused"), q2), std::invalid_argument);
  DecoderConfig llama = tiny("llama-3.2-1b");
  llama.pieces.qk_norm = true;  // Llama has no q/k norms
  EXPECT_THROW(train::write_llama_config(make_temp_dir("random_weights_refused"), llama), std::invalid_argument);
  // Qwen3 says which layers slide through layer_types.
  DecoderConfig q3 = tiny("qwen3-8b");
  q3.layer_window = {0, 512};
  const std::string dir = make_temp_dir("random_weights_windows");
  train::write_llama_config(dir, q3);
  const DecoderConfig got = read_decoder_config(dir + "/config.json");
  EXPECT_EQ(got.window_of(0), 0);
  EXPECT_EQ(got.window_of(1), 512);
}

}  // namespace
}  // namespace qlora
