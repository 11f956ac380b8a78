// The shipped demo data set (data/demo, made by scripts/make_demo_data.py):
// it loads through the data pipeline in both forms, no held-out prompt occurs
// in train, the two forms hold the same items, every answer is right, and the
// tokenizer `qlora demo` learns from it (data/demo_tokenizer.h) reads it back.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "qlora/data/dataset.h"
#include "qlora/data/demo_tokenizer.h"
#include "qlora/data/tokenizer.h"
#include "support/test_support.h"
#include "test_data_tokenizer.h"

namespace qlora::data {
namespace {

using nlohmann::json;

constexpr int64_t kMaxDemoBytes = 1536 * 1024;  // the budget: 1.5 MiB for data/demo

std::string demo(const std::string& name) { return qlora::testing::source_path("data/demo/" + name); }

std::vector<json> read_lines(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in) << path;
  std::vector<json> out;
  std::string line;
  while (std::getline(in, line)) out.push_back(json::parse(line));
  return out;
}

struct Item {
  std::string task, instruction, input, output;
};

std::vector<Item> alpaca_items(const std::string& path) {
  std::vector<Item> out;
  for (const json& j : read_lines(path)) {
    out.push_back({j.at("task"), j.at("instruction"), j.at("input"), j.at("output")});
  }
  return out;
}

// Recomputes the answer from the prompt; "" when the task is unknown.
std::string answer(const Item& it) {
  if (it.task == "parity") {
    long long n = -1;
    EXPECT_EQ(std::sscanf(it.instruction.c_str(), "Is %lld even or odd?", &n), 1) << it.instruction;
    return n % 2 == 0 ? "even" : "odd";
  }
  return "";
}

TEST(DataDemo, SizesAndCounts) {
  int64_t bytes = 0;
  for (const auto& entry : std::filesystem::directory_iterator(qlora::testing::source_path("data/demo"))) {
    bytes += static_cast<int64_t>(entry.file_size());
  }
  EXPECT_LT(bytes, kMaxDemoBytes);
  EXPECT_EQ(alpaca_items(demo("train.alpaca.jsonl")).size(), 3000u);
  EXPECT_EQ(alpaca_items(demo("eval.alpaca.jsonl")).size(), 300u);
}

TEST(DataDemo, HeldOutPromptsNeverAppearInTrain) {
  std::set<std::pair<std::string, std::string>> train;
  for (const Item& it : alpaca_items(demo("train.alpaca.jsonl"))) train.insert({it.instruction, it.input});
  for (const Item& it : alpaca_items(demo("eval.alpaca.jsonl"))) {
    EXPECT_EQ(train.count({it.instruction, it.input}), 0u) << it.instruction << " | " << it.input;
  }
  std::set<std::string> train_chat;
  for (const json& j : read_lines(demo("train.chat.jsonl"))) train_chat.insert(j["messages"][0]["content"]);
  for (const json& j : read_lines(demo("eval.chat.jsonl"))) {
    EXPECT_EQ(train_chat.count(j["messages"][0]["content"]), 0u) << j.dump();
  }
}

TEST(DataDemo, ChatAndAlpacaHoldTheSameItemsAndEveryAnswerIsRight) {
  for (const std::string split : {"train", "eval"}) {
    const std::vector<Item> items = alpaca_items(demo(split + ".alpaca.jsonl"));
    const std::vector<json> chats = read_lines(demo(split + ".chat.jsonl"));
    ASSERT_EQ(items.size(), chats.size());
    std::map<std::string, int> per_task, per_answer;
    for (size_t i = 0; i < items.size(); ++i) {
      const Item& it = items[i];
      EXPECT_EQ(it.output, answer(it)) << split << " line " << i + 1 << ": " << it.instruction;
      const std::string user = it.instruction + (it.input.empty() ? "" : "\n\n" + it.input);
      EXPECT_EQ(chats[i]["messages"][0]["content"], user);
      EXPECT_EQ(chats[i]["messages"][1]["content"], it.output);
      ++per_task[it.task];
      ++per_answer[it.output];
    }
    EXPECT_EQ(per_task.size(), 1u);
    // Even and odd drawn in turn, then shuffled: about half each in either split.
    EXPECT_NEAR(per_answer["even"], static_cast<double>(items.size()) / 2, static_cast<double>(items.size()) / 10);
  }
}

TEST(DataDemo, LoadsThroughThePipelineInBothForms) {
  const auto t = testing::ByteTokenizer::llama3();
  LoadOptions o;
  o.max_seq_length = 512;
  const Dataset alpaca = load_jsonl(demo("eval.alpaca.jsonl"), o, t);
  EXPECT_EQ(alpaca.summary.format, DataFormat::kAlpaca);
  EXPECT_EQ(alpaca.examples.size(), 300u);
  EXPECT_EQ(alpaca.summary.truncated, 0);
  const Dataset chat = load_jsonl(demo("eval.chat.jsonl"), o, t);
  EXPECT_EQ(chat.summary.format, DataFormat::kChat);
  EXPECT_EQ(chat.summary.chat_template, ChatTemplate::kLlama3);
  EXPECT_EQ(chat.examples.size(), 300u);
  // Trained tokens are the answer plus eos (alpaca) or <|eot_id|> (chat): the same count.
  EXPECT_EQ(alpaca.summary.trained_tokens, chat.summary.trained_tokens);
}

// The tokenizer `qlora demo` builds: merges learned from the training texts,
// then Llama 3's specials. Every held-out text encodes and decodes back
// exactly, digits stay one token each, each answer is one token, and the
// merges make the texts several times shorter than their bytes.
TEST(DataDemo, LearnedDemoTokenizerReadsTheHeldOutSet) {
  const auto merges = learn_merges(rendered_texts(demo("train.alpaca.jsonl")), 512);
  ASSERT_FALSE(merges.empty());
  const std::string dir = qlora::testing::make_temp_dir("demo_tokenizer");
  const int64_t vocab = write_demo_tokenizer(dir, merges);
  EXPECT_EQ(vocab, 256 + static_cast<int64_t>(merges.size() + demo_special_tokens().size()));
  const std::unique_ptr<Tokenizer> t = load_tokenizer(dir);
  EXPECT_EQ(t->vocab_size(), vocab);
  EXPECT_EQ(t->bos_id(), *t->token_id("<|begin_of_text|>"));
  EXPECT_EQ(t->eos_id(), *t->token_id("<|end_of_text|>"));
  EXPECT_EQ(t->bos_id(), vocab - static_cast<int64_t>(demo_special_tokens().size()));
  size_t bytes = 0, tokens = 0;
  for (const std::string& text : rendered_texts(demo("eval.alpaca.jsonl"))) {
    const std::vector<int32_t> ids = t->encode(text);
    EXPECT_EQ(t->decode(ids), text);
    for (int32_t id : ids) {
      const std::string piece = t->decode({id});
      if (piece.find_first_of("0123456789") != std::string::npos) {
        EXPECT_EQ(piece.size(), 1u) << text;
      }
    }
    bytes += text.size();
    tokens += ids.size();
  }
  EXPECT_LT(tokens * 3, bytes);
  for (const std::string answer : {"even", "odd"}) EXPECT_EQ(t->encode(answer).size(), 1u) << answer;
}

// With the tokenizers of tests/data/tokenizer (a byte-level BPE with Llama 3's
// pre-tokenizer and specials, and a sentencepiece model), every demo example is
// tokenized as one whole string (no token straddles the prompt/response
// boundary) and the trained tokens decode to exactly the answer.
void check_real_tokenizer(const std::string& dir, const std::string& file) {
  const std::unique_ptr<Tokenizer> t =
      load_tokenizer(dir.front() == '/' ? dir : qlora::testing::source_path(dir));
  LoadOptions o;
  o.max_seq_length = 512;
  const Dataset d = load_jsonl(demo(file), o, *t);
  EXPECT_EQ(d.summary.segment_wise, 0) << dir << " " << file << ": " << d.summary.describe();
  const std::vector<json> lines = read_lines(demo(file));
  ASSERT_EQ(d.examples.size(), lines.size());
  const bool chat = d.summary.format == DataFormat::kChat;
  for (size_t i = 0; i < d.examples.size(); ++i) {
    const TokenizedExample& ex = d.examples[i];
    std::vector<int32_t> trained;
    for (int32_t l : ex.labels) {
      if (l != kIgnoreIndex) trained.push_back(l);
    }
    ASSERT_FALSE(trained.empty());
    const int32_t end = chat ? *t->token_id("<|eot_id|>") : t->eos_id();
    EXPECT_EQ(trained.back(), end);
    trained.pop_back();
    const std::string answer = chat ? lines[i]["messages"][1]["content"] : lines[i]["output"];
    EXPECT_EQ(t->decode(trained), answer) << dir << " " << file << " line " << i + 1;
    if (t->add_bos()) {
      EXPECT_EQ(ex.input_ids.front(), t->bos_id());
    }
    EXPECT_NE(ex.input_ids[1], t->bos_id());  // never twice
  }
}

TEST(DataDemo, RealTokenizersKeepTheWholeStringAndTheAnswerExact) {
  check_real_tokenizer("tests/data/tokenizer/bpe", "eval.alpaca.jsonl");
  check_real_tokenizer("tests/data/tokenizer/bpe", "eval.chat.jsonl");
  check_real_tokenizer("tests/data/tokenizer/spm", "eval.alpaca.jsonl");
}

// The real Llama 3 (tiktoken) and Llama 2 (sentencepiece) tokenizers live
// outside the repository (../shared/data, see its README): opt-in.
TEST(DataDemo, RealLlamaTokenizersWhenPresent) {
  const std::string shared = qlora::testing::source_path("../shared/data");
  const std::string llama3 = shared + "/llama3-tokenizer/tokenizer.model";
  const std::string llama2 = shared + "/llama2-tokenizer/tokenizer.model";
  if (!std::filesystem::exists(llama3) || !std::filesystem::exists(llama2)) {
    GTEST_SKIP() << "no " << shared << " (real Llama tokenizers are not part of the repository)";
  }
  check_real_tokenizer(llama3, "eval.alpaca.jsonl");
  check_real_tokenizer(llama3, "eval.chat.jsonl");
  check_real_tokenizer(llama2, "eval.alpaca.jsonl");
}

}  // namespace
}  // namespace qlora::data
