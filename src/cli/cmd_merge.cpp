// qlora merge: fold a LoRA adapter into its base model and write a Hugging Face model directory,
// a GGUF file for llama.cpp, or both.
//
//   qlora merge --base MODEL_DIR --adapter ADAPTER_DIR --out OUT_DIR [--dtype bf16|fp16|fp32] [--from-nf4] [--force]
//   qlora merge --base MODEL_DIR --adapter ADAPTER_DIR --gguf OUT.gguf [--type f16|bf16|q8_0] [--from-nf4] [--force]
//
// The work is lora::merge_adapter (lora/merge.h) and lora::write_merged_gguf (lora/gguf_merge.h);
// this file maps flags onto them and prints one line per stage, then what was written and how to
// load it.
#include <filesystem>
#include <iostream>
#include <memory>

#include "cli/commands.h"
#include "qlora/common/errors.h"
#include "qlora/lora/gguf_merge.h"
#include "qlora/lora/merge.h"
#include "qlora/model/family.h"

namespace qlora::cli {
namespace {

// llama.cpp keeps a multimodal model's image tower in a separate projector file, which this
// writer does not make: --gguf is refused for the text part of a multimodal base.
void refuse_multimodal_gguf(const std::string& base_dir) {
  const DecoderConfig c = read_decoder_config((std::filesystem::path(base_dir) / "config.json").string());
  if (c.multimodal())
    throw InputError("--gguf: the base " + base_dir + " is a multimodal Gemma 3 (model_type gemma3), which qlora "
                     "does not write as GGUF; merge with --out DIR and convert that directory with llama.cpp's "
                     "convert_hf_to_gguf.py (it writes the image projector too)");
}

}  // namespace

Runner add_merge_command(CLI::App& root) {
  auto opts = std::make_shared<lora::MergeOptions>();
  auto shard_gb = std::make_shared<double>(5.0);
  auto gguf = std::make_shared<std::string>();
  auto gguf_type = std::make_shared<std::string>();
  CLI::App* cmd = root.add_subcommand(
      "merge",
      "fold a PEFT LoRA adapter into its base model: a Hugging Face model directory in bf16, fp16 or fp32 "
      "(--out), and/or one GGUF file in f16, bf16 or q8_0 that llama.cpp and Ollama load (--gguf); each merged "
      "weight W + B·A·scaling is computed in fp32 and rounded once to that type");
  cmd->add_option("--base", opts->base_dir, "the base model directory (config.json + *.safetensors, 16 or 32 bit)")
      ->required();
  cmd->add_option("--adapter", opts->adapter_dir,
                  "the adapter directory (adapter_config.json + adapter_model.safetensors)")
      ->required();
  cmd->add_option("--out", opts->out_dir,
                  "where to write the merged model as a Hugging Face directory (must not exist, or be empty); "
                  "needed unless --gguf is given");
  cmd->add_option("--gguf", *gguf,
                  "also or instead write the merged model as this GGUF file (llama.cpp: llama-cli -m OUT.gguf): "
                  "llama.cpp's tensor names and hyper-parameters for llama, mistral, qwen2, qwen3, gemma2, "
                  "gemma3_text and phi3, with the tokenizer (tokenizer.json or tokenizer.model beside the adapter or "
                  "the base) and chat template");
  cmd->add_option("--type", *gguf_type,
                  "f16, bf16 or q8_0: the GGUF tensor type of the merged weights (default f16; norms and biases "
                  "stay F32; q8_0 needs rows of a multiple of 32 values). Only with --gguf");
  cmd->add_option("--dtype", opts->dtype,
                  "bf16, fp16 or fp32: the dtype of the written weights (default: the base's dtype when 16-bit, "
                  "else bf16)")
      ->check(CLI::IsMember({"bf16", "fp16", "fp32"}));
  cmd->add_flag("--from-nf4", opts->from_nf4,
                "merge into the NF4 round trip of the base's decoder projections (what QLoRA training computed "
                "against) instead of the stored weights: each is dequantized to fp32, B·A·scaling added in fp32, "
                "and the sum rounded once to --dtype. With --dtype fp32 the merged model computes what the QLoRA "
                "model (NF4 base + unmerged adapter) computes in fp32, up to the order of fp32 additions; with bf16 "
                "or fp16 each merged weight is that fp32 sum rounded to the nearest bf16 or fp16 value");
  cmd->add_flag("--force", opts->force,
                "replace a non-empty --out or an existing --gguf file (only once the new one is complete)");
  cmd->add_option("--max-shard-size", *shard_gb, "largest weights file in GB (1e9 bytes); larger models are sharded")
      ->check(CLI::PositiveNumber);
  return [opts, shard_gb, gguf, gguf_type]() {
    if (!gguf_type->empty() && gguf->empty())
      throw InputError("--type " + *gguf_type + " is the GGUF tensor type: give --gguf OUT.gguf too (--dtype sets the "
                       "dtype of the --out directory)");
    if (opts->out_dir.empty() && gguf->empty())
      throw InputError("merge: give --out DIR (a Hugging Face directory), --gguf FILE (for llama.cpp), or both");
    const std::string type = gguf_type->empty() ? "f16" : *gguf_type;
    if (!gguf->empty()) {
      lora::gguf_merge_type(type);  // a bad --type before any work
      refuse_multimodal_gguf(opts->base_dir);
    }
    opts->max_shard_bytes = static_cast<uint64_t>(*shard_gb * 1e9);
    opts->progress = [](const std::string& line) { std::cout << line << "\n" << std::flush; };
    auto write_gguf = [&] {
      const lora::GgufMergeResult g = lora::write_merged_gguf(*opts, *gguf, type, opts->force);
      std::cout << "done     " << g.path << ": llama.cpp's " << g.architecture << " in " << g.type << ", "
                << g.tokens << " tokens; run it with llama-cli -m " << g.path << "\n";
    };
    if (opts->out_dir.empty()) {
      write_gguf();
      return kExitOk;
    }
    // Both: --out's refusals first, then the GGUF file (its own refusals, and the base's and the
    // adapter's, come before it writes anything), then the directory.
    if (!gguf->empty()) {
      lora::check_merge_out_dir(*opts);
      write_gguf();
    }
    const lora::MergeResult r = lora::merge_adapter(*opts);
    const char* torch_dtype = r.dtype == io::DType::F32   ? "torch.float32"
                              : r.dtype == io::DType::F16 ? "torch.float16"
                                                          : "torch.bfloat16";
    std::cout << "done     " << r.merged_modules.size() << " adapted projections merged"
              << (opts->from_nf4 ? " (into the NF4 round trip of " + std::to_string(r.nf4_round_trips) + " projections)"
                                 : std::string())
              << ", " << r.tensors << " tensors in " << r.out_dir
              << "; load it with transformers: AutoModelForCausalLM.from_pretrained(\"" << r.out_dir
              << "\", dtype=" << torch_dtype << ")\n";
    return kExitOk;
  };
}

}  // namespace qlora::cli
