// NF4 dequantization (include/qlora/kernels.h: nf4_dequantize), bit for bit the CPU reference
// quant::ref::nf4_dequantize_* with the block scales of Note [NF4 double quantization] computed
// in the same kernel (no separate absmax expansion, no fp32 absmax buffer).
//
// Note [NF4 dequant vector path]
//   One thread turns 16 packed bytes (32 weights, half a block: one scale) into 32 outputs:
//   one 16-byte load, one scale (plain or double-quantized, 1-2 small cached loads), and
//   4 (bf16/fp16) or 8 (fp32) 16-byte stores. The 16-entry table lives in shared memory
//   (broadcast reads, no bank conflicts: 16 words in 16 banks). Whatever does not fill a whole
//   32-element chunk (n % 32 elements, the padding nibble) or is not 16-byte aligned goes
//   through the one-element-a-thread kernel.
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

template <typename OutT>
__device__ __forceinline__ void store32(OutT* dst, const float (&w)[32]);

template <>
__device__ __forceinline__ void store32<float>(float* dst, const float (&w)[32]) {
  float4* d = reinterpret_cast<float4*>(dst);
#pragma unroll
  for (int j = 0; j < 8; ++j) d[j] = make_float4(w[4 * j], w[4 * j + 1], w[4 * j + 2], w[4 * j + 3]);
}

template <typename Pair, Pair (*kPack)(float, float), typename OutT>
__device__ __forceinline__ void store32_16bit(OutT* dst, const float (&w)[32]) {
  uint32_t u[16];
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const Pair p = kPack(w[2 * j], w[2 * j + 1]);  // .x (element 2j) at the lower address
    memcpy(&u[j], &p, 4);
  }
  uint4* d = reinterpret_cast<uint4*>(dst);
#pragma unroll
  for (int j = 0; j < 4; ++j) d[j] = make_uint4(u[4 * j], u[4 * j + 1], u[4 * j + 2], u[4 * j + 3]);
}

__device__ __forceinline__ __nv_bfloat162 pack_bf16(float a, float b) { return __floats2bfloat162_rn(a, b); }
__device__ __forceinline__ __half2 pack_f16(float a, float b) { return __floats2half2_rn(a, b); }

template <>
__device__ __forceinline__ void store32<__nv_bfloat16>(__nv_bfloat16* dst, const float (&w)[32]) {
  store32_16bit<__nv_bfloat162, pack_bf16>(dst, w);
}
template <>
__device__ __forceinline__ void store32<__half>(__half* dst, const float (&w)[32]) {
  store32_16bit<__half2, pack_f16>(dst, w);
}

// Note [NF4 dequant vector path]. chunks: whole 32-element chunks; packed and out 16-byte aligned.
template <typename OutT>
__global__ void __launch_bounds__(kThreads) nf4_dequant_vec_kernel(const uint8_t* __restrict__ packed,
                                                                   Nf4Scales scales, int64_t chunks,
                                                                   OutT* __restrict__ out) {
  __shared__ float table[16];
  detail::load_nf4_table(table);
  __syncthreads();
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= chunks) return;
  const uint4 bytes = __ldg(reinterpret_cast<const uint4*>(packed) + c);
  const float scale = detail::block_scale(scales, c / 2);  // 2 chunks a block of 64
  float w[32];
  detail::decode32(bytes, table, scale, w);
  store32(out + c * 32, w);
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
  const bool vec = detail::aligned16(packed) && detail::aligned16(out);
  const int64_t chunks = vec ? n / 32 : 0;
  if (chunks > 0) {
    const int64_t grid = detail::ceil_div(chunks, kThreads);
    nf4_dequant_vec_kernel<OutT><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(packed, scales, chunks, out);
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return static_cast<int>(err);
  }
  const int64_t begin = chunks * 32;
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
