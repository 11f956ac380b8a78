// sentencepiece tokenizer.model (Llama 2), encoded the way transformers' LlamaTokenizer does.
#include <sentencepiece_processor.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "data/tokenizer_bpe.h"
#include "data/unicode.h"
#include "qlora/common/errors.h"

namespace qlora::data {

// Note [sentencepiece with Hugging Face semantics]
// transformers 5 reads a Llama tokenizer.model as a Hugging Face BPE with byte fallback behind
// a Metaspace pre-tokenizer (split=False) and no normalizer, with control and unknown pieces
// (<unk>, <s>, </s>) as special added tokens. (It also makes user-defined pieces added
// tokens; the sentencepiece API does not expose a piece's type beyond control/unknown/byte/
// unused, so those are not split out here. Llama 2 and its derivatives have none.)
// Its ids differ from sentencepiece's own Encode, and we follow transformers:
//  - merges are not sentencepiece's score order: every piece, in id order, contributes each
//    way of cutting it into two pieces (shorter left part first), and that list is the merge
//    rank. On runs of spaces this differs from sentencepiece: "▁▁Hello" is [▁▁, Hello] in
//    transformers and [▁, ▁Hello] in sentencepiece. So the library reads and validates the
//    model and gives the pieces; the merge loop is ours (data/bpe.h);
//  - special tokens written in the text ("</s>") are their ids: the text is cut at them and
//    the parts between are encoded separately, each as one word (no split at spaces);
//  - spaces become "▁", and one "▁" is prepended only to the part that starts the text
//    (prepend_scheme "first"; "always" when tokenizer_config.json says legacy: true, "never"
//    with add_prefix_space: false), and not when that part already starts with "▁":
//    " Hello" is [▁Hello];
//  - the model's normalizer (NFKC rules, remove_extra_whitespaces) is not applied.

namespace {

const char kMeta[] = "\xE2\x96\x81";  // U+2581, sentencepiece's space

class SpmTokenizer : public Tokenizer {
 public:
  SpmTokenizer(std::string path, std::unique_ptr<sentencepiece::SentencePieceProcessor> sp)
      : sp_(std::move(sp)) {
    kind_ = "sentencepiece";
    path_ = std::move(path);
    std::fill(std::begin(byte_ids_), std::end(byte_ids_), -1);
    const int n = sp_->GetPieceSize();
    std::vector<std::string> pieces(static_cast<size_t>(n));
    for (int id = 0; id < n; ++id) {
      pieces[id] = sp_->IdToPiece(id);
      model_.add_token(pieces[id], id);
      if (sp_->IsByte(id) && pieces[id].size() == 6) {  // "<0xAB>"
        byte_ids_[std::stoi(pieces[id].substr(3, 2), nullptr, 16)] = id;
      }
      const bool special = sp_->IsControl(id) || sp_->IsUnknown(id);
      if (special && !pieces[id].empty()) {
        bpe::AddedToken t;
        t.content = pieces[id];
        t.id = id;
        t.special = special;
        added_.push_back(t);
      }
    }
    // transformers' merge list: by merged piece id, then by the left part's length.
    int32_t rank = 0;
    for (const std::string& p : pieces) {
      for (size_t k = 1; k < p.size(); ++k) {
        if ((static_cast<uint8_t>(p[k]) & 0xC0) == 0x80) continue;  // not a character boundary
        if (model_.add_merge(p.substr(0, k), p.substr(k), rank)) ++rank;
      }
    }
    unk_id_ = sp_->unk_id();
    set_special_ids(sp_->bos_id(), sp_->eos_id(), sp_->pad_id(), /*add_bos=*/sp_->bos_id() >= 0);
  }

  void set_prefix_scheme(bool legacy, bool add_prefix_space) {
    prepend_ = !add_prefix_space ? Prepend::kNever : legacy ? Prepend::kAlways : Prepend::kFirst;
  }

  std::vector<int32_t> encode(std::string_view text) const override {
    const std::string clean = unicode::sanitize_utf8(text);
    std::vector<int32_t> ids;
    const std::string_view all(clean);
    for (const auto& seg : bpe::split_added_tokens(added_, all)) {
      if (seg.id >= 0) {
        ids.push_back(seg.id);
        continue;
      }
      const bool at_start = seg.text.data() == all.data();
      std::string piece(seg.text);
      const bool has_space = (!piece.empty() && piece[0] == ' ') || piece.rfind(kMeta, 0) == 0;
      if (!has_space && (prepend_ == Prepend::kAlways || (prepend_ == Prepend::kFirst && at_start))) {
        piece.insert(0, " ");
      }
      std::string word;
      word.reserve(piece.size() + 8);
      for (char c : piece) {
        if (c == ' ') {
          word += kMeta;
        } else {
          word += c;
        }
      }
      model_.encode_chars(word, byte_ids_, unk_id_, /*fuse_unk=*/true, ids);
    }
    return ids;
  }

  // HF's decoder chain for Llama: Replace(▁ -> " "), ByteFallback (runs of <0xXX> pieces
  // become their bytes when those form UTF-8, else one U+FFFD per piece), Fuse, Strip one
  // leading space.
  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string out, pending;
    size_t pending_count = 0;
    auto flush = [&] {
      if (pending_count == 0) return;
      if (unicode::is_valid_utf8(pending)) {
        out += pending;
      } else {
        for (size_t i = 0; i < pending_count; ++i) unicode::append_utf8(out, unicode::kReplacementChar);
      }
      pending.clear();
      pending_count = 0;
    };
    for (int32_t id : ids) {
      if (id < 0 || id >= sp_->GetPieceSize()) {
        throw std::out_of_range("decode: token id " + std::to_string(id) +
                                " is not in the sentencepiece vocabulary of " + path_ + " (ids 0.." +
                                std::to_string(sp_->GetPieceSize() - 1) + ")");
      }
      const std::string piece = sp_->IdToPiece(id);
      if (sp_->IsByte(id) && piece.size() == 6) {  // "<0xAB>"
        pending += static_cast<char>(std::stoi(piece.substr(3, 2), nullptr, 16));
        ++pending_count;
        continue;
      }
      flush();
      for (size_t i = 0; i < piece.size();) {
        if (piece.compare(i, 3, kMeta) == 0) {
          out += ' ';
          i += 3;
        } else {
          out += piece[i++];
        }
      }
    }
    flush();
    if (!out.empty() && out[0] == ' ') out.erase(0, 1);
    return out;
  }

  int32_t vocab_size() const override { return sp_->GetPieceSize(); }

  std::vector<Entry> tokens_from(int32_t first) const override {
    std::vector<Entry> out;
    for (int id = std::max(first, 0); id < sp_->GetPieceSize(); ++id)
      out.push_back({id, sp_->IdToPiece(id), sp_->IsControl(id) || sp_->IsUnknown(id)});
    return out;
  }

  std::optional<int32_t> token_id(std::string_view token) const override {
    const int id = sp_->PieceToId(std::string(token));
    if (id < 0 || sp_->IdToPiece(id) != token) return std::nullopt;
    return id;
  }

 private:
  enum class Prepend { kFirst, kAlways, kNever };
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  bpe::BpeModel model_;
  int32_t byte_ids_[256];
  int32_t unk_id_ = -1;
  std::vector<bpe::AddedToken> added_;
  Prepend prepend_ = Prepend::kFirst;
};

}  // namespace

std::unique_ptr<Tokenizer> load_sentencepiece_tokenizer(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) {
    throw InputError("cannot read tokenizer file " + file + ": it does not exist or is not readable");
  }
  std::stringstream ss;
  ss << in.rdbuf();
  std::string proto = ss.str();
  if (proto.empty()) throw InputError(file + ": the tokenizer file is empty");
  auto sp = std::make_unique<sentencepiece::SentencePieceProcessor>();
  const auto status = sp->LoadFromSerializedProto(proto);
  if (!status.ok()) {
    throw InputError(file + ": not a sentencepiece model (" + status.ToString() +
                     "); expected a sentencepiece tokenizer.model, a Llama 3 tiktoken "
                     "tokenizer.model, or a tokenizer.json");
  }
  return std::make_unique<SpmTokenizer>(file, std::move(sp));
}

void set_sentencepiece_prefix_scheme(Tokenizer& tok, bool legacy, bool add_prefix_space) {
  if (auto* spm = dynamic_cast<SpmTokenizer*>(&tok)) spm->set_prefix_scheme(legacy, add_prefix_space);
}

}  // namespace qlora::data
