// kernels/elementwise.cuh: what the element-wise kernels (fused_ops.cu, dropout.cu) share: the
// block size, grid sizing, the FloatType dispatch, fp32 conversion and the 16-byte vector loads
// and stores of Note [fused ops vector path] (kernels/fused_ops.cu). Private to kernels/.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "qlora/kernels.h"

namespace qlora::kernels::elementwise {

inline constexpr int kThreads = 256;
inline constexpr int64_t kMaxGrid = 65535LL * 16;  // the grid-stride loops cover the rest

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
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

template <typename T>
struct Conv;
template <>
struct Conv<float> {
  static __device__ __forceinline__ float to(float v) { return v; }
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <>
struct Conv<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Conv<__half> {
  static __device__ __forceinline__ float to(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};

// V elements at p (16-byte aligned when V * sizeof(T) == 16) to fp32.
template <typename T, int V>
__device__ __forceinline__ void load(const T* p, float (&f)[V]) {
  if constexpr (V * sizeof(T) == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    T e[V];
    memcpy(e, &raw, 16);
#pragma unroll
    for (int k = 0; k < V; ++k) f[k] = Conv<T>::to(e[k]);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) f[k] = Conv<T>::to(p[k]);
  }
}

// V fp32 values rounded once into T at p.
template <typename T, int V>
__device__ __forceinline__ void store(T* p, const float (&f)[V]) {
  if constexpr (V * sizeof(T) == 16) {
    T e[V];
#pragma unroll
    for (int k = 0; k < V; ++k) e[k] = Conv<T>::from(f[k]);
    uint4 raw;
    memcpy(&raw, e, 16);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = Conv<T>::from(f[k]);
  }
}

}  // namespace qlora::kernels::elementwise
