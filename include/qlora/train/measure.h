// train/measure: real steps on the GPU, to check the plan against the CUDA
// caching allocator (`qlora plan --measure`) and to choose the micro batch
// (`qlora plan --find-micro-batch`, `qlora train --micro-batch auto`).
//
// Note [measuring a plan]: the run's own stages load the base (random
// weights when the model directory holds only config.json: memory does not
// depend on the values), attach LoRA and build the optimizer, each followed by
// a reading of allocated bytes; then `steps` optimizer steps run on micro
// batches of the worst-case length (every row `seq` tokens, every token
// trained), through the trainer itself (checkpointing, chunked loss,
// optimizer). The plan's components are compared in the groups the readings
// separate: base weights, LoRA weights, what the first step leaves behind
// (optimizer state, cuBLAS workspaces), and the step's transient peak
// (gradients, activations, temporaries, logits); then the totals.
#pragma once

#include <c10/core/Device.h>

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/config/config.h"
#include "qlora/data/format.h"
#include "qlora/plan/finder.h"
#include "qlora/train/setup.h"
#include "qlora/train/trainer.h"

namespace qlora::model {
class DecoderModel;
}

namespace qlora::train {

struct MeasureOptions {
  std::string device = "auto";  // the GPU; a CPU is refused (the plan models GPU memory)
  int64_t steps = 3;            // optimizer steps measured (the first creates the optimizer state)
  int64_t seq = 0;              // 0: the longest sequence the data set makes (packing: max_seq_length)
  double memory_cap_bytes = 0;  // > 0: cap the allocator there (set_memory_fraction) and plan for it
};

struct MeasuredGroup {
  std::string label;
  double predicted = 0;  // bytes, the plan's components of the group
  double measured = 0;   // bytes
};

struct Measurement {
  std::string device;
  bool random_weights = false;
  int64_t micro = 0, accumulation = 0, seq = 0, steps = 0;
  std::string seq_source;  // where seq came from
  bool out_of_memory = false;
  std::string error;
  std::vector<MeasuredGroup> groups;
  double peak_allocated = 0, peak_reserved = 0;
  double predicted_allocated = 0, predicted_total = 0;
  double predicted_reserved = 0;  // the plan's total less the CUDA context (outside the allocator)
  double seconds_per_step = 0;
};

Measurement measure_plan(const Config& cfg, const MeasureOptions& options);
std::string format_measurement(const Measurement& m);
nlohmann::json measurement_json(const Measurement& m);

// One forward + backward of `micro` rows of `seq` tokens through the run's own
// loss (layers through opts.layer_forward when checkpointing), on `model`
// (whose LoRA parameters are `params`); gradients dropped afterwards and the
// generators put back, so a run can probe and then train. An out-of-memory is
// caught (fits = false) and the allocator's cache released. fits also needs
// the reserved peak within `capacity_bytes` (when > 0).
plan::ProbeResult probe_micro_batch(const model::DecoderModel& model, const std::vector<at::Tensor>& params,
                                    const StepOptions& opts, int64_t micro, int64_t seq, double capacity_bytes);

// plan::find_micro_batch over probe_micro_batch at `seq` tokens, started from
// the plan's prediction for `gpu` (its memory_bytes is the capacity: the
// GPU's, or a cap).
plan::FinderResult find_micro_batch_on_device(const Config& cfg, const DecoderConfig& shape,
                                              const model::DecoderModel& model, const std::vector<at::Tensor>& params,
                                              const StepOptions& opts, const plan::GpuSpec& gpu, int64_t seq,
                                              int64_t world);

// `qlora plan --find-micro-batch`: loads the config's model (random weights
// allowed, as measure_plan) and adapter on the GPU, then the search above at
// the worst-case sequence length. InputError on a CPU.
plan::FinderResult find_micro_batch_for(const Config& cfg, const MeasureOptions& options, int64_t world);

// `qlora plan --find-max-seq`: the longest sequence (a multiple of 1,024 tokens, up to `options.seq`
// or else the model's positions) that trains at the configured micro batch on this GPU, by real
// forward + backward passes from the plan's guess (plan::find_max_seq). train.offload_checkpoints:
// auto probes with offloading where it could apply (checkpointing, one sequence); a length whose
// offloaded checkpoints would not fit 90% of the host's available memory does not fit. The
// result's message ends with one timed pass at that length (tokens per second, after a warm-up
// pass). InputError on a CPU.
plan::SeqFinderResult find_max_seq_for(const Config& cfg, const MeasureOptions& options, int64_t world);

// The plan's view of the device a run chose, with its capacity (a cap when > 0).
plan::GpuSpec gpu_spec_of(const DeviceChoice& dev, double memory_cap_bytes);

// train.recompute: auto made concrete for the device a run chose, in cfg: selective in the most
// layers the plan fits into the GPU's memory (or the cap, when > 0), with headroom left
// (plan::auto_recompute), else full; full on a CPU or in fp32. Returns the line to log ("" when
// cfg did not ask for auto). After the micro batch is settled: the choice depends on it.
std::string resolve_auto_recompute(Config& cfg, const DecoderConfig& shape, const DeviceChoice& dev,
                                   double memory_cap_bytes, int64_t world);

// train.offload_checkpoints made concrete for the run, in cfg: auto as the plan decides for this
// device (the cap, when > 0), off on the CPU and without checkpointing. When on, the pinned host
// memory the checkpoints need (plan::offloaded_pinned_bytes, for each of `local_processes` on this host)
// is checked against `host_available` bytes (host_available_bytes(); 0: unknown, not checked):
// InputError with the numbers and the settings to change. Returns the line to log ("" when there
// is nothing to say). After the micro batch and train.recompute are settled.
std::string resolve_offload(Config& cfg, const DecoderConfig& shape, const DeviceChoice& dev, double memory_cap_bytes,
                            int64_t world, int64_t local_processes, int64_t host_available);

// The worst-case sequence length of cfg's data: max_seq_length with packing;
// else the longest tokenized training example (capped at max_seq_length),
// when the data and tokenizer load; else max_seq_length. *source says which.
int64_t worst_case_seq(const Config& cfg, std::string* source);

// The same over examples already tokenized (a run that has loaded its data).
int64_t longest_sequence(const Config& cfg, const std::vector<data::TokenizedExample>& examples, std::string* source);

}  // namespace qlora::train
