// qlora merge: fold a LoRA adapter into its base model and write a Hugging Face model directory.
//
//   qlora merge --base MODEL_DIR --adapter ADAPTER_DIR --out OUT_DIR [--dtype bf16|fp16|fp32] [--from-nf4] [--force]
//
// The work is lora::merge_adapter (lora/merge.h); this file maps flags onto it and prints one
// line per stage, then what was written and how to load it.
#include <iostream>
#include <memory>

#include "cli/commands.h"
#include "qlora/lora/merge.h"

namespace qlora::cli {

Runner add_merge_command(CLI::App& root) {
  auto opts = std::make_shared<lora::MergeOptions>();
  auto shard_gb = std::make_shared<double>(5.0);
  CLI::App* cmd = root.add_subcommand(
      "merge",
      "fold a PEFT LoRA adapter into its base model: a Hugging Face model directory in bf16, fp16 or fp32 "
      "(each merged weight W + B·A·scaling computed in fp32 and rounded once to that dtype)");
  cmd->add_option("--base", opts->base_dir, "the base model directory (config.json + *.safetensors, 16 or 32 bit)")
      ->required();
  cmd->add_option("--adapter", opts->adapter_dir,
                  "the adapter directory (adapter_config.json + adapter_model.safetensors)")
      ->required();
  cmd->add_option("--out", opts->out_dir, "where to write the merged model (must not exist, or be empty)")->required();
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
  cmd->add_flag("--force", opts->force, "replace a non-empty --out (only once the new model is complete)");
  cmd->add_option("--max-shard-size", *shard_gb, "largest weights file in GB (1e9 bytes); larger models are sharded")
      ->check(CLI::PositiveNumber);
  return [opts, shard_gb]() {
    opts->max_shard_bytes = static_cast<uint64_t>(*shard_gb * 1e9);
    opts->progress = [](const std::string& line) { std::cout << line << "\n" << std::flush; };
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
