// The fused decoder layer's two halves (src/layer/fused_layer_halves.h; Note [fused decoder
// layer] and Note [the family's pieces] in src/layer/fused_layer.cpp).
#include "layer/fused_layer_halves.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>

#include <stdexcept>

#include "qlora/lora/lora.h"
#include "qlora/model/decoder.h"
#include "qlora/model/fused_ops.h"

namespace qlora::layer {
namespace {

// ---------------------------------------------------------------- pieces

// The heads in `cols` ([N, heads·d], any row stride) normed over d with weight w.
HeadNorm head_norm(const LayerRefs& r, const at::Tensor& cols, const at::Tensor& w, int64_t d) {
  HeadNorm s;
  s.x = cols.contiguous().view({-1, d});
  s.n = norm_forward(s.x, w, r.eps, r.plus_one);
  return s;
}

// dst <- src's heads rotated (or, `backward`, RoPE's backward of them). Partial rotary (Phi-4-mini:
// cos and sin narrower than the head): the first cos.size(-1) dims of each head turn, the rest
// are copied, as model::apply_rope does.
void rope_heads_into(at::Tensor dst, const at::Tensor& src, const CosSin& cos_sin, bool backward) {
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
void head_backward_into(const LayerRefs& r, at::Tensor dst, const at::Tensor& g, const HeadNorm& norm,
                        const at::Tensor& w, const CosSin& cos_sin) {
  if (!norm.x.defined()) {
    rope_heads_into(dst, g, cos_sin, /*backward=*/true);
    return;
  }
  at::Tensor normed = at::empty(dst.sizes(), dst.options());  // [B, T, heads, d] packed
  rope_heads_into(normed, g, cos_sin, /*backward=*/true);
  dst.copy_(norm_backward(normed.view({-1, dst.size(3)}), norm.x, w, norm.n, r.plus_one).view(dst.sizes()));
}

// Note [sandwich norms]: the gradient at a sandwich norm's input x (o_proj's or down_proj's
// output) from g at its output, its 1/rms computed again from x.
at::Tensor sandwich_backward(const LayerRefs& r, const at::Tensor& g, const at::Tensor& x, const at::Tensor& w) {
  Normed n;
  if (r.plus_one || !model::fused_rms_norm_applies(x, w)) {
    n.rstd = norm_rstd(x, r.eps);  // 1/rms alone: the normed output would be thrown away
  } else {
    n = norm_forward(x, w, r.eps, r.plus_one);
    n.y = at::Tensor();
  }
  return norm_backward(g, x, w, n, r.plus_one);
}

// The gradient at a merged projection's input: lora_dx (its LoRAs' part; undefined
// without) + g·W, the sum made by the GEMM (one pass fewer over [N, h] than mm, then add).
at::Tensor input_grad(at::Tensor lora_dx, const at::Tensor& g, const at::Tensor& w) {
  return lora_dx.defined() ? lora_dx.addmm_(g, w) : at::mm(g, w);
}

// y = base + x·Wᵀ (+ LoRA): o_proj and down_proj, with the residual in the GEMM when `base` is
// defined. `drawn`: the projection's dropped input when already drawn (make_m).
at::Tensor residual_projection(const LayerRefs& r, size_t index, const at::Tensor& base, const at::Tensor& x,
                               Passes* passes, Dropped drawn = {}) {
  std::vector<std::pair<size_t, Dropped>> given;
  if (drawn.x.defined()) given.emplace_back(index, std::move(drawn));
  return project(r, {index}, x, merged_weight(pick(r, {index}), x.options()), base, passes, std::move(given));
}

// The GLU of a merged gate|up output (Note [the family's pieces]: SwiGLU or GeGLU), and its
// backward in place on gu.
at::Tensor glu(const LayerRefs& r, const at::Tensor& gu) {
  switch (r.act) {
    case Activation::kSilu:
      return model::swiglu(gu);
    case Activation::kGeluTanh:
      return model::geglu(gu);
  }
  throw std::logic_error("fused layer: an activation without a GLU op");
}

void glu_backward_inplace(const LayerRefs& r, const at::Tensor& dm, at::Tensor& gu) {
  switch (r.act) {
    case Activation::kSilu:
      model::swiglu_backward_inplace(dm, gu);
      return;
    case Activation::kGeluTanh:
      model::geglu_backward_inplace(dm, gu);
      return;
  }
  throw std::logic_error("fused layer: an activation without a GLU op");
}

// m = glu(gu) where keep_m or down_proj's LoRA needs it as its input. Where that LoRA draws
// dropout on the GPU after SwiGLU, its dropped input comes from the same pass over gu (Note
// [SwiGLU with dropout], kernels/dropout.cu) and m is made only when keep_m (the forward's
// down_proj GEMM); the draw is down_proj's, after gate's and up's, as project would have made it.
// GeGLU has no such kernel: m is made, and down_proj's LoRA draws from it as any LoRA does.
void make_m(const LayerRefs& r, MlpHalf& s, bool keep_m) {
  const Proj& down = r.proj[kDown];
  if (r.act == Activation::kSilu && down.lora && down.lora->training() && down.lora->dropout() > 0 &&
      s.gu.is_cuda()) {
    const double p = down.lora->dropout();
    model::SwigluDropped sd = model::swiglu_lora_dropout(s.gu, p, keep_m);
    s.m = std::move(sd.m);
    s.down_in = {std::move(sd.dropped.x), std::move(sd.dropped.bits), p, {}};
  } else if (keep_m || down.lora) {
    s.m = glu(r, s.gu);
  }
}

// Note [selective recompute]: the MLP half again from the kept gu, without its GEMM. [Wg;Wu]
// is left for mlp_backward to dequantize once down_proj's weight and gradient are gone.
MlpHalf mlp_half_from_kept(const LayerRefs& r, const at::Tensor& h1, at::Tensor gu, bool shed_inputs) {
  MlpHalf s;
  s.n2 = norm_forward(h1, r.norm2, r.eps, r.plus_one);
  for (auto& [i, dropped] : shared_dropout(r, {kGate, kUp}, s.n2.y))
    s.lora.emplace_back(i, lora_pass(r.proj[i], std::move(dropped)));
  if (shed_inputs) shed_passes(s.lora, s.n2.y);
  s.n2.y = at::Tensor();
  s.gu = std::move(gu);
  if (r.proj[kDown].lora) make_m(r, s, /*keep_m=*/false);  // down_proj's LoRA input
  return s;
}

}  // namespace

LoraPass take_pass(Passes& passes, size_t index) {
  for (auto& [which, pass] : passes)
    if (which == index) return std::move(pass);
  return {};
}

// ---------------------------------------------------------------- attention half

// What backward does not read goes before attention runs: the q|k|v GEMM output (q, k, v
// live on in their packed copies, and the q / k heads before their norms in theirs) and n1
// (the norm's backward reads x and rstd; a LoRA input without dropout is n1 itself and holds
// it).
AttentionHalf attention_half(const LayerRefs& r, const at::Tensor& x2, int64_t b, int64_t t, const CosSin& cos_sin,
                             const model::AttentionInputs& attention, std::array<at::Tensor, 3>* grad_leaves,
                             at::Tensor* attn_out, bool shed_inputs) {
  const DecoderConfig& c = r.model->config();
  const int64_t d = c.head_dim, heads = c.num_attention_heads, kv = c.num_key_value_heads;
  AttentionHalf s;
  s.n1 = norm_forward(x2, r.norm1, r.eps, r.plus_one);
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
    s.q_norm = head_norm(r, q_in, r.q_norm, d);
    s.k_norm = head_norm(r, k_in, r.k_norm, d);
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
                           (*grad_leaves)[2].transpose(1, 2), attention, r.window, r.scale, r.softcap);  // [B, H, T, d]
    *attn_out = out;
    out = out.detach();
  } else {
    out = model::attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention, r.window, r.scale,
                           r.softcap);
  }
  s.a = out.transpose(1, 2).reshape({b * t, heads * d});
  return s;
}

at::Tensor attention_residual(const LayerRefs& r, const at::Tensor& x2, AttentionHalf& att, Passes* passes) {
  if (!r.post_attention_norm.defined()) return residual_projection(r, kO, x2, att.a, passes);
  att.o = residual_projection(r, kO, at::Tensor(), att.a, passes);
  return x2 + norm_forward(att.o, r.post_attention_norm, r.eps, r.plus_one).y;
}

std::tuple<AttentionHalf, AttentionGraph, LoraPass> attention_recompute(const LayerRefs& r, const CosSin& cos_sin,
                                                                        const model::AttentionInputs& attention,
                                                                        const at::Tensor& x2, int64_t b, int64_t t,
                                                                        bool shed_inputs) {
  AttentionGraph graph;
  AttentionHalf att = attention_half(r, x2, b, t, cos_sin, attention, &graph.leaves, &graph.out, shed_inputs);
  LoraPass o;
  if (r.post_attention_norm.defined()) {
    // Note [sandwich norms]: o again, as attention_residual made it; W_o stays for backward.
    Passes passes;
    att.w_o = merged_weight(pick(r, {kO}), x2.options());
    att.o = project(r, {kO}, att.a, att.w_o, at::Tensor(), &passes);
    o = take_pass(passes, kO);
  } else if (r.proj[kO].lora) {
    o = lora_pass(r.proj[kO], att.a);
  }
  return {std::move(att), std::move(graph), std::move(o)};
}

at::Tensor attention_backward(const LayerRefs& r, const CosSin& cos_sin, const at::Tensor& x2, int64_t b, int64_t t,
                              const at::Tensor& dh1, AttentionHalf att, AttentionGraph graph, LoraPass o) {
  att.a = at::Tensor();
  // The gradient at o_proj's output: dh1, or through the post-attention norm.
  at::Tensor dout = dh1;
  if (att.o.defined()) {
    dout = sandwich_backward(r, dh1, att.o, r.post_attention_norm);
    att.o = at::Tensor();
  }
  at::Tensor w_o = att.w_o.defined() ? std::move(att.w_o) : merged_weight(pick(r, {kO}), dh1.options());
  at::Tensor da = at::mm(dout, w_o);  // [N, H·d]
  w_o = at::Tensor();
  if (r.proj[kO].lora) da = lora_backward(r.proj[kO], std::move(o), dout, da);
  dout = at::Tensor();
  const DecoderConfig& c = r.model->config();
  const int64_t d = c.head_dim, heads = c.num_attention_heads, kv = c.num_key_value_heads;
  torch::autograd::variable_list dqkv;
  {
    const WithAutograd autograd;
    at::AutoGradMode on(true);
    dqkv = torch::autograd::grad({graph.out}, {graph.leaves[0], graph.leaves[1], graph.leaves[2]},
                                 {da.view({b, t, heads, d}).transpose(1, 2)});
  }
  da = at::Tensor();
  graph = AttentionGraph();
  // SDPA's gradients have a contiguous last dim; the soft-capped eager attention's k gradient
  // (through q·kᵀ) need not, and RoPE's backward and copy_heads want one.
  for (at::Tensor& g : dqkv)
    if (g.size(-1) > 1 && g.stride(-1) != 1) g = g.contiguous();
  at::Tensor g_qkv = at::empty({b * t, (heads + 2 * kv) * d}, dh1.options());  // [N, q + k + v]
  at::Tensor gq = g_qkv.narrow(1, 0, heads * d).view({b, t, heads, d});
  at::Tensor gk = g_qkv.narrow(1, heads * d, kv * d).view({b, t, kv, d});
  at::Tensor gv = g_qkv.narrow(1, (heads + kv) * d, kv * d).view({b, t, kv, d});
  head_backward_into(r, gq, dqkv[0], att.q_norm, r.q_norm, cos_sin);
  head_backward_into(r, gk, dqkv[1], att.k_norm, r.k_norm, cos_sin);
  model::copy_heads(gv, dqkv[2]);
  dqkv.clear();
  att.q_norm = HeadNorm();
  att.k_norm = HeadNorm();
  at::Tensor dn1 = input_grad(lora_columns_backward(r, {kQ, kK, kV}, g_qkv, att.lora), g_qkv, att.w_qkv);  // [N, h]
  return norm_backward_add(std::move(dn1), x2, r.norm1, att.n1, dh1, r.plus_one);
}

// ---------------------------------------------------------------- MLP half

// n2 goes once the gate/up LoRAs have their inputs (a LoRA without dropout holds it; the norm's
// backward reads h1 and rstd). With down_proj's LoRA dropout on the GPU a recompute makes only
// its dropped copy of m (make_m).
MlpHalf mlp_half(const LayerRefs& r, const at::Tensor& h1, bool forward, bool shed_inputs) {
  MlpHalf s;
  s.n2 = norm_forward(h1, r.norm2, r.eps, r.plus_one);
  s.w_gu = merged_weight(pick(r, {kGate, kUp}), h1.options());
  s.gu = project(r, {kGate, kUp}, s.n2.y, s.w_gu, at::Tensor(), &s.lora);
  if (shed_inputs) shed_passes(s.lora, s.n2.y);
  s.n2.y = at::Tensor();
  if (forward || r.proj[kDown].lora) make_m(r, s, /*keep_m=*/forward);
  return s;
}

at::Tensor mlp_residual(const LayerRefs& r, const at::Tensor& h1, const at::Tensor& m, Passes* passes, Dropped drawn,
                        at::Tensor* d) {
  if (!r.post_feedforward_norm.defined()) return residual_projection(r, kDown, h1, m, passes, std::move(drawn));
  *d = residual_projection(r, kDown, at::Tensor(), m, passes, std::move(drawn));
  return h1 + norm_forward(*d, r.post_feedforward_norm, r.eps, r.plus_one).y;
}

std::pair<MlpHalf, LoraPass> mlp_recompute(const LayerRefs& r, const at::Tensor& h1, at::Tensor kept_gu,
                                           bool shed_inputs) {
  MlpHalf mlp = kept_gu.defined() ? mlp_half_from_kept(r, h1, std::move(kept_gu), shed_inputs)
                                  : mlp_half(r, h1, /*forward=*/false, shed_inputs);
  LoraPass down;  // m is down_proj's LoRA input, nothing else's
  if (r.proj[kDown].lora)
    down = mlp.down_in.x.defined() ? lora_pass(r.proj[kDown], std::move(mlp.down_in)) : lora_pass(r.proj[kDown], mlp.m);
  return {std::move(mlp), std::move(down)};
}

// mlp.w_gu holds [Wg;Wu] dequantized when a recompute made it; undefined, it is dequantized
// here after W_d and the MLP product's gradient are freed, so the two weights are never alive
// together (the MLP half's peak with a kept gate/up output, Note [plan: fused layer halves]).
at::Tensor mlp_backward(const LayerRefs& r, const at::Tensor& h1, const at::Tensor& dy, MlpHalf mlp, LoraPass down) {
  mlp.m = at::Tensor();
  // The gradient at down_proj's output: dy, or through the post-feed-forward norm.
  at::Tensor dout = dy;
  if (mlp.d.defined()) {
    dout = sandwich_backward(r, dy, mlp.d, r.post_feedforward_norm);
    mlp.d = at::Tensor();
  }
  at::Tensor dm = at::mm(dout, merged_weight(pick(r, {kDown}), dy.options()));  // [N, I]
  if (r.proj[kDown].lora) dm = lora_backward(r.proj[kDown], std::move(down), dout, dm);
  dout = at::Tensor();
  glu_backward_inplace(r, dm, mlp.gu);  // gu now holds [dg | du]
  dm = at::Tensor();
  if (!mlp.w_gu.defined()) mlp.w_gu = merged_weight(pick(r, {kGate, kUp}), dy.options());
  at::Tensor dn2 = input_grad(lora_columns_backward(r, {kGate, kUp}, mlp.gu, mlp.lora), mlp.gu, mlp.w_gu);  // [N, h]
  mlp.gu = at::Tensor();
  mlp.w_gu = at::Tensor();
  return norm_backward_add(std::move(dn2), h1, r.norm2, mlp.n2, dy, r.plus_one);
}

}  // namespace qlora::layer
