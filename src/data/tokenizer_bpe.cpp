#include "data/tokenizer_bpe.h"

#include <algorithm>
#include <stdexcept>

#include "data/unicode.h"

namespace qlora::data {

BpeTokenizer::BpeTokenizer(std::string kind, std::string path, BpePipeline pipeline) : p_(std::move(pipeline)) {
  kind_ = std::move(kind);
  path_ = std::move(path);
  for (size_t i = 0; i < p_.added.size(); ++i) {
    added_by_id_.emplace(p_.added[i].id, i);
    if (!p_.added[i].normalized) {
      raw_added_.push_back(&p_.added[i]);
    } else {
      bpe::AddedToken t = p_.added[i];
      t.content = p_.normalizer.apply(t.content);  // matched by its normalized form
      normalized_added_.push_back(std::move(t));
    }
  }
  for (const auto& t : normalized_added_) normalized_added_ptrs_.push_back(&t);
}

void BpeTokenizer::encode_split(const std::string& text, std::vector<int32_t>& ids) const {
  if (p_.pre_tokenizer.byte_level()) {
    p_.model.encode_piece(text, ids);
  } else {
    p_.model.encode_chars(text, p_.byte_fallback.empty() ? nullptr : p_.byte_fallback.data(), p_.unk_id, p_.fuse_unk,
                          ids);
  }
}

// Note [added tokens and the normalizer]
// As the tokenizers library: added tokens that are not `normalized` are found in the raw
// text first; each stretch between them is normalized on its own (so a Prepend normalizer
// prefixes every stretch), and the `normalized` ones are then found in the normalized text
// by their normalized content. What is left is pre-tokenized and run through the model.
std::vector<int32_t> BpeTokenizer::encode(std::string_view text) const {
  const std::string clean = unicode::sanitize_utf8(text);
  const std::string_view all(clean);
  std::vector<int32_t> ids;
  ids.reserve(clean.size() / 3 + 1);
  std::vector<TextSplit> splits;
  for (const auto& seg : bpe::split_added_tokens(raw_added_, all)) {
    if (seg.id >= 0) {
      ids.push_back(seg.id);
      continue;
    }
    const bool seg_at_start = seg.text.data() == all.data();
    const std::string normalized = p_.normalizer.empty() ? std::string(seg.text) : p_.normalizer.apply(std::string(seg.text));
    const std::string_view norm(normalized);
    for (const auto& part : bpe::split_added_tokens(normalized_added_ptrs_, norm)) {
      if (part.id >= 0) {
        ids.push_back(part.id);
        continue;
      }
      splits.clear();
      splits.push_back({std::string(part.text), seg_at_start && part.text.data() == norm.data()});
      p_.pre_tokenizer.apply(splits);
      for (const auto& s : splits) encode_split(s.text, ids);
    }
  }
  return ids;
}


std::string BpeTokenizer::decode(const std::vector<int32_t>& ids) const {
  const auto unknown = [&](int32_t id) {
    return std::out_of_range("decode: token id " + std::to_string(id) + " is not in the " + kind_ + " vocabulary of " +
                             path_ + " (ids 0.." + std::to_string(vocab_size() - 1) + ")");
  };
  if (!p_.pre_tokenizer.byte_level()) {  // the file's decoder over the token strings
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (int32_t id : ids) {
      if (auto it = added_by_id_.find(id); it != added_by_id_.end()) {
        tokens.push_back(p_.added[it->second].content);
      } else if (const std::string* t = p_.model.bytes_of(id)) {
        tokens.push_back(*t);
      } else {
        throw unknown(id);
      }
    }
    return unicode::sanitize_utf8(p_.decoder.apply(std::move(tokens)));
  }
  std::string bytes, tmp;
  for (int32_t id : ids) {
    if (auto it = added_by_id_.find(id); it != added_by_id_.end()) {
      const std::string& content = p_.added[it->second].content;
      // Hugging Face's ByteLevel decoder maps each character back to its byte and falls back
      // to the token's UTF-8 when one character is outside the byte map.
      bytes += p_.added_byte_level && bpe::bytes_from_byte_level(content, tmp) ? tmp : content;
      continue;
    }
    const std::string* b = p_.model.bytes_of(id);
    if (!b) throw unknown(id);
    bytes += *b;
  }
  return unicode::sanitize_utf8(bytes);
}

int32_t BpeTokenizer::vocab_size() const {
  int32_t m = p_.model.max_id();
  for (const auto& t : p_.added) m = std::max(m, t.id);
  return m + 1;
}

std::optional<int32_t> BpeTokenizer::token_id(std::string_view token) const {
  for (const auto& t : p_.added) {
    if (t.content == token) return t.id;
  }
  if (!p_.pre_tokenizer.byte_level()) return p_.model.find(token);
  std::string raw;
  if (!bpe::bytes_from_byte_level(token, raw)) return std::nullopt;
  return p_.model.find(raw);
}

std::vector<Tokenizer::Entry> BpeTokenizer::tokens_from(int32_t first) const {
  std::vector<Entry> out;
  const auto& to_unicode = bpe::byte_to_unicode();
  const bool byte_level = p_.pre_tokenizer.byte_level();
  for (int32_t id = std::max(first, 0); id <= p_.model.max_id(); ++id) {
    const std::string* b = p_.model.bytes_of(id);
    if (!b || added_by_id_.count(id)) continue;
    Entry e{id, "", false};
    if (byte_level) {
      for (char c : *b) e.text += to_unicode[static_cast<uint8_t>(c)];  // as the file spells it
    } else {
      e.text = *b;
    }
    out.push_back(std::move(e));
  }
  for (const auto& t : p_.added)
    if (t.id >= first) out.push_back({t.id, t.content, true});
  std::stable_sort(out.begin(), out.end(), [](const Entry& a, const Entry& b) { return a.id < b.id; });
  return out;
}

}  // namespace qlora::data
