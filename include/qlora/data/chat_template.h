// data/chat_template: a model's own chat template (tokenizer_config.json's `chat_template`,
// a Jinja program) rendered exactly as transformers' apply_chat_template renders it.
//
// The engine is minja (third_party/minja, Note [chat template engine] in
// src/data/chat_template.cpp), run with transformers' settings: trim_blocks and lstrip_blocks
// on, the template's trailing newline dropped, `tojson` without ASCII escaping,
// `raise_exception`, `strftime_now` on an injectable clock, `namespace`; `tools` and
// `documents` are None. A construct whose meaning the engine might get wrong is refused at
// parse time with an InputError naming it and its line: a template renders exactly or not at
// all. The template's own raise_exception is an InputError carrying its message.
//
// find_model_chat_template finds a model directory's template and the special-token variables
// transformers passes with it; load_model_chat parses it for the data pipeline (format.h), which
// renders the built-in formats (llama3, chatml) through their Jinja spelling here too.
#pragma once

#include <ctime>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/common/errors.h"
#include "qlora/config/config.h"

namespace qlora::data {

// ---------------------------------------------------------------- the clock

// The local time `strftime_now` formats. The default reads the system clock; tests fix it.
using ChatClock = std::function<std::tm()>;
ChatClock system_chat_clock();

// ---------------------------------------------------------------- one template

// Named for what it renders: format.h's `ChatTemplate` is the built-in format choice.
class ModelChatTemplate {
 public:
  // Parses `text`; `origin` (a file name, "tokenizer_config.json's chat_template") opens
  // every error message. Throws InputError on a syntax error or a refused construct.
  static ModelChatTemplate parse(const std::string& text, const std::string& origin);

  // `messages`: an array of {"role", "content", ...}; `extra`: an object of further variables
  // (bos_token, eos_token, date_string, enable_thinking, ...), which may not redefine
  // messages or add_generation_prompt. Ordered JSON because key order is visible: Python
  // dicts keep it, and `tojson` or `.items()` show it. Throws InputError when the template
  // raises or fails.
  std::string render(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                     const nlohmann::ordered_json& extra = nlohmann::ordered_json::object()) const;

  void set_clock(ChatClock clock);
  const std::string& origin() const;

  ModelChatTemplate(ModelChatTemplate&&) noexcept;
  ModelChatTemplate& operator=(ModelChatTemplate&&) noexcept;
  ~ModelChatTemplate();

 private:
  struct Impl;
  explicit ModelChatTemplate(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// ---------------------------------------------------------------- what is trained

// Which parts carry labels: config.h's TrainOn (data.train_on).


struct ChatSpan {
  std::string text;
  bool trained = false;
};

// The conversation as `tmpl` renders it (no generation prompt), cut into runs that are trained
// or not. An assistant turn's trained run starts where the template's generation prompt for it
// ends (the rendering of the turns before it with add_generation_prompt; where that prompt adds
// text the rendered turn lacks, such as DeepSeek-R1's "<think>\n", where the two part) and ends
// where the rendering of the conversation up to that turn ends, less trailing whitespace (the
// newline a template writes after an end-of-turn token is never generated) and less what the
// template writes only after the last message (Phi-3's eos_token after "<|end|>", found by a
// probe: it stays untrained, so every turn is learned to stop at its own end-of-turn token).
// Where a template renders a turn differently once later turns follow (Qwen3 gives only the
// last turn an empty <think> block and drops past reasoning), the turn is trained as the whole
// rendering shows it: up to its end-of-turn token (find_end_of_turn), which must follow the
// reply's own text. A turn found neither way is an InputError naming the turn and the
// data.train_on that avoids it. The runs concatenate to the whole rendering.
// With `train_reasoning` false, a "<think>...</think>" block inside a trained run (Qwen3,
// DeepSeek-R1; with the whitespace after it) is left untrained: the answer is learned, the
// reasoning the template shows is not.
std::vector<ChatSpan> render_chat_spans(const ModelChatTemplate& tmpl, const nlohmann::ordered_json& messages,
                                        const nlohmann::ordered_json& variables, TrainOn train_on,
                                        bool train_reasoning = true);

// For templates with no place for a system message (Gemma's raise "System role not supported"):
// a leading system message folded into the first user turn, "<system>\n\n<user>" (a user turn of
// its own when none follows). Other conversations are returned as they are.
nlohmann::ordered_json fold_system_prompt(const nlohmann::ordered_json& messages);
bool starts_with_system(const nlohmann::ordered_json& messages);

// ---------------------------------------------------------------- a model directory's template

// A model's template as transformers' tokenizer loads it, with the variables it passes beside
// `messages`: each special token tokenizer_config.json names (bos_token, eos_token, unk_token,
// pad_token, sep_token, cls_token, mask_token; a string or an AddedToken object's content).
struct ModelChatTemplateSource {
  std::string text;                   // the Jinja source
  std::string origin;                 // "<dir>/chat_template.jinja" or "<dir>/tokenizer_config.json"
  nlohmann::ordered_json variables;   // {"bos_token": "<s>", ...}
};

// chat_template.jinja in `model_dir` when present (what transformers 4.43+ saves, and what it
// prefers), else tokenizer_config.json's "chat_template": a string, or a list of {"name",
// "template"} from which the one named "default" is taken. nullopt when the model has neither.
// InputError naming the file and key for a malformed value (a list without "default" names the
// templates it has).
std::optional<ModelChatTemplateSource> find_model_chat_template(const std::string& model_dir);

// ---------------------------------------------------------------- a template ready for training data

// A parsed template with the variables it renders with, where it came from, and the text that
// ends an assistant turn (what generation must stop at).
struct ModelChat {
  ModelChatTemplate tmpl;
  nlohmann::ordered_json variables;  // bos_token, eos_token, ...
  std::string text;                  // the Jinja source (written beside adapters and merged models)
  std::string origin;                // a file, or "the built-in llama3 format"
  std::string end_of_turn;           // "<|im_end|>", "<|eot_id|>", "</s>"; "" when none is found
};

// The model directory's template (find_model_chat_template), parsed; nullptr when it has none.
std::shared_ptr<const ModelChat> load_model_chat(const std::string& model_dir);

// A ModelChat from Jinja text (the built-in formats, tests). `variables` as ModelChat's.
std::shared_ptr<const ModelChat> make_model_chat(const std::string& text, const std::string& origin,
                                                 nlohmann::ordered_json variables);

// The text after an assistant reply that its turn trains with: what a template writes between the
// reply and the end of the turn, found by rendering a two-message probe ("" when the template
// refuses the probe or writes nothing there).
std::string find_end_of_turn(const ModelChatTemplate& tmpl, const nlohmann::ordered_json& variables);

}  // namespace qlora::data
