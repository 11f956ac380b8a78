// train/eval: held-out loss and exact-match accuracy with greedy generation.
//
// Two numbers a practitioner reads to see whether a fine-tune works:
//   loss         token mean of the cross-entropy over every held-out example
//                (labels as in training: only the response tokens count);
//   exact match  for each held-out example, the prompt (the tokens before its
//                first trained label) is continued greedily until a stop token
//                or max_new_tokens; the example counts when the generated text
//                equals the reference response (both decoded, surrounding
//                whitespace trimmed). Examples whose response was truncated
//                by max_seq_length are left out of this number.
// Generation runs the whole sequence each new token (no KV cache): fine for
// evaluation of short answers, not a serving path. Prompts of one batch are
// left-padded; each row's positions start at 0 at its first real token, so a
// row generates exactly what it would alone.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/data/format.h"

namespace qlora {
namespace model {
class DecoderModel;
}
namespace data {
class Tokenizer;
}
}  // namespace qlora

namespace qlora::train {

struct EvalOptions {
  int64_t batch_size = 8;          // examples per forward pass
  int64_t loss_chunk = 1024;       // tokens per chunk of the cross-entropy
  int64_t generate_examples = 64;  // exact match over the first N examples (0: skip)
  int64_t max_new_tokens = 32;     // generation cap per example (also: reference length + 2)
  int64_t samples = 3;             // generated answers kept in EvalResult::samples
  std::vector<int32_t> stop_ids;   // where an answer ends; empty: stop_token_ids(tokenizer)
};

// One generated answer beside its reference, for showing what the model says.
struct EvalSample {
  int64_t index = 0;      // of the example in the evaluated set
  std::string prompt;     // its prompt's last 160 bytes, decoded (what the answer follows)
  std::string answer;     // decoded as generated (exact match compares it trimmed)
  std::string reference;  // decoded and trimmed
};

struct EvalResult {
  double loss = 0.0;         // token mean over `tokens`
  int64_t tokens = 0;        // target tokens counted
  int64_t examples = 0;      // examples in the loss
  int64_t generated = 0;     // examples generated for exact match
  int64_t exact = 0;         // of which exactly right
  double seconds = 0.0;
  std::vector<EvalSample> samples;  // the first EvalOptions::samples generated examples

  double accuracy() const { return generated > 0 ? static_cast<double>(exact) / static_cast<double>(generated) : 0.0; }
};

// Greedy continuation of each prompt (token ids), stopping a row at any of
// `stop_ids` (the stop token is not returned) or after max_new_tokens.
std::vector<std::vector<int32_t>> greedy_generate(const model::DecoderModel& model,
                                                  const std::vector<std::vector<int32_t>>& prompts,
                                                  const std::vector<int32_t>& stop_ids, int64_t max_new_tokens);

// metrics.jsonl's line for an evaluation at `step`: {"type": "eval", "step", "loss", ...,
// "samples": [{"index", "prompt", "answer", "reference"}]}.
nlohmann::json eval_metrics_json(int64_t step, const EvalResult& r);

// "  sample: \"...prompt\" -> \"answer\" (reference \"...\")" for the log; "" without a sample.
std::string format_eval_sample(const EvalResult& r);

// The ids that end a response for this tokenizer: eos, and <|eot_id|> /
// <|end_of_text|> / <|im_end|> / </s> where the vocabulary has them.
std::vector<int32_t> stop_token_ids(const data::Tokenizer& tokenizer);

// Loss and exact match of `model` on `examples` (no gradients; LoRA dropout is
// the caller's business: set the adapter to eval mode first).
EvalResult evaluate(const model::DecoderModel& model, const data::Tokenizer& tokenizer,
                    const std::vector<data::TokenizedExample>& examples, const EvalOptions& options = {});

// "eval loss 1.2345 | exact match 12/64 (18.8%) | 3.1 s"
std::string format_eval_line(const EvalResult& r);

}  // namespace qlora::train
