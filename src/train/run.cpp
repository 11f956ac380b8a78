#include "qlora/train/run.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "qlora/amp/precision.h"
#include "qlora/amp/scaler.h"
#include "qlora/ckpt/sha256.h"
#include "qlora/ckpt/store.h"
#include "qlora/common/errors.h"
#include "qlora/common/log.h"
#include "qlora/data/dataset.h"
#include "qlora/data/loader.h"
#include "qlora/data/tokenizer.h"
#include "qlora/io/model_dir.h"
#include "qlora/kernels.h"
#include "qlora/lora/adapter_io.h"
#include "qlora/lora/lora.h"
#include "qlora/model/llama.h"
#include "qlora/model/nf4_linear.h"
#include "qlora/optim/optimizer.h"
#include "qlora/quant/nf4_cuda.h"
#include "qlora/plan/plan.h"
#include "qlora/train/checkpoint.h"
#include "qlora/train/progress.h"
#include "qlora/train/schedule.h"
#include "qlora/train/state.h"
#include "qlora/train/trainer.h"

namespace qlora::train {
namespace {

using json = nlohmann::json;

struct DeviceChoice {
  c10::Device device = c10::Device(c10::kCPU);
  Precision precision = Precision::kFp32;
  std::string description;  // "CPU" / "cuda:0 NVIDIA H100 80GB HBM3 (sm_90)"
};

DeviceChoice choose_device(const Config& cfg, const std::string& want) {
  DeviceChoice d;
  int cc_major = 0;
  if (want != "auto" && want != "cpu" && want != "cuda")
    throw InputError("--device " + want + ": expected auto, cpu or cuda");
  if (want == "cuda" && !at::globalContext().hasCUDA())
    throw InputError("--device cuda: this build or machine has no CUDA (qlora env says why); use --device cpu");
  if (want != "cpu" && at::globalContext().hasCUDA()) {
    kernels::DeviceInfo info;
    char reason[256] = {0};
    if (kernels::query_devices(&info, 1, reason, sizeof reason) > 0) {
      d.device = c10::Device(c10::kCUDA, 0);
      cc_major = info.cc_major;
      d.description = "cuda:0 " + std::string(info.name) + " (sm_" + std::to_string(info.cc_major) +
                      std::to_string(info.cc_minor) + ")";
    }
  }
  if (d.device.is_cpu()) d.description = "CPU (" + std::to_string(at::get_num_threads()) + " threads)";
  d.precision = amp::resolve_precision(cfg.train.precision, d.device.is_cuda(), cc_major);
  return d;
}

at::ScalarType scalar_type(Precision p) {
  switch (p) {
    case Precision::kBf16: return at::kBFloat16;
    case Precision::kFp16: return at::kHalf;
    default: return at::kFloat;
  }
}

std::string with_commas(int64_t v) {
  std::string digits = std::to_string(v < 0 ? -v : v);
  for (int i = static_cast<int>(digits.size()) - 3; i > 0; i -= 3) digits.insert(static_cast<size_t>(i), ",");
  return v < 0 ? "-" + digits : digits;
}

json step_json(const StepEvent& e, int64_t memory_bytes) {
  return json{{"type", "train"},
              {"step", e.step},
              {"total", e.total},
              {"loss", e.stats.loss},
              {"lr", e.stats.lr},
              {"grad_norm", e.stats.grad_norm},
              {"target_tokens", e.stats.tokens},
              {"input_tokens", e.input_tokens},
              {"tokens_per_second", e.tokens_per_second},
              {"step_seconds", e.step_seconds},
              {"skipped", e.stats.skipped},
              {"memory_bytes", memory_bytes}};
}

json eval_json(int64_t step, const EvalResult& r) {
  return json{{"type", "eval"},          {"step", step},           {"loss", r.loss},
              {"tokens", r.tokens},      {"examples", r.examples}, {"exact_match", r.exact},
              {"generated", r.generated}, {"accuracy", r.accuracy()}, {"seconds", r.seconds}};
}

// The memory the plan expects, one line ("plan: 1.23 GiB: base weights 0.50, ...").
std::string plan_line(const Config& cfg, const LlamaConfig& shape, int64_t world) {
  const plan::Plan p = plan::make_plan(cfg, shape, nullptr, world);
  std::string line = "memory plan (GPU, as `qlora plan` counts it): " + plan::format_gib(p.total_bytes) + " GiB =";
  bool first = true;
  for (const auto& c : p.components) {
    if (c.bytes <= 0) continue;
    line += std::string(first ? " " : " + ") + c.label + " " + plan::format_gib(c.bytes);
    first = false;
  }
  return line;
}

// SIGINT / SIGTERM ask the run to stop at the next micro batch and save; a
// second signal gets the default action (quit now, without saving).
std::atomic<bool> g_stop_signal{false};

extern "C" void on_stop_signal(int sig) {
  g_stop_signal.store(true);
  std::signal(sig, SIG_DFL);
}

class SignalGuard {
 public:
  explicit SignalGuard(bool enabled) : enabled_(enabled) {
    if (!enabled_) return;
    g_stop_signal.store(false);
    old_int_ = std::signal(SIGINT, on_stop_signal);
    old_term_ = std::signal(SIGTERM, on_stop_signal);
  }
  ~SignalGuard() {
    if (!enabled_) return;
    std::signal(SIGINT, old_int_);
    std::signal(SIGTERM, old_term_);
  }
  SignalGuard(const SignalGuard&) = delete;
  SignalGuard& operator=(const SignalGuard&) = delete;
  bool fired() const { return enabled_ && g_stop_signal.load(); }

 private:
  bool enabled_;
  void (*old_int_)(int) = SIG_DFL;
  void (*old_term_)(int) = SIG_DFL;
};

}  // namespace

std::string effective_batch_line(const Config& cfg, int64_t world_size) {
  const int64_t total = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * world_size;
  return "effective batch = micro " + std::to_string(cfg.train.micro_batch_size) + " × accumulation " +
         std::to_string(cfg.train.gradient_accumulation_steps) + " × GPUs " + std::to_string(world_size) + " = " +
         std::to_string(total) + (cfg.data.packing ? " packed rows" : " sequences") + " per optimizer step";
}

std::string trainable_params_line(int64_t trainable, int64_t all) {
  char pct[32];
  std::snprintf(pct, sizeof pct, "%.4f", all > 0 ? 100.0 * static_cast<double>(trainable) / static_cast<double>(all) : 0.0);
  return "trainable params: " + with_commas(trainable) + " || all params: " + with_commas(all) + " || trainable%: " + pct;
}

RunResult run_training(const Config& cfg, const RunOptions& options) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = Clock::now();
  RunResult result;
  const int64_t world = 1;  // data parallelism arrives with the dist module
  if (cfg.model.path.empty())
    throw InputError(cfg.source + ": model.path is not set; training needs a Hugging Face model directory "
                     "(config.json, *.safetensors, tokenizer). `qlora demo` builds a tiny one to try.");
  if (cfg.data.path.empty())
    throw InputError(cfg.source + ": data.path is not set; point it at a JSONL file (see `qlora data --help`)");

  // 0. which checkpoint a resume continues from (or why a fresh start is
  // refused), decided before anything expensive loads
  const std::string resume_from = options.resume.empty() ? std::string() : resolve_resume(cfg.output.dir, options.resume);
  if (options.resume == "auto" && resume_from.empty())
    log::info("--resume auto: no checkpoint in " + cfg.output.dir + " yet; starting from step 0");
  if (options.resume.empty()) {
    if (const auto old = ckpt::list_checkpoints(cfg.output.dir); !old.empty())
      // Starting over here would leave the earlier run's later checkpoints for
      // a future --resume auto to pick up: refuse instead of mixing two runs.
      throw InputError(cfg.output.dir + " already holds checkpoints of an earlier run (newest: " + old.back() +
                       "); pass --resume auto to continue it, or set output.dir to a new directory");
  }

  // 1. device and precision (and the CUDA kernels, once per process; a no-op without CUDA)
  quant::register_cuda_kernels();
  const DeviceChoice dev = choose_device(cfg, options.device);
  const at::ScalarType dtype = scalar_type(dev.precision);
  const Precision compute =
      cfg.quantization.compute_dtype == Precision::kAuto ? dev.precision : cfg.quantization.compute_dtype;
  log::info("device " + dev.description + ", precision " + std::string(to_string(dev.precision)) +
            (amp::needs_loss_scaling(dev.precision) ? " with dynamic loss scaling" : ""));
  at::manual_seed(static_cast<uint64_t>(cfg.train.seed));

  // 2. base model, frozen, its projections quantized to NF4 as they load
  const io::ModelDir dir = io::ModelDir::open(cfg.model.path);
  const LlamaConfig shape = read_llama_config(dir.config_path());
  model::LoadOptions load;
  load.dtype = dtype;
  load.device = dev.device;
  load.make_linear = model::nf4_linear_factory(cfg.quantization.double_quant, scalar_type(compute));
  const model::WeightSource weights{dir.dir(), dir.tensor_names(), [&dir](const std::string& n) { return dir.tensor(n); }};
  model::LlamaModel model = model::LlamaModel::load(shape, weights, load);

  // 3. LoRA adapter (A from the seeded generator, as PEFT initializes it)
  lora::LoraAdapter adapter = lora::LoraAdapter::attach(model, lora::settings_from_config(cfg.lora));
  std::vector<optim::NamedParam> named;
  int64_t trainable = 0;
  for (auto& [name, p] : adapter.named_parameters()) {
    named.push_back({name, p});
    trainable += p.numel();
  }

  // 4. tokenizer and data
  const std::string tokenizer_path = dir.tokenizer_path();
  if (tokenizer_path.empty())
    throw InputError(cfg.model.path + " has no tokenizer.json or tokenizer.model; copy the base model's tokenizer files there");
  const std::unique_ptr<data::Tokenizer> tokenizer = data::load_tokenizer(cfg.model.path);
  const data::TrainEval sets = data::load_train_eval(cfg.data, static_cast<uint64_t>(cfg.train.seed), *tokenizer);
  log::info(sets.train.summary.describe());
  if (!sets.eval.examples.empty()) log::info("held out: " + sets.eval.summary.describe());
  data::LoaderOptions lo;
  lo.micro_batch_size = cfg.train.micro_batch_size;
  lo.packing = cfg.data.packing;
  lo.max_seq_length = cfg.data.max_seq_length;
  lo.seed = static_cast<uint64_t>(cfg.train.seed);
  lo.pad_id = data::choose_pad_id(tokenizer->pad_id(), tokenizer->eos_id());
  data::DataLoader loader(sets.train.examples, lo);
  const int64_t total = total_optimizer_steps(cfg.train, loader.steps_in_epoch(0));
  result.total_steps = total;

  // 5. optimizer, schedule, loss scaler, inf/nan policy
  std::unique_ptr<optim::Optimizer> optimizer = optim::make_optimizer(cfg.train, std::move(named));
  amp::LossScalerOptions so;
  so.enabled = amp::needs_loss_scaling(dev.precision);
  amp::LossScaler scaler(so);
  amp::BadStepPolicy bad_steps(cfg.train.max_bad_steps);
  SignalGuard signals(options.handle_signals);
  StepOptions step_options;
  step_options.max_grad_norm = cfg.train.max_grad_norm;
  step_options.gradient_checkpointing = cfg.train.gradient_checkpointing;
  if (cfg.train.gradient_checkpointing) step_options.layer_forward = checkpointed_layer_forward(model);
  Trainer* trainer_ptr = nullptr;  // the stop test needs the step in progress
  step_options.interrupted = [&](int64_t micro_done) {
    return signals.fired() || (options.stop_when && options.stop_when(trainer_ptr->step() + 1, micro_done));
  };
  Trainer trainer(model, adapter.parameters(), *optimizer, make_lr_scheduler(cfg.train, total), scaler, bad_steps,
                  step_options);
  trainer_ptr = &trainer;

  // 5b. resume: every piece of state from the checkpoint chosen in 0 (train/state.h)
  std::filesystem::create_directories(cfg.output.dir);
  const std::string metrics_path = MetricsLog::path_in(cfg.output.dir);
  const json fingerprint = run_fingerprint(cfg, ckpt::sha256_file(dir.config_path()), dev.precision, world);
  const TrainingObjects objects{trainer, *optimizer, scaler, bad_steps, loader, adapter, dev.device};
  if (!resume_from.empty()) {
    result.start_step = load_checkpoint(resume_from, objects, fingerprint, options.force, metrics_path);
    log::info("resumed from " + resume_from + " at step " + std::to_string(result.start_step) + " of " +
              std::to_string(total));
  }
  if (result.start_step == 0) std::ofstream(metrics_path, std::ios::trunc);  // a new run's history

  // 6. banner
  log::info(effective_batch_line(cfg, world));
  log::info(trainable_params_line(trainable, total_params(shape) + trainable));
  log::info(plan_line(cfg, shape, world));
  log::info(std::to_string(total) + " optimizer steps (" + std::to_string(loader.steps_in_epoch(0)) +
            " micro batches per epoch), " + std::string(to_string(cfg.train.lr_scheduler)) + " schedule, " +
            optimizer->kind() + (cfg.train.gradient_checkpointing ? ", activation checkpointing" : ""));

  // 7. the loop
  MetricsLog metrics(cfg.output.dir);
  result.metrics_path = metrics.path();
  Progress progress(total, cfg.output.logging_steps, options.progress_bar);
  const auto run_eval = [&](int64_t step) {
    adapter.set_training(false);
    const EvalResult r = evaluate(model, *tokenizer, sets.eval.examples, options.eval);
    adapter.set_training(true);
    metrics.write(eval_json(step, r).dump());
    progress.message("step " + std::to_string(step) + " " + format_eval_line(r));
    return r;
  };
  const auto save = [&]() {
    result.last_checkpoint = save_checkpoint(cfg, objects, fingerprint, metrics.path());
    progress.message("saved " + result.last_checkpoint);
  };
  const bool has_eval = !sets.eval.examples.empty();
  result.has_eval = has_eval;
  if (has_eval && options.evaluate_at_start && result.start_step == 0) result.start_eval = run_eval(0);

  LoopSummary sum;
  try {
    sum = train_loop(cfg, trainer, loader, [&](const StepEvent& e) {
      const int64_t mem = memory_in_use(dev.device);
      metrics.write(step_json(e, mem).dump());
      progress.update(e, mem);
      result.losses.push_back(e.stats.loss);
      if (has_eval && cfg.train.eval_steps > 0 && e.step % cfg.train.eval_steps == 0 && e.step < e.total)
        run_eval(e.step);
      if (cfg.output.save_steps > 0 && e.step % cfg.output.save_steps == 0 && e.step < e.total) save();
      return !(signals.fired() || (options.stop_when && options.stop_when(e.step + 1, 0)));
    });
  } catch (const amp::TrainingDiverged&) {
    progress.finish();
    log::error("saving the last state before stopping (its step was skipped, the weights are the last good ones)");
    save();
    throw;
  }
  progress.finish();
  result.steps = sum.steps;
  result.first_loss = sum.first_loss;
  result.last_loss = sum.last_loss;
  if (sum.stopped) {
    save();
    result.interrupted = true;
    result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    log::warn("stopped at step " + std::to_string(trainer.step()) + " of " + std::to_string(total) + "; saved " +
              result.last_checkpoint + ". Continue with: qlora train --config " + cfg.source + " --resume auto");
    return result;
  }
  save();
  if (has_eval) result.final_eval = run_eval(trainer.step());

  // 8. the adapter, in PEFT's format
  result.adapter_dir = (std::filesystem::path(cfg.output.dir) / "adapter").string();
  lora::save_adapter(adapter, result.adapter_dir, cfg.model.path);
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  char losses[64];
  std::snprintf(losses, sizeof losses, "%.4f -> %.4f", sum.first_loss, sum.last_loss);
  log::info("done: " + std::to_string(sum.steps) + " steps in " + format_duration(result.seconds) + ", loss " +
            losses + "; adapter in " +
            result.adapter_dir + ", metrics in " + result.metrics_path + "; peak memory " +
            plan::format_gib(static_cast<double>(peak_memory(dev.device))) + " GiB");
  return result;
}

}  // namespace qlora::train
