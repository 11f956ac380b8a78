// plan/finder: the largest micro batch that really fits, found by asking the
// GPU, and the accumulation that keeps the effective batch; torch-free.
//
// The search itself knows nothing of CUDA: it calls a probe, a callback that
// runs a real forward + backward pass at the worst-case sequence length with a
// given micro batch and says whether it fitted (the trainer implements it and
// turns a CUDA out-of-memory into fits = false). Starting from the plan's
// prediction rather than from 1, it doubles while probes fit and bisects
// between the last fit and the first failure, or bisects down toward 1 when
// the prediction itself fails: O(log) probes, none repeated. Then
// accumulation is chosen so micro × accumulation × GPUs is exactly what the
// config asked for (Note [finder divisor rule]), and the run log gets one line
// saying so.
//
// Also here: oom_fallback, the next smaller (micro, accumulation) with the same
// product, which the trainer uses to retry a step that ran out of memory.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "qlora/plan/plan.h"

namespace qlora::plan {

// ---------------------------------------------------------------- probe

// What one trial pass reports. An out-of-memory is fits = false with the
// allocator's message in `error`; any other failure should be thrown by the
// probe (it is not a memory verdict and the search lets it through).
struct ProbeResult {
  bool fits = false;
  double peak_allocated_bytes = 0;  // CUDA caching allocator max allocated during the pass
  double peak_reserved_bytes = 0;   // max reserved (allocated + cached blocks)
  std::string error;                // the OOM message when !fits; empty otherwise
};

// Runs one trial at `micro` sequences of the worst-case length.
using Probe = std::function<ProbeResult(int64_t micro)>;

// ---------------------------------------------------------------- search

struct FinderInputs {
  int64_t predicted_micro = 1;      // the plan's largest fitting micro batch: the first probe
  int64_t config_micro = 1;         // train.micro_batch_size as configured
  int64_t config_accumulation = 1;  // train.gradient_accumulation_steps as configured
  int64_t world = 1;                // data-parallel GPUs
  // No micro batch above this is tried. 0: the effective batch per GPU
  // (config_micro × config_accumulation), beyond which a larger micro batch
  // cannot be used without changing the effective batch.
  int64_t upper_bound = 0;
  double device_capacity_bytes = 0;  // for the log line ("of 15.0 GiB"); 0: unknown
};

struct Trial {
  int64_t micro = 0;
  ProbeResult result;
};

struct FinderResult {
  bool found = false;              // false: not even micro 1 fits
  int64_t micro = 0;               // chosen: the largest divisor of the per-GPU batch <= largest_fitting
  int64_t accumulation = 0;        // per-GPU batch / micro
  int64_t largest_fitting = 0;     // the largest micro batch that was probed and fitted; 0 when none
  double peak_allocated_bytes = 0; // measured at largest_fitting
  double peak_reserved_bytes = 0;
  std::vector<Trial> trials;       // in the order they were probed; no micro twice
  std::string message;             // one line for the run log
};

// The inputs for a planned run: the plan's largest fitting micro batch as the
// start (the configured micro batch when the plan had no GPU to judge by; 1
// when it says not even 1 fits), the configured batch, the plan's GPUs, and the
// capacity of the plan's GPU (0 without one).
FinderInputs finder_inputs(const Plan& plan);

// Note [finder search] in src/plan/finder.cpp. Assumes memory grows with the
// micro batch (a size above a failure is never probed, a size below a fit is
// taken to fit). Throws InputError only for inputs that are not positive.
FinderResult find_micro_batch(const FinderInputs& in, const Probe& probe);

// ---------------------------------------------------------------- the longest sequence

// `qlora plan --find-max-seq`: the longest sequence (a multiple of `step`) at the configured micro
// batch, the same search over lengths (Note [finder search]: the probe is called with a length).
struct SeqFinderInputs {
  int64_t predicted_seq = 0;  // the plan's longest (largest_fitting_seq); the first probe
  int64_t upper_seq = 0;      // nothing longer is tried (the model's positions, or --seq)
  int64_t step = 1024;        // lengths probed are multiples of this
  int64_t micro = 1;
  double device_capacity_bytes = 0;  // for the log line; 0: unknown
};

struct SeqFinderResult {
  bool found = false;       // false: not even `step` tokens fit
  int64_t seq = 0;          // the longest length probed that fitted
  double peak_allocated_bytes = 0;  // measured there
  double peak_reserved_bytes = 0;
  std::vector<Trial> trials;  // Trial::micro holds the length probed
  std::string message;
};

SeqFinderResult find_max_seq(const SeqFinderInputs& in, const Probe& probe);

// The plan's guess for it: the longest sequence, a multiple of `step` no longer than `upper`,
// whose plan (the rest as in `in`) fits `gpu`; 0 when not even `step` tokens do. Memory grows
// with the length: a binary search.
int64_t largest_fitting_seq(const DecoderConfig& model, BudgetInputs in, const GpuSpec& gpu, int64_t upper,
                            int64_t step);

// ---------------------------------------------------------------- divisors

// The largest divisor of n (n >= 1) that is <= limit; 1 when limit < 1.
int64_t largest_divisor_at_most(int64_t n, int64_t limit);

struct MicroAccumulation {
  int64_t micro = 0;
  int64_t accumulation = 0;
};

// The next smaller setting after an out-of-memory at (micro, accumulation):
// micro' = the largest divisor of micro strictly below it (micro / its smallest
// prime factor), accumulation' = micro × accumulation / micro'. nullopt when
// micro is 1 (nothing smaller to try).
//
// Why a divisor of micro, not merely of micro × accumulation: each micro batch
// the loader already assembled splits into exactly micro / micro' pieces, so the
// failed step is retried on the same sequences in the same order with the same
// loss normalisation; a divisor of the product alone (4 → 3 for a batch of 12)
// would regroup sequences across micro batches. The price: a prime micro drops
// straight to 1 (7 → 1), where 6 → 3 → 1 halves gently. Sequences: 12 → 6 → 3 → 1,
// 8 → 4 → 2 → 1.
std::optional<MicroAccumulation> oom_fallback(int64_t micro, int64_t accumulation);

}  // namespace qlora::plan
