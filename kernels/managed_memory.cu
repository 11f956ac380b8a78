// Managed ("unified") memory for the paged optimizer's state (optim/state_storage.h,
// Note [paged state in managed memory] there). Plain runtime calls behind the kernels
// library's int-returning convention, so qlora_core needs no CUDA header.
#include <cuda_runtime.h>

#include <cstdio>

#include "qlora/kernels.h"

namespace qlora::kernels {
namespace {

void write_reason(char* reason, size_t size, const char* text) {
  if (reason && size) std::snprintf(reason, size, "%s", text);
}

cudaMemLocation location_of(int device) {
  cudaMemLocation where{};
  where.type = device < 0 ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
  where.id = device < 0 ? 0 : device;
  return where;
}

}  // namespace

bool managed_memory_supported(int device, char* reason, size_t reason_size) {
  if (reason && reason_size) reason[0] = '\0';
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || device < 0 || device >= count) {
    cudaGetLastError();
    write_reason(reason, reason_size, "no such CUDA device");
    return false;
  }
  int managed = 0, concurrent = 0;
  cudaDeviceGetAttribute(&managed, cudaDevAttrManagedMemory, device);
  cudaDeviceGetAttribute(&concurrent, cudaDevAttrConcurrentManagedAccess, device);
  if (!managed) {
    write_reason(reason, reason_size, "the device does not support managed memory");
    return false;
  }
  if (!concurrent) {
    // Without it the host cannot migrate pages while kernels run, and prefetching is not
    // available (Windows, some virtualized GPUs).
    write_reason(reason, reason_size, "the device or driver has no concurrent managed access (no prefetching)");
    return false;
  }
  return true;
}

int managed_alloc(void** ptr, size_t bytes, int device, size_t* free_bytes) {
  *ptr = nullptr;
  int previous = 0;
  cudaError_t err = cudaGetDevice(&previous);
  if (err != cudaSuccess) return static_cast<int>(err);
  if ((err = cudaSetDevice(device)) != cudaSuccess) return static_cast<int>(err);
  size_t free_now = 0, total = 0;
  err = cudaMemGetInfo(&free_now, &total);
  if (free_bytes) *free_bytes = free_now;
  // DESIGN "Memory on a GPU, and paging": never more managed memory than the GPU has free.
  if (err == cudaSuccess && bytes > free_now) err = cudaErrorMemoryAllocation;
  if (err == cudaSuccess) err = cudaMallocManaged(ptr, bytes == 0 ? 1 : bytes, cudaMemAttachGlobal);
  if (err == cudaSuccess) {
    // The state lives on the GPU between steps; the host reads it only for checkpoints.
    const cudaMemLocation here = location_of(device);
    if (cudaMemAdvise(*ptr, bytes, cudaMemAdviseSetPreferredLocation, here) != cudaSuccess ||
        cudaMemAdvise(*ptr, bytes, cudaMemAdviseSetAccessedBy, here) != cudaSuccess) {
      cudaGetLastError();  // advice is a hint: a driver that refuses it still pages on demand
    }
    err = cudaMemset(*ptr, 0, bytes);  // fresh optimizer state is zero; touches the pages on the GPU
    if (err != cudaSuccess) {
      cudaFree(*ptr);
      *ptr = nullptr;
    }
  } else {
    cudaGetLastError();
  }
  cudaSetDevice(previous);
  return static_cast<int>(err);
}

int managed_free(void* ptr) { return static_cast<int>(cudaFree(ptr)); }

int managed_prefetch(const void* ptr, size_t bytes, int device, CUstream_st* stream) {
  if (ptr == nullptr || bytes == 0) return 0;
  return static_cast<int>(cudaMemPrefetchAsync(ptr, bytes, location_of(device), 0, stream));
}

}  // namespace qlora::kernels
