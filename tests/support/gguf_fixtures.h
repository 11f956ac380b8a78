// GGUF output checked by gguf-py and llama.cpp (test_gguf_merge.cpp, test_gguf_export.cpp): the
// golden family directories, the byte-level tokenizer that llama.cpp loads beside them, and
// tests/scripts/check_gguf_merge.py (gguf-py, llama.cpp, transformers) run on a list of jobs.
#pragma once

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "support/test_support.h"

namespace qlora::testing {

// The golden model directory of variant `v` (scripts/golden/families.py).
inline std::string family_dir(const std::string& v) { return source_path("tests/data/families/" + v); }

// UTF-8 of a code point below 0x10000.
inline std::string utf8(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xC0 | (cp >> 6)), s += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    s += static_cast<char>(0xE0 | (cp >> 12)), s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

// The byte-level BPE tokenizer.json of 256 ids (the golden models' vocab_size) that qlora merge
// --gguf needs to write a model llama.cpp loads: <pad>, <s>, </s> at 0, 1, 2 (as config.json names
// them), byte b at id b for b >= 3 in GPT-2's byte-to-char map, no merges, Llama 3's pre-tokenizer.
inline nlohmann::json byte_level_tokenizer() {
  using json = nlohmann::json;
  json vocab = json::object(), added = json::array();
  const char* specials[] = {"<pad>", "<s>", "</s>"};
  for (int i = 0; i < 3; ++i) {
    vocab[specials[i]] = i;
    added.push_back({{"id", i}, {"content", specials[i]}, {"single_word", false}, {"lstrip", false},
                     {"rstrip", false}, {"normalized", false}, {"special", true}});
  }
  uint32_t next = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    const uint32_t c = printable ? b : next++;
    if (b >= 3) vocab[utf8(c)] = b;
  }
  const std::string regex =
      "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
      "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
  const json split = {{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", "Isolated"}, {"invert", false}};
  const json bytes = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}};
  return {{"version", "1.0"}, {"truncation", nullptr}, {"padding", nullptr}, {"added_tokens", added},
          {"normalizer", nullptr},
          {"pre_tokenizer", {{"type", "Sequence"}, {"pretokenizers", json::array({split, bytes})}}},
          {"post_processor", nullptr},
          {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
          {"model", {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr},
                     {"continuing_subword_prefix", nullptr}, {"end_of_word_suffix", nullptr}, {"fuse_unk", false},
                     {"byte_fallback", false}, {"ignore_merges", false}, {"vocab", vocab}, {"merges", json::array()}}}};
}

// The byte-level tokenizer in `dir`: tokenizer.json and a tokenizer_config.json naming its special
// tokens, with `chat_template` where it is not empty.
inline void write_byte_level_tokenizer(const std::string& dir, const std::string& chat_template = "") {
  write_file(dir, "tokenizer.json", byte_level_tokenizer().dump());
  nlohmann::json tc = {{"tokenizer_class", "PreTrainedTokenizerFast"}, {"bos_token", "<s>"}, {"eos_token", "</s>"},
                       {"pad_token", "<pad>"}, {"add_bos_token", true}};
  if (!chat_template.empty()) tc["chat_template"] = chat_template;
  write_file(dir, "tokenizer_config.json", tc.dump(2));
}

// Runs tests/scripts/check_gguf_merge.py on `jobs`; the parsed list of results.
inline nlohmann::json run_checker(const std::string& py, const nlohmann::json& jobs, const std::string& tmp) {
  const std::string jobs_file = write_file(tmp, "jobs.json", jobs.dump());
  int status = -1;
  const std::string out = run_capture("'" + py + "' '" + source_path("tests/scripts/check_gguf_merge.py") +
                                          "' \"$(cat '" + jobs_file + "')\" 2>'" + tmp + "/checker.err'",
                                      &status);
  EXPECT_EQ(status, 0) << out << slurp(tmp + "/checker.err");
  const size_t at = out.rfind("\n[");
  return nlohmann::json::parse(at == std::string::npos ? out : out.substr(at + 1));
}

// The interpreter with `modules` that runs llama.cpp (the CPU build of the llama-cpp-cffi wheel,
// which scripts/setup.sh --tests installs) next to them; "" with `why` when it cannot, a failure
// rather than a skip where QLORA_REQUIRE_ORACLES asks for every oracle.
inline std::string python_with_llama_cpp(const std::string& modules, const std::string& tmp, std::string* why) {
  const std::string py = python_with(modules, why);
  if (py.empty()) return "";
  const std::string jobs_file = write_file(tmp, "loads.json", R"([{"check": "loads"}])");
  int status = -1;
  const std::string out = run_capture("'" + py + "' '" + source_path("tests/scripts/check_gguf_merge.py") +
                                          "' \"$(cat '" + jobs_file + "')\" 2>&1",
                                      &status);
  if (status == 0) return py;
  const std::string trimmed = out.substr(0, out.find_last_not_of('\n') + 1);
  *why = py + " cannot load llama.cpp (bash scripts/setup.sh --tests installs it): " +
         trimmed.substr(trimmed.rfind('\n') + 1);
  if (const char* r = std::getenv("QLORA_REQUIRE_ORACLES"); r && *r && std::string(r) != "0") ADD_FAILURE() << *why;
  return "";
}

// The depth this llama.cpp build runs variant `v` at, 0 for its golden depth: Gemma 2's attention
// scale is picked by depth (26, 42 or 46 layers; it aborts on others), and Gemma 3's decode crashes
// on fewer than 6 layers.
inline int llama_cpp_run_layers(const std::string& v) { return v == "gemma2" ? 26 : v == "gemma3" ? 6 : 0; }

// The golden layers of the base directory `dir` of variant `v` repeated up to llama_cpp_run_layers(v)
// (nothing where that is 0); the adapter changes the first ones. A fatal failure where it cannot.
inline void grow_for_llama_cpp(const std::string& py, const std::string& dir, const std::string& v,
                               const std::string& tmp) {
  if (const int layers = llama_cpp_run_layers(v); layers > 0) {
    const nlohmann::json grown =
        run_checker(py, nlohmann::json::array({{{"check", "grow"}, {"dir", dir}, {"layers", layers}}}), tmp);
    ASSERT_EQ(grown, nlohmann::json::array({{{"layers", layers}}})) << v;
  }
}

// Whether result `r` of variant `v` is this llama.cpp refusing qwen3: the llama.cpp of
// llama-cpp-cffi 0.4.42 (April 2025) predates its qwen3 architecture; a newer pin that knows it
// makes that case run (and the callers' branch for it fail: drop it then).
inline bool llama_cpp_lacks_qwen3(const std::string& v, const nlohmann::json& r) {
  return v == "qwen3" && r["error"].get<std::string>().find("unknown model architecture: 'qwen3'") != std::string::npos;
}

}  // namespace qlora::testing
