// data/dataset: a JSONL file -> tokenized, masked, truncated examples, with a
// summary of everything that was cut, skipped or ignored (never silent).
//
// Lines: a UTF-8 byte-order mark on the first line is dropped; CRLF endings are
// accepted; blank (whitespace-only) lines are ignored and counted. Every other
// line is one example. A bad line (LineProblem) throws InputError
// "<file>:<line>: <problem>; <what to do>" unless data.skip_bad_lines, which
// skips it and counts it per reason. A file with no usable example is an error.
//
// Truncation keeps the first max_seq_length tokens. An example whose trained
// labels are all cut off is a LineProblem::kTooLong (error, or skipped and
// counted as `dropped_too_long`).
//
// The eval split (a separate file, or a seeded fraction of the training file)
// is here too. Torch-free.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "qlora/config/config.h"
#include "qlora/data/format.h"

namespace qlora::data {

class Tokenizer;

// ---------------------------------------------------------------- summary

struct DataSummary {
  std::string source;            // file name (or a label for in-memory text)
  DataFormat format = DataFormat::kAuto;          // the format used (detected or configured)
  ChatTemplate chat_template = ChatTemplate::kAuto;  // resolved, for chat only
  // For chat: the template rendered (its Jinja source and where it came from, "the built-in
  // chatml format" for a built-in) and the text that ends an assistant turn ("" when unknown).
  std::string chat_template_text;
  std::string chat_template_origin;
  std::string end_of_turn;
  int64_t lines = 0;             // physical lines read
  int64_t blank_lines = 0;       // ignored
  int64_t examples = 0;          // kept
  int64_t truncated = 0;         // kept, but cut to max_seq_length
  int64_t segment_wise = 0;      // kept, tokenized segment-wise (Note [tokenizing with an exact mask])
  int64_t dropped_too_long = 0;  // skipped: no trained label left after truncation
  // Lines skipped per LineProblem (index = static_cast<int>(problem)), with
  // skip_bad_lines; kTooLong is counted here too (equal to dropped_too_long).
  std::array<int64_t, kNumLineProblems> skipped{};
  int64_t tokens = 0;            // input tokens over the kept examples
  int64_t trained_tokens = 0;    // of which carry labels
  int64_t longest = 0;           // longest kept example, in tokens (after truncation)

  int64_t skipped_total() const;
  // One human-readable paragraph: "train.jsonl: 3000 examples (alpaca), ...".
  std::string describe() const;
};

// ---------------------------------------------------------------- loading

struct Dataset {
  std::vector<TokenizedExample> examples;
  DataSummary summary;
};

struct LoadOptions {
  DataFormat format = DataFormat::kAuto;
  ChatTemplate chat_template = ChatTemplate::kAuto;
  TrainOn train_on = TrainOn::kAllAssistant;
  bool train_reasoning = true;
  bool fold_system_prompt = false;
  // Where the model's chat template is looked for (chat_template.jinja, tokenizer_config.json);
  // "" : the directory of the tokenizer's file.
  std::string chat_template_dir;
  int64_t max_seq_length = 2048;
  bool train_on_inputs = false;
  bool skip_bad_lines = false;

  static LoadOptions from(const DataConfig& cfg);
};

// Reads and tokenizes a JSONL file. Throws InputError (file missing or
// unreadable, bad lines, no usable example).
Dataset load_jsonl(const std::string& path, const LoadOptions& options, const Tokenizer& tokenizer);

// The same from text in memory; `source` names it in messages.
Dataset load_jsonl_text(std::string_view text, std::string_view source, const LoadOptions& options,
                        const Tokenizer& tokenizer);

// ---------------------------------------------------------------- eval split

struct TrainEval {
  Dataset train;
  Dataset eval;  // empty (no examples) when there is no evaluation data
};

// data.eval_path set: train = data.path, eval = data.eval_path.
// Otherwise, eval_ratio > 0: eval = round(ratio * n) examples (at least 1),
// chosen by the seeded permutation of Note [seeded shuffle] with stream
// kEvalSplitStream; both parts keep file order. Throws InputError when the
// split would leave either part empty or both eval_path and eval_ratio are set.
TrainEval load_train_eval(const DataConfig& cfg, uint64_t seed, const Tokenizer& tokenizer);

// The split on its own (for tests and for callers with a Dataset in hand).
TrainEval split_eval(Dataset all, double eval_ratio, uint64_t seed);

}  // namespace qlora::data
