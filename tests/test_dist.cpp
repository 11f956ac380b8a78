// Data parallelism (dist module) on CPU, through LibTorch's Gloo backend:
//   - who a process is, from torchrun's and SLURM's environment variables;
//   - the collectives, two ranks as two threads of this process;
//   - the equivalence that makes data parallelism correct: `qlora train` as two
//     processes (the environment torchrun sets, Gloo) gives the same losses,
//     held-out numbers and adapter as one process with twice the accumulation;
//   - a resume on another world size at the same effective batch;
//   - the same through the real torchrun, where the venv's torch imports.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <ATen/ATen.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "qlora/common/errors.h"
#include "qlora/dist/group.h"
#include "qlora/dist/launch.h"
#include "qlora/io/torch_io.h"
#include "support/test_support.h"
#include "support/dist_fixtures.h"
#include "support/train_fixtures.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// Tolerances: support/dist_fixtures.h (kDistLossTolerance, kDistAdapterTolerance).

dist::EnvLookup env_of(std::map<std::string, std::string> vars) {
  return [vars](const std::string& name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

std::string error_of(const std::map<std::string, std::string>& vars) {
  try {
    dist::launch_from_env(env_of(vars));
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

TEST(DistLaunch, SingleProcessWithoutLauncherVariables) {
  const dist::Launch l = dist::launch_from_env(env_of({{"HOME", "/root"}}));
  EXPECT_EQ(l.world_size, 1);
  EXPECT_EQ(l.rank, 0);
  EXPECT_FALSE(l.distributed());
  // srun with one task is one process too.
  EXPECT_FALSE(dist::launch_from_env(env_of({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "1"}})).distributed());
}

TEST(DistLaunch, TorchrunVariables) {
  const dist::Launch l = dist::launch_from_env(env_of({{"RANK", "5"},
                                                       {"LOCAL_RANK", "1"},
                                                       {"WORLD_SIZE", "8"},
                                                       {"LOCAL_WORLD_SIZE", "4"},
                                                       {"MASTER_ADDR", "node07"},
                                                       {"MASTER_PORT", "29611"},
                                                       {"TORCHELASTIC_USE_AGENT_STORE", "True"},
                                                       {"TORCHELASTIC_RESTART_COUNT", "2"},
                                                       {"SLURM_PROCID", "0"},  // torchrun inside sbatch wins
                                                       {"SLURM_NTASKS", "2"}}));
  EXPECT_EQ(l.source, "torchrun");
  EXPECT_EQ(l.rank, 5);
  EXPECT_EQ(l.local_rank, 1);
  EXPECT_EQ(l.world_size, 8);
  EXPECT_EQ(l.local_world_size, 4);
  EXPECT_EQ(l.master_addr, "node07");
  EXPECT_EQ(l.master_port, 29611);
  EXPECT_TRUE(l.agent_store);
  EXPECT_EQ(l.restart, "2");
  EXPECT_EQ(l.describe(), "rank 5 of 8 (local rank 1 of 4 on this host), rendezvous at node07:29611, from torchrun");
}

TEST(DistLaunch, SlurmVariablesAndTheFirstHostOfTheNodeList) {
  const dist::Launch l = dist::launch_from_env(env_of({{"SLURM_PROCID", "3"},
                                                       {"SLURM_LOCALID", "1"},
                                                       {"SLURM_NTASKS", "4"},
                                                       {"SLURM_TASKS_PER_NODE", "2(x2)"},
                                                       {"SLURM_STEP_NODELIST", "gpu[07-08]"}}));
  EXPECT_EQ(l.source, "SLURM");
  EXPECT_EQ(l.rank, 3);
  EXPECT_EQ(l.local_rank, 1);
  EXPECT_EQ(l.world_size, 4);
  EXPECT_EQ(l.local_world_size, 2);
  EXPECT_EQ(l.master_addr, "gpu07");
  EXPECT_EQ(l.master_port, dist::kDefaultMasterPort);
  EXPECT_EQ(dist::first_slurm_host("node[03-05,07],gpu1"), "node03");
  EXPECT_EQ(dist::first_slurm_host("a,b"), "a");
  EXPECT_EQ(dist::first_slurm_host("host"), "host");
  EXPECT_EQ(dist::first_slurm_host("rack[2,4]-n1"), "rack2-n1");
}

TEST(DistLaunch, InconsistentVariablesNameTheVariable) {
  EXPECT_NE(error_of({{"RANK", "2"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}}).find("RANK=2 is outside the world of 2"),
            std::string::npos);
  EXPECT_NE(error_of({{"RANK", "x"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}}).find("RANK=\"x\""), std::string::npos);
  EXPECT_NE(error_of({{"RANK", "0"}, {"WORLD_SIZE", "2"}}).find("MASTER_ADDR is not set"), std::string::npos);
  EXPECT_NE(error_of({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "70000"}})
                .find("MASTER_PORT=70000"),
            std::string::npos);
  EXPECT_NE(error_of({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}}).find("MASTER_ADDR"), std::string::npos);
}

bool have_gloo(std::string* why) {
  *why = dist::unavailable_reason(c10::Device(c10::kCPU));
  return why->empty();
}

TEST(DistGroup, OneProcessIsANoOp) {
  const dist::Group g;
  EXPECT_FALSE(g.distributed());
  EXPECT_EQ(g.sum(int64_t{7}), 7);
  at::Tensor t = at::arange(4, at::kFloat);
  g.all_reduce_sum({t});
  EXPECT_TRUE(at::equal(t, at::arange(4, at::kFloat)));
}

TEST(DistGroup, GlooCollectivesAcrossTwoRanks) {
  std::string why;
  if (!have_gloo(&why)) GTEST_SKIP() << why;
  const int port = testing::free_port();
  std::vector<std::string> failures(2);
  std::vector<std::thread> ranks;
  for (int r = 0; r < 2; ++r) {
    ranks.emplace_back([&, r] {
      try {
        dist::Launch l;
        l.rank = r;
        l.local_rank = r;
        l.world_size = 2;
        l.local_world_size = 2;
        l.master_port = port;
        const dist::Group g = dist::Group::connect(l, c10::Device(c10::kCPU), DistBackend::kAuto, std::chrono::seconds(60));
        if (g.backend() != "gloo") failures[r] = "backend " + g.backend();
        if (g.sum(int64_t{10 + r}) != 21) failures[r] += " int sum";
        if (g.sum(0.25 * (r + 1)) != 0.75) failures[r] += " double sum";
        // Two dtypes, three tensors, ragged shapes: two buckets.
        at::Tensor a = at::full({2, 3}, float(r + 1));
        at::Tensor b = at::full({5}, double(10 * (r + 1)), at::kDouble);
        at::Tensor c = at::arange(7, at::kFloat) * float(r + 1);
        g.all_reduce_sum({a, b, c});
        if (!at::equal(a, at::full({2, 3}, 3.0f)) || !at::equal(b, at::full({5}, 30.0, at::kDouble)) ||
            !at::equal(c, at::arange(7, at::kFloat) * 3.0f))
          failures[r] += " all_reduce_sum";
        const auto all = g.all_gather(at::full({3}, int64_t(r), at::kLong).to(at::kByte));
        if (all.size() != 2 || all[0].sum().item<int64_t>() != 0 || all[1].sum().item<int64_t>() != 3)
          failures[r] += " all_gather";
        g.barrier();
      } catch (const std::exception& e) {
        failures[r] += std::string(" threw: ") + e.what();
      }
    });
  }
  for (auto& t : ranks) t.join();
  EXPECT_EQ(failures[0], "");
  EXPECT_EQ(failures[1], "");
}

class DistTrain : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!have_gloo(&why)) GTEST_SKIP() << why;
  }
};

TEST_F(DistTrain, TwoGlooProcessesEqualOneWithTwiceTheAccumulation) {
  const std::string dir = testing::make_temp_dir("dist_train");
  constexpr int64_t kSteps = 6;
  const auto one = testing::run_qlora("train --config " + testing::dist_config(dir, dir + "/one", 4, kSteps) + " --device cpu");
  ASSERT_EQ(one.exit_code, 0) << one.err;

  const std::vector<int> codes = testing::launch_ranks(dir, testing::dist_config(dir, dir + "/two", 2, kSteps), 2, "--device cpu");
  ASSERT_EQ(codes, (std::vector<int>{0, 0})) << testing::read_text(dir + "/rank0.txt") << testing::read_text(dir + "/rank1.txt");
  const std::string rank0 = testing::read_text(dir + "/rank0.txt");
  EXPECT_NE(rank0.find("effective batch = micro 2 × accumulation 2 × GPUs 2 = 8"), std::string::npos) << rank0;
  EXPECT_NE(rank0.find("data parallel: rank 0 of 2"), std::string::npos) << rank0;
  // Rank 1 said nothing (no failure to report); rank 0 alone logged.
  EXPECT_EQ(testing::read_text(dir + "/rank1.txt"), "");
  testing::expect_same_run(dir + "/one", dir + "/two");

  // Rank 0 wrote the checkpoints, with both ranks' generators.
  const auto rng = io::load_safetensors(dir + "/two/checkpoint-3/rng.safetensors");
  EXPECT_EQ(rng.count("cpu"), 1u);
  EXPECT_EQ(rng.count("rank1.cpu"), 1u);

  // The 2-process checkpoint resumes in one process at the same effective batch
  // (micro 2 × accumulation 4 × 1) and ends where both runs ended.
  fs::create_directories(dir + "/resumed");
  fs::copy(dir + "/two/checkpoint-3", dir + "/resumed/checkpoint-3", fs::copy_options::recursive);
  std::string cfg = testing::read_text(testing::dist_config(dir, dir + "/resumed", 4, kSteps));
  const auto resumed =
      testing::run_qlora("train --config " + testing::write_file(dir, "resume.yaml", cfg) + " --device cpu --resume auto");
  ASSERT_EQ(resumed.exit_code, 0) << resumed.err;
  EXPECT_NE(resumed.err.find("world_size: checkpoint 2, now 1"), std::string::npos) << resumed.err;
  EXPECT_LE(testing::max_adapter_difference(dir + "/one/adapter", dir + "/resumed/adapter"), testing::kDistAdapterTolerance);
}

// Two processes stopped at a checkpoint and resumed as two processes continue
// exactly: LoRA dropout on, so each rank's generator must come back as its
// own (rng.safetensors "cpu" / "rank1.cpu"), and the loader's cursor too.
TEST_F(DistTrain, TwoProcessResumeIsExactWithDropout) {
  const std::string dir = testing::make_temp_dir("dist_resume");
  constexpr int64_t kSteps = 6;
  constexpr double kDropout = 0.1;
  const std::string whole = testing::dist_config(dir, dir + "/whole", 2, kSteps, "", kDropout);
  ASSERT_EQ(testing::launch_ranks(dir, whole, 2, "--device cpu"), (std::vector<int>{0, 0}))
      << testing::read_text(dir + "/rank0.txt") << testing::read_text(dir + "/rank1.txt");
  fs::create_directories(dir + "/resumed");
  fs::copy(dir + "/whole/checkpoint-3", dir + "/resumed/checkpoint-3", fs::copy_options::recursive);
  const std::string resumed = testing::dist_config(dir, dir + "/resumed", 2, kSteps, "", kDropout);
  ASSERT_EQ(testing::launch_ranks(dir, resumed, 2, "--device cpu --resume auto"), (std::vector<int>{0, 0}))
      << testing::read_text(dir + "/rank0.txt") << testing::read_text(dir + "/rank1.txt");
  EXPECT_NE(testing::read_text(dir + "/rank0.txt").find("resumed from " + dir + "/resumed/checkpoint-3"),
            std::string::npos);
  const auto a = testing::metrics_of(dir + "/whole", "train");
  const auto b = testing::metrics_of(dir + "/resumed", "train");
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i]["loss"], b[i]["loss"]) << "step " << i + 1;
  EXPECT_EQ(testing::max_adapter_difference(dir + "/whole/adapter", dir + "/resumed/adapter"), 0.0);
}

TEST_F(DistTrain, TorchrunLaunchesTheBinary) {
  std::string why;
  const std::string python = testing::python_with("torch", &why);
  if (python.empty()) GTEST_SKIP() << "torchrun needs an importable torch: " << why;
  const std::string torchrun = (fs::path(python).parent_path() / "torchrun").string();
  if (!fs::exists(torchrun)) GTEST_SKIP() << "no torchrun beside " << python;
  const std::string dir = testing::make_temp_dir("dist_torchrun");
  constexpr int64_t kSteps = 3;
  const auto one = testing::run_qlora("train --config " + testing::dist_config(dir, dir + "/one", 4, kSteps) + " --device cpu");
  ASSERT_EQ(one.exit_code, 0) << one.err;
  int code = -1;
  const std::string log = testing::run_capture(
      "OMP_NUM_THREADS=1 " + torchrun + " --standalone --nproc-per-node 2 --no-python " + QLORA_BIN +
          " train --config " + testing::dist_config(dir, dir + "/two", 2, kSteps) + " --device cpu 2>&1",
      &code);
  ASSERT_EQ(code, 0) << log;
  EXPECT_NE(log.find("rank 0 of 2"), std::string::npos) << log;
  testing::expect_same_run(dir + "/one", dir + "/two");
}

}  // namespace
}  // namespace qlora
