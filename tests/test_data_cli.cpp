// qlora data: the data pipeline through the CLI — summaries, and bad lines
// reported as file:line with exit code 2 (or skipped and counted).
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <string>
#include <vector>

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

// --show marks what is trained; --dump writes what the loader will feed,
// labels -100 exactly where --show leaves the text unmarked.
TEST(DataCli, ShowMarksTrainedSpansAndDumpWritesIdsAndLabels) {
  const std::string dir = make_temp_dir("data-cli");
  const std::string data = write_file(dir, "qa.jsonl",
                                      "{\"instruction\": \"Say hi\", \"output\": \"hi there\"}\n\n"
                                      "{\"instruction\": \"Count\", \"input\": \"1 2\", \"output\": \"3\"}\n");
  const std::string cfg = write_file(dir, "run.yaml", config_for(data));
  const std::string dump = dir + "/dump.jsonl";
  const auto r = run_qlora("data --config " + cfg + " " + kTokenizer + " --show 1 --dump " + dump);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("--- example 1 (line 1): "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("### Response:\n[[hi there"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("--- example 2"), std::string::npos) << r.out;  // --show 1
  EXPECT_NE(r.out.find("dump       2 examples to " + dump), std::string::npos) << r.out;

  std::ifstream in(dump);
  std::string line;
  std::vector<nlohmann::json> rows;
  while (std::getline(in, line)) rows.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0]["line"], 1);
  EXPECT_EQ(rows[1]["line"], 3);  // the blank line 2 is not an example
  for (const auto& row : rows) {
    EXPECT_EQ(row["split"], "train");
    const auto ids = row["input_ids"].get<std::vector<int32_t>>();
    const auto labels = row["labels"].get<std::vector<int32_t>>();
    ASSERT_EQ(ids.size(), labels.size());
    int64_t trained = 0;
    for (size_t i = 0; i < ids.size(); ++i) {
      if (labels[i] == -100) continue;
      EXPECT_EQ(labels[i], ids[i]) << "labels are unshifted: a trained label is its own token";
      ++trained;
    }
    EXPECT_GT(trained, 0);
    EXPECT_LT(trained, static_cast<int64_t>(ids.size()));
  }
  // The counts line of example 1 adds up to its token count.
  EXPECT_NE(r.out.find("(not trained " + std::to_string(rows[0]["input_ids"].size() -
                                                      std::count_if(rows[0]["labels"].begin(), rows[0]["labels"].end(),
                                                                    [](const nlohmann::json& v) { return v != -100; })) +
                       " | trained "),
            std::string::npos)
      << r.out;
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
