// train/trainer: one optimizer step of QLoRA fine-tuning, as a recipe.
//
// A step takes the micro batches of one accumulation window and:
//   1. counts the target tokens of the whole window (labels != -100 after the
//      next-token shift), summed over ranks when StepOptions::group spans
//      several processes (dist/group.h);
//   2. for each micro batch: forward to the final hidden states, the summed
//      chunked cross-entropy, loss = sum / window_tokens (times the loss scale
//      when the scaler is enabled), backward. Gradients accumulate in .grad();
//   3. unscales (amp::LossScaler), clips the total gradient norm of the LoRA
//      parameters (fp32) to max_grad_norm (after the LoRA gradients were summed
//      over ranks: Note [what crosses ranks] in dist/group.h), skips the update on inf/nan
//      (amp::BadStepPolicy), else steps the optimizer with the schedule's
//      learning rate; then zeroes the gradients.
// Note [out-of-memory retry]: a micro batch that runs out of device memory
// (c10::OutOfMemoryError) does not end the run. The window's gradients and
// generator draws are dropped, the allocator's cache released, and the window
// runs again with every micro batch cut into pieces of fewer rows
// (plan::oom_fallback: 8 -> 4 -> 2 -> 1 rows); the pieces keep the window's
// token divisor, so the gradient is the one the whole batches give (up to
// summation order; with LoRA dropout the pieces draw their masks piece by
// piece: other draws of the same distribution). The smaller size sticks for the rest of the run (and goes
// into checkpoints). Only when one row does not fit does the step report
// out_of_memory, for the caller to save and stop.
// Note [token-normalized accumulation]: dividing each micro batch's sum by the
// tokens of the WHOLE window makes the accumulated gradient the gradient of the
// window's token mean, exactly what one big batch gives; a per-micro-batch mean
// weighs tokens of short micro batches more and so differs whenever micro
// batches hold different numbers of target tokens
// (tests/test_train_accumulation.cpp shows both).
// Weight decay lives in the optimizer (AdamWOptions::weight_decay).
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "qlora/config/config.h"
#include "qlora/data/batch.h"
#include "qlora/model/decoder.h"
#include "qlora/train/schedule.h"

namespace qlora {
namespace optim {
class Optimizer;
}
namespace data {
class DataLoader;
}
namespace amp {
class LossScaler;
class BadStepPolicy;
}  // namespace amp
namespace dist {
class Group;
}
}  // namespace qlora

namespace qlora::train {

// ---------------------------------------------------------------- pieces

// The random generators a training step draws from (LoRA dropout): the default
// CPU generator, plus the device's when the model is on a GPU; named "cpu" /
// "cuda" as checkpoints store them. An abandoned window restores them, a
// checkpoint saves them.
std::vector<std::pair<std::string, at::Generator>> step_generators(c10::Device device);

// Target tokens of one micro batch as the loss counts them: labels that are
// not kIgnoreIndex after model::shift_labels (a row's first label never counts,
// and in a packed row no example predicts the next one's first token). This is
// at most Batch::trained_tokens, which counts before the shift.
int64_t target_tokens(const data::Batch& batch);

// torch.nn.utils.clip_grad_norm_ semantics over the defined gradients of
// `params`: the total 2-norm (in fp32) of all gradients, and when max_norm > 0
// and the norm exceeds it, every gradient multiplied by max_norm / (norm + 1e-6).
// Returns the norm before clipping (inf/nan when a gradient holds one; then
// nothing is scaled). max_norm <= 0 only measures.
double clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm);

// clip_grad_norm in two halves, so the host can read the norm with other numbers in one copy:
// the total norm of `grads` on their device ([] fp32, undefined when there are none), and the
// clipping by it given its value read back (`norm`; nothing scaled when max_norm <= 0, the
// norm is not finite or within max_norm).
at::Tensor grad_norm_on_device(const std::vector<at::Tensor>& grads);
void clip_by_norm(const std::vector<at::Tensor>& grads, const at::Tensor& total, double norm, double max_norm);

// Optimizer steps of a run, as transformers' Trainer counts them: max_steps when
// > 0, else ceil(epochs * max(1, micro_batches_per_epoch / accumulation)) with
// integer division (a trailing partial window of an epoch is not a step).
// Throws InputError when neither gives at least one step.
int64_t total_optimizer_steps(const TrainConfig& train, int64_t micro_batches_per_epoch);

// ---------------------------------------------------------------- one step

// One decoder layer's forward (model/decoder.h); checkpointing (train/checkpoint.h) and the
// fused layer (layer/fused_layer.h, chosen by train/layer_choice.h) supply ones that recompute
// in backward.
using LayerForwardFn = model::LayerForwardFn;

// The summed cross-entropy of one micro batch (differentiable when grad mode is
// on) and its target-token count; layers run through `layer_forward` when given.
// Packed rows get the packed attention mask, padded rows the padding mask.
std::pair<at::Tensor, int64_t> batch_loss(const model::DecoderModel& model, const data::Batch& batch,
                                          int64_t loss_chunk, const LayerForwardFn& layer_forward = {});

struct StepOptions {
  double max_grad_norm = 1.0;  // 0 disables clipping (the norm is still reported)
  int64_t loss_chunk = 1024;   // tokens per chunk of the cross-entropy
  // The data-parallel group (must outlive the trainer); null or one process:
  // nothing is communicated. With several ranks, token counts, the loss sum and
  // the LoRA gradients are summed over ranks, so every rank takes the same step.
  const dist::Group* group = nullptr;
  // When true, layers run through `layer_forward`, which the activation-
  // checkpointing module provides (train/checkpoint.h: checkpointed_layer_forward);
  // true without a layer_forward throws std::invalid_argument.
  bool gradient_checkpointing = false;
  LayerForwardFn layer_forward;  // empty: model.layer_forward
  // Polled before each micro batch after the first (argument: micro batches
  // done in this window); true abandons the window: gradients are dropped,
  // nothing is updated, the step is not counted (StepStats::aborted).
  std::function<bool(int64_t micro_done)> interrupted;
};

struct StepStats {
  double loss = 0.0;       // token mean of the cross-entropy over the window, all ranks
  double grad_norm = 0.0;  // total norm before clipping (inf/nan on a bad step)
  double lr = 0.0;         // learning rate of this step (applied unless skipped)
  int64_t tokens = 0;      // target tokens of the window, all ranks
  int64_t input_tokens = 0;  // real (non-padding) tokens of the window, all ranks
  bool skipped = false;    // no update: inf/nan gradients, or no target token at all
  bool aborted = false;    // StepOptions::interrupted fired mid-window: no step at all
  bool out_of_memory = false;  // even one-row micro batches ran out of memory: no step at all
};

// What step 2 of the recipe leaves behind, before the update.
struct AccumulatedWindow {
  double loss_sum = 0.0;      // summed cross-entropy of the window's micro batches, all ranks
  // Note [one read at the step's end] (src/train/trainer.cpp): the gradients' total norm, read
  // with the loss by train_step when the loss scaler is off and there is one process.
  std::optional<double> grad_norm;
  at::Tensor grad_norm_total;  // its [] fp32 tensor on the device, for the clipping coefficient
  int64_t window_tokens = 0;  // divisor used: target tokens of the window, all ranks
  int64_t input_tokens = 0;   // real tokens of the window, all ranks
  bool aborted = false;       // interrupted mid-window; gradients already dropped
  bool out_of_memory = false; // Note [out-of-memory retry]: nothing fits; gradients dropped
};

class Trainer {
 public:
  // Every reference must outlive the trainer. `params` are the trainable tensors
  // (the LoRA A and B of every adapted module), the ones `optimizer` updates.
  Trainer(model::DecoderModel& model, std::vector<at::Tensor> params, optim::Optimizer& optimizer,
          LrScheduler scheduler, amp::LossScaler& scaler, amp::BadStepPolicy& bad_steps,
          StepOptions options = {});

  // One optimizer step over the micro batches of one accumulation window.
  StepStats train_step(const std::vector<data::Batch>& window);

  // The recipe in two halves, public so tests can read the accumulated
  // gradients before anything changes them.
  AccumulatedWindow accumulate_gradients(const std::vector<data::Batch>& window);
  StepStats apply_gradients(const AccumulatedWindow& window);

  // The summed cross-entropy of one micro batch (differentiable) and its
  // target-token count; no backward.
  std::pair<at::Tensor, int64_t> micro_batch_loss(const data::Batch& batch) const;

  // Drops every gradient of the trainable parameters (set_to_none).
  void zero_grads();

  // Rows per micro batch the trainer runs at most (0: as the loader made
  // them); lowered by Note [out-of-memory retry], saved in checkpoints.
  int64_t max_micro_rows() const { return max_micro_rows_; }
  void set_max_micro_rows(int64_t rows) { max_micro_rows_ = rows; }

  int64_t step() const { return step_; }  // optimizer steps taken (skipped ones included)
  void set_step(int64_t step) { step_ = step; }  // resume: the steps a checkpoint had taken
  const LrScheduler& scheduler() const { return scheduler_; }
  const StepOptions& options() const { return options_; }

 private:
  model::DecoderModel& model_;
  std::vector<at::Tensor> params_;
  optim::Optimizer& optimizer_;
  LrScheduler scheduler_;
  amp::LossScaler& scaler_;
  amp::BadStepPolicy& bad_steps_;
  StepOptions options_;
  int64_t step_ = 0;
  int64_t max_micro_rows_ = 0;

  // Step 2 of the recipe for one attempt; false when interrupted mid-window.
  // read_norm: Note [one read at the step's end] (train_step: nothing changes the gradients
  // between the two halves).
  bool run_micro_batches(const std::vector<data::Batch>& window, AccumulatedWindow& acc, bool read_norm);
  AccumulatedWindow accumulate(const std::vector<data::Batch>& window, bool read_norm);
};

// ---------------------------------------------------------------- the loop

// What the loop reports after every optimizer step.
struct StepEvent {
  int64_t step = 0;     // 1-based optimizer step just taken
  int64_t total = 0;    // optimizer steps of the whole run
  StepStats stats;
  double step_seconds = 0.0;       // wall time of this step
  int64_t input_tokens = 0;        // real (non-padding) tokens of the step, all ranks
  double tokens_per_second = 0.0;  // input_tokens / step_seconds (what throughput means to users)
  double eta_seconds = 0.0;        // remaining steps × mean step time of this call (steps only)
};

// Called after every optimizer step: progress, metrics, evaluation and
// checkpoints hang here. Returning false stops the loop after this step
// (a signal asked to stop; the caller saves).
using StepCallback = std::function<bool(const StepEvent& event)>;

struct LoopSummary {
  int64_t steps = 0;    // optimizer steps taken by this call
  int64_t skipped = 0;  // of which skipped (inf/nan, or no target token)
  int64_t tokens = 0;   // target tokens seen (all ranks)
  double first_loss = 0.0;
  double last_loss = 0.0;
  double seconds = 0.0;
  bool stopped = false;  // on_step asked to stop before the last step
  bool out_of_memory = false;  // stopped because a step did not fit even at one row per micro batch
};

// "step 10/200 | loss 2.3456 | lr 1.20e-04 | grad norm 0.532 | 1234 tok/s"
// (" | skipped" appended on a skipped step).
std::string format_step_line(int64_t step, int64_t total, const StepStats& stats, double tokens_per_second);

// Runs the trainer until total_optimizer_steps(cfg.train, loader.steps_in_epoch(0))
// optimizer steps are done (continuing from trainer.step(), so a restored
// trainer and loader resume), each step taking train.gradient_accumulation_steps
// micro batches from `loader` (epochs roll over inside the loader, so a window
// may straddle two epochs), or until on_step returns false, or until the
// trainer's `interrupted` abandons a window (then the loader is put back to
// the window's start, so a checkpoint taken now resumes with that window).
// Without on_step it
// logs format_step_line every output.logging_steps steps (and the last). The
// trainer's schedule must span the same number of steps
// (make_lr_scheduler(cfg.train, total)): std::invalid_argument otherwise.
LoopSummary train_loop(const Config& cfg, Trainer& trainer, data::DataLoader& loader,
                       const StepCallback& on_step = {});

}  // namespace qlora::train
