#include "data/tokenizer_bpe.h"

#include <stdexcept>

#include "data/unicode.h"

namespace qlora::data {

BpeTokenizer::BpeTokenizer(std::string kind, std::string path, bpe::BpeModel model,
                           bpe::SplitPattern pattern, std::vector<bpe::AddedToken> added,
                           bool added_byte_level)
    : model_(std::move(model)),
      pattern_(std::move(pattern)),
      added_(std::move(added)),
      added_byte_level_(added_byte_level) {
  kind_ = std::move(kind);
  path_ = std::move(path);
  for (size_t i = 0; i < added_.size(); ++i) added_by_id_.emplace(added_[i].id, i);
}

std::vector<int32_t> BpeTokenizer::encode(std::string_view text) const {
  const std::string clean = unicode::sanitize_utf8(text);
  std::vector<int32_t> ids;
  ids.reserve(clean.size() / 3 + 1);
  for (const auto& seg : bpe::split_added_tokens(added_, clean)) {
    if (seg.id >= 0) {
      ids.push_back(seg.id);
      continue;
    }
    for (const auto& [b, e] : bpe::split_pieces(pattern_, seg.text)) {
      model_.encode_piece(seg.text.substr(b, e - b), ids);
    }
  }
  return ids;
}

bool bytes_from_byte_level(std::string_view token, std::string& out) {
  out.clear();
  for (char32_t cp : unicode::decode_utf8(token)) {
    const int b = bpe::byte_from_unicode(cp);
    if (b < 0) return false;
    out += static_cast<char>(b);
  }
  return true;
}

std::string BpeTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string bytes, tmp;
  for (int32_t id : ids) {
    auto it = added_by_id_.find(id);
    if (it != added_by_id_.end()) {
      const std::string& content = added_[it->second].content;
      // Hugging Face's ByteLevel decoder maps each character back to its byte and falls back
      // to the token's UTF-8 when one character is outside the byte map.
      if (added_byte_level_ && bytes_from_byte_level(content, tmp)) {
        bytes += tmp;
      } else {
        bytes += content;
      }
      continue;
    }
    const std::string* b = model_.bytes_of(id);
    if (!b) {
      throw std::out_of_range("decode: token id " + std::to_string(id) + " is not in the " +
                              kind_ + " vocabulary of " + path_ + " (ids 0.." +
                              std::to_string(vocab_size() - 1) + ")");
    }
    bytes += *b;
  }
  return unicode::sanitize_utf8(bytes);
}

int32_t BpeTokenizer::vocab_size() const {
  int32_t m = model_.max_id();
  for (const auto& t : added_) m = std::max(m, t.id);
  return m + 1;
}

std::optional<int32_t> BpeTokenizer::token_id(std::string_view token) const {
  for (const auto& t : added_) {
    if (t.content == token) return t.id;
  }
  std::string raw;
  if (!bytes_from_byte_level(token, raw)) return std::nullopt;
  return model_.find(raw);
}

}  // namespace qlora::data
