#include "qlora/train/demo.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "data/bpe.h"
#include "qlora/common/errors.h"
#include "qlora/data/format.h"
#include "qlora/io/torch_io.h"
#include "qlora/model/llama.h"

namespace qlora::train {
namespace {

using json = nlohmann::ordered_json;
namespace fs = std::filesystem;

// Llama 3's special tokens, after the 256 byte tokens.
const std::vector<std::string>& special_tokens() {
  static const std::vector<std::string> t = {"<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                             "<|end_header_id|>", "<|eot_id|>"};
  return t;
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.close();
  if (!out) throw std::runtime_error("cannot write " + path.string());
}

}  // namespace

LlamaConfig demo_model_config(int64_t vocab_size) {
  LlamaConfig c;
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

std::vector<std::string> rendered_texts(const std::string& jsonl_path) {
  std::ifstream in(jsonl_path);
  if (!in) throw InputError("cannot read " + jsonl_path);
  std::vector<std::string> texts;
  std::string line;
  int64_t n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    try {
      std::string text;
      for (const auto& seg : data::render_line(line, DataFormat::kAuto, ChatTemplate::kLlama3).segments) text += seg.text;
      texts.push_back(std::move(text));
    } catch (const std::exception& e) {
      throw InputError(jsonl_path + ":" + std::to_string(n) + ": " + e.what());
    }
  }
  return texts;
}

std::vector<std::pair<std::string, std::string>> learn_merges(const std::vector<std::string>& texts, int max_merges) {
  const data::bpe::SplitPattern pattern = *data::bpe::find_split_pattern(data::bpe::kQwen2Pattern);
  // Each distinct piece once, as its current symbols, with its count.
  std::map<std::string, int64_t> counts;
  for (const auto& t : texts)
    for (const auto& [b, e] : data::bpe::split_pieces(pattern, t)) ++counts[t.substr(b, e - b)];
  std::vector<std::pair<std::vector<std::string>, int64_t>> words;
  for (const auto& [piece, n] : counts) {
    std::vector<std::string> symbols;
    for (char c : piece) symbols.emplace_back(1, c);
    words.emplace_back(std::move(symbols), n);
  }
  std::vector<std::pair<std::string, std::string>> merges;
  while (static_cast<int>(merges.size()) < max_merges) {
    std::map<std::pair<std::string, std::string>, int64_t> pairs;
    for (const auto& [symbols, n] : words)
      for (size_t i = 0; i + 1 < symbols.size(); ++i) pairs[{symbols[i], symbols[i + 1]}] += n;
    auto best = pairs.end();
    for (auto it = pairs.begin(); it != pairs.end(); ++it)
      if (best == pairs.end() || it->second > best->second) best = it;  // map order breaks ties
    if (best == pairs.end() || best->second < 2) break;
    const auto [a, b] = best->first;
    merges.emplace_back(a, b);
    for (auto& [symbols, n] : words) {
      std::vector<std::string> next;
      for (size_t i = 0; i < symbols.size(); ++i) {
        if (i + 1 < symbols.size() && symbols[i] == a && symbols[i + 1] == b) {
          next.push_back(a + b);
          ++i;
        } else {
          next.push_back(symbols[i]);
        }
      }
      symbols = std::move(next);
    }
  }
  return merges;
}

int64_t write_demo_tokenizer(const std::string& dir, const std::vector<std::pair<std::string, std::string>>& merges) {
  fs::create_directories(dir);
  const auto& bytes = data::bpe::byte_to_unicode();
  const auto visible = [&bytes](const std::string& raw) {
    std::string out;
    for (unsigned char c : raw) out += bytes[c];
    return out;
  };
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[bytes[static_cast<size_t>(b)]] = b;
  json merge_list = json::array();
  int next_id = 256;
  for (const auto& [a, b] : merges) {
    vocab[visible(a + b)] = next_id++;
    merge_list.push_back(visible(a) + " " + visible(b));
  }
  const int first_special = next_id;
  json added = json::array();
  for (size_t i = 0; i < special_tokens().size(); ++i)
    added.push_back({{"id", first_special + static_cast<int>(i)},
                     {"content", special_tokens()[i]},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", true}});
  const json tok = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         json::array({{{"type", "Split"},
                       {"pattern", {{"Regex", data::bpe::kQwen2Pattern}}},
                       {"behavior", "Isolated"},
                       {"invert", false}},
                      {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", false}}})}}},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single", json::array({{{"SpecialToken", {{"id", "<|begin_of_text|>"}, {"type_id", 0}}}},
                                {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
        {"pair", json::array({{{"SpecialToken", {{"id", "<|begin_of_text|>"}, {"type_id", 0}}}},
                              {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                              {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}})},
        {"special_tokens",
         {{"<|begin_of_text|>", {{"id", "<|begin_of_text|>"}, {"ids", {first_special}}, {"tokens", {"<|begin_of_text|>"}}}}}}}},
      {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", nullptr},
        {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr},
        {"fuse_unk", false},
        {"byte_fallback", false},
        {"ignore_merges", false},
        {"vocab", vocab},
        {"merges", merge_list}}}};
  write_text(fs::path(dir) / "tokenizer.json", tok.dump(1) + "\n");
  const json cfg = {{"bos_token", "<|begin_of_text|>"},
                    {"eos_token", "<|end_of_text|>"},
                    {"add_bos_token", true},
                    {"clean_up_tokenization_spaces", false},
                    {"model_max_length", 1024},
                    {"tokenizer_class", "PreTrainedTokenizerFast"}};
  write_text(fs::path(dir) / "tokenizer_config.json", cfg.dump(1) + "\n");
  const json special = {{"bos_token", "<|begin_of_text|>"}, {"eos_token", "<|end_of_text|>"}};
  write_text(fs::path(dir) / "special_tokens_map.json", special.dump(1) + "\n");
  return first_special + static_cast<int64_t>(special_tokens().size());
}

std::vector<std::pair<std::string, std::vector<int64_t>>> llama_tensor_shapes(const LlamaConfig& c) {
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

model::WeightSource random_llama_weights(const LlamaConfig& shape, uint64_t seed, c10::Device device) {
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

void write_random_llama(const std::string& dir, const LlamaConfig& c, uint64_t seed) {
  fs::create_directories(dir);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (auto& [name, dims] : llama_tensor_shapes(c)) tensors.emplace_back(name, random_tensor(name, dims, gen, c10::kCPU));
  io::save_safetensors((fs::path(dir) / "model.safetensors").string(), tensors, {{"format", "pt"}});
  write_llama_config(dir, c);
}

void write_llama_config(const std::string& dir, const LlamaConfig& c) {
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
                       {"bos_token_id", c.vocab_size - static_cast<int64_t>(special_tokens().size())},
                       {"eos_token_id", c.vocab_size - static_cast<int64_t>(special_tokens().size()) + 1},
                       {"torch_dtype", "float32"}};
  write_text(fs::path(dir) / "config.json", config.dump(2) + "\n");
}

Config demo_config(const std::string& work_dir, const std::string& data_dir) {
  Config c = default_config();
  c.source = "<qlora demo>";
  c.model.path = (fs::path(work_dir) / "model").string();
  c.lora.r = 16;
  c.lora.alpha = 32;
  c.lora.dropout = 0.0;
  c.lora.target_modules = {"all-linear"};
  c.data.path = (fs::path(data_dir) / "train.alpaca.jsonl").string();
  c.data.eval_path = (fs::path(data_dir) / "eval.alpaca.jsonl").string();
  c.data.max_seq_length = 320;
  c.train.micro_batch_size = 8;
  c.train.gradient_accumulation_steps = 1;
  c.train.max_steps = 200;
  c.train.learning_rate = 2e-3;
  c.train.lr_scheduler = LrSchedule::kCosine;
  c.train.warmup_steps = 10;
  c.train.max_grad_norm = 1.0;
  c.train.precision = Precision::kAuto;
  c.train.gradient_checkpointing = false;
  c.train.optimizer = OptimizerKind::kPagedAdamW8bit;
  c.train.eval_steps = 100;
  c.output.dir = (fs::path(work_dir) / "out").string();
  c.output.save_steps = 50;
  c.output.keep_last = 2;
  c.output.logging_steps = 10;
  return c;
}

}  // namespace qlora::train
