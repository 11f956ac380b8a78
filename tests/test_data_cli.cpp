// qlora data: the data pipeline through the CLI — summaries, and bad lines
// reported as file:line with exit code 2 (or skipped and counted).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "support/test_support.h"

namespace qlora {
namespace {

using testing::make_temp_dir;
using testing::run_qlora;
using testing::source_path;
using testing::write_file;

// A small byte-level BPE with Llama 3's specials (scripts/golden/tokenizer.py).
const std::string kTokenizer = "--tokenizer " + source_path("tests/data/tokenizer/bpe");

std::string config_for(const std::string& data_lines) {
  return "data:\n  path: " + data_lines + "\n  max_seq_length: 512\n";
}

TEST(DataCli, DemoSetLoadsWithItsHeldOutSplit) {
  const std::string dir = make_temp_dir("data-cli");
  const std::string cfg = write_file(dir, "run.yaml",
                                     "data:\n  path: " + source_path("data/demo/train.alpaca.jsonl") +
                                         "\n  eval_path: " + source_path("data/demo/eval.alpaca.jsonl") + "\n");
  const auto r = run_qlora("data --config " + cfg + " " + kTokenizer + " --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["train"]["examples"], 3000);
  EXPECT_EQ(j["eval"]["examples"], 300);
  EXPECT_EQ(j["train"]["format"], "alpaca");
  EXPECT_GT(j["train"]["trained_tokens"].get<int64_t>(), 0);
  EXPECT_LT(j["train"]["trained_tokens"].get<int64_t>(), j["train"]["tokens"].get<int64_t>());  // prompts masked
}

TEST(DataCli, BadLineNamesFileAndLineAndExitsTwo) {
  const std::string dir = make_temp_dir("data-cli");
  const std::string data = write_file(dir, "bad.jsonl",
                                      "{\"text\": \"one\"}\n{\"text\": \"two\"\n{\"text\": \"three\"}\n");
  const std::string cfg = write_file(dir, "run.yaml", config_for(data));
  auto r = run_qlora("data --config " + cfg + " " + kTokenizer);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("bad.jsonl:2:"), std::string::npos) << r.err;

  r = run_qlora("data --config " + cfg + " " + kTokenizer + " --set data.skip_bad_lines=true --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["train"]["examples"], 2);
  EXPECT_EQ(j["train"]["skipped_lines"], 1);
}

TEST(DataCli, NoTokenizerOrMissingFileIsAClearError) {
  const std::string dir = make_temp_dir("data-cli");
  const std::string cfg = write_file(dir, "run.yaml", config_for(dir + "/absent.jsonl"));
  auto r = run_qlora("data --config " + cfg);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("--tokenizer"), std::string::npos) << r.err;
  r = run_qlora("data --config " + cfg + " " + kTokenizer);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("absent.jsonl"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace qlora
