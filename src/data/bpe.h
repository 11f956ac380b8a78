// The BPE model shared by the tokenizer.json and tiktoken (Llama 3 tokenizer.model) loaders:
// the merge loop (over raw bytes for byte-level vocabularies, over characters otherwise), the
// GPT-2 byte-to-unicode map, and added/special-token splitting.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace qlora::data::bpe {

// ---------------------------------------------------------------- byte-level map
// GPT-2's reversible map of the 256 byte values onto printable code points, as UTF-8 strings.
const std::vector<std::string>& byte_to_unicode();
// Inverse of byte_to_unicode: code point -> byte, -1 when the code point is not in the map.
int byte_from_unicode(char32_t cp);
// Byte-level form ("Ġthe") -> raw bytes; false when a code point is outside the byte map.
bool bytes_from_byte_level(std::string_view token, std::string& out);

// The pre-tokenizer regexes of Llama 3 (its tiktoken tokenizer.model) and of Qwen2 (the demo
// tokenizer's), run by OnigRegex.
inline constexpr char kLlama3Pattern[] =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
inline constexpr char kQwen2Pattern[] =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// ---------------------------------------------------------------- added tokens
struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool special = false;
  bool lstrip = false;       // absorb whitespace on its left
  bool rstrip = false;       // absorb whitespace on its right
  bool single_word = false;  // only match when not inside a word
  bool normalized = false;   // matched in the normalized text (by its normalized content)
};

// A piece of input text: either raw text to run through BPE or an added token's id.
struct Segment {
  std::string_view text;  // empty when id >= 0
  int32_t id = -1;
};

// Splits `text` at occurrences of `tokens` (one pass of Hugging Face's added vocabulary:
// leftmost-longest, lstrip / rstrip / single_word applied). Segments point into `text`.
std::vector<Segment> split_added_tokens(const std::vector<const AddedToken*>& tokens, std::string_view text);
// Both passes with no normalizer between them: the non-normalized tokens, then the normalized
// ones in the text left over (sentencepiece tokenizer.model files).
std::vector<Segment> split_added_tokens(const std::vector<AddedToken>& tokens, std::string_view text);

// ---------------------------------------------------------------- the merge loop
// Vocabulary and merges over raw bytes. For tokenizer.json the merge rank is the line index in
// "merges"; for tiktoken a pair (a, b) gets the rank of the token a+b (so tiktoken's "merge the
// adjacent pair whose joined bytes rank lowest" is the same loop).
class BpeModel {
 public:
  BpeModel();
  // Registers a token; returns false when `bytes` is already a token (first id wins).
  bool add_token(const std::string& bytes, int32_t id);
  // A vocabulary entry the merges can never produce (in a byte-level file, one not written
  // in the byte map, e.g. a special token's text): decodes as its UTF-8 text, never matched.
  void add_unreachable_token(const std::string& text, int32_t id);
  // Registers the merge a+b at `rank`; false when a or b or a+b is not a token.
  bool add_merge(const std::string& a, const std::string& b, int32_t rank);
  void set_ignore_merges(bool v) { ignore_merges_ = v; }
  // Character-level vocabularies of the WordPiece-like kind: every symbol of a piece but the
  // first carries `prefix` ("##"), the last one `suffix` ("</w>"); a merge of a and b makes
  // a + b less b's prefix. Set before add_merge.
  void set_subword_affixes(std::string prefix, std::string suffix) {
    prefix_ = std::move(prefix);
    suffix_ = std::move(suffix);
  }

  std::optional<int32_t> find(std::string_view bytes) const;
  // Bytes of a token id, nullptr when the id has no token.
  const std::string* bytes_of(int32_t id) const;
  int32_t max_id() const { return static_cast<int32_t>(id_to_bytes_.size()) - 1; }
  size_t token_count() const { return bytes_to_id_.size(); }
  size_t merge_count() const { return merges_.size(); }

  // Appends the ids of one pre-tokenized piece. Bytes with no single-byte token are dropped
  // (as Hugging Face's BPE does without an unk token).
  void encode_piece(std::string_view piece, std::vector<int32_t>& out) const;
  // The same over a string whose initial symbols are its UTF-8 characters (sentencepiece
  // vocabularies): a character that is no token becomes its bytes' byte_fallback ids (256
  // entries, -1 where missing; nullptr for none) or else unk_id (runs fused into one with
  // fuse_unk), or else is dropped.
  void encode_chars(std::string_view piece, const int32_t* byte_fallback, int32_t unk_id, bool fuse_unk,
                    std::vector<int32_t>& out) const;

 private:
  void merge(const std::vector<int32_t>& initial, std::vector<int32_t>& out) const;
  struct Merge {
    int32_t rank;
    int32_t id;
  };
  static uint64_t key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  std::unordered_map<std::string, int32_t> bytes_to_id_;
  std::vector<std::string> id_to_bytes_;
  std::vector<bool> has_id_;
  std::unordered_map<uint64_t, Merge> merges_;
  int32_t byte_id_[256];  // id of each single-byte token, -1 when none
  bool ignore_merges_ = false;
  std::string prefix_, suffix_;
};

}  // namespace qlora::data::bpe
