#include "qlora/train/memory.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstring>
#include <fstream>
#include <string>

#ifdef QLORA_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <cuda_runtime_api.h>
#endif

namespace qlora::train {
namespace {

int64_t proc_status_kb(const char* key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const size_t n = std::strlen(key);
  while (std::getline(in, line))
    if (line.compare(0, n, key) == 0) return std::stoll(line.substr(n)) * 1024;
  return 0;
}

#ifdef QLORA_WITH_CUDA
c10::DeviceIndex index_of(c10::Device d) { return d.index() < 0 ? 0 : d.index(); }
#endif

}  // namespace

MemoryStats memory_stats(c10::Device device) {
  MemoryStats m;
#ifdef QLORA_WITH_CUDA
  if (device.is_cuda()) {
    using c10::CachingAllocator::StatType;
    const auto s = c10::cuda::CUDACachingAllocator::getDeviceStats(index_of(device));
    const auto agg = static_cast<size_t>(StatType::AGGREGATE);
    m.allocated = s.allocated_bytes[agg].current;
    m.peak_allocated = s.allocated_bytes[agg].peak;
    m.reserved = s.reserved_bytes[agg].current;
    m.peak_reserved = s.reserved_bytes[agg].peak;
    size_t free = 0, total = 0;
    if (cudaMemGetInfo(&free, &total) == cudaSuccess) {
      m.device_free = static_cast<int64_t>(free);
      m.device_total = static_cast<int64_t>(total);
    }
    return m;
  }
#endif
  (void)device;
  m.allocated = m.reserved = proc_status_kb("VmRSS:");
  m.peak_allocated = m.peak_reserved = proc_status_kb("VmHWM:");
  return m;
}

void reset_peak_memory(c10::Device device) {
#ifdef QLORA_WITH_CUDA
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(index_of(device));
#endif
  (void)device;
}

void release_cached_memory(c10::Device device) {
#ifdef QLORA_WITH_CUDA
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::emptyCache();
#endif
  (void)device;
}

void set_memory_fraction(c10::Device device, double fraction) {
#ifdef QLORA_WITH_CUDA
  if (device.is_cuda()) {
    // The allocator sets up a device on its first allocation there, and
    // refuses a fraction for a device it has not set up yet.
    (void)at::empty({1}, at::TensorOptions().device(device));
    c10::cuda::CUDACachingAllocator::setMemoryFraction(fraction, index_of(device));
  }
#endif
  (void)device;
  (void)fraction;
}

int64_t host_available_bytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  int64_t kib = 0;
  std::string unit;
  while (in >> key >> kib) {
    std::getline(in, unit);
    if (key == "MemAvailable:") return kib * 1024;
  }
  return 0;
}

bool is_out_of_memory(const std::exception& e) {
  return dynamic_cast<const c10::OutOfMemoryError*>(&e) != nullptr;
}

}  // namespace qlora::train
