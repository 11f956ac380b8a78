// kernels (label cuda): device discovery on a GPU machine; skipped without one.
#include <gtest/gtest.h>

#include "qlora/kernels.h"

namespace qlora {
namespace {

TEST(CudaDevice, QueryReportsEveryVisibleGpu) {
  kernels::DeviceInfo devices[16];
  char reason[256];
  const int n = kernels::query_devices(devices, 16, reason, sizeof reason);
  if (n == 0) GTEST_SKIP() << "no GPU here (" << reason << ")";
  for (int i = 0; i < n && i < 16; ++i) {
    EXPECT_EQ(devices[i].index, i);
    EXPECT_GT(devices[i].total_bytes, size_t{1} << 30) << devices[i].name;
    EXPECT_LE(devices[i].free_bytes, devices[i].total_bytes);
    EXPECT_GE(devices[i].cc_major, 7) << "kernels/ is built for sm_75 and newer";
    EXPECT_GT(devices[i].multiprocessors, 0);
    EXPECT_NE(std::string(devices[i].name), "");
  }
}

}  // namespace
}  // namespace qlora
