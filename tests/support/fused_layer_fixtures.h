// What the fused decoder layer is compared with, shared by its CPU suite (test_fused_layer.cpp)
// and its GPU suite (test_cuda_fused_layer.cpp): the generic reference layer, LoRA B with values,
// the recompute modes each family runs through, the families' tiny models and a Llama with biases.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>

#include "qlora/io/model_dir.h"
#include "qlora/layer/fused_layer.h"
#include "qlora/lora/lora.h"
#include "qlora/model/decoder.h"
#include "qlora/model/decoder_config.h"
#include "qlora/model/family.h"
#include "qlora/train/checkpoint.h"
#include "qlora/train/demo.h"
#include "support/test_support.h"
#include "support/train_fixtures.h"

namespace qlora::testing {

// The fused layer's reference for a recompute mode: without checkpointing (kNothing) the model's
// own layer under autograd, otherwise the generic checkpointed layer.
inline train::LayerForwardFn generic_layer_forward(const model::DecoderModel& m, layer::FusedRecompute what) {
  if (what != layer::FusedRecompute::kNothing) return train::checkpointed_layer_forward(m);
  return [&m](int64_t l, const at::Tensor& h, const std::pair<at::Tensor, at::Tensor>& cs,
              const model::AttentionInputs& a) { return m.layer_forward(l, h, cs, a); };
}

// B is zero at init: N(0, 0.05) values from torch's generator, so that A's gradient is not zero.
inline void give_lora_b_values(const lora::LoraAdapter& adapter) {
  at::NoGradGuard no_grad;
  for (const auto& l : adapter.layers()) l->lora_b().normal_(0.0, 0.05);
}

// The GPU suites' adapter (test_cuda_fused_layer.cpp, test_cuda_offload.cpp): r 8, alpha 16,
// dropout 0.1 on every projection, drawn from seed 2, B with values.
inline lora::LoraAdapter attach_all_linear_lora(model::DecoderModel& m) {
  lora::LoraSettings ls;
  ls.r = 8;
  ls.alpha = 16;
  ls.dropout = 0.1;
  ls.target_modules = {"all-linear"};
  torch::manual_seed(2);
  lora::LoraAdapter adapter = lora::LoraAdapter::attach(m, ls);
  give_lora_b_values(adapter);
  return adapter;
}

// The recompute modes a family's model runs through: full, selective, nothing, the last layer
// kept whole (Note [layers not recomputed]).
struct RecomputeMode {
  const char* name;
  layer::FusedRecompute what;
  int64_t no_recompute_layers;
};
inline constexpr RecomputeMode kRecomputeModes[] = {{"full", layer::FusedRecompute::kFull, 0},
                                                    {"selective", layer::FusedRecompute::kSelective, 0},
                                                    {"nothing", layer::FusedRecompute::kNothing, 0},
                                                    {"last layer whole", layer::FusedRecompute::kFull, 1}};

// tests/data/families/<variant>/ (scripts/golden/families.py) through the io module's ModelDir,
// as the trainer reads a model directory.
struct FamilyDir {
  std::shared_ptr<io::ModelDir> dir;
  DecoderConfig config;
};

inline FamilyDir open_family(const std::string& variant) {
  auto dir = std::make_shared<io::ModelDir>(io::ModelDir::open(source_path("tests/data/families/" + variant)));
  const DecoderConfig config = read_decoder_config(dir->config_path());
  return {dir, config};
}

inline model::WeightSource family_weights(const FamilyDir& f) {
  const std::shared_ptr<io::ModelDir> dir = f.dir;
  return {dir->dir(), dir->tensor_names(), [dir](const std::string& n) { return dir->tensor(n); }};
}

// The small Llama with attention_bias and mlp_bias: a bias on every projection, N(0, 0.5) (the
// golden families' scale; the random weights are N(0, 0.02), so the biases weigh).
inline DecoderConfig biased_llama_shape() {
  DecoderConfig c = small_llama_shape();
  c.pieces.qkv_bias = c.pieces.o_bias = c.pieces.mlp_bias = true;
  return c;
}

inline model::WeightSource biased_llama_weights() {
  const DecoderConfig shape = biased_llama_shape();
  const model::WeightSource random = train::random_llama_weights(shape, 3, c10::kCPU);
  std::map<std::string, at::Tensor> w;
  for (const auto& name : random.names) w[name] = random.get(name);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(17);
  for (int64_t l = 0; l < shape.num_hidden_layers; ++l)
    for (const auto& s : decoder_linear_shapes(shape))
      w[model::linear_module_name(l, s.name) + ".bias"] = at::normal(0.0, 0.5, {s.out_features}, gen);
  return model::weights_from_map(std::move(w), "<biased llama>");
}

}  // namespace qlora::testing
