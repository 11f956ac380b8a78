#include "qlora/lora/adapter_io.h"

#include <nlohmann/json.hpp>
#include <set>

#include "qlora/common/errors.h"
#include "qlora/common/json_file.h"
#include "qlora/model/decoder_config.h"

namespace qlora::lora {
namespace {

using json = nlohmann::json;

// The PEFT release whose adapter_config.json fields we write; PeftModel uses
// peft_version only to warn about newer formats.
constexpr const char* kPeftFormatVersion = "0.21.0";

[[noreturn]] void fail(const std::string& path, const std::string& key, const std::string& what) {
  throw InputError(path + ": key \"" + key + "\": " + what);
}

std::string describe(const json& v) {
  std::string text = v.dump();
  if (text.size() > 40) text = text.substr(0, 37) + "...";
  return std::string(v.type_name()) + " " + text;
}

bool is_unset(const json& root, const std::string& key) {
  auto it = root.find(key);
  if (it == root.end() || it->is_null()) return true;
  if (it->is_boolean()) return !it->get<bool>();
  if (it->is_object() || it->is_array()) return it->empty();
  return false;
}

// A feature of PEFT's LoRA that the trainer does not implement: refuse rather
// than load something that computes differently.
void refuse_if_set(const std::string& path, const json& root, const std::string& key, const std::string& what) {
  if (!is_unset(root, key))
    fail(path, key, "is " + describe(root.at(key)) + "; qlora loads plain LoRA adapters and does not implement " +
                        what + ". Remove it or use PEFT for this adapter");
}

}  // namespace

LoraSettings read_adapter_config(const std::string& path) {
  json root = read_json_object(path,
                               "cannot read the adapter config; a PEFT adapter directory holds adapter_config.json "
                               "and adapter_model.safetensors");

  const json* type = root.contains("peft_type") ? &root["peft_type"] : nullptr;
  if (!type || !type->is_string() || type->get<std::string>() != "LORA")
    fail(path, "peft_type", std::string("expected \"LORA\", got ") + (type ? describe(*type) : "nothing"));

  LoraSettings s;
  if (!root.contains("r") || !root["r"].is_number_integer() || root["r"].get<int64_t>() <= 0)
    fail(path, "r", "expected a positive integer, got " + (root.contains("r") ? describe(root["r"]) : "nothing"));
  s.r = root["r"].get<int64_t>();
  if (!root.contains("lora_alpha") || !root["lora_alpha"].is_number())
    fail(path, "lora_alpha",
         "expected a number, got " + (root.contains("lora_alpha") ? describe(root["lora_alpha"]) : "nothing"));
  s.alpha = root["lora_alpha"].get<double>();
  if (root.contains("lora_dropout") && !root["lora_dropout"].is_null()) {
    if (!root["lora_dropout"].is_number()) fail(path, "lora_dropout", "expected a number");
    s.dropout = root["lora_dropout"].get<double>();
    if (s.dropout < 0 || s.dropout >= 1) fail(path, "lora_dropout", "expected a value in [0, 1)");
  }
  if (root.contains("use_rslora") && !root["use_rslora"].is_null()) {
    if (!root["use_rslora"].is_boolean()) fail(path, "use_rslora", "expected true or false");
    s.rslora = root["use_rslora"].get<bool>();
  }

  const json* targets = root.contains("target_modules") ? &root["target_modules"] : nullptr;
  if (targets && targets->is_string()) {
    s.target_regex = targets->get<std::string>();
    if (s.target_regex == "all-linear") {
      s.target_regex.clear();
      s.target_modules = {"all-linear"};
    }
  } else if (targets && targets->is_array() && !targets->empty()) {
    for (const auto& t : *targets) {
      if (!t.is_string()) fail(path, "target_modules", "expected a list of strings, found " + describe(t));
      s.target_modules.push_back(t.get<std::string>());
    }
  } else {
    fail(path, "target_modules",
         "expected a list of module names or a regular expression, got " + (targets ? describe(*targets) : "nothing"));
  }

  refuse_if_set(path, root, "use_dora", "DoRA");
  refuse_if_set(path, root, "lora_bias", "LoRA biases");
  refuse_if_set(path, root, "fan_in_fan_out", "transposed (Conv1D) base weights");
  refuse_if_set(path, root, "rank_pattern", "per-module ranks");
  refuse_if_set(path, root, "alpha_pattern", "per-module alphas");
  refuse_if_set(path, root, "modules_to_save", "fully trained extra modules");
  refuse_if_set(path, root, "layers_to_transform", "restricting LoRA to some layers");
  refuse_if_set(path, root, "layer_replication", "layer replication");
  refuse_if_set(path, root, "exclude_modules", "excluded modules");
  refuse_if_set(path, root, "trainable_token_indices", "trainable token embeddings");
  refuse_if_set(path, root, "target_parameters", "LoRA on parameters");
  refuse_if_set(path, root, "use_qalora", "QALoRA");
  if (root.contains("bias") && !(root["bias"].is_string() && root["bias"].get<std::string>() == "none"))
    fail(path, "bias", "is " + describe(root["bias"]) + "; qlora trains no biases (expected \"none\")");
  return s;
}

std::string adapter_config_json(const LoraAdapter& adapter, const std::string& base_model) {
  const LoraSettings& s = adapter.settings();
  json targets;
  if (!s.target_regex.empty()) {
    targets = s.target_regex;
  } else {
    // The short names of the wrapped projections: equivalent under PEFT's
    // suffix rule (Note [LoRA target matching]) and readable.
    std::set<std::string> names;
    for (const auto& m : adapter.module_names()) names.insert(m.substr(m.rfind('.') + 1));
    targets = json::array();
    for (const auto& n : names) targets.push_back(n);
    // The text part of a multimodal model: its image tower has q_proj, k_proj, ... too, which
    // short names would make PEFT wrap. A regular expression (PEFT matches the whole module
    // name) keeps PEFT to the decoder layers qlora trained.
    const std::string& first = adapter.module_names().front();
    // transformers before 4.52 named the same modules "language_model.model.layers...": both
    // spellings are accepted, so PEFT of either age finds them.
    if (const size_t at = first.find("layers."); at != std::string::npos && first.compare(0, at, "model.") != 0) {
      const auto escaped = [](const std::string& text) {
        std::string out;
        for (const char ch : text) out += ch == '.' ? std::string("\\.") : std::string(1, ch);
        return out;
      };
      const std::string prefix = first.substr(0, at);
      std::string re = escaped(prefix);
      if (prefix == kGemma3TextPrefix)  // "(model\.language_model|language_model\.model)\."
        re = "(" + escaped("model.language_model") + "|" + escaped("language_model.model") + ")\\.";
      re += "layers\\.\\d+\\.(self_attn|mlp)\\.(";
      for (const auto& n : names) re += (re.back() == '(' ? "" : "|") + n;
      targets = re + ")";
    }
  }
  // Every field PEFT 0.21's LoraConfig serializes, with its default unless ours
  // differs, so PEFT reads the file without falling back on guesses.
  json j = {
      {"alora_invocation_tokens", nullptr},
      {"alpha_pattern", json::object()},
      {"arrow_config", nullptr},
      {"auto_mapping", nullptr},
      {"base_model_name_or_path", base_model},
      {"bias", "none"},
      {"corda_config", nullptr},
      {"ensure_weight_tying", false},
      {"eva_config", nullptr},
      {"exclude_modules", nullptr},
      {"fan_in_fan_out", false},
      {"inference_mode", true},
      {"init_lora_weights", true},
      {"kasa_config", nullptr},
      {"layer_replication", nullptr},
      {"layers_pattern", nullptr},
      {"layers_to_transform", nullptr},
      {"loftq_config", json::object()},
      {"lora_alpha", s.alpha},
      {"lora_bias", false},
      {"lora_dropout", s.dropout},
      {"lora_ga_config", nullptr},
      {"megatron_config", nullptr},
      {"megatron_core", "megatron.core"},
      {"modules_to_save", nullptr},
      {"monteclora_config", nullptr},
      {"peft_type", "LORA"},
      {"peft_version", kPeftFormatVersion},
      {"qalora_group_size", 16},
      {"r", s.r},
      {"rank_pattern", json::object()},
      {"revision", nullptr},
      {"target_modules", targets},
      {"target_parameters", nullptr},
      {"task_type", "CAUSAL_LM"},
      {"trainable_token_indices", nullptr},
      {"use_bdlora", nullptr},
      {"use_dora", false},
      {"use_qalora", false},
      {"use_rslora", s.rslora},
      {"velora_config", nullptr},
  };
  // PEFT writes an integral alpha as an integer (16, not 16.0).
  if (s.alpha == static_cast<double>(static_cast<int64_t>(s.alpha))) j["lora_alpha"] = static_cast<int64_t>(s.alpha);
  return j.dump(2) + "\n";
}

}  // namespace qlora::lora
