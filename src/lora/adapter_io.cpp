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
