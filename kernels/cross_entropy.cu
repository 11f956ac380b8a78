// Cross-entropy rows with the gradient formed in the same pass (include/qlora/kernels.h:
// cross_entropy_rows): model/loss.cpp's fused GPU path, Note [fused cross-entropy].
//
// Note [cross-entropy rows kernel]
//   One CTA a row. Pass 1 reads the row once with an online (max, sum of exp) per thread: each
//   16-byte vector's largest value rescales the running sum at most once, then its elements are
//   added as exp(x - max). The per-thread pairs are merged across the warp (shuffles), then
//   across warps (shared memory); lse = max + log(sum). Thread 0 reads the label's logit before
//   the first barrier, so the overwrite of pass 2 can never race with it. Pass 2 reads the row
//   again (from L2 for all but the largest vocabularies) and writes
//   exp(x - lse) - [j == label], rounded once to the row's type; an ignored row is written as
//   zeros. Everything is fp32 with accurate expf / logf (no fast-math), as the CPU reference
//   model::cross_entropy_rows_reference computes it.
//   Rows whose start is 16-byte aligned with a stride a multiple of 16 bytes take vector
//   loads and stores (the vocab % width tail element-wise); any other layout goes element-wise.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstring>

#include "nf4_common.cuh"
#include "qlora/kernels.h"

namespace qlora::kernels {
namespace {

using detail::Convert;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

// The running (max, sum of exp(x - max)) of one part of a row.
struct MaxSum {
  float m;
  float s;
};

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.0f};  // both parts empty (or all -inf)
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

// Adds one element to a running pair.
__device__ __forceinline__ void add_one(MaxSum& p, float x) {
  if (x > p.m) {
    p.s *= expf(p.m - x);  // p.m = -inf: exp(-inf) = 0, and p.s is 0 anyway
    p.m = x;
  }
  if (p.m != -INFINITY) p.s += expf(x - p.m);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_rows_kernel(T* __restrict__ logits, int64_t vocab, int64_t stride, bool vec,
                              const int64_t* __restrict__ labels, int64_t ignore_index,
                              float* __restrict__ lse_out, float* __restrict__ loss_out) {
  constexpr int kWidth = 16 / sizeof(T);  // elements a 16-byte vector
  __shared__ float warp_m[kWarps];
  __shared__ float warp_s[kWarps];
  __shared__ float row_lse;

  const int64_t r = blockIdx.x;
  T* row = logits + r * stride;
  const int64_t label = __ldg(labels + r);
  const bool counted = label != ignore_index;
  float target = 0.0f;
  if (threadIdx.x == 0 && counted) target = Convert<T>::to_float(row[label]);  // before any overwrite

  // Pass 1: online max / sum.
  MaxSum p{-INFINITY, 0.0f};
  const int64_t vectors = vec ? vocab / kWidth : 0;
  for (int64_t c = threadIdx.x; c < vectors; c += kThreads) {
    const uint4 u = reinterpret_cast<const uint4*>(row)[c];
    T x[kWidth];
    memcpy(x, &u, 16);
    float f[kWidth];
    float local = -INFINITY;
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      f[j] = Convert<T>::to_float(x[j]);
      local = fmaxf(local, f[j]);
    }
    if (local > p.m) {
      p.s *= expf(p.m - local);
      p.m = local;
    }
    if (p.m != -INFINITY) {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) p.s += expf(f[j] - p.m);
    }
  }
  for (int64_t j = vectors * kWidth + threadIdx.x; j < vocab; j += kThreads) add_one(p, Convert<T>::to_float(row[j]));

  // Merge: warp, then across warps.
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const MaxSum o{__shfl_xor_sync(0xffffffffu, p.m, off), __shfl_xor_sync(0xffffffffu, p.s, off)};
    p = merge(p, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_m[warp] = p.m;
    warp_s[warp] = p.s;
  }
  __syncthreads();
  if (warp == 0) {
    MaxSum q = lane < kWarps ? MaxSum{warp_m[lane], warp_s[lane]} : MaxSum{-INFINITY, 0.0f};
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const MaxSum o{__shfl_xor_sync(0xffffffffu, q.m, off), __shfl_xor_sync(0xffffffffu, q.s, off)};
      q = merge(q, o);
    }
    if (lane == 0) {
      const float lse = q.m + logf(q.s);
      row_lse = lse;
      lse_out[r] = lse;
      loss_out[r] = counted ? lse - target : 0.0f;
    }
  }
  __syncthreads();
  const float lse = row_lse;

  // Pass 2: the gradient, in place.
  for (int64_t c = threadIdx.x; c < vectors; c += kThreads) {
    uint4 u = reinterpret_cast<const uint4*>(row)[c];
    T x[kWidth];
    memcpy(x, &u, 16);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      float g = 0.0f;
      if (counted) {
        g = expf(Convert<T>::to_float(x[j]) - lse);
        if (c * kWidth + j == label) g -= 1.0f;
      }
      x[j] = Convert<T>::from_float(g);
    }
    memcpy(&u, x, 16);
    reinterpret_cast<uint4*>(row)[c] = u;
  }
  for (int64_t j = vectors * kWidth + threadIdx.x; j < vocab; j += kThreads) {
    float g = 0.0f;
    if (counted) {
      g = expf(Convert<T>::to_float(row[j]) - lse);
      if (j == label) g -= 1.0f;
    }
    row[j] = Convert<T>::from_float(g);
  }
}

template <typename T>
int launch(T* logits, int64_t n, int64_t vocab, int64_t stride, const int64_t* labels, int64_t ignore_index,
           float* lse, float* loss, cudaStream_t stream) {
  constexpr int64_t kWidth = 16 / sizeof(T);
  const bool vec = detail::aligned16(logits) && stride % kWidth == 0;
  cross_entropy_rows_kernel<T><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(logits, vocab, stride, vec, labels,
                                                                                  ignore_index, lse, loss);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int cross_entropy_rows(void* logits, FloatType type, int64_t n, int64_t vocab, int64_t row_stride,
                       const int64_t* labels, int64_t ignore_index, float* lse, float* loss, CUstream_st* stream) {
  if (n <= 0) return 0;
  if (logits == nullptr || labels == nullptr || lse == nullptr || loss == nullptr || vocab <= 0 ||
      row_stride < vocab || n > 0x7fffffff)
    return static_cast<int>(cudaErrorInvalidValue);
  switch (type) {
    case FloatType::kF32:
      return launch(static_cast<float*>(logits), n, vocab, row_stride, labels, ignore_index, lse, loss, stream);
    case FloatType::kBF16:
      return launch(static_cast<__nv_bfloat16*>(logits), n, vocab, row_stride, labels, ignore_index, lse, loss,
                    stream);
    case FloatType::kF16:
      return launch(static_cast<__half*>(logits), n, vocab, row_stride, labels, ignore_index, lse, loss, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace qlora::kernels
