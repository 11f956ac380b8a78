#include "qlora/plan/gpu.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "qlora/common/errors.h"
#include "qlora/common/text.h"
#include "qlora/config/config.h"
#include "qlora/model/decoder_config.h"
#include "constants.h"

namespace qlora::plan {
namespace {


// Memory: CUDA-visible capacity, from PyTorch's own OOM messages ("GPU 0 has a
// total capacity of X GiB", "X GiB total capacity") quoted in public logs,
// which is cudaMemGetInfo's total; nvidia-smi's memory.total beside it.
// Throughput:
// NVIDIA datasheets, dense (the datasheets' "with sparsity" figures halved).
struct Preset {
  const char* name;
  const char* marker;  // substring of the CUDA device name
  double total_gib;
  double smi_mib;
  double bf16, fp16, fp32;  // TFLOP/s
  double bandwidth_gbs;
  int cc_major, cc_minor;
  const char* note;
};

// clang-format off
const Preset kPresets[] = {
  // T4: 14.75 GiB total capacity (nvidia-smi 15360 MiB). 65 TFLOP/s fp16
  // tensor, no bf16 tensor cores (Turing), 8.1 fp32, 320 GB/s. sm_75.
  {"t4", "T4", 14.75, 15360, 0, 65, 8.1, 320, 7, 5, "Tesla T4 16 GB, Turing"},
  // L4: 22.04 GiB (nvidia-smi 23034 MiB). 242 TFLOP/s bf16/fp16 with
  // sparsity -> 121 dense, 30.3 fp32, 300 GB/s. sm_89.
  {"l4", "L4", 22.04, 23034, 121, 121, 30.3, 300, 8, 9, "L4 24 GB, Ada"},
  // A10: 22.20 GiB (nvidia-smi 23028 MiB, NVML 24146608128 bytes). 250 with
  // sparsity -> 125 dense bf16/fp16, 31.2 fp32, 600 GB/s. sm_86.
  {"a10", "A10", 22.20, 23028, 125, 125, 31.2, 600, 8, 6, "A10 24 GB, Ampere"},
  // A100 40 GB: 39.39 GiB (nvidia-smi 40960 MiB). 312 dense bf16/fp16,
  // 19.5 fp32, 1555 GB/s. sm_80.
  {"a100-40", "A100", 39.39, 40960, 312, 312, 19.5, 1555, 8, 0, "A100 40 GB SXM4"},
  // A100 80 GB: 79.15 GiB (nvidia-smi 81920 MiB). 312 dense, 2039 GB/s (SXM4).
  {"a100-80", "A100", 79.15, 81920, 312, 312, 19.5, 2039, 8, 0, "A100 80 GB SXM4"},
  // H100 80 GB HBM3: 85017493504 bytes = 79.18 GiB (nvidia-smi 81559
  // MiB). SXM5: 1979 with sparsity -> 989 dense bf16/fp16, 67 fp32, 3350 GB/s.
  // (PCIe: 756 dense, 2000 GB/s.) sm_90.
  {"h100", "H100", 85017493504.0 / kGiB, 81559, 989, 989, 67, 3350, 9, 0, "H100 80 GB SXM5"},
  // H200: 139.80 GiB (nvidia-smi 143771 MiB). Same compute as H100 SXM,
  // 4800 GB/s HBM3e. sm_90.
  {"h200", "H200", 139.80, 143771, 989, 989, 67, 4800, 9, 0, "H200 141 GB SXM"},
};
// clang-format on

GpuSpec to_spec(const Preset& p) {
  GpuSpec g;
  g.name = p.name;
  g.memory_bytes = std::round(p.total_gib * kGiB / kMiB) * kMiB;  // whole MiB
  g.nvidia_smi_mib = p.smi_mib;
  g.bf16_tflops = p.bf16;
  g.fp16_tflops = p.fp16;
  g.fp32_tflops = p.fp32;
  g.memory_bandwidth_gbs = p.bandwidth_gbs;
  g.cc_major = p.cc_major;
  g.cc_minor = p.cc_minor;
  g.note = p.note;
  return g;
}

std::string fixed_1(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", v);
  return buf;
}

std::string accepted_text(const ThisMachine* here) { return "accepted: " + accepted_gpu_values(here); }

// "24GiB" -> 24 * 2^30, "80GB" -> 80e9; false when `s` is not a size.
bool parse_size(const std::string& s, double* bytes, std::string* problem) {
  size_t i = 0;
  while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.')) ++i;
  if (i == 0) return false;
  std::string unit = to_lower(s.substr(i));
  while (!unit.empty() && unit.front() == ' ') unit.erase(unit.begin());
  char* end = nullptr;
  const std::string number = s.substr(0, i);
  double v = std::strtod(number.c_str(), &end);
  if (end != number.c_str() + number.size()) return false;
  if (unit == "gib") {
    *bytes = v * kGiB;
  } else if (unit == "gb") {
    *bytes = v * 1e9;
  } else if (unit == "mib") {
    *bytes = v * kMiB;
  } else {
    *problem = unit.empty() || unit == "g"
                   ? "a size needs its unit: GiB (2^30 bytes) or GB (10^9 bytes), e.g. " + number + "GiB"
                   : "unknown unit \"" + s.substr(i) + "\"; use GiB or GB";
    return false;
  }
  if (!(v > 0) || v > 1e5) {
    *problem = "memory size must be between 0 and 100000 GiB, got " + s;
    return false;
  }
  return true;
}

}  // namespace

const std::vector<std::string>& gpu_preset_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> n;
    for (const auto& p : kPresets) n.push_back(p.name);
    return n;
  }();
  return names;
}

bool names_this_machine(const std::string& arg) {
  const std::string key = to_lower(arg);
  return key == "auto" || key == "this";
}

std::string this_machine_entry(const ThisMachine& here) {
  if (!here.gpu)
    return "this machine: no GPU" + (here.why_none.empty() ? std::string() : " (" + here.why_none + ")");
  const GpuSpec& g = *here.gpu;
  std::string s = "this machine: " + g.name + ", " + fixed_1(g.memory_bytes / kGiB) + " GiB";
  if (g.has_compute_capability()) s += ", sm_" + std::to_string(g.cc_major) + std::to_string(g.cc_minor);
  if (here.device_count > 1) s += " (GPU 0 of " + std::to_string(here.device_count) + ")";
  return s;
}

std::string accepted_gpu_values(const ThisMachine* here) {
  const std::string local = here ? "this (" + this_machine_entry(*here) + ")" : "this / auto (the GPU of this machine)";
  return join(gpu_preset_names()) + ", " + local + ", none, or a memory size such as 24GiB or 80GB";
}

GpuSpec resolve_gpu(const std::string& arg, const ThisMachine* here) {
  const std::string key = to_lower(arg);
  if (names_this_machine(arg)) {
    if (here && here->gpu) return *here->gpu;
    if (here)
      throw InputError("--gpu " + arg + " plans for the GPU of this machine, and it has none" +
                       (here->why_none.empty() ? std::string() : " (" + here->why_none + ")") +
                       "; name one instead (" + accepted_text(nullptr) + ")");
    throw InputError("--gpu " + arg + " needs the GPU of this machine, and none was queried; name one instead (" +
                     accepted_text(nullptr) + ")");
  }
  for (const auto& p : kPresets)
    if (key == p.name) return to_spec(p);

  double bytes = 0;
  std::string problem;
  if (parse_size(arg, &bytes, &problem)) {
    GpuSpec g;
    g.name = arg;
    g.memory_bytes = bytes;
    g.note = "memory size only: no throughput or compute capability known";
    return g;
  }
  if (!problem.empty()) throw InputError("GPU \"" + arg + "\": " + problem);
  std::string msg = "unknown GPU \"" + arg + "\"";
  // A preset that starts with what was typed ("h10", "a100") beats one that
  // is merely as close by edit distance ("a10").
  std::string near;
  for (const auto& name : gpu_preset_names())
    if (near.empty() && name.rfind(key, 0) == 0) near = name;
  if (near.empty()) near = closest_match(arg, gpu_preset_names());
  if (!near.empty()) msg += "; did you mean \"" + near + "\"?";
  throw InputError(msg + " (" + accepted_text(here) + ")");
}

GpuSpec gpu_from_device(const std::string& device_name, double total_bytes, int cc_major, int cc_minor) {
  GpuSpec g;
  const std::string upper = [&] {
    std::string u = device_name;
    for (auto& ch : u) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
    return u;
  }();
    auto has_token = [&](const std::string& marker) {
    for (size_t pos = upper.find(marker); pos != std::string::npos; pos = upper.find(marker, pos + 1)) {
      const size_t after = pos + marker.size();
      const bool left_ok = pos == 0 || !std::isalnum(static_cast<unsigned char>(upper[pos - 1]));
      // Nothing alphanumeric may follow: "A10G" and "L40S" are other GPUs.
      const bool right_ok = after >= upper.size() || !std::isalnum(static_cast<unsigned char>(upper[after]));
      if (left_ok && right_ok) return true;
    }
    return false;
  };
  for (const auto& p : kPresets) {
    if (!has_token(p.marker)) continue;
    // Two A100 sizes: take the one nearer to the device's memory.
    if (std::string(p.marker) == "A100") {
      const bool big = total_bytes > 60 * kGiB;
      if (big != (std::string(p.name) == "a100-80")) continue;
    }
    g = to_spec(p);
    break;
  }
  g.name = device_name;
  g.memory_bytes = total_bytes;
  g.nvidia_smi_mib = 0;
  g.cc_major = cc_major;
  g.cc_minor = cc_minor;
  g.from_device = true;
  if (!g.has_throughput()) g.note = "no throughput figures known for this device";
  return g;
}

void register_config_checks() {
  set_name_check("model.preset", [](const std::string& preset) -> std::string {
    if (preset.empty()) return "";
    const auto& presets = model_preset_names();
    if (std::find(presets.begin(), presets.end(), preset) != presets.end()) return "";
    const std::string near = closest_match(preset, presets);
    return "unknown preset \"" + preset + "\"; expected one of " + join(presets, ", ") +
           (near.empty() ? "" : "; did you mean " + near + "?");
  });
  set_name_check("hardware.gpu", [](const std::string& gpu) -> std::string {
    if (names_this_machine(gpu) || gpu == "none") return "";
    try {
      (void)resolve_gpu(gpu);
    } catch (const InputError& e) {
      // An unknown name's message already lists what is accepted (this, auto and none among
      // them); a malformed size's says what to write.
      return e.what();
    }
    return "";
  });
}

}  // namespace qlora::plan
