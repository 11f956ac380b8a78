// optim/adamw8bit_cuda: the fused 8-bit blockwise AdamW kernel (kernels/adamw8bit.cu) on
// at::Tensors: one pass updates a parameter and both 8-bit moments, bit for bit what
// adamw8bit_block_step (optim/adamw_ref.h) computes on the CPU; one launch serves up to 24
// parameters (Note [AdamW8bit multi-tensor launch]).
//
// Declared and defined in every build. In a build without CUDA torch (QLORA_WITH_CUDA
// undefined; QLORA_CUDA=OFF) both functions throw c10::Error saying so, except
// adamw8bit_step_cuda_many on an empty list, which does nothing there as everywhere.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "qlora/optim/adamw_ref.h"

namespace qlora::optim {

// param: [n] fp32 contiguous CUDA; grad: [n] fp32 / bf16 / fp16 contiguous, same device;
// exp_avg_q, exp_avg_sq_q: [n] uint8; absmax_exp_avg, absmax_exp_avg_sq: [ceil(n / 256)] fp32
// (device or managed memory reachable from the device). step: 1-based count after this update.
// Updated in place (all but grad); runs on the current CUDA stream, asynchronously.
void adamw8bit_step_cuda(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg_q,
                         at::Tensor& exp_avg_sq_q, at::Tensor& absmax_exp_avg,
                         at::Tensor& absmax_exp_avg_sq, int64_t step, const AdamWHyper& h);

// One parameter's operands for adamw8bit_step_cuda_many (as adamw8bit_step_cuda's).
struct AdamW8bitOperands {
  at::Tensor* param = nullptr;
  const at::Tensor* grad = nullptr;
  at::Tensor* exp_avg_q = nullptr;
  at::Tensor* exp_avg_sq_q = nullptr;
  at::Tensor* absmax_exp_avg = nullptr;
  at::Tensor* absmax_exp_avg_sq = nullptr;
};

// adamw8bit_step_cuda for many parameters on one device, in multi-tensor launches
// (kernels::adamw8bit_step_multi: one per 24 parameters whose gradients share a dtype instead
// of one each), with the same checks and the same bits. An empty list does nothing.
void adamw8bit_step_cuda_many(const std::vector<AdamW8bitOperands>& operands, int64_t step, const AdamWHyper& h);

}  // namespace qlora::optim
