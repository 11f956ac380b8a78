#include "qlora/optim/state_storage.h"

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <new>

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

}  // namespace

std::shared_ptr<StateStorage> make_device_storage(c10::Device device) { return std::make_shared<DeviceStorage>(device); }

std::shared_ptr<StateStorage> make_host_storage() { return std::make_shared<HostStorage>(); }
std::shared_ptr<StateStorage> make_host_paged_storage() { return std::make_shared<HostPagedStorage>(); }

}  // namespace qlora::optim
