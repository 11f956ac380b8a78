// data/format: one JSONL line -> the text segments of one training example,
// and segments -> token ids with labels.
//
// Formats (one JSON object per line; extra keys are ignored):
//   text        {"text": "..."}                       every token trained
//   completion  {"prompt": "...", "completion": "..."}
//   alpaca      {"instruction": "...", "input": "..." (optional, may be empty), "output": "..."}
//               rendered with the Stanford Alpaca prompt (Note [Alpaca prompt])
//   chat        {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
//               or ShareGPT's spelling of the same conversation:
//               {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}
//               ("user" / "assistant" accepted as `from` too); either may carry a
//               "system": "..." column, prepended as the system message (Note [chat shapes]).
//               Rendered with the model's own chat template or a built-in format, the
//               trained runs found by rendering prefixes (Note [chat rendering])
// `auto` detects the format from the first valid line's keys; every later line
// must then carry that format's fields.
//
// Masking: with train_on_inputs false only the response (completion, alpaca
// output, assistant content and its end-of-turn token, as data.train_on says)
// carries labels; the rest is kIgnoreIndex. The mask boundary is exact: every token is wholly prompt or
// wholly response (Note [tokenizing with an exact mask]).
//
// This header is torch-free and JSON-library-free (chat templates: chat_template.h).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "qlora/common/errors.h"
#include "qlora/config/config.h"

namespace qlora::data {

class Tokenizer;
struct ModelChat;  // chat_template.h

// Label value the loss ignores (the PyTorch / Hugging Face convention).
inline constexpr int32_t kIgnoreIndex = -100;

// ---------------------------------------------------------------- problems with one line

// Why a line was rejected; the summary counts skipped lines per reason.
enum class LineProblem {
  kBadJson,         // not a JSON object
  kUnknownFormat,   // auto detection found none of the known key sets
  kMissingField,    // a field of the format is absent
  kWrongType,       // a field has the wrong JSON type
  kEmpty,           // nothing to learn from (empty text / response / messages)
  kBadRole,         // a chat message role other than system, user, assistant
  kTooLong,         // no trained token survives truncation to max_seq_length
};
inline constexpr int kNumLineProblems = 7;
std::string_view to_string(LineProblem p);

// A rejected line. The loader prefixes "<file>:<line>: " and may skip it
// (data.skip_bad_lines) instead of throwing it.
class LineError : public InputError {
 public:
  LineError(LineProblem problem, const std::string& message)
      : InputError(message), problem_(problem) {}
  LineProblem problem() const { return problem_; }

 private:
  LineProblem problem_;
};

// ---------------------------------------------------------------- rendering

struct Segment {
  std::string text;
  bool trained = false;  // carries labels when train_on_inputs is false
};

// A parsed and rendered line: its format and segments, plus whether the
// tokenized sequence ends with eos (text, completion, alpaca; chat ends with
// its own end-of-turn token instead) and whether bos may be prepended (not for a
// model's chat template, which writes bos itself where the model wants it).
struct RenderedExample {
  DataFormat format = DataFormat::kAuto;
  std::vector<Segment> segments;
  bool append_eos = false;
  bool add_bos = true;
};

// How chat lines are rendered and what of them is trained.
struct ChatRendering {
  ChatTemplate kind = ChatTemplate::kAuto;  // resolved: llama3, chatml or model
  std::shared_ptr<const ModelChat> chat;    // the template (the built-ins' Jinja spelling too)
  TrainOn train_on = TrainOn::kAllAssistant;
  bool train_reasoning = true;
  bool fold_system_prompt = false;  // data.fold_system_prompt (data/chat_template.h: fold_system_prompt)
};

// The Jinja spelling of a built-in format (kLlama3, kChatml): rendered by the same engine as a
// model's template, and written beside adapters so the tuned model is served with it.
std::string builtin_chat_template(ChatTemplate kind);

// A chat template that prompts as alpaca training did: a user turn becomes the Alpaca prompt
// (no input) after bos, an assistant turn its text and eos. Written beside adapters trained on
// alpaca data, so `qlora chat` and transformers prompt the tuned model the same way.
std::string alpaca_chat_template();

// Note [Alpaca prompt]: the wording of Stanford Alpaca's two prompts (with and
// without input), with one newline after "### Response:" so the response
// starts on its own line (as Alpaca-LoRA does): the prompt/response boundary is
// then also a pre-tokenizer boundary, which keeps segment-wise tokenization
// equal to whole-string tokenization for byte-level BPE.
std::string alpaca_prompt(std::string_view instruction, std::string_view input);

// The format a JSON line's keys indicate (never kAuto); throws LineError
// kBadJson / kUnknownFormat.
DataFormat detect_format(std::string_view json_line);

// Parses one JSON line as `format` (kAuto: detect) and renders it with `chat`
// (resolved; used by chat only). Throws LineError describing the problem and
// what to do (no file:line).
RenderedExample render_line(std::string_view json_line, DataFormat format, const ChatRendering& chat);
// The same with a built-in format (kLlama3 or kChatml) and the default spans.
RenderedExample render_line(std::string_view json_line, DataFormat format, ChatTemplate builtin);

// Picks the built-in chat format: `requested` when set; for kAuto, llama3 when the
// tokenizer knows <|start_header_id|>, chatml when it knows <|im_start|>,
// otherwise InputError asking to set data.chat_template. Also checks that the
// tokenizer has the format's special tokens.
ChatTemplate resolve_chat_template(ChatTemplate requested, const Tokenizer& tokenizer);

// The whole choice: kModel, and kAuto when `model_chat` is given (the model's own template,
// load_model_chat of the tokenizer's directory), render with the model's template; otherwise
// a built-in as resolve_chat_template picks it. kModel without a template is an InputError
// naming `model_dir` and the alternatives.
ChatRendering resolve_chat(ChatTemplate requested, TrainOn train_on, bool train_reasoning, const Tokenizer& tokenizer,
                           std::shared_ptr<const ModelChat> model_chat, const std::string& model_dir);

// ---------------------------------------------------------------- tokenizing

struct TokenizedExample {
  std::vector<int32_t> input_ids;
  std::vector<int32_t> labels;  // same length; kIgnoreIndex where not trained
  int64_t line = 0;             // 1-based source line, for messages
  bool truncated = false;       // was cut to max_seq_length
  bool segment_wise = false;    // fell back to segment-wise tokenization

  int64_t size() const { return static_cast<int64_t>(input_ids.size()); }
};

// Note [labels are unshifted]: labels[i] is the id of token i itself (the
// Hugging Face convention); the loss compares logits at i with labels[i + 1].
// labels[0] is always kIgnoreIndex: no token precedes it, and in a packed row
// it keeps the last token of one example from being trained to predict the
// first token of the next.
//
// Note [tokenizing with an exact mask]: an example is a list of segments
// (runs of text that are all prompt or all response). Two ways to tokenize it:
//  - whole string: encode the concatenation. This is the tokenization the
//    tokenizer itself gives the text (e.g. "\n5" -> "<0x0A>", "5" with
//    sentencepiece), but a token may straddle a prompt/response boundary.
//  - segment-wise: encode each segment alone and concatenate. Every token is
//    wholly prompt or response, but the ids can differ from whole-string ones
//    at boundaries (sentencepiece adds its dummy-prefix space to each segment:
//    the response "5" becomes "▁5", which the model never sees at inference).
// We use the whole string when every boundary is also a token boundary of it,
// checked by encoding each prefix ending at a boundary and requiring its ids
// to be a prefix of the whole string's ids (then the prompt tokens are exactly
// what the prompt alone encodes to at inference, and the mask is exact).
// Otherwise (a token straddles a boundary) we fall back to segment-wise for
// that example and flag it (TokenizedExample::segment_wise; the summary counts
// them). Our templates end prompts with a newline or a special token, so the
// fallback is rare. Cost: one extra encode per boundary.
//
// bos is prepended when tokenizer.add_bos() and the first id is not already bos
// (Llama 3 chat starts with <|begin_of_text|>); eos is appended when
// example.append_eos. No truncation here.
TokenizedExample tokenize_example(const RenderedExample& example, const Tokenizer& tokenizer,
                                  bool train_on_inputs);

// Number of labels that are not kIgnoreIndex.
int64_t count_trained(const TokenizedExample& example);

}  // namespace qlora::data
