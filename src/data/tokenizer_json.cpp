// Hugging Face tokenizer.json: every component the tokenizers library would run is read into a
// BpePipeline (tokenizer_bpe.h, tokenizer_components.h); a component or option this code does
// not implement is refused with its JSON path, its type and the file, never approximated.
#include <cstdint>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

#include "data/onig_regex.h"
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
    throw InputError(file + ": not valid JSON (" + std::string(e.what()) + "); expected a Hugging Face tokenizer.json");
  }
}

std::string type_of(const json& j) {
  if (j.is_object() && j.contains("type") && j["type"].is_string()) return j["type"].get<std::string>();
  return j.dump().substr(0, 80);
}

// Ids past this are refused before anything is sized by them: the largest vocabularies are a
// few hundred thousand, and an id of 2^31 - 1 would make the id tables 64 GiB.
constexpr int64_t kMaxTokenId = int64_t{1} << 24;

// Reads one component of the file, naming its JSON path in every message.
class Reader {
 public:
  explicit Reader(std::string file) : file_(std::move(file)) {}

  [[noreturn]] void fail(const std::string& path, const std::string& what) const {
    throw InputError(file_ + ": " + path + ": " + what);
  }
  [[noreturn]] void unsupported(const std::string& path, const json& j) const {
    fail(path, "type \"" + type_of(j) + "\" is not implemented by qlora (" + kSupported +
                   "); this tokenizer cannot be used as it is");
  }

  const json& field(const json& obj, const std::string& path, const char* key) const {
    if (!obj.is_object() || !obj.contains(key)) fail(path, std::string("has no \"") + key + "\"");
    return obj[key];
  }
  std::string string_field(const json& obj, const std::string& path, const char* key) const {
    const json& v = field(obj, path, key);
    if (!v.is_string()) fail(path + "." + key, "is " + v.dump().substr(0, 80) + ", expected a string");
    return v.get<std::string>();
  }
  bool bool_field(const json& obj, const std::string& path, const char* key, bool fallback) const {
    if (!obj.is_object() || !obj.contains(key) || obj[key].is_null()) return fallback;
    if (!obj[key].is_boolean()) fail(path + "." + key, "is " + obj[key].dump().substr(0, 80) + ", expected true or false");
    return obj[key].get<bool>();
  }
  int32_t token_id(const std::string& what, const json& id) const {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > kMaxTokenId)
      fail(what, "is " + id.dump().substr(0, 40) + ", expected a token id from 0 to " + std::to_string(kMaxTokenId) +
                     "; the file is damaged or not a tokenizer.json");
    return static_cast<int32_t>(id.get<int64_t>());
  }

  // Calls each(item, its path) for every element of a Sequence component's list `key`.
  template <typename Fn>
  void each_in(const json& j, const std::string& path, const char* key, Fn&& each) const {
    const json& list = field(j, path, key);
    if (!list.is_array()) fail(path + "." + key, "expected a list");
    for (size_t i = 0; i < list.size(); ++i) each(list[i], path + "." + key + "[" + std::to_string(i) + "]");
  }

  // {"String": "x"} (literal) or {"Regex": "..."}.
  std::shared_ptr<const OnigRegex> pattern(const json& obj, const std::string& path) const {
    const json& p = field(obj, path, "pattern");
    if (p.is_object() && p.contains("String") && p["String"].is_string())
      return std::make_shared<OnigRegex>(OnigRegex::escape(p["String"].get<std::string>()), file_ + ": " + path);
    if (p.is_object() && p.contains("Regex") && p["Regex"].is_string())
      return std::make_shared<OnigRegex>(p["Regex"].get<std::string>(), file_ + ": " + path + ".pattern");
    fail(path + ".pattern", "is " + p.dump().substr(0, 80) + ", expected {\"String\": ...} or {\"Regex\": ...}");
  }

  PrependScheme prepend_scheme(const json& obj, const std::string& path) const {
    if (obj.contains("prepend_scheme") && !obj["prepend_scheme"].is_null()) {
      const std::string s = string_field(obj, path, "prepend_scheme");
      if (s == "always") return PrependScheme::kAlways;
      if (s == "first") return PrependScheme::kFirst;
      if (s == "never") return PrependScheme::kNever;
      fail(path + ".prepend_scheme", "is \"" + s + "\", expected always, first or never");
    }
    return bool_field(obj, path, "add_prefix_space", true) ? PrependScheme::kAlways : PrependScheme::kNever;
  }

  void normalizer(const json& j, const std::string& path, Normalizer& out) const {
    if (j.is_null()) return;
    const std::string t = type_of(j);
    if (t == "Sequence") {
      each_in(j, path, "normalizers", [&](const json& e, const std::string& at) { normalizer(e, at, out); });
    } else if (t == "NFC") {
      out.add_form(NormalForm::kNFC);
    } else if (t == "NFD") {
      out.add_form(NormalForm::kNFD);
    } else if (t == "NFKC") {
      out.add_form(NormalForm::kNFKC);
    } else if (t == "NFKD") {
      out.add_form(NormalForm::kNFKD);
    } else if (t == "Prepend") {
      out.add_prepend(string_field(j, path, "prepend"));
    } else if (t == "Replace") {
      out.add_replace(pattern(j, path), string_field(j, path, "content"));
    } else if (t == "Lowercase") {
      out.add_lowercase();
    } else if (t == "Strip") {
      out.add_strip(bool_field(j, path, "strip_left", true), bool_field(j, path, "strip_right", true));
    } else {
      unsupported(path, j);
    }
  }

  void pre_tokenizer(const json& j, const std::string& path, PreTokenizer& out) const {
    if (j.is_null()) return;
    const std::string t = type_of(j);
    if (t == "Sequence") {
      each_in(j, path, "pretokenizers", [&](const json& e, const std::string& at) { pre_tokenizer(e, at, out); });
    } else if (t == "Split") {
      const std::string b = string_field(j, path, "behavior");
      SplitBehavior behavior;
      if (b == "Removed") behavior = SplitBehavior::kRemoved;
      else if (b == "Isolated") behavior = SplitBehavior::kIsolated;
      else if (b == "MergedWithPrevious") behavior = SplitBehavior::kMergedWithPrevious;
      else if (b == "MergedWithNext") behavior = SplitBehavior::kMergedWithNext;
      else if (b == "Contiguous") behavior = SplitBehavior::kContiguous;
      else fail(path + ".behavior", "is \"" + b + "\", expected Removed, Isolated, MergedWithPrevious, MergedWithNext or Contiguous");
      out.add_split(pattern(j, path), behavior, bool_field(j, path, "invert", false));
    } else if (t == "ByteLevel") {
      if (out.byte_level()) fail(path, "a second ByteLevel step would map bytes twice");
      out.add_byte_level(bool_field(j, path, "add_prefix_space", true), bool_field(j, path, "use_regex", true));
    } else if (t == "Metaspace") {
      out.add_metaspace(string_field(j, path, "replacement"), prepend_scheme(j, path), bool_field(j, path, "split", true));
    } else if (t == "Digits") {
      out.add_digits(bool_field(j, path, "individual_digits", false));
    } else {
      unsupported(path, j);
    }
  }

  void decoder(const json& j, const std::string& path, Decoder& out) const {
    if (j.is_null()) return;
    const std::string t = type_of(j);
    if (t == "Sequence") {
      each_in(j, path, "decoders", [&](const json& e, const std::string& at) { decoder(e, at, out); });
    } else if (t == "Replace") {
      const json& p = field(j, path, "pattern");
      if (!p.is_object() || !p.contains("String") || !p["String"].is_string())
        fail(path + ".pattern", "a decoder's Replace reads {\"String\": ...} patterns only");
      out.add_replace(p["String"].get<std::string>(), string_field(j, path, "content"));
    } else if (t == "ByteFallback") {
      out.add_byte_fallback();
    } else if (t == "Fuse") {
      out.add_fuse();
    } else if (t == "Strip") {
      const json& s = field(j, path, "start");
      const json& e = field(j, path, "stop");
      if (!s.is_number_integer() || !e.is_number_integer()) fail(path, "start and stop must be integers");
      out.add_strip(string_field(j, path, "content"), s.get<int>(), e.get<int>());
    } else if (t == "Metaspace") {
      out.add_metaspace(string_field(j, path, "replacement"), prepend_scheme(j, path));
    } else if (t == "ByteLevel") {
      out.add_byte_level();
    } else {
      unsupported(path, j);
    }
  }

  // TemplateProcessing's "single": special tokens before $A become bos; none may follow it.
  void post_processor(const json& j, const std::string& path, BpeTokenizer& tok, std::vector<int32_t>& prefix) const {
    if (j.is_null()) return;
    const std::string t = type_of(j);
    if (t == "ByteLevel") return;  // offsets only
    if (t == "Sequence") {
      each_in(j, path, "processors", [&](const json& e, const std::string& at) { post_processor(e, at, tok, prefix); });
      return;
    }
    if (t != "TemplateProcessing") unsupported(path, j);
    const json& single = field(j, path, "single");
    if (!single.is_array()) fail(path + ".single", "expected a list");
    const json& specials = j.value("special_tokens", json::object());
    bool seen_a = false;
    for (size_t i = 0; i < single.size(); ++i) {
      const std::string at = path + ".single[" + std::to_string(i) + "]";
      const json& item = single[i];
      if (item.is_object() && item.contains("Sequence")) {
        if (item["Sequence"].value("id", std::string()) != "A") fail(at, "expected the sequence $A");
        seen_a = true;
        continue;
      }
      if (!item.is_object() || !item.contains("SpecialToken") || !item["SpecialToken"].is_object())
        fail(at, "is " + item.dump().substr(0, 80) + ", expected {\"SpecialToken\": ...} or {\"Sequence\": ...}");
      const std::string name = string_field(item["SpecialToken"], at + ".SpecialToken", "id");
      if (seen_a)
        fail(at, "adds \"" + name + "\" after the text; qlora adds only tokens before it (a bos), and the data "
                 "pipeline ends examples with eos itself");
      const json& ids = specials.is_object() && specials.contains(name) ? specials[name].value("ids", json()) : json();
      if (!ids.is_array() || ids.empty())
        fail(path + ".special_tokens", "has no ids for \"" + name + "\"");
      for (const auto& id : ids) prefix.push_back(token_id(path + ".special_tokens[\"" + name + "\"]", id));
    }
    (void)tok;
  }

 private:
  std::string file_;
  static constexpr const char* kSupported =
      "normalizers NFC, NFD, NFKC, NFKD, Prepend, Replace, Lowercase, Strip, Sequence; pre-tokenizers Split, "
      "ByteLevel, Metaspace, Digits, Sequence; model BPE; post-processors TemplateProcessing, ByteLevel, "
      "Sequence; decoders ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip, Sequence";
};

}  // namespace

std::unique_ptr<Tokenizer> load_tokenizer_json(const std::string& file) {
  const json j = read_json(file);
  const Reader r(file);
  if (!j.is_object() || !j.contains("model") || !j["model"].is_object())
    throw InputError(file + ": no \"model\" object; expected a Hugging Face tokenizer.json");
  BpePipeline p;
  r.normalizer(j.value("normalizer", json()), "normalizer", p.normalizer);
  r.pre_tokenizer(j.value("pre_tokenizer", json()), "pre_tokenizer", p.pre_tokenizer);
  const bool byte_level = p.pre_tokenizer.byte_level();

  const json& m = j["model"];
  const std::string mtype = m.value("type", std::string("BPE"));
  if (mtype != "BPE") r.unsupported("model", m);
  std::string affix[2];
  for (int k = 0; k < 2; ++k) {
    const char* key = k == 0 ? "continuing_subword_prefix" : "end_of_word_suffix";
    if (m.contains(key) && !m[key].is_null()) affix[k] = r.string_field(m, "model", key);
  }
  if (m.contains("dropout") && !m["dropout"].is_null() && m["dropout"] != 0.0)
    r.fail("model.dropout", "is " + m["dropout"].dump() + "; BPE dropout is for training a tokenizer, not a model");
  const bool byte_fallback = r.bool_field(m, "model", "byte_fallback", false);
  if (byte_level && (!affix[0].empty() || !affix[1].empty()))
    r.fail("model", "continuing_subword_prefix / end_of_word_suffix in a byte-level file, which qlora does not implement");
  p.model.set_subword_affixes(affix[0], affix[1]);
  if (byte_level && byte_fallback)
    r.fail("model.byte_fallback", "is true in a byte-level (ByteLevel pre-tokenizer) file, which qlora does not implement");

  const json& vocab = r.field(m, "model", "vocab");
  if (!vocab.is_object()) r.fail("model.vocab", "expected an object of token -> id");
  std::string raw;
  for (const auto& [tok, id_json] : vocab.items()) {
    const int32_t id = r.token_id("model.vocab[\"" + tok + "\"]", id_json);
    if (!byte_level) {
      p.model.add_token(tok, id);
      continue;
    }
    if (bpe::bytes_from_byte_level(tok, raw)) p.model.add_token(raw, id);
    else p.model.add_unreachable_token(tok, id);  // e.g. a special token's text: BPE never makes it
  }
  const json& merges = r.field(m, "model", "merges");
  if (!merges.is_array()) r.fail("model.merges", "expected a list of \"a b\" strings or [\"a\", \"b\"] pairs");
  std::string ra, rb;
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const json& mg = merges[rank];
    const std::string at = "model.merges[" + std::to_string(rank) + "]";
    std::string a, b;
    if (mg.is_string()) {
      const std::string s = mg.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        r.fail(at, "is \"" + s + "\", expected two tokens separated by one space");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (mg.is_array() && mg.size() == 2 && mg[0].is_string() && mg[1].is_string()) {
      a = mg[0].get<std::string>();
      b = mg[1].get<std::string>();
    } else {
      r.fail(at, "is " + mg.dump().substr(0, 80) + ", expected \"a b\" or [\"a\", \"b\"]");
    }
    const bool ok = byte_level ? bpe::bytes_from_byte_level(a, ra) && bpe::bytes_from_byte_level(b, rb) &&
                                     p.model.add_merge(ra, rb, static_cast<int32_t>(rank))
                               : p.model.add_merge(a, b, static_cast<int32_t>(rank));
    if (!ok) r.fail(at, "(\"" + a + "\", \"" + b + "\") names a token, or makes one, that is not in model.vocab");
  }
  p.model.set_ignore_merges(r.bool_field(m, "model", "ignore_merges", false));
  if (byte_fallback) {
    p.byte_fallback.assign(256, -1);
    char name[8];
    for (int b = 0; b < 256; ++b) {
      std::snprintf(name, sizeof name, "<0x%02X>", b);
      if (auto id = p.model.find(name)) p.byte_fallback[static_cast<size_t>(b)] = *id;
    }
  }
  if (m.contains("unk_token") && !m["unk_token"].is_null()) {
    const std::string unk = r.string_field(m, "model", "unk_token");
    const auto id = p.model.find(byte_level ? std::string() : unk);
    if (!byte_level && !id) r.fail("model.unk_token", "\"" + unk + "\" is not in model.vocab");
    if (id) p.unk_id = *id;
  }
  p.fuse_unk = r.bool_field(m, "model", "fuse_unk", false);

  if (j.contains("added_tokens") && !j["added_tokens"].is_null()) {
    if (!j["added_tokens"].is_array()) r.fail("added_tokens", "expected a list");
    for (size_t i = 0; i < j["added_tokens"].size(); ++i) {
      const json& a = j["added_tokens"][i];
      const std::string at = "added_tokens[" + std::to_string(i) + "]";
      bpe::AddedToken t;
      t.content = r.string_field(a, at, "content");
      t.id = r.token_id(at + ".id (token \"" + t.content + "\")", r.field(a, at, "id"));
      t.special = r.bool_field(a, at, "special", false);
      t.lstrip = r.bool_field(a, at, "lstrip", false);
      t.rstrip = r.bool_field(a, at, "rstrip", false);
      t.single_word = r.bool_field(a, at, "single_word", false);
      t.normalized = r.bool_field(a, at, "normalized", !t.special);
      p.added.push_back(std::move(t));
    }
  }

  const json& dec = j.value("decoder", json());
  if (byte_level) {
    Decoder probe;  // a byte-level file decodes bytes: its decoder must be ByteLevel alone
    r.decoder(dec, "decoder", probe);
    if (!dec.is_null() && type_of(dec) != "ByteLevel")
      r.fail("decoder", "is \"" + type_of(dec) + "\" in a byte-level file; qlora decodes byte-level files as ByteLevel does");
  } else {
    r.decoder(dec, "decoder", p.decoder);
  }

  auto tok = std::make_unique<BpeTokenizer>("tokenizer.json", file, std::move(p));
  std::vector<int32_t> prefix;
  r.post_processor(j.value("post_processor", json()), "post_processor", *tok, prefix);
  if (prefix.size() > 1) r.fail("post_processor", "puts " + std::to_string(prefix.size()) + " tokens before the text; qlora adds one (a bos)");
  const int32_t bos = prefix.empty() ? -1 : prefix[0];
  tok->set_special_ids(bos, -1, -1, /*add_bos=*/bos >= 0);
  return tok;
}

}  // namespace qlora::data
