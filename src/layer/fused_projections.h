// layer/fused_projections: a decoder layer's seven projections as the fused layer
// (src/layer/fused_layer.cpp) uses them, private to src/layer: the layer's frozen bases, biases,
// LoRAs, norm weights, window and the family's other pieces gathered once a layer call
// (LayerRefs), the merged q|k|v and gate|up products with their biases and LoRAs (project), and
// the LoRAs' backward over a merged output.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

#include "layer/fused_layer_parts.h"
#include "qlora/model/decoder_config.h"

namespace qlora::model {
class DecoderModel;
}

namespace qlora::layer {

// Index of each projection in decoder_linear_names().
constexpr size_t kQ = 0, kK = 1, kV = 2, kO = 3, kGate = 4, kUp = 5, kDown = 6;

// A layer's weights and the family's pieces it uses (Note [the family's pieces] in
// src/layer/fused_layer.cpp).
struct LayerRefs {
  const model::DecoderModel* model = nullptr;
  int64_t index = 0;
  std::array<Proj, 7> proj;
  at::Tensor norm1, norm2;    // [h]: the norms before attention and before the MLP
  at::Tensor q_norm, k_norm;  // [head_dim], the per-head norms (pieces.qk_norm); undefined otherwise
  // [h], Gemma's sandwich norms (pieces.sandwich_norms) of o_proj's and down_proj's outputs;
  // undefined otherwise.
  at::Tensor post_attention_norm, post_feedforward_norm;
  double eps = 1e-6;          // every norm's
  bool plus_one = false;      // every norm scales by (1 + w) (pieces.norm_plus_one)
  Activation act = Activation::kSilu;
  int64_t window = 0;         // the layer's attention window (DecoderConfig::window_of); 0: causal only
  double scale = 0.0;         // of q·k: query_pre_attn_scalar^-1/2; 0: head_dim^-1/2
  double softcap = 0.0;       // attn_logit_softcapping; 0: none
  bool any_dropout = false;
};

// Layer `index` of m, LoRA's A and B cast to `compute` (once a layer call).
// Note [fused projections]: a family with pieces.fused_projections (Phi-3: qkv_proj, o_proj,
// gate_up_proj, down_proj) puts qkv_proj in the kQ slot and gate_up_proj in kGate; kK, kV and kUp
// stay empty (base null: no columns, skipped by pick, project and lora_columns_backward). The
// merged products' column layout is the same: q | k | v and gate | up.
LayerRefs layer_refs(const model::DecoderModel& m, int64_t index, at::ScalarType compute);

// The model's projection index (DecoderModel::projection) of slot kQ, kO, kGate or kDown in a
// fused family.
size_t fused_slot(size_t index);

// The projections of `idx` that exist (empty slots left out).
std::vector<Proj> pick(const LayerRefs& r, std::initializer_list<size_t> idx);

// The dropped copies of x for the LoRA projections among `idx` (which share x), drawn
// together in idx's order (fused_layer_parts.h: dropout_shared).
std::vector<std::pair<size_t, Dropped>> shared_dropout(const LayerRefs& r, std::initializer_list<size_t> idx,
                                                       const at::Tensor& x);

// [residual +] x·Wᵀ [+ bias] for projections `idx` (w: their weights stacked by rows, outputs
// in consecutive column blocks; their biases merged_bias's), each LoRA's product added into its
// block; the LoRA passes in `passes` (when not null) for the backward. Note [LoRA before the base
// GEMM], Note [biases in the GEMM]. `drawn`, when not empty, holds the LoRAs' dropped inputs
// already drawn (shared_dropout's form), else they are drawn here.
at::Tensor project(const LayerRefs& r, std::initializer_list<size_t> idx, const at::Tensor& x, const at::Tensor& w,
                   const at::Tensor& residual, std::vector<std::pair<size_t, LoraPass>>* passes,
                   std::vector<std::pair<size_t, Dropped>> drawn = {});

// The gradient of LoRA projections `idx` given the gradient of their merged output.
// The terms are summed in idx's order, one pass for those sharing a GPU bit mask's p
// (add_input_grads).
at::Tensor lora_columns_backward(const LayerRefs& r, std::initializer_list<size_t> idx, const at::Tensor& gout,
                                 std::vector<std::pair<size_t, LoraPass>>& passes);

// Note [shed LoRA inputs] (layer/fused_layer_parts.h): the passes' dropped copies of `source`
// go; their masks and source stay.
void shed_passes(std::vector<std::pair<size_t, LoraPass>>& passes, const at::Tensor& source);

}  // namespace qlora::layer
