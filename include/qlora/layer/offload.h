// layer/offload: the tensors a checkpointed decoder layer keeps for its backward, moved to
// pinned host memory between its forward and its backward (train.offload_checkpoints) and
// brought back ahead of that backward. Used by train's generic checkpoint and by the fused
// layer; the plan counts it (plan::offloaded_bytes). Note [offloaded checkpoints] in
// src/layer/offload.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

namespace qlora::layer {

// One layer's kept tensors while they live on the host. Its owner is the layer's backward
// (through OffloadHandle in the autograd context); the offloader only points at it.
struct OffloadedTensors;

class CheckpointOffload {
 public:
  // `copy_on_cpu`: on the CPU, copy each kept tensor into a host buffer of its own anyway and
  // drop the original, so the bookkeeping runs as on a GPU (tests); otherwise CPU tensors are
  // kept as they are (host memory already).
  explicit CheckpointOffload(bool copy_on_cpu = false);
  ~CheckpointOffload();
  CheckpointOffload(const CheckpointOffload&) = delete;
  CheckpointOffload& operator=(const CheckpointOffload&) = delete;

  // In forward, as decoder layer `layer` leaves: starts copying `tensors` to pinned host
  // memory on a side stream. The device memory is freed once the copy has read it, when the
  // caller has dropped its own references. Layer 0 starts a new chain (a new forward).
  std::shared_ptr<OffloadedTensors> stash(int64_t layer, const std::vector<at::Tensor>& tensors);

  // In backward: `entry`'s tensors back on their device, in stash's order (a copy
  // prefetched by the layer above is waited for, not started again); then starts bringing
  // back the layer stashed before it, so its copy overlaps this layer's backward.
  std::vector<at::Tensor> fetch(const std::shared_ptr<OffloadedTensors>& entry);

  // Bytes now held in host memory by stashed layers, and the most held at once (for the
  // log and the tests).
  int64_t host_bytes() const;
  int64_t peak_host_bytes() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// What a layer's autograd context keeps instead of its tensors: saved_data holds IValues.
struct OffloadHandle : torch::CustomClassHolder {
  OffloadHandle(std::shared_ptr<CheckpointOffload> o, std::shared_ptr<OffloadedTensors> e)
      : offload(std::move(o)), entry(std::move(e)) {}
  std::shared_ptr<CheckpointOffload> offload;
  std::shared_ptr<OffloadedTensors> entry;
};

}  // namespace qlora::layer
