#include "qlora/train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/grad_mode.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

#include "qlora/amp/scaler.h"
#include "qlora/common/errors.h"
#include "qlora/common/log.h"
#include "qlora/data/loader.h"
#include "qlora/data/batch_tensors.h"
#include "qlora/dist/group.h"
#include "qlora/model/decoder.h"
#include "qlora/model/loss.h"
#include "qlora/optim/optimizer.h"
#include "qlora/plan/finder.h"
#include "qlora/train/memory.h"

namespace qlora::train {

// ---------------------------------------------------------------- pieces

std::vector<std::pair<std::string, at::Generator>> step_generators(c10::Device device) {
  std::vector<std::pair<std::string, at::Generator>> g = {{"cpu", at::globalContext().defaultGenerator(c10::kCPU)}};
  if (device.is_cuda()) g.emplace_back("cuda", at::globalContext().defaultGenerator(device));
  return g;
}

int64_t target_tokens(const data::Batch& batch) {
  // Label of token c + 1 is what position c predicts; position 0's own label
  // is never a target (the row-wise shift of model::shift_labels).
  int64_t n = 0;
  for (int64_t r = 0; r < batch.rows; ++r)
    for (int64_t c = 1; c < batch.cols; ++c)
      if (batch.labels[batch.at(r, c)] != model::kIgnoreIndex) ++n;
  return n;
}

// Every row's mask is ones then zeros (collate_padded places examples at column 0).
static bool right_padded(const data::Batch& batch) {
  for (int64_t r = 0; r < batch.rows; ++r) {
    bool pad_seen = false;
    for (int64_t c = 0; c < batch.cols; ++c) {
      const bool real = batch.attention_mask[batch.at(r, c)] != 0;
      if (real && pad_seen) return false;
      pad_seen = pad_seen || !real;
    }
  }
  return true;
}

namespace {
bool all_fp32(const std::vector<at::Tensor>& grads) {
  return std::all_of(grads.begin(), grads.end(), [](const at::Tensor& g) { return g.scalar_type() == at::kFloat; });
}

std::vector<at::Tensor> defined_grads(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> grads;
  for (const auto& p : params)
    if (p.grad().defined()) grads.push_back(p.grad());
  return grads;
}
}  // namespace

at::Tensor grad_norm_on_device(const std::vector<at::Tensor>& grads) {
  at::NoGradGuard no_grad;
  if (grads.empty()) return {};
  // One multi-tensor kernel for the per-gradient norms (fp32 master gradients),
  // then the norm of the norms.
  std::vector<at::Tensor> norms;
  if (all_fp32(grads)) {
    norms = at::_foreach_norm(grads, 2);
  } else {
    for (const auto& g : grads) norms.push_back(at::linalg_vector_norm(g.to(at::kFloat), 2));
  }
  return at::linalg_vector_norm(at::stack(norms), 2);  // [] fp32
}

void clip_by_norm(const std::vector<at::Tensor>& grads, const at::Tensor& total, double norm, double max_norm) {
  at::NoGradGuard no_grad;
  // torch's clip_grad_norm_: coefficient max_norm / (norm + 1e-6), clamped to 1,
  // computed in fp32 and always applied (x * 1.0 is x); a non-finite norm scales
  // nothing here (the step is skipped by the bad-step policy instead of writing NaN grads).
  if (grads.empty() || !(max_norm > 0 && std::isfinite(norm) && max_norm / (norm + 1e-6) < 1.0)) return;
  const at::Tensor coef = at::clamp_max(max_norm / (total + 1e-6), 1.0);  // [] fp32
  if (all_fp32(grads)) {
    at::_foreach_mul_(grads, coef);
  } else {
    for (const auto& g : grads) g.mul_(coef.to(g.scalar_type()));
  }
}

double clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm) {
  const std::vector<at::Tensor> grads = defined_grads(params);
  if (grads.empty()) return 0.0;
  const at::Tensor total = grad_norm_on_device(grads);
  const double norm = total.item<double>();  // the host reads one number
  clip_by_norm(grads, total, norm, max_norm);
  return norm;
}

int64_t total_optimizer_steps(const TrainConfig& train, int64_t micro_batches_per_epoch) {
  if (train.max_steps > 0) return train.max_steps;
  if (train.gradient_accumulation_steps < 1)
    throw InputError("train.gradient_accumulation_steps must be >= 1, got " +
                     std::to_string(train.gradient_accumulation_steps));
  const int64_t per_epoch = std::max<int64_t>(1, micro_batches_per_epoch / train.gradient_accumulation_steps);
  const auto steps = static_cast<int64_t>(std::ceil(train.epochs * static_cast<double>(per_epoch)));
  if (micro_batches_per_epoch < 1 || steps < 1)
    throw InputError("the run would take no optimizer step: train.epochs = " + std::to_string(train.epochs) +
                     ", " + std::to_string(micro_batches_per_epoch) +
                     " micro batches per epoch; set train.epochs > 0, or train.max_steps, or add data");
  return steps;
}

std::pair<at::Tensor, int64_t> batch_loss(const model::DecoderModel& model, const data::Batch& batch,
                                          int64_t loss_chunk, const LayerForwardFn& layer_forward) {
  const c10::Device device = model.device();
  const data::BatchTensors t = data::to_tensors(batch);
  // A row holding more than one example is packed: attention must stop at
  // example boundaries and positions restart (Note [packed attention]).
  // Decided on the host copy: no device sync per micro batch.
  const bool packed = std::any_of(batch.segment_ids.begin(), batch.segment_ids.end(), [](int32_t s) { return s > 1; });
  model::AttentionInputs attention;
  if (packed) {
    // The examples' boundaries (model::PackedRows) are read from the host copy of the segment
    // ids too; only their offsets go to the device, without a sync, and no [B, 1, T, T] mask.
    attention = model::packed_attention(t.segment_ids, model::upload(t.position_ids, device));
  } else if (right_padded(batch)) {
    // Note [right padding needs no mask]: a real token attends only to earlier
    // positions, all real when padding comes last, so causal attention gives every
    // real token (the only ones with a loss) what the padding mask gives it, and
    // takes SDPA's flash kernels with grouped kv heads instead of a [B, 1, T, T] mask.
    attention = model::causal_attention(batch.rows, batch.cols, device);
  } else {
    attention = model::padded_attention(model::upload(t.attention_mask, device));
  }
  const at::Tensor input_ids = model::upload(t.input_ids, device);
  // The labels stay on the host: the loss checks their range there and uploads them
  // without a device sync (model::chunked_cross_entropy).
  const at::Tensor labels = model::shift_labels(t.labels).reshape({-1});  // [B*T] int64, CPU
  at::Tensor hidden;  // [B, T, h]
  if (!layer_forward) {
    hidden = model.forward_hidden(input_ids, attention);
  } else {
    hidden = model.embed(input_ids);
    const auto cos_sin = model.rope(attention.position_ids);
    for (int64_t l = 0; l < model.num_layers(); ++l) hidden = layer_forward(l, hidden, cos_sin, attention);
    hidden = model.final_norm(hidden);
  }
  const model::TokenLoss loss =
      model::chunked_cross_entropy(hidden.reshape({-1, hidden.size(-1)}), model.lm_head_weight(), labels, loss_chunk,
                                   model.config().final_logit_softcapping);
  // The count on the host (the same labels, counted before they went to the
  // device): no device sync per micro batch.
  return {loss.sum, target_tokens(batch)};
}

// ---------------------------------------------------------------- the trainer

Trainer::Trainer(model::DecoderModel& model, std::vector<at::Tensor> params, optim::Optimizer& optimizer,
                 LrScheduler scheduler, amp::LossScaler& scaler, amp::BadStepPolicy& bad_steps,
                 StepOptions options)
    : model_(model),
      params_(std::move(params)),
      optimizer_(optimizer),
      scheduler_(std::move(scheduler)),
      scaler_(scaler),
      bad_steps_(bad_steps),
      options_(std::move(options)) {
  if (options_.gradient_checkpointing && !options_.layer_forward)
    throw std::invalid_argument(
        "Trainer: gradient_checkpointing needs a checkpointed layer_forward (train/checkpoint.h), none given");
  if (options_.loss_chunk < 1)
    throw std::invalid_argument("Trainer: loss_chunk must be >= 1, got " + std::to_string(options_.loss_chunk));
}

StepStats Trainer::train_step(const std::vector<data::Batch>& window) {
  const AccumulatedWindow acc = accumulate(window, /*read_norm=*/true);
  if (acc.aborted || acc.out_of_memory) {
    StepStats stats;
    stats.aborted = acc.aborted;
    stats.out_of_memory = acc.out_of_memory;
    return stats;
  }
  return apply_gradients(acc);
}

std::pair<at::Tensor, int64_t> Trainer::micro_batch_loss(const data::Batch& batch) const {
  return batch_loss(model_, batch, options_.loss_chunk, options_.layer_forward);
}

AccumulatedWindow Trainer::accumulate_gradients(const std::vector<data::Batch>& window) {
  return accumulate(window, /*read_norm=*/false);
}

AccumulatedWindow Trainer::accumulate(const std::vector<data::Batch>& window, bool read_norm) {
  AccumulatedWindow acc;
  const dist::Group* group = options_.group != nullptr && options_.group->distributed() ? options_.group : nullptr;
  int64_t counts[2] = {0, 0};  // target tokens (the loss divisor), real input tokens
  for (const auto& b : window) {
    counts[0] += target_tokens(b);
    for (const uint8_t m : b.attention_mask) counts[1] += m;
  }
  if (group != nullptr) {
    const at::Tensor t = at::tensor(at::ArrayRef<int64_t>(counts, 2));  // [2] int64
    group->all_reduce_sum({t});
    counts[0] = t[0].item<int64_t>();
    counts[1] = t[1].item<int64_t>();
  }
  acc.window_tokens = counts[0];
  acc.input_tokens = counts[1];
  if (acc.window_tokens == 0) return acc;  // nothing to learn from on any rank: apply_gradients skips

  // An abandoned or out-of-memory window must leave no trace, the dropout
  // draws of its micro batches included: keep the generators' states.
  std::vector<std::pair<at::Generator, at::Tensor>> rng_at_start;
  for (auto& [name, g] : step_generators(model_.device())) rng_at_start.emplace_back(g, g.get_state());
  const auto drop_attempt = [&] {
    zero_grads();
    for (auto& [g, state] : rng_at_start) g.set_state(state);
  };

  for (;;) {
    try {
      if (!run_micro_batches(window, acc, read_norm)) {
        drop_attempt();
        acc.aborted = true;
        return acc;
      }
      break;
    } catch (const std::exception& e) {
      if (!is_out_of_memory(e)) throw;
      // Note [out-of-memory retry] (trainer.h).
      drop_attempt();
      release_cached_memory(model_.device());
      int64_t rows = max_micro_rows_;  // the rows that did not fit
      if (rows == 0)
        for (const auto& b : window) rows = std::max(rows, b.rows);
      const auto next = plan::oom_fallback(rows, 1);
      if (!next) {
        acc.out_of_memory = true;
        break;
      }
      max_micro_rows_ = next->micro;
      log::warn("out of memory at " + std::to_string(rows) + " rows per micro batch (step " + std::to_string(step_ + 1) +
                "); retrying the step at " + std::to_string(max_micro_rows_) +
                " rows per micro batch: same sequences, same effective batch, same math");
    }
  }
  if (group != nullptr && group->any(acc.out_of_memory)) {
    acc.out_of_memory = true;  // every rank stops together
    zero_grads();
    return acc;
  }
  if (acc.out_of_memory) return acc;
  if (group != nullptr) {
    // Note [what crosses ranks] (dist/group.h): a rank whose micro batches held
    // no target still takes part, with zero gradients.
    std::vector<at::Tensor> grads;
    for (auto& p : params_) {
      if (!p.grad().defined()) p.mutable_grad() = at::zeros_like(p);
      grads.push_back(p.grad());
    }
    group->all_reduce_sum(grads);
    acc.loss_sum = group->sum(acc.loss_sum);
  }
  return acc;
}

bool Trainer::run_micro_batches(const std::vector<data::Batch>& window, AccumulatedWindow& acc, bool read_norm) {
  // Note [token-normalized accumulation] (trainer.h).
  const double inv_tokens = 1.0 / static_cast<double>(acc.window_tokens);
  std::vector<at::Tensor> sums;  // read once after the window: one device sync, not one per micro batch
  for (size_t i = 0; i < window.size(); ++i) {
    if (i > 0 && options_.interrupted && options_.interrupted(static_cast<int64_t>(i))) return false;
    const bool split = max_micro_rows_ > 0 && window[i].rows > max_micro_rows_;
    const std::vector<data::Batch> pieces =
        split ? data::split_rows(window[i], max_micro_rows_) : std::vector<data::Batch>{};
    const size_t n = split ? pieces.size() : 1;
    for (size_t k = 0; k < n; ++k) {
      // The phases carry user scopes so a profile (bench_train --profile) shows where the
      // host is when the GPU waits.
      at::Tensor sum;
      int64_t count = 0;
      {
        RECORD_USER_SCOPE("qlora::forward");
        std::tie(sum, count) = micro_batch_loss(split ? pieces[k] : window[i]);
      }
      if (count == 0) continue;  // no target: contributes nothing (and no graph to walk)
      sums.push_back(sum.detach());
      RECORD_USER_SCOPE("qlora::backward");
      const at::Tensor loss = scaler_.scale(sum * inv_tokens);  // [] fp32
      torch::autograd::backward({loss});
    }
  }
  acc.loss_sum = 0.0;
  if (!sums.empty()) {
    RECORD_USER_SCOPE("qlora::loss_read");
    // Note [one read at the step's end]: each read-back waits for the GPU to finish, and the
    // GPU then idles while the host launches what follows. A step read three numbers: the
    // losses, the scaler's inf/nan flag and the gradients' norm. With one process and no loss
    // scaler the gradients are final here, so their norm is launched behind the backward and
    // read in the same copy as the losses, and it stands for the inf/nan check (a gradient
    // holding inf or nan makes the norm inf or nan): one wait a step instead of three. With
    // the scaler on (fp16) the gradients are divided first; with several processes they are
    // summed across ranks first: those steps read as before.
    const bool norm_now = read_norm && !scaler_.enabled() &&
                          (options_.group == nullptr || !options_.group->distributed());
    at::Tensor read = at::stack(sums).to(at::kDouble);  // [micro] fp64 (exact from fp32)
    if (norm_now) {
      acc.grad_norm_total = grad_norm_on_device(defined_grads(params_));
      if (acc.grad_norm_total.defined()) read = at::cat({read, acc.grad_norm_total.to(at::kDouble).view({1})});
    }
    const at::Tensor host = read.to(at::kCPU).contiguous();
    const double* v = host.const_data_ptr<double>();
    const auto micro = static_cast<int64_t>(sums.size());
    for (int64_t i = 0; i < micro; ++i) acc.loss_sum += v[i];  // in micro-batch order
    if (norm_now) acc.grad_norm = acc.grad_norm_total.defined() ? v[micro] : 0.0;
  }
  return true;
}

StepStats Trainer::apply_gradients(const AccumulatedWindow& acc) {
  StepStats stats;
  stats.tokens = acc.window_tokens;
  stats.input_tokens = acc.input_tokens;
  stats.lr = scheduler_.lr_at(step_);
  ++step_;
  if (acc.window_tokens == 0) {
    // Every label masked: no gradient, no update, but the schedule moves on so
    // the step count stays that of the run's plan.
    stats.skipped = true;
    zero_grads();
    return stats;
  }
  stats.loss = acc.loss_sum / static_cast<double>(acc.window_tokens);

  const std::vector<at::Tensor> grads = defined_grads(params_);
  RECORD_USER_SCOPE("qlora::apply_gradients");
  const bool bad = (acc.grad_norm ? scaler_.unscale_checked(!std::isfinite(*acc.grad_norm)) : scaler_.unscale(grads)) ||
                   !std::isfinite(stats.loss);
  if (acc.grad_norm) {  // Note [one read at the step's end]: read with the loss
    stats.grad_norm = *acc.grad_norm;
    clip_by_norm(grads, acc.grad_norm_total, stats.grad_norm, bad ? 0.0 : options_.max_grad_norm);
  } else {
    stats.grad_norm = clip_grad_norm(params_, bad ? 0.0 : options_.max_grad_norm);
  }
  if (!bad) optimizer_.step(stats.lr);
  scaler_.update();
  stats.skipped = bad_steps_.record(bad, step_ - 1);
  zero_grads();
  return stats;
}

void Trainer::zero_grads() {
  optimizer_.zero_grad();
  for (auto& p : params_) p.mutable_grad() = at::Tensor();  // set_to_none, as torch
}

// ---------------------------------------------------------------- the loop

std::string format_step_line(int64_t step, int64_t total, const StepStats& stats, double tokens_per_second) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "step %lld/%lld | loss %.4f | lr %.2e | grad norm %.3f | %.0f tok/s%s",
                static_cast<long long>(step), static_cast<long long>(total), stats.loss, stats.lr, stats.grad_norm,
                tokens_per_second, stats.skipped ? " | skipped" : "");
  return buf;
}

LoopSummary train_loop(const Config& cfg, Trainer& trainer, data::DataLoader& loader, const StepCallback& on_step) {
  double step_seconds_sum = 0.0;  // training steps only, for the ETA
  using Clock = std::chrono::steady_clock;
  const int64_t total = total_optimizer_steps(cfg.train, loader.steps_in_epoch(0));
  if (trainer.scheduler().total_steps() != total)
    throw std::invalid_argument("train_loop: the schedule spans " + std::to_string(trainer.scheduler().total_steps()) +
                                " steps but the run has " + std::to_string(total));
  const int64_t accumulation = cfg.train.gradient_accumulation_steps;
  const int64_t every = cfg.output.logging_steps;

  LoopSummary sum;
  const Clock::time_point start = Clock::now();
  while (trainer.step() < total) {
    const Clock::time_point step_start = Clock::now();
    const data::LoaderCursor window_start = loader.cursor();
    std::vector<data::Batch> window;
    {
      RECORD_USER_SCOPE("qlora::next_window");
      for (int64_t i = 0; i < accumulation; ++i) window.push_back(loader.next());
    }
    StepEvent e;
    e.stats = trainer.train_step(window);
    e.input_tokens = e.stats.input_tokens;
    if (e.stats.aborted || e.stats.out_of_memory) {
      loader.restore(window_start);
      sum.stopped = true;
      sum.out_of_memory = e.stats.out_of_memory;
      break;
    }
    e.step = trainer.step();
    e.total = total;
    const Clock::time_point now = Clock::now();
    e.step_seconds = std::chrono::duration<double>(now - step_start).count();
    e.tokens_per_second = e.step_seconds > 0 ? static_cast<double>(e.input_tokens) / e.step_seconds : 0.0;

    if (sum.steps == 0) sum.first_loss = e.stats.loss;
    sum.last_loss = e.stats.loss;
    ++sum.steps;
    sum.skipped += e.stats.skipped ? 1 : 0;
    sum.tokens += e.stats.tokens;
    // The steps alone (what the callback does between them, evaluation and saves, is the caller's
    // to add: train/run.cpp counts the evaluations still to come).
    step_seconds_sum += e.step_seconds;
    e.eta_seconds = step_seconds_sum / static_cast<double>(sum.steps) * static_cast<double>(total - e.step);

    if (on_step) {
      RECORD_USER_SCOPE("qlora::on_step");
      if (!on_step(e) && e.step < total) {
        sum.stopped = true;
        break;
      }
    } else if ((every > 0 && e.step % every == 0) || e.step == total) {
      log::info(format_step_line(e.step, total, e.stats, e.tokens_per_second));
    }
  }
  sum.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return sum;
}

}  // namespace qlora::train
