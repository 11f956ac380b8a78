// train/schedule: learning-rate schedules, with Hugging Face transformers' semantics.
//
// The trainer asks for the learning rate of each optimizer step and passes it to the
// optimizer as data (nothing is baked into a graph). Values equal transformers'
// LambdaLR schedules step for step (tests/test_train_schedule.cpp against
// scripts/golden/schedule.py):
//   constant  get_constant_schedule, or get_constant_schedule_with_warmup when the
//             warmup is > 0 (transformers spells that "constant_with_warmup")
//   linear    get_linear_schedule_with_warmup   (0 -> base over warmup, then down to 0)
//   cosine    get_cosine_schedule_with_warmup   (num_cycles 0.5: half a cosine to 0)
// Torch-free.
#pragma once

#include <cstdint>

#include "qlora/config/config.h"

namespace qlora::train {

// Warmup length as TrainingArguments.get_warmup_steps resolves it: `warmup_steps`
// when > 0, else ceil(total_steps * warmup_ratio) in double precision (so
// 100 * 0.07 = 7.000000000000001 gives 8, exactly as transformers does).
// Throws InputError on negative inputs.
int64_t resolve_warmup_steps(int64_t warmup_steps, double warmup_ratio, int64_t total_steps);

// The multiplier of the base learning rate before optimizer step `step` (0-based:
// the first update uses step 0), the lr_lambda of the transformers schedule.
double lr_multiplier(LrSchedule kind, int64_t step, int64_t warmup_steps, int64_t total_steps);

class LrScheduler {
 public:
  // total_steps: optimizer steps of the whole run (>= 1); warmup_steps already resolved.
  LrScheduler(LrSchedule kind, double base_lr, int64_t total_steps, int64_t warmup_steps);

  // Learning rate for optimizer step `step` (0-based): base_lr * lr_multiplier(...).
  double lr_at(int64_t step) const;

  LrSchedule kind() const { return kind_; }
  double base_lr() const { return base_lr_; }
  int64_t total_steps() const { return total_steps_; }
  int64_t warmup_steps() const { return warmup_steps_; }

 private:
  LrSchedule kind_;
  double base_lr_;
  int64_t total_steps_;
  int64_t warmup_steps_;
};

// From the config: train.lr_scheduler, train.learning_rate, train.warmup_steps /
// train.warmup_ratio, for a run of `total_steps` optimizer steps.
LrScheduler make_lr_scheduler(const TrainConfig& train, int64_t total_steps);

}  // namespace qlora::train
