#include "qlora/train/measure.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "qlora/amp/precision.h"
#include "qlora/amp/scaler.h"
#include "qlora/common/errors.h"
#include "qlora/common/log.h"
#include "qlora/data/batch.h"
#include "qlora/data/dataset.h"
#include "qlora/data/tokenizer.h"
#include "qlora/lora/lora.h"
#include "qlora/model/decoder.h"
#include "qlora/optim/optimizer.h"
#include "qlora/plan/plan.h"
#include "qlora/quant/nf4_cuda.h"
#include "qlora/train/checkpoint.h"
#include "qlora/train/layer_choice.h"
#include "qlora/train/memory.h"
#include "qlora/train/schedule.h"
#include "qlora/train/setup.h"

namespace qlora::train {
namespace {

using json = nlohmann::json;
constexpr uint32_t kSyntheticSeed = 17;

// `rows` examples of `seq` random tokens, every token trained (the worst case
// for the loss: no label is masked).
data::Batch synthetic_batch(int64_t rows, int64_t seq, int64_t vocab) {
  std::mt19937 rng(kSyntheticSeed);
  std::vector<data::TokenizedExample> ex(static_cast<size_t>(rows));
  std::vector<int64_t> idx;
  for (int64_t r = 0; r < rows; ++r) {
    auto& e = ex[static_cast<size_t>(r)];
    for (int64_t t = 0; t < seq; ++t) e.input_ids.push_back(static_cast<int32_t>(rng() % static_cast<uint32_t>(vocab)));
    e.labels = e.input_ids;
    e.labels[0] = data::kIgnoreIndex;
    idx.push_back(r);
  }
  return data::collate_padded(ex, idx, 0);
}

double sum_of(const plan::Plan& p, std::initializer_list<const char*> keys) {
  double s = 0;
  for (const auto& c : p.components)
    for (const char* k : keys)
      if (c.key == k) s += c.bytes;
  return s;
}

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

// Whether the host can pin `need` bytes of offloaded checkpoints: at most 90% of what it has
// available, leaving the rest to the process and the machine; `available` 0 (unknown) holds all.
bool host_holds(double need, double available) { return available <= 0 || need <= 0.9 * available; }

}  // namespace

plan::GpuSpec gpu_spec_of(const DeviceChoice& dev, double memory_cap_bytes) {
  plan::GpuSpec g = plan::gpu_from_device(dev.gpu_name, memory_cap_bytes > 0 ? memory_cap_bytes : dev.gpu_total_bytes,
                                          dev.cc_major, dev.cc_minor);
  if (memory_cap_bytes > 0) g.note += (g.note.empty() ? "" : "; ") + std::string("capped with --memory-cap");
  return g;
}

std::string resolve_auto_recompute(Config& cfg, const DecoderConfig& shape, const DeviceChoice& dev,
                                   double memory_cap_bytes, int64_t world) {
  if (cfg.train.recompute != Recompute::kAuto) return {};
  Config c = cfg;
  c.train.precision = dev.precision;
  const plan::GpuSpec gpu = gpu_spec_of(dev, memory_cap_bytes);
  const plan::Plan p = plan::make_plan(c, shape, dev.device.is_cuda() ? &gpu : nullptr, world);
  const int64_t kept = p.selective_layers;  // 0 without a GPU (no GpuSpec, auto plans full)
  cfg.train.recompute = kept > 0 ? Recompute::kSelective : Recompute::kFull;
  cfg.train.selective_layers = kept;
  cfg.train.no_recompute_layers = p.no_recompute_layers;
  if (!dev.device.is_cuda() || dev.precision == Precision::kFp32 || !cfg.train.gradient_checkpointing)
    return "train.recompute auto: full (selective recompute needs activation checkpointing and bf16/fp16 on a GPU)";
  return "train.recompute auto: " +
         (kept > 0 ? plan::recompute_text(p.recompute, shape.num_hidden_layers, kept, p.no_recompute_layers)
                   : std::string("full (no layer's gate/up output fits beside the rest)")) +
         "; the plan's total " + plan::format_gib(p.total_bytes) + " GiB of " + plan::format_gib(gpu.memory_bytes) +
         " GiB" + (memory_cap_bytes > 0 ? " (--memory-cap)" : "");
}

std::string resolve_offload(Config& cfg, const DecoderConfig& shape, const DeviceChoice& dev, double memory_cap_bytes,
                            int64_t world, int64_t local_processes, int64_t host_available) {
  const Offload asked = cfg.train.offload_checkpoints;
  if (!dev.device.is_cuda() || !cfg.train.gradient_checkpointing) {
    cfg.train.offload_checkpoints = Offload::kOff;
    return asked != Offload::kOn ? std::string()
                                 : "train.offload_checkpoints: true has no effect here (it needs " +
                                       std::string(dev.device.is_cuda() ? "train.gradient_checkpointing: true)"
                                                                        : "a GPU)");
  }
  Config c = cfg;
  c.train.precision = dev.precision;
  const plan::GpuSpec gpu = gpu_spec_of(dev, memory_cap_bytes);
  const plan::Plan p = plan::make_plan(c, shape, &gpu, world);
  cfg.train.offload_checkpoints = p.offload ? Offload::kOn : Offload::kOff;
  if (!p.offload) return {};
  const double need = p.offload_host_bytes * double(std::max<int64_t>(1, local_processes));
  const std::string each = local_processes > 1 ? " (" + std::to_string(local_processes) + " processes on this host × " +
                                                     plan::format_gib(p.offload_host_bytes) + " GiB)"
                                               : std::string();
  if (!host_holds(need, double(host_available)))
    throw InputError(cfg.source + ": train.offload_checkpoints" + (asked == Offload::kAuto ? " (auto)" : "") +
                     ": the offloaded checkpoints need " + plan::format_gib(need) + " GiB of pinned host memory" +
                     each + ", more than 90% of the " + plan::format_gib(double(host_available)) +
                     " GiB this machine has available (MemAvailable in /proc/meminfo). Shorten data.max_seq_length, "
                     "free host memory, or set train.offload_checkpoints: false (see `qlora plan`)");
  return std::string("train.offload_checkpoints") + (asked == Offload::kAuto ? " auto" : "") +
         ": each layer's checkpoint waits in pinned host memory until its backward, " +
         plan::format_gib(p.offload_host_bytes) + " GiB of host memory" + each + "; the plan's total " +
         plan::format_gib(p.total_bytes) + " GiB of " + plan::format_gib(gpu.memory_bytes) + " GiB";
}

int64_t longest_sequence(const Config& cfg, const std::vector<data::TokenizedExample>& examples, std::string* source) {
  if (cfg.data.packing) {
    *source = "data.max_seq_length (packed rows are always full)";
    return cfg.data.max_seq_length;
  }
  int64_t longest = 0;
  for (const auto& e : examples) longest = std::max<int64_t>(longest, static_cast<int64_t>(e.input_ids.size()));
  if (longest == 0) {
    *source = "data.max_seq_length";
    return cfg.data.max_seq_length;
  }
  *source = "the longest of " + std::to_string(examples.size()) + " training examples in " + cfg.data.path;
  return std::min(longest, cfg.data.max_seq_length);
}

int64_t worst_case_seq(const Config& cfg, std::string* source) {
  if (cfg.data.packing) return longest_sequence(cfg, {}, source);
  try {
    const std::unique_ptr<data::Tokenizer> tok = data::load_tokenizer(cfg.model.path);
    const data::TrainEval sets = data::load_train_eval(cfg.data, static_cast<uint64_t>(cfg.train.seed), *tok);
    return longest_sequence(cfg, sets.train.examples, source);
  } catch (const std::exception& e) {
    *source = "data.max_seq_length (the data did not load: " + first_line(e.what()) + ")";
    return cfg.data.max_seq_length;
  }
}

plan::ProbeResult probe_micro_batch(const model::DecoderModel& model, const std::vector<at::Tensor>& params,
                                    const StepOptions& opts, int64_t micro, int64_t seq, double capacity_bytes) {
  const c10::Device device = model.device();
  std::vector<std::pair<at::Generator, at::Tensor>> rng;
  for (auto& [name, g] : step_generators(device)) rng.emplace_back(g, g.get_state());
  release_cached_memory(device);
  reset_peak_memory(device);
  plan::ProbeResult r;
  try {
    const data::Batch b = synthetic_batch(micro, seq, model.lm_head_weight().size(0));
    auto [sum, n] = batch_loss(model, b, opts.loss_chunk, opts.layer_forward);
    torch::autograd::backward({sum / static_cast<double>(std::max<int64_t>(n, 1))});
    (void)sum.item<float>();  // the backward is done when this returns
    r.fits = true;
  } catch (const std::exception& e) {
    if (!is_out_of_memory(e)) throw;
    r.error = first_line(e.what());
  }
  for (const auto& p : params) const_cast<at::Tensor&>(p).mutable_grad() = at::Tensor();
  for (auto& [g, state] : rng) g.set_state(state);
  const MemoryStats s = memory_stats(device);
  r.peak_allocated_bytes = static_cast<double>(s.peak_allocated);
  r.peak_reserved_bytes = static_cast<double>(s.peak_reserved);
  if (r.fits && capacity_bytes > 0 && r.peak_reserved_bytes > capacity_bytes) {
    r.fits = false;
    r.error = "reserved peak above the capacity";
  }
  release_cached_memory(device);
  return r;
}

plan::FinderResult find_micro_batch_on_device(const Config& cfg, const DecoderConfig& shape,
                                              const model::DecoderModel& model, const std::vector<at::Tensor>& params,
                                              const StepOptions& opts, const plan::GpuSpec& gpu, int64_t seq,
                                              int64_t world) {
  Config c = cfg;
  c.data.max_seq_length = seq;
  // The probe steps read recompute: auto as full; auto itself is settled after the micro batch.
  if (c.train.recompute == Recompute::kAuto) c.train.recompute = Recompute::kFull;
  const plan::Plan p = plan::make_plan(c, shape, &gpu, world);
  return plan::find_micro_batch(plan::finder_inputs(p), [&](int64_t micro) {
    return probe_micro_batch(model, params, opts, micro, seq, gpu.memory_bytes);
  });
}

// The GPU for a measuring command, capped as asked; InputError on a CPU.
DeviceChoice measuring_device(const Config& cfg, const MeasureOptions& o, const char* what) {
  quant::register_cuda_kernels();
  const DeviceChoice dev = choose_device(cfg, o.device);
  if (!dev.device.is_cuda())
    throw InputError(std::string("qlora plan ") + what + " needs a GPU: the plan models GPU memory, and this machine has none (" +
                     dev.description + "). Run it on the machine that will train.");
  if (o.memory_cap_bytes > 0) set_memory_fraction(dev.device, std::min(1.0, o.memory_cap_bytes / dev.gpu_total_bytes));
  return dev;
}

plan::FinderResult find_micro_batch_for(const Config& cfg, const MeasureOptions& o, int64_t world) {
  const DeviceChoice dev = measuring_device(cfg, o, "--find-micro-batch");
  std::string source;
  const int64_t seq = o.seq > 0 ? o.seq : worst_case_seq(cfg, &source);
  at::manual_seed(static_cast<uint64_t>(cfg.train.seed));
  BaseModel base = load_base_model(cfg, dev, /*allow_random_weights=*/true);
  lora::LoraAdapter adapter = lora::LoraAdapter::attach(base.model, lora::settings_from_config(cfg.lora));
  StepOptions probe;
  probe.layer_forward = training_layer_forward(base.model, cfg.train);
  plan::FinderResult f = find_micro_batch_on_device(cfg, base.shape, base.model, adapter.parameters(), probe,
                                                    gpu_spec_of(dev, o.memory_cap_bytes), seq, world);
  f.message += " [" + dev.description + ", seq " + std::to_string(seq) + (source.empty() ? "" : ": " + source) + "]";
  return f;
}

plan::SeqFinderResult find_max_seq_for(const Config& cfg_in, const MeasureOptions& o, int64_t world) {
  constexpr int64_t kStep = 1024;
  Config cfg = cfg_in;
  const DeviceChoice dev = measuring_device(cfg, o, "--find-max-seq");
  if (cfg.train.recompute == Recompute::kAuto) cfg.train.recompute = Recompute::kFull;
  const bool offload = plan::offload_may_apply(cfg);
  cfg.train.offload_checkpoints = offload ? Offload::kOn : Offload::kOff;
  at::manual_seed(static_cast<uint64_t>(cfg.train.seed));
  BaseModel base = load_base_model(cfg, dev, /*allow_random_weights=*/true);
  lora::LoraAdapter adapter = lora::LoraAdapter::attach(base.model, lora::settings_from_config(cfg.lora));
  StepOptions probe;
  probe.layer_forward = training_layer_forward(base.model, cfg.train);
  const plan::GpuSpec gpu = gpu_spec_of(dev, o.memory_cap_bytes);
  plan::BudgetInputs in = plan::budget_inputs(cfg, base.shape, std::string(to_string(dev.precision)));
  in.offload = offload;
  plan::SeqFinderInputs s;
  s.micro = cfg.train.micro_batch_size;
  s.step = kStep;
  s.upper_seq = o.seq > 0 ? o.seq : base.shape.max_positions();
  s.predicted_seq = plan::largest_fitting_seq(base.shape, in, gpu, s.upper_seq, kStep);
  s.device_capacity_bytes = gpu.memory_bytes;
  const double host = static_cast<double>(host_available_bytes());
  plan::SeqFinderResult f = plan::find_max_seq(s, [&](int64_t seq) {
    in.seq_length = seq;
    if (const double need = plan::offloaded_pinned_bytes(base.shape, in); offload && !host_holds(need, host)) {
      plan::ProbeResult r;
      r.error = "its offloaded checkpoints need " + plan::format_gib(need) + " GiB of host memory, more than 90% of the " +
                plan::format_gib(host) + " GiB available";
      return r;
    }
    return probe_micro_batch(base.model, adapter.parameters(), probe, s.micro, seq, gpu.memory_bytes);
  });
  if (f.found) {  // the search's pass at this length was the warm-up
    const auto start = std::chrono::steady_clock::now();
    const plan::ProbeResult again = probe_micro_batch(base.model, adapter.parameters(), probe, s.micro, f.seq, gpu.memory_bytes);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (again.fits)
      f.message += "; one forward + backward there: " + std::to_string(static_cast<int64_t>(double(s.micro * f.seq) / seconds)) +
                   " tokens/s";
  }
  in.seq_length = f.seq;
  f.message += std::string("; offloaded checkpoints: ") +
               (offload ? plan::format_gib(plan::offloaded_pinned_bytes(base.shape, in)) + " GiB of host memory" : "no") +
               " [" + dev.description + ", the plan's guess " + std::to_string(s.predicted_seq) + "]";
  return f;
}

Measurement measure_plan(const Config& cfg_in, const MeasureOptions& o) {
  Config cfg = cfg_in;
  Measurement m;
  const DeviceChoice dev = measuring_device(cfg, o, "--measure");
  m.device = dev.description;
  m.seq = o.seq > 0 ? o.seq : worst_case_seq(cfg, &m.seq_source);
  if (o.seq > 0) m.seq_source = "--seq";
  cfg.data.max_seq_length = m.seq;  // the plan is compared at the length measured
  m.micro = cfg.train.micro_batch_size;
  m.accumulation = cfg.train.gradient_accumulation_steps;
  m.steps = std::max<int64_t>(o.steps, 2);
  at::manual_seed(static_cast<uint64_t>(cfg.train.seed));

  const auto allocated = [&] { return static_cast<double>(memory_stats(dev.device).allocated); };
  release_cached_memory(dev.device);
  const double a0 = allocated();
  BaseModel base = load_base_model(cfg, dev, /*allow_random_weights=*/true);
  m.random_weights = base.random_weights;
  if (const std::string line = resolve_auto_recompute(cfg, base.shape, dev, o.memory_cap_bytes, 1); !line.empty())
    log::info(line);
  const double a_base = allocated();
  lora::LoraAdapter adapter = lora::LoraAdapter::attach(base.model, lora::settings_from_config(cfg.lora));
  const double a_lora = allocated();
  std::vector<optim::NamedParam> named;
  for (auto& [name, p] : adapter.named_parameters()) named.push_back({name, p});
  std::unique_ptr<optim::Optimizer> optimizer = optim::make_optimizer(cfg.train, std::move(named));
  amp::LossScalerOptions so;
  so.enabled = amp::needs_loss_scaling(dev.precision);
  amp::LossScaler scaler(so);
  amp::BadStepPolicy bad_steps(cfg.train.max_bad_steps);
  StepOptions step_options;
  step_options.max_grad_norm = cfg.train.max_grad_norm;
  step_options.gradient_checkpointing = cfg.train.gradient_checkpointing;
  step_options.layer_forward = training_layer_forward(base.model, cfg.train);
  TrainConfig schedule = cfg.train;
  schedule.max_steps = m.steps;
  schedule.warmup_steps = 0;
  Trainer trainer(base.model, adapter.parameters(), *optimizer, make_lr_scheduler(schedule, m.steps), scaler, bad_steps,
                  step_options);
  const std::vector<data::Batch> window(static_cast<size_t>(std::min<int64_t>(m.accumulation, 2)),
                                        synthetic_batch(m.micro, m.seq, base.shape.vocab_size));

  double a_after = 0, seconds = 0;
  for (int64_t s = 0; s < m.steps; ++s) {
    if (s == 1) {
      a_after = allocated();
      reset_peak_memory(dev.device);
    }
    const auto t0 = std::chrono::steady_clock::now();
    const StepStats st = trainer.train_step(window);
    if (s >= 1) seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (st.out_of_memory || trainer.max_micro_rows() > 0) {
      m.out_of_memory = true;
      m.error = st.out_of_memory ? "out of memory even at one sequence per micro batch"
                                 : "out of memory at micro " + std::to_string(m.micro) + "; the trainer fell back to " +
                                       std::to_string(trainer.max_micro_rows()) + " rows per micro batch";
      break;
    }
  }
  const MemoryStats peak = memory_stats(dev.device);
  m.peak_allocated = static_cast<double>(peak.peak_allocated);
  m.peak_reserved = static_cast<double>(peak.peak_reserved);
  m.seconds_per_step = m.steps > 1 ? seconds / static_cast<double>(m.steps - 1) : 0.0;

  const plan::GpuSpec gpu = gpu_spec_of(dev, o.memory_cap_bytes);
  const plan::Plan p = plan::make_plan(cfg, base.shape, &gpu, 1);
  m.predicted_allocated = p.allocated_bytes;
  m.predicted_total = p.total_bytes;
  m.predicted_reserved = p.total_bytes - sum_of(p, {"cuda_context"});
  m.groups = {
      {"base weights (NF4 + 16-bit embeddings, norms, head)", sum_of(p, {"base_weights_nf4", "base_weights_16bit"}),
       a_base - a0},
      {"LoRA weights", sum_of(p, {"lora_weights"}), a_lora - a_base},
      {"optimizer state + cuBLAS workspaces (left by step 1)", sum_of(p, {"optimizer_states", "cublas_workspace"}),
       a_after - a_lora},
      {"step transient (gradients, activations, temporaries, logits)",
       sum_of(p, {"lora_grads", "activations", "backward_workspace", "logits_loss"}), m.peak_allocated - a_after},
  };
  return m;
}

std::string format_measurement(const Measurement& m) {
  const auto gib = [](double b) { return plan::format_gib(b); };
  const auto pct = [](double predicted, double measured) {
    if (measured <= 0) return std::string("   n/a");
    char buf[32];
    std::snprintf(buf, sizeof buf, "%+6.1f%%", 100.0 * (predicted - measured) / measured);
    return std::string(buf);
  };
  std::string out = "measured on " + m.device + ": micro " + std::to_string(m.micro) + " × seq " +
                    std::to_string(m.seq) + " (" + m.seq_source + "), " + std::to_string(m.steps) + " optimizer steps" +
                    (m.random_weights ? ", random weights (no *.safetensors to load; memory does not depend on the values)" : "") + "\n";
  if (m.out_of_memory) out += "OUT OF MEMORY: " + m.error + "\n";
  char line[256];
  std::snprintf(line, sizeof line, "  %-64s %10s %10s %8s\n", "component (GiB)", "predicted", "measured", "error");
  out += line;
  for (const auto& g : m.groups) {
    std::snprintf(line, sizeof line, "  %-64s %10s %10s %8s\n", g.label.c_str(), gib(g.predicted).c_str(),
                  gib(g.measured).c_str(), pct(g.predicted, g.measured).c_str());
    out += line;
  }
  std::snprintf(line, sizeof line, "  %-64s %10s %10s %8s\n", "peak allocated (torch.cuda.max_memory_allocated)",
                gib(m.predicted_allocated).c_str(), gib(m.peak_allocated).c_str(),
                pct(m.predicted_allocated, m.peak_allocated).c_str());
  out += line;
  std::snprintf(line, sizeof line, "  %-64s %10s %10s %8s\n", "peak reserved (max_memory_reserved)",
                gib(m.predicted_reserved).c_str(), gib(m.peak_reserved).c_str(),
                pct(m.predicted_reserved, m.peak_reserved).c_str());
  out += line;
  std::snprintf(line, sizeof line, "  %-64s %10s\n", "plan total (reserved + CUDA context: the fit verdict)",
                gib(m.predicted_total).c_str());
  out += line;
  char tail[128];
  std::snprintf(tail, sizeof tail, "  %.3f s per optimizer step (after the first)\n", m.seconds_per_step);
  return out + tail;
}

json measurement_json(const Measurement& m) {
  json groups = json::array();
  for (const auto& g : m.groups)
    groups.push_back({{"label", g.label}, {"predicted_bytes", g.predicted}, {"measured_bytes", g.measured}});
  return json{{"device", m.device},
              {"random_weights", m.random_weights},
              {"micro", m.micro},
              {"accumulation", m.accumulation},
              {"seq", m.seq},
              {"seq_source", m.seq_source},
              {"steps", m.steps},
              {"out_of_memory", m.out_of_memory},
              {"error", m.error},
              {"groups", groups},
              {"peak_allocated_bytes", m.peak_allocated},
              {"peak_reserved_bytes", m.peak_reserved},
              {"predicted_allocated_bytes", m.predicted_allocated},
              {"predicted_total_bytes", m.predicted_total},
              {"predicted_reserved_bytes", m.predicted_reserved},
              {"reserved_error_pct",
               m.peak_reserved > 0 ? 100.0 * (m.predicted_reserved - m.peak_reserved) / m.peak_reserved : 0.0},
              {"allocated_error_pct",
               m.peak_allocated > 0 ? 100.0 * (m.predicted_allocated - m.peak_allocated) / m.peak_allocated : 0.0},
              {"seconds_per_step", m.seconds_per_step}};
}

}  // namespace qlora::train
