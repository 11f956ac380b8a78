#include "data/bpe.h"

#include <algorithm>
#include <queue>

#include "data/unicode.h"

namespace qlora::data::bpe {

// ---------------------------------------------------------------- byte-level map

namespace {

struct ByteMap {
  std::vector<std::string> to_unicode;       // byte -> UTF-8 of its code point
  std::unordered_map<char32_t, int> to_byte;  // code point -> byte
};

const ByteMap& byte_map() {
  static const ByteMap map = [] {
    ByteMap m;
    m.to_unicode.resize(256);
    // Printable Latin-1 bytes stand for themselves; the others (controls, space, 0x7F-0xA0,
    // 0xAD) are given the code points from 256 upwards, in byte order.
    auto printable = [](int b) {
      return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    };
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const char32_t cp = printable(b) ? static_cast<char32_t>(b) : next++;
      unicode::append_utf8(m.to_unicode[b], cp);
      m.to_byte[cp] = b;
    }
    return m;
  }();
  return map;
}

}  // namespace

const std::vector<std::string>& byte_to_unicode() { return byte_map().to_unicode; }

int byte_from_unicode(char32_t cp) {
  const auto& m = byte_map().to_byte;
  auto it = m.find(cp);
  return it == m.end() ? -1 : it->second;
}

bool bytes_from_byte_level(std::string_view token, std::string& out) {
  out.clear();
  for (char32_t cp : unicode::decode_utf8(token)) {
    const int b = byte_from_unicode(cp);
    if (b < 0) return false;
    out += static_cast<char>(b);
  }
  return true;
}

// ---------------------------------------------------------------- added tokens

namespace {

// The code point that ends just before byte `pos` of valid UTF-8 `s`.
char32_t cp_before(std::string_view s, size_t pos) {
  size_t b = pos - 1;
  while (b > 0 && (static_cast<uint8_t>(s[b]) & 0xC0) == 0x80) --b;
  const auto cps = unicode::decode_utf8(s.substr(b, pos - b));
  return cps.empty() ? 0 : cps[0];
}

char32_t cp_at(std::string_view s, size_t pos) {
  size_t e = pos + 1;
  while (e < s.size() && (static_cast<uint8_t>(s[e]) & 0xC0) == 0x80) ++e;
  const auto cps = unicode::decode_utf8(s.substr(pos, e - pos));
  return cps.empty() ? 0 : cps[0];
}

size_t cp_len_before(std::string_view s, size_t pos) {
  size_t b = pos - 1;
  while (b > 0 && (static_cast<uint8_t>(s[b]) & 0xC0) == 0x80) --b;
  return pos - b;
}

size_t cp_len_at(std::string_view s, size_t pos) {
  size_t e = pos + 1;
  while (e < s.size() && (static_cast<uint8_t>(s[e]) & 0xC0) == 0x80) ++e;
  return e - pos;
}

bool is_space(char32_t cp) { return unicode::is_white_space(cp); }

// One matching pass over a text segment with the tokens of one kind (normalized or not).
void split_pass(const std::vector<const AddedToken*>& tokens, std::string_view text,
                std::vector<Segment>& out) {
  if (tokens.empty()) {
    if (!text.empty()) out.push_back({text, -1});
    return;
  }
  // Candidates by first byte: Llama 3 has 256 special tokens, all starting with '<'.
  std::vector<const AddedToken*> by_first[256];
  for (const AddedToken* t : tokens) {
    if (!t->content.empty()) by_first[static_cast<uint8_t>(t->content[0])].push_back(t);
  }
  size_t start = 0;  // first byte not yet emitted
  size_t pos = 0;
  while (pos < text.size()) {
    const AddedToken* best = nullptr;
    for (const AddedToken* t : by_first[static_cast<uint8_t>(text[pos])]) {
      if (t->content.size() > text.size() - pos) continue;
      if (text.compare(pos, t->content.size(), t->content) != 0) continue;
      if (!best || t->content.size() > best->content.size()) best = t;
    }
    if (!best) {
      ++pos;
      continue;
    }
    size_t b = pos, e = pos + best->content.size();
    if (best->single_word) {
      const bool left_ok = b == 0 || !unicode::is_word_char(cp_before(text, b));
      const bool right_ok = e == text.size() || !unicode::is_word_char(cp_at(text, e));
      if (!left_ok || !right_ok) {  // the match is dropped; scanning resumes after it
        pos = e;
        continue;
      }
    }
    if (best->lstrip) {
      while (b > start && is_space(cp_before(text, b))) b -= cp_len_before(text, b);
    }
    if (best->rstrip) {
      while (e < text.size() && is_space(cp_at(text, e))) e += cp_len_at(text, e);
    }
    if (b > start) out.push_back({text.substr(start, b - start), -1});
    out.push_back({{}, best->id});
    start = pos = e;
  }
  if (start < text.size()) out.push_back({text.substr(start), -1});
}

}  // namespace

std::vector<Segment> split_added_tokens(const std::vector<const AddedToken*>& tokens, std::string_view text) {
  std::vector<Segment> out;
  split_pass(tokens, text, out);
  return out;
}

std::vector<Segment> split_added_tokens(const std::vector<AddedToken>& tokens, std::string_view text) {
  std::vector<const AddedToken*> raw, normalized;
  for (const auto& t : tokens) (t.normalized ? normalized : raw).push_back(&t);
  std::vector<Segment> first, out;
  split_pass(raw, text, first);
  for (const auto& s : first) {
    if (s.id >= 0) out.push_back(s);
    else split_pass(normalized, s.text, out);
  }
  return out;
}

// ---------------------------------------------------------------- the merge loop

BpeModel::BpeModel() { std::fill(std::begin(byte_id_), std::end(byte_id_), -1); }

bool BpeModel::add_token(const std::string& bytes, int32_t id) {
  if (id < 0) return false;
  if (static_cast<size_t>(id) >= id_to_bytes_.size()) {
    id_to_bytes_.resize(static_cast<size_t>(id) + 1);
    has_id_.resize(static_cast<size_t>(id) + 1, false);
  }
  id_to_bytes_[static_cast<size_t>(id)] = bytes;
  has_id_[static_cast<size_t>(id)] = true;
  const bool fresh = bytes_to_id_.emplace(bytes, id).second;
  if (fresh && bytes.size() == 1) byte_id_[static_cast<uint8_t>(bytes[0])] = id;
  return fresh;
}

void BpeModel::add_unreachable_token(const std::string& text, int32_t id) {
  if (id < 0) return;
  if (static_cast<size_t>(id) >= id_to_bytes_.size()) {
    id_to_bytes_.resize(static_cast<size_t>(id) + 1);
    has_id_.resize(static_cast<size_t>(id) + 1, false);
  }
  id_to_bytes_[static_cast<size_t>(id)] = text;
  has_id_[static_cast<size_t>(id)] = true;
}

bool BpeModel::add_merge(const std::string& a, const std::string& b, int32_t rank) {
  auto ia = bytes_to_id_.find(a), ib = bytes_to_id_.find(b);
  if (ia == bytes_to_id_.end() || ib == bytes_to_id_.end()) return false;
  const bool cut = !prefix_.empty() && b.compare(0, prefix_.size(), prefix_) == 0;
  auto ij = bytes_to_id_.find(cut ? a + b.substr(prefix_.size()) : a + b);
  if (ij == bytes_to_id_.end()) return false;
  // A pair listed twice keeps its later rank, as the tokenizers library reads merges.
  merges_.insert_or_assign(key(ia->second, ib->second), Merge{rank, ij->second});
  return true;
}

std::optional<int32_t> BpeModel::find(std::string_view bytes) const {
  auto it = bytes_to_id_.find(std::string(bytes));
  if (it == bytes_to_id_.end()) return std::nullopt;
  return it->second;
}

const std::string* BpeModel::bytes_of(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= id_to_bytes_.size() || !has_id_[id]) return nullptr;
  return &id_to_bytes_[static_cast<size_t>(id)];
}

void BpeModel::encode_piece(std::string_view piece, std::vector<int32_t>& out) const {
  if (piece.empty()) return;
  if (ignore_merges_ || piece.size() == 1) {
    if (auto id = find(piece)) {
      out.push_back(*id);
      return;
    }
  }
  std::vector<int32_t> initial;
  initial.reserve(piece.size());
  for (char c : piece) {
    const int32_t id = byte_id_[static_cast<uint8_t>(c)];
    if (id >= 0) initial.push_back(id);
  }
  merge(initial, out);
}

void BpeModel::encode_chars(std::string_view piece, const int32_t* byte_fallback, int32_t unk_id, bool fuse_unk,
                            std::vector<int32_t>& out) const {
  if (piece.empty()) return;
  if (ignore_merges_) {
    if (auto id = find(piece)) {
      out.push_back(*id);
      return;
    }
  }
  std::vector<int32_t> initial;
  initial.reserve(piece.size());
  bool last_unk = false;
  std::string affixed;
  for (size_t i = 0; i < piece.size();) {
    size_t len = 1;
    while (i + len < piece.size() && (static_cast<uint8_t>(piece[i + len]) & 0xC0) == 0x80) ++len;
    std::string_view ch = piece.substr(i, len);
    const bool first = i == 0;
    i += len;
    if (!prefix_.empty() || !suffix_.empty()) {
      affixed.assign(first ? "" : prefix_).append(ch).append(i == piece.size() ? suffix_ : "");
      ch = affixed;
    }
    if (auto id = find(ch)) {
      initial.push_back(*id);
      last_unk = false;
      continue;
    }
    bool all_bytes = byte_fallback != nullptr;
    for (size_t k = 0; all_bytes && k < ch.size(); ++k) {
      all_bytes = byte_fallback[static_cast<uint8_t>(ch[k])] >= 0;
    }
    if (all_bytes) {
      for (char c : ch) initial.push_back(byte_fallback[static_cast<uint8_t>(c)]);
      last_unk = false;
    } else if (unk_id >= 0 && !(fuse_unk && last_unk)) {
      initial.push_back(unk_id);
      last_unk = true;
    }
  }
  merge(initial, out);
}

void BpeModel::merge(const std::vector<int32_t>& initial, std::vector<int32_t>& out) const {
  // Symbols as a linked list; a min-heap of candidate merges ordered by (rank, position).
  // Stale heap entries (a side already merged away) are skipped on pop.
  struct Sym {
    int32_t id;
    int32_t prev, next;
  };
  std::vector<Sym> syms;
  syms.reserve(initial.size());
  for (int32_t id : initial) {
    const auto n = static_cast<int32_t>(syms.size());
    syms.push_back({id, n - 1, -1});
    if (n > 0) syms[n - 1].next = n;
  }
  struct Cand {
    int32_t rank, left, right, left_id, right_id, merged;
    bool operator>(const Cand& o) const {
      return rank != o.rank ? rank > o.rank : left > o.left;
    }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push = [&](int32_t l) {
    if (l < 0) return;
    const int32_t r = syms[l].next;
    if (r < 0) return;
    auto it = merges_.find(key(syms[l].id, syms[r].id));
    if (it != merges_.end()) heap.push({it->second.rank, l, r, syms[l].id, syms[r].id, it->second.id});
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(syms.size()); ++i) push(i);
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    Sym& l = syms[c.left];
    if (l.id != c.left_id || l.next != c.right || syms[c.right].id != c.right_id) continue;
    Sym& r = syms[c.right];
    l.id = c.merged;
    l.next = r.next;
    if (r.next >= 0) syms[r.next].prev = c.left;
    r.id = -1;  // dead
    push(l.prev);
    push(c.left);
  }
  for (int32_t i = syms.empty() ? -1 : 0; i >= 0; i = syms[i].next) out.push_back(syms[i].id);
}

}  // namespace qlora::data::bpe
