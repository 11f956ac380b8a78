#include "qlora/model/decoder_config.h"

#include <filesystem>

#include "qlora/common/errors.h"
#include "qlora/common/input_files.h"
#include "qlora/common/text.h"
#include "qlora/config/config.h"
#include "qlora/model/family.h"

namespace qlora {
namespace {

// ---------------------------------------------------------------- presets
// Every number below is copied from the model's Hugging Face config.json
// (repository named in the comment), not derived. Llama 3.x, Mistral and Qwen3 list
// head_dim explicitly (Qwen3-0.6B's and 4B's differ from hidden / heads); the others do not.

// One row per preset; rope_factor > 0 means Llama 3.1-style rope_scaling
// (low 1, high 4, original context 8192, as all Llama 3.1 / 3.2 configs say).
struct PresetRow {
  const char* name;
  const char* model_type;
  int64_t vocab, hidden, intermediate, layers, heads, kv_heads, head_dim, max_positions;
  bool tied;
  double rope_theta, rope_factor, rms_eps;
  int64_t sliding_window;
  const char* dtype;
};

// clang-format off
constexpr PresetRow kPresetRows[] = {
  // name             type       vocab   hidden inter  layers heads kv head max_pos tied   theta      factor eps   window dtype
  {"llama-3.2-1b",   "llama",   128256, 2048,  8192,  16,    32,   8, 64,  131072, true,  500000.0,  32.0, 1e-5, 0,     "bfloat16"},  // meta-llama/Llama-3.2-1B
  {"llama-3.2-3b",   "llama",   128256, 3072,  8192,  28,    24,   8, 128, 131072, true,  500000.0,  32.0, 1e-5, 0,     "bfloat16"},  // meta-llama/Llama-3.2-3B
  {"llama-3.1-8b",   "llama",   128256, 4096,  14336, 32,    32,   8, 128, 131072, false, 500000.0,  8.0,  1e-5, 0,     "bfloat16"},  // meta-llama/Llama-3.1-8B
  {"llama-2-7b",     "llama",   32000,  4096,  11008, 32,    32,  32, 128, 4096,   false, 10000.0,   0,    1e-5, 0,     "float16"},   // meta-llama/Llama-2-7b-hf
  {"mistral-7b",     "mistral", 32000,  4096,  14336, 32,    32,   8, 128, 32768,  false, 10000.0,   0,    1e-5, 4096,  "bfloat16"},  // mistralai/Mistral-7B-v0.1
  {"mistral-7b-v0.3","mistral", 32768,  4096,  14336, 32,    32,   8, 128, 32768,  false, 1000000.0, 0,    1e-5, 0,     "bfloat16"},  // mistralai/Mistral-7B-v0.3
  {"llama-3.1-70b",  "llama",   128256, 8192,  28672, 80,    64,   8, 128, 131072, false, 500000.0,  8.0,  1e-5, 0,     "bfloat16"},  // meta-llama/Llama-3.1-70B
  {"qwen2.5-0.5b",   "qwen2",   151936, 896,   4864,  24,    14,   2, 64,  32768,  true,  1000000.0, 0,    1e-6, 0,     "bfloat16"},  // Qwen/Qwen2.5-0.5B
  {"qwen2.5-1.5b",   "qwen2",   151936, 1536,  8960,  28,    12,   2, 128, 131072, true,  1000000.0, 0,    1e-6, 0,     "bfloat16"},  // Qwen/Qwen2.5-1.5B
  {"qwen2.5-7b",     "qwen2",   152064, 3584,  18944, 28,    28,   4, 128, 131072, false, 1000000.0, 0,    1e-6, 0,     "bfloat16"},  // Qwen/Qwen2.5-7B
  {"qwen3-0.6b",     "qwen3",   151936, 1024,  3072,  28,    16,   8, 128, 40960,  true,  1000000.0, 0,    1e-6, 0,     "bfloat16"},  // Qwen/Qwen3-0.6B
  {"qwen3-4b",       "qwen3",   151936, 2560,  9728,  36,    32,   8, 128, 40960,  true,  1000000.0, 0,    1e-6, 0,     "bfloat16"},  // Qwen/Qwen3-4B
  {"qwen3-8b",       "qwen3",   151936, 4096,  12288, 36,    32,   8, 128, 40960,  false, 1000000.0, 0,    1e-6, 0,     "bfloat16"},  // Qwen/Qwen3-8B
  {"qwen3-14b",      "qwen3",   151936, 5120,  17408, 40,    40,   8, 128, 40960,  false, 1000000.0, 0,    1e-6, 0,     "bfloat16"},  // Qwen/Qwen3-14B
  {"smollm2-135m",   "llama",   49152,  576,   1536,  30,    9,    3, 64,  8192,   true,  100000.0,  0,    1e-5, 0,     "bfloat16"},  // HuggingFaceTB/SmolLM2-135M
  {"smollm2-360m",   "llama",   49152,  960,   2560,  32,    15,   5, 64,  8192,   true,  100000.0,  0,    1e-5, 0,     "bfloat16"},  // HuggingFaceTB/SmolLM2-360M
  {"smollm2-1.7b",   "llama",   49152,  2048,  8192,  24,    32,  32, 64,  8192,   true,  130000.0,  0,    1e-5, 0,     "bfloat16"},  // HuggingFaceTB/SmolLM2-1.7B
  // Gemma: window is sliding_window (Gemma 2's every other layer, Gemma 3's five of six); factor
  // is Gemma 3's linear rope_scaling of the global layers. The 4B and 12B are the text part of
  // the multimodal checkpoints (their vision tower is not counted).
  {"gemma-2-2b",     "gemma2",  256000, 2304,  9216,  26,    8,    4, 256, 8192,   true,  10000.0,   0,    1e-6, 4096,  "float32"},   // google/gemma-2-2b
  {"gemma-2-9b",     "gemma2",  256000, 3584,  14336, 42,    16,   8, 256, 8192,   true,  10000.0,   0,    1e-6, 4096,  "float32"},   // google/gemma-2-9b
  {"gemma-3-270m",   "gemma3_text", 262144, 640, 2048, 18,   4,    1, 256, 32768,  true,  1000000.0, 0,    1e-6, 512,   "bfloat16"},  // google/gemma-3-270m
  {"gemma-3-1b",     "gemma3_text", 262144, 1152, 6912, 26,  4,    1, 256, 32768,  true,  1000000.0, 0,    1e-6, 512,   "bfloat16"},  // google/gemma-3-1b-pt
  {"gemma-3-4b",     "gemma3_text", 262208, 2560, 10240, 34, 8,    4, 256, 131072, true,  1000000.0, 8.0,  1e-6, 1024,  "bfloat16"},  // google/gemma-3-4b-pt text_config
  {"gemma-3-12b",    "gemma3_text", 262208, 3840, 15360, 48, 16,   8, 256, 131072, true,  1000000.0, 8.0,  1e-6, 1024,  "bfloat16"},  // google/gemma-3-12b-pt text_config
  // Phi-3: fused qkv_proj / gate_up_proj. Phi-3.5-mini and Phi-4-mini's LongRoPE factors are left
  // out (they change neither shapes nor memory); Phi-4-mini rotates 0.75 of each head.
  {"phi-3.5-mini",   "phi3",    32064,  3072,  8192,  32,    32,  32, 96,  131072, false, 10000.0,   0,    1e-5, 262144, "bfloat16"}, // microsoft/Phi-3.5-mini-instruct
  {"phi-4-mini",     "phi3",    200064, 3072,  8192,  32,    24,   8, 128, 131072, true,  10000.0,   0,    1e-5, 262144, "bfloat16"}, // microsoft/Phi-4-mini-instruct
  {"phi-4",          "phi3",    100352, 5120,  17920, 40,    40,  10, 128, 16384,  false, 250000.0,  0,    1e-5, 0,     "bfloat16"},  // microsoft/phi-4
};
// clang-format on

std::vector<DecoderConfig> make_presets() {
  std::vector<DecoderConfig> out;
  for (const PresetRow& r : kPresetRows) {
    DecoderConfig c;
    c.name = r.name;
    c.model_type = r.model_type;
    c.vocab_size = r.vocab;
    c.hidden_size = r.hidden;
    c.intermediate_size = r.intermediate;
    c.num_hidden_layers = r.layers;
    c.num_attention_heads = r.heads;
    c.num_key_value_heads = r.kv_heads;
    c.head_dim = r.head_dim;
    c.max_position_embeddings = r.max_positions;
    c.tie_word_embeddings = r.tied;
    c.rope_theta = r.rope_theta;
    c.rms_norm_eps = r.rms_eps;
    if (r.sliding_window > 0) c.layer_window.assign(static_cast<size_t>(r.layers), r.sliding_window);
    c.torch_dtype = r.dtype;
    if (c.model_type == "gemma2" || c.model_type == "gemma3_text") {  // model/family.cpp's read_gemma_keys
      const bool g3 = c.model_type == "gemma3_text";
      c.pieces.norm_plus_one = c.pieces.sandwich_norms = c.scale_embeddings = true;
      c.pieces.qk_norm = g3;
      c.pieces.act = Activation::kGeluTanh;
      c.query_pre_attn_scalar = 256;
      c.attn_logit_softcapping = g3 ? 0 : 50.0;
      c.final_logit_softcapping = g3 ? 0 : 30.0;
      const int64_t pattern = g3 ? 6 : 2;
      for (int64_t i = 0; i < r.layers; ++i)
        if ((i + 1) % pattern == 0) c.layer_window[static_cast<size_t>(i)] = 0;
      if (g3) c.rope_local_theta = 10000.0;
      if (r.rope_factor > 0) {
        c.rope.type = RopeType::kLinear;
        c.rope.factor = r.rope_factor;
      }
      out.push_back(c);
      continue;
    }
    // Qwen2: q, k, v biases always; Qwen3: q/k norms; Phi-3: fused projections (model/family.h).
    c.pieces.qkv_bias = c.model_type == "qwen2";
    c.pieces.qk_norm = c.model_type == "qwen3";
    c.pieces.fused_projections = c.model_type == "phi3";
    if (c.name == "phi-4-mini") c.partial_rotary_factor = 0.75;
    if (r.rope_factor > 0) {
      c.rope.type = RopeType::kLlama3;
      c.rope.factor = r.rope_factor;
      c.rope.low_freq_factor = 1.0;
      c.rope.high_freq_factor = 4.0;
      c.rope.original_max_position_embeddings = 8192;
    }
    out.push_back(c);
  }
  return out;
}

const std::vector<DecoderConfig>& presets() {
  static const std::vector<DecoderConfig> all = make_presets();
  return all;
}

}  // namespace

// ---------------------------------------------------------------- shapes

const std::vector<std::string>& decoder_linear_names() {
  static const std::vector<std::string> names = {"q_proj", "k_proj",    "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"};
  return names;
}

const std::vector<std::string>& projection_names(const DecoderConfig& m) {
  static const std::vector<std::string> fused = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"};
  return m.pieces.fused_projections ? fused : decoder_linear_names();
}

std::vector<LinearShape> decoder_linear_shapes(const DecoderConfig& m) {
  const int64_t h = m.hidden_size, q = m.num_attention_heads * m.head_dim,
                kv = m.num_key_value_heads * m.head_dim, i = m.intermediate_size;
  if (m.pieces.fused_projections)
    return {{"qkv_proj", h, q + 2 * kv}, {"o_proj", q, h}, {"gate_up_proj", h, 2 * i}, {"down_proj", i, h}};
  return {{"q_proj", h, q},    {"k_proj", h, kv}, {"v_proj", h, kv},  {"o_proj", q, h},
          {"gate_proj", h, i}, {"up_proj", h, i}, {"down_proj", i, h}};
}

bool projection_has_bias(const DecoderConfig& m, const std::string& proj) {
  if (proj == "q_proj" || proj == "k_proj" || proj == "v_proj" || proj == "qkv_proj") return m.pieces.qkv_bias;
  if (proj == "o_proj") return m.pieces.o_bias;
  return m.pieces.mlp_bias;
}

// The fused layer has a piece for every bias, the q/k norms, the windows and Gemma's pieces
// (GeGLU, (1 + w) and sandwich norms, query_pre_attn_scalar, attention soft-capping, the local
// RoPE base: Note [the family's pieces] in src/layer/fused_layer.cpp). A new piece says here what
// the fused layer lacks until it has it: the switch has no default, so a new activation is a
// -Wswitch warning without a line.
std::string fused_layer_gap(const DecoderConfig& m) {
  std::vector<std::string> gaps;
  switch (m.pieces.act) {
    case Activation::kSilu:
    case Activation::kGeluTanh:
      break;
  }
  return join(gaps);
}

int64_t decoder_linear_params(const DecoderConfig& m) {
  int64_t per_layer = 0;
  for (const auto& s : decoder_linear_shapes(m)) per_layer += s.in_features * s.out_features;
  return per_layer * m.num_hidden_layers;
}

int64_t total_params(const DecoderConfig& m) {
  const int64_t embed = m.vocab_size * m.hidden_size;
  int64_t per_layer = (m.pieces.sandwich_norms ? 4 : 2) * m.hidden_size;  // the layer's RMSNorms
  if (m.pieces.qk_norm) per_layer += 2 * m.head_dim;
  for (const auto& s : decoder_linear_shapes(m))
    if (projection_has_bias(m, s.name)) per_layer += s.out_features;
  return decoder_linear_params(m) + embed + (m.tie_word_embeddings ? 0 : embed) + m.hidden_size +
         per_layer * m.num_hidden_layers;
}

// ---------------------------------------------------------------- presets

const std::vector<std::string>& model_preset_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> n;
    for (const auto& p : presets()) n.push_back(p.name);
    return n;
  }();
  return names;
}

DecoderConfig model_preset(const std::string& name) {
  for (const auto& p : presets())
    if (p.name == to_lower(name)) return p;
  std::string msg = "unknown preset \"" + name + "\"";
  const std::string near = closest_match(name, model_preset_names());
  if (!near.empty()) msg += "; did you mean \"" + near + "\"?";
  msg += " Presets: " + join(model_preset_names()) + " (or set model.path to a model directory)";
  throw ConfigError("model.preset", {ConfigIssue{"model.preset", msg, 0}});
}

DecoderConfig resolve_model_shape(const Config& cfg) {
  const std::string source = cfg.source.empty() ? "<config>" : cfg.source;
  if (!cfg.model.path.empty()) {
    namespace fs = std::filesystem;
    std::error_code ec;
    fs::path p(cfg.model.path);
    if (is_gguf_file(p.string())) throw InputError(p.string() + ": is a GGUF file; " + kGgufHint);
    if (!fs::is_directory(p, ec) && p.filename() == "config.json") return read_decoder_config(p.string());
    return read_decoder_config((p / "config.json").string());
  }
  if (!cfg.model.preset.empty()) {
    try {
      return model_preset(cfg.model.preset);
    } catch (const ConfigError& e) {
      throw ConfigError(source, e.issues());
    }
  }
  throw ConfigError(source, {ConfigIssue{"model.path",
                                         "no model given: set model.path (a Hugging Face model directory) "
                                         "or model.preset (one of " +
                                             join(model_preset_names()) + ") to plan without weights",
                                         0}});
}

}  // namespace qlora
