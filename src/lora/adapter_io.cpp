#include "qlora/lora/adapter_io.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>

#include "qlora/common/errors.h"
#include "qlora/io/torch_io.h"
#include "qlora/model/decoder.h"

namespace qlora::lora {
namespace {

namespace fs = std::filesystem;

void write_text_atomically(const fs::path& path, const std::string& text) {
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw InputError(tmp.string() + ": cannot open for writing");
    out << text;
    out.flush();
    if (!out) throw InputError(tmp.string() + ": write failed (disk full?)");
  }
  fs::rename(tmp, path);
}

}  // namespace

void save_adapter(const LoraAdapter& adapter, const std::string& dir, const std::string& base_model) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw InputError(dir + ": cannot create the adapter directory (" + ec.message() + ")");
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& [key, t] : adapter.named_parameters()) tensors.emplace_back(key, t.detach().to(at::kFloat));
  io::save_safetensors((fs::path(dir) / "adapter_model.safetensors").string(), tensors, {{"format", "pt"}});
  write_text_atomically(fs::path(dir) / "adapter_config.json", adapter_config_json(adapter, base_model));
}

void init_adapter_from(LoraAdapter& adapter, const std::string& dir) {
  const std::string config_path = (fs::path(dir) / "adapter_config.json").string();
  const std::string weights_path = (fs::path(dir) / "adapter_model.safetensors").string();
  const LoraSettings s = read_adapter_config(config_path);
  const LoraSettings& mine = adapter.settings();
  std::vector<std::string> diffs;
  if (s.r != mine.r) diffs.push_back("r " + std::to_string(s.r) + " (the config's lora.r " + std::to_string(mine.r) + ")");
  if (s.alpha != mine.alpha)
    diffs.push_back("lora_alpha " + std::to_string(s.alpha) + " (lora.alpha " + std::to_string(mine.alpha) + ")");
  if (s.rslora != mine.rslora)
    diffs.push_back(std::string("use_rslora ") + (s.rslora ? "true" : "false") + " (lora.rslora " +
                    (mine.rslora ? "true" : "false") + ")");
  std::map<std::string, at::Tensor> tensors;
  std::error_code ec;
  if (!fs::exists(weights_path, ec)) throw InputError(weights_path + ": not found; lora.init_from must name a PEFT adapter directory");
  tensors = io::load_safetensors(weights_path);
  std::vector<std::string> missing;
  for (const auto& [key, t] : adapter.named_parameters())
    if (!tensors.count(key)) missing.push_back(key);
  if (!missing.empty())
    diffs.push_back(std::to_string(missing.size()) + " of the config's LoRA weights are not in it (first: " + missing[0] +
                    "): its target_modules differ from lora.target_modules");
  if (tensors.size() > adapter.named_parameters().size())
    diffs.push_back("it holds " + std::to_string(tensors.size()) + " LoRA weights where the config makes " +
                    std::to_string(adapter.named_parameters().size()) + ": it targets more modules");
  if (!diffs.empty()) {
    std::string list;
    for (const auto& d : diffs) list += (list.empty() ? "" : "; ") + d;
    throw InputError(dir + ": lora.init_from names an adapter that does not match the run's LoRA: " + list +
                     ". Set lora.r, lora.alpha, lora.rslora and lora.target_modules to the adapter's");
  }
  adapter.load_state(tensors, weights_path);
}

LoraAdapter load_adapter(model::DecoderModel& model, const std::string& dir) {
  const std::string config_path = (fs::path(dir) / "adapter_config.json").string();
  const std::string weights_path = (fs::path(dir) / "adapter_model.safetensors").string();
  LoraSettings settings = read_adapter_config(config_path);
  std::error_code ec;
  if (!fs::exists(weights_path, ec)) {
    std::string hint;
    if (fs::exists(fs::path(dir) / "adapter_model.bin", ec))
      hint = "; found adapter_model.bin, a pickle file, which qlora does not load: convert it with "
             "`python -c \"import torch, safetensors.torch as s; s.save_file(torch.load('adapter_model.bin'), "
             "'adapter_model.safetensors')\"`";
    throw InputError(weights_path + ": not found" + hint);
  }
  auto tensors = io::load_safetensors(weights_path);
  if (model.config().multimodal()) {
    // PEFT on transformers < 4.52 named the text model's modules as the published files name its
    // weights (base_model.model.language_model.model.layers...): read under the model's names.
    std::map<std::string, at::Tensor> renamed;
    const std::string peft = "base_model.model.";
    for (auto& [key, t] : tensors) {
      const std::string name =
          key.rfind(peft, 0) == 0 ? model::text_model_weight_name(model.config(), key.substr(peft.size())) : "";
      renamed[name.empty() ? key : peft + name] = t;
    }
    tensors = std::move(renamed);
  }
  LoraAdapter adapter;
  try {
    adapter = LoraAdapter::attach(model, settings);
  } catch (const InputError& e) {
    throw InputError(config_path + ": " + e.what());
  }
  adapter.load_state(tensors, weights_path);
  return adapter;
}

}  // namespace qlora::lora
