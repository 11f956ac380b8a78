// The chat template engine against transformers: every case of the shared chat-templates
// oracle (../shared/data/chat-templates/expected.json, written by transformers 5.25.0 with
// jinja2 3.1.6: 9 real templates, 240 cases) byte for byte, and the constructs it refuses.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>

#include "qlora/data/chat_template.h"
#include "qlora/data/tokenizer.h"
#include "support/test_support.h"

namespace qlora::data {
namespace {

using ojson = nlohmann::ordered_json;

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// The oracle's clock: strftime_now saw 2024-07-26 12:00 local time.
std::string_view trim_view(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

std::tm oracle_clock() {
  std::tm t{};
  t.tm_year = 2024 - 1900;
  t.tm_mon = 6;
  t.tm_mday = 26;
  t.tm_hour = 12;
  t.tm_isdst = -1;
  std::mktime(&t);  // fills the weekday and day of the year for %a, %j
  return t;
}

std::string error_of(const std::string& text, const ojson& messages = ojson::array()) {
  try {
    ModelChatTemplate::parse(text, "t.jinja").render(messages, false);
  } catch (const InputError& e) {
    return e.what();
  }
  return "(no error)";
}

// The shared templates by file name, each parsed once with the oracle's clock.
class SharedTemplates {
 public:
  explicit SharedTemplates(std::string dir) : dir_(std::move(dir)) {}
  const ModelChatTemplate& operator[](const std::string& name) {
    auto it = parsed_.find(name);
    if (it == parsed_.end()) {
      auto t = ModelChatTemplate::parse(slurp(dir_ + "/" + name), name);
      t.set_clock(oracle_clock);
      it = parsed_.emplace(name, std::move(t)).first;
    }
    return it->second;
  }

 private:
  std::string dir_;
  std::map<std::string, ModelChatTemplate> parsed_;
};

// One case of an oracle file: the rendering equals `c["rendered"]`, or the template raises the
// message of `c["error"]` ("TemplateError: <message>"). Returns the rendering ("" on an error)
// and sets *ok.
std::string check_case(const ModelChatTemplate& t, const ojson& messages, bool agp, const ojson& variant,
                       const ojson& c, const std::string& what, bool* ok) {
  *ok = false;
  if (c.contains("error")) {
    std::string message = c.at("error");
    message = message.substr(message.find(": ") + 2);
    try {
      t.render(messages, agp, variant);
      ADD_FAILURE() << what << ": rendered, transformers raised " << c.at("error");
    } catch (const InputError& e) {
      *ok = std::string(e.what()).find("raised an error: " + message) != std::string::npos;
      EXPECT_TRUE(*ok) << what << ": " << e.what();
    }
    return "";
  }
  std::string got = t.render(messages, agp, variant);
  *ok = got == c.at("rendered").get<std::string>();
  EXPECT_EQ(got, c.at("rendered").get<std::string>()) << what;
  return got;
}

// The templates are the model vendors (see the data README), kept outside the repository.
TEST(ChatTemplate, EveryOracleCaseByteForByte) {
  const std::string dir = qlora::testing::source_path("../shared/data/chat-templates");
  if (!std::filesystem::exists(dir + "/expected.json")) {
    GTEST_SKIP() << "no " << dir << " (the real chat templates are not part of the repository)";
  }
  const ojson oracle = ojson::parse(slurp(dir + "/expected.json"));
  SharedTemplates parsed(dir);
  std::map<std::string, std::pair<int, int>> matched;  // template -> (matched, cases)
  int total = 0, good = 0;
  for (const ojson& c : oracle.at("cases")) {
    const std::string name = c.at("template");
    const ojson& messages = oracle.at("conversations").at(c.at("conversation").get<size_t>());
    const ojson& variant = oracle.at("templates").at(name).at("variants").at(c.at("variant").get<size_t>());
    const bool agp = c.at("add_generation_prompt");
    const std::string what = name + " variant " + c.at("variant").dump() + " conversation " +
                             c.at("conversation").dump() + " add_generation_prompt " + (agp ? "true" : "false");
    bool ok = false;
    check_case(parsed[name], messages, agp, variant, c, what, &ok);
    ++total;
    good += ok;
    ++matched[name].second;
    matched[name].first += ok;
  }
  for (const auto& [name, counts] : matched) {
    std::printf("  %2d of %2d  %s\n", counts.first, counts.second, name.c_str());
  }
  std::printf("  %d of %d cases match transformers\n", good, total);
  EXPECT_EQ(total, 240);
}

TEST(ChatTemplate, TransformersSettings) {
  const ojson messages = ojson::parse(R"([{"role": "user", "content": "é \"x\" <b>"}])");
  // trim_blocks, lstrip_blocks, trailing newline dropped
  auto t = ModelChatTemplate::parse(
      "{% for m in messages %}\n  {% if true %}\n[{{ m.role }}]\n  {% endif %}\n{% endfor %}\n", "t.jinja");
  EXPECT_EQ(t.render(messages, false), "[user]\n");
  // tojson is json.dumps(ensure_ascii=False): Python's separators, no HTML escaping
  EXPECT_EQ(ModelChatTemplate::parse("{{ messages[0] | tojson }}", "t.jinja").render(messages, false),
            R"({"role": "user", "content": "é \"x\" <b>"})");
  // length and trim count code points and strip Python's whitespace, as jinja2's do
  EXPECT_EQ(ModelChatTemplate::parse("{{ 'é' | length }}|{{ ' \u3000x\u00a0' | trim }}|", "t.jinja")
                .render(messages, false),
            "1|x|");
  // tools and documents are None; add_generation_prompt and extra variables arrive
  const std::string vars = "{{ tools is none }}{{ documents is none }}{{ add_generation_prompt }}{{ bos_token }}";
  EXPECT_EQ(ModelChatTemplate::parse(vars, "t.jinja").render(messages, true, ojson{{"bos_token", "<s>"}}),
            "TrueTrueTrue<s>");
  auto clock = ModelChatTemplate::parse("{{ strftime_now('%d %b %Y') }}", "t.jinja");
  clock.set_clock(oracle_clock);
  EXPECT_EQ(clock.render(messages, false), "26 Jul 2024");
}

// One row per construct refused or error reported: the message names it and its line.
TEST(ChatTemplate, RefusalsNameTheConstructAndLine) {
  struct Row {
    const char* text;
    const char* expected;
  };
  const Row rows[] = {
      {"a\n{{ x | frobnicate }}", "t.jinja:2: the filter 'frobnicate' is not supported"},
      {"{% filter upper %}x{% endfilter %}", "t.jinja:1: the filter 'upper' is not supported"},
      {"\n\n{{ 1 is divisibleby(2) }}", "t.jinja:3: the test 'divisibleby' is not supported"},
      {"{% if x is not frob %}{% endif %}", "t.jinja:1: the test 'frob' is not supported"},
      {"x\n{{ 1 / 2 }}", "t.jinja:2: the operator '/' is not supported"},
      {"{{ 7 // 2 }}", "t.jinja:1: the operator '//' is not supported"},
      {"\n{{ foo( }}", "t.jinja:2: Expected value expression (a syntax error in the chat template)"},
      {"{{ raise_exception('Conversation roles must alternate') }}",
       "t.jinja: the chat template raised an error: Conversation roles must alternate"},
  };
  for (const Row& row : rows) {
    const std::string what = error_of(row.text);
    EXPECT_NE(what.find(row.expected), std::string::npos) << row.text << "\n  got: " << what;
  }
  // Text outside tags, strings and comments may hold anything.
  const auto plain = ModelChatTemplate::parse("a | b / c {# x | y / z #}{{ 'p | q / r' }}", "t.jinja");
  EXPECT_EQ(plain.render(ojson::array(), false), "a | b / c p | q / r");
  EXPECT_NE(error_of("{{ x }}", ojson::object()).find("messages must be an array"), std::string::npos);
}

// Our own conversations (scripts/golden/chat_templates.py: multi-turn, blank lines, padded
// contents, CJK / Arabic / emoji / combining marks, template-looking text, two user turns in a
// row) rendered by transformers with every shared template, and for Qwen2.5, Qwen3 and
// Phi-3.5 the ids the tokenizers library gives the rendered text: ours must equal both.
TEST(ChatTemplate, OwnConversationsAndTheirTokenIds) {
  const std::string shared = qlora::testing::source_path("../shared/data");
  if (!std::filesystem::exists(shared + "/chat-templates/expected.json")) {
    GTEST_SKIP() << "no " << shared << " (the real chat templates are not part of the repository)";
  }
  const ojson own = ojson::parse(slurp(qlora::testing::source_path("tests/data/chat_templates/own_cases.json")));
  const ojson oracle = ojson::parse(slurp(shared + "/chat-templates/expected.json"));
  SharedTemplates parsed(shared + "/chat-templates");
  std::map<std::string, std::unique_ptr<Tokenizer>> tokenizers;
  int rendered = 0, errors = 0, ids = 0;
  for (const ojson& c : own.at("cases")) {
    const std::string name = c.at("template");
    const ojson& messages = own.at("conversations").at(c.at("conversation").get<size_t>());
    const ojson& variant = oracle.at("templates").at(name).at("variants").at(c.at("variant").get<size_t>());
    const bool agp = c.at("add_generation_prompt");
    const std::string what = name + " conversation " + c.at("conversation").dump() + (agp ? " +prompt" : "");
    bool ok = false;
    const std::string text = check_case(parsed[name], messages, agp, variant, c, what, &ok);
    (c.contains("error") ? errors : rendered) += ok;
    if (!ok || !c.contains("ids")) continue;
    const std::string tok = c.at("tokenizer");
    if (!tokenizers.count(tok)) tokenizers[tok] = load_tokenizer(shared + "/" + tok);
    EXPECT_EQ(tokenizers.at(tok)->encode(text), c.at("ids").get<std::vector<int32_t>>()) << what;
    ++ids;
  }
  std::printf("  %d rendered, %d refused by their template, %d token-id checks (of %zu cases)\n", rendered, errors,
              ids, own.at("cases").size());
  EXPECT_EQ(rendered + errors, static_cast<int>(own.at("cases").size()));
}

// Trained spans found by rendering prefixes: they concatenate to the whole rendering; with
// all_assistant each assistant turn's content lies in one trained run (and nothing of a user
// turn does), or the template cannot be split that way and says which option avoids it;
// last_assistant and all always split.
TEST(ChatTemplate, TrainedSpansByRenderingPrefixes) {
  const std::string shared = qlora::testing::source_path("../shared/data");
  if (!std::filesystem::exists(shared + "/chat-templates/expected.json")) {
    GTEST_SKIP() << "no " << shared << " (the real chat templates are not part of the repository)";
  }
  const ojson own = ojson::parse(slurp(qlora::testing::source_path("tests/data/chat_templates/own_cases.json")));
  const ojson oracle = ojson::parse(slurp(shared + "/chat-templates/expected.json"));
  for (const auto& [name, info] : oracle.at("templates").items()) {
    ModelChatTemplate t = ModelChatTemplate::parse(slurp(shared + "/chat-templates/" + name), name);
    t.set_clock(oracle_clock);
    int split = 0, split_last = 0, refused = 0, skipped = 0;
    for (const ojson& variant : info.at("variants")) {
      for (const ojson& messages : own.at("conversations")) {
        std::string full;
        try {
          full = t.render(messages, false, variant);
        } catch (const InputError&) {
          ++skipped;  // the template refuses this conversation (roles not alternating, system)
          continue;
        }
        for (TrainOn mode : {TrainOn::kAllAssistant, TrainOn::kLastAssistant, TrainOn::kAll}) {
          std::vector<ChatSpan> spans;
          try {
            spans = render_chat_spans(t, messages, variant, mode);
          } catch (const InputError& e) {
            // The option the message names must split this conversation.
            const std::string msg = e.what();
            EXPECT_NE(mode, TrainOn::kAll) << name << ": " << msg;
            const bool names_last = msg.find("data.train_on: last_assistant") != std::string::npos;
            EXPECT_TRUE(names_last || msg.find("data.train_on: all") != std::string::npos) << msg;
            EXPECT_FALSE(names_last && mode == TrainOn::kLastAssistant) << msg;
            if (names_last) {
              EXPECT_NO_THROW(render_chat_spans(t, messages, variant, TrainOn::kLastAssistant)) << msg;
            }
            ++refused;
            continue;
          }
          std::string joined, trained;
          int runs = 0;
          for (const ChatSpan& sp : spans) {
            joined += sp.text;
            if (sp.trained) {
              trained += sp.text + "\x1f";
              ++runs;
            }
          }
          EXPECT_EQ(joined, full) << name;
          int assistants = 0;
          for (const ojson& m : messages) {
            const std::string content = m.at("content");
            const bool assistant = m.at("role") == "assistant";
            assistants += assistant;
            if (mode == TrainOn::kAllAssistant && assistant) {
              EXPECT_NE(trained.find(std::string(trim_view(content))), std::string::npos) << name << ": " << content;
            }
            if (mode != TrainOn::kAll && !assistant && content.size() > 3) {
              EXPECT_EQ(trained.find(content), std::string::npos) << name << ": a user/system turn is trained";
            }
          }
          if (mode == TrainOn::kAllAssistant) {
            EXPECT_EQ(runs, assistants) << name;
          }
          if (mode == TrainOn::kLastAssistant) {
            EXPECT_EQ(runs, 1) << name;
          }
          if (mode == TrainOn::kAllAssistant) ++split;
          if (mode == TrainOn::kLastAssistant) ++split_last;
        }
      }
    }
    std::printf("  %-46s split: all_assistant %d, last_assistant %d; refused %d; template refuses %d\n",
                name.c_str(), split, split_last, refused, skipped);
    // Mistral Nemo writes the system prompt into the last user turn, so with a system message no
    // earlier turn renders the same once later ones follow; every other template splits every
    // conversation it renders (Qwen3's and Phi-3.5's through their end-of-turn tokens).
    if (name != "mistralai-Mistral-Nemo-Instruct-2407.jinja") {
      EXPECT_EQ(refused, 0) << name;
    }
  }
}

// Reasoning left untrained (Qwen3): the <think> block of the shared conversation with one is an
// untrained run; the answer after it, and the end-of-turn token, stay trained.
TEST(ChatTemplate, ReasoningCanBeLeftUntrained) {
  const std::string shared = qlora::testing::source_path("../shared/data/chat-templates");
  if (!std::filesystem::exists(shared + "/expected.json")) GTEST_SKIP() << "no " << shared;
  const ojson oracle = ojson::parse(slurp(shared + "/expected.json"));
  const ojson& messages = oracle.at("conversations").at(9);
  ASSERT_NE(messages.dump().find("<think>"), std::string::npos);
  const std::string name = "Qwen-Qwen3-0.6B.jinja";
  const ModelChatTemplate t = ModelChatTemplate::parse(slurp(shared + "/" + name), name);
  const ojson& variant = oracle.at("templates").at(name).at("variants").at(0);
  std::string trained, untrained, joined;
  for (const ChatSpan& sp : render_chat_spans(t, messages, variant, TrainOn::kAllAssistant, false)) {
    (sp.trained ? trained : untrained) += sp.text;
    joined += sp.text;
  }
  EXPECT_EQ(joined, t.render(messages, false, variant));
  EXPECT_NE(untrained.find("<think>\n17 has no divisors"), std::string::npos) << untrained;
  EXPECT_EQ(trained, "Yes, 17 is prime.<|im_end|>");
  std::string with_reasoning;
  for (const ChatSpan& sp : render_chat_spans(t, messages, variant, TrainOn::kAllAssistant))
    if (sp.trained) with_reasoning += sp.text;
  EXPECT_EQ(with_reasoning.rfind("<think>", 0), 0u) << with_reasoning;
}

// A model directory's template as transformers finds it: chat_template.jinja first, else
// tokenizer_config.json's string or the list's "default"; special tokens as variables.
TEST(ChatTemplate, FoundInTheModelDirectoryAsTransformersFindsIt) {
  using qlora::testing::make_temp_dir;
  using qlora::testing::write_file;
  const std::string dir = make_temp_dir("chat_dir");
  EXPECT_FALSE(find_model_chat_template(dir).has_value());  // nothing there: no template
  write_file(dir, "tokenizer_config.json",
             R"({"bos_token": {"__type": "AddedToken", "content": "<s>"}, "eos_token": "</s>", "unk_token": null,
                 "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"})");
  auto found = find_model_chat_template(dir);
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->origin, dir + "/tokenizer_config.json");
  EXPECT_EQ(found->variables.dump(), R"({"bos_token":"<s>","eos_token":"</s>"})");
  const nlohmann::ordered_json messages = nlohmann::ordered_json::parse(R"([{"role": "user", "content": "hi"}])");
  EXPECT_EQ(ModelChatTemplate::parse(found->text, found->origin).render(messages, false, found->variables),
            "<s>hi</s>");

  write_file(dir, "tokenizer_config.json",
             R"({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})");
  EXPECT_EQ(find_model_chat_template(dir)->text, "D");
  write_file(dir, "chat_template.jinja", "J");  // the file wins, as in transformers
  EXPECT_EQ(find_model_chat_template(dir)->text, "J");
  std::filesystem::remove(dir + "/chat_template.jinja");

  const std::pair<const char*, const char*> bad[] = {
      {R"({"chat_template": [{"name": "tool_use", "template": "T"}]})", "(tool_use) include none named \"default\""},
      {R"({"chat_template": 7})", "key \"chat_template\": expected a string or a list"},
      {R"({"chat_template": [{"name": "default"}]})", "key \"chat_template[0]\": expected {\"name\""},
      {R"({"eos_token": 2})", "key \"eos_token\": expected a token string"},
  };
  for (const auto& [text, expect] : bad) {
    write_file(dir, "tokenizer_config.json", text);
    try {
      find_model_chat_template(dir);
      ADD_FAILURE() << "accepted " << text;
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(dir + "/tokenizer_config.json: "), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(expect), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace qlora::data
