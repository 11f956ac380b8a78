// Dynamic loss scaling with torch.amp.GradScaler's arithmetic (ATen's
// _amp_foreach_non_finite_check_and_unscale_ and _amp_update_scale_ CPU kernels).
#include "qlora/amp/scaler.h"

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

namespace qlora::amp {

float inverse_scale(float scale) { return static_cast<float>(1.0 / static_cast<double>(scale)); }

bool unscale_and_check(float* grad, int64_t n, float inv_scale) {
  bool found = false;
  for (int64_t i = 0; i < n; ++i) {
    const float g = grad[i];
    if (!std::isfinite(g)) found = true;
    if (inv_scale != 1.0f) grad[i] = g * inv_scale;
  }
  return found;
}

void update_scale(float& scale, int32_t& growth_tracker, bool found_inf, double growth_factor,
                  double backoff_factor, int64_t growth_interval) {
  if (found_inf) {
    scale = static_cast<float>(static_cast<double>(scale) * backoff_factor);
    growth_tracker = 0;
    return;
  }
  const int32_t successful = growth_tracker + 1;
  if (successful == growth_interval) {
    const float grown = static_cast<float>(static_cast<double>(scale) * growth_factor);
    if (std::isfinite(grown)) scale = grown;   // never grow past fp32's range to inf
    growth_tracker = 0;
  } else {
    growth_tracker = successful;
  }
}

LossScaler::LossScaler(LossScalerOptions options) : options_(options) {
  TORCH_CHECK(options_.init_scale > 0.0 && std::isfinite(options_.init_scale),
              "loss scaler: init_scale must be finite and > 0, got ", options_.init_scale);
  TORCH_CHECK(options_.growth_factor > 1.0, "loss scaler: growth_factor must be > 1, got ", options_.growth_factor);
  TORCH_CHECK(options_.backoff_factor > 0.0 && options_.backoff_factor < 1.0,
              "loss scaler: backoff_factor must be in (0, 1), got ", options_.backoff_factor);
  TORCH_CHECK(options_.growth_interval >= 1, "loss scaler: growth_interval must be >= 1, got ",
              options_.growth_interval);
  state_.scale = options_.enabled ? static_cast<float>(options_.init_scale) : 1.0f;
}

at::Tensor LossScaler::scale(const at::Tensor& loss) const {
  if (!options_.enabled) return loss;
  return loss * static_cast<double>(state_.scale);
}

bool LossScaler::unscale(const std::vector<at::Tensor>& grads) {
  if (unscaled_) return found_inf_;
  const float inv = options_.enabled ? inverse_scale(state_.scale) : 1.0f;
  bool found = false;
  std::vector<at::Tensor> device_grads;  // GPU gradients: one multi-tensor kernel, one sync
  for (const at::Tensor& g : grads) {
    if (!g.defined()) continue;
    TORCH_CHECK(g.scalar_type() == at::kFloat, "loss scaler: gradients must be fp32 (master weights), got ",
                g.scalar_type());
    if (!g.device().is_cpu()) {
      device_grads.push_back(g);
      continue;
    }
    TORCH_CHECK(g.is_contiguous(), "loss scaler: gradients must be contiguous");
    found = unscale_and_check(g.data_ptr<float>(), g.numel(), inv) || found;
  }
  if (!device_grads.empty()) {
    // torch.amp.GradScaler's kernel: the same fp32 multiply by 1/scale as
    // unscale_and_check, and a flag set where any product is inf or NaN.
    const auto opts = device_grads.front().options();
    at::Tensor found_inf = at::zeros({1}, opts);
    const at::Tensor inv_scale = at::full({1}, inv, opts);
    at::_amp_foreach_non_finite_check_and_unscale_(device_grads, found_inf, inv_scale);
    found = found_inf.item<float>() != 0.0f || found;
  }
  found_inf_ = found;
  unscaled_ = true;
  return found_inf_;
}

bool LossScaler::unscale_checked(bool found_inf) {
  TORCH_CHECK(!options_.enabled, "loss scaler: unscale_checked() is for a disabled scaler (an enabled one divides)");
  if (unscaled_) return found_inf_;
  found_inf_ = found_inf;
  unscaled_ = true;
  return found_inf_;
}

void LossScaler::update() {
  TORCH_CHECK(unscaled_, "loss scaler: update() called without unscale() in this step");
  if (options_.enabled)
    update_scale(state_.scale, state_.growth_tracker, found_inf_, options_.growth_factor, options_.backoff_factor,
                 options_.growth_interval);
  unscaled_ = false;
  found_inf_ = false;
}

void LossScaler::load_state(const LossScalerState& s) {
  TORCH_CHECK(s.scale > 0.0f && std::isfinite(s.scale), "loss scaler: saved scale must be finite and > 0, got ",
              s.scale);
  TORCH_CHECK(s.growth_tracker >= 0, "loss scaler: saved growth_tracker must be >= 0, got ", s.growth_tracker);
  state_ = s;
  unscaled_ = false;
  found_inf_ = false;
}

BadStepPolicy::BadStepPolicy(int64_t max_in_a_row) : max_in_a_row_(max_in_a_row) {
  TORCH_CHECK(max_in_a_row >= 0, "train.max_bad_steps must be >= 0, got ", max_in_a_row);
}

bool BadStepPolicy::record(bool bad, int64_t step) {
  if (!bad) {
    in_a_row_ = 0;
    return false;
  }
  ++in_a_row_;
  ++total_;
  if (max_in_a_row_ > 0 && in_a_row_ >= max_in_a_row_) {
    throw TrainingDiverged(
        "training diverged: " + std::to_string(in_a_row_) + " optimizer steps in a row had an inf or nan loss or "
        "gradient" + (step >= 0 ? " (last at step " + std::to_string(step) + ")" : std::string()) + ", " +
        std::to_string(total_) + " in all; every one was skipped. Lower train.learning_rate, keep "
        "train.max_grad_norm > 0, use train.precision: bf16 where the GPU supports it, or raise "
        "train.max_bad_steps (0 never stops)");
  }
  return true;
}

}  // namespace qlora::amp
