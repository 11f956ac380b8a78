// train/demo: the assets `qlora demo` builds so a first run needs no file of
// the user's: a byte-level tokenizer, a tiny random Llama written as a Hugging
// Face model directory, and the config that trains it on the shipped
// synthetic task (data/demo).
//
// The tokenizer is a tokenizer.json of the Qwen2 family's shape (GPT-2 byte
// map, one digit per pre-token) with the 256 byte tokens, no merges, and the
// Llama 3 special tokens: every character is a token, so the arithmetic and
// string tasks of the demo are learnable by a model this small. transformers'
// tokenizers library reads it as it reads any BPE tokenizer.json.
// The model is initialized as transformers initializes LlamaForCausalLM
// (normal(0, 0.02) weights, unit norms), from a seed: it knows nothing, and
// what the demo shows is the LoRA adapter learning the task on top of it.
#pragma once

#include <cstdint>
#include <string>

#include "qlora/config/config.h"
#include "qlora/model/llama_config.h"

namespace qlora::train {

// The tiny model's shape: vocab 261 (256 bytes + 5 specials), hidden 256,
// 4 layers, 8 heads over 4 key/value heads, SwiGLU 688, ~2.5 M parameters.
LlamaConfig demo_model_config();

// tokenizer.json, tokenizer_config.json and special_tokens_map.json in dir.
void write_demo_tokenizer(const std::string& dir);

// config.json and model.safetensors (fp32) of `shape`, random as transformers
// initializes it from `seed`.
void write_random_llama(const std::string& dir, const LlamaConfig& shape, uint64_t seed);

// The demo's run config, rooted at `work_dir` (model in work_dir/model,
// output in work_dir/out), reading the shipped data under `data_dir`.
Config demo_config(const std::string& work_dir, const std::string& data_dir);

}  // namespace qlora::train
