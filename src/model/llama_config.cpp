#include "qlora/model/llama_config.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "qlora/common/errors.h"
#include "qlora/common/input_files.h"
#include "qlora/common/text.h"
#include "qlora/config/config.h"

namespace qlora {
namespace {

using json = nlohmann::json;

// ---------------------------------------------------------------- presets
// Every number below is copied from the model's Hugging Face config.json
// (repository named in the comment), not derived. Llama 3.x and Mistral list
// head_dim explicitly; Llama 2 does not, and hidden / heads = 128 there too.

// One row per preset; rope_factor > 0 means Llama 3.1-style rope_scaling
// (low 1, high 4, original context 8192, as all Llama 3.1 / 3.2 configs say).
struct PresetRow {
  const char* name;
  const char* model_type;
  int64_t vocab, hidden, intermediate, layers, heads, kv_heads, head_dim, max_positions;
  bool tied;
  double rope_theta, rope_factor;
  int64_t sliding_window;
  const char* dtype;
};

// clang-format off
constexpr PresetRow kPresetRows[] = {
  // name            type       vocab   hidden inter  layers heads kv head max_pos tied   theta     factor window dtype
  {"llama-3.2-1b",  "llama",   128256, 2048,  8192,  16,    32,   8, 64,  131072, true,  500000.0, 32.0,  0,     "bfloat16"},  // meta-llama/Llama-3.2-1B
  {"llama-3.2-3b",  "llama",   128256, 3072,  8192,  28,    24,   8, 128, 131072, true,  500000.0, 32.0,  0,     "bfloat16"},  // meta-llama/Llama-3.2-3B
  {"llama-3.1-8b",  "llama",   128256, 4096,  14336, 32,    32,   8, 128, 131072, false, 500000.0, 8.0,   0,     "bfloat16"},  // meta-llama/Llama-3.1-8B
  {"llama-2-7b",    "llama",   32000,  4096,  11008, 32,    32,  32, 128, 4096,   false, 10000.0,  0,     0,     "float16"},   // meta-llama/Llama-2-7b-hf
  {"mistral-7b",    "mistral", 32000,  4096,  14336, 32,    32,   8, 128, 32768,  false, 10000.0,  0,     4096,  "bfloat16"},  // mistralai/Mistral-7B-v0.1
  {"llama-3.1-70b", "llama",   128256, 8192,  28672, 80,    64,   8, 128, 131072, false, 500000.0, 8.0,   0,     "bfloat16"},  // meta-llama/Llama-3.1-70B
};
// clang-format on

std::vector<LlamaConfig> make_presets() {
  std::vector<LlamaConfig> out;
  for (const PresetRow& r : kPresetRows) {
    LlamaConfig c;
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
    c.rms_norm_eps = 1e-5;  // every preset's config.json says 1e-05
    c.sliding_window = r.sliding_window;
    c.torch_dtype = r.dtype;
    if (r.rope_factor > 0) {
      c.has_llama3_rope_scaling = true;
      c.rope_scaling_factor = r.rope_factor;
      c.rope_low_freq_factor = 1.0;
      c.rope_high_freq_factor = 4.0;
      c.rope_original_max_position_embeddings = 8192;
    }
    out.push_back(c);
  }
  return out;
}

const std::vector<LlamaConfig>& presets() {
  static const std::vector<LlamaConfig> all = make_presets();
  return all;
}

// ---------------------------------------------------------------- config.json reading

// Reads typed keys of one config.json object; every failure names the file and key.
class Reader {
 public:
  Reader(std::string path, const json& root) : path_(std::move(path)), root_(root) {}

  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    throw InputError(path_ + ": key \"" + key + "\": " + what);
  }

  static std::string describe(const json& v) {
    std::string text = v.dump();
    if (text.size() > 40) text = text.substr(0, 37) + "...";
    return std::string(v.type_name()) + " " + text;
  }

  // nullptr when absent or null.
  const json* find(const json& obj, const std::string& key) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return nullptr;
    return &*it;
  }

  int64_t positive_int(const json& v, const std::string& key) const {
    if (!v.is_number_integer()) fail(key, "expected a positive integer, got " + describe(v));
    int64_t n = v.get<int64_t>();
    if (n <= 0) fail(key, "expected a positive integer, got " + std::to_string(n));
    return n;
  }

  int64_t required_int(const std::string& key) const {
    const json* v = find(root_, key);
    if (!v) fail(key, "missing; it is required (a positive integer)");
    return positive_int(*v, key);
  }

  int64_t optional_int(const std::string& key, int64_t fallback) const {
    const json* v = find(root_, key);
    return v ? positive_int(*v, key) : fallback;
  }

  double number(const json& obj, const std::string& key, const std::string& shown_key,
                double fallback, bool required) const {
    const json* v = find(obj, key);
    if (!v) {
      if (required) fail(shown_key, "missing; it is required (a number)");
      return fallback;
    }
    if (!v->is_number()) fail(shown_key, "expected a number, got " + describe(*v));
    return v->get<double>();
  }

  bool optional_bool(const std::string& key, bool fallback) const {
    const json* v = find(root_, key);
    if (!v) return fallback;
    if (!v->is_boolean()) fail(key, "expected true or false, got " + describe(*v));
    return v->get<bool>();
  }

  std::string optional_string(const json& obj, const std::string& key, const std::string& shown_key) const {
    const json* v = find(obj, key);
    if (!v) return "";
    if (!v->is_string()) fail(shown_key, "expected a string, got " + describe(*v));
    return v->get<std::string>();
  }

  // A token id key (bos_token_id, ...): an integer naming a row of the embedding; `list_ok`:
  // a list of them is accepted too (eos_token_id). Empty when absent or null; pad_token_id -1
  // is "none", as old conversions wrote it.
  std::vector<int64_t> token_ids(const std::string& key, int64_t vocab_size, bool list_ok) const {
    const json* v = find(root_, key);
    if (!v) return {};
    if (key == "pad_token_id" && v->is_number_integer() && v->get<int64_t>() == -1) return {};
    const bool list = v->is_array() && list_ok && !v->empty();
    std::vector<int64_t> ids;
    for (const json& e : list ? *v : json::array({*v})) {
      if (!e.is_number_integer())
        fail(key, std::string("expected a token id (an integer") + (list_ok ? ", or a list of them" : "") +
                      "), got " + describe(*v));
      const int64_t id = e.get<int64_t>();
      if (id < 0 || id >= vocab_size)
        fail(key, std::to_string(id) + " is not a token of the model: its embedding has vocab_size " +
                      std::to_string(vocab_size) + " rows (ids 0.." + std::to_string(vocab_size - 1) +
                      "). Fix " + key + ", or use the config.json that came with these weights");
      ids.push_back(id);
    }
    return ids;
  }

  const json& root() const { return root_; }

 private:
  std::string path_;
  const json& root_;
};

void read_rope(const Reader& r, LlamaConfig& c) {
  // transformers < 5 writes rope_theta and rope_scaling; transformers 5 folds
  // both into rope_parameters. Accept either.
  const json* params = r.find(r.root(), "rope_parameters");
  if (params && !params->is_object()) r.fail("rope_parameters", "expected an object, got " + Reader::describe(*params));
  if (r.find(r.root(), "rope_theta")) {
    c.rope_theta = r.number(r.root(), "rope_theta", "rope_theta", 0, true);
  } else if (params && r.find(*params, "rope_theta")) {
    c.rope_theta = r.number(*params, "rope_theta", "rope_parameters.rope_theta", 0, true);
  }  // else transformers' default, 10000
  if (c.rope_theta <= 0) r.fail("rope_theta", "expected a positive number");

  std::string where = "rope_scaling";
  const json* scaling = r.find(r.root(), "rope_scaling");
  if (!scaling && params) {
    scaling = params;
    where = "rope_parameters";
  }
  if (!scaling) return;
  if (!scaling->is_object()) r.fail(where, "expected an object or null, got " + Reader::describe(*scaling));
  std::string type = r.optional_string(*scaling, "rope_type", where + ".rope_type");
  if (type.empty()) type = r.optional_string(*scaling, "type", where + ".type");  // pre-4.43 spelling
  if (type.empty() || type == "default") return;
  if (type != "llama3")
    r.fail(where + ".rope_type", "\"" + type +
                                     "\" is not supported; qlora implements \"llama3\" (Llama 3.1 / 3.2) "
                                     "and plain RoPE (no rope_scaling)");
  c.has_llama3_rope_scaling = true;
  c.rope_scaling_factor = r.number(*scaling, "factor", where + ".factor", 0, true);
  c.rope_low_freq_factor = r.number(*scaling, "low_freq_factor", where + ".low_freq_factor", 0, true);
  c.rope_high_freq_factor = r.number(*scaling, "high_freq_factor", where + ".high_freq_factor", 0, true);
  const std::string orig_key = "original_max_position_embeddings";
  const json* orig = r.find(*scaling, orig_key);
  if (!orig) r.fail(where + "." + orig_key, "missing; it is required (a positive integer)");
  c.rope_original_max_position_embeddings = r.positive_int(*orig, where + "." + orig_key);
  if (c.rope_scaling_factor <= 0 || c.rope_low_freq_factor <= 0 ||
      c.rope_high_freq_factor <= c.rope_low_freq_factor)
    r.fail(where, "expected factor > 0 and high_freq_factor > low_freq_factor > 0");
}

}  // namespace

// ---------------------------------------------------------------- shapes

const std::vector<std::string>& decoder_linear_names() {
  static const std::vector<std::string> names = {"q_proj", "k_proj",    "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"};
  return names;
}

std::vector<LinearShape> decoder_linear_shapes(const LlamaConfig& m) {
  const int64_t h = m.hidden_size, q = m.num_attention_heads * m.head_dim,
                kv = m.num_key_value_heads * m.head_dim, i = m.intermediate_size;
  return {{"q_proj", h, q},    {"k_proj", h, kv}, {"v_proj", h, kv},  {"o_proj", q, h},
          {"gate_proj", h, i}, {"up_proj", h, i}, {"down_proj", i, h}};
}

int64_t decoder_linear_params(const LlamaConfig& m) {
  int64_t per_layer = 0;
  for (const auto& s : decoder_linear_shapes(m)) per_layer += s.in_features * s.out_features;
  return per_layer * m.num_hidden_layers;
}

int64_t total_params(const LlamaConfig& m) {
  const int64_t embed = m.vocab_size * m.hidden_size;
  const int64_t norms = (2 * m.num_hidden_layers + 1) * m.hidden_size;
  return decoder_linear_params(m) + embed + (m.tie_word_embeddings ? 0 : embed) + norms;
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

LlamaConfig model_preset(const std::string& name) {
  for (const auto& p : presets())
    if (p.name == to_lower(name)) return p;
  std::string msg = "unknown preset \"" + name + "\"";
  const std::string near = closest_match(name, model_preset_names());
  if (!near.empty()) msg += "; did you mean \"" + near + "\"?";
  msg += " Presets: " + join(model_preset_names()) + " (or set model.path to a model directory)";
  throw ConfigError("model.preset", {ConfigIssue{"model.preset", msg, 0}});
}

// ---------------------------------------------------------------- config.json

LlamaConfig read_llama_config(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::exists(path, ec))
    throw InputError(path + ": model config not found; model.path must be a Hugging Face model "
                            "directory holding config.json and *.safetensors");
  if (const std::string why = why_not_a_file(path); !why.empty())
    throw InputError(path + ": " + why + "; expected the model's config.json file. Replace it with the "
                            "config.json of the Hugging Face model");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(path + ": cannot read the model config file; check its permissions");
  std::stringstream buf;
  buf << in.rdbuf();

  json root;
  try {
    root = json::parse(buf.str());
  } catch (const json::parse_error& e) {
    throw InputError(path + ": not valid JSON (" + std::string(e.what()) +
                     "); expected a Hugging Face config.json");
  }
  if (!root.is_object())
    throw InputError(path + ": expected a JSON object (a Hugging Face config.json), got " +
                     std::string(root.type_name()));
  Reader r(path, root);

  LlamaConfig c;
  c.name = fs::path(path).parent_path().string();
  if (c.name.empty()) c.name = path;

  const json* type = r.find(root, "model_type");
  if (!type) r.fail("model_type", "missing; expected \"llama\" or \"mistral\"");
  if (!type->is_string()) r.fail("model_type", "expected a string, got " + Reader::describe(*type));
  c.model_type = type->get<std::string>();
  if (c.model_type != "llama" && c.model_type != "mistral")
    r.fail("model_type", "is \"" + c.model_type +
                             "\"; qlora trains Llama-family decoders: model_type \"llama\" (Llama 2, "
                             "Llama 3.x, TinyLlama, ...) or \"mistral\" (Mistral 7B)");

  c.vocab_size = r.required_int("vocab_size");
  c.hidden_size = r.required_int("hidden_size");
  c.intermediate_size = r.required_int("intermediate_size");
  c.num_hidden_layers = r.required_int("num_hidden_layers");
  c.num_attention_heads = r.required_int("num_attention_heads");
  c.num_key_value_heads = r.optional_int("num_key_value_heads", c.num_attention_heads);
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    r.fail("num_key_value_heads", std::to_string(c.num_key_value_heads) +
                                      " does not divide num_attention_heads " +
                                      std::to_string(c.num_attention_heads));
  if (r.find(root, "head_dim")) {
    c.head_dim = r.required_int("head_dim");
  } else {
    if (c.hidden_size % c.num_attention_heads != 0)
      r.fail("num_attention_heads", std::to_string(c.num_attention_heads) + " does not divide hidden_size " +
                                        std::to_string(c.hidden_size) + " and head_dim is not given");
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (c.head_dim % 2 != 0) r.fail("head_dim", "must be even for RoPE, got " + std::to_string(c.head_dim));
  // transformers' LlamaConfig / MistralConfig defaults for the optional keys.
  c.max_position_embeddings = r.optional_int("max_position_embeddings", 2048);
  if (const auto ids = r.token_ids("bos_token_id", c.vocab_size, false); !ids.empty()) c.bos_token_id = ids[0];
  c.eos_token_ids = r.token_ids("eos_token_id", c.vocab_size, true);
  if (const auto ids = r.token_ids("pad_token_id", c.vocab_size, false); !ids.empty()) c.pad_token_id = ids[0];
  c.tie_word_embeddings = r.optional_bool("tie_word_embeddings", false);
  c.rms_norm_eps = r.number(root, "rms_norm_eps", "rms_norm_eps", 1e-6, false);
  if (c.rms_norm_eps <= 0) r.fail("rms_norm_eps", "expected a positive number");
  read_rope(r, c);
  // Keys that change the layer's arithmetic: refused unless they ask for what the layer
  // computes (SiLU gating, no biases), never read and ignored.
  if (const std::string act = r.optional_string(root, "hidden_act", "hidden_act"); !act.empty() && act != "silu")
    r.fail("hidden_act", "is \"" + act + "\"; qlora's Llama-family layer computes SiLU (SwiGLU) only");
  for (const char* key : {"attention_bias", "mlp_bias"})
    if (r.optional_bool(key, false))
      r.fail(key, "is true; qlora's Llama-family layer has no bias terms in its projections");
  if (c.model_type == "mistral") c.sliding_window = r.optional_int("sliding_window", 0);
  c.torch_dtype = r.optional_string(root, "torch_dtype", "torch_dtype");
  if (c.torch_dtype.empty()) c.torch_dtype = r.optional_string(root, "dtype", "dtype");  // transformers 5
  return c;
}

LlamaConfig resolve_model_shape(const Config& cfg) {
  const std::string source = cfg.source.empty() ? "<config>" : cfg.source;
  if (!cfg.model.path.empty()) {
    namespace fs = std::filesystem;
    std::error_code ec;
    fs::path p(cfg.model.path);
    if (is_gguf_file(p.string())) throw InputError(p.string() + ": is a GGUF file; " + kGgufHint);
    if (!fs::is_directory(p, ec) && p.filename() == "config.json") return read_llama_config(p.string());
    return read_llama_config((p / "config.json").string());
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
