#include "qlora/layer/fused_layer.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <array>
#include <memory>
#include <optional>
#include <tuple>
#include <stdexcept>
#include <utility>
#include <vector>

#include "layer/fused_layer_parts.h"
#include "layer/fused_projections.h"
#include "qlora/layer/rng_state.h"
#include "qlora/lora/lora.h"
#include "qlora/model/decoder.h"
#include "qlora/model/fused_ops.h"
#include "qlora/plan/plan.h"

namespace qlora::layer {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Note [fused decoder layer]
// Forward (grad off): n1 = norm(x); qkv = n1·[Wq;Wk;Wv]ᵀ (+ biases, + each LoRA in its columns:
// Note [LoRA before the base GEMM] in layer/fused_projections.cpp); q and k (each head normed
// first where the family has q/k norms) rotated out of their columns into packed tensors, v
// copied; a = attention(q, k, v) (within the layer's window, if any);
// h1 = x + a·Woᵀ (+ bias, + LoRA); n2 = norm(h1); gu = n2·[Wg;Wu]ᵀ (+ biases, + LoRA);
// m = swiglu(gu); y = h1 + m·Wdᵀ (+ bias, + LoRA). The family's pieces: Note [the family's
// pieces].
// Kept for backward: x, h1, and the generator states before each half (Note [selective
// recompute] and Note [fused layer without checkpointing] keep more).
// Backward, one half at a time: the MLP half is recomputed from h1 up to m (no
// down_proj: y is not needed) and differentiated (W_d, SwiGLU, [Wg;Wu], norm 2);
// then the attention half from x up to a (no o_proj: h1 is kept) and differentiated
// (W_o, attention, RoPE, [Wq;Wk;Wv], norm 1). Each half's generators are set to
// where its forward drew, so every dropout mask is the forward's.
// The merged weights of the recomputation are reused by the backward, so each
// projection is dequantized once forward and once backward. Attention's own
// backward is ATen's (a small autograd graph around SDPA alone).

// Note [the family's pieces]
// A family's layer is Llama's plus the pieces its description names (model/decoder_config.h:
// LayerPieces, DecoderConfig::layer_window); each has its counterpart here beside the
// reference's in model::DecoderModel::layer_forward, and model::fused_layer_gap names any the
// fused layer lacks (a model with one takes train's generic checkpoint).
//  - Projection biases (Qwen2's q, k, v; Llama's attention_bias and mlp_bias): frozen, added
//    where the GEMMs already add (Note [biases in the GEMM] in layer/fused_projections.cpp).
//    Backward: nothing of their own (no gradient); a recompute adds them again to q|k|v and
//    gate|up, and o_proj and down_proj, whose outputs are not recomputed, need them once.
//  - Per-head q / k RMSNorm (Qwen3, weights q_norm / k_norm [head_dim], frozen): after the
//    q|k|v GEMM and before RoPE, the q (and k) columns are copied out packed, viewed as
//    [N·heads, d] and normed by norm_forward (ATen's fused kernel on GPUs in 16 bits, the
//    reference's ops elsewhere: bit for bit the generic layer's there). rope_into takes the
//    normed heads as its source directly (it wants only a contiguous last dim), so RoPE still
//    writes the packed q and k attention reads, and the normed copy goes. Kept for backward:
//    the packed heads and their 1/rms (q + k values a token, with the attention half: recomputed
//    with it, or kept by a layer that is not recomputed). Backward: RoPE's backward into a
//    packed [B, T, heads, d] buffer, norm_backward over [N·heads, d], copied into the q (k)
//    columns of the q|k|v gradient.
//  - Sliding windows (Mistral; Qwen2 / Qwen3 with use_sliding_window): the layer's window goes
//    to model::attention, which hides the keys window or more tokens back through a band mask
//    once T exceeds the window, and attention's backward is autograd's through the same graph.
//    Correct, but that is the masked path: a [T, T] mask, the kv heads repeated, no flash kernel
//    (as for packed rows), slower and larger than the causal path rows up to the window take.
//    Flash attention's own window (its window_size_left) needs no mask: a later change.

// Note [selective recompute]
// With train.recompute: selective, forward also keeps gu = n2·[Wg;Wu]ᵀ (+ LoRA), the
// MLP's largest GEMM output ([N, 2I]), and the MLP half's backward starts from it:
// norm 2 is recomputed (element-wise), the gate/up LoRA inputs and A outputs are
// drawn again in the forward's order (so the dropout masks are the forward's), and
// silu(g)·u only where down_proj has LoRA, but the [N, h]·[h, 2I] GEMM is not run
// again: 2I·h of the (q+k+v)·h + 2I·h weights a token the recompute multiplies by (84%
// of it for Llama-3.2-1B, a sixth of the whole step's FLOPs). The cost is 2I values a
// token a layer kept through the step (the plan counts them); the kept gu is
// overwritten by [dg | du] in backward, so it is used once. train.selective_layers keeps it in
// the last N layers only (the others recompute in full), and train.recompute: auto picks the
// N the plan fits on the GPU: the top layers' kept outputs are freed first in backward, and
// the peak (all kept outputs alive, the top layer's MLP half without a gate|up of its own) is
// what the plan counts.

// Note [layers not recomputed]
// Under checkpointing, train.no_recompute_layers = M makes the last M layers keep
// everything their backward reads, as without checkpointing (Note [fused layer without
// checkpointing]), beside the others' full or selective recompute: the last ones, because
// backward reaches them first, so theirs is the memory freed first, and the peak (every
// layer's kept state alive as backward starts, plus the top layer's backward temporaries) is
// what the plan counts (src/plan/budget.cpp). A layer kept whole saves its whole recompute:
// the norms, the q|k|v and gate|up GEMMs with their LoRAs, RoPE and attention's forward;
// its LoRA inputs are kept shed (Note [shed LoRA inputs] in layer/fused_layer_parts.h).
// train.recompute: auto turns to it once every layer keeps its gate/up output and memory is
// left, so under a memory limit that gate/up does not fill, auto's choice is what it was
// before. Gate/up first: on an H200 (bench/results/2026-12-02-h200-recompute-auto) the 8B at
// 2 × 2048's gate/up outputs saved 46 ms a step for 7.14 GB (6.4 ms a GB), the rest of its 32
// layers 18 ms for 4.06 GB (4.4 ms a GB); Llama-3.2-1B at 8 × 2048 had them about even, 26.7 ms
// for 8.08 GB (3.3 ms a GB) and 15.6 ms for 4.10 GB (3.8; 2.2 before the LoRA inputs were shed).

// ---------------------------------------------------------------- the layer

// Note [the family's pieces]: a q or k head norm's input and 1/rms, what its backward reads.
struct HeadNorm {
  at::Tensor x;  // [N·heads, d] packed, the heads before the norm
  Normed n;      // n.y, the normed heads, only until RoPE has read them; n.rstd [N·heads, 1]
};

// The heads in `cols` ([N, heads·d], any row stride) normed over d with weight w.
HeadNorm head_norm(const at::Tensor& cols, const at::Tensor& w, int64_t d, double eps) {
  HeadNorm s;
  s.x = cols.contiguous().view({-1, d});
  s.n = norm_forward(s.x, w, eps);
  return s;
}

// dst <- src's heads rotated (or, `backward`, RoPE's backward of them). Partial rotary (Phi-4-mini:
// cos and sin narrower than the head): the first cos.size(-1) dims of each head turn, the rest
// are copied, as model::apply_rope does.
void rope_heads_into(at::Tensor dst, const at::Tensor& src, const std::pair<at::Tensor, at::Tensor>& cos_sin,
                     bool backward) {
  const int64_t d = dst.size(3), rot = cos_sin.first.size(-1);
  at::Tensor turned = rot == d ? dst : dst.narrow(3, 0, rot);
  const at::Tensor from = rot == d ? src : src.narrow(3, 0, rot);
  if (backward)
    model::rope_backward_into(turned, from, cos_sin.first, cos_sin.second);
  else
    model::rope_into(turned, from, cos_sin.first, cos_sin.second);
  if (rot == d) return;
  dst.narrow(3, rot, d - rot).copy_(src.narrow(3, rot, d - rot));
}

// dst [B, T, heads, d] (columns of the q|k|v gradient) <- the gradient at the q|k|v GEMM's
// output of those heads, from g, the gradient at their rotated copy: RoPE's backward, then the
// head norm's when there is one (`norm.x` defined; w its weight).
void head_backward_into(at::Tensor dst, const at::Tensor& g, const HeadNorm& norm, const at::Tensor& w,
                        const std::pair<at::Tensor, at::Tensor>& cos_sin) {
  if (!norm.x.defined()) {
    rope_heads_into(dst, g, cos_sin, /*backward=*/true);
    return;
  }
  at::Tensor normed = at::empty(dst.sizes(), dst.options());  // [B, T, heads, d] packed
  rope_heads_into(normed, g, cos_sin, /*backward=*/true);
  dst.copy_(norm_backward(normed.view({-1, dst.size(3)}), norm.x, w, norm.n).view(dst.sizes()));
}

struct AttentionHalf {
  Normed n1;
  at::Tensor w_qkv;  // [q + k + v, h]
  at::Tensor a;      // [N, H·d] attention output
  std::vector<std::pair<size_t, LoraPass>> lora;
  HeadNorm q_norm, k_norm;  // Qwen3's (Note [the family's pieces]); empty without pieces.qk_norm
};

// The attention half up to a. With `grad_leaves`, q, k, v enter attention as
// autograd leaves (filled in) and `attn_out` holds attention's differentiable output.
// What backward does not read goes before attention runs: the q|k|v GEMM output (q, k, v
// live on in their packed copies, and the q / k heads before their norms in theirs) and n1
// (the norm's backward reads x and rstd; a LoRA input without dropout is n1 itself and holds
// it).
AttentionHalf attention_half(const LayerRefs& r, const at::Tensor& x2, int64_t b, int64_t t,
                             const std::pair<at::Tensor, at::Tensor>& cos_sin, const model::AttentionInputs& attention,
                             std::array<at::Tensor, 3>* grad_leaves, at::Tensor* attn_out, bool shed_inputs = false) {
  const DecoderConfig& c = r.model->config();
  const int64_t d = c.head_dim, heads = c.num_attention_heads, kv = c.num_key_value_heads;
  AttentionHalf s;
  s.n1 = norm_forward(x2, r.norm1, c.rms_norm_eps);
  s.w_qkv = merged_weight(pick(r, {kQ, kK, kV}), x2.options());
  at::Tensor qkv = project(r, {kQ, kK, kV}, s.n1.y, s.w_qkv, at::Tensor(), &s.lora);  // [N, q + k + v]
  if (shed_inputs) shed_passes(s.lora, s.n1.y);
  s.n1.y = at::Tensor();
  // Dense [B, T, H, d] tensors: SDPA's fast kernels want each of q, k, v packed (the column
  // slices of qkv have a row stride of q + k + v). RoPE writes q and k there as it rotates them.
  // With q/k norms (Note [the family's pieces]) RoPE reads the normed heads instead.
  at::Tensor q = at::empty({b, t, heads, d}, qkv.options());
  at::Tensor k = at::empty({b, t, kv, d}, qkv.options());
  at::Tensor v = at::empty({b, t, kv, d}, qkv.options());
  at::Tensor q_in = qkv.narrow(1, 0, heads * d), k_in = qkv.narrow(1, heads * d, kv * d);
  if (r.q_norm.defined()) {
    s.q_norm = head_norm(q_in, r.q_norm, d, c.rms_norm_eps);
    s.k_norm = head_norm(k_in, r.k_norm, d, c.rms_norm_eps);
    q_in = std::move(s.q_norm.n.y);
    k_in = std::move(s.k_norm.n.y);
  }
  rope_heads_into(q, q_in.view({b, t, heads, d}), cos_sin, /*backward=*/false);
  rope_heads_into(k, k_in.view({b, t, kv, d}), cos_sin, /*backward=*/false);
  model::copy_heads(v, qkv.narrow(1, (heads + kv) * d, kv * d).view({b, t, kv, d}));
  q_in = at::Tensor();
  k_in = at::Tensor();
  qkv = at::Tensor();
  at::Tensor out;
  if (grad_leaves != nullptr) {
    const WithAutograd autograd;
    *grad_leaves = {q.detach().requires_grad_(true), k.detach().requires_grad_(true),
                    v.detach().requires_grad_(true)};
    at::AutoGradMode on(true);
    out = model::attention((*grad_leaves)[0].transpose(1, 2), (*grad_leaves)[1].transpose(1, 2),
                           (*grad_leaves)[2].transpose(1, 2), attention, r.window);  // [B, H, T, d]
    *attn_out = out;
    out = out.detach();
  } else {
    out = model::attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention, r.window);
  }
  s.a = out.transpose(1, 2).reshape({b * t, heads * d});
  return s;
}

struct MlpHalf {
  Normed n2;
  at::Tensor w_gu;  // [2I, h]
  at::Tensor gu;    // [N, 2I]
  at::Tensor m;     // [N, I]
  Dropped down_in;  // down_proj's dropped input, drawn with m (make_m); x undefined otherwise
  std::vector<std::pair<size_t, LoraPass>> lora;
};

// m = swiglu(gu) where keep_m or down_proj's LoRA needs it as its input. Where that LoRA draws
// dropout on the GPU, its dropped input comes from the same pass over gu (Note [SwiGLU with
// dropout], kernels/dropout.cu) and m is made only when keep_m (the forward's down_proj GEMM);
// the draw is down_proj's, after gate's and up's, as project would have made it.
void make_m(const LayerRefs& r, MlpHalf& s, bool keep_m) {
  const Proj& down = r.proj[kDown];
  if (down.lora && down.lora->training() && down.lora->dropout() > 0 && s.gu.is_cuda()) {
    const double p = down.lora->dropout();
    model::SwigluDropped sd = model::swiglu_lora_dropout(s.gu, p, keep_m);
    s.m = std::move(sd.m);
    s.down_in = {std::move(sd.dropped.x), std::move(sd.dropped.bits), p, {}};
  } else if (keep_m || down.lora) {
    s.m = model::swiglu(s.gu);
  }
}

// The MLP half up to m = swiglu(gu). A recompute (`forward` false) makes m only as down_proj's
// LoRA input (backward reads gu, never m), and with that LoRA's dropout on the GPU only its
// dropped copy (make_m). n2 goes once the gate/up LoRAs have their inputs (a LoRA without
// dropout holds it; the norm's backward reads h1 and rstd).
MlpHalf mlp_half(const LayerRefs& r, const at::Tensor& h1, bool forward, bool shed_inputs = false) {
  MlpHalf s;
  s.n2 = norm_forward(h1, r.norm2, r.model->config().rms_norm_eps);
  s.w_gu = merged_weight(pick(r, {kGate, kUp}), h1.options());
  s.gu = project(r, {kGate, kUp}, s.n2.y, s.w_gu, at::Tensor(), &s.lora);
  if (shed_inputs) shed_passes(s.lora, s.n2.y);
  s.n2.y = at::Tensor();
  if (forward || r.proj[kDown].lora) make_m(r, s, /*keep_m=*/forward);
  return s;
}

// Note [selective recompute]: the MLP half again from the kept gu, without its GEMM. [Wg;Wu]
// is left for mlp_backward to dequantize once down_proj's weight and gradient are gone.
MlpHalf mlp_half_from_kept(const LayerRefs& r, const at::Tensor& h1, at::Tensor gu) {
  MlpHalf s;
  s.n2 = norm_forward(h1, r.norm2, r.model->config().rms_norm_eps);
  for (auto& [i, dropped] : shared_dropout(r, {kGate, kUp}, s.n2.y))
    s.lora.emplace_back(i, lora_pass(r.proj[i], std::move(dropped)));
  s.n2.y = at::Tensor();
  s.gu = std::move(gu);
  if (r.proj[kDown].lora) make_m(r, s, /*keep_m=*/false);  // down_proj's LoRA input
  return s;
}

// y = base + x·Wᵀ (+ LoRA): o_proj and down_proj with the residual in the GEMM.
// `drawn`: the projection's dropped input when already drawn (make_m).
at::Tensor residual_projection(const LayerRefs& r, size_t index, const at::Tensor& residual, const at::Tensor& x,
                               std::vector<std::pair<size_t, LoraPass>>* passes, Dropped drawn = {}) {
  std::vector<std::pair<size_t, Dropped>> given;
  if (drawn.x.defined()) given.emplace_back(index, std::move(drawn));
  return project(r, {index}, x, merged_weight(pick(r, {index}), x.options()), residual, passes, std::move(given));
}

struct KeptLayer;

struct LayerHolder : torch::CustomClassHolder {
  // What forward keeps for backward: the input and h1 (full recompute), also each
  // layer's gate/up output (Note [selective recompute]), or everything (no checkpointing,
  // Note [fused layer without checkpointing]).
  enum class Keep { kInputs, kGateUp, kAll };
  LayerRefs refs;
  Keep keep = Keep::kInputs;
  std::unique_ptr<KeptLayer> kept;  // Keep::kAll, from forward until backward takes it
  ~LayerHolder() override;
  std::pair<at::Tensor, at::Tensor> cos_sin;
  model::AttentionInputs attention;
};

// Generator states in ctx->saved_data under `key`.
void save_rng(AutogradContext* ctx, const std::string& key, const c10::Device& device) {
  const RngState rng = capture_rng(device);
  ctx->saved_data[key + "_cpu"] = rng.cpu;
  if (rng.cuda.defined()) ctx->saved_data[key + "_cuda"] = rng.cuda;
}

void load_rng(AutogradContext* ctx, const std::string& key, const c10::Device& device) {
  RngState rng;
  rng.cpu = ctx->saved_data[key + "_cpu"].toTensor();
  if (ctx->saved_data.count(key + "_cuda")) rng.cuda = ctx->saved_data[key + "_cuda"].toTensor();
  restore_rng(rng, device);
}

// The gradient at a merged projection's input: lora_dx (its LoRAs' part; undefined
// without) + g·W, the sum made by the GEMM (one pass fewer over [N, h] than mm, then add).
at::Tensor input_grad(at::Tensor lora_dx, const at::Tensor& g, const at::Tensor& w) {
  return lora_dx.defined() ? lora_dx.addmm_(g, w) : at::mm(g, w);
}

// The MLP half's backward from its forward pieces `mlp` (recomputed, rebuilt from the
// kept gate/up output, or kept whole) and down_proj's LoRA pass: the gradient from dy
// down to h1. mlp.w_gu holds [Wg;Wu] dequantized when a recompute made it; undefined, it is
// dequantized here after W_d and the MLP product's gradient are freed, so the two weights are
// never alive together (the MLP half's peak with a kept gate/up output, Note [plan: fused
// layer halves]).
at::Tensor mlp_backward(const LayerRefs& r, const at::Tensor& h1, const at::Tensor& dy, MlpHalf mlp, LoraPass down) {
  mlp.m = at::Tensor();
  at::Tensor dm = at::mm(dy, merged_weight(pick(r, {kDown}), dy.options()));  // [N, I]
  if (r.proj[kDown].lora) dm = lora_backward(r.proj[kDown], std::move(down), dy, dm);
  model::swiglu_backward_inplace(dm, mlp.gu);  // gu now holds [dg | du]
  dm = at::Tensor();
  if (!mlp.w_gu.defined()) mlp.w_gu = merged_weight(pick(r, {kGate, kUp}), dy.options());
  at::Tensor dn2 = input_grad(lora_columns_backward(r, {kGate, kUp}, mlp.gu, mlp.lora), mlp.gu, mlp.w_gu);  // [N, h]
  mlp.gu = at::Tensor();
  mlp.w_gu = at::Tensor();
  return norm_backward_add(std::move(dn2), h1, r.norm2, mlp.n2, dy);
}

// The MLP half recomputed from h1 (from the kept gate/up output when `kept_gu` is
// defined), its dropout masks drawn in the forward's order: gate, up, then down.
std::pair<MlpHalf, LoraPass> mlp_recompute(const LayerRefs& r, const at::Tensor& h1, at::Tensor kept_gu) {
  MlpHalf mlp = kept_gu.defined() ? mlp_half_from_kept(r, h1, std::move(kept_gu)) : mlp_half(r, h1, /*forward=*/false);
  LoraPass down;  // m is down_proj's LoRA input, nothing else's
  if (r.proj[kDown].lora)
    down = mlp.down_in.x.defined() ? lora_pass(r.proj[kDown], std::move(mlp.down_in)) : lora_pass(r.proj[kDown], mlp.m);
  return {std::move(mlp), std::move(down)};
}

// What attention's backward needs of its forward: SDPA's graph from the q, k, v leaves
// to its output.
struct AttentionGraph {
  std::array<at::Tensor, 3> leaves;
  at::Tensor out;  // [B, H, T, d]
};

// The attention half's backward from its forward pieces (recomputed or kept; att.w_qkv
// must hold [Wq;Wk;Wv] dequantized) and o_proj's LoRA pass: the gradient from dh1 down to x.
at::Tensor attention_backward(const LayerHolder& holder, const at::Tensor& x2, int64_t b, int64_t t,
                              const at::Tensor& dh1, AttentionHalf att, AttentionGraph graph, LoraPass o) {
  const LayerRefs& r = holder.refs;
  att.a = at::Tensor();
  at::Tensor da = at::mm(dh1, merged_weight(pick(r, {kO}), dh1.options()));  // [N, H·d]
  if (r.proj[kO].lora) da = lora_backward(r.proj[kO], std::move(o), dh1, da);
  const DecoderConfig& c = r.model->config();
  const int64_t d = c.head_dim, heads = c.num_attention_heads, kv = c.num_key_value_heads;
  variable_list dqkv;
  {
    const WithAutograd autograd;
    at::AutoGradMode on(true);
    dqkv = torch::autograd::grad({graph.out}, {graph.leaves[0], graph.leaves[1], graph.leaves[2]},
                                 {da.view({b, t, heads, d}).transpose(1, 2)});
  }
  da = at::Tensor();
  graph = AttentionGraph();
  at::Tensor g_qkv = at::empty({b * t, (heads + 2 * kv) * d}, dh1.options());  // [N, q + k + v]
  at::Tensor gq = g_qkv.narrow(1, 0, heads * d).view({b, t, heads, d});
  at::Tensor gk = g_qkv.narrow(1, heads * d, kv * d).view({b, t, kv, d});
  at::Tensor gv = g_qkv.narrow(1, (heads + kv) * d, kv * d).view({b, t, kv, d});
  head_backward_into(gq, dqkv[0], att.q_norm, r.q_norm, holder.cos_sin);
  head_backward_into(gk, dqkv[1], att.k_norm, r.k_norm, holder.cos_sin);
  model::copy_heads(gv, dqkv[2]);
  dqkv.clear();
  att.q_norm = HeadNorm();
  att.k_norm = HeadNorm();
  at::Tensor dn1 = input_grad(lora_columns_backward(r, {kQ, kK, kV}, g_qkv, att.lora), g_qkv, att.w_qkv);  // [N, h]
  return norm_backward_add(std::move(dn1), x2, r.norm1, att.n1, dh1);
}

// The attention half recomputed from x (q, k, v and then o's dropout masks drawn in the
// forward's order).
std::tuple<AttentionHalf, AttentionGraph, LoraPass> attention_recompute(const LayerHolder& holder,
                                                                        const at::Tensor& x2, int64_t b, int64_t t) {
  const LayerRefs& r = holder.refs;
  AttentionGraph graph;
  AttentionHalf att = attention_half(r, x2, b, t, holder.cos_sin, holder.attention, &graph.leaves, &graph.out);
  LoraPass o;
  if (r.proj[kO].lora) o = lora_pass(r.proj[kO], att.a);
  return {std::move(att), std::move(graph), std::move(o)};
}

// Note [fused layer without checkpointing]: what the forward keeps when nothing is
// recomputed: each half's pieces as backward wants them, without the dequantized
// weights (dequantized again in backward) and without what no gradient reads (the q|k|v
// GEMM output once its packed copies exist, the attention output and silu(g)·u unless a
// LoRA pass holds them as its input).
struct KeptLayer {
  AttentionHalf att;
  AttentionGraph graph;
  LoraPass o;
  MlpHalf mlp;
  LoraPass down;
};

LayerHolder::~LayerHolder() = default;

// The one LoRA pass of projection `index` in `passes` (an empty one when it has no LoRA).
LoraPass take_pass(std::vector<std::pair<size_t, LoraPass>>& passes, size_t index) {
  for (auto& [which, pass] : passes)
    if (which == index) return std::move(pass);
  return {};
}

// Puts the generators back to the state backward found them in, also on a throw.
class RngGuard {
 public:
  RngGuard(bool active, const c10::Device& device) : device_(device) {
    if (active) found_ = capture_rng(device);
  }
  ~RngGuard() {
    if (found_.cpu.defined()) restore_rng(found_, device_);
  }
  RngGuard(const RngGuard&) = delete;
  RngGuard& operator=(const RngGuard&) = delete;

 private:
  RngState found_;
  c10::Device device_;
};

struct FusedLayerFunction : public torch::autograd::Function<FusedLayerFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& anchor,
                            const c10::intrusive_ptr<LayerHolder>& holder) {
    (void)anchor;
    const BelowAutograd below;  // Note [fused layer below autograd]
    const LayerRefs& r = holder->refs;
    const int64_t b = input.size(0), t = input.size(1), h = input.size(2);
    const bool keep_all = holder->keep == LayerHolder::Keep::kAll;
    const bool replay = r.any_dropout && !keep_all;  // recomputing halves replay the generators
    const at::Tensor x2 = input.reshape({b * t, h});
    std::unique_ptr<KeptLayer> kept = keep_all ? std::make_unique<KeptLayer>() : nullptr;

    if (replay) save_rng(ctx, "rng_attention", input.device());
    at::Tensor h1;
    if (kept) {
      kept->att = attention_half(r, x2, b, t, holder->cos_sin, holder->attention, &kept->graph.leaves,
                                 &kept->graph.out, /*shed_inputs=*/true);
      std::vector<std::pair<size_t, LoraPass>> o;
      h1 = residual_projection(r, kO, x2, kept->att.a, &o);
      kept->o = take_pass(o, kO);
      kept->o.in = shed(std::move(kept->o.in), kept->att.a);  // SDPA's output: kept by its graph
      kept->att.w_qkv = at::Tensor();
      kept->att.a = at::Tensor();
    } else {
      at::Tensor a = attention_half(r, x2, b, t, holder->cos_sin, holder->attention, nullptr, nullptr).a;
      h1 = residual_projection(r, kO, x2, a, nullptr);
    }

    if (replay) save_rng(ctx, "rng_mlp", input.device());
    MlpHalf mlp = mlp_half(r, h1, /*forward=*/true, /*shed_inputs=*/keep_all);
    const at::Tensor m = std::move(mlp.m);
    Dropped down_in = std::move(mlp.down_in);
    at::Tensor y;
    if (kept) {
      std::vector<std::pair<size_t, LoraPass>> down;
      mlp.w_gu = at::Tensor();
      kept->mlp = std::move(mlp);
      y = residual_projection(r, kDown, h1, m, &down, std::move(down_in));
      kept->down = take_pass(down, kDown);
      holder->kept = std::move(kept);
    } else {
      if (holder->keep == LayerHolder::Keep::kGateUp) ctx->saved_data["gu"] = mlp.gu;
      mlp = MlpHalf();  // [Wg;Wu] dequantized, n2, the LoRA passes (and gu unless kept) go before down_proj's
      y = residual_projection(r, kDown, h1, m, nullptr, std::move(down_in));
    }
    ctx->save_for_backward({input});
    ctx->saved_data["h1"] = h1;
    ctx->saved_data["layer"] = at::IValue::make_capsule(holder);
    return y.view({b, t, h});
  }

  // Note [fused decoder layer]: the MLP half first (recomputed from h1), then the
  // attention half (recomputed from x); each half's generators are put back to
  // where its forward drew, so only one half's activations are alive at a time.
  // Without checkpointing both halves come from the forward (KeptLayer).
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(3);
    if (!grad_outputs[0].defined()) return grads;
    const BelowAutograd below;  // Note [fused layer below autograd]
    const at::Tensor input = ctx->get_saved_variables()[0];
    const at::Tensor h1 = ctx->saved_data["h1"].toTensor();
    const auto holder = c10::static_intrusive_pointer_cast<LayerHolder>(ctx->saved_data["layer"].toCapsule());
    const LayerRefs& r = holder->refs;
    const c10::Device device = input.device();
    const int64_t b = input.size(0), t = input.size(1), h = input.size(2);
    const at::Tensor x2 = input.reshape({b * t, h});
    const at::Tensor dy = grad_outputs[0].reshape({b * t, h});
    if (std::unique_ptr<KeptLayer> kept = std::move(holder->kept)) {
      const at::Tensor dh1 = mlp_backward(r, h1, dy, std::move(kept->mlp), std::move(kept->down));
      kept->att.w_qkv = merged_weight(pick(r, {kQ, kK, kV}), x2.options());
      grads[0] = attention_backward(*holder, x2, b, t, dh1, std::move(kept->att), std::move(kept->graph),
                                    std::move(kept->o))
                     .view({b, t, h});
      return grads;
    }
    const RngGuard guard(r.any_dropout, device);
    if (r.any_dropout) load_rng(ctx, "rng_mlp", device);
    at::Tensor kept_gu;
    if (auto it = ctx->saved_data.find("gu"); it != ctx->saved_data.end()) {
      kept_gu = it->second.toTensor();
      ctx->saved_data.erase(it);  // used once: backward overwrites it with [dg | du]
    }
    auto [mlp, down] = mlp_recompute(r, h1, std::move(kept_gu));
    const at::Tensor dh1 = mlp_backward(r, h1, dy, std::move(mlp), std::move(down));
    if (r.any_dropout) load_rng(ctx, "rng_attention", device);
    auto [att, graph, o] = attention_recompute(*holder, x2, b, t);
    grads[0] = attention_backward(*holder, x2, b, t, dh1, std::move(att), std::move(graph), std::move(o))
                   .view({b, t, h});
    return grads;
  }
};

}  // namespace

std::string fused_layer_unsupported(const model::DecoderModel& model) {
  if (std::string gap = fused_layer_gap(model.config()); !gap.empty()) return gap;
  for (int64_t l = 0; l < model.num_layers(); ++l) {
    const std::vector<std::string>& names = projection_names(model.config());
    for (size_t i = 0; i < names.size(); ++i) {
      if (proj_of(model, l, i).base == nullptr)
        return "layer " + std::to_string(l) + " " + names[i] + " is neither a frozen base projection nor LoRA over one";
    }
  }
  return {};
}

model::LayerForwardFn fused_layer_forward(const model::DecoderModel& model, FusedRecompute what,
                                          int64_t selective_layers, int64_t no_recompute_layers) {
  const std::string why = fused_layer_unsupported(model);
  if (!why.empty()) throw std::invalid_argument("fused_layer_forward: " + why);
  const model::DecoderModel* m = &model;
  const LayerHolder::Keep keep = what == FusedRecompute::kFull        ? LayerHolder::Keep::kInputs
                                 : what == FusedRecompute::kSelective ? LayerHolder::Keep::kGateUp
                                                                      : LayerHolder::Keep::kAll;
  // Note [selective recompute]: the last selective_layers layers keep gate/up, the rest
  // recompute it (which layers does not change the peak: every kept output is alive when
  // backward starts; the last ones are freed first).
  const int64_t layers = model.num_layers();
  const int64_t first_kept =
      keep != LayerHolder::Keep::kGateUp ? 0 : layers - plan::kept_gate_up_layers(selective_layers, layers);
  // Note [layers not recomputed]: the last no_recompute_layers keep everything.
  const int64_t first_whole = layers - std::clamp<int64_t>(no_recompute_layers, 0, layers);
  return [m, keep, first_kept, first_whole](int64_t layer, const at::Tensor& hidden,
                                            const std::pair<at::Tensor, at::Tensor>& cos_sin,
                                            const model::AttentionInputs& attention) -> at::Tensor {
    if (!at::GradMode::is_enabled()) return m->layer_forward(layer, hidden, cos_sin, attention);
    auto holder = c10::make_intrusive<LayerHolder>();
    holder->refs = layer_refs(*m, layer, hidden.scalar_type());
    holder->keep = layer >= first_whole                                       ? LayerHolder::Keep::kAll
                   : keep == LayerHolder::Keep::kGateUp && layer < first_kept ? LayerHolder::Keep::kInputs
                                                                              : keep;
    holder->cos_sin = cos_sin;
    holder->attention = attention;
    // As in checkpoint(): without an input that requires grad, the output would have
    // no grad_fn and the LoRA matrices inside would never get gradients.
    // Its value is never read (empty: no fill kernel a layer).
    at::Tensor anchor = at::empty({}, hidden.options());
    if (!hidden.requires_grad()) anchor.requires_grad_(true);
    return FusedLayerFunction::apply(hidden, anchor, holder);
  };
}

}  // namespace qlora::layer
