// The data-parallel path with its tensors on a GPU (label cuda; skipped
// without one): two `qlora train` processes on GPU 0 with the Gloo backend
// (NCCL refuses two ranks on one device, and the machine this is run on has
// one GPU), their LoRA gradients staged through the host, give the losses and
// the adapter of one process with twice the accumulation, fp32.
#include <gtest/gtest.h>
#include <ATen/ATen.h>
#include <torch/cuda.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <string>
#include <vector>

#include "qlora/dist/group.h"
#include "support/dist_fixtures.h"

namespace qlora {
namespace {

TEST(CudaDist, TwoGlooRanksOnOneGpuEqualOneProcess) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  if (const std::string why = dist::unavailable_reason(c10::Device(c10::kCPU)); !why.empty()) GTEST_SKIP() << why;
  const std::string dir = testing::make_temp_dir("cuda_dist");
  constexpr int64_t kSteps = 4;
  // The fixture's config is fp32 (cuBLAS does not use TF32 unless allowed).
  const std::string gloo = "distributed:\n  backend: gloo\n";
  const auto one = testing::run_qlora("train --config " + testing::dist_config(dir, dir + "/one", 4, kSteps) +
                                      " --device cuda");
  ASSERT_EQ(one.exit_code, 0) << one.err;
  ASSERT_NE(one.err.find("device cuda:0"), std::string::npos) << one.err;
  const std::vector<int> codes =
      testing::launch_ranks(dir, testing::dist_config(dir, dir + "/two", 2, kSteps, gloo), 2, "--device cuda", true);
  ASSERT_EQ(codes, (std::vector<int>{0, 0})) << testing::read_text(dir + "/rank0.txt")
                                             << testing::read_text(dir + "/rank1.txt");
  testing::expect_same_run(dir + "/one", dir + "/two");
}

}  // namespace
}  // namespace qlora
