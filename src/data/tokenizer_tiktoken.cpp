// Meta's Llama 3 tokenizer.model: tiktoken BPE ranks ("<base64 bytes> <rank>" per line) plus
// 256 special tokens that the file does not list.
#include <fstream>
#include <memory>

#include "data/tokenizer_bpe.h"
#include "qlora/common/errors.h"

namespace qlora::data {

namespace {

int base64_value(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}

bool decode_base64(std::string_view s, std::string& out) {
  out.clear();
  if (s.empty() || s.size() % 4 != 0) return false;
  uint32_t acc = 0;
  int bits = 0;
  size_t pad = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '=') {
      if (i + 2 < s.size()) return false;  // '=' only in the last two places
      ++pad;
      continue;
    }
    if (pad) return false;
    const int v = base64_value(s[i]);
    if (v < 0) return false;
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += static_cast<char>((acc >> bits) & 0xFF);
    }
  }
  return true;
}

bool parse_rank(std::string_view s, int32_t& rank) {
  if (s.empty() || s.size() > 9) return false;
  rank = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    rank = rank * 10 + (c - '0');
  }
  return true;
}

// Llama 3.1 / 3.2 names of ids base+0 .. base+255 (Llama 3.0 called several of them
// reserved_special_token_N; the ids of bos, eos, the header markers and eot are the same).
std::vector<std::string> llama3_special_tokens() {
  std::vector<std::string> names = {
      "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
      "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
      "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
      "<|python_tag|>", "<|image|>"};
  for (int i = 2; names.size() < 256; ++i) {
    names.push_back("<|reserved_special_token_" + std::to_string(i) + "|>");
  }
  return names;
}

}  // namespace

bool looks_like_tiktoken(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  std::string line;
  if (!in || !std::getline(in, line)) return false;
  const size_t sp = line.find(' ');
  if (sp == std::string::npos) return false;
  std::string bytes;
  int32_t rank;
  return decode_base64(std::string_view(line).substr(0, sp), bytes) &&
         parse_rank(std::string_view(line).substr(sp + 1), rank);
}

std::unique_ptr<Tokenizer> load_tiktoken_tokenizer(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) {
    throw InputError("cannot read tokenizer file " + file + ": it does not exist or is not "
                     "readable");
  }
  bpe::BpeModel model;
  std::vector<std::string> by_rank;
  std::string line, bytes;
  size_t line_no = 0;
  int32_t max_rank = -1;
  while (std::getline(in, line)) {
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    const size_t sp = line.find(' ');
    int32_t rank = -1;
    if (sp == std::string::npos || !decode_base64(std::string_view(line).substr(0, sp), bytes) ||
        !parse_rank(std::string_view(line).substr(sp + 1), rank)) {
      throw InputError(file + ":" + std::to_string(line_no) +
                       ": expected a tiktoken line \"<base64 token> <rank>\", found \"" +
                       line.substr(0, 60) + "\"; is this the Llama 3 original/tokenizer.model?");
    }
    if (!model.add_token(bytes, rank)) {
      throw InputError(file + ":" + std::to_string(line_no) + ": token of rank " +
                       std::to_string(rank) + " repeats an earlier token; the file is corrupt");
    }
    if (static_cast<size_t>(rank) >= by_rank.size()) by_rank.resize(static_cast<size_t>(rank) + 1);
    by_rank[static_cast<size_t>(rank)] = bytes;
    max_rank = std::max(max_rank, rank);
  }
  if (max_rank < 255) {
    throw InputError(file + ": a tiktoken file needs at least the 256 single-byte tokens, found " +
                     std::to_string(max_rank + 1) + " ranks");
  }
  for (int b = 0; b < 256; ++b) {
    if (!model.find(std::string(1, static_cast<char>(b)))) {
      throw InputError(file + ": byte " + std::to_string(b) +
                       " has no token; a byte-level BPE file lists all 256 bytes");
    }
  }
  // tiktoken merges the adjacent pair whose concatenation has the lowest rank: every way of
  // cutting a token into two tokens is a merge at the token's rank.
  for (size_t r = 0; r < by_rank.size(); ++r) {
    const std::string& t = by_rank[r];
    for (size_t k = 1; k < t.size(); ++k) {
      model.add_merge(t.substr(0, k), t.substr(k), static_cast<int32_t>(r));
    }
  }
  model.set_ignore_merges(true);  // tiktoken looks the whole piece up first

  std::vector<bpe::AddedToken> added;
  const auto names = llama3_special_tokens();
  for (size_t i = 0; i < names.size(); ++i) {
    bpe::AddedToken t;
    t.content = names[i];
    t.id = max_rank + 1 + static_cast<int32_t>(i);
    t.special = true;
    added.push_back(t);
  }
  BpePipeline p;
  p.model = std::move(model);
  p.added = std::move(added);
  p.pre_tokenizer.add_split(std::make_shared<OnigRegex>(bpe::kLlama3Pattern, file), SplitBehavior::kIsolated, false);
  p.pre_tokenizer.add_byte_level(/*add_prefix_space=*/false, /*use_regex=*/false);
  p.added_byte_level = false;
  auto tok = std::make_unique<BpeTokenizer>("tiktoken", file, std::move(p));
  tok->set_special_ids(max_rank + 1, max_rank + 2, -1, /*add_bos=*/true);
  return tok;
}

}  // namespace qlora::data
