// Two DecoderConfigs that describe the same model: what a config.json reader must give back.
#pragma once

#include <gtest/gtest.h>

#include "qlora/model/decoder_config.h"

namespace qlora::testing {

// Every field of the model's description, field by field, but the per-layer windows (a reader
// may spell "no window" as no entries or as zeros; each caller checks them its own way).
inline void expect_same_shape(const DecoderConfig& a, const DecoderConfig& b) {
  EXPECT_EQ(a.model_type, b.model_type);
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.hidden_size, b.hidden_size);
  EXPECT_EQ(a.intermediate_size, b.intermediate_size);
  EXPECT_EQ(a.num_hidden_layers, b.num_hidden_layers);
  EXPECT_EQ(a.num_attention_heads, b.num_attention_heads);
  EXPECT_EQ(a.num_key_value_heads, b.num_key_value_heads);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.max_position_embeddings, b.max_position_embeddings);
  EXPECT_EQ(a.tie_word_embeddings, b.tie_word_embeddings);
  EXPECT_DOUBLE_EQ(a.rope_theta, b.rope_theta);
  EXPECT_DOUBLE_EQ(a.rms_norm_eps, b.rms_norm_eps);
  EXPECT_EQ(a.rope.type, b.rope.type);
  EXPECT_DOUBLE_EQ(a.rope.factor, b.rope.factor);
  EXPECT_DOUBLE_EQ(a.rope.low_freq_factor, b.rope.low_freq_factor);
  EXPECT_DOUBLE_EQ(a.rope.high_freq_factor, b.rope.high_freq_factor);
  EXPECT_EQ(a.rope.original_max_position_embeddings, b.rope.original_max_position_embeddings);
  EXPECT_DOUBLE_EQ(a.rope.attention_factor, b.rope.attention_factor);
  EXPECT_EQ(a.pieces.qkv_bias, b.pieces.qkv_bias);
  EXPECT_EQ(a.pieces.o_bias, b.pieces.o_bias);
  EXPECT_EQ(a.pieces.mlp_bias, b.pieces.mlp_bias);
  EXPECT_EQ(a.pieces.qk_norm, b.pieces.qk_norm);
}

}  // namespace qlora::testing
