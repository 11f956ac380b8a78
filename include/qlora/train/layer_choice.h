// train/layer_choice: which decoder layer a training run uses, the fused one
// (layer/fused_layer.h) or the generic checkpoint (train/checkpoint.h), and with which
// recompute mode.
#pragma once

#include <cstdint>

#include "qlora/config/config.h"
#include "qlora/train/trainer.h"

namespace qlora::model {
class DecoderModel;
}

namespace qlora::train {

// What a training run uses for its decoder layers: the fused layer for bf16 / fp16
// models on a GPU, checkpointed (train.gradient_checkpointing, with train.recompute)
// or not; elsewhere the generic checkpoint, or an empty function (the model's own
// forward under autograd) without checkpointing: the CPU and fp32 keep the reference
// path the golden tests pin. A model the fused layer cannot run (layer::fused_layer_unsupported:
// a piece its family needs and the fused layer lacks, model::fused_layer_gap) takes the
// generic checkpoint on the GPU too. QLORA_LAYER=reference or =fused overrides the choice (to
// compare; fused on an unsupported model throws). `recompute` reaches the fused layer
// only, and so does `no_recompute_layers` (train.no_recompute_layers): the generic checkpoint
// always recomputes the whole layer. Recompute::kAuto must have been resolved by then
// (train::resolve_auto_recompute); here it reads as full. `offload` (train.offload_checkpoints,
// resolved by train::resolve_offload; kAuto reads as off): under checkpointing each layer's kept
// tensors wait in pinned host memory (Note [offloaded checkpoints] in src/layer/offload.cpp).
LayerForwardFn training_layer_forward(const model::DecoderModel& model, bool gradient_checkpointing,
                                      Recompute recompute = Recompute::kFull, int64_t selective_layers = -1,
                                      int64_t no_recompute_layers = 0, Offload offload = Offload::kOff);

// The same for a run's train section: gradient_checkpointing, recompute, selective_layers,
// no_recompute_layers, offload_checkpoints.
LayerForwardFn training_layer_forward(const model::DecoderModel& model, const TrainConfig& train);

// Whether training_layer_forward gives `model` the fused layer (where train.recompute: selective
// and train.no_recompute_layers take effect) rather than the generic checkpoint.
bool trains_with_fused_layer(const model::DecoderModel& model);

}  // namespace qlora::train
