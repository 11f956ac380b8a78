// plan on a GPU machine (label cuda): `--gpu auto` reads the device, and the
// plan's figures are the device's own; skipped without a GPU.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "qlora/kernels.h"
#include "support/test_support.h"

namespace qlora {
namespace {

TEST(CudaPlan, AutoUsesThisMachinesGpu) {
  kernels::DeviceInfo dev;
  char reason[256];
  if (kernels::query_devices(&dev, 1, reason, sizeof reason) == 0) GTEST_SKIP() << "no GPU here (" << reason << ")";
  const auto r = testing::run_qlora("plan --config configs/llama-3.2-1b-t4.yaml --gpu auto --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["gpu"]["name"], dev.name);
  EXPECT_TRUE(j["gpu"]["from_device"].get<bool>());
  EXPECT_EQ(j["gpu"]["memory_bytes"].get<int64_t>(), int64_t(dev.total_bytes));
  EXPECT_EQ(j["gpu"]["compute_capability"], std::to_string(dev.cc_major) + "." + std::to_string(dev.cc_minor));
  EXPECT_EQ(j["precision"]["resolved"], "fp16");  // the config asks for fp16
  EXPECT_TRUE(j["fits"].is_boolean());
}

TEST(CudaPlan, EnvSeesTheGpuThroughLibTorch) {
  kernels::DeviceInfo dev;
  char reason[256];
  if (kernels::query_devices(&dev, 1, reason, sizeof reason) == 0) GTEST_SKIP() << "no GPU here (" << reason << ")";
#ifndef QLORA_WITH_CUDA
  GTEST_SKIP() << "built without QLORA_CUDA: LibTorch's CUDA libraries are not linked";
#else
  const auto r = testing::run_qlora("env --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_TRUE(j["torch_cuda_available"].get<bool>()) << r.out;
  EXPECT_FALSE(j["gpus"].empty());
#endif
}

}  // namespace
}  // namespace qlora
