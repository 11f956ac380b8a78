// lora/adapter_io: PEFT's adapter directory format, both ways.
//
// A PEFT LoRA adapter is a directory with adapter_config.json (the fields
// PEFT 0.21 writes) and adapter_model.safetensors (fp32 lora_A / lora_B
// weights under keys "base_model.model.<module>.lora_A.weight"). What qlora
// writes loads with `PeftModel.from_pretrained`, and what PEFT writes loads
// here, as long as it is plain LoRA on the decoder projections: DoRA, biases,
// per-module ranks and modules_to_save are refused with a message saying so.
// On the text part of a multimodal Gemma 3 the keys are PEFT's on Gemma3ForConditionalGeneration
// ("base_model.model.model.language_model.layers.0..."; load_adapter also reads the
// "language_model.model." naming of older PEFT files), and target_modules is written as a
// regular expression over the language model's layers, so that PEFT leaves the image tower alone.
#pragma once

#include <map>
#include <string>

#include "qlora/lora/lora.h"

namespace qlora::lora {

// Reads adapter_config.json. Throws InputError naming the file and key for a
// missing file, bad JSON, a peft_type other than LORA, a missing or wrongly
// typed r / lora_alpha / target_modules, or a LoRA feature qlora does not
// implement.
LoraSettings read_adapter_config(const std::string& path);

// The adapter_config.json text for `adapter` (every field PEFT 0.21 writes).
// base_model_name_or_path is recorded as given (a model directory or hub id).
std::string adapter_config_json(const LoraAdapter& adapter, const std::string& base_model_name_or_path);

// Writes dir/adapter_config.json and dir/adapter_model.safetensors (creating
// dir). Each file is written to a temporary name and renamed.
void save_adapter(const LoraAdapter& adapter, const std::string& dir, const std::string& base_model_name_or_path);

// Reads dir/adapter_config.json, attaches an adapter with those settings to
// `model` and fills it from dir/adapter_model.safetensors. Throws InputError
// naming the file for anything that does not fit the model.
LoraAdapter load_adapter(model::DecoderModel& model, const std::string& dir);

// Fills `adapter` (attached from the run's config) with the weights of the PEFT adapter in `dir`
// (lora.init_from: training continues from it). Its rank, alpha, rslora and target modules must
// be the adapter's: an InputError names `dir` and lists every difference.
void init_adapter_from(LoraAdapter& adapter, const std::string& dir);

}  // namespace qlora::lora
