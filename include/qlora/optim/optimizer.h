// optim/optimizer: AdamW (fp32 state) and 8-bit blockwise AdamW (bitsandbytes), paged or not.
//
// An optimizer owns the state of a fixed list of named fp32 parameters and updates them
// from their .grad() in step(lr): the learning rate is data, passed every step by the
// schedule. The math is in optim/adamw_ref.h (plain functions, the CUDA kernels'
// reference); this layer checks tensors, walks the parameters and keeps the state.
//
// State for checkpoints: named tensors (written by the checkpoint module as safetensors,
// no pickle) plus a small JSON object of scalars with a format version. Saving then
// loading gives a bitwise-identical optimizer.
//   adamw      "<param>.exp_avg", "<param>.exp_avg_sq"                         fp32, param shape
//   adamw8bit  "<param>.exp_avg.q", "<param>.exp_avg_sq.q"                     uint8, param shape
//              "<param>.exp_avg.absmax", "<param>.exp_avg_sq.absmax"           fp32 [ceil(n/256)]
//              (params under min_8bit_size elements use the adamw names, fp32, as bnb)
//   scalars    {"format": "qlora.optimizer", "format_version": 1, "optimizer": ...,
//               "step": N, "block_size": 256, "min_8bit_size": 4096}
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "qlora/config/config.h"
#include "qlora/optim/adamw_ref.h"
#include "qlora/optim/state_storage.h"

namespace qlora::optim {

struct NamedParam {
  std::string name;   // unique, e.g. "model.layers.0.self_attn.q_proj.lora_A.weight"
  at::Tensor param;   // fp32, contiguous, CPU (CUDA in the CUDA issue); its grad() is read
};

struct OptimizerState {
  std::vector<std::pair<std::string, at::Tensor>> tensors;  // sorted by name
  std::string scalars_json;
};

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  int64_t min_8bit_size = kMin8bitSize;   // 8-bit only: smaller params keep fp32 state
};

class Optimizer {
 public:
  virtual ~Optimizer() = default;

  // One update of every parameter that has a defined grad (others are left alone, as
  // torch does), with learning rate `lr`. Increments step_count() once; bias correction
  // uses that one count for every parameter (torch and bnb count per parameter, which only
  // differs for a parameter that went without a gradient: LoRA's always have one).
  virtual void step(double lr) = 0;

  // Resets every gradient to undefined (set_to_none, torch's default).
  void zero_grad();

  int64_t step_count() const { return step_; }
  const std::vector<NamedParam>& params() const { return params_; }
  virtual std::string kind() const = 0;   // "adamw", "adamw8bit", "paged_adamw8bit"

  // Deep copies (the optimizer may keep updating its own state afterwards).
  virtual OptimizerState state() const = 0;
  // Replaces the state; throws InputError naming the tensor or key when the saved state
  // does not fit these parameters (missing/extra tensor, shape, dtype, kind, version).
  virtual void load_state(const OptimizerState& state) = 0;

  // Bytes of optimizer state (for the memory report).
  virtual uint64_t state_bytes() const = 0;

 protected:
  explicit Optimizer(std::vector<NamedParam> params);
  std::string scalars_json() const;
  void load_scalars(const std::string& json);   // checks format/kind/version, sets step_

  std::vector<NamedParam> params_;
  int64_t step_ = 0;
  int64_t min_8bit_size_ = kMin8bitSize;
};

// torch.optim.AdamW semantics, fp32 state (host memory on CPU).
std::unique_ptr<Optimizer> make_adamw(std::vector<NamedParam> params, const AdamWOptions& options);

// bitsandbytes AdamW8bit semantics; state buffers come from `storage` (host memory when
// null). paged_adamw8bit is the same optimizer over make_host_paged_storage() (CPU) or, on a
// GPU, make_managed_storage() (the device's own memory where managed memory is unavailable or
// QLORA_PAGED_STATE=device); only kind() and the storage differ.
std::unique_ptr<Optimizer> make_adamw8bit(std::vector<NamedParam> params, const AdamWOptions& options,
                                          std::shared_ptr<StateStorage> storage = nullptr);
std::unique_ptr<Optimizer> make_paged_adamw8bit(std::vector<NamedParam> params, const AdamWOptions& options,
                                                std::shared_ptr<StateStorage> storage = nullptr);

// train.optimizer / adam_beta1 / adam_beta2 / adam_epsilon / weight_decay.
std::unique_ptr<Optimizer> make_optimizer(const TrainConfig& train, std::vector<NamedParam> params);

}  // namespace qlora::optim
