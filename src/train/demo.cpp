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

std::vector<std::pair<std::string, std::vector<int64_t>>> llama_tensor_shapes(const DecoderConfig& c) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> t;
  const int64_t h = c.hidden_size, q = c.num_attention_heads * c.head_dim, kv = c.num_key_value_heads * c.head_dim;
  t.push_back({"model.embed_tokens.weight", {c.vocab_size, h}});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    t.push_back({p + "input_layernorm.weight", {h}});
    t.push_back({p + "post_attention_layernorm.weight", {h}});
    t.push_back({model::linear_module_name(l, "q_proj") + ".weight", {q, h}});
    t.push_back({model::linear_module_name(l, "k_proj") + ".weight", {kv, h}});
    t.push_back({model::linear_module_name(l, "v_proj") + ".weight", {kv, h}});
    t.push_back({model::linear_module_name(l, "o_proj") + ".weight", {h, q}});
    t.push_back({model::linear_module_name(l, "gate_proj") + ".weight", {c.intermediate_size, h}});
    t.push_back({model::linear_module_name(l, "up_proj") + ".weight", {c.intermediate_size, h}});
    t.push_back({model::linear_module_name(l, "down_proj") + ".weight", {h, c.intermediate_size}});
  }
  t.push_back({"model.norm.weight", {h}});
  if (!c.tie_word_embeddings) t.push_back({"lm_head.weight", {c.vocab_size, h}});
  return t;
}

namespace {
constexpr double kInitStd = 0.02;  // transformers' initializer_range default

// Norm weights are ones (as transformers initializes them), the rest N(0, kInitStd).
at::Tensor random_tensor(const std::string& name, const std::vector<int64_t>& shape, at::Generator& gen,
                         c10::Device device) {
  const bool norm = name.find("layernorm") != std::string::npos || name == "model.norm.weight";
  if (norm) return at::ones(shape, at::TensorOptions().device(device));
  return at::normal(0.0, kInitStd, shape, gen, at::TensorOptions().device(device));
}
}  // namespace

model::WeightSource random_llama_weights(const DecoderConfig& shape, uint64_t seed, c10::Device device) {
  auto shapes = std::make_shared<std::map<std::string, std::vector<int64_t>>>();
  std::vector<std::string> names;
  for (auto& [name, dims] : llama_tensor_shapes(shape)) {
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
  for (auto& [name, dims] : llama_tensor_shapes(c)) tensors.emplace_back(name, random_tensor(name, dims, gen, c10::kCPU));
  io::save_safetensors((fs::path(dir) / "model.safetensors").string(), tensors, {{"format", "pt"}});
  write_llama_config(dir, c);
}

void write_llama_config(const std::string& dir, const DecoderConfig& c) {
  fs::create_directories(dir);
  const json config = {{"architectures", {"LlamaForCausalLM"}},
                       {"model_type", "llama"},
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
                       {"rope_theta", c.rope_theta},
                       {"attention_bias", false},
                       {"mlp_bias", false},
                       {"tie_word_embeddings", c.tie_word_embeddings},
                       {"bos_token_id", c.vocab_size - static_cast<int64_t>(data::demo_special_tokens().size())},
                       {"eos_token_id", c.vocab_size - static_cast<int64_t>(data::demo_special_tokens().size()) + 1},
                       {"torch_dtype", "float32"}};
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
