// Fused NF4 dequant-GEMV for a few rows (include/qlora/kernels.h: nf4_gemv): evaluation and
// generation, where dequantizing the whole weight before a GEMM costs more than the GEMM.
//
// Note [NF4 GEMV layout]
//   One warp computes one output feature (one row of W) for all m rows of x: each 4-bit weight
//   is read from memory once and decoded once (to its exact fp32 dequantized value), then
//   multiplied with m inputs held in L1 / L2 (x is at most 16 rows, a few hundred KiB).
//   Vector path (k % 32 == 0, 16-byte aligned x and packed): lane j of the warp takes chunks
//   j, j + 32, ... of 32 weights (16 bytes, one scale), so a warp reads 512 contiguous bytes of
//   W per step. Each lane sums its products in fp32 (FMA), then the 32 partial sums are added
//   by a butterfly of shuffles and lane 0 rounds the result once into y. Accumulation error is
//   therefore that of a sum of k / 32 + 5 terms per output (the test derives its bound from it).
//   The row count m is a template bound (1, 2, 4, 8, 16) so the accumulators stay in registers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>

#include "nf4_common.cuh"
#include "qlora/kernels.h"

namespace qlora::kernels {
namespace {

using detail::Convert;

constexpr int kWarps = 8;  // output features a CTA
constexpr int kThreads = kWarps * 32;

// Two consecutive elements packed in a 32-bit word, widened to fp32 (element 0 in .x).
template <typename T>
__device__ __forceinline__ float2 widen2(uint32_t u);
template <>
__device__ __forceinline__ float2 widen2<__nv_bfloat16>(uint32_t u) {
  return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xFFFF0000u));
}
template <>
__device__ __forceinline__ float2 widen2<__half>(uint32_t u) {
  __half2 h;
  memcpy(&h, &u, 4);
  return __half22float2(h);
}

template <typename T, int MT>
__global__ void __launch_bounds__(kThreads) nf4_gemv_kernel(const T* __restrict__ x, int m, int64_t k,
                                                            const uint8_t* __restrict__ packed,
                                                            Nf4Scales scales, int64_t n_out,
                                                            T* __restrict__ y, bool vec) {
  __shared__ float table[16];
  detail::load_nf4_table(table);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= n_out) return;
  float acc[MT];
#pragma unroll
  for (int r = 0; r < MT; ++r) acc[r] = 0.0f;
  const int64_t row_start = row * k;  // flattened index of W[row, 0]

  if (vec) {  // Note [NF4 GEMV layout]
    const int64_t chunks = k / 32;
    const uint4* w_row = reinterpret_cast<const uint4*>(packed) + row * chunks;
#pragma unroll 2
    for (int64_t c = lane; c < chunks; c += 32) {
      const uint4 bytes = __ldg(w_row + c);
      const float scale = detail::block_scale(scales, (row_start + c * 32) / detail::kNf4Block);
      float w[32];
      detail::decode32(bytes, table, scale, w);
#pragma unroll
      for (int r = 0; r < MT; ++r) {
        if (r < m) {
          const uint4* xr = reinterpret_cast<const uint4*>(x + r * k + c * 32);
          float a = acc[r];
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const uint4 xv = __ldg(xr + q);
            const uint32_t words[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
            for (int h = 0; h < 4; ++h) {
              const float2 xf = widen2<T>(words[h]);
              a = fmaf(w[8 * q + 2 * h], xf.x, a);
              a = fmaf(w[8 * q + 2 * h + 1], xf.y, a);
            }
          }
          acc[r] = a;
        }
      }
    }
  } else {  // any k, any alignment: one weight a lane per step
    for (int64_t kk = lane; kk < k; kk += 32) {
      const int64_t e = row_start + kk;
      const float w = __fmul_rn(table[detail::nf4_code_at(packed, e)],
                                detail::block_scale(scales, e / detail::kNf4Block));
#pragma unroll
      for (int r = 0; r < MT; ++r) {
        if (r < m) acc[r] = fmaf(w, Convert<T>::to_float(x[r * k + kk]), acc[r]);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < MT; ++r) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) acc[r] += __shfl_xor_sync(0xFFFFFFFFu, acc[r], offset);
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < MT; ++r) {
      if (r < m) y[r * n_out + row] = Convert<T>::from_float(acc[r]);
    }
  }
}

template <typename T>
int launch(const T* x, int64_t m, int64_t k, const uint8_t* packed, const Nf4Scales& scales,
           int64_t n_out, T* y, cudaStream_t stream) {
  const bool vec = k % 32 == 0 && detail::aligned16(x) && detail::aligned16(packed);
  const unsigned grid = static_cast<unsigned>(detail::ceil_div(n_out, kWarps));
  const int mi = static_cast<int>(m);
  if (m <= 1) {
    nf4_gemv_kernel<T, 1><<<grid, kThreads, 0, stream>>>(x, mi, k, packed, scales, n_out, y, vec);
  } else if (m <= 2) {
    nf4_gemv_kernel<T, 2><<<grid, kThreads, 0, stream>>>(x, mi, k, packed, scales, n_out, y, vec);
  } else if (m <= 4) {
    nf4_gemv_kernel<T, 4><<<grid, kThreads, 0, stream>>>(x, mi, k, packed, scales, n_out, y, vec);
  } else if (m <= 8) {
    nf4_gemv_kernel<T, 8><<<grid, kThreads, 0, stream>>>(x, mi, k, packed, scales, n_out, y, vec);
  } else {
    nf4_gemv_kernel<T, 16><<<grid, kThreads, 0, stream>>>(x, mi, k, packed, scales, n_out, y, vec);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int nf4_gemv(const void* x, FloatType x_type, int64_t m, int64_t k, const uint8_t* packed,
             const Nf4Scales& scales, int64_t n_out, void* y, CUstream_st* stream) {
  if (m < 1 || m > kNf4GemvMaxRows || k < 1 || n_out < 1 || x == nullptr || packed == nullptr ||
      y == nullptr ||
      (scales.absmax == nullptr &&
       (scales.absmax_q == nullptr || scales.absmax2 == nullptr || scales.code2 == nullptr)))
    return static_cast<int>(cudaErrorInvalidValue);
  switch (x_type) {
    case FloatType::kBF16:
      return launch(static_cast<const __nv_bfloat16*>(x), m, k, packed, scales, n_out,
                    static_cast<__nv_bfloat16*>(y), stream);
    case FloatType::kF16:
      return launch(static_cast<const __half*>(x), m, k, packed, scales, n_out, static_cast<__half*>(y),
                    stream);
    case FloatType::kF32:
      break;  // not offered: fp32 inputs take dequantize + cuBLAS
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace qlora::kernels
