// layer/fused_layer_halves: the fused decoder layer's two halves (Note [fused decoder layer] in
// src/layer/fused_layer.cpp), private to src/layer. The attention half: norm 1, the q|k|v GEMM
// with its LoRAs, the q / k head norms, RoPE, attention, o_proj with the residual (or Gemma's
// post-attention norm before it); the MLP half: norm 2, the gate|up GEMM, the GLU (SwiGLU or
// GeGLU), down_proj with the residual (or the post-feed-forward norm before it). Each as its
// forward, its recompute (the generators' draws in the forward's order) and its backward from
// what the forward or the recompute left.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "layer/fused_layer_parts.h"
#include "layer/fused_projections.h"

namespace qlora::model {
struct AttentionInputs;
}

namespace qlora::layer {

using CosSin = std::pair<at::Tensor, at::Tensor>;
using Passes = std::vector<std::pair<size_t, LoraPass>>;

// Note [the family's pieces]: a q or k head norm's input and 1/rms, what its backward reads.
struct HeadNorm {
  at::Tensor x;  // [N·heads, d] packed, the heads before the norm
  Normed n;      // n.y, the normed heads, only until RoPE has read them; n.rstd [N·heads, 1]
};

struct AttentionHalf {
  Normed n1;
  at::Tensor w_qkv;  // [q + k + v, h]
  at::Tensor a;      // [N, H·d] attention output
  Passes lora;
  HeadNorm q_norm, k_norm;  // the head norms (pieces.qk_norm); empty without
  // Note [sandwich norms]: o_proj's output [N, h], the post-attention norm's input, and W_o
  // when a recompute dequantized it to make o (undefined: backward dequantizes it).
  at::Tensor o, w_o;
};

// What attention's backward needs of its forward: the graph from the q, k, v leaves to its
// output (SDPA's, or the soft-capped eager attention's).
struct AttentionGraph {
  std::array<at::Tensor, 3> leaves;
  at::Tensor out;  // [B, H, T, d]
};

struct MlpHalf {
  Normed n2;
  at::Tensor w_gu;  // [2I, h]
  at::Tensor gu;    // [N, 2I]
  at::Tensor m;     // [N, I]
  Dropped down_in;  // down_proj's dropped input, drawn with m (make_m); x undefined otherwise
  Passes lora;
  at::Tensor d;     // Note [sandwich norms]: down_proj's output [N, h], the post-feed-forward norm's input
};

// ---------------------------------------------------------------- attention half

// The attention half up to a. With `grad_leaves`, q, k, v enter attention as autograd leaves
// (filled in) and `attn_out` holds attention's differentiable output. `shed_inputs`: Note [shed
// LoRA inputs].
AttentionHalf attention_half(const LayerRefs& r, const at::Tensor& x2, int64_t b, int64_t t, const CosSin& cos_sin,
                             const model::AttentionInputs& attention, std::array<at::Tensor, 3>* grad_leaves,
                             at::Tensor* attn_out, bool shed_inputs = false);

// h1 = x + o_proj(a) (+ LoRA, the residual in the GEMM), or with sandwich norms x + norm(o_proj(a)),
// o_proj's output left in att.o. o_proj's LoRA pass goes to `passes` when not null.
at::Tensor attention_residual(const LayerRefs& r, const at::Tensor& x2, AttentionHalf& att, Passes* passes);

// The attention half recomputed from x: q, k, v and then o's dropout masks drawn in the
// forward's order; with sandwich norms o_proj's output made again too (Note [sandwich norms]).
// `shed_inputs`: q, k, v's dropped LoRA inputs shed (Note [shed LoRA inputs]).
std::tuple<AttentionHalf, AttentionGraph, LoraPass> attention_recompute(const LayerRefs& r, const CosSin& cos_sin,
                                                                        const model::AttentionInputs& attention,
                                                                        const at::Tensor& x2, int64_t b, int64_t t,
                                                                        bool shed_inputs = false);

// The attention half's backward from its forward pieces (recomputed or kept; att.w_qkv must
// hold [Wq;Wk;Wv] dequantized) and o_proj's LoRA pass: the gradient from dh1 down to x.
at::Tensor attention_backward(const LayerRefs& r, const CosSin& cos_sin, const at::Tensor& x2, int64_t b, int64_t t,
                              const at::Tensor& dh1, AttentionHalf att, AttentionGraph graph, LoraPass o);

// ---------------------------------------------------------------- MLP half

// The MLP half up to m = glu(gu). A recompute (`forward` false) makes m only as down_proj's
// LoRA input (backward reads gu, never m).
MlpHalf mlp_half(const LayerRefs& r, const at::Tensor& h1, bool forward, bool shed_inputs = false);

// y = h1 + down_proj(m) (+ LoRA, the residual in the GEMM), or with sandwich norms
// h1 + norm(down_proj(m)), down_proj's output left in *d. `drawn`: down_proj's dropped input when
// make_m drew it; its LoRA pass goes to `passes` when not null.
at::Tensor mlp_residual(const LayerRefs& r, const at::Tensor& h1, const at::Tensor& m, Passes* passes, Dropped drawn,
                        at::Tensor* d);

// The MLP half recomputed from h1 (from the kept gate/up output when `kept_gu` is defined),
// its dropout masks drawn in the forward's order: gate, up, then down. mlp.d is the caller's to
// set (kept from forward).
// `shed_inputs`: gate and up's dropped LoRA inputs shed (Note [shed LoRA inputs]).
std::pair<MlpHalf, LoraPass> mlp_recompute(const LayerRefs& r, const at::Tensor& h1, at::Tensor kept_gu,
                                           bool shed_inputs = false);

// The MLP half's backward from its forward pieces (recomputed, rebuilt from the kept gate/up
// output, or kept whole; with sandwich norms mlp.d set) and down_proj's LoRA pass: the gradient
// from dy down to h1.
at::Tensor mlp_backward(const LayerRefs& r, const at::Tensor& h1, const at::Tensor& dy, MlpHalf mlp, LoraPass down);

// The one LoRA pass of projection `index` in `passes` (an empty one when it has no LoRA).
LoraPass take_pass(Passes& passes, size_t index);

}  // namespace qlora::layer
