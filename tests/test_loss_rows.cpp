// model/loss (CPU): model::cross_entropy_rows_reference, the CPU reference of the GPU rows
// kernel (tests/test_cuda_loss.cpp compares the kernel with it), against torch's own
// cross-entropy and its autograd gradient in fp32; and the LossPath selection on the CPU
// (the fused path never applies there).
#include <gtest/gtest.h>
#include <ATen/ATen.h>
#include <torch/cuda.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <cmath>
#include <cstdio>

#include "qlora/model/loss.h"

namespace {

using namespace qlora::model;

// Both sides are fp32 CPU ATen ops over the same row, only in a different order (logsumexp and
// log_softmax reduce differently; log_softmax's gradient is exp(log_softmax) rather than
// exp(x - lse)): a few fp32 ulps of lse (~10 here, ulp 1e-6) and of probabilities <= 1.
constexpr double kLossAtol = 1e-5;
constexpr double kGradAtol = 1e-6;

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// Seeded random rows (spread logits, one row with a dominant label) with ignored tokens.
struct Rows {
  at::Tensor logits;  // [n, V] fp32
  at::Tensor labels;  // [n] int64
};

Rows make_rows(int64_t n, int64_t vocab, uint64_t seed) {
  torch::manual_seed(seed);
  Rows r;
  r.logits = torch::randn({n, vocab}) * 3.0;
  r.labels = torch::randint(0, vocab, {n}, at::kLong);
  r.labels.index_put_({torch::arange(n) % 3 == 2}, kIgnoreIndex);
  r.logits.index_put_({0, r.labels[0].item<int64_t>()}, 25.0);  // p(label) ~ 1: loss ~ 0
  return r;
}

TEST(LossRows, ReferenceEqualsTorchCrossEntropyAndItsGradient) {
  for (int64_t vocab : {50, 1001}) {
    const Rows r = make_rows(10, vocab, 11 + vocab);
    const CrossEntropyRows ours = cross_entropy_rows_reference(r.logits, r.labels);
    ASSERT_EQ(ours.grad.scalar_type(), at::kFloat);
    ASSERT_EQ(ours.grad.sizes(), r.logits.sizes());

    at::Tensor x = r.logits.clone().requires_grad_(true);
    at::Tensor per_row = at::cross_entropy_loss(x, r.labels, {}, at::Reduction::None, kIgnoreIndex);
    per_row.sum().backward();
    const double loss_err = max_abs_diff(ours.loss, per_row.detach());
    const double lse_err = max_abs_diff(ours.lse, at::logsumexp(r.logits, {1}));
    const double grad_err = max_abs_diff(ours.grad, x.grad());
    std::printf("  V=%lld: loss |err| %.2e, lse |err| %.2e, grad |err| %.2e\n", static_cast<long long>(vocab),
                loss_err, lse_err, grad_err);
    EXPECT_LT(loss_err, kLossAtol);
    EXPECT_LT(lse_err, kLossAtol);
    EXPECT_LT(grad_err, kGradAtol);
    EXPECT_LT(ours.loss[0].item<double>(), 1e-5);  // the dominant row: ~0, a few fp32 ulps of lse ~ 25
    // Ignored rows: zero loss, zero gradient, and still their lse.
    const at::Tensor ignored = r.labels.eq(kIgnoreIndex);
    EXPECT_EQ(ours.loss.masked_select(ignored).abs().max().item<double>(), 0.0);
    EXPECT_EQ(ours.grad.index({ignored}).abs().max().item<double>(), 0.0);
    EXPECT_GT(ours.lse.masked_select(ignored).min().item<double>(), 0.0);
    // Each counted row's gradient sums to zero (softmax sums to one).
    EXPECT_LT(ours.grad.sum(1).abs().max().item<double>(), 1e-5);
  }
}

TEST(LossRows, ReferenceUpcastsSixteenBitAndStridedRows) {
  const Rows r = make_rows(7, 300, 5);
  const at::Tensor wide = torch::randn({7, 313}).to(at::kBFloat16);
  wide.narrow(1, 0, 300).copy_(r.logits);
  const at::Tensor view = wide.narrow(1, 0, 300);  // row stride 313 > V
  const CrossEntropyRows a = cross_entropy_rows_reference(view, r.labels);
  const CrossEntropyRows b = cross_entropy_rows_reference(view.to(at::kFloat).contiguous(), r.labels);
  EXPECT_TRUE(a.lse.equal(b.lse));
  EXPECT_TRUE(a.loss.equal(b.loss));
  EXPECT_TRUE(a.grad.equal(b.grad));
  EXPECT_EQ(a.grad.scalar_type(), at::kFloat);
}

TEST(LossRows, FusedPathNeverAppliesOnTheCpu) {
  torch::manual_seed(2);
  const at::Tensor hidden0 = torch::randn({9, 16}).to(at::kBFloat16);
  const at::Tensor weight = torch::randn({40, 16}).to(at::kBFloat16);
  const at::Tensor labels = torch::randint(0, 40, {9}, at::kLong);
  at::Tensor h = hidden0.clone().requires_grad_(true);
  EXPECT_FALSE(fused_cross_entropy_applies(h, weight));
  EXPECT_THROW(chunked_cross_entropy(h, weight, labels, 4, LossPath::kFused), c10::Error);

  // kAuto and kReference are the same computation here: same numbers, bit for bit.
  at::Tensor ha = hidden0.clone().requires_grad_(true), hr = hidden0.clone().requires_grad_(true);
  TokenLoss la = chunked_cross_entropy(ha, weight, labels, 4);
  TokenLoss lr = chunked_cross_entropy(hr, weight, labels, 4, LossPath::kReference);
  la.sum.backward();
  lr.sum.backward();
  EXPECT_TRUE(la.sum.equal(lr.sum));
  EXPECT_TRUE(ha.grad().equal(hr.grad()));
}

}  // namespace
