#include "qlora/model/family.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "qlora/common/errors.h"
#include "qlora/common/input_files.h"
#include "qlora/common/json_file.h"
#include "qlora/common/log.h"
#include "qlora/common/text.h"
#include "config_reader.h"

namespace qlora {
namespace {

using json = nlohmann::json;
using family_detail::Reader;

// ---------------------------------------------------------------- the families

// Each row: model_type, the causal-LM class, what users call it. The keys each reads and the
// defaults its config class applies are in read_family_keys below.
const std::vector<Family> kFamilies = {
    {"llama", "LlamaForCausalLM", "Llama 2, Llama 3.x, SmolLM2, TinyLlama"},
    {"mistral", "MistralForCausalLM", "Mistral 7B"},
    {"qwen2", "Qwen2ForCausalLM", "Qwen2, Qwen2.5"},
    {"qwen3", "Qwen3ForCausalLM", "Qwen3 dense"},
    {"gemma2", "Gemma2ForCausalLM", "Gemma 2"},
    {"gemma3_text", "Gemma3ForCausalLM", "Gemma 3 text-only (270M, 1B)"},
    {"phi3", "Phi3ForCausalLM", "Phi-3, Phi-3.5, Phi-4, Phi-4-mini"},
};


// ---------------------------------------------------------------- RoPE

// yarn's attention factor when config.json gives none (transformers' get_mscale).
double yarn_mscale(double scale, double mscale = 1.0) {
  return scale <= 1 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

void read_rope(const Reader& r, DecoderConfig& c) {
  // transformers < 5 writes rope_theta and rope_scaling; transformers 5 folds both into
  // rope_parameters. Accept either.
  const json* params = r.find(r.root(), "rope_parameters");
  if (params && !params->is_object()) r.fail("rope_parameters", "expected an object, got " + Reader::describe(*params));
  if (params && params->contains("full_attention")) {
    // transformers 5's spelling for a model with local and global layers (Gemma 3): one entry
    // per layer type. The global layers' is the model's RoPE; the local layers' must be unscaled.
    const json& full = (*params)["full_attention"];
    const json global = {{"rope_parameters", full}};
    read_rope(Reader(r.path(), global, r.key_prefix()), c);
    if (const json* local = r.find(*params, "sliding_attention")) {
      const json local_root = {{"rope_parameters", *local}};
      DecoderConfig l;
      read_rope(Reader(r.path(), local_root, r.key_prefix()), l);
      if (l.rope.type != RopeType::kDefault)
        r.fail("rope_parameters.sliding_attention", "scales RoPE; qlora rotates local layers unscaled, as Gemma 3 does");
      c.rope_local_theta = l.rope_theta;
    }
    return;
  }
  if (r.find(r.root(), "rope_theta")) {
    c.rope_theta = r.number(r.root(), "rope_theta", "rope_theta", 0, true);
  } else if (params && r.find(*params, "rope_theta")) {
    c.rope_theta = r.number(*params, "rope_theta", "rope_parameters.rope_theta", 0, true);
  }  // else transformers' default, 10000
  if (c.rope_theta <= 0) r.fail("rope_theta", "expected a positive number");
  for (const json* where : {&r.root(), params}) {
    if (where == nullptr) continue;
    const std::string key = where == params ? "rope_parameters.partial_rotary_factor" : "partial_rotary_factor";
    const double partial = r.number(*where, "partial_rotary_factor", key, 1.0, false);
    if (partial == 1.0) continue;
    if (c.model_type != "phi3")  // transformers' other families rotate the whole head whatever it says
      r.fail(key, "is " + format_double(partial) + "; the " + c.model_type + " layer rotates the whole head "
                  "(partial_rotary_factor 1)");
    const double dims = static_cast<double>(c.head_dim) * partial;
    if (!(partial > 0 && partial < 1) || dims != std::floor(dims) || static_cast<int64_t>(dims) % 2 != 0)
      r.fail(key, "is " + format_double(partial) + "; expected a factor in (0, 1) that turns an even number of "
                  "the head's " + std::to_string(c.head_dim) + " dims");
    c.partial_rotary_factor = partial;
  }

  std::string where = "rope_scaling";
  const json* scaling = r.find(r.root(), "rope_scaling");
  if (!scaling && params) {
    scaling = params;
    where = "rope_parameters";
  }
  if (!scaling) return;
  if (!scaling->is_object()) r.fail(where, "expected an object or null, got " + Reader::describe(*scaling));
  std::string type = r.string(*scaling, "rope_type", where + ".rope_type");
  if (type.empty()) type = r.string(*scaling, "type", where + ".type");  // pre-4.43 spelling
  RopeScaling& rope = c.rope;
  const auto factor = [&](bool required) {
    const double f = r.number(*scaling, "factor", where + ".factor", 1.0, required);
    if (f < 1) r.fail(where + ".factor", "expected a number >= 1, got " + format_double(f));
    return f;
  };
  const auto original_max = [&](bool required, int64_t fallback) -> int64_t {
    const std::string key = "original_max_position_embeddings";
    const json* v = r.find(*scaling, key);
    if (!v) {
      if (required) r.fail(where + "." + key, "missing; it is required (a positive integer)");
      return fallback;
    }
    return r.positive_int(*v, where + "." + key);
  };
  if (type.empty() || type == "default") return;
  if (type == "linear") {
    rope.type = RopeType::kLinear;
    rope.factor = factor(true);
  } else if (type == "dynamic") {
    rope.type = RopeType::kDynamic;
    rope.factor = factor(true);
  } else if (type == "llama3") {
    rope.type = RopeType::kLlama3;
    rope.factor = factor(true);
    rope.low_freq_factor = r.number(*scaling, "low_freq_factor", where + ".low_freq_factor", 0, true);
    rope.high_freq_factor = r.number(*scaling, "high_freq_factor", where + ".high_freq_factor", 0, true);
    rope.original_max_position_embeddings = original_max(true, 0);
    if (rope.low_freq_factor <= 0 || rope.high_freq_factor <= rope.low_freq_factor)
      r.fail(where, "expected factor > 0 and high_freq_factor > low_freq_factor > 0");
  } else if (type == "yarn" && c.model_type != "phi3") {
    rope.type = RopeType::kYarn;
    rope.original_max_position_embeddings = original_max(false, c.max_position_embeddings);
    rope.factor = r.find(*scaling, "factor") ? factor(true)
                                             : static_cast<double>(c.max_position_embeddings) /
                                                   static_cast<double>(rope.original_max_position_embeddings);
    rope.beta_fast = r.number(*scaling, "beta_fast", where + ".beta_fast", 32.0, false);
    rope.beta_slow = r.number(*scaling, "beta_slow", where + ".beta_slow", 1.0, false);
    if (rope.beta_fast == 0) rope.beta_fast = 32.0;  // transformers: `get("beta_fast") or 32`
    if (rope.beta_slow == 0) rope.beta_slow = 1.0;
    rope.truncate = r.boolean(*scaling, "truncate", where + ".truncate", true);
    const double mscale = r.number(*scaling, "mscale", where + ".mscale", 0, false);
    const double mscale_all_dim = r.number(*scaling, "mscale_all_dim", where + ".mscale_all_dim", 0, false);
    if (r.find(*scaling, "attention_factor")) {
      rope.attention_factor = r.number(*scaling, "attention_factor", where + ".attention_factor", 1.0, true);
    } else if (mscale != 0 && mscale_all_dim != 0) {
      rope.attention_factor = yarn_mscale(rope.factor, mscale) / yarn_mscale(rope.factor, mscale_all_dim);
    } else {
      rope.attention_factor = yarn_mscale(rope.factor);
    }
  } else if (type == "longrope" || type == "su" || (type == "yarn" && c.model_type == "phi3")) {
    // (Phi3Config reads its early "su" and "yarn" spellings as longrope.)
    // transformers' _compute_longrope_parameters: Phi-3 keeps the pretrained context in a
    // top-level original_max_position_embeddings and scales by max / original.
    rope.type = RopeType::kLongrope;
    const int64_t half = c.rotary_dim() / 2;
    for (const char* which : {"short_factor", "long_factor"}) {
      const json* f = r.find(*scaling, which);
      const std::string key = where + "." + which;
      if (!f || !f->is_array() || static_cast<int64_t>(f->size()) != half)
        r.fail(key, "expected a list of " + std::to_string(half) + " numbers (half the rotary dims), got " +
                        (f ? Reader::describe(*f) : std::string("nothing")));
      std::vector<double>& out = std::string(which) == "short_factor" ? rope.short_factor : rope.long_factor;
      for (const json& x : *f) {
        if (!x.is_number() || x.get<double>() <= 0) r.fail(key, "expected positive numbers, got " + Reader::describe(x));
        out.push_back(x.get<double>());
      }
    }
    const json* top = r.find(r.root(), "original_max_position_embeddings");
    rope.original_max_position_embeddings =
        top ? r.positive_int(*top, "original_max_position_embeddings") : original_max(false, c.max_position_embeddings);
    const double f = top ? static_cast<double>(c.max_position_embeddings) /
                               static_cast<double>(rope.original_max_position_embeddings)
                         : r.number(*scaling, "factor", where + ".factor", 1.0, false);
    rope.factor = f;
    rope.attention_factor =
        r.find(*scaling, "attention_factor")
            ? r.number(*scaling, "attention_factor", where + ".attention_factor", 1.0, true)
            : (f <= 1.0 ? 1.0
                        : std::sqrt(1 + std::log(f) / std::log(static_cast<double>(rope.original_max_position_embeddings))));
  } else {
    r.fail(where + ".rope_type", "\"" + type + "\" is not supported; qlora implements default, linear, dynamic, "
                                 "yarn and llama3");
  }
}

// ---------------------------------------------------------------- attention windows

// config.json's layer_types (one "full_attention" / "sliding_attention" a layer): which layers
// slide; empty when the key is absent.
std::vector<bool> read_layer_types(const Reader& r, const DecoderConfig& c) {
  const json* types = r.find(r.root(), "layer_types");
  if (!types) return {};
  if (!types->is_array() || static_cast<int64_t>(types->size()) != c.num_hidden_layers)
    r.fail("layer_types", "expected a list of " + std::to_string(c.num_hidden_layers) +
                              " entries (one per layer), got " + Reader::describe(*types));
  std::vector<bool> sliding(types->size(), false);
  for (size_t i = 0; i < types->size(); ++i) {
    const json& t = (*types)[i];
    if (!t.is_string() || (t != "full_attention" && t != "sliding_attention"))
      r.fail("layer_types", "entry " + std::to_string(i) + " is " + Reader::describe(t) +
                                "; expected \"full_attention\" or \"sliding_attention\"");
    sliding[i] = t == "sliding_attention";
  }
  return sliding;
}

void set_windows(DecoderConfig& c, const std::vector<bool>& sliding, int64_t window) {
  c.layer_window.assign(static_cast<size_t>(c.num_hidden_layers), 0);
  for (size_t i = 0; i < sliding.size(); ++i) c.layer_window[i] = sliding[i] ? window : 0;
}

// Qwen2 / Qwen3: the window applies only with use_sliding_window, to the layers layer_types
// names "sliding_attention" or, without layer_types, to layers >= max_window_layers
// (transformers' config classes).
void read_qwen_windows(const Reader& r, DecoderConfig& c) {
  const bool use = r.optional_bool("use_sliding_window", false);
  const int64_t window = r.optional_int("sliding_window", 4096);
  const int64_t max_window_layers = [&] {
    const json* v = r.find(r.root(), "max_window_layers");
    if (!v) return int64_t{28};
    if (!v->is_number_integer() || v->get<int64_t>() < 0)
      r.fail("max_window_layers", "expected an integer >= 0, got " + Reader::describe(*v));
    return v->get<int64_t>();
  }();
  std::vector<bool> sliding = read_layer_types(r, c);
  if (sliding.empty())
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) sliding.push_back(i >= max_window_layers);
  if (use) set_windows(c, sliding, window);
}

// A soft cap: the number, 0 for null (none), `fallback` when absent (the config class's default).
double read_softcap(const Reader& r, const std::string& key, double fallback) {
  if (!r.present(key)) return fallback;
  const double cap = r.number(r.root(), key, key, 0, false);
  if (cap < 0) r.fail(key, "expected a positive number or null, got " + format_double(cap));
  return cap;
}

// Gemma 2 and Gemma 3 (text): (1 + w) RMSNorms before and after attention and the MLP, GeGLU,
// embeddings times sqrt(hidden), scores scaled by query_pre_attn_scalar^-1/2, local (sliding)
// and global layers: Gemma 2 alternates them and soft-caps scores and logits; Gemma 3 has q/k
// norms, five local layers to a global one by default, and the local layers' own RoPE base.
void read_gemma_keys(const Reader& r, DecoderConfig& c) {
  const bool g3 = c.model_type == "gemma3_text";
  LayerPieces& p = c.pieces;
  p.norm_plus_one = p.sandwich_norms = true;
  p.qk_norm = g3;
  p.act = Activation::kGeluTanh;
  p.qkv_bias = p.o_bias = r.optional_bool("attention_bias", false);
  c.scale_embeddings = true;
  // transformers' Gemma MLP reads hidden_activation; hidden_act, which some files also carry, is
  // not read by the model, and neither are the spellings of the window pattern that layer_types
  // or sliding_window_pattern already give (Gemma 2-9B's sliding_window_size, Gemma 3-270M's
  // _sliding_window_pattern) nor the cache class generation picks.
  for (const char* key : {"hidden_act", "sliding_window_size", "_sliding_window_pattern", "cache_implementation"})
    r.present(key);
  if (const std::string act = r.string(r.root(), "hidden_activation", "hidden_activation");
      !act.empty() && act != "gelu_pytorch_tanh")
    r.fail("hidden_activation", "is \"" + act + "\"; the Gemma layer qlora builds computes gelu_pytorch_tanh (GeGLU)");
  c.query_pre_attn_scalar = r.number(r.root(), "query_pre_attn_scalar", "query_pre_attn_scalar", 256, false);
  if (c.query_pre_attn_scalar <= 0) r.fail("query_pre_attn_scalar", "expected a positive number");
  c.attn_logit_softcapping = read_softcap(r, "attn_logit_softcapping", g3 ? 0 : 50.0);
  c.final_logit_softcapping = read_softcap(r, "final_logit_softcapping", g3 ? 0 : 30.0);
  if (r.optional_bool("use_bidirectional_attention", false))
    r.fail("use_bidirectional_attention", "is true: an embedding model's encoder; qlora trains causal decoders");
  const int64_t window = r.optional_int("sliding_window", 4096);
  std::vector<bool> sliding = read_layer_types(r, c);
  const int64_t pattern = g3 ? r.optional_int("sliding_window_pattern", 6) : 2;
  if (sliding.empty())
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) sliding.push_back((i + 1) % pattern != 0);
  set_windows(c, sliding, window);
  if (g3 && (r.present("rope_local_base_freq") || c.rope_local_theta == 0)) {
    c.rope_local_theta = r.number(r.root(), "rope_local_base_freq", "rope_local_base_freq", 10000.0, false);
    if (c.rope_local_theta <= 0) r.fail("rope_local_base_freq", "expected a positive number");
  }
}

// ---------------------------------------------------------------- per family

// The keys each family reads beyond the common ones, with its config class's defaults.
void read_family_keys(const Reader& r, DecoderConfig& c) {
  LayerPieces& p = c.pieces;
  if (c.model_type == "llama") {
    p.qkv_bias = p.o_bias = r.optional_bool("attention_bias", false);
    p.mlp_bias = r.optional_bool("mlp_bias", false);
  } else if (c.model_type == "mistral") {
    // MistralConfig: sliding_window defaults to 4096 when the key is absent; null is no window.
    const bool given = r.present("sliding_window");
    const int64_t window = given ? r.optional_int("sliding_window", 0) : 4096;
    if (window > 0) c.layer_window.assign(static_cast<size_t>(c.num_hidden_layers), window);
  } else if (c.model_type == "qwen2") {
    p.qkv_bias = true;  // Qwen2Attention: q, k, v with bias, o without; attention_bias is not read
    if (r.optional_bool("use_mrope", false))
      r.fail("use_mrope", "is true: this is a Qwen2-VL style multimodal config; qlora trains text decoders");
    read_qwen_windows(r, c);
  } else if (c.model_type == "qwen3") {
    p.qkv_bias = p.o_bias = r.optional_bool("attention_bias", false);
    p.qk_norm = true;
    read_qwen_windows(r, c);
  } else if (c.model_type == "gemma2" || c.model_type == "gemma3_text") {
    read_gemma_keys(r, c);
  } else if (c.model_type == "phi3") {
    // Phi3Config: q|k|v and gate|up fused; every layer slides when sliding_window is set (null
    // or absent: none); residual and embedding dropout must be off, as LoRA's own is lora.dropout.
    p.fused_projections = true;
    p.qkv_bias = p.o_bias = r.optional_bool("attention_bias", false);
    for (const char* key : {"resid_pdrop", "embd_pdrop"})
      if (const double d = r.number(r.root(), key, key, 0, false); d != 0)
        r.fail(key, "is " + format_double(d) + "; qlora trains without it (set it to 0.0; LoRA's own dropout is "
                    "lora.dropout)");
    if (r.present("sliding_window") && r.find(r.root(), "sliding_window"))
      c.layer_window.assign(static_cast<size_t>(c.num_hidden_layers), r.optional_int("sliding_window", 0));
    r.present("original_max_position_embeddings");
    if (r.optional_bool("lm_head_bias", false))
      r.fail("lm_head_bias", "is true; qlora's lm_head has no bias");
    p.mlp_bias = r.optional_bool("mlp_bias", false);
  }
}

// transformers' config-class defaults where they differ by family.
struct Defaults {
  int64_t kv_heads;  // 0: num_attention_heads
  int64_t head_dim;  // 0: hidden_size / num_attention_heads
  int64_t max_positions;
  double rope_theta = 10000.0;
  bool tie_word_embeddings = false;
};

Defaults defaults_of(const std::string& model_type) {
  if (model_type == "mistral") return {8, 0, 4096 * 32};
  if (model_type == "qwen2") return {32, 0, 32768};
  if (model_type == "qwen3") return {32, 128, 32768};
  if (model_type == "phi3") return {0, 0, 4096};
  if (model_type == "gemma2") return {4, 256, 8192, 10000.0, true};
  if (model_type == "gemma3_text") return {4, 256, 131072, 1000000.0, true};
  return {0, 0, 2048};  // llama
}

// Gemma3TextConfig's defaults for the keys a gemma3 config's text_config may leave out (the
// published 4B's gives only hidden_size, intermediate_size, num_hidden_layers, rope_scaling and
// sliding_window): the shapes of the 4B but for its hidden and MLP sizes, and its token ids.
struct TextConfigDefaults {
  int64_t vocab_size = 262208, hidden_size = 2304, intermediate_size = 9216, num_hidden_layers = 26,
          num_attention_heads = 8;
  int64_t pad_token_id = 0, eos_token_id = 1, bos_token_id = 2;
};

json parse_file(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::exists(path, ec))
    throw InputError(path + ": model config not found; model.path must be a Hugging Face model "
                            "directory holding config.json and *.safetensors");
  if (const std::string why = why_not_a_file(path); !why.empty())
    throw InputError(path + ": " + why + "; expected the model's config.json file. Replace it with the "
                            "config.json of the Hugging Face model");
  return read_json_object(path, "cannot read the model config file; check its permissions",
                          "a Hugging Face config.json");
}

}  // namespace

const std::vector<Family>& families() { return kFamilies; }

const Family* find_family(const std::string& model_type) {
  for (const Family& f : kFamilies)
    if (f.model_type == model_type) return &f;
  return nullptr;
}

std::string supported_families_text() {
  std::string out;
  for (const Family& f : kFamilies) out += (out.empty() ? "" : ", ") + f.model_type + " (" + f.models + ")";
  return out + ", gemma3 (Gemma 3 4B, 12B, 27B multimodal: its text part)";
}

int64_t DecoderConfig::min_window() const {
  int64_t w = 0;
  for (int64_t x : layer_window)
    if (x > 0 && (w == 0 || x < w)) w = x;
  return w;
}

int64_t DecoderConfig::max_positions() const {
  if (rope.type != RopeType::kLinear && rope.type != RopeType::kDynamic && rope.type != RopeType::kYarn)
    return max_position_embeddings;
  // A linear factor without original_max_position_embeddings is how extended checkpoints
  // describe themselves (Gemma 3: 131072 positions, factor 8, trained at 131072): transformers
  // has no original length for it, and multiplying would claim 8× what the model has seen.
  if (rope.type == RopeType::kLinear && rope.original_max_position_embeddings <= 0) return max_position_embeddings;
  // dynamic and yarn take max_position_embeddings as the original when none is given, as
  // transformers' RoPE init functions do.
  const int64_t original =
      rope.original_max_position_embeddings > 0 ? rope.original_max_position_embeddings : max_position_embeddings;
  return std::max(max_position_embeddings, static_cast<int64_t>(static_cast<double>(original) * rope.factor));
}

namespace {

// Everything below model_type and architectures, read from `r`'s object as a config of family
// c.model_type. `text`: the object is a multimodal config's text_config (Gemma3TextConfig's
// defaults stand in for the shape keys it leaves out).
void read_text_model(const Reader& r, DecoderConfig& c, const TextConfigDefaults* text) {
  const json& root = r.root();
  if (r.find(root, "quantization_config"))
    r.fail("quantization_config", "this checkpoint is already quantized (GPTQ, AWQ, FP8 or bitsandbytes); qlora "
                                  "quantizes the base itself: point model.path at the original bf16/fp16 model");

  const Defaults def = defaults_of(c.model_type);
  const auto shape = [&](const std::string& key, int64_t fallback) {
    return text ? r.optional_int(key, fallback) : r.required_int(key);
  };
  c.vocab_size = shape("vocab_size", text ? text->vocab_size : 0);
  c.hidden_size = shape("hidden_size", text ? text->hidden_size : 0);
  c.intermediate_size = shape("intermediate_size", text ? text->intermediate_size : 0);
  c.num_hidden_layers = shape("num_hidden_layers", text ? text->num_hidden_layers : 0);
  c.num_attention_heads = shape("num_attention_heads", text ? text->num_attention_heads : 0);
  c.num_key_value_heads = r.optional_int("num_key_value_heads", def.kv_heads > 0 ? def.kv_heads : c.num_attention_heads);
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    r.fail("num_key_value_heads", std::to_string(c.num_key_value_heads) + " does not divide num_attention_heads " +
                                      std::to_string(c.num_attention_heads));
  if (r.find(root, "head_dim")) {
    c.head_dim = r.required_int("head_dim");
  } else if (def.head_dim > 0) {
    c.head_dim = def.head_dim;
  } else {
    if (c.hidden_size % c.num_attention_heads != 0)
      r.fail("num_attention_heads", std::to_string(c.num_attention_heads) + " does not divide hidden_size " +
                                        std::to_string(c.hidden_size) + " and head_dim is not given");
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (c.head_dim % 2 != 0) r.fail("head_dim", "must be even for RoPE, got " + std::to_string(c.head_dim));
  c.max_position_embeddings = r.optional_int("max_position_embeddings", def.max_positions);
  if (const auto ids = r.token_ids("bos_token_id", c.vocab_size, false); !ids.empty()) c.bos_token_id = ids[0];
  c.eos_token_ids = r.token_ids("eos_token_id", c.vocab_size, true);
  if (const auto ids = r.token_ids("pad_token_id", c.vocab_size, false); !ids.empty()) c.pad_token_id = ids[0];
  if (text) {  // absent (not null): Gemma3TextConfig's ids
    if (!r.present("bos_token_id")) c.bos_token_id = text->bos_token_id;
    if (!r.present("eos_token_id")) c.eos_token_ids = {text->eos_token_id};
    if (!r.present("pad_token_id")) c.pad_token_id = text->pad_token_id;
  }
  c.tie_word_embeddings = r.optional_bool("tie_word_embeddings", def.tie_word_embeddings);
  c.rms_norm_eps = r.number(root, "rms_norm_eps", "rms_norm_eps", 1e-6, false);
  if (c.rms_norm_eps <= 0) r.fail("rms_norm_eps", "expected a positive number");
  c.rope_theta = def.rope_theta;
  read_rope(r, c);

  // Keys that change the layer's arithmetic: refused unless they ask for what the layer computes.
  const bool gemma = c.model_type == "gemma2" || c.model_type == "gemma3_text";
  if (const std::string act = gemma ? "" : r.string(root, "hidden_act", "hidden_act"); !act.empty() && act != "silu")
    r.fail("hidden_act", "is \"" + act + "\"; the " + c.model_type + " layer qlora builds computes SiLU (SwiGLU)");
  if (const double p = r.number(root, "attention_dropout", "attention_dropout", 0, false); p != 0)
    r.fail("attention_dropout", "is " + format_double(p) + "; qlora trains without attention dropout (set it to 0.0; "
                                "LoRA's own dropout is lora.dropout)");
  if (r.optional_bool("rope_interleaved", false))
    r.fail("rope_interleaved", "is true; Hugging Face checkpoints rotate halves (false), and so does qlora");
  read_family_keys(r, c);
}

// The keys of a multimodal gemma3 config (Gemma3Config) besides text_config: the image tower
// and how images enter the text (not trained: qlora feeds text only), bookkeeping.
const std::set<std::string> kMultimodalKeys = {
    "vision_config", "mm_tokens_per_image", "boi_token_index", "eoi_token_index", "image_token_index",
    "boi_token_id", "eoi_token_id", "image_token_id", "processor_class"};

// The multimodal Gemma 3 (model_type gemma3, Gemma3ForConditionalGeneration: 4B, 12B, 27B): its
// text_config read as a gemma3_text config, with Gemma3TextConfig's defaults where it is silent.
// The top level's tie_word_embeddings (Gemma3Config's, default true) ties lm_head, as
// transformers ties it; its token ids, where given, are the model's (the -it files list eos
// [1, 106] there). The text model's weights and modules are under "model.language_model.".
void read_gemma3_multimodal(const Reader& top, DecoderConfig& c) {
  const json& root = top.root();
  if (const json* arch = top.find(root, "architectures"); arch && arch->is_array())
    for (const json& a : *arch)
      if (!a.is_string() || a.get<std::string>() != "Gemma3ForConditionalGeneration")
        top.fail("architectures", "lists " + Reader::describe(a) + "; a gemma3 config qlora trains is saved as "
                                  "Gemma3ForConditionalGeneration (its text part is trained)");
  if (top.find(root, "quantization_config"))
    top.fail("quantization_config", "this checkpoint is already quantized (GPTQ, AWQ, FP8 or bitsandbytes); qlora "
                                    "quantizes the base itself: point model.path at the original bf16/fp16 model");
  const json* given = top.find(root, "text_config");
  if (!given)
    top.fail("text_config", "missing; a gemma3 (multimodal) config.json holds its text model's keys there, as the "
                            "published Gemma 3 4B, 12B and 27B files do");
  if (!given->is_object()) top.fail("text_config", "expected an object, got " + Reader::describe(*given));
  json text = *given;
  if (const json* t = top.find(text, "model_type"); t && *t != "gemma3_text")
    top.fail("text_config.model_type", "is " + Reader::describe(*t) + "; a gemma3 config's text model is gemma3_text");
  // The top level's token ids stand for the model (text_config's are the text model's own).
  for (const char* key : {"bos_token_id", "eos_token_id", "pad_token_id"})
    if (top.present(key)) text[key] = root[key];
  for (const std::string& key : kMultimodalKeys) top.present(key);
  const TextConfigDefaults defaults;
  c.model_type = "gemma3_text";
  c.module_prefix = kGemma3TextPrefix;
  Reader r(top.path(), text, "text_config.");
  read_text_model(r, c, &defaults);
  // text_config's own tie_word_embeddings ties nothing (its model has no lm_head).
  r.present("tie_word_embeddings");
  c.tie_word_embeddings = top.optional_bool("tie_word_embeddings", true);
  c.unread_keys = r.unread();
}

}  // namespace

DecoderConfig read_decoder_config(const std::string& path) {
  namespace fs = std::filesystem;
  const json root = parse_file(path);
  Reader r(path, root);

  DecoderConfig c;
  c.name = fs::path(path).parent_path().string();
  if (c.name.empty()) c.name = path;

  std::vector<std::string> types;
  for (const Family& f : kFamilies) types.push_back(f.model_type);
  types.push_back("gemma3");
  const json* type = r.find(root, "model_type");
  if (!type) r.fail("model_type", "missing; qlora trains " + supported_families_text());
  if (!type->is_string()) r.fail("model_type", "expected a string, got " + Reader::describe(*type));
  c.model_type = type->get<std::string>();
  const Family* family = find_family(c.model_type);
  if (c.model_type == "gemma3") {
    read_gemma3_multimodal(r, c);
  } else {
    if (family == nullptr) {
      std::string msg = "is \"" + c.model_type + "\", which qlora does not train";
      if (const std::string near = closest_match(c.model_type, types); !near.empty())
        msg += " (did you mean \"" + near + "\"?)";
      r.fail("model_type", msg + "; supported: " + supported_families_text());
    }
    if (const json* arch = r.find(root, "architectures"); arch && arch->is_array()) {
      for (const json& a : *arch) {
        const std::string name = a.is_string() ? a.get<std::string>() : a.dump();
        if (!ends_with(name, "ForCausalLM"))
          r.fail("architectures", "lists \"" + name + "\"; qlora trains causal language models (" +
                                      family->architecture + "): a checkpoint with another head cannot be trained here");
      }
    }
    read_text_model(r, c, nullptr);
  }

  c.torch_dtype = r.string(root, "torch_dtype", "torch_dtype");
  if (c.torch_dtype.empty()) c.torch_dtype = r.string(root, "dtype", "dtype");  // transformers 5
  for (std::string& key : r.unread()) c.unread_keys.push_back(std::move(key));
  if (!c.unread_keys.empty())
    log::warn(path + ": keys qlora does not read (they are ignored; check that none changes the model's "
                     "arithmetic): " + join(c.unread_keys));
  return c;
}

}  // namespace qlora
