// train/decode_graph: generation's decoding step as a CUDA graph. One step (embed the new token
// of every row, every layer over the KvCache, the final norm, the logits) launches some 25
// kernels a layer; for batch 1 on a GPU the launches, not the weights' bytes, set the pace. The
// step is recorded once and replayed: its inputs (the tokens, their positions, the attention
// mask, where the cache is written) live in fixed device buffers that each step overwrites
// before the replay, and the cache runs in its fixed-shape mode (model/decoder.h: KvCache).
// train::generate uses it where it applies and the eager step elsewhere; both compute the same
// operations in the same order (tests/test_cuda_generate.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>

#include "qlora/model/decoder.h"

namespace qlora::train {

// "" when the graph can run `model`'s decoding with a cache of `capacity` positions; else why
// not: not a CUDA device or build, QLORA_DECODE_GRAPH=0, a RoPE that changes with the sequence's
// length (dynamic, longrope), or a sliding window shorter than the capacity.
std::string decode_graph_unavailable(const model::DecoderModel& model, int64_t capacity);

class DecodeGraph {
 public:
  // cache: filled by the prefill up to cache.length (the padded prompt length); real [B,
  // capacity] bool on the device, true where a row has a real token (prompt and every new
  // position); last_positions [B] int64, each row's position of its last prompt token.
  DecodeGraph(const model::DecoderModel& model, model::KvCache& cache, const at::Tensor& real,
              const at::Tensor& last_positions);
  ~DecodeGraph();
  DecodeGraph(const DecodeGraph&) = delete;
  DecodeGraph& operator=(const DecodeGraph&) = delete;

  // Feeds `next` ([B] int64 on the device: each row's newest token) at the next position and
  // returns the next logits [B, V] fp32, a buffer the following step overwrites. Advances
  // cache.length. The first step runs eagerly (warming up the libraries' handles), the second
  // records the graph, every later one replays it.
  at::Tensor step(const at::Tensor& next);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qlora::train
