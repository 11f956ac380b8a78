// NF4 quantization on the GPU (include/qlora/kernels.h: nf4_quantize), bit for bit the CPU
// reference quant::ref::nf4_quantize: the codes and the fp32 absmax of every block of 64.
// (Double quantization of the absmax stays on the host: quant/nf4_cuda.cpp.)
//
// Note [NF4 quantize kernel]
//   One warp per block of 64 weights; lane l owns elements 2l and 2l + 1, which make one
//   packed byte (even element in the high nibble). The block's absmax is a warp max (exact in
//   any order). Each weight is scaled as the reference does: a full block multiplies by the
//   correctly rounded 1 / max(absmax, 1e-38), the short last block divides; then it is clamped
//   to [-1, 1] and its code is the number of NF4 midpoints strictly below it (ties take the
//   lower code). Midpoints are (a + b) / 2 in fp32, as the reference computes them. The
//   padding nibble of an odd n is the zero code. Weights that are not finite are counted
//   (the caller refuses the tensor).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "nf4_common.cuh"
#include "qlora/kernels.h"

namespace qlora::kernels {
namespace {

using detail::Convert;

constexpr int kThreads = 256;
constexpr int kWarpsPerCta = kThreads / 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr float kMinDivisor = 1e-38f;  // quant::ref's torch-style clamp(min=1e-38)
constexpr uint8_t kZeroCode = 7;       // quant::ref::kNf4ZeroCode: the code of 0.0

__device__ __forceinline__ int nearest_code(float s, const float* mids) {
  int q = 0;
#pragma unroll
  for (int j = 0; j < 15; ++j) q += mids[j] < s ? 1 : 0;
  return q;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) nf4_quantize_kernel(const T* __restrict__ x, int64_t n, int64_t blocks,
                                                                uint8_t* __restrict__ packed,
                                                                float* __restrict__ absmax,
                                                                unsigned long long* __restrict__ non_finite) {
  __shared__ float mids[15];
  if (threadIdx.x < 15)
    mids[threadIdx.x] = __fdiv_rn(__fadd_rn(detail::kNf4Table[threadIdx.x], detail::kNf4Table[threadIdx.x + 1]), 2.0f);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t block = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
  if (block >= blocks) return;  // the whole warp leaves together
  const int64_t i0 = block * detail::kNf4Block + 2 * lane;
  const bool has0 = i0 < n, has1 = i0 + 1 < n;
  const float v0 = has0 ? Convert<T>::to_float(x[i0]) : 0.0f;
  const float v1 = has1 ? Convert<T>::to_float(x[i0 + 1]) : 0.0f;
  int bad = (has0 && !isfinite(v0) ? 1 : 0) + (has1 && !isfinite(v1) ? 1 : 0);
  float amax = fmaxf(fabsf(v0), fabsf(v1));
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, offset));
    bad += __shfl_xor_sync(kFullMask, bad, offset);
  }
  if (lane == 0) {
    absmax[block] = amax;
    if (bad != 0) atomicAdd(non_finite, static_cast<unsigned long long>(bad));
  }
  if (!has0) return;
  const float divisor = fmaxf(amax, kMinDivisor);
  const bool full = (block + 1) * detail::kNf4Block <= n;
  const float inv = __frcp_rn(divisor);
  const float s0 = fminf(1.0f, fmaxf(-1.0f, full ? __fmul_rn(v0, inv) : __fdiv_rn(v0, divisor)));
  const float s1 = fminf(1.0f, fmaxf(-1.0f, full ? __fmul_rn(v1, inv) : __fdiv_rn(v1, divisor)));
  const int q0 = nearest_code(s0, mids);
  const int q1 = has1 ? nearest_code(s1, mids) : kZeroCode;
  packed[i0 >> 1] = static_cast<uint8_t>((q0 << 4) | q1);
}

template <typename T>
int launch(const T* x, int64_t n, uint8_t* packed, float* absmax, unsigned long long* non_finite,
           cudaStream_t stream) {
  const int64_t blocks = detail::ceil_div(n, detail::kNf4Block);
  const int64_t grid = detail::ceil_div(blocks, kWarpsPerCta);
  if (grid > 0x7FFFFFFF) return static_cast<int>(cudaErrorInvalidValue);
  nf4_quantize_kernel<T><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(x, n, blocks, packed, absmax, non_finite);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int nf4_quantize(const void* x, FloatType x_type, int64_t n, uint8_t* packed, float* absmax,
                 unsigned long long* non_finite, CUstream_st* stream) {
  if (n <= 0) return 0;
  if (x == nullptr || packed == nullptr || absmax == nullptr || non_finite == nullptr)
    return static_cast<int>(cudaErrorInvalidValue);
  switch (x_type) {
    case FloatType::kF32:
      return launch(static_cast<const float*>(x), n, packed, absmax, non_finite, stream);
    case FloatType::kBF16:
      return launch(static_cast<const __nv_bfloat16*>(x), n, packed, absmax, non_finite, stream);
    case FloatType::kF16:
      return launch(static_cast<const __half*>(x), n, packed, absmax, non_finite, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace qlora::kernels
