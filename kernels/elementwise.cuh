// kernels/elementwise.cuh: what the element-wise kernels (fused_ops.cu, dropout.cu) share: the
// block size, grid sizing, the FloatType dispatch and the 16-byte vector loads and stores of
// Note [fused ops vector path] (kernels/fused_ops.cu), on nf4_common.cuh's fp32 conversion and
// alignment helpers. Private to kernels/.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "nf4_common.cuh"
#include "qlora/kernels.h"

namespace qlora::kernels::elementwise {

inline constexpr int kThreads = 256;
inline constexpr int64_t kMaxGrid = 65535LL * 16;  // the grid-stride loops cover the rest

using detail::aligned16;  // nf4_common.cuh: the kernels' shared helpers
using detail::ceil_div;
using detail::Convert;

inline unsigned grid_for(int64_t work) { return static_cast<unsigned>(std::min(ceil_div(work, kThreads), kMaxGrid)); }

// f(T{}) with T the storage type `type` names: one switch for every launcher.
template <typename F>
int dispatch_type(FloatType type, F&& f) {
  switch (type) {
    case FloatType::kF32:
      return f(float{});
    case FloatType::kBF16:
      return f(__nv_bfloat16{});
    case FloatType::kF16:
      return f(__half{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}


// sigmoid in fp32 with the accurate expf (g = -inf..inf: expf(-g) = inf gives 0, 0 gives 1).
__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

// SwiGLU's m = silu(g) · u in fp32, as swiglu_kernel and swiglu_dropout_kernel compute it.
__device__ __forceinline__ float swiglu_value(float g, float u) { return g * sigmoid(g) * u; }

// V elements at p (16-byte aligned when V * sizeof(T) == 16) to fp32.
template <typename T, int V>
__device__ __forceinline__ void load(const T* p, float (&f)[V]) {
  if constexpr (V * sizeof(T) == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    T e[V];
    memcpy(e, &raw, 16);
#pragma unroll
    for (int k = 0; k < V; ++k) f[k] = Convert<T>::to_float(e[k]);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) f[k] = Convert<T>::to_float(p[k]);
  }
}

// V fp32 values rounded once into T at p.
template <typename T, int V>
__device__ __forceinline__ void store(T* p, const float (&f)[V]) {
  if constexpr (V * sizeof(T) == 16) {
    T e[V];
#pragma unroll
    for (int k = 0; k < V; ++k) e[k] = Convert<T>::from_float(f[k]);
    uint4 raw;
    memcpy(&raw, e, 16);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = Convert<T>::from_float(f[k]);
  }
}

}  // namespace qlora::kernels::elementwise
