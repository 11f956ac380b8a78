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
#include "qlora/train/trainer.h"

namespace qlora::train {
namespace {

// Left-padded rows: row b's real tokens end at the last column. Positions
// count from each row's first real token; padding attends only to itself so
// no softmax row is empty (an empty row is NaN, and NaN in a padded value
// would reach real rows through 0 * NaN in attention's weighted sum).
model::AttentionInputs left_padded_attention(const at::Tensor& mask /* [B, T] bool */) {
  const int64_t t = mask.size(1);
  const at::Tensor positions = at::clamp_min(at::cumsum(mask.to(at::kLong), 1) - 1, 0);  // [B, T] int64
  const at::Tensor causal = at::ones({t, t}, mask.options().dtype(at::kBool)).tril();  // [T, T]
  const at::Tensor self = at::eye(t, mask.options().dtype(at::kBool));                 // [T, T]
  const at::Tensor keys = mask.unsqueeze(1).unsqueeze(1);                              // [B, 1, 1, T]
  model::AttentionInputs a;
  a.position_ids = positions;
  a.mask = at::logical_or(at::logical_and(causal, keys), self);  // [B, 1, T, T]
  return a;
}

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
  at::NoGradGuard no_grad;
  const auto b = static_cast<int64_t>(prompts.size());
  std::vector<std::vector<int32_t>> out(prompts.size());
  if (b == 0) return out;
  int64_t longest = 0;
  for (const auto& p : prompts) longest = std::max<int64_t>(longest, static_cast<int64_t>(p.size()));

  // [B, T] ids and mask, left-padded; grown by one column per generated token.
  at::Tensor ids = at::zeros({b, longest}, at::kLong);
  at::Tensor mask = at::zeros({b, longest}, at::kBool);
  for (int64_t r = 0; r < b; ++r) {
    const auto& p = prompts[static_cast<size_t>(r)];
    const auto n = static_cast<int64_t>(p.size());
    if (n == 0) continue;
    ids[r].narrow(0, longest - n, n).copy_(at::tensor(std::vector<int64_t>(p.begin(), p.end()), at::kLong));
    mask[r].narrow(0, longest - n, n).fill_(true);
  }
  const c10::Device device = model.device();
  ids = ids.to(device);
  mask = mask.to(device);

  std::vector<bool> done(prompts.size(), false);
  for (int64_t step = 0; step < max_new_tokens; ++step) {
    const at::Tensor hidden = model.forward_hidden(ids, left_padded_attention(mask));  // [B, T, h]
    const at::Tensor last = hidden.select(1, hidden.size(1) - 1);                       // [B, h]
    const at::Tensor next = model.logits(last).argmax(-1);                              // [B] int64
    const at::Tensor next_cpu = next.to(at::kCPU);
    const auto* nx = next_cpu.data_ptr<int64_t>();
    bool all_done = true;
    for (size_t r = 0; r < prompts.size(); ++r) {
      if (done[r]) continue;
      const auto tok = static_cast<int32_t>(nx[r]);
      if (std::find(stop_ids.begin(), stop_ids.end(), tok) != stop_ids.end()) {
        done[r] = true;
      } else {
        out[r].push_back(tok);
        all_done = false;
      }
    }
    if (all_done) break;
    ids = at::cat({ids, next.unsqueeze(1)}, 1);
    mask = at::cat({mask, at::ones({b, 1}, mask.options())}, 1);
  }
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
  const std::vector<int32_t> stops = stop_token_ids(tokenizer);
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
      if (static_cast<int64_t>(r.samples.size()) < options.samples)
        r.samples.push_back({static_cast<int64_t>(chosen[i + j]), std::move(answer), refs[j]});
    }
  }
  r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return r;
}

std::string format_eval_line(const EvalResult& r) {
  char buf[200];
  std::snprintf(buf, sizeof buf, "eval loss %.4f | exact match %lld/%lld (%.1f%%) | %.1f s", r.loss,
                static_cast<long long>(r.exact), static_cast<long long>(r.generated), 100.0 * r.accuracy(),
                r.seconds);
  return buf;
}

}  // namespace qlora::train
