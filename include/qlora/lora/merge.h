// lora/merge: folding a PEFT LoRA adapter into its base model (`qlora merge`).
//
// Reads a Hugging Face model directory (io/model_dir.h) and a PEFT adapter directory
// (adapter_config.json + adapter_model.safetensors, the format lora/adapter_io.h reads and
// writes) and writes a new Hugging Face model directory whose every adapted projection is
//
//     W' = W + (B · A) · scaling        scaling = alpha / r, or alpha / sqrt(r) with rslora
//
// computed in fp32 from exact operands and rounded once to the output dtype (bf16, fp16 or
// fp32); every other floating tensor is cast to that dtype. W is the base weight as stored, or
// (from_nf4) the NF4 round trip of it that QLoRA training computed against, dequantized to fp32:
// see Notes [merging into the NF4 base] and [one rounding] in src/lora/merge.cpp. With from_nf4
// and fp32 output, the merged model computes what the QLoRA model (NF4 base + adapter) computes
// in fp32, up to fp32 summation order; 16-bit output adds one rounding of each merged weight.
// config.json is copied with its dtype updated; tokenizer and generation files are copied
// unchanged. The result loads with transformers' from_pretrained.
//
// Everything that can be checked is checked before anything is written (every adapter module
// present in the base with matching shapes, the adapter plain LoRA). The output is built in a
// temporary directory beside `out_dir` and renamed into place, so `out_dir` is either absent,
// as it was, or complete. Tensors are merged shard by shard: the process holds the base mapped
// (page cache) and at most one output shard in memory.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "qlora/io/model_dir.h"
#include "qlora/io/safetensors.h"
#include "qlora/lora/adapter_io.h"
#include "qlora/model/decoder_config.h"

namespace qlora::lora {

// ---------------------------------------------------------------- options

struct MergeOptions {
  std::string base_dir;     // a Hugging Face model directory (safetensors, 16- or 32-bit)
  std::string adapter_dir;  // a PEFT LoRA adapter directory
  std::string out_dir;      // must not exist, or be empty, or force
  // Merge into the NF4 round trip of each decoder projection (bitsandbytes' NF4, blocksize 64,
  // double quantization, as training quantizes) instead of the stored weight.
  bool from_nf4 = false;
  // "bf16", "fp16", "fp32", or "" for the base's dtype when that is 16-bit, else bf16.
  std::string dtype;
  // Replace a non-empty out_dir (after the new one is complete).
  bool force = false;
  // Largest output shard in bytes; a model larger than this is written as
  // model-0000i-of-0000n.safetensors with model.safetensors.index.json.
  uint64_t max_shard_bytes = 5'000'000'000ull;
  // Called once per stage with a one-line description (may be empty).
  std::function<void(const std::string&)> progress;
};

// The output dtype for a --dtype value ("bf16" / "fp16" / "fp32", or "" with the base's config
// dtype string such as "bfloat16" / "float32"). InputError for anything else.
io::DType merge_output_dtype(const std::string& requested, const std::string& base_config_dtype);

// ---------------------------------------------------------------- the merged tensors, one at a time

// The base and the adapter of a merge, opened and checked (every InputError merge_adapter names
// for them; options.out_dir is not looked at), handing out the merged model's tensors one at a
// time: what merge_adapter writes as safetensors and lora/gguf_merge.h as GGUF. Reports the
// "base" and "adapter" stages through options.progress.
class MergedWeights {
 public:
  explicit MergedWeights(const MergeOptions& options);

  const io::ModelDir& base() const { return base_; }
  // config.json's dtype ("bfloat16", ...; empty when not recorded).
  const std::string& base_config_dtype() const { return base_dtype_; }
  const LoraSettings& settings() const { return settings_; }
  size_t adapter_modules() const { return adapter_modules_; }

  // Tensor `name` (the base's name for it) of the merged model before its one rounding (Note [one rounding] in
  // merge.cpp): a floating tensor in fp32 (f64 for an f64 base) when adapted or NF4 round-tripped,
  // else as stored (mapped, read-only); W + B·A·scaling for an adapted projection, whose fp32
  // adapter copies are then released. Ask for each name once.
  at::Tensor merged(const std::string& name);

  const std::vector<std::string>& merged_modules() const { return merged_; }  // in the order asked
  int64_t nf4_round_trips() const { return nf4_round_trips_; }

 private:
  struct LoraPair {
    at::Tensor a, b;  // A [r, in], B [out, r], fp32
  };
  // A tensor or module name of the base or the adapter in the model's names (model/decoder.h:
  // text_model_weight_name; unchanged but for a multimodal base's text model).
  std::string model_name(const std::string& name) const;

  bool from_nf4_;
  io::ModelDir base_;
  DecoderConfig names_;  // only module_prefix is set: how the model names its text weights
  std::map<std::string, std::string> base_name_;  // model_name -> the base's tensor name
  std::string base_dtype_;
  LoraSettings settings_;
  size_t adapter_modules_ = 0;
  std::map<std::string, LoraPair> modules_;
  std::vector<std::string> merged_;
  int64_t nf4_round_trips_ = 0;
};

// ---------------------------------------------------------------- merging

struct MergeResult {
  std::string out_dir;
  io::DType dtype = io::DType::BF16;
  std::vector<std::string> merged_modules;  // HF module names that received B·A·scaling
  int64_t nf4_round_trips = 0;              // projections replaced by their NF4 round trip
  int64_t tensors = 0;                      // tensors written
  uint64_t weight_bytes = 0;                // bytes of tensor data written
  std::vector<std::string> weight_files;    // shard file names, in order
  std::vector<std::string> copied_files;    // config.json, tokenizer files, ... (file names)
};

// Merges, writes and returns what was written. InputError (naming the directory, file, module
// or tensor, and what to do) for: a missing or unreadable base or adapter, an adapter that is
// not plain LoRA (DoRA, modules_to_save, biases, ... named plainly), an adapter module with no
// base weight, a shape that does not fit the base, a quantized base, out_dir non-empty without
// force or equal to an input. Other failures (disk full) are std::runtime_error naming the path;
// then nothing is left behind.
MergeResult merge_adapter(const MergeOptions& options);

// merge_adapter's refusals of options.out_dir (missing, not a directory, non-empty without force,
// equal to or inside an input) without merging anything: for a caller that writes something
// else first (`qlora merge --out D --gguf F` checks D before F is written).
void check_merge_out_dir(const MergeOptions& options);

}  // namespace qlora::lora
