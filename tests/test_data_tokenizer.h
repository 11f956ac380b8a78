// A tiny deterministic tokenizer for the data tests: one id per byte
// (id = byte value, 0..255) plus special tokens from id 256 on, recognised
// inside text as Hugging Face tokenizers do. Expected ids in the tests can be
// written by hand: 'H' is 72, 'i' is 105, a special is its listed id.
#pragma once

#include <algorithm>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "qlora/data/tokenizer.h"

namespace qlora::data::testing {

class ByteTokenizer : public Tokenizer {
 public:
  struct Options {
    std::vector<std::string> specials;  // id 256, 257, ... in this order
    std::string bos, eos, pad;          // names from `specials`, or empty for none
    bool add_bos = false;
    // Extras that make segment-wise and whole-string tokenization differ:
    std::string merge;          // two characters encoded as one token (id kMergeId)
    bool dummy_prefix = false;  // like sentencepiece: text gets a leading kPrefixId token
  };
  static constexpr int32_t kMergeId = 500;
  static constexpr int32_t kPrefixId = 501;  // "▁" at the start of an encoded text

  explicit ByteTokenizer(Options o) : specials_(std::move(o.specials)) {
    for (size_t i = 0; i < specials_.size(); ++i) ids_[specials_[i]] = 256 + static_cast<int32_t>(i);
    auto find = [this](const std::string& name) { return name.empty() ? -1 : ids_.at(name); };
    bos_id_ = find(o.bos);
    eos_id_ = find(o.eos);
    pad_id_ = find(o.pad);
    add_bos_ = o.add_bos;
    kind_ = "test-bytes";
    merge_ = o.merge;
    dummy_prefix_ = o.dummy_prefix;
  }

  // Llama 3 style: <|begin_of_text|>=256 (bos, added), <|end_of_text|>=257 (eos),
  // <|start_header_id|>=258, <|end_header_id|>=259, <|eot_id|>=260; no pad.
  static ByteTokenizer llama3() {
    return ByteTokenizer({{"<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                           "<|end_header_id|>", "<|eot_id|>"},
                          "<|begin_of_text|>", "<|end_of_text|>", "", true, "", false});
  }
  // ChatML / Qwen style: <|im_start|>=256, <|im_end|>=257 (eos), <|endoftext|>=258 (pad);
  // no bos.
  static ByteTokenizer chatml() {
    return ByteTokenizer({{"<|im_start|>", "<|im_end|>", "<|endoftext|>"}, "", "<|im_end|>",
                          "<|endoftext|>", false, "", false});
  }
  // Llama 2 style: <s>=256 (bos, added), </s>=257 (eos); no chat tokens, no pad.
  static ByteTokenizer plain() {
    return ByteTokenizer({{"<s>", "</s>"}, "<s>", "</s>", "", true, "", false});
  }

  std::vector<int32_t> encode(std::string_view text) const override {
    std::vector<int32_t> out;
    if (dummy_prefix_ && !text.empty()) out.push_back(kPrefixId);
    size_t i = 0;
    while (i < text.size()) {
      if (!merge_.empty() && text.substr(i, merge_.size()) == merge_) {
        out.push_back(kMergeId);
        i += merge_.size();
        continue;
      }
      bool matched = false;
      for (size_t s = 0; s < specials_.size(); ++s) {
        if (text.substr(i, specials_[s].size()) == specials_[s]) {
          out.push_back(256 + static_cast<int32_t>(s));
          i += specials_[s].size();
          matched = true;
          break;
        }
      }
      if (!matched) out.push_back(static_cast<unsigned char>(text[i++]));
    }
    return out;
  }
  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string out;
    for (int32_t id : ids) {
      if (id == kMergeId) out += merge_;
      else if (id == kPrefixId) out += " ";
      else if (id < 256) out += static_cast<char>(id);
      else out += specials_.at(static_cast<size_t>(id - 256));
    }
    return out;
  }
  int32_t vocab_size() const override { return kPrefixId + 1; }
  std::optional<int32_t> token_id(std::string_view token) const override {
    auto it = ids_.find(std::string(token));
    if (it == ids_.end()) return std::nullopt;
    return it->second;
  }
  std::vector<Entry> tokens_from(int32_t first) const override {
    std::vector<Entry> out;
    for (int32_t id = std::max(first, 0); id < 256; ++id)
      out.push_back({id, std::string(1, static_cast<char>(id)), false});
    for (size_t i = 0; i < specials_.size(); ++i)
      if (256 + static_cast<int32_t>(i) >= first) out.push_back({256 + static_cast<int32_t>(i), specials_[i], true});
    if (!merge_.empty() && kMergeId >= first) out.push_back({kMergeId, merge_, false});
    if (kPrefixId >= first) out.push_back({kPrefixId, " ", false});
    return out;
  }

 private:
  std::vector<std::string> specials_;
  std::map<std::string, int32_t> ids_;
  std::string merge_;
  bool dummy_prefix_ = false;
};

// Byte ids of plain text (no specials), for writing expected sequences.
inline std::vector<int32_t> bytes(std::string_view s) {
  std::vector<int32_t> out;
  for (char c : s) out.push_back(static_cast<unsigned char>(c));
  return out;
}

// Concatenation helper: cat({256}, bytes("Hi"), {257}).
inline std::vector<int32_t> cat(std::initializer_list<std::vector<int32_t>> parts) {
  std::vector<int32_t> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

// The same length of kIgnoreIndex.
inline std::vector<int32_t> ignored(size_t n) { return std::vector<int32_t>(n, -100); }

}  // namespace qlora::data::testing
