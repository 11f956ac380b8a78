#include "qlora/train/eval.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string_view>

#include "qlora/common/text.h"
#include "qlora/data/batch.h"
#include "qlora/data/tokenizer.h"
#include "qlora/model/decoder.h"
#include "qlora/model/loss.h"
#include "qlora/train/generate.h"
#include "qlora/train/trainer.h"

namespace qlora::train {
namespace {

// Generated tokens allowed beyond the reference's length (whitespace the
// comparison trims, then the stop token).
constexpr int64_t kSlackTokens = 2;

size_t first_trained(const data::TokenizedExample& e) {
  for (size_t i = 0; i < e.labels.size(); ++i)
    if (e.labels[i] != data::kIgnoreIndex) return i;
  return e.labels.size();
}

std::vector<int32_t> strip_stops(std::vector<int32_t> ids, const std::vector<int32_t>& stops) {
  while (!ids.empty() && std::find(stops.begin(), stops.end(), ids.back()) != stops.end()) ids.pop_back();
  return ids;
}

}  // namespace

std::vector<int32_t> stop_token_ids(const data::Tokenizer& tokenizer) {
  std::vector<int32_t> ids;
  if (tokenizer.eos_id() >= 0) ids.push_back(tokenizer.eos_id());
  for (std::string_view t : {"<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "</s>"})
    if (auto id = tokenizer.token_id(t); id && std::find(ids.begin(), ids.end(), *id) == ids.end()) ids.push_back(*id);
  return ids;
}

std::vector<std::vector<int32_t>> greedy_generate(const model::DecoderModel& model,
                                                  const std::vector<std::vector<int32_t>>& prompts,
                                                  const std::vector<int32_t>& stop_ids, int64_t max_new_tokens) {
  SamplingOptions o;
  o.max_new_tokens = max_new_tokens;
  o.stop_ids = stop_ids;
  std::vector<std::vector<int32_t>> out(prompts.size());
  std::vector<std::vector<int32_t>> nonempty;
  std::vector<size_t> where;
  for (size_t i = 0; i < prompts.size(); ++i)
    if (!prompts[i].empty()) {
      nonempty.push_back(prompts[i]);
      where.push_back(i);
    }
  const auto gen = generate(model, nonempty, o);
  for (size_t i = 0; i < where.size(); ++i) out[where[i]] = gen[i];
  return out;
}

EvalResult evaluate(const model::DecoderModel& model, const data::Tokenizer& tokenizer,
                    const std::vector<data::TokenizedExample>& examples, const EvalOptions& options) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = Clock::now();
  at::NoGradGuard no_grad;
  EvalResult r;
  const int32_t pad = data::choose_pad_id(tokenizer.pad_id(), tokenizer.eos_id());
  const auto n = static_cast<int64_t>(examples.size());
  const int64_t bs = std::max<int64_t>(1, options.batch_size);

  // Loss: the training loss on padded batches, summed over every example.
  double sum = 0.0;
  for (int64_t i = 0; i < n; i += bs) {
    std::vector<int64_t> idx;
    for (int64_t j = i; j < std::min(n, i + bs); ++j) idx.push_back(j);
    const data::Batch batch = data::collate_padded(examples, idx, pad);
    auto [loss_sum, count] = batch_loss(model, batch, options.loss_chunk);
    sum += loss_sum.item<double>();
    r.tokens += count;
  }
  r.examples = n;
  r.loss = r.tokens > 0 ? sum / static_cast<double>(r.tokens) : 0.0;

  // Exact match: greedy answers to the first generate_examples prompts.
  const std::vector<int32_t> stops = options.stop_ids.empty() ? stop_token_ids(tokenizer) : options.stop_ids;
  std::vector<size_t> chosen;  // indices into examples
  for (size_t i = 0; i < examples.size(); ++i) {
    if (static_cast<int64_t>(chosen.size()) >= options.generate_examples) break;
    const auto& e = examples[i];
    const size_t k = first_trained(e);
    if (!e.truncated && k > 0 && k < e.input_ids.size()) chosen.push_back(i);
  }
  for (size_t i = 0; i < chosen.size(); i += static_cast<size_t>(bs)) {
    std::vector<std::vector<int32_t>> prompts;
    std::vector<std::string> refs;
    // An answer longer than the reference plus a little whitespace cannot
    // match: stop there instead of at max_new_tokens (a fresh model never
    // says its stop token, and would otherwise always run to the cap).
    int64_t budget = 0;
    for (size_t j = i; j < std::min(chosen.size(), i + static_cast<size_t>(bs)); ++j) {
      const auto& e = examples[chosen[j]];
      const size_t k = first_trained(e);
      prompts.emplace_back(e.input_ids.begin(), e.input_ids.begin() + static_cast<std::ptrdiff_t>(k));
      const std::vector<int32_t> ref =
          strip_stops({e.input_ids.begin() + static_cast<std::ptrdiff_t>(k), e.input_ids.end()}, stops);
      budget = std::max<int64_t>(budget, static_cast<int64_t>(ref.size()) + kSlackTokens);
      refs.push_back(std::string(trim(tokenizer.decode(ref))));
    }
    const auto answers = greedy_generate(model, prompts, stops, std::min(budget, options.max_new_tokens));
    for (size_t j = 0; j < answers.size(); ++j) {
      ++r.generated;
      std::string answer = tokenizer.decode(answers[j]);
      if (trim(answer) == refs[j]) ++r.exact;
      if (static_cast<int64_t>(r.samples.size()) < options.samples) {
        std::string prompt = tokenizer.decode(prompts[j]);
        if (prompt.size() > 160) {  // the tail, from a character's first byte (JSON wants whole UTF-8)
          size_t from = prompt.size() - 160;
          while (from < prompt.size() && (static_cast<unsigned char>(prompt[from]) & 0xC0) == 0x80) ++from;
          prompt = "..." + prompt.substr(from);
        }
        r.samples.push_back({static_cast<int64_t>(chosen[i + j]), std::move(prompt), std::move(answer), refs[j]});
      }
    }
  }
  r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return r;
}

nlohmann::json eval_metrics_json(int64_t step, const EvalResult& r) {
  using json = nlohmann::json;
  json samples = json::array();
  for (const EvalSample& s : r.samples)
    samples.push_back({{"index", s.index}, {"prompt", s.prompt}, {"answer", s.answer}, {"reference", s.reference}});
  return json{{"type", "eval"},          {"step", step},           {"loss", r.loss},
              {"tokens", r.tokens},      {"examples", r.examples}, {"exact_match", r.exact},
              {"generated", r.generated}, {"accuracy", r.accuracy()}, {"seconds", r.seconds},
              {"samples", samples}};
}

std::string format_eval_sample(const EvalResult& r) {
  if (r.samples.empty()) return "";
  const EvalSample& s = r.samples.front();
  const auto one_line = [](std::string t) {
    for (char& c : t)
      if (c == '\n' || c == '\r') c = ' ';
    return "\"" + t + "\"";
  };
  return "  sample: " + one_line(s.prompt) + " -> " + one_line(s.answer) + " (reference " + one_line(s.reference) + ")";
}

std::string format_eval_line(const EvalResult& r) {
  char buf[200];
  std::snprintf(buf, sizeof buf, "eval loss %.4f | exact match %lld/%lld (%.1f%%) | %.1f s", r.loss,
                static_cast<long long>(r.exact), static_cast<long long>(r.generated), 100.0 * r.accuracy(),
                r.seconds);
  return buf;
}

}  // namespace qlora::train
