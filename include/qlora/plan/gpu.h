// plan/gpu: what the planner knows about a GPU, torch-free.
//
// A GpuSpec is a memory size and peak tensor throughput, from a named preset
// (t4 ... h200), a plain size ("24GiB"), or a device the caller has queried
// (the planner itself never touches CUDA). memory_bytes is the capacity CUDA
// reports to a process (cudaMemGetInfo's total, what PyTorch's OOM message
// calls "total capacity"), which is a little below what nvidia-smi shows.
#pragma once

#include <string>
#include <vector>

#include "qlora/amp/precision.h"

namespace qlora::plan {

struct GpuSpec {
  std::string name;             // preset name ("t4"), "24GiB", or the device name
  double memory_bytes = 0;      // CUDA-visible total capacity
  double nvidia_smi_mib = 0;    // memory.total as nvidia-smi prints it; 0 when unknown
  double bf16_tflops = 0;       // dense tensor-core peak; 0: no bf16 tensor cores / unknown
  double fp16_tflops = 0;       // dense tensor-core peak; 0 when unknown
  double fp32_tflops = 0;       // non-tensor fp32 peak; 0 when unknown
  double memory_bandwidth_gbs = 0;  // GB/s (1e9); 0 when unknown
  int cc_major = 0;             // compute capability; 0 when unknown
  int cc_minor = 0;
  bool from_device = false;     // measured on this machine rather than a preset
  std::string note;             // which SKU the figures are for ("SXM"), where they come from

  bool has_compute_capability() const { return cc_major > 0; }
  bool supports_bf16() const { return amp::gpu_supports_bf16(cc_major); }
  bool has_throughput() const { return fp16_tflops > 0; }
};

// t4, l4, a10, a100-40, a100-80, h100, h200.
const std::vector<std::string>& gpu_preset_names();

// A preset name (case-insensitive) or a memory size: "24GiB" (2^30) or "80GB"
// (1e9), decimals allowed. "auto" is the caller's business (query the device,
// then gpu_from_device). Throws InputError listing what is accepted, with
// "did you mean" for a near miss.
GpuSpec resolve_gpu(const std::string& arg);

// A GpuSpec for a queried device: its own memory and compute capability, the
// throughput of the preset whose name matches the device name ("Tesla T4",
// "NVIDIA A100-SXM4-80GB"), none when nothing matches.
GpuSpec gpu_from_device(const std::string& device_name, double total_bytes, int cc_major, int cc_minor);

}  // namespace qlora::plan
