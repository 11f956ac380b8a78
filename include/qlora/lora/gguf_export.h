// lora/gguf_export: a PEFT LoRA adapter as the GGUF file llama.cpp loads with --lora (and Ollama
// with ADAPTER): general.architecture of the base (llama.cpp's name: llama for Llama and
// Mistral, qwen2, qwen3, gemma2, gemma3, phi3), general.type "adapter", adapter.type "lora",
// adapter.lora.alpha; tensors "blk.N.<base tensor>.weight.lora_a" (ne [in, r]) and ".lora_b"
// (ne [r, out]) in fp32. llama.cpp's llama architecture keeps q and k rows in its own RoPE order
// (its converter permutes them), so lora_b of q_proj and k_proj is permuted the same way there.
// rslora's scale alpha / sqrt(r) is written as alpha * sqrt(r), which llama.cpp divides by r.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "qlora/model/decoder_config.h"

namespace qlora::lora {

struct GgufExport {
  std::string architecture;  // llama.cpp's
  int64_t tensors = 0;
  float alpha = 0;           // as written
};

// Throws InputError naming the file for an adapter that is not plain LoRA, does not fit `base`,
// or a family llama.cpp has no name for here.
GgufExport export_adapter_gguf(const std::string& adapter_dir, const DecoderConfig& base, const std::string& out_path);

// llama.cpp's architecture name for a family (llama for Llama and Mistral, qwen2, qwen3, gemma2,
// gemma3, phi3); InputError naming the model_type for a family llama.cpp has no name for here.
std::string gguf_architecture_of(const DecoderConfig& model);

// llama.cpp's row order of a q or k projection (weight, bias or LoRA B) for its llama
// architecture: each head's rows go from transformers' rotate-half order [first halves | second
// halves] to interleaved pairs. `w` is [heads * head_dim, ...].
at::Tensor gguf_llama_rope_rows(const at::Tensor& w, int64_t heads);

// llama.cpp's name of projection `proj` (q_proj ... down_proj, qkv_proj, gate_up_proj): attn_q,
// attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down, attn_qkv, ffn_up (Phi-3's fused).
std::string gguf_tensor_of(const std::string& proj);

}  // namespace qlora::lora
