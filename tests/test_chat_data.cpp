// Chat data through the whole pipeline with a model's own template (data.chat_template: model):
// the input ids equal what transformers' apply_chat_template(tokenize=True) gives (the ids the
// golden script stored with tokenizers for our own conversations, no bos added), the trained runs
// end with the reply and its end-of-turn token, and the choices around it fail with their key.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include "qlora/data/chat_template.h"
#include "qlora/data/dataset.h"
#include "qlora/data/tokenizer.h"
#include "support/test_support.h"

namespace qlora::data {
namespace {

using ojson = nlohmann::ordered_json;

using qlora::testing::slurp;

std::string shared(const std::string& rel) { return qlora::testing::source_path("../shared/data/" + rel); }

// A model directory: a shared tokenizer's files and a shared template as chat_template.jinja.
std::string model_dir(const std::string& tokenizer, const std::string& tmpl) {
  const std::string dir = qlora::testing::make_temp_dir("chat-data");
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
    std::filesystem::copy_file(shared(tokenizer + "/" + f), dir + "/" + f);
  qlora::testing::write_file(dir, "chat_template.jinja", slurp(shared("chat-templates/" + tmpl)));
  return dir;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  return "(no error)";
}

LoadOptions model_options() {
  LoadOptions o;
  o.format = DataFormat::kChat;
  o.chat_template = ChatTemplate::kModel;
  o.max_seq_length = 1 << 16;
  return o;
}

// The decoded runs of trained labels, in order.
std::vector<std::string> trained_runs(const TokenizedExample& ex, const Tokenizer& tok) {
  std::vector<std::string> runs;
  std::vector<int32_t> run;
  for (size_t i = 0; i <= ex.labels.size(); ++i) {
    if (i < ex.labels.size() && ex.labels[i] != kIgnoreIndex) {
      run.push_back(ex.labels[i]);
    } else if (!run.empty()) {
      runs.push_back(tok.decode(run));
      run.clear();
    }
  }
  return runs;
}

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

TEST(ChatData, ModelTemplateIdsEqualTransformersAndRunsEndWithTheTurn) {
  if (!std::filesystem::exists(shared("chat-templates/expected.json")) ||
      !std::filesystem::exists(shared("qwen2-tokenizer/tokenizer.json")))
    GTEST_SKIP() << "no ../shared/data (the real templates and tokenizers are not part of the repository)";
  const ojson own = ojson::parse(slurp(qlora::testing::source_path("tests/data/chat_templates/own_cases.json")));
  const std::map<std::string, std::string> eot = {{"Qwen-Qwen2.5-7B-Instruct.jinja", "<|im_end|>"},
                                                  {"Qwen-Qwen3-0.6B.jinja", "<|im_end|>"},
                                                  {"microsoft-Phi-3.5-mini-instruct.jinja", "<|end|>"}};
  int checked = 0, segment_wise = 0;
  for (const ojson& c : own.at("cases")) {
    if (!c.contains("ids") || c.at("add_generation_prompt").get<bool>() || c.at("variant").get<int>() != 0) continue;
    const std::string name = c.at("template");
    const std::string dir = model_dir(c.at("tokenizer"), name);
    const std::unique_ptr<Tokenizer> tok = load_tokenizer(dir);
    const ojson& messages = own.at("conversations").at(c.at("conversation").get<size_t>());
    const std::string line = ojson{{"messages", messages}}.dump();
    const std::string what = name + " conversation " + c.at("conversation").dump();
    LoadOptions options = model_options();
    options.train_on = TrainOn::kLastAssistant;  // Qwen3 drops past reasoning: only the last turn splits everywhere
    const Dataset d = load_jsonl_text(line + "\n", "chat.jsonl", options, *tok);
    ASSERT_EQ(d.examples.size(), 1u) << what;
    const TokenizedExample& ex = d.examples[0];
    if (ex.segment_wise) {
      // The reply starts with "\n" right after the prompt's "\n": whole-string BPE merges the
      // two, so the prompt is tokenized alone, as a server sends it, and the text is the same.
      EXPECT_EQ(tok->decode(ex.input_ids), c.at("rendered").get<std::string>()) << what;
      ++segment_wise;
    } else {
      EXPECT_EQ(ex.input_ids, c.at("ids").get<std::vector<int32_t>>()) << what;
    }
    EXPECT_EQ(d.summary.chat_template, ChatTemplate::kModel);
    EXPECT_EQ(d.summary.end_of_turn, eot.at(name)) << what;
    EXPECT_NE(d.summary.describe().find("chat_template.jinja"), std::string::npos) << d.summary.describe();
    const std::vector<std::string> runs = trained_runs(ex, *tok);
    ASSERT_EQ(runs.size(), 1u) << what;
    // Leading whitespace aside: Phi-3's tokenizer drops what follows <|assistant|>, and its
    // decoder the first piece's space.
    std::string reply = messages.back().at("content");
    reply.erase(0, reply.find_first_not_of(" \n"));
    EXPECT_TRUE(ends_with(runs[0], reply + eot.at(name))) << what << ": " << runs[0];
    ++checked;
  }
  EXPECT_EQ(checked, 18);  // 6 conversations x (Qwen2.5, Qwen3, Phi-3.5)
  EXPECT_EQ(segment_wise, 1);  // Qwen2.5's "<|im_start|>assistant\n" + "\n  answer with spaces  "
}

// Llama 3.1 and 3.2's templates on Meta's tiktoken tokenizer (bos_token from a tokenizer_config
// as the models ship it): every reply of the shared conversations is one trained run, the reply
// and <|eot_id|>, tokenized whole (no boundary inside a token).
TEST(ChatData, LlamaTemplatesTrainEachReplyAndItsEndOfTurn) {
  const std::string tiktoken = shared("llama3-tokenizer/tokenizer.model");
  if (!std::filesystem::exists(shared("chat-templates/expected.json")) || !std::filesystem::exists(tiktoken))
    GTEST_SKIP() << "no ../shared/data (the real templates and tokenizers are not part of the repository)";
  const ojson oracle = ojson::parse(slurp(shared("chat-templates/expected.json")));
  for (const char* name : {"meta-llama-Llama-3.1-8B-Instruct.jinja", "meta-llama-Llama-3.2-3B-Instruct.jinja"}) {
    const std::string dir = qlora::testing::make_temp_dir("chat-llama");
    std::filesystem::copy_file(tiktoken, dir + "/tokenizer.model");
    qlora::testing::write_file(dir, "tokenizer_config.json",
                               R"({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})");
    qlora::testing::write_file(dir, "chat_template.jinja", slurp(shared(std::string("chat-templates/") + name)));
    const std::unique_ptr<Tokenizer> tok = load_tokenizer(dir);
    int lines = 0, replies = 0;
    std::string jsonl;  // the shared conversations that end with a reply
    std::vector<ojson> kept;
    for (const ojson& messages : oracle.at("conversations")) {
      bool assistant = false;
      for (const ojson& m : messages) assistant = assistant || m.at("role") == "assistant";
      if (!assistant || messages.back().at("role") != "assistant") continue;
      jsonl += ojson{{"messages", messages}}.dump() + "\n";
      kept.push_back(messages);
    }
    LoadOptions options = model_options();
    options.skip_bad_lines = true;  // a conversation the template itself refuses
    const Dataset d = load_jsonl_text(jsonl, "chat.jsonl", options, *tok);
    EXPECT_EQ(d.summary.end_of_turn, "<|eot_id|>") << name;
    for (const TokenizedExample& ex : d.examples) {
      const ojson& messages = kept.at(static_cast<size_t>(ex.line - 1));
      std::vector<std::string> want;
      for (const ojson& m : messages)
        if (m.at("role") == "assistant") {
          std::string c = m.at("content");
          c.erase(0, c.find_first_not_of(" \n"));
          c.erase(c.find_last_not_of(" \n") + 1);  // the template trims the content
          want.push_back(c + "<|eot_id|>");
        }
      const std::vector<std::string> runs = trained_runs(ex, *tok);
      ASSERT_EQ(runs.size(), want.size()) << name << " line " << ex.line;
      for (size_t i = 0; i < runs.size(); ++i) {
        // A reply's reasoning may be rewritten; its answer and end-of-turn close the run.
        EXPECT_TRUE(ends_with(runs[i], want[i].substr(want[i].size() - std::min<size_t>(want[i].size(), 24))))
            << name << " line " << ex.line << ": " << runs[i] << " vs " << want[i];
      }
      EXPECT_FALSE(ex.segment_wise) << name << " line " << ex.line;
      ++lines;
      replies += static_cast<int>(runs.size());
    }
    std::printf("  %-40s %d conversations, %d replies trained with <|eot_id|>\n", name, lines, replies);
    EXPECT_GE(lines, 6) << name;
  }
}

TEST(ChatData, EveryAssistantTurnTrainedWithItsEndOfTurn) {
  if (!std::filesystem::exists(shared("qwen2-tokenizer/tokenizer.json")))
    GTEST_SKIP() << "no ../shared/data (the real templates and tokenizers are not part of the repository)";
  const std::string dir = model_dir("qwen2-tokenizer", "Qwen-Qwen2.5-7B-Instruct.jinja");
  const std::unique_ptr<Tokenizer> tok = load_tokenizer(dir);
  const std::string line =
      R"({"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"},)"
      R"( {"from": "human", "value": "And 3+3?"}, {"from": "gpt", "value": "6"}]})";
  LoadOptions options = model_options();
  options.format = DataFormat::kAuto;
  options.chat_template = ChatTemplate::kAuto;  // the directory has a template: auto takes it
  const Dataset d = load_jsonl_text(line + "\n", "chat.jsonl", options, *tok);
  EXPECT_EQ(d.summary.chat_template, ChatTemplate::kModel);
  EXPECT_EQ(trained_runs(d.examples[0], *tok), (std::vector<std::string>{"4<|im_end|>", "6<|im_end|>"}));
  // Qwen2.5 adds its default system prompt: the rendering starts with it, untrained.
  EXPECT_EQ(tok->decode({d.examples[0].input_ids.begin(), d.examples[0].input_ids.begin() + 3}),
            "<|im_start|>system\n");

  options.train_on = TrainOn::kLastAssistant;
  EXPECT_EQ(trained_runs(load_jsonl_text(line + "\n", "chat.jsonl", options, *tok).examples[0], *tok),
            (std::vector<std::string>{"6<|im_end|>"}));
  options.train_on = TrainOn::kAll;
  const Dataset all = load_jsonl_text(line + "\n", "chat.jsonl", options, *tok);
  EXPECT_EQ(count_trained(all.examples[0]), all.examples[0].size() - 1);  // all but the first (no context)

  // The built-in format still wins when asked for, through the same engine.
  options.train_on = TrainOn::kAllAssistant;
  options.chat_template = ChatTemplate::kChatml;
  const Dataset builtin = load_jsonl_text(line + "\n", "chat.jsonl", options, *tok);
  EXPECT_EQ(builtin.summary.chat_template, ChatTemplate::kChatml);
  EXPECT_EQ(tok->decode(builtin.examples[0].input_ids),
            "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd "
            "3+3?<|im_end|>\n<|im_start|>assistant\n6<|im_end|>\n");
}

TEST(ChatData, ReasoningLeftUntrained) {
  if (!std::filesystem::exists(shared("qwen2-tokenizer/tokenizer.json")))
    GTEST_SKIP() << "no ../shared/data (the real templates and tokenizers are not part of the repository)";
  const std::string dir = model_dir("qwen2-tokenizer", "Qwen-Qwen3-0.6B.jinja");
  const std::unique_ptr<Tokenizer> tok = load_tokenizer(dir);
  const std::string line =
      R"({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>Add.</think>\n\n4"}]})";
  LoadOptions options = model_options();
  const Dataset with = load_jsonl_text(line + "\n", "chat.jsonl", options, *tok);
  EXPECT_EQ(trained_runs(with.examples[0], *tok), (std::vector<std::string>{"<think>\nAdd.\n</think>\n\n4<|im_end|>"}));
  options.train_reasoning = false;
  const Dataset without = load_jsonl_text(line + "\n", "chat.jsonl", options, *tok);
  EXPECT_EQ(trained_runs(without.examples[0], *tok), (std::vector<std::string>{"4<|im_end|>"}));
  EXPECT_EQ(without.examples[0].input_ids, with.examples[0].input_ids);
}

TEST(ChatData, ChoicesThatCannotWorkNameTheirKey) {
  if (!std::filesystem::exists(shared("qwen2-tokenizer/tokenizer.json")))
    GTEST_SKIP() << "no ../shared/data (the real templates and tokenizers are not part of the repository)";
  const std::string chat = R"({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]})";
  // No template in the directory: model is refused by name, auto falls back to the built-in.
  const std::string bare = qlora::testing::make_temp_dir("chat-data-bare");
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
    std::filesystem::copy_file(shared(std::string("qwen2-tokenizer/") + f), bare + "/" + f);
  const std::unique_ptr<Tokenizer> plain = load_tokenizer(bare);
  const std::string msg = error_of([&] { load_jsonl_text(chat + "\n", "chat.jsonl", model_options(), *plain); });
  EXPECT_NE(msg.find("data.chat_template: model"), std::string::npos) << msg;
  EXPECT_NE(msg.find(bare), std::string::npos) << msg;
  LoadOptions options = model_options();
  options.chat_template = ChatTemplate::kAuto;
  EXPECT_EQ(load_jsonl_text(chat + "\n", "chat.jsonl", options, *plain).summary.chat_template, ChatTemplate::kChatml);

  // train_on on data that is not chat would be ignored: refused instead.
  options.format = DataFormat::kAuto;
  options.train_on = TrainOn::kLastAssistant;
  const std::string alpaca = error_of(
      [&] { load_jsonl_text(R"({"instruction": "a", "output": "b"})" "\n", "a.jsonl", options, *plain); });
  EXPECT_NE(alpaca.find("data.train_on applies to chat data only"), std::string::npos) << alpaca;
  EXPECT_NE(alpaca.find("a.jsonl"), std::string::npos) << alpaca;

  // A template's own raise_exception is the line's problem: named with file and line, skippable.
  const std::string gemma = model_dir("qwen2-tokenizer", "google-gemma-2-2b-it.jinja");
  const std::unique_ptr<Tokenizer> tok = load_tokenizer(gemma);
  const std::string sys =
      R"({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]})";
  const std::string raised = error_of([&] { load_jsonl_text(chat + "\n" + sys + "\n", "g.jsonl", model_options(), *tok); });
  EXPECT_NE(raised.find("g.jsonl:2:"), std::string::npos) << raised;
  EXPECT_NE(raised.find("System role not supported"), std::string::npos) << raised;
  EXPECT_NE(raised.find("set data.fold_system_prompt: true"), std::string::npos) << raised;
  LoadOptions skip = model_options();
  skip.skip_bad_lines = true;
  const Dataset kept = load_jsonl_text(chat + "\n" + sys + "\n", "g.jsonl", skip, *tok);
  EXPECT_EQ(kept.summary.examples, 1);
  EXPECT_EQ(kept.summary.skipped_total(), 1);
}

// data.fold_system_prompt: Gemma's template refuses a system message; folded into the first
// user turn, the line trains as the same conversation written that way would.
TEST(ChatData, GemmaFoldsTheSystemPromptWhenAsked) {
  if (!std::filesystem::exists(shared("qwen2-tokenizer/tokenizer.json")))
    GTEST_SKIP() << "no ../shared/data (the real templates and tokenizers are not part of the repository)";
  const std::string gemma = model_dir("qwen2-tokenizer", "google-gemma-2-2b-it.jinja");
  const std::unique_ptr<Tokenizer> tok = load_tokenizer(gemma);
  const std::string sys =
      R"({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]})";
  const std::string by_hand =
      R"({"messages": [{"role": "user", "content": "Be brief.\n\nHi"}, {"role": "assistant", "content": "Yo"}]})";
  LoadOptions fold = model_options();
  fold.fold_system_prompt = true;
  const Dataset folded = load_jsonl_text(sys + "\n", "g.jsonl", fold, *tok);
  const Dataset written = load_jsonl_text(by_hand + "\n", "h.jsonl", model_options(), *tok);
  ASSERT_EQ(folded.examples.size(), 1u);
  ASSERT_EQ(written.examples.size(), 1u);
  EXPECT_EQ(folded.examples[0].input_ids, written.examples[0].input_ids);
  EXPECT_EQ(folded.examples[0].labels, written.examples[0].labels);
  // A system message alone becomes the user turn; conversations without one are unchanged.
  const ojson alone = data::fold_system_prompt(ojson::parse(R"([{"role": "system", "content": "S"}])"));
  EXPECT_EQ(alone, ojson::parse(R"([{"role": "user", "content": "S"}])"));
  const ojson plain = ojson::parse(R"([{"role": "user", "content": "U"}])");
  EXPECT_EQ(data::fold_system_prompt(plain), plain);
  // Content as a list of parts: the system's text parts lead the user's first text part.
  const ojson parts = data::fold_system_prompt(ojson::parse(
      R"([{"role": "system", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]},
          {"role": "user", "content": [{"type": "text", "text": "U"}, {"type": "image"}]}])"));
  EXPECT_EQ(parts, ojson::parse(R"([{"role": "user", "content": [{"type": "text", "text": "A\n\nB\n\nU"}, {"type": "image"}]}])"));
  const ojson image_first = data::fold_system_prompt(ojson::parse(
      R"([{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "image"}]}])"));
  EXPECT_EQ(image_first, ojson::parse(R"([{"role": "user", "content": [{"type": "text", "text": "S\n\n"}, {"type": "image"}]}])"));
}

TEST(ChatData, EndOfTurnOfEachSharedTemplate) {
  const std::string dir = shared("chat-templates");
  if (!std::filesystem::exists(dir + "/expected.json"))
    GTEST_SKIP() << "no ../shared/data (the real templates are not part of the repository)";
  const ojson oracle = ojson::parse(slurp(dir + "/expected.json"));
  // What each template writes after a reply, as the models' generation_config.json stop on.
  const std::map<std::string, std::string> expected = {
      {"meta-llama-Llama-3.1-8B-Instruct.jinja", "<|eot_id|>"},
      {"meta-llama-Llama-3.2-3B-Instruct.jinja", "<|eot_id|>"},
      {"Qwen-Qwen2.5-7B-Instruct.jinja", "<|im_end|>"},
      {"Qwen-Qwen3-0.6B.jinja", "<|im_end|>"},
      {"Mistral-Small-3.2-24B-Instruct-2506.jinja", "</s>"},
      {"mistralai-Mistral-Nemo-Instruct-2407.jinja", "</s>"},
      {"google-gemma-2-2b-it.jinja", "<end_of_turn>"},
      {"microsoft-Phi-3.5-mini-instruct.jinja", "<|end|>"},
      {"deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja", "<\xEF\xBD\x9C" "end\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>"},
  };
  for (const auto& [name, info] : oracle.at("templates").items()) {
    const auto chat = make_model_chat(slurp(dir + "/" + name), name, info.at("variants").at(0));
    EXPECT_EQ(chat->end_of_turn, expected.at(name)) << name;
  }
  EXPECT_EQ(make_model_chat(builtin_chat_template(ChatTemplate::kChatml), "chatml", ojson::object())->end_of_turn,
            "<|im_end|>");
  EXPECT_EQ(make_model_chat(builtin_chat_template(ChatTemplate::kLlama3), "llama3", ojson::object())->end_of_turn,
            "<|eot_id|>");
}

}  // namespace
}  // namespace qlora::data

namespace qlora::data {
namespace {

// The template written beside adapters trained on alpaca data prompts as training did.
TEST(ChatData, AlpacaTemplateGivesTheTrainingPrompt) {
  const auto chat = make_model_chat(alpaca_chat_template(), "alpaca",
                                    {{"bos_token", "<s>"}, {"eos_token", "</s>"}});
  const ojson user = ojson::array({{{"role", "user"}, {"content", "Add 2 and 3."}}});
  EXPECT_EQ(chat->tmpl.render(user, true, chat->variables), "<s>" + alpaca_prompt("Add 2 and 3.", ""));
  ojson both = user;
  both.push_back({{"role", "assistant"}, {"content", "5"}});
  EXPECT_EQ(chat->tmpl.render(both, false, chat->variables), "<s>" + alpaca_prompt("Add 2 and 3.", "") + "5</s>");
  EXPECT_EQ(chat->end_of_turn, "</s>");
}

}  // namespace
}  // namespace qlora::data
