// model/fused_ops: the decoder layer's element-wise ops as in-place / fused calls, for the
// hand-written layer forward and backward (no autograd inside the layer): RoPE and its
// backward on strided head views, SwiGLU and GeGLU of a merged gate/up GEMM output and their
// backward.
//
// Each op has an ATen reference (op for op what model/llama.h computes, so CPU and fp32 runs
// keep their bits) and, for bf16 / fp16 tensors on a CUDA device in a QLORA_CUDA build, one
// fused kernel (include/qlora/kernels.h, "fused element-wise ops"): fp32 math, one rounding.
// fp32 on the GPU takes the reference too (like model::rms_norm). QLORA_REFERENCE_OPS=1 in
// the environment forces the references everywhere, to compare.
//
// Layouts: the last dim must be contiguous (stride 1); other strides are free, so column
// slices of a wider GEMM output can be passed as they are.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <vector>

namespace qlora::model {

// RoPE in place, transformers' rotate_half convention: x <- x*cos + rotate_half(x)*sin,
// rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2]).
// x: [B, T, H, d], last dim contiguous, d even; cos, sin: [B, T, d] contiguous, x's dtype and
// device (what model::rope_cos_sin returns).
void rope_inplace(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// The backward of rope_inplace, in place on the gradient g (same layout rules):
// g <- g*cos + rotate_half_T(g*sin), rotate_half_T(y) = cat(y[..., d/2:], -y[..., :d/2]).
void rope_backward_inplace(at::Tensor& g, const at::Tensor& cos, const at::Tensor& sin);

// Out of place: dst <- RoPE(src), its backward, or src unchanged (copy_heads). dst and src:
// [B, T, H, d] of the same sizes, dtype and device, last dims contiguous, other strides free,
// not overlapping; one pass (the kernel) where rope_inplace would need a copy beside it. The
// values are those of dst.copy_(src) followed by rope_inplace / rope_backward_inplace.
void rope_into(at::Tensor& dst, const at::Tensor& src, const at::Tensor& cos, const at::Tensor& sin);
void rope_backward_into(at::Tensor& dst, const at::Tensor& src, const at::Tensor& cos, const at::Tensor& sin);
void copy_heads(at::Tensor& dst, const at::Tensor& src);

// SwiGLU of a merged gate/up GEMM output: gu [N, 2I] (last dim contiguous, any row stride),
// g = gu[:, :I], u = gu[:, I:]; returns m = silu(g) * u, [N, I] contiguous, gu's dtype.
at::Tensor swiglu(const at::Tensor& gu);

// Backward, in place: given dm [N, I] (dL/dm, any row stride, last dim contiguous) and gu,
// overwrites gu with [dg | du]: du = dm * silu(g), dg = dm * u * silu'(g),
// silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g))).
void swiglu_backward_inplace(const at::Tensor& dm, at::Tensor& gu);

// GeGLU (Gemma's gelu_pytorch_tanh), swiglu's layout: m = gelu_tanh(g) * u with
// gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), [N, I] contiguous.
at::Tensor geglu(const at::Tensor& gu);

// Its backward, in place, swiglu_backward_inplace's layout: du = dm * gelu_tanh(g),
// dg = dm * u * gelu_tanh'(g).
void geglu_backward_inplace(const at::Tensor& dm, at::Tensor& gu);

// RMSNorm's backward with the residual branch's gradient added, in place on g: for x [N, h] whose
// norm kept rstd [N, 1] (fp32, 1/rms a row), g the gradient at the norm's output and res the
// residual's gradient [N, h], g becomes d(norm)/dx·g + res. The kernel (Note [RMSNorm backward
// add]) for bf16 / fp16 CUDA tensors with contiguous operands, the reference elsewhere.
at::Tensor rms_norm_backward_add(at::Tensor g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd,
                                 const at::Tensor& res);

// LoRA dropout's backward added into the input gradient of the projections that share an
// input: with mask the bool mask of at::native_dropout (or the uint8 bit mask of lora_dropout,
// bit i % 8 of byte i / 8 for element i) and scale = 1 / (1 - p), returns
// acc += (d ⊙ mask) · scale, or, with acc undefined, (d ⊙ mask) · scale in place on d. Each
// step rounds as those ATen ops would (Note [dropout backward add], kernels/dropout.cu).
// d, acc: same shape and dtype, contiguous for the kernel (other layouts take the reference).
at::Tensor dropout_backward_add(at::Tensor acc, at::Tensor d, const at::Tensor& mask, double scale);

// x with a LoRA dropout bit mask applied again, out of place: (x ⊙ mask) · scale, element i
// rounded once as lora_dropout rounded it, so x and the bits of one lora_dropout copy (with
// scale = 1 / (1 - p)) give that copy back bit for bit (Note [shed LoRA inputs] in
// src/layer/fused_layer_parts.h). On a GPU one kernel pass (dropout_backward_add_bits without
// an accumulator); elsewhere lora_dropout_reference's arithmetic with the given bits.
at::Tensor apply_dropout_bits(const at::Tensor& x, const at::Tensor& bits, double scale);

// The projections sharing an input, summed: dropout_backward_add of each term d[p] with its bit
// mask bits[p], in order, into acc (undefined: in place on d[0]). On a GPU, up to three terms of
// one shape and dtype take one kernel pass (Note [dropout backward sum]), bit for bit the calls.
at::Tensor dropout_backward_sum(at::Tensor acc, std::vector<at::Tensor> d, const std::vector<at::Tensor>& bits,
                                double scale);

// LoRA dropout on a GPU (Note [LoRA dropout kernel], kernels/dropout.cu): `count` (1..3)
// dropped copies of x (a CUDA tensor, any float dtype), as `count` projections sharing the
// input draw them, in one pass over x. Each copy has x's shape; its mask is a flat uint8 bit
// mask [ceil(numel / 8)] (bit i % 8 of byte i / 8 set where element i is kept). The draws come
// from x's device generator, one philox_cuda_state(4) a copy, so `count` calls of one copy draw
// what one call of `count` draws, and a recompute that puts the generator back draws the same
// masks. p in (0, 1). There is no ATen path on the device: the CPU reference below is the oracle.
struct DroppedCopy {
  at::Tensor x;     // the dropped copy, x's shape and dtype
  at::Tensor bits;  // uint8 [ceil(numel / 8)]
};
std::vector<DroppedCopy> lora_dropout(const at::Tensor& x, int64_t count, double p);
// The same from given draws: seed and one offset a copy (tests; lora_dropout passes the generator's).
std::vector<DroppedCopy> lora_dropout(const at::Tensor& x, double p, uint64_t seed, const std::vector<uint64_t>& offsets);

// m = swiglu(gu) and one copy of lora_dropout(m, 1, p), down_proj's LoRA input, from one pass
// over gu where the shapes allow (Note [SwiGLU with dropout], kernels/dropout.cu; else the two
// calls): the same bits and the same generator draw as the two calls. m is left undefined
// unless keep_m (a recompute needs only the dropped copy).
struct SwigluDropped {
  at::Tensor m;         // [N, I], undefined unless keep_m
  DroppedCopy dropped;  // [N, I] and its bit mask
};
SwigluDropped swiglu_lora_dropout(const at::Tensor& gu, double p, bool keep_m);
// The same from a given seed and offset (tests).
SwigluDropped swiglu_lora_dropout(const at::Tensor& gu, double p, uint64_t seed, uint64_t offset, bool keep_m);

// LoRA dropout for autograd (lora::LoraLinear on a GPU): one copy of lora_dropout, whose
// backward is dropout_backward_add with its bits.
at::Tensor lora_dropout_autograd(const at::Tensor& x, double p);

// The kernel's drop threshold for p: round(p * 2^16), at most 2^16 - 1 (an element is dropped
// when its 16 Philox bits are below it), and Philox4x32-10 (Random123's counter-based generator,
// 10 rounds) on the host.
uint32_t dropout_threshold(double p);
std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key);

// The CPU reference of lora_dropout from given draws: x on any device, results on the CPU.
std::vector<DroppedCopy> lora_dropout_reference(const at::Tensor& x, double p, uint64_t seed,
                                                const std::vector<uint64_t>& offsets);

// A bit mask [ceil(n / 8)] as a bool tensor of `sizes` (n elements), on the mask's device.
at::Tensor unpack_bits(const at::Tensor& bits, at::IntArrayRef sizes);

// The references, always ATen ops (the CPU, fp32, QLORA_REFERENCE_OPS=1, and the tests).
// rope_inplace_reference computes what model::apply_rope computes for the same values;
// swiglu_reference is at::silu(g) * u.
void rope_inplace_reference(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
void rope_backward_inplace_reference(at::Tensor& g, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor swiglu_reference(const at::Tensor& gu);
void swiglu_backward_inplace_reference(const at::Tensor& dm, at::Tensor& gu);
// geglu_reference is at::gelu(g, "tanh") * u; its backward takes autograd's ops for that product
// (du = dm * gelu(g), dg = at::gelu_backward(dm * u, g, "tanh")): autograd's values, bit for bit on
// the same layout (ATen's CPU gelu may round a last bit differently on a strided slice).
at::Tensor geglu_reference(const at::Tensor& gu);
void geglu_backward_inplace_reference(const at::Tensor& dm, at::Tensor& gu);
// In fp32: r·(g⊙w) − x·r³·mean(g⊙w⊙x) + res, rounded once into g (in place).
at::Tensor rms_norm_backward_add_reference(at::Tensor g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd,
                                           const at::Tensor& res);
at::Tensor dropout_backward_add_reference(at::Tensor acc, at::Tensor d, const at::Tensor& mask, double scale);

}  // namespace qlora::model
