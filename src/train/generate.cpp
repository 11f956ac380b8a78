#include "qlora/train/generate.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <stdexcept>

#include "qlora/train/decode_graph.h"

namespace qlora::train {
namespace {

// transformers' RepetitionPenaltyLogitsProcessor: every token seen so far in the row (prompt and
// output) has its score divided by the penalty when positive, multiplied when negative.
void penalize(at::Tensor& scores /* [B, V] fp32 */, const at::Tensor& seen /* [B, L] int64 */, double penalty) {
  at::Tensor s = scores.gather(1, seen);
  s = at::where(s < 0, s * penalty, s / penalty);
  scores.scatter_(1, seen, s);
}

// Temperature, top-k, top-p and min-p as transformers' warpers apply them; filtered scores are
// -inf. Then one draw per row.
at::Tensor sample(at::Tensor scores, const SamplingOptions& o, at::Generator& gen) {
  const float ninf = -std::numeric_limits<float>::infinity();
  scores = scores / o.temperature;
  const int64_t v = scores.size(1);
  if (o.top_k > 0 && o.top_k < v) {
    const at::Tensor kth = std::get<0>(scores.topk(o.top_k, 1)).narrow(1, o.top_k - 1, 1);  // [B, 1]
    scores = scores.masked_fill(scores < kth, ninf);
  }
  if (o.top_p < 1.0) {
    // Ascending sort; drop the tokens whose cumulative probability stays within 1 - top_p,
    // keeping at least the most likely one.
    auto [sorted, idx] = scores.sort(1, /*descending=*/false);
    at::Tensor cum = sorted.softmax(1).cumsum(1);
    at::Tensor drop = cum <= (1.0 - o.top_p);
    drop.narrow(1, v - 1, 1).fill_(false);
    scores = scores.masked_fill(drop.scatter(1, idx, drop), ninf);
  }
  if (o.min_p > 0.0) {
    at::Tensor probs = scores.softmax(1);
    at::Tensor top = std::get<0>(probs.max(1, /*keepdim=*/true));
    scores = scores.masked_fill(probs < top * o.min_p, ninf);
  }
  return at::multinomial(scores.softmax(1), 1, /*replacement=*/false, gen).squeeze(1);
}

}  // namespace

std::vector<std::vector<int32_t>> generate(const model::DecoderModel& model,
                                           const std::vector<std::vector<int32_t>>& prompts,
                                           const SamplingOptions& o, const OnToken& on_token,
                                           const StopWhen& stop_when) {
  at::NoGradGuard no_grad;
  const auto b = static_cast<int64_t>(prompts.size());
  std::vector<std::vector<int32_t>> out(prompts.size());
  if (b == 0 || o.max_new_tokens <= 0) return out;
  if (o.temperature < 0) throw std::invalid_argument("generate: temperature must be >= 0");
  int64_t longest = 0;
  for (const auto& p : prompts) {
    if (p.empty()) throw std::invalid_argument("generate: an empty prompt");
    longest = std::max<int64_t>(longest, static_cast<int64_t>(p.size()));
  }
  const int64_t capacity = longest + o.max_new_tokens;
  const c10::Device device = model.device();
  const auto bool_opts = at::TensorOptions().dtype(at::kBool);

  // Left-padded prompts; `real` marks the real tokens of every cache position.
  at::Tensor ids = at::zeros({b, longest}, at::kLong);
  at::Tensor real = at::zeros({b, capacity}, bool_opts);
  for (int64_t r = 0; r < b; ++r) {
    const auto& p = prompts[static_cast<size_t>(r)];
    const auto n = static_cast<int64_t>(p.size());
    ids[r].narrow(0, longest - n, n).copy_(at::tensor(std::vector<int64_t>(p.begin(), p.end()), at::kLong));
    real[r].narrow(0, longest - n, n).fill_(true);
  }
  real.narrow(1, longest, o.max_new_tokens).fill_(true);
  ids = ids.to(device);
  real = real.to(device);
  at::Tensor seen = ids;  // [B, L] prompt and output: what the repetition penalty sees (padding masked below)

  // Prefill: causal over the real prompt tokens; a padding query sees itself (no empty softmax).
  model::KvCache cache = model.new_cache(b, capacity);
  model::AttentionInputs a;
  const at::Tensor prompt_real = real.narrow(1, 0, longest);
  a.position_ids = at::clamp_min(at::cumsum(prompt_real.to(at::kLong), 1) - 1, 0);
  const at::Tensor causal = at::ones({longest, longest}, bool_opts.device(device)).tril();
  a.mask = at::logical_or(at::logical_and(causal, prompt_real.view({b, 1, 1, longest})),
                          at::eye(longest, bool_opts.device(device)));
  at::Tensor positions = a.position_ids.select(1, longest - 1);  // [B] the last prompt position

  at::Tensor hidden = model.embed(ids);
  {
    const auto cos_sin = model.rope(a.position_ids);
    for (int64_t l = 0; l < model.num_layers(); ++l) hidden = model.layer_forward(l, hidden, cos_sin, a, &cache);
    cache.length = longest;
  }
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  std::vector<bool> done(prompts.size(), false);
  // Decoding steps replay a CUDA graph where one applies (train/decode_graph.h).
  std::unique_ptr<DecodeGraph> graph;
  if (o.cuda_graph && o.max_new_tokens > 1 && decode_graph_unavailable(model, capacity).empty())
    graph = std::make_unique<DecodeGraph>(model, cache, real, positions);
  at::Tensor scores = model.logits(model.final_norm(hidden.select(1, hidden.size(1) - 1))).to(at::kFloat);  // [B, V]
  for (int64_t step = 0; step < o.max_new_tokens; ++step) {
    if (o.repetition_penalty != 1.0) {
      // Padding columns hold id 0; penalizing it for a padded row would differ from the row alone.
      at::Tensor s = seen.clone();
      at::Tensor pad = at::logical_not(real.narrow(1, 0, seen.size(1)));
      s.masked_fill_(pad, -1);
      for (int64_t r = 0; r < b; ++r) {
        const at::Tensor row = s[r].masked_select(s[r] >= 0).unsqueeze(0);
        at::Tensor sc = scores.narrow(0, r, 1);
        penalize(sc, row, o.repetition_penalty);
      }
    }
    const at::Tensor next = (o.temperature == 0.0 ? scores.argmax(-1)
                                                   : sample(scores.to(at::kCPU), o, gen).to(device));  // [B]
    const at::Tensor next_cpu = next.to(at::kCPU);
    const auto* nx = next_cpu.data_ptr<int64_t>();
    bool all_done = true;
    for (size_t r = 0; r < prompts.size(); ++r) {
      if (done[r]) continue;
      const auto tok = static_cast<int32_t>(nx[r]);
      if (std::find(o.stop_ids.begin(), o.stop_ids.end(), tok) != o.stop_ids.end()) {
        done[r] = true;
        continue;
      }
      out[r].push_back(tok);
      if (on_token) on_token(r, tok);
      if (stop_when && stop_when(r, out[r])) {
        done[r] = true;
        continue;
      }
      all_done = false;
    }
    if (all_done || step + 1 == o.max_new_tokens) break;
    if (o.repetition_penalty != 1.0) seen = at::cat({seen, next.unsqueeze(1)}, 1);
    if (graph) {
      scores = graph->step(next);
      continue;
    }
    // One new position a row: it sees every real cached key and itself.
    positions = positions + 1;
    a.position_ids = positions.unsqueeze(1);                                   // [B, 1]
    a.mask = real.narrow(1, 0, cache.length + 1).view({b, 1, 1, cache.length + 1});
    hidden = model.embed(next.unsqueeze(1));
    const auto cos_sin = model.rope(a.position_ids);
    for (int64_t l = 0; l < model.num_layers(); ++l) hidden = model.layer_forward(l, hidden, cos_sin, a, &cache);
    cache.length += 1;
    scores = model.logits(model.final_norm(hidden.select(1, 0))).to(at::kFloat);
  }
  return out;
}

}  // namespace qlora::train
