#include "qlora/data/format.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <utility>

#include "qlora/data/chat_template.h"
#include "qlora/data/tokenizer.h"

namespace qlora::data {

using nlohmann::json;

std::string_view to_string(LineProblem p) {
  switch (p) {
    case LineProblem::kBadJson: return "malformed JSON";
    case LineProblem::kUnknownFormat: return "unknown format";
    case LineProblem::kMissingField: return "missing field";
    case LineProblem::kWrongType: return "wrong field type";
    case LineProblem::kEmpty: return "empty example";
    case LineProblem::kBadRole: return "bad message role";
    case LineProblem::kTooLong: return "too long (nothing to train after truncation)";
  }
  return "?";
}

// ---------------------------------------------------------------- templates

std::string alpaca_prompt(std::string_view instruction, std::string_view input) {
  std::string out;
  if (input.empty()) {
    out = "Below is an instruction that describes a task. "
          "Write a response that appropriately completes the request.\n\n### Instruction:\n";
    out += instruction;
  } else {
    out = "Below is an instruction that describes a task, paired with an input that provides "
          "further context. Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n";
    out += instruction;
    out += "\n\n### Input:\n";
    out += input;
  }
  out += "\n\n### Response:\n";
  return out;
}

namespace {

constexpr const char* kLlama3Begin = "<|begin_of_text|>";
constexpr const char* kLlama3HeaderStart = "<|start_header_id|>";
constexpr const char* kLlama3HeaderEnd = "<|end_header_id|>";
constexpr const char* kLlama3Eot = "<|eot_id|>";
constexpr const char* kChatmlStart = "<|im_start|>";
constexpr const char* kChatmlEnd = "<|im_end|>";

const char* kFormatHint =
    "each line must be one JSON object: {\"text\"} | {\"prompt\",\"completion\"} | "
    "{\"instruction\",\"input\",\"output\"} | {\"messages\":[{\"role\",\"content\"}]} | "
    "{\"conversations\":[{\"from\",\"value\"}]}";

json parse_object(std::string_view line) {
  json doc;
  try {
    doc = json::parse(line.begin(), line.end());
  } catch (const json::parse_error& e) {
    // e.byte is 1-based and points just past the offending character.
    throw LineError(LineProblem::kBadJson,
                    "malformed JSON at column " + std::to_string(e.byte) + " (" +
                        std::string(e.what()).substr(std::string(e.what()).find(':') + 2) +
                        "); " + kFormatHint);
  }
  if (!doc.is_object()) {
    throw LineError(LineProblem::kBadJson,
                    std::string("expected a JSON object, got a JSON ") + doc.type_name() + "; " +
                        kFormatHint);
  }
  return doc;
}

std::string keys_of(const json& obj) {
  std::string out;
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    if (!out.empty()) out += ", ";
    out += "\"" + it.key() + "\"";
  }
  return out.empty() ? "none" : out;
}

DataFormat detect_from_object(const json& obj) {
  if (obj.contains("messages") || obj.contains("conversations")) return DataFormat::kChat;
  if (obj.contains("instruction") && obj.contains("output")) return DataFormat::kAlpaca;
  if (obj.contains("prompt") && obj.contains("completion")) return DataFormat::kCompletion;
  if (obj.contains("text")) return DataFormat::kText;
  throw LineError(LineProblem::kUnknownFormat,
                  "cannot tell the data format from the keys " + keys_of(obj) + "; " +
                      kFormatHint + ", or set data.format");
}

// A required (or optional, when `required` is false) string field.
std::string get_string(const json& obj, const char* key, DataFormat format, bool required = true) {
  auto it = obj.find(key);
  if (it == obj.end() || (!required && it->is_null())) {
    if (!required) return {};
    throw LineError(LineProblem::kMissingField,
                    std::string("missing field \"") + key + "\" for format " +
                        std::string(to_string(format)) + " (keys present: " + keys_of(obj) + ")");
  }
  if (!it->is_string()) {
    throw LineError(LineProblem::kWrongType, std::string("field \"") + key +
                                                 "\" must be a string, got a JSON " +
                                                 it->type_name());
  }
  return it->get<std::string>();
}

void require_nonempty(const std::string& value, const char* key) {
  if (value.empty()) {
    throw LineError(LineProblem::kEmpty, std::string("field \"") + key +
                                             "\" is empty: nothing to train on; fill it in or remove the line");
  }
}

// The two spellings of a conversation: OpenAI's `messages` of {role, content} and
// ShareGPT's `conversations` of {from, value}. Both become the same messages.
struct Shape {
  const char* list;     // "messages" | "conversations"
  const char* role;     // "role" | "from"
  const char* content;  // "content" | "value"
};
constexpr Shape kOpenAi{"messages", "role", "content"};
constexpr Shape kShareGpt{"conversations", "from", "value"};

// The chat role of a message's role (OpenAI) or from (ShareGPT) value; "" when unknown.
std::string chat_role(const std::string& value, bool sharegpt) {
  if (value == "system" || value == "user" || value == "assistant") return value;
  if (sharegpt) {
    if (value == "human") return "user";
    if (value == "gpt") return "assistant";
  }
  return "";
}

// Note [chat shapes]: a chat line holds its conversation under "messages"
// ({"role": system | user | assistant, "content"}) or, ShareGPT's spelling,
// under "conversations" ({"from": system | human | gpt, "value"}; "user" and
// "assistant" are accepted there too); not both. A "system" column beside either,
// a string, is prepended as a system message; null or "" means none, and a
// conversation that has its own system message as well is refused (which one
// is meant?). Both shapes then render identically (Note [chat rendering]).
nlohmann::ordered_json get_messages(const json& obj) {
  const bool sharegpt = obj.contains("conversations") && !obj.contains("messages");
  const Shape& shape = sharegpt ? kShareGpt : kOpenAi;
  if (obj.contains("conversations") && obj.contains("messages")) {
    throw LineError(LineProblem::kUnknownFormat,
                    "both \"messages\" and \"conversations\" are given; keep one conversation per line");
  }
  const std::string list = shape.list;
  const std::string pair = std::string("{\"") + shape.role + "\",\"" + shape.content + "\"}";
  auto it = obj.find(list);
  if (it == obj.end()) {
    throw LineError(LineProblem::kMissingField,
                    "missing field \"messages\" (or ShareGPT's \"conversations\") for format chat (keys present: " +
                        keys_of(obj) + ")");
  }
  if (!it->is_array()) {
    throw LineError(LineProblem::kWrongType, "field \"" + list + "\" must be an array of " + pair +
                                                 ", got a JSON " + it->type_name());
  }
  if (it->empty()) {
    throw LineError(LineProblem::kEmpty, "\"" + list + "\" is empty: nothing to train on");
  }
  std::string system;  // the "system" column, "" when absent, null or empty
  if (auto s = obj.find("system"); s != obj.end() && !s->is_null()) {
    if (!s->is_string()) {
      throw LineError(LineProblem::kWrongType,
                      std::string("field \"system\" must be a string, got a JSON ") + s->type_name());
    }
    system = s->get<std::string>();
  }
  nlohmann::ordered_json out = nlohmann::ordered_json::array();
  if (!system.empty()) out.push_back({{"role", "system"}, {"content", system}});
  bool has_assistant = false;
  for (size_t i = 0; i < it->size(); ++i) {
    const json& m = (*it)[i];
    const std::string where = list + "[" + std::to_string(i) + "]";
    if (!m.is_object()) {
      throw LineError(LineProblem::kWrongType, where + " must be an object " + pair + ", got a JSON " +
                                                   m.type_name());
    }
    for (const char* key : {shape.role, shape.content}) {
      auto f = m.find(key);
      if (f == m.end()) {
        throw LineError(LineProblem::kMissingField,
                        where + " has no \"" + key + "\" (keys present: " + keys_of(m) + ")");
      }
      if (!f->is_string()) {
        throw LineError(LineProblem::kWrongType, where + "." + key +
                                                     " must be a string, got a JSON " +
                                                     f->type_name());
      }
    }
    const std::string value = m[shape.role].get<std::string>();
    const std::string role = chat_role(value, sharegpt);
    const std::string content = m[shape.content].get<std::string>();
    if (role.empty()) {
      throw LineError(LineProblem::kBadRole,
                      where + "." + shape.role + " is \"" + value + "\"; expected " +
                          (sharegpt ? "\"system\", \"human\" (or \"user\") or \"gpt\" (or \"assistant\")"
                                    : "\"system\", \"user\" or \"assistant\""));
    }
    if (role == "system" && !system.empty()) {
      throw LineError(LineProblem::kBadRole,
                      "both a \"system\" field and a system message (" + where +
                          ") are given; keep one of them");
    }
    if (role == "assistant") {
      has_assistant = true;
      if (content.empty()) {
        throw LineError(LineProblem::kEmpty, where + " is an assistant message with empty content");
      }
    }
    // role and content first, then what else an OpenAI message carries (name, reasoning_content,
    // tool_calls: some templates render them) as the template would see it from transformers.
    nlohmann::ordered_json msg = {{"role", role}, {"content", content}};
    if (!sharegpt)
      for (auto f = m.begin(); f != m.end(); ++f)
        if (f.key() != "role" && f.key() != "content") msg[f.key()] = f.value();
    out.push_back(std::move(msg));
  }
  if (!has_assistant) {
    throw LineError(LineProblem::kEmpty,
                    "no assistant message: a chat example needs at least one response to train on");
  }
  return out;
}

// Appends text to the last segment when it has the same trained flag, so
// segments alternate between prompt and response (Note [tokenizing with an exact mask]).
void push(std::vector<Segment>& segs, std::string text, bool trained) {
  if (text.empty()) return;
  if (!segs.empty() && segs.back().trained == trained) {
    segs.back().text += text;
  } else {
    segs.push_back({std::move(text), trained});
  }
}

// The built-in formats as Jinja (Note [chat rendering]), parsed once.
std::shared_ptr<const ModelChat> builtin_chat(ChatTemplate kind) {
  static const std::shared_ptr<const ModelChat> llama3 = make_model_chat(
      builtin_chat_template(ChatTemplate::kLlama3), "the built-in llama3 format", nlohmann::ordered_json::object());
  static const std::shared_ptr<const ModelChat> chatml = make_model_chat(
      builtin_chat_template(ChatTemplate::kChatml), "the built-in chatml format", nlohmann::ordered_json::object());
  return kind == ChatTemplate::kLlama3 ? llama3 : chatml;
}

// Note [chat rendering]
// A conversation is rendered by a Jinja chat template (chat_template.h): the model's own, as
// transformers' apply_chat_template renders it, or a built-in format's Jinja spelling:
//   llama3: <|begin_of_text|> then per message
//           <|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|>
//   chatml: per message <|im_start|>ROLE\nCONTENT<|im_end|>\n
// Content is used as written (not trimmed), and no generation prompt is added: the example ends
// after the last turn. The trained runs come from rendering prefixes of the conversation
// (render_chat_spans): an assistant turn is trained from where the generation prompt for it ends
// to its end-of-turn token(s), so the prompt is exactly what an inference server sends and the
// labels end with what generation must stop at. data.train_on picks the turns, and
// data.train_reasoning: false leaves a reply's <think> block untrained.
std::vector<Segment> render_chat(const nlohmann::ordered_json& messages, const ChatRendering& chat) {
  if (!chat.chat) throw InputError("internal: chat template must be resolved before rendering");
  std::vector<Segment> segs;
  const auto spans = [&](const nlohmann::ordered_json& m) {
    return render_chat_spans(chat.chat->tmpl, m, chat.chat->variables, chat.train_on, chat.train_reasoning);
  };
  try {
    for (ChatSpan& s : spans(chat.fold_system_prompt ? fold_system_prompt(messages) : messages))
      push(segs, std::move(s.text), s.trained);
  } catch (const InputError& e) {
    // The template's own raise_exception (roles out of order, a system turn it has no place
    // for) or a conversation it cannot split: one line's problem, so skip_bad_lines may skip it.
    std::string why = e.what();
    if (!chat.fold_system_prompt && starts_with_system(messages)) {
      bool folded_renders = true;
      try {
        spans(fold_system_prompt(messages));
      } catch (const InputError&) {
        folded_renders = false;
      }
      if (folded_renders)
        why += "; the model's chat template has no place for a system message: set data.fold_system_prompt: "
               "true to fold it into the first user turn";
    }
    throw LineError(LineProblem::kBadRole, why);
  }
  return segs;
}

}  // namespace

std::string builtin_chat_template(ChatTemplate kind) {
  switch (kind) {
    case ChatTemplate::kLlama3:
      return "{{ '<|begin_of_text|>' }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
             "'<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
             "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";
    case ChatTemplate::kChatml:
      return "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
             "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
             "{% endif %}";
    default: throw InputError("internal: builtin_chat_template takes llama3 or chatml");
  }
}

std::string alpaca_chat_template() {
  // alpaca_prompt(instruction, "") in Jinja; '\\n' is Jinja's newline escape.
  return "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ 'Below is an instruction "
         "that describes a task. Write a response that appropriately completes the request.\\n\\n### Instruction:\\n' + "
         "message['content'] + '\\n\\n### Response:\\n' }}{% elif message['role'] == 'assistant' %}{{ "
         "message['content'] + eos_token }}{% endif %}{% endfor %}";
}

DataFormat detect_format(std::string_view json_line) {
  return detect_from_object(parse_object(json_line));
}

RenderedExample render_line(std::string_view json_line, DataFormat format, ChatTemplate builtin) {
  ChatRendering chat;
  if (builtin == ChatTemplate::kLlama3 || builtin == ChatTemplate::kChatml) {
    chat.kind = builtin;
    chat.chat = builtin_chat(builtin);
  }
  return render_line(json_line, format, chat);
}

RenderedExample render_line(std::string_view json_line, DataFormat format, const ChatRendering& chat) {
  const json obj = parse_object(json_line);
  RenderedExample out;
  out.format = format == DataFormat::kAuto ? detect_from_object(obj) : format;
  switch (out.format) {
    case DataFormat::kText: {
      std::string text = get_string(obj, "text", out.format);
      require_nonempty(text, "text");
      push(out.segments, std::move(text), true);
      out.append_eos = true;
      break;
    }
    case DataFormat::kCompletion: {
      std::string prompt = get_string(obj, "prompt", out.format);
      std::string completion = get_string(obj, "completion", out.format);
      require_nonempty(completion, "completion");
      push(out.segments, std::move(prompt), false);
      push(out.segments, std::move(completion), true);
      out.append_eos = true;
      break;
    }
    case DataFormat::kAlpaca: {
      std::string instruction = get_string(obj, "instruction", out.format);
      std::string input = get_string(obj, "input", out.format, /*required=*/false);
      std::string output = get_string(obj, "output", out.format);
      require_nonempty(instruction, "instruction");
      require_nonempty(output, "output");
      push(out.segments, alpaca_prompt(instruction, input), false);
      push(out.segments, std::move(output), true);
      out.append_eos = true;
      break;
    }
    case DataFormat::kChat: {
      out.segments = render_chat(get_messages(obj), chat);
      out.append_eos = false;
      out.add_bos = chat.kind != ChatTemplate::kModel;
      break;
    }
    case DataFormat::kAuto: break;  // unreachable: resolved above
  }
  return out;
}

ChatTemplate resolve_chat_template(ChatTemplate requested, const Tokenizer& tokenizer) {
  const bool has_llama3 = tokenizer.token_id(kLlama3HeaderStart).has_value();
  const bool has_chatml = tokenizer.token_id(kChatmlStart).has_value();
  if (requested == ChatTemplate::kAuto) {
    if (has_llama3) return ChatTemplate::kLlama3;
    if (has_chatml) return ChatTemplate::kChatml;
    throw InputError(
        "data.chat_template: auto: the model has no chat template of its own (chat_template.jinja or "
        "tokenizer_config.json's \"chat_template\") and its tokenizer has neither <|start_header_id|> (Llama 3) "
        "nor <|im_start|> (ChatML); add the template you will serve with, or set data.chat_template to llama3 "
        "or chatml");
  }
  // Without its special tokens a template would be tokenized as plain text:
  // the model would learn to spell the markers instead of using them.
  const std::vector<const char*> needed =
      requested == ChatTemplate::kLlama3
          ? std::vector<const char*>{kLlama3Begin, kLlama3HeaderStart, kLlama3HeaderEnd, kLlama3Eot}
          : std::vector<const char*>{kChatmlStart, kChatmlEnd};
  for (const char* tok : needed) {
    if (!tokenizer.token_id(tok)) {
      throw InputError(std::string("data.chat_template: ") + std::string(to_string(requested)) +
                       " needs the special token " + tok +
                       ", which the tokenizer does not have; choose the template of this model "
                       "(llama3 or chatml) or auto");
    }
  }
  return requested;
}

ChatRendering resolve_chat(ChatTemplate requested, TrainOn train_on, bool train_reasoning, const Tokenizer& tokenizer,
                           std::shared_ptr<const ModelChat> model_chat, const std::string& model_dir) {
  ChatRendering out;
  out.train_on = train_on;
  out.train_reasoning = train_reasoning;
  if (requested == ChatTemplate::kModel || (requested == ChatTemplate::kAuto && model_chat)) {
    if (!model_chat) {
      throw InputError("data.chat_template: model, but " +
                       (model_dir.empty() ? std::string("the tokenizer was not read from a model directory")
                                          : model_dir + " has neither chat_template.jinja nor a \"chat_template\" in "
                                                        "tokenizer_config.json") +
                       "; add the template the model will be served with, or set data.chat_template to llama3 or "
                       "chatml");
    }
    out.kind = ChatTemplate::kModel;
    out.chat = std::move(model_chat);
    return out;
  }
  out.kind = resolve_chat_template(requested, tokenizer);
  out.chat = builtin_chat(out.kind);
  return out;
}

namespace {

bool starts_with(const std::vector<int32_t>& ids, const std::vector<int32_t>& prefix) {
  return prefix.size() <= ids.size() && std::equal(prefix.begin(), prefix.end(), ids.begin());
}

void append(TokenizedExample& out, const std::vector<int32_t>& ids, size_t begin, size_t end,
            bool trained) {
  for (size_t i = begin; i < end; ++i) {
    out.input_ids.push_back(ids[i]);
    out.labels.push_back(trained ? ids[i] : kIgnoreIndex);
  }
}

}  // namespace

TokenizedExample tokenize_example(const RenderedExample& example, const Tokenizer& tokenizer,
                                  bool train_on_inputs) {
  TokenizedExample out;
  const std::vector<Segment>& segs = example.segments;
  std::string text;
  for (const Segment& seg : segs) text += seg.text;
  const std::vector<int32_t> whole = tokenizer.encode(text);
  if (train_on_inputs) {
    append(out, whole, 0, whole.size(), true);  // every token trained: no boundary to keep
  } else {
    // Note [tokenizing with an exact mask]: whole string when every segment
    // boundary is a token boundary of it.
    std::vector<size_t> ends;  // where each segment ends in `whole`
    std::string prefix;
    bool whole_ok = true;
    for (size_t i = 0; i + 1 < segs.size() && whole_ok; ++i) {
      prefix += segs[i].text;
      const std::vector<int32_t> ids = tokenizer.encode(prefix);
      whole_ok = starts_with(whole, ids) && (ends.empty() || ids.size() >= ends.back());
      ends.push_back(ids.size());
    }
    if (whole_ok) {
      ends.push_back(whole.size());
      size_t begin = 0;
      for (size_t i = 0; i < segs.size(); ++i) {
        append(out, whole, begin, ends[i], segs[i].trained);
        begin = ends[i];
      }
    } else {
      out.segment_wise = true;
      for (const Segment& seg : segs) {
        const std::vector<int32_t> ids = tokenizer.encode(seg.text);
        append(out, ids, 0, ids.size(), seg.trained);
      }
    }
  }
  const int32_t bos = tokenizer.bos_id();
  if (example.add_bos && tokenizer.add_bos() && bos >= 0 && (out.input_ids.empty() || out.input_ids[0] != bos)) {
    out.input_ids.insert(out.input_ids.begin(), bos);
    out.labels.insert(out.labels.begin(), kIgnoreIndex);
  }
  if (example.append_eos) {
    const int32_t eos = tokenizer.eos_id();
    if (eos < 0) {
      throw InputError("the tokenizer has no eos token, which format " +
                       std::string(to_string(example.format)) +
                       " appends to every example; use a model directory whose "
                       "tokenizer_config.json names eos_token");
    }
    // eos ends the response, so it is trained exactly when the response is.
    const bool trained = train_on_inputs || (!example.segments.empty() && example.segments.back().trained);
    out.input_ids.push_back(eos);
    out.labels.push_back(trained ? eos : kIgnoreIndex);
  }
  if (!out.labels.empty()) out.labels[0] = kIgnoreIndex;  // Note [labels are unshifted]
  return out;
}

int64_t count_trained(const TokenizedExample& example) {
  int64_t n = 0;
  for (int32_t l : example.labels) n += l != kIgnoreIndex;
  return n;
}

}  // namespace qlora::data
