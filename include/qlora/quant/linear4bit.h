// Linear4bit: y = x · Wᵀ with W a frozen NF4 weight, as an autograd op that QLoRA can afford.
// Forward dequantizes W into the compute dtype and multiplies; backward dequantizes W AGAIN and
// returns dL/dx = dL/dy · W only. Nothing that depends on x and no dequantized weight is kept for
// backward: the op saves the Nf4Tensor's handles (packed codes and statistics, already resident),
// so a layer costs its 4-bit storage between forward and backward, not a dense copy.
// The base is frozen: there is no gradient for W (bitsandbytes' MatMul4Bit does the same).
//
// Devices: dequantize_nf4 dispatches (CPU reference, registered device kernels, or torch ops);
// the matmul is at::linear / at::matmul on the tensors' device.
#pragma once

#include <ATen/core/Tensor.h>

#include "qlora/quant/nf4.h"

namespace qlora::quant {

// x: [..., in] any float dtype, cast to `compute` (fp32 / bf16 / fp16) first, so the gradient
// flows back to x in x's own dtype.  w: [out, in] NF4.  Returns [..., out] in `compute`.
at::Tensor linear4bit(const at::Tensor& x, const Nf4Tensor& w, at::ScalarType compute);

}  // namespace qlora::quant
