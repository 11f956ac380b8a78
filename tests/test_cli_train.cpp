// `qlora train` as a user runs it: the real binary, a config file, Ctrl-C.
// SIGINT (and SIGTERM) must save a checkpoint and exit 130 with the command
// that continues the run; `--resume auto` then finishes it.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <functional>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include "qlora/ckpt/sha256.h"
#include "qlora/ckpt/store.h"
#include "support/test_support.h"
#include "support/train_fixtures.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;

std::string write_config(const std::string& dir, int64_t max_steps) {
  const std::string data = testing::small_completion_data(dir, 64);
  const std::string text = "model:\n  path: " + testing::small_model_dir() +
                           "\nlora:\n  r: 4\n  alpha: 8\n  target_modules: [q_proj, v_proj]\n"
                           "data:\n  path: " + data + "\n  max_seq_length: 64\n"
                           "train:\n  micro_batch_size: 2\n  gradient_accumulation_steps: 2\n  max_steps: " +
                           std::to_string(max_steps) +
                           "\n  precision: fp32\n  optimizer: adamw\n  gradient_checkpointing: false\n"
                           "output:\n  dir: " + dir + "/out\n  save_steps: 1000\n  logging_steps: 1\n";
  return testing::write_file(dir, "run.yaml", text);
}

int64_t lines_in(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  int64_t n = 0;
  while (std::getline(in, line)) ++n;
  return n;
}

// Starts `qlora train`, waits for a few steps in metrics.jsonl, sends `sig`,
// and returns the exit status; stderr goes to dir/stderr.txt.
int interrupt_after_steps(const std::string& dir, const std::string& config, int sig) {
  const std::string err = dir + "/stderr.txt";
  const pid_t pid = fork();
  if (pid == 0) {
    if (!freopen(err.c_str(), "w", stderr)) _exit(99);
    execl(QLORA_BIN, QLORA_BIN, "train", "--config", config.c_str(), "--device", "cpu", "--no-start-eval", "--set",
          "train.learning_rate=2e-4", "--set", "output.logging_steps=1", static_cast<char*>(nullptr));
    _exit(98);
  }
  const std::string metrics = dir + "/out/metrics.jsonl";
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (lines_in(metrics) < 3 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  kill(pid, sig);
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::string read(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST(CliTrain, SigintSavesACheckpointAndResumeAutoFinishes) {
  const std::string dir = testing::make_temp_dir("cli_sigint");
  const std::string config = write_config(dir, 2000);
  EXPECT_EQ(interrupt_after_steps(dir, config, SIGINT), 130) << read(dir + "/stderr.txt");
  const std::string err = read(dir + "/stderr.txt");
  EXPECT_NE(err.find("Ctrl-C: stopping at the end of this micro batch, then saving a checkpoint (Ctrl-C again to "
                     "quit now without saving)"),
            std::string::npos)
      << err;
  // The command that continues the run repeats the overrides it was started with.
  EXPECT_NE(err.find("Continue with: qlora train --config " + config +
                     " --set train.learning_rate=2e-4 --set output.logging_steps=1 --device cpu --resume auto"),
            std::string::npos)
      << err;
  const ckpt::Found found = ckpt::find_latest_valid(dir + "/out");
  ASSERT_TRUE(found) << err;
  EXPECT_GE(found.step, 3);
  EXPECT_LT(found.step, 2000);

  // Finish it (fewer steps so the test stays short; max_steps is not the math).
  const auto r = testing::run_qlora("train --config " + config + " --device cpu --resume auto --set train.max_steps=" +
                                    std::to_string(found.step + 3));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("resumed from " + found.path), std::string::npos) << r.err;
  EXPECT_TRUE(fs::exists(dir + "/out/adapter/adapter_model.safetensors"));
}

TEST(CliTrain, SigtermSavesToo) {
  const std::string dir = testing::make_temp_dir("cli_sigterm");
  EXPECT_EQ(interrupt_after_steps(dir, write_config(dir, 2000), SIGTERM), 130) << read(dir + "/stderr.txt");
  EXPECT_TRUE(ckpt::find_latest_valid(dir + "/out"));
}

TEST(CliTrain, BadResumePathAndStaleOutputDirAreClearErrors) {
  const std::string dir = testing::make_temp_dir("cli_badresume");
  const std::string config = write_config(dir, 4);
  auto r = testing::run_qlora("train --config " + config + " --device cpu --resume " + dir + "/nope");
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("no such checkpoint directory"), std::string::npos) << r.err;

  r = testing::run_qlora("train --config " + config + " --device cpu --no-start-eval");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // Starting over in a directory that holds a run's checkpoints is refused.
  r = testing::run_qlora("train --config " + config + " --device cpu");
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("already holds checkpoints"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("--resume auto"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("--resume none"), std::string::npos) << r.err;
  // The run is finished: resuming it says so and does nothing.
  r = testing::run_qlora("train --config " + config + " --device cpu --resume auto");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("is finished: " + dir + "/out/checkpoint-4 holds step 4 of 4"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("done:"), std::string::npos) << r.err;

  r = testing::run_qlora("train --config " + dir + "/missing.yaml");
  EXPECT_EQ(r.exit_code, 2) << r.err;
}

TEST(CliTrain, UnknownCommandNamesTheCommands) {
  auto r = testing::run_qlora("trian --config x.yaml");
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("unknown command 'trian' (did you mean 'train'?)"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("demo train plan config data merge generate chat plot export env"), std::string::npos) << r.err;
  r = testing::run_qlora("foo");
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("unknown command 'foo'; the commands are"), std::string::npos) << r.err;
}

// ---------------------------------------------------------------- kills triggered by progress

// `qlora train` in a child (one thread, so the run is exact), SIGKILLed as
// soon as `kill_now()` is true (polled every 200 us); without it, run to the
// end. Returns the exit status (128 + signal when killed).
int train_until(const std::string& config, const std::string& resume, const std::function<bool()>& kill_now,
                const std::string& err_path) {
  const pid_t pid = fork();
  if (pid == 0) {
    setenv("OMP_NUM_THREADS", "1", 1);
    if (!freopen(err_path.c_str(), "w", stderr)) _exit(99);
    if (resume.empty())
      execl(QLORA_BIN, QLORA_BIN, "train", "--config", config.c_str(), "--device", "cpu", "--no-start-eval",
            static_cast<char*>(nullptr));
    else
      execl(QLORA_BIN, QLORA_BIN, "train", "--config", config.c_str(), "--device", "cpu", "--no-start-eval",
            "--resume", resume.c_str(), static_cast<char*>(nullptr));
    _exit(98);
  }
  int status = 0;
  while (kill_now) {
    if (waitpid(pid, &status, WNOHANG) == pid)
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (kill_now()) {
      kill(pid, SIGKILL);
      break;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

bool has_temp_checkpoint(const std::string& out, int64_t step) {
  std::error_code ec;
  const std::string prefix = ".tmp-checkpoint-" + std::to_string(step) + "-";
  for (const auto& e : fs::directory_iterator(out, ec))
    if (e.path().filename().string().rfind(prefix, 0) == 0) return true;
  return false;
}

// SIGKILL the moment checkpoint-N appears (between saves), or the moment the
// temp directory of the save after it appears (inside a save); then
// --resume auto must take over the dead run's lock, continue from a checkpoint
// that verifies, and end with the adapter of a run that was never killed, bit
// for bit.
TEST(CliTrain, KillsTriggeredBySavesThenResumeEndsWithTheSameAdapter) {
  const std::string dir = testing::make_temp_dir("cli_kill");
  const auto config_in = [&](const std::string& out) {
    const std::string data = testing::small_completion_data(dir, 64);
    return testing::write_file(
        dir, fs::path(out).filename().string() + ".yaml",
        "model:\n  path: " + testing::small_model_dir() +
            "\nlora:\n  r: 4\n  alpha: 8\n  dropout: 0.1\n  target_modules: [q_proj, v_proj]\n"
            "data:\n  path: " + data + "\n  max_seq_length: 64\n"
            "train:\n  micro_batch_size: 2\n  gradient_accumulation_steps: 2\n  max_steps: 12\n"
            "  precision: fp32\n  optimizer: adamw\n  gradient_checkpointing: false\n"
            "output:\n  dir: " + out + "\n  save_steps: 1\n  keep_last: 2\n  logging_steps: 1\n");
  };
  const std::string ref_out = dir + "/reference";
  ASSERT_EQ(train_until(config_in(ref_out), "", nullptr, dir + "/reference.txt"), 0) << read(dir + "/reference.txt");
  const std::string want = ckpt::sha256_file(ref_out + "/adapter/adapter_model.safetensors");

  struct Round {
    const char* name;
    int64_t step;
    bool inside_next_save;
  };
  for (const Round& round : {Round{"after-3", 3, false}, Round{"inside-6", 5, true}, Round{"after-9", 9, false}}) {
    SCOPED_TRACE(round.name);
    const std::string out = dir + "/" + round.name;
    const std::string config = config_in(out);
    const std::string err = dir + "/" + round.name + ".txt";
    const std::string target = out + "/checkpoint-" + std::to_string(round.step);
    const int killed = train_until(config, "", [&] {
      return round.inside_next_save ? has_temp_checkpoint(out, round.step + 1) : fs::exists(target);
    }, err);
    ASSERT_EQ(killed, 128 + SIGKILL) << "the run ended before the kill: " << read(err);
    EXPECT_TRUE(fs::exists(out + "/.qlora.lock"));  // kill -9: nobody removed it
    const ckpt::Found found = ckpt::find_latest_valid(out);
    ASSERT_TRUE(found) << read(err);
    EXPECT_GE(found.step, round.step);

    ASSERT_EQ(train_until(config, "auto", nullptr, err), 0) << read(err);
    const std::string log = read(err);
    EXPECT_NE(log.find("taking over " + out + "/.qlora.lock"), std::string::npos) << log;
    EXPECT_NE(log.find("resumed from " + found.path), std::string::npos) << log;
    EXPECT_EQ(ckpt::sha256_file(out + "/adapter/adapter_model.safetensors"), want) << log;
    EXPECT_FALSE(fs::exists(out + "/.qlora.lock"));
  }
}

// --micro-batch auto measures on a GPU; on a CPU it says so and keeps the
// config's micro batch (and so the effective batch).
TEST(CliTrain, MicroBatchAutoOnCpuKeepsTheConfigAndSaysWhy) {
  const std::string dir = testing::make_temp_dir("cli_microauto");
  const auto r = testing::run_qlora("train --config " + write_config(dir, 2) +
                                    " --device cpu --no-start-eval --micro-batch auto");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("--micro-batch auto needs a GPU to measure on; keeping micro 2"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("effective batch = micro 2 × accumulation 2 × GPUs 1 = 4"), std::string::npos) << r.err;
}

// plan --measure / --find-micro-batch / --find-max-seq run real steps on a GPU; without one the
// message says so (exit 2), never a crash or a made-up number.
TEST(CliPlan, MeasureWithoutAGpuIsAClearError) {
  for (const char* flag : {"--measure", "--find-micro-batch", "--find-max-seq"}) {
    const std::string seq = std::string(flag) == "--find-max-seq" ? "2048" : "64";  // the longest tried there
    const auto r = testing::run_qlora("plan --config configs/llama-3.2-1b-t4.yaml --seq " + seq + " " + flag);
    if (r.exit_code == 0) GTEST_SKIP() << "this machine has a GPU: " << flag << " measured (the cuda tests cover it)";
    EXPECT_EQ(r.exit_code, 2) << r.err;
    EXPECT_NE(r.err.find(std::string("qlora plan ") + flag + " needs a GPU"), std::string::npos) << r.err;
  }
}

}  // namespace
}  // namespace qlora

namespace qlora {
namespace {

// The README's first command, shortened: builds its model and tokenizer,
// trains, stops half-way on purpose, resumes, and says where the adapter is.
TEST(CliDemo, BuildsTrainsStopsResumesAndPointsAtTheAdapter) {
  const std::string dir = testing::make_temp_dir("cli_demo");
  const auto r = testing::run_qlora("demo --dir " + dir + " --steps 10 --eval-generate 4");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("interrupted on purpose after step 5"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("resumed from " + dir + "/out/checkpoint-5"), std::string::npos) << r.err;
  EXPECT_NE(r.out.find("qlora demo finished: 10 steps"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("PeftModel.from_pretrained"), std::string::npos) << r.out;
  EXPECT_TRUE(fs::exists(dir + "/out/adapter/adapter_model.safetensors"));
  EXPECT_TRUE(fs::exists(dir + "/model/tokenizer.json"));
  EXPECT_TRUE(fs::exists(dir + "/run.yaml"));
  // The run's config loads back as a qlora config.
  const auto check = testing::run_qlora("config --config " + dir + "/run.yaml");
  EXPECT_EQ(check.exit_code, 0) << check.err;
}

}  // namespace
}  // namespace qlora
