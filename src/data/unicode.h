// UTF-8 and the few Unicode character classes the byte-level BPE pre-tokenizer needs
// (\p{L}, \p{N}, \s). The class table is generated (scripts/gen_unicode_tables.py) and
// committed, so no ICU or PCRE2 is needed at build time.
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
};

// Sorted, non-overlapping; code points in no range are kOther (unicode_tables.cpp).
extern const CharRange kCharRanges[];
extern const size_t kCharRangeCount;
extern const char kUnicodeVersion[];

CharClass char_class(char32_t cp);

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
std::string to_utf8(const std::vector<char32_t>& cps, size_t begin, size_t end);

}  // namespace qlora::data::unicode
