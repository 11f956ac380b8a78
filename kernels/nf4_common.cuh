// Device-side NF4 decoding shared by nf4_dequant.cu and nf4_gemv.cu (private to kernels/).
// The values and the order of operations are quant/nf4_ref.h's; the tests compare bit for bit.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "qlora/kernels.h"

namespace qlora::kernels::detail {

inline constexpr int kNf4Block = 64;     // weights per scale
inline constexpr int kScaleBlock = 256;  // scales per second-level absmax

// bitsandbytes' NF4 table (quant::ref::nf4_code()); test_cuda_nf4_kernels pins every code.
static __constant__ float kNf4Table[16] = {
#include "qlora/kernels/nf4_code.inc"
};

// Copies the NF4 table into shared memory (threads 0..15); the caller syncs.
__device__ __forceinline__ void load_nf4_table(float* table) {
  if (threadIdx.x < 16) table[threadIdx.x] = kNf4Table[threadIdx.x];
}

// The fp32 scale of block b (Note [NF4 double quantization]): a product and a sum, each
// rounded (the _rn intrinsics keep nvcc from contracting them into one FMA).
__device__ __forceinline__ float block_scale(const Nf4Scales& s, int64_t b) {
  if (s.absmax != nullptr) return __ldg(s.absmax + b);
  const float c = __ldg(s.code2 + __ldg(s.absmax_q + b));
  return __fadd_rn(__fmul_rn(c, __ldg(s.absmax2 + b / kScaleBlock)), s.offset);
}

// Code (0..15) of element i of a packed tensor: even elements in the high nibble.
__device__ __forceinline__ int nf4_code_at(const uint8_t* packed, int64_t i) {
  const uint8_t byte = __ldg(packed + (i >> 1));
  return (i & 1) ? (byte & 0x0F) : (byte >> 4);
}

// Decodes 16 packed bytes (32 weights, one scale) into fp32, in element order.
__device__ __forceinline__ void decode32(const uint4& bytes, const float* table, float scale,
                                         float (&w)[32]) {
  const uint32_t words[4] = {bytes.x, bytes.y, bytes.z, bytes.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
#pragma unroll
    for (int b = 0; b < 4; ++b) {  // little-endian: byte b of the word is at the lower address
      const uint32_t byte = (words[q] >> (8 * b)) & 0xFFu;
      w[8 * q + 2 * b] = __fmul_rn(table[byte >> 4], scale);
      w[8 * q + 2 * b + 1] = __fmul_rn(table[byte & 0x0F], scale);
    }
  }
}

// fp32 <-> storage types (round to nearest even, as quant::ref's narrowing).
template <typename T>
struct Convert;
template <>
struct Convert<float> {
  static __device__ __forceinline__ float from_float(float v) { return v; }
  static __device__ __forceinline__ float to_float(float v) { return v; }
};
template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
};
template <>
struct Convert<__half> {
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
};

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace qlora::kernels::detail
