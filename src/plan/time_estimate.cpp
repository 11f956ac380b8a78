// The plan's time estimate: a step's FLOPs, bytes and kernels, at rates measured on Hopper.
//
// Note [plan time model]
// ~~~~~~~~~~~~~~~~~~~~~~
// A step on the GPU is the sum of four parts, each at its own rate (constants.h, "time"):
//   GEMMs      the projections, lm_head and the LoRA products, at kGemmEfficiency of the peak
//   attention  2·S·H·d FLOPs a token and layer forward, twice that backward, once more when the
//              layer is recomputed, at kAttentionEfficiency of the peak
//   memory     what the element-wise kernels read and write, and the NF4 dequantization, at
//              kBandwidthEfficiency of the datasheet bandwidth
//   gaps       kKernelGapSeconds of idle between two kernels
// and the host, issuing one kernel at a time (kHostSecondsPerKernel), is a floor under that sum:
// a small step waits for the host, not the GPU (1B at 2 × 512 on an H200).
//
// The element-wise bytes, in elements of the activation dtype a token and layer (h hidden,
// q = H·d, kv = KV·d, I intermediate; a LoRA group is the projections that share an input,
// q|k|v and gate|up, with input width w and output width o, the sum of its outputs):
//   forward    the two norms 2h each, RoPE 2(q + kv), v's copy 2kv, SwiGLU 3I, the residuals
//              read by o_proj's and down_proj's GEMMs 2h; a LoRA group: its dropout 2w (p > 0),
//              A's read w, the B products written and read back by the base GEMM 2o
//   recompute  (a layer recomputed, full or selective) the norms, RoPE and v's copy again,
//              SwiGLU when down_proj has a LoRA (m is its input), every LoRA group's forward
//              passes; o_proj's and down_proj's GEMMs do not run again
//   backward   down_proj's input gradient I and SwiGLU's backward 5I, each norm's backward 4h
//              and its input's gradient h, RoPE's backward 2(q + kv), the attention output's
//              gradient q; a LoRA group: dA's read of the input w, dB's of the output gradient
//              o, the input gradient written and read back by the base GEMM 2w, the dropout's
//              backward w (p > 0)
//   the loss   3V a token: a logits chunk written, read, and overwritten by its gradient.
// Kernels: a layer's forward about 18 + 6 a LoRA projection, its backward 32 + 10, a recompute
// as the forward; a micro batch adds about 30 (embedding, final norm, loss setup) and 5 a loss
// chunk, the optimizer step about 20. The H200 profiles of 2026-12-03 counted 2,522 kernels a
// step at 8 × 2048 and 5,180 for the 8B (this counts 2,626 and 5,062).
//
// What this was checked against: the 28 bench_train rows measured on an H200 on 2026-12-02
// and 2026-12-03 (tests/data/plan/h200_rows.json; PlanMeasured.TimeWithinTenPercentOfTheH200):
// the estimate is within -3%..+9% of the 23 GPU-bound ones and -10%..+21% of the 5 host-bound
// 2 × 512 ones, whose host moved that much between runs (the flat 40% of the peak it replaced
// read -31%..+51%).
// The layer model is the GPU's fused layer; the generic fp32 path and GPUs other than Hopper are
// estimated with the same fractions, unmeasured.
#include "time_estimate.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "constants.h"
#include "format.h"

namespace qlora::plan {
namespace {

using fmt::commas;
using fmt::fixed;

bool targets(const BudgetInputs& in, const char* name) {
  return std::find(in.lora_targets.begin(), in.lora_targets.end(), name) != in.lora_targets.end();
}

// A layer's widths: hidden, q = H·d, kv = KV·d, intermediate.
struct Widths {
  double h, q, kv, I;
  explicit Widths(const DecoderConfig& m)
      : h(double(m.hidden_size)),
        q(double(m.num_attention_heads * m.head_dim)),
        kv(double(m.num_key_value_heads * m.head_dim)),
        I(double(m.intermediate_size)) {}
};

// The LoRA groups of a layer: {input width, summed output width}, those with a target only.
std::vector<std::pair<double, double>> lora_groups(const Widths& wd, const BudgetInputs& in) {
  const auto [h, q, kv, I] = wd;
  std::vector<std::pair<double, double>> g;
  const double qkv = (targets(in, "q_proj") ? q : 0) + (targets(in, "k_proj") ? kv : 0) + (targets(in, "v_proj") ? kv : 0);
  if (qkv > 0) g.emplace_back(h, qkv);
  if (targets(in, "o_proj")) g.emplace_back(q, h);
  const double gu = (targets(in, "gate_proj") ? I : 0) + (targets(in, "up_proj") ? I : 0);
  if (gu > 0) g.emplace_back(h, gu);
  if (targets(in, "down_proj")) g.emplace_back(I, h);
  return g;
}

struct LayerTraffic {
  double forward = 0, recompute = 0, backward = 0;  // elements a token
  double forward_kernels = 0, backward_kernels = 0;
};

// Note [plan time model]: one layer's element-wise traffic and kernels.
LayerTraffic layer_traffic(const DecoderConfig& m, const BudgetInputs& in) {
  const Widths wd(m);
  const auto [h, q, kv, I] = wd;
  const double dropout = in.lora_dropout > 0 ? 1.0 : 0.0;
  double lora_forward = 0, lora_backward = 0;
  for (const auto& [w, o] : lora_groups(wd, in)) {
    lora_forward += 2 * w * dropout + w + 2 * o;
    lora_backward += 3 * w + o + w * dropout;
  }
  const double swiglu_for_down = targets(in, "down_proj") ? 3 * I : 0;
  LayerTraffic t;
  t.forward = 4 * h + 2 * (q + kv) + 2 * kv + 3 * I + 2 * h + lora_forward;
  t.recompute = 4 * h + 2 * (q + kv) + 2 * kv + swiglu_for_down + lora_forward;
  t.backward = 6 * I + 10 * h + 2 * (q + kv) + q + lora_backward;
  const double projections = double(in.lora_targets.size());
  t.forward_kernels = 18 + 6 * projections;
  t.backward_kernels = 32 + 10 * projections;
  return t;
}

}  // namespace

TimeEstimate estimate_time(const DecoderConfig& m, const BudgetInputs& in, int64_t accumulation, int64_t world,
                           const GpuSpec* gpu, const std::string& precision, int64_t lora_params) {
  TimeEstimate t;
  if (!gpu || !gpu->has_throughput()) {
    t.why_unavailable = gpu ? "no throughput figures for " + gpu->name + "; name a preset with --gpu for a time estimate"
                            : "no GPU given; pass --gpu for a time estimate";
    return t;
  }
  // FLOPs a token, with N the decoder projection weights, V·h the lm_head, S the sequence
  // length, P the LoRA parameters:
  //   forward  2N + 2Vh (GEMMs) + 2·L·S·nh·d (causal attention: QKᵀ and PV, half the square)
  //   backward grad w.r.t. inputs only for the frozen base: 2N + 2Vh, attention 2×,
  //            LoRA weights and inputs: 4P
  //   recompute (checkpointing): the generic checkpoint (fp32) runs the decoder forward again,
  //            2N + attention; the GPU's fused layer (bf16/fp16, Note [fused decoder layer])
  //            keeps each layer's input and attention residual, so it recomputes q, k, v and
  //            gate/up but neither o_proj nor down_proj, 2·(N - L·h·(H·d + i)) + attention
  //            (with Gemma's sandwich norms o_proj too: 2·(N - L·h·i));
  //            selective leaves out the gate/up GEMMs too, 2·L·h·2i (a layer at a time); the
  //            last whole_layers recompute nothing (Note [layers not recomputed])
  const double N = double(decoder_linear_params(m)), Vh = double(m.vocab_size * m.hidden_size);
  const bool fused_layer = in.gradient_checkpointing && in.activation_bytes == 2;
  const int64_t L = m.num_hidden_layers;
  // Gemma's sandwich norms: o_proj's output is recomputed (down_proj's is kept), Note [sandwich
  // norms] in src/layer/fused_layer.cpp.
  const int64_t o_cols = m.pieces.sandwich_norms ? 0 : m.num_attention_heads * m.head_dim;
  const double not_recomputed =
      fused_layer ? double(L) * double(m.hidden_size) * double(o_cols + m.intermediate_size) : 0.0;
  const double attn = 2.0 * double(L) * double(in.seq_length) * double(m.num_attention_heads * m.head_dim);
  const double P = double(lora_params);
  const int64_t whole = whole_layers(in, L);
  const int64_t kept_gu = std::max<int64_t>(0, kept_gate_up_layers(in.selective_layers, L) - whole);
  const bool selective = in.gradient_checkpointing && in.selective_recompute && in.activation_bytes == 2 && kept_gu > 0;
  const double gate_up = 2.0 * double(kept_gu) * double(m.hidden_size) * 2.0 * double(m.intermediate_size);
  const int64_t recomputed = in.gradient_checkpointing ? L - whole : 0;  // layers that run forward twice
  const double share = double(recomputed) / double(L);
  const double gemm = (2 * N + 2 * Vh + 2 * P) + (2 * N + 2 * Vh + 4 * P) +
                      (in.gradient_checkpointing ? 2 * (N - not_recomputed + P) * share - (selective ? gate_up : 0.0) : 0.0);
  t.attention_flops_per_token = attn + 2 * attn + attn * share;
  t.flops_per_token = gemm + t.attention_flops_per_token;
  t.tokens_per_step = double(in.micro_batch_size * in.seq_length * accumulation);
  t.flops_per_step = t.flops_per_token * t.tokens_per_step;
  t.peak_tflops = precision == "bf16" ? gpu->bf16_tflops : precision == "fp16" ? gpu->fp16_tflops : gpu->fp32_tflops;
  if (!(t.peak_tflops > 0)) {
    t.why_unavailable = gpu->name + " has no " + precision + " tensor throughput on record";
    return t;
  }
  const double peak = t.peak_tflops * 1e12;
  t.gemm_seconds_per_step = gemm * t.tokens_per_step / (peak * kGemmEfficiency);
  t.attention_seconds_per_step = t.attention_flops_per_token * t.tokens_per_step / (peak * kAttentionEfficiency);

  // Note [plan time model]: the element-wise passes and the kernels.
  const LayerTraffic layer = layer_traffic(m, in);
  const double elements = double(L) * (layer.forward + layer.backward) + double(recomputed) * layer.recompute +
                          3.0 * double(m.vocab_size);
  t.memory_bytes_per_step = elements * double(in.activation_bytes) * t.tokens_per_step;
  // Dequantization: every projection is expanded from NF4 once per forward and once per
  // backward, for each micro batch: read the 4-bit codes + absmax, write the 16-bit weight.
  // The generic checkpoint expands them once more in its recompute; the fused layer's
  // backward reuses what its recompute expanded.
  const double passes = (in.gradient_checkpointing && !fused_layer ? 3.0 : 2.0) * double(accumulation);
  const double bytes_per_pass = N * (0.5 + double(in.dequant_bytes)) + N / double(kNf4BlockSize);
  const double bandwidth = gpu->memory_bandwidth_gbs * 1e9 * kBandwidthEfficiency;
  if (bandwidth > 0) {
    t.memory_seconds_per_step = t.memory_bytes_per_step / bandwidth;
    t.dequant_seconds_per_step = passes * bytes_per_pass / bandwidth;
  }
  const double chunks = std::ceil(double(in.micro_batch_size * in.seq_length) / double(kCeChunkTokens));
  const double per_micro = double(L) * (layer.forward_kernels + layer.backward_kernels) +
                           double(recomputed) * layer.forward_kernels + 30 + 5 * chunks;
  t.kernels_per_step = per_micro * double(accumulation) + 20;
  t.gap_seconds_per_step = t.kernels_per_step * kKernelGapSeconds;
  t.host_seconds_per_step = t.kernels_per_step * kHostSecondsPerKernel;
  const double on_gpu = t.gemm_seconds_per_step + t.attention_seconds_per_step + t.memory_seconds_per_step +
                        t.dequant_seconds_per_step + t.gap_seconds_per_step;
  t.host_bound = t.host_seconds_per_step > on_gpu;
  // Offloaded checkpoints: copies on their own streams beside the compute, the step no shorter
  // than them (Note [offloaded checkpoints]).
  if (in.offload)
    t.offload_seconds_per_step = 2.0 * offloaded_bytes(m, in) * double(accumulation) / kHostLinkBytesPerSecond;
  t.seconds_per_step = std::max({on_gpu, t.host_seconds_per_step, t.offload_seconds_per_step});
  t.utilisation = t.flops_per_step / (peak * t.seconds_per_step);
  t.hours_per_1000_steps = t.seconds_per_step * 1000.0 / 3600.0;
  t.tokens_per_second = t.tokens_per_step * double(world) / t.seconds_per_step;
  t.available = true;

  const std::string recompute_text =
      !in.gradient_checkpointing ? ""
      : whole == L               ? " + no recompute (every layer kept whole)"
      : whole > 0 ? " + recompute in " + std::to_string(L - whole) + " of " + std::to_string(L) + " layers" +
                        (selective ? ", selective" : "")
      : selective   ? " + selective recompute"
      : fused_layer ? " + recompute without o_proj and down_proj"
                    : " + recompute";
  const auto ms = [](double s) { return s >= 1 ? fixed(s, 2) + " s" : fixed(s * 1e3, s < 0.1 ? 1 : 0) + " ms"; };
  t.formula = fixed(t.flops_per_token / 1e9, 2) + " GFLOP/token (forward + input-gradient backward" + recompute_text +
              ") × " + commas(int64_t(t.tokens_per_step)) + " tokens/step: GEMMs " + ms(t.gemm_seconds_per_step) +
              " at " + fixed(kGemmEfficiency * 100, 0) + "% of " + fixed(t.peak_tflops, 0) + " TFLOP/s " + precision +
              ", attention " + ms(t.attention_seconds_per_step) + " at " + fixed(kAttentionEfficiency * 100, 0) +
              "%, element-wise passes " + fixed(t.memory_bytes_per_step / 1e9, 1) + " GB " +
              ms(t.memory_seconds_per_step) + " + NF4 dequantization " + ms(t.dequant_seconds_per_step) + " at " +
              fixed(kBandwidthEfficiency * 100, 0) + "% of " + fixed(gpu->memory_bandwidth_gbs, 0) + " GB/s, ~" +
              commas(int64_t(t.kernels_per_step)) + " kernels: gaps " + ms(t.gap_seconds_per_step) +
              ", the host issuing them " + ms(t.host_seconds_per_step) +
              (t.host_bound ? " (the host is the floor: larger micro batches cost little more a step)" : "") +
              (in.offload ? ", offloaded checkpoints " + fixed(2.0 * offloaded_bytes(m, in) * double(accumulation) / 1e9, 1) +
                                " GB over the host link " + ms(t.offload_seconds_per_step) + " at an assumed " +
                                fixed(kHostLinkBytesPerSecond / 1e9, 0) + " GB/s beside the compute" +
                                (t.offload_seconds_per_step > on_gpu ? " (the link is the floor)" : "")
                          : std::string());
  t.note = "an estimate from rates measured on an H200 (GEMMs, attention, bandwidth, the host; other GPUs "
           "assumed to reach the same fractions of their datasheet), " +
           fixed(t.utilisation * 100, 0) + "% of the peak overall; sequences shorter than max_seq_length run faster";
  return t;
}

}  // namespace qlora::plan
