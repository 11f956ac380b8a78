// Lines a tokenizer here may legitimately tokenize differently from the oracle: the Unicode
// tables of this build's libraries are older or newer than the oracle's (Note [Unicode
// versions] in src/data/tokenizer_components.cpp). Debian 12's Oniguruma 6.9.8 knows Unicode
// 14.0, the tokenizers library's Oniguruma 16.0: a letter or digit of a script added in 15.0
// or later is "other" here. The tokenizers library normalizes with Unicode 9.0 tables, utf8proc
// with 15.0: a mark added since composes here and not there. Only these code points count.
#pragma once

#include <string_view>

namespace qlora::testing {

inline bool newer_than_unicode_14(char32_t c) {
  struct Range {
    char32_t first, last;
  };
  static constexpr Range kRanges[] = {
      {0x0CF3, 0x0CF3},   {0x1C89, 0x1C8A},   {0x105C0, 0x105FF}, {0x10D40, 0x10D8F}, {0x10EC0, 0x10EFF},
      {0x11380, 0x113FF}, {0x116D0, 0x116FF}, {0x11B00, 0x11B5F}, {0x11BC0, 0x11BFF}, {0x11F00, 0x11F5F},
      {0x13439, 0x1343F}, {0x13460, 0x143FF}, {0x16100, 0x1613F}, {0x16D40, 0x16D7F}, {0x1CC00, 0x1CEBF},
      {0x1D2C0, 0x1D2DF}, {0x1E030, 0x1E08F}, {0x1E4D0, 0x1E4FF}, {0x1E5D0, 0x1E5FF}, {0x2EBF0, 0x2EE5F},
      {0x31350, 0x323AF}};
  for (const Range& r : kRanges)
    if (c >= r.first && c <= r.last) return true;
  return false;
}

// Marks and letters added after Unicode 9.0 that a normalizer treats differently (seen).
inline bool normalizes_differently_since_unicode_9(char32_t c) { return c == 0x1DFA || c == 0xA7F2; }

// True when `utf8` holds a code point of either kind.
inline bool has_unicode_version_gap(std::string_view utf8) {
  for (size_t i = 0; i < utf8.size();) {
    const auto b = static_cast<unsigned char>(utf8[i]);
    const size_t n = b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
    char32_t c = n == 1 ? b : b & (0x7F >> n);
    for (size_t k = 1; k < n && i + k < utf8.size(); ++k) c = (c << 6) | (static_cast<unsigned char>(utf8[i + k]) & 0x3F);
    if (newer_than_unicode_14(c) || normalizes_differently_since_unicode_9(c)) return true;
    i += n;
  }
  return false;
}

}  // namespace qlora::testing
