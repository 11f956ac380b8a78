// dist/group: the collectives a data-parallel QLoRA run needs, on LibTorch's
// c10d process groups: NCCL between GPUs, Gloo on CPU. Nothing here is home
// made; this class only picks the backend, does the rendezvous (c10d's
// TCPStore at MASTER_ADDR:MASTER_PORT, or torchrun's agent store) and packs
// tensors into buckets.
//
// Every call is collective: all ranks must make it, in the same order. A
// Group of one process (world size 1) does no communication at all.
//
// Note [what crosses ranks]: per optimizer step, one all-reduce of two int64
// (the window's target tokens, before backward: the loss divisor; and its real
// input tokens, for tokens/s), one bucketed all-reduce of the LoRA gradients
// and one of the loss sum (after the window), and one of the stop flag (so
// every rank stops at the same step). The
// base model is frozen and identical on every rank (each rank loads and
// quantizes it), so nothing else needs to move. LoRA gradients are small
// (Llama-3.2-1B, r 16 on q,k,v,o: 13.6 MB in fp32), so they go in one bucket
// after the last micro batch rather than overlapped with backward.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "qlora/config/config.h"
#include "qlora/dist/launch.h"

namespace qlora::dist {

// Whether this build can form a group of more than one process on `device`
// (Gloo needs the gloo headers at build time, NCCL a CUDA build with nccl.h);
// "" when it can, else why not and what to do.
std::string unavailable_reason(c10::Device device);

class Group {
 public:
  // The default: one process, no communication.
  Group();
  ~Group();
  Group(Group&&) noexcept;
  Group& operator=(Group&&) noexcept;

  // Rendezvous with the other ranks of `launch` and open the backend for
  // `device`: distributed.backend auto = NCCL on cuda:local_rank, Gloo on CPU;
  // gloo on a GPU stages tensors through the host; nccl on a CPU is refused.
  // Throws InputError when this build has no such backend, RuntimeError when
  // the rendezvous fails within `timeout` (naming the address).
  static Group connect(const Launch& launch, c10::Device device, DistBackend backend = DistBackend::kAuto,
                       std::chrono::milliseconds timeout = std::chrono::minutes(10));

  int64_t rank() const { return rank_; }
  int64_t world_size() const { return world_; }
  bool is_main() const { return rank_ == 0; }
  bool distributed() const { return world_ > 1; }
  const std::string& backend() const { return backend_name_; }  // "gloo", "nccl", "none"

  // Sums over ranks.
  int64_t sum(int64_t v) const;
  double sum(double v) const;
  bool any(bool v) const { return sum(static_cast<int64_t>(v)) > 0; }

  // In place: every tensor becomes the sum over ranks of that tensor. Tensors
  // of one dtype and device travel in one flat bucket (one collective per
  // dtype). Shapes must agree across ranks.
  void all_reduce_sum(const std::vector<at::Tensor>& tensors) const;

  // Every rank's copy of `t` (same shape on every rank), in rank order, on t's device.
  std::vector<at::Tensor> all_gather(const at::Tensor& t) const;

  void barrier() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int64_t rank_ = 0;
  int64_t world_ = 1;
  std::string backend_name_ = "none";
};

}  // namespace qlora::dist
