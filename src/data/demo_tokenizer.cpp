#include "qlora/data/demo_tokenizer.h"

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "data/bpe.h"
#include "data/onig_regex.h"
#include "qlora/common/errors.h"
#include "qlora/common/text.h"
#include "qlora/data/format.h"

namespace qlora::data {
namespace {

using json = nlohmann::ordered_json;
namespace fs = std::filesystem;

}  // namespace

const std::vector<std::string>& demo_special_tokens() {
  static const std::vector<std::string> t = {"<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                             "<|end_header_id|>", "<|eot_id|>"};
  return t;
}

std::vector<std::string> rendered_texts(const std::string& jsonl_path) {
  std::ifstream in(jsonl_path);
  if (!in) throw InputError("cannot read " + jsonl_path);
  std::vector<std::string> texts;
  std::string line;
  int64_t n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    try {
      std::string text;
      for (const auto& seg : render_line(line, DataFormat::kAuto, ChatTemplate::kLlama3).segments) text += seg.text;
      texts.push_back(std::move(text));
    } catch (const std::exception& e) {
      throw InputError(jsonl_path + ":" + std::to_string(n) + ": " + e.what());
    }
  }
  return texts;
}

std::vector<std::pair<std::string, std::string>> learn_merges(const std::vector<std::string>& texts, int max_merges) {
  const OnigRegex pattern(bpe::kQwen2Pattern, "the demo tokenizer");
  // Each distinct piece once, as its current symbols, with its count.
  std::map<std::string, int64_t> counts;
  for (const auto& t : texts)
    for (const RegexPiece& p : pattern.pieces(t)) ++counts[t.substr(p.begin, p.end - p.begin)];
  std::vector<std::pair<std::vector<std::string>, int64_t>> words;
  for (const auto& [piece, n] : counts) {
    std::vector<std::string> symbols;
    for (char c : piece) symbols.emplace_back(1, c);
    words.emplace_back(std::move(symbols), n);
  }
  std::vector<std::pair<std::string, std::string>> merges;
  while (static_cast<int>(merges.size()) < max_merges) {
    std::map<std::pair<std::string, std::string>, int64_t> pairs;
    for (const auto& [symbols, n] : words)
      for (size_t i = 0; i + 1 < symbols.size(); ++i) pairs[{symbols[i], symbols[i + 1]}] += n;
    auto best = pairs.end();
    for (auto it = pairs.begin(); it != pairs.end(); ++it)
      if (best == pairs.end() || it->second > best->second) best = it;  // map order breaks ties
    if (best == pairs.end() || best->second < 2) break;
    const auto [a, b] = best->first;
    merges.emplace_back(a, b);
    for (auto& [symbols, n] : words) {
      std::vector<std::string> next;
      for (size_t i = 0; i < symbols.size(); ++i) {
        if (i + 1 < symbols.size() && symbols[i] == a && symbols[i + 1] == b) {
          next.push_back(a + b);
          ++i;
        } else {
          next.push_back(symbols[i]);
        }
      }
      symbols = std::move(next);
    }
  }
  return merges;
}

int64_t write_demo_tokenizer(const std::string& dir, const std::vector<std::pair<std::string, std::string>>& merges) {
  fs::create_directories(dir);
  const auto& bytes = bpe::byte_to_unicode();
  const auto visible = [&bytes](const std::string& raw) {
    std::string out;
    for (unsigned char c : raw) out += bytes[c];
    return out;
  };
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[bytes[static_cast<size_t>(b)]] = b;
  json merge_list = json::array();
  int next_id = 256;
  for (const auto& [a, b] : merges) {
    vocab[visible(a + b)] = next_id++;
    merge_list.push_back(visible(a) + " " + visible(b));
  }
  const int first_special = next_id;
  json added = json::array();
  for (size_t i = 0; i < demo_special_tokens().size(); ++i)
    added.push_back({{"id", first_special + static_cast<int>(i)},
                     {"content", demo_special_tokens()[i]},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", true}});
  const json tok = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         json::array({{{"type", "Split"},
                       {"pattern", {{"Regex", bpe::kQwen2Pattern}}},
                       {"behavior", "Isolated"},
                       {"invert", false}},
                      {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", false}}})}}},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single", json::array({{{"SpecialToken", {{"id", "<|begin_of_text|>"}, {"type_id", 0}}}},
                                {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
        {"pair", json::array({{{"SpecialToken", {{"id", "<|begin_of_text|>"}, {"type_id", 0}}}},
                              {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                              {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}})},
        {"special_tokens",
         {{"<|begin_of_text|>", {{"id", "<|begin_of_text|>"}, {"ids", {first_special}}, {"tokens", {"<|begin_of_text|>"}}}}}}}},
      {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", nullptr},
        {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr},
        {"fuse_unk", false},
        {"byte_fallback", false},
        {"ignore_merges", false},
        {"vocab", vocab},
        {"merges", merge_list}}}};
  write_text_file((fs::path(dir) / "tokenizer.json").string(), tok.dump(1) + "\n");
  const json cfg = {{"bos_token", "<|begin_of_text|>"},
                    {"eos_token", "<|end_of_text|>"},
                    {"add_bos_token", true},
                    {"clean_up_tokenization_spaces", false},
                    {"model_max_length", 1024},
                    {"tokenizer_class", "PreTrainedTokenizerFast"}};
  write_text_file((fs::path(dir) / "tokenizer_config.json").string(), cfg.dump(1) + "\n");
  const json special = {{"bos_token", "<|begin_of_text|>"}, {"eos_token", "<|end_of_text|>"}};
  write_text_file((fs::path(dir) / "special_tokens_map.json").string(), special.dump(1) + "\n");
  return first_special + static_cast<int64_t>(demo_special_tokens().size());
}

}  // namespace qlora::data
