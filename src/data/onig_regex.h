// A regex of a tokenizer.json (Split, Replace, ByteLevel's GPT-2 pattern, the Llama 3 pattern
// of tiktoken files) compiled and searched as Hugging Face tokenizers does it: Oniguruma,
// its own syntax (ONIG_SYNTAX_ONIGURUMA), no options, UTF-8.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace qlora::data {

// [begin, end) bytes of a piece of the searched text, and whether it is a match.
struct RegexPiece {
  size_t begin = 0;
  size_t end = 0;
  bool match = false;
};

class OnigRegex {
 public:
  // Throws InputError "<where>: the regex <pattern> does not compile: <Oniguruma's reason>".
  OnigRegex(const std::string& pattern, const std::string& where);
  ~OnigRegex();
  OnigRegex(const OnigRegex&) = delete;
  OnigRegex& operator=(const OnigRegex&) = delete;

  // A literal string as a regex (tokenizers escapes String patterns).
  static std::string escape(std::string_view literal);

  // The text cut into matches and the gaps between them, in order, covering all of it
  // (Note [regex pieces]); valid UTF-8 in. Empty text: one empty non-match.
  std::vector<RegexPiece> pieces(std::string_view text) const;

  const std::string& pattern() const { return pattern_; }

 private:
  struct Impl;
  std::string pattern_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qlora::data
