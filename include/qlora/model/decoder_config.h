// model/decoder_config: the description of one decoder model, torch-free.
//
// A DecoderConfig is what a Hugging Face `config.json` says about a decoder of
// one of the families qlora trains (model/family.h reads it, key by key, with
// the defaults transformers applies when a key is absent): sizes, attention
// layout, RoPE and its scaling, the layer's pieces (biases, q/k norms, the
// activation) and each layer's attention window. It comes either from a model
// directory or from a named preset whose numbers are the published config.json
// values, so `qlora plan` works before any weights are downloaded. Nothing here
// allocates a tensor.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace qlora {

struct Config;

// ---------------------------------------------------------------- the description

// How RoPE frequencies are scaled (config.json's rope_scaling / rope_parameters rope_type), with
// transformers' rope init functions' parameters (model/decoder.h computes them).
enum class RopeType { kDefault, kLinear, kDynamic, kYarn, kLlama3, kLongrope };

struct RopeScaling {
  RopeType type = RopeType::kDefault;
  double factor = 1.0;                        // linear, dynamic, yarn, llama3
  double low_freq_factor = 1.0;               // llama3
  double high_freq_factor = 1.0;              // llama3
  int64_t original_max_position_embeddings = 0;  // llama3, yarn
  double beta_fast = 32.0, beta_slow = 1.0;   // yarn's correction range
  bool truncate = true;                       // yarn: floor/ceil the correction range
  double attention_factor = 1.0;              // yarn, longrope: cos and sin are multiplied by it (1 otherwise)
  // longrope (Phi-3.5, Phi-4-mini): per-frequency divisors [rotary dim / 2], the short ones while
  // the batch's positions stay within original_max_position_embeddings, the long ones beyond.
  std::vector<double> short_factor, long_factor;
};

// The gate activation of the GLU MLP (hidden_act / hidden_activation): SiLU (SwiGLU), or GELU
// with the tanh approximation (GeGLU, Gemma's gelu_pytorch_tanh).
enum class Activation { kSilu, kGeluTanh };

// The pieces a decoder layer is built from, where families differ (model/family.h says which
// family has which). Everything not listed is Llama's: pre-norm RMSNorm (w · x̂), rotate-half
// RoPE on the whole head, causal softmax attention scaled by 1/sqrt(head_dim), a GLU MLP.
struct LayerPieces {
  bool qkv_bias = false;  // q, k, v projections add a bias (Qwen2; Llama/Qwen3 attention_bias)
  bool o_bias = false;    // o_proj adds a bias (Llama/Qwen3 attention_bias)
  bool mlp_bias = false;  // gate, up and down add a bias (Llama's mlp_bias)
  bool qk_norm = false;   // per-head RMSNorm over head_dim on q and k before RoPE (Qwen3, Gemma 3)
  Activation act = Activation::kSilu;
  // Every RMSNorm scales by (1 + w), in fp32, rounding once at the end (Gemma's RMSNorm).
  bool norm_plus_one = false;
  // Gemma 2 / 3's four norms a layer: post_attention_layernorm normalizes the attention output
  // before the residual add, pre_ and post_feedforward_layernorm wrap the MLP the same way.
  bool sandwich_norms = false;
  // Phi-3: q|k|v stored as one qkv_proj and gate|up as one gate_up_proj (gate first), as PEFT
  // targets them: the layer's projections are qkv_proj, o_proj, gate_up_proj, down_proj.
  bool fused_projections = false;
};

struct DecoderConfig {
  std::string name;  // preset name, or the model directory it was read from

  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // < num_attention_heads: grouped-query attention
  int64_t head_dim = 0;             // config.json's head_dim, else the family's default
  int64_t max_position_embeddings = 0;

  bool tie_word_embeddings = false;  // lm_head shares the embedding matrix
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-6;
  RopeScaling rope;
  LayerPieces pieces;

  // Gemma's model-level pieces (0 / false: absent).
  double query_pre_attn_scalar = 0;    // scores scaled by its -1/2 power instead of head_dim's
  double attn_logit_softcapping = 0;   // scores = cap · tanh(scores / cap) before the mask (Gemma 2)
  double final_logit_softcapping = 0;  // logits = cap · tanh(logits / cap) (Gemma 2)
  bool scale_embeddings = false;       // embeddings times sqrt(hidden_size), rounded to the model dtype
  double rope_local_theta = 0;         // sliding-window layers' RoPE base, unscaled (Gemma 3's rope_local_base_freq)
  double partial_rotary_factor = 1.0;  // RoPE turns the first head_dim * factor dims of a head (Phi-4-mini: 0.75)

  // The dims of a head RoPE rotates (all of head_dim unless partial_rotary_factor < 1).
  int64_t rotary_dim() const {
    return static_cast<int64_t>(static_cast<double>(head_dim) * partial_rotary_factor);
  }

  // Sliding-window attention, per layer: a query at index i sees keys j with i - window < j <= i;
  // 0 = full causal attention. Empty (or all 0) when the model has no window (Mistral's
  // sliding_window; Qwen2/Qwen3's use_sliding_window with max_window_layers or layer_types).
  std::vector<int64_t> layer_window;

  // The token ids config.json names, each below vocab_size (-1 / empty when absent). The run
  // checks them against the tokenizer too (train/vocab_check.h).
  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;  // eos_token_id: one id, or a list (Llama 3.1 Instruct)
  int64_t pad_token_id = -1;

  std::string model_type;   // a family of model/family.h: "llama", "mistral", "qwen2", "qwen3"
  // What the decoder's weights and modules are named under: "model." (model.layers.N...,
  // model.embed_tokens, model.norm, as a *ForCausalLM saves them), or kGemma3TextPrefix for the
  // text part of a multimodal Gemma 3 (config.json's model_type "gemma3", whose text model is
  // gemma3_text; its lm_head.weight stays at the top). PEFT's module names follow it.
  std::string module_prefix = "model.";
  std::string torch_dtype;  // as written in config.json ("bfloat16", "float16"); may be empty
  // config.json keys the reader neither uses nor knows to be harmless (shown once as a warning).
  std::vector<std::string> unread_keys;

  // The text part of a multimodal checkpoint (its image tower is not trained).
  bool multimodal() const { return module_prefix != "model."; }

  // The window of layer `layer` (0: full attention).
  int64_t window_of(int64_t layer) const {
    return layer < static_cast<int64_t>(layer_window.size()) ? layer_window[static_cast<size_t>(layer)] : 0;
  }
  // The smallest window of any layer (0 when none slides).
  int64_t min_window() const;
  // The longest sequence its positions may reach: max_position_embeddings, or what a dynamic or
  // yarn rope_scaling extends it to (factor × original_max_position_embeddings, or ×
  // max_position_embeddings where the original is not given), or a linear one that names its
  // original. llama3, longrope and linear configs without an original (Gemma 3) give the
  // extended length as max_position_embeddings itself.
  int64_t max_positions() const;
};

// The text model of Gemma3ForConditionalGeneration as transformers 5's modules and PEFT name it
// ("model.language_model.layers.0.self_attn.q_proj"). The published checkpoints, and what
// save_pretrained writes, name its tensors "language_model.model.*" (model::DecoderModel::load
// reads both namings; model/decoder.h: text_model_weight_name).
inline constexpr const char* kGemma3TextPrefix = "model.language_model.";

// One projection of a decoder layer, as PEFT names it (q_proj ... down_proj; Phi-3's qkv_proj,
// gate_up_proj). The weight is [out_features, in_features]; every layer has the same ones.
struct LinearShape {
  std::string name;
  int64_t in_features = 0;
  int64_t out_features = 0;
};

// q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (pieces.fused_projections:
// qkv_proj, o_proj, gate_up_proj, down_proj).
std::vector<LinearShape> decoder_linear_shapes(const DecoderConfig& model);

// The seven names of an unfused layer, in that order.
const std::vector<std::string>& decoder_linear_names();
// This model's projection names, in decoder_linear_shapes' order (what "all-linear" expands to).
const std::vector<std::string>& projection_names(const DecoderConfig& model);

// Whether projection `proj` (one of projection_names) adds a bias in this model (LayerPieces).
bool projection_has_bias(const DecoderConfig& model, const std::string& proj);

// Empty when the fused GPU decoder layer (src/layer/) has a piece for everything this model's
// layers compute; otherwise what it lacks (the run then takes the generic checkpointed layer,
// and `qlora plan` says so).
std::string fused_layer_gap(const DecoderConfig& model);

// Weights in the seven projections of all layers (what NF4 quantizes).
int64_t decoder_linear_params(const DecoderConfig& model);

// Every weight of the model: projections and their biases, embeddings, norms (q/k norms too),
// lm_head once.
int64_t total_params(const DecoderConfig& model);

// ---------------------------------------------------------------- presets

// Llama 3.x / 2, Mistral, Qwen2.5, Qwen3 and SmolLM2 sizes ("qwen3-8b", ...).
const std::vector<std::string>& model_preset_names();

// The published config.json values of a preset. Throws ConfigError (key
// "model.preset", "did you mean", the list) for an unknown name.
DecoderConfig model_preset(const std::string& name);

// ---------------------------------------------------------------- resolving

// model.path/config.json when model.path is set (read_decoder_config, model/family.h), else the
// model.preset. Throws ConfigError when neither is set.
DecoderConfig resolve_model_shape(const Config& cfg);

}  // namespace qlora
