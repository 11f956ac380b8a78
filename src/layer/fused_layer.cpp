#include "qlora/layer/fused_layer.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <memory>
#include <stdexcept>
#include <utility>
#include <vector>

#include "layer/fused_layer_halves.h"
#include "layer/fused_layer_parts.h"
#include "layer/fused_projections.h"
#include "qlora/layer/offload.h"
#include "qlora/layer/rng_state.h"
#include "qlora/lora/lora.h"
#include "qlora/model/decoder.h"
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
// m = glu(gu) (SwiGLU, or GeGLU); y = h1 + m·Wdᵀ (+ bias, + LoRA). The family's pieces: Note
// [the family's pieces]. The two halves' code: layer/fused_layer_halves.{h,cpp}.
// Kept for backward: x, h1, and the generator states before each half (Note [selective
// recompute], Note [fused layer without checkpointing] and Note [sandwich norms] keep more).
// Backward, one half at a time: the MLP half is recomputed from h1 up to m (no
// down_proj: y is not needed) and differentiated (W_d, the GLU, [Wg;Wu], norm 2);
// then the attention half from x up to a (no o_proj: h1 is kept; with sandwich norms o_proj
// too, Note [sandwich norms]) and differentiated
// (W_o, attention, RoPE, [Wq;Wk;Wv], norm 1). Each half's generators are set to
// where its forward drew, so every dropout mask is the forward's.
// The merged weights of the recomputation are reused by the backward, so each
// projection is dequantized once forward and once backward. Attention's own
// backward is ATen's (a small autograd graph around SDPA, or around the soft-capped eager
// attention, alone).

// Note [the family's pieces]
// A family's layer is Llama's plus the pieces its description names (model/decoder_config.h:
// LayerPieces, DecoderConfig::layer_window and Gemma's model-level keys); each has its
// counterpart here beside the reference's in model::DecoderModel::layer_forward, and
// model::fused_layer_gap names any the fused layer lacks (a model with one takes train's
// generic checkpoint). Every piece holds in every recompute mode: what a recompute makes again
// is made by the same calls in the same order as the forward (the dropout draws included).
//  - Projection biases (Qwen2's q, k, v; Llama's attention_bias and mlp_bias): frozen, added
//    where the GEMMs already add (Note [biases in the GEMM] in layer/fused_projections.cpp).
//    Backward: nothing of their own (no gradient); a recompute adds them again to q|k|v and
//    gate|up, and o_proj and down_proj, whose outputs are not recomputed, need them once.
//  - Per-head q / k RMSNorm (Qwen3, Gemma 3; weights q_norm / k_norm [head_dim], frozen): after
//    the q|k|v GEMM and before RoPE, the q (and k) columns are copied out packed, viewed as
//    [N·heads, d] and normed by norm_forward (ATen's fused kernel on GPUs in 16 bits, the
//    reference's ops elsewhere: bit for bit the generic layer's there). rope_into takes the
//    normed heads as its source directly (it wants only a contiguous last dim), so RoPE still
//    writes the packed q and k attention reads, and the normed copy goes. Kept for backward:
//    the packed heads and their 1/rms (q + k values a token, with the attention half: recomputed
//    with it, or kept by a layer that is not recomputed). Backward: RoPE's backward into a
//    packed [B, T, heads, d] buffer, norm_backward over [N·heads, d], copied into the q (k)
//    columns of the q|k|v gradient.
//  - Sliding windows (Mistral; Qwen2 / Qwen3 with use_sliding_window; Gemma 2's every other
//    layer, Gemma 3's five of six): the layer's window goes to model::attention (Note [attention
//    paths] in src/model/attention.cpp), and attention's backward is autograd's through it. On a
//    GPU in bf16/fp16 that is flash's own window (window_size_left = window - 1), packed rows
//    included: no mask, grouped kv heads. Elsewhere (fp32, Gemma 2's soft cap, the CPU) a band
//    mask over rows longer than the window.
//  - Gemma 3's local RoPE base (rope_local_theta): a windowed layer rotates q and k with cos
//    and sin from its own unscaled base (LocalRope below), made once a batch and shared by those
//    layers; RoPE's backward in those layers takes the same tables.
//  - The attention scale and soft-capping (Gemma's query_pre_attn_scalar, Gemma 2's
//    attn_logit_softcapping): passed to model::attention as the reference passes them
//    (LayerRefs::scale, softcap). A scale alone stays on SDPA (its scale argument); a cap takes
//    the reference's eager attention (the scores' matmul, tanh, mask, fp32 softmax and the
//    product with v, repeated kv heads): [B, H, T, T] scores, autograd's graph kept for
//    backward as SDPA's is, its memory the reference's own, not SDPA's.
//  - GeGLU (Gemma's gelu_pytorch_tanh): m = gelu_tanh(g)·u by model::geglu (one kernel on GPUs,
//    at::gelu's ops elsewhere: the generic layer's bits on the CPU), its backward
//    model::geglu_backward_inplace over the gate|up output, as SwiGLU's. SwiGLU's pass that also
//    draws down_proj's dropout (Note [SwiGLU with dropout]) has no GeGLU twin: with GeGLU that
//    LoRA draws from m as any LoRA does (the same draw: one lora_dropout call on m).
//  - (1 + w) norms (Gemma): every norm of the layer, the q / k head norms too, in
//    rms_norm_plus_one's op order (Note [(1 + w) norms] in layer/fused_layer_parts.h).
//  - Sandwich norms (Gemma's post_attention_layernorm on o_proj's output and
//    post_feedforward_layernorm on down_proj's, before each residual add; norm 2 is then
//    pre_feedforward_layernorm): Note [sandwich norms].

// Note [sandwich norms]
// With sandwich norms h1 = x + norm(o) and y = h1 + norm(d), o and d the o_proj and down_proj
// outputs: the residuals leave the GEMMs (o and d are made alone, then normed and added), and
// each norm's backward needs its input (1/rms is made again from it: an element-wise pass).
// d would cost the down_proj GEMM again (I·h multiply-adds a token, a third of the MLP's), so
// forward keeps it: p·h bytes a token a layer beside x and h1 in every mode (ctx->saved_data
// "down", freed once the MLP half's backward has read it; a layer kept whole keeps it with its
// half). o costs only o_proj's GEMM (H·d·h), which the recompute runs again from a with the
// forward's LoRA pass (drawn there anyway) and whose dequantized W_o its backward then uses
// (dequantized once, as before); a layer kept whole keeps o instead. Backward: the gradient at
// y (h1) goes through the norm's backward to d (o), then on as without the norms; the residual's
// gradient is still the norm 2 (norm 1) backward's addend. The plan counts the kept d with the
// layer inputs and attention residuals (src/plan/budget.cpp).

// Note [selective recompute]
// With train.recompute: selective, forward also keeps gu = n2·[Wg;Wu]ᵀ (+ LoRA), the
// MLP's largest GEMM output ([N, 2I]), and the MLP half's backward starts from it:
// norm 2 is recomputed (element-wise), the gate/up LoRA inputs and A outputs are
// drawn again in the forward's order (so the dropout masks are the forward's), and
// glu(gu) only where down_proj has LoRA, but the [N, h]·[h, 2I] GEMM is not run
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
  std::shared_ptr<CheckpointOffload> offload;  // null: what forward keeps stays on the device
  int64_t layer = 0;
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

// Note [fused layer without checkpointing]: what the forward keeps when nothing is
// recomputed: each half's pieces as backward wants them, without the dequantized
// weights (dequantized again in backward) and without what no gradient reads (the q|k|v
// GEMM output once its packed copies exist, the attention output and glu(gu) unless a
// LoRA pass holds them as its input).
struct KeptLayer {
  AttentionHalf att;
  AttentionGraph graph;
  LoraPass o;
  MlpHalf mlp;
  LoraPass down;
};

LayerHolder::~LayerHolder() = default;

// Note [the family's pieces]: the cos and sin of Gemma 3's windowed layers, from their own
// base (rope_local_theta, unscaled) as model::DecoderModel::load makes the reference's
// local_inv_freq_, and as its layer_forward turns them into cos and sin (the model's dtype, no
// attention factor). Made once for a batch's positions, not once a layer, and shared by every
// windowed layer's holder (a copy a layer would be kept to its backward).
class LocalRope {
 public:
  explicit LocalRope(const model::DecoderModel& m) : dtype_(m.dtype()) {
    if (m.config().rope_local_theta <= 0) return;
    DecoderConfig local = m.config();
    local.rope_theta = local.rope_local_theta;
    local.rope = RopeScaling{};
    inv_freq_ = model::rope_inv_freq(local).to(m.device());
  }
  bool applies() const { return inv_freq_.defined(); }
  // cos, sin [B, T, rotary dim] for position_ids; the last ones again for the same tensor unchanged.
  const std::pair<at::Tensor, at::Tensor>& of(const at::Tensor& position_ids) {
    const int64_t version = position_ids.is_inference() ? 0 : position_ids._version();
    if (!positions_.defined() || !positions_.is_same(position_ids) || version_ != version) {
      cos_sin_ = model::rope_cos_sin(inv_freq_, position_ids, dtype_);
      positions_ = position_ids;
      version_ = version;
    }
    return cos_sin_;
  }

 private:
  at::ScalarType dtype_;
  at::Tensor inv_freq_;  // [rotary dim / 2] fp32 on the model's device; undefined: no local base
  at::Tensor positions_;
  int64_t version_ = 0;
  std::pair<at::Tensor, at::Tensor> cos_sin_;
};

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
    ctx->saved_data["layer"] = at::IValue::make_capsule(holder);

    if (replay) save_rng(ctx, "rng_attention", input.device());
    at::Tensor h1;
    if (kept) {
      kept->att = attention_half(r, x2, b, t, holder->cos_sin, holder->attention, &kept->graph.leaves,
                                 &kept->graph.out, /*shed_inputs=*/true);
      Passes o;
      h1 = attention_residual(r, x2, kept->att, &o);  // kept->att.o: the post-attention norm's input
      kept->o = take_pass(o, kO);
      kept->o.in = shed(std::move(kept->o.in), kept->att.a);  // attention's output: kept by its graph
      kept->att.w_qkv = at::Tensor();
      kept->att.a = at::Tensor();
    } else {
      AttentionHalf att = attention_half(r, x2, b, t, holder->cos_sin, holder->attention, nullptr, nullptr);
      h1 = attention_residual(r, x2, att, nullptr);  // att.o goes: a recompute makes it again
    }

    if (replay) save_rng(ctx, "rng_mlp", input.device());
    MlpHalf mlp = mlp_half(r, h1, /*forward=*/true, /*shed_inputs=*/keep_all);
    const at::Tensor m = std::move(mlp.m);
    Dropped down_in = std::move(mlp.down_in);
    at::Tensor y, d;  // d: down_proj's output with sandwich norms (Note [sandwich norms]), kept
    if (kept) {
      Passes down;
      mlp.w_gu = at::Tensor();
      kept->mlp = std::move(mlp);
      y = mlp_residual(r, h1, m, &down, std::move(down_in), &kept->mlp.d);
      kept->down = take_pass(down, kDown);
      holder->kept = std::move(kept);
    } else {
      at::Tensor gu = holder->keep == LayerHolder::Keep::kGateUp ? mlp.gu : at::Tensor();
      mlp = MlpHalf();  // [Wg;Wu] dequantized, n2, the LoRA passes (and gu unless kept) go before down_proj's
      y = mlp_residual(r, h1, m, nullptr, std::move(down_in), &d);
      if (holder->offload) {
        // Note [offloaded checkpoints]: x, h1 (, gu) (, d) to host memory once y is queued.
        std::vector<at::Tensor> keep = {input, h1};
        if (gu.defined()) keep.push_back(gu);
        if (d.defined()) keep.push_back(d);
        ctx->saved_data["offloaded"] = at::IValue::make_capsule(
            c10::make_intrusive<OffloadHandle>(holder->offload, holder->offload->stash(holder->layer, keep)));
        ctx->saved_data["offloaded_gu"] = gu.defined();
        ctx->saved_data["offloaded_down"] = d.defined();
        return y.view({b, t, h});
      }
      if (gu.defined()) ctx->saved_data["gu"] = gu;
      if (d.defined()) ctx->saved_data["down"] = d;
    }
    ctx->save_for_backward({input});
    ctx->saved_data["h1"] = h1;
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
    // x and h1: locals, freed as this backward returns (saved_data lives as long as the node,
    // to the end of the whole backward). Offloaded: back from host memory (gu and d into the
    // slots the recompute takes them from, erased there).
    at::Tensor input, h1;
    if (auto it = ctx->saved_data.find("offloaded"); it != ctx->saved_data.end()) {
      const auto handle = c10::static_intrusive_pointer_cast<OffloadHandle>(it->second.toCapsule());
      std::vector<at::Tensor> back = handle->offload->fetch(handle->entry);
      ctx->saved_data.erase(it);
      size_t next = 2;
      if (ctx->saved_data["offloaded_gu"].toBool()) ctx->saved_data["gu"] = back.at(next++);
      if (ctx->saved_data["offloaded_down"].toBool()) ctx->saved_data["down"] = back.at(next++);
      input = std::move(back[0]);
      h1 = std::move(back[1]);
    } else {
      input = ctx->get_saved_variables()[0];
      h1 = ctx->saved_data["h1"].toTensor();
      ctx->saved_data.erase("h1");
    }
    const auto holder = c10::static_intrusive_pointer_cast<LayerHolder>(ctx->saved_data["layer"].toCapsule());
    const LayerRefs& r = holder->refs;
    const c10::Device device = input.device();
    const int64_t b = input.size(0), t = input.size(1), h = input.size(2);
    const at::Tensor x2 = input.reshape({b * t, h});
    const at::Tensor dy = grad_outputs[0].reshape({b * t, h});
    if (std::unique_ptr<KeptLayer> kept = std::move(holder->kept)) {
      const at::Tensor dh1 = mlp_backward(r, h1, dy, std::move(kept->mlp), std::move(kept->down));
      kept->att.w_qkv = merged_weight(pick(r, {kQ, kK, kV}), x2.options());
      grads[0] = attention_backward(r, holder->cos_sin, x2, b, t, dh1, std::move(kept->att), std::move(kept->graph),
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
    // Offloaded (long sequences): the recomputed halves shed q, k, v's and gate, up's dropped
    // LoRA inputs too, the largest LoRA share of a half's working set there (Note [shed LoRA
    // inputs]); o's and down's are used before the half's peak.
    const bool shed = holder->offload != nullptr;
    auto [mlp, down] = mlp_recompute(r, h1, std::move(kept_gu), shed);
    if (auto it = ctx->saved_data.find("down"); it != ctx->saved_data.end()) {
      mlp.d = it->second.toTensor();  // Note [sandwich norms]: kept from forward
      ctx->saved_data.erase(it);      // freed with the MLP half, before the attention half's
    }
    const at::Tensor dh1 = mlp_backward(r, h1, dy, std::move(mlp), std::move(down));
    if (r.any_dropout) load_rng(ctx, "rng_attention", device);
    auto [att, graph, o] = attention_recompute(r, holder->cos_sin, holder->attention, x2, b, t, shed);
    grads[0] = attention_backward(r, holder->cos_sin, x2, b, t, dh1, std::move(att), std::move(graph), std::move(o))
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
                                          int64_t selective_layers, int64_t no_recompute_layers,
                                          std::shared_ptr<CheckpointOffload> offload) {
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
  auto local = std::make_shared<LocalRope>(model);
  return [m, keep, first_kept, first_whole, local, offload](int64_t layer, const at::Tensor& hidden,
                                                   const std::pair<at::Tensor, at::Tensor>& cos_sin,
                                                   const model::AttentionInputs& attention) -> at::Tensor {
    if (!at::GradMode::is_enabled()) return m->layer_forward(layer, hidden, cos_sin, attention);
    auto holder = c10::make_intrusive<LayerHolder>();
    holder->refs = layer_refs(*m, layer, hidden.scalar_type());
    holder->keep = layer >= first_whole                                       ? LayerHolder::Keep::kAll
                   : keep == LayerHolder::Keep::kGateUp && layer < first_kept ? LayerHolder::Keep::kInputs
                                                                              : keep;
    holder->cos_sin = holder->refs.window > 0 && local->applies() ? local->of(attention.position_ids) : cos_sin;
    holder->attention = attention;
    if (holder->keep != LayerHolder::Keep::kAll) holder->offload = offload;
    holder->layer = layer;
    // As in checkpoint(): without an input that requires grad, the output would have
    // no grad_fn and the LoRA matrices inside would never get gradients.
    // Its value is never read (empty: no fill kernel a layer).
    at::Tensor anchor = at::empty({}, hidden.options());
    if (!hidden.requires_grad()) anchor.requires_grad_(true);
    return FusedLayerFunction::apply(hidden, anchor, holder);
  };
}

}  // namespace qlora::layer
