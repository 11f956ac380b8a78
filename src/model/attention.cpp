#include "qlora/model/attention.h"

#include <torch/csrc/autograd/custom_function.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <set>

#ifdef QLORA_WITH_CUDA
#include <ATen/native/transformers/cuda/sdp_utils.h>
#endif

namespace qlora::model {

// Note [attention paths]
// model::attention picks its kernel from the inputs; every path computes what the dense mask
// computes (transformers' eager attention), to fp32 rounding (the sums over keys come in
// another order), so the choice is speed and memory only:
//  - causal rows (no mask, no window, or one no shorter than the row): SDPA's causal kernels
//    with enable_gqa (flash on a GPU in bf16 / fp16);
//  - packed rows (AttentionInputs::packed): each run attends causally within itself; padding
//    is a run too, so every query sees at least itself (no NaN). On a GPU where flash applies
//    (flash_attention_applies: bf16 / fp16, a head dim flash takes, sm80+, no soft cap), ATen's
//    variable-length flash kernel over the flattened B·T tokens with the runs' cumulative
//    lengths (FlashVarlen: autograd through _flash_attention_backward; fewer kv heads than
//    query heads natively). On the CPU, SDPA run by run (O(T) memory). Elsewhere (fp32 or a
//    soft cap on a GPU) the dense mask, built once per batch (PackedRows::mask);
//  - a sliding window shorter than the keys: on a GPU where flash applies, flash's own window
//    (window_size_left = window - 1: key j visible from query i when i - window < j <= i, as
//    transformers' sliding window), packed rows too, rows without a mask as runs of T tokens;
//    otherwise a band mask on top of the causal, padding or packing mask (the CPU's reference);
//  - a mask (padded rows, decoding over a KvCache: t queries over tk keys): the `groups` query
//    heads of a kv head become one block of groups·t queries against that head's keys (fold),
//    so k and v are not repeated per head. The mask is repeated per group instead: groups·t·tk
//    entries (and SDPA's additive copy) against 2·H·tk·d for k and v repeated, the cheaper
//    while groups·t <= H·d (always when decoding; at t = 1 the repeated mask is a view).
//    Beyond that (long left-padded rows) k and v are repeated, as transformers does;
//  - a soft cap (Gemma 2): scores, cap, mask, fp32 softmax, back to the input dtype, times v,
//    in the eager op order, on the folded heads (the mask broadcasts: no copy of it).

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// [B, kv_heads, T, d] -> [B, kv_heads * groups, T, d], each kv head repeated
// for the query heads that share it.
at::Tensor repeat_kv(const at::Tensor& x, int64_t groups) {
  if (groups == 1) return x;
  const auto b = x.size(0), h = x.size(1), t = x.size(2), d = x.size(3);
  return x.unsqueeze(2).expand({b, h, groups, t, d}).reshape({b, h * groups, t, d});
}

// A host tensor on `device`, without making the host wait for a GPU.
at::Tensor to_device(const at::Tensor& host, c10::Device device) {
  if (!device.is_cuda()) return host.to(device);
  return host.pin_memory().to(device, /*non_blocking=*/true);
}

// [B, 1, T, T]: query i sees key j <= i with the same segment id.
at::Tensor same_segment_mask(const at::Tensor& segment_ids) {
  const auto b = segment_ids.size(0), t = segment_ids.size(1);
  const auto opts = at::TensorOptions().dtype(at::kBool).device(segment_ids.device());
  at::Tensor causal = at::ones({t, t}, opts).tril().view({1, 1, t, t});
  at::Tensor same = at::eq(segment_ids.view({b, 1, t, 1}), segment_ids.view({b, 1, 1, t}));  // [B, 1, T, T]
  return at::logical_and(causal, same);
}

// The dtype's lowest value, as transformers' additive mask uses: not -inf, so a query that sees
// no key (padding beyond a window) gets a uniform row, never NaN.
double lowest(at::ScalarType t) {
  return t == at::kHalf       ? -65504.0
         : t == at::kBFloat16 ? -3.3895313892515355e38
                              : static_cast<double>(std::numeric_limits<float>::lowest());
}

// mask [Bm, 1 or H, t, tk] -> [Bm, 1 or Hkv, groups·t, tk], lined up with q folded as
// [B, Hkv, groups·t, d] (query head h = kv head · groups + g, repeat_kv's order).
at::Tensor fold_mask(const at::Tensor& mask, int64_t kv_heads, int64_t groups) {
  const auto mb = mask.size(0), t = mask.size(2), tk = mask.size(3);
  if (mask.size(1) == 1) return mask.unsqueeze(2).expand({mb, 1, groups, t, tk}).reshape({mb, 1, groups * t, tk});
  return mask.reshape({mb, kv_heads, groups * t, tk});
}

// q·kᵀ of folded queries qf [B, Hkv, M, d] and keys k [B, Hkv, tk, d], autograd's matmul
// backward but with each gradient in its operand's own layout: matmul hands the transposed
// operand's gradient back transposed ([.., d, tk] in memory), and layers that take the
// gradients of q, k and v further (the fused layer's RoPE backward) need the head dim
// contiguous, as repeating k gave it.
struct FoldedScores : public torch::autograd::Function<FoldedScores> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& qf, const at::Tensor& k) {
    ctx->save_for_backward({qf, k});
    return at::matmul(qf, k.transpose(2, 3));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor& g = grads[0];  // [B, Hkv, M, tk]
    return {ctx->needs_input_grad(0) ? at::matmul(g, s[1]) : at::Tensor(),
            ctx->needs_input_grad(1) ? at::matmul(g.transpose(2, 3), s[0]) : at::Tensor()};
  }
};

// Gemma 2's eager attention on folded heads: scores scaled, capped, then masked; softmax in
// fp32, back to the input dtype before the product with v. `visible` [Bm, 1 or H, t, tk].
at::Tensor softcapped(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& visible,
                      double scale, double softcap) {
  const int64_t b = q.size(0), heads = q.size(1), t = q.size(2), d = q.size(3);
  const int64_t kv_heads = k.size(1), tk = k.size(2), groups = heads / kv_heads;
  at::Tensor scores = FoldedScores::apply(q.reshape({b, kv_heads, groups * t, d}), k) * scale;
  scores = at::tanh(scores / softcap) * softcap;  // [B, Hkv, groups·t, tk]
  const at::Tensor hidden = at::logical_not(visible);
  const at::Tensor hidden5 = hidden.size(1) == 1 ? hidden.unsqueeze(2)
                                                 : hidden.view({hidden.size(0), kv_heads, groups, t, tk});
  scores = scores.view({b, kv_heads, groups, t, tk}).masked_fill(hidden5, lowest(q.scalar_type()));
  at::Tensor probs = at::softmax(scores.view({b, kv_heads, groups * t, tk}), -1, at::kFloat).to(q.scalar_type());
  return at::matmul(probs, v).view({b, heads, t, d});
}

// SDPA under a mask [Bm, 1 or H, t, tk] (Note [attention paths]: fold or repeat).
at::Tensor masked(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                  double scale) {
  const int64_t b = q.size(0), heads = q.size(1), t = q.size(2), d = q.size(3);
  const int64_t kv_heads = k.size(1), groups = heads / kv_heads;
  if (groups == 1 || groups * t > heads * d)
    return at::scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), mask, 0.0,
                                            /*is_causal=*/false, scale);
  at::Tensor out = at::scaled_dot_product_attention(q.reshape({b, kv_heads, groups * t, d}), k, v,
                                                    fold_mask(mask, kv_heads, groups), 0.0, /*is_causal=*/false,
                                                    scale);  // [B, Hkv, groups·t, d]
  return out.reshape({b, heads, t, d});
}

// Causal attention within each run of the flattened tokens, through ATen's variable-length
// flash kernel: q [N, H, d], k, v [N, Hkv, d] (N = B·T, last dim contiguous), cu [n + 1] int32.
// `window` > 0: key j visible from query i when i - window < j <= i.
struct FlashVarlen : public torch::autograd::Function<FlashVarlen> {
  static std::pair<std::optional<int64_t>, std::optional<int64_t>> flash_window(int64_t window) {
    if (window <= 0) return {std::nullopt, std::nullopt};
    return {window - 1, 0};
  }

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cu, int64_t longest, double scale, int64_t window) {
    const auto [left, right] = flash_window(window);
    auto [out, lse, rng_state, unused, debug_mask] =
        at::_flash_attention_forward(q, k, v, cu, cu, longest, longest, /*dropout_p=*/0.0, /*is_causal=*/true,
                                     /*return_debug_mask=*/false, scale, left, right);
    static_cast<void>(debug_mask);
    ctx->save_for_backward({q, k, v, out, lse, cu, rng_state, unused});
    ctx->saved_data["longest"] = longest;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["window"] = window;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const int64_t longest = ctx->saved_data["longest"].toInt();
    const auto [left, right] = flash_window(ctx->saved_data["window"].toInt());
    auto [dq, dk, dv] = at::_flash_attention_backward(grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4], s[5], s[5],
                                                      longest, longest, /*dropout_p=*/0.0, /*is_causal=*/true, s[6],
                                                      s[7], ctx->saved_data["scale"].toDouble(), left, right);
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// q [B, H, T, d], k, v [B, Hkv, T, d] -> [B, H, T, d] through FlashVarlen.
at::Tensor flash_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu,
                        int64_t longest, double scale, int64_t window) {
  const int64_t b = q.size(0), heads = q.size(1), t = q.size(2), d = q.size(3), kv_heads = k.size(1);
  TORCH_CHECK(cu.device() == q.device() && cu.scalar_type() == at::kInt, "attention: the runs' offsets must be int32 on ",
              q.device(), ", got ", cu.scalar_type(), " on ", cu.device());
  // [B, H, T, d] as [B·T, H, d]: free when q is a transposed [B, T, H, d], as the layers make it.
  const auto tokens = [&](const at::Tensor& x, int64_t h) { return x.transpose(1, 2).reshape({b * t, h, d}).contiguous(); };
  at::Tensor out = FlashVarlen::apply(tokens(q, heads), tokens(k, kv_heads), tokens(v, kv_heads), cu, longest, scale,
                                      window > 0 && window < longest ? window : 0);
  return out.view({b, t, heads, d}).transpose(1, 2);
}

// Causal attention run by run of packed rows (the CPU's path): each run is a causal row of its
// own, window and soft cap applied within it as model::attention applies them to any row.
at::Tensor per_run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const PackedRows& rows,
                   int64_t window, double scale, double softcap) {
  const int64_t t = q.size(2);
  const auto& starts = rows.starts();
  const AttentionInputs causal;
  std::vector<at::Tensor> out_rows, pieces;
  out_rows.reserve(static_cast<size_t>(rows.rows()));
  for (size_t i = 0; i + 1 < starts.size(); ++i) {
    const int64_t row = starts[i] / t, col = starts[i] % t, len = starts[i + 1] - starts[i];
    const auto run = [&](const at::Tensor& x) { return x.narrow(0, row, 1).narrow(2, col, len); };
    pieces.push_back(attention(run(q), run(k), run(v), causal, window, scale, softcap));
    if (col + len == t) {  // runs never cross rows: the row is complete
      out_rows.push_back(pieces.size() == 1 ? pieces.front() : at::cat(pieces, 2));
      pieces.clear();
    }
  }
  return out_rows.size() == 1 ? out_rows.front() : at::cat(out_rows, 0);
}

}  // namespace

// ---------------------------------------------------------------- layouts

PackedRows::PackedRows(const at::Tensor& host_segment_ids, c10::Device device) : device_(device) {
  TORCH_CHECK(host_segment_ids.dim() == 2 && host_segment_ids.is_cpu(),
              "PackedRows: segment_ids must be [B, T] on the host, got ", host_segment_ids.sizes(), " on ",
              host_segment_ids.device());
  host_segment_ids_ = host_segment_ids.to(at::kLong, /*non_blocking=*/false, /*copy=*/true).contiguous();
  rows_ = host_segment_ids_.size(0);
  cols_ = host_segment_ids_.size(1);
  TORCH_CHECK(rows_ * cols_ < std::numeric_limits<int32_t>::max(), "PackedRows: ", rows_, " x ", cols_,
              " tokens exceed the int32 offsets flash attention takes");
  const int64_t* s = host_segment_ids_.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows_; ++r) {
    std::set<int64_t> ended;  // this row's ids whose run is over
    for (int64_t c = 0; c < cols_; ++c) {
      const int64_t i = r * cols_ + c;
      if (c > 0 && s[i] == s[i - 1]) continue;
      if (c > 0) ended.insert(s[i - 1]);
      if (ended.count(s[i]) != 0) runs_are_segments_ = false;
      starts_.push_back(i);
    }
  }
  starts_.push_back(rows_ * cols_);
  for (size_t i = 0; i + 1 < starts_.size(); ++i) longest_ = std::max(longest_, starts_[i + 1] - starts_[i]);
  at::Tensor cu = at::empty({static_cast<int64_t>(starts_.size())}, at::kInt);
  int32_t* c = cu.data_ptr<int32_t>();
  for (size_t i = 0; i < starts_.size(); ++i) c[i] = static_cast<int32_t>(starts_[i]);
  cu_seqlens_ = to_device(cu, device_);
}

at::Tensor PackedRows::mask() const {
  const std::lock_guard<std::mutex> lock(mask_mutex_);
  if (!mask_.defined()) mask_ = same_segment_mask(to_device(host_segment_ids_, device_));
  return mask_;
}

at::Tensor AttentionInputs::dense_mask() const {
  if (mask.defined() || !packed) return mask;
  return packed->mask();
}

AttentionInputs causal_attention(int64_t batch, int64_t seq_len, c10::Device device) {
  AttentionInputs a;
  a.position_ids = at::arange(seq_len, at::TensorOptions().dtype(at::kLong).device(device))
                       .unsqueeze(0)
                       .expand({batch, seq_len})
                       .contiguous();
  return a;
}

AttentionInputs padded_attention(const at::Tensor& attention_mask) {
  TORCH_CHECK(attention_mask.dim() == 2, "attention_mask must be [B, T], got ", attention_mask.dim(), "-D");
  const auto b = attention_mask.size(0), t = attention_mask.size(1);
  AttentionInputs a = causal_attention(b, t, attention_mask.device());
  const auto opts = at::TensorOptions().dtype(at::kBool).device(attention_mask.device());
  at::Tensor causal = at::ones({t, t}, opts).tril();                           // [T, T]
  at::Tensor keys = attention_mask.to(at::kBool).view({b, 1, 1, t});          // [B, 1, 1, T]
  a.mask = at::logical_and(causal.view({1, 1, t, t}), keys);                   // [B, 1, T, T]
  // A query with no visible key (a padding token before any real one, or an
  // all-padding row) would make softmax 0/0 = NaN, and NaN times a zero loss
  // weight is still NaN in backward. Let such queries see themselves; rows
  // with any visible key are unchanged, so real tokens are unaffected.
  at::Tensor blind = at::logical_not(a.mask.any(-1, /*keepdim=*/true));          // [B, 1, T, 1]
  a.mask = at::logical_or(a.mask, at::logical_and(blind, at::eye(t, opts).view({1, 1, t, t})));
  return a;
}

AttentionInputs packed_attention(const at::Tensor& segment_ids, const at::Tensor& position_ids) {
  TORCH_CHECK(segment_ids.dim() == 2, "segment_ids must be [B, T], got ", segment_ids.dim(), "-D");
  TORCH_CHECK(position_ids.sizes() == segment_ids.sizes(), "position_ids ", position_ids.sizes(),
              " must have the shape of segment_ids ", segment_ids.sizes());
  AttentionInputs a;
  a.position_ids = position_ids.to(at::kLong);
  auto rows = std::make_shared<PackedRows>(segment_ids.cpu(), position_ids.device());
  if (rows->runs_are_segments()) {
    a.packed = std::move(rows);
  } else {
    a.mask = same_segment_mask(segment_ids.to(position_ids.device()));
  }
  return a;
}

// ---------------------------------------------------------------- attention

bool flash_attention_applies(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double softcap) {
#ifdef QLORA_WITH_CUDA
  if (!q.is_cuda() || softcap > 0 || q.dim() != 4) return false;  // ATen's flash kernel has no soft cap
  // SDPA pads other head sizes before its flash call; the raw varlen entry point refuses them.
  if (q.size(3) % 8 != 0) return false;
  // ATen's own gate for SDPA's flash kernel: bf16 / fp16, the head dims it takes, the GPUs it
  // runs on (with the sm86 / sm89 limits on backward), torch's switch for it.
  const sdp::sdp_params params{q, k, v, std::nullopt, 0.0, /*is_causal=*/true, /*enable_gqa=*/q.size(1) != k.size(1)};
  return sdp::can_use_flash_attention(params, /*debug=*/false);
#else
  static_cast<void>(q);
  static_cast<void>(k);
  static_cast<void>(v);
  static_cast<void>(softcap);
  return false;
#endif
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionInputs& attention,
                     int64_t window, double scale, double softcap) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: q, k, v must be [B, heads, T, d]");
  const int64_t b = q.size(0), heads = q.size(1), kv_heads = k.size(1), t = q.size(2), tk = k.size(2);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "attention: ", heads, " query heads over ", kv_heads,
              " kv heads");
  // Queries may be the last t of tk keys (decoding with a KvCache): then the caller's mask says
  // what each sees, and the window counts back from each query's own index among the keys.
  TORCH_CHECK(tk == t || attention.mask.defined(), "attention: ", t, " queries over ", tk,
              " keys need a mask [B, 1, ", t, ", ", tk, "]");
  if (scale <= 0) scale = 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  if (attention.packed && !attention.mask.defined()) {  // Note [attention paths]
    const PackedRows& rows = *attention.packed;
    TORCH_CHECK(b == rows.rows() && t == rows.cols(), "attention: packed rows [", rows.rows(), ", ", rows.cols(),
                "] for queries [", b, ", ", t, "]");
    if (flash_attention_applies(q, k, v, softcap))
      return flash_varlen(q, k, v, rows.cu_seqlens(), rows.longest(), scale, window);
    if (q.is_cpu()) return per_run(q, k, v, rows, window, scale, softcap);
    AttentionInputs dense;
    dense.mask = rows.mask();
    return model::attention(q, k, v, dense, window, scale, softcap);
  }
  if (window > 0 && window < tk) {
    if (!attention.mask.defined() && flash_attention_applies(q, k, v, softcap)) {
      // Every row one run of t tokens: flash's window instead of a [T, T] band.
      const at::Tensor cu = at::arange(0, (b + 1) * t, t, at::TensorOptions().dtype(at::kInt).device(q.device()));
      return flash_varlen(q, k, v, cu, t, scale, window);
    }
    // transformers' sliding window: key j is visible from query i when j > i - window, on top
    // of the causal, padding or packing mask.
    const auto opts = at::TensorOptions().dtype(at::kBool).device(q.device());
    const int64_t offset = tk - t;
    at::Tensor band = at::ones({t, tk}, opts).tril(offset).triu(offset - (window - 1)).view({1, 1, t, tk});
    AttentionInputs windowed;
    windowed.mask = attention.mask.defined() ? at::logical_and(attention.mask, band) : band;
    return model::attention(q, k, v, windowed, 0, scale, softcap);
  }
  if (softcap > 0) {
    const at::Tensor visible = attention.mask.defined()
                                   ? attention.mask
                                   : at::ones({t, t}, q.options().dtype(at::kBool)).tril().view({1, 1, t, t});
    return softcapped(q, k, v, visible, scale, softcap);
  }
  if (attention.mask.defined()) return masked(q, k, v, attention.mask, scale);
  return at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/t > 1, scale,
                                          /*enable_gqa=*/heads != kv_heads);
}

}  // namespace qlora::model
