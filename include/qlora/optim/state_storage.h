// optim/state_storage: where optimizer state lives.
//
// The paged optimizer asks a StateStorage for its state buffers instead of allocating them
// itself, so the placement policy is one object: plain host memory here; CUDA managed
// ("unified") memory that the driver pages between GPU and host in the CUDA issue, where
// prefetch_to_device / evict_to_host become cudaMemPrefetchAsync calls. Buffers come back
// as at::Tensors over the storage's memory and are zero-filled (fresh optimizer state).
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

}  // namespace qlora::optim
