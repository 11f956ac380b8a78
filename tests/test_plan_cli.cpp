// `qlora plan` as users run it (the real binary): the shipped configs plan and fit, JSON and
// --gpus, WORLD_SIZE from the environment, bad input, --gpu this. The plan's numbers
// themselves: test_plan.cpp.
#include <gtest/gtest.h>

#include <cstdlib>
#include <nlohmann/json.hpp>
#include <string>

#include "qlora/kernels.h"
#include "support/test_support.h"

namespace qlora::plan {
namespace {

using testing::run_qlora;

// ---------------------------------------------------------------- CLI

TEST(PlanCli, ShippedConfigsPlan) {
  for (const char* cfg : {"configs/llama-3.2-1b-t4.yaml", "configs/llama-3.1-8b-t4.yaml", "configs/llama-3.1-8b-h100.yaml"}) {
    const auto r = run_qlora(std::string("plan --config ") + cfg);
    EXPECT_EQ(r.exit_code, 0) << cfg << "\n" << r.err;
    EXPECT_NE(r.out.find("effective batch"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("FITS"), std::string::npos) << r.out;
    if (std::string(cfg).find("8b") != std::string::npos) {  // train.recompute: auto, resolved for the config's GPU
      // t4: gate/up in some layers; h100: in all, and the last layers kept whole (its packed rows
      // take flash's variable-length kernel in bf16: no [B, 1, S, S] mask, k and v not repeated).
      EXPECT_NE(r.out.find(std::string(cfg).find("h100") != std::string::npos
                               ? "recompute   the last 16 of 32 layers kept whole (nothing recomputed), gate/up "
                                 "outputs kept in the 16 below them"
                               : "recompute   selective: gate/up outputs kept in "),
                std::string::npos)
          << r.out;
      EXPECT_NE(r.out.find("train.recompute: auto keeps the gate/up output in "), std::string::npos) << r.out;
    }
  }
}

TEST(PlanCli, JsonAndGpus) {
  const auto r = run_qlora("plan --config configs/llama-3.2-1b-t4.yaml --json --gpus 4 --gpu h100");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["effective_batch"]["formula"], "2 × 16 × 4 = 128");
  EXPECT_EQ(j["gpu"]["name"], "h100");
  EXPECT_TRUE(j["fits"].get<bool>());
  int64_t sum = 0;
  for (const auto& c : j["memory"]["components"]) sum += c["bytes"].get<int64_t>();
  EXPECT_NEAR(double(sum), double(j["memory"]["total_bytes"].get<int64_t>()), 16.0);  // per-component rounding
}

TEST(PlanCli, WorldSizeFromTheEnvironment) {
  ::setenv("WORLD_SIZE", "8", 1);
  auto r = run_qlora("plan --config configs/llama-3.2-1b-t4.yaml --json");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out)["effective_batch"]["world_size"], 8);
  ::setenv("WORLD_SIZE", "eight", 1);
  r = run_qlora("plan --config configs/llama-3.2-1b-t4.yaml");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("WORLD_SIZE"), std::string::npos) << r.err;
  ::unsetenv("WORLD_SIZE");
}

TEST(PlanCli, BadInputsExitTwoWithAMessage) {
  auto r = run_qlora("plan --config configs/llama-3.2-1b-t4.yaml --gpu h10");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("did you mean \"h100\""), std::string::npos) << r.err;
  r = run_qlora("plan --config configs/llama-3.2-1b-t4.yaml --set hardware.gpu=tesla");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("hardware.gpu"), std::string::npos) << r.err;
  r = run_qlora("plan");  // no model at all
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("model.preset"), std::string::npos) << r.err;
  r = run_qlora("plan --config configs/llama-3.2-1b-t4.yaml --gpus 0");
  EXPECT_EQ(r.exit_code, 2);
}

// `--gpu this` on whatever this machine is: with a GPU the plan is for it, without one the report
// says there is none; the report lists this machine either way.
TEST(PlanCli, GpuThisIsThisMachine) {
  kernels::DeviceInfo dev;
  char reason[256] = {0};
  const int n = kernels::query_devices(&dev, 1, reason, sizeof reason);
  auto r = run_qlora("plan --config configs/llama-3.2-1b-t4.yaml --gpu this");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  if (n == 0) {
    EXPECT_NE(r.out.find("this machine: no GPU"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("no fit verdict"), std::string::npos) << r.out;
  } else {
    EXPECT_NE(r.out.find(std::string("this machine: ") + dev.name), std::string::npos) << r.out;
  }
  r = run_qlora("plan --config configs/llama-3.2-1b-t4.yaml --gpu h100 --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  ASSERT_TRUE(j["this_machine"].is_string());
  EXPECT_EQ(j["this_machine"].get<std::string>().rfind("this machine: ", 0), 0u);
  EXPECT_GT(j["memory"]["allocated_bytes"].get<int64_t>(), 0);
  EXPECT_LT(j["memory"]["allocated_bytes"].get<int64_t>(), j["memory"]["total_bytes"].get<int64_t>());
  r = run_qlora("plan --help");
  EXPECT_NE(r.out.find("this machine: "), std::string::npos) << r.out;
}

TEST(PlanCli, NoGpuOnThisMachineIsSaid) {
  const auto r = run_qlora("plan --config configs/llama-3.2-1b-t4.yaml --gpu none");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("no fit verdict"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace qlora::plan
