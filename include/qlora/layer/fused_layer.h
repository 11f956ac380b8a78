// layer/fused_layer: the decoder layer built from the family description, with its backward
// written out by hand instead of recorded by autograd.
//
// A family is a description (model/decoder_config.h: DecoderConfig, its LayerPieces and
// per-layer windows) plus, where it differs from Llama, a piece in the layer. This module owns
// the fused layer and those pieces (Note [the family's pieces] in src/layer/fused_layer.cpp):
// projection biases in the GEMMs' epilogues (Qwen2's q, k, v; Llama's attention_bias and
// mlp_bias), per-head q / k RMSNorm before RoPE (Qwen3, Gemma 3), sliding-window attention,
// and Gemma's pieces: GeGLU, (1 + w) norms, the sandwich norms around attention and the MLP,
// query_pre_attn_scalar, attention soft-capping and Gemma 3's local RoPE base.
// model::fused_layer_gap says what it still lacks (a model that needs one takes train's generic
// checkpoint). It also owns the generator capture both recomputing layers replay
// (layer/rng_state.h, Note [Checkpoint RNG]). Which layer a run uses is train's choice
// (train/layer_choice.h).
//
// The generic checkpoint (train/checkpoint.h) recomputes the layer under
// autograd: ~60 small ATen ops forward, more backward, every projection
// dequantized three times, the base output and the LoRA update added in
// separate kernels. The fused layer does the same math with fewer, larger
// kernels (Note [fused decoder layer] in src/layer/fused_layer.cpp):
//   - q, k, v dequantized into one weight and multiplied in one GEMM; gate and
//     up likewise; a LoRA update added by the GEMM that makes it (addmm);
//   - RoPE and SwiGLU / GeGLU as fused element-wise ops (model/fused_ops.h), the
//     residual adds inside the GEMMs;
//   - forward keeps the layer input and the attention residual (x + o(attn));
//     backward recomputes only what the gradient needs: o_proj and down_proj
//     are not run again (with Gemma's sandwich norms o_proj is, and down_proj's
//     output is kept), and each weight is dequantized once per pass;
//   - LoRA gradients are accumulated into A.grad / B.grad directly.
// Dropout masks are drawn in the generic layer's order from the same
// generators, so on the CPU the masks are the generic layer's, and the
// gradients agree to rounding (tests/test_fused_layer.cpp, every family).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "qlora/model/decoder.h"

namespace qlora::layer {

class CheckpointOffload;

// Empty when `model` can run through the fused layer; otherwise why not: what
// model::fused_layer_gap says its family lacks, or a projection that is neither a frozen
// base nor LoRA over one.
std::string fused_layer_unsupported(const model::DecoderModel& model);

// What the fused layer recomputes in backward: all but its input and the attention
// residual (kFull: checkpointing), all but the gate/up GEMM too (kSelective: Note
// [selective recompute] in src/layer/fused_layer.cpp), nothing (kNothing: no
// checkpointing, Note [fused layer without checkpointing]).
enum class FusedRecompute { kFull, kSelective, kNothing };

// The fused layer forward (`model` must outlive every backward). With grad mode off
// it is model.layer_forward. With kSelective, the last `selective_layers` layers keep their
// gate/up output and the others recompute in full (-1: every layer keeps it). With kFull or
// kSelective, the last `no_recompute_layers` layers (clamped to the model's) recompute nothing,
// as under kNothing (Note [layers not recomputed] in src/layer/fused_layer.cpp). Throws
// std::invalid_argument with fused_layer_unsupported's reason for a model it cannot run.
// `offload` (train.offload_checkpoints): what a recomputed layer keeps for its backward waits in
// host memory (Note [offloaded checkpoints] in src/layer/offload.cpp); layers kept whole keep
// theirs on the device.
model::LayerForwardFn fused_layer_forward(const model::DecoderModel& model, FusedRecompute what = FusedRecompute::kFull,
                                          int64_t selective_layers = -1, int64_t no_recompute_layers = 0,
                                          std::shared_ptr<CheckpointOffload> offload = nullptr);

}  // namespace qlora::layer
