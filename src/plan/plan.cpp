// make_plan: the budget of budget.cpp applied to one config, plus the verdict,
// the advice, the precision and the time estimate.
//
// Note [plan advice order]
// ~~~~~~~~~~~~~~~~~~~~~~~~
// When a run does not fit, the knobs are turned in the order that changes the
// training least:
//   0. train.recompute: selective (and train.no_recompute_layers) back to full: the same math,
//      slower;
//   1. the micro batch, with gradient accumulation raised so that the
//      effective batch (micro × accumulation × GPUs) stays what was asked:
//      the same math, only slower;
//   2. activation checkpointing, when it is off: the same math, ~30% slower;
//      2b. the checkpoints offloaded to host memory (train.offload_checkpoints), where that
//      alone fits: the same math, host memory and PCIe time (Note [offloaded checkpoints]);
//   3. the sequence length: examples longer than it are truncated;
//   4. the LoRA rank: a smaller adapter;
//   5. a larger GPU.
// Each step is re-planned with every earlier step applied, so the numbers in
// an advice line are a plan that was computed, not a guess, and the last
// advice line is a configuration that fits (or the statement that none of
// these knobs is enough).
#include <algorithm>
#include <cmath>

#include "constants.h"
#include "format.h"
#include "qlora/common/errors.h"
#include "qlora/common/text.h"
#include "qlora/plan/finder.h"
#include "qlora/plan/plan.h"
#include "time_estimate.h"

namespace qlora::plan {
namespace {

using fmt::commas;
using fmt::fixed;
using fmt::gib;



// ---------------------------------------------------------------- precision

PrecisionAdvice resolve_precision(Precision requested, const GpuSpec* gpu) {
  PrecisionAdvice p;
  p.requested = std::string(to_string(requested));
  const bool known = gpu && gpu->has_compute_capability();
  const std::string cc = known ? " (sm_" + std::to_string(gpu->cc_major) + std::to_string(gpu->cc_minor) + ")" : "";
  const std::string gpu_name = gpu ? gpu->name : "";
  switch (requested) {
    case Precision::kAuto:
      if (!known) {
        p.resolved = "bf16";
        p.message = "precision auto: bf16 assumed; on a GPU without bf16 tensor cores (T4, V100) it becomes "
                    "fp16 with dynamic loss scaling (same memory)";
      } else if (gpu->supports_bf16()) {
        p.resolved = "bf16";
        p.message = "precision auto: bf16 on " + gpu_name + cc + ", no loss scaling needed";
      } else {
        p.resolved = "fp16";
        p.message = "precision auto: fp16 with dynamic loss scaling on " + gpu_name + cc +
                    ", which has no bf16 tensor cores";
      }
      break;
    case Precision::kBf16:
      p.resolved = "bf16";
      if (known && !gpu->supports_bf16()) {
        p.supported = false;
        p.message = gpu_name + cc + " has no bf16 tensor cores (they start with compute capability 8.0, "
                    "Ampere); set train.precision: fp16 (dynamic loss scaling) or auto";
      } else {
        p.message = "bf16" + (known ? " on " + gpu_name + cc : std::string());
      }
      break;
    case Precision::kFp16:
      p.resolved = "fp16";
      p.message = "fp16 with dynamic loss scaling";
      if (known && gpu->supports_bf16())
        p.message += "; " + gpu_name + cc + " supports bf16, which needs no loss scaling and has fp32's range "
                     "at the same memory: consider train.precision: bf16";
      break;
    case Precision::kFp32:
      p.resolved = "fp32";
      p.message = "fp32: activations take twice the memory of bf16/fp16 and tensor cores run at most at TF32 rate";
      break;
  }
  return p;
}

int bytes_of(const std::string& resolved) { return resolved == "fp32" ? 4 : 2; }

// ---------------------------------------------------------------- inputs

BudgetInputs inputs_from(const Config& cfg, const DecoderConfig& model, const PrecisionAdvice& precision) {
  BudgetInputs in;
  in.micro_batch_size = cfg.train.micro_batch_size;
  in.seq_length = cfg.data.max_seq_length;
  in.lora_r = cfg.lora.r;
  in.lora_targets = resolve_lora_targets(cfg.lora.target_modules, model);
  in.lora_dropout = cfg.lora.dropout;
  in.gradient_checkpointing = cfg.train.gradient_checkpointing;
  in.selective_recompute = cfg.train.recompute == Recompute::kSelective;
  in.selective_layers = cfg.train.selective_layers;
  in.no_recompute_layers = cfg.train.no_recompute_layers;
  in.optimizer = cfg.train.optimizer;
  in.double_quant = cfg.quantization.double_quant;
  in.packed = cfg.data.packing;
  in.activation_bytes = bytes_of(precision.resolved);
  in.flash_attention = precision.resolved == "bf16";
  const Precision cd = cfg.quantization.compute_dtype;
  in.dequant_bytes = cd == Precision::kAuto ? in.activation_bytes : (cd == Precision::kFp32 ? 4 : 2);
  return in;
}

struct Budget {
  std::vector<Component> components;
  double total = 0;
};

Budget budget(const DecoderConfig& model, const BudgetInputs& in) {
  Budget b;
  b.components = memory_components(model, in);
  b.total = total_bytes(b.components);
  return b;
}

bool fits(double total, const GpuSpec& gpu) { return total <= gpu.memory_bytes; }

// ---------------------------------------------------------------- advice

// Largest micro batch (<= cap) that fits with everything else as in `in`; 0 if none.
int64_t largest_fitting_micro(const DecoderConfig& model, BudgetInputs in, const GpuSpec& gpu, int64_t cap) {
  // Memory grows monotonically with the micro batch: binary search.
  int64_t lo = 0, hi = cap;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    in.micro_batch_size = mid;
    if (fits(budget(model, in).total, gpu))
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

}  // namespace

bool offload_may_apply(const Config& cfg) {
  const Offload o = cfg.train.offload_checkpoints;
  return cfg.train.gradient_checkpointing &&
         (o == Offload::kOn || (o == Offload::kAuto && cfg.train.micro_batch_size == 1));
}

BudgetInputs budget_inputs(const Config& cfg, const DecoderConfig& model, const std::string& precision) {
  PrecisionAdvice p;
  p.resolved = precision;
  return inputs_from(cfg, model, p);
}

namespace {

Advice make_advice(const std::string& kind, const std::string& text, const BudgetInputs& in, int64_t accumulation,
                   double total, const GpuSpec& gpu) {
  Advice a;
  a.kind = kind;
  a.micro_batch_size = in.micro_batch_size;
  a.gradient_accumulation_steps = accumulation;
  a.max_seq_length = in.seq_length;
  a.lora_r = in.lora_r;
  a.gradient_checkpointing = in.gradient_checkpointing;
  a.total_bytes = total;
  a.fits = fits(total, gpu);
  a.text = text + ": total " + gib(total) + (a.fits ? ", fits" : ", still over " + gib(gpu.memory_bytes));
  return a;
}

// Note [plan advice order] above.
std::vector<Advice> advise_over(const DecoderConfig& model, BudgetInputs in, int64_t accumulation,
                                const GpuSpec& gpu, int64_t world) {
  std::vector<Advice> out;
  const int64_t per_gpu_batch = in.micro_batch_size * accumulation;  // sequences per GPU per step

  // 0. selective recompute and layers kept whole back to full: the same batch, only more compute.
  const bool whole = whole_layers(in, model.num_hidden_layers) > 0;
  if ((in.selective_recompute || whole) && in.gradient_checkpointing) {
    const double before = budget(model, in).total;
    in.selective_recompute = false;
    in.no_recompute_layers = 0;
    const double total = budget(model, in).total;
    if (total < before) {
      out.push_back(make_advice("recompute",
                                std::string("set train.recompute: full") +
                                    (whole ? " and train.no_recompute_layers: 0" : "") +
                                    " (every layer recomputed in backward instead of keeping " +
                                    (whole ? "activations" : "its gate/up output") + ": " + gib(before - total) +
                                    " less, more compute)",
                                in, accumulation, total, gpu));
      if (out.back().fits) return out;
    }
  }
  // 1. micro batch, keeping the effective batch.
  if (in.micro_batch_size > 1) {
    const int64_t best = largest_fitting_micro(model, in, gpu, in.micro_batch_size - 1);
    int64_t micro = best >= 1 ? largest_divisor_at_most(per_gpu_batch, best) : 1;
    const int64_t old_micro = in.micro_batch_size, old_acc = accumulation;
    in.micro_batch_size = micro;
    accumulation = per_gpu_batch / micro;
    const double total = budget(model, in).total;
    std::string text = "set train.micro_batch_size " + std::to_string(old_micro) + " → " + std::to_string(micro) +
                       " and train.gradient_accumulation_steps " + std::to_string(old_acc) + " → " +
                       std::to_string(accumulation) + " (effective batch stays " + std::to_string(micro) + " × " +
                       std::to_string(accumulation) + " × " + std::to_string(world) + " = " +
                       std::to_string(per_gpu_batch * world) + ")";
    if (best > micro && best >= 1)
      text += "; micro " + std::to_string(best) + " would fit but does not divide " + std::to_string(per_gpu_batch);
    out.push_back(make_advice("micro_batch", text, in, accumulation, total, gpu));
    if (out.back().fits) return out;
  }
  // 2. activation checkpointing.
  if (!in.gradient_checkpointing) {
    in.gradient_checkpointing = true;
    const double total = budget(model, in).total;
    out.push_back(make_advice("gradient_checkpointing",
                              "set train.gradient_checkpointing: true (same gradients, ~30% more compute)", in,
                              accumulation, total, gpu));
    if (out.back().fits) return out;
  }
  // 2b. the checkpoints in host memory: the same batch and math, host memory and PCIe time.
  if (in.gradient_checkpointing && !in.offload) {
    const double before = budget(model, in).total;
    in.offload = true;
    const double total = budget(model, in).total;
    if (fits(total, gpu)) {  // advised only where it is enough: the knobs below cost the training
      out.push_back(make_advice("offload",
                                "set train.offload_checkpoints: true (each layer's checkpoint waits in host memory: " +
                                    gib(before - total) + " less on the GPU, " + gib(offloaded_pinned_bytes(model, in)) +
                                    " of pinned host memory)",
                                in, accumulation, total, gpu));
      return out;
    }
    in.offload = false;
  }
  // 3. sequence length: the longest multiple of kSeqLengthStep that fits.
  if (in.seq_length > kMinAdviceSeqLength) {
    const int64_t old = in.seq_length;
    int64_t best = 0;
    for (int64_t s = (old - 1) / kSeqLengthStep * kSeqLengthStep; s >= kMinAdviceSeqLength; s -= kSeqLengthStep) {
      in.seq_length = s;
      if (fits(budget(model, in).total, gpu)) {
        best = s;
        break;
      }
    }
    in.seq_length = best ? best : kMinAdviceSeqLength;
    const double total = budget(model, in).total;
    out.push_back(make_advice("seq_length",
                              "set data.max_seq_length " + std::to_string(old) + " → " +
                                  std::to_string(in.seq_length) +
                                  " (longer examples are truncated; the run reports how many)",
                              in, accumulation, total, gpu));
    if (out.back().fits) return out;
  }
  // 4. LoRA rank, halving.
  if (in.lora_r > kMinAdviceLoraR) {
    const int64_t old = in.lora_r;
    while (in.lora_r > kMinAdviceLoraR) {
      in.lora_r = std::max<int64_t>(kMinAdviceLoraR, in.lora_r / 2);
      if (fits(budget(model, in).total, gpu)) break;
    }
    const double total = budget(model, in).total;
    out.push_back(make_advice("lora_r",
                              "set lora.r " + std::to_string(old) + " → " + std::to_string(in.lora_r) +
                                  " (a smaller adapter; keep lora.alpha / r as before to keep the scaling)",
                              in, accumulation, total, gpu));
    if (out.back().fits) return out;
  }
  return out;
}

// The smallest preset GPU on which the original settings fit.
std::string smallest_fitting_gpu(double total) {
  std::string best;
  double best_mem = 0;
  for (const auto& name : gpu_preset_names()) {
    const GpuSpec g = resolve_gpu(name);
    if (total <= g.memory_bytes && (best.empty() || g.memory_bytes < best_mem)) {
      best = name;
      best_mem = g.memory_bytes;
    }
  }
  return best;
}

}  // namespace

// ---------------------------------------------------------------- building blocks

std::vector<std::string> resolve_lora_targets(const std::vector<std::string>& target_modules) {
  DecoderConfig unfused, fused;
  fused.pieces.fused_projections = true;
  std::vector<std::string> out;
  for (const auto& t : target_modules) {  // a name of either layout; all-linear: the unfused seven
    const auto& f = projection_names(fused);
    if (t != "all-linear" && std::find(f.begin(), f.end(), t) != f.end()) {
      if (std::find(out.begin(), out.end(), t) == out.end()) out.push_back(t);
      continue;
    }
    for (const auto& n : resolve_lora_targets({t}, unfused))
      if (std::find(out.begin(), out.end(), n) == out.end()) out.push_back(n);
  }
  return out;
}

std::vector<std::string> resolve_lora_targets(const std::vector<std::string>& target_modules,
                                              const DecoderConfig& model) {
  const auto& all = projection_names(model);
  std::vector<std::string> out;
  for (const auto& t : target_modules) {
    if (t == "all-linear") return all;
    if (std::find(all.begin(), all.end(), t) == all.end()) {
      const auto& split = decoder_linear_names();
      if (model.pieces.fused_projections && std::find(split.begin(), split.end(), t) != split.end())
        throw InputError("lora.target_modules: \"" + t + "\" is not a module of this " + model.model_type +
                         " model, which stores q, k, v as one qkv_proj and gate, up as one gate_up_proj (as PEFT "
                         "targets them); its modules: " + join(all) + ", or all-linear");
      std::string msg = "lora.target_modules: unknown module \"" + t + "\"";
      const std::string near = closest_match(t, all);
      if (!near.empty()) msg += "; did you mean \"" + near + "\"?";
      throw InputError(msg + " (this model's modules: " + join(all) + ", or all-linear)");
    }
    if (std::find(out.begin(), out.end(), t) == out.end()) out.push_back(t);
  }
  return out;
}

int64_t lora_trainable_params(const DecoderConfig& model, const LoraConfig& lora) {
  const auto targets = resolve_lora_targets(lora.target_modules, model);
  int64_t per_layer = 0;
  for (const auto& s : decoder_linear_shapes(model))
    if (std::find(targets.begin(), targets.end(), s.name) != targets.end())
      per_layer += lora.r * (s.in_features + s.out_features);
  return per_layer * model.num_hidden_layers;
}

// ---------------------------------------------------------------- make_plan

namespace {

// The largest n in [0, hi] with fits(n), for a fits that holds up to some n and not beyond (a
// total that grows with n, under a limit), by bisection; 0 also when not even 0 fits.
template <class Fits>
int64_t largest_fitting(int64_t hi, const Fits& fits) {
  int64_t lo = 0;
  if (!fits(0)) return 0;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (fits(mid))
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

}  // namespace

AutoRecompute auto_recompute(const DecoderConfig& model, BudgetInputs in, const GpuSpec& gpu) {
  AutoRecompute out;
  // Only the GPU's 16-bit fused layer keeps more than its inputs.
  if (!in.gradient_checkpointing || in.activation_bytes != 2) return out;
  const int64_t L = model.num_hidden_layers;
  const double limit = gpu.memory_bytes * (1.0 - kTightHeadroomFraction);
  const auto fits = [&] { return total_bytes(memory_components(model, in)) <= limit; };
  in.selective_recompute = true;
  in.no_recompute_layers = 0;
  out.selective_layers = largest_fitting(L, [&](int64_t n) {
    in.selective_layers = n;
    return fits();
  });
  if (out.selective_layers < L) return out;
  // Note [layers not recomputed]: every layer keeps gate/up; then layers kept whole, from the top.
  in.selective_layers = L;
  out.no_recompute_layers = largest_fitting(L, [&](int64_t n) {
    in.no_recompute_layers = n;
    return fits();
  });
  return out;
}

namespace {

// train.recompute as the run will have it: auto resolved against `gpu` (full without one), the
// selective count clamped to the model's layers; written into `in` and the plan.
// train.offload_checkpoints (Note [offloaded checkpoints] in src/layer/offload.cpp): true offloads
// under checkpointing; auto when a micro batch of one sequence does not fit `gpu` without it and
// does with it (with more sequences a smaller micro batch is the cheaper fix: the advice's first).
void resolve_offload(Plan& plan, const Config& cfg, const DecoderConfig& model, BudgetInputs& in, const GpuSpec* gpu) {
  in.offload = false;
  if (offload_may_apply(cfg) && cfg.train.offload_checkpoints == Offload::kOn) {
    in.offload = true;
  } else if (offload_may_apply(cfg) && gpu) {  // auto
    BudgetInputs with = in;
    with.offload = true;
    const double without = budget(model, in).total;
    in.offload = !fits(without, *gpu) && fits(budget(model, with).total, *gpu);
    if (in.offload)
      plan.notes.push_back("train.offload_checkpoints: auto offloads: without it the run needs " + gib(without) + " (" +
                           gpu->name + " has " + gib(gpu->memory_bytes) + ")");
  }
  plan.offload = in.offload;
  plan.offload_host_bytes = in.offload ? offloaded_pinned_bytes(model, in) : 0.0;
}

void resolve_recompute(Plan& plan, const Config& cfg, const DecoderConfig& model, BudgetInputs& in, const GpuSpec* gpu) {
  const int64_t L = model.num_hidden_layers;
  if (cfg.train.recompute == Recompute::kAuto) {
    const AutoRecompute a = gpu ? auto_recompute(model, in, *gpu) : AutoRecompute{};
    in.selective_recompute = a.selective_layers > 0;
    in.selective_layers = a.selective_layers;
    in.no_recompute_layers = a.no_recompute_layers;
    plan.notes.push_back(
        !gpu ? "train.recompute: auto decides on the GPU (pass --gpu to see its choice); planned here as full"
             : !in.gradient_checkpointing || in.activation_bytes != 2
                   ? "train.recompute: auto: full (selective recompute needs checkpointing and bf16/fp16 on a GPU)"
                   : "train.recompute: auto keeps the gate/up output in " + std::to_string(a.selective_layers) +
                         " of " + std::to_string(L) + " layers" +
                         (a.no_recompute_layers > 0
                              ? " and recomputes nothing in the last " + std::to_string(a.no_recompute_layers)
                              : std::string()) +
                         " (the most that leave " + fixed(kTightHeadroomFraction * 100, 0) + "% of " + gpu->name +
                         "'s memory free)");
  } else if (in.no_recompute_layers > 0 && whole_layers(in, L) == 0) {
    plan.notes.push_back("train.no_recompute_layers: " + std::to_string(in.no_recompute_layers) +
                         " has no effect here: only the GPU's bf16/fp16 layer under checkpointing keeps layers whole");
  }
  const bool selective = in.gradient_checkpointing && in.selective_recompute && in.activation_bytes == 2;
  plan.selective_layers = selective ? kept_gate_up_layers(in.selective_layers, L) : 0;
  plan.no_recompute_layers = whole_layers(in, L);
  plan.recompute = !in.gradient_checkpointing ? "none" : plan.selective_layers > 0 ? "selective" : "full";
}

}  // namespace

Plan make_plan(const Config& cfg, const DecoderConfig& model, const GpuSpec* gpu, int64_t world_size) {
  if (world_size < 1) throw InputError("the number of GPUs must be at least 1, got " + std::to_string(world_size));
  Plan plan;
  plan.model_name = model.name;
  plan.model = model;
  plan.config_source = cfg.source;
  if (gpu) plan.gpu = *gpu;

  EffectiveBatch& b = plan.batch;
  b.micro = cfg.train.micro_batch_size;
  b.accumulation = cfg.train.gradient_accumulation_steps;
  b.world = world_size;
  b.total = b.micro * b.accumulation * b.world;
  b.formula = std::to_string(b.micro) + " × " + std::to_string(b.accumulation) + " × " + std::to_string(b.world) +
              " = " + std::to_string(b.total);

  plan.precision = resolve_precision(cfg.train.precision, gpu);
  BudgetInputs in = inputs_from(cfg, model, plan.precision);
  resolve_offload(plan, cfg, model, in, gpu);
  resolve_recompute(plan, cfg, model, in, gpu);
  plan.activation_bytes = in.activation_bytes;
  plan.seq_length = in.seq_length;
  plan.tokens_per_micro_batch = in.micro_batch_size * in.seq_length;
  plan.total_params = total_params(model);
  plan.lora_params = lora_trainable_params(model, cfg.lora);
  plan.lora_targets = in.lora_targets;

  const Budget bud = budget(model, in);
  plan.components = bud.components;
  plan.total_bytes = bud.total;
  plan.allocated_bytes = allocated_bytes(plan.components);
  for (const auto& c : plan.components) plan.pageable_bytes += c.pageable_bytes;
  const auto dominant = std::max_element(plan.components.begin(), plan.components.end(),
                                         [](const Component& a, const Component& c) { return a.bytes < c.bytes; });
  plan.dominant = dominant->key;
  plan.time = estimate_time(model, in, b.accumulation, world_size, gpu, plan.precision.resolved, plan.lora_params);

  if (gpu) {
    plan.fits = fits(plan.total_bytes, *gpu);
    plan.headroom_bytes = gpu->memory_bytes - plan.total_bytes;
    plan.largest_micro_batch = largest_fitting_micro(model, in, *gpu, kMaxAdviceMicroBatch);
    if (!plan.fits) {
      plan.advice = advise_over(model, in, b.accumulation, *gpu, world_size);
      if (plan.advice.empty() || !plan.advice.back().fits) {
        const std::string bigger = smallest_fitting_gpu(plan.total_bytes);
        Advice a;
        a.kind = "larger_gpu";
        a.total_bytes = plan.total_bytes;
        a.text = bigger.empty() ? "no preset GPU holds " + gib(plan.total_bytes) +
                                      " for one process; use a smaller model"
                                : "the settings as given fit on a " + bigger + " (" +
                                      gib(resolve_gpu(bigger).memory_bytes) + ")";
        plan.advice.push_back(a);
      }
    } else {
      if (plan.headroom_bytes < kTightHeadroomFraction * gpu->memory_bytes) {
        Advice a;
        a.kind = "headroom";
        a.total_bytes = plan.total_bytes;
        a.fits = true;
        a.text = "fits with only " + gib(plan.headroom_bytes) + " to spare (under " +
                 fixed(kTightHeadroomFraction * 100, 0) +
                 "%): another process on the GPU or a fragmented allocator can tip it over";
        plan.advice.push_back(a);
      }
      // A larger micro batch that keeps the effective batch runs faster.
      const int64_t per_gpu = b.micro * b.accumulation;
      const int64_t bigger = largest_divisor_at_most(per_gpu, plan.largest_micro_batch);
      if (bigger > b.micro) {
        BudgetInputs more = in;
        more.micro_batch_size = bigger;
        Advice a = make_advice("more_micro_batch",
                               "room for a larger micro batch: train.micro_batch_size " + std::to_string(b.micro) +
                                   " → " + std::to_string(bigger) + " with gradient_accumulation_steps " +
                                   std::to_string(b.accumulation) + " → " + std::to_string(per_gpu / bigger) +
                                   " keeps the effective batch " + std::to_string(b.total) +
                                   " and runs fewer, larger steps",
                               more, per_gpu / bigger, budget(model, more).total, *gpu);
        plan.advice.push_back(a);
      }
      // Room to recompute less: what train.recompute: auto would keep on this GPU, when it keeps
      // more than the config does (Note [layers not recomputed]).
      if (cfg.train.recompute != Recompute::kAuto) {
        const AutoRecompute keep = auto_recompute(model, in, *gpu);
        // A layer kept whole keeps its gate/up output too.
        const int64_t gate_up_now = std::max(plan.selective_layers, plan.no_recompute_layers);
        if (keep.no_recompute_layers > plan.no_recompute_layers ||
            std::max(keep.selective_layers, keep.no_recompute_layers) > gate_up_now) {
          BudgetInputs less = in;
          less.selective_recompute = keep.selective_layers > 0;
          less.selective_layers = keep.selective_layers;
          less.no_recompute_layers = keep.no_recompute_layers;
          const TimeEstimate then = estimate_time(model, less, b.accumulation, world_size, gpu,
                                                  plan.precision.resolved, plan.lora_params);
          // Note [plan time model]: the time a step would take, beside the FLOPs it leaves out.
          const std::string flops =
              plan.time.available && then.available
                  ? " (" + fixed(100.0 * (1.0 - then.flops_per_token / plan.time.flops_per_token), 0) +
                        "% fewer FLOPs a step; ~" + fixed(then.seconds_per_step, 2) + " s a step against ~" +
                        fixed(plan.time.seconds_per_step, 2) + ")"
                  : std::string();
          plan.advice.push_back(make_advice(
              "recompute_less",
              "room to recompute less: train.recompute: auto would have " +
                  recompute_text("selective", model.num_hidden_layers, keep.selective_layers, keep.no_recompute_layers) +
                  flops,
              less, b.accumulation, budget(model, less).total, *gpu));
        }
      }
    }
  }
  if (!plan.precision.supported) {
    Advice a;
    a.kind = "precision";
    a.text = plan.precision.message;
    plan.advice.insert(plan.advice.begin(), a);
  }

  if (cfg.train.optimizer == OptimizerKind::kPagedAdamW8bit && plan.pageable_bytes > 0)
    plan.notes.push_back("paged_adamw_8bit: " + gib(plan.pageable_bytes) +
                         " of optimizer state is in managed memory, which can move to host memory under "
                         "pressure; counted on the GPU here");
  if (const std::string gap = fused_layer_gap(model); !gap.empty() && in.activation_bytes == 2)
    plan.notes.push_back("generic layer: " + gap + ", so on a GPU this model trains through the generic "
                         "checkpointed layer (slower than the fused one; this estimate assumes the fused layer)");
  if (const int64_t window = model.min_window(); window > 0 && in.seq_length > window)
    plan.notes.push_back("max_seq_length " + std::to_string(in.seq_length) + " exceeds the model's sliding window " +
                         std::to_string(window) +
                         ": its windowed layers attend through a [T, T] mask on ATen's math kernel (slower, "
                         "not counted in this memory estimate); rows up to the window take the fast path");
  if (in.seq_length > model.max_position_embeddings)
    plan.notes.push_back("max_seq_length " + std::to_string(in.seq_length) + " exceeds the model's " +
                         "max_position_embeddings " + std::to_string(model.max_position_embeddings));
  if (world_size > 1)
    plan.notes.push_back("per GPU: each of the " + std::to_string(world_size) +
                         " processes holds the whole NF4 base and its own activations; only LoRA gradients are "
                         "all-reduced");
  return plan;
}

void set_dataset_size(Plan& plan, const Config& cfg, int64_t train_examples) {
  TimeEstimate& t = plan.time;
  t.train_examples = train_examples;
  if (train_examples <= 0 || plan.batch.total <= 0) return;
  t.steps_per_epoch = (train_examples + plan.batch.total - 1) / plan.batch.total;
  t.total_steps = cfg.train.max_steps > 0 ? cfg.train.max_steps
                                          : int64_t(std::ceil(cfg.train.epochs * double(t.steps_per_epoch)));
  if (!t.available) return;
  t.hours_per_epoch = t.seconds_per_step * double(t.steps_per_epoch) / 3600.0;
  t.total_hours = t.seconds_per_step * double(t.total_steps) / 3600.0;
}

}  // namespace qlora::plan
