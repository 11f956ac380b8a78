// model/llama_config: the shapes of a Llama-family decoder, torch-free.
//
// A LlamaConfig is what a Hugging Face `config.json` says about a Llama or
// Mistral model (sizes, attention layout, RoPE), read with the same key names
// and the same defaults transformers applies when a key is absent. It comes
// either from a model directory or from a named preset whose numbers are the
// published config.json values, so `qlora plan` works before any weights are
// downloaded. Nothing here allocates a tensor.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace qlora {

struct Config;

// ---------------------------------------------------------------- shapes

struct LlamaConfig {
  std::string name;  // preset name, or the model directory it was read from

  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // < num_attention_heads: grouped-query attention
  int64_t head_dim = 0;             // config.json's head_dim, else hidden_size / heads
  int64_t max_position_embeddings = 0;

  bool tie_word_embeddings = false;  // lm_head shares the embedding matrix
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-6;

  // rope_scaling with rope_type "llama3" (Llama 3.1 / 3.2): wavelength-dependent
  // interpolation of the RoPE frequencies.
  bool has_llama3_rope_scaling = false;
  double rope_scaling_factor = 1.0;
  double rope_low_freq_factor = 1.0;
  double rope_high_freq_factor = 1.0;
  int64_t rope_original_max_position_embeddings = 0;

  // The token ids config.json names, each below vocab_size (-1 / empty when absent). The run
  // checks them against the tokenizer too (train/vocab_check.h).
  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;  // eos_token_id: one id, or a list (Llama 3.1 Instruct)
  int64_t pad_token_id = -1;

  int64_t sliding_window = 0;  // Mistral's window; 0 when the model has none
  std::string model_type;      // "llama" or "mistral"
  std::string torch_dtype;     // as written in config.json ("bfloat16", "float16"); may be empty
};

// One projection of a decoder layer, as PEFT names it (q_proj ... down_proj).
// The weight is [out_features, in_features]; every layer has the same seven.
struct LinearShape {
  std::string name;
  int64_t in_features = 0;
  int64_t out_features = 0;
};

// q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
std::vector<LinearShape> decoder_linear_shapes(const LlamaConfig& model);

// The seven names above, in that order (what "all-linear" expands to).
const std::vector<std::string>& decoder_linear_names();

// Weights in the seven projections of all layers (what NF4 quantizes).
int64_t decoder_linear_params(const LlamaConfig& model);

// Every weight of the model: projections, embeddings, norms, lm_head once.
int64_t total_params(const LlamaConfig& model);

// ---------------------------------------------------------------- presets

// llama-3.2-1b, llama-3.2-3b, llama-3.1-8b, llama-2-7b, mistral-7b, llama-3.1-70b.
const std::vector<std::string>& model_preset_names();

// The published config.json values of a preset. Throws ConfigError (key
// "model.preset", "did you mean", the list) for an unknown name.
LlamaConfig model_preset(const std::string& name);

// ---------------------------------------------------------------- config.json

// Reads a Hugging Face config.json. Throws InputError naming the file and the
// key for: a missing or unreadable file, text that is not JSON, a missing or
// wrongly typed required key, a model_type other than llama / mistral, an
// inconsistent shape (heads not dividing hidden_size, ...), a rope_scaling
// type the trainer does not implement, or a bos/eos/pad token id that is not
// a row of the embedding (0 <= id < vocab_size; pad_token_id -1 means none).
LlamaConfig read_llama_config(const std::string& config_json_path);

// model.path/config.json when model.path is set, else the model.preset.
// Throws ConfigError when neither is set.
LlamaConfig resolve_model_shape(const Config& cfg);

}  // namespace qlora
