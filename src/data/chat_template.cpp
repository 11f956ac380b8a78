// A model's chat template on minja, with transformers' renderer settings and a parse-time
// check that refuses what minja might render differently from jinja2.
#include "qlora/data/chat_template.h"

#include <minja.hpp>

#include <cctype>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <chrono>
#include <cstdint>
#include <set>
#include <utility>
#include <vector>

#include "qlora/common/json_file.h"

namespace qlora::data {

// Note [chat template engine]
// transformers renders a chat template with jinja2's ImmutableSandboxedEnvironment
// (trim_blocks, lstrip_blocks, loopcontrols), `tojson` = json.dumps(ensure_ascii=False),
// `raise_exception`, `strftime_now`. We render it with minja (third_party/minja, unmodified),
// the Jinja subset written for LLM chat templates: it renders the 240 cases of the shared
// chat-templates oracle (9 real templates x 12 conversations x add_generation_prompt) byte for
// byte (tests/test_chat_template.cpp).
//
// minja is not jinja2, and some of its differences are silent: `/` divides integers as C++
// does (1/2 is 0, jinja2 says 0.5); `length`, `trim` and string subscripts count bytes, not
// code points; `upper`/`lower` leave non-ASCII letters alone. We close what we can without
// editing the library:
//   - `length`/`count` and `trim` are replaced in the root context (minja looks filters up as
//     variables) by versions that count code points and strip Python's whitespace;
//   - a scan of the template's tags refuses, with its line, the `/` and `//` operators and every
//     filter or test outside kFilters / kTests, the ones whose output was compared with jinja2.
// Left open, because only a value's type at render time shows them: string subscripts and
// slices on non-ASCII text, the str methods .upper()/.lower()/.strip() on non-ASCII text, `%`
// on negative numbers, `{{ none }}` (jinja2 prints None, minja nothing). None of the templates
// we test reaches them.

namespace {

// Compared with jinja2 3.1.6 on small probes; the rest are refused by name.
const std::set<std::string> kFilters = {"count",  "d",         "default", "first",      "items", "join",
                                        "last",   "length",    "list",    "map",        "reject",
                                        "rejectattr", "select", "selectattr", "string", "tojson", "trim"};
const std::set<std::string> kTests = {"defined", "undefined", "none",    "string", "number", "mapping",
                                      "iterable", "true",     "false",   "equalto", "eq"};

int line_at(const std::string& text, size_t pos) {
  int line = 1;
  for (size_t i = 0; i < pos && i < text.size(); ++i) line += text[i] == '\n';
  return line;
}

bool ident_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; }

[[noreturn]] void refuse(const std::string& origin, const std::string& text, size_t pos,
                         const std::string& what) {
  throw InputError(origin + ":" + std::to_string(line_at(text, pos)) + ": " + what +
                   " is not supported by the chat template engine (it could render differently from "
                   "transformers' jinja2); see Note [chat template engine]");
}

// Walks the expressions inside {{ }} and {% %} (strings skipped, comments ignored) and
// refuses unlisted filters and tests and the division operators.
void check_constructs(const std::string& text, const std::string& origin) {
  size_t i = 0;
  const size_t n = text.size();
  while (i < n) {
    const size_t open = text.find('{', i);
    if (open == std::string::npos || open + 1 >= n) return;
    const char kind = text[open + 1];
    if (kind == '#') {
      const size_t close = text.find("#}", open + 2);
      if (close == std::string::npos) return;  // minja's parser reports it
      i = close + 2;
      continue;
    }
    if (kind != '{' && kind != '%') {
      i = open + 1;
      continue;
    }
    const char closer = kind == '{' ? '}' : '%';
    std::string prev;  // the previous word inside this tag
    bool want_filter = false, want_test = false;
    size_t j = open + 2;
    // `{% filter name %}` names a filter like `| name`.
    while (j < n && (text[j] == '-' || text[j] == '+' || std::isspace(static_cast<unsigned char>(text[j])))) ++j;
    if (kind == '%' && text.compare(j, 6, "filter") == 0 && j + 6 < n && !ident_char(text[j + 6])) {
      want_filter = true;
      j += 6;
    }
    for (; j < n; ++j) {
      const char c = text[j];
      if (c == closer && j + 1 < n && text[j + 1] == '}') break;
      if (c == '\'' || c == '"') {
        for (++j; j < n && text[j] != c; ++j) j += text[j] == '\\';
        prev.clear();
        want_filter = want_test = false;
        continue;
      }
      if (std::isspace(static_cast<unsigned char>(c))) continue;
      if (c == '|') {
        want_filter = true;
        continue;
      }
      if (c == '/') refuse(origin, text, j, text.compare(j, 2, "//") == 0 ? "the operator '//'" : "the operator '/'");
      if (ident_char(c) && !std::isdigit(static_cast<unsigned char>(c))) {
        size_t k = j;
        while (k < n && ident_char(text[k])) ++k;
        const std::string word = text.substr(j, k - j);
        if (want_filter) {
          if (!kFilters.count(word)) refuse(origin, text, j, "the filter '" + word + "'");
          want_filter = false;
        } else if (want_test && word != "not") {
          if (!kTests.count(word)) refuse(origin, text, j, "the test '" + word + "'");
          want_test = false;
        } else if (word == "is" && prev != ".") {
          want_test = true;
        }
        prev = word;
        j = k - 1;
        continue;
      }
      prev = std::string(1, c);
      want_filter = want_test = false;
    }
    i = j + 2;
  }
}

// minja's messages end in " at row R, column C:" and a picture of the source; keep the first
// sentence and turn the row into `origin:R:`.
std::string locate(const std::string& origin, const std::string& what) {
  const size_t at = what.find(" at row ");
  if (at == std::string::npos) return origin + ": " + what;
  const size_t comma = what.find(',', at);
  const std::string row = what.substr(at + 8, comma == std::string::npos ? std::string::npos : comma - at - 8);
  return origin + ":" + row + ": " + what.substr(0, at);
}

// UTF-8 decoding for the code point versions of `length` and `trim`; invalid bytes count as
// one code point each, as Python's surrogateescape would.
std::vector<std::pair<size_t, char32_t>> code_points(const std::string& s) {
  std::vector<std::pair<size_t, char32_t>> out;
  for (size_t i = 0; i < s.size();) {
    const auto b = static_cast<unsigned char>(s[i]);
    const size_t len = b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 1;
    char32_t cp = len == 1 ? b : len == 2 ? (b & 0x1F) : len == 3 ? (b & 0x0F) : (b & 0x07);
    size_t k = 1;
    for (; k < len && i + k < s.size() && (static_cast<unsigned char>(s[i + k]) & 0xC0) == 0x80; ++k)
      cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    if (k < len) cp = b, k = 1;
    out.emplace_back(i, cp);
    i += k;
  }
  return out;
}

// str.isspace() of Python 3.
bool py_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

minja::Value length_filter(const std::shared_ptr<minja::Context>&, minja::ArgumentsValue& args) {
  if (args.args.size() != 1 || !args.kwargs.empty()) throw std::runtime_error("length takes one argument");
  const minja::Value& v = args.args[0];
  if (v.is_string()) return minja::Value(static_cast<int64_t>(code_points(v.get<std::string>()).size()));
  if (v.is_array() || v.is_object()) return minja::Value(static_cast<int64_t>(v.size()));
  throw std::runtime_error("object of type " + v.dump() + " has no len()");
}

// jinja2's trim(value, chars=None): str.strip(chars).
minja::Value trim_filter(const std::shared_ptr<minja::Context>&, minja::ArgumentsValue& args) {
  if (args.args.empty() || args.args.size() > 2 || !args.kwargs.empty())
    throw std::runtime_error("trim takes a value and optional chars");
  const minja::Value& v = args.args[0];
  const std::string s = v.is_string() ? v.get<std::string>() : v.to_str();
  std::vector<char32_t> chars;
  if (args.args.size() == 2 && !args.args[1].is_null()) {
    for (const auto& [pos, cp] : code_points(args.args[1].get<std::string>())) chars.push_back(cp);
  }
  const auto strip = [&](char32_t c) {
    if (args.args.size() < 2 || args.args[1].is_null()) return py_space(c);
    for (char32_t x : chars)
      if (x == c) return true;
    return false;
  };
  const auto cps = code_points(s);
  size_t b = 0, e = cps.size();
  while (b < e && strip(cps[b].second)) ++b;
  while (e > b && strip(cps[e - 1].second)) --e;
  const size_t from = b < cps.size() ? cps[b].first : s.size();
  const size_t to = e < cps.size() ? cps[e].first : s.size();
  return minja::Value(s.substr(from, to - from));
}

}  // namespace

ChatClock system_chat_clock() {
  return [] {
    const std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
    std::tm local{};
    localtime_r(&now, &local);
    return local;
  };
}

struct ModelChatTemplate::Impl {
  std::string origin;
  std::shared_ptr<minja::TemplateNode> root;
  ChatClock clock = system_chat_clock();
};

ModelChatTemplate::ModelChatTemplate(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ModelChatTemplate::ModelChatTemplate(ModelChatTemplate&&) noexcept = default;
ModelChatTemplate& ModelChatTemplate::operator=(ModelChatTemplate&&) noexcept = default;
ModelChatTemplate::~ModelChatTemplate() = default;

void ModelChatTemplate::set_clock(ChatClock clock) { impl_->clock = std::move(clock); }
const std::string& ModelChatTemplate::origin() const { return impl_->origin; }

ModelChatTemplate ModelChatTemplate::parse(const std::string& text, const std::string& origin) {
  check_constructs(text, origin);
  auto impl = std::make_unique<Impl>();
  impl->origin = origin;
  minja::Options options{};
  options.trim_blocks = true;
  options.lstrip_blocks = true;
  options.keep_trailing_newline = false;
  try {
    impl->root = minja::Parser::parse(text, options);
  } catch (const std::exception& e) {
    throw InputError(locate(origin, e.what()) + " (a syntax error in the chat template)");
  }
  return ModelChatTemplate(std::move(impl));
}

std::string ModelChatTemplate::render(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                                      const nlohmann::ordered_json& extra) const {
  if (!messages.is_array()) {
    throw InputError(impl_->origin + ": messages must be an array, got " + messages.type_name());
  }
  if (!extra.is_object()) throw InputError(impl_->origin + ": extra variables must be an object");
  nlohmann::ordered_json vars = nlohmann::ordered_json::object();
  for (const auto& [key, value] : extra.items()) {
    if (key == "messages" || key == "add_generation_prompt")
      throw InputError(impl_->origin + ": the variable '" + key +
                       "' is set by the renderer, not by extra variables");
    vars[key] = value;
  }
  vars["messages"] = messages;
  if (!vars.contains("tools")) vars["tools"] = nullptr;
  if (!vars.contains("documents")) vars["documents"] = nullptr;
  vars["add_generation_prompt"] = add_generation_prompt;

  auto context = minja::Context::make(minja::Value(vars));
  auto raised = std::make_shared<std::string>();
  bool did_raise = false;
  context->set("raise_exception", minja::Value::callable([raised, &did_raise](
                                                           const std::shared_ptr<minja::Context>&,
                                                           minja::ArgumentsValue& args) -> minja::Value {
    did_raise = true;
    *raised = args.args.empty() ? std::string() : args.args[0].to_str();
    throw std::runtime_error(*raised);
  }));
  const ChatClock clock = impl_->clock;
  context->set("strftime_now", minja::Value::callable([clock](const std::shared_ptr<minja::Context>&,
                                                              minja::ArgumentsValue& args) -> minja::Value {
    if (args.args.size() != 1 || !args.args[0].is_string()) {
      throw std::runtime_error("strftime_now takes one format string");
    }
    const std::tm now = clock();
    char buf[512];
    const size_t len = std::strftime(buf, sizeof buf, args.args[0].get<std::string>().c_str(), &now);
    return minja::Value(std::string(buf, len));
  }));
  context->set("length", minja::Value::callable(length_filter));
  context->set("count", minja::Value::callable(length_filter));
  context->set("trim", minja::Value::callable(trim_filter));
  try {
    return impl_->root->render(context);
  } catch (const std::exception& e) {
    if (did_raise) throw InputError(impl_->origin + ": the chat template raised an error: " + *raised);
    throw InputError(locate(impl_->origin, e.what()) + " (while rendering the chat template)");
  }
}

// ---------------------------------------------------------------- a model directory's template

std::optional<ModelChatTemplateSource> find_model_chat_template(const std::string& model_dir) {
  namespace fs = std::filesystem;
  const fs::path dir(model_dir);
  const std::string config_path = (dir / "tokenizer_config.json").string();
  std::error_code ec;
  nlohmann::json config = nlohmann::json::object();
  if (fs::exists(config_path, ec))
    config = read_json_object(config_path, "cannot read the tokenizer config; check its permissions",
                              "a Hugging Face tokenizer_config.json");

  ModelChatTemplateSource found;
  found.variables = nlohmann::ordered_json::object();
  for (const char* key : {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"}) {
    auto it = config.find(key);
    if (it == config.end() || it->is_null()) continue;
    if (it->is_string()) {
      found.variables[key] = it->get<std::string>();
    } else if (it->is_object() && it->contains("content") && (*it)["content"].is_string()) {
      found.variables[key] = (*it)["content"].get<std::string>();  // an AddedToken, as older files save it
    } else {
      throw InputError(config_path + ": key \"" + std::string(key) + "\": expected a token string or an object " +
                       "with \"content\", got " + it->dump());
    }
  }

  const fs::path jinja = dir / "chat_template.jinja";
  if (fs::exists(jinja, ec)) {
    std::ifstream in(jinja, std::ios::binary);
    if (!in) throw InputError(jinja.string() + ": cannot read the chat template; check its permissions");
    std::stringstream buf;
    buf << in.rdbuf();
    found.text = buf.str();
    found.origin = jinja.string();
    return found;
  }
  auto it = config.find("chat_template");
  if (it == config.end() || it->is_null()) return std::nullopt;
  found.origin = config_path;
  if (it->is_string()) {
    found.text = it->get<std::string>();
    return found;
  }
  if (!it->is_array())
    throw InputError(config_path + ": key \"chat_template\": expected a string or a list of {\"name\", \"template\"}, "
                                   "got " + std::string(it->type_name()));
  std::vector<std::string> names;
  for (size_t i = 0; i < it->size(); ++i) {
    const nlohmann::json& e = (*it)[i];
    if (!e.is_object() || !e.contains("name") || !e["name"].is_string() || !e.contains("template") ||
        !e["template"].is_string())
      throw InputError(config_path + ": key \"chat_template[" + std::to_string(i) +
                       "]\": expected {\"name\": string, \"template\": string}");
    names.push_back(e["name"].get<std::string>());
    if (names.back() == "default") found.text = e["template"].get<std::string>();
  }
  if (found.text.empty()) {
    std::string list;
    for (const auto& n : names) list += (list.empty() ? "" : ", ") + n;
    throw InputError(config_path + ": key \"chat_template\": the named templates (" + list +
                     ") include none named \"default\", the one transformers renders for chat");
  }
  return found;
}

// ---------------------------------------------------------------- what is trained

namespace {

// What the template writes after the last message only, never between turns: Phi-3's eos_token
// after a conversation without a generation prompt. Found with two probes: the conversation
// [user, assistant] ends with eos_token, and without it is a prefix of [user, assistant, user].
// "" for templates that end each turn the same way wherever it stands.
std::string conversation_end(const ModelChatTemplate& tmpl, const nlohmann::ordered_json& variables) {
  const std::string eos = variables.value("eos_token", "");
  if (eos.empty()) return "";
  nlohmann::ordered_json probe = nlohmann::ordered_json::array(
      {{{"role", "user"}, {"content", "Hi"}}, {{"role", "assistant"}, {"content", "Hello"}}});
  try {
    const std::string two = tmpl.render(probe, false, variables);
    probe.push_back({{"role", "user"}, {"content", "Again"}});
    const std::string three = tmpl.render(probe, false, variables);
    const size_t cut = two.size() - std::min(two.size(), eos.size());
    if (two.compare(cut, std::string::npos, eos) == 0 && three.compare(0, two.size(), two) != 0 &&
        three.compare(0, cut, two, 0, cut) == 0)
      return eos;
  } catch (const InputError&) {
  }
  return "";
}

// The end of the reply that starts at `begin` of `full`: the first `end_of_turn` after it, checked
// by the reply's own text standing right before that token (its last characters; after its
// "</think>" where it has one, as templates that drop past reasoning keep only that). npos when
// the check fails: a reply that writes the end-of-turn text itself, a template that rewrites it.
size_t reply_end(const std::string& full, size_t begin, const std::string& end_of_turn, const nlohmann::ordered_json& message) {
  if (end_of_turn.empty() || !message.contains("content") || !message["content"].is_string()) return std::string::npos;
  std::string tail = message["content"].get<std::string>();
  if (const size_t think = tail.rfind("</think>"); think != std::string::npos) tail = tail.substr(think + 8);
  while (!tail.empty() && std::isspace(static_cast<unsigned char>(tail.back()))) tail.pop_back();
  if (tail.empty()) return std::string::npos;
  tail = tail.substr(tail.size() - std::min<size_t>(tail.size(), 16));
  const size_t at = full.find(end_of_turn, begin);
  if (at == std::string::npos) return std::string::npos;
  size_t text_end = at;
  while (text_end > begin && std::isspace(static_cast<unsigned char>(full[text_end - 1]))) --text_end;
  if (text_end - begin < tail.size() || full.compare(text_end - tail.size(), tail.size(), tail) != 0)
    return std::string::npos;
  return at + end_of_turn.size();
}

// The trained run of the assistant message at index `turn`: [begin, end) of `full`, or nullopt.
// It begins where the rendering of the turns before it with the generation prompt stops matching
// `full` (which must be past the turns themselves: a template may add to the prompt what it
// strips from rendered turns, DeepSeek-R1's "<think>\n"). It ends where the rendering of the
// turns up to it ends (less `end_text`, conversation_end's) when that is a prefix of `full`;
// otherwise (the template renders a last turn differently: Qwen3 gives it an empty <think>
// block, which past turns lose) at the turn's end-of-turn token in `full` (`end_of_turn()`,
// reply_end's check).
std::optional<std::pair<size_t, size_t>> turn_span(const ModelChatTemplate& tmpl, const nlohmann::ordered_json& messages,
                                                   const nlohmann::ordered_json& variables, const std::string& full,
                                                   size_t turn, const std::string& end_text,
                                                   const std::function<const std::string&()>& end_of_turn) {
  const auto prefix = [&](size_t count, bool prompt) {
    nlohmann::ordered_json head = nlohmann::ordered_json::array();
    for (size_t i = 0; i < count; ++i) head.push_back(messages[i]);
    return tmpl.render(head, prompt, variables);
  };
  const std::string before = prefix(turn, true);
  size_t begin = 0;
  while (begin < before.size() && begin < full.size() && before[begin] == full[begin]) ++begin;
  if (begin < before.size() && begin < prefix(turn, false).size()) return std::nullopt;  // parted before the prompt
  std::string through = prefix(turn + 1, false);
  if (!end_text.empty() && through.size() >= end_text.size() &&
      through.compare(through.size() - end_text.size(), end_text.size(), end_text) == 0)
    through.resize(through.size() - end_text.size());
  size_t end = std::string::npos;
  if (through.size() >= begin && full.compare(0, through.size(), through) == 0) {
    end = through.size();
  } else {
    end = reply_end(full, begin, end_of_turn(), messages[turn]);
    if (end == std::string::npos) return std::nullopt;
  }
  while (end > begin && std::isspace(static_cast<unsigned char>(full[end - 1]))) --end;
  return std::make_pair(begin, end);
}

// A trained run split around its "<think>...</think>" block (and the whitespace after it),
// which stays untrained.
void push_trained(std::vector<ChatSpan>& spans, std::string text, bool train_reasoning) {
  const size_t open = train_reasoning ? std::string::npos : text.find("<think>");
  const size_t close = open == std::string::npos ? std::string::npos : text.find("</think>", open);
  if (close == std::string::npos) {
    spans.push_back({std::move(text), true});
    return;
  }
  size_t after = close + std::string("</think>").size();
  while (after < text.size() && std::isspace(static_cast<unsigned char>(text[after]))) ++after;
  if (open > 0) spans.push_back({text.substr(0, open), true});
  spans.push_back({text.substr(open, after - open), false});
  if (after < text.size()) spans.push_back({text.substr(after), true});
}

}  // namespace

namespace {

std::vector<ChatSpan> spans_of(const ModelChatTemplate& tmpl, const nlohmann::ordered_json& messages,
                               const nlohmann::ordered_json& variables, TrainOn train_on, bool train_reasoning,
                               bool probing) {
  const std::string full = tmpl.render(messages, false, variables);
  if (train_on == TrainOn::kAll) return {{full, true}};
  std::vector<size_t> turns;
  for (size_t i = 0; i < messages.size(); ++i)
    if (messages[i].is_object() && messages[i].value("role", "") == "assistant") turns.push_back(i);
  const size_t first = train_on == TrainOn::kLastAssistant && !turns.empty() ? turns.size() - 1 : 0;
  std::vector<ChatSpan> spans;
  size_t at = 0;
  const std::string end_text = turns.empty() ? "" : conversation_end(tmpl, variables);
  std::optional<std::string> eot;  // found when first needed
  const std::function<const std::string&()> end_of_turn = [&]() -> const std::string& {
    if (!eot) eot = probing ? "" : find_end_of_turn(tmpl, variables);
    return *eot;
  };
  for (size_t k = first; k < turns.size(); ++k) {
    const auto span = turn_span(tmpl, messages, variables, full, turns[k], end_text, end_of_turn);
    if (!span || span->first < at) {
      const bool last_splits = train_on == TrainOn::kAllAssistant &&
                               turn_span(tmpl, messages, variables, full, turns.back(), end_text, end_of_turn).has_value();
      throw InputError(tmpl.origin() + ": the chat template renders assistant turn " + std::to_string(k + 1) +
                       " (message " + std::to_string(turns[k] + 1) +
                       ") in a way its trained span cannot be found in: the rendering up to it differs once later "
                       "turns follow, and its end-of-turn token does not follow its text; set data.train_on: " +
                       (last_splits ? "last_assistant (trains only the final turn) or all" : "all"));
    }
    if (span->first > at) spans.push_back({full.substr(at, span->first - at), false});
    if (span->second > span->first)
      push_trained(spans, full.substr(span->first, span->second - span->first), train_reasoning);
    at = span->second;
  }
  if (at < full.size()) spans.push_back({full.substr(at), false});
  return spans;
}

}  // namespace

std::vector<ChatSpan> render_chat_spans(const ModelChatTemplate& tmpl, const nlohmann::ordered_json& messages,
                                        const nlohmann::ordered_json& variables, TrainOn train_on,
                                        bool train_reasoning) {
  return spans_of(tmpl, messages, variables, train_on, train_reasoning, false);
}

}  // namespace qlora::data

// ---------------------------------------------------------------- a template ready for training data

namespace qlora::data {

std::string find_end_of_turn(const ModelChatTemplate& tmpl, const nlohmann::ordered_json& variables) {
  const std::string reply = "Hello";
  const nlohmann::ordered_json probe = nlohmann::ordered_json::array(
      {{{"role", "user"}, {"content", "Hi"}}, {{"role", "assistant"}, {"content", reply}}});
  std::string trained;
  try {
    for (const ChatSpan& s : spans_of(tmpl, probe, variables, TrainOn::kLastAssistant, true, true))
      if (s.trained) trained += s.text;
  } catch (const InputError&) {
    return "";  // a template that wants another shape of conversation (a system turn first, say)
  }
  const size_t at = trained.rfind(reply);
  return at == std::string::npos ? "" : trained.substr(at + reply.size());
}

std::shared_ptr<const ModelChat> make_model_chat(const std::string& text, const std::string& origin,
                                                 nlohmann::ordered_json variables) {
  auto chat = std::make_shared<ModelChat>(ModelChat{ModelChatTemplate::parse(text, origin), std::move(variables),
                                                    text, origin, ""});
  chat->end_of_turn = find_end_of_turn(chat->tmpl, chat->variables);
  return chat;
}

std::shared_ptr<const ModelChat> load_model_chat(const std::string& model_dir) {
  std::optional<ModelChatTemplateSource> source = find_model_chat_template(model_dir);
  if (!source) return nullptr;
  return make_model_chat(source->text, source->origin, std::move(source->variables));
}

bool starts_with_system(const nlohmann::ordered_json& messages) {
  return messages.is_array() && !messages.empty() && messages[0].is_object() && messages[0].contains("role") &&
         messages[0]["role"] == "system";
}

nlohmann::ordered_json fold_system_prompt(const nlohmann::ordered_json& messages) {
  if (!starts_with_system(messages)) return messages;
  const auto is_text = [](const nlohmann::ordered_json& part) {
    return part.is_object() && part.value("type", "") == "text" && part.contains("text") && part["text"].is_string();
  };
  // The system text: a string, or the text parts of a list of parts (as multimodal data writes
  // it: {"type": "text", "text": ...}) joined by blank lines.
  std::string system;
  const nlohmann::ordered_json sys = messages[0].value("content", nlohmann::ordered_json());
  if (sys.is_string()) system = sys.get<std::string>();
  for (const auto& part : sys.is_array() ? sys : nlohmann::ordered_json::array())
    if (is_text(part)) system += (system.empty() ? "" : "\n\n") + part["text"].get<std::string>();
  nlohmann::ordered_json out = nlohmann::ordered_json::array();
  nlohmann::ordered_json first = {{"role", "user"}, {"content", system}};
  size_t next = 1;
  if (messages.size() > 1 && messages[1].is_object() && messages[1].value("role", "") == "user") {
    first = messages[1];
    nlohmann::ordered_json& content = first["content"];
    if (!content.is_array()) {
      content = system + "\n\n" + (content.is_string() ? content.get<std::string>() : std::string());
    } else if (!content.empty() && is_text(content[0])) {  // parts: the system text leads the first
      content[0]["text"] = system + "\n\n" + content[0]["text"].get<std::string>();
    } else {
      content.insert(content.begin(), nlohmann::ordered_json{{"type", "text"}, {"text", system + "\n\n"}});
    }
    next = 2;
  }
  out.push_back(std::move(first));
  for (size_t i = next; i < messages.size(); ++i) out.push_back(messages[i]);
  return out;
}

}  // namespace qlora::data
