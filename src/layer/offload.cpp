#include "qlora/layer/offload.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>

#ifdef QLORA_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace qlora::layer {

// Note [offloaded checkpoints]
// With checkpointing, each decoder layer keeps a few [B, T, h] tensors from its forward to its
// backward (the generic layer its input; the fused layer x and h1, and what selective or kept
// layers add), every layer at once by the time backward starts: at long sequences they are most
// of the step's memory (Llama-3.1-8B at 32k tokens: 32 layers × 2 × 256 MiB). Offloading moves
// them to pinned host memory while the forward goes on and brings each layer's back just
// before its backward:
//  - stash (forward, as a layer leaves): the compute stream records an event; a side stream
//    (one per device, from the pool) waits for it and copies each tensor into pinned host memory
//    (the CUDA host allocator: its blocks are reused from step to step, and one a copy still
//    reads is never handed out again). The entry keeps its device tensors until the compute
//    stream has waited for their copy: layer l's stash makes the compute stream wait for layer
//    l - 2's copies and then drops l - 2's device tensors, so their memory goes back to the
//    compute stream's pool in stream order and is reused at once (record_stream would free it
//    only once the allocator sees the event passed, later than the host, which runs ahead).
//    At most two layers' kept tensors are on the device beside the one being computed.
//  - fetch (backward of layer l): a layer that still has its device tensors (the top two) uses
//    them, no round trip. Otherwise they come back on a second side stream into memory allocated
//    on the compute stream (which the copy stream waits for first, so nothing still queued there
//    reads it); the compute stream waits for the copy. Then layer l - 1's copy starts,
//    overlapping layer l's backward: two layers' worth on the device at a time.
//  - Each layer's entry belongs to its autograd context (OffloadHandle); an entry points at the
//    one stashed before it to prefetch it. A forward abandoned half way (an out-of-memory retry)
//    frees its entries with its graph: an entry makes the current stream wait for its copies
//    before its device memory goes back; host blocks a copy still uses are not reused before it
//    ends. Pinned blocks are rounded up to powers of two by the host allocator and kept for reuse
//    (the run's host-memory check counts the rounding; a new batch shape pins new blocks).
// On the CPU the kept tensors are host memory already: they stay as they are (copy_on_cpu: are
// copied, so tests run the bookkeeping). Host memory needed: every layer's kept bytes at once
// (plan::offloaded_bytes; the run checks the machine has it).

struct OffloadedTensors {
  int64_t layer = 0;
  std::vector<at::Tensor> device;  // the originals, until their copies are known done (CUDA)
  std::vector<at::Tensor> host;    // the copies (or, on the CPU, the tensors) until fetched
  std::vector<at::Tensor> back;    // on the device again, once prefetched
  std::weak_ptr<OffloadedTensors> below;  // stashed before this one in the same forward
  bool prefetched = false;
  bool fetched = false;
  int64_t bytes = 0;  // counted in `held` once the stash succeeded
  std::shared_ptr<std::atomic<int64_t>> held;  // the offloader's host byte count
#ifdef QLORA_WITH_CUDA
  std::optional<at::cuda::CUDAEvent> copied;    // on the copy-out stream: host copies complete
  std::optional<at::cuda::CUDAEvent> returned;  // on the copy-in stream: device copies complete
#endif
  void release_host() {
    if (host.empty()) return;
    host.clear();
    held->fetch_sub(bytes);
  }
  ~OffloadedTensors() {
#ifdef QLORA_WITH_CUDA
    // Abandoned before its copies were waited for: the memory they read or write must not go
    // back to the compute stream's pool ahead of them.
    const auto settle = [](std::vector<at::Tensor>& ts, std::optional<at::cuda::CUDAEvent>& ev) {
      if (ts.empty() || !ev || !ts.front().is_cuda()) return;
      ev->block(c10::cuda::getCurrentCUDAStream(ts.front().device().index()));
      ts.clear();
    };
    settle(device, copied);
    settle(back, returned);
#endif
    release_host();
  }
};

struct CheckpointOffload::Impl {
  bool copy_on_cpu = false;
  std::mutex mu;
  std::weak_ptr<OffloadedTensors> last;  // the entry stashed most recently
  std::shared_ptr<std::atomic<int64_t>> held = std::make_shared<std::atomic<int64_t>>(0);
  std::atomic<int64_t> peak{0};
#ifdef QLORA_WITH_CUDA
  std::optional<c10::cuda::CUDAStream> out, in;  // copy-out and copy-in streams of `device`
  c10::DeviceIndex device = -1;

  void streams_for(c10::DeviceIndex d) {
    if (out && device == d) return;
    if (out) throw std::logic_error("CheckpointOffload: one offloader serves one device");
    device = d;
    out = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, d);
    in = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, d);
  }

  void stash_cuda(OffloadedTensors& e, const std::vector<at::Tensor>& tensors) {
    const c10::DeviceIndex d = tensors.front().device().index();
    streams_for(d);
    const c10::cuda::CUDAStream compute = c10::cuda::getCurrentCUDAStream(d);
    at::cuda::CUDAEvent ready;
    ready.record(compute);
    ready.block(*out);
    {
      c10::cuda::CUDAStreamGuard guard(*out);
      for (const at::Tensor& t : tensors) {
        at::Tensor h = at::empty(t.sizes(), t.options().device(at::kCPU).pinned_memory(true));
        h.copy_(t, /*non_blocking=*/true);
        e.host.push_back(std::move(h));
      }
    }
    e.copied.emplace();
    e.copied->record(*out);
    e.device = tensors;
    // Layer l - 2's copies done in stream order, its device tensors go (Note [offloaded checkpoints]).
    if (auto b = e.below.lock())
      if (auto bb = b->below.lock(); bb && bb->copied && !bb->device.empty()) {
        bb->copied->block(compute);
        bb->device.clear();
      }
  }

  void bring_back_cuda(OffloadedTensors& e, c10::Device device) {
    const c10::cuda::CUDAStream compute = c10::cuda::getCurrentCUDAStream(device.index());
    for (const at::Tensor& h : e.host) e.back.push_back(at::empty(h.sizes(), h.options().device(device)));
    at::cuda::CUDAEvent allocated;
    allocated.record(compute);
    allocated.block(*in);
    if (e.copied) e.copied->block(*in);
    {
      c10::cuda::CUDAStreamGuard guard(*in);
      for (size_t i = 0; i < e.host.size(); ++i) e.back[i].copy_(e.host[i], /*non_blocking=*/true);
    }
    e.returned.emplace();
    e.returned->record(*in);
  }
#endif

  // Starts `e`'s way back to `device` (no-op when already started).
  void bring_back(OffloadedTensors& e, c10::Device device) {
    if (e.prefetched) return;
    e.prefetched = true;
#ifdef QLORA_WITH_CUDA
    if (device.is_cuda()) {
      if (!e.device.empty()) {  // never left the device (the top layers): no round trip
        // Its copy out may still read it; backward may write it in place (a kept gate/up).
        e.copied->block(c10::cuda::getCurrentCUDAStream(device.index()));
        e.back = std::move(e.device);
        e.device.clear();
      } else {
        bring_back_cuda(e, device);
      }
      e.release_host();  // the host allocator keeps the blocks until the copies have read them
      return;
    }
#endif
    e.back = std::move(e.host);
    e.host.clear();
    held->fetch_sub(e.bytes);
  }
};

CheckpointOffload::CheckpointOffload(bool copy_on_cpu) : impl_(std::make_unique<Impl>()) {
  impl_->copy_on_cpu = copy_on_cpu;
}

CheckpointOffload::~CheckpointOffload() = default;

std::shared_ptr<OffloadedTensors> CheckpointOffload::stash(int64_t layer, const std::vector<at::Tensor>& tensors) {
  if (tensors.empty()) throw std::invalid_argument("CheckpointOffload::stash: no tensors");
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto e = std::make_shared<OffloadedTensors>();
  e->layer = layer;
  e->held = impl_->held;
  if (layer > 0) e->below = impl_->last;  // layer 0: a new forward
  const c10::Device device = tensors.front().device();
#ifdef QLORA_WITH_CUDA
  if (device.is_cuda()) impl_->stash_cuda(*e, tensors);
#endif
  if (!device.is_cuda()) {
    for (const at::Tensor& t : tensors) e->host.push_back(impl_->copy_on_cpu ? t.clone() : t);
  }
  // Counted once stashed: an entry whose stash threw part way subtracts nothing.
  for (const at::Tensor& t : tensors) e->bytes += static_cast<int64_t>(t.nbytes());
  const int64_t now = impl_->held->fetch_add(e->bytes) + e->bytes;
  int64_t peak = impl_->peak.load();
  while (now > peak && !impl_->peak.compare_exchange_weak(peak, now)) {
  }
  impl_->last = e;
  return e;
}

std::vector<at::Tensor> CheckpointOffload::fetch(const std::shared_ptr<OffloadedTensors>& entry) {
  if (!entry) throw std::invalid_argument("CheckpointOffload::fetch: no entry");
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (entry->fetched)
    throw std::logic_error("CheckpointOffload::fetch: layer " + std::to_string(entry->layer) + " was fetched before");
  entry->fetched = true;
  // Where the tensors came from: a CUDA entry's host copies say kCPU, its events know.
  c10::Device target(c10::kCPU);
#ifdef QLORA_WITH_CUDA
  if (entry->copied) target = c10::Device(c10::kCUDA, impl_->device);
#endif
  impl_->bring_back(*entry, target);
#ifdef QLORA_WITH_CUDA
  if (entry->returned) entry->returned->block(c10::cuda::getCurrentCUDAStream(target.index()));
#endif
  std::vector<at::Tensor> out = std::move(entry->back);
  entry->back.clear();
  if (auto b = entry->below.lock()) {
    try {
      impl_->bring_back(*b, target);
    } catch (const c10::OutOfMemoryError&) {
      // No room to prefetch beside this layer's backward: the layer below fetches its own when
      // its backward starts (this layer's tensors are fine).
      b->prefetched = false;
      b->back.clear();
    }
  }
  return out;
}

int64_t CheckpointOffload::host_bytes() const { return impl_->held->load(); }

int64_t CheckpointOffload::peak_host_bytes() const { return impl_->peak.load(); }

}  // namespace qlora::layer
