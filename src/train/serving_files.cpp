#include "qlora/train/serving_files.h"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "qlora/common/errors.h"
#include "qlora/common/log.h"
#include "qlora/common/text.h"
#include "qlora/data/format.h"

namespace qlora::train {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

// The tokenizer files transformers' AutoTokenizer reads, as save_pretrained writes them.
const char* const kTokenizerFiles[] = {"tokenizer.json",          "tokenizer.model",   "tokenizer_config.json",
                                       "special_tokens_map.json", "added_tokens.json", "vocab.json",
                                       "merges.txt"};

// Written through a temporary name and renamed, so a reader never sees half a file.
void write_replacing(const fs::path& path, const std::string& text) {
  const std::string tmp = path.string() + ".tmp";
  write_text_file(tmp, text);
  fs::rename(tmp, path);
}

json read_object_or_empty(const fs::path& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return json::object();
  std::ifstream in(path, std::ios::binary);
  std::stringstream buf;
  buf << in.rdbuf();
  try {
    json j = json::parse(buf.str());
    if (j.is_object()) return j;
  } catch (const json::parse_error&) {
  }
  throw InputError(path.string() + ": not a JSON object; fix or remove it (the adapter's generation_config.json "
                   "is written from it)");
}

}  // namespace

std::string write_serving_files(const std::string& adapter_dir, const data::DataSummary& summary,
                                const data::Tokenizer& tokenizer) {
  const fs::path out(adapter_dir);
  std::error_code ec;
  fs::path from(tokenizer.path());
  if (!from.empty() && !fs::is_directory(from, ec)) from = from.parent_path();
  std::vector<std::string> written;
  if (!from.empty() && fs::is_directory(from, ec)) {
    for (const char* name : kTokenizerFiles) {
      if (!fs::exists(from / name, ec)) continue;
      fs::copy_file(from / name, out / name, fs::copy_options::overwrite_existing, ec);
      if (ec) throw InputError((out / name).string() + ": cannot write (" + ec.message() + ")");
      written.push_back(name);
    }
  }
  // Chat data: the template it was rendered with; alpaca data: a template giving its prompt.
  const bool alpaca = summary.format == DataFormat::kAlpaca;
  const std::string jinja = alpaca ? data::alpaca_chat_template() : summary.chat_template_text;
  if ((summary.format != DataFormat::kChat && !alpaca) || jinja.empty()) {
    return written.empty() ? "" : "beside it: " + join(written);
  }
  write_replacing(out / "chat_template.jinja", jinja);
  written.push_back("chat_template.jinja");
  if (alpaca) {  // it ends an answer with eos, which generation already stops at
    return "beside it: " + join(written);
  }

  // generation_config.json: the base's (or bos/eos from the tokenizer), eos_token_id a list that
  // ends with the end-of-turn token.
  json gen = from.empty() ? json::object() : read_object_or_empty(from / "generation_config.json");
  json eos = json::array();
  if (gen.contains("eos_token_id") && !gen["eos_token_id"].is_null()) {
    eos = gen["eos_token_id"].is_array() ? gen["eos_token_id"] : json::array({gen["eos_token_id"]});
  } else if (tokenizer.eos_id() >= 0) {
    eos.push_back(tokenizer.eos_id());
  }
  if (!gen.contains("bos_token_id") && tokenizer.bos_id() >= 0) gen["bos_token_id"] = tokenizer.bos_id();
  const std::optional<int32_t> eot = summary.end_of_turn.empty() ? std::nullopt : tokenizer.token_id(summary.end_of_turn);
  if (eot) {
    bool present = false;
    for (const json& e : eos) present = present || (e.is_number_integer() && e.get<int64_t>() == *eot);
    if (!present) eos.push_back(*eot);
  } else if (summary.end_of_turn.empty()) {
    log::warn(summary.chat_template_origin + ": could not tell which token ends a reply (the template refused a "
              "user/assistant probe), so generation_config.json stops at eos only; check that the tuned model stops");
  } else {
    log::warn(summary.chat_template_origin + " ends a reply with \"" + summary.end_of_turn +
              "\", which is not one token of the tokenizer: generation_config.json cannot stop on it; give the "
              "server a stop string");
  }
  if (!eos.empty()) gen["eos_token_id"] = eos.size() == 1 ? eos[0] : eos;
  write_replacing(out / "generation_config.json", gen.dump(2) + "\n");
  written.push_back("generation_config.json");
  return "beside it: " + join(written) + (eot ? " (generation stops at " + summary.end_of_turn + ")" : "");
}

}  // namespace qlora::train
