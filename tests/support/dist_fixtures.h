// Data-parallel `qlora train` for tests: a config on the small model, ranks
// started as processes with the variables torchrun sets, and the comparison of
// a multi-process run with a single-process one (test_dist, test_cuda_dist).
#pragma once

#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <ATen/ATen.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "qlora/io/torch_io.h"
#include "support/test_support.h"
#include "support/train_fixtures.h"

namespace qlora::testing {

// fp32 sums of the same numbers in another order (rank 0's micro batches, then
// rank 1's, versus all in window order) differ by a few ulps; Adam's update
// direction m / sqrt(v) passes such differences on without growing them much
// over a handful of steps. 1e-6 is the bound.
constexpr double kDistLossTolerance = 1e-6;
constexpr double kDistAdapterTolerance = 1e-6;

// A TCP port nobody listens on right now.
inline int free_port() {
  const int s = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  getsockname(s, reinterpret_cast<sockaddr*>(&a), &len);
  const int port = ntohs(a.sin_port);
  close(s);
  return port;
}


// `extra` is appended to the YAML (e.g. "distributed:\n  backend: gloo\n").
inline std::string dist_config(const std::string& dir, const std::string& out, int64_t accumulation, int64_t max_steps,
                               const std::string& extra = "", double dropout = 0.0) {
  const std::string data = testing::small_completion_data(dir, 96);
  const std::string text = "model:\n  path: " + testing::small_model_dir() +
                           "\nlora:\n  r: 4\n  alpha: 8\n  dropout: " + std::to_string(dropout) +
                           "\n  target_modules: [q_proj, k_proj, v_proj, o_proj]\n"
                           "data:\n  path: " + data + "\n  max_seq_length: 64\n  eval_ratio: 0.125\n"
                           "train:\n  micro_batch_size: 2\n  gradient_accumulation_steps: " + std::to_string(accumulation) +
                           "\n  max_steps: " + std::to_string(max_steps) +
                           "\n  learning_rate: 0.002\n  precision: fp32\n  optimizer: adamw\n"
                           "  gradient_checkpointing: false\n"
                           "output:\n  dir: " + out + "\n  save_steps: 3\n  keep_last: 0\n  logging_steps: 1\n" + extra;
  // One file per output directory: several configs of one test live side by side.
  return testing::write_file(dir, "run-" + std::filesystem::path(out).filename().string() + ".yaml", text);
}

// Starts `qlora train` as `world` processes with the variables torchrun sets;
// returns every rank's exit code and keeps stderr in dir/rank<r>.txt.
// Every rank on GPU 0 when one_gpu (LOCAL_RANK 0: only Gloo allows that).
inline std::vector<int> launch_ranks(const std::string& dir, const std::string& config, int world,
                                     const std::string& extra = "", bool one_gpu = false) {
  const int port = free_port();
  std::vector<pid_t> pids;
  for (int r = 0; r < world; ++r) {
    const pid_t pid = fork();
    if (pid == 0) {
      const std::string err = dir + "/rank" + std::to_string(r) + ".txt";
      if (!freopen(err.c_str(), "w", stderr)) _exit(99);
      setenv("RANK", std::to_string(r).c_str(), 1);
      setenv("LOCAL_RANK", std::to_string(one_gpu ? 0 : r).c_str(), 1);
      setenv("WORLD_SIZE", std::to_string(world).c_str(), 1);
      setenv("LOCAL_WORLD_SIZE", std::to_string(world).c_str(), 1);
      setenv("MASTER_ADDR", "127.0.0.1", 1);
      setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      setenv("OMP_NUM_THREADS", "1", 1);
      const std::string cmd = std::string(QLORA_BIN) + " train --config " + config + " " + extra;
      execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
      _exit(98);
    }
    pids.push_back(pid);
  }
  std::vector<int> codes;
  for (pid_t pid : pids) {
    int status = 0;
    waitpid(pid, &status, 0);
    codes.push_back(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
  }
  return codes;
}

inline std::string read_text(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

inline std::vector<nlohmann::json> metrics_of(const std::string& out, const std::string& type) {
  std::vector<nlohmann::json> v;
  std::ifstream in(out + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line))
    if (nlohmann::json j = nlohmann::json::parse(line); j.value("type", "") == type) v.push_back(j);
  return v;
}

inline double max_adapter_difference(const std::string& a_dir, const std::string& b_dir) {
  const auto a = io::load_safetensors(a_dir + "/adapter_model.safetensors");
  const auto b = io::load_safetensors(b_dir + "/adapter_model.safetensors");
  EXPECT_EQ(a.size(), b.size());
  double worst = 0.0;
  for (const auto& [name, t] : a) {
    auto it = b.find(name);
    if (it == b.end()) {
      ADD_FAILURE() << name << " missing from " << b_dir;
      return INFINITY;
    }
    worst = std::max(worst, (t - it->second).abs().max().item<double>());
  }
  return worst;
}

inline void expect_same_run(const std::string& single_out, const std::string& dist_out) {
  const auto s = metrics_of(single_out, "train");
  const auto d = metrics_of(dist_out, "train");
  ASSERT_EQ(s.size(), d.size());
  ASSERT_FALSE(s.empty());
  for (size_t i = 0; i < s.size(); ++i) {
    EXPECT_NEAR(s[i]["loss"].get<double>(), d[i]["loss"].get<double>(), kDistLossTolerance) << "step " << i + 1;
    EXPECT_EQ(s[i]["target_tokens"], d[i]["target_tokens"]) << "step " << i + 1;
    EXPECT_EQ(s[i]["input_tokens"], d[i]["input_tokens"]) << "step " << i + 1;
  }
  const auto se = metrics_of(single_out, "eval");
  const auto de = metrics_of(dist_out, "eval");
  ASSERT_EQ(se.size(), de.size());
  for (size_t i = 0; i < se.size(); ++i) {
    EXPECT_NEAR(se[i]["loss"].get<double>(), de[i]["loss"].get<double>(), kDistLossTolerance);
    EXPECT_EQ(se[i]["tokens"], de[i]["tokens"]);
    EXPECT_EQ(se[i]["examples"], de[i]["examples"]);
    EXPECT_EQ(se[i]["exact_match"], de[i]["exact_match"]);
    EXPECT_EQ(se[i]["generated"], de[i]["generated"]);
  }
  EXPECT_LE(max_adapter_difference(single_out + "/adapter", dist_out + "/adapter"), kDistAdapterTolerance);
}

}  // namespace qlora::testing
