// The training step (train/trainer.h): token-normalized gradient accumulation,
// gradient clipping, AdamW with the linear schedule, on the tiny golden Llama
// (tests/data/model/llama3_untied) with LoRA on q, k, v, o in fp32.
#include <gtest/gtest.h>
#include <ATen/ATen.h>
#include <torch/cuda.h>
#include <torch/types.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/utils.h>

#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "qlora/amp/scaler.h"
#include "qlora/common/errors.h"
#include "qlora/data/batch.h"
#include "qlora/data/loader.h"
#include "qlora/io/model_dir.h"
#include "qlora/lora/lora.h"
#include "qlora/model/decoder.h"
#include "qlora/model/decoder_config.h"
#include "qlora/model/family.h"
#include "qlora/model/loss.h"
#include "qlora/optim/optimizer.h"
#include "qlora/train/schedule.h"
#include "qlora/train/trainer.h"

namespace {

using namespace qlora;

// micro 2 x accumulation 16 vs micro 32 x accumulation 1, relative to the
// largest gradient element: the bound. Both sum the same fp32 terms in
// another order (and pad rows to other lengths), so only rounding differs.
constexpr double kAccumRtol = 1e-5;
// A per-micro-batch mean must miss by more than this (relative), or the test
// above could not tell the two normalizations apart.
constexpr double kNaiveMinRdiff = 1e-3;
// Packed rows vs padded rows of the same examples: same math, other shapes.
constexpr double kPackedRtol = 1e-5;
// Our fp32 total norm vs the same norm summed in double: a few fp32 ulps.
constexpr double kNormRtol = 1e-5;

constexpr int64_t kExamples = 32;

// The tensors here are tiny (hidden 64): intra-op threads only spin against each
// other, and on a loaded 2-core machine that made the suite 60x slower
// (172 s vs 3 s measured). One thread for the whole binary.
class OneThread : public ::testing::Environment {
 public:
  void SetUp() override { at::set_num_threads(1); }
};
::testing::Environment* const kOneThread = ::testing::AddGlobalTestEnvironment(new OneThread);
constexpr int64_t kVocab = 256;

std::string model_dir() { return std::string(QLORA_SOURCE_DIR) + "/tests/data/model/llama3_untied"; }

model::DecoderModel load_model() {
  const io::ModelDir dir = io::ModelDir::open(model_dir());
  const DecoderConfig cfg = read_decoder_config(dir.config_path());
  model::WeightSource src{dir.dir(), dir.tensor_names(), [&dir](const std::string& n) { return dir.tensor(n); }};
  return model::DecoderModel::load(cfg, src, {});
}

// LoRA on the attention projections, dropout 0, A from a fixed seed and B
// non-zero (PEFT starts B at zero, which would leave A without a gradient).
lora::LoraAdapter attach_lora(model::DecoderModel& m) {
  lora::LoraSettings s;
  s.r = 4;
  s.alpha = 8.0;
  s.dropout = 0.0;
  s.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};
  torch::manual_seed(1234);
  lora::LoraAdapter adapter = lora::LoraAdapter::attach(m, s);
  at::NoGradGuard no_grad;
  for (const auto& layer : adapter.layers()) layer->lora_b().copy_(torch::randn_like(layer->lora_b()) * 0.1);
  return adapter;
}

// Examples of different lengths (4..24 tokens) whose first 1..5 tokens are an
// untrained prompt, so micro batches hold very different target counts.
std::vector<data::TokenizedExample> make_examples(uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<data::TokenizedExample> out;
  for (int64_t i = 0; i < kExamples; ++i) {
    data::TokenizedExample ex;
    const int len = 4 + static_cast<int>(rng() % 21);
    const int prompt = 1 + static_cast<int>(rng() % 5);
    for (int t = 0; t < len; ++t) {
      const int32_t id = 3 + static_cast<int32_t>(rng() % (kVocab - 3));
      ex.input_ids.push_back(id);
      ex.labels.push_back(t < prompt ? static_cast<int32_t>(model::kIgnoreIndex) : id);
    }
    out.push_back(std::move(ex));
  }
  return out;
}

// The window of `accumulation` micro batches of `micro` examples each, in order.
std::vector<data::Batch> make_window(const std::vector<data::TokenizedExample>& ex, int64_t micro) {
  std::vector<data::Batch> window;
  for (int64_t s = 0; s < kExamples; s += micro) {
    std::vector<int64_t> idx;
    for (int64_t i = s; i < s + micro; ++i) idx.push_back(i);
    window.push_back(data::collate_padded(ex, idx, /*pad_id=*/0));
  }
  return window;
}

std::vector<at::Tensor> grads_of(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> out;
  for (const auto& p : params) {
    EXPECT_TRUE(p.grad().defined());
    out.push_back(p.grad().detach().clone());
  }
  return out;
}

// max |a - b| / max |b| over every element of every tensor.
double rel_diff(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  double diff = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, (a[i].to(at::kDouble) - b[i].to(at::kDouble)).abs().max().item<double>());
    scale = std::max(scale, b[i].abs().max().item<double>());
  }
  return diff / scale;
}

// Everything one trainer needs, kept alive together.
struct Rig {
  model::DecoderModel model = load_model();
  lora::LoraAdapter adapter = attach_lora(model);
  std::unique_ptr<optim::Optimizer> optimizer;
  amp::LossScaler scaler{amp::LossScalerOptions{/*enabled=*/false}};
  amp::BadStepPolicy bad_steps{3};
  std::unique_ptr<train::Trainer> trainer;

  explicit Rig(train::StepOptions opts = {}, double lr = 1e-2, int64_t total_steps = 10, int64_t warmup = 0,
               double weight_decay = 0.0) {
    std::vector<optim::NamedParam> named;
    for (const auto& [name, t] : adapter.named_parameters()) named.push_back({name, t});
    optim::AdamWOptions o;
    o.weight_decay = weight_decay;
    optimizer = optim::make_adamw(named, o);
    trainer = std::make_unique<train::Trainer>(
        model, adapter.parameters(), *optimizer,
        train::LrScheduler(LrSchedule::kLinear, lr, total_steps, warmup), scaler, bad_steps, opts);
  }
};

// ---------------------------------------------------------------- accumulation

TEST(TrainAccumulation, TargetTokensCountAfterTheShift) {
  const auto ex = make_examples(7);
  Rig rig;
  for (const auto& b : make_window(ex, 4)) {
    const int64_t n = train::target_tokens(b);
    EXPECT_EQ(rig.trainer->micro_batch_loss(b).second, n);
    EXPECT_LE(n, b.trained_tokens);
    EXPECT_GT(n, 0);
  }
}

TEST(TrainAccumulation, MicroTwoTimesSixteenEqualsMicroThirtyTwo) {
  const auto ex = make_examples(11);
  train::StepOptions opts;
  opts.max_grad_norm = 0.0;
  Rig rig(opts);
  const auto params = rig.adapter.parameters();

  const auto small = make_window(ex, 2);  // 16 micro batches
  const auto big = make_window(ex, 32);   // 1 micro batch
  ASSERT_EQ(small.size(), 16u);
  ASSERT_EQ(big.size(), 1u);

  const train::AccumulatedWindow acc_small = rig.trainer->accumulate_gradients(small);
  const auto g_small = grads_of(params);
  rig.trainer->zero_grads();
  const train::AccumulatedWindow acc_big = rig.trainer->accumulate_gradients(big);
  const auto g_big = grads_of(params);
  rig.trainer->zero_grads();
  ASSERT_EQ(acc_small.window_tokens, acc_big.window_tokens);
  EXPECT_NEAR(acc_small.loss_sum, acc_big.loss_sum, 1e-5 * acc_big.loss_sum);

  // The naive accumulation: each micro batch's own token mean, averaged over
  // the 16 micro batches (what averaging per micro batch gives).
  int64_t min_tokens = INT64_MAX, max_tokens = 0;
  for (const auto& b : small) {
    auto [sum, count] = rig.trainer->micro_batch_loss(b);
    min_tokens = std::min(min_tokens, count);
    max_tokens = std::max(max_tokens, count);
    torch::autograd::backward({sum / static_cast<double>(count) / static_cast<double>(small.size())});
  }
  const auto g_naive = grads_of(params);
  rig.trainer->zero_grads();

  const double accum = rel_diff(g_small, g_big);
  const double naive = rel_diff(g_naive, g_big);
  std::printf("window tokens %lld (micro batches %lld..%lld); rel diff accumulated %.3g, naive %.3g\n",
              static_cast<long long>(acc_big.window_tokens), static_cast<long long>(min_tokens),
              static_cast<long long>(max_tokens), accum, naive);
  EXPECT_LE(accum, kAccumRtol);
  EXPECT_GT(naive, kNaiveMinRdiff);
}

TEST(TrainAccumulation, PackedRowsGiveThePaddedGradients) {
  const auto ex = make_examples(13);
  train::StepOptions opts;
  opts.max_grad_norm = 0.0;
  Rig rig(opts);
  const auto params = rig.adapter.parameters();

  std::vector<int64_t> order;
  for (int64_t i = 0; i < kExamples; ++i) order.push_back(i);
  const auto rows = data::pack_next_fit(ex, order, 64);
  ASSERT_LT(rows.size(), static_cast<size_t>(kExamples));  // some row holds several examples
  const std::vector<data::Batch> packed = {data::collate_packed(ex, rows, 0)};

  const auto acc_packed = rig.trainer->accumulate_gradients(packed);
  const auto g_packed = grads_of(params);
  rig.trainer->zero_grads();
  const auto acc_padded = rig.trainer->accumulate_gradients(make_window(ex, 8));
  const auto g_padded = grads_of(params);
  rig.trainer->zero_grads();
  ASSERT_EQ(acc_packed.window_tokens, acc_padded.window_tokens);
  const double d = rel_diff(g_packed, g_padded);
  std::printf("packed vs padded rel diff %.3g\n", d);
  EXPECT_LE(d, kPackedRtol);
}

// ---------------------------------------------------------------- clipping

TEST(TrainClip, TotalNormIsClippedToMaxNorm) {
  const auto ex = make_examples(17);
  Rig rig;
  const auto params = rig.adapter.parameters();
  rig.trainer->accumulate_gradients(make_window(ex, 8));

  double sq = 0;
  for (const auto& p : params) sq += p.grad().to(at::kDouble).pow(2).sum().item<double>();
  const double ref = std::sqrt(sq);

  // A max_norm above the norm measures and leaves the gradients bitwise alone.
  const auto before = grads_of(params);
  const double n0 = train::clip_grad_norm(params, 2 * ref);
  EXPECT_NEAR(n0, ref, kNormRtol * ref);
  for (size_t i = 0; i < params.size(); ++i) EXPECT_TRUE(at::equal(params[i].grad(), before[i]));

  const double max_norm = ref / 4;
  const double n1 = train::clip_grad_norm(params, max_norm);
  EXPECT_NEAR(n1, ref, kNormRtol * ref);
  const double after = train::clip_grad_norm(params, 0.0);  // measure only
  std::printf("norm %.6g, max_norm %.6g, after clipping %.6g\n", ref, max_norm, after);
  EXPECT_LE(after, max_norm);
  EXPECT_NEAR(after, max_norm, kNormRtol * max_norm);
  // Clipping scales every gradient by one factor.
  for (size_t i = 0; i < params.size(); ++i)
    EXPECT_TRUE(at::allclose(params[i].grad(), before[i] * (max_norm / (ref + 1e-6)), 1e-5, 1e-8));
}

// ---------------------------------------------------------------- steps

TEST(TrainSteps, LossFallsAndLrFollowsTheLinearSchedule) {
  const auto ex = make_examples(19);
  const auto window = make_window(ex, 8);
  constexpr int64_t kSteps = 10, kWarmup = 2;
  constexpr double kLr = 1e-2;
  train::StepOptions opts;
  opts.max_grad_norm = 1.0;
  Rig rig(opts, kLr, kSteps, kWarmup, /*weight_decay=*/0.01);

  std::vector<double> losses;
  for (int64_t s = 0; s < kSteps; ++s) {
    const train::StepStats st = rig.trainer->train_step(window);
    // transformers' get_linear_schedule_with_warmup.
    const double expect_lr = s < kWarmup ? kLr * s / kWarmup : kLr * double(kSteps - s) / double(kSteps - kWarmup);
    EXPECT_NEAR(st.lr, expect_lr, 1e-12 * kLr) << "step " << s;
    EXPECT_FALSE(st.skipped);
    EXPECT_GT(st.grad_norm, 0.0);
    EXPECT_TRUE(std::isfinite(st.loss));
    losses.push_back(st.loss);
    for (const auto& p : rig.adapter.parameters()) EXPECT_FALSE(p.grad().defined()) << "grads not zeroed";
  }
  EXPECT_EQ(rig.trainer->step(), kSteps);
  EXPECT_EQ(rig.optimizer->step_count(), kSteps);
  std::printf("loss %.5f -> %.5f\n", losses.front(), losses.back());
  // Step 0 has lr 0 (warmup): the loss of step 1 equals step 0's.
  EXPECT_NEAR(losses[1], losses[0], 1e-6 * losses[0]);
  EXPECT_LT(losses.back(), losses.front() - 0.05);
  for (int64_t s = 2; s < kSteps; ++s) EXPECT_LT(losses[s], losses[s - 1] + 1e-6) << "step " << s;
}

TEST(TrainSteps, NonFiniteGradientsSkipTheUpdate) {
  const auto ex = make_examples(23);
  const auto window = make_window(ex, 16);
  Rig rig;
  const auto params = rig.adapter.parameters();
  std::vector<at::Tensor> before;
  for (const auto& p : params) before.push_back(p.detach().clone());

  train::AccumulatedWindow acc = rig.trainer->accumulate_gradients(window);
  params[0].mutable_grad().view(-1)[0] = std::numeric_limits<float>::infinity();
  const train::StepStats st = rig.trainer->apply_gradients(acc);
  EXPECT_TRUE(st.skipped);
  EXPECT_FALSE(std::isfinite(st.grad_norm));
  EXPECT_EQ(rig.bad_steps.total(), 1);
  for (size_t i = 0; i < params.size(); ++i) EXPECT_TRUE(at::equal(params[i], before[i]));
  EXPECT_FALSE(params[0].grad().defined());

  // The next clean step updates again.
  const train::StepStats ok = rig.trainer->train_step(window);
  EXPECT_FALSE(ok.skipped);
  EXPECT_EQ(rig.bad_steps.in_a_row(), 0);
}

// Note [one read at the step's end]: train_step reads the gradients' norm with the loss (one
// device read a step); the step it takes is the one the two halves take with their own reads:
// the same loss, norm (clipped: max_grad_norm below the norm) and parameters, bit for bit.
TEST(TrainSteps, OneReadStepEqualsTheTwoHalves) {
  const auto ex = make_examples(29);
  const auto window = make_window(ex, 8);
  train::StepOptions opts;
  opts.max_grad_norm = 1e-3;  // below any norm here: the clipping runs
  Rig halves(opts), fused(opts);
  const train::StepStats want = halves.trainer->apply_gradients(halves.trainer->accumulate_gradients(window));
  const train::StepStats got = fused.trainer->train_step(window);
  EXPECT_EQ(got.loss, want.loss);
  EXPECT_EQ(got.grad_norm, want.grad_norm);
  EXPECT_GT(want.grad_norm, opts.max_grad_norm);
  EXPECT_FALSE(got.skipped);
  const auto a = halves.adapter.parameters(), b = fused.adapter.parameters();
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(at::equal(a[i], b[i])) << "parameter " << i;
}

TEST(TrainSteps, TotalOptimizerSteps) {
  TrainConfig t;
  t.gradient_accumulation_steps = 4;
  t.epochs = 3.0;
  EXPECT_EQ(train::total_optimizer_steps(t, 10), 6);   // 10 / 4 = 2 full windows per epoch
  EXPECT_EQ(train::total_optimizer_steps(t, 3), 3);    // at least one step per epoch
  t.epochs = 1.5;
  EXPECT_EQ(train::total_optimizer_steps(t, 12), 5);   // ceil(1.5 * 3)
  t.max_steps = 7;
  EXPECT_EQ(train::total_optimizer_steps(t, 12), 7);
  t.max_steps = -1;
  t.epochs = 0.0;
  EXPECT_THROW(train::total_optimizer_steps(t, 12), InputError);
}

TEST(TrainSteps, LossScaleIsRemovedBeforeClippingAndReporting) {
  // With an enabled scaler the backward sees loss x 2^16; the norm the step
  // reports (and clips) must be that of the unscaled gradients, the loss that
  // of the unscaled loss. fp32 throughout, so only rounding may differ.
  const auto ex = make_examples(31);
  const auto window = make_window(ex, 8);
  Rig plain;
  Rig scaled;
  scaled.scaler = amp::LossScaler(amp::LossScalerOptions{/*enabled=*/true});
  const train::StepStats a = plain.trainer->train_step(window);
  const train::StepStats b = scaled.trainer->train_step(window);
  EXPECT_FALSE(b.skipped);
  EXPECT_NEAR(b.grad_norm, a.grad_norm, kNormRtol * a.grad_norm);
  EXPECT_DOUBLE_EQ(b.loss, a.loss);
  EXPECT_EQ(scaled.scaler.current_scale(), 65536.0f);
  const auto pa = plain.adapter.parameters();
  const auto pb = scaled.adapter.parameters();
  EXPECT_LE(rel_diff(pb, pa), kAccumRtol);
}

// ---------------------------------------------------------------- the loop

TEST(TrainLoop, RunsMaxStepsOverTheLoader) {
  const auto ex = make_examples(29);
  Config cfg;
  cfg.train.micro_batch_size = 4;
  cfg.train.gradient_accumulation_steps = 2;
  cfg.train.max_steps = 5;
  cfg.train.learning_rate = 1e-2;
  cfg.train.lr_scheduler = LrSchedule::kCosine;
  cfg.train.warmup_steps = 1;
  cfg.output.logging_steps = 2;
  data::LoaderOptions lo;
  lo.micro_batch_size = cfg.train.micro_batch_size;
  data::DataLoader loader(ex, lo);
  Rig rig;  // schedule over 10 steps: must be refused for a 5-step run
  EXPECT_THROW(train::train_loop(cfg, *rig.trainer, loader), std::invalid_argument);

  const train::LrScheduler sched = train::make_lr_scheduler(cfg.train, 5);
  train::Trainer trainer(rig.model, rig.adapter.parameters(), *rig.optimizer, sched, rig.scaler, rig.bad_steps);
  std::vector<int64_t> seen;
  const train::LoopSummary sum = train::train_loop(cfg, trainer, loader, [&](const train::StepEvent& e) {
    seen.push_back(e.step);
    EXPECT_EQ(e.total, 5);
    EXPECT_DOUBLE_EQ(e.stats.lr, sched.lr_at(e.step - 1));
    EXPECT_GE(e.eta_seconds, 0.0);
    return true;
  });
  EXPECT_EQ(sum.steps, 5);
  EXPECT_FALSE(sum.stopped);
  EXPECT_EQ(sum.skipped, 0);
  EXPECT_EQ(seen, (std::vector<int64_t>{1, 2, 3, 4, 5}));
  EXPECT_GT(sum.tokens, 0);
  // 5 steps x 2 micro batches x 4 examples = 40 examples: the loader rolled
  // into its second epoch of 32.
  EXPECT_EQ(loader.epoch(), 1);
  EXPECT_EQ(rig.optimizer->step_count(), 5);

  // A callback that says stop ends the loop after that step (a signal's save).
  const train::LrScheduler sched2 = train::make_lr_scheduler(cfg.train, 5);
  train::Trainer stopping(rig.model, rig.adapter.parameters(), *rig.optimizer, sched2, rig.scaler, rig.bad_steps);
  const train::LoopSummary cut =
      train::train_loop(cfg, stopping, loader, [](const train::StepEvent& e) { return e.step < 2; });
  EXPECT_TRUE(cut.stopped);
  EXPECT_EQ(cut.steps, 2);
  EXPECT_EQ(stopping.step(), 2);
}

TEST(TrainLoop, StepLine) {
  train::StepStats st;
  st.loss = 2.34567;
  st.lr = 1.2e-4;
  st.grad_norm = 0.5321;
  EXPECT_EQ(train::format_step_line(10, 200, st, 1234.4),
            "step 10/200 | loss 2.3457 | lr 1.20e-04 | grad norm 0.532 | 1234 tok/s");
  st.skipped = true;
  EXPECT_EQ(train::format_step_line(10, 200, st, 0), "step 10/200 | loss 2.3457 | lr 1.20e-04 | grad norm 0.532 | 0 tok/s | skipped");
}


// ---------------------------------------------------------------- out of memory (Note [out-of-memory retry])

// A layer that "runs out of memory" above `max_rows` rows, as CUDA's caching
// allocator reports it (c10::OutOfMemoryError); `model` is set once the rig exists.
struct TightMemory {
  const model::DecoderModel* model = nullptr;
  int64_t max_rows = 0;
  int64_t failures = 0;
  train::LayerForwardFn layer_forward() {
    return [this](int64_t l, const at::Tensor& hidden, const std::pair<at::Tensor, at::Tensor>& cos_sin,
                  const model::AttentionInputs& attention) {
      if (hidden.size(0) > max_rows) {
        ++failures;
        C10_THROW_ERROR(OutOfMemoryError, "CUDA out of memory (simulated by the test)");
      }
      return model->layer_forward(l, hidden, cos_sin, attention);
    };
  }
};

TEST(TrainOutOfMemory, RetriesAtFewerRowsWithTheSameGradient) {
  const auto ex = make_examples(23);
  const auto window = make_window(ex, 8);  // 4 micro batches of 8 rows
  train::StepOptions plain;
  plain.max_grad_norm = 0.0;
  Rig reference(plain);
  const train::AccumulatedWindow want = reference.trainer->accumulate_gradients(window);
  const auto g_want = grads_of(reference.adapter.parameters());

  TightMemory tight;
  tight.max_rows = 2;
  train::StepOptions opts = plain;
  opts.layer_forward = tight.layer_forward();
  Rig rig(opts);
  tight.model = &rig.model;
  const train::AccumulatedWindow got = rig.trainer->accumulate_gradients(window);
  ASSERT_FALSE(got.out_of_memory);
  // 8 rows fail, 4 rows fail, 2 rows fit: two failed attempts, then the step.
  EXPECT_EQ(tight.failures, 2);
  EXPECT_EQ(rig.trainer->max_micro_rows(), 2);
  EXPECT_EQ(got.window_tokens, want.window_tokens);
  EXPECT_NEAR(got.loss_sum, want.loss_sum, kAccumRtol * want.loss_sum);
  EXPECT_LE(rel_diff(grads_of(rig.adapter.parameters()), g_want), kAccumRtol);
  rig.trainer->zero_grads();

  // The smaller size sticks: the next window runs at 2 rows without a failure.
  rig.trainer->accumulate_gradients(window);
  EXPECT_EQ(tight.failures, 2);
}

TEST(TrainOutOfMemory, NothingFitsReportsOutOfMemoryAndChangesNothing) {
  const auto ex = make_examples(29);
  TightMemory tight;
  tight.max_rows = 0;  // not even one row
  train::StepOptions opts;
  opts.layer_forward = tight.layer_forward();
  Rig rig(opts);
  tight.model = &rig.model;
  const auto before = rig.adapter.parameters()[0].clone();
  const train::StepStats s = rig.trainer->train_step(make_window(ex, 4));
  EXPECT_TRUE(s.out_of_memory);
  EXPECT_EQ(rig.trainer->step(), 0);  // no step taken, the schedule did not move
  EXPECT_EQ(rig.trainer->max_micro_rows(), 1);
  EXPECT_EQ(tight.failures, 3);  // 4, 2, 1 rows
  for (const auto& p : rig.adapter.parameters()) EXPECT_FALSE(p.grad().defined());
  EXPECT_TRUE(at::equal(before, rig.adapter.parameters()[0]));
}

}  // namespace
