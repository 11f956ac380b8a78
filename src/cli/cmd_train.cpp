// qlora train: fine-tune with QLoRA as the config says.
//
//   qlora train --config run.yaml [--set key=value ...]
//
// What it prints and writes: train/run.h. Exit codes: 0 done, 2 bad input
// (config, model directory, data), 1 a failure during training (e.g. the loss
// stayed inf/nan for train.max_bad_steps steps).
#include <unistd.h>

#include <iostream>
#include <memory>

#include "cli/commands.h"
#include "qlora/train/run.h"

namespace qlora::cli {
namespace {

struct TrainOptions {
  ConfigOptions config;
  int64_t generate_examples = 64;
  bool no_start_eval = false;
};

}  // namespace

Runner add_train_command(CLI::App& root) {
  auto opts = std::make_shared<TrainOptions>();
  CLI::App* cmd = root.add_subcommand("train", "fine-tune the config's model with QLoRA (NF4 base, LoRA adapters)");
  add_config_options(*cmd, opts->config, /*required=*/true);
  cmd->add_option("--eval-generate", opts->generate_examples,
                  "held-out prompts answered greedily for exact-match accuracy at each evaluation (0: loss only)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_flag("--no-start-eval", opts->no_start_eval, "skip the evaluation before the first step");
  return [opts]() {
    const Config cfg = load_config_options(opts->config);
    train::RunOptions ro;
    ro.progress_bar = isatty(STDERR_FILENO) != 0;
    ro.evaluate_at_start = !opts->no_start_eval;
    ro.eval.generate_examples = opts->generate_examples;
    train::run_training(cfg, ro);
    return kExitOk;
  };
}

}  // namespace qlora::cli
