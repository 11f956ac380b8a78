// The GPU memory model of one QLoRA training process.
//
// Note [plan memory model]
// ~~~~~~~~~~~~~~~~~~~~~~~~
// Components are added as if they were all live at once. That is the
// conservative reading: the loss chunk and the recomputed layer are in fact
// live at different moments, but the caching allocator keeps what it once
// reserved, and a budget that is a little high costs a smaller micro batch
// while one that is low costs an OOM an hour into the run.
//
// Notation: L layers, h hidden, i intermediate, nh heads, nkv kv heads, d
// head_dim, V vocab, T = micro × seq tokens per forward pass, p = bytes per
// activation element (2 for bf16/fp16, 4 for fp32).
//
// Activations are what autograd saves for backward in an op-by-op LibTorch
// decoder layer (frozen weights, LoRA fp32 masters cast per use), op by op:
//   RMSNorm (x.float(), x·rsqrt(mean x²+eps), ·w)  saves the fp32 copy + rstd: 4h + 4
//   frozen linear                                   saves nothing per token
//   LoRA on a linear                                A's output: p·r; with dropout
//                                                   also the dropped input and its
//                                                   mask: (p + 1)·in; without, the
//                                                   input itself must be kept
//   RoPE (q·cos + rot(q)·sin)                       nothing (cos/sin are constants)
//   scaled_dot_product_attention                    q, k, v, out: p·(2·nh·d + 2·nkv·d), lse: 4·nh
//   silu(gate) · up                                 gate, silu(gate), up: 3·p·i
// These are derived from the ops' saved tensors, not yet measured: `qlora plan
// --measure` (the measured-memory issue) checks them against the caching
// allocator and corrects this model. Attention is O(T): fused kernels never
// store the T×T scores. Flash attention (sm_80+) reads grouped k/v heads
// directly; the memory-efficient kernel used on sm_7x needs k, v repeated to
// nh heads first.
//
// Gradient checkpointing keeps each layer's input (p·h per token per layer)
// and recomputes one layer at a time in backward, so the peak holds all
// boundaries plus one layer's full activations. Without it all L layers are
// kept. While a layer is differentiated, its gradients are in flight: the
// incoming and outgoing hidden-state gradients (2·p·h) and the MLP's three
// intermediate gradients (3·p·i) per token, plus one projection dequantized to
// 16 bits for its GEMM (the largest, i·h).
#include <algorithm>
#include <cmath>
#include <numeric>

#include "constants.h"
#include "format.h"
#include "qlora/plan/plan.h"

namespace qlora::plan {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Nf4Bytes {
  int64_t weights = 0;
  int64_t packed = 0;
  int64_t blocks = 0;
  int64_t absmax_double_quant = 0;  // uint8 per block + fp32 per 256 blocks + fp32 offset
  int64_t absmax_plain = 0;         // fp32 per block
};

Nf4Bytes nf4_bytes(const LlamaConfig& m) {
  Nf4Bytes b;
  for (const auto& s : decoder_linear_shapes(m)) {
    const int64_t n = s.in_features * s.out_features;
    const int64_t blocks = ceil_div(n, kNf4BlockSize);
    b.weights += n;
    b.packed += ceil_div(n, 2);
    b.blocks += blocks;
    b.absmax_double_quant += blocks + ceil_div(blocks, kDoubleQuantBlockSize) * 4 + 4;
    b.absmax_plain += blocks * 4;
  }
  const int64_t L = m.num_hidden_layers;
  b.weights *= L;
  b.packed *= L;
  b.blocks *= L;
  b.absmax_double_quant *= L;
  b.absmax_plain *= L;
  return b;
}

// The LoRA tensors of one layer: A [r, in] and B [out, r] per targeted module.
std::vector<int64_t> lora_tensor_sizes(const LlamaConfig& m, const BudgetInputs& in) {
  std::vector<int64_t> sizes;
  for (const auto& s : decoder_linear_shapes(m)) {
    if (std::find(in.lora_targets.begin(), in.lora_targets.end(), s.name) == in.lora_targets.end()) continue;
    sizes.push_back(in.lora_r * s.in_features);
    sizes.push_back(in.lora_r * s.out_features);
  }
  return sizes;
}

bool targets(const BudgetInputs& in, const char* name) {
  return std::find(in.lora_targets.begin(), in.lora_targets.end(), name) != in.lora_targets.end();
}

}  // namespace

double total_bytes(const std::vector<Component>& components) {
  double t = 0;
  for (const auto& c : components) t += c.bytes;
  return t;
}

std::string format_gib(double bytes) { return fmt::fixed(bytes / kGiB, 2); }

std::vector<Component> memory_components(const LlamaConfig& m, const BudgetInputs& in) {
  using fmt::commas;
  using fmt::gib;
  std::vector<Component> out;
  const int64_t L = m.num_hidden_layers, h = m.hidden_size, i = m.intermediate_size, V = m.vocab_size;
  const int64_t nh = m.num_attention_heads, nkv = m.num_key_value_heads, d = m.head_dim;
  const int64_t p = in.activation_bytes;
  const int64_t T = in.micro_batch_size * in.seq_length;

  // ---- NF4 base
  {
    const Nf4Bytes b = nf4_bytes(m);
    const int64_t absmax = in.double_quant ? b.absmax_double_quant : b.absmax_plain;
    Component c{"base_weights_nf4", "base weights, NF4", double(b.packed + absmax), "", "", 0};
    c.formula = commas(b.weights) + " weights in " + std::to_string(7 * L) + " projections × 4 bit = " +
                gib(double(b.packed)) + "; absmax of " + commas(b.blocks) + " blocks of 64 ";
    if (in.double_quant)
      c.formula += "(double quant: 1 B each + fp32 per 256 blocks + offset) = " + gib(double(absmax));
    else
      c.formula += "(fp32, no double quant) = " + gib(double(absmax));
    c.detail = in.double_quant ? "without double quant the absmax takes " + commas(b.blocks) + " × 4 B = " +
                                     gib(double(b.absmax_plain)) + " (total " +
                                     gib(double(b.packed + b.absmax_plain)) + ")"
                               : "with quantization.double_quant: true the absmax takes " +
                                     gib(double(b.absmax_double_quant)) + " (total " +
                                     gib(double(b.packed + b.absmax_double_quant)) + ")";
    out.push_back(c);
  }
  // ---- 16-bit parts
  {
    const int64_t embed = V * h, norms = (2 * L + 1) * h;
    const int64_t head = m.tie_word_embeddings ? 0 : V * h;
    const int64_t n = embed + head + norms;
    Component c{"base_weights_16bit", "embeddings, lm_head, norms", double(n * p), "", "", 0};
    c.formula = "embed_tokens " + commas(V) + " × " + commas(h) +
                (m.tie_word_embeddings ? " (lm_head tied to it: counted once)"
                                       : " + lm_head " + commas(V) + " × " + commas(h)) +
                " + " + std::to_string(2 * L + 1) + " norms × " + commas(h) + ", × " + std::to_string(p) +
                " B (not quantized)";
    c.detail = "PEFT's prepare_model_for_kbit_training would upcast these to fp32: " + gib(double(n * 4));
    out.push_back(c);
  }
  // ---- LoRA weights, gradients, optimizer state
  const std::vector<int64_t> lora_sizes = lora_tensor_sizes(m, in);
  const int64_t lora_per_layer = std::accumulate(lora_sizes.begin(), lora_sizes.end(), int64_t{0});
  const int64_t P = lora_per_layer * L;
  {
    const std::string what = commas(P) + " params (r " + std::to_string(in.lora_r) + ", " +
                             std::to_string(in.lora_targets.size()) + " modules × " + std::to_string(L) +
                             " layers)";
    out.push_back({"lora_weights", "LoRA weights (fp32 master)", double(P * 4), what + " × 4 B", "", 0});
    out.push_back({"lora_grads", "LoRA gradients (fp32)", double(P * 4), what + " × 4 B", "", 0});
  }
  {
    Component c{"optimizer_states", "optimizer state", 0, "", "", 0};
    if (in.optimizer == OptimizerKind::kAdamW) {
      c.bytes = double(P * 8);
      c.formula = commas(P) + " params × 8 B (exp_avg + exp_avg_sq, fp32)";
    } else {
      int64_t bytes = 0, pageable = 0, small = 0;
      for (int64_t n : lora_sizes) {
        if (n < kOptimMin8bitSize) {
          bytes += 8 * n;  // bitsandbytes keeps fp32 states for small tensors
          small += n;
          continue;
        }
        bytes += 2 * n + 2 * ceil_div(n, kOptim8bitBlockSize) * 4;
        if (n >= kPagedMinElements) pageable += 2 * n;
      }
      c.bytes = double(bytes * L);
      c.formula = commas(P) + " params × 2 B (two uint8 states) + fp32 absmax per 256 per state";
      if (small) c.formula += "; " + commas(small * L) + " params in tensors under 4,096 elements keep fp32 (8 B)";
      if (in.optimizer == OptimizerKind::kPagedAdamW8bit) {
        c.pageable_bytes = double(pageable * L);
        c.detail = "paged: state buffers of tensors with >= 100,000 elements live in unified memory and can "
                   "move to the host under pressure: " +
                   gib(c.pageable_bytes) + " here" +
                   (pageable == 0 ? " (every LoRA tensor is smaller)" : "") +
                   "; counted on the GPU as the worst case";
      }
    }
    out.push_back(c);
  }
  // ---- activations
  const int64_t kv_heads_saved = in.gqa_kv_expanded ? nh : nkv;
  int64_t lora_tok = 0;
  for (const auto& s : decoder_linear_shapes(m)) {
    if (!targets(in, s.name.c_str())) continue;
    lora_tok += p * in.lora_r;
    if (in.lora_dropout > 0) lora_tok += (p + 1) * s.in_features;
  }
  if (in.lora_dropout <= 0) {  // the undropped inputs must be kept for A's gradient
    if (targets(in, "q_proj") || targets(in, "k_proj") || targets(in, "v_proj")) lora_tok += p * h;
    if (targets(in, "gate_proj") || targets(in, "up_proj")) lora_tok += p * h;
    if (targets(in, "down_proj")) lora_tok += p * i;
  }
  const int64_t norm_tok = 2 * (4 * h + 4);
  const int64_t attn_tok = p * (nh * d + 2 * kv_heads_saved * d) + p * nh * d + 4 * nh;
  const int64_t mlp_tok = 3 * p * i;
  const int64_t layer_tok = norm_tok + attn_tok + mlp_tok + lora_tok;
  const double layer_bytes = double(T) * double(layer_tok) + double(p * lora_per_layer);
  const double final_norm = double(T) * double(4 * h + 4 + p * h);
  const double boundaries = double(L) * double(T) * double(h * p);
  const double with_ckpt = boundaries + layer_bytes + final_norm;
  const double without_ckpt = double(L) * layer_bytes + final_norm;
  {
    Component c{"activations", "activations", in.gradient_checkpointing ? with_ckpt : without_ckpt, "", "", 0};
    const std::string tokens = commas(T) + " tokens";
    const std::string per_layer = commas(layer_tok) + " B/token/layer";
    if (in.gradient_checkpointing)
      c.formula = "checkpointing: " + std::to_string(L) + " layer inputs × " + tokens + " × " + commas(h) + " × " +
                  std::to_string(p) + " B = " + gib(boundaries) + " + one layer recomputed in backward, " +
                  per_layer + " × " + tokens + " = " + gib(layer_bytes) + " + final norm " + gib(final_norm);
    else
      c.formula = "no checkpointing: " + std::to_string(L) + " layers × " + per_layer + " × " + tokens + " = " +
                  gib(double(L) * layer_bytes) + " + final norm " + gib(final_norm);
    c.detail = "per layer and token: norms 2×(4h+4) = " + commas(norm_tok) + ", attention q,k,v,out + lse = " +
               commas(attn_tok) + (in.gqa_kv_expanded ? " (k, v repeated to all heads: no flash attention)" : "") +
               ", MLP 3·p·i = " + commas(mlp_tok) + ", LoRA = " + commas(lora_tok) +
               (in.lora_dropout > 0 ? " (A outputs + dropped inputs and masks)" : " (A outputs + kept inputs)") +
               (in.gradient_checkpointing ? "; without checkpointing: " + gib(without_ckpt)
                                          : "; with checkpointing: " + gib(with_ckpt));
    out.push_back(c);
  }
  // ---- backward temporaries
  int64_t largest_linear = 0;
  for (const auto& s : decoder_linear_shapes(m)) largest_linear = std::max(largest_linear, s.in_features * s.out_features);
  {
    const double grads = double(T) * double(3 * p * i + 2 * p * h);
    const double dequant = double(largest_linear * in.dequant_bytes);
    Component c{"backward_workspace", "backward temporaries", grads + dequant, "", "", 0};
    c.formula = "gradients in flight in one layer: " + commas(T) + " tokens × (3 × " + commas(i) + " + 2 × " +
                commas(h) + ") × " + std::to_string(p) + " B = " + gib(grads) +
                " + one projection dequantized for its GEMM, " + commas(largest_linear) + " × " +
                std::to_string(in.dequant_bytes) + " B = " + gib(dequant);
    out.push_back(c);
  }
  // ---- logits and loss
  {
    const int64_t chunk = std::min<int64_t>(kCeChunkTokens, T);
    const double chunked = double(chunk) * double(V) * double(4 + p);
    const double unchunked = double(T) * double(V) * double(p + 4 + 4);
    Component c{"logits_loss", "logits + cross-entropy", chunked, "", "", 0};
    c.formula = "chunked cross-entropy, " + commas(chunk) + " tokens at a time × " + commas(V) +
                " vocab × (4 B fp32 logits + " + std::to_string(p) + " B gradient)";
    c.detail = "unchunked, as transformers computes it (" + std::to_string(p) +
               "-byte logits, their fp32 copy and the fp32 log-softmax for all " + commas(T) + " tokens): " +
               gib(unchunked);
    out.push_back(c);
  }
  // ---- runtime
  out.push_back({"cuda_context", "CUDA context + cuBLAS", kCudaContextBytes + kCublasBytes,
                 "CUDA context " + fmt::fixed(kCudaContextBytes / kMiB, 0) + " MiB + cuBLAS handle and workspace " +
                     fmt::fixed(kCublasBytes / kMiB, 0) + " MiB (typical for torch 2.11 + CUDA 13 with lazy module loading)",
                 "", 0});
  {
    double transient = 0;
    for (const auto& c : out)
      if (c.key == "activations" || c.key == "backward_workspace" || c.key == "logits_loss") transient += c.bytes;
    out.push_back({"fragmentation", "allocator fragmentation", kFragmentationFraction * transient,
                   fmt::fixed(kFragmentationFraction * 100, 0) +
                       "% of what is allocated and freed every step (activations, temporaries, loss) = " +
                       fmt::fixed(kFragmentationFraction * 100, 0) + "% × " + gib(transient),
                   "", 0});
  }
  return out;
}

}  // namespace qlora::plan
