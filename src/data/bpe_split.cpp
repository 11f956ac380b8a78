// The pre-tokenizer regex of the Llama 3 family, as a scanner over code points.
#include <vector>

#include "data/bpe.h"
#include "data/unicode.h"

namespace qlora::data::bpe {

// Note [Pre-tokenizer scanner]
// Llama 3 (and Qwen2, which differs only in \p{N}{1,3} -> \p{N}) split text with
//   (?i:'s|'t|'re|'ve|'m|'ll|'d) | [^\r\n\p{L}\p{N}]?\p{L}+ | \p{N}{1,3} |
//    ?[^\s\p{L}\p{N}]+[\r\n]* | \s*[\r\n]+ | \s+(?!\S) | \s+
// applied with find-all semantics: at each position the first alternative that matches wins
// (leftmost-first, not longest), and the next search starts where the match ended. No
// alternative matches the empty string and every code point starts some match, so the pieces
// tile the text. Resolving each alternative's backtracking by hand:
//  1. an ASCII apostrophe then s|t|m|d or re|ve|ll, any case (s also matches U+017F, the
//     long s, which Unicode case folding maps to s);
//  2. one optional code point that is not \r, \n, a letter or a number, then a maximal run of
//     letters; the optional one is taken only when a letter follows it;
//  3. 1 to max_digits numbers;
//  4. an optional U+0020 taken only when a "symbol" (not \s, letter or number) follows, a
//     maximal run of symbols, then a maximal run of \r and \n;
//  5. at whitespace: \s* gives back until [\r\n]+ can match, so the match ends just after the
//     LAST \r or \n of the maximal whitespace run (when the run holds one);
//  6. the maximal whitespace run when it reaches the end of text, else the run less its last
//     code point when that leaves at least one (the lookahead then sees whitespace);
//  7. the maximal whitespace run (a single whitespace code point before a non-space).

std::optional<SplitPattern> find_split_pattern(std::string_view regex) {
  if (regex == kLlama3Pattern) return SplitPattern{"llama3", 3};
  if (regex == kQwen2Pattern) return SplitPattern{"qwen2", 1};
  return std::nullopt;
}

namespace {

using unicode::CharClass;

bool is_crlf(char32_t c) { return c == '\r' || c == '\n'; }

char32_t ascii_fold(char32_t c) {
  if (c >= 'A' && c <= 'Z') return c - 'A' + 'a';
  if (c == 0x17F) return 's';  // LATIN SMALL LETTER LONG S folds to s
  return c;
}

// Length in code points of the contraction at i (alternative 1), 0 when none.
size_t match_contraction(const std::vector<char32_t>& cp, size_t i) {
  const size_t n = cp.size();
  if (cp[i] != '\'' || i + 1 >= n) return 0;
  const char32_t a = ascii_fold(cp[i + 1]);
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
  if (i + 2 >= n) return 0;
  const char32_t b = ascii_fold(cp[i + 2]);
  if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
  return 0;
}

}  // namespace

std::vector<std::pair<size_t, size_t>> split_pieces(const SplitPattern& pattern,
                                                    std::string_view text) {
  // Code points with their byte offsets (text is valid UTF-8: the caller sanitized it).
  std::vector<char32_t> cp = unicode::decode_utf8(text);
  const size_t n = cp.size();
  std::vector<size_t> off(n + 1);
  std::vector<CharClass> cls(n);
  {
    size_t b = 0;
    for (size_t i = 0; i < n; ++i) {
      off[i] = b;
      b += cp[i] < 0x80 ? 1 : cp[i] < 0x800 ? 2 : cp[i] < 0x10000 ? 3 : 4;
      cls[i] = unicode::char_class(cp[i]);
    }
    off[n] = b;
  }
  auto is = [&](size_t i, CharClass c) { return i < n && cls[i] == c; };

  std::vector<std::pair<size_t, size_t>> pieces;
  size_t i = 0;
  while (i < n) {
    size_t end = i;  // exclusive, in code points
    if (size_t len = match_contraction(cp, i)) {
      end = i + len;
    } else if (is(i, CharClass::kLetter) ||
               (!is(i, CharClass::kNumber) && !is_crlf(cp[i]) && is(i + 1, CharClass::kLetter))) {
      end = is(i, CharClass::kLetter) ? i : i + 1;
      while (is(end, CharClass::kLetter)) ++end;
    } else if (is(i, CharClass::kNumber)) {
      end = i;
      while (end - i < static_cast<size_t>(pattern.max_digits) && is(end, CharClass::kNumber)) ++end;
    } else if (is(i, CharClass::kOther) || (cp[i] == ' ' && is(i + 1, CharClass::kOther))) {
      end = cp[i] == ' ' ? i + 1 : i;
      while (is(end, CharClass::kOther)) ++end;
      while (end < n && is_crlf(cp[end])) ++end;
    } else {  // whitespace: alternatives 5-7
      size_t run = i;
      while (is(run, CharClass::kWhitespace)) ++run;
      size_t last_nl = n;
      for (size_t k = i; k < run; ++k) {
        if (is_crlf(cp[k])) last_nl = k;
      }
      if (last_nl != n) {
        end = last_nl + 1;
      } else if (run == n || run - i == 1) {
        end = run;
      } else {
        end = run - 1;
      }
    }
    pieces.emplace_back(off[i], off[end]);
    i = end;
  }
  return pieces;
}

}  // namespace qlora::data::bpe
