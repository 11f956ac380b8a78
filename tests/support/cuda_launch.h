// For tests that call the kernels library's launchers (include/qlora/kernels.h)
// directly: skip without a GPU, check a launcher's return code.
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "qlora/kernels.h"

namespace qlora::testing {

// True when the CUDA runtime sees a device; otherwise false with its reason in *why.
inline bool have_gpu(std::string* why) {
  kernels::DeviceInfo devices[4];
  char reason[256] = {0};
  if (kernels::query_devices(devices, 4, reason, sizeof reason) > 0) return true;
  *why = reason;
  return false;
}

}  // namespace qlora::testing

#define SKIP_WITHOUT_GPU()                                                               \
  do {                                                                                   \
    std::string why_;                                                                    \
    if (!::qlora::testing::have_gpu(&why_)) GTEST_SKIP() << "no GPU here (" << why_ << ")"; \
  } while (0)

#define CUDA_OK(expr)                                                                     \
  do {                                                                                    \
    const int rc_ = static_cast<int>(expr);                                               \
    ASSERT_EQ(rc_, 0) << #expr << ": " << ::qlora::kernels::cuda_error_string(rc_);       \
  } while (0)
