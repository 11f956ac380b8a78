// The BPE tokenizer behind both the tokenizer.json and the tiktoken loaders: Hugging Face's
// pipeline (added tokens, normalizer, pre-tokenizer, BPE model, decoder) over one BpeModel,
// and the loaders' private helpers.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "data/bpe.h"
#include "data/tokenizer_components.h"
#include "qlora/data/tokenizer.h"

namespace qlora::data {

// Everything a BpeTokenizer runs, as a loader assembled it.
struct BpePipeline {
  Normalizer normalizer;
  PreTokenizer pre_tokenizer;  // byte_level(): the model reads bytes, its vocabulary raw bytes
  bpe::BpeModel model;         // byte-level: tokens as raw bytes; else as UTF-8 text
  std::vector<bpe::AddedToken> added;
  // Character-level models only: <0xXX> ids per byte (-1: none; empty: no byte_fallback),
  // the unk id (-1: none) and whether unknown runs fuse into one unk.
  std::vector<int32_t> byte_fallback;
  int32_t unk_id = -1;
  bool fuse_unk = false;
  Decoder decoder;  // character-level models (byte-level ones decode bytes)
  // Byte-level: whether added tokens' text goes through the byte map on decode (Hugging
  // Face's ByteLevel decoder does); false for tiktoken (plain UTF-8).
  bool added_byte_level = true;
};

class BpeTokenizer : public Tokenizer {
 public:
  BpeTokenizer(std::string kind, std::string path, BpePipeline pipeline);

  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  int32_t vocab_size() const override;
  std::optional<int32_t> token_id(std::string_view token) const override;
  std::vector<Entry> tokens_from(int32_t first) const override;

 private:
  void encode_split(const std::string& text, std::vector<int32_t>& ids) const;

  BpePipeline p_;
  std::vector<const bpe::AddedToken*> raw_added_;    // matched in the input as it is
  std::vector<bpe::AddedToken> normalized_added_;    // content normalized, matched after the normalizer
  std::vector<const bpe::AddedToken*> normalized_added_ptrs_;
  std::unordered_map<int32_t, size_t> added_by_id_;
};

// True when the first line of `file` looks like "<base64> <rank>" (tiktoken format).
bool looks_like_tiktoken(const std::string& file);

// Applies tokenizer_config.json's "legacy" / "add_prefix_space" to a sentencepiece tokenizer
// (transformers' Metaspace prepend scheme); no-op for other kinds.
void set_sentencepiece_prefix_scheme(Tokenizer& tok, bool legacy, bool add_prefix_space);

}  // namespace qlora::data
