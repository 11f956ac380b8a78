// The byte-level BPE tokenizer behind both the tokenizer.json and the tiktoken loaders, and
// the loaders' private helpers.
#pragma once

#include <string>
#include <unordered_map>
#include <vector>

#include "data/bpe.h"
#include "qlora/data/tokenizer.h"

namespace qlora::data {

class BpeTokenizer : public Tokenizer {
 public:
  // added_byte_level: added tokens' text goes through the byte-level decoder on decode (as
  // Hugging Face's ByteLevel decoder does); false for tiktoken (plain UTF-8).
  BpeTokenizer(std::string kind, std::string path, bpe::BpeModel model, bpe::SplitPattern pattern,
               std::vector<bpe::AddedToken> added, bool added_byte_level);

  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  int32_t vocab_size() const override;
  std::optional<int32_t> token_id(std::string_view token) const override;

 private:
  bpe::BpeModel model_;
  bpe::SplitPattern pattern_;
  std::vector<bpe::AddedToken> added_;
  std::unordered_map<int32_t, size_t> added_by_id_;
  bool added_byte_level_;
};

// Byte-level form ("Ġthe") -> raw bytes; false when a code point is outside the byte map.
bool bytes_from_byte_level(std::string_view token, std::string& out);

// True when `file` is a tokenizer.json of the sentencepiece kind (Metaspace pre-tokenizer or
// byte_fallback BPE, as Llama 2 / TinyLlama ship), which load_tokenizer reads through the
// tokenizer.model beside it. False for anything else, unreadable files included.
bool tokenizer_json_is_sentencepiece_style(const std::string& file);

// True when the first line of `file` looks like "<base64> <rank>" (tiktoken format).
bool looks_like_tiktoken(const std::string& file);

// Applies tokenizer_config.json's "legacy" / "add_prefix_space" to a sentencepiece tokenizer
// (transformers' Metaspace prepend scheme); no-op for other kinds.
void set_sentencepiece_prefix_scheme(Tokenizer& tok, bool legacy, bool add_prefix_space);

}  // namespace qlora::data
