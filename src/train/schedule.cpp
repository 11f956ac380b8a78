// Learning-rate schedules. Note [schedule arithmetic]: every expression below is
// written in the order and precision (double) of transformers' lr_lambda functions
// (transformers/optimization.py) and LambdaLR's `base_lr * lambda(step)`, so the values
// agree to the last bit, not just approximately; keep the operation order when editing.
#include "qlora/train/schedule.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "qlora/common/errors.h"

namespace qlora::train {

namespace {

constexpr double kPi = 3.141592653589793;   // math.pi
constexpr double kCosineCycles = 0.5;       // transformers' default num_cycles

double warmup_fraction(int64_t step, int64_t warmup_steps) {
  return static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, warmup_steps));
}

}  // namespace

int64_t resolve_warmup_steps(int64_t warmup_steps, double warmup_ratio, int64_t total_steps) {
  if (warmup_steps < 0)
    throw InputError("train.warmup_steps: expected >= 0, got " + std::to_string(warmup_steps));
  if (!(warmup_ratio >= 0.0 && warmup_ratio <= 1.0))
    throw InputError("train.warmup_ratio: expected a fraction in [0, 1], got " + std::to_string(warmup_ratio));
  if (total_steps < 0)
    throw InputError("total optimizer steps: expected >= 0, got " + std::to_string(total_steps));
  if (warmup_steps > 0) return warmup_steps;
  return static_cast<int64_t>(std::ceil(static_cast<double>(total_steps) * warmup_ratio));
}

double lr_multiplier(LrSchedule kind, int64_t step, int64_t warmup_steps, int64_t total_steps) {
  if (step < warmup_steps) return warmup_fraction(step, warmup_steps);
  switch (kind) {
    case LrSchedule::kConstant:
      return 1.0;
    case LrSchedule::kLinear:
      return std::max(0.0, static_cast<double>(total_steps - step) /
                               static_cast<double>(std::max<int64_t>(1, total_steps - warmup_steps)));
    case LrSchedule::kCosine: {
      const double progress = static_cast<double>(step - warmup_steps) /
                              static_cast<double>(std::max<int64_t>(1, total_steps - warmup_steps));
      return std::max(0.0, 0.5 * (1.0 + std::cos(kPi * kCosineCycles * 2.0 * progress)));
    }
  }
  return 1.0;
}

LrScheduler::LrScheduler(LrSchedule kind, double base_lr, int64_t total_steps, int64_t warmup_steps)
    : kind_(kind), base_lr_(base_lr), total_steps_(total_steps), warmup_steps_(warmup_steps) {
  if (!(base_lr >= 0.0) || !std::isfinite(base_lr))
    throw InputError("train.learning_rate: expected a finite value >= 0, got " + std::to_string(base_lr));
  if (total_steps < 1)
    throw InputError("total optimizer steps: expected >= 1, got " + std::to_string(total_steps) +
                     "; set train.max_steps or train.epochs so that the run has at least one step");
  if (warmup_steps < 0)
    throw InputError("train.warmup_steps: expected >= 0, got " + std::to_string(warmup_steps));
}

double LrScheduler::lr_at(int64_t step) const {
  return base_lr_ * lr_multiplier(kind_, step, warmup_steps_, total_steps_);
}

LrScheduler make_lr_scheduler(const TrainConfig& train, int64_t total_steps) {
  const int64_t warmup = resolve_warmup_steps(train.warmup_steps, train.warmup_ratio, total_steps);
  return LrScheduler(train.lr_scheduler, train.learning_rate, total_steps, warmup);
}

}  // namespace qlora::train
