// qlora demo: the whole product on built-in defaults, on CPU, in minutes.
//
//   qlora demo [--dir qlora-demo] [--data data/demo] [--steps 200] [--device auto|cpu|cuda]
//
// Builds a tiny random Llama and a byte-level tokenizer in --dir/model, writes
// the run's config to --dir/run.yaml, and trains a LoRA adapter on the shipped
// synthetic task (data/demo), evaluating on its held-out split before, during
// and after training. Half-way it stops on purpose and resumes from its
// checkpoint, as after a kill. Ends by saying where the adapter is and how to
// use it.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>

#include "cli/commands.h"
#include "qlora/common/errors.h"
#include "qlora/common/log.h"
#include "qlora/data/demo_tokenizer.h"
#include "qlora/train/demo.h"
#include "qlora/train/run.h"

namespace qlora::cli {
namespace {

namespace fs = std::filesystem;

// Merges of the demo tokenizer: words of the prompts become single tokens
// (numbers stay digit by digit), about 4x fewer tokens than raw bytes.
constexpr int kDemoMerges = 512;

struct DemoOptions {
  std::string dir = "qlora-demo";
  std::string data;  // empty: data/demo beside the binary's source tree, or in the working directory
  int64_t steps = 200;
  int64_t eval_examples = 32;
  std::string device = "auto";
};

// data/demo next to the working directory, or relative to the binary (build/qlora -> ../data/demo).
std::string find_demo_data(const std::string& given) {
  if (!given.empty()) {
    if (!fs::exists(fs::path(given) / "train.alpaca.jsonl"))
      throw InputError("--data " + given + ": no train.alpaca.jsonl there; point it at the repository's data/demo");
    return given;
  }
  std::vector<fs::path> candidates = {fs::path("data/demo")};
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    candidates.push_back(exe.parent_path().parent_path() / "data/demo");
    candidates.push_back(exe.parent_path() / "data/demo");
  }
  for (const auto& c : candidates)
    if (fs::exists(c / "train.alpaca.jsonl")) return c.lexically_normal().string();
  throw InputError("cannot find the demo data (data/demo/train.alpaca.jsonl) in the working directory or beside "
                   "the binary; run from the repository root or pass --data DIR");
}

}  // namespace

Runner add_demo_command(CLI::App& root) {
  auto opts = std::make_shared<DemoOptions>();
  CLI::App* cmd = root.add_subcommand(
      "demo", "train a LoRA adapter for a tiny built-in model on the shipped demo task (CPU, minutes, no files needed)");
  cmd->add_option("--dir", opts->dir, "work directory for the model, checkpoints and adapter")->capture_default_str();
  cmd->add_option("--data", opts->data, "the demo data directory (default: data/demo of this repository)");
  cmd->add_option("--steps", opts->steps, "optimizer steps")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--eval-generate", opts->eval_examples, "held-out prompts answered for exact match at each evaluation")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--device", opts->device, "auto (a GPU when there is one), cpu or cuda")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  return [opts]() {
    const std::string data_dir = find_demo_data(opts->data);
    const fs::path work(opts->dir);
    const fs::path model_dir = work / "model";
    if (!fs::exists(model_dir / "model.safetensors")) {
      log::info("building the tiny base model and tokenizer in " + model_dir.string());
      const auto merges = data::learn_merges(data::rendered_texts(data_dir + "/train.alpaca.jsonl"), kDemoMerges);
      const int64_t vocab = data::write_demo_tokenizer(model_dir.string(), merges);
      train::write_random_llama(model_dir.string(), train::demo_model_config(vocab), 1234);
    } else {
      log::info("using the tiny base model already in " + model_dir.string());
    }
    Config cfg = train::demo_config(work.string(), data_dir);
    if (fs::exists(cfg.output.dir)) {
      log::info("removing the previous demo run in " + cfg.output.dir);
      fs::remove_all(cfg.output.dir);
    }
    cfg.train.max_steps = opts->steps;
    const fs::path yaml = work / "run.yaml";
    std::ofstream(yaml) << "# written by `qlora demo`; rerun with: qlora train --config " << yaml.string() << "\n"
                        << to_yaml(cfg);
    log::info("config: " + yaml.string());
    cfg.source = yaml.string();  // what messages name (e.g. the command that resumes)

    train::RunOptions ro;
    ro.device = opts->device;
    ro.progress_bar = isatty(STDERR_FILENO) != 0;
    ro.eval.generate_examples = opts->eval_examples;
    // Interrupted on purpose half-way, as a kill or Ctrl-C would, then resumed
    // from the checkpoint that stop wrote: the second half continues the same run.
    const int64_t stop_at = opts->steps / 2;
    if (stop_at >= 1) ro.stop_when = [stop_at](int64_t step, int64_t micro) { return step == stop_at + 1 && micro == 0; };
    const train::RunResult first = train::run_training(cfg, ro);
    train::RunResult r = first;
    if (first.interrupted) {
      log::info("demo: interrupted on purpose after step " + std::to_string(stop_at) +
                "; resuming, as `qlora train --config " + yaml.string() + " --resume auto` would");
      ro.stop_when = nullptr;
      ro.resume = "auto";
      r = train::run_training(cfg, ro);
      r.start_eval = first.start_eval;
      r.first_loss = first.first_loss;
      r.steps += first.steps;
    }

    std::cout << "\nqlora demo finished: " << r.steps << " steps, train loss " << r.first_loss << " -> " << r.last_loss;
    if (r.has_eval)
      std::cout << ", held-out loss " << r.start_eval.loss << " -> " << r.final_eval.loss << ", exact match "
                << r.start_eval.exact << "/" << r.start_eval.generated << " -> " << r.final_eval.exact << "/"
                << r.final_eval.generated;
    std::cout << "\n  adapter (PEFT format): " << r.adapter_dir << "\n  metrics: " << r.metrics_path
              << "\n  use it with transformers + PEFT:\n"
              << "    model = AutoModelForCausalLM.from_pretrained(\"" << model_dir.string() << "\")\n"
              << "    model = PeftModel.from_pretrained(model, \"" << r.adapter_dir << "\")\n"
              << "  or merge it: qlora merge --base " << model_dir.string() << " --adapter " << r.adapter_dir
              << " --out " << (work / "merged").string() << "\n";
    return kExitOk;
  };
}

}  // namespace qlora::cli
