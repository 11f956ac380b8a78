// Hugging Face tokenizer.json, byte-level BPE (Llama 3, Qwen2): what is supported is checked
// field by field, and anything else is refused with the field and what to do.
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "data/tokenizer_bpe.h"
#include "qlora/common/errors.h"

namespace qlora::data {

namespace {

using nlohmann::json;

json read_json(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw InputError("cannot read tokenizer file " + file + ": it does not exist or is not readable");
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return json::parse(ss.str());
  } catch (const json::parse_error& e) {
    throw InputError(file + ": not valid JSON (" + std::string(e.what()) +
                     "); expected a Hugging Face tokenizer.json");
  }
}

[[noreturn]] void unsupported(const std::string& file, const std::string& field,
                              const std::string& found, const std::string& hint) {
  throw InputError(file + ": " + field + " is " + found + ", which qlora does not support; " + hint);
}

std::string type_of(const json& j) {
  if (j.is_object() && j.contains("type") && j["type"].is_string()) return j["type"].get<std::string>();
  return j.dump().substr(0, 80);
}

const char kByteLevelHint[] =
    "qlora reads byte-level BPE tokenizer.json files of the Llama 3 / Qwen2 family, and "
    "sentencepiece models through tokenizer.model";

// pre_tokenizer: Sequence[Split(Regex, Isolated), ByteLevel(add_prefix_space=false,
// use_regex=false)] -> the split pattern.
bpe::SplitPattern read_pre_tokenizer(const std::string& file, const json& pt) {
  if (!pt.is_object() || type_of(pt) != "Sequence" || !pt.contains("pretokenizers") ||
      !pt["pretokenizers"].is_array() || pt["pretokenizers"].size() != 2) {
    unsupported(file, "pre_tokenizer", pt.is_null() ? "null" : "\"" + type_of(pt) + "\"",
                std::string("expected Sequence[Split(Regex), ByteLevel]; ") + kByteLevelHint);
  }
  const json& split = pt["pretokenizers"][0];
  const json& bl = pt["pretokenizers"][1];
  if (type_of(split) != "Split" || !split.contains("pattern") || !split["pattern"].is_object() ||
      !split["pattern"].contains("Regex") || !split["pattern"]["Regex"].is_string()) {
    unsupported(file, "pre_tokenizer.pretokenizers[0]", "\"" + type_of(split) + "\"",
                std::string("expected a Split with a Regex pattern; ") + kByteLevelHint);
  }
  const std::string regex = split["pattern"]["Regex"].get<std::string>();
  auto pattern = bpe::find_split_pattern(regex);
  if (!pattern) {
    unsupported(file, "the pre-tokenizer regex", "\"" + regex + "\"",
                std::string("the built-in scanner implements only the Llama 3 pattern ") +
                    bpe::kLlama3Pattern + " and the Qwen2 one (\\p{N} for \\p{N}{1,3})");
  }
  if (split.value("behavior", std::string("Isolated")) != "Isolated" ||
      split.value("invert", false)) {
    unsupported(file, "pre_tokenizer Split behavior/invert",
                split.value("behavior", std::string("?")) + "/" +
                    (split.value("invert", false) ? "true" : "false"),
                "expected Isolated/false");
  }
  if (type_of(bl) != "ByteLevel" || bl.value("add_prefix_space", false) ||
      bl.value("use_regex", false)) {
    unsupported(file, "pre_tokenizer.pretokenizers[1]", bl.dump().substr(0, 120),
                "expected ByteLevel with add_prefix_space=false and use_regex=false");
  }
  return *pattern;
}

// bos from a TemplateProcessing "single" template that starts with a special token.
std::optional<std::string> template_bos(const json& pp) {
  if (!pp.is_object()) return std::nullopt;
  if (type_of(pp) == "Sequence" && pp.contains("processors") && pp["processors"].is_array()) {
    for (const auto& p : pp["processors"]) {
      if (auto b = template_bos(p)) return b;
    }
    return std::nullopt;
  }
  if (type_of(pp) != "TemplateProcessing" || !pp.contains("single") || !pp["single"].is_array() ||
      pp["single"].empty()) {
    return std::nullopt;
  }
  const json& first = pp["single"][0];
  if (first.is_object() && first.contains("SpecialToken") && first["SpecialToken"].is_object() &&
      first["SpecialToken"].contains("id") && first["SpecialToken"]["id"].is_string()) {
    return first["SpecialToken"]["id"].get<std::string>();
  }
  return std::nullopt;
}

}  // namespace

bool tokenizer_json_is_sentencepiece_style(const std::string& file) {
  try {
    const json j = read_json(file);
    const json& pt = j.value("pre_tokenizer", json());
    const json& model = j.value("model", json());
    return type_of(pt) == "Metaspace" || (model.is_object() && model.value("byte_fallback", false));
  } catch (const std::exception&) {
    return false;
  }
}

std::unique_ptr<Tokenizer> load_tokenizer_json(const std::string& file) {
  const json j = read_json(file);
  if (!j.is_object() || !j.contains("model") || !j["model"].is_object()) {
    throw InputError(file + ": no \"model\" object; expected a Hugging Face tokenizer.json");
  }
  const json& m = j["model"];
  const std::string mtype = m.value("type", std::string("BPE"));
  if (mtype != "BPE") {
    unsupported(file, "model.type", "\"" + mtype + "\"", kByteLevelHint);
  }
  if (j.contains("normalizer") && !j["normalizer"].is_null()) {
    unsupported(file, "normalizer", "\"" + type_of(j["normalizer"]) + "\"",
                "only tokenizers without a normalizer (Llama 3) are read; Qwen2's NFC is not "
                "implemented");
  }
  if (m.value("byte_fallback", false) ||
      (m.contains("continuing_subword_prefix") && !m["continuing_subword_prefix"].is_null() &&
       m["continuing_subword_prefix"] != "") ||
      (m.contains("end_of_word_suffix") && !m["end_of_word_suffix"].is_null() &&
       m["end_of_word_suffix"] != "") ||
      (m.contains("dropout") && !m["dropout"].is_null())) {
    unsupported(file, "model", "a BPE with byte_fallback, subword prefix/suffix or dropout",
                kByteLevelHint);
  }
  const auto pattern = read_pre_tokenizer(file, j.value("pre_tokenizer", json()));
  if (j.contains("decoder") && !j["decoder"].is_null() && type_of(j["decoder"]) != "ByteLevel") {
    unsupported(file, "decoder", "\"" + type_of(j["decoder"]) + "\"", "expected ByteLevel");
  }

  bpe::BpeModel model;
  if (!m.contains("vocab") || !m["vocab"].is_object()) {
    throw InputError(file + ": model.vocab is missing or not an object of token -> id");
  }
  std::string raw;
  for (const auto& [tok, id] : m["vocab"].items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
      throw InputError(file + ": model.vocab[\"" + tok + "\"] is " + id.dump() +
                       ", expected a non-negative integer id");
    }
    if (!bytes_from_byte_level(tok, raw)) {
      throw InputError(file + ": model.vocab token \"" + tok +
                       "\" is not in byte-level form (a character outside the byte map); " +
                       kByteLevelHint);
    }
    model.add_token(raw, static_cast<int32_t>(id.get<int64_t>()));
  }
  if (!m.contains("merges") || !m["merges"].is_array()) {
    throw InputError(file + ": model.merges is missing or not a list; a BPE tokenizer.json "
                     "lists its merges as \"a b\" strings or [\"a\", \"b\"] pairs");
  }
  std::string ra, rb;
  int32_t rank = 0;
  for (const auto& mg : m["merges"]) {
    std::string a, b;
    if (mg.is_string()) {
      const std::string s = mg.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos) {
        throw InputError(file + ": model.merges[" + std::to_string(rank) + "] is \"" + s +
                         "\", expected two tokens separated by one space");
      }
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (mg.is_array() && mg.size() == 2 && mg[0].is_string() && mg[1].is_string()) {
      a = mg[0].get<std::string>();
      b = mg[1].get<std::string>();
    } else {
      throw InputError(file + ": model.merges[" + std::to_string(rank) + "] is " +
                       mg.dump().substr(0, 80) + ", expected \"a b\" or [\"a\", \"b\"]");
    }
    if (!bytes_from_byte_level(a, ra) || !bytes_from_byte_level(b, rb) ||
        !model.add_merge(ra, rb, rank)) {
      throw InputError(file + ": model.merges[" + std::to_string(rank) + "] (\"" + a + "\", \"" +
                       b + "\") names a token that is not in model.vocab");
    }
    ++rank;
  }
  model.set_ignore_merges(m.value("ignore_merges", false));

  std::vector<bpe::AddedToken> added;
  if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
    for (const auto& a : j["added_tokens"]) {
      if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() ||
          !a.contains("content") || !a["content"].is_string()) {
        throw InputError(file + ": an added_tokens entry lacks an integer \"id\" or a string "
                         "\"content\": " + a.dump().substr(0, 120));
      }
      bpe::AddedToken t;
      t.id = a["id"].get<int32_t>();
      t.content = a["content"].get<std::string>();
      t.special = a.value("special", false);
      t.lstrip = a.value("lstrip", false);
      t.rstrip = a.value("rstrip", false);
      t.single_word = a.value("single_word", false);
      t.normalized = a.value("normalized", !t.special);
      added.push_back(std::move(t));
    }
  }
  std::optional<std::string> bos_name = template_bos(j.value("post_processor", json()));

  auto tok = std::make_unique<BpeTokenizer>("tokenizer.json", file, std::move(model), pattern,
                                            std::move(added), /*added_byte_level=*/true);
  int32_t bos = -1;
  if (bos_name) bos = tok->token_id(*bos_name).value_or(-1);
  tok->set_special_ids(bos, -1, -1, /*add_bos=*/bos >= 0);
  return tok;
}

}  // namespace qlora::data
