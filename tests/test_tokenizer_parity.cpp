// Tokenizer parity, id for id, with the libraries the models are served with: every golden
// file of tests/data/tokenizer_parity (the hard corpus through Hugging Face tokenizers,
// sentencepiece and tiktoken; scripts/golden/tokenizer_parity.py) and llama.cpp's test pairs
// of the real tokenizers in ../shared/data (see its README). The real files are not part of
// the repository: their cases skip, saying so, where ../shared/data is absent.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "qlora/data/tokenizer.h"
#include "support/test_support.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::string read_file(const fs::path& p) { return testing::slurp(p.string()); }

std::string from_hex(const std::string& hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) out += static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16));
  return out;
}

std::unique_ptr<data::Tokenizer> load_file(const std::string& path) {
  if (path.size() >= 5 && path.compare(path.size() - 5, 5, ".json") == 0) return data::load_tokenizer_json(path);
  return data::load_tokenizer(path);  // a tokenizer.model, read by its content
}

std::string show(const std::vector<int32_t>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size() && i < 40; ++i) s += (i ? " " : "") + std::to_string(ids[i]);
  return s + (ids.size() > 40 ? " ..." : "");
}

std::vector<std::string> golden_names() {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(testing::source_path("tests/data/tokenizer_parity")))
    // llama2-tokenizer.json holds raw sentencepiece's ids (spm.encode: "<s>" read as text,
    // no added-token splitting), not what a Hugging Face tokenizer gives; the tokenizer.model
    // path has its own goldens (tests/data/tokenizer/golden_spm*.json, from transformers).
    if (e.path().extension() == ".json" && e.path().stem() != "corpus" && e.path().stem() != "llama2-tokenizer")
      names.push_back(e.path().stem().string());
  std::sort(names.begin(), names.end());
  return names;
}

class HardCorpus : public ::testing::TestWithParam<std::string> {};

// Each corpus line: the ids without and with the post-processor's tokens, and decode(ids).
TEST_P(HardCorpus, MatchesTheReferenceLibrary) {
  const json golden = json::parse(read_file(testing::source_path("tests/data/tokenizer_parity/" + GetParam() + ".json")));
  const json corpus = json::parse(read_file(testing::source_path("tests/data/tokenizer_parity/corpus.json")));
  const std::string source = testing::source_path(golden["source"].get<std::string>());
  if (!fs::exists(source)) GTEST_SKIP() << "no " << source << " (real tokenizers live outside the repository)";
  const auto tok = load_file(source);
  const json& lines = corpus["lines"];
  const json& cases = golden["cases"];
  ASSERT_EQ(lines.size(), cases.size());
  int bad_ids = 0, bad_decode = 0;
  for (size_t i = 0; i < lines.size(); ++i) {
    const json& line = lines[i];
    const std::string input = line.contains("bytes_hex") ? from_hex(line["bytes_hex"]) : line["text"].get<std::string>();
    const std::vector<int32_t> want = cases[i]["ids"].get<std::vector<int32_t>>();
    const std::vector<int32_t> got = tok->encode(input);
    if (got != want) {
      ++bad_ids;
      ADD_FAILURE() << GetParam() << " line " << i << " [" << line["tag"].get<std::string>() << "] "
                    << json(line["text"]).dump() << "\n  want " << show(want) << "\n  got  " << show(got);
      continue;
    }
    std::vector<int32_t> with_bos = got;
    if (tok->add_bos() && tok->bos_id() >= 0) with_bos.insert(with_bos.begin(), tok->bos_id());
    EXPECT_EQ(with_bos, cases[i]["ids_bos"].get<std::vector<int32_t>>()) << GetParam() << " line " << i;
    const std::string decoded = tok->decode(got);
    if (decoded != cases[i]["decoded"].get<std::string>()) {
      ++bad_decode;
      ADD_FAILURE() << GetParam() << " line " << i << " decode: want " << cases[i]["decoded"].dump() << " got "
                    << json(decoded).dump();
    }
  }
  std::printf("parity %-26s %zu lines: %d id mismatches, %d decode mismatches\n", GetParam().c_str(), lines.size(),
              bad_ids, bad_decode);
}

INSTANTIATE_TEST_SUITE_P(Golden, HardCorpus, ::testing::ValuesIn(golden_names()),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (char& c : n)
                             if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
                           return n;
                         });

// continuing_subword_prefix / end_of_word_suffix, which no target family uses, read as the
// tokenizers library reads them (scripts/golden/tokenizer_affixes.py).
TEST(TokenizerParity, SubwordPrefixAndSuffixAsTokenizers) {
  const std::string dir = testing::source_path("tests/data/tokenizer_affixes");
  const json golden = json::parse(read_file(dir + "/golden.json"));
  const auto tok = data::load_tokenizer_json(dir + "/tokenizer.json");
  for (const auto& c : golden["cases"])
    EXPECT_EQ(tok->encode(c["text"].get<std::string>()), c["ids"].get<std::vector<int32_t>>()) << c["text"];
}

// llama.cpp's 46 strings with the ids the model's own Hugging Face tokenizer gave.
TEST(TokenizerParity, LlamaCppTestPairsOfTheRealTokenizers) {
  const fs::path shared = testing::source_path("../shared/data");
  if (!fs::exists(shared)) GTEST_SKIP() << "no " << shared << " (real tokenizers live outside the repository)";
  int folders = 0;
  for (const auto& e : fs::directory_iterator(shared)) {
    const fs::path strings = e.path() / "test-strings.txt", ids_file = e.path() / "test-ids.txt";
    if (!fs::exists(strings) || !fs::exists(ids_file)) continue;
    ++folders;
    const auto tok = data::load_tokenizer_json((e.path() / "tokenizer.json").string());
    const std::string all = read_file(strings);
    const std::string marker = "\n__ggml_vocab_test__\n";
    std::vector<std::string> texts;
    for (size_t at = 0, hit; (hit = all.find(marker, at)) != std::string::npos; at = hit + marker.size())
      texts.push_back(all.substr(at, hit - at));
    std::vector<std::vector<int32_t>> want;
    std::istringstream lines(read_file(ids_file));
    for (std::string line; std::getline(lines, line);) {
      std::istringstream nums(line);
      std::vector<int32_t> ids;
      for (int32_t id; nums >> id;) ids.push_back(id);
      want.push_back(std::move(ids));
    }
    ASSERT_EQ(texts.size(), 46u) << strings;
    ASSERT_GE(want.size(), texts.size()) << ids_file;
    int bad = 0;
    for (size_t i = 0; i < texts.size(); ++i) {
      const auto got = tok->encode(texts[i]);
      if (got != want[i]) {
        ++bad;
        ADD_FAILURE() << e.path().filename() << " string " << i << " " << json(texts[i]).dump() << "\n  want "
                      << show(want[i]) << "\n  got  " << show(got);
      } else {
        EXPECT_EQ(tok->decode(got), texts[i]) << e.path().filename() << " string " << i << " round trip";
      }
    }
    std::printf("llama.cpp pair %-26s %zu strings: %d mismatches\n", e.path().filename().c_str(), texts.size(), bad);
  }
  EXPECT_GE(folders, 7) << "expected the seven tokenizer.json folders of " << shared;
}

}  // namespace
}  // namespace qlora
