// train/run: `qlora train` as one recipe, from a config to an adapter.
//
//   1. device and precision   (CUDA when present; precision: auto resolved)
//   2. base model             (Hugging Face directory -> NF4 frozen linears)
//   3. LoRA adapter           (PEFT init, seeded)
//   4. tokenizer and data     (train / held-out split, the loader)
//   5. optimizer, schedule, loss scaler, bad-step policy
//   6. banner                 (effective batch, memory plan, trainable params)
//   7. the loop               (progress, metrics.jsonl, evaluation every eval_steps)
//   8. the adapter            (output_dir/adapter, PEFT format)
// Each stage is a few lines here; the work lives in the modules it names.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "qlora/config/config.h"
#include "qlora/train/eval.h"

namespace qlora::train {

struct RunOptions {
  std::string device = "auto";      // auto (the first GPU when there is one), cpu, cuda
  bool progress_bar = false;        // draw a bar (stderr is a terminal)
  bool evaluate_at_start = true;    // held-out numbers before the first step (not on resume)
  EvalOptions eval;                 // batch and generation sizes of evaluation
  // "": fresh (refused where output.dir holds checkpoints); "auto": the newest
  // valid checkpoint (fresh where there is none; refused where none of several
  // verifies); "none": start over, the earlier run moved aside; or a path.
  std::string resume;
  // What to print to continue after a stop (the CLI passes the command line
  // with its --set overrides); "": `qlora train --config <source> --resume auto`.
  std::string continue_command;
  bool force = false;               // resume even when the run's math changed
  bool handle_signals = true;       // SIGINT/SIGTERM: save a checkpoint, then return interrupted
  // Stop on purpose (demo, tests): asked before step `step` (1-based) starts
  // with micro = 0, and before each later micro batch of that step with the
  // number done. true at micro 0 stops after step - 1; later, the window is
  // abandoned and the checkpoint is that of step - 1 as well.
  std::function<bool(int64_t step, int64_t micro)> stop_when;
  // --micro-batch auto: probe the GPU for the largest micro batch that fits
  // (train/measure.h) and set accumulation so the effective batch stays the
  // config's; a resume keeps the checkpoint's choice. Ignored on CPU (said so).
  bool micro_batch_auto = false;
  double memory_cap_bytes = 0;  // > 0: cap the CUDA allocator there (a smaller GPU's memory)
  // Tests of Note [out-of-memory retry] on machines without a GPU: >= 0 makes
  // every decoder layer whose input has more rows than this raise c10's
  // OutOfMemoryError, as the CUDA allocator does. -1: off.
  int64_t simulate_oom_above_rows = -1;
  // Benchmark hook: a model directory with config.json and no *.safetensors is
  // trained from random weights of that shape, drawn on the device (as `plan
  // --measure` does). Off for users: a missing checkpoint is an error.
  bool random_weights = false;
};

struct RunResult {
  int64_t steps = 0;         // optimizer steps taken by this run
  int64_t total_steps = 0;   // of the whole schedule
  double first_loss = 0.0;
  double last_loss = 0.0;
  double seconds = 0.0;
  bool has_eval = false;
  EvalResult start_eval;     // when evaluate_at_start and there is eval data
  EvalResult final_eval;
  std::string adapter_dir;   // where the adapter was written (empty when interrupted)
  std::string metrics_path;  // output_dir/metrics.jsonl
  int64_t start_step = 0;    // 0, or the step resumed from
  bool interrupted = false;  // stopped early (signal or stop_when); a checkpoint was saved
  bool finished_before = false;  // a resume of a run that had already finished: nothing trained
  std::string last_checkpoint;
  int64_t checkpoints_written = 0;  // by this call (a step already on disk is never written again)
  std::vector<double> losses;  // train loss of every step this call ran
  int64_t micro_batch_size = 0;             // as run (after --micro-batch auto)
  int64_t gradient_accumulation_steps = 0;  // as run
  int64_t max_micro_rows = 0;               // > 0: out-of-memory retries cut micro batches to this many rows
  Recompute recompute = Recompute::kFull;   // as run (after train.recompute: auto)
  int64_t selective_layers = -1;            // as run, with selective
  int64_t no_recompute_layers = 0;          // as run (train.no_recompute_layers, after auto)
};

// Runs the whole recipe, holding output.dir for this run alone (ckpt/lock.h;
// InputError when another run holds it). Throws InputError for anything the user can fix (a
// missing model.path, unreadable files, bad data, a resume that does not fit,
// a step that does not fit in memory even at one sequence per micro batch:
// after saving a checkpoint),
// TrainingDiverged when the loss stays non-finite (after saving a checkpoint of
// the last good step), ckpt::CheckpointError when a save fails.
RunResult run_training(const Config& cfg, const RunOptions& options = {});

// "effective batch = micro 2 × accumulation 16 × GPUs 1 = 32 sequences per optimizer step"
std::string effective_batch_line(const Config& cfg, int64_t world_size);

// PEFT's print_trainable_parameters line (4-bit weights counted at their
// original element count, as PEFT does for bitsandbytes' Params4bit):
// "trainable params: 3,407,872 || all params: 1,239,222,272 || trainable%: 0.2750"
std::string trainable_params_line(int64_t trainable, int64_t all);

}  // namespace qlora::train
