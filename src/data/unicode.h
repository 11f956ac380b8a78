// UTF-8 decoding as Python decodes (Note [Invalid UTF-8]) and the code point properties the
// tokenizers need, from utf8proc: White_Space, numeric (N*), and regex \w.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace qlora::data::unicode {

// The White_Space property (Rust's char::is_whitespace, \s of Oniguruma and Rust's regex).
bool is_white_space(char32_t cp);
// General category N* (Rust's char::is_numeric; the Digits pre-tokenizer).
bool is_numeric(char32_t cp);
// \w of Rust's regex crate (Alphabetic, marks, Nd, Pc, Join_Control): single_word added tokens.
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
