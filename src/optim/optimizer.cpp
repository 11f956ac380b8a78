// AdamW and 8-bit AdamW over named fp32 parameters; the math lives in adamw_ref.cpp.
#include "qlora/optim/optimizer.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "qlora/common/errors.h"
#include "qlora/common/log.h"
#include "qlora/common/text.h"
#include "qlora/optim/adamw8bit_cuda.h"

namespace qlora::optim {

namespace {

constexpr int kFormatVersion = 1;
// Slack per state buffer in StateStorage::reserve's total (a storage may align each buffer).
constexpr uint64_t kStateAlign = 256;

// State lives where the parameters are: host memory for CPU parameters, the
// device's memory for GPU ones (the paged variant: make_paged_gpu_storage).
std::shared_ptr<StateStorage> make_storage_for(const std::vector<NamedParam>& params) {
  if (params.empty() || params.front().param.is_cpu()) return make_host_storage();
  return make_device_storage(params.front().param.device());
}

// The paged optimizer's state on a GPU: managed memory (Note [paged state in managed memory]
// in state_storage.cpp) where the device supports it, else the GPU's own memory, said once.
// QLORA_PAGED_STATE=device keeps it in the GPU's own memory (an A/B switch for benchmarks).
std::shared_ptr<StateStorage> make_paged_gpu_storage(c10::Device device) {
  const char* env = std::getenv("QLORA_PAGED_STATE");
  const std::string want = env == nullptr ? "managed" : env;
  if (want == "device") return make_device_storage(device);
  if (want != "managed")
    throw InputError("QLORA_PAGED_STATE=" + want + ": expected managed (the default) or device");
  const std::string why = managed_storage_unavailable(device);
  if (why.empty()) return make_managed_storage(device);
  log::warn("paged_adamw_8bit: the optimizer state stays in " + device.str() + "'s own memory (not paged): " + why);
  return make_device_storage(device);
}
constexpr const char* kFormatName = "qlora.optimizer";

void check_params(const std::vector<NamedParam>& params) {
  std::set<std::string> seen;
  for (const auto& p : params) {
    TORCH_CHECK(!p.name.empty(), "optimizer: every parameter needs a name");
    TORCH_CHECK(seen.insert(p.name).second, "optimizer: parameter name '", p.name, "' appears twice");
    TORCH_CHECK(p.param.defined(), "optimizer: parameter '", p.name, "' is undefined");
    TORCH_CHECK(p.param.scalar_type() == at::kFloat, "optimizer: parameter '", p.name,
                "' must be fp32 (the master copy), got ", p.param.scalar_type());
    TORCH_CHECK(p.param.is_contiguous(), "optimizer: parameter '", p.name, "' must be contiguous");
    TORCH_CHECK(p.param.device() == params.front().param.device(), "optimizer: parameter '", p.name, "' is on ",
                p.param.device(), " but '", params.front().name, "' on ", params.front().param.device(),
                "; every parameter must live on one device");
#ifndef QLORA_WITH_CUDA
    TORCH_CHECK(p.param.device().is_cpu(), "optimizer: parameter '", p.name,
                "' is on ", p.param.device(), "; this build's optimizers run on CPU tensors");
#endif
  }
}

// Runs `f` on CPU copies of `tensors` and copies the results back: the exact
// CPU reference for device tensors where no kernel exists (fp32 AdamW, and
// bnb's fp32 path for tensors below min_8bit_size). Costs a round trip of the
// tensors over PCIe per step; LoRA state is small next to the model.
template <class F>
void on_host(const std::vector<at::Tensor*>& tensors, F&& f) {
  at::NoGradGuard no_grad;  // the parameters are autograd leaves
  if (tensors.front()->device().is_cpu()) {
    f();
    return;
  }
  std::vector<at::Tensor> device;
  for (at::Tensor* t : tensors) {
    device.push_back(*t);
    *t = t->to(at::kCPU).contiguous();
  }
  f();
  for (size_t i = 0; i < tensors.size(); ++i) {
    device[i].copy_(*tensors[i]);
    *tensors[i] = device[i];
  }
}

// The parameter's gradient as a contiguous fp32 tensor, or undefined when it has none.
at::Tensor grad_of(const NamedParam& p) {
  at::Tensor g = p.param.grad();
  if (!g.defined()) return g;
  TORCH_CHECK(g.scalar_type() == at::kFloat, "optimizer: gradient of '", p.name, "' must be fp32, got ",
              g.scalar_type());
  TORCH_CHECK(g.sizes() == p.param.sizes(), "optimizer: gradient of '", p.name, "' has shape ",
              shape_text(g.sizes()), ", parameter ", shape_text(p.param.sizes()));
  return g.contiguous();
}

// One state tensor of the checkpoint, checked against the buffer it will be copied into.
void load_into(const std::map<std::string, at::Tensor>& saved, std::set<std::string>& used,
               const std::string& name, at::Tensor& dst) {
  auto it = saved.find(name);
  if (it == saved.end())
    throw InputError("optimizer state: tensor '" + name + "' is missing; the checkpoint was written for other "
                     "trainable parameters or another optimizer (train.optimizer, lora.r, lora.target_modules); "
                     "resume with the config that wrote it, or start without --resume");
  const at::Tensor& src = it->second;
  if (src.scalar_type() != dst.scalar_type() || src.sizes() != dst.sizes())
    throw InputError("optimizer state: tensor '" + name + "' is " + std::string(c10::toString(src.scalar_type())) +
                     " " + shape_text(src.sizes()) + ", expected " + c10::toString(dst.scalar_type()) + " " +
                     shape_text(dst.sizes()) + "; the checkpoint does not match these trainable parameters");
  dst.copy_(src);
  used.insert(name);
}

std::map<std::string, at::Tensor> by_name(const OptimizerState& state) {
  std::map<std::string, at::Tensor> m;
  for (const auto& [name, t] : state.tensors) {
    if (!m.emplace(name, t).second) throw InputError("optimizer state: tensor '" + name + "' appears twice");
  }
  return m;
}

void check_all_used(const std::map<std::string, at::Tensor>& saved, const std::set<std::string>& used) {
  for (const auto& [name, t] : saved) {
    if (!used.count(name))
      throw InputError("optimizer state: unexpected tensor '" + name + "'; the checkpoint holds state for a "
                       "parameter this run does not train; resume with the config that wrote it");
  }
}

void sort_by_name(OptimizerState& s) {
  std::sort(s.tensors.begin(), s.tensors.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
}

}  // namespace

Optimizer::Optimizer(std::vector<NamedParam> params) : params_(std::move(params)) { check_params(params_); }

void Optimizer::zero_grad() {
  for (auto& p : params_) p.param.mutable_grad() = at::Tensor();
}

std::string Optimizer::scalars_json() const {
  nlohmann::json j;
  j["format"] = kFormatName;
  j["format_version"] = kFormatVersion;
  j["optimizer"] = kind();
  j["step"] = step_;
  j["block_size"] = kQuantBlock;
  j["min_8bit_size"] = min_8bit_size_;
  return j.dump();
}

void Optimizer::load_scalars(const std::string& text) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    throw InputError(std::string("optimizer state scalars: not valid JSON (") + e.what() + ")");
  }
  auto need = [&](const char* key) -> const nlohmann::json& {
    if (!j.is_object() || !j.contains(key))
      throw InputError(std::string("optimizer state scalars: key '") + key + "' is missing");
    return j.at(key);
  };
  if (need("format") != kFormatName)
    throw InputError("optimizer state scalars: format is " + need("format").dump() + ", expected \"" + kFormatName + "\"");
  if (!need("format_version").is_number_integer() || need("format_version").get<int>() != kFormatVersion)
    throw InputError("optimizer state scalars: format_version " + need("format_version").dump() + ", this build reads " +
                     std::to_string(kFormatVersion) + "; use the qlora version that wrote the checkpoint");
  if (need("optimizer") != kind())
    throw InputError("optimizer state: written by optimizer " + need("optimizer").dump() + ", this run uses \"" + kind() +
                     "\"; set train.optimizer to match, or start without --resume");
  if (!need("step").is_number_integer() || need("step").get<int64_t>() < 0)
    throw InputError("optimizer state scalars: step must be an integer >= 0, got " + need("step").dump());
  if (need("min_8bit_size") != min_8bit_size_ || need("block_size") != kQuantBlock)
    throw InputError("optimizer state scalars: block_size/min_8bit_size " + need("block_size").dump() + "/" +
                     need("min_8bit_size").dump() + " differ from this build's " + std::to_string(kQuantBlock) + "/" +
                     std::to_string(min_8bit_size_));
  step_ = need("step").get<int64_t>();
}

// ---------------------------------------------------------------- AdamW (fp32)

namespace {

class AdamW final : public Optimizer {
 public:
  AdamW(std::vector<NamedParam> params, const AdamWOptions& o) : Optimizer(std::move(params)), opt_(o) {
    auto storage = make_storage_for(params_);
    for (const auto& p : params_) {
      exp_avg_.push_back(storage->allocate(p.param.sizes().vec(), at::kFloat));
      exp_avg_sq_.push_back(storage->allocate(p.param.sizes().vec(), at::kFloat));
    }
  }

  void step(double lr) override {
    ++step_;
    const AdamWHyper h{lr, opt_.beta1, opt_.beta2, opt_.eps, opt_.weight_decay};
    for (size_t i = 0; i < params_.size(); ++i) {
      at::Tensor g = grad_of(params_[i]);
      if (!g.defined()) continue;
      at::Tensor p = params_[i].param;
      on_host({&p, &g, &exp_avg_[i], &exp_avg_sq_[i]}, [&] {
        adamw_step(p.data_ptr<float>(), g.const_data_ptr<float>(), exp_avg_[i].data_ptr<float>(),
                   exp_avg_sq_[i].data_ptr<float>(), p.numel(), step_, h);
      });
    }
  }

  std::string kind() const override { return "adamw"; }

  OptimizerState state() const override {
    OptimizerState s;
    for (size_t i = 0; i < params_.size(); ++i) {
      s.tensors.emplace_back(params_[i].name + ".exp_avg", exp_avg_[i].clone());
      s.tensors.emplace_back(params_[i].name + ".exp_avg_sq", exp_avg_sq_[i].clone());
    }
    sort_by_name(s);
    s.scalars_json = scalars_json();
    return s;
  }

  void load_state(const OptimizerState& state) override {
    load_scalars(state.scalars_json);
    const auto saved = by_name(state);
    std::set<std::string> used;
    for (size_t i = 0; i < params_.size(); ++i) {
      load_into(saved, used, params_[i].name + ".exp_avg", exp_avg_[i]);
      load_into(saved, used, params_[i].name + ".exp_avg_sq", exp_avg_sq_[i]);
    }
    check_all_used(saved, used);
  }

  uint64_t state_bytes() const override {
    uint64_t b = 0;
    for (size_t i = 0; i < params_.size(); ++i) b += exp_avg_[i].nbytes() + exp_avg_sq_[i].nbytes();
    return b;
  }

 private:
  AdamWOptions opt_;
  std::vector<at::Tensor> exp_avg_, exp_avg_sq_;
};

// ---------------------------------------------------------------- AdamW 8-bit

class AdamW8bit final : public Optimizer {
 public:
  AdamW8bit(std::vector<NamedParam> params, const AdamWOptions& o, std::shared_ptr<StateStorage> storage,
            std::string kind)
      : Optimizer(std::move(params)), opt_(o), storage_(std::move(storage)), kind_(std::move(kind)) {
    TORCH_CHECK(o.min_8bit_size >= 1, "adamw8bit: min_8bit_size must be >= 1, got ", o.min_8bit_size);
    min_8bit_size_ = o.min_8bit_size;
    if (!storage_) storage_ = make_storage_for(params_);
    uint64_t total = 0;  // what the loop below asks for, slots rounded as a storage may round them
    for (const auto& p : params_) {
      const uint64_t n = static_cast<uint64_t>(p.param.numel());
      total += p.param.numel() >= min_8bit_size_ ? 2 * n + 8 * static_cast<uint64_t>(quant_blocks(p.param.numel())) + 4 * kStateAlign
                                                : 8 * n + 2 * kStateAlign;
    }
    storage_->reserve(total);
    for (const auto& p : params_) {
      State s;
      const auto shape = p.param.sizes().vec();
      s.quantized = p.param.numel() >= min_8bit_size_;
      const at::ScalarType moment = s.quantized ? at::kByte : at::kFloat;
      s.m = storage_->allocate(shape, moment);
      s.v = storage_->allocate(shape, moment);
      if (s.quantized) {
        s.absmax_m = storage_->allocate({quant_blocks(p.param.numel())}, at::kFloat);
        s.absmax_v = storage_->allocate({quant_blocks(p.param.numel())}, at::kFloat);
      }
      state_.push_back(std::move(s));
    }
  }

  void step(double lr) override {
    at::NoGradGuard no_grad;
    ++step_;
    storage_->prefetch_to_device();
    const AdamWHyper h{lr, opt_.beta1, opt_.beta2, opt_.eps, opt_.weight_decay};
    // The fused kernel, bit for bit the reference, for every quantized CUDA parameter in a few
    // multi-tensor launches (Note [AdamW8bit multi-tensor launch]); the handles live until then.
    // (A CPU-only build has no CUDA parameters: check_params refuses them.)
    std::vector<at::Tensor> cuda_params, cuda_grads;
    std::vector<AdamW8bitOperands> cuda_ops;
    cuda_params.reserve(params_.size());
    cuda_grads.reserve(params_.size());
    for (size_t i = 0; i < params_.size(); ++i) {
      at::Tensor g = grad_of(params_[i]);
      if (!g.defined()) continue;
      State& s = state_[i];
      at::Tensor p = params_[i].param;
      const int64_t n = p.numel();
      if (s.quantized && p.is_cuda()) {
        cuda_params.push_back(p);
        cuda_grads.push_back(g);
        cuda_ops.push_back({&cuda_params.back(), &cuda_grads.back(), &s.m, &s.v, &s.absmax_m, &s.absmax_v});
        continue;
      }
      if (s.quantized) {
        on_host({&p, &g, &s.m, &s.v, &s.absmax_m, &s.absmax_v}, [&] {
          adamw8bit_block_step(p.data_ptr<float>(), g.const_data_ptr<float>(), s.m.data_ptr<uint8_t>(),
                               s.v.data_ptr<uint8_t>(), s.absmax_m.data_ptr<float>(), s.absmax_v.data_ptr<float>(), n,
                               step_, h);
        });
      } else {
        on_host({&p, &g, &s.m, &s.v}, [&] {
          adamw32_bnb_step(p.data_ptr<float>(), g.const_data_ptr<float>(), s.m.data_ptr<float>(),
                           s.v.data_ptr<float>(), n, step_, h);
        });
      }
    }
    adamw8bit_step_cuda_many(cuda_ops, step_, h);
  }

  std::string kind() const override { return kind_; }

  OptimizerState state() const override {
    OptimizerState out;
    for (size_t i = 0; i < params_.size(); ++i) {
      for (auto& [name, t] : named(i)) out.tensors.emplace_back(name, t->clone());
    }
    sort_by_name(out);
    out.scalars_json = scalars_json();
    return out;
  }

  void load_state(const OptimizerState& state) override {
    load_scalars(state.scalars_json);
    const auto saved = by_name(state);
    std::set<std::string> used;
    for (size_t i = 0; i < params_.size(); ++i) {
      for (auto& [name, t] : named(i)) load_into(saved, used, name, *t);
    }
    check_all_used(saved, used);
  }

  uint64_t state_bytes() const override {
    uint64_t b = 0;
    for (const auto& s : state_) {
      b += s.m.nbytes() + s.v.nbytes();
      if (s.quantized) b += s.absmax_m.nbytes() + s.absmax_v.nbytes();
    }
    return b;
  }

 private:
  struct State {
    bool quantized = false;
    at::Tensor m, v;                  // uint8 codes (quantized) or fp32, param shape
    at::Tensor absmax_m, absmax_v;    // [ceil(n / 256)] fp32, quantized only
  };

  std::vector<std::pair<std::string, at::Tensor*>> named(size_t i) const {
    auto& s = const_cast<State&>(state_[i]);
    const std::string& n = params_[i].name;
    if (!s.quantized) return {{n + ".exp_avg", &s.m}, {n + ".exp_avg_sq", &s.v}};
    return {{n + ".exp_avg.q", &s.m}, {n + ".exp_avg.absmax", &s.absmax_m},
            {n + ".exp_avg_sq.q", &s.v}, {n + ".exp_avg_sq.absmax", &s.absmax_v}};
  }

  AdamWOptions opt_;
  std::shared_ptr<StateStorage> storage_;
  std::string kind_;
  std::vector<State> state_;
};

}  // namespace

std::unique_ptr<Optimizer> make_adamw(std::vector<NamedParam> params, const AdamWOptions& options) {
  return std::make_unique<AdamW>(std::move(params), options);
}

std::unique_ptr<Optimizer> make_adamw8bit(std::vector<NamedParam> params, const AdamWOptions& options,
                                          std::shared_ptr<StateStorage> storage) {
  return std::make_unique<AdamW8bit>(std::move(params), options, std::move(storage), "adamw8bit");
}

std::unique_ptr<Optimizer> make_paged_adamw8bit(std::vector<NamedParam> params, const AdamWOptions& options,
                                                std::shared_ptr<StateStorage> storage) {
  if (!storage) storage = params.empty() || params.front().param.is_cpu()
                              ? make_host_paged_storage()
                              : make_paged_gpu_storage(params.front().param.device());
  return std::make_unique<AdamW8bit>(std::move(params), options, std::move(storage), "paged_adamw8bit");
}

std::unique_ptr<Optimizer> make_optimizer(const TrainConfig& train, std::vector<NamedParam> params) {
  AdamWOptions o;
  o.beta1 = train.adam_beta1;
  o.beta2 = train.adam_beta2;
  o.eps = train.adam_epsilon;
  o.weight_decay = train.weight_decay;
  switch (train.optimizer) {
    case OptimizerKind::kAdamW: return make_adamw(std::move(params), o);
    case OptimizerKind::kAdamW8bit: return make_adamw8bit(std::move(params), o);
    case OptimizerKind::kPagedAdamW8bit: return make_paged_adamw8bit(std::move(params), o);
  }
  throw InputError("train.optimizer: unknown value");
}

}  // namespace qlora::optim
