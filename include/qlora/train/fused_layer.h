// train/fused_layer: a checkpointed decoder layer whose backward is written out
// by hand instead of recorded by autograd.
//
// The generic checkpoint (train/checkpoint.h) recomputes the layer under
// autograd: ~60 small ATen ops forward, more backward, every projection
// dequantized three times, the base output and the LoRA update added in
// separate kernels. The fused layer does the same math with fewer, larger
// kernels (Note [fused decoder layer] in src/train/fused_layer.cpp):
//   - q, k, v dequantized into one weight and multiplied in one GEMM; gate and
//     up likewise; a LoRA update added by the GEMM that makes it (addmm);
//   - RoPE and SwiGLU as fused element-wise ops (model/fused_ops.h), the
//     residual adds inside the GEMMs;
//   - forward keeps the layer input and the attention residual (x + o(attn));
//     backward recomputes only what the gradient needs: o_proj and down_proj
//     are not run again, and each weight is dequantized once per pass;
//   - LoRA gradients are accumulated into A.grad / B.grad directly.
// Dropout masks are drawn in the generic layer's order from the same
// generators, so on the CPU the masks are the generic layer's, and the
// gradients agree to rounding (tests/test_fused_layer.cpp).
#pragma once

#include <string>

#include "qlora/config/config.h"
#include "qlora/train/trainer.h"

namespace qlora::model {
class DecoderModel;
}

namespace qlora::train {

// Empty when `model` can run through the fused layer; otherwise why not
// (a projection that is neither a frozen base nor LoRA over one).
std::string fused_layer_unsupported(const model::DecoderModel& model);

// What the fused layer recomputes in backward: all but its input and the attention
// residual (kFull: checkpointing), all but the gate/up GEMM too (kSelective: Note
// [selective recompute] in src/train/fused_layer.cpp), nothing (kNothing: no
// checkpointing, Note [fused layer without checkpointing]).
enum class FusedRecompute { kFull, kSelective, kNothing };

// The fused layer forward (`model` must outlive every backward). With grad mode off
// it is model.layer_forward. With kSelective, the last `selective_layers` layers keep their
// gate/up output and the others recompute in full (-1: every layer keeps it). With kFull or
// kSelective, the last `no_recompute_layers` layers (clamped to the model's) recompute nothing,
// as under kNothing (Note [layers not recomputed] in src/train/fused_layer.cpp).
LayerForwardFn fused_layer_forward(const model::DecoderModel& model, FusedRecompute what = FusedRecompute::kFull,
                                   int64_t selective_layers = -1, int64_t no_recompute_layers = 0);

// What a training run uses for its decoder layers: the fused layer for bf16 / fp16
// models on a GPU, checkpointed (train.gradient_checkpointing, with train.recompute)
// or not; elsewhere the generic checkpoint, or an empty function (the model's own
// forward under autograd) without checkpointing: the CPU and fp32 keep the reference
// path the golden tests pin. QLORA_LAYER=reference or =fused overrides the choice (to
// compare; fused on an unsupported model throws). `recompute` reaches the fused layer
// only, and so does `no_recompute_layers` (train.no_recompute_layers): the generic checkpoint
// always recomputes the whole layer. Recompute::kAuto must have been resolved by then
// (train::resolve_auto_recompute); here it reads as full.
LayerForwardFn training_layer_forward(const model::DecoderModel& model, bool gradient_checkpointing,
                                      Recompute recompute = Recompute::kFull, int64_t selective_layers = -1,
                                      int64_t no_recompute_layers = 0);

// The same for a run's train section: gradient_checkpointing, recompute, selective_layers,
// no_recompute_layers.
LayerForwardFn training_layer_forward(const model::DecoderModel& model, const TrainConfig& train);

// Whether training_layer_forward gives `model` the fused layer (where train.recompute: selective
// and train.no_recompute_layers take effect) rather than the generic checkpoint.
bool trains_with_fused_layer(const model::DecoderModel& model);

}  // namespace qlora::train
