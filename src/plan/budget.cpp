// The GPU memory model of one QLoRA training process.
//
// Note [plan memory model]
// ~~~~~~~~~~~~~~~~~~~~~~~~
// The plan predicts the peak of one training step: what is allocated at the
// moment the most is, read from what this implementation keeps, not the sum
// of everything that is ever allocated. The parts that live the whole run
// (NF4 base, 16-bit embeddings and norms, LoRA weights, gradients and
// optimizer state, cuBLAS workspaces) are there at every moment; what a step
// allocates peaks at one of two moments, and the plan takes the larger:
//
//   loss phase   the backward of the chunked cross-entropy (src/model/loss.cpp)
//   layer phase  the backward of the top decoder layer, at its MLP product
//
// Notation: L layers, h hidden, i intermediate, nh heads, d head_dim, V vocab,
// B micro batch, S sequence, T = B·S tokens, p bytes per activation element
// (2 for bf16/fp16, 4 for fp32), c = min(1024, T) tokens per loss chunk.
//
// What autograd keeps for one decoder layer with grad on (src/model/decoder.cpp
// layer_forward, ops as they save tensors), per token:
//   two RMSNorms: x.float() (kept by pow and mul) + rstd       2·(4h + 4)
//   LoRA on a projection, dropout > 0: the dropped input (kept by
//     A's linear) + dropout's mask, and A's output                p·in + m + p·r
//     (m = in bytes of bool mask; on GPUs, bf16/fp16, the bit mask of
//     Note [LoRA dropout kernel]: ceil(in / 8))
//   LoRA, dropout 0: A's linear keeps the input itself, which q, k, v share
//     (p·h once), o takes from the attention output (already kept), gate and
//     up share (p·h), down's input is the MLP product (p·i)
//   frozen NF4 projection (src/quant/linear4bit.cpp)            nothing: the
//     weight is dequantized again in backward, the input is not needed
//   RoPE                                                         nothing new (cos, sin)
//   attention: the trainer always passes a mask (padded or packed), so the
//     layer repeats k, v to all heads and SDPA runs the memory-efficient
//     kernel, which keeps q, k, v, out and the fp32 logsumexp   4·p·nh·d + 4·nh
//     and the mask converted to an additive bias, p per B·S² element
//   MLP: silu keeps gate, the product keeps silu(gate) and up   3·p·i
// plus the 16-bit copies of the layer's LoRA matrices (p·r·(in + out) each).
//
// Activation checkpointing (src/train/checkpoint.cpp) keeps each layer's
// input, L·T·h·p in all, and runs the forward without grad; in backward it
// recomputes one layer with grad on and differentiates it, so one layer's
// tensors above exist at a time. Without checkpointing all L are kept (and
// the layer inputs are not: no op keeps them).
//
// Loss phase. Kept: the layer inputs, the final norm's fp32 copy and the
// normed hidden state (4h + 4 + p·h per token), the bool attention mask
// (B·S²), cos/sin and the step's index tensors (2·p·d + 37 per token: ids,
// positions, labels, the loss's safe labels, mask and fp32 logsumexp).
// Allocated: grad_hidden (p·h per token) and, for one chunk at a time, the
// fp32 logits, logits − lse and their exp, all three live as exp runs:
// 12·V·c. The lm_head is the frozen embedding: no [V, h] gradient.
//
// Layer phase. Kept: the layer inputs, the recomputed layer (above), mask and
// bias (1 + p per B·S² element), cos/sin and indices. In flight when the
// product's backward runs: its incoming gradient and the gradients for
// silu(gate) and up (3·p·i per token, the saved gate, silu(gate) and up still
// held), the layer's output and the gradient coming into it (2·p·h); a moment
// earlier, the down projection's weight dequantized for its input gradient
// (i·h in the compute dtype) beside the first of those gradients; the larger
// of the two moments is taken. Later nodes of the layer free more than they
// allocate (the MLP's saved tensors go before attention's backward
// allocates its q, k, v gradients and fp32 accumulator).
//
// cuBLAS and cuBLASLt each keep a workspace per handle and stream, allocated
// through the caching allocator (32 MiB each on sm_90): 64 MiB. The CUDA
// context is outside the allocator, and so is the fragmentation reserve (the
// gap between reserved and allocated); plan.allocated_bytes is everything
// else, the figure to compare with torch.cuda.max_memory_allocated.
//
// Checked against the caching allocator's max allocated on an H100
// (bench/bench_train, Llama-3.2-1B, r 16 on q,k,v,o, dropout 0.05, bf16,
// checkpointing, paged 8-bit AdamW; tests/test_plan.cpp pins the points):
// predicted within +0.2% to +0.4% at micro 2 × 512, 4 × 1024 and 8 × 2048.
// The first two peak in the loss phase (the 1.58 GB of the logits chunk
// dominates), the third in the layer phase.
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

Nf4Bytes nf4_bytes(const DecoderConfig& m) {
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
std::vector<int64_t> lora_tensor_sizes(const DecoderConfig& m, const BudgetInputs& in) {
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

// Note [plan: fused layer halves]: what is alive, per token, at the peak of each half of
// the fused layer's backward (src/layer/fused_layer.cpp), besides the kept x and h1.
//   MLP half, at down_proj's LoRA input gradient: the incoming gradient (p·h, + fp32 rstd), n2
//     only where a gate/up LoRA without dropout takes it as its input, gate|up (2·p·i), the
//     gradient at the MLP product (p·i), the LoRA temporary (p·i) and dropout bit mask (i/8),
//     the gate/up LoRA inputs (dropped copy p·h and bit mask h/8 each with dropout) and A
//     outputs (p·r), with sandwich norms the gradient at down_proj's output (p·h); weights:
//     [Wg;Wu] and Wd dequantized, or, with a kept gate|up output (the top layer under selective
//     recompute), the larger of the two: [Wg;Wu] is dequantized only after Wd and the
//     product's gradient are freed.
//   attention half, at SDPA's backward: the layer's incoming gradient (the autograd engine
//     holds it until the layer's backward returns), the gradient at h1, n1 only where a q/k/v
//     LoRA without dropout takes it as its input, the packed copies of q, k, v (p·(q+k+v);
//     the GEMM output they came from is gone), SDPA's output and lse, the gradient at the attention output
//     and SDPA's dense copy of it (2·p·H·d),
//     the q, k, v gradients and SDPA's fp32 accumulator for dq (4·H·d), the q/k/v LoRA inputs
//     and o's dropout bit mask (with soft-capping, the eager attention's kept scores instead of
//     SDPA's: counted per B·H·S² element); weights: [Wq;Wk;Wv], Wo.
struct FusedHalves {
  double mlp_tok = 0, attention_tok = 0;          // bytes per token
  double mlp_weights = 0, attention_weights = 0;  // dequantized weights
};

FusedHalves fused_halves(const DecoderConfig& m, const BudgetInputs& in, bool kept_gate_up) {
  const int64_t h = m.hidden_size, i = m.intermediate_size, p = in.activation_bytes, r = in.lora_r;
  const int64_t hd = m.num_attention_heads * m.head_dim;
  const int64_t qkv = hd + 2 * m.num_key_value_heads * m.head_dim;
  const bool drop = in.lora_dropout > 0;
  // Offloaded, a recompute sheds its dropped copies (Note [shed LoRA inputs]): the bit mask a
  // LoRA, and the undropped input once.
  const bool shed = in.offload && in.gradient_checkpointing;
  auto lora_in = [&](const char* name, int64_t in_features) -> int64_t {
    if (!targets(in, name)) return 0;
    return p * r + (drop ? (shed ? 0 : p * in_features) + (in_features + 7) / 8 : 0);  // bit masks on GPUs
  };
  FusedHalves f;
  const bool n2_kept = (!drop || shed) && (targets(in, "gate_proj") || targets(in, "up_proj"));
  f.mlp_tok = double((n2_kept ? 2 : 1) * p * h + 4 + 2 * p * i + p * i + lora_in("gate_proj", h) + lora_in("up_proj", h));
  if (targets(in, "down_proj")) f.mlp_tok += double(p * i + (drop ? (i + 7) / 8 : 0));
  // Note [sandwich norms] (src/layer/fused_layer.cpp): the gradient at down_proj's output beside dy.
  if (m.pieces.sandwich_norms) f.mlp_tok += double(p * h);
  // Note [(1 + w) norms]: their backward is ATen's fp32 ops, three [N, h] fp32 temporaries at
  // once (x̂, dx̂ and their product) while the half's tensors are alive (the post-feed-forward
  // norm's, first in the MLP half's backward); Gemma 3's q head norms the same over H·d.
  if (m.pieces.norm_plus_one) f.mlp_tok += double(12 * h);
  const bool n1_kept = (!drop || shed) && (targets(in, "q_proj") || targets(in, "k_proj") || targets(in, "v_proj"));
  f.attention_tok = double((n1_kept ? 3 : 2) * p * h + 4 + p * qkv + p * hd + 4 * m.num_attention_heads + 2 * p * hd + p * qkv + 4 * hd +
                           lora_in("q_proj", h) + lora_in("k_proj", h) + lora_in("v_proj", h));
  if (targets(in, "o_proj")) f.attention_tok += double(p * r + (drop ? (hd + 7) / 8 : 0));
  if (m.pieces.norm_plus_one && m.pieces.qk_norm) f.attention_tok += double(12 * hd);
  f.mlp_weights = double((kept_gate_up ? 2 : 3) * i * h * in.dequant_bytes);
  f.attention_weights = double((qkv + hd) * h * in.dequant_bytes);
  return f;
}

namespace {

// The CUDA host allocator's block for `bytes`: the next power of two.
double pinned_block(double bytes) { return bytes <= 1 ? bytes : std::exp2(std::ceil(std::log2(bytes))); }

// How many layers keep their gate/up GEMM output [T, 2i] beside x and h1: with selective
// recompute on the GPU's fused layer, those of train.selective_layers that are not kept whole
// (Note [selective recompute]); 0 otherwise.
int64_t selective_gate_up_layers(const DecoderConfig& m, const BudgetInputs& in) {
  if (!in.gradient_checkpointing || in.activation_bytes != 2 || !in.selective_recompute) return 0;
  const int64_t L = m.num_hidden_layers;
  return std::max<int64_t>(0, kept_gate_up_layers(in.selective_layers, L) - whole_layers(in, L));
}

// offloaded_bytes, each tensor's size passed through `block` first.
template <typename Block>
double kept_between(const DecoderConfig& m, const BudgetInputs& in, Block block) {
  if (!in.gradient_checkpointing) return 0.0;
  const int64_t L = m.num_hidden_layers, p = in.activation_bytes, whole = whole_layers(in, L);
  const bool fused_layer = p == 2;  // the GPU's 16-bit path: the fused layer (Note [plan: the GPU paths])
  const double tokens = double(in.micro_batch_size) * double(in.seq_length);
  // The fused layer keeps the attention residual h1 beside each layer input, and the gate/up
  // outputs of selective recompute. The last `whole` layers keep all of a layer instead
  // (counted with the layer's tensors).
  const double gate_up =
      double(selective_gate_up_layers(m, in)) * block(tokens * double(2 * m.intermediate_size * p));
  // With sandwich norms it keeps down_proj's output too (Note [sandwich norms] in src/layer/fused_layer.cpp).
  const int64_t fused_kept = m.pieces.sandwich_norms ? 3 : 2;
  return double(fused_layer ? fused_kept : 1) * double(L - whole) * block(tokens * double(m.hidden_size * p)) + gate_up;
}

}  // namespace

double offloaded_bytes(const DecoderConfig& m, const BudgetInputs& in) {
  return kept_between(m, in, [](double bytes) { return bytes; });
}

double offloaded_pinned_bytes(const DecoderConfig& m, const BudgetInputs& in) {
  return kept_between(m, in, pinned_block);
}

std::vector<Component> memory_components(const DecoderConfig& m, const BudgetInputs& in) {
  using fmt::commas;
  using fmt::gib;
  std::vector<Component> out;
  const int64_t L = m.num_hidden_layers, h = m.hidden_size, i = m.intermediate_size, V = m.vocab_size;
  const int64_t nh = m.num_attention_heads, d = m.head_dim;
  const int64_t p = in.activation_bytes;
  const int64_t T = in.micro_batch_size * in.seq_length;

  // ---- NF4 base
  {
    const Nf4Bytes b = nf4_bytes(m);
    const int64_t absmax = in.double_quant ? b.absmax_double_quant : b.absmax_plain;
    Component c{"base_weights_nf4", "base weights, NF4", double(b.packed + absmax), "", "", 0};
    c.formula = commas(b.weights) + " weights in " + std::to_string(static_cast<int64_t>(decoder_linear_shapes(m).size()) * L) + " projections × 4 bit = " +
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
    const int64_t embed = V * h;
    const int64_t head = m.tie_word_embeddings ? 0 : V * h;
    // Everything but the NF4 projections: norms (Gemma's four a layer, q/k norms) and biases too.
    const int64_t n = total_params(m) - decoder_linear_params(m);
    const int64_t rest = n - embed - head;
    Component c{"base_weights_16bit", "embeddings, lm_head, norms", double(n * p), "", "", 0};
    c.formula = "embed_tokens " + commas(V) + " × " + commas(h) +
                (m.tie_word_embeddings ? " (lm_head tied to it: counted once)"
                                       : " + lm_head " + commas(V) + " × " + commas(h)) +
                " + " + commas(rest) + " norm and bias weights, × " + std::to_string(p) + " B (not quantized)";
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
        // Note [paged state in managed memory] (optim/state_storage.cpp): all of it is managed
        // memory preferring the GPU, outside the caching allocator, and resident on the GPU
        // unless the driver pages it out, so the total counts it and allocated_bytes does not.
        c.pageable_bytes = c.bytes;
        c.in_allocator = false;
        c.detail = "paged: CUDA managed memory preferring the GPU (outside the caching allocator), which the "
                   "driver can move to the host under pressure; counted on the GPU (bitsandbytes pages only "
                   "buffers of tensors with >= 100,000 elements: " +
                   gib(double(pageable * L)) + " here" + (pageable == 0 ? ", every LoRA tensor is smaller" : "") + ")";
      }
    }
    out.push_back(c);
  }
  // ---- what a step allocates: Note [plan memory model]
  const int64_t B = in.micro_batch_size, S = in.seq_length;
  // Note [plan: the GPU paths]: bf16/fp16 run on a GPU, where the norm is ATen's fused
  // kernel (it keeps the 16-bit input and rstd, no fp32 copy), the checkpointed layer is the
  // fused one (layer/fused_layer.h) and the cross-entropy computes its gradient in forward.
  // Only packed rows carry an attention mask (right-padded rows attend causally), and not where
  // flash's variable-length kernel takes them (bf16; not Gemma 2's soft-capped attention, nor a
  // head size flash lacks: Note [attention paths] in src/model/attention.cpp).
  const bool gpu16 = p == 2;
  const bool fused_layer = gpu16 && in.gradient_checkpointing;
  const double tokens = double(T);
  const bool packed_flash = in.packed && in.flash_attention && m.attn_logit_softcapping <= 0 && d % 8 == 0 && d <= 256;
  const bool masked = in.packed && !packed_flash;
  const double square = masked ? double(B) * double(S) * double(S) : 0.0;  // B·S² mask elements
  const int64_t nkv = m.num_key_value_heads;
  // cos, sin [B, S, d] (twice with Gemma 3's local RoPE base: the fused layer's windowed layers
  // share one more pair, Note [the family's pieces] in src/layer/fused_layer.cpp) + indices.
  const int64_t step_tok = (m.rope_local_theta > 0 ? 4 : 2) * p * d + kStepIndexBytesPerToken;
  // What a layer keeps for its LoRAs a token: A's output, and the input A saw. Without dropout
  // that is the input itself, kept once for the projections sharing it (o_proj's is SDPA's
  // output, counted with attention). With dropout the generic layer keeps each dropped copy and
  // its mask (bool on the CPU); the GPU's fused layer keeps the dropped copies only where it
  // cannot shed them (down_proj's), elsewhere the shared input once and a bit mask a LoRA
  // (Note [shed LoRA inputs] in src/layer/fused_layer_parts.h).
  const bool drop = in.lora_dropout > 0;
  const bool qkv_lora = targets(in, "q_proj") || targets(in, "k_proj") || targets(in, "v_proj");
  const bool gu_lora = targets(in, "gate_proj") || targets(in, "up_proj");
  int64_t lora_tok = 0;
  for (const auto& s : decoder_linear_shapes(m)) {
    if (!targets(in, s.name.c_str())) continue;
    lora_tok += p * in.lora_r;
    if (!drop) continue;
    const bool shed = gpu16 && s.name != "down_proj";
    lora_tok += gpu16 ? (s.in_features + 7) / 8 : s.in_features;  // the mask
    if (!shed) lora_tok += p * s.in_features;                      // the dropped copy
  }
  if (!drop || gpu16) {  // the undropped inputs, once for the projections sharing one
    if (qkv_lora) lora_tok += p * h;
    if (gu_lora) lora_tok += p * h;
    if (!drop && targets(in, "down_proj")) lora_tok += p * i;
  }
  // Gemma's sandwich norms: four a layer; the fused layer keeps their inputs (o_proj's and
  // down_proj's outputs) and makes their 1/rms again (Note [sandwich norms]).
  const bool sandwich = m.pieces.sandwich_norms;
  const int64_t norm_tok = gpu16 ? 2 * (p * h + 4) + (sandwich ? 2 * p * h : 0) : (sandwich ? 4 : 2) * (4 * h + 4);
  // With a mask k, v are repeated to every head (the memory-efficient kernel); without, SDPA
  // takes them grouped.
  const int64_t attn_tok = (masked ? 4 * p * nh * d : p * (2 * nh * d + 2 * nkv * d)) + 4 * nh;
  // The generic layer keeps gate, up and silu(gate) (3·p·i); the fused layer without
  // checkpointing (the GPU's 16-bit path, Note [fused layer without checkpointing]) keeps
  // gate|up alone and silu(gate)·up only as down_proj's LoRA input (counted with LoRA).
  const int64_t mlp_factor = gpu16 ? 2 : 3;
  const int64_t mlp_tok = mlp_factor * p * i;
  const int64_t layer_tok = norm_tok + attn_tok + mlp_tok + lora_tok;
  // Gemma 2's soft-capped attention is the eager one (Note [the family's pieces] in
  // src/layer/fused_layer.cpp): its graph keeps the capped scores' tanh (p), the fp32 softmax
  // (4) and its 16-bit copy (p) for every head's [S, S]; not its backward's temporaries.
  const double capped_scores =
      m.attn_logit_softcapping > 0 ? double(B) * double(nh) * double(S) * double(S) * double(2 * p + 4) : 0.0;
  // One layer's kept tensors: per token, its bias per mask element, its 16-bit LoRA copies.
  const double layer_bytes =
      tokens * double(layer_tok) + square * double(p) + capped_scores + double(p * lora_per_layer);
  // Layers kept whole at the peak: every layer without checkpointing, the `whole` ones with it
  // (train.no_recompute_layers, Note [layers not recomputed]); under the generic checkpoint the
  // one being recomputed.
  const int64_t whole = whole_layers(in, L);
  const double kept_layers = !in.gradient_checkpointing ? double(L) : whole > 0 ? double(whole) : 1.0;
  const double kept_whole = !in.gradient_checkpointing ? double(L) * layer_bytes : double(whole) * layer_bytes;
  // The fused layer keeps the attention residual h1 beside each layer input, and with
  // selective recompute each layer's gate/up GEMM output [T, 2i] (Note [selective recompute]).
  // The last `whole` layers keep all of a layer instead (layer_bytes: their input and h1 among it).
  const int64_t kept_layers_gu = selective_gate_up_layers(m, in);
  const bool selective = kept_layers_gu > 0;
  const double kept_gate_up = double(kept_layers_gu) * tokens * double(2 * i * p);
  const int64_t boundary_layers = L - whole;
  // Offloaded (Note [offloaded checkpoints] in src/layer/offload.cpp): these wait in host
  // memory; the GPU holds at most two layers' worth, in flight to or from the host.
  const double all_boundaries = offloaded_bytes(m, in);
  const bool offloaded = in.offload && in.gradient_checkpointing && boundary_layers > 0;
  const double on_gpu_share = offloaded ? double(std::min<int64_t>(2, boundary_layers)) / double(boundary_layers) : 1.0;
  const double boundaries = all_boundaries * on_gpu_share;
  const double step_bytes = tokens * double(step_tok) + square;  // + the bool mask
  const bool any_boundaries = in.gradient_checkpointing && boundary_layers > 0;
  const std::string boundary_text =
      any_boundaries ? std::string(!fused_layer ? "layer inputs "
                                   : sandwich   ? "layer inputs, attention residuals and down_proj outputs 3 × "
                                                : "layer inputs and attention residuals 2 × ") +
                                      std::to_string(boundary_layers) + " × " + commas(T) + " tokens × " + commas(h) +
                                      " × " + std::to_string(p) + " B = " + gib(all_boundaries - kept_gate_up) + " + " +
                                      (selective ? "gate/up outputs kept (selective recompute) " + std::to_string(kept_layers_gu) +
                                                       " × " + commas(T) + " tokens × 2 × " + commas(i) + " × " +
                                                       std::to_string(p) + " B = " + gib(kept_gate_up) + " + "
                                                 : std::string()) +
                                      (offloaded ? "[all of it offloaded to host memory; on the GPU " +
                                                       std::to_string(std::min<int64_t>(2, boundary_layers)) +
                                                       " layers' worth, " + gib(boundaries) + "] + "
                                                 : std::string())
                                : std::string();
  const std::string layers_text = !in.gradient_checkpointing ? std::to_string(L) + " layers (no checkpointing)"
                                  : whole > 0 ? "the last " + std::to_string(whole) + " of " + std::to_string(L) +
                                                    " layers kept whole (not recomputed)"
                                  : selective ? "one layer recomputed in backward but its gate/up GEMM"
                                              : "one layer recomputed in backward";

  // Loss phase.
  const int64_t chunk = std::min<int64_t>(kCeChunkTokens, T);
  // The final norm's saved input (16-bit with the fused norm, an fp32 copy otherwise) and output.
  const double loss_final = tokens * double((gpu16 ? p * h : 4 * h) + 4 + p * h);
  const double loss_act = boundaries + kept_whole + loss_final + step_bytes;
  // The fused cross-entropy (16-bit on GPUs, Note [fused cross-entropy] in src/model/loss.cpp)
  // keeps the gradient of the hidden state from forward (p·h per token) and scales it in fp32
  // in backward (4·h + p·h more); its logits chunk is 16-bit, overwritten in place by the
  // gradient, beside the chunk's product with W. The reference path recomputes fp32 logits.
  const double loss_ws = gpu16 ? tokens * double(p * h + 4 * h + p * h) : tokens * double(p * h);
  const double loss_logits = gpu16 ? double(chunk) * double(V * p + h * p)
                                   : double(chunk) * double(V) * double(kCeChunkBytesPerLogit);
  const double loss_total = loss_act + loss_ws + loss_logits;
  // Layer phase.
  int64_t largest_linear = 0;
  for (const auto& s : decoder_linear_shapes(m)) largest_linear = std::max(largest_linear, s.in_features * s.out_features);
  double layer_act = boundaries + kept_layers * layer_bytes + step_bytes;
  const double product_grads = tokens * double(3 * p * i);
  const double down_dequant = double(i * h * in.dequant_bytes) + tokens * double(p * i);
  const double out_and_grad = tokens * double(2 * p * h);
  double layer_ws = std::max(product_grads, down_dequant) + out_and_grad;
  // The fused layer (Note [fused decoder layer]) differentiates one half at a time.
  FusedHalves fused = fused_halves(m, in, selective);
  if (selective) fused.mlp_tok -= double(2 * p * i);  // the top layer's gate|up is among the kept
  const bool fused_mlp_peak = fused.mlp_tok * tokens + fused.mlp_weights >=
                              fused.attention_tok * tokens + square * double(1 + p) + capped_scores + fused.attention_weights;
  // With layers kept whole the top one is such a layer: its backward is the one without
  // checkpointing (the generic temporaries above), not a recomputed half's.
  const bool fused_halves_peak = fused_layer && whole == 0;
  if (fused_halves_peak) {
    layer_act = boundaries + step_bytes +
                (fused_mlp_peak ? fused.mlp_tok * tokens
                                : fused.attention_tok * tokens + square * double(1 + p) + capped_scores);
    layer_ws = fused_mlp_peak ? fused.mlp_weights : fused.attention_weights;
  }
  const double layer_total = layer_act + layer_ws;
  const bool loss_peak = loss_total >= layer_total;
  const std::string other =
      loss_peak ? "the layer phase peaks lower: activations and temporaries " + gib(layer_total) + " against " +
                      gib(loss_total) + " here"
                : "the loss phase peaks lower: activations and temporaries " + gib(loss_total) + " against " +
                      gib(layer_total) + " here";
  {
    Component c{"activations", "activations", loss_peak ? loss_act : layer_act, "", "", 0};
    const std::string per_layer = commas(layer_tok) + " B/token/layer";
    const std::string steps = "; mask, cos/sin, indices " + gib(step_bytes);
    if (loss_peak)
      c.formula = "at the loss backward: " + boundary_text +
                  (kept_whole > 0 ? layers_text + ", " + per_layer +
                                        (capped_scores > 0 ? " + soft-capped attention scores " + gib(capped_scores) +
                                                                 " a layer"
                                                           : std::string()) +
                                        " = " + gib(kept_whole) + " + "
                                  : "") +
                  (gpu16 ? "final norm's input and output " : "final norm's fp32 copy and output ") + gib(loss_final) + steps;
    else if (fused_halves_peak)
      c.formula = "at the top layer's backward (fused layer, " +
                  std::string(fused_mlp_peak ? "MLP" : "attention") + " half): " + boundary_text + "that half's " +
                  commas(int64_t(fused_mlp_peak ? fused.mlp_tok : fused.attention_tok)) + " B/token × " + commas(T) +
                  " tokens" +
                  (!fused_mlp_peak && capped_scores > 0
                       ? " + its soft-capped attention's scores (tanh, fp32 softmax, its copy) " + gib(capped_scores)
                       : std::string()) +
                  " = " + gib(layer_act - boundaries - step_bytes) + steps;
    else
      c.formula = "at the top layer's backward: " + boundary_text + layers_text + ", " + per_layer + " × " +
                  commas(T) + " tokens + attention bias" +
                  (capped_scores > 0 ? " + soft-capped attention scores" : std::string()) + " = " +
                  gib(kept_layers * layer_bytes) + steps;
    c.detail = "per layer and token: norms " + commas(norm_tok) + ", attention q, k, v (repeated to " +
               std::to_string(nh) + " heads), out, lse = " + commas(attn_tok) + ", MLP " + std::to_string(mlp_factor) + "·p·i = " + commas(mlp_tok) +
               ", LoRA = " + commas(lora_tok) +
               (in.lora_dropout <= 0 ? " (A outputs + kept inputs)"
                : gpu16              ? " (A outputs + bit masks + undropped inputs, down_proj's dropped)"
                                     : " (A outputs + dropped inputs and masks)") +
               "; " + other;
    out.push_back(c);
  }
  {
    Component c{"backward_workspace", "backward temporaries", loss_peak ? loss_ws : layer_ws, "", "", 0};
    if (loss_peak && gpu16)
      c.formula = "gradient of the final hidden state, kept from the forward and scaled in fp32, " + commas(T) +
                  " tokens × " + commas(h) + " × (2 × " + std::to_string(p) + " + 4) B";
    else if (loss_peak)
      c.formula = "gradient of the final hidden state, " + commas(T) + " tokens × " + commas(h) + " × " +
                  std::to_string(p) + " B";
    else if (fused_halves_peak)
      c.formula = fused_mlp_peak ? (selective ? "the fused layer's [gate; up] dequantized (after down_proj's is freed): " +
                                                    commas(2 * i * h)
                                              : "the fused layer's [gate; up] and down_proj dequantized: " +
                                                    commas(3 * i * h)) +
                                       " × " + std::to_string(in.dequant_bytes) + " B = " + gib(fused.mlp_weights)
                                 : "the fused layer's [q; k; v] and o_proj dequantized = " + gib(fused.attention_weights);
    else
      c.formula = (product_grads >= down_dequant
                       ? "the MLP product's gradients (its own, silu(gate)'s, up's): " + commas(T) + " tokens × 3 × " +
                             commas(i) + " × " + std::to_string(p) + " B = " + gib(product_grads)
                       : "down_proj dequantized, " + commas(i * h) + " × " + std::to_string(in.dequant_bytes) +
                             " B, beside the product's gradient = " + gib(down_dequant)) +
                  " + the layer's output and its gradient " + gib(out_and_grad);
    c.detail = "NF4 projections are dequantized one at a time (" + commas(largest_linear) + " × " +
               std::to_string(in.dequant_bytes) + " B at most) and freed after their GEMM";
    out.push_back(c);
  }
  {
    const double unchunked = tokens * double(V) * double(p + 4 + 4);
    Component c{"logits_loss", "logits + cross-entropy", loss_peak ? loss_logits : 0.0, "", "", 0};
    c.formula = "chunked cross-entropy, " + commas(chunk) + " tokens at a time × " + commas(V) +
                (gpu16 ? " vocab × " + std::to_string(p) + " B (16-bit logits, turned into their gradient in place) = "
                       : std::string(" vocab × 12 B (fp32 logits, logits − lse and their exp) = ")) +
                gib(loss_logits) +
                (loss_peak ? "" : "; freed before the peak (layer phase)");
    c.detail = "unchunked, as transformers computes it (" + std::to_string(p) +
               "-byte logits, their fp32 copy and the fp32 log-softmax for all " + commas(T) + " tokens): " +
               gib(unchunked);
    out.push_back(c);
  }
  // ---- runtime
  out.push_back({"cublas_workspace", "cuBLAS workspaces", kCublasBytes,
                 "cuBLAS + cuBLASLt, " + fmt::fixed(kCublasBytes / kMiB / 2, 0) +
                     " MiB each, allocated through the caching allocator",
                 "", 0});
  {
    Component c{"cuda_context", "CUDA context", kCudaContextBytes,
                "CUDA context " + fmt::fixed(kCudaContextBytes / kMiB, 0) +
                    " MiB (typical for torch 2.11 + CUDA 13 with lazy module loading)",
                "outside the caching allocator", 0};
    c.in_allocator = false;
    out.push_back(c);
  }
  {
    double transient = 0;
    for (const auto& c : out)
      if (c.key == "activations" || c.key == "backward_workspace" || c.key == "logits_loss") transient += c.bytes;
    Component c{"fragmentation", "allocator fragmentation", kFragmentationFraction * transient,
                fmt::fixed(kFragmentationFraction * 100, 0) +
                    "% of what is allocated and freed every step (activations, temporaries, loss) = " +
                    fmt::fixed(kFragmentationFraction * 100, 0) + "% × " + gib(transient),
                "reserved by the caching allocator but not allocated", 0};
    c.in_allocator = false;
    out.push_back(c);
  }
  return out;
}

double allocated_bytes(const std::vector<Component>& components) {
  double t = 0;
  for (const auto& c : components)
    if (c.in_allocator) t += c.bytes;
  return t;
}

}  // namespace qlora::plan
