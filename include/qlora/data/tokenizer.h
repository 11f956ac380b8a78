// Tokenizers: text <-> token ids exactly as Hugging Face tokenizes for the model.
//
// Three file kinds, one interface:
//   "tokenizer.json"  a Hugging Face tokenizer.json with a BPE model, byte-level (Llama 3,
//                     Qwen2/2.5/3, GPT-2, SmolLM, StarCoder, DeepSeek) or sentencepiece-style
//                     (Llama 2, Mistral, Phi-3), run component by component as the tokenizers
//                     library runs it (src/data/tokenizer_json.cpp);
//   "sentencepiece"   a sentencepiece tokenizer.model (Llama 2, TinyLlama) where no
//                     tokenizer.json is given, encoded the way transformers' LlamaTokenizer does;
//   "tiktoken"        Meta's Llama 3 original/tokenizer.model (base64 token + rank lines),
//                     with Llama 3's 256 special tokens.
// The kind of a tokenizer.model is told by its content, not its name. encode() never adds
// bos/eos; bos_id()/add_bos() say what the model expects, and the data pipeline adds them.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace qlora::data {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Hugging Face semantics: special/added tokens written inside `text` are recognised as
  // their ids (as tokenizers' encode does); no bos/eos are added here. Invalid UTF-8 is read
  // as Python's errors="replace" would (Note [Invalid UTF-8] in src/data/unicode.h).
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  // Hugging Face's decode with skip_special_tokens=False: special tokens appear as their text;
  // bytes that do not form valid UTF-8 become U+FFFD. Throws std::out_of_range on an id that
  // is no token.
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
  // One more than the largest id (base vocabulary and added tokens).
  virtual int32_t vocab_size() const = 0;
  // The id of a token written exactly as in the vocabulary (byte-level form for BPE files,
  // "▁the" for sentencepiece) or an added/special token's content; nullopt when none.
  virtual std::optional<int32_t> token_id(std::string_view token) const = 0;

  // One token as a check of the ids reports it: its text as token_id() takes it, and whether
  // it is an added or special token rather than a vocabulary entry.
  struct Entry {
    int32_t id = -1;
    std::string text;
    bool added = false;
  };
  // Every token whose id is `first` or more (vocabulary, added and special tokens), in id
  // order: the ids a model's embedding must have rows for (train/vocab_check.h).
  virtual std::vector<Entry> tokens_from(int32_t first) const = 0;

  int32_t bos_id() const { return bos_id_; }  // -1 when none
  int32_t eos_id() const { return eos_id_; }  // -1 when none
  int32_t pad_id() const { return pad_id_; }  // -1 when none
  bool add_bos() const { return add_bos_; }   // whether sequences start with bos
  std::string kind() const { return kind_; }  // "sentencepiece", "tokenizer.json", "tiktoken"
  const std::string& path() const { return path_; }  // the file it was read from

  // Set by the loaders (load_tokenizer reads the model directory's configs).
  void set_special_ids(int32_t bos, int32_t eos, int32_t pad, bool add_bos) {
    bos_id_ = bos;
    eos_id_ = eos;
    pad_id_ = pad;
    add_bos_ = add_bos;
  }

 protected:
  int32_t bos_id_ = -1;
  int32_t eos_id_ = -1;
  int32_t pad_id_ = -1;
  bool add_bos_ = false;
  std::string kind_;
  std::string path_;
};

// A model directory (tokenizer.json when there is one, as transformers loads it; else
// tokenizer.model, either format by content; bos/eos/add_bos from tokenizer_config.json /
// special_tokens_map.json / generation_config.json) or a tokenizer file. Throws InputError
// naming the file (and, for tokenizer.json, the JSON path of the problem).
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path);

// The single-file loaders behind load_tokenizer; specials get each kind's defaults (Llama 2:
// <s>/</s>, add_bos; Llama 3 tiktoken: <|begin_of_text|>/<|end_of_text|>, add_bos;
// tokenizer.json: bos from its TemplateProcessing post-processor when it has one).
std::unique_ptr<Tokenizer> load_sentencepiece_tokenizer(const std::string& file);
std::unique_ptr<Tokenizer> load_tokenizer_json(const std::string& file);
std::unique_ptr<Tokenizer> load_tiktoken_tokenizer(const std::string& file);

}  // namespace qlora::data
