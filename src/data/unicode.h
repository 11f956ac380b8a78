// UTF-8 and the few Unicode character classes the byte-level BPE pre-tokenizer needs
// (\p{L}, \p{N}, \s). The class table is generated (scripts/gen_unicode_tables.py, from the
// oracles' own regex engines so that the Unicode versions agree) and committed, so no ICU or
// PCRE2 is needed at build time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace qlora::data::unicode {

enum class CharClass : uint8_t { kOther = 0, kLetter = 1, kNumber = 2, kWhitespace = 3 };

struct CharRange {
  char32_t first;
  char32_t last;
  CharClass cls;
  bool word;  // \w: Alphabetic, marks, Nd, Pc, Join_Control
};

// Sorted, non-overlapping; code points in no range are kOther and not word
// (unicode_tables.cpp).
extern const CharRange kCharRanges[];
extern const size_t kCharRangeCount;

CharClass char_class(char32_t cp);
// \w as the tokenizers library's regex engine has it (single_word added tokens).
bool is_word_char(char32_t cp);

inline constexpr char32_t kReplacementChar = 0xFFFD;

// Note [Invalid UTF-8]
// Text reaching the tokenizer is bytes; Hugging Face tokenizers only ever see valid Unicode
// (a Python str). We decode the way Python's bytes.decode("utf-8", errors="replace") does:
// each maximal ill-formed subpart (Unicode 15, section 3.9, "U+FFFD substitution of maximal
// subparts") becomes one U+FFFD. Token ids for text with invalid bytes therefore equal Hugging
// Face's ids for the replaced text; the original bytes are not recoverable by decode.

// Code points of `text`, invalid sequences replaced as in Note [Invalid UTF-8].
std::vector<char32_t> decode_utf8(std::string_view text);

// `text` with invalid sequences replaced by U+FFFD (unchanged when already valid).
std::string sanitize_utf8(std::string_view text);

bool is_valid_utf8(std::string_view text);

void append_utf8(std::string& out, char32_t cp);

}  // namespace qlora::data::unicode
