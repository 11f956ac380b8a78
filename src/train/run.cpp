#include "qlora/train/run.h"

#include <ATen/ATen.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "qlora/amp/precision.h"
#include "qlora/amp/scaler.h"
#include "qlora/ckpt/lock.h"
#include "qlora/ckpt/sha256.h"
#include "qlora/ckpt/store.h"
#include "qlora/common/errors.h"
#include "qlora/common/text.h"
#include "qlora/common/log.h"
#include "qlora/data/dataset.h"
#include "qlora/data/loader.h"
#include "qlora/data/tokenizer.h"
#include "qlora/dist/group.h"
#include "qlora/dist/launch.h"
#include "qlora/lora/adapter_io.h"
#include "qlora/lora/lora.h"
#include "qlora/model/decoder.h"
#include "qlora/optim/optimizer.h"
#include "qlora/quant/nf4_cuda.h"
#include "qlora/plan/plan.h"
#include "qlora/train/checkpoint.h"
#include "qlora/train/layer_choice.h"
#include "qlora/train/measure.h"
#include "qlora/train/memory.h"
#include "qlora/train/plot.h"
#include "qlora/train/progress.h"
#include "qlora/train/setup.h"
#include "qlora/train/schedule.h"
#include "qlora/train/serving_files.h"
#include "qlora/train/state.h"
#include "qlora/train/tensorboard.h"
#include "qlora/train/threads.h"
#include "qlora/train/trainer.h"
#include "qlora/train/vocab_check.h"

namespace qlora::train {
namespace {

using json = nlohmann::json;

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

// Held-out evaluation split over the ranks (rank r takes examples r, r + W,
// ...; exact match still covers the first generate_examples of the whole
// set) and summed, so every rank returns the whole set's numbers.
EvalResult evaluate_sharded(const model::DecoderModel& model, const data::Tokenizer& tokenizer,
                            const std::vector<data::TokenizedExample>& examples, EvalOptions options,
                            const dist::Group& group) {
  if (!group.distributed()) return evaluate(model, tokenizer, examples, options);
  const int64_t world = group.world_size();
  std::vector<data::TokenizedExample> mine;
  int64_t generate = 0;
  for (size_t i = static_cast<size_t>(group.rank()); i < examples.size(); i += static_cast<size_t>(world)) {
    mine.push_back(examples[i]);
    if (static_cast<int64_t>(i) < options.generate_examples) ++generate;
  }
  options.generate_examples = generate;
  EvalResult r = evaluate(model, tokenizer, mine, options);
  for (EvalSample& s : r.samples) s.index = group.rank() + s.index * world;  // index in `mine` -> in examples
  const at::Tensor t = at::tensor(std::vector<double>{r.loss * static_cast<double>(r.tokens), static_cast<double>(r.tokens),
                                                      static_cast<double>(r.examples), static_cast<double>(r.generated),
                                                      static_cast<double>(r.exact)});  // [5] fp64
  group.all_reduce_sum({t});
  const auto v = [&](int64_t i) { return t[i].item<double>(); };
  r.tokens = static_cast<int64_t>(v(1));
  r.loss = r.tokens > 0 ? v(0) / v(1) : 0.0;
  r.examples = static_cast<int64_t>(v(2));
  r.generated = static_cast<int64_t>(v(3));
  r.exact = static_cast<int64_t>(v(4));
  return r;
}

// The memory the plan expects, one line ("memory plan (GPU, ...): 1.23 GiB =
// base weights, NF4 0.50 + ..."), in the run's resolved precision. On the CPU
// the GPU's own parts (CUDA context, cuBLAS workspaces, the allocator's
// fragmentation reserve) are left out: what remains is the tensors in host RAM.
std::string plan_line(const Config& cfg, const DecoderConfig& shape, int64_t world, const DeviceChoice& dev) {
  Config resolved = cfg;
  resolved.train.precision = dev.precision;
  const plan::Plan p = plan::make_plan(resolved, shape, nullptr, world);
  const bool cpu = !dev.device.is_cuda();
  double total = 0;
  std::string parts;
  for (const auto& c : p.components) {
    if (c.bytes <= 0) continue;
    if (cpu && (c.key == "cuda_context" || c.key == "cublas_workspace" || c.key == "fragmentation")) continue;
    total += c.bytes;
    parts += std::string(parts.empty() ? " " : " + ") + c.label + " " + plan::format_gib(c.bytes);
  }
  return std::string(cpu ? "memory plan (host RAM for tensors, CPU run; LibTorch's own memory comes on top): "
                         : "memory plan (GPU, as `qlora plan` counts it): ") +
         plan::format_gib(total) + " GiB =" + parts;
}

// SIGINT / SIGTERM ask the run to stop at the next micro batch and save; a
// second signal quits at once, without saving. Both say so on stderr (write(2)
// is async-signal-safe; the texts are made before the handlers go in).
std::atomic<bool> g_stop_signal{false};
char g_first_text[2][256];
char g_second_text[2][512];

int signal_slot(int sig) { return sig == SIGINT ? 0 : 1; }

void write_stderr(const char* text) {
  for (size_t n = std::strlen(text); n > 0;) {
    const ssize_t w = ::write(STDERR_FILENO, text, n);
    if (w <= 0) return;
    text += w;
    n -= static_cast<size_t>(w);
  }
}

extern "C" void on_second_signal(int sig) {
  write_stderr(g_second_text[signal_slot(sig)]);
  std::signal(sig, SIG_DFL);
  std::raise(sig);  // the shell sees the signal: exit status 128 + sig
}

extern "C" void on_stop_signal(int sig) {
  g_stop_signal.store(true);
  write_stderr(g_first_text[signal_slot(sig)]);
  std::signal(sig, on_second_signal);
}

class SignalGuard {
 public:
  SignalGuard(bool enabled, const std::string& output_dir) : enabled_(enabled) {
    if (!enabled_) return;
    g_stop_signal.store(false);
    for (int slot = 0; slot < 2; ++slot) {
      const char* what = slot == 0 ? "Ctrl-C" : "SIGTERM";
      std::snprintf(g_first_text[slot], sizeof g_first_text[slot],
                    "\n%s: stopping at the end of this micro batch, then saving a checkpoint (%s again to quit now "
                    "without saving)\n",
                    what, what);
      std::snprintf(g_second_text[slot], sizeof g_second_text[slot],
                    "\n%s again: quitting now without saving; the checkpoints already in %s are kept\n", what,
                    output_dir.c_str());
    }
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

// "the run in out/ is finished: checkpoint-40 holds step 40 of 40; ..."
std::string finished_line(const Config& cfg, const std::string& checkpoint, int64_t step, const std::string& adapter) {
  return "the run in " + cfg.output.dir + " is finished: " + checkpoint + " holds step " + std::to_string(step) +
         " of " + std::to_string(step) + ", the adapter is in " + adapter +
         ". Nothing to do (raise train.max_steps or train.epochs to train further)";
}

// The command that continues this run: the caller's (with its --set
// overrides), else one built from the config file.
std::string continue_command(const Config& cfg, const RunOptions& options) {
  return options.continue_command.empty() ? "qlora train --config " + cfg.source + " --resume auto"
                                          : options.continue_command;
}

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

// What the banner adds to "activation checkpointing" when a layer keeps more than its input
// (train.recompute: selective, train.no_recompute_layers); `fused`: the run trains with the fused
// layer (trains_with_fused_layer), the only one that does.
std::string recompute_banner(const Config& cfg, bool fused, int64_t layers) {
  const bool selective = cfg.train.recompute == Recompute::kSelective;
  const int64_t whole = std::clamp<int64_t>(cfg.train.no_recompute_layers, 0, layers);
  if (!cfg.train.gradient_checkpointing || (!selective && whole == 0)) return "";
  if (!fused)
    return " (train.recompute: selective and train.no_recompute_layers take effect on a GPU in bf16/fp16 only; "
           "full recompute here)";
  const int64_t kept = selective ? plan::kept_gate_up_layers(cfg.train.selective_layers, layers) : 0;
  return " (" + plan::recompute_text("selective", layers, kept, whole) + ")";
}

// --micro-batch auto (RunOptions): the checkpoint's choice on a resume, else
// the finder's on the GPU, agreed by every rank (the smallest), written into cfg.
void choose_micro_batch(Config& cfg, const RunOptions& options, const std::string& resume_from, const DeviceChoice& dev,
                        const BaseModel& base, const lora::LoraAdapter& adapter,
                        const std::vector<data::TokenizedExample>& train_examples, const dist::Group& group) {
  if (!resume_from.empty()) {
    const json run = json::parse(std::ifstream(std::filesystem::path(resume_from) / "run.json"));
    const json other = run.at("fingerprint").at("other");
    cfg.train.micro_batch_size = other.at("train.micro_batch_size").get<int64_t>();
    cfg.train.gradient_accumulation_steps = other.at("train.gradient_accumulation_steps").get<int64_t>();
    log::info("--micro-batch auto: keeping the checkpoint's micro " + std::to_string(cfg.train.micro_batch_size) +
              " × accumulation " + std::to_string(cfg.train.gradient_accumulation_steps));
    return;
  }
  if (!dev.device.is_cuda()) {
    log::warn("--micro-batch auto needs a GPU to measure on; keeping micro " +
              std::to_string(cfg.train.micro_batch_size) + " on " + dev.description);
    return;
  }
  std::string seq_source;
  const int64_t seq = longest_sequence(cfg, train_examples, &seq_source);
  StepOptions probe;
  probe.layer_forward = training_layer_forward(base.model, cfg.train);
  const plan::FinderResult f =
      find_micro_batch_on_device(cfg, base.shape, base.model, adapter.parameters(), probe,
                                 gpu_spec_of(dev, options.memory_cap_bytes), seq, group.world_size());
  if (!f.found) throw InputError("--micro-batch auto: " + f.message);
  int64_t micro = f.micro;
  if (group.distributed()) {  // every rank must run the same micro batch: the smallest choice
    for (const auto& t : group.all_gather(at::full({1}, f.micro, at::kLong))) micro = std::min(micro, t.item<int64_t>());
  }
  const int64_t per_gpu = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps;
  log::info(f.message + " [at seq " + std::to_string(seq) + ": " + seq_source + "]");
  cfg.train.micro_batch_size = micro;
  cfg.train.gradient_accumulation_steps = per_gpu / micro;
}

RunResult run_training(const Config& cfg_in, const RunOptions& options) {
  Config cfg = cfg_in;  // --micro-batch auto may change micro × accumulation (never their product)
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = Clock::now();
  RunResult result;
  const dist::Launch launch = dist::launch_from_env();
  const int64_t world = launch.world_size;
  const bool main_rank = launch.is_main();
  // Ranks other than 0 say only what goes wrong; rank 0 speaks for the run.
  if (!main_rank) log::set_level(log::Level::kError);
  if (cfg.model.path.empty())
    throw InputError(cfg.source + ": model.path is not set; training needs a Hugging Face model directory "
                     "(config.json, *.safetensors, tokenizer). `qlora demo` builds a tiny one to try.");
  if (cfg.data.path.empty())
    throw InputError(cfg.source + ": data.path is not set; point it at a JSONL file (see `qlora data --help`)");

  // 0. the output directory, held for this run alone (Note [output directory
  // lock]); which checkpoint a resume continues from (or why a fresh start is
  // refused), decided before anything expensive loads
  std::optional<ckpt::OutputDirLock> lock;
  if (main_rank) {
    std::string stale;
    lock.emplace(cfg.output.dir, &stale);
    if (!stale.empty()) log::warn(stale);
  }
  const std::string resume_from = options.resume.empty() ? std::string() : resolve_resume(cfg.output.dir, options.resume);
  if (options.resume == "auto" && resume_from.empty())
    log::info("--resume auto: no checkpoint in " + cfg.output.dir + " yet; starting from step 0");
  if (options.resume.empty()) {
    if (const auto old = ckpt::list_checkpoints(cfg.output.dir); !old.empty())
      // Starting over here would leave the earlier run's later checkpoints for
      // a future --resume auto to pick up: refuse instead of mixing two runs.
      throw InputError(cfg.output.dir + " already holds checkpoints of an earlier run (newest: " + old.back() +
                       "); pass --resume auto to continue it, --resume none to start over (the earlier run is "
                       "moved to " + cfg.output.dir + "/earlier-run-<time>/), or set output.dir to a new directory");
  }
  if (options.resume == "none" && main_rank) {
    if (const std::string aside = set_aside_earlier_run(cfg.output.dir); !aside.empty())
      log::info("--resume none: starting over at step 0; the earlier run's checkpoints, metrics and adapter are "
                "now in " + aside);
  }
  result.adapter_dir = (std::filesystem::path(cfg.output.dir) / "adapter").string();
  if (!resume_from.empty()) {
    const int64_t done = finished_step(resume_from, cfg);
    if (done >= 0 && std::filesystem::exists(std::filesystem::path(result.adapter_dir) / "adapter_model.safetensors")) {
      log::info(finished_line(cfg, resume_from, done, result.adapter_dir));
      result.start_step = done;
      result.total_steps = done;
      result.last_checkpoint = resume_from;
      result.finished_before = true;
      result.metrics_path = MetricsLog::path_in(cfg.output.dir);
      return result;
    }
  }

  // 1. device and precision (and the CUDA kernels, once per process; a no-op without CUDA)
  quant::register_cuda_kernels();
  const DeviceChoice dev = choose_device(cfg, options.device, launch.local_rank);
  // The count stays; only OpenMP's and oneMKL's freedom to shrink it under load
  // goes (Note [fixed CPU threads]). The checkpoint records it.
  const int cpu_threads = dev.device.is_cpu() ? pin_cpu_threads() : 0;
  log::info("device " + dev.description + ", precision " + std::string(to_string(dev.precision)) +
            (amp::needs_loss_scaling(dev.precision) ? " with dynamic loss scaling" : ""));
  at::manual_seed(static_cast<uint64_t>(cfg.train.seed));
  if (launch.distributed())
    log::info("data parallel: " + launch.describe() + "; connecting (" +
              (dev.device.is_cuda() && cfg.distributed.backend != DistBackend::kGloo ? "NCCL" : "Gloo") + ")");
  const dist::Group group = dist::Group::connect(launch, dev.device, cfg.distributed.backend);
  if (options.memory_cap_bytes > 0 && dev.device.is_cuda()) {
    set_memory_fraction(dev.device, std::min(1.0, options.memory_cap_bytes / dev.gpu_total_bytes));
    log::info("memory cap: the CUDA allocator may take " + plan::format_gib(options.memory_cap_bytes) + " GiB of " +
              plan::format_gib(dev.gpu_total_bytes));
  }

  // 2. the tokenizer, checked against config.json's vocabulary before any weight loads (a
  // mismatch found after quantizing an 8B model would cost minutes); then the base model,
  // frozen, its projections quantized to NF4 as they load
  // A model.path that is no directory (a GGUF file, say) gets the model loader's message.
  std::unique_ptr<data::Tokenizer> tokenizer;
  if (std::filesystem::is_directory(cfg.model.path)) tokenizer = load_checked_tokenizer(cfg.model.path);
  BaseModel base = load_base_model(cfg, dev, options.random_weights);
  if (!tokenizer) tokenizer = load_checked_tokenizer(cfg.model.path);
  model::DecoderModel& model = base.model;
  const DecoderConfig& shape = base.shape;

  // 3. LoRA adapter (A from the seeded generator, as PEFT initializes it)
  // Every named module must exist in this family (Phi-3 has qkv_proj where others have q_proj):
  // PEFT would silently skip the rest, as attach's matching does.
  plan::resolve_lora_targets(cfg.lora.target_modules, model.config());
  lora::LoraAdapter adapter = lora::LoraAdapter::attach(model, lora::settings_from_config(cfg.lora));
  if (!cfg.lora.init_from.empty()) {  // continue an adapter (a resume then loads its checkpoint over it)
    lora::init_adapter_from(adapter, cfg.lora.init_from);
    log::info("LoRA weights from " + cfg.lora.init_from + " (lora.init_from); the optimizer starts fresh");
  }
  // Every rank drew the same A (same seed, above); from here each rank's
  // dropout masks come from its own stream.
  if (launch.rank > 0) at::manual_seed(static_cast<uint64_t>(cfg.train.seed) + static_cast<uint64_t>(launch.rank));
  std::vector<optim::NamedParam> named;
  int64_t trainable = 0;
  for (auto& [name, p] : adapter.named_parameters()) {
    named.push_back({name, p});
    trainable += p.numel();
  }

  // 4. data
  const data::TrainEval sets = data::load_train_eval(cfg.data, static_cast<uint64_t>(cfg.train.seed), *tokenizer);
  log::info(sets.train.summary.describe());
  if (!sets.eval.examples.empty()) log::info("held out: " + sets.eval.summary.describe());
  check_sequence_length(cfg, shape, sets.train.summary.longest, cfg.data.path);
  check_sequence_length(cfg, shape, sets.eval.summary.longest, cfg.data.eval_path.empty() ? cfg.data.path : cfg.data.eval_path);
  if (options.micro_batch_auto) choose_micro_batch(cfg, options, resume_from, dev, base, adapter, sets.train.examples, group);
  for (const std::string& line : {resolve_auto_recompute(cfg, shape, dev, options.memory_cap_bytes, world),
                                  resolve_offload(cfg, shape, dev, options.memory_cap_bytes, world,
                                                  launch.local_world_size, host_available_bytes())})
    if (!line.empty()) log::info(line);
  result.recompute = cfg.train.recompute;
  result.selective_layers = cfg.train.selective_layers;
  result.no_recompute_layers = cfg.train.no_recompute_layers;
  result.micro_batch_size = cfg.train.micro_batch_size;
  result.gradient_accumulation_steps = cfg.train.gradient_accumulation_steps;
  data::LoaderOptions lo;
  lo.micro_batch_size = cfg.train.micro_batch_size;
  lo.packing = cfg.data.packing;
  lo.max_seq_length = cfg.data.max_seq_length;
  lo.seed = static_cast<uint64_t>(cfg.train.seed);
  lo.pad_id = data::choose_pad_id(tokenizer->pad_id(), tokenizer->eos_id());
  lo.rank = launch.rank;
  lo.world_size = world;
  data::DataLoader loader(sets.train.examples, lo);
  const int64_t total = total_optimizer_steps(cfg.train, loader.steps_in_epoch(0));
  result.total_steps = total;

  // 5. optimizer, schedule, loss scaler, inf/nan policy
  std::unique_ptr<optim::Optimizer> optimizer = optim::make_optimizer(cfg.train, std::move(named));
  amp::LossScalerOptions so;
  so.enabled = amp::needs_loss_scaling(dev.precision);
  amp::LossScaler scaler(so);
  amp::BadStepPolicy bad_steps(cfg.train.max_bad_steps);
  SignalGuard signals(options.handle_signals, cfg.output.dir);
  StepOptions step_options;
  step_options.max_grad_norm = cfg.train.max_grad_norm;
  step_options.gradient_checkpointing = cfg.train.gradient_checkpointing;
  step_options.group = &group;
  step_options.layer_forward = training_layer_forward(model, cfg.train);
  if (options.simulate_oom_above_rows >= 0) {
    LayerForwardFn inner = step_options.layer_forward;
    if (!inner) inner = [&model](int64_t l, const at::Tensor& h, const auto& cs, const auto& a) {
      return model.layer_forward(l, h, cs, a);
    };
    step_options.layer_forward = [inner, rows = options.simulate_oom_above_rows](
                                     int64_t l, const at::Tensor& h, const std::pair<at::Tensor, at::Tensor>& cs,
                                     const model::AttentionInputs& a) {
      if (h.size(0) > rows) C10_THROW_ERROR(OutOfMemoryError, "CUDA out of memory (simulated: RunOptions)");
      return inner(l, h, cs, a);
    };
  }
  Trainer* trainer_ptr = nullptr;  // the stop test needs the step in progress
  // Several ranks must stop at the same step: they agree at step boundaries
  // (on_step below), never mid-window.
  if (!group.distributed())
    step_options.interrupted = [&](int64_t micro_done) {
      return signals.fired() || (options.stop_when && options.stop_when(trainer_ptr->step() + 1, micro_done));
    };
  Trainer trainer(model, adapter.parameters(), *optimizer, make_lr_scheduler(cfg.train, total), scaler, bad_steps,
                  step_options);
  trainer_ptr = &trainer;

  // 5b. resume: every piece of state from the checkpoint chosen in 0 (train/state.h)
  std::filesystem::create_directories(cfg.output.dir);
  const std::string metrics_path = main_rank ? MetricsLog::path_in(cfg.output.dir) : std::string();
  const json fingerprint =
      run_fingerprint(cfg, ckpt::sha256_file(base.config_path), dev.precision, world, cpu_threads);
  const TrainingObjects objects{trainer, *optimizer, scaler, bad_steps, loader, adapter, dev.device, &group};
  if (!resume_from.empty()) {
    result.start_step = load_checkpoint(resume_from, objects, fingerprint, options.force, metrics_path);
    log::info("resumed from " + resume_from + " at step " + std::to_string(result.start_step) + " of " +
              std::to_string(total));
  }
  if (result.start_step == 0 && main_rank) std::ofstream(metrics_path, std::ios::trunc);  // a new run's history

  // 6. banner
  log::info(effective_batch_line(cfg, world));
  log::info(trainable_params_line(trainable, total_params(shape) + trainable));
  log::info(plan_line(cfg, shape, world, dev));
  log::info(std::to_string(total) + " optimizer steps (" + std::to_string(loader.steps_in_epoch(0)) +
            " micro batches per epoch), " + std::string(to_string(cfg.train.lr_scheduler)) + " schedule, " +
            optimizer->kind() + (cfg.train.gradient_checkpointing ? ", activation checkpointing" : "") +
            recompute_banner(cfg, trains_with_fused_layer(model), shape.num_hidden_layers));

  // 7. the loop (rank 0 alone writes metrics.jsonl and draws progress)
  std::unique_ptr<MetricsLog> metrics = main_rank ? std::make_unique<MetricsLog>(cfg.output.dir) : nullptr;
  // TensorBoard's events from metrics.jsonl as it stands (a resume cut it back to its checkpoint).
  std::unique_ptr<TensorboardLog> events = main_rank && cfg.output.report_to == "tensorboard"
                                               ? std::make_unique<TensorboardLog>(cfg.output.dir, metrics_path)
                                               : nullptr;
  const auto write_metrics = [&](const json& j) {
    if (metrics) metrics->write(j.dump());
    if (events) events->write(j);
  };
  result.metrics_path = MetricsLog::path_in(cfg.output.dir);
  Progress progress(total, cfg.output.logging_steps, options.progress_bar && main_rank);
  // Held-out answers end where the chat template ends a reply, too (Gemma's <end_of_turn>, ...).
  EvalOptions eval_options = options.eval;
  if (eval_options.stop_ids.empty()) {
    eval_options.stop_ids = stop_token_ids(*tokenizer);
    if (const auto eot = tokenizer->token_id(sets.train.summary.end_of_turn);
        eot && !sets.train.summary.end_of_turn.empty() &&
        std::find(eval_options.stop_ids.begin(), eval_options.stop_ids.end(), *eot) == eval_options.stop_ids.end())
      eval_options.stop_ids.push_back(*eot);
  }
  double last_eval_seconds = 0.0;  // the ETA adds the evaluations still to come at this cost
  const auto run_eval = [&](int64_t step) {
    adapter.set_training(false);
    const EvalResult r = evaluate_sharded(model, *tokenizer, sets.eval.examples, eval_options, group);
    last_eval_seconds = r.seconds;
    adapter.set_training(true);
    write_metrics(eval_metrics_json(step, r));
    progress.message("step " + std::to_string(step) + " " + format_eval_line(r));
    if (const std::string line = format_eval_sample(r); !line.empty()) progress.message(line);
    return r;
  };
  // The step whose checkpoint is on disk and verified: the one resumed from,
  // then each save. A stop or the end right after a save saves nothing again.
  int64_t saved_step = resume_from.empty() ? -1 : result.start_step;
  if (!resume_from.empty()) result.last_checkpoint = resume_from;
  const auto save = [&]() {
    if (trainer.step() == saved_step) return;
    result.last_checkpoint = save_checkpoint(cfg, objects, fingerprint, metrics_path);
    saved_step = trainer.step();
    ++result.checkpoints_written;
    progress.message("saved " + result.last_checkpoint);
  };
  const bool has_eval = !sets.eval.examples.empty();
  result.has_eval = has_eval;
  if (result.start_step >= total) {
    // Finished before, but its adapter is missing (a kill between the last
    // save and the adapter's write): write it from the checkpoint, nothing else.
    if (main_rank) {
      lora::save_adapter(adapter, result.adapter_dir, cfg.model.path);
      write_serving_files(result.adapter_dir, sets.train.summary, *tokenizer);
    }
    group.barrier();
    result.finished_before = true;
    log::info(finished_line(cfg, resume_from, result.start_step, result.adapter_dir) + " (the adapter was missing: written now)");
    return result;
  }
  if (has_eval && options.evaluate_at_start && result.start_step == 0) result.start_eval = run_eval(0);

  LoopSummary sum;
  try {
    sum = train_loop(cfg, trainer, loader, [&](const StepEvent& e) {
      const int64_t mem = memory_in_use(dev.device);
      write_metrics(step_json(e, mem));
      StepEvent shown = e;
      if (has_eval)
        shown.eta_seconds +=
            static_cast<double>(evaluations_left(e.step, e.total, cfg.train.eval_steps)) * last_eval_seconds;
      progress.update(shown, mem);
      result.losses.push_back(e.stats.loss);
      if (has_eval && cfg.train.eval_steps > 0 && e.step % cfg.train.eval_steps == 0 && e.step < e.total)
        run_eval(e.step);
      if (cfg.output.save_steps > 0 && e.step % cfg.output.save_steps == 0 && e.step < e.total) save();
      const bool stop = signals.fired() || (options.stop_when && options.stop_when(e.step + 1, 0));
      return !group.any(stop);
    });
  } catch (const amp::TrainingDiverged&) {
    progress.finish();
    log::error("saving the last state before stopping (its step was skipped, the weights are the last good ones)");
    save();
    throw;
  }
  progress.finish();
  result.max_micro_rows = trainer.max_micro_rows();
  result.steps = sum.steps;
  result.first_loss = sum.first_loss;
  result.last_loss = sum.last_loss;
  if (sum.out_of_memory) {
    save();
    throw InputError("out of memory in step " + std::to_string(trainer.step() + 1) +
                     " even at one sequence per micro batch (" + dev.description + "); saved " +
                     result.last_checkpoint + ". `qlora plan --config " + cfg.source +
                     "` shows what takes the memory: turn on train.gradient_checkpointing, target fewer "
                     "lora.target_modules, or use a GPU with more memory; then " + continue_command(cfg, options));
  }
  if (sum.stopped) {
    save();
    result.interrupted = true;
    result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    log::warn("stopped at step " + std::to_string(trainer.step()) + " of " + std::to_string(total) + "; saved " +
              result.last_checkpoint + ". Continue with: " + continue_command(cfg, options));
    return result;
  }
  save();
  if (has_eval) result.final_eval = run_eval(trainer.step());

  // 8. the adapter, in PEFT's format
  if (main_rank) {
    lora::save_adapter(adapter, result.adapter_dir, cfg.model.path);
    if (const std::string line = write_serving_files(result.adapter_dir, sets.train.summary, *tokenizer); !line.empty())
      log::info("adapter: " + line);
  }
  if (main_rank) {  // the loss curve beside metrics.jsonl (a picture: never fails the run)
    try {
      write_text_file((std::filesystem::path(cfg.output.dir) / "loss.svg").string(),
                      loss_plot_svg(result.metrics_path, cfg.output.dir));
    } catch (const std::exception& e) {
      log::warn(std::string("loss.svg not written: ") + e.what());
    }
  }
  group.barrier();  // no rank reports done before the adapter is on disk
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
