#include "qlora/train/layer_choice.h"

#include <ATen/core/Tensor.h>

#include <cstdlib>
#include <memory>
#include <string>

#include "qlora/layer/fused_layer.h"
#include "qlora/layer/offload.h"
#include "qlora/model/decoder.h"
#include "qlora/train/checkpoint.h"

namespace qlora::train {
namespace {

bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::string(v) == value;
}

}  // namespace

LayerForwardFn training_layer_forward(const model::DecoderModel& model, bool gradient_checkpointing,
                                      Recompute recompute, int64_t selective_layers, int64_t no_recompute_layers,
                                      Offload offload) {
  const layer::FusedRecompute what = !gradient_checkpointing            ? layer::FusedRecompute::kNothing
                                     : recompute == Recompute::kSelective ? layer::FusedRecompute::kSelective
                                                                          : layer::FusedRecompute::kFull;
  // One offloader for every layer of the run: its side streams and its chain from layer to layer.
  std::shared_ptr<layer::CheckpointOffload> offloader;
  if (gradient_checkpointing && offload == Offload::kOn)
    offloader = std::make_shared<layer::CheckpointOffload>();
  if (!trains_with_fused_layer(model)) {
    CheckpointOptions options;
    options.offload = offloader;
    return gradient_checkpointing ? checkpointed_layer_forward(model, options) : LayerForwardFn();
  }
  return layer::fused_layer_forward(model, what, selective_layers, no_recompute_layers, offloader);
}

bool trains_with_fused_layer(const model::DecoderModel& model) {
  if (env_is("QLORA_LAYER", "fused")) return true;
  const bool gpu_16bit = model.device().is_cuda() && model.dtype() != at::kFloat;
  return !env_is("QLORA_LAYER", "reference") && gpu_16bit && layer::fused_layer_unsupported(model).empty();
}

LayerForwardFn training_layer_forward(const model::DecoderModel& model, const TrainConfig& train) {
  return training_layer_forward(model, train.gradient_checkpointing, train.recompute, train.selective_layers,
                                train.no_recompute_layers, train.offload_checkpoints);
}

}  // namespace qlora::train
