// train/memory: what the device's memory holds, and out-of-memory as an event
// a run survives (the measured-memory issue).
//
// On a GPU the numbers are the CUDA caching allocator's (what
// torch.cuda.memory_allocated / memory_reserved / max_memory_* read); on the
// CPU allocated = the process's resident set and peak = its high-water mark,
// reserved = allocated. release_cached() hands the allocator's free blocks
// back to the driver, so a failed attempt leaves nothing behind.
#pragma once

#include <c10/core/Device.h>

#include <cstdint>
#include <exception>
#include <string>

namespace qlora::train {

struct MemoryStats {
  int64_t allocated = 0;
  int64_t reserved = 0;
  int64_t peak_allocated = 0;  // since the last reset_peak_memory
  int64_t peak_reserved = 0;
  int64_t device_total = 0;    // the GPU's memory (0 on CPU)
  int64_t device_free = 0;     // free as the driver sees it (0 on CPU)
};

MemoryStats memory_stats(c10::Device device);
void reset_peak_memory(c10::Device device);
void release_cached_memory(c10::Device device);

// Caps what the caching allocator may take to `fraction` of the GPU's memory
// (torch.cuda.set_per_process_memory_fraction); beyond it, allocations fail
// with the usual out-of-memory error. No-op on CPU.
void set_memory_fraction(c10::Device device, double fraction);

// The host memory the kernel says a new allocation may take without swapping (MemAvailable of
// /proc/meminfo), in bytes; 0 when unknown.
int64_t host_available_bytes();

// True for c10's OutOfMemoryError (a CUDA allocation that failed), whatever
// wrapped it.
bool is_out_of_memory(const std::exception& e);

}  // namespace qlora::train
