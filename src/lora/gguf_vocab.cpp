#include "gguf_vocab.h"

#include <sentencepiece_processor.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "qlora/common/errors.h"

namespace qlora::lora::detail {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// llama.cpp's token types.
enum TokenType : int32_t { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };

// The first of `dirs` holding `file`, or "".
std::string find_file(const std::vector<std::string>& dirs, const std::string& file) {
  std::error_code ec;
  for (const auto& d : dirs)
    if (fs::is_regular_file(fs::path(d) / file, ec)) return (fs::path(d) / file).string();
  return "";
}

json read_json(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(path + ": cannot read the file");
  std::stringstream buf;
  buf << in.rdbuf();
  try {
    return json::parse(buf.str());
  } catch (const json::parse_error& e) {
    throw InputError(path + ": not valid JSON (" + std::string(e.what()) + ")");
  }
}

// Added tokens some models do not mark special that llama.cpp's converter treats as control.
bool looks_special(const std::string& t) {
  auto wrapped = [&](const std::string& open, const std::string& close) {
    return t.size() >= open.size() + close.size() && t.rfind(open, 0) == 0 &&
           t.compare(t.size() - close.size(), close.size(), close) == 0;
  };
  return t == "<pad>" || t == "<mask>" || t == "<2mass>" || t == "[@BOS@]" || wrapped("<|", "|>") ||
         wrapped("<\xef\xbd\x9c", "\xef\xbd\x9c>") || wrapped("<unused", ">");
}

// U+2581 (sentencepiece's space) as a space: user-defined tokens are matched pre-normalized.
std::string spaces_restored(std::string t) {
  const std::string mark = "\xe2\x96\x81";
  for (size_t p = t.find(mark); p != std::string::npos; p = t.find(mark, p + 1)) t.replace(p, mark.size(), " ");
  return t;
}

// A special token of tokenizer_config.json: a string, or an AddedToken object with "content".
std::string token_text(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  return "";
}

struct Vocab {
  std::vector<std::string> tokens;
  std::vector<float> scores;
  std::vector<int32_t> types;
};

Vocab padded_vocab(int64_t n) {
  Vocab v;
  for (int64_t i = 0; i < n; ++i) v.tokens.push_back("[PAD" + std::to_string(i) + "]");
  v.types.assign(static_cast<size_t>(n), kUnused);
  return v;
}

Vocab sentencepiece_vocab(const std::string& path, const std::vector<std::string>& dirs, int64_t n) {
  sentencepiece::SentencePieceProcessor sp;
  const auto status = sp.Load(path);
  if (!status.ok()) throw InputError(path + ": not a sentencepiece model (" + status.ToString() + ")");
  if (sp.GetPieceSize() > n)
    throw InputError(path + ": " + std::to_string(sp.GetPieceSize()) + " pieces, but the embedding has " +
                     std::to_string(n) + " rows (config.json vocab_size); the tokenizer does not belong to this model");
  Vocab v = padded_vocab(n);
  v.scores.assign(static_cast<size_t>(n), -10000.0f);
  for (int id = 0; id < sp.GetPieceSize(); ++id) {
    const auto i = static_cast<size_t>(id);
    v.tokens[i] = sp.IdToPiece(id);
    v.scores[i] = sp.GetScore(id);
    v.types[i] = sp.IsUnknown(id) ? kUnknown
                 : sp.IsControl(id) ? kControl
                 : sp.IsUnused(id)  ? kUnused
                 : sp.IsByte(id)    ? kByte
                                    : kNormal;
  }
  auto set = [&](int64_t id, const std::string& text, int32_t type) {
    if (id < 0 || id >= n) return;
    v.tokens[static_cast<size_t>(id)] = text;
    v.scores[static_cast<size_t>(id)] = -1000.0f;
    v.types[static_cast<size_t>(id)] = type;
  };
  if (const std::string f = find_file(dirs, "added_tokens.json"); !f.empty()) {
    const json added = read_json(f);
    for (const auto& [text, id] : added.items())
      if (id.is_number_integer()) set(id.get<int64_t>(), text, kUserDefined);
  }
  if (const std::string f = find_file(dirs, "tokenizer_config.json"); !f.empty()) {
    const json tc = read_json(f);
    if (tc.contains("added_tokens_decoder") && tc["added_tokens_decoder"].is_object())
      for (const auto& [key, t] : tc["added_tokens_decoder"].items()) {
        const std::string text = token_text(t);
        const bool control = (t.contains("special") && t["special"] == true) || looks_special(text);
        set(std::stoll(key), control ? text : spaces_restored(text), control ? kControl : kUserDefined);
      }
  }
  return v;
}

// llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json ("default" and
// recognized = false when it is none of those known here).
std::string pre_tokenizer_name(const json& tok, bool* recognized) {
  static const std::string kLlama3 =
      "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
      "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
  static const std::string kQwen2 =
      "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
      "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
  *recognized = true;
  const json& pre = tok.contains("pre_tokenizer") ? tok["pre_tokenizer"] : json();
  std::vector<json> parts;
  if (pre.is_object() && pre.value("type", "") == "Sequence" && pre.contains("pretokenizers"))
    for (const auto& p : pre["pretokenizers"]) parts.push_back(p);
  else if (pre.is_object())
    parts.push_back(pre);
  if (parts.size() == 1 && parts[0].value("type", "") == "ByteLevel" && parts[0].value("use_regex", true))
    return "gpt-2";
  if (parts.size() == 2 && parts[0].value("type", "") == "Split" && parts[1].value("type", "") == "ByteLevel" &&
      parts[0].contains("pattern") && parts[0]["pattern"].contains("Regex")) {
    const std::string re = parts[0]["pattern"]["Regex"].get<std::string>();
    if (re == kLlama3) return "llama-bpe";
    if (re == kQwen2) return "qwen2";
  }
  *recognized = false;
  return "default";
}

// What tokenizer.json's post-processor puts around a single sequence: add_bos, add_eos.
void template_specials(const json& tok, int* add_bos, int* add_eos) {
  if (!tok.contains("post_processor") || !tok["post_processor"].is_object()) return;
  const json* tp = &tok["post_processor"];
  if (tp->value("type", "") == "Sequence" && tp->contains("processors"))
    for (const auto& p : (*tp)["processors"])
      if (p.value("type", "") == "TemplateProcessing") tp = &p;
  if (tp->value("type", "") != "TemplateProcessing" || !tp->contains("single") || (*tp)["single"].empty()) return;
  const json& single = (*tp)["single"];
  *add_bos = single.front().contains("SpecialToken") ? 1 : 0;
  *add_eos = single.size() > 1 && single.back().contains("SpecialToken") ? 1 : 0;
}

}  // namespace

GgufVocab read_gguf_vocab(const std::vector<std::string>& dirs, const DecoderConfig& model) {
  const int64_t n = model.vocab_size;
  std::string where;
  for (const auto& d : dirs) where += (where.empty() ? "" : " or ") + d;
  const std::string spm_path = find_file(dirs, "tokenizer.model");
  const std::string json_path = find_file(dirs, "tokenizer.json");
  const std::string config_path = find_file(dirs, "tokenizer_config.json");
  const json tc = config_path.empty() ? json::object() : read_json(config_path);
  const bool gpt2_class = model.model_type == "phi3" && tc.value("tokenizer_class", "") == "GPT2Tokenizer";

  GgufVocab r;
  Vocab v;
  json tok;
  std::vector<std::string> merges;
  if (!spm_path.empty() && !(gpt2_class && !json_path.empty())) {
    r.model = "llama";
    r.pre = "default";
    v = sentencepiece_vocab(spm_path, dirs, n);
  } else if (!json_path.empty()) {
    tok = read_json(json_path);
    const json& m = tok.contains("model") ? tok["model"] : json();
    if (!m.is_object() || m.value("type", "") != "BPE" || m.value("byte_fallback", false) || !m.contains("vocab"))
      throw InputError(json_path + ": not a byte-level BPE tokenizer (model type " +
                       (m.is_object() ? m.value("type", "?") : std::string("?")) +
                       (m.is_object() && m.value("byte_fallback", false) ? ", byte_fallback" : "") +
                       "); llama.cpp reads this kind from tokenizer.model: copy the base model's tokenizer.model "
                       "beside it");
    r.model = "gpt2";
    r.pre = pre_tokenizer_name(tok, &r.pre_recognized);
    v = padded_vocab(n);
    auto place = [&](int64_t id, const std::string& text, int32_t type) {
      if (id < 0 || id >= n)
        throw InputError(json_path + ": token \"" + text + "\" has id " + std::to_string(id) + ", but the embedding has " +
                         std::to_string(n) + " rows (config.json vocab_size); the tokenizer does not belong to this model");
      v.tokens[static_cast<size_t>(id)] = text;
      v.types[static_cast<size_t>(id)] = type;
    };
    for (const auto& [text, id] : m["vocab"].items()) place(id.get<int64_t>(), text, kNormal);
    if (tok.contains("added_tokens"))
      for (const auto& t : tok["added_tokens"]) {
        const std::string text = t.value("content", "");
        const bool control = t.value("special", false) || looks_special(text);
        place(t.value("id", int64_t{-1}), control ? text : spaces_restored(text), control ? kControl : kUserDefined);
      }
    if (m.contains("merges"))
      for (const auto& mg : m["merges"])
        merges.push_back(mg.is_string() ? mg.get<std::string>()
                                        : mg.at(0).get<std::string>() + " " + mg.at(1).get<std::string>());
  } else {
    throw InputError("no tokenizer in " + where +
                     ": llama.cpp needs the vocabulary inside the GGUF file. Copy the base model's tokenizer files "
                     "(tokenizer.json or tokenizer.model, with tokenizer_config.json) into the base model directory");
  }
  r.tokens = static_cast<int64_t>(v.tokens.size());

  // Special token ids: tokenizer_config.json's tokens by text, else config.json's ids.
  std::map<std::string, int32_t> id_of;
  for (size_t i = 0; i < v.tokens.size(); ++i) id_of.emplace(v.tokens[i], static_cast<int32_t>(i));
  auto special_id = [&](const char* key, int64_t fallback) -> int64_t {
    if (tc.contains(key)) {
      const auto it = id_of.find(token_text(tc[key]));
      if (it != id_of.end()) return it->second;
    }
    return fallback;
  };
  const int64_t bos = special_id("bos_token", model.bos_token_id);
  const int64_t eos = special_id("eos_token", model.eos_token_ids.empty() ? -1 : model.eos_token_ids.front());
  const int64_t unk = special_id("unk_token", -1);
  const int64_t pad = special_id("pad_token", model.pad_token_id);
  int add_bos = -1, add_eos = -1;
  if (!tok.is_null()) template_specials(tok, &add_bos, &add_eos);
  if (tc.contains("add_bos_token") && tc["add_bos_token"].is_boolean()) add_bos = tc["add_bos_token"] ? 1 : 0;
  if (tc.contains("add_eos_token") && tc["add_eos_token"].is_boolean()) add_eos = tc["add_eos_token"] ? 1 : 0;
  std::string chat_template;
  if (const std::string f = find_file(dirs, "chat_template.jinja"); !f.empty()) {
    std::ifstream in(f, std::ios::binary);
    std::stringstream buf;
    buf << in.rdbuf();
    chat_template = buf.str();
  } else if (tc.contains("chat_template") && tc["chat_template"].is_string()) {
    chat_template = tc["chat_template"].get<std::string>();
  } else if (tc.contains("chat_template") && tc["chat_template"].is_array()) {
    for (const auto& t : tc["chat_template"])
      if (t.value("name", "") == "default") chat_template = t.value("template", "");
  }

  auto& md = r.metadata;
  md.emplace_back("tokenizer.ggml.model", r.model);
  md.emplace_back("tokenizer.ggml.pre", r.pre);
  md.emplace_back("tokenizer.ggml.tokens", std::move(v.tokens));
  if (!v.scores.empty()) md.emplace_back("tokenizer.ggml.scores", std::move(v.scores));
  md.emplace_back("tokenizer.ggml.token_type", std::move(v.types));
  if (r.model == "gpt2") md.emplace_back("tokenizer.ggml.merges", std::move(merges));
  if (r.model == "llama" && (model.model_type == "gemma2" || model.model_type == "gemma3_text"))
    md.emplace_back("tokenizer.ggml.add_space_prefix", false);
  for (const auto& [key, id] : {std::pair<const char*, int64_t>{"tokenizer.ggml.bos_token_id", bos},
                                {"tokenizer.ggml.eos_token_id", eos},
                                {"tokenizer.ggml.unknown_token_id", unk},
                                {"tokenizer.ggml.padding_token_id", pad}})
    if (id >= 0 && id < n) md.emplace_back(key, static_cast<uint32_t>(id));
  if (add_bos >= 0) md.emplace_back("tokenizer.ggml.add_bos_token", add_bos == 1);
  if (add_eos >= 0) md.emplace_back("tokenizer.ggml.add_eos_token", add_eos == 1);
  if (!chat_template.empty()) md.emplace_back("tokenizer.chat_template", chat_template);
  return r;
}

}  // namespace qlora::lora::detail
