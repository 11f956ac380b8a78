// Torch-free, byte-level reference of the NF4 format as bitsandbytes 0.50.2 stores it:
// 4-bit NormalFloat codes in blocks of 64 with an fp32 absmax per block, and the "double
// quantization" of those absmax values (8-bit dynamic map, blocks of 256, minus their mean).
// Plain loops over raw pointers, one element at a time, so that CUDA kernels (and the at::Tensor
// layer in quant/nf4.h) can be compared with them element by element. Every rule here was checked
// against bitsandbytes itself (scripts/golden/quant.py, tests/test_quant_nf4.cpp), not derived.
//
// Note [NF4 layout]
//   The weight is flattened row-major; element i belongs to block i / 64. A block's absmax is
//   max |x| over its elements (the last block may be short). Each element is scaled into [-1, 1]
//   and replaced by the index (0..15) of the nearest of the 16 NF4 code values.
//   Two codes a byte: element 2k goes in the HIGH nibble of byte k, element 2k+1 in the low
//   nibble. An odd element count pads the last low nibble with code 7 (the value 0.0).
//
// Note [NF4 rounding]
//   bitsandbytes' CPU path (backends/default quantize_4bit) computes, in fp32:
//     full blocks:        s = clamp(x * (1 / max(absmax, 1e-38)), -1, 1)   (a reciprocal, then a product)
//     the partial block:  s = clamp(x / max(absmax, 1e-38), -1, 1)         (a true division)
//   and the code is the number of midpoints m_j = (c_j + c_{j+1}) / 2 with m_j < s, i.e. a value
//   exactly on a midpoint takes the LOWER code. The two scalings differ in the last bit for some
//   inputs, which is enough to flip a code on a midpoint: keep them as they are.
//   bf16 / fp16 inputs are widened to fp32 first (exact), so all arithmetic is fp32.
//
// Note [bitsandbytes 8-bit CPU grid]
//   The absmax values are quantized by bitsandbytes' native CPU kernel (quantize_blockwise, used
//   for the second level of double quantization), which does NOT pick the nearest code directly:
//     inv = 1 / absmax_block;  s = clamp(x * inv, -1, 1)
//     u   = (uint16) trunc(fma((s + 1) * 0.5, 65535, 0.5))      (the library is built with FMA
//                                                                contraction: checked in its code)
//     g   = (2 * u) / 65535 - 1                                 (the grid point of bin u)
//     q   = number of midpoints of the 256-entry map strictly below g
//   A block whose absmax is 0 stores absmax 0 and code 0 for every element.
//   Dequantization: x = map[q] * absmax_block (fp32).
//
// Note [NF4 double quantization]
//   offset   = mean of the fp32 absmax values (torch.mean: its summation order matters for the last
//              bit; the at::Tensor layer calls at::mean, this reference offers mean_f32 below)
//   absmax_q, absmax2 = 8-bit grid quantization (above) of (absmax - offset), blocks of 256
//   absmax'  = map[absmax_q] * absmax2[i / 256] + offset       (fp32, in that order)
//   x'       = nf4_code[q] * absmax'                           (fp32, then rounded to nearest-even
//                                                               for bf16 / fp16 outputs)
#pragma once

#include <cstdint>

namespace qlora::quant::ref {

// ------------------------------------------------------------------ constants
inline constexpr int64_t kNf4BlockSize = 64;      // weights per absmax
inline constexpr int64_t kAbsmaxBlockSize = 256;  // absmax values per second-level absmax
inline constexpr uint8_t kNf4ZeroCode = 7;        // the code of 0.0; pads an odd element count

// The 16 NF4 code values, ascending (bitsandbytes' get_4bit_type("nf4")).
const float* nf4_code();  // [16]
// bitsandbytes' signed 8-bit dynamic map (create_dynamic_map()), ascending.
const float* dynamic_map();  // [256]

// Number of blocks of `blocksize` covering n elements (the last may be short).
int64_t num_blocks(int64_t n, int64_t blocksize);
// Bytes of packed codes for n elements: ceil(n / 2).
int64_t packed_bytes(int64_t n);

// ------------------------------------------------------------------ scalar conversions
// Round-to-nearest-even narrowing, as torch's .to(bfloat16 / float16) and bitsandbytes do.
uint16_t float_to_bf16_bits(float x);
uint16_t float_to_f16_bits(float x);
float bf16_bits_to_float(uint16_t bits);
float f16_bits_to_float(uint16_t bits);

// ------------------------------------------------------------------ NF4 (first level)
// The code (0..15) of one value already scaled into [-1, 1] (Note [NF4 rounding]).
uint8_t nf4_nearest_code(float scaled);

// x: [n] fp32, finite (widen bf16 / fp16 first).  packed: [packed_bytes(n)] two codes a byte
// (Note [NF4 layout]).  absmax: [num_blocks(n, 64)] fp32.
void nf4_quantize(const float* x, int64_t n, uint8_t* packed, float* absmax);

// Inverse: out[i] = nf4_code[code_i] * absmax[i / 64], in fp32, then narrowed (RNE).
void nf4_dequantize_f32(const uint8_t* packed, const float* absmax, int64_t n, float* out);
void nf4_dequantize_bf16(const uint8_t* packed, const float* absmax, int64_t n, uint16_t* out);
void nf4_dequantize_f16(const uint8_t* packed, const float* absmax, int64_t n, uint16_t* out);

// ------------------------------------------------------------------ 8-bit blockwise (second level)
// bitsandbytes' CPU quantize_blockwise with a 256-entry ascending map (Note [bitsandbytes 8-bit
// CPU grid]). x: [n] fp32; q: [n] uint8; absmax: [num_blocks(n, blocksize)] fp32.
void blockwise8_quantize(const float* x, int64_t n, int64_t blocksize, const float* map, uint8_t* q,
                         float* absmax);
// out[i] = map[q[i]] * absmax[i / blocksize], fp32.
void blockwise8_dequantize(const uint8_t* q, const float* absmax, int64_t n, int64_t blocksize,
                           const float* map, float* out);

// ------------------------------------------------------------------ double quantization
// Mean of n fp32 values, summed in double and rounded once. torch.mean sums in fp32 in its own
// order, so this can differ from bitsandbytes' offset in the last bit (the tests measure it);
// pass bitsandbytes' or at::mean's value as `offset` where bit equality matters.
float mean_f32(const float* x, int64_t n);

// absmax: [blocks] fp32 -> absmax_q: [blocks] uint8, absmax2: [num_blocks(blocks, 256)] fp32,
// using the dynamic map (Note [NF4 double quantization]).
void nf4_double_quantize(const float* absmax, int64_t blocks, float offset, uint8_t* absmax_q,
                         float* absmax2);
// Inverse: absmax[i] = map[absmax_q[i]] * absmax2[i / 256] + offset, fp32.
void nf4_double_dequantize(const uint8_t* absmax_q, const float* absmax2, const float* map,
                           float offset, int64_t blocks, float* absmax);

}  // namespace qlora::quant::ref
