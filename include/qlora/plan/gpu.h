// plan/gpu: what the planner knows about a GPU, torch-free.
//
// A GpuSpec is a memory size and peak tensor throughput, from a named preset
// (t4 ... h200), a plain size ("24GiB"), or a device the caller has queried
// (the planner itself never touches CUDA). memory_bytes is the capacity CUDA
// reports to a process (cudaMemGetInfo's total, what PyTorch's OOM message
// calls "total capacity"), which is a little below what nvidia-smi shows.
#pragma once

#include <optional>
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

// ---------------------------------------------------------------- this machine

// The GPU of this machine as the caller queried it (the CLI asks the CUDA
// driver through kernels::query_devices; the planner never does).
struct ThisMachine {
  std::optional<GpuSpec> gpu;  // GPU 0, from gpu_from_device; empty: none usable
  int device_count = 0;        // visible CUDA devices
  std::string why_none;        // the driver's reason when there is none
};

// True for "auto" and "this" (any case): the GPU of this machine.
bool names_this_machine(const std::string& arg);

// "this machine: NVIDIA H100 80GB HBM3, 79.2 GiB, sm_90", or "this machine:
// no GPU (no CUDA-capable device is detected)" when there is none.
std::string this_machine_entry(const ThisMachine& here);

// The values --gpu accepts, for help and error messages: the presets, then
// "this (<this_machine_entry>)" when `here` is given (without: "this / auto
// (the GPU of this machine)"), "none", and memory sizes.
std::string accepted_gpu_values(const ThisMachine* here);

// A preset name (case-insensitive) or a memory size: "24GiB" (2^30) or "80GB"
// (1e9), decimals allowed; "this" / "auto" resolve to here->gpu. Throws
// InputError listing what is accepted (this machine's entry among them when
// `here` is given), with "did you mean" for a near miss; for "this" / "auto"
// without a GPU here, one that says there is none and why.
GpuSpec resolve_gpu(const std::string& arg, const ThisMachine* here = nullptr);

// A GpuSpec for a queried device: its own memory and compute capability, the
// throughput of the preset whose name matches the device name ("Tesla T4",
// "NVIDIA A100-SXM4-80GB"), none when nothing matches.
GpuSpec gpu_from_device(const std::string& device_name, double total_bytes, int cc_major, int cc_minor);

// ---------------------------------------------------------------- config checks

// Registers with config (set_name_check) the checks of the names config cannot know:
// hardware.gpu against the GPU presets here ("this", "auto" and "none" pass: the GPU of the
// machine that runs `qlora plan` is not known where a config is checked), model.preset against
// model's presets. Every load after it lists a bad name with the config's other problems. The
// CLI calls it at start-up; idempotent.
void register_config_checks();

}  // namespace qlora::plan
