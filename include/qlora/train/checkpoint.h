// train/checkpoint: activation checkpointing per decoder layer, and a count of
// the activation bytes a forward leaves alive for its backward.
//
// `checkpoint(fn, x)` runs fn(x) without recording a graph and keeps only x
// (plus the RNG state and the autocast settings of that moment). Backward
// puts the RNG and autocast back, runs fn again with grad on, backpropagates
// the incoming gradient through that recomputation (which accumulates into
// every leaf fn uses: the LoRA A/B matrices) and hands x's gradient on. With
// the RNG restored the recomputed dropout masks are the forward's masks, so the
// gradients are those of the run without checkpointing, bit for bit on CPU.
// Afterwards the RNG state is put back to where backward found it, so a
// checkpointed step consumes the generator exactly as a plain step does.
// See Note [Checkpoint RNG] in include/qlora/layer/rng_state.h.
//
// Not to be confused with the ckpt module, which saves training state to disk.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>

#include "qlora/train/trainer.h"

namespace qlora::layer {
class CheckpointOffload;
}  // namespace qlora::layer

namespace qlora::model {
class DecoderModel;
struct AttentionInputs;
}  // namespace qlora::model

namespace qlora::train {

// ---------------------------------------------------------------- checkpointing

// A function of one tensor; anything else it needs (cos/sin, masks, weights)
// is captured. Captured tensors that require grad get their gradients
// accumulated in backward; captured tensors are not saved by autograd, the
// closure keeps them alive.
using TensorFn = std::function<at::Tensor(const at::Tensor&)>;

struct CheckpointOptions {
  // Replay the CPU (and, for CUDA inputs, the CUDA) generator state of the
  // forward when recomputing. Off only to show what goes wrong without it.
  bool preserve_rng_state = true;
  // Move the kept input to host memory until backward (train.offload_checkpoints; Note
  // [offloaded checkpoints] in src/layer/offload.cpp). Shared by every layer of a run.
  std::shared_ptr<layer::CheckpointOffload> offload;
};

// fn(input), recomputed in backward. Differentiable with respect to `input`
// and to every leaf fn reads. With grad mode on the result always requires
// grad, even when `input` does not (the first layer's input comes from the
// frozen embedding), so the leaves inside fn still get gradients; fn and what
// it captures must stay valid until backward. With grad mode off this is just
// fn(input).
// `layer`: the decoder layer's index (an offloaded chain starts again at 0).
at::Tensor checkpoint(const TensorFn& fn, const at::Tensor& input, const CheckpointOptions& options = {},
                      int64_t layer = 0);

// One decoder layer of `model` through checkpoint(): the layer_forward the
// trainer runs with train.gradient_checkpointing (StepOptions::layer_forward).
// `model` must outlive every backward.
LayerForwardFn checkpointed_layer_forward(const model::DecoderModel& model, const CheckpointOptions& options = {});

// embed -> every decoder layer (each through checkpoint() when `checkpointing`)
// -> final norm: input_ids [B, T] int64 -> hidden [B, T, h]. Without
// checkpointing this is model.forward_hidden. `model` must outlive the
// backward (the closures point at it; cos/sin and `attention` are copied).
at::Tensor checkpointed_forward_hidden(const model::DecoderModel& model, const at::Tensor& input_ids,
                                       const model::AttentionInputs& attention, bool checkpointing,
                                       const CheckpointOptions& options = {});

// ---------------------------------------------------------------- memory kept for backward

// The net change in live CPU tensor storage since construction. Read right
// after a forward, it is what autograd keeps for backward (plus the forward's
// outputs): activation memory, what checkpointing saves. LibTorch's C++ API
// has no saved-tensor hooks (the default hooks are Python objects), so this
// counts at the allocator: while any counter exists, CPU allocations go
// through a counting allocator (a 64-byte header each, 64-byte alignment
// kept); the previous allocator comes back when the last counter goes, and
// storage it counted is uncounted when freed, whenever that is. CUDA tensors
// are not counted (the CUDA caching allocator keeps its own statistics).
// Counters may nest; each reports against its own starting point.
class SavedBytesCounter {
 public:
  SavedBytesCounter();
  ~SavedBytesCounter();
  SavedBytesCounter(const SavedBytesCounter&) = delete;
  SavedBytesCounter& operator=(const SavedBytesCounter&) = delete;

  // Counted bytes alive now minus those alive at construction.
  int64_t live_bytes() const;

 private:
  int64_t base_ = 0;
};

}  // namespace qlora::train
