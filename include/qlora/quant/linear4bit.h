// Linear4bit: y = x · Wᵀ with W a frozen NF4 weight, as an autograd op that QLoRA can afford.
// Forward dequantizes W into the compute dtype and multiplies; backward dequantizes W AGAIN and
// returns dL/dx = dL/dy · W only. Nothing that depends on x and no dequantized weight is kept for
// backward: the op saves the Nf4Tensor's handles (packed codes and statistics, already resident),
// so a layer costs its 4-bit storage between forward and backward, not a dense copy.
// The base is frozen: there is no gradient for W (bitsandbytes' MatMul4Bit does the same).
// One deliberate difference: bitsandbytes' backward dequantizes into the ORIGINAL weight dtype
// and then casts to the gradient's dtype; we dequantize straight into the gradient's dtype, so
// backward multiplies by the same W as forward. The two agree whenever the original dtype is
// the compute dtype or fp32 (one rounding of the same fp32 product either way).
//
// Devices: dequantize_nf4 dispatches (CPU reference, registered device kernels, or torch ops);
// the matmul is at::linear / at::matmul on the tensors' device.
// Decoding: on a CUDA device, in bf16 or fp16, for at most kernels::kNf4GemvMaxRows rows of x
// and no gradient wanted (no_grad, or an x that needs none), the product is the fused NF4 GEMV
// (quant/nf4_cuda.h: each 4-bit weight read once, never a dense copy): what generation and
// evaluation's decoding steps run. Its sums differ from the dequantize + matmul path's only in
// fp32 accumulation order.
#pragma once

#include <ATen/core/Tensor.h>

#include "qlora/quant/nf4.h"

namespace qlora::quant {

// x: [..., in] any float dtype, cast to `compute` (fp32 / bf16 / fp16) first, so the gradient
// flows back to x in x's own dtype.  w: [out, in] NF4.  Returns [..., out] in `compute`.
at::Tensor linear4bit(const at::Tensor& x, const Nf4Tensor& w, at::ScalarType compute);

// Whether linear4bit may take the fused GEMV for a few rows (default: on, unless the
// environment sets QLORA_NF4_GEMV=0). For benchmarks and tests that compare the two paths.
void set_nf4_gemv_enabled(bool enabled);
bool nf4_gemv_enabled();

}  // namespace qlora::quant
