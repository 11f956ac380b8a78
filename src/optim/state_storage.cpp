#include "qlora/optim/state_storage.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

#include "qlora/kernels.h"

namespace qlora::optim {

namespace {

constexpr size_t kPageBytes = 4096;

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    TORCH_CHECK(d >= 0, "state buffer shape must be non-negative, got ", d);
    n *= d;
  }
  return n;
}

class HostStorage final : public StateStorage {
 public:
  at::Tensor allocate(const std::vector<int64_t>& shape, at::ScalarType dtype) override {
    at::Tensor t = at::zeros(shape, at::TensorOptions().dtype(dtype).device(at::kCPU));
    bytes_allocated_ += t.nbytes();
    return t;
  }
  std::string name() const override { return "host"; }
  bool paged() const override { return false; }
};

class HostPagedStorage final : public StateStorage {
 public:
  at::Tensor allocate(const std::vector<int64_t>& shape, at::ScalarType dtype) override {
    const int64_t n = numel_of(shape);
    const size_t bytes = static_cast<size_t>(n) * c10::elementSize(dtype);
    const size_t rounded = ((bytes + kPageBytes - 1) / kPageBytes) * kPageBytes;
    void* ptr = nullptr;
    if (posix_memalign(&ptr, kPageBytes, rounded == 0 ? kPageBytes : rounded) != 0) throw std::bad_alloc();
    std::memset(ptr, 0, rounded == 0 ? kPageBytes : rounded);
    bytes_allocated_ += rounded;
    return at::from_blob(ptr, shape, [](void* p) { std::free(p); },
                            at::TensorOptions().dtype(dtype).device(at::kCPU));
  }
  std::string name() const override { return "host-paged"; }
  bool paged() const override { return true; }
};

class DeviceStorage final : public StateStorage {
 public:
  explicit DeviceStorage(c10::Device device) : device_(device) {}
  at::Tensor allocate(const std::vector<int64_t>& shape, at::ScalarType dtype) override {
    at::Tensor t = at::zeros(shape, at::TensorOptions().dtype(dtype).device(device_));
    bytes_allocated_ += t.nbytes();
    return t;
  }
  std::string name() const override { return device_.str(); }
  bool paged() const override { return false; }

 private:
  c10::Device device_;
};

// Note [paged state in managed memory]
// What bitsandbytes' paged optimizers do: the 8-bit moments and their absmax live in CUDA
// managed memory preferring the GPU, so the driver can move them to the host when the GPU is
// short of memory and fault them back when the step's kernel touches them. The optimizer
// reserves its whole state first, so it is one managed allocation (an arena the buffers are
// aligned slices of); an allocation is refused before it is made when it exceeds what the GPU
// has free (DESIGN: on a shared GPU, oversubscribing managed memory can hang it). prefetch_to_device runs before every
// optimizer step (AdamW8bit::step) so the kernel does not fault page by page; evict_to_host
// moves everything to the host (tests; or a caller that wants the GPU's memory back). Both are
// asynchronous on the legacy default stream, where LibTorch's kernels run unless a caller sets
// another stream, so they are ordered with the step. Managed memory is outside the CUDA caching
// allocator: max_memory_allocated does not count it (the peer's bitsandbytes state neither).
class ManagedStorage final : public StateStorage {
 public:
  explicit ManagedStorage(c10::Device device) : device_(device) {}

  void reserve(uint64_t bytes) override {
    if (bytes > 0) add_chunk(static_cast<size_t>(bytes));
  }

  at::Tensor allocate(const std::vector<int64_t>& shape, at::ScalarType dtype) override {
    const size_t bytes = static_cast<size_t>(numel_of(shape)) * c10::elementSize(dtype);
    const size_t slot = round_up(bytes == 0 ? 1 : bytes, kManagedAlign);
    if (chunks_.empty() || chunks_.back()->bytes - chunks_.back()->used < slot)
      add_chunk(std::max(slot, kManagedChunkBytes));
    const std::shared_ptr<Chunk> chunk = chunks_.back();
    void* ptr = static_cast<char*>(chunk->ptr) + chunk->used;
    chunk->used += slot;
    bytes_allocated_ += bytes;
    // The tensor keeps its chunk alive (the deleter holds it), whatever outlives what.
    return at::from_blob(ptr, shape, [chunk](void*) {}, at::TensorOptions().dtype(dtype).device(device_));
  }
  void prefetch_to_device() override { prefetch(device_.index()); }
  void evict_to_host() override { prefetch(-1); }
  std::string name() const override { return "cuda-managed"; }
  bool paged() const override { return true; }

 private:
  // One managed allocation; tensors are 256-byte aligned slices of it, so a step's prefetch is
  // one driver call per chunk (one in all when the optimizer reserved its total first), not
  // four per parameter.
  struct Chunk {
    void* ptr = nullptr;
    size_t bytes = 0;
    size_t used = 0;
    ~Chunk() {
      if (ptr != nullptr) kernels::managed_free(ptr);
    }
  };
  static constexpr size_t kManagedAlign = 256;
  static constexpr size_t kManagedChunkBytes = size_t{8} << 20;  // when nothing was reserved

  static size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

  void add_chunk(size_t bytes) {
    auto chunk = std::make_shared<Chunk>();
    size_t free_bytes = 0;
    const int rc = kernels::managed_alloc(&chunk->ptr, bytes, device_.index(), &free_bytes);
    TORCH_CHECK(rc == 0, "paged optimizer state: ", bytes, " bytes of managed memory on ", device_.str(), " (",
                free_bytes, " bytes free): ", kernels::cuda_error_string(rc),
                "; use train.optimizer: adamw_8bit to keep the state in ordinary GPU memory");
    chunk->bytes = bytes;
    chunks_.push_back(std::move(chunk));
  }

  void prefetch(int device) {
    for (const auto& c : chunks_) {
      const int rc = kernels::managed_prefetch(c->ptr, c->used, device, nullptr);
      TORCH_CHECK(rc == 0, "paged optimizer state: prefetch to ", device < 0 ? std::string("the host") : device_.str(),
                  " failed: ", kernels::cuda_error_string(rc));
    }
  }

  c10::Device device_;
  std::vector<std::shared_ptr<Chunk>> chunks_;
};

}  // namespace

std::shared_ptr<StateStorage> make_device_storage(c10::Device device) { return std::make_shared<DeviceStorage>(device); }

std::shared_ptr<StateStorage> make_managed_storage(c10::Device device) {
  TORCH_CHECK(device.is_cuda() && device.has_index(), "managed state storage needs an indexed CUDA device, got ",
              device.str());
  char reason[256] = {0};
  TORCH_CHECK(kernels::managed_memory_supported(device.index(), reason, sizeof reason),
              "managed state storage on ", device.str(), ": ", reason);
  return std::make_shared<ManagedStorage>(device);
}

std::string managed_storage_unavailable(c10::Device device) {
  if (!device.is_cuda() || !device.has_index()) return "not an indexed CUDA device: " + device.str();
  char reason[256] = {0};
  return kernels::managed_memory_supported(device.index(), reason, sizeof reason) ? std::string() : std::string(reason);
}

std::shared_ptr<StateStorage> make_host_storage() { return std::make_shared<HostStorage>(); }
std::shared_ptr<StateStorage> make_host_paged_storage() { return std::make_shared<HostPagedStorage>(); }

}  // namespace qlora::optim
