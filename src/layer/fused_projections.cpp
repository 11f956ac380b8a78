// A decoder layer's projections for the fused layer (src/layer/fused_projections.h).
#include "layer/fused_projections.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <utility>

#include "qlora/lora/lora.h"
#include "qlora/model/decoder.h"

namespace qlora::layer {

LayerRefs layer_refs(const model::DecoderModel& m, int64_t index, at::ScalarType compute) {
  const BelowAutograd below;  // LoRA's casts: no graph (backward is the layer's own)
  LayerRefs r;
  r.model = &m;
  r.index = index;
  // Note [fused projections]: Phi-3's qkv_proj and gate_up_proj are the merged q|k|v and
  // gate|up themselves: they take the q and gate slots, and k, v and up stay empty.
  const bool fused = m.config().pieces.fused_projections;
  for (size_t i = 0; i < r.proj.size(); ++i) {
    if (fused && (i == kK || i == kV || i == kUp)) continue;
    r.proj[i] = proj_of(m, index, fused ? fused_slot(i) : i, compute);
    if (r.proj[i].lora && r.proj[i].lora->training() && r.proj[i].lora->dropout() > 0) r.any_dropout = true;
  }
  const DecoderConfig& c = m.config();
  r.norm1 = m.input_norm_weight(index);
  if (c.pieces.sandwich_norms) {  // Gemma: post_attention_layernorm normalizes the attention output
    r.post_attention_norm = m.post_attention_norm_weight(index);
    r.norm2 = m.pre_feedforward_norm_weight(index);
    r.post_feedforward_norm = m.post_feedforward_norm_weight(index);
  } else {
    r.norm2 = m.post_attention_norm_weight(index);
  }
  r.q_norm = m.q_norm_weight(index);  // undefined without pieces.qk_norm
  r.k_norm = m.k_norm_weight(index);
  r.eps = c.rms_norm_eps;
  r.plus_one = c.pieces.norm_plus_one;
  r.act = c.pieces.act;
  r.window = c.window_of(index);
  // As model::DecoderModel::layer_forward passes them to model::attention.
  r.scale = c.query_pre_attn_scalar > 0 ? 1.0 / std::sqrt(c.query_pre_attn_scalar) : 0.0;
  r.softcap = c.attn_logit_softcapping;
  return r;
}

size_t fused_slot(size_t index) {
  switch (index) {
    case kQ: return 0;     // qkv_proj
    case kO: return 1;     // o_proj
    case kGate: return 2;  // gate_up_proj
    case kDown: return 3;  // down_proj
    default: throw std::invalid_argument("fused_slot: k_proj, v_proj and up_proj are inside qkv_proj and gate_up_proj");
  }
}

std::vector<Proj> pick(const LayerRefs& r, std::initializer_list<size_t> idx) {
  std::vector<Proj> out;
  for (size_t i : idx)
    if (r.proj[i].base != nullptr) out.push_back(r.proj[i]);
  return out;
}

std::vector<std::pair<size_t, Dropped>> shared_dropout(const LayerRefs& r, std::initializer_list<size_t> idx,
                                                       const at::Tensor& x) {
  std::vector<size_t> which;
  std::vector<const lora::LoraLinear*> loras;
  for (size_t i : idx)
    if (r.proj[i].lora) {
      which.push_back(i);
      loras.push_back(r.proj[i].lora);
    }
  std::vector<std::pair<size_t, Dropped>> out;
  if (loras.empty()) return out;
  std::vector<Dropped> dropped = dropout_shared(x, loras);
  for (size_t k = 0; k < which.size(); ++k) out.emplace_back(which[k], std::move(dropped[k]));
  return out;
}

// Note [LoRA before the base GEMM]
// A merged projection's output is [residual +] x·Wᵀ plus each LoRA's (scaling·dropout(x)·Aᵀ)·Bᵀ
// in its column block. Added after the base GEMM, each LoRA product reads and writes its block
// of the output once more: a pass over [N, out] a projection, memory-bound (with all-linear LoRA
// at 4 × 1024 on an H200 the GEMM kernel those additions ran as took 13.4 ms of three profiled
// steps, against 2.0 with LoRA on q,k,v,o: bench/results/2026-12-02-h200-gemm-backends,
// run4-profile-summary-*). When every projection of the block has a LoRA, the small products
// are written first (into the fresh output, or onto the residual) and the base GEMM adds into
// them (beta 1), so the output is read once, in the GEMM's epilogue. The sum is the same three
// terms rounded in another order (the LoRA term rounded to 16 bits before the base product is
// added, where before the base product was rounded first). Blocks where some projection has no
// LoRA keep the base GEMM first (its columns would need zeroing).

// Note [biases in the GEMM]
// A family's projection biases (Qwen2's q, k, v; Llama's attention_bias on q, k, v, o and
// mlp_bias on gate, up, down) are frozen (PEFT's bias="none"): they change the forward only, and
// backward has nothing to give them. They go where the GEMM already adds: the merged q|k|v's
// (and gate|up's) biases, end to end, are addmm's input, broadcast over the rows, so the
// epilogue adds them (with LoRA first, each LoRA block is written as bias + its product); o_proj's
// and down_proj's are added to the residual once (residual + bias, a fresh tensor the GEMMs then
// accumulate into in place: one pass over [N, h] more than without a bias). The terms are the
// generic layer's (x·Wᵀ + b, then the LoRA update, then the residual) summed in another order.
at::Tensor project(const LayerRefs& r, std::initializer_list<size_t> idx, const at::Tensor& x, const at::Tensor& w,
                   const at::Tensor& residual, std::vector<std::pair<size_t, LoraPass>>* passes,
                   std::vector<std::pair<size_t, Dropped>> drawn) {
  // Empty slots (Note [fused projections]) have no columns.
  const auto present = [&](size_t i) { return r.proj[i].base != nullptr; };
  const bool every_lora =
      std::all_of(idx.begin(), idx.end(), [&](size_t i) { return !present(i) || r.proj[i].lora != nullptr; });
  const auto parts = std::count_if(idx.begin(), idx.end(), present);
  const bool lora_first = every_lora && (!residual.defined() || parts == 1);
  // What the products are added to: the residual [N, out], the bias [out] (broadcast), their
  // sum (fresh, so accumulated into in place), or nothing.
  const at::Tensor bias = merged_bias(pick(r, idx), x.options());
  const bool fresh = residual.defined() && bias.defined();
  const at::Tensor start = fresh ? residual + bias : residual.defined() ? residual : bias;
  at::Tensor out;
  if (!lora_first) {
    out = fresh ? start.addmm_(x, w.t()) : start.defined() ? at::addmm(start, x, w.t()) : at::mm(x, w.t());
  } else if (!residual.defined()) {
    out = at::empty({x.size(0), w.size(0)}, x.options());
  }
  std::vector<std::pair<size_t, Dropped>> dropped = drawn.empty() ? shared_dropout(r, idx, x) : std::move(drawn);
  auto next = dropped.begin();
  int64_t off = 0;
  for (size_t i : idx) {
    const Proj& p = r.proj[i];
    if (!present(i)) continue;
    const int64_t n = p.base->out_features();
    if (p.lora) {
      LoraPass pass = lora_pass(p, std::move(next->second));  // pass.t holds the scaling
      ++next;
      if (!lora_first) {
        out.narrow(1, off, n).addmm_(pass.t, p.b.t());
      } else if (residual.defined()) {  // one projection: start is [N, out]
        out = fresh ? start.addmm_(pass.t, p.b.t()) : at::addmm(start, pass.t, p.b.t());
      } else {
        at::Tensor block = out.narrow(1, off, n);
        if (bias.defined()) {
          at::addmm_out(block, bias.narrow(0, off, n), pass.t, p.b.t());
        } else {
          at::mm_out(block, pass.t, p.b.t());
        }
      }
      if (passes) passes->emplace_back(i, std::move(pass));
    }
    off += n;
  }
  if (lora_first) out.addmm_(x, w.t());
  return out;
}

at::Tensor lora_columns_backward(const LayerRefs& r, std::initializer_list<size_t> idx, const at::Tensor& gout,
                                 std::vector<std::pair<size_t, LoraPass>>& passes) {
  std::vector<DroppedGrad> terms;
  int64_t off = 0;
  for (size_t i : idx) {
    const Proj& p = r.proj[i];
    if (p.base == nullptr) continue;  // an empty slot (Note [fused projections])
    const int64_t n = p.base->out_features();
    for (auto& [which, pass] : passes) {
      if (which != i) continue;
      terms.push_back(lora_backward(p, std::move(pass), gout.narrow(1, off, n)));
    }
    off += n;
  }
  return add_input_grads(at::Tensor(), std::move(terms));
}

void shed_passes(std::vector<std::pair<size_t, LoraPass>>& passes, const at::Tensor& source) {
  for (auto& [which, pass] : passes) pass.in = shed(std::move(pass.in), source);
}

}  // namespace qlora::layer
