// The text stages of a Hugging Face tokenizer.json around its BPE model, as the tokenizers
// library runs them: the normalizer (NFC, NFKC, NFD, NFKD, Prepend, Replace, Lowercase, Strip,
// Sequence), the pre-tokenizer (Split, ByteLevel, Metaspace, Digits, Sequence) and the decoder
// (ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip, Sequence). tokenizer_json.cpp
// reads them from the file; what it does not find here it refuses by name.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "data/onig_regex.h"

namespace qlora::data {

// ---------------------------------------------------------------- normalizer
// Unicode normalization forms run on utf8proc (Note [Unicode versions]).
enum class NormalForm { kNFC, kNFD, kNFKC, kNFKD };

class Normalizer {
 public:
  void add_form(NormalForm form);
  void add_prepend(std::string prefix);          // only to non-empty text
  void add_replace(std::shared_ptr<const OnigRegex> pattern, std::string content);
  void add_lowercase();
  void add_strip(bool left, bool right);         // White_Space code points
  bool empty() const { return steps_.empty(); }
  std::string apply(std::string text) const;

 private:
  std::vector<std::function<void(std::string&)>> steps_;
};

// ---------------------------------------------------------------- pre-tokenizer
// A split of the text: normalized text, and whether it starts at byte 0 of the original
// input (Metaspace's prepend_scheme "first" asks).
struct TextSplit {
  std::string text;
  bool at_start = false;
};

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

enum class PrependScheme { kAlways, kFirst, kNever };

class PreTokenizer {
 public:
  void add_split(std::shared_ptr<const OnigRegex> pattern, SplitBehavior behavior, bool invert);
  // use_regex: split with GPT-2's pattern first. Marks the pipeline byte-level: from here the
  // BPE model sees the splits' bytes (its vocabulary is read through the GPT-2 byte map).
  void add_byte_level(bool add_prefix_space, bool use_regex);
  void add_metaspace(std::string replacement, PrependScheme scheme, bool split);
  void add_digits(bool individual);
  bool byte_level() const { return byte_level_; }
  void apply(std::vector<TextSplit>& splits) const;

 private:
  std::vector<std::function<void(std::vector<TextSplit>&)>> steps_;
  bool byte_level_ = false;
};

// The GPT-2 pattern ByteLevel(use_regex=true) splits with.
inline constexpr char kGpt2Pattern[] = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// ---------------------------------------------------------------- decoder
// Token strings in, text out; each step rewrites the list (Fuse leaves one string).
class Decoder {
 public:
  void add_replace(std::string pattern, std::string content);  // literal pattern
  void add_byte_fallback();
  void add_fuse();
  void add_strip(std::string content, int start, int stop);
  void add_metaspace(std::string replacement, PrependScheme scheme);
  void add_byte_level();
  // No step at all: tokens are joined with spaces (tokenizers without a decoder).
  bool empty() const { return steps_.empty(); }
  std::string apply(std::vector<std::string> tokens) const;

 private:
  std::vector<std::function<void(std::vector<std::string>&)>> steps_;
};

}  // namespace qlora::data
