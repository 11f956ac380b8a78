// qlora plan: the effective batch and the GPU memory budget of a run, before it starts.
//
//   qlora plan --config configs/llama-3.1-8b-t4.yaml [--gpu t4|h100|24GiB|this|auto|none] [--gpus N] [--json]
//   qlora plan --config run.yaml --measure [--steps 3] [--seq N] [--memory-cap 15GiB]   (on a GPU)
//   qlora plan --config run.yaml --find-micro-batch [--memory-cap 15GiB]               (on a GPU)
//   qlora plan --config run.yaml --find-max-seq [--seq LONGEST] [--memory-cap 22GiB]   (on a GPU)
//
// The GPU comes from --gpu, else hardware.gpu in the config; "this" (or
// "auto") is the GPU of this machine, read from the CUDA driver (none
// visible: no fit verdict, said so). The report lists this machine's GPU
// beside the presets either way. The number of GPUs
// comes from --gpus, else WORLD_SIZE (torchrun) or SLURM_NTASKS, else 1.
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>

#include "cli/commands.h"
#include "qlora/common/errors.h"
#include "qlora/kernels.h"
#include "qlora/model/decoder_config.h"
#include "qlora/plan/finder.h"
#include "qlora/plan/plan.h"
#include "qlora/train/measure.h"

namespace qlora::cli {
namespace {

struct PlanOptions {
  ConfigOptions config;
  std::string gpu;      // empty: hardware.gpu
  int64_t gpus = 0;     // 0: from the environment
  bool json = false;
  bool measure = false;
  bool find_micro_batch = false;
  bool find_max_seq = false;
  std::string memory_cap;
  train::MeasureOptions measure_options;
};

// A positive integer from an environment variable the launchers set.
std::optional<int64_t> world_size_from_env(std::string* source) {
  for (const char* name : {"WORLD_SIZE", "SLURM_NTASKS"}) {
    const char* v = std::getenv(name);
    if (!v || !*v) continue;
    char* end = nullptr;
    const long long n = std::strtoll(v, &end, 10);
    if (*end != '\0' || n < 1)
      throw InputError(std::string("environment variable ") + name + "=\"" + v +
                       "\" is not a positive integer; unset it or pass --gpus N");
    *source = name;
    return n;
  }
  return std::nullopt;
}

// Asks the CUDA driver for GPU 0 (no torch: kernels::query_devices). Cheap
// without a driver; on a GPU machine it costs the driver's initialisation.
plan::ThisMachine query_this_machine() {
  plan::ThisMachine here;
  kernels::DeviceInfo dev;
  char reason[256] = {0};
  here.device_count = kernels::query_devices(&dev, 1, reason, sizeof reason);
  if (here.device_count == 0) {
    here.why_none = reason[0] ? reason : "no CUDA device visible";
    return here;
  }
  here.gpu = plan::gpu_from_device(dev.name, double(dev.total_bytes), dev.cc_major, dev.cc_minor);
  return here;
}

// Resolves the GPU argument; nullopt when there is none to plan against.
// "auto" / "this" ask the driver; so does a bad value, for the error message
// to list this machine's GPU among the accepted ones.
std::optional<plan::GpuSpec> gpu_for(const std::string& arg, const plan::ThisMachine& here,
                                     std::vector<std::string>* notes) {
  if (arg == "none") return std::nullopt;
  if (!plan::names_this_machine(arg)) return plan::resolve_gpu(arg, &here);
  if (!here.gpu) {
    notes->push_back("--gpu " + arg + ": this machine has no usable GPU (" + here.why_none +
                     "): no fit verdict; pass --gpu " + plan::accepted_gpu_values(nullptr) + " to plan for one");
    return std::nullopt;
  }
  if (here.device_count > 1)
    notes->push_back("planning for GPU 0 (" + here.gpu->name + ") of " + std::to_string(here.device_count));
  return here.gpu;
}

// Non-blank lines of the training file: the number of examples before
// filtering (bad lines, over-long examples). 0 when the file is not there.
int64_t count_examples(const std::string& path, std::vector<std::string>* notes) {
  if (path.empty()) return 0;
  std::ifstream in(path);
  if (!in) {
    notes->push_back("data.path " + path + " is not readable here: no per-epoch estimate");
    return 0;
  }
  int64_t n = 0;
  std::string line;
  while (std::getline(in, line))
    if (line.find_first_not_of(" \t\r") != std::string::npos) ++n;
  return n;
}

}  // namespace

Runner add_plan_command(CLI::App& root) {
  auto opts = std::make_shared<PlanOptions>();
  CLI::App* cmd = root.add_subcommand(
      "plan", "effective batch and GPU memory per component, whether it fits, and what to change if not");
  add_config_options(*cmd, opts->config, /*required=*/false);
  cmd->add_option("--gpu", opts->gpu,
                  "GPU to plan for: t4, l4, a10, a100-40, a100-80, h100, h200, a size like 24GiB, this (or auto: "
                  "the GPU of this machine, listed below) or none; default: hardware.gpu of the config");
  // Asked only when help is printed: the driver is not initialised for nothing.
  cmd->footer([] {
    const plan::ThisMachine here = query_this_machine();
    return "--gpu accepts: " + plan::accepted_gpu_values(&here);
  });
  cmd->add_option("--gpus", opts->gpus, "data-parallel GPUs (default: WORLD_SIZE / SLURM_NTASKS, else 1)")
      ->check(CLI::PositiveNumber);
  cmd->add_flag("--json", opts->json, "print the plan as JSON");
  cmd->add_flag("--measure", opts->measure,
                "GPU: run a few real optimizer steps at the config's settings and the longest sequence of the data, "
                "and print the measured memory next to the plan's");
  cmd->add_flag("--find-micro-batch", opts->find_micro_batch,
                "GPU: the largest micro batch that fits (real forward + backward passes, from the plan's guess) and "
                "the accumulation that keeps the effective batch");
  cmd->add_flag("--find-max-seq", opts->find_max_seq,
                "GPU: the longest sequence (a multiple of 1,024 tokens) that trains at the configured micro batch "
                "(real forward + backward passes, from the plan's guess; checkpoints offloaded where "
                "train.offload_checkpoints allows), with its tokens/s");
  cmd->add_option("--memory-cap", opts->memory_cap,
                  "with --measure / --find-micro-batch / --find-max-seq: cap the allocator (e.g. 15GiB)");
  cmd->add_option("--steps", opts->measure_options.steps, "with --measure: optimizer steps to run")
      ->check(CLI::Range(2, 1000))
      ->capture_default_str();
  cmd->add_option("--seq", opts->measure_options.seq, "with --measure / --find-micro-batch: sequence length (default: "
                  "the longest the data makes); with --find-max-seq: the longest tried (default: the model's positions)")
      ->check(CLI::PositiveNumber);
  return [opts]() {
    const Config cfg = load_config_options(opts->config);
    const DecoderConfig model = resolve_model_shape(cfg);

    std::vector<std::string> notes;
    int64_t world = opts->gpus;
    if (world == 0) {
      std::string source;
      world = world_size_from_env(&source).value_or(1);
      if (!source.empty()) notes.push_back("GPUs: " + std::to_string(world) + " from " + source);
    }
    const std::string gpu_arg = opts->gpu.empty() ? cfg.hardware.gpu : opts->gpu;
    const plan::ThisMachine here = query_this_machine();
    const std::optional<plan::GpuSpec> gpu = gpu_for(gpu_arg, here, &notes);

    if (!opts->memory_cap.empty()) opts->measure_options.memory_cap_bytes = plan::resolve_gpu(opts->memory_cap).memory_bytes;
    if (opts->find_max_seq) {
      const plan::SeqFinderResult f = train::find_max_seq_for(cfg, opts->measure_options, world);
      for (const auto& t : f.trials)
        std::cerr << "  " << t.micro << " tokens: " << (t.result.fits ? "fits" : "does not fit") << ", peak allocated "
                  << plan::format_gib(t.result.peak_allocated_bytes) << " GiB"
                  << (t.result.error.empty() ? "" : " (" + t.result.error + ")") << "\n";
      std::cout << f.message << "\n";
      return f.found ? kExitOk : kExitBadInput;
    }
    if (opts->find_micro_batch) {
      const plan::FinderResult f = train::find_micro_batch_for(cfg, opts->measure_options, world);
      for (const auto& t : f.trials)
        std::cerr << "  micro " << t.micro << ": " << (t.result.fits ? "fits" : "does not fit") << ", peak allocated "
                  << plan::format_gib(t.result.peak_allocated_bytes) << " GiB, reserved "
                  << plan::format_gib(t.result.peak_reserved_bytes) << " GiB"
                  << (t.result.error.empty() ? "" : " (" + t.result.error + ")") << "\n";
      std::cout << f.message << "\n";
      return f.found ? kExitOk : kExitBadInput;
    }
    if (opts->measure) {
      const train::Measurement m = train::measure_plan(cfg, opts->measure_options);
      // With --json the table still goes to stderr, for the person watching.
      (opts->json ? std::cerr : std::cout) << train::format_measurement(m);
      if (opts->json) std::cout << train::measurement_json(m).dump() << "\n";
      return m.out_of_memory ? kExitBadInput : kExitOk;
    }
    plan::Plan p = plan::make_plan(cfg, model, gpu ? &*gpu : nullptr, world);
    p.this_machine = plan::this_machine_entry(here);
    plan::set_dataset_size(p, cfg, count_examples(cfg.data.path, &notes));
    p.notes.insert(p.notes.begin(), notes.begin(), notes.end());
    std::cout << (opts->json ? plan::render_json(p) + "\n" : plan::render_text(p));
    return kExitOk;
  };
}

}  // namespace qlora::cli
