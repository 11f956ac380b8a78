// Device discovery for `qlora plan` ("this machine") and `qlora env`.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "qlora/kernels.h"

namespace qlora::kernels {
namespace {

void write_reason(char* reason, size_t size, const char* what, cudaError_t err) {
  if (reason && size) std::snprintf(reason, size, "%s: %s", what, cudaGetErrorString(err));
}

}  // namespace

int query_devices(DeviceInfo* out, int max_devices, char* reason, size_t reason_size) {
  if (reason && reason_size) reason[0] = '\0';
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    write_reason(reason, reason_size, "no CUDA device", err);
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  for (int i = 0; i < std::min(count, max_devices); ++i) {
    cudaDeviceProp prop{};
    if ((err = cudaGetDeviceProperties(&prop, i)) != cudaSuccess) {
      write_reason(reason, reason_size, "cudaGetDeviceProperties", err);
      return 0;
    }
    DeviceInfo& d = out[i];
    d.index = i;
    std::snprintf(d.name, sizeof d.name, "%s", prop.name);
    d.total_bytes = prop.totalGlobalMem;
    d.cc_major = prop.major;
    d.cc_minor = prop.minor;
    d.multiprocessors = prop.multiProcessorCount;
    int previous = 0;
    cudaGetDevice(&previous);
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaSetDevice(i) == cudaSuccess && cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess)
      d.free_bytes = free_bytes;
    cudaSetDevice(previous);
  }
  return count;
}

}  // namespace qlora::kernels
