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
#include "support/train_fixtures.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// fp32 sums of the same numbers in another order (rank 0's micro batches, then
// rank 1's, versus all in window order) differ by a few ulps; Adam's update
// direction m / sqrt(v) passes such differences on without growing them much
// over a handful of steps. 1e-6 is the bound.
constexpr double kLossTolerance = 1e-6;
constexpr double kAdapterTolerance = 1e-6;

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

// A TCP port nobody listens on right now.
int free_port() {
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
  const int port = free_port();
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

// ---------------------------------------------------------------- `qlora train`, two processes

std::string write_config(const std::string& dir, const std::string& out, int64_t accumulation, int64_t max_steps) {
  const std::string data = testing::small_completion_data(dir, 96);
  const std::string text = "model:\n  path: " + testing::small_model_dir() +
                           "\nlora:\n  r: 4\n  alpha: 8\n  dropout: 0.0\n  target_modules: [q_proj, k_proj, v_proj, o_proj]\n"
                           "data:\n  path: " + data + "\n  max_seq_length: 64\n  eval_ratio: 0.125\n"
                           "train:\n  micro_batch_size: 2\n  gradient_accumulation_steps: " + std::to_string(accumulation) +
                           "\n  max_steps: " + std::to_string(max_steps) +
                           "\n  learning_rate: 0.002\n  precision: fp32\n  optimizer: adamw\n"
                           "  gradient_checkpointing: false\n"
                           "output:\n  dir: " + out + "\n  save_steps: 3\n  keep_last: 0\n  logging_steps: 1\n";
  return testing::write_file(dir, "run-acc" + std::to_string(accumulation) + ".yaml", text);
}

// Starts `qlora train` as `world` processes with the variables torchrun sets;
// returns every rank's exit code and keeps stderr in dir/rank<r>.txt.
std::vector<int> launch_ranks(const std::string& dir, const std::string& config, int world, const std::string& extra = "") {
  const int port = free_port();
  std::vector<pid_t> pids;
  for (int r = 0; r < world; ++r) {
    const pid_t pid = fork();
    if (pid == 0) {
      const std::string err = dir + "/rank" + std::to_string(r) + ".txt";
      if (!freopen(err.c_str(), "w", stderr)) _exit(99);
      setenv("RANK", std::to_string(r).c_str(), 1);
      setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
      setenv("WORLD_SIZE", std::to_string(world).c_str(), 1);
      setenv("LOCAL_WORLD_SIZE", std::to_string(world).c_str(), 1);
      setenv("MASTER_ADDR", "127.0.0.1", 1);
      setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      setenv("OMP_NUM_THREADS", "1", 1);
      const std::string cmd = std::string(QLORA_BIN) + " train --config " + config + " --device cpu " + extra;
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

std::string read(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::vector<json> metrics_of(const std::string& out, const std::string& type) {
  std::vector<json> v;
  std::ifstream in(out + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line))
    if (json j = json::parse(line); j.value("type", "") == type) v.push_back(j);
  return v;
}

double max_adapter_difference(const std::string& a_dir, const std::string& b_dir) {
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

void expect_same_run(const std::string& single_out, const std::string& dist_out) {
  const auto s = metrics_of(single_out, "train");
  const auto d = metrics_of(dist_out, "train");
  ASSERT_EQ(s.size(), d.size());
  ASSERT_FALSE(s.empty());
  for (size_t i = 0; i < s.size(); ++i) {
    EXPECT_NEAR(s[i]["loss"].get<double>(), d[i]["loss"].get<double>(), kLossTolerance) << "step " << i + 1;
    EXPECT_EQ(s[i]["target_tokens"], d[i]["target_tokens"]) << "step " << i + 1;
    EXPECT_EQ(s[i]["input_tokens"], d[i]["input_tokens"]) << "step " << i + 1;
  }
  const auto se = metrics_of(single_out, "eval");
  const auto de = metrics_of(dist_out, "eval");
  ASSERT_EQ(se.size(), de.size());
  for (size_t i = 0; i < se.size(); ++i) {
    EXPECT_NEAR(se[i]["loss"].get<double>(), de[i]["loss"].get<double>(), kLossTolerance);
    EXPECT_EQ(se[i]["tokens"], de[i]["tokens"]);
    EXPECT_EQ(se[i]["examples"], de[i]["examples"]);
    EXPECT_EQ(se[i]["exact_match"], de[i]["exact_match"]);
    EXPECT_EQ(se[i]["generated"], de[i]["generated"]);
  }
  EXPECT_LE(max_adapter_difference(single_out + "/adapter", dist_out + "/adapter"), kAdapterTolerance);
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
  const auto one = testing::run_qlora("train --config " + write_config(dir, dir + "/one", 4, kSteps) + " --device cpu");
  ASSERT_EQ(one.exit_code, 0) << one.err;

  const std::vector<int> codes = launch_ranks(dir, write_config(dir, dir + "/two", 2, kSteps), 2);
  ASSERT_EQ(codes, (std::vector<int>{0, 0})) << read(dir + "/rank0.txt") << read(dir + "/rank1.txt");
  const std::string rank0 = read(dir + "/rank0.txt");
  EXPECT_NE(rank0.find("effective batch = micro 2 × accumulation 2 × GPUs 2 = 8"), std::string::npos) << rank0;
  EXPECT_NE(rank0.find("data parallel: rank 0 of 2"), std::string::npos) << rank0;
  // Rank 1 said nothing (no failure to report); rank 0 alone logged.
  EXPECT_EQ(read(dir + "/rank1.txt"), "");
  expect_same_run(dir + "/one", dir + "/two");

  // Rank 0 wrote the checkpoints, with both ranks' generators.
  const auto rng = io::load_safetensors(dir + "/two/checkpoint-3/rng.safetensors");
  EXPECT_EQ(rng.count("cpu"), 1u);
  EXPECT_EQ(rng.count("rank1.cpu"), 1u);

  // The 2-process checkpoint resumes in one process at the same effective batch
  // (micro 2 × accumulation 4 × 1) and ends where both runs ended.
  fs::create_directories(dir + "/resumed");
  fs::copy(dir + "/two/checkpoint-3", dir + "/resumed/checkpoint-3", fs::copy_options::recursive);
  std::string cfg = read(write_config(dir, dir + "/resumed", 4, kSteps));
  const auto resumed =
      testing::run_qlora("train --config " + testing::write_file(dir, "resume.yaml", cfg) + " --device cpu --resume auto");
  ASSERT_EQ(resumed.exit_code, 0) << resumed.err;
  EXPECT_NE(resumed.err.find("world_size: checkpoint 2, now 1"), std::string::npos) << resumed.err;
  EXPECT_LE(max_adapter_difference(dir + "/one/adapter", dir + "/resumed/adapter"), kAdapterTolerance);
}

TEST_F(DistTrain, TorchrunLaunchesTheBinary) {
  std::string why;
  const std::string python = testing::python_with("torch", &why);
  if (python.empty()) GTEST_SKIP() << "torchrun needs an importable torch: " << why;
  const std::string torchrun = (fs::path(python).parent_path() / "torchrun").string();
  if (!fs::exists(torchrun)) GTEST_SKIP() << "no torchrun beside " << python;
  const std::string dir = testing::make_temp_dir("dist_torchrun");
  constexpr int64_t kSteps = 3;
  const auto one = testing::run_qlora("train --config " + write_config(dir, dir + "/one", 4, kSteps) + " --device cpu");
  ASSERT_EQ(one.exit_code, 0) << one.err;
  int code = -1;
  const std::string log = testing::run_capture(
      "OMP_NUM_THREADS=1 " + torchrun + " --standalone --nproc-per-node 2 --no-python " + QLORA_BIN +
          " train --config " + write_config(dir, dir + "/two", 2, kSteps) + " --device cpu 2>&1",
      &code);
  ASSERT_EQ(code, 0) << log;
  EXPECT_NE(log.find("rank 0 of 2"), std::string::npos) << log;
  expect_same_run(dir + "/one", dir + "/two");
}

}  // namespace
}  // namespace qlora
