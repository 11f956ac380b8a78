// quant/nf4_cuda: the NF4 kernels of kernels/ (qlora/kernels.h) behind the at::Tensor API.
//
// register_cuda_kernels() plugs the CUDA dequantize kernel into set_nf4_device_kernels (so
// dequantize_nf4 on a CUDA Nf4Tensor runs one fused kernel: double-quantized scales are read
// directly, never expanded into an fp32 absmax tensor). The other two entry points are for the
// callers that want them directly: the 4-bit matmul (dequantize into a reused buffer) and
// evaluation / generation (the fused GEMV for a few tokens).
//
// Every function here is declared in every build. In a build without CUDA torch
// (QLORA_WITH_CUDA undefined) register_cuda_kernels() returns false and does nothing, and the
// other two throw c10::Error saying so.
#pragma once

#include <ATen/core/Tensor.h>

#include "qlora/quant/nf4.h"

namespace qlora::quant {

// Registers the CUDA NF4 kernels (set_nf4_device_kernels(kCUDA, ...)); call once at start-up,
// before any CUDA Nf4Tensor is dequantized. Idempotent and thread-safe. Returns whether the
// kernels are registered (false in builds without CUDA).
bool register_cuda_kernels();

// Dequantizes w (on a CUDA device) into `out`: contiguous, w.numel() elements of fp32 / bf16 /
// fp16 on w's device (any shape: the caller's reused buffer). Bit for bit dequantize_nf4's CPU
// result. Runs on the current CUDA stream.
void dequantize_nf4_cuda_into(const Nf4Tensor& w, at::Tensor& out);

// y = x · dequant(w)ᵀ for a 2-D weight w [out, in] on CUDA: x [..., in] bf16 / fp16 on the same
// device, with at most kernels::kNf4GemvMaxRows (16) rows (the product of its leading dims);
// y [..., out] in x's dtype. One fused kernel reading each 4-bit weight once.
at::Tensor nf4_gemv_cuda(const at::Tensor& x, const Nf4Tensor& w);

}  // namespace qlora::quant
