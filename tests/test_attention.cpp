// model/attention on the CPU: packed rows run by run (no dense mask) against the dense-mask
// path and against attention written out in fp64, forward and the gradients of q, k and v, with
// grouped kv heads, sliding windows, soft caps and padding inside packed rows; the folded
// grouped-query path under a mask (decoding over a KvCache, padded rows) against k and v
// repeated per head, with and without a soft cap. The GPU's flash paths: test_cuda_attention.cpp.
#include <gtest/gtest.h>
#include <ATen/ATen.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "qlora/model/attention.h"

namespace qlora::model {
namespace {

// Relative to max |reference|. fp32 against fp32 over the same scores: the paths differ only in
// the order of the sums over keys (a run's keys alone against the whole row with zero weights
// for the hidden ones; one block of folded queries against one head each), a few roundings:
// 16 fp32 ulps of the largest entry. fp32 against fp64: every product and the softmax rounded
// once more, 32 ulps. A wrong key seen or hidden moves an output by more than 1e-2.
constexpr double kSamePathTol = 1.0 / (1 << 19);
constexpr double kFp64Tol = 1.0 / (1 << 18);

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

double max_rel(const at::Tensor& got, const at::Tensor& want) {
  return max_abs_diff(got, want) / std::max(want.to(at::kDouble).abs().max().item<double>(), 1e-30);
}

at::Tensor repeat_heads(const at::Tensor& x, int64_t groups) { return x.repeat_interleave(groups, 1); }

// Attention written out in fp64 from a dense mask [Bm, 1, t, tk]: the definition every path
// must meet (hidden keys get the dtype's lowest score, as transformers' additive mask).
at::Tensor reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                     double scale, double softcap = 0.0) {
  const int64_t groups = q.size(1) / k.size(1);
  at::Tensor s = at::matmul(q.to(at::kDouble), repeat_heads(k.to(at::kDouble), groups).transpose(2, 3)) * scale;
  if (softcap > 0) s = at::tanh(s / softcap) * softcap;
  s = s.masked_fill(at::logical_not(mask), std::numeric_limits<double>::lowest());
  return at::matmul(at::softmax(s, -1), repeat_heads(v.to(at::kDouble), groups));
}

// The band of a sliding window over t queries that are the last of tk keys.
at::Tensor band(int64_t t, int64_t tk, int64_t window) {
  const int64_t offset = tk - t;
  return at::ones({t, tk}, at::kBool).tril(offset).triu(offset - (window - 1)).view({1, 1, t, tk});
}

struct Qkv {
  at::Tensor q, k, v;
};

Qkv random_qkv(int64_t b, int64_t heads, int64_t kv_heads, int64_t t, int64_t tk, int64_t d, bool grad) {
  Qkv x{at::randn({b, heads, t, d}), at::randn({b, kv_heads, tk, d}), at::randn({b, kv_heads, tk, d})};
  if (grad) {
    x.q.requires_grad_(true);
    x.k.requires_grad_(true);
    x.v.requires_grad_(true);
  }
  return x;
}

struct Grads {
  at::Tensor out, dq, dk, dv;
};

// The output and the gradients of sum(out · w) with respect to q, k and v.
template <class F>
Grads run(const Qkv& x, const at::Tensor& w, F&& attend) {
  for (const at::Tensor& t : {x.q, x.k, x.v}) t.mutable_grad() = at::Tensor();
  at::Tensor out = attend(x.q, x.k, x.v);
  (out.to(at::kDouble) * w).sum().backward();
  return {out.detach(), x.q.grad().clone(), x.k.grad().clone(), x.v.grad().clone()};
}

void expect_close(const Grads& got, const Grads& want, double tol, const std::string& what) {
  const double out = max_rel(got.out, want.out), dq = max_rel(got.dq, want.dq), dk = max_rel(got.dk, want.dk),
               dv = max_rel(got.dv, want.dv);
  std::printf("  %s: relative error output %.1e, dq %.1e, dk %.1e, dv %.1e\n", what.c_str(), out, dq, dk, dv);
  EXPECT_LT(out, tol) << what << ": output";
  EXPECT_LT(dq, tol) << what << ": dq";
  EXPECT_LT(dk, tol) << what << ": dk";
  EXPECT_LT(dv, tol) << what << ": dv";
}

// Two packed rows of 24 tokens: examples of 5, 1, 9 and 4 tokens then 5 of padding (id 0, a
// run of its own, as data/batch.h packs), and one example of 20 then 4 of padding.
at::Tensor two_packed_rows() {
  std::vector<int64_t> ids;
  for (auto [id, n] : std::vector<std::pair<int64_t, int64_t>>{{1, 5}, {2, 1}, {3, 9}, {4, 4}, {0, 5}, {1, 20}, {0, 4}})
    ids.insert(ids.end(), static_cast<size_t>(n), id);
  return at::tensor(ids, at::kLong).view({2, 24});
}

at::Tensor positions_of(const at::Tensor& segment_ids) {
  at::Tensor pos = at::zeros_like(segment_ids);
  for (int64_t r = 0; r < segment_ids.size(0); ++r)
    for (int64_t c = 1; c < segment_ids.size(1); ++c)
      if (segment_ids[r][c].item<int64_t>() == segment_ids[r][c - 1].item<int64_t>())
        pos[r][c] = pos[r][c - 1] + 1;
  return pos;
}

TEST(Attention, PackedRowsKeepRunsWithoutADenseMask) {
  const at::Tensor seg = two_packed_rows();
  const AttentionInputs a = packed_attention(seg, positions_of(seg));
  ASSERT_TRUE(a.packed);
  EXPECT_FALSE(a.mask.defined());
  EXPECT_EQ(a.packed->starts(), (std::vector<int64_t>{0, 5, 6, 15, 19, 24, 44, 48}));
  EXPECT_EQ(a.packed->longest(), 20);
  EXPECT_EQ(a.packed->cu_seqlens().scalar_type(), at::kInt);
  EXPECT_TRUE(at::equal(a.packed->cu_seqlens().to(at::kLong), at::tensor(a.packed->starts(), at::kLong)));
  // The dense mask, built on demand, is the one packed_attention always built: same segment,
  // not later.
  const at::Tensor mask = a.dense_mask();
  const at::Tensor want = at::logical_and(at::ones({24, 24}, at::kBool).tril().view({1, 1, 24, 24}),
                                          at::eq(seg.view({2, 1, 24, 1}), seg.view({2, 1, 1, 24})));
  EXPECT_TRUE(at::equal(mask, want));
  EXPECT_EQ(a.dense_mask().data_ptr(), mask.data_ptr());  // built once

  // An id that comes back after another one in its row is no run: the dense mask, as before.
  const at::Tensor back = at::tensor(std::vector<int64_t>{1, 1, 2, 2, 1, 1}, at::kLong).view({1, 6});
  const AttentionInputs m = packed_attention(back, positions_of(back));
  EXPECT_FALSE(m.packed);
  ASSERT_TRUE(m.mask.defined());
  EXPECT_TRUE(m.mask[0][0][5][0].item<bool>());
}

// Runs against the dense mask of the same rows and against fp64, for grouped and plain kv
// heads, without and with a window shorter than the longer runs, and with a soft cap.
TEST(Attention, PackedRunsEqualTheDenseMaskForwardAndBackward) {
  torch::manual_seed(3);
  const at::Tensor seg = two_packed_rows();
  const AttentionInputs packed = packed_attention(seg, positions_of(seg));
  AttentionInputs dense;
  dense.mask = packed.dense_mask();
  const double scale = 1.0 / std::sqrt(16.0);
  for (int64_t kv_heads : {2, 6}) {
    for (int64_t window : {0, 4}) {
      for (double softcap : {0.0, 3.0}) {
        const std::string what = "kv heads " + std::to_string(kv_heads) + ", window " + std::to_string(window) +
                                 ", softcap " + std::to_string(softcap);
        const Qkv x = random_qkv(2, 6, kv_heads, 24, 24, 16, /*grad=*/true);
        const at::Tensor w = at::randn({2, 6, 24, 16}, at::kDouble);
        const Grads got = run(x, w, [&](auto& q, auto& k, auto& v) {
          return attention(q, k, v, packed, window, 0.0, softcap);
        });
        const Grads masked = run(x, w, [&](auto& q, auto& k, auto& v) {
          return attention(q, k, v, dense, window, 0.0, softcap);
        });
        at::Tensor visible = dense.mask;
        if (window > 0) visible = at::logical_and(visible, band(24, 24, window));
        const Grads exact = run(x, w, [&](auto& q, auto& k, auto& v) {
          return reference(q, k, v, visible, scale, softcap);
        });
        expect_close(got, masked, kSamePathTol, what + " vs the dense mask");
        expect_close(got, exact, kFp64Tol, what + " vs fp64");
        // Padding (the last 5 and 4 tokens) has no loss but must stay finite.
        EXPECT_TRUE(at::isfinite(got.out).all().item<bool>()) << what;
        EXPECT_TRUE(at::isfinite(got.dq).all().item<bool>()) << what;
      }
    }
  }
}

// A run of one row is what the row alone gives: packing changes nothing for an example.
TEST(Attention, PackedRunEqualsTheExampleAlone) {
  torch::manual_seed(4);
  const at::Tensor seg = two_packed_rows();
  const AttentionInputs packed = packed_attention(seg, positions_of(seg));
  const Qkv x = random_qkv(2, 4, 2, 24, 24, 8, /*grad=*/false);
  const at::Tensor out = attention(x.q, x.k, x.v, packed, 3);
  const auto piece = [](const at::Tensor& t) { return t.narrow(0, 0, 1).narrow(2, 6, 9); };  // example 3
  const at::Tensor alone =
      attention(piece(x.q), piece(x.k), piece(x.v), causal_attention(1, 9, c10::kCPU), 3);
  EXPECT_LT(max_rel(piece(out), alone), kSamePathTol);
}

// Decoding: t new queries over tk cached keys under a mask [B, 1, t, tk] (padding hidden),
// the query heads of a kv head folded into one block against k and v as they are, equal to k
// and v repeated per head (attention with as many kv heads as query heads: the repeat path).
TEST(Attention, FoldedGroupsEqualRepeatedKvUnderAMask) {
  torch::manual_seed(5);
  const int64_t b = 2, heads = 8, kv_heads = 2, tk = 11, d = 16, groups = heads / kv_heads;
  for (int64_t t : {1, 3}) {
    for (int64_t window : {0, 5}) {
      for (double softcap : {0.0, 2.5}) {
        const std::string what = "t " + std::to_string(t) + ", window " + std::to_string(window) + ", softcap " +
                                 std::to_string(softcap);
        const Qkv x = random_qkv(b, heads, kv_heads, t, tk, d, /*grad=*/true);
        // Row 0 has two padding positions on the left; row 1 sees every key. Each query sees
        // the keys up to its own position.
        at::Tensor real = at::ones({b, tk}, at::kBool);
        real[0].narrow(0, 0, 2).fill_(false);
        AttentionInputs a;
        a.mask = at::logical_and(real.view({b, 1, 1, tk}), band(t, tk, tk));
        const at::Tensor w = at::randn({b, heads, t, d}, at::kDouble);
        const Grads got = run(x, w, [&](auto& q, auto& k, auto& v) {
          return attention(q, k, v, a, window, 0.0, softcap);
        });
        const Grads repeated = run(x, w, [&](auto& q, auto& k, auto& v) {
          return attention(q, repeat_heads(k, groups), repeat_heads(v, groups), a, window, 0.0, softcap);
        });
        expect_close(got, repeated, kSamePathTol, what);
        // Gradients in their operands' layout (head dim contiguous), as the repeat path gives
        // them: the fused layer's RoPE backward takes them as they come.
        EXPECT_EQ(got.dq.stride(-1), 1) << what;
        EXPECT_EQ(got.dk.stride(-1), 1) << what;
        EXPECT_EQ(got.dv.stride(-1), 1) << what;
        at::Tensor visible = window > 0 ? at::logical_and(a.mask, band(t, tk, window)) : a.mask;
        const Grads exact = run(x, w, [&](auto& q, auto& k, auto& v) {
          return reference(q, k, v, visible, 1.0 / std::sqrt(static_cast<double>(d)), softcap);
        });
        expect_close(got, exact, kFp64Tol, what + " vs fp64");
      }
    }
  }
}

// Padded rows (t = tk under a [B, 1, T, T] mask) take the same fold, and a per-head mask
// [B, H, t, tk] folds too.
TEST(Attention, FoldedGroupsEqualRepeatedKvForPaddedRowsAndPerHeadMasks) {
  torch::manual_seed(6);
  const at::Tensor attention_mask = at::tensor(std::vector<int64_t>{0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}, at::kLong)
                                        .view({2, 7});
  const AttentionInputs padded = padded_attention(attention_mask);
  const Qkv x = random_qkv(2, 6, 3, 7, 7, 8, /*grad=*/false);
  for (double softcap : {0.0, 4.0}) {
    const at::Tensor got = attention(x.q, x.k, x.v, padded, 0, 0.0, softcap);
    const at::Tensor want = attention(x.q, repeat_heads(x.k, 2), repeat_heads(x.v, 2), padded, 0, 0.0, softcap);
    EXPECT_LT(max_rel(got, want), kSamePathTol) << "softcap " << softcap;
  }
  AttentionInputs per_head;
  per_head.mask = at::rand({2, 6, 7, 7}) > 0.4;
  per_head.mask = at::logical_or(per_head.mask, at::eye(7, at::kBool).view({1, 1, 7, 7}));  // no blind row
  for (double softcap : {0.0, 4.0}) {
    const at::Tensor got = attention(x.q, x.k, x.v, per_head, 0, 0.0, softcap);
    const at::Tensor want = attention(x.q, repeat_heads(x.k, 2), repeat_heads(x.v, 2), per_head, 0, 0.0, softcap);
    EXPECT_LT(max_rel(got, want), kSamePathTol) << "per-head mask, softcap " << softcap;
    EXPECT_LT(max_rel(got, reference(x.q, x.k, x.v, per_head.mask, 1.0 / std::sqrt(8.0), softcap)), kFp64Tol);
  }
}

TEST(Attention, RejectsShapesItCannotServe) {
  const Qkv x = random_qkv(1, 6, 4, 5, 5, 8, /*grad=*/false);
  EXPECT_THROW(attention(x.q, x.k, x.v, causal_attention(1, 5, c10::kCPU)), c10::Error);  // 6 heads over 4
  const Qkv y = random_qkv(1, 4, 2, 5, 5, 8, /*grad=*/false);
  const at::Tensor seg = at::ones({1, 6}, at::kLong);
  EXPECT_THROW(attention(y.q, y.k, y.v, packed_attention(seg, positions_of(seg))), c10::Error);  // 5 of 6
  EXPECT_FALSE(flash_attention_applies(y.q, y.k, y.v));  // never on the CPU
}

}  // namespace
}  // namespace qlora::model
