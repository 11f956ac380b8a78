// plan: what a QLoRA run will cost before it starts, torch-free.
//
// From a validated Config, the model's shapes and (optionally) a GPU, a Plan
// says: the effective batch and how it is made; GPU memory per component
// (NF4 base, 16-bit parts, LoRA weights / gradients / optimizer state,
// activations, backward temporaries, logits and loss, CUDA context,
// fragmentation), each with the formula and the numbers that went in; whether
// it fits and what dominates; advice with concrete values that were re-planned
// and fit; a time estimate from FLOPs; and the precision to use on that GPU.
// Every assumption is a named constant in src/plan/ with its source, and the
// trainer prints its measured peak next to the prediction.
// Note [plan memory model] in src/plan/budget.cpp explains the formulas.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "qlora/config/config.h"
#include "qlora/model/decoder_config.h"
#include "qlora/plan/gpu.h"

namespace qlora::plan {

// ---------------------------------------------------------------- pieces

struct EffectiveBatch {
  int64_t micro = 0;         // sequences per forward pass, per GPU
  int64_t accumulation = 0;  // forward/backward passes per optimizer step
  int64_t world = 1;         // data-parallel GPUs
  int64_t total = 0;         // micro × accumulation × world
  std::string formula;       // "2 × 16 × 1 = 32"
};

struct Component {
  std::string key;      // machine-readable: "base_weights_nf4", "activations", ...
  std::string label;    // for people: "base weights, NF4"
  double bytes = 0;     // counted on the GPU (worst case for pageable memory)
  std::string formula;  // how the number was computed, with the numbers
  std::string detail;   // alternatives and notes (without double quant, HF unchunked, ...)
  double pageable_bytes = 0;  // part a paged optimizer may move to host memory
  bool in_allocator = true;   // allocated through the CUDA caching allocator (false: the
                              // CUDA context, the fragmentation reserve)
};

struct Advice {
  std::string kind;  // "recompute", "micro_batch", "gradient_checkpointing", "seq_length", "lora_r",
                     // "larger_gpu", "more_micro_batch", "recompute_less", "headroom", "sliding_window",
                     // "offload"
  std::string text;  // one line, with the values and the resulting total
  // The settings this advice arrives at (cumulative with earlier advice of
  // the same plan) and the memory they were re-planned at.
  int64_t micro_batch_size = 0;
  int64_t gradient_accumulation_steps = 0;
  int64_t max_seq_length = 0;
  int64_t lora_r = 0;
  bool gradient_checkpointing = true;
  double total_bytes = 0;
  bool fits = false;
};

struct TimeEstimate {
  bool available = false;         // false when the GPU's throughput is unknown
  std::string why_unavailable;
  double flops_per_token = 0;     // GEMMs + attention: forward + backward (+ recompute), see formula
  double attention_flops_per_token = 0;  // the attention part of flops_per_token
  double tokens_per_step = 0;     // per GPU: micro × seq × accumulation
  double flops_per_step = 0;      // per GPU
  double peak_tflops = 0;         // the GPU's dense peak for the precision used
  // Note [plan time model]: the step's parts on the GPU, and the host's floor under them.
  double gemm_seconds_per_step = 0;
  double attention_seconds_per_step = 0;
  double memory_bytes_per_step = 0;     // the element-wise passes (the NF4 dequantization apart)
  double memory_seconds_per_step = 0;   // 0 when the GPU's bandwidth is unknown
  double dequant_seconds_per_step = 0;  // NF4 -> 16-bit passes, bandwidth-bound
  double kernels_per_step = 0;
  double gap_seconds_per_step = 0;      // idle between kernels
  double host_seconds_per_step = 0;     // the host issuing every kernel
  double offload_seconds_per_step = 0;  // offloaded checkpoints to the host and back (PCIe)
  bool host_bound = false;              // the host's floor decides the step
  double utilisation = 0;         // what the estimate implies: FLOPs / (peak × seconds)
  double seconds_per_step = 0;
  double hours_per_1000_steps = 0;
  double tokens_per_second = 0;   // all GPUs together
  std::string formula;
  std::string note;

  // Per epoch, when the number of training examples is known (set_dataset_size).
  int64_t train_examples = 0;     // 0: unknown
  int64_t steps_per_epoch = 0;    // ceil(examples / effective batch)
  int64_t total_steps = 0;        // train.max_steps, else epochs × steps_per_epoch
  double hours_per_epoch = 0;
  double total_hours = 0;
};

struct PrecisionAdvice {
  std::string requested;  // train.precision as configured ("auto", "bf16", ...)
  std::string resolved;   // what the run uses: "bf16", "fp16" or "fp32"
  bool supported = true;  // false: the GPU cannot run what was asked
  std::string message;
};

struct Plan {
  std::string model_name;
  DecoderConfig model;
  std::string config_source;
  EffectiveBatch batch;
  int64_t seq_length = 0;
  int64_t tokens_per_micro_batch = 0;  // micro × seq
  int64_t total_params = 0;
  int64_t lora_params = 0;
  std::vector<std::string> lora_targets;  // resolved module names
  PrecisionAdvice precision;
  int activation_bytes = 2;  // bytes per activation element (2: bf16/fp16, 4: fp32)

  std::vector<Component> components;
  double total_bytes = 0;      // what the process needs on the GPU: the fit verdict uses this
  double allocated_bytes = 0;  // the caching allocator's predicted peak (max_memory_allocated):
                               // total less the CUDA context and the fragmentation reserve
  double pageable_bytes = 0;

  std::optional<GpuSpec> gpu;
  std::string this_machine;      // this_machine_entry() when the caller queried the device; empty: not asked
  bool fits = false;             // meaningful only with a gpu
  double headroom_bytes = 0;     // gpu memory - total (negative: over)
  std::string dominant;          // key of the largest component
  int64_t largest_micro_batch = 0;  // with everything else as configured; 0: not even 1 fits
  // What a checkpointed layer recomputes: "full", "selective" (gate/up kept in
  // selective_layers of the layers), "none" (no checkpointing); with train.recompute: auto, what
  // auto chose for this GPU (full without one).
  std::string recompute;
  int64_t selective_layers = 0;
  int64_t no_recompute_layers = 0;  // of those, the last ones that recompute nothing (whole_layers)
  // train.offload_checkpoints as resolved (auto: on when only it makes the run fit the GPU), and
  // the pinned host memory it holds at the peak (offloaded_pinned_bytes).
  bool offload = false;
  double offload_host_bytes = 0;
  std::vector<Advice> advice;
  TimeEstimate time;
  std::vector<std::string> notes;  // other remarks (paging, sliding window, ...)
};

// ---------------------------------------------------------------- entry points

// `gpu` may be null (no GPU known: no fit verdict, no time estimate).
// world_size >= 1 is the number of data-parallel processes.
Plan make_plan(const Config& cfg, const DecoderConfig& model, const GpuSpec* gpu, int64_t world_size);

// Adds the per-epoch and whole-run estimate once the number of training
// examples is known (the CLI counts the lines of data.path). Each example is
// counted as a full max_seq_length sequence: an upper bound without packing.
void set_dataset_size(Plan& plan, const Config& cfg, int64_t train_examples);

// What a checkpointed layer recomputes, in words (the plan's `recompute` line, the run's
// banner): `mode` as Plan::recompute, `selective_layers` the layers keeping gate/up (those kept
// whole among them), `no_recompute_layers` the last ones kept whole, in a model of `layers`.
std::string recompute_text(const std::string& mode, int64_t layers, int64_t selective_layers,
                           int64_t no_recompute_layers);

// Human table: one row per component (GiB with 2 decimals, the formula), the
// total against the GPU, then advice, time and precision.
std::string render_text(const Plan& plan);

// The same as JSON (dump(2)): every number present, bytes as integers.
std::string render_json(const Plan& plan);

// ---------------------------------------------------------------- building blocks

// Trainable LoRA parameters: Σ over layers and targeted modules of r·(in + out),
// as PEFT counts them. Throws InputError for an unknown module name.
int64_t lora_trainable_params(const DecoderConfig& model, const LoraConfig& lora);

// The targeted module names, "all-linear" expanded (PEFT: every decoder
// projection, never lm_head). Throws InputError for an unknown name. Without a model: the
// seven projections of an unfused layer; with one: its projection_names (Phi-3's qkv_proj,
// o_proj, gate_up_proj, down_proj; q_proj there names the fused module to use).
std::vector<std::string> resolve_lora_targets(const std::vector<std::string>& target_modules);
std::vector<std::string> resolve_lora_targets(const std::vector<std::string>& target_modules,
                                              const DecoderConfig& model);

// The knobs the memory budget depends on, pulled out of Config so that advice
// can vary them and re-plan.
struct BudgetInputs {
  int64_t micro_batch_size = 1;
  int64_t seq_length = 2048;
  int64_t lora_r = 16;
  std::vector<std::string> lora_targets;
  double lora_dropout = 0.0;
  bool gradient_checkpointing = true;
  bool selective_recompute = false;  // train.recompute: selective (the GPU's fused layer only)
  int64_t selective_layers = -1;     // how many layers keep gate/up with it (-1: all)
  int64_t no_recompute_layers = 0;   // train.no_recompute_layers (the GPU's fused layer under checkpointing only)
  OptimizerKind optimizer = OptimizerKind::kPagedAdamW8bit;
  bool double_quant = true;
  int activation_bytes = 2;   // bf16 / fp16: 2, fp32: 4
  int dequant_bytes = 2;      // quantization.compute_dtype
  bool packed = false;        // data.packing: an attention mask per micro batch (padded rows need none)
  bool offload = false;       // train.offload_checkpoints, resolved (under checkpointing only)
  // bf16 (so sm_80 or later): packed rows take flash's variable-length kernel, with neither a
  // mask nor k, v repeated (Note [attention paths] in src/model/attention.cpp); fp16 may be a
  // T4's, whose packed rows keep the [B, 1, S, S] mask.
  bool flash_attention = false;
};

// How many layers keep their gate/up output for train.selective_layers = `selective_layers`
// (-1: all) in a model of `num_layers`: the count the fused layer, the budget and the time
// estimate share.
inline int64_t kept_gate_up_layers(int64_t selective_layers, int64_t num_layers) {
  return selective_layers < 0 ? num_layers : (selective_layers < num_layers ? selective_layers : num_layers);
}

// How many layers (the last ones) recompute nothing for `in` in a model of `num_layers`: those of
// train.no_recompute_layers, clamped; none but under checkpointing with 16-bit activations
// (the GPU's fused layer, Note [layers not recomputed]). The budget, the time estimate, auto and
// the advice share it (the fused layer and the run's banner clamp the count the same way).
inline int64_t whole_layers(const BudgetInputs& in, int64_t num_layers) {
  if (!in.gradient_checkpointing || in.activation_bytes != 2 || in.no_recompute_layers <= 0) return 0;
  return in.no_recompute_layers < num_layers ? in.no_recompute_layers : num_layers;
}

// Memory per component at the peak of a step, in the order render_text prints
// them (Note [plan memory model]).
std::vector<Component> memory_components(const DecoderConfig& model, const BudgetInputs& in);

// train.recompute: auto: selective_layers, the most decoder layers (0 .. num_hidden_layers) that
// can keep their gate/up output while the plan's total still leaves the headroom a plan needs
// not to be tight (kTightHeadroomFraction of `gpu`'s memory); when that is every layer,
// no_recompute_layers, the most that can recompute nothing under the same headroom (Note
// [layers not recomputed]). `in` as the run would have it otherwise; its recompute fields are
// ignored. Both 0 without checkpointing, on fp32, or when even full recompute does not fit.
struct AutoRecompute {
  int64_t selective_layers = 0;
  int64_t no_recompute_layers = 0;
};
AutoRecompute auto_recompute(const DecoderConfig& model, BudgetInputs in, const GpuSpec& gpu);

// Whether train.offload_checkpoints may offload this run: true under checkpointing, or auto for a
// micro batch of one sequence (where auto then offloads only if that alone fits: make_plan).
bool offload_may_apply(const Config& cfg);

// What the checkpointed layers keep from forward to backward, every layer's at once (0 without
// checkpointing): the host memory train.offload_checkpoints needs, and what its copies move each
// way a micro batch (Note [offloaded checkpoints] in src/layer/offload.cpp).
double offloaded_bytes(const DecoderConfig& model, const BudgetInputs& in);
// The pinned host memory that takes: each tensor in a block of the next power of two, as the
// CUDA host allocator rounds (up to 2× offloaded_bytes).
double offloaded_pinned_bytes(const DecoderConfig& model, const BudgetInputs& in);

// The budget's knobs as `cfg` sets them, precision resolved to `precision` ("bf16", "fp16",
// "fp32"); train.recompute: auto as full and train.offload_checkpoints: auto as off (the plan
// settles both against a GPU, make_plan).
BudgetInputs budget_inputs(const Config& cfg, const DecoderConfig& model, const std::string& precision);

// Sum of the components.
double total_bytes(const std::vector<Component>& components);

// Sum of the components the caching allocator counts (in_allocator).
double allocated_bytes(const std::vector<Component>& components);

// Bytes with two decimals in GiB: "9.52".
std::string format_gib(double bytes);

}  // namespace qlora::plan
