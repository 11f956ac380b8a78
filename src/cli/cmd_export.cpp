// qlora export --adapter DIR --gguf OUT.gguf [--base MODEL_DIR]: the adapter for llama.cpp and
// Ollama (lora/gguf_export.h).
#include <filesystem>
#include <iostream>
#include <memory>
#include <string>

#include "cli/commands.h"
#include <nlohmann/json.hpp>

#include "qlora/common/errors.h"
#include "qlora/common/json_file.h"
#include "qlora/lora/gguf_export.h"
#include "qlora/model/family.h"

namespace qlora::cli {

Runner add_export_command(CLI::App& root) {
  auto adapter = std::make_shared<std::string>();
  auto gguf = std::make_shared<std::string>();
  auto base = std::make_shared<std::string>();
  CLI::App* cmd = root.add_subcommand("export", "write a LoRA adapter as GGUF for llama.cpp (--lora) and Ollama (ADAPTER)");
  cmd->add_option("--adapter", *adapter, "the PEFT adapter directory")->required();
  cmd->add_option("--gguf", *gguf, "the GGUF file to write")->required();
  cmd->add_option("--base", *base, "the base model directory (default: the adapter's base_model_name_or_path)");
  return [adapter, gguf, base]() {
    std::string model = *base;
    if (model.empty()) {
      const std::string cfg = (std::filesystem::path(*adapter) / "adapter_config.json").string();
      const nlohmann::json j = read_json_object(cfg, "cannot read the adapter config", "a PEFT adapter_config.json");
      model = j.value("base_model_name_or_path", "");
      std::error_code ec;
      if (model.empty() || !std::filesystem::is_directory(model, ec))
        throw InputError(*adapter + "/adapter_config.json: base_model_name_or_path \"" + model +
                         "\" is not a model directory here; pass --base MODEL_DIR");
    }
    const DecoderConfig c = read_decoder_config((std::filesystem::path(model) / "config.json").string());
    if (c.multimodal())
      throw InputError("--gguf: the base " + model + " is a multimodal Gemma 3 (model_type gemma3), whose adapter "
                       "qlora does not write as GGUF; merge it with `qlora merge --out DIR` and convert that directory "
                       "with llama.cpp's convert_hf_to_gguf.py");
    const lora::GgufExport r = lora::export_adapter_gguf(*adapter, c, *gguf);
    std::cout << "wrote " << *gguf << ": " << r.tensors << " LoRA tensors for llama.cpp's " << r.architecture
              << " (alpha " << r.alpha << "); llama-cli -m BASE.gguf --lora " << *gguf << "\n";
    return kExitOk;
  };
}

}  // namespace qlora::cli
