#include "qlora/train/decode_graph.h"

#include <ATen/ATen.h>

#include <cstdlib>
#include <exception>
#include <optional>

#ifdef QLORA_WITH_CUDA
#include <map>
#include <mutex>

#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace qlora::train {

std::string decode_graph_unavailable(const model::DecoderModel& model, int64_t capacity) {
#ifndef QLORA_WITH_CUDA
  (void)model;
  (void)capacity;
  return "this qlora was built without CUDA";
#else
  if (!model.device().is_cuda()) return "the model is not on a CUDA device";
  const char* env = std::getenv("QLORA_DECODE_GRAPH");
  if (env != nullptr && std::string(env) == "0") return "QLORA_DECODE_GRAPH=0";
  const RopeType rope = model.config().rope.type;
  if (rope == RopeType::kDynamic || rope == RopeType::kLongrope)
    return "its RoPE scaling depends on the sequence's length";
  for (int64_t l = 0; l < model.num_layers(); ++l) {
    const int64_t w = model.config().window_of(l);
    if (w > 0 && w < capacity) return "layer " + std::to_string(l) + "'s sliding window is shorter than the cache";
  }
  return "";
#endif
}

#ifdef QLORA_WITH_CUDA
namespace {

// Capture needs a stream other than the default one. One per device for every generation: the
// caching allocator keeps freed blocks per stream, so a new pool stream per call (each held-out
// evaluation, each chat turn) would leave each call's blocks cached where the next never looks.
c10::cuda::CUDAStream decode_stream(c10::DeviceIndex device) {
  static std::mutex mu;
  static std::map<c10::DeviceIndex, c10::cuda::CUDAStream> streams;
  const std::lock_guard<std::mutex> lock(mu);
  auto it = streams.find(device);
  if (it == streams.end())
    it = streams.emplace(device, c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device)).first;
  return it->second;
}

}  // namespace
#endif

struct DecodeGraph::Impl {
  const model::DecoderModel& model;
  model::KvCache& cache;
  at::Tensor tok;   // [B, 1] int64: the tokens fed this step
  at::Tensor pos;   // [B, 1] int64: their positions
  at::Tensor mask;  // [B, 1, 1, capacity] bool: the real positions written so far and this one
  at::Tensor out;   // [B, V] fp32: the logits of the last step
  int64_t steps = 0;
#ifdef QLORA_WITH_CUDA
  std::optional<c10::cuda::CUDAStream> side;  // capture needs a stream other than the default
  at::cuda::CUDAGraph graph;
  bool captured = false;
  bool failed = false;  // the capture failed: every step eager
#endif

  Impl(const model::DecoderModel& m, model::KvCache& c) : model(m), cache(c) {}

  // The step on the fixed buffers: nothing here reads a host value that changes between steps.
  at::Tensor run() const {
    model::AttentionInputs a;
    a.position_ids = pos;
    a.mask = mask;
    at::Tensor hidden = model.embed(tok);
    const auto cos_sin = model.rope(pos);
    for (int64_t l = 0; l < model.num_layers(); ++l) hidden = model.layer_forward(l, hidden, cos_sin, a, &cache);
    return model.logits(model.final_norm(hidden.select(1, 0))).to(at::kFloat);
  }
};

DecodeGraph::DecodeGraph(const model::DecoderModel& model, model::KvCache& cache, const at::Tensor& real,
                         const at::Tensor& last_positions)
    : impl_(std::make_unique<Impl>(model, cache)) {
  const int64_t b = real.size(0), capacity = real.size(1);
  impl_->tok = at::zeros({b, 1}, last_positions.options());
  impl_->pos = last_positions.reshape({b, 1}).clone();
  at::Tensor written = real.clone();
  written.narrow(1, cache.length, capacity - cache.length).fill_(false);
  impl_->mask = written.view({b, 1, 1, capacity});
  cache.write_at = at::zeros({1}, last_positions.options());
#ifdef QLORA_WITH_CUDA
  impl_->side = decode_stream(model.device().index());
#endif
}

DecodeGraph::~DecodeGraph() { impl_->cache.write_at = at::Tensor(); }

at::Tensor DecodeGraph::step(const at::Tensor& next) {
  Impl& s = *impl_;
  const int64_t slot = s.cache.length;
  TORCH_CHECK(slot < s.mask.size(3), "DecodeGraph: the cache's ", s.mask.size(3), " positions are full");
#ifdef QLORA_WITH_CUDA
  const c10::cuda::CUDAStream main = c10::cuda::getCurrentCUDAStream(s.model.device().index());
  at::cuda::CUDAEvent inputs_ready;
  inputs_ready.record(main);
  inputs_ready.block(*s.side);
  {
    const c10::cuda::CUDAStreamGuard on_side(*s.side);
    s.tok.copy_(next.view({-1, 1}));
    s.pos.add_(1);
    s.mask.select(3, slot).fill_(true);
    s.cache.write_at.fill_(slot);
    if (s.steps == 0 || s.failed) {
      s.out = s.run();
    } else {
      if (!s.captured) {
        // Thread-local: another thread's CUDA calls (a data loader's, a logger's) do not break it.
        // A step that cannot be captured ends the capture and decodes eagerly from then on.
        s.graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
        try {
          s.out = s.run();
          s.graph.capture_end();
          s.captured = true;
        } catch (const std::exception&) {
          try {
            s.graph.capture_end();
          } catch (const std::exception&) {
          }
          s.failed = true;
        }
      }
      if (s.captured) {
        s.graph.replay();
      } else {
        s.out = s.run();
      }
    }
  }
  at::cuda::CUDAEvent done;
  done.record(*s.side);
  done.block(main);
#else
  (void)next;
  TORCH_CHECK(false, "DecodeGraph: this qlora was built without CUDA");
#endif
  s.cache.length = slot + 1;
  ++s.steps;
  return s.out;
}

}  // namespace qlora::train
