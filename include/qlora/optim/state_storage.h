// optim/state_storage: where optimizer state lives.
//
// The paged optimizer asks a StateStorage for its state buffers instead of allocating them
// itself, so the placement policy is one object: plain or page-aligned host memory on the CPU;
// on a GPU, CUDA managed ("unified") memory that the driver pages between GPU and host, where
// prefetch_to_device / evict_to_host are cudaMemPrefetchAsync calls (Note [paged state in
// managed memory] in state_storage.cpp), or the GPU's own memory. Buffers come back as
// at::Tensors over the storage's memory and are zero-filled (fresh optimizer state).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace qlora::optim {

class StateStorage {
 public:
  virtual ~StateStorage() = default;

  // A zero-filled, contiguous tensor of `shape` and `dtype` in this storage.
  virtual at::Tensor allocate(const std::vector<int64_t>& shape, at::ScalarType dtype) = 0;

  // The total the caller is about to allocate (so a storage can take it in one piece); a hint.
  virtual void reserve(uint64_t /*bytes*/) {}

  // Hints before and after the optimizer step touches the state; no-ops on the host.
  virtual void prefetch_to_device() {}
  virtual void evict_to_host() {}

  virtual std::string name() const = 0;   // "host", "host-paged", "cuda-managed"
  virtual bool paged() const = 0;         // memory the paging layer may move
  uint64_t bytes_allocated() const { return bytes_allocated_; }

 protected:
  uint64_t bytes_allocated_ = 0;
};

// Ordinary CPU tensors (the default allocator); what the non-paged optimizers use.
std::shared_ptr<StateStorage> make_host_storage();

// The paged layer's host implementation: page-aligned host allocations owned by the
// storage's own allocator (posix_memalign), the CPU stand-in for managed memory.
std::shared_ptr<StateStorage> make_host_paged_storage();

// Zeroed tensors in the memory of `device` (a GPU's own memory; not paged).
std::shared_ptr<StateStorage> make_device_storage(c10::Device device);

// CUDA managed memory preferring `device` (an indexed CUDA device), paged by the driver: one
// arena of reserve()'s size (8 MiB chunks without it), each allocation refused before it is made
// when it exceeds the GPU's free memory. Throws (c10::Error) where
// managed_storage_unavailable(device) is not empty.
std::shared_ptr<StateStorage> make_managed_storage(c10::Device device);

// Why make_managed_storage(device) cannot be used here ("" when it can).
std::string managed_storage_unavailable(c10::Device device);

}  // namespace qlora::optim
