// lora/gguf_vocab (internal to lora/gguf_merge): a model directory's tokenizer as llama.cpp's
// tokenizer.* metadata, the way its converter builds it: tokenizer.model (sentencepiece) as
// "llama" with scores and token types, a byte-level BPE tokenizer.json as "gpt2" with merges and
// the pre-tokenizer's name, both padded to the embedding's rows with [PADi] (unused) tokens;
// special token ids, add_bos / add_eos and the chat template from tokenizer_config.json (or
// chat_template.jinja), falling back to config.json's ids.
#pragma once

#include <string>
#include <vector>

#include "qlora/io/gguf.h"
#include "qlora/model/decoder_config.h"

namespace qlora::lora::detail {

struct GgufVocab {
  std::string model;  // "llama" or "gpt2"
  std::string pre;    // llama.cpp's pre-tokenizer name
  bool pre_recognized = true;
  int64_t tokens = 0;
  io::GgufMetadata metadata;  // every tokenizer.* key
};

// `dirs` are searched in order for each file (the adapter's, where training wrote the tokenizer
// it used, then the base's). `prefer_gpt2`: Phi-3 with tokenizer_class GPT2Tokenizer. InputError
// naming the directories when neither holds a tokenizer, or for a vocabulary larger than
// model.vocab_size.
GgufVocab read_gguf_vocab(const std::vector<std::string>& dirs, const DecoderConfig& model);

}  // namespace qlora::lora::detail
