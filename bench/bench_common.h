// bench/bench_common.h: what every GPU benchmark program starts with.
#pragma once

#include <cstdio>

#include "qlora/kernels.h"

namespace qlora::bench {

// Fills `dev` with the first GPU and returns true; without one, prints the benchmark's
// {"bench": name, "system": "qlora", "skipped": "no GPU: ..."} line and returns false.
inline bool find_gpu(const char* bench, kernels::DeviceInfo& dev) {
  char reason[256] = {0};
  if (kernels::query_devices(&dev, 1, reason, sizeof reason) > 0) return true;
  std::printf("{\"bench\":\"%s\",\"system\":\"qlora\",\"skipped\":\"no GPU: %s\"}\n", bench, reason);
  return false;
}

}  // namespace qlora::bench
