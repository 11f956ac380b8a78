// train/demo: the assets `qlora demo` builds so a first run needs no file of
// the user's: a byte-level tokenizer, a tiny random Llama written as a Hugging
// Face model directory, and the config that trains it on the shipped
// synthetic task (data/demo: is a number even or odd).
//
// The tokenizer is a byte-level BPE tokenizer.json whose merges are learned
// from the demo's training text (data/demo_tokenizer.h).
// The model is initialized as transformers initializes LlamaForCausalLM
// (normal(0, 0.02) weights, unit norms), from a seed: it knows nothing, and
// what the demo shows is the LoRA adapter learning the task on top of it.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "qlora/config/config.h"
#include "qlora/data/demo_tokenizer.h"
#include "qlora/model/decoder.h"
#include "qlora/model/decoder_config.h"

namespace qlora::train {

// The tiny model's shape for a vocabulary of `vocab_size`: hidden 256, 4
// layers, 8 heads over 4 key/value heads, SwiGLU 688 (~2.9 M parameters
// besides the embeddings).
DecoderConfig demo_model_config(int64_t vocab_size = 256 + 5);

// The tokenizer side lives in the data module (qlora/data/demo_tokenizer.h);
// this name stays for the tests and benchmarks that build a model directory
// through train/demo.h.
using data::write_demo_tokenizer;

// config.json and model.safetensors (fp32) of `shape`, random as transformers
// initializes it from `seed`. Despite the names, these three serve every family
// of model/family.h: shape.model_type (empty: llama) picks the architecture.
void write_random_llama(const std::string& dir, const DecoderConfig& shape, uint64_t seed);
// Only the config.json of write_random_llama: a model directory that `plan --measure` and
// benchmarks (RunOptions::random_weights) fill with random weights of that shape on the device.
// Written with the family's model_type, architecture and keys (attention_bias, mlp_bias,
// sliding_window, use_sliding_window, layer_types; rope_scaling when the RoPE is scaled), so
// read_decoder_config reads `shape` back. Throws std::invalid_argument for pieces the family's
// config.json cannot express (a Qwen2 without q/k/v biases, a Llama with q/k norms, ...).
void write_llama_config(const std::string& dir, const DecoderConfig& shape);
// write_llama_config with the demo's tokenizer beside it and config.json's bos/eos ids set to
// that tokenizer's (its ids end far below a real vocabulary): a directory a run with
// RunOptions::random_weights trains on (bench_train).
void write_config_with_demo_tokenizer(const std::string& dir, const DecoderConfig& shape);

// The same random weights without a file: each tensor drawn on `device` when
// the loader asks for it (fp32). `qlora plan --measure` uses it for a model
// directory that holds only config.json: memory does not depend on the values.
// (On a GPU the draws differ from the CPU's, same seed or not.)
model::WeightSource random_llama_weights(const DecoderConfig& shape, uint64_t seed, c10::Device device);

// ---------------------------------------------------------------- the demo run
inline constexpr int64_t kDemoSteps = 200;          // optimizer steps of `qlora demo`
inline constexpr int kDemoMerges = 512;             // at most; the demo data needs fewer
inline constexpr uint64_t kDemoModelSeed = 5;       // the random base's weights (Note [demo settings])

// The demo's base model directory: a tokenizer whose merges (at most
// kDemoMerges) are learned from the training file `train_jsonl`, and a random
// model of demo_model_config's shape for that vocabulary (kDemoModelSeed).
// Returns the vocabulary size.
int64_t write_demo_model(const std::string& dir, const std::string& train_jsonl);

// The demo's run config for `steps` optimizer steps (Note [demo settings] in
// demo.cpp): rooted at `work_dir` (model in work_dir/model, output in
// work_dir/out), reading the shipped data under `data_dir` (alpaca form),
// evaluated half-way and at the end.
Config demo_config(const std::string& work_dir, const std::string& data_dir, int64_t steps = kDemoSteps);

}  // namespace qlora::train
