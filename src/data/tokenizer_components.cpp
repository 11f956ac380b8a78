#include "data/tokenizer_components.h"

#include <utf8proc.h>

#include <algorithm>
#include <cctype>
#include <iterator>
#include <cstdlib>
#include <string>
#include <utility>

#include "data/bpe.h"
#include "data/unicode.h"

namespace qlora::data {

namespace {

size_t cp_len(unsigned char lead) { return lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4; }

// The code point starting at byte i of valid UTF-8.
char32_t cp_at(std::string_view s, size_t i) {
  utf8proc_int32_t cp = 0;
  utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + i), static_cast<utf8proc_ssize_t>(s.size() - i), &cp);
  return static_cast<char32_t>(cp < 0 ? 0xFFFD : cp);
}

void replace_all(std::string& s, std::string_view from, std::string_view to) {
  if (from.empty()) return;
  std::string out;
  size_t at = 0;
  for (size_t hit; (hit = s.find(from, at)) != std::string::npos; at = hit + from.size()) {
    out.append(s, at, hit - at);
    out += to;
  }
  out.append(s, at, std::string::npos);
  s = std::move(out);
}

// Note [Unicode versions]
// The tokenizers library splits with Oniguruma 6.9.10 (Unicode 16.0 classes: the version
// vendored in third_party/oniguruma) and normalizes with Unicode 9.0 tables
// (unicode-normalization-alignments); utf8proc normalizes with its own, newer ones. A code
// point Unicode assigned after 9.0 is, to tokenizers, a starter without a decomposition: it
// neither changes nor lets anything reorder or compose across it. unicode9_exceptions.inc
// lists those utf8proc would change (generated against both libraries); the text is
// normalized piece by piece between them and they are kept as they are, which is what the
// Unicode 9.0 tables do.
#include "data/unicode9_exceptions.inc"

bool unicode9_exception(char32_t c) {
  return std::binary_search(std::begin(kUnicode9Exceptions), std::end(kUnicode9Exceptions), c);
}

std::string utf8proc_piece(const std::string& text, NormalForm form) {
  int options = UTF8PROC_STABLE;
  switch (form) {
    case NormalForm::kNFC: options |= UTF8PROC_COMPOSE; break;
    case NormalForm::kNFD: options |= UTF8PROC_DECOMPOSE; break;
    case NormalForm::kNFKC: options |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT; break;
    case NormalForm::kNFKD: options |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT; break;
  }
  utf8proc_uint8_t* out = nullptr;
  const utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(text.data()),
                                          static_cast<utf8proc_ssize_t>(text.size()), &out,
                                          static_cast<utf8proc_option_t>(options));
  if (n < 0) return text;  // invalid UTF-8 never gets here: the tokenizer sanitizes first
  std::string result(reinterpret_cast<const char*>(out), static_cast<size_t>(n));
  std::free(out);
  return result;
}

std::string utf8proc_form(const std::string& text, NormalForm form) {
  std::string out, piece;
  for (size_t i = 0; i < text.size();) {
    const size_t len = cp_len(static_cast<unsigned char>(text[i]));
    if (unicode9_exception(cp_at(text, i))) {
      if (!piece.empty()) out += utf8proc_piece(piece, form);
      piece.clear();
      out.append(text, i, len);
    } else {
      piece.append(text, i, len);
    }
    i += len;
  }
  if (!piece.empty()) out += utf8proc_piece(piece, form);
  return out;
}

// Pieces from a code point predicate: each code point it holds is a match of its own.
std::vector<RegexPiece> char_pieces(std::string_view text, bool (*pred)(char32_t)) {
  std::vector<RegexPiece> out;
  size_t prev = 0;
  for (size_t i = 0; i < text.size();) {
    const size_t len = cp_len(static_cast<unsigned char>(text[i]));
    if (pred(cp_at(text, i))) {
      if (i > prev) out.push_back({prev, i, false});
      out.push_back({i, i + len, true});
      prev = i + len;
    }
    i += len;
  }
  if (prev < text.size() || out.empty()) out.push_back({prev, text.size(), false});
  return out;
}

// tokenizers' SplitDelimiterBehavior over (piece, is_match) lists; every output piece is a
// split of its own.
std::vector<RegexPiece> apply_behavior(std::vector<RegexPiece> pieces, SplitBehavior behavior, bool invert) {
  if (invert)
    for (auto& p : pieces) p.match = !p.match;
  std::vector<RegexPiece> out;
  bool previous_match = false;
  switch (behavior) {
    case SplitBehavior::kIsolated:
      return pieces;
    case SplitBehavior::kRemoved:
      for (const auto& p : pieces)
        if (!p.match) out.push_back(p);
      return out;
    case SplitBehavior::kMergedWithPrevious:
      for (const auto& p : pieces) {
        if (p.match && !previous_match && !out.empty()) out.back().end = p.end;
        else out.push_back(p);
        previous_match = p.match;
      }
      return out;
    case SplitBehavior::kMergedWithNext:
      for (auto it = pieces.rbegin(); it != pieces.rend(); ++it) {
        if (it->match && !previous_match && !out.empty()) out.back().begin = it->begin;
        else out.push_back(*it);
        previous_match = it->match;
      }
      return {out.rbegin(), out.rend()};
    case SplitBehavior::kContiguous:
      for (size_t i = 0; i < pieces.size(); ++i) {
        if (i > 0 && pieces[i].match == previous_match && !out.empty()) out.back().end = pieces[i].end;
        else out.push_back(pieces[i]);
        previous_match = pieces[i].match;
      }
      return out;
  }
  return pieces;
}

// Replaces each split by its pieces (empty ones dropped, as tokenizers drops them).
template <typename PieceFn>
void resplit(std::vector<TextSplit>& splits, PieceFn&& pieces_of) {
  std::vector<TextSplit> out;
  out.reserve(splits.size());
  for (auto& s : splits) {
    for (const RegexPiece& p : pieces_of(s.text)) {
      if (p.end <= p.begin) continue;
      out.push_back({s.text.substr(p.begin, p.end - p.begin), s.at_start && p.begin == 0});
    }
  }
  splits = std::move(out);
}

}  // namespace

// ---------------------------------------------------------------- normalizer

void Normalizer::add_form(NormalForm form) {
  steps_.push_back([form](std::string& s) { s = utf8proc_form(s, form); });
}

void Normalizer::add_prepend(std::string prefix) {
  steps_.push_back([prefix = std::move(prefix)](std::string& s) {
    if (!s.empty()) s.insert(0, prefix);
  });
}

void Normalizer::add_replace(std::shared_ptr<const OnigRegex> pattern, std::string content) {
  steps_.push_back([pattern = std::move(pattern), content = std::move(content)](std::string& s) {
    std::string out;
    for (const RegexPiece& p : pattern->pieces(s)) {
      if (p.match) out += content;
      else out.append(s, p.begin, p.end - p.begin);
    }
    s = std::move(out);
  });
}

void Normalizer::add_lowercase() {
  steps_.push_back([](std::string& s) {
    std::string out;
    out.reserve(s.size());
    for (char32_t c : unicode::decode_utf8(s)) {
      if (c == 0x130) {  // İ: the one unconditional full lowercase mapping of two code points
        out += "i\xCC\x87";
        continue;
      }
      unicode::append_utf8(out, static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(c))));
    }
    s = std::move(out);
  });
}

void Normalizer::add_strip(bool left, bool right) {
  steps_.push_back([left, right](std::string& s) {
    const std::vector<char32_t> cps = unicode::decode_utf8(s);
    size_t b = 0, e = cps.size();
    while (left && b < e && unicode::is_white_space(cps[b])) ++b;
    while (right && e > b && unicode::is_white_space(cps[e - 1])) --e;
    std::string out;
    for (size_t i = b; i < e; ++i) unicode::append_utf8(out, cps[i]);
    s = std::move(out);
  });
}

std::string Normalizer::apply(std::string text) const {
  for (const auto& step : steps_) step(text);
  return text;
}

// ---------------------------------------------------------------- pre-tokenizer

void PreTokenizer::add_split(std::shared_ptr<const OnigRegex> pattern, SplitBehavior behavior, bool invert) {
  steps_.push_back([pattern = std::move(pattern), behavior, invert](std::vector<TextSplit>& splits) {
    resplit(splits, [&](const std::string& t) { return apply_behavior(pattern->pieces(t), behavior, invert); });
  });
}

void PreTokenizer::add_byte_level(bool add_prefix_space, bool use_regex) {
  byte_level_ = true;
  std::shared_ptr<const OnigRegex> gpt2;
  if (use_regex) gpt2 = std::make_shared<OnigRegex>(kGpt2Pattern, "the ByteLevel pre-tokenizer");
  steps_.push_back([add_prefix_space, gpt2](std::vector<TextSplit>& splits) {
    if (add_prefix_space)
      for (auto& s : splits)
        if (s.text.empty() || s.text[0] != ' ') s.text.insert(0, " ");
    if (gpt2) resplit(splits, [&](const std::string& t) { return gpt2->pieces(t); });
  });
}

void PreTokenizer::add_metaspace(std::string replacement, PrependScheme scheme, bool split) {
  steps_.push_back([replacement = std::move(replacement), scheme, split](std::vector<TextSplit>& splits) {
    for (auto& s : splits) {
      replace_all(s.text, " ", replacement);
      const bool prepend = scheme == PrependScheme::kAlways || (scheme == PrependScheme::kFirst && s.at_start);
      if (prepend && s.text.compare(0, replacement.size(), replacement) != 0) s.text.insert(0, replacement);
    }
    if (!split) return;
    resplit(splits, [&](const std::string& t) {
      std::vector<RegexPiece> pieces;
      size_t prev = 0;
      for (size_t hit; (hit = t.find(replacement, prev)) != std::string::npos; prev = hit + replacement.size()) {
        if (hit > prev) pieces.push_back({prev, hit, false});
        pieces.push_back({hit, hit + replacement.size(), true});
      }
      if (prev < t.size()) pieces.push_back({prev, t.size(), false});
      return apply_behavior(std::move(pieces), SplitBehavior::kMergedWithNext, false);
    });
  });
}

void PreTokenizer::add_digits(bool individual) {
  steps_.push_back([individual](std::vector<TextSplit>& splits) {
    resplit(splits, [&](const std::string& t) {
      return apply_behavior(char_pieces(t, &unicode::is_numeric),
                            individual ? SplitBehavior::kIsolated : SplitBehavior::kContiguous, false);
    });
  });
}

void PreTokenizer::apply(std::vector<TextSplit>& splits) const {
  for (const auto& step : steps_) step(splits);
}

// ---------------------------------------------------------------- decoder

void Decoder::add_replace(std::string pattern, std::string content) {
  steps_.push_back([pattern = std::move(pattern), content = std::move(content)](std::vector<std::string>& tokens) {
    for (auto& t : tokens) replace_all(t, pattern, content);
  });
}

void Decoder::add_byte_fallback() {
  steps_.push_back([](std::vector<std::string>& tokens) {
    std::vector<std::string> out;
    std::string bytes;
    const auto flush = [&] {
      if (bytes.empty()) return;
      if (unicode::is_valid_utf8(bytes)) {
        out.push_back(bytes);
      } else {
        for (size_t i = 0; i < bytes.size(); ++i) out.emplace_back("\xEF\xBF\xBD");
      }
      bytes.clear();
    };
    for (auto& t : tokens) {
      const auto hex = [](char c) { return std::isxdigit(static_cast<unsigned char>(c)) != 0; };
      if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' && hex(t[3]) && hex(t[4])) {
        bytes += static_cast<char>(std::stoi(t.substr(3, 2), nullptr, 16));
        continue;
      }
      flush();
      out.push_back(std::move(t));
    }
    flush();
    tokens = std::move(out);
  });
}

void Decoder::add_fuse() {
  steps_.push_back([](std::vector<std::string>& tokens) {
    std::string all;
    for (const auto& t : tokens) all += t;
    tokens.assign(1, std::move(all));
  });
}

void Decoder::add_strip(std::string content, int start, int stop) {
  steps_.push_back([content = std::move(content), start, stop](std::vector<std::string>& tokens) {
    for (auto& t : tokens) {
      for (int i = 0; i < start && t.compare(0, content.size(), content) == 0 && !content.empty(); ++i)
        t.erase(0, content.size());
      for (int i = 0; i < stop && !content.empty() && t.size() >= content.size() &&
                      t.compare(t.size() - content.size(), content.size(), content) == 0;
           ++i)
        t.erase(t.size() - content.size());
    }
  });
}

void Decoder::add_metaspace(std::string replacement, PrependScheme scheme) {
  steps_.push_back([replacement = std::move(replacement), scheme](std::vector<std::string>& tokens) {
    for (size_t i = 0; i < tokens.size(); ++i)
      replace_all(tokens[i], replacement, i == 0 && scheme != PrependScheme::kNever ? "" : " ");
  });
}

void Decoder::add_byte_level() {
  steps_.push_back([](std::vector<std::string>& tokens) {
    std::string bytes, tmp;
    for (const auto& t : tokens) bytes += bpe::bytes_from_byte_level(t, tmp) ? tmp : t;
    tokens.assign(1, unicode::sanitize_utf8(bytes));
  });
}

std::string Decoder::apply(std::vector<std::string> tokens) const {
  std::string out;
  if (steps_.empty()) {
    for (size_t i = 0; i < tokens.size(); ++i) out += (i ? " " : "") + tokens[i];
    return out;
  }
  for (const auto& step : steps_) step(tokens);
  for (const auto& t : tokens) out += t;
  return out;
}

}  // namespace qlora::data
