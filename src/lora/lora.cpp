#include "qlora/lora/lora.h"

#include <ATen/ATen.h>
#include <torch/nn/init.h>

#include <cmath>
#include <regex>
#include <set>
#include <sstream>

#include "qlora/common/errors.h"
#include "qlora/common/text.h"
#include "qlora/config/config.h"
#include "qlora/model/fused_ops.h"
#include "qlora/model/decoder.h"

namespace qlora::lora {
namespace {

}  // namespace

// ---------------------------------------------------------------- settings

double LoraSettings::scaling() const {
  return rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r);
}

LoraSettings settings_from_config(const LoraConfig& c) {
  LoraSettings s;
  s.r = c.r;
  s.alpha = c.alpha;
  s.dropout = c.dropout;
  s.rslora = c.rslora;
  s.target_modules = c.target_modules;
  return s;
}

// Note [LoRA target matching]
// PEFT's rules (tuners_utils.check_target_module_exists): a string
// target_modules is a regular expression that must match the whole module
// name; a list matches a module whose name equals an entry or ends with
// "." + entry. "all-linear" expands to every linear layer except the output
// layer; in a Llama decoder those are the seven projections of each layer.
std::vector<std::string> select_targets(const std::vector<std::string>& names, const LoraSettings& s) {
  std::vector<std::string> out;
  const bool all_linear = s.target_regex.empty() && s.target_modules.size() == 1 && s.target_modules[0] == "all-linear";
  std::regex re;
  if (!s.target_regex.empty()) {
    try {
      re = std::regex(s.target_regex, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      throw InputError("LoRA target_modules: \"" + s.target_regex + "\" is not a valid regular expression (" +
                       e.what() + ")");
    }
  }
  for (const auto& name : names) {
    bool hit = false;
    if (all_linear) {
      hit = true;
    } else if (!s.target_regex.empty()) {
      hit = std::regex_match(name, re);
    } else {
      for (const auto& t : s.target_modules) hit = hit || name == t || ends_with(name, "." + t);
    }
    if (hit) out.push_back(name);
  }
  if (out.empty()) {
    std::ostringstream os;
    os << "LoRA target_modules ";
    if (!s.target_regex.empty()) {
      os << "\"" << s.target_regex << "\"";
    } else {
      os << "[";
      for (size_t i = 0; i < s.target_modules.size(); ++i) os << (i ? ", " : "") << s.target_modules[i];
      os << "]";
    }
    os << " match no projection of the model; its projections are named like ";
    for (size_t i = 0; i < names.size() && i < 7; ++i) os << (i ? ", " : "") << names[i];
    os << ". Use short names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) or \"all-linear\"";
    throw InputError(os.str());
  }
  return out;
}

// ---------------------------------------------------------------- one layer

LoraLinear::LoraLinear(std::shared_ptr<model::FrozenLinear> base, int64_t r, double scaling, double dropout,
                       c10::Device device)
    : base_(std::move(base)), scaling_(scaling), dropout_(dropout) {
  TORCH_CHECK(base_, "LoraLinear: base layer is null");
  TORCH_CHECK(r > 0, "LoraLinear: r must be positive, got ", r);
  TORCH_CHECK(dropout >= 0 && dropout < 1, "LoraLinear: dropout must be in [0, 1), got ", dropout);
  at::NoGradGuard no_grad;
  // Initialized on the CPU from the default generator, then moved, so a seed
  // gives the same adapter on every device (and PEFT's values for the same seed
  // and creation order).
  at::Tensor a = at::empty({r, base_->in_features()}, at::kFloat);
  torch::nn::init::kaiming_uniform_(a, std::sqrt(5.0));
  a_ = a.to(device).requires_grad_(true);
  b_ = at::zeros({base_->out_features(), r}, at::TensorOptions().dtype(at::kFloat).device(device))
           .requires_grad_(true);
}

at::Tensor LoraLinear::forward(const at::Tensor& x) const {
  at::Tensor y = base_->forward(x);
  // On a GPU our dropout kernel (model::lora_dropout, Note [LoRA dropout kernel]), which the
  // fused layer draws the same masks from; torch's dropout on the CPU.
  at::Tensor xd = x;
  if (training_ && dropout_ > 0)
    xd = x.is_cuda() ? model::lora_dropout_autograd(x, dropout_) : at::dropout(x, dropout_, /*train=*/true);
  at::Tensor update = at::linear(at::linear(xd, a_.to(x.scalar_type())), b_.to(x.scalar_type()));  // [..., out]
  return y + update * scaling_;
}

at::Tensor LoraLinear::merged_weight(at::ScalarType dtype) const {
  at::NoGradGuard no_grad;
  at::Tensor delta = at::matmul(b_, a_) * scaling_;  // [out, in] fp32
  return (base_->dense_weight(at::kFloat) + delta).to(dtype);
}

// ---------------------------------------------------------------- a whole model

std::string peft_key(const std::string& module_name, char which) {
  return "base_model.model." + module_name + (which == 'A' ? ".lora_A.weight" : ".lora_B.weight");
}

LoraAdapter LoraAdapter::attach(model::DecoderModel& model, const LoraSettings& settings) {
  if (settings.r <= 0) throw InputError("LoRA r must be a positive integer, got " + std::to_string(settings.r));
  if (settings.dropout < 0 || settings.dropout >= 1)
    throw InputError("LoRA dropout must be in [0, 1), got " + std::to_string(settings.dropout));
  LoraAdapter adapter;
  adapter.settings_ = settings;
  adapter.names_ = select_targets(model.linear_names(), settings);
  for (const auto& name : adapter.names_) {
    auto base = std::dynamic_pointer_cast<model::FrozenLinear>(model.linear(name));
    if (!base)
      throw InputError("LoRA: projection " + name + " already carries an adapter; attach one adapter per model");
    auto layer = std::make_shared<LoraLinear>(base, settings.r, settings.scaling(), settings.dropout, model.device());
    model.set_linear(name, layer);
    adapter.layers_.push_back(std::move(layer));
  }
  return adapter;
}

std::vector<at::Tensor> LoraAdapter::parameters() const {
  std::vector<at::Tensor> out;
  for (const auto& l : layers_) {
    out.push_back(l->lora_a());
    out.push_back(l->lora_b());
  }
  return out;
}

std::vector<std::pair<std::string, at::Tensor>> LoraAdapter::named_parameters() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (size_t i = 0; i < layers_.size(); ++i) {
    out.emplace_back(peft_key(names_[i], 'A'), layers_[i]->lora_a());
    out.emplace_back(peft_key(names_[i], 'B'), layers_[i]->lora_b());
  }
  return out;
}

void LoraAdapter::load_state(const std::map<std::string, at::Tensor>& tensors, const std::string& origin) {
  std::vector<std::string> problems;
  std::set<std::string> used;
  for (const auto& [key, param] : named_parameters()) {
    auto it = tensors.find(key);
    if (it == tensors.end()) {
      problems.push_back("missing " + key + " " + shape_text(param.sizes()));
      continue;
    }
    used.insert(key);
    if (it->second.sizes() != param.sizes()) {
      problems.push_back(key + " is " + shape_text(it->second.sizes()) + ", expected " + shape_text(param.sizes()) +
                         " (r " + std::to_string(settings_.r) + ")");
    } else if (!it->second.is_floating_point()) {
      problems.push_back(key + " is not a floating-point tensor");
    }
  }
  for (const auto& kv : tensors)
    if (!used.count(kv.first)) problems.push_back("unexpected " + kv.first);
  if (!problems.empty()) {
    std::ostringstream os;
    os << origin << ": the adapter weights do not match its adapter_config.json and this model: ";
    for (size_t i = 0; i < problems.size() && i < 12; ++i) os << (i ? "; " : "") << problems[i];
    if (problems.size() > 12) os << "; ... (" << problems.size() - 12 << " more)";
    throw InputError(os.str());
  }
  at::NoGradGuard no_grad;
  for (auto& [key, param] : named_parameters()) param.copy_(tensors.at(key).to(param.device(), at::kFloat));
}

void LoraAdapter::set_training(bool training) {
  for (auto& l : layers_) l->set_training(training);
}

}  // namespace qlora::lora
