// qlora generate and qlora chat on a small random model with the demo's tokenizer: the answers
// are what train::generate gives for the same prompts, chats are rendered with the model's
// template, and bad input stops with exit 2 naming the file and line.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <sstream>
#include <string>

#include "qlora/common/text.h"
#include "qlora/train/chat_session.h"
#include "support/test_support.h"
#include "support/train_fixtures.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

const char* kTemplate =
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

// The small model with a chat template beside it.
std::string chat_model() {
  static const std::string dir = [] {
    const std::string d = testing::make_temp_dir("chat_model");
    fs::copy(testing::small_model_dir(), d, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
    testing::write_file(d, "chat_template.jinja", kTemplate);
    return d;
  }();
  return dir;
}

std::vector<ojson> read_jsonl(const std::string& path) {
  std::vector<ojson> out;
  std::istringstream in(testing::slurp(path));
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) out.push_back(ojson::parse(line));
  return out;
}

TEST(CliGenerate, AnswersEqualTrainGenerateForTextAndChatPrompts) {
  const std::string tmp = testing::make_temp_dir("cli_generate");
  const ojson chat = ojson::array({{{"role", "user"}, {"content", "Is 12 even?"}}});
  const std::string prompts = testing::write_file(
      tmp, "p.jsonl", ojson{{"prompt", "12 is"}}.dump() + "\n\n" + ojson{{"messages", chat}}.dump() + "\n");
  const auto r = testing::run_qlora("generate --model '" + chat_model() + "' --prompts '" + prompts + "' --out '" + tmp +
                                    "/a.jsonl' --max-new-tokens 5 --device cpu --batch-size 2");
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  const auto rows = read_jsonl(tmp + "/a.jsonl");
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0].at("line"), 1);
  EXPECT_EQ(rows[1].at("line"), 3);  // the blank line is skipped, and counted
  train::ChatSession s = train::open_chat_session(chat_model(), "", "cpu");
  train::SamplingOptions o;
  o.max_new_tokens = 5;
  o.stop_ids = s.stop_ids;
  const auto want = train::generate(s.base.model, {s.text_prompt("12 is"), s.chat_prompt(chat)}, o);
  EXPECT_EQ(rows[0].at("completion"), s.tokenizer->decode(want[0]));
  EXPECT_EQ(rows[1].at("completion"), s.tokenizer->decode(want[1]));
  EXPECT_EQ(rows[0].at("tokens"), want[0].size());
  // The chat prompt is the template's rendering with the generation prompt.
  EXPECT_EQ(s.tokenizer->decode(s.chat_prompt(chat)),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nIs 12 even?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_NE(std::find(s.stop_ids.begin(), s.stop_ids.end(), *s.tokenizer->token_id("<|eot_id|>")), s.stop_ids.end());
}

TEST(CliGenerate, BadInputNamesTheFileAndLine) {
  const std::string tmp = testing::make_temp_dir("cli_generate_bad");
  const std::string model = " --model '" + chat_model() + "' --device cpu --out '" + tmp + "/a.jsonl'";
  auto r = testing::run_qlora("generate --prompts '" + tmp + "/missing.jsonl'" + model);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("missing.jsonl"), std::string::npos) << r.err;
  const std::string bad = testing::write_file(tmp, "bad.jsonl", "{\"prompt\": \"ok\"}\n{\"text\": 1}\n");
  r = testing::run_qlora("generate --prompts '" + bad + "'" + model);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("bad.jsonl:2: expected {\"prompt\""), std::string::npos) << r.err;
  const std::string longp = testing::write_file(tmp, "long.jsonl", "{\"prompt\": \"" + std::string(3000, 'x') + "\"}\n");
  r = testing::run_qlora("generate --prompts '" + longp + "'" + model);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("long.jsonl:1:"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("max_position_embeddings"), std::string::npos) << r.err;
  // A chat prompt for a model without a template.
  const std::string chat = testing::write_file(tmp, "chat.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n");
  r = testing::run_qlora("generate --prompts '" + chat + "' --model '" + testing::small_model_dir() + "' --device cpu --out '" +
                         tmp + "/b.jsonl'");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("chat.jsonl:1: the model has no chat template"), std::string::npos) << r.err;
  // An adapter for another base: its shapes are named.
  r = testing::run_qlora("generate --prompts '" + chat + "'" + model + " --adapter '" +
                         testing::source_path("tests/data/families/qwen3/lora/adapter") + "'");
  EXPECT_EQ(r.exit_code, 2) << r.err;
}

TEST(CliGenerate, ChatKeepsHistoryAndItsCommands) {
  const std::string tmp = testing::make_temp_dir("cli_chat");
  const std::string input = testing::write_file(tmp, "in.txt", "Is 4 even?\n/system Answer yes or no.\nIs 5 even?\n/reset\n/exit\n");
  const auto r = testing::run_qlora("chat --model '" + chat_model() + "' --device cpu --max-new-tokens 3 < '" + input + "'");
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("(system prompt set; history cleared)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("(history cleared)"), std::string::npos) << r.out;
  const auto none = testing::run_qlora("chat --model '" + testing::small_model_dir() + "' --device cpu < '" + input + "'");
  EXPECT_EQ(none.exit_code, 2);
  EXPECT_NE(none.err.find("no chat template"), std::string::npos) << none.err;
}

}  // namespace
}  // namespace qlora
