// NF4 dequantization (include/qlora/kernels.h: nf4_dequantize), bit for bit the CPU reference
// quant::ref::nf4_dequantize_* with the block scales of Note [NF4 double quantization] computed
// in the same kernel (no separate absmax expansion, no fp32 absmax buffer).
//
// Note [NF4 dequant vector path]
//   The output is 4x (bf16/fp16) or 8x (fp32) the bytes read, so the kernel is store-bound and
//   its stores must be coalesced. A unit is 8 weights: 4 packed bytes in (one 32-bit load),
//   one 16-byte store out (two for fp32). Lane l of a warp takes units base + 32·k + l,
//   k < kUnitsPerThread, so each of the warp's loads covers 128 contiguous bytes and each
//   store 512 (bf16/fp16): whole sectors, no partial writes for L2 to merge. All loads of a
//   thread are issued before the first use (independent work in flight). A unit lies in one
//   block of 64, so it needs one scale (plain or double-quantized, cached loads that the 8
//   lanes of a block share). The 16-entry table lives in shared memory (broadcast reads, 16
//   words in 16 banks). The first version stored 64 contiguous bytes a thread (4 stores at a
//   64-byte lane stride: half-written sectors) and reached 0.46 of the copy bandwidth on an
//   H200 (bench/results/2026-12-01-h200). What does not fill a whole unit (n % 8 elements,
//   the padding nibble), or a packed pointer not 4-byte aligned or an output not 16-byte
//   aligned, goes through the one-element-a-thread kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>

#include "nf4_common.cuh"
#include "qlora/kernels.h"

namespace qlora::kernels {
namespace {

using detail::Convert;

constexpr int kThreads = 256;

constexpr int kUnit = 8;           // weights a unit: 4 packed bytes
constexpr int kUnitsPerThread = 4;  // independent loads in flight a thread
constexpr int kUnitsPerBlock = kThreads * kUnitsPerThread;

// 8 decoded weights (element order) to dst, 16-byte aligned.
template <typename OutT>
__device__ __forceinline__ void store8(OutT* dst, const float (&w)[8]);

template <>
__device__ __forceinline__ void store8<float>(float* dst, const float (&w)[8]) {
  float4* d = reinterpret_cast<float4*>(dst);
  d[0] = make_float4(w[0], w[1], w[2], w[3]);
  d[1] = make_float4(w[4], w[5], w[6], w[7]);
}

template <typename Pair, Pair (*kPack)(float, float), typename OutT>
__device__ __forceinline__ void store8_16bit(OutT* dst, const float (&w)[8]) {
  uint32_t u[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const Pair p = kPack(w[2 * j], w[2 * j + 1]);  // .x (element 2j) at the lower address
    memcpy(&u[j], &p, 4);
  }
  *reinterpret_cast<uint4*>(dst) = make_uint4(u[0], u[1], u[2], u[3]);
}

__device__ __forceinline__ __nv_bfloat162 pack_bf16(float a, float b) { return __floats2bfloat162_rn(a, b); }
__device__ __forceinline__ __half2 pack_f16(float a, float b) { return __floats2half2_rn(a, b); }

template <>
__device__ __forceinline__ void store8<__nv_bfloat16>(__nv_bfloat16* dst, const float (&w)[8]) {
  store8_16bit<__nv_bfloat162, pack_bf16>(dst, w);
}
template <>
__device__ __forceinline__ void store8<__half>(__half* dst, const float (&w)[8]) {
  store8_16bit<__half2, pack_f16>(dst, w);
}

// Note [NF4 dequant vector path]. units: whole 8-element units; packed 4-byte and out 16-byte
// aligned.
template <typename OutT>
__global__ void __launch_bounds__(kThreads) nf4_dequant_vec_kernel(const uint8_t* __restrict__ packed,
                                                                   Nf4Scales scales, int64_t units,
                                                                   OutT* __restrict__ out) {
  __shared__ float table[16];
  detail::load_nf4_table(table);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kUnitsPerBlock + (threadIdx.x >> 5) * (32 * kUnitsPerThread);
  const uint32_t* words = reinterpret_cast<const uint32_t*>(packed);
  uint32_t bytes[kUnitsPerThread];
  float scale[kUnitsPerThread];
#pragma unroll
  for (int k = 0; k < kUnitsPerThread; ++k) {
    const int64_t u = base + 32 * k + lane;
    bytes[k] = u < units ? __ldg(words + u) : 0u;
  }
#pragma unroll
  for (int k = 0; k < kUnitsPerThread; ++k) {
    const int64_t u = base + 32 * k + lane;
    scale[k] = u < units ? detail::block_scale(scales, u / (detail::kNf4Block / kUnit)) : 0.0f;
  }
#pragma unroll
  for (int k = 0; k < kUnitsPerThread; ++k) {
    const int64_t u = base + 32 * k + lane;
    if (u >= units) break;
    float w[8];
#pragma unroll
    for (int b = 0; b < 4; ++b) {  // little-endian: byte b of the word is at the lower address
      const uint32_t byte = (bytes[k] >> (8 * b)) & 0xFFu;
      w[2 * b] = __fmul_rn(table[byte >> 4], scale[k]);  // even element: high nibble
      w[2 * b + 1] = __fmul_rn(table[byte & 0x0F], scale[k]);
    }
    store8(out + u * kUnit, w);
  }
}

// Elements [begin, n), one a thread (grid-stride).
template <typename OutT>
__global__ void __launch_bounds__(kThreads) nf4_dequant_scalar_kernel(const uint8_t* __restrict__ packed,
                                                                      Nf4Scales scales, int64_t begin,
                                                                      int64_t n, OutT* __restrict__ out) {
  __shared__ float table[16];
  detail::load_nf4_table(table);
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = begin + static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    const float scale = detail::block_scale(scales, i / detail::kNf4Block);
    out[i] = Convert<OutT>::from_float(__fmul_rn(table[detail::nf4_code_at(packed, i)], scale));
  }
}

template <typename OutT>
int launch(const uint8_t* packed, const Nf4Scales& scales, int64_t n, OutT* out, cudaStream_t stream) {
  const bool vec = (reinterpret_cast<uintptr_t>(packed) & 3u) == 0 && detail::aligned16(out);
  const int64_t units = vec ? n / kUnit : 0;
  if (units > 0) {
    const int64_t grid = detail::ceil_div(units, kUnitsPerBlock);
    nf4_dequant_vec_kernel<OutT><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(packed, scales, units, out);
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return static_cast<int>(err);
  }
  const int64_t begin = units * kUnit;
  if (begin < n) {
    const int64_t grid = std::min<int64_t>(detail::ceil_div(n - begin, kThreads), 8192);
    nf4_dequant_scalar_kernel<OutT>
        <<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(packed, scales, begin, n, out);
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}

}  // namespace

int nf4_dequantize(const uint8_t* packed, const Nf4Scales& scales, int64_t n, void* out,
                   FloatType out_type, CUstream_st* stream) {
  if (n <= 0) return 0;
  if (packed == nullptr || out == nullptr ||
      (scales.absmax == nullptr &&
       (scales.absmax_q == nullptr || scales.absmax2 == nullptr || scales.code2 == nullptr)))
    return static_cast<int>(cudaErrorInvalidValue);
  switch (out_type) {
    case FloatType::kF32:
      return launch(packed, scales, n, static_cast<float*>(out), stream);
    case FloatType::kBF16:
      return launch(packed, scales, n, static_cast<__nv_bfloat16*>(out), stream);
    case FloatType::kF16:
      return launch(packed, scales, n, static_cast<__half*>(out), stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace qlora::kernels
