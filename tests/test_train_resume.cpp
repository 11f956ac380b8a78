// Exact resume: a 40-step fp32 CPU run stopped at step k and resumed with
// --resume auto gives the loss sequence of the uninterrupted run bit for bit
// and the same final adapter (sha256 of its safetensors file), for k = 1, 7,
// in the middle of an accumulation window, at an epoch edge, 39, and for two
// stops in a row. LoRA dropout is on, so the generator state must travel too.
// Plus: what a resume refuses, and what --resume PATH says about a bad path.
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "qlora/ckpt/lock.h"
#include "qlora/ckpt/sha256.h"
#include "qlora/ckpt/store.h"
#include "qlora/common/errors.h"
#include "qlora/train/run.h"
#include "support/train_fixtures.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kSteps = 40;

// 32 examples, micro 2 -> 16 micro batches an epoch; accumulation 3 -> windows
// straddle epochs (steps 6, 11) and step 16 ends exactly at an epoch edge
// (48 micro batches = 3 epochs).
Config resume_config(const std::string& out) {
  static const std::string data_dir = testing::make_temp_dir("resume_data");
  static const std::string data = testing::small_completion_data(data_dir, 32);
  Config cfg = default_config();
  cfg.model.path = testing::small_model_dir();
  cfg.data.path = data;
  cfg.data.max_seq_length = 64;
  cfg.lora.r = 4;
  cfg.lora.alpha = 8;
  cfg.lora.dropout = 0.1;
  cfg.lora.target_modules = {"q_proj", "v_proj", "down_proj"};
  cfg.train.micro_batch_size = 2;
  cfg.train.gradient_accumulation_steps = 3;
  cfg.train.max_steps = kSteps;
  cfg.train.learning_rate = 1e-3;
  cfg.train.lr_scheduler = LrSchedule::kCosine;
  cfg.train.warmup_steps = 3;
  cfg.train.precision = Precision::kFp32;
  cfg.train.optimizer = OptimizerKind::kPagedAdamW8bit;
  cfg.train.gradient_checkpointing = true;
  cfg.output.dir = out;
  cfg.output.save_steps = 10;
  cfg.output.keep_last = 2;
  cfg.output.logging_steps = 0;
  return cfg;
}

train::RunOptions quiet() {
  train::RunOptions o;
  o.device = "cpu";  // the exactness claim is the fp32 CPU one
  o.evaluate_at_start = false;
  o.handle_signals = false;
  return o;
}

struct Reference {
  std::vector<double> losses;
  std::string adapter_sha;
};

const Reference& reference() {
  static const Reference r = [] {
    at::set_num_threads(1);
    const std::string out = testing::make_temp_dir("resume_ref");
    const train::RunResult res = train::run_training(resume_config(out), quiet());
    return Reference{res.losses, ckpt::sha256_file(res.adapter_dir + "/adapter_model.safetensors")};
  }();
  return r;
}

// Runs with stops at the given (step, micro) points in turn, resuming after
// each, and returns the losses of every step actually kept plus the adapter.
struct Stop {
  int64_t step;
  int64_t micro;
};

Reference run_with_stops(const std::vector<Stop>& stops, std::vector<int64_t>* saved_steps) {
  at::set_num_threads(1);
  const std::string out = testing::make_temp_dir("resume_run");
  Reference got;
  bool resume = false;
  for (const Stop& stop : stops) {
    train::RunOptions o = quiet();
    if (resume) o.resume = "auto";
    o.stop_when = [stop](int64_t step, int64_t micro) { return step == stop.step && micro == stop.micro; };
    const train::RunResult r = train::run_training(resume_config(out), o);
    EXPECT_TRUE(r.interrupted);
    saved_steps->push_back(ckpt::checkpoint_step(r.last_checkpoint));
    // Losses of steps after the checkpoint are replayed by the resume: keep
    // only those up to it.
    got.losses.insert(got.losses.end(), r.losses.begin(), r.losses.end());
    got.losses.resize(static_cast<size_t>(saved_steps->back()));
    resume = true;
  }
  train::RunOptions o = quiet();
  o.resume = "auto";
  const train::RunResult r = train::run_training(resume_config(out), o);
  EXPECT_FALSE(r.interrupted);
  EXPECT_EQ(r.start_step, saved_steps->back());
  got.losses.insert(got.losses.end(), r.losses.begin(), r.losses.end());
  got.adapter_sha = ckpt::sha256_file(r.adapter_dir + "/adapter_model.safetensors");

  // metrics.jsonl holds every step once: the lines after a checkpoint were
  // dropped with the resume.
  std::ifstream in(r.metrics_path);
  std::string line;
  std::vector<int64_t> steps;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line);
    if (j["type"] == "train") steps.push_back(j["step"].get<int64_t>());
  }
  std::vector<int64_t> want;
  for (int64_t s = 1; s <= kSteps; ++s) want.push_back(s);
  EXPECT_EQ(steps, want);
  return got;
}

void expect_exact(const std::vector<Stop>& stops, const std::vector<int64_t>& want_saved) {
  const Reference& ref = reference();
  ASSERT_EQ(ref.losses.size(), static_cast<size_t>(kSteps));
  std::vector<int64_t> saved;
  const Reference got = run_with_stops(stops, &saved);
  EXPECT_EQ(saved, want_saved);
  ASSERT_EQ(got.losses.size(), ref.losses.size());
  for (size_t i = 0; i < ref.losses.size(); ++i)
    EXPECT_EQ(got.losses[i], ref.losses[i]) << "loss of step " << i + 1 << " differs (bitwise)";
  EXPECT_EQ(got.adapter_sha, ref.adapter_sha);
}

TEST(TrainResume, ReferenceLearns) {
  const Reference& ref = reference();
  ASSERT_EQ(ref.losses.size(), static_cast<size_t>(kSteps));
  EXPECT_LT(ref.losses.back(), ref.losses.front());
}

// stop_when(step, 0): stop before `step` starts, so the checkpoint is step - 1.
TEST(TrainResume, AfterStep1) { expect_exact({{2, 0}}, {1}); }
TEST(TrainResume, AfterStep7) { expect_exact({{8, 0}}, {7}); }
TEST(TrainResume, InTheMiddleOfAnAccumulationWindow) {
  // Step 12's window abandoned after 2 of its 3 micro batches: the checkpoint
  // is step 11's and the loader goes back to the window's start.
  expect_exact({{12, 2}}, {11});
}
TEST(TrainResume, AtAnEpochEdge) { expect_exact({{17, 0}}, {16}); }
TEST(TrainResume, AfterStep39) { expect_exact({{40, 0}}, {39}); }
TEST(TrainResume, TwiceInARow) { expect_exact({{6, 1}, {21, 0}}, {5, 20}); }

TEST(TrainResume, RefusesAChangedMathUnlessForced) {
  at::set_num_threads(1);
  const std::string out = testing::make_temp_dir("resume_refuse");
  train::RunOptions o = quiet();
  o.stop_when = [](int64_t step, int64_t micro) { return step == 3 && micro == 0; };
  ASSERT_TRUE(train::run_training(resume_config(out), o).interrupted);

  Config changed = resume_config(out);
  changed.lora.r = 8;
  changed.train.gradient_accumulation_steps = 4;
  changed.train.learning_rate = 5e-4;  // allowed: only warned about
  train::RunOptions again = quiet();
  again.resume = "auto";
  try {
    train::run_training(changed, again);
    FAIL() << "expected the resume to be refused";
  } catch (const InputError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("lora.r: checkpoint 4, now 8"), std::string::npos) << m;
    EXPECT_NE(m.find("effective_batch: checkpoint 6, now 8"), std::string::npos) << m;
    EXPECT_EQ(m.find("learning_rate"), std::string::npos) << m;
    EXPECT_NE(m.find("--force"), std::string::npos) << m;
  }
}

TEST(TrainResume, ResumePathThatDoesNotVerify) {
  at::set_num_threads(1);
  const std::string out = testing::make_temp_dir("resume_bad");
  train::RunOptions o = quiet();
  o.stop_when = [](int64_t step, int64_t micro) { return step == 3 && micro == 0; };
  const train::RunResult r = train::run_training(resume_config(out), o);
  ASSERT_TRUE(r.interrupted);
  {  // flip one byte of the optimizer state
    std::fstream f(r.last_checkpoint + "/optimizer.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(200);
    char c = 0;
    f.read(&c, 1);
    f.seekp(200);
    c = static_cast<char>(c ^ 0x10);
    f.write(&c, 1);
  }
  train::RunOptions again = quiet();
  again.resume = r.last_checkpoint;
  try {
    train::run_training(resume_config(out), again);
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("optimizer.safetensors"), std::string::npos) << m;
    EXPECT_NE(m.find("--resume auto"), std::string::npos) << m;
  }
  // auto finds checkpoints and none that verifies: refused, naming each and
  // the flag that starts over, and nothing moved.
  again.resume = "auto";
  try {
    train::run_training(resume_config(out), again);
    FAIL() << "expected --resume auto to refuse a directory whose checkpoints are all damaged";
  } catch (const InputError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("none of them verifies"), std::string::npos) << m;
    EXPECT_NE(m.find("checkpoint-2"), std::string::npos) << m;
    EXPECT_NE(m.find("optimizer.safetensors"), std::string::npos) << m;
    EXPECT_NE(m.find("--resume none"), std::string::npos) << m;
  }
  EXPECT_TRUE(fs::exists(r.last_checkpoint));
  // --resume none starts over and keeps the earlier run aside, not deleted.
  again.resume = "none";
  Config shorter = resume_config(out);
  shorter.train.max_steps = 3;
  const train::RunResult fresh = train::run_training(shorter, again);
  EXPECT_EQ(fresh.start_step, 0);
  EXPECT_EQ(fresh.steps, 3);
  int aside = 0;
  for (const auto& e : fs::directory_iterator(out))
    if (e.path().filename().string().rfind("earlier-run-", 0) == 0) {
      ++aside;
      EXPECT_TRUE(fs::exists(e.path() / "checkpoint-2" / "optimizer.safetensors")) << e.path();
    }
  EXPECT_EQ(aside, 1);
}

// A stop right after a periodic save writes nothing again: the checkpoint of
// that step is already on disk and verified.
TEST(TrainResume, StopRightAfterASaveDoesNotSaveAgain) {
  at::set_num_threads(1);
  const std::string out = testing::make_temp_dir("resume_nodup");
  Config cfg = resume_config(out);
  cfg.output.save_steps = 2;
  train::RunOptions o = quiet();
  o.stop_when = [](int64_t step, int64_t micro) { return step == 3 && micro == 0; };
  const train::RunResult r = train::run_training(cfg, o);
  ASSERT_TRUE(r.interrupted);
  EXPECT_EQ(ckpt::checkpoint_step(r.last_checkpoint), 2);
  EXPECT_EQ(r.checkpoints_written, 1);
  // Resumed from it and stopped inside the first window (its checkpoint is
  // the one resumed from): nothing written either.
  train::RunOptions again = quiet();
  again.resume = "auto";
  again.stop_when = [](int64_t step, int64_t micro) { return step == 3 && micro == 1; };
  const train::RunResult r2 = train::run_training(cfg, again);
  EXPECT_TRUE(r2.interrupted);
  EXPECT_EQ(r2.checkpoints_written, 0);
  EXPECT_EQ(r2.last_checkpoint, r.last_checkpoint);
}

// Resuming a run that has finished does nothing and says so; with its adapter
// missing (a kill after the last save) it writes the adapter and nothing else.
TEST(TrainResume, FinishedRunResumesToNothing) {
  at::set_num_threads(1);
  const std::string out = testing::make_temp_dir("resume_finished");
  Config cfg = resume_config(out);
  cfg.train.max_steps = 3;
  const train::RunResult done = train::run_training(cfg, quiet());
  ASSERT_EQ(done.steps, 3);
  const std::string adapter = done.adapter_dir + "/adapter_model.safetensors";
  const std::string sha = ckpt::sha256_file(adapter);
  const auto metrics_size = fs::file_size(done.metrics_path);

  train::RunOptions again = quiet();
  again.resume = "auto";
  const train::RunResult r = train::run_training(cfg, again);
  EXPECT_TRUE(r.finished_before);
  EXPECT_EQ(r.steps, 0);
  EXPECT_EQ(r.start_step, 3);
  EXPECT_EQ(r.checkpoints_written, 0);
  EXPECT_EQ(fs::file_size(done.metrics_path), metrics_size);  // no evaluation, no step lines

  fs::remove_all(done.adapter_dir);
  const train::RunResult r2 = train::run_training(cfg, again);
  EXPECT_TRUE(r2.finished_before);
  EXPECT_EQ(r2.checkpoints_written, 0);
  ASSERT_TRUE(fs::exists(adapter));
  EXPECT_EQ(ckpt::sha256_file(adapter), sha);

  // A longer run asked for: it trains on from the checkpoint.
  cfg.train.max_steps = 5;
  const train::RunResult longer = train::run_training(cfg, again);
  EXPECT_FALSE(longer.finished_before);
  EXPECT_EQ(longer.start_step, 3);
  EXPECT_EQ(longer.steps, 2);
}

// Two runs in one output.dir: the second is refused while the first holds it.
TEST(TrainResume, BusyOutputDirIsRefused) {
  const std::string out = testing::make_temp_dir("resume_busy");
  ckpt::OutputDirLock other(out);
  try {
    train::run_training(resume_config(out), quiet());
    FAIL() << "expected a busy output.dir to be refused";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("in use by another qlora run"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace qlora
