// Lines a tokenizer here may legitimately tokenize differently from the oracle: the tokenizers
// library normalizes (NFC, NFKC, ...) with Unicode 9.0 tables, utf8proc with Unicode 15.0, so a
// combining mark or letter added since 2016 composes or decomposes here and not there (Note
// [Unicode versions] in src/data/tokenizer_components.cpp). The regexes agree: Oniguruma is
// built from the release tokenizers bundles (third_party/oniguruma, Unicode 16.0).
#pragma once

#include <string_view>

namespace qlora::testing {

// The code points of that kind the corpora hold (found by the parity tests).
inline bool normalizes_differently_since_unicode_9(char32_t c) { return c == 0x1DFA || c == 0xA7F2; }

// True when `utf8` holds such a code point.
inline bool has_unicode_version_gap(std::string_view utf8) {
  for (size_t i = 0; i < utf8.size();) {
    const auto b = static_cast<unsigned char>(utf8[i]);
    const size_t n = b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
    char32_t c = n == 1 ? b : b & (0x7F >> n);
    for (size_t k = 1; k < n && i + k < utf8.size(); ++k) c = (c << 6) | (static_cast<unsigned char>(utf8[i + k]) & 0x3F);
    if (normalizes_differently_since_unicode_9(c)) return true;
    i += n;
  }
  return false;
}

}  // namespace qlora::testing
