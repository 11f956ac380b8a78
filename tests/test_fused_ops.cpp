// model/fused_ops: the ATen references against independent formulations on the CPU:
// rope_inplace_reference against model::apply_rope (the model's own op sequence, on the
// [B, H, T, d] layout), rope_backward_inplace_reference and swiglu_backward_inplace_reference
// against autograd, swiglu_reference against at::silu(g) * u, geglu_reference against
// at::gelu(g, "tanh") * u and its backward against autograd; on contiguous tensors and on the
// strided column-slice views the fused decoder layer passes, at ragged sizes. The dispatching
// entry points take the references on the CPU, so they are checked equal to them too.
#include <gtest/gtest.h>
#include <ATen/ATen.h>
#include <torch/cuda.h>
#include <torch/types.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/utils.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "qlora/model/fused_ops.h"
#include "qlora/model/decoder.h"

namespace qlora::model {
namespace {

// rope_inplace_reference does apply_rope's element-wise ops (mul, neg, cat, mul, add) on the
// same values, so in fp32 every element is equal bit for bit. The RoPE backward is exact against
// autograd too: per element both add the same two rounded products (autograd's other terms are
// the zeros of the narrow / cat backward, which add exactly).
constexpr double kExact = 0.0;
// SwiGLU's backward against autograd in fp32: silu's derivative is the same formula, but the
// order in which dm, u and silu'(g) are multiplied differs: a few fp32 roundings of an element.
// 1e-6 of the largest gradient is ~16 fp32 ulps (2^-24 ~ 6e-8); seen: at most 3.2e-7.
constexpr double kAutogradRtol = 1e-6;

// Sizes of the ragged cases: rows / sequence lengths, head dims, intermediate sizes (odd too).
const std::vector<int64_t> kRows = {1, 3, 17};
const std::vector<int64_t> kHeadDims = {64, 128};
const std::vector<int64_t> kInters = {1, 37, 64};

double max_abs(const at::Tensor& t) { return t.numel() == 0 ? 0.0 : t.abs().max().item<double>(); }

// max |a - b| / max(max |b|, tiny) in double.
double rel_err(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor da = a.to(at::kDouble), db = b.to(at::kDouble);
  const double scale = std::max(max_abs(db), 1e-30);
  return max_abs(da - db) / scale;
}

// cos, sin [B, T, d] from rope_cos_sin with random positions (so every angle differs).
std::pair<at::Tensor, at::Tensor> make_cos_sin(int64_t b, int64_t t, int64_t d) {
  DecoderConfig c;
  c.head_dim = d;
  c.rope_theta = 10000.0;
  const at::Tensor inv_freq = rope_inv_freq(c);
  const at::Tensor pos = at::randint(0, 4096, {b, t}, at::kLong);
  return rope_cos_sin(inv_freq, pos, at::kFloat);
}

// A [B, T, H, d] view whose rows are a column slice of a wider [B*T, W] buffer (as the fused
// layer's q / k slices of the merged qkv GEMM output), starting at column `col`.
at::Tensor slice_view(const at::Tensor& wide, int64_t b, int64_t t, int64_t h, int64_t d, int64_t col) {
  return wide.narrow(1, col, h * d).view({b, t, h, d});
}

TEST(FusedOpsReference, RopeEqualsApplyRope) {
  torch::manual_seed(1);
  for (int64_t t : kRows)
    for (int64_t d : kHeadDims) {
      const int64_t b = 2, h = 3;
      const auto [cos, sin] = make_cos_sin(b, t, d);
      // Contiguous x.
      at::Tensor x = at::randn({b, t, h, d});
      const at::Tensor want = apply_rope(x.transpose(1, 2), cos, sin).transpose(1, 2);  // [B, T, H, d]
      at::Tensor y = x.clone();
      rope_inplace_reference(y, cos, sin);
      EXPECT_LE(rel_err(y, want), kExact) << "T=" << t << " d=" << d;
      at::Tensor z = x.clone();
      rope_inplace(z, cos, sin);  // the CPU takes the reference
      EXPECT_TRUE(at::equal(z, y));

      // A column slice of [B*T, 3*h*d + 3] (the k slice of a q|k|v buffer, odd row stride):
      // the slice is rotated, every other column stays as it was.
      const int64_t width = 3 * h * d + 3;
      at::Tensor wide = at::randn({b * t, width});
      const at::Tensor before = wide.clone();
      at::Tensor view = slice_view(wide, b, t, h, d, h * d + 1);
      const at::Tensor want_view = apply_rope(view.transpose(1, 2), cos, sin).transpose(1, 2);
      rope_inplace_reference(view, cos, sin);
      EXPECT_LE(rel_err(slice_view(wide, b, t, h, d, h * d + 1), want_view), kExact);
      EXPECT_TRUE(at::equal(wide.narrow(1, 0, h * d + 1), before.narrow(1, 0, h * d + 1)));
      EXPECT_TRUE(at::equal(wide.narrow(1, 2 * h * d + 1, h * d + 2), before.narrow(1, 2 * h * d + 1, h * d + 2)));
    }
}

// rope_into / rope_backward_into / copy_heads: from the k slice of a q|k|v buffer (odd row
// stride) into a packed tensor, the values apply_rope gives (forward), the autograd-checked
// backward reference (backward), the slice itself (copy); the source is left as it was.
TEST(FusedOpsReference, RopeIntoWritesTheRotatedSliceAndLeavesTheSource) {
  torch::manual_seed(4);
  const int64_t b = 2, t = 5, h = 3, d = 64, width = 3 * h * d + 3, col = h * d + 1;
  const auto [cos, sin] = make_cos_sin(b, t, d);
  const at::Tensor wide = at::randn({b * t, width});
  const at::Tensor before = wide.clone();
  const at::Tensor src = slice_view(wide, b, t, h, d, col);

  at::Tensor q = at::empty({b, t, h, d});
  rope_into(q, src, cos, sin);
  EXPECT_LE(rel_err(q, apply_rope(src.transpose(1, 2), cos, sin).transpose(1, 2)), kExact);
  at::Tensor g = at::empty({b, t, h, d});
  rope_backward_into(g, src, cos, sin);
  at::Tensor want = src.clone();
  rope_backward_inplace_reference(want, cos, sin);
  EXPECT_TRUE(at::equal(g, want));
  at::Tensor v = at::empty({b, t, h, d});
  copy_heads(v, src);
  EXPECT_TRUE(at::equal(v, src));
  EXPECT_TRUE(at::equal(wide, before)) << "the source buffer changed";

  // Shapes, dtypes that differ; the same tensor on both sides.
  at::Tensor small = at::empty({b, t, h - 1, d});
  EXPECT_THROW(rope_into(small, src, cos, sin), c10::Error);
  at::Tensor other = at::empty({b, t, h, d}, at::kDouble);
  EXPECT_THROW(copy_heads(other, src), c10::Error);
  at::Tensor same = at::randn({b, t, h, d});
  EXPECT_THROW(rope_into(same, same, cos, sin), c10::Error);
  try {
    rope_into(small, src, cos, sin);
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    EXPECT_NE(what.find("expected dst and src of one [B, T, H, d] shape"), std::string::npos) << what;
    EXPECT_NE(what.find("[2, 5, 2, 64]"), std::string::npos) << what;
  }
}

TEST(FusedOpsReference, RopeBackwardMatchesAutograd) {
  torch::manual_seed(2);
  for (int64_t t : kRows)
    for (int64_t d : kHeadDims) {
      const int64_t b = 2, h = 3;
      const auto [cos, sin] = make_cos_sin(b, t, d);
      const at::Tensor x = at::randn({b, h, t, d}).requires_grad_(true);
      const at::Tensor grad = at::randn({b, h, t, d});
      apply_rope(x, cos, sin).backward(grad);
      const at::Tensor want = x.grad().transpose(1, 2);  // [B, T, H, d]

      // A copy: for T = 1 the transpose is already "contiguous" and .contiguous() would alias grad.
      at::Tensor g = grad.transpose(1, 2).clone(at::MemoryFormat::Contiguous);
      rope_backward_inplace_reference(g, cos, sin);
      const double err = rel_err(g, want);
      EXPECT_LE(err, kExact) << "T=" << t << " d=" << d;
      std::printf("  rope backward vs autograd T=%lld d=%lld: max err / max|ref| = %.3g\n", static_cast<long long>(t),
                  static_cast<long long>(d), err);

      // The same gradient in a column slice of a wider buffer.
      const int64_t width = 2 * h * d + 5;
      at::Tensor wide = at::randn({b * t, width});
      const at::Tensor before = wide.clone();
      at::Tensor view = slice_view(wide, b, t, h, d, 5);
      view.copy_(grad.transpose(1, 2));
      rope_backward_inplace(view, cos, sin);
      EXPECT_TRUE(at::equal(slice_view(wide, b, t, h, d, 5), g))
          << "T=" << t << " d=" << d << " max diff " << max_abs(slice_view(wide, b, t, h, d, 5) - g);
      EXPECT_TRUE(at::equal(wide.narrow(1, 0, 5), before.narrow(1, 0, 5)));
      EXPECT_TRUE(at::equal(wide.narrow(1, 5 + h * d, h * d), before.narrow(1, 5 + h * d, h * d)));
    }
}

TEST(FusedOpsReference, RopeBackwardIsTheAdjoint) {
  // <rope(x), y> = <x, rope_backward(y)> for random x, y: the backward is the transpose.
  torch::manual_seed(3);
  const int64_t b = 1, t = 17, h = 2, d = 64;
  const auto [cos, sin] = make_cos_sin(b, t, d);
  const at::Tensor x = at::randn({b, t, h, d}, at::kDouble), y = at::randn({b, t, h, d}, at::kDouble);
  const at::Tensor c = cos.to(at::kDouble), s = sin.to(at::kDouble);
  at::Tensor rx = x.clone(), ry = y.clone();
  rope_inplace_reference(rx, c, s);
  rope_backward_inplace_reference(ry, c, s);
  const double lhs = (rx * y).sum().item<double>(), rhs = (x * ry).sum().item<double>();
  EXPECT_NEAR(lhs, rhs, 1e-10 * (std::abs(lhs) + 1.0));
}

// A gated product op (swiglu, geglu) against act(g) * u: its reference exact, the op equal to
// the reference, both contiguous [N, I], also from a column slice of a wider row (odd stride).
using GatedOp = at::Tensor (*)(const at::Tensor&);
void expect_gated_product(GatedOp op, GatedOp reference, const std::function<at::Tensor(const at::Tensor&)>& act,
                          uint64_t seed) {
  torch::manual_seed(seed);
  for (int64_t n : kRows)
    for (int64_t inter : kInters) {
      const at::Tensor gu = at::randn({n, 2 * inter}) * 3;
      const at::Tensor want = act(gu.narrow(1, 0, inter)) * gu.narrow(1, inter, inter);
      const at::Tensor m = reference(gu);
      EXPECT_TRUE(m.is_contiguous());
      EXPECT_EQ(m.sizes(), (std::vector<int64_t>{n, inter}));
      EXPECT_LE(rel_err(m, want), kExact) << "N=" << n << " I=" << inter;
      EXPECT_TRUE(at::equal(op(gu), m));
      const at::Tensor wide = at::randn({n, 3 * inter + 5});
      wide.narrow(1, 3, 2 * inter).copy_(gu);
      const at::Tensor ms = op(wide.narrow(1, 3, 2 * inter));
      EXPECT_TRUE(ms.is_contiguous());
      EXPECT_TRUE(at::equal(ms, m));
    }
}

TEST(FusedOpsReference, SwigluEqualsSiluTimesUp) {
  expect_gated_product(&swiglu, &swiglu_reference, [](const at::Tensor& g) { return at::silu(g); }, 4);
}

// A gated product's backward in place (dg | du over gu) against autograd's of act(g) * u, the
// reference to kAutogradRtol; the dispatching op on column slices (gu of [N, 3I + 5], dm of
// [N, 2I + 1]) equal to the reference, the columns outside gu's slice untouched.
using GatedBackward = void (*)(const at::Tensor&, at::Tensor&);
void expect_gated_backward(const char* name, GatedBackward op, GatedBackward reference,
                           const std::function<at::Tensor(const at::Tensor&)>& act, uint64_t seed) {
  torch::manual_seed(seed);
  for (int64_t n : kRows)
    for (int64_t inter : kInters) {
      const at::Tensor gu0 = at::randn({n, 2 * inter}) * 3;
      const at::Tensor dm = at::randn({n, inter});
      const at::Tensor g = gu0.narrow(1, 0, inter).clone().requires_grad_(true);
      const at::Tensor u = gu0.narrow(1, inter, inter).clone().requires_grad_(true);
      (act(g) * u).backward(dm);

      at::Tensor gu = gu0.clone();
      reference(dm, gu);
      const double err_dg = rel_err(gu.narrow(1, 0, inter), g.grad());
      const double err_du = rel_err(gu.narrow(1, inter, inter), u.grad());
      EXPECT_LE(err_dg, kAutogradRtol) << name << " dg N=" << n << " I=" << inter;
      EXPECT_LE(err_du, kAutogradRtol) << name << " du N=" << n << " I=" << inter;
      std::printf("  %s backward vs autograd N=%lld I=%lld: max err / max|ref| = %.3g (dg), %.3g (du)\n", name,
                  static_cast<long long>(n), static_cast<long long>(inter), err_dg, err_du);

      at::Tensor wide = at::randn({n, 3 * inter + 5});
      const at::Tensor before = wide.clone();
      at::Tensor gus = wide.narrow(1, 3, 2 * inter);
      gus.copy_(gu0);
      const at::Tensor dm_wide = at::randn({n, 2 * inter + 1});
      at::Tensor dms = dm_wide.narrow(1, 1, inter);
      dms.copy_(dm);
      op(dms, gus);
      EXPECT_TRUE(at::equal(wide.narrow(1, 3, 2 * inter), gu)) << name;
      EXPECT_TRUE(at::equal(wide.narrow(1, 0, 3), before.narrow(1, 0, 3))) << name;
      EXPECT_TRUE(at::equal(wide.narrow(1, 3 + 2 * inter, inter + 2), before.narrow(1, 3 + 2 * inter, inter + 2)))
          << name;
    }
}

TEST(FusedOpsReference, SwigluBackwardMatchesAutograd) {
  expect_gated_backward("swiglu", &swiglu_backward_inplace, &swiglu_backward_inplace_reference,
                        [](const at::Tensor& g) { return at::silu(g); }, 5);
}

TEST(FusedOpsReference, GegluEqualsGeluTanhTimesUp) {
  expect_gated_product(&geglu, &geglu_reference, [](const at::Tensor& g) { return at::gelu(g, "tanh"); }, 6);
}

// The reference's backward takes autograd's own ops for gelu(g, "tanh") * u (the product's
// backward, then at::gelu_backward), but ATen's CPU gelu and gelu_backward round the last bit of
// some elements differently on the column slices of gu than on autograd's contiguous g (their
// strided and contiguous loops): seen 1.2e-8 of the largest gradient, 0 where the layouts agree.
TEST(FusedOpsReference, GegluBackwardMatchesAutograd) {
  expect_gated_backward("geglu", &geglu_backward_inplace, &geglu_backward_inplace_reference,
                        [](const at::Tensor& g) { return at::gelu(g, "tanh"); }, 7);
}

// LoRA dropout's backward: acc + d · scale where the mask keeps, acc where it drops, or
// without acc the dropped gradient alone, in place on d. The CPU's bf16 multiply by a scalar
// rounds its own way (an ulp from the fp32 product, seen), so the definition is met to one
// bf16 ulp of each element here; the CUDA kernel is pinned bit for bit in test_cuda_fused_ops.
TEST(FusedOpsReference, DropoutBackwardAddIsTheMaskedScaledSum) {
  torch::manual_seed(17);
  const double scale = 1.0 / 0.9;
  const at::Tensor d = (at::randn({6, 40}) * 3).to(at::kBFloat16);
  const at::Tensor acc = at::randn({6, 40}).to(at::kBFloat16);
  const at::Tensor mask = at::rand({6, 40}) > 0.1;
  ASSERT_TRUE(mask.any().item<bool>() && !mask.all().item<bool>());
  const at::Tensor kept = (d.to(at::kFloat) * static_cast<float>(scale)).to(at::kBFloat16).to(at::kFloat);
  const at::Tensor dropped = at::where(mask, kept, at::zeros_like(kept));
  const at::Tensor want_sum = (acc.to(at::kFloat) + dropped).to(at::kBFloat16);

  // Two bf16 ulps (2^-7 relative each) of the terms' magnitude |acc| + |d · scale|: the
  // product may land an ulp off the fp32 one, and the sum rounds again. A dropped mask or a
  // missing scale moves an element by ~10% of it or all of it.
  const at::Tensor magnitude = acc.to(at::kFloat).abs() + kept.abs();
  const auto ulp_close = [&magnitude](const at::Tensor& got, const at::Tensor& want) {
    const at::Tensor g = got.to(at::kFloat), w = want.to(at::kFloat);
    return ((g - w).abs() <= magnitude * (2.0 / 128) + 1e-6).all().item<bool>();
  };
  at::Tensor a = acc.clone(), dc = d.clone();
  const at::Tensor sum = dropout_backward_add(a, dc, mask, scale);
  EXPECT_EQ(sum.data_ptr(), a.data_ptr()) << "the sum goes into acc";
  EXPECT_TRUE(ulp_close(sum, want_sum));
  at::Tensor alone = d.clone();
  const at::Tensor first = dropout_backward_add(at::Tensor(), alone, mask, scale);
  EXPECT_EQ(first.data_ptr(), alone.data_ptr()) << "without acc, in place on d";
  EXPECT_TRUE(ulp_close(first, dropped.to(at::kBFloat16)));
  // Where the mask drops, exactly acc (or exactly zero).
  EXPECT_TRUE(at::equal(sum.masked_select(~mask), acc.masked_select(~mask)));
  EXPECT_TRUE((first.masked_select(~mask) == 0).all().item<bool>());
}

TEST(FusedOpsReference, DropoutBackwardAddWantsTheBoolMask) {
  const at::Tensor d = at::randn({4, 8});
  try {
    dropout_backward_add(at::Tensor(), d.clone(), at::ones({4, 8}), 2.0);  // float noise, not a bool mask
    FAIL() << "a float mask was accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("expected a bool mask of d's shape [4, 8] or a uint8 bit mask"),
              std::string::npos)
        << e.what();
  }
}

// ---------------------------------------------------------------- LoRA dropout (the CPU reference)

// Random123's known-answer vectors for Philox4x32-10 (its kat_vectors file): counter, key, output.
TEST(LoraDropoutReference, PhiloxMatchesRandom123KnownAnswers) {
  struct Kat {
    std::array<uint32_t, 4> ctr;
    std::array<uint32_t, 2> key;
    std::array<uint32_t, 4> want;
  };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Kat& k : kats) {
    const std::array<uint32_t, 4> got = philox4x32_10(k.ctr, k.key);
    for (int w = 0; w < 4; ++w)
      EXPECT_EQ(got[w], k.want[w]) << "word " << w << ": expected " << std::hex << k.want[w] << ", got " << got[w];
  }
}

TEST(LoraDropoutReference, ThresholdIsPTimesTwoToThe16) {
  EXPECT_EQ(dropout_threshold(0.05), 3277u);  // round(0.05 * 2^16) = round(3276.8)
  EXPECT_EQ(dropout_threshold(0.5), 32768u);
  EXPECT_EQ(dropout_threshold(1.0 - 1e-12), 0xFFFFu);
  EXPECT_THROW(dropout_threshold(0.0), c10::Error);
  EXPECT_THROW(dropout_threshold(1.0), c10::Error);
}

// The reference's copies: kept elements are round(x * scale) in fp32 then the dtype, dropped
// ones +0, the bits say which, the drop rate is p, and the draws depend on the offset only.
TEST(LoraDropoutReference, CopiesBitsAndRate) {
  torch::manual_seed(3);
  const int64_t n = 1 << 16;
  const double p = 0.3;
  const at::Tensor x = (at::randn({n}) + 10.0).to(at::kBFloat16);  // no zero: a zero output is a drop
  const std::vector<DroppedCopy> c = lora_dropout_reference(x.view({256, 256}), p, 0x0123456789abcdefULL, {8, 12, 8});
  ASSERT_EQ(c.size(), 3u);
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  for (const DroppedCopy& d : c) {
    ASSERT_EQ(d.x.sizes(), (std::vector<int64_t>{256, 256}));
    ASSERT_EQ(d.bits.numel(), n / 8);
    const at::Tensor keep = unpack_bits(d.bits, {n});
    EXPECT_TRUE(at::equal(keep, d.x.reshape({-1}) != 0)) << "the bits and the zeros disagree";
    const at::Tensor scaled = (x.to(at::kFloat) * scale).to(at::kBFloat16);
    EXPECT_TRUE(at::equal(d.x.reshape({-1}).masked_select(keep), scaled.masked_select(keep)));
    const double rate = 1.0 - keep.to(at::kDouble).mean().item<double>();
    // sqrt(p (1 - p) / n) = 0.0018: six of those.
    EXPECT_NEAR(rate, p, 0.011) << "expected a drop rate of " << p << ", got " << rate;
  }
  EXPECT_TRUE(at::equal(c[0].bits, c[2].bits)) << "the same offset must draw the same mask";
  const double same = (unpack_bits(c[0].bits, {n}) == unpack_bits(c[1].bits, {n})).to(at::kDouble).mean().item<double>();
  // Independent masks agree on p^2 + (1 - p)^2 = 0.58 of the elements.
  EXPECT_NEAR(same, 0.58, 0.02) << "offsets 8 and 12 drew correlated masks";
}

TEST(LoraDropoutReference, BitMaskBackwardEqualsTheBoolOne) {
  torch::manual_seed(5);
  for (const int64_t n : {int64_t{1}, int64_t{13}, int64_t{64}}) {
    const at::Tensor d = at::randn({n}).to(at::kBFloat16);
    const at::Tensor acc = at::randn({n}).to(at::kBFloat16);
    const DroppedCopy c = lora_dropout_reference(at::ones({n}), 0.4, 99, {4}).front();
    const at::Tensor mask = unpack_bits(c.bits, {n});
    const at::Tensor want = dropout_backward_add(acc.clone(), d.clone(), mask, 1.0 / 0.6);
    const at::Tensor got = dropout_backward_add(acc.clone(), d.clone(), c.bits, 1.0 / 0.6);
    EXPECT_TRUE(at::equal(got, want)) << "n=" << n;
  }
  EXPECT_THROW(unpack_bits(at::zeros({3}, at::kByte), {8}), c10::Error);  // 3 bytes for 8 elements
}

// Note [shed LoRA inputs]: the input and a copy's bits give the copy back, bit for bit, and
// leave the input as it was; bits of another size are refused.
TEST(LoraDropoutReference, ApplyingTheBitsAgainRemakesTheCopy) {
  torch::manual_seed(7);
  const double p = 0.25;
  for (const at::ScalarType dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    for (const int64_t n : {int64_t{1}, int64_t{13}, int64_t{4096 + 3}}) {
      const at::Tensor x = (at::randn({n}) * 3).to(dtype);
      const at::Tensor before = x.clone();
      const DroppedCopy c = lora_dropout_reference(x, p, 1234, {8}).front();
      const at::Tensor again = apply_dropout_bits(x, c.bits, 1.0 / (1.0 - p));
      EXPECT_TRUE(at::equal(again, c.x)) << c10::toString(dtype) << " n=" << n;
      EXPECT_TRUE(at::equal(x, before)) << "the input was written";
    }
  }
  EXPECT_THROW(apply_dropout_bits(at::ones({16}), at::zeros({1}, at::kByte), 2.0), c10::Error);
}

// On the CPU dropout_backward_sum is the terms added one call at a time, in order; a mask
// missing for a term is refused.
TEST(LoraDropoutReference, SumIsOneCallATerm) {
  torch::manual_seed(6);
  const int64_t n = 45;
  const double scale = 1.0 / 0.9;
  std::vector<at::Tensor> d, bits;
  for (int k = 0; k < 3; ++k) {
    d.push_back(at::randn({n}).to(at::kBFloat16));
    bits.push_back(lora_dropout_reference(at::ones({n}), 0.1, 7, {static_cast<uint64_t>(4 * (k + 1))}).front().bits);
  }
  const at::Tensor acc = at::randn({n}).to(at::kBFloat16);
  at::Tensor want = acc.clone();
  for (int k = 0; k < 3; ++k) want = dropout_backward_add(want, d[k].clone(), bits[k], scale);
  std::vector<at::Tensor> terms;
  for (const at::Tensor& t : d) terms.push_back(t.clone());
  EXPECT_TRUE(at::equal(dropout_backward_sum(acc.clone(), terms, bits, scale), want));
  EXPECT_THROW(dropout_backward_sum(acc.clone(), {d[0].clone(), d[1].clone()}, {bits[0]}, scale), c10::Error);
}

// The norm's backward reference against autograd through rms_norm_reference (PyTorch's own
// differentiation of LlamaRMSNorm's ops), plus the residual gradient, in fp64; in place on g.
TEST(FusedOpsReference, RmsNormBackwardAddIsAutogradsPlusTheResidual) {
  torch::manual_seed(31);
  const double eps = 1e-5;
  for (const int64_t h : {int64_t{8}, int64_t{37}, int64_t{256}}) {
    const at::Tensor x = at::randn({5, h}, at::kDouble).requires_grad_(true);
    const at::Tensor w = at::randn({h}, at::kDouble);
    const at::Tensor g = at::randn({5, h}, at::kDouble), res = at::randn({5, h}, at::kDouble);
    const at::Tensor y = rms_norm_reference(x, w, eps);
    const at::Tensor want = torch::autograd::grad({y}, {x}, {g})[0] + res;
    const at::Tensor rstd = at::rsqrt(x.detach().pow(2).mean(-1, /*keepdim=*/true) + eps);
    at::Tensor into = g.clone();
    const at::Tensor got = rms_norm_backward_add_reference(into, x.detach(), w, rstd, res);
    EXPECT_EQ(got.data_ptr(), into.data_ptr()) << "not in place on g";
    // The reference computes in fp32: its rounding, not the formula, bounds the difference.
    const double err = (got - want).abs().max().item<double>() / want.abs().max().item<double>();
    EXPECT_LT(err, 1e-5) << "h=" << h << ": relative error " << err;
  }
  EXPECT_THROW(rms_norm_backward_add_reference(at::zeros({2, 4}), at::zeros({2, 5}), at::ones({4}), at::ones({2}),
                                               at::zeros({2, 4})),
               c10::Error);
}

TEST(FusedOpsReference, EmptyRowsAreFine) {
  const auto [cos, sin] = make_cos_sin(1, 0, 64);
  at::Tensor x = at::randn({1, 0, 2, 64});
  EXPECT_NO_THROW(rope_inplace(x, cos, sin));
  const at::Tensor gu = at::randn({0, 10});
  EXPECT_EQ(swiglu(gu).sizes(), (std::vector<int64_t>{0, 5}));
  at::Tensor gu2 = gu.clone();
  EXPECT_NO_THROW(swiglu_backward_inplace(at::randn({0, 5}), gu2));
  EXPECT_EQ(geglu(gu).sizes(), (std::vector<int64_t>{0, 5}));
  EXPECT_NO_THROW(geglu_backward_inplace(at::randn({0, 5}), gu2));
}

TEST(FusedOpsReference, BadInputThrows) {
  const auto [cos, sin] = make_cos_sin(2, 3, 64);
  at::Tensor x = at::randn({2, 3, 4, 64});
  // cos of the wrong shape (T = 4 instead of 3), of another dtype, not contiguous.
  const auto [cos4, sin4] = make_cos_sin(2, 4, 64);
  EXPECT_THROW(rope_inplace(x, cos4, sin), c10::Error);
  EXPECT_THROW(rope_backward_inplace(x, cos, sin4), c10::Error);
  EXPECT_THROW(rope_inplace(x, cos.to(at::kDouble), sin), c10::Error);
  const at::Tensor cos_t = cos.transpose(0, 1).contiguous().transpose(0, 1);
  EXPECT_THROW(rope_inplace(x, cos_t, sin), c10::Error);
  // x whose last dim is not contiguous, x of the wrong rank, an odd head dim.
  at::Tensor xt = at::randn({2, 3, 64, 4}).transpose(2, 3);
  EXPECT_THROW(rope_inplace(xt, cos, sin), c10::Error);
  at::Tensor x3 = at::randn({2, 3, 64});
  EXPECT_THROW(rope_inplace(x3, cos, sin), c10::Error);
  try {
    rope_inplace(x, cos4, sin);
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    EXPECT_NE(what.find("expected cos [2, 3, 64]"), std::string::npos) << what;
    EXPECT_NE(what.find("[2, 4, 64]"), std::string::npos) << what;
  }

  // SwiGLU: odd width, last dim not contiguous, dm of the wrong shape / dtype.
  EXPECT_THROW(swiglu(at::randn({3, 7})), c10::Error);
  EXPECT_THROW(swiglu(at::randn({8, 3}).t()), c10::Error);
  at::Tensor gu = at::randn({3, 8});
  EXPECT_THROW(swiglu_backward_inplace(at::randn({3, 8}), gu), c10::Error);
  EXPECT_THROW(swiglu_backward_inplace(at::randn({4, 4}).t().narrow(0, 0, 3), gu), c10::Error);
  EXPECT_THROW(swiglu_backward_inplace(at::randn({3, 4}, at::kDouble), gu), c10::Error);
  // GeGLU: the same rules.
  EXPECT_THROW(geglu(at::randn({3, 7})), c10::Error);
  EXPECT_THROW(geglu(at::randn({8, 3}).t()), c10::Error);
  EXPECT_THROW(geglu_backward_inplace(at::randn({3, 8}), gu), c10::Error);
  EXPECT_THROW(geglu_backward_inplace(at::randn({4, 4}).t().narrow(0, 0, 3), gu), c10::Error);
  EXPECT_THROW(geglu_backward_inplace(at::randn({3, 4}, at::kDouble), gu), c10::Error);
}

}  // namespace
}  // namespace qlora::model
