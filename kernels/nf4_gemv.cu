// Fused NF4 dequant-GEMV for a few rows (include/qlora/kernels.h: nf4_gemv): evaluation and
// generation, where dequantizing the whole weight before a GEMM costs more than the GEMM.
//
// Note [NF4 GEMV layout]
//   One warp computes one output feature (one row of W) for all m rows of x: each 4-bit weight
//   is read from memory once and decoded once (to its exact fp32 dequantized value), then
//   multiplied with the m inputs.
//   Vector path (k % 32 == 0, 16-byte aligned x and packed): K is walked in tiles of 1024;
//   lane j of each warp takes chunk j of the tile (32 weights, 16 bytes, one scale), so a warp
//   reads 512 contiguous bytes of W per tile. The CTA's 8 warps share the tile of x, staged in
//   shared memory ([m][1024] 16-bit values, up to 32 KiB): read from global memory directly,
//   a lane's 64 contiguous bytes per row would make every 16-byte load of the warp touch 16
//   cache lines. In shared memory the 16-byte unit u of a row sits at u ^ ((u >> 3) & 3), which
//   puts the 8 lanes of each quarter-warp in 8 different bank groups for both the staging
//   stores and the per-lane reads. The weights of the tile are loaded before the staging so
//   their latency overlaps it.
//   Each lane sums its products in fp32 (FMA), then the 32 partial sums are added by a
//   butterfly of shuffles and lane 0 rounds the result once into y. Accumulation error is that
//   of a sum of k / 32 + 5 terms per output (the test derives its bound from it), on both paths.
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

constexpr int kTileChunks = 32;                 // chunks of 32 weights a tile (one a lane)
constexpr int kTileUnits = kTileChunks * 32 / 8;  // 16-byte units of x a row of the tile (128)

// Note [NF4 GEMV layout]: where unit u of a staged row of x lives.
__device__ __forceinline__ int swizzle(int u) { return u ^ ((u >> 3) & 3); }

template <typename T, int MT>
__device__ __forceinline__ void reduce_and_store(float (&acc)[MT], int m, int lane, int64_t row, int64_t n_out,
                                                 T* __restrict__ y) {
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

// Vector path (Note [NF4 GEMV layout]): k % 32 == 0, x and packed 16-byte aligned.
template <typename T, int MT>
__global__ void __launch_bounds__(kThreads) nf4_gemv_tiled_kernel(const T* __restrict__ x, int m, int64_t k,
                                                                  const uint8_t* __restrict__ packed,
                                                                  Nf4Scales scales, int64_t n_out,
                                                                  T* __restrict__ y) {
  __shared__ float table[16];
  __shared__ uint4 xs[MT * kTileUnits];  // [MT][128] units of 8 values, swizzled within a row
  detail::load_nf4_table(table);
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const bool active = row < n_out;  // every warp still takes part in the CTA's barriers
  float acc[MT];
#pragma unroll
  for (int r = 0; r < MT; ++r) acc[r] = 0.0f;
  const int64_t chunks = k / 32;
  const uint4* w_row = reinterpret_cast<const uint4*>(packed) + (active ? row : 0) * chunks;

  for (int64_t t0 = 0; t0 < chunks; t0 += kTileChunks) {
    const int64_t c = t0 + lane;
    const bool mine = active && c < chunks;
    uint4 bytes = make_uint4(0, 0, 0, 0);
    float scale = 0.0f;
    if (mine) {
      bytes = __ldg(w_row + c);
      scale = detail::block_scale(scales, (row * k + c * 32) / detail::kNf4Block);
    }
    const int tile_units = static_cast<int>((chunks - t0 < kTileChunks ? chunks - t0 : kTileChunks) * 4);
    __syncthreads();  // the previous tile's readers are done (and the table is written)
    for (int i = threadIdx.x; i < m * kTileUnits; i += kThreads) {
      const int r = i / kTileUnits;
      const int u = i % kTileUnits;
      if (u < tile_units) {
        xs[r * kTileUnits + swizzle(u)] = __ldg(reinterpret_cast<const uint4*>(x + r * k + t0 * 32) + u);
      }
    }
    __syncthreads();
    if (mine) {
      float w[32];
      detail::decode32(bytes, table, scale, w);
#pragma unroll
      for (int r = 0; r < MT; ++r) {
        if (r < m) {
          float a = acc[r];
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const uint4 xv = xs[r * kTileUnits + swizzle(lane * 4 + q)];
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
  }
  if (active) reduce_and_store<T, MT>(acc, m, lane, row, n_out, y);
}

// Any k, any alignment: one weight a lane per step, x read through the cache.
template <typename T, int MT>
__global__ void __launch_bounds__(kThreads) nf4_gemv_scalar_kernel(const T* __restrict__ x, int m, int64_t k,
                                                                   const uint8_t* __restrict__ packed,
                                                                   Nf4Scales scales, int64_t n_out,
                                                                   T* __restrict__ y) {
  __shared__ float table[16];
  detail::load_nf4_table(table);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= n_out) return;
  float acc[MT];
#pragma unroll
  for (int r = 0; r < MT; ++r) acc[r] = 0.0f;
  for (int64_t kk = lane; kk < k; kk += 32) {
    const int64_t e = row * k + kk;
    const float w = __fmul_rn(table[detail::nf4_code_at(packed, e)],
                              detail::block_scale(scales, e / detail::kNf4Block));
#pragma unroll
    for (int r = 0; r < MT; ++r) {
      if (r < m) acc[r] = fmaf(w, Convert<T>::to_float(x[r * k + kk]), acc[r]);
    }
  }
  reduce_and_store<T, MT>(acc, m, lane, row, n_out, y);
}

template <typename T, int MT>
void launch_rows(bool vec, unsigned grid, const T* x, int m, int64_t k, const uint8_t* packed,
                 const Nf4Scales& scales, int64_t n_out, T* y, cudaStream_t stream) {
  if (vec) {
    nf4_gemv_tiled_kernel<T, MT><<<grid, kThreads, 0, stream>>>(x, m, k, packed, scales, n_out, y);
  } else {
    nf4_gemv_scalar_kernel<T, MT><<<grid, kThreads, 0, stream>>>(x, m, k, packed, scales, n_out, y);
  }
}

template <typename T>
int launch(const T* x, int64_t m, int64_t k, const uint8_t* packed, const Nf4Scales& scales,
           int64_t n_out, T* y, cudaStream_t stream) {
  const bool vec = k % 32 == 0 && detail::aligned16(x) && detail::aligned16(packed);
  const unsigned grid = static_cast<unsigned>(detail::ceil_div(n_out, kWarps));
  const int mi = static_cast<int>(m);
  if (m <= 1) {
    launch_rows<T, 1>(vec, grid, x, mi, k, packed, scales, n_out, y, stream);
  } else if (m <= 2) {
    launch_rows<T, 2>(vec, grid, x, mi, k, packed, scales, n_out, y, stream);
  } else if (m <= 4) {
    launch_rows<T, 4>(vec, grid, x, mi, k, packed, scales, n_out, y, stream);
  } else if (m <= 8) {
    launch_rows<T, 8>(vec, grid, x, mi, k, packed, scales, n_out, y, stream);
  } else {
    launch_rows<T, 16>(vec, grid, x, mi, k, packed, scales, n_out, y, stream);
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
