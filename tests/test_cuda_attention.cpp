// model/attention on a GPU (label cuda): ATen's variable-length flash kernel for packed rows
// (padding runs inside them too) and flash's own sliding window, in bf16, against the
// dense-mask path run in fp32 on the same (bf16-rounded) inputs, forward and the gradients of
// q, k and v, with grouped kv heads; the folded grouped-query path under a decoding mask
// against k and v repeated per head. Skipped where torch sees no CUDA device.
#include <gtest/gtest.h>
#include <ATen/ATen.h>
#include <torch/cuda.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#ifdef QLORA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

#include "qlora/model/attention.h"

namespace qlora::model {
namespace {

// Relative to max |fp32 reference|, as tests/test_cuda_fused_layer.cpp bounds bf16 against
// fp32: the inputs are the same bf16 values, so what differs is the kernel's own rounding (P
// rounded to bf16 before P·V, the output rounded once: a few bf16 ulps, 2^-8, of the largest
// entry), more for gradients, which go through two more such products. A key seen or hidden
// wrongly moves an output by more than 0.1.
constexpr double kHalfOutTol = 2e-2;
constexpr double kHalfGradTol = 4e-2;
// fp32 against fp32 (decoding, folded against repeated heads): the same sums in another
// blocking, a few roundings over 64-term dot products and a 37-key softmax.
constexpr double kF32Tol = 1.0 / (1 << 17);

double max_rel(const at::Tensor& got, const at::Tensor& want) {
  const at::Tensor g = got.to(at::kDouble), w = want.to(at::kDouble);
  return (g - w).abs().max().item<double>() / std::max(w.abs().max().item<double>(), 1e-30);
}

// Whether this GPU should take the flash kernel (ATen's flash runs on sm80 and later).
bool flash_expected() {
#ifdef QLORA_WITH_CUDA
  return at::cuda::getCurrentDeviceProperties()->major >= 8;
#else
  return false;
#endif
}

struct Result {
  at::Tensor out, dq, dk, dv;
};

// q, k, v as the layers make them (transposed views of [B, T, heads, d]) in `dtype`, leaves
// of their own; the output and the gradients of sum(out · w).
template <class F>
Result run(const at::Tensor& q0, const at::Tensor& k0, const at::Tensor& v0, const at::Tensor& w,
           at::ScalarType dtype, F&& attend) {
  at::Tensor q = q0.to(dtype).detach().requires_grad_(true);
  at::Tensor k = k0.to(dtype).detach().requires_grad_(true);
  at::Tensor v = v0.to(dtype).detach().requires_grad_(true);
  at::Tensor out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2));  // [B, H, T, d]
  (out.to(at::kFloat) * w).sum().backward();
  return {out.detach().to(at::kFloat), q.grad().to(at::kFloat), k.grad().to(at::kFloat), v.grad().to(at::kFloat)};
}

void expect_close(const Result& got, const Result& want, const std::string& what) {
  const double out = max_rel(got.out, want.out), dq = max_rel(got.dq, want.dq), dk = max_rel(got.dk, want.dk),
               dv = max_rel(got.dv, want.dv);
  std::printf("  %s: bf16 flash vs fp32 dense, relative error output %.2e, dq %.2e, dk %.2e, dv %.2e\n",
              what.c_str(), out, dq, dk, dv);
  EXPECT_LT(out, kHalfOutTol) << what;
  EXPECT_LT(dq, kHalfGradTol) << what;
  EXPECT_LT(dk, kHalfGradTol) << what;
  EXPECT_LT(dv, kHalfGradTol) << what;
  for (const at::Tensor& t : {got.out, got.dq, got.dk, got.dv}) EXPECT_TRUE(at::isfinite(t).all().item<bool>()) << what;
}

// Three packed rows of 256 tokens: examples of 100, 1, 60 and 55 tokens then 40 of padding (id
// 0, a run of its own); one example of 256; examples of 17 and 200 then 39 of padding.
at::Tensor packed_rows() {
  std::vector<int64_t> ids;
  const std::vector<std::pair<int64_t, int64_t>> runs = {{1, 100}, {2, 1}, {3, 60}, {4, 55}, {0, 40},
                                                         {1, 256}, {1, 17}, {2, 200}, {0, 39}};
  for (auto [id, n] : runs) ids.insert(ids.end(), static_cast<size_t>(n), id);
  return at::tensor(ids, at::kLong).view({3, 256});
}

at::Tensor positions_of(const at::Tensor& segment_ids) {
  const at::Tensor s = segment_ids.to(at::kLong);
  at::Tensor pos = at::zeros_like(s);
  auto p = pos.accessor<int64_t, 2>();
  auto a = s.accessor<int64_t, 2>();
  for (int64_t r = 0; r < s.size(0); ++r)
    for (int64_t c = 1; c < s.size(1); ++c) p[r][c] = a[r][c] == a[r][c - 1] ? p[r][c - 1] + 1 : 0;
  return pos;
}

// Packed rows: the flash varlen kernel (bf16) against the dense mask of the same rows (fp32),
// grouped and plain kv heads, head dims 64 and 128, without and with a window shorter than
// the longer runs.
TEST(AttentionCuda, FlashVarlenEqualsTheDenseMaskOnPackedRows) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  at::globalContext().setAllowTF32CuBLAS(false);
  const c10::Device gpu(c10::kCUDA, 0);
  const at::Tensor seg = packed_rows();
  // Host segment ids and positions on the device, as the trainer hands them.
  const AttentionInputs packed = packed_attention(seg, positions_of(seg).to(gpu));
  ASSERT_TRUE(packed.packed);
  ASSERT_TRUE(packed.packed->cu_seqlens().is_cuda());
  AttentionInputs dense;
  dense.mask = packed.dense_mask();
  ASSERT_TRUE(dense.mask.is_cuda());
  torch::manual_seed(7);
  const int64_t b = 3, t = 256, heads = 8;
  for (int64_t d : {64, 128}) {
    for (int64_t kv_heads : {2, 8}) {
      for (int64_t window : {0, 48}) {
        const std::string what = "d " + std::to_string(d) + ", kv heads " + std::to_string(kv_heads) + ", window " +
                                 std::to_string(window);
        const auto opts = at::TensorOptions().device(gpu);
        // Rounded to bf16 once: the fp32 reference sees the same values.
        const at::Tensor q = at::randn({b, t, heads, d}, opts).to(at::kBFloat16);
        const at::Tensor k = at::randn({b, t, kv_heads, d}, opts).to(at::kBFloat16);
        const at::Tensor v = at::randn({b, t, kv_heads, d}, opts).to(at::kBFloat16);
        const at::Tensor w = at::randn({b, heads, t, d}, opts);
        {
          const at::Tensor qb = q.transpose(1, 2), kb = k.transpose(1, 2), vb = v.transpose(1, 2);
          if (!flash_attention_applies(qb, kb, vb)) {
            ASSERT_FALSE(flash_expected()) << "flash attention should apply on this GPU (" << what << ")";
            GTEST_SKIP() << "ATen's flash kernel does not run on this GPU";
          }
        }
        const Result got = run(q, k, v, w, at::kBFloat16, [&](const at::Tensor& x, const at::Tensor& y,
                                                              const at::Tensor& z) {
          return attention(x, y, z, packed, window);
        });
        const Result want = run(q, k, v, w, at::kFloat, [&](const at::Tensor& x, const at::Tensor& y,
                                                            const at::Tensor& z) {
          return attention(x, y, z, dense, window);
        });
        expect_close(got, want, what);
      }
    }
  }
}

// Rows without a mask and a window shorter than them: flash's own window (every row one run)
// against the band mask in fp32, grouped kv heads.
TEST(AttentionCuda, FlashWindowEqualsTheBandMask) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  at::globalContext().setAllowTF32CuBLAS(false);
  const c10::Device gpu(c10::kCUDA, 0);
  torch::manual_seed(8);
  const int64_t b = 2, t = 300, heads = 8, kv_heads = 2, d = 64;
  const AttentionInputs causal = causal_attention(b, t, gpu);
  const auto opts = at::TensorOptions().device(gpu);
  const at::Tensor q = at::randn({b, t, heads, d}, opts).to(at::kBFloat16);
  const at::Tensor k = at::randn({b, t, kv_heads, d}, opts).to(at::kBFloat16);
  const at::Tensor v = at::randn({b, t, kv_heads, d}, opts).to(at::kBFloat16);
  const at::Tensor w = at::randn({b, heads, t, d}, opts);
  if (!flash_attention_applies(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))) {
    ASSERT_FALSE(flash_expected()) << "flash attention should apply on this GPU";
    GTEST_SKIP() << "ATen's flash kernel does not run on this GPU";
  }
  for (int64_t window : {1, 64, 299}) {
    const auto attend = [&](const at::Tensor& x, const at::Tensor& y, const at::Tensor& z) {
      return attention(x, y, z, causal, window);
    };
    expect_close(run(q, k, v, w, at::kBFloat16, attend), run(q, k, v, w, at::kFloat, attend),
                 "window " + std::to_string(window));
  }
}

// Decoding over a cache: one query a row over 37 keys (two of row 0's hidden), the query
// heads of a kv head folded against k and v as they are, against k and v repeated per head.
TEST(AttentionCuda, FoldedGroupsEqualRepeatedKvWhenDecoding) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  at::globalContext().setAllowTF32CuBLAS(false);
  const c10::Device gpu(c10::kCUDA, 0);
  torch::manual_seed(9);
  const int64_t b = 2, heads = 8, kv_heads = 2, tk = 37, d = 64;
  const auto opts = at::TensorOptions().device(gpu);
  at::Tensor real = at::ones({b, tk}, opts.dtype(at::kBool));
  real[0].narrow(0, 0, 2).fill_(false);
  AttentionInputs a;
  a.mask = real.view({b, 1, 1, tk});
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    for (double softcap : {0.0, 50.0}) {
      const at::Tensor q = at::randn({b, heads, 1, d}, opts).to(dtype);
      const at::Tensor k = at::randn({b, kv_heads, tk, d}, opts).to(dtype);
      const at::Tensor v = at::randn({b, kv_heads, tk, d}, opts).to(dtype);
      const at::Tensor got = attention(q, k, v, a, 0, 0.0, softcap);
      const at::Tensor want = attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), a, 0, 0.0, softcap);
      const double err = max_rel(got, want);
      std::printf("  %s softcap %.0f: folded vs repeated, relative error %.2e\n", c10::toString(dtype), softcap, err);
      EXPECT_LT(err, dtype == at::kFloat ? kF32Tol : kHalfOutTol) << c10::toString(dtype) << " softcap " << softcap;
    }
  }
}

}  // namespace
}  // namespace qlora::model
