// Tokenizers against their Hugging Face / tiktoken oracles (scripts/golden/tokenizer.py):
// token ids must be identical on every line of a hard corpus, decode must equal the oracle's
// decode, and malformed tokenizer files must be refused with an InputError naming the file.
// The real Llama 2 / Llama 3 files live in ../shared/data and are skipped where absent (CI).
#include <gtest/gtest.h>

#include <filesystem>
#include <functional>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "qlora/common/errors.h"
#include "qlora/data/tokenizer.h"
#include "support/test_support.h"

namespace {

using nlohmann::json;
using qlora::data::Tokenizer;
namespace fs = std::filesystem;

// Token ids are compared exactly: there is no tolerance. Mismatching lines are printed up to
// this many per tokenizer.
constexpr int kMaxPrinted = 5;

const std::string kDataDir = std::string(QLORA_SOURCE_DIR) + "/tests/data/tokenizer";
const std::string kSharedDir = std::string(QLORA_SOURCE_DIR) + "/../shared/data";

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

json read_json(const std::string& path) {
  const std::string text = read_text(path);
  if (text.empty()) throw std::runtime_error("missing golden file " + path);
  return json::parse(text);
}

std::string base64_decode(const std::string& s) {
  std::string out;
  uint32_t acc = 0;
  int bits = 0;
  for (char c : s) {
    int v = c >= 'A' && c <= 'Z'   ? c - 'A'
            : c >= 'a' && c <= 'z' ? c - 'a' + 26
            : c >= '0' && c <= '9' ? c - '0' + 52
            : c == '+'             ? 62
            : c == '/'             ? 63
                                   : -1;
    if (v < 0) continue;
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += static_cast<char>((acc >> bits) & 0xFF);
    }
  }
  return out;
}

// The corpus lines as bytes (invalid UTF-8 lines included).
const std::vector<std::string>& corpus() {
  static const std::vector<std::string> lines = [] {
    std::vector<std::string> out;
    const json doc = read_json(kDataDir + "/corpus.json");
    for (const auto& l : doc["lines"]) {
      out.push_back(l.contains("text") ? l["text"].get<std::string>()
                                       : base64_decode(l["bytes_b64"].get<std::string>()));
    }
    return out;
  }();
  return lines;
}

std::string show_ids(const std::vector<int32_t>& ids) {
  std::string s = "[";
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? ", " : "") + std::to_string(ids[i]);
  return s + "]";
}

// Encodes every corpus line and compares with the golden ids and decodes; returns the number
// of lines whose ids differ.
int check_against_golden(const Tokenizer& tok, const std::string& golden_file) {
  const json g = read_json(golden_file);
  const auto& lines = corpus();
  EXPECT_EQ(g["ids"].size(), lines.size()) << golden_file;
  int id_mismatches = 0, decode_mismatches = 0, roundtrips = 0, printed = 0;
  for (size_t i = 0; i < lines.size() && i < g["ids"].size(); ++i) {
    const auto want = g["ids"][i].get<std::vector<int32_t>>();
    const auto got = tok.encode(lines[i]);
    if (got != want) {
      ++id_mismatches;
      if (printed++ < kMaxPrinted) {
        ADD_FAILURE() << tok.kind() << " line " << i << " " << json(lines[i]).dump(-1, ' ', false, json::error_handler_t::replace)
                      << "\n  want " << show_ids(want) << "\n  got  " << show_ids(got);
      }
    }
    const std::string want_dec = g["decoded"][i].get<std::string>();
    if (tok.decode(want) != want_dec) {
      ++decode_mismatches;
      if (printed++ < kMaxPrinted) {
        ADD_FAILURE() << tok.kind() << " decode of line " << i << "'s golden ids: want "
                      << json(want_dec).dump() << " got "
                      << json(tok.decode(want)).dump(-1, ' ', false, json::error_handler_t::replace);
      }
    }
    // decode(encode(x)) == x wherever the oracle's decode round-trips (for invalid UTF-8
    // lines x is the U+FFFD-replaced text).
    if (g["roundtrip"][i].get<bool>()) {
      ++roundtrips;
      EXPECT_EQ(tok.decode(got), want_dec) << tok.kind() << " round trip of line " << i;
    }
  }
  EXPECT_EQ(decode_mismatches, 0);
  std::cout << "[ tokenizer ] " << tok.kind() << " " << golden_file.substr(golden_file.rfind('/') + 1)
            << ": " << lines.size() << " corpus lines, " << id_mismatches << " id mismatches, "
            << decode_mismatches << " decode mismatches, " << roundtrips << " round trips checked\n";
  return id_mismatches;
}

TEST(ByteLevelBpe, IdsMatchTokenizersOnCorpus) {
  const auto tok = qlora::data::load_tokenizer(kDataDir + "/bpe");
  EXPECT_EQ(tok->kind(), "tokenizer.json");
  EXPECT_EQ(check_against_golden(*tok, kDataDir + "/golden_bpe.json"), 0);
}

TEST(ByteLevelBpe, StringMergesReadLikeArrayMerges) {
  const auto tok = qlora::data::load_tokenizer(kDataDir + "/bpe_string_merges/tokenizer.json");
  EXPECT_EQ(check_against_golden(*tok, kDataDir + "/golden_bpe.json"), 0);
}

TEST(ByteLevelBpe, SpecialsFromTokenizerConfig) {
  const auto tok = qlora::data::load_tokenizer(kDataDir + "/bpe");
  EXPECT_EQ(tok->bos_id(), tok->token_id("<|begin_of_text|>").value_or(-2));
  EXPECT_EQ(tok->eos_id(), tok->token_id("<|eot_id|>").value_or(-2));  // {"content": ...} form
  EXPECT_EQ(tok->pad_id(), -1);
  EXPECT_TRUE(tok->add_bos());
  EXPECT_EQ(tok->encode("<|eot_id|>"), std::vector<int32_t>{tok->eos_id()});
  EXPECT_FALSE(tok->token_id("no such token").has_value());
  EXPECT_THROW(tok->decode({tok->vocab_size()}), std::out_of_range);
  // The file alone: bos from the TemplateProcessing post-processor, no eos.
  const auto bare = qlora::data::load_tokenizer_json(kDataDir + "/bpe/tokenizer.json");
  EXPECT_EQ(bare->bos_id(), tok->bos_id());
  EXPECT_TRUE(bare->add_bos());
  EXPECT_EQ(bare->eos_id(), -1);
}

TEST(Sentencepiece, IdsMatchTransformersOnCorpus) {
  const auto tok = qlora::data::load_tokenizer(kDataDir + "/spm");
  EXPECT_EQ(tok->kind(), "sentencepiece");
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  EXPECT_TRUE(tok->add_bos());
  EXPECT_EQ(check_against_golden(*tok, kDataDir + "/golden_spm.json"), 0);
}

// ---------------------------------------------------------------- real tokenizers

bool have_shared() { return fs::is_directory(kSharedDir); }

// The 128k-token Llama 3 file is loaded once per test binary.
const Tokenizer& llama3() {
  static const auto tok =
      qlora::data::load_tokenizer(kSharedDir + "/llama3-tokenizer/tokenizer.model");
  return *tok;
}

TEST(RealLlama3, TiktokenIdsMatchTiktoken) {
  if (!have_shared()) GTEST_SKIP() << kSharedDir << " is absent: real Llama 3 tokenizer not tested";
  const Tokenizer& tok = llama3();
  EXPECT_EQ(tok.kind(), "tiktoken");
  EXPECT_EQ(tok.vocab_size(), 128256);
  EXPECT_EQ(tok.bos_id(), 128000);
  EXPECT_EQ(tok.eos_id(), 128001);
  EXPECT_TRUE(tok.add_bos());
  EXPECT_EQ(tok.token_id("<|eot_id|>").value_or(-1), 128009);
  EXPECT_EQ(tok.token_id("<|reserved_special_token_245|>").value_or(-1), 128255);
  EXPECT_EQ(check_against_golden(tok, kDataDir + "/real_llama3.json"), 0);
}

TEST(RealLlama2, SentencepieceIdsMatchTransformers) {
  if (!have_shared()) GTEST_SKIP() << kSharedDir << " is absent: real Llama 2 tokenizer not tested";
  const auto tok = qlora::data::load_tokenizer(kSharedDir + "/llama2-tokenizer/tokenizer.model");
  EXPECT_EQ(tok->vocab_size(), 32000);
  EXPECT_EQ(check_against_golden(*tok, kDataDir + "/real_llama2.json"), 0);
}

// ---------------------------------------------------------------- bad files

struct BadFile {
  const char* name;     // what is wrong
  const char* file;     // file name written in a fresh directory
  std::string content;  // file content
  const char* expect;   // a piece of the message besides the path
};

std::string bpe_json_with(const std::function<void(json&)>& edit) {
  json j = read_json(kDataDir + "/bpe/tokenizer.json");
  edit(j);
  return j.dump();
}

TEST(BadTokenizerFiles, AreInputErrorsNamingTheFile) {
  const std::vector<BadFile> table = {
      {"not json", "tokenizer.json", "{\"model\": [", "not valid JSON"},
      {"unknown model type", "tokenizer.json",
       bpe_json_with([](json& j) { j["model"]["type"] = "WordPiece"; }), "WordPiece"},
      {"missing merges", "tokenizer.json",
       bpe_json_with([](json& j) { j["model"].erase("merges"); }), "merges"},
      {"merge of unknown tokens", "tokenizer.json",
       bpe_json_with([](json& j) { j["model"]["merges"].push_back({"qqq", "zzz"}); }),
       "not in model.vocab"},
      {"malformed string merge", "tokenizer.json",
       bpe_json_with([](json& j) { j["model"]["merges"].push_back("a b c"); }), "one space"},
      {"unsupported pre-tokenizer regex", "tokenizer.json",
       bpe_json_with([](json& j) {
         j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\w+|\\s+";
       }),
       "\\w+|\\s+"},
      {"no pre-tokenizer", "tokenizer.json",
       bpe_json_with([](json& j) { j["pre_tokenizer"] = nullptr; }), "pre_tokenizer"},
      {"normalizer", "tokenizer.json",
       bpe_json_with([](json& j) { j["normalizer"] = {{"type", "NFC"}}; }), "NFC"},
      {"vocab not byte-level", "tokenizer.json",
       bpe_json_with([](json& j) { j["model"]["vocab"]["\xE2\x96\x81the"] = 99999; }),
       "byte-level"},
      {"tiktoken bad line", "tokenizer.model", "IQ== 0\nIg== 1\nnot base64! 2\n", ":3:"},
      {"tiktoken too few bytes", "tokenizer.model", "IQ== 0\nIg== 1\n", "256"},
      {"sentencepiece garbage", "tokenizer.model", std::string("\x0a\xff\xff\xff garbage", 12),
       "not a sentencepiece model"},
      {"empty model file", "tokenizer.model", "", "empty"},
  };
  for (const auto& row : table) {
    const std::string dir = qlora::testing::make_temp_dir("tok_bad");
    const std::string path = qlora::testing::write_file(dir, row.file, row.content);
    try {
      qlora::data::load_tokenizer(dir);
      ADD_FAILURE() << row.name << ": loaded without an error";
    } catch (const qlora::InputError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(path), std::string::npos) << row.name << ": message lacks the path: " << msg;
      EXPECT_NE(msg.find(row.expect), std::string::npos)
          << row.name << ": message lacks \"" << row.expect << "\": " << msg;
    }
  }
}

TEST(BadTokenizerFiles, ConfigNamingAnUnknownTokenIsAnInputError) {
  const std::string dir = qlora::testing::make_temp_dir("tok_cfg");
  fs::copy_file(kDataDir + "/bpe/tokenizer.json", dir + "/tokenizer.json");
  const std::string cfg =
      qlora::testing::write_file(dir, "tokenizer_config.json", R"({"eos_token": "<|nope|>"})");
  try {
    qlora::data::load_tokenizer(dir);
    ADD_FAILURE() << "loaded without an error";
  } catch (const qlora::InputError& e) {
    EXPECT_NE(std::string(e.what()).find(cfg), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("<|nope|>"), std::string::npos) << e.what();
  }
  EXPECT_THROW(qlora::data::load_tokenizer(dir + "/missing"), qlora::InputError);
  EXPECT_THROW(qlora::data::load_tokenizer(qlora::testing::make_temp_dir("tok_empty")),
               qlora::InputError);
}

}  // namespace
