// kernels: the CUDA side of qlora, as plain C++ with raw pointers and sizes.
// Compiled by nvcc into its own library (qlora_kernels) that never sees a
// torch header; the modules above call it through this header alone.
//
// Every launcher takes device pointers, sizes and a stream (a cudaStream_t: CUstream_st* is
// the type cudaStream_t names, declared here so this header needs no CUDA header; null is the
// legacy default stream) and returns the launch's cudaError_t as an int (0: success; the text
// is cuda_error_string(code)). Launches are asynchronous on `stream`.
#pragma once

#include <cstddef>
#include <cstdint>

struct CUstream_st;

namespace qlora::kernels {

// ---------------------------------------------------------------- devices

struct DeviceInfo {
  int index = -1;
  char name[256] = {0};
  size_t total_bytes = 0;   // global memory
  size_t free_bytes = 0;    // free right now (cudaMemGetInfo)
  int cc_major = 0;         // compute capability
  int cc_minor = 0;
  int multiprocessors = 0;
};

// Fills up to `max_devices` entries of `out` and returns how many CUDA devices
// are visible; returns 0 when there is no driver or no GPU, with the CUDA
// runtime's reason written to `reason` (NUL-terminated, may be truncated).
int query_devices(DeviceInfo* out, int max_devices, char* reason, size_t reason_size);

// The CUDA runtime's text for a launcher's return code.
const char* cuda_error_string(int code);

// Element types of kernel inputs / outputs (fp32, bf16 / fp16 as their 16 bits).
enum class FloatType { kF32, kBF16, kF16 };

// ---------------------------------------------------------------- managed memory
// The paged optimizer's state (optim/state_storage.h, Note [paged state in managed memory]).

// True when `device` supports managed memory with concurrent access (what prefetching needs);
// otherwise false with the reason in `reason`.
bool managed_memory_supported(int device, char* reason, size_t reason_size);

// Zero-filled managed memory of `bytes` preferring `device`, refused with cudaErrorMemoryAllocation
// (and nothing allocated) when `bytes` exceeds what the GPU has free; *free_bytes (if not null)
// gets what cudaMemGetInfo reported. Free with managed_free.
int managed_alloc(void** ptr, size_t bytes, int device, size_t* free_bytes);
int managed_free(void* ptr);

// Migrates [ptr, ptr + bytes) of managed memory to `device`, or to the host for device < 0,
// asynchronously on `stream`.
int managed_prefetch(const void* ptr, size_t bytes, int device, CUstream_st* stream);

// ---------------------------------------------------------------- NF4
// The format is quant/nf4_ref.h's (Note [NF4 layout], [NF4 double quantization]): packed codes
// high nibble first, blocks of 64, and per block either an fp32 absmax or a double-quantized one.

// The block scales of one NF4 tensor, as device pointers. Plain: `absmax` set, the rest null.
// Double-quantized: absmax = null, and the block's scale is, in fp32 with two roundings (no FMA),
//   code2[absmax_q[b]] * absmax2[b / 256] + offset.
struct Nf4Scales {
  const float* absmax = nullptr;      // [blocks] fp32
  const uint8_t* absmax_q = nullptr;  // [blocks] uint8
  const float* absmax2 = nullptr;     // [ceil(blocks / 256)] fp32
  const float* code2 = nullptr;       // [256] fp32, the dynamic map
  float offset = 0.0f;
};

// out[i] = nf4_code[q_i] * scale[i / 64] in fp32, rounded to nearest-even for bf16 / fp16:
// bit for bit quant::ref::nf4_dequantize_{f32,bf16,f16} (with the absmax expanded first).
// packed: [ceil(n / 2)] uint8; out: [n] of out_type. A 4-byte aligned packed and a 16-byte
// aligned out take the vectorized path (Note [NF4 dequant vector path], kernels/nf4_dequant.cu);
// any alignment is accepted.
int nf4_dequantize(const uint8_t* packed, const Nf4Scales& scales, int64_t n, void* out,
                   FloatType out_type, CUstream_st* stream);

// The codes and fp32 absmax of x (Note [NF4 quantize kernel]), bit for bit
// quant::ref::nf4_quantize: x: [n] of x_type; packed: [ceil(n / 2)] uint8 (every byte written);
// absmax: [ceil(n / 64)] fp32. *non_finite (device memory, zeroed by the caller) is increased by
// the number of inf / NaN weights, whose codes are then meaningless. Double quantization of the
// absmax is the caller's (quant::ref::nf4_double_quantize, on the host).
int nf4_quantize(const void* x, FloatType x_type, int64_t n, uint8_t* packed, float* absmax,
                 unsigned long long* non_finite, CUstream_st* stream);

// Rows of x the fused GEMV handles in one launch.
inline constexpr int64_t kNf4GemvMaxRows = 16;

// y = x · Wᵀ with W the NF4 weight [n_out, k] (row-major, flattened blocks of 64 as stored):
// x: [m, k] bf16 or fp16 (x_type), 1 <= m <= kNf4GemvMaxRows; y: [m, n_out], same type as x.
// Each weight is decoded once to fp32 (nf4_code * scale, exactly the fp32 dequantized value)
// and multiplied with all m rows; products are accumulated in fp32, rounded once into y.
// k % 32 == 0 with 16-byte aligned x and packed takes the vectorized path; any k is accepted.
int nf4_gemv(const void* x, FloatType x_type, int64_t m, int64_t k, const uint8_t* packed,
             const Nf4Scales& scales, int64_t n_out, void* y, CUstream_st* stream);

// ---------------------------------------------------------------- 8-bit AdamW
// bitsandbytes' 8-bit blockwise AdamW, one fused pass: optim::adamw8bit_block_step (the
// reference, include/qlora/optim/adamw_ref.h) on the device, bit for bit.

// The fp32 scalars of one step, derived from the hyper-parameters on the host in the
// reference's order of operations (passed as data: a schedule never rebuilds a graph).
struct AdamW8bitScalars {
  float beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, lr = 0.0f, weight_decay = 0.0f;
  float correction2 = 0.0f;  // sqrt(1 - beta2^t)
  float step_size = 0.0f;    // -lr * correction2 / (1 - beta1^t)
};
AdamW8bitScalars adamw8bit_scalars(double lr, double beta1, double beta2, double eps,
                                   double weight_decay, int64_t step);

// The two dynamic maps (optim::signed_dynamic_map / unsigned_dynamic_map), passed by value to
// every launch (2 KiB of kernel parameters) so the kernels library holds no copy of them.
struct DynamicMaps {
  float signed_map[256];
  float unsigned_map[256];
};

// param: [n] fp32; grad: [n] of grad_type; exp_avg_q, exp_avg_sq_q: [n] uint8;
// absmax_exp_avg, absmax_exp_avg_sq: [ceil(n / 256)] fp32; all updated in place except grad.
// Any n >= 1; 16-byte aligned param (and grad, 4-byte aligned codes) take vectorized loads.
int adamw8bit_step(float* param, const void* grad, FloatType grad_type, uint8_t* exp_avg_q,
                   uint8_t* exp_avg_sq_q, float* absmax_exp_avg, float* absmax_exp_avg_sq, int64_t n,
                   const AdamW8bitScalars& scalars, const DynamicMaps& maps, CUstream_st* stream);

// One parameter of a multi-tensor step: adamw8bit_step's operands.
struct AdamW8bitTensor {
  float* param = nullptr;
  const void* grad = nullptr;
  uint8_t* exp_avg_q = nullptr;
  uint8_t* exp_avg_sq_q = nullptr;
  float* absmax_exp_avg = nullptr;
  float* absmax_exp_avg_sq = nullptr;
  int64_t n = 0;
};
inline constexpr int kAdamW8bitTensorsPerLaunch = 24;

// adamw8bit_step for `count` parameters whose gradients are all grad_type, with one launch per
// kAdamW8bitTensorsPerLaunch of them (Note [AdamW8bit multi-tensor launch],
// kernels/adamw8bit.cu): the bits of one adamw8bit_step each. Tensors with n == 0 are skipped.
int adamw8bit_step_multi(const AdamW8bitTensor* tensors, int64_t count, FloatType grad_type,
                         const AdamW8bitScalars& scalars, const DynamicMaps& maps, CUstream_st* stream);

// ---------------------------------------------------------------- fused element-wise ops
// The decoder layer's RoPE, SwiGLU, GeGLU, RMSNorm backward (kernels/fused_ops.cu) and LoRA dropout
// (kernels/dropout.cu) (model/fused_ops.h: the references and the at::Tensor API). Each kernel loads to fp32, computes in fp32 and rounds once into the output type
// (`type`, shared by every operand). Strides are in elements and must be >= 0; the last dim is
// contiguous. Aligned operands (16-byte row starts: base pointers aligned, row strides and the
// half dim / I multiples of 8 elements for bf16 / fp16, 4 for fp32) take 16-byte loads; any
// layout is accepted. Empty sizes launch nothing and return 0.

// x: [batch, seq, heads, head_dim] with element strides (stride_batch, stride_seq, stride_head).
struct RopeView {
  int64_t batch = 0, seq = 0, heads = 0, head_dim = 0;  // head_dim even
  int64_t stride_batch = 0, stride_seq = 0, stride_head = 0;
};

// In place, transformers' rotate-half RoPE: x <- x * cos + rotate_half(x) * sin, with
// rotate_half(x) = cat(-x[d/2:], x[:d/2]); cos, sin: [batch, seq, head_dim] contiguous.
// One thread owns the lane pair (i, i + d/2), so the update in place is safe.
int rope_inplace(void* x, const void* cos, const void* sin, FloatType type, const RopeView& view,
                 CUstream_st* stream);

// Its backward, in place on the gradient: g <- g * cos + rotate_half_T(g * sin), with
// rotate_half_T(y) = cat(y[d/2:], -y[:d/2]).
int rope_backward_inplace(void* g, const void* cos, const void* sin, FloatType type, const RopeView& view,
                          CUstream_st* stream);

// What rope_into does to each head vector: rotate (rope_inplace's math), rotate back
// (rope_backward_inplace's), or copy it unchanged.
enum class RopeMode { kForward, kBackward, kCopy };

// dst <- mode(src), out of place: q and k from their column blocks of the merged q|k|v GEMM
// output into the packed [batch, seq, heads, head_dim] tensors attention wants, rotated on the
// way (one pass where RoPE in place and a copy take two), and their gradients back. dst_view
// and src_view have the same sizes and their own strides; dst and src must not overlap unless
// they are the same view. cos, sin as above (unused, may be null, with kCopy).
int rope_into(void* dst, const RopeView& dst_view, const void* src, const RopeView& src_view, const void* cos,
              const void* sin, FloatType type, RopeMode mode, CUstream_st* stream);

// m[r, :] = silu(g) * u with g = gu[r, :inter], u = gu[r, inter:2 inter]; gu: [rows, >= 2 inter]
// with row stride gu_row_stride, m: [rows, >= inter] with row stride m_row_stride (no overlap).
int swiglu(const void* gu, int64_t gu_row_stride, int64_t rows, int64_t inter, void* m, int64_t m_row_stride,
           FloatType type, CUstream_st* stream);

// GeGLU (Gemma's gelu_pytorch_tanh), swiglu's layout and rules: m[r, :] = gelu_tanh(g) * u with
// gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))), ATen's tanh approximation.
int geglu(const void* gu, int64_t gu_row_stride, int64_t rows, int64_t inter, void* m, int64_t m_row_stride,
          FloatType type, CUstream_st* stream);

// RMSNorm's input gradient plus a residual's gradient (Note [RMSNorm backward add],
// kernels/fused_ops.cu): for each of `rows` rows of h elements, with r = rstd[row],
// out = round(r·g⊙w − x·r³·mean(g⊙w⊙x) + res), in fp32. g, x, res, out: [rows, h] contiguous of
// `type`; w: [h] of `type`; rstd: [rows] fp32 (1/rms, as the forward kept it). out may alias g or
// res. h a multiple of 8 with 16-byte aligned operands takes vector loads; any h is accepted.
int rms_norm_backward_add(void* out, const void* g, const void* x, const void* w, const float* rstd, const void* res,
                          int64_t rows, int64_t h, FloatType type, CUstream_st* stream);

// In place on gu: [g | u] <- [dg | du], du = dm * silu(g), dg = dm * u * silu'(g) with
// silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g))); dm: [rows, >= inter], row stride dm_row_stride.
int swiglu_backward_inplace(const void* dm, int64_t dm_row_stride, void* gu, int64_t gu_row_stride, int64_t rows,
                            int64_t inter, FloatType type, CUstream_st* stream);

// GeGLU's backward, swiglu_backward_inplace's layout: du = dm * gelu_tanh(g), dg = dm * u *
// gelu_tanh'(g), the derivative as ATen's gelu_backward (approximate "tanh") computes it.
int geglu_backward_inplace(const void* dm, int64_t dm_row_stride, void* gu, int64_t gu_row_stride, int64_t rows,
                           int64_t inter, FloatType type, CUstream_st* stream);

// LoRA dropout's backward added into an input gradient (Note [dropout backward add],
// kernels/dropout.cu): out[i] = acc[i] + v (or out[i] = v when acc is null), with
// v = mask[i] ? round(d[i] * scale) : 0 and each sum rounded once into `type`; d, acc, out: [n]
// contiguous (out may alias acc or d); mask: [n] bool. 16-byte aligned operands (8-byte for the
// mask) with n a multiple of 8 take vector loads; any layout is accepted.
int dropout_backward_add(void* out, const void* acc, const void* d, const bool* mask, int64_t n, float scale,
                         FloatType type, CUstream_st* stream);

// The same with the bit mask lora_dropout writes: bit i % 8 of bits[i / 8] is mask[i].
int dropout_backward_add_bits(void* out, const void* acc, const void* d, const uint8_t* bits, int64_t n, float scale,
                              FloatType type, CUstream_st* stream);

// Up to three such terms summed in one pass (Note [dropout backward sum], kernels/dropout.cu):
// out = acc (absent: the first term), then out = round(out + v_p) for each term p in order,
// v_p = bit i of bits[p] ? round(d[p][i] * scale) : 0: what `count` calls of
// dropout_backward_add_bits one a term would leave, bit for bit. out may alias acc or d[0].
inline constexpr int kMaxDropoutOutputs = 3;
int dropout_backward_sum_bits(void* out, const void* acc, int count, const void* const* d, const uint8_t* const* bits,
                              int64_t n, float scale, FloatType type, CUstream_st* stream);

// LoRA dropout of one input x [n] (contiguous) for `count` (1..3) projections in one pass
// (Note [LoRA dropout kernel], kernels/dropout.cu): outs[p] [n] = x with element i dropped
// (+0) when its 16 bits of Philox4x32-10(counter (i / 8, offset[p]), key seed) (word (i % 8) / 2,
// low half for even i, high for odd) are below `threshold` (< 2^16), else round(x[i] * scale);
// masks[p] [ceil(n / 8)] bytes, bit i % 8 of byte i / 8 set where element i is kept. Offsets must be 4 or more apart for independent draws (the
// device generator's philox_cuda_state(4) hands out such). 16-byte aligned pointers take vector
// loads; any alignment is accepted.
struct DropoutDraws {
  uint64_t seed = 0;
  uint64_t offset[kMaxDropoutOutputs] = {};
};
int lora_dropout(const void* x, int64_t n, FloatType type, int count, void* const* outs, uint8_t* const* masks,
                 const DropoutDraws& draws, uint32_t threshold, float scale, CUstream_st* stream);

// SwiGLU and down_proj's LoRA dropout of its output in one pass (Note [SwiGLU with dropout],
// kernels/dropout.cu): for gu [rows, 2·inter] (row stride gu_row_stride, g then u), m [rows,
// inter] contiguous = swiglu(gu) as `swiglu` writes it (only when m is not null), and `dropped`
// and `mask` as lora_dropout(m, rows·inter, ..., count 1, draws.offset[0]) would write them, bit
// for bit. 16-bit types only, inter and gu_row_stride multiples of 8 and 16-byte aligned
// pointers (swiglu_dropout_fits); anything else is cudaErrorInvalidValue (the caller runs the
// two kernels).
bool swiglu_dropout_fits(const void* gu, int64_t gu_row_stride, int64_t inter, const void* m, const void* dropped,
                         FloatType type);
int swiglu_dropout(const void* gu, int64_t gu_row_stride, int64_t rows, int64_t inter, FloatType type, void* m,
                   void* dropped, uint8_t* mask, const DropoutDraws& draws, uint32_t threshold, float scale,
                   CUstream_st* stream);

// ---------------------------------------------------------------- cross-entropy
// One row of logits a CTA (kernels/cross_entropy.cu, Note [cross-entropy rows kernel]), all in
// fp32: lse[r] = logsumexp(row r), loss[r] = lse[r] - row[labels[r]] (0 where labels[r] ==
// ignore_index), and then row r is OVERWRITTEN with d(sum of losses)/d(logits):
// exp(x - lse[r]) - [j == labels[r]], rounded once to the row's type (zeros for an ignored row;
// its lse is still written). The CPU reference is model::cross_entropy_rows_reference.
// logits: n rows of `vocab` elements of `type`, row r at logits + r * row_stride elements
// (row_stride >= vocab; columns past vocab are not touched); labels: [n] int64, each in
// [0, vocab) or ignore_index (the caller checks: no device-side check); lse, loss: [n] fp32.
// A 16-byte aligned start with row_stride * element size a multiple of 16 takes vector loads.
int cross_entropy_rows(void* logits, FloatType type, int64_t n, int64_t vocab, int64_t row_stride,
                       const int64_t* labels, int64_t ignore_index, float* lse, float* loss, CUstream_st* stream);

}  // namespace qlora::kernels
