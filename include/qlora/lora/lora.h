// lora/lora: low-rank adapters on frozen projections, with PEFT's semantics.
//
// A LoraLinear wraps a frozen base projection (dense or NF4) and adds a
// trainable low-rank update: y = base(x) + dropout(x) · Aᵀ · Bᵀ · scaling,
// A [r, in] and B [out, r] held in fp32 (the master weights the optimizer
// updates) and cast to x's dtype at each use. A LoraAdapter attaches one to
// every targeted projection of a model, chosen by PEFT's matching rules, and
// reads / writes PEFT's on-disk format (lora/adapter_io.h). The model module
// never sees any of this: the adapter swaps the model's Linear slots.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "qlora/model/linear.h"

namespace qlora {
struct LoraConfig;
namespace model {
class DecoderModel;
}
}  // namespace qlora

namespace qlora::lora {

// ---------------------------------------------------------------- settings

struct LoraSettings {
  int64_t r = 8;
  double alpha = 16.0;
  double dropout = 0.0;
  bool rslora = false;  // scaling alpha / sqrt(r) instead of alpha / r
  // PEFT's list form: a module matches when its name equals an entry or ends
  // with "." + entry ("q_proj", "model.layers.0.mlp.up_proj"). The single entry
  // "all-linear" means every decoder projection (never lm_head).
  std::vector<std::string> target_modules;
  // PEFT's string form, used instead of the list when non-empty: the whole
  // module name must match this regular expression.
  std::string target_regex;

  double scaling() const;
};

// The trainer's config section (config.h) as settings.
LoraSettings settings_from_config(const LoraConfig& config);

// Which of `module_names` the settings target, in the given order. Throws
// InputError when they match none (naming the targets and a few module names).
std::vector<std::string> select_targets(const std::vector<std::string>& module_names, const LoraSettings& settings);

// ---------------------------------------------------------------- one layer

class LoraLinear final : public model::Linear {
 public:
  // A initialized as PEFT does (kaiming_uniform_ with a = sqrt(5), from the
  // default generator), B zeros; both fp32 on `device`, requiring grad.
  LoraLinear(std::shared_ptr<model::FrozenLinear> base, int64_t r, double scaling, double dropout,
             c10::Device device);

  at::Tensor forward(const at::Tensor& x) const override;  // [..., in] -> [..., out] in x's dtype
  int64_t in_features() const override { return base_->in_features(); }
  int64_t out_features() const override { return base_->out_features(); }

  const std::shared_ptr<model::FrozenLinear>& base() const { return base_; }
  at::Tensor& lora_a() { return a_; }  // [r, in] fp32
  at::Tensor& lora_b() { return b_; }  // [out, r] fp32
  const at::Tensor& lora_a() const { return a_; }
  const at::Tensor& lora_b() const { return b_; }
  int64_t r() const { return a_.size(0); }
  double scaling() const { return scaling_; }
  double dropout() const { return dropout_; }

  // Dropout is active only while training.
  void set_training(bool training) { training_ = training; }
  bool training() const { return training_; }

  // base weight + scaling · B · A, in `dtype` [out, in]: the merged projection.
  at::Tensor merged_weight(at::ScalarType dtype) const;

 private:
  std::shared_ptr<model::FrozenLinear> base_;
  at::Tensor a_;  // [r, in] fp32
  at::Tensor b_;  // [out, r] fp32
  double scaling_ = 1.0;
  double dropout_ = 0.0;
  bool training_ = true;
};

// ---------------------------------------------------------------- a whole model

class LoraAdapter {
 public:
  // Wraps each targeted projection of `model` (which must outlive the adapter's
  // use; the model keeps the layers alive) in a LoraLinear on the model's
  // device. Throws InputError when no projection matches, or when a target is
  // already wrapped.
  static LoraAdapter attach(model::DecoderModel& model, const LoraSettings& settings);

  const LoraSettings& settings() const { return settings_; }
  const std::vector<std::string>& module_names() const { return names_; }  // HF module names, model order
  const std::vector<std::shared_ptr<LoraLinear>>& layers() const { return layers_; }

  // A then B of each module, in module order: what the optimizer updates.
  std::vector<at::Tensor> parameters() const;
  // The same tensors under PEFT's saved key names
  // ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").
  std::vector<std::pair<std::string, at::Tensor>> named_parameters() const;

  // Copies values into A and B by PEFT key. Every key of every module must be
  // present with its shape, and no other key: otherwise one InputError naming
  // `origin` lists what is missing, unexpected or mis-shaped.
  void load_state(const std::map<std::string, at::Tensor>& tensors, const std::string& origin);

  void set_training(bool training);

 private:
  LoraSettings settings_;
  std::vector<std::string> names_;
  std::vector<std::shared_ptr<LoraLinear>> layers_;
};

// PEFT's saved key of one LoRA matrix: which is 'A' or 'B'.
std::string peft_key(const std::string& module_name, char which);

}  // namespace qlora::lora
