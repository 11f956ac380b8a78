// Activation checkpointing (train/checkpoint.h): gradients bit-identical to the
// run without it, with LoRA dropout active, and the activation memory it saves.
// The model is the tiny golden Llama 3 of tests/data/model/llama3_untied
// (scripts/golden/model.py), its two layers repeated when more are wanted.
#include <gtest/gtest.h>
#include <ATen/ATen.h>
#include <torch/cuda.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>

#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "qlora/io/model_dir.h"
#include "qlora/layer/offload.h"
#include "qlora/lora/lora.h"
#include "qlora/model/decoder.h"
#include "qlora/model/decoder_config.h"
#include "qlora/model/family.h"
#include "qlora/model/loss.h"
#include "qlora/train/checkpoint.h"

namespace {

using namespace qlora;
using namespace qlora::model;

// Equality tests use at::equal (bitwise): checkpointing recomputes the same
// ops on the same values with the same dropout masks, so nothing may differ.
// Checkpointed activation bytes must be below this fraction of the plain run's
// (the "memory saved, shown"). Measured at 4 layers, batch 2, seq 64:
// 3,880,588 bytes plain, 235,408 checkpointed (6.1%): layer inputs, cos/sin,
// the final norm and the loss's saved tensors are all that remain.
constexpr double kMaxSavedFraction = 1.0 / 3.0;
constexpr uint64_t kDropoutSeed = 20240611;

std::string data_dir() { return std::string(QLORA_SOURCE_DIR) + "/tests/data/model/llama3_untied"; }

// The golden model with `layers` decoder layers: layer l is a copy of golden
// layer l % 2.
DecoderModel load_model(int64_t layers) {
  // Tiny tensors: extra intra-op threads only contend on a shared CI machine
  // (measured 60x slower under load). Results do not depend on the count.
  at::set_num_threads(1);
  const io::ModelDir dir = io::ModelDir::open(data_dir());
  DecoderConfig cfg = read_decoder_config(dir.config_path());
  const int64_t golden_layers = cfg.num_hidden_layers;
  const std::string prefix = "model.layers.";
  std::map<std::string, at::Tensor> w;
  for (const std::string& name : dir.tensor_names()) {
    at::Tensor t = dir.tensor(name).clone();
    if (name.rfind(prefix, 0) != 0) {
      w[name] = t;
      continue;
    }
    const size_t dot = name.find('.', prefix.size());
    const int64_t src = std::stoll(name.substr(prefix.size(), dot - prefix.size()));
    for (int64_t l = src; l < layers; l += golden_layers)
      w[prefix + std::to_string(l) + name.substr(dot)] = t.clone();
  }
  cfg.num_hidden_layers = layers;
  return DecoderModel::load(cfg, weights_from_map(w, data_dir()));
}

// LoRA r 8 on every projection, dropout 0.1, B non-zero (PEFT starts it at
// zero, which would hide any error in the gradients of A).
lora::LoraAdapter attach_lora(DecoderModel& m) {
  lora::LoraSettings s;
  s.r = 8;
  s.alpha = 16;
  s.dropout = 0.1;
  s.target_modules = {"all-linear"};
  torch::manual_seed(11);
  lora::LoraAdapter a = lora::LoraAdapter::attach(m, s);
  at::NoGradGuard no_grad;
  for (const auto& layer : a.layers()) layer->lora_b().copy_(torch::randn(layer->lora_b().sizes()) * 0.05);
  a.set_training(true);
  return a;
}

struct Batch {
  at::Tensor input_ids;  // [B, T] int64
  AttentionInputs attention;
};

// Row 0 full, row 1 left-padded by 3: the mask path of the attention.
Batch make_batch(int64_t b, int64_t t, int64_t vocab) {
  torch::manual_seed(3);
  Batch out;
  out.input_ids = torch::randint(0, vocab, {b, t}, torch::kLong);
  at::Tensor mask = torch::ones({b, t}, torch::kLong);
  if (b > 1) mask.index_put_({1, torch::indexing::Slice(0, 3)}, 0);
  out.attention = padded_attention(mask);
  return out;
}

at::Tensor cpu_rng_state() { return at::detail::getDefaultCPUGenerator().get_state(); }

struct Step {
  at::Tensor loss;
  std::vector<at::Tensor> grads;  // of adapter.parameters(), in order
  at::Tensor rng_after;           // CPU generator state after backward
};

// Seeded forward (chunked loss over shifted labels) and backward; `between`
// runs between the two.
Step run_step(const DecoderModel& m, const lora::LoraAdapter& a, const Batch& batch, bool checkpointing,
              const train::CheckpointOptions& options = {}, const std::function<void()>& between = {}) {
  for (at::Tensor p : a.parameters()) p.mutable_grad() = at::Tensor();
  torch::manual_seed(kDropoutSeed);
  at::Tensor hidden = train::checkpointed_forward_hidden(m, batch.input_ids, batch.attention, checkpointing, options);
  const int64_t h = hidden.size(-1);
  TokenLoss loss = chunked_cross_entropy(hidden.reshape({-1, h}), m.lm_head_weight(),
                                         shift_labels(batch.input_ids).reshape({-1}));
  if (between) between();
  loss.sum.backward();
  Step s;
  s.loss = loss.sum.detach();
  for (const at::Tensor& p : a.parameters()) s.grads.push_back(p.grad().defined() ? p.grad().clone() : at::Tensor());
  s.rng_after = cpu_rng_state();
  return s;
}

// Names the first parameter whose gradient is not bit-identical; "" when all are.
std::string first_grad_mismatch(const lora::LoraAdapter& a, const Step& x, const Step& y) {
  const auto names = a.named_parameters();
  for (size_t i = 0; i < x.grads.size(); ++i) {
    if (!x.grads[i].defined() || !y.grads[i].defined()) return names[i].first + " (no gradient)";
    if (!at::equal(x.grads[i], y.grads[i]))
      return names[i].first + " (max |diff| " +
             std::to_string((x.grads[i] - y.grads[i]).abs().max().item<double>()) + ")";
  }
  return "";
}

TEST(Checkpoint, LossAndEveryLoraGradientBitIdenticalWithDropout) {
  DecoderModel m = load_model(2);
  lora::LoraAdapter a = attach_lora(m);
  const Batch batch = make_batch(2, 16, m.config().vocab_size);

  const Step plain = run_step(m, a, batch, /*checkpointing=*/false);
  const Step ckpt = run_step(m, a, batch, /*checkpointing=*/true);

  EXPECT_TRUE(at::equal(plain.loss, ckpt.loss)) << plain.loss.item<double>() << " vs " << ckpt.loss.item<double>();
  ASSERT_EQ(plain.grads.size(), a.parameters().size());
  ASSERT_EQ(plain.grads.size(), size_t{2 * 7 * 2});  // A and B of 7 projections in 2 layers
  for (const at::Tensor& g : plain.grads) {
    ASSERT_TRUE(g.defined());
    EXPECT_GT(g.abs().max().item<double>(), 0.0);
  }
  EXPECT_EQ(first_grad_mismatch(a, plain, ckpt), "");
  // The recomputation's draws are undone: the next step's dropout is the same.
  EXPECT_TRUE(at::equal(plain.rng_after, ckpt.rng_after));
}

// Note [offloaded checkpoints]: each layer's input goes to its own host buffer (the CPU runs the
// GPU's bookkeeping when asked to copy) and comes back for its backward; nothing changes.
TEST(Checkpoint, OffloadedInputsGiveTheSameGradientsAndAreAllReturned) {
  DecoderModel m = load_model(3);
  lora::LoraAdapter a = attach_lora(m);
  const Batch batch = make_batch(2, 16, m.config().vocab_size);
  train::CheckpointOptions offloaded;
  offloaded.offload = std::make_shared<layer::CheckpointOffload>(/*copy_on_cpu=*/true);
  const int64_t layer_bytes = 2 * 16 * m.config().hidden_size * 4;  // one fp32 [B, T, h] input
  int64_t held_between = -1;
  const Step kept = run_step(m, a, batch, /*checkpointing=*/true);
  const Step moved = run_step(m, a, batch, /*checkpointing=*/true, offloaded,
                              [&] { held_between = offloaded.offload->host_bytes(); });
  EXPECT_TRUE(at::equal(kept.loss, moved.loss));
  EXPECT_EQ(first_grad_mismatch(a, kept, moved), "");
  EXPECT_TRUE(at::equal(kept.rng_after, moved.rng_after));
  EXPECT_EQ(held_between, 3 * layer_bytes);  // every layer's input, between forward and backward
  EXPECT_EQ(offloaded.offload->host_bytes(), 0);
  EXPECT_EQ(offloaded.offload->peak_host_bytes(), 3 * layer_bytes);
  // A second step reuses the offloader (gradient accumulation, the next step).
  const Step again = run_step(m, a, batch, /*checkpointing=*/true, offloaded);
  EXPECT_EQ(first_grad_mismatch(a, kept, again), "");
  EXPECT_EQ(offloaded.offload->host_bytes(), 0);
}

// A forward abandoned before its backward (the out-of-memory retry) frees what it stashed.
TEST(Checkpoint, AnAbandonedOffloadedForwardLeavesNothingHeld) {
  DecoderModel m = load_model(2);
  lora::LoraAdapter a = attach_lora(m);
  const Batch batch = make_batch(2, 16, m.config().vocab_size);
  train::CheckpointOptions offloaded;
  offloaded.offload = std::make_shared<layer::CheckpointOffload>(/*copy_on_cpu=*/true);
  {
    at::Tensor hidden = train::checkpointed_forward_hidden(m, batch.input_ids, batch.attention, true, offloaded);
    EXPECT_GT(offloaded.offload->host_bytes(), 0);
  }
  EXPECT_EQ(offloaded.offload->host_bytes(), 0);
}

TEST(Checkpoint, DropoutIsActiveInTheseRuns) {
  // Without this the equality above could hold for a model without dropout.
  DecoderModel m = load_model(2);
  lora::LoraAdapter a = attach_lora(m);
  const Batch batch = make_batch(2, 16, m.config().vocab_size);
  const Step with_dropout = run_step(m, a, batch, true);
  a.set_training(false);
  const Step without = run_step(m, a, batch, true);
  EXPECT_FALSE(at::equal(with_dropout.loss, without.loss));
}

TEST(Checkpoint, WithoutRngRestorationGradientsDiffer) {
  DecoderModel m = load_model(2);
  lora::LoraAdapter a = attach_lora(m);
  const Batch batch = make_batch(2, 16, m.config().vocab_size);
  const Step plain = run_step(m, a, batch, false);

  train::CheckpointOptions no_rng;
  no_rng.preserve_rng_state = false;
  const Step ckpt = run_step(m, a, batch, true, no_rng);
  EXPECT_TRUE(at::equal(plain.loss, ckpt.loss));  // the forward is unaffected
  EXPECT_NE(first_grad_mismatch(a, plain, ckpt), "") << "recomputed dropout masks matched without restoring the RNG";
}

TEST(Checkpoint, GeneratorUsedBetweenForwardAndBackwardChangesNothing) {
  // The trainer may draw random numbers between forward and backward (or
  // another layer's backward does); the recorded state is what counts.
  DecoderModel m = load_model(2);
  lora::LoraAdapter a = attach_lora(m);
  const Batch batch = make_batch(2, 16, m.config().vocab_size);
  const Step plain = run_step(m, a, batch, false);
  const Step ckpt = run_step(m, a, batch, true, {}, [] { (void)torch::rand({1000}); });
  EXPECT_EQ(first_grad_mismatch(a, plain, ckpt), "");

  train::CheckpointOptions no_rng;
  no_rng.preserve_rng_state = false;
  const Step unrestored = run_step(m, a, batch, true, no_rng, [] { (void)torch::rand({1000}); });
  EXPECT_NE(first_grad_mismatch(a, plain, unrestored), "");
}

TEST(Checkpoint, RecomputesUnderTheForwardsAutocast) {
  // bf16 autocast on the CPU during forward only, as a trainer scopes it:
  // backward's recomputation must run in bf16 again to give the same gradients.
  DecoderModel m = load_model(2);
  lora::LoraAdapter a = attach_lora(m);
  const Batch batch = make_batch(2, 16, m.config().vocab_size);
  auto with_autocast = [&](bool checkpointing) {
    at::autocast::set_autocast_dtype(at::kCPU, at::kBFloat16);
    at::autocast::set_autocast_enabled(at::kCPU, true);
    return run_step(m, a, batch, checkpointing, {}, [] {
      at::autocast::set_autocast_enabled(at::kCPU, false);
      at::autocast::clear_cache();
    });
  };
  const Step fp32 = run_step(m, a, batch, false);
  const Step plain = with_autocast(false);
  const Step ckpt = with_autocast(true);
  ASSERT_FALSE(at::autocast::is_autocast_enabled(at::kCPU));
  EXPECT_FALSE(at::equal(fp32.loss, plain.loss)) << "autocast had no effect";
  EXPECT_TRUE(at::equal(plain.loss, ckpt.loss));
  EXPECT_EQ(first_grad_mismatch(a, plain, ckpt), "");
}

TEST(Checkpoint, InputGradientAndCapturedLeafGradientMatchPlainAutograd) {
  torch::manual_seed(5);
  const at::Tensor x0 = torch::randn({4, 6});
  const at::Tensor w = torch::randn({6, 5}).requires_grad_(true);
  const at::Tensor up = torch::randn({4, 5});
  const train::TensorFn fn = [&w](const at::Tensor& x) {
    return at::tanh(at::matmul(at::dropout(x, 0.3, /*train=*/true), w));
  };

  at::Tensor x = x0.clone().requires_grad_(true);
  torch::manual_seed(9);
  (fn(x) * up).sum().backward();
  const at::Tensor gx = x.grad().clone(), gw = w.grad().clone();

  w.mutable_grad() = at::Tensor();
  at::Tensor xc = x0.clone().requires_grad_(true);
  torch::manual_seed(9);
  at::Tensor y = train::checkpoint(fn, xc);
  ASSERT_TRUE(y.requires_grad());
  (y * up).sum().backward();
  EXPECT_TRUE(at::equal(xc.grad(), gx));
  EXPECT_TRUE(at::equal(w.grad(), gw));
}

TEST(Checkpoint, NoGradModeJustRunsTheFunction) {
  const at::Tensor w = torch::ones({3}).requires_grad_(true);
  at::NoGradGuard no_grad;
  at::Tensor y = train::checkpoint([&w](const at::Tensor& x) { return x * w; }, torch::ones({3}));
  EXPECT_FALSE(y.requires_grad());
  EXPECT_TRUE(at::equal(y, torch::ones({3})));
}

TEST(SavedBytesCounter, CountsLiveCpuStorage) {
  train::SavedBytesCounter counter;
  EXPECT_EQ(counter.live_bytes(), 0);
  at::Tensor t = torch::empty({1000}, torch::kFloat);
  EXPECT_EQ(counter.live_bytes(), 4000);
  {
    train::SavedBytesCounter inner;
    at::Tensor u = torch::empty({10}, torch::kDouble);
    EXPECT_EQ(inner.live_bytes(), 80);
    EXPECT_EQ(counter.live_bytes(), 4080);
  }
  t = at::Tensor();
  EXPECT_EQ(counter.live_bytes(), 0);
}

TEST(SavedBytesCounter, StorageMayOutliveTheCounter) {
  at::Tensor t;
  {
    train::SavedBytesCounter counter;
    t = torch::randn({256});
  }
  t = at::Tensor();  // freed through the counting deleter after the allocator is back
  train::SavedBytesCounter counter;
  at::Tensor u = torch::randn({8});
  EXPECT_EQ(counter.live_bytes(), 32);
}

// Activation bytes alive between forward and backward of one step (the loss
// included), 4 layers at sequence length 64.
int64_t activation_bytes(const DecoderModel& m, const lora::LoraAdapter& a, const Batch& batch, bool checkpointing) {
  for (at::Tensor p : a.parameters()) p.mutable_grad() = at::Tensor();
  torch::manual_seed(kDropoutSeed);
  int64_t bytes = 0;
  TokenLoss loss;
  {
    train::SavedBytesCounter counter;
    at::Tensor hidden = train::checkpointed_forward_hidden(m, batch.input_ids, batch.attention, checkpointing);
    loss = chunked_cross_entropy(hidden.reshape({-1, hidden.size(-1)}), m.lm_head_weight(),
                                 shift_labels(batch.input_ids).reshape({-1}));
    hidden = at::Tensor();
    bytes = counter.live_bytes();
  }
  loss.sum.backward();
  return bytes;
}

TEST(CheckpointMemory, KeepsUnderAThirdOfTheActivations) {
  DecoderModel m = load_model(4);
  lora::LoraAdapter a = attach_lora(m);
  const Batch batch = make_batch(2, 64, m.config().vocab_size);
  const int64_t plain = activation_bytes(m, a, batch, false);
  const int64_t ckpt = activation_bytes(m, a, batch, true);
  std::printf("activation bytes kept for backward (4 layers, batch 2, seq 64): plain %lld, checkpointed %lld (%.1f%%)\n",
              static_cast<long long>(plain), static_cast<long long>(ckpt), 100.0 * ckpt / plain);
  EXPECT_GT(ckpt, 0);
  EXPECT_LT(static_cast<double>(ckpt), kMaxSavedFraction * static_cast<double>(plain));
}

}  // namespace
