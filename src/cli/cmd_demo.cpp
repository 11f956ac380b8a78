// qlora demo: the whole product on built-in defaults, on CPU, in minutes.
//
//   qlora demo [--dir qlora-demo] [--data data/demo] [--steps 200] [--device auto|cpu|cuda]
//
// Builds a tiny random Llama and a byte-level tokenizer in --dir/model, writes
// the run's config to --dir/run.yaml, and trains a LoRA adapter on the shipped
// synthetic task (data/demo: is a number even or odd), evaluating on its
// held-out split before, half-way and after training. Half-way it stops on
// purpose and resumes from its checkpoint, as after a kill. Ends with one
// held-out prompt answered before and after training, the held-out exact
// match before -> after, and where the adapter is and how to use it.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "qlora/common/errors.h"
#include "qlora/common/log.h"
#include "qlora/train/demo.h"
#include "qlora/train/progress.h"
#include "qlora/train/run.h"
#include "qlora/train/threads.h"

namespace qlora::cli {
namespace {

namespace fs = std::filesystem;

struct DemoOptions {
  std::string dir = "qlora-demo";
  std::string data;  // empty: data/demo beside the binary's source tree, or in the working directory
  int64_t steps = train::kDemoSteps;
  int64_t eval_examples = 300;  // every held-out prompt of data/demo
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

// The prompt of the index-th example of a JSONL file as a user wrote it (an
// alpaca instruction and its input, a chat's last user message, a completion's
// prompt), for showing beside the model's answer.
std::string prompt_of(const std::string& jsonl_path, int64_t index) {
  std::ifstream in(jsonl_path);
  std::string line;
  int64_t n = 0;
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;  // the loader skips these too
    if (n++ < index) continue;
    const nlohmann::json j = nlohmann::json::parse(line);
    if (j.contains("instruction")) {
      const std::string input = j.value("input", "");
      return j["instruction"].get<std::string>() + (input.empty() ? "" : "\n\n" + input);
    }
    if (j.contains("messages")) {
      std::string user;
      for (const auto& m : j["messages"])
        if (m.value("role", "") == "user") user = m.value("content", "");
      return user;
    }
    return j.value("prompt", "");
  }
  return "";
}

// "text" with quotes, backslashes and control characters escaped, so a
// random model's answer (newlines, nothing at all) reads as one string.
std::string quoted(const std::string& text) {
  std::string out = "\"";
  for (const char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (c == '\n') {
      out += "\\n";
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char hex[8];
      std::snprintf(hex, sizeof hex, "\\x%02x", static_cast<unsigned>(static_cast<unsigned char>(c)));
      out += hex;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

// "97.5% (292/300)"
std::string exact_match_text(const train::EvalResult& r) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.1f%% (%lld/%lld)", 100.0 * r.accuracy(), static_cast<long long>(r.exact),
                static_cast<long long>(r.generated));
  return buf;
}

std::string fixed3(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3f", v);
  return buf;
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
    const auto start = std::chrono::steady_clock::now();
    const std::string data_dir = find_demo_data(opts->data);
    const fs::path work(opts->dir);
    const fs::path model_dir = work / "model";
    if (!fs::exists(model_dir / "model.safetensors")) {
      log::info("building the tiny base model and tokenizer in " + model_dir.string());
      train::write_demo_model(model_dir.string(), data_dir + "/train.alpaca.jsonl");
    } else {
      log::info("using the tiny base model already in " + model_dir.string());
    }
    Config cfg = train::demo_config(work.string(), data_dir, opts->steps);
    if (fs::exists(cfg.output.dir)) {
      log::info("removing the previous demo run in " + cfg.output.dir);
      fs::remove_all(cfg.output.dir);
    }
    const fs::path yaml = work / "run.yaml";
    std::ofstream(yaml) << "# written by `qlora demo`; rerun with: qlora train --config " << yaml.string() << "\n"
                        << to_yaml(cfg);
    log::info("config: " + yaml.string());
    cfg.source = yaml.string();  // what messages name (e.g. the command that resumes)

    // One CPU thread unless OMP_NUM_THREADS says otherwise: the tiny model
    // gains little from a second (on 2 idle cores, 2026-12-07: 18 s for the
    // whole demo against 24 s), and on a machine whose cores are busy with
    // other work the spinning OpenMP threads slow it many times over (a
    // 40-step demo: 55-92 s with 2 threads, 8-9 s with 1).
    if (std::getenv("OMP_NUM_THREADS") == nullptr) train::pin_cpu_threads(1);
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

    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::cout << "\nqlora demo finished: " << r.steps << (r.steps == 1 ? " step" : " steps") << " in "
              << train::format_duration(seconds);
    if (first.interrupted) std::cout << " (stopped after step " << stop_at << " and resumed from its checkpoint)";
    std::cout << "\n";
    if (r.has_eval) {
      const auto& before = r.start_eval.samples;
      const auto& after = r.final_eval.samples;
      if (!before.empty() && !after.empty() && before.front().index == after.front().index)
        std::cout << "  sample: " << quoted(prompt_of(cfg.data.eval_path, after.front().index))
                  << " -> before: " << quoted(before.front().answer) << " after: " << quoted(after.front().answer)
                  << " (expected " << quoted(after.front().reference) << ")\n";
      if (r.final_eval.generated > 0)
        std::cout << "  held-out exact match (prompts not in the training data): " << exact_match_text(r.start_eval)
                  << " -> " << exact_match_text(r.final_eval) << "\n";
      std::cout << "  loss: train " << fixed3(r.first_loss) << " -> " << fixed3(r.last_loss) << ", held-out "
                << fixed3(r.start_eval.loss) << " -> " << fixed3(r.final_eval.loss) << "\n";
    } else {
      std::cout << "  train loss " << fixed3(r.first_loss) << " -> " << fixed3(r.last_loss) << "\n";
    }
    std::cout << "  adapter (PEFT format): " << r.adapter_dir << "\n  metrics: " << r.metrics_path
              << "\n  use it with transformers + PEFT:\n"
              << "    model = AutoModelForCausalLM.from_pretrained(\"" << model_dir.string() << "\")\n"
              << "    model = PeftModel.from_pretrained(model, \"" << r.adapter_dir << "\")\n"
              << "  or merge it: qlora merge --base " << model_dir.string() << " --adapter " << r.adapter_dir
              << " --out " << (work / "merged").string() << "\n";
    return kExitOk;
  };
}

}  // namespace qlora::cli
