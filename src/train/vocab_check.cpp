#include "qlora/train/vocab_check.h"

#include <cstdint>
#include <filesystem>
#include <utility>
#include <vector>

#include "qlora/common/errors.h"
#include "qlora/model/family.h"

namespace qlora::train {
namespace {

// How a token is shown: quoted, with what kind it is.
std::string describe(const data::Tokenizer::Entry& e) {
  return std::string(e.added ? "added token" : "token") + " \"" + e.text + "\"";
}

}  // namespace

void check_tokenizer_fits_model(const data::Tokenizer& tokenizer, const DecoderConfig& model,
                                const std::string& config_path) {
  const std::string model_side =
      "vocab_size " + std::to_string(model.vocab_size) + " in " +
      (config_path.empty() ? "the preset " + model.name : config_path);
  const int64_t rows = model.vocab_size;

  // Every id the tokenizer can produce has a row (vocab_size() is one past its largest id).
  if (tokenizer.vocab_size() > rows) {
    const std::vector<data::Tokenizer::Entry> past = tokenizer.tokens_from(static_cast<int32_t>(rows));
    if (!past.empty()) {
      const data::Tokenizer::Entry& first = past.front();
      std::string more;
      if (past.size() > 1) {
        more = "; " + std::to_string(past.size()) + " tokens in all have ids " + std::to_string(rows) +
               " or more, up to " + describe(past.back()) + " with id " + std::to_string(past.back().id);
      }
      throw InputError(tokenizer.path() + ": " + describe(first) + " has id " + std::to_string(first.id) +
                       ", but the model's embedding has only " + std::to_string(rows) + " rows (" + model_side +
                       ")" + more + ". The tokenizer does not belong to this model: use the tokenizer files that "
                       "came with the model, or a model whose vocab_size is at least " +
                       std::to_string(past.back().id + 1));
    }
  }

  // The ids config.json names are tokens of the tokenizer too (read_decoder_config checked them
  // against vocab_size). A padding row is no token.
  std::vector<std::pair<std::string, int64_t>> named;
  if (model.bos_token_id >= 0) named.emplace_back("bos_token_id", model.bos_token_id);
  for (int64_t id : model.eos_token_ids) named.emplace_back("eos_token_id", id);
  if (model.pad_token_id >= 0) named.emplace_back("pad_token_id", model.pad_token_id);
  for (const auto& [key, id] : named) {
    const auto at = id < tokenizer.vocab_size() ? tokenizer.tokens_from(static_cast<int32_t>(id))
                                                : std::vector<data::Tokenizer::Entry>{};
    if (!at.empty() && at.front().id == id) continue;
    throw InputError((config_path.empty() ? model.name : config_path) + ": " + key + " " + std::to_string(id) +
                     " is no token of the tokenizer " + tokenizer.path() + " (its ids end at " +
                     std::to_string(tokenizer.vocab_size() - 1) + "; the model's " + model_side +
                     "). config.json and the tokenizer come from different models: use the files that came "
                     "together");
  }
}

std::unique_ptr<data::Tokenizer> load_checked_tokenizer(const std::string& model_dir) {
  const std::filesystem::path dir(model_dir);
  if (!std::filesystem::exists(dir / "tokenizer.json") && !std::filesystem::exists(dir / "tokenizer.model"))
    throw InputError(model_dir + " has no tokenizer.json or tokenizer.model; copy the base model's tokenizer files there");
  std::unique_ptr<data::Tokenizer> tok = data::load_tokenizer(model_dir);
  if (const auto config = dir / "config.json"; std::filesystem::is_regular_file(config))
    check_tokenizer_fits_model(*tok, read_decoder_config(config.string()), config.string());
  return tok;
}

}  // namespace qlora::train
