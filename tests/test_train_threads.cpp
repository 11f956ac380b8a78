// The CPU thread count as the one threading input of a run's arithmetic
// (Note [fixed CPU threads], train/threads.h). OpenMP's dynamic adjustment is
// switched on first, as OMP_DYNAMIC=true does, and the machine is kept busy;
// pin_cpu_threads (and run_training, which calls it) must still give every
// parallel region the pinned count, so a sum and two training steps come out
// bit for bit as they do with that count on a quiet machine.
//
// GNU OpenMP's dynamic adjustment gives a region at most (online CPUs - the
// 15-minute load average) threads. A test cannot raise a 15-minute average, so
// it asks for one thread more than the machine has CPUs: a count that dynamic
// adjustment always cuts, busy machine or not.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <ios>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "qlora/ckpt/sha256.h"
#include "qlora/train/run.h"
#include "qlora/train/threads.h"
#include "support/train_fixtures.h"

namespace qlora {
namespace {

// One thread more than the machine has: dynamic adjustment must shrink it.
int over_count() { return static_cast<int>(std::max(1u, std::thread::hardware_concurrency())) + 1; }

// Spinning threads, one per CPU, for as long as the object lives.
class CompetingLoad {
 public:
  CompetingLoad() {
    for (unsigned i = 0; i < std::max(1u, std::thread::hardware_concurrency()); ++i)
      threads_.emplace_back([this] {
        volatile uint64_t x = 0;
        while (!stop_.load(std::memory_order_relaxed)) x = x + 1;
      });
  }
  ~CompetingLoad() {
    stop_ = true;
    for (auto& t : threads_) t.join();
  }

 private:
  std::atomic<bool> stop_{false};
  std::vector<std::thread> threads_;
};

// Leaves the process as the test binary has it: one thread, no dynamic adjustment.
struct RestoreThreads {
  ~RestoreThreads() { train::pin_cpu_threads(1); }
};

// The bits of a sum ATen splits across the team: 2^20 terms (32 grains), each
// exact whatever the split ((i mod 977) / 1024), their sum rounded as it goes.
uint32_t split_sum_bits() {
  const at::Tensor x = at::arange(1 << 20, at::kFloat).remainder_(977.0).mul_(1.0 / 1024);
  const float s = x.sum().item<float>();
  uint32_t bits = 0;
  std::memcpy(&bits, &s, sizeof bits);
  return bits;
}

TEST(TrainThreads, PinnedCountHoldsWhenOpenMpMayShrinkIt) {
  RestoreThreads restore;
  train::set_openmp_dynamic_threads(true);
  if (!train::openmp_dynamic_threads()) GTEST_SKIP() << "this LibTorch has no OpenMP runtime: no dynamic adjustment";
  const int n = over_count();

  train::set_openmp_dynamic_threads(false);
  at::set_num_threads(1);
  const uint32_t one = split_sum_bits();
  at::set_num_threads(n);
  const uint32_t want = split_sum_bits();
  ASSERT_NE(one, want) << "the probe sum gives the same bits with 1 and " << n
                       << " threads: it cannot see a team shrink";

  // What OMP_DYNAMIC=true does: the same count asked for, a smaller team given. libgomp sizes
  // the team from the machine's 1-minute load average, so on a machine that has been idle it may
  // give a team whose sum has the same bits; then the check below could not fail, and the test
  // says so by skipping (it ran, and passed, where the load had shrunk the team).
  train::set_openmp_dynamic_threads(true);
  at::set_num_threads(n);
  if (split_sum_bits() == want)
    GTEST_SKIP() << "dynamic adjustment did not shrink a team of " << n
                 << " on this machine now (libgomp reads the load average): the pinned check would prove nothing";

  const CompetingLoad load;
  EXPECT_EQ(train::pin_cpu_threads(n), n);
  EXPECT_FALSE(train::openmp_dynamic_threads());
  for (int i = 0; i < 20; ++i)
    ASSERT_EQ(split_sum_bits(), want) << "repeat " << i << " with " << n << " threads pinned";
}

// A 1-layer Llama whose MLP is wide enough for the team size to show in the
// bits of its steps: the double quantization's offset of a 512 x 4160
// projection averages 33280 absmax values (two grains), and SiLU over
// [tokens, 4160] computes each thread's last partial vector with the scalar
// formula.
const std::string& wide_model_dir() {
  static const std::string dir = [] {
    const std::string d = testing::make_temp_dir("threads_model");
    train::write_demo_tokenizer(d);
    DecoderConfig c = testing::small_llama_shape();
    c.hidden_size = 512;
    c.intermediate_size = 4160;
    c.num_hidden_layers = 1;
    train::write_random_llama(d, c, 7);
    return d;
  }();
  return dir;
}

struct Bits {
  std::vector<double> losses;
  std::vector<double> grad_norms;
  std::string adapter_sha;
  bool operator==(const Bits& o) const {
    return losses == o.losses && grad_norms == o.grad_norms && adapter_sha == o.adapter_sha;
  }
};

// Two optimizer steps of `qlora train`'s recipe on the CPU, fp32.
Bits two_steps() {
  static const std::string data_dir = testing::make_temp_dir("threads_data");
  static const std::string data = testing::small_completion_data(data_dir, 4);
  Config cfg = default_config();
  cfg.model.path = wide_model_dir();
  cfg.data.path = data;
  cfg.data.max_seq_length = 32;
  cfg.lora.r = 4;
  cfg.lora.alpha = 8;
  cfg.lora.target_modules = {"q_proj", "down_proj"};
  cfg.train.micro_batch_size = 2;
  cfg.train.gradient_accumulation_steps = 1;
  cfg.train.max_steps = 2;
  cfg.train.precision = Precision::kFp32;
  cfg.output.dir = testing::make_temp_dir("threads_run");
  cfg.output.save_steps = 0;
  cfg.output.logging_steps = 0;
  train::RunOptions o;
  o.device = "cpu";
  o.evaluate_at_start = false;
  o.handle_signals = false;
  const train::RunResult r = train::run_training(cfg, o);
  Bits b;
  b.losses = r.losses;
  std::ifstream in(r.metrics_path);
  std::string line;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line);
    if (j["type"] == "train") b.grad_norms.push_back(j["grad_norm"].get<double>());
  }
  b.adapter_sha = ckpt::sha256_file(r.adapter_dir + "/adapter_model.safetensors");
  return b;
}

void expect_same_bits(const Bits& got, const Bits& want, int threads) {
  ASSERT_EQ(got.losses.size(), want.losses.size());
  ASSERT_EQ(got.grad_norms.size(), want.grad_norms.size());
  for (size_t i = 0; i < want.losses.size(); ++i) {
    EXPECT_EQ(got.losses[i], want.losses[i]) << threads << " threads: nondeterminism at step " << i + 1
                                             << " (loss " << std::hexfloat << got.losses[i] << " vs "
                                             << want.losses[i] << ")";
    EXPECT_EQ(got.grad_norms[i], want.grad_norms[i])
        << threads << " threads: nondeterminism at step " << i + 1 << " (gradient norm " << std::hexfloat
        << got.grad_norms[i] << " vs " << want.grad_norms[i] << ")";
  }
  EXPECT_EQ(got.adapter_sha, want.adapter_sha) << threads << " threads: the adapters differ";
}

TEST(TrainThreads, SameCountSameStepsUnderLoad) {
  RestoreThreads restore;
  train::set_openmp_dynamic_threads(true);
  if (!train::openmp_dynamic_threads()) GTEST_SKIP() << "this LibTorch has no OpenMP runtime: no dynamic adjustment";
  const std::vector<int> counts = {1, over_count()};

  std::map<int, Bits> quiet;  // the count's own bits: no adjustment, no load
  for (const int n : counts) {
    train::set_openmp_dynamic_threads(false);
    at::set_num_threads(n);
    quiet[n] = two_steps();
  }
  ASSERT_FALSE(quiet[counts[0]] == quiet[counts[1]])
      << "the steps give the same bits with " << counts[0] << " and " << counts[1]
      << " threads: widen the model, or this test cannot see a team shrink";

  const CompetingLoad load;
  for (const int n : counts) {
    // As a process started with OMP_DYNAMIC=true: run_training must pin it.
    train::set_openmp_dynamic_threads(true);
    at::set_num_threads(n);
    expect_same_bits(two_steps(), quiet[n], n);
    EXPECT_FALSE(train::openmp_dynamic_threads());
  }
}

// The checkpoint records the count; a resume with another one goes on, saying
// how to resume exactly.
TEST(TrainThreads, ResumeWithAnotherCountWarns) {
  RestoreThreads restore;
  static const std::string data_dir = testing::make_temp_dir("threads_resume_data");
  Config cfg = default_config();
  cfg.model.path = testing::small_model_dir();
  cfg.data.path = testing::small_completion_data(data_dir, 8);
  cfg.data.max_seq_length = 32;
  cfg.lora.r = 4;
  cfg.train.micro_batch_size = 2;
  cfg.train.gradient_accumulation_steps = 1;
  cfg.train.max_steps = 3;
  cfg.train.precision = Precision::kFp32;
  cfg.output.dir = testing::make_temp_dir("threads_resume");
  cfg.output.save_steps = 0;
  train::RunOptions o;
  o.device = "cpu";
  o.evaluate_at_start = false;
  o.handle_signals = false;
  o.stop_when = [](int64_t step, int64_t micro) { return step == 2 && micro == 0; };
  train::pin_cpu_threads(1);
  const train::RunResult first = train::run_training(cfg, o);
  ASSERT_TRUE(first.interrupted);
  std::ifstream in(first.last_checkpoint + "/run.json");
  EXPECT_EQ(nlohmann::json::parse(in)["fingerprint"]["cpu_threads"], 1);

  train::pin_cpu_threads(2);
  o.stop_when = nullptr;
  o.resume = "auto";
  ::testing::internal::CaptureStderr();
  const train::RunResult second = train::run_training(cfg, o);
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_FALSE(second.interrupted);
  EXPECT_NE(err.find("CPU threads: the checkpoint's run had 1, this one has 2"), std::string::npos) << err;
  EXPECT_NE(err.find("OMP_NUM_THREADS=1 resumes it exactly"), std::string::npos) << err;
}

}  // namespace
}  // namespace qlora
