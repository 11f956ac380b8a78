// load_tokenizer: find the tokenizer file of a model directory, read it by its content, and
// take bos/eos/pad/add_bos from the configs Hugging Face keeps beside it.
#include "qlora/data/tokenizer.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "data/tokenizer_bpe.h"
#include "qlora/common/errors.h"
#include "qlora/common/input_files.h"

namespace qlora::data {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// A config file beside the tokenizer; null when absent. Malformed JSON is an error: a broken
// tokenizer_config.json silently ignored would change bos/eos.
json read_optional_json(const fs::path& p) {
  std::error_code ec;
  if (!fs::exists(p, ec)) return json();
  if (const std::string why = why_not_a_file(p.string()); !why.empty())
    throw InputError(p.string() + ": " + why + "; expected the model's " + p.filename().string() +
                     " file (or none). Replace it with the file from the model's download, or remove it");
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    json j = json::parse(ss.str());
    if (!j.is_object()) throw InputError(p.string() + ": expected a JSON object");
    return j;
  } catch (const json::parse_error& e) {
    throw InputError(p.string() + ": not valid JSON (" + std::string(e.what()) + ")");
  }
}

// "bos_token": "<s>" or {"content": "<s>", ...}; nullopt when absent or null.
std::optional<std::string> token_name(const json& cfg, const char* key, const fs::path& file) {
  if (!cfg.is_object() || !cfg.contains(key) || cfg[key].is_null()) return std::nullopt;
  const json& v = cfg[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) {
    return v["content"].get<std::string>();
  }
  throw InputError(file.string() + ": " + key + " is " + v.dump().substr(0, 80) +
                   ", expected a token string or an object with a \"content\" string");
}

int32_t resolve(const Tokenizer& tok, const std::string& name, const char* key,
                const fs::path& file) {
  if (auto id = tok.token_id(name)) return *id;
  throw InputError(file.string() + ": " + key + " \"" + name + "\" is not a token of " +
                   tok.path() + "; fix the config or use the tokenizer files of the same model");
}

std::unique_ptr<Tokenizer> load_model_file(const std::string& file) {
  if (looks_like_tiktoken(file)) return load_tiktoken_tokenizer(file);
  return load_sentencepiece_tokenizer(file);
}

}  // namespace

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path) {
  std::error_code ec;
  const fs::path p(path);
  fs::path dir;
  std::unique_ptr<Tokenizer> tok;
  if (fs::is_directory(p, ec)) {
    dir = p;
    const fs::path json_file = p / "tokenizer.json", model_file = p / "tokenizer.model";
    for (const fs::path& f : {json_file, model_file}) {
      if (fs::exists(f, ec) && !fs::is_regular_file(f, ec))
        throw InputError(f.string() + ": " + why_not_a_file(f.string()) + "; expected the model's " +
                         f.filename().string() + " file. Replace it with the file from the model's download");
    }
    const bool has_json = fs::is_regular_file(json_file, ec);
    const bool has_model = fs::is_regular_file(model_file, ec);
    // tokenizer.json first: it is what transformers (and the servers) load when present.
    if (has_json) {
      tok = load_tokenizer_json(json_file.string());
    } else if (has_model) {
      tok = load_model_file(model_file.string());
    } else {
      throw InputError(path + ": no tokenizer.json or tokenizer.model in this directory; copy "
                       "the tokenizer files of the model here or point at a tokenizer file");
    }
  } else if (fs::is_regular_file(p, ec)) {
    dir = p.parent_path();
    tok = p.extension() == ".json" ? load_tokenizer_json(path) : load_model_file(path);
  } else {
    throw InputError("tokenizer path " + path + " does not exist; expected a model directory "
                     "or a tokenizer.json / tokenizer.model file");
  }

  // Precedence, highest first: tokenizer_config.json, special_tokens_map.json,
  // generation_config.json (eos only; the first of a list), the loader's defaults.
  const fs::path cfg_path = dir / "tokenizer_config.json";
  const fs::path map_path = dir / "special_tokens_map.json";
  const fs::path gen_path = dir / "generation_config.json";
  const json cfg = read_optional_json(cfg_path);
  const json map = read_optional_json(map_path);
  const json gen = read_optional_json(gen_path);
  int32_t bos = tok->bos_id(), eos = tok->eos_id(), pad = tok->pad_id();
  bool add_bos = tok->add_bos();

  if (gen.is_object() && gen.contains("eos_token_id") && !gen["eos_token_id"].is_null()) {
    const json& e = gen["eos_token_id"];
    const json& first = e.is_array() && !e.empty() ? e[0] : e;
    if (!first.is_number_integer() || first.get<int64_t>() < 0 ||
        first.get<int64_t>() >= tok->vocab_size()) {
      throw InputError(gen_path.string() + ": eos_token_id is " + e.dump() +
                       ", expected a token id (or a list of them) below the vocabulary size " +
                       std::to_string(tok->vocab_size()) + " of " + tok->path());
    }
    eos = first.get<int32_t>();
  }
  for (const auto& [cfg_j, file] : {std::pair<const json&, const fs::path&>{map, map_path},
                                    std::pair<const json&, const fs::path&>{cfg, cfg_path}}) {
    if (auto n = token_name(cfg_j, "bos_token", file)) bos = resolve(*tok, *n, "bos_token", file);
    if (auto n = token_name(cfg_j, "eos_token", file)) eos = resolve(*tok, *n, "eos_token", file);
    if (auto n = token_name(cfg_j, "pad_token", file)) pad = resolve(*tok, *n, "pad_token", file);
  }
  if (cfg.is_object() && cfg.contains("add_bos_token")) {
    if (!cfg["add_bos_token"].is_boolean()) {
      throw InputError(cfg_path.string() + ": add_bos_token is " + cfg["add_bos_token"].dump() +
                       ", expected true or false");
    }
    add_bos = cfg["add_bos_token"].get<bool>();
  }
  if (tok->kind() == "sentencepiece" && cfg.is_object()) {
    const bool legacy = cfg.value("legacy", false) == true;
    const bool prefix = !cfg.contains("add_prefix_space") || cfg["add_prefix_space"].is_null() ||
                        cfg["add_prefix_space"] == true;
    set_sentencepiece_prefix_scheme(*tok, legacy, prefix);
  }
  tok->set_special_ids(bos, eos, pad, add_bos && bos >= 0);
  return tok;
}

}  // namespace qlora::data
