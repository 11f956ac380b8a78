// lora/gguf_merge: a merged model (base + LoRA adapter, lora/merge.h) written as one GGUF file
// that llama.cpp and Ollama load (`qlora merge --gguf OUT.gguf --type f16|bf16|q8_0`).
//
// What llama.cpp's own converter (convert_hf_to_gguf.py) writes for the family, from the same
// inputs: general.* and the architecture's hyper-parameter keys (llama.cpp's names: llama for
// Llama and Mistral, qwen2, qwen3, gemma2, gemma3, phi3), its tensor names (blk.N.attn_q, ...),
// the llama architecture's q/k rows in its RoPE order, Gemma's norms stored as 1 + w (llama.cpp
// multiplies by the stored weight), no output.weight for tied embeddings (nor ever for Gemma 2),
// Llama 3's rope_freqs and Phi-3's long/short RoPE factors as tensors, and the tokenizer:
// tokenizer.model (sentencepiece) as "llama" with scores, a byte-level BPE tokenizer.json as
// "gpt2" with merges and the pre-tokenizer's llama.cpp name, token types, special token ids,
// add_bos / add_eos, the chat template.
//
// Every merged weight is its fp32 sum (Note [one rounding] in src/lora/merge.cpp) rounded once
// to F16 or BF16, or quantized from fp32 to Q8_0 as ggml's reference does; 1-D tensors (norms,
// biases) stay F32, as llama.cpp's converter keeps them. Tensors are computed and written one
// at a time: the base stays mapped, one merged tensor is in memory.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "qlora/io/gguf.h"
#include "qlora/lora/merge.h"

namespace qlora::lora {

struct GgufMergeResult {
  std::string path;
  std::string architecture;     // llama.cpp's
  std::string type;             // "f16", "bf16", "q8_0"
  std::string tokenizer_model;  // "llama" (sentencepiece) or "gpt2" (byte-level BPE)
  std::string tokenizer_pre;    // llama.cpp's pre-tokenizer name ("default" when not recognized)
  int64_t tokens = 0;           // vocabulary entries written (the embedding's rows)
  int64_t tensors = 0;
  uint64_t bytes = 0;           // the file's size
};

// The tensor type of a --type value: f16, bf16 or q8_0. InputError for anything else.
io::GgufType gguf_merge_type(const std::string& type);

// Merges `options`' adapter into its base (options.out_dir and dtype are not used) and writes
// `gguf_path`. InputError (exit 2), before anything is written, for: what merge_adapter refuses
// in the base or adapter, a family llama.cpp has no architecture for here or a piece it would
// compute differently (dynamic RoPE scaling; Gemma's query_pre_attn_scalar other than head_dim
// or hidden / heads), no tokenizer beside the base or adapter (the message says which files to
// copy there), a vocabulary larger than the embedding, q8_0 for a tensor whose rows are not a
// multiple of 32 values (the message names them and suggests f16), an existing `gguf_path`
// without `force`. Progress lines go to options.progress.
GgufMergeResult write_merged_gguf(const MergeOptions& options, const std::string& gguf_path, const std::string& type,
                                  bool force);

}  // namespace qlora::lora
