// cli: the binary starts (also with no GPU), subcommands and exit codes.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "support/test_support.h"

namespace qlora {
namespace {

using testing::run_qlora;

TEST(Cli, VersionAndHelp) {
  auto r = run_qlora("--version");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.out.find("qlora "), std::string::npos) << r.out;
  r = run_qlora("--help");
  EXPECT_EQ(r.exit_code, 0);
  for (const char* cmd : {"plan", "config", "data", "env"})
    EXPECT_NE(r.out.find(cmd), std::string::npos) << "help does not list " << cmd << ":\n" << r.out;
}

TEST(Cli, NoOrUnknownSubcommandExitsTwo) {
  EXPECT_EQ(run_qlora("").exit_code, 2);
  EXPECT_EQ(run_qlora("frobnicate").exit_code, 2);
}

// The binary links LibTorch's CPU library, which loads libcudart even with no
// GPU: `env` must start and report the pinned LibTorch on any machine.
TEST(Cli, EnvStartsAndReportsLibTorch) {
  const auto r = run_qlora("env --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto info = nlohmann::json::parse(r.out);
  EXPECT_EQ(info["libtorch"].get<std::string>().rfind("2.11", 0), 0u) << r.out;
  EXPECT_GE(info["cpu_threads"].get<int>(), 1);
  if (info["gpus"].empty()) {
    EXPECT_FALSE(info["gpu_note"].get<std::string>().empty()) << r.out;
  }
}

}  // namespace
}  // namespace qlora
