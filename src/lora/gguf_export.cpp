#include "qlora/lora/gguf_export.h"

#include <ATen/ATen.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <regex>

#include "qlora/common/errors.h"
#include "qlora/io/gguf.h"
#include "qlora/io/torch_io.h"
#include "qlora/lora/adapter_io.h"

namespace qlora::lora {
namespace {

namespace fs = std::filesystem;

}  // namespace

std::string gguf_architecture_of(const DecoderConfig& c) {
  static const std::map<std::string, std::string> names = {
      {"llama", "llama"}, {"mistral", "llama"},   {"qwen2", "qwen2"}, {"qwen3", "qwen3"},
      {"gemma2", "gemma2"}, {"gemma3_text", "gemma3"}, {"phi3", "phi3"}};
  const auto it = names.find(c.model_type);
  if (it == names.end()) throw InputError("no llama.cpp architecture is known here for model_type " + c.model_type);
  return it->second;
}

at::Tensor gguf_llama_rope_rows(const at::Tensor& w, int64_t heads) {
  const int64_t rows = w.size(0);
  std::vector<int64_t> grouped = {heads, 2, rows / heads / 2};
  grouped.insert(grouped.end(), w.sizes().begin() + 1, w.sizes().end());
  return w.reshape(grouped).transpose(1, 2).reshape(w.sizes());
}

std::string gguf_tensor_of(const std::string& proj) {
  static const std::map<std::string, std::string> names = {
      {"q_proj", "attn_q"},      {"k_proj", "attn_k"},   {"v_proj", "attn_v"},      {"o_proj", "attn_output"},
      {"gate_proj", "ffn_gate"}, {"up_proj", "ffn_up"},  {"down_proj", "ffn_down"}, {"qkv_proj", "attn_qkv"},
      {"gate_up_proj", "ffn_up"}};
  const auto it = names.find(proj);
  return it == names.end() ? "" : it->second;
}

GgufExport export_adapter_gguf(const std::string& adapter_dir, const DecoderConfig& base, const std::string& out_path) {
  const std::string config_path = (fs::path(adapter_dir) / "adapter_config.json").string();
  const std::string weights_path = (fs::path(adapter_dir) / "adapter_model.safetensors").string();
  const LoraSettings s = read_adapter_config(config_path);
  std::error_code ec;
  if (!fs::exists(weights_path, ec)) throw InputError(weights_path + ": not found; --adapter must name a PEFT adapter directory");
  const auto tensors = io::load_safetensors(weights_path);
  GgufExport r;
  r.architecture = gguf_architecture_of(base);
  const bool llama_rows = r.architecture == "llama";
  // base_model.model.model.layers.N.<self_attn|mlp>.<proj>.lora_<A|B>.weight
  const std::regex key(R"(base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight)");
  std::vector<io::GgufTensor> out;
  for (const auto& [name, t] : tensors) {
    std::smatch m;
    if (!std::regex_match(name, m, key))
      throw InputError(weights_path + ": tensor \"" + name + "\" is not a LoRA weight of a decoder projection; "
                       "only those export to GGUF");
    const std::string proj = m[3], which = m[4];
    const std::string tensor = gguf_tensor_of(proj);
    if (tensor.empty()) throw InputError(weights_path + ": tensor \"" + name + "\": unknown projection " + proj);
    at::Tensor w = t.to(at::kFloat).contiguous();
    const int64_t layer = std::stoll(m[1]);
    if (layer >= base.num_hidden_layers)
      throw InputError(weights_path + ": tensor \"" + name + "\" is for layer " + m[1].str() + "; the base has " +
                       std::to_string(base.num_hidden_layers));
    if (which == "B" && llama_rows && (proj == "q_proj" || proj == "k_proj"))
      w = gguf_llama_rope_rows(w, proj == "q_proj" ? base.num_attention_heads : base.num_key_value_heads).contiguous();
    io::GgufTensor g;
    g.name = "blk." + m[1].str() + "." + tensor + ".weight.lora_" + (which == "A" ? "a" : "b");
    g.shape = {w.size(0), w.size(1)};
    g.data.assign(w.data_ptr<float>(), w.data_ptr<float>() + w.numel());
    out.push_back(std::move(g));
  }
  if (out.empty()) throw InputError(weights_path + ": holds no LoRA weight");
  r.alpha = static_cast<float>(s.rslora ? s.alpha * std::sqrt(static_cast<double>(s.r)) : s.alpha);
  r.tensors = static_cast<int64_t>(out.size());
  io::write_gguf(out_path,
                 {{"general.architecture", r.architecture},
                  {"general.type", std::string("adapter")},
                  {"adapter.type", std::string("lora")},
                  {"adapter.lora.alpha", r.alpha}},
                 out);
  return r;
}

}  // namespace qlora::lora
