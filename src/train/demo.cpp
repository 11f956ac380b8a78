#include "qlora/train/demo.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "qlora/common/text.h"
#include "qlora/data/demo_tokenizer.h"
#include "qlora/io/torch_io.h"
#include "qlora/model/decoder.h"
#include "qlora/model/family.h"

namespace qlora::train {
namespace {

using json = nlohmann::ordered_json;
namespace fs = std::filesystem;

}  // namespace

DecoderConfig demo_model_config(int64_t vocab_size) {
  DecoderConfig c;
  c.name = "qlora-demo-tiny";
  c.model_type = "llama";
  c.vocab_size = vocab_size;
  c.hidden_size = 256;
  c.intermediate_size = 688;
  c.num_hidden_layers = 4;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 4;
  c.head_dim = 32;
  c.max_position_embeddings = 1024;
  c.tie_word_embeddings = false;
  c.rope_theta = 10000.0;
  c.rms_norm_eps = 1e-5;
  c.torch_dtype = "float32";
  return c;
}

namespace {
constexpr double kInitStd = 0.02;  // transformers' initializer_range default

// As transformers initializes them: norm weights (the layer norms, Qwen3's q/k norms, the final
// norm) are ones, biases zeros, the rest N(0, kInitStd). Ones and zeros draw nothing from `gen`,
// so a family's extra tensors leave the draws of the weights they share with Llama unchanged.
at::Tensor random_tensor(const std::string& name, const std::vector<int64_t>& shape, at::Generator& gen,
                         c10::Device device) {
  const bool norm = name.find("layernorm") != std::string::npos || ends_with(name, "_norm.weight") ||
                    name == "model.norm.weight";
  if (norm) return at::ones(shape, at::TensorOptions().device(device));
  if (ends_with(name, ".bias")) return at::zeros(shape, at::TensorOptions().device(device));
  return at::normal(0.0, kInitStd, shape, gen, at::TensorOptions().device(device));
}
}  // namespace

model::WeightSource random_llama_weights(const DecoderConfig& shape, uint64_t seed, c10::Device device) {
  auto shapes = std::make_shared<std::map<std::string, std::vector<int64_t>>>();
  std::vector<std::string> names;
  for (auto& [name, dims] : model::decoder_weight_shapes(shape)) {
    names.push_back(name);
    (*shapes)[name] = dims;
  }
  auto gen = std::make_shared<at::Generator>(device.is_cuda() ? at::globalContext().defaultGenerator(device).clone()
                                                              : at::make_generator<at::CPUGeneratorImpl>(seed));
  if (device.is_cuda()) gen->set_current_seed(seed);
  return model::WeightSource{"<random weights, seed " + std::to_string(seed) + ">", names,
                             [shapes, gen, device](const std::string& name) {
                               return random_tensor(name, shapes->at(name), *gen, device);
                             }};
}

void write_random_llama(const std::string& dir, const DecoderConfig& c, uint64_t seed) {
  fs::create_directories(dir);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (auto& [name, dims] : model::decoder_weight_shapes(c)) tensors.emplace_back(name, random_tensor(name, dims, gen, c10::kCPU));
  io::save_safetensors((fs::path(dir) / "model.safetensors").string(), tensors, {{"format", "pt"}});
  write_llama_config(dir, c);
}

namespace {

// A DecoderConfig whose pieces its family's config class has no key for.
[[noreturn]] void cannot_write(const DecoderConfig& c, const std::string& what) {
  throw std::invalid_argument("write_llama_config: " + (c.name.empty() ? std::string("the model") : c.name) + " (" +
                              c.model_type + ") " + what + ", which a " + c.model_type + " config.json cannot say");
}

// The one window every sliding layer has (0: none slides); throws when the layers differ.
int64_t uniform_window(const DecoderConfig& c) {
  const int64_t w = c.min_window();
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    if (c.window_of(l) != 0 && c.window_of(l) != w) cannot_write(c, "has sliding windows of different sizes");
  return w;
}

// config.json's rope_scaling for c.rope (null for the default RoPE).
json rope_scaling(const DecoderConfig& c) {
  const RopeScaling& r = c.rope;
  switch (r.type) {
    case RopeType::kDefault: return nullptr;
    case RopeType::kLinear: return {{"rope_type", "linear"}, {"factor", r.factor}};
    case RopeType::kDynamic: return {{"rope_type", "dynamic"}, {"factor", r.factor}};
    case RopeType::kLlama3:
      return {{"rope_type", "llama3"},
              {"factor", r.factor},
              {"low_freq_factor", r.low_freq_factor},
              {"high_freq_factor", r.high_freq_factor},
              {"original_max_position_embeddings", r.original_max_position_embeddings}};
    case RopeType::kYarn:
      return {{"rope_type", "yarn"},
              {"factor", r.factor},
              {"original_max_position_embeddings", r.original_max_position_embeddings},
              {"beta_fast", r.beta_fast},
              {"beta_slow", r.beta_slow},
              {"truncate", r.truncate},
              {"attention_factor", r.attention_factor}};
    case RopeType::kLongrope:  // with Phi-3's top-level original_max_position_embeddings (write_family_keys)
      return {{"rope_type", "longrope"}, {"short_factor", r.short_factor}, {"long_factor", r.long_factor}};
  }
  return nullptr;
}

// The keys through which the family's config class says what c.pieces and c.layer_window say
// (read back by read_family_keys in src/model/family.cpp).
void write_family_keys(const DecoderConfig& c, const std::string& type, json& j) {
  const LayerPieces& p = c.pieces;
  if (p.qk_norm != (type == "qwen3" || type == "gemma3_text"))
    cannot_write(c, p.qk_norm ? "has q/k norms" : "has no q/k norms");
  const int64_t window = uniform_window(c);
  const auto qwen_windows = [&] {
    j["use_sliding_window"] = window > 0;
    if (window == 0) return;
    j["sliding_window"] = window;
    json types = json::array();
    for (int64_t l = 0; l < c.num_hidden_layers; ++l)
      types.push_back(c.window_of(l) > 0 ? "sliding_attention" : "full_attention");
    j["layer_types"] = types;
  };
  if (type == "llama" || type == "qwen3") {
    // attention_bias: q, k, v and o together.
    if (p.qkv_bias != p.o_bias) cannot_write(c, "has biases on q, k, v but not on o (or the reverse)");
    j["attention_bias"] = p.qkv_bias;
  }
  if (type == "llama") {
    j["mlp_bias"] = p.mlp_bias;
    if (window > 0) cannot_write(c, "has sliding windows");
  } else if (type == "qwen3") {
    if (p.mlp_bias) cannot_write(c, "has MLP biases");
    qwen_windows();
  } else if (type == "qwen2") {
    // Qwen2Attention: q, k, v always with bias, o and the MLP without.
    if (!p.qkv_bias || p.o_bias || p.mlp_bias) cannot_write(c, "has biases other than on q, k, v");
    qwen_windows();
  } else if (type == "gemma2" || type == "gemma3_text") {
    // Gemma2Config / Gemma3TextConfig: the pieces follow from model_type; the numbers are keys.
    json types = json::array();
    for (int64_t l = 0; l < c.num_hidden_layers; ++l)
      types.push_back(c.window_of(l) > 0 ? "sliding_attention" : "full_attention");
    j["layer_types"] = types;
    j["sliding_window"] = window > 0 ? window : 4096;
    j["hidden_activation"] = "gelu_pytorch_tanh";
    j["query_pre_attn_scalar"] = c.query_pre_attn_scalar;
    j["attn_logit_softcapping"] = c.attn_logit_softcapping > 0 ? json(c.attn_logit_softcapping) : json(nullptr);
    j["final_logit_softcapping"] = c.final_logit_softcapping > 0 ? json(c.final_logit_softcapping) : json(nullptr);
    if (type == "gemma3_text") j["rope_local_base_freq"] = c.rope_local_theta;
  } else if (type == "phi3") {
    j["sliding_window"] = window > 0 ? json(window) : json(nullptr);
    j["partial_rotary_factor"] = c.partial_rotary_factor;
    if (c.rope.type == RopeType::kLongrope)
      j["original_max_position_embeddings"] = c.rope.original_max_position_embeddings;
  } else if (type == "mistral") {
    if (p.qkv_bias || p.o_bias || p.mlp_bias) cannot_write(c, "has projection biases");
    // MistralConfig reads an absent sliding_window as 4096: no window is an explicit null.
    j["sliding_window"] = window > 0 ? json(window) : json(nullptr);
    for (int64_t l = 0; l < c.num_hidden_layers; ++l)
      if (c.window_of(l) == 0 && window > 0) cannot_write(c, "has sliding windows in some layers only");
  }
}

}  // namespace

void write_config_with_demo_tokenizer(const std::string& dir, const DecoderConfig& shape) {
  write_llama_config(dir, shape);
  const int64_t vocab = data::write_demo_tokenizer(dir);
  const std::string path = (fs::path(dir) / "config.json").string();
  std::ifstream in(path);
  json config = json::parse(in);
  const auto first_special = vocab - static_cast<int64_t>(data::demo_special_tokens().size());
  config["bos_token_id"] = first_special;      // <|begin_of_text|>
  config["eos_token_id"] = first_special + 1;  // <|end_of_text|>
  write_text_file(path, config.dump(2) + "\n");
}

void write_llama_config(const std::string& dir, const DecoderConfig& shape) {
  DecoderConfig c = shape;
  if (c.model_type.empty()) c.model_type = "llama";
  const std::string& type = c.model_type;
  const Family* family = find_family(type);
  if (family == nullptr)
    throw std::invalid_argument("write_llama_config: model_type \"" + type + "\" is not a family qlora trains (" +
                                supported_families_text() + ")");
  fs::create_directories(dir);
  json config = {{"architectures", {family->architecture}},
                 {"model_type", type},
                 {"vocab_size", c.vocab_size},
                 {"hidden_size", c.hidden_size},
                 {"intermediate_size", c.intermediate_size},
                 {"num_hidden_layers", c.num_hidden_layers},
                 {"num_attention_heads", c.num_attention_heads},
                 {"num_key_value_heads", c.num_key_value_heads},
                 {"head_dim", c.head_dim},
                 {"hidden_act", "silu"},
                 {"max_position_embeddings", c.max_position_embeddings},
                 {"initializer_range", kInitStd},
                 {"rms_norm_eps", c.rms_norm_eps},
                 {"rope_theta", c.rope_theta}};
  if (const json scaling = rope_scaling(c); !scaling.is_null()) config["rope_scaling"] = scaling;
  write_family_keys(c, type, config);
  config["tie_word_embeddings"] = c.tie_word_embeddings;
  config["bos_token_id"] = c.vocab_size - static_cast<int64_t>(data::demo_special_tokens().size());
  config["eos_token_id"] = c.vocab_size - static_cast<int64_t>(data::demo_special_tokens().size()) + 1;
  config["torch_dtype"] = "float32";
  write_text_file((fs::path(dir) / "config.json").string(), config.dump(2) + "\n");
}

int64_t write_demo_model(const std::string& dir, const std::string& train_jsonl) {
  const auto merges = data::learn_merges(data::rendered_texts(train_jsonl), kDemoMerges);
  const int64_t vocab = data::write_demo_tokenizer(dir, merges);
  write_random_llama(dir, demo_model_config(vocab), kDemoModelSeed);
  return vocab;
}

// Note [demo settings]
// The base is random and frozen, so the LoRA adapter must learn the task from
// nothing in well under a minute on two CPU cores. The shipped task (is a
// number even or odd, data/demo) is decided by one feature of the prompt, its
// last digit, so what is learned on the training numbers holds for unseen ones.
// Measured on 2026-12-07 on 2 CPU cores (qlora train on the demo's run.yaml
// with --set train.seed=1|2|3, exact match over all 300 held-out prompts):
// with these settings every run reached 300/300 by step 150 of 200, for three
// training seeds on each of six setups (this base, seed 5, on the shipped
// data; seed 1234's base on the shipped data and on the data drawn with two
// other seeds; two more random bases); at step 100, 14 of the 18 runs were at
// 300/300 and the rest at 138-289. ~17 s of training a run when the machine
// is otherwise idle. With max_steps 100 the three seeds on seed 1234's base
// reached 218-273/300: too little margin. The held-out loss stays near 1 at
// 100% accuracy: the frozen final norm and random lm_head bound how sharp the
// logits can get.
// kDemoModelSeed is 5 rather than any seed because the untrained answer is
// shown: seed 5's base babbles ("elelel"), some bases end every answer at once
// and show an empty string.
Config demo_config(const std::string& work_dir, const std::string& data_dir, int64_t steps) {
  Config c = default_config();
  c.source = "<qlora demo>";
  c.model.path = (fs::path(work_dir) / "model").string();
  c.lora.r = 16;
  c.lora.alpha = 32;
  c.lora.dropout = 0.0;
  c.lora.target_modules = {"all-linear"};
  c.data.path = (fs::path(data_dir) / "train.alpaca.jsonl").string();
  c.data.eval_path = (fs::path(data_dir) / "eval.alpaca.jsonl").string();
  c.data.max_seq_length = 64;  // the demo's prompts are under 40 tokens
  c.train.micro_batch_size = 8;
  c.train.gradient_accumulation_steps = 1;
  c.train.max_steps = steps;
  c.train.learning_rate = 2e-3;
  c.train.lr_scheduler = LrSchedule::kCosine;
  c.train.warmup_steps = std::min<int64_t>(10, steps / 10);
  c.train.max_grad_norm = 1.0;
  c.train.precision = Precision::kAuto;
  c.train.gradient_checkpointing = false;
  c.train.optimizer = OptimizerKind::kPagedAdamW8bit;
  c.train.eval_steps = std::max<int64_t>(1, steps / 2);  // half-way, where the demo stops and resumes
  c.output.dir = (fs::path(work_dir) / "out").string();
  // Every fifth of the run: never at the half-way stop (for steps a multiple
  // of 10), which writes its own checkpoint.
  c.output.save_steps = std::max<int64_t>(1, steps / 5);
  c.output.keep_last = 2;
  c.output.logging_steps = std::max<int64_t>(1, steps / 10);
  return c;
}

}  // namespace qlora::train
