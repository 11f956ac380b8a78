// train/generate: text generation with a KV cache (model/decoder.h's KvCache): prompts as
// left-padded rows, one prefill pass, then one token a step for every row at once, greedy or
// sampled (transformers' processors in its order: repetition penalty, then temperature, top-k,
// top-p, min-p), each row stopped at a stop token, by `stop_when`, or at max_new_tokens.
// Greedy decoding gives what transformers' generate gives (tests/test_generate.cpp); a row of a
// batch generates what it would alone.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "qlora/model/decoder.h"

namespace qlora::train {

struct SamplingOptions {
  int64_t max_new_tokens = 256;
  double temperature = 0.0;          // 0: greedy (argmax)
  int64_t top_k = 0;                 // 0: off
  double top_p = 1.0;                // 1: off
  double min_p = 0.0;                // 0: off
  double repetition_penalty = 1.0;   // 1: off; > 1 discourages tokens of the prompt and the output
  uint64_t seed = 0;                 // sampling draws from a generator seeded with it
  std::vector<int32_t> stop_ids;     // a row ends at any of them (not included in its output)
  bool cuda_graph = true;            // on a GPU, decoding steps replay a CUDA graph where one applies
                                     // (train/decode_graph.h); false: every step eager
};

// Called with each new token of a row (streaming), and asked whether the row should stop now
// (stop strings: the caller decodes); both optional.
using OnToken = std::function<void(size_t row, int32_t token)>;
using StopWhen = std::function<bool(size_t row, const std::vector<int32_t>& generated)>;

// The tokens generated for each prompt (without the prompt, without the stop token). Prompts
// must not be empty. Runs under no_grad on the model's device.
std::vector<std::vector<int32_t>> generate(const model::DecoderModel& model,
                                           const std::vector<std::vector<int32_t>>& prompts,
                                           const SamplingOptions& options, const OnToken& on_token = {},
                                           const StopWhen& stop_when = {});

}  // namespace qlora::train
