// kernels: the CUDA side of qlora, as plain C++ with raw pointers and sizes.
// Compiled by nvcc into its own library (qlora_kernels) that never sees a
// torch header; the modules above call it through this header alone.
#pragma once

#include <cstddef>

namespace qlora::kernels {

// ---------------------------------------------------------------- devices

struct DeviceInfo {
  int index = -1;
  char name[256] = {0};
  size_t total_bytes = 0;   // global memory
  size_t free_bytes = 0;    // free right now (cudaMemGetInfo)
  int cc_major = 0;         // compute capability
  int cc_minor = 0;
  int multiprocessors = 0;
};

// Fills up to `max_devices` entries of `out` and returns how many CUDA devices
// are visible; returns 0 when there is no driver or no GPU, with the CUDA
// runtime's reason written to `reason` (NUL-terminated, may be truncated).
int query_devices(DeviceInfo* out, int max_devices, char* reason, size_t reason_size);

}  // namespace qlora::kernels
