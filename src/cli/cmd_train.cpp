// qlora train: fine-tune with QLoRA as the config says.
//
//   qlora train --config run.yaml [--set key=value ...] [--resume auto|none|PATH [--force]]
//               [--micro-batch auto] [--memory-cap 15GiB]
//
// Ctrl-C (SIGINT) or SIGTERM saves a checkpoint and exits with 130, printing
// the command that continues the run (its --set overrides included); a second
// one quits at once, without saving.
// What it prints and writes: train/run.h. Exit codes: 0 done (or finished
// before), 2 bad input (config, model directory, data, a busy output.dir), 1 a
// failure during training (e.g. the loss stayed inf/nan for
// train.max_bad_steps steps, a full disk), 130 stopped by a signal.
#include <unistd.h>

#include <iostream>
#include <memory>

#include "cli/commands.h"
#include "qlora/common/errors.h"
#include "qlora/plan/gpu.h"
#include "qlora/train/run.h"

namespace qlora::cli {
namespace {

struct TrainOptions {
  ConfigOptions config;
  int64_t generate_examples = 64;
  bool no_start_eval = false;
  std::string resume;
  bool force = false;
  std::string device = "auto";
  std::string micro_batch;  // "" (the config's) or "auto"
  std::string memory_cap;   // "" or a size: "15GiB", "16GB"
};

// Single quotes where the shell would split or expand the word.
std::string shell_word(const std::string& w) {
  if (!w.empty() && w.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.,/:=+@%") ==
                        std::string::npos)
    return w;
  std::string q = "'";
  for (char c : w) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// The command line that continues this run after a stop: the same config,
// overrides and flags that shape the run, then --resume auto.
std::string continue_command(const TrainOptions& o) {
  std::string cmd = "qlora train --config " + shell_word(o.config.path);
  for (const auto& kv : o.config.overrides) cmd += " --set " + shell_word(kv);
  if (o.device != "auto") cmd += " --device " + o.device;
  if (!o.micro_batch.empty()) cmd += " --micro-batch " + o.micro_batch;
  if (!o.memory_cap.empty()) cmd += " --memory-cap " + shell_word(o.memory_cap);
  if (o.generate_examples != TrainOptions{}.generate_examples)
    cmd += " --eval-generate " + std::to_string(o.generate_examples);
  return cmd + " --resume auto";
}

}  // namespace

Runner add_train_command(CLI::App& root) {
  auto opts = std::make_shared<TrainOptions>();
  CLI::App* cmd = root.add_subcommand("train", "fine-tune the config's model with QLoRA (NF4 base, LoRA adapters)");
  add_config_options(*cmd, opts->config, /*required=*/true);
  cmd->add_option("--eval-generate", opts->generate_examples,
                  "held-out prompts answered greedily for exact-match accuracy at each evaluation (0: loss only)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_flag("--no-start-eval", opts->no_start_eval, "skip the evaluation before the first step");
  cmd->add_option("--resume", opts->resume,
                  "continue a run: auto (the newest checkpoint in output.dir that verifies; step 0 when there is "
                  "none), a checkpoint directory, or none (start over: the earlier run's checkpoints move to "
                  "output.dir/earlier-run-<time>/)");
  cmd->add_option("--device", opts->device, "auto (a GPU when there is one), cpu or cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}))
      ->capture_default_str();
  cmd->add_flag("--force", opts->force, "with --resume: resume even when the config changes the run's math");
  cmd->add_option("--micro-batch", opts->micro_batch,
                  "auto: measure the largest micro batch that fits this GPU and set accumulation so the effective "
                  "batch stays the config's (a resume keeps the checkpoint's choice)")
      ->check(CLI::IsMember({"auto"}));
  cmd->add_option("--memory-cap", opts->memory_cap,
                  "let the CUDA allocator use at most this much (e.g. 15GiB: train as on a 16 GB GPU)");
  return [opts]() {
    const Config cfg = load_config_options(opts->config);
    train::RunOptions ro;
    ro.continue_command = continue_command(*opts);
    ro.progress_bar = isatty(STDERR_FILENO) != 0;
    ro.evaluate_at_start = !opts->no_start_eval;
    ro.eval.generate_examples = opts->generate_examples;
    ro.resume = opts->resume;
    ro.device = opts->device;
    ro.force = opts->force;
    ro.micro_batch_auto = opts->micro_batch == "auto";
    if (!opts->memory_cap.empty()) ro.memory_cap_bytes = plan::resolve_gpu(opts->memory_cap).memory_bytes;
    const train::RunResult r = train::run_training(cfg, ro);
    return r.interrupted ? kExitInterrupted : kExitOk;
  };
}

}  // namespace qlora::cli
