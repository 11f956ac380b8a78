// amp/scaler: the dynamic loss scaler (torch.amp.GradScaler semantics) and the inf/nan
// step policy.
//
// With fp16 autocast, small gradients underflow; the loss is multiplied by a scale before
// backward and the gradients divided by it before clipping and the optimizer step. A step
// whose gradients hold an inf or nan is skipped (parameters and optimizer state untouched)
// and the scale halves; after growth_interval clean steps in a row it doubles. The scale
// sequence equals PyTorch's GradScaler's for the same non-finite steps
// (tests/test_amp_scaler.cpp against scripts/golden/amp.py). bf16 and fp32 runs construct
// the scaler disabled: scale 1, nothing unscaled, but non-finite steps are still skipped.
//
// Order inside one optimizer step (the trainer's recipe):
//   loss_for_backward = scaler.scale(loss); backward ...       (every micro-batch)
//   bool bad = scaler.unscale(grads);    // grads /= scale, in place; once per step
//   clip grad norm (on unscaled grads)   // skip clipping when bad: the norm is inf/nan
//   if (!bad) optimizer.step(lr);
//   scaler.update();                     // uses this step's inf/nan verdict
//   policy.record(bad);                  // throws TrainingDiverged after N in a row
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace qlora::amp {

// ---------------------------------------------------------------- reference pieces

// GradScaler's fp32 inverse: (1 / double(scale)) rounded to fp32.
float inverse_scale(float scale);

// grad[i] *= inv_scale (skipped when inv_scale == 1, as torch does); returns whether any
// element was inf or nan (checked on the scaled values).
bool unscale_and_check(float* grad, int64_t n, float inv_scale);

// torch._amp_update_scale_: on inf/nan scale *= backoff and the tracker resets; otherwise
// the tracker counts clean steps and at growth_interval the scale grows by growth_factor
// unless that would overflow fp32 (then it stays), and the tracker resets.
void update_scale(float& scale, int32_t& growth_tracker, bool found_inf, double growth_factor,
                  double backoff_factor, int64_t growth_interval);

// ---------------------------------------------------------------- the scaler

struct LossScalerOptions {
  bool enabled = true;            // false for bf16 / fp32: scale stays 1
  double init_scale = 65536.0;    // 2^16
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  int64_t growth_interval = 2000;
};

struct LossScalerState {
  float scale = 65536.0f;
  int32_t growth_tracker = 0;
};

class LossScaler {
 public:
  explicit LossScaler(LossScalerOptions options = {});

  // loss * scale (the loss itself when disabled).
  at::Tensor scale(const at::Tensor& loss) const;

  // Divides every defined gradient by the scale in place and checks them all for inf/nan.
  // Call once per optimizer step, after the last backward of the accumulation window;
  // returns true when the step must be skipped. A second call in the same step returns the
  // same verdict without touching the gradients again.
  bool unscale(const std::vector<at::Tensor>& grads);
  // Disabled scaler only (nothing to divide): unscale() with the inf/nan check made elsewhere,
  // `found_inf` (the trainer reads the gradients' norm with the loss and checks that: Note [one
  // read at the step's end] in src/train/trainer.cpp). Returns it.
  bool unscale_checked(bool found_inf);

  // Closes the step: applies update_scale with this step's verdict (enabled) and re-arms
  // unscale(). Must follow unscale().
  void update();

  bool found_inf() const { return found_inf_; }
  float current_scale() const { return state_.scale; }
  bool enabled() const { return options_.enabled; }
  const LossScalerOptions& options() const { return options_; }

  // For checkpoints: the scale and the clean-step tracker.
  LossScalerState state() const { return state_; }
  void load_state(const LossScalerState& s);

 private:
  LossScalerOptions options_;
  LossScalerState state_;
  bool unscaled_ = false;
  bool found_inf_ = false;
};

// ---------------------------------------------------------------- inf/nan policy

// Raised when too many optimizer steps in a row had a non-finite loss or gradient.
class TrainingDiverged : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Skip-and-count policy for non-finite steps (train.max_bad_steps).
class BadStepPolicy {
 public:
  // max_in_a_row >= 1: record() throws after that many bad steps in a row; 0 never throws.
  explicit BadStepPolicy(int64_t max_in_a_row);

  // Records one optimizer step; returns true when it was bad (and so skipped). Throws
  // TrainingDiverged, saying what to change, when the limit is reached.
  bool record(bool bad, int64_t step = -1);

  int64_t in_a_row() const { return in_a_row_; }
  int64_t total() const { return total_; }
  int64_t max_in_a_row() const { return max_in_a_row_; }
  // For checkpoints: the counters as saved.
  void restore(int64_t in_a_row, int64_t total) {
    in_a_row_ = in_a_row;
    total_ = total;
  }

 private:
  int64_t max_in_a_row_;
  int64_t in_a_row_ = 0;
  int64_t total_ = 0;
};

}  // namespace qlora::amp
