// Formats, masking, bos/eos, truncation and bad input of the data module, on
// tiny examples whose ids are written out by hand with a byte tokenizer
// (tests/test_data_tokenizer.h: id = byte value, specials from 256).
#include <gtest/gtest.h>

#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "qlora/data/dataset.h"
#include "qlora/data/format.h"
#include "support/test_support.h"
#include "test_data_tokenizer.h"

namespace qlora::data {
namespace {

using testing::bytes;
using testing::ByteTokenizer;
using testing::cat;
using testing::ignored;

constexpr int32_t I = kIgnoreIndex;

TokenizedExample tok(std::string_view line, const Tokenizer& t, bool train_on_inputs = false,
                     DataFormat format = DataFormat::kAuto) {
  ChatTemplate tmpl = ChatTemplate::kAuto;
  if (detect_format(line) == DataFormat::kChat) tmpl = resolve_chat_template(tmpl, t);
  return tokenize_example(render_line(line, format, tmpl), t, train_on_inputs);
}

LoadOptions opts(int64_t max_len = 2048, bool skip = false) {
  LoadOptions o;
  o.max_seq_length = max_len;
  o.skip_bad_lines = skip;
  return o;
}

using qlora::testing::error_of;

// ---------------------------------------------------------------- detection

TEST(DataFormat, DetectsEachFormatFromKeys) {
  EXPECT_EQ(detect_format(R"({"text":"a"})"), DataFormat::kText);
  EXPECT_EQ(detect_format(R"({"prompt":"a","completion":"b"})"), DataFormat::kCompletion);
  EXPECT_EQ(detect_format(R"({"instruction":"a","output":"b"})"), DataFormat::kAlpaca);
  EXPECT_EQ(detect_format(R"({"instruction":"a","input":"","output":"b","id":7})"),
            DataFormat::kAlpaca);
  EXPECT_EQ(detect_format(R"({"messages":[]})"), DataFormat::kChat);
  try {
    detect_format(R"({"question":"a","answer":"b"})");
    FAIL() << "no throw";
  } catch (const LineError& e) {
    EXPECT_EQ(e.problem(), LineProblem::kUnknownFormat);
    EXPECT_NE(std::string(e.what()).find("\"question\""), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("data.format"), std::string::npos) << e.what();
  }
}

// ---------------------------------------------------------------- exact ids

TEST(DataFormat, TextGetsBosAndEosAndIsAllTrained) {
  const auto t = ByteTokenizer::plain();  // <s>=256 added, </s>=257
  const TokenizedExample ex = tok(R"({"text":"Hi"})", t);
  EXPECT_EQ(ex.input_ids, (std::vector<int32_t>{256, 72, 105, 257}));
  EXPECT_EQ(ex.labels, (std::vector<int32_t>{I, 72, 105, 257}));
}

TEST(DataFormat, CompletionMasksThePromptUnlessTrainOnInputs) {
  const auto t = ByteTokenizer::llama3();  // bos 256 added, eos 257
  const std::string line = R"({"prompt":"2+2=","completion":"4"})";
  const TokenizedExample masked = tok(line, t);
  EXPECT_EQ(masked.input_ids, (std::vector<int32_t>{256, 50, 43, 50, 61, 52, 257}));
  EXPECT_EQ(masked.labels, (std::vector<int32_t>{I, I, I, I, I, 52, 257}));
  const TokenizedExample all = tok(line, t, /*train_on_inputs=*/true);
  EXPECT_EQ(all.input_ids, masked.input_ids);
  EXPECT_EQ(all.labels, (std::vector<int32_t>{I, 50, 43, 50, 61, 52, 257}));
}

TEST(DataFormat, NoBosWhenTheTokenizerDoesNotAddOne) {
  const auto t = ByteTokenizer::chatml();  // no bos; eos <|im_end|>=257
  const TokenizedExample ex = tok(R"({"prompt":"a","completion":"b"})", t);
  EXPECT_EQ(ex.input_ids, (std::vector<int32_t>{97, 98, 257}));
  EXPECT_EQ(ex.labels, (std::vector<int32_t>{I, 98, 257}));
}

// The Stanford Alpaca wording, written out here independently of the code.
const char* kAlpacaNoInput =
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n";
const char* kAlpacaWithInput =
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "Reverse the string.\n\n### Input:\nabc\n\n### Response:\n";

TEST(DataFormat, AlpacaPromptWording) {
  EXPECT_EQ(alpaca_prompt("Add 2 and 3.", ""), kAlpacaNoInput);
  EXPECT_EQ(alpaca_prompt("Reverse the string.", "abc"), kAlpacaWithInput);
}

TEST(DataFormat, AlpacaWithoutAndWithInput) {
  const auto t = ByteTokenizer::llama3();
  for (const char* line : {R"({"instruction":"Add 2 and 3.","output":"5"})",
                           R"({"instruction":"Add 2 and 3.","input":"","output":"5"})",
                           R"({"instruction":"Add 2 and 3.","input":null,"output":"5"})"}) {
    const TokenizedExample ex = tok(line, t);
    const auto prompt = bytes(kAlpacaNoInput);
    EXPECT_EQ(ex.input_ids, cat({{256}, prompt, {53, 257}})) << line;
    EXPECT_EQ(ex.labels, cat({ignored(1 + prompt.size()), {53, 257}})) << line;
  }
  const TokenizedExample ex =
      tok(R"({"instruction":"Reverse the string.","input":"abc","output":"cba"})", t);
  const auto prompt = bytes(kAlpacaWithInput);
  EXPECT_EQ(ex.input_ids, cat({{256}, prompt, {99, 98, 97, 257}}));
  EXPECT_EQ(ex.labels, cat({ignored(1 + prompt.size()), {99, 98, 97, 257}}));
}

TEST(DataFormat, ChatLlama3ExactIdsAndNoDoubleBos) {
  const auto t = ByteTokenizer::llama3();
  const TokenizedExample ex = tok(
      R"({"messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":"Yo"}]})", t);
  // <|begin_of_text|> <|start_header_id|> user <|end_header_id|> \n \n H i <|eot_id|>
  // <|start_header_id|> assistant <|end_header_id|> \n \n Y o <|eot_id|>
  const std::vector<int32_t> ids = {256, 258, 117, 115, 101, 114, 259, 10, 10, 72, 105, 260,
                                    258, 97, 115, 115, 105, 115, 116, 97, 110, 116, 259, 10, 10,
                                    89, 111, 260};
  EXPECT_EQ(ex.input_ids, ids);
  std::vector<int32_t> labels(ids.size(), I);
  labels[25] = 89;
  labels[26] = 111;
  labels[27] = 260;  // the end-of-turn token is trained with the content
  EXPECT_EQ(ex.labels, labels);
}

TEST(DataFormat, ChatLlama3SystemAndTwoAssistantTurns) {
  const auto t = ByteTokenizer::llama3();
  const TokenizedExample ex = tok(
      R"({"messages":[{"role":"system","content":"S"},{"role":"user","content":"a"},)"
      R"({"role":"assistant","content":"b"},{"role":"user","content":"c"},)"
      R"({"role":"assistant","content":"d"}]})",
      t);
  auto header = [](const char* role) { return cat({{258}, bytes(role), {259, 10, 10}}); };
  const auto expected_ids =
      cat({{256}, header("system"), {83, 260}, header("user"), {97, 260}, header("assistant"),
           {98, 260}, header("user"), {99, 260}, header("assistant"), {100, 260}});
  EXPECT_EQ(ex.input_ids, expected_ids);
  std::vector<int32_t> trained;
  for (size_t i = 0; i < ex.labels.size(); ++i) {
    if (ex.labels[i] != I) trained.push_back(ex.labels[i]);
  }
  EXPECT_EQ(trained, (std::vector<int32_t>{98, 260, 100, 260}));
  const TokenizedExample all = tok(
      R"({"messages":[{"role":"system","content":"S"},{"role":"user","content":"a"},)"
      R"({"role":"assistant","content":"b"},{"role":"user","content":"c"},)"
      R"({"role":"assistant","content":"d"}]})",
      t, /*train_on_inputs=*/true);
  EXPECT_EQ(all.labels, cat({{I}, std::vector<int32_t>(expected_ids.begin() + 1, expected_ids.end())}));
}

TEST(DataFormat, ChatChatmlExactIds) {
  const auto t = ByteTokenizer::chatml();  // <|im_start|>=256 <|im_end|>=257, no bos
  const TokenizedExample ex = tok(
      R"({"messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":"Yo"}]})", t);
  // <|im_start|> user \n H i <|im_end|> \n <|im_start|> assistant \n Y o <|im_end|> \n
  const std::vector<int32_t> ids = {256, 117, 115, 101, 114, 10, 72, 105, 257, 10,
                                    256, 97, 115, 115, 105, 115, 116, 97, 110, 116, 10,
                                    89, 111, 257, 10};
  EXPECT_EQ(ex.input_ids, ids);
  std::vector<int32_t> labels(ids.size(), I);
  labels[21] = 89;
  labels[22] = 111;
  labels[23] = 257;  // <|im_end|> trained, the newline after it not
  EXPECT_EQ(ex.labels, labels);
}

TEST(DataFormat, ChatTemplateResolution) {
  EXPECT_EQ(resolve_chat_template(ChatTemplate::kAuto, ByteTokenizer::llama3()),
            ChatTemplate::kLlama3);
  EXPECT_EQ(resolve_chat_template(ChatTemplate::kAuto, ByteTokenizer::chatml()),
            ChatTemplate::kChatml);
  EXPECT_NE(error_of([] { resolve_chat_template(ChatTemplate::kAuto, ByteTokenizer::plain()); })
                .find("set data.chat_template"),
            std::string::npos);
  EXPECT_NE(error_of([] { resolve_chat_template(ChatTemplate::kLlama3, ByteTokenizer::chatml()); })
                .find("<|begin_of_text|>"),
            std::string::npos);
  // Chat data with a tokenizer that has neither template fails at load, naming the key.
  const std::string msg = error_of([] {
    load_jsonl_text(R"({"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]})",
                    "c.jsonl", opts(), ByteTokenizer::plain());
  });
  EXPECT_NE(msg.find("data.chat_template"), std::string::npos) << msg;
}

// ---------------------------------------------------------------- whole string vs segments

TEST(DataFormat, WholeStringTokenizationWhenEveryBoundaryIsATokenBoundary) {
  // Like sentencepiece: an encoded text starts with a dummy-prefix token (501).
  const ByteTokenizer t({{"<s>", "</s>"}, "", "</s>", "", false, "", /*dummy_prefix=*/true});
  const TokenizedExample ex = tok(R"({"prompt":"Q:\n","completion":"5"})", t);
  // Whole string: one dummy prefix. Segment-wise would give 501 81 58 10 501 53.
  EXPECT_EQ(ex.input_ids, (std::vector<int32_t>{501, 81, 58, 10, 53, 257}));
  EXPECT_EQ(ex.labels, (std::vector<int32_t>{I, I, I, I, 53, 257}));
  EXPECT_FALSE(ex.segment_wise);
}

TEST(DataFormat, SegmentWiseWhenATokenStraddlesTheBoundary) {
  // "ab" is one token (500): prompt "xa" + completion "b" cannot be split exactly.
  const ByteTokenizer t({{"<s>", "</s>"}, "", "</s>", "", false, "ab", false});
  const TokenizedExample ex = tok(R"({"prompt":"xa","completion":"b"})", t);
  EXPECT_EQ(ex.input_ids, (std::vector<int32_t>{120, 97, 98, 257}));
  EXPECT_EQ(ex.labels, (std::vector<int32_t>{I, I, 98, 257}));
  EXPECT_TRUE(ex.segment_wise);
  // With train_on_inputs there is no boundary to keep: the whole string.
  const TokenizedExample all = tok(R"({"prompt":"xa","completion":"b"})", t, true);
  EXPECT_EQ(all.input_ids, (std::vector<int32_t>{120, 500, 257}));
  EXPECT_EQ(all.labels, (std::vector<int32_t>{I, 500, 257}));
  const Dataset d = load_jsonl_text(R"({"prompt":"xa","completion":"b"})" "\n"
                                    R"({"prompt":"x\n","completion":"ab"})" "\n",
                                    "m.jsonl", opts(), t);
  EXPECT_EQ(d.summary.segment_wise, 1);
  EXPECT_FALSE(d.examples[1].segment_wise);
  EXPECT_EQ(d.examples[1].input_ids, (std::vector<int32_t>{120, 10, 500, 257}));
  EXPECT_NE(d.summary.describe().find("1 tokenized segment by segment"), std::string::npos);
}

// ---------------------------------------------------------------- lines, truncation

TEST(DataDataset, BomCrlfAndBlankLinesAreHandledAndCounted) {
  const auto t = ByteTokenizer::plain();
  const std::string clean = "{\"text\":\"ab\"}\n{\"text\":\"cd\"}\n";
  const std::string messy = "\xEF\xBB\xBF{\"text\":\"ab\"}\r\n\r\n   \n{\"text\":\"cd\"}\r\n";
  const Dataset a = load_jsonl_text(clean, "clean.jsonl", opts(), t);
  const Dataset b = load_jsonl_text(messy, "messy.jsonl", opts(), t);
  ASSERT_EQ(b.examples.size(), 2u);
  for (size_t i = 0; i < 2; ++i) EXPECT_EQ(a.examples[i].input_ids, b.examples[i].input_ids);
  EXPECT_EQ(b.summary.blank_lines, 2);
  EXPECT_EQ(b.examples[1].line, 4);
  EXPECT_EQ(b.summary.format, DataFormat::kText);
  EXPECT_NE(b.summary.describe().find("2 blank lines ignored"), std::string::npos)
      << b.summary.describe();
}

TEST(DataDataset, TruncationIsCountedAndKeepsTheFront) {
  const auto t = ByteTokenizer::llama3();
  const std::string text = R"({"prompt":"ab","completion":"cdefgh"})" "\n"
                           R"({"prompt":"a","completion":"b"})" "\n";
  const Dataset d = load_jsonl_text(text, "t.jsonl", opts(/*max_len=*/5), t);
  ASSERT_EQ(d.examples.size(), 2u);
  EXPECT_EQ(d.summary.truncated, 1);
  EXPECT_TRUE(d.examples[0].truncated);
  EXPECT_EQ(d.examples[0].input_ids, (std::vector<int32_t>{256, 97, 98, 99, 100}));
  EXPECT_EQ(d.examples[0].labels, (std::vector<int32_t>{I, I, I, 99, 100}));
  EXPECT_FALSE(d.examples[1].truncated);
  EXPECT_EQ(d.summary.longest, 5);
  EXPECT_NE(d.summary.describe().find("1 truncated"), std::string::npos);
}

TEST(DataDataset, ExampleWhoseTrainedTokensAreAllCutIsAnErrorOrDroppedAndCounted) {
  const auto t = ByteTokenizer::llama3();
  const std::string text = R"({"prompt":"a","completion":"b"})" "\n"
                           R"({"prompt":"abcdefgh","completion":"x"})" "\n";
  const std::string msg = error_of([&] { load_jsonl_text(text, "long.jsonl", opts(6), t); });
  EXPECT_NE(msg.find("long.jsonl:2: "), std::string::npos) << msg;
  EXPECT_NE(msg.find("data.max_seq_length"), std::string::npos) << msg;
  const Dataset d = load_jsonl_text(text, "long.jsonl", opts(6, /*skip=*/true), t);
  EXPECT_EQ(d.examples.size(), 1u);
  EXPECT_EQ(d.summary.dropped_too_long, 1);
  EXPECT_EQ(d.summary.skipped[static_cast<size_t>(LineProblem::kTooLong)], 1);
  // With train_on_inputs the prompt is trained, so the same line is only truncated.
  LoadOptions o = opts(6);
  o.train_on_inputs = true;
  const Dataset all = load_jsonl_text(text, "long.jsonl", o, t);
  EXPECT_EQ(all.examples.size(), 2u);
  EXPECT_EQ(all.summary.truncated, 1);
}

TEST(DataDataset, VeryLongLineIsReadAndTruncated) {
  const auto t = ByteTokenizer::plain();
  const std::string big(1 << 20, 'x');  // 1 MiB of text on one line
  const Dataset d = load_jsonl_text("{\"text\":\"" + big + "\"}\n", "big.jsonl", opts(64), t);
  ASSERT_EQ(d.examples.size(), 1u);
  EXPECT_EQ(d.examples[0].size(), 64);
  EXPECT_EQ(d.summary.truncated, 1);
}

// ---------------------------------------------------------------- bad input

struct BadLine {
  const char* name;
  std::string line;
  LineProblem problem;
  const char* says;  // a phrase the message must contain
};

std::vector<BadLine> bad_lines() {
  return {
      {"malformed_json", R"({"instruction":"a","output":"b")", LineProblem::kBadJson, "malformed JSON"},
      {"not_an_object", R"(["a","b"])", LineProblem::kBadJson, "expected a JSON object"},
      {"missing_field", R"({"instruction":"a"})", LineProblem::kMissingField, "missing field \"output\""},
      {"other_format", R"({"text":"a"})", LineProblem::kMissingField, "same format"},
      {"mistyped_field", R"({"instruction":"a","output":5})", LineProblem::kWrongType,
       "\"output\" must be a string, got a JSON number"},
      {"mistyped_input", R"({"instruction":"a","input":["x"],"output":"b"})",
       LineProblem::kWrongType, "\"input\" must be a string"},
      {"empty_output", R"({"instruction":"a","output":""})", LineProblem::kEmpty, "is empty"},
      {"invalid_utf8", "{\"instruction\":\"a\xff\",\"output\":\"b\"}", LineProblem::kBadJson,
       "malformed JSON"},
  };
}

TEST(DataBadInput, EachBadLineNamesFileAndLine) {
  const auto t = ByteTokenizer::llama3();
  const std::string good = R"({"instruction":"a","output":"b"})";
  for (const BadLine& bad : bad_lines()) {
    const std::string text = good + "\n\n" + bad.line + "\n" + good + "\n";
    const std::string msg = error_of([&] { load_jsonl_text(text, "train.jsonl", opts(), t); });
    EXPECT_EQ(msg.rfind("train.jsonl:3: ", 0), 0u) << bad.name << ": " << msg;
    EXPECT_NE(msg.find(bad.says), std::string::npos) << bad.name << ": " << msg;
    EXPECT_NE(msg.find("data.skip_bad_lines"), std::string::npos) << bad.name << ": " << msg;
  }
}

TEST(DataBadInput, ChatProblems) {
  const auto t = ByteTokenizer::llama3();
  const std::string good = R"({"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]})";
  const std::vector<BadLine> cases = {
      {"bad_role", R"({"messages":[{"role":"bot","content":"a"}]})", LineProblem::kBadRole,
       "messages[0].role is \"bot\""},
      {"no_messages_array", R"({"messages":"hi"})", LineProblem::kWrongType, "must be an array"},
      {"empty_messages", R"({"messages":[]})", LineProblem::kEmpty, "\"messages\" is empty"},
      {"no_assistant", R"({"messages":[{"role":"user","content":"a"}]})", LineProblem::kEmpty,
       "no assistant message"},
      {"missing_content", R"({"messages":[{"role":"user"}]})", LineProblem::kMissingField,
       "messages[0] has no \"content\""},
      {"mistyped_content", R"({"messages":[{"role":"user","content":1}]})",
       LineProblem::kWrongType, "messages[0].content must be a string"},
  };
  for (const BadLine& bad : cases) {
    const std::string text = good + "\n" + bad.line + "\n";
    const std::string msg = error_of([&] { load_jsonl_text(text, "chat.jsonl", opts(), t); });
    EXPECT_EQ(msg.rfind("chat.jsonl:2: ", 0), 0u) << bad.name << ": " << msg;
    EXPECT_NE(msg.find(bad.says), std::string::npos) << bad.name << ": " << msg;
  }
}

TEST(DataBadInput, SkipBadLinesCountsEachReason) {
  const auto t = ByteTokenizer::llama3();
  const std::string good = R"({"instruction":"a","output":"b"})";
  std::string text = "not json at all\n" + good + "\n";  // a bad first line decides no format
  for (const BadLine& bad : bad_lines()) text += bad.line + "\n";
  text += good + "\n";
  const Dataset d = load_jsonl_text(text, "train.jsonl", opts(2048, /*skip=*/true), t);
  EXPECT_EQ(d.examples.size(), 2u);
  EXPECT_EQ(d.summary.format, DataFormat::kAlpaca);
  auto count = [&](LineProblem p) { return d.summary.skipped[static_cast<size_t>(p)]; };
  EXPECT_EQ(count(LineProblem::kBadJson), 4);
  EXPECT_EQ(count(LineProblem::kMissingField), 2);
  EXPECT_EQ(count(LineProblem::kWrongType), 2);
  EXPECT_EQ(count(LineProblem::kEmpty), 1);
  EXPECT_EQ(d.summary.skipped_total(), 9);
  EXPECT_NE(d.summary.describe().find("skipped 9 bad lines"), std::string::npos)
      << d.summary.describe();
}

// Seeded random corruptions of valid lines (byte flips, cuts, inserted
// quotes/braces): the loader either accepts a line or throws InputError naming
// file:line, never anything else.
TEST(DataBadInput, CorruptedLinesNeverCrash) {
  const auto t = ByteTokenizer::llama3();
  const std::vector<std::string> seeds = {
      R"({"instruction":"Add 2 and 3.","input":"","output":"5"})",
      R"({"messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":"Yo"}]})",
      R"({"prompt":"a","completion":"b"})", R"({"text":"plain text"})"};
  const std::string noise("{}[]\",:\\\x00\xff\xc3 atrue0-", 19);  // includes a NUL byte
  std::mt19937_64 rng(2026);
  int accepted = 0, rejected = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    std::string line = seeds[rng() % seeds.size()];
    const int edits = 1 + static_cast<int>(rng() % 3);
    for (int e = 0; e < edits && !line.empty(); ++e) {
      const size_t at = rng() % line.size();
      switch (rng() % 3) {
        case 0: line[at] = noise[rng() % noise.size()]; break;
        case 1: line.resize(at); break;
        default: line.insert(at, 1, noise[rng() % noise.size()]); break;
      }
    }
    try {
      load_jsonl_text(line + "\n", "fuzz.jsonl", opts(), t);
      ++accepted;
    } catch (const InputError& e) {
      EXPECT_EQ(std::string(e.what()).rfind("fuzz.jsonl:", 0), 0u) << e.what();
      ++rejected;
    }
  }
  EXPECT_GT(rejected, 1000);  // most corruptions break the line
  EXPECT_GT(accepted, 10);    // some only change the content
}

TEST(DataBadInput, NoUsableExampleIsAnError) {
  const auto t = ByteTokenizer::plain();
  EXPECT_NE(error_of([&] { load_jsonl_text("\n  \n", "empty.jsonl", opts(), t); })
                .find("empty.jsonl: no usable example"),
            std::string::npos);
  EXPECT_NE(error_of([&] { load_jsonl_text("", "none.jsonl", opts(), t); }).find("no usable example"),
            std::string::npos);
  const std::string msg =
      error_of([&] { load_jsonl_text("{\"text\":\"\"}\nnope\n", "bad.jsonl", opts(2048, true), t); });
  EXPECT_NE(msg.find("2 skipped as bad"), std::string::npos) << msg;
}

TEST(DataBadInput, FirstLineWithUnknownKeysSaysSoWithItsLine) {
  const auto t = ByteTokenizer::plain();
  const std::string msg =
      error_of([&] { load_jsonl_text("\n{\"q\":\"a\"}\n", "x.jsonl", opts(), t); });
  EXPECT_EQ(msg.rfind("x.jsonl:2: cannot tell the data format", 0), 0u) << msg;
}

TEST(DataBadInput, MissingFileOrDirectoryNamesThePath) {
  const auto t = ByteTokenizer::plain();
  std::string msg = error_of([&] { load_jsonl("/nonexistent/d.jsonl", opts(), t); });
  EXPECT_NE(msg.find("/nonexistent/d.jsonl: does not exist"), std::string::npos) << msg;
  const std::string dir = qlora::testing::make_temp_dir("data_dir");
  const std::string inside = qlora::testing::write_file(dir, "train.jsonl", R"({"text":"a"})" "\n");
  msg = error_of([&] { load_jsonl(dir, opts(), t); });
  EXPECT_NE(msg.find(dir + ": is a directory, not a file (it holds " + inside + ")"), std::string::npos) << msg;
}

// data.format set to one format on lines of another: the message names the format to use;
// a file that mixes formats (data.format: auto) says every line must use one.
TEST(DataBadInput, LinesOfAnotherFormatNameTheFormatToUse) {
  const auto t = ByteTokenizer::plain();
  LoadOptions alpaca = opts();
  alpaca.format = DataFormat::kAlpaca;
  const std::string chat = R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})";
  std::string msg = error_of([&] { load_jsonl_text(chat + "\n", "c.jsonl", alpaca, t); });
  EXPECT_NE(msg.find("c.jsonl:1: missing field \"instruction\" for format alpaca (keys present: \"messages\"): "
                     "this file looks like chat messages: use data.format: chat"),
            std::string::npos)
      << msg;
  LoadOptions completion = opts();
  completion.format = DataFormat::kCompletion;
  const std::string pair = R"({"prompt": "a", "completion": "b"})";
  msg = error_of([&] { load_jsonl_text(pair + "\n" + R"({"text": "c"})" + "\n", "p.jsonl", completion, t); });
  EXPECT_NE(msg.find("p.jsonl:2: missing field \"prompt\" for format completion (keys present: \"text\"): this "
                     "line looks like plain text: use data.format: text"),
            std::string::npos)
      << msg;
  msg = error_of([&] { load_jsonl_text(pair + "\n" + R"({"text": "c"})" + "\n", "m.jsonl", opts(), t); });
  EXPECT_NE(msg.find("m.jsonl:2: missing field \"prompt\" for format completion (keys present: \"text\"); every "
                     "line of a file must use the same format"),
            std::string::npos)
      << msg;
}

// ---------------------------------------------------------------- eval split

TEST(DataDataset, EvalSplitBySeededRatio) {
  const auto t = ByteTokenizer::plain();
  std::string text;
  for (int i = 0; i < 100; ++i) text += "{\"text\":\"" + std::to_string(i) + "\"}\n";
  auto split = [&](uint64_t seed) {
    return split_eval(load_jsonl_text(text, "d.jsonl", opts(), t), 0.1, seed);
  };
  const TrainEval a = split(7);
  const TrainEval b = split(7);
  const TrainEval c = split(8);
  ASSERT_EQ(a.eval.examples.size(), 10u);
  ASSERT_EQ(a.train.examples.size(), 90u);
  std::vector<int64_t> lines_a, lines_b, lines_c, all;
  for (const auto& e : a.eval.examples) lines_a.push_back(e.line);
  for (const auto& e : b.eval.examples) lines_b.push_back(e.line);
  for (const auto& e : c.eval.examples) lines_c.push_back(e.line);
  EXPECT_EQ(lines_a, lines_b);
  EXPECT_NE(lines_a, lines_c);
  EXPECT_TRUE(std::is_sorted(lines_a.begin(), lines_a.end()));  // file order kept
  for (const auto& e : a.train.examples) all.push_back(e.line);
  all.insert(all.end(), lines_a.begin(), lines_a.end());
  std::sort(all.begin(), all.end());
  for (int64_t i = 0; i < 100; ++i) EXPECT_EQ(all[static_cast<size_t>(i)], i + 1);
  EXPECT_EQ(a.eval.summary.examples, 10);
  EXPECT_NE(error_of([&] { split_eval(load_jsonl_text("{\"text\":\"a\"}", "one.jsonl", opts(), t), 0.5, 1); })
                .find("leaves no training example"),
            std::string::npos);
}

TEST(DataDataset, EvalFromSeparateFileUsesTheTrainingFormat) {
  const auto t = ByteTokenizer::llama3();
  const std::string dir = qlora::testing::make_temp_dir("data_eval");
  DataConfig cfg;
  cfg.path = qlora::testing::write_file(dir, "train.jsonl", R"({"prompt":"a","completion":"b"})" "\n");
  cfg.eval_path = qlora::testing::write_file(dir, "eval.jsonl", R"({"text":"a"})" "\n");
  // The eval file must use the training file's format: this one does not.
  const std::string msg = error_of([&] { load_train_eval(cfg, 1, t); });
  EXPECT_NE(msg.find("eval.jsonl:1: missing field \"prompt\""), std::string::npos) << msg;
  qlora::testing::write_file(dir, "eval.jsonl", R"({"prompt":"c","completion":"d"})" "\n");
  const TrainEval te = load_train_eval(cfg, 1, t);
  EXPECT_EQ(te.train.examples.size(), 1u);
  ASSERT_EQ(te.eval.examples.size(), 1u);
  EXPECT_EQ(te.eval.examples[0].input_ids, (std::vector<int32_t>{256, 99, 100, 257}));
  cfg.eval_ratio = 0.5;
  EXPECT_NE(error_of([&] { load_train_eval(cfg, 1, t); }).find("both set"), std::string::npos);
}

}  // namespace
}  // namespace qlora::data
