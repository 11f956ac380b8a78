// ShareGPT `conversations` lines and the `system` column beside a conversation
// (Note [chat shapes]): they render exactly as the equivalent OpenAI `messages`
// line, and every wrong shape names its key.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "qlora/data/dataset.h"
#include "qlora/data/format.h"
#include "support/test_support.h"
#include "test_data_tokenizer.h"

namespace qlora::data {
namespace {

using testing::ByteTokenizer;

LoadOptions opts(DataFormat format = DataFormat::kAuto, bool skip = false) {
  LoadOptions o;
  o.format = format;
  o.skip_bad_lines = skip;
  return o;
}

using qlora::testing::error_of;

void expect_same_segments(const RenderedExample& a, const RenderedExample& b, const std::string& what) {
  EXPECT_EQ(a.format, b.format) << what;
  EXPECT_EQ(a.append_eos, b.append_eos) << what;
  ASSERT_EQ(a.segments.size(), b.segments.size()) << what;
  for (size_t i = 0; i < a.segments.size(); ++i) {
    EXPECT_EQ(a.segments[i].text, b.segments[i].text) << what << " segment " << i;
    EXPECT_EQ(a.segments[i].trained, b.segments[i].trained) << what << " segment " << i;
  }
}

// Pairs of lines that are the same conversation: ShareGPT (or a system column) and messages.
const std::vector<std::pair<std::string, std::string>>& same_conversations() {
  static const std::vector<std::pair<std::string, std::string>> pairs = {
      {R"({"conversations":[{"from":"human","value":"Hi"},{"from":"gpt","value":"Yo"}]})",
       R"({"messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":"Yo"}]})"},
      {R"({"conversations":[{"from":"system","value":"S"},{"from":"human","value":"a"},)"
       R"({"from":"gpt","value":"b"},{"from":"user","value":"c"},{"from":"assistant","value":"d"}],"id":7})",
       R"({"messages":[{"role":"system","content":"S"},{"role":"user","content":"a"},)"
       R"({"role":"assistant","content":"b"},{"role":"user","content":"c"},{"role":"assistant","content":"d"}]})"},
      // The system column, beside either spelling.
      {R"({"system":"Be brief.","conversations":[{"from":"human","value":"a"},{"from":"gpt","value":"b"}]})",
       R"({"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"a"},)"
       R"({"role":"assistant","content":"b"}]})"},
      {R"({"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}],"system":"Be brief."})",
       R"({"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"a"},)"
       R"({"role":"assistant","content":"b"}]})"},
      // A null or empty system column is no system message.
      {R"({"system":null,"conversations":[{"from":"human","value":"a"},{"from":"gpt","value":"b"}]})",
       R"({"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]})"},
      {R"({"system":"","messages":[{"role":"system","content":"S"},{"role":"user","content":"a"},)"
       R"({"role":"assistant","content":"b"}]})",
       R"({"messages":[{"role":"system","content":"S"},{"role":"user","content":"a"},)"
       R"({"role":"assistant","content":"b"}]})"},
  };
  return pairs;
}

TEST(DataShareGpt, RendersToTheSameSegmentsAsMessages) {
  for (ChatTemplate tmpl : {ChatTemplate::kLlama3, ChatTemplate::kChatml}) {
    for (const auto& [line, messages] : same_conversations()) {
      for (DataFormat f : {DataFormat::kAuto, DataFormat::kChat}) {
        expect_same_segments(render_line(line, f, tmpl), render_line(messages, f, tmpl), line);
      }
    }
  }
}

TEST(DataShareGpt, TokenizesToTheSameIdsAndMasksAsMessages) {
  const ByteTokenizer llama3 = ByteTokenizer::llama3();
  const ByteTokenizer chatml = ByteTokenizer::chatml();
  for (const ByteTokenizer* tp : {&llama3, &chatml}) {
    const ByteTokenizer& t = *tp;
    for (bool train_on_inputs : {false, true}) {
      std::string a, b;
      for (const auto& [line, messages] : same_conversations()) {
        a += line + "\n";
        b += messages + "\n";
      }
      LoadOptions o = opts();
      o.train_on_inputs = train_on_inputs;
      const Dataset da = load_jsonl_text(a, "sharegpt.jsonl", o, t);
      const Dataset db = load_jsonl_text(b, "messages.jsonl", o, t);
      EXPECT_EQ(da.summary.format, DataFormat::kChat);
      ASSERT_EQ(da.examples.size(), db.examples.size());
      for (size_t i = 0; i < da.examples.size(); ++i) {
        EXPECT_EQ(da.examples[i].input_ids, db.examples[i].input_ids) << i;
        EXPECT_EQ(da.examples[i].labels, db.examples[i].labels) << i;
      }
    }
  }
  // Exact ids for one line, written out: the gpt turn and its <|eot_id|> are trained.
  const TokenizedExample ex = tokenize_example(
      render_line(R"({"conversations":[{"from":"human","value":"Hi"},{"from":"gpt","value":"Yo"}]})",
                  DataFormat::kAuto, ChatTemplate::kLlama3),
      llama3, false);
  const std::vector<int32_t> ids = {256, 258, 117, 115, 101, 114, 259, 10, 10, 72, 105, 260,
                                    258, 97, 115, 115, 105, 115, 116, 97, 110, 116, 259, 10, 10,
                                    89, 111, 260};
  EXPECT_EQ(ex.input_ids, ids);
  std::vector<int32_t> labels(ids.size(), kIgnoreIndex);
  labels[25] = 89;
  labels[26] = 111;
  labels[27] = 260;
  EXPECT_EQ(ex.labels, labels);
}

TEST(DataShareGpt, AutoDetectsConversationsAsChat) {
  EXPECT_EQ(detect_format(R"({"conversations":[]})"), DataFormat::kChat);
  EXPECT_EQ(detect_format(R"({"system":"s","conversations":[],"text":"x"})"), DataFormat::kChat);
  EXPECT_EQ(detect_format(R"({"system":"s","messages":[]})"), DataFormat::kChat);
  // One file may mix the two spellings: both are format chat.
  const std::string text =
      R"({"conversations":[{"from":"human","value":"a"},{"from":"gpt","value":"b"}]})" "\n"
      R"({"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]})" "\n";
  const Dataset d = load_jsonl_text(text, "mixed.jsonl", opts(), ByteTokenizer::chatml());
  ASSERT_EQ(d.examples.size(), 2u);
  EXPECT_EQ(d.summary.format, DataFormat::kChat);
  EXPECT_EQ(d.summary.chat_template, ChatTemplate::kChatml);
  EXPECT_EQ(d.examples[0].input_ids, d.examples[1].input_ids);
  // data.format set to another format on ShareGPT lines names chat.
  const std::string msg = error_of([&] {
    load_jsonl_text(text, "s.jsonl", opts(DataFormat::kAlpaca), ByteTokenizer::chatml());
  });
  EXPECT_NE(msg.find("s.jsonl:1: missing field \"instruction\""), std::string::npos) << msg;
  EXPECT_NE(msg.find("use data.format: chat"), std::string::npos) << msg;
  // data.format: chat on a line with neither key names both.
  const std::string none = error_of([&] {
    load_jsonl_text(R"({"text":"a"})" "\n", "n.jsonl", opts(DataFormat::kChat), ByteTokenizer::chatml());
  });
  EXPECT_NE(none.find("n.jsonl:1: missing field \"messages\" (or ShareGPT's \"conversations\") for format chat"),
            std::string::npos)
      << none;
}

struct BadLine {
  const char* name;
  std::string line;
  LineProblem problem;
  std::vector<std::string> says;  // phrases the message must contain
};

TEST(DataShareGpt, EveryBadShapeNamesItsKey) {
  const std::string human = R"({"from":"human","value":"a"})";
  const std::string gpt = R"({"from":"gpt","value":"b"})";
  const std::vector<BadLine> cases = {
      {"unknown_from", R"({"conversations":[)" + human + "," + gpt + R"(,{"from":"bot","value":"c"}]})",
       LineProblem::kBadRole,
       {"conversations[2].from is \"bot\"",
        "expected \"system\", \"human\" (or \"user\") or \"gpt\" (or \"assistant\")"}},
      {"missing_value", R"({"conversations":[)" + human + R"(,{"from":"gpt"}]})", LineProblem::kMissingField,
       {"conversations[1] has no \"value\" (keys present: \"from\")"}},
      {"missing_from", R"({"conversations":[{"value":"a"},)" + gpt + "]}", LineProblem::kMissingField,
       {"conversations[0] has no \"from\""}},
      {"value_not_a_string", R"({"conversations":[)" + human + R"(,{"from":"gpt","value":5}]})",
       LineProblem::kWrongType, {"conversations[1].value must be a string, got a JSON number"}},
      {"turn_not_an_object", R"({"conversations":[)" + human + R"(,"b"]})", LineProblem::kWrongType,
       {"conversations[1] must be an object {\"from\",\"value\"}, got a JSON string"}},
      {"conversations_not_a_list", R"({"conversations":{"from":"human","value":"a"}})",
       LineProblem::kWrongType,
       {"field \"conversations\" must be an array of {\"from\",\"value\"}, got a JSON object"}},
      {"conversations_empty", R"({"conversations":[]})", LineProblem::kEmpty,
       {"\"conversations\" is empty"}},
      {"no_gpt_turn", R"({"conversations":[)" + human + "]}", LineProblem::kEmpty, {"no assistant message"}},
      {"system_twice_sharegpt",
       R"({"system":"S","conversations":[{"from":"system","value":"T"},)" + human + "," + gpt + "]}",
       LineProblem::kBadRole,
       {"both a \"system\" field and a system message (conversations[0]) are given"}},
      {"system_twice_messages",
       R"({"system":"S","messages":[{"role":"user","content":"a"},{"role":"system","content":"T"},)"
       R"({"role":"assistant","content":"b"}]})",
       LineProblem::kBadRole, {"both a \"system\" field and a system message (messages[1]) are given"}},
      {"system_not_a_string", R"({"system":["S"],"conversations":[)" + human + "," + gpt + "]}",
       LineProblem::kWrongType, {"field \"system\" must be a string, got a JSON array"}},
      {"both_lists",
       R"({"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}],"conversations":[)" +
           human + "," + gpt + "]}",
       LineProblem::kUnknownFormat, {"both \"messages\" and \"conversations\" are given"}},
      {"sharegpt_role_in_messages",
       R"({"messages":[{"role":"human","content":"a"},{"role":"assistant","content":"b"}]})",
       LineProblem::kBadRole, {"messages[0].role is \"human\"; expected \"system\", \"user\" or \"assistant\""}},
  };
  const ByteTokenizer t = ByteTokenizer::llama3();
  const std::string good = R"({"conversations":[)" + human + "," + gpt + "]}";
  for (const BadLine& bad : cases) {
    try {
      render_line(bad.line, DataFormat::kChat, ChatTemplate::kLlama3);
      ADD_FAILURE() << bad.name << ": no throw";
    } catch (const LineError& e) {
      EXPECT_EQ(e.problem(), bad.problem) << bad.name << ": " << e.what();
    }
    // Through the loader: file:line first, then the key.
    const std::string msg =
        error_of([&] { load_jsonl_text(good + "\n" + bad.line + "\n", "sg.jsonl", opts(), t); });
    EXPECT_EQ(msg.rfind("sg.jsonl:2: ", 0), 0u) << bad.name << ": " << msg;
    for (const std::string& phrase : bad.says)
      EXPECT_NE(msg.find(phrase), std::string::npos) << bad.name << ": " << msg;
  }
  // With data.skip_bad_lines each is skipped and counted under its reason.
  std::string text = good + "\n";
  for (const BadLine& bad : cases) text += bad.line + "\n";
  const Dataset d = load_jsonl_text(text, "sg.jsonl", opts(DataFormat::kAuto, /*skip=*/true), t);
  EXPECT_EQ(d.examples.size(), 1u);
  EXPECT_EQ(d.summary.skipped_total(), static_cast<int64_t>(cases.size()));
}

}  // namespace
}  // namespace qlora::data
