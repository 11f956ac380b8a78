// optim/adamw_ref: the optimizer math as plain functions over raw arrays.
//
// These are the references the fused CUDA kernels (CUDA issue) are tested against,
// element by element, and what the CPU optimizers in optim/optimizer.h run. No torch.
//
//   adamw_step              torch.optim.AdamW (decoupled weight decay, bias correction),
//                           operation for operation as PyTorch's CPU path computes it
//   adamw8bit_block_step    bitsandbytes' 8-bit blockwise AdamW (both moments quantized
//                           with the dynamic maps, blocks of 256), as its CUDA kernel
//                           kOptimizerStatic8bit2StateBlockwise computes it
//   adamw32_bnb_step        bitsandbytes' fp32-state fallback for tensors smaller than
//                           min_8bit_size (its kOptimizer32bit2State kernel)
// See Note [bnb 8-bit AdamW semantics] in src/optim/adamw_ref.cpp for every deviation
// between bitsandbytes' CUDA kernel, its CPU backend, and torch's AdamW.
#pragma once

#include <array>
#include <cstdint>

namespace qlora::optim {

inline constexpr int64_t kQuantBlock = 256;       // elements per absmax block of the 8-bit state
inline constexpr int64_t kMin8bitSize = 4096;     // bnb min_8bit_size: smaller tensors keep fp32 state

struct AdamWHyper {
  double lr = 2e-4;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

// ---------------------------------------------------------------- dynamic maps

// bitsandbytes' create_dynamic_map(signed=True) / (signed=False): 256 sorted fp32 codes in
// [-1, 1] / [0, 1]. The signed map holds 0 at index 127; both end with 1.0 at 255.
const std::array<float, 256>& signed_dynamic_map();
const std::array<float, 256>& unsigned_dynamic_map();

// The code of x (x already divided by its block's absmax) as bnb's quantize_2D picks it:
// a 7-level binary search from index 127, then the nearer neighbour by the fp32 midpoint.
uint8_t quantize_dynamic(const float* code, float x, bool signed_map);

// ---------------------------------------------------------------- steps

// One torch.optim.AdamW step on n elements. step: 1-based count after this update.
void adamw_step(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, int64_t n,
                int64_t step, const AdamWHyper& h);

// One bnb 8-bit blockwise AdamW step on n elements (any n >= 1; the last block may be
// partial). State: codes of both moments ([n] uint8), one absmax per block of 256
// ([ceil(n / 256)] fp32), updated in place. Fresh state is all-zero codes and absmax.
// Elements whose gradient is inf/nan keep their parameter and get a zero moment (bnb).
void adamw8bit_block_step(float* param, const float* grad, uint8_t* exp_avg_q, uint8_t* exp_avg_sq_q,
                          float* absmax_exp_avg, float* absmax_exp_avg_sq, int64_t n, int64_t step,
                          const AdamWHyper& h);

// bnb's fp32-state AdamW step (weight decay applied after the update, eps scaled by the
// second bias correction), used by the 8-bit optimizer for tensors below kMin8bitSize.
void adamw32_bnb_step(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, int64_t n,
                      int64_t step, const AdamWHyper& h);

// Dequantized view of an 8-bit moment (for inspection, tests and state conversion).
void dequantize_moment(const uint8_t* q, const float* absmax, int64_t n, bool signed_map, float* out);

inline int64_t quant_blocks(int64_t n) { return (n + kQuantBlock - 1) / kQuantBlock; }

}  // namespace qlora::optim
