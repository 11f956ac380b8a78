// qlora env: what this build links and what hardware it sees, for bug reports.
#include <ATen/Parallel.h>
#include <torch/cuda.h>
#include <torch/version.h>

#include <iostream>
#include <memory>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "qlora/kernels.h"

namespace qlora::cli {

Runner add_env_command(CLI::App& root) {
  auto as_json = std::make_shared<bool>(false);
  CLI::App* cmd = root.add_subcommand("env", "versions, threads and GPUs this build sees");
  cmd->add_flag("--json", *as_json, "print as JSON");
  return [as_json]() {
    nlohmann::json info;
    info["qlora"] = QLORA_VERSION;
    info["libtorch"] = TORCH_VERSION;
    info["torch_cuda_available"] = torch::cuda::is_available();
    info["cpu_threads"] = at::get_num_threads();
    constexpr int kMaxDevices = 16;
    kernels::DeviceInfo devices[kMaxDevices];
    char reason[256];
    const int n = kernels::query_devices(devices, kMaxDevices, reason, sizeof reason);
    info["gpus"] = nlohmann::json::array();
    for (int i = 0; i < n && i < kMaxDevices; ++i) {
      info["gpus"].push_back({{"index", devices[i].index},
                              {"name", devices[i].name},
                              {"memory_bytes", devices[i].total_bytes},
                              {"free_bytes", devices[i].free_bytes},
                              {"compute_capability", std::to_string(devices[i].cc_major) + "." +
                                                         std::to_string(devices[i].cc_minor)}});
    }
    if (n == 0) info["gpu_note"] = reason;
    if (*as_json) {
      std::cout << info.dump(2) << "\n";
      return 0;
    }
    std::cout << "qlora     " << QLORA_VERSION << "\nlibtorch  " << TORCH_VERSION
              << (torch::cuda::is_available() ? " (CUDA)" : " (CPU)") << "\nthreads   "
              << at::get_num_threads() << "\n";
    if (n == 0) std::cout << "gpus      none (" << reason << ")\n";
    for (int i = 0; i < n && i < kMaxDevices; ++i)
      std::cout << "gpu " << i << "     " << devices[i].name << ", "
                << devices[i].total_bytes / (1024.0 * 1024 * 1024) << " GiB, compute capability "
                << devices[i].cc_major << "." << devices[i].cc_minor << "\n";
    return 0;
  };
}

}  // namespace qlora::cli
