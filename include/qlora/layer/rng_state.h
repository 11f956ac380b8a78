// layer/rng_state: the default generators' states, captured and put back, so a layer
// recomputed in backward draws the dropout masks its forward drew (Note [Checkpoint RNG]).
// Used by both layers that recompute: the fused layer (src/layer/fused_layer.cpp) and train's
// generic checkpoint (src/train/checkpoint.cpp).
#pragma once

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <mutex>

namespace qlora::layer {

// Note [Checkpoint RNG]
// LoRA dropout draws its masks from the default generator of the input's
// device. Recomputing a layer in backward must draw the same masks, so forward
// records the generator state(s) before running the layer, and backward sets
// them again before the recomputation. Backward runs in reverse layer order,
// long after the forward consumed the generator further; after recomputing,
// the state backward found is put back, so the next step's dropout sees the
// generator exactly where a step without checkpointing would leave it.
// Recorded: the CPU generator always (CPU ops inside a CUDA layer may draw
// from it too), and the CUDA generator of the input's device for CUDA inputs.
struct RngState {
  at::Tensor cpu;   // uint8 state of the default CPU generator
  at::Tensor cuda;  // uint8 state of the input device's default CUDA generator; undefined on CPU
};

// By value: Generator is a shared handle, and its mutex() is non-const.
inline at::Tensor generator_state(at::Generator gen) {
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

inline void set_generator_state(at::Generator gen, const at::Tensor& state) {
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

inline RngState capture_rng(const c10::Device& device) {
  RngState s;
  s.cpu = generator_state(at::detail::getDefaultCPUGenerator());
  if (device.is_cuda()) s.cuda = generator_state(at::globalContext().defaultGenerator(device));
  return s;
}

inline void restore_rng(const RngState& s, const c10::Device& device) {
  set_generator_state(at::detail::getDefaultCPUGenerator(), s.cpu);
  if (s.cuda.defined()) set_generator_state(at::globalContext().defaultGenerator(device), s.cuda);
}

}  // namespace qlora::layer
