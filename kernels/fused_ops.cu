// Fused element-wise ops of the decoder layer (include/qlora/kernels.h: "fused element-wise
// ops"): RoPE forward / backward on strided head views, in place or from one view into another, SwiGLU forward / backward
// of a merged gate/up GEMM output, LoRA dropout for up to three projections sharing an input,
// and its backward summed into the input gradient. The math is model/fused_ops.h's references'; every kernel
// loads its inputs to fp32, computes in fp32 and rounds once into the output type.
//
// Note [fused ops vector path]
//   A thread handles V consecutive elements (V pairs for RoPE) with one 16-byte load per
//   operand: V = 8 for bf16 / fp16, 4 for fp32. That needs every row start 16-byte aligned:
//   the base pointers aligned and every row stride (and RoPE's half dim, SwiGLU's I, which
//   place the second operand) a multiple of V. When any of it fails the whole launch takes the
//   same kernel with V = 1 (scalar loads): one branch on the host, no mixed rows.
//
// Note [fused ops in place]
//   RoPE: the thread that owns lane i of a row also owns lane i + d/2, reads both (and the
//   matching cos / sin) before writing either, so x can be updated in place. SwiGLU backward:
//   the thread that owns column i reads g_i, u_i, dm_i and then writes dg_i over g_i and du_i
//   over u_i. No pointer here is __restrict__ where it aliases another.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "qlora/kernels.h"

namespace qlora::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 65535LL * 16;  // the grid-stride loops cover the rest

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline unsigned grid_for(int64_t work) { return static_cast<unsigned>(std::min(ceil_div(work, kThreads), kMaxGrid)); }

// f(T{}) with T the storage type `type` names: one switch for every launcher below.
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

// ---------------------------------------------------------------- RoPE

// Rows are the (b, t, h) triples; a row has half / V groups of V pairs (i, i + half), read
// from `in` (view vi) and written to `out` (view vo): the same memory for the in-place ops.
// Forward:  x1' = x1 c1 - x2 s1,  x2' = x2 c2 + x1 s2   (x * cos + rotate_half(x) * sin)
// Backward: g1' = g1 c1 + g2 s2,  g2' = g2 c2 - g1 s1   (g * cos + rotate_half_T(g * sin))
// Copy:     unchanged (cos, sin not read).
template <typename T, int V, RopeMode kMode>
__global__ void __launch_bounds__(kThreads) rope_kernel(T* out, RopeView vo, const T* in, RopeView vi,
                                                        const T* __restrict__ cos, const T* __restrict__ sin) {
  const int64_t half = vi.head_dim / 2;
  const int64_t groups = half / V;
  const int64_t total = vi.batch * vi.seq * vi.heads * groups;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total; idx += step) {
    const int64_t i = (idx % groups) * V;
    const int64_t row = idx / groups;
    const int64_t h = row % vi.heads;
    const int64_t bt = row / vi.heads;
    const int64_t t = bt % vi.seq;
    const int64_t b = bt / vi.seq;
    const T* xr = in + b * vi.stride_batch + t * vi.stride_seq + h * vi.stride_head;
    T* yr = out + b * vo.stride_batch + t * vo.stride_seq + h * vo.stride_head;
    float x1[V], x2[V];
    load<T, V>(xr + i, x1);
    load<T, V>(xr + half + i, x2);
    if constexpr (kMode == RopeMode::kCopy) {
      store<T, V>(yr + i, x1);
      store<T, V>(yr + half + i, x2);
    } else {
      const T* cr = cos + bt * vi.head_dim;
      const T* sr = sin + bt * vi.head_dim;
      float c1[V], c2[V], s1[V], s2[V];
      load<T, V>(cr + i, c1);
      load<T, V>(cr + half + i, c2);
      load<T, V>(sr + i, s1);
      load<T, V>(sr + half + i, s2);
      float y1[V], y2[V];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if constexpr (kMode == RopeMode::kBackward) {
          y1[k] = x1[k] * c1[k] + x2[k] * s2[k];
          y2[k] = x2[k] * c2[k] - x1[k] * s1[k];
        } else {
          y1[k] = x1[k] * c1[k] - x2[k] * s1[k];
          y2[k] = x2[k] * c2[k] + x1[k] * s2[k];
        }
      }
      store<T, V>(yr + i, y1);
      store<T, V>(yr + half + i, y2);
    }
  }
}

bool strides_multiple_of(const RopeView& v, int64_t n) {
  return v.stride_batch % n == 0 && v.stride_seq % n == 0 && v.stride_head % n == 0;
}

template <typename T, RopeMode kMode>
int launch_rope(void* out, const RopeView& vo, const void* in, const RopeView& vi, const void* cos, const void* sin,
                cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t half = vi.head_dim / 2;
  const bool tables = kMode == RopeMode::kCopy || (aligned16(cos) && aligned16(sin));
  const bool vec = half % kVec == 0 && strides_multiple_of(vi, kVec) && strides_multiple_of(vo, kVec) &&
                   aligned16(in) && aligned16(out) && tables;
  T* op = static_cast<T*>(out);
  const T* ip = static_cast<const T*>(in);
  const T* cp = static_cast<const T*>(cos);
  const T* sp = static_cast<const T*>(sin);
  const int64_t rows = vi.batch * vi.seq * vi.heads;
  if (vec) {
    rope_kernel<T, kVec, kMode><<<grid_for(rows * (half / kVec)), kThreads, 0, stream>>>(op, vo, ip, vi, cp, sp);
  } else {
    rope_kernel<T, 1, kMode><<<grid_for(rows * half), kThreads, 0, stream>>>(op, vo, ip, vi, cp, sp);
  }
  return static_cast<int>(cudaGetLastError());
}

int rope_dispatch(void* out, const RopeView& vo, const void* in, const RopeView& vi, const void* cos, const void* sin,
                  FloatType type, RopeMode mode, CUstream_st* stream) {
  if (vi.batch < 0 || vi.seq < 0 || vi.heads < 0 || vi.head_dim < 0 || vi.head_dim % 2 != 0)
    return static_cast<int>(cudaErrorInvalidValue);
  if (vo.batch != vi.batch || vo.seq != vi.seq || vo.heads != vi.heads || vo.head_dim != vi.head_dim)
    return static_cast<int>(cudaErrorInvalidValue);
  if (vi.batch == 0 || vi.seq == 0 || vi.heads == 0 || vi.head_dim == 0) return 0;
  if (out == nullptr || in == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  if (mode != RopeMode::kCopy && (cos == nullptr || sin == nullptr)) return static_cast<int>(cudaErrorInvalidValue);
  return dispatch_type(type, [&](auto tag) {
    using T = decltype(tag);
    switch (mode) {
      case RopeMode::kForward:
        return launch_rope<T, RopeMode::kForward>(out, vo, in, vi, cos, sin, stream);
      case RopeMode::kBackward:
        return launch_rope<T, RopeMode::kBackward>(out, vo, in, vi, cos, sin, stream);
      case RopeMode::kCopy:
        return launch_rope<T, RopeMode::kCopy>(out, vo, in, vi, cos, sin, stream);
    }
    return static_cast<int>(cudaErrorInvalidValue);
  });
}

// ---------------------------------------------------------------- SwiGLU

// sigmoid in fp32 with the accurate expf (g = -inf..inf: expf(-g) = inf gives 0, 0 gives 1).
__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

// m[r, i] = silu(g) * u for columns i of V-groups; g = gu[r, i], u = gu[r, I + i].
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) swiglu_kernel(const T* __restrict__ gu, int64_t gu_stride, int64_t rows,
                                                          int64_t inter, T* __restrict__ m, int64_t m_stride) {
  const int64_t groups = inter / V;
  const int64_t total = rows * groups;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total; idx += step) {
    const int64_t i = (idx % groups) * V;
    const int64_t r = idx / groups;
    float g[V], u[V], y[V];
    load<T, V>(gu + r * gu_stride + i, g);
    load<T, V>(gu + r * gu_stride + inter + i, u);
#pragma unroll
    for (int k = 0; k < V; ++k) y[k] = g[k] * sigmoid(g[k]) * u[k];
    store<T, V>(m + r * m_stride + i, y);
  }
}

// Note [fused ops in place]: dg over g, du over u.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) swiglu_backward_kernel(const T* __restrict__ dm, int64_t dm_stride,
                                                                   T* gu, int64_t gu_stride, int64_t rows,
                                                                   int64_t inter) {
  const int64_t groups = inter / V;
  const int64_t total = rows * groups;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total; idx += step) {
    const int64_t i = (idx % groups) * V;
    const int64_t r = idx / groups;
    T* gp = gu + r * gu_stride + i;
    T* up = gp + inter;
    float g[V], u[V], d[V], dg[V], du[V];
    load<T, V>(gp, g);
    load<T, V>(up, u);
    load<T, V>(dm + r * dm_stride + i, d);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float s = sigmoid(g[k]);
      du[k] = d[k] * (g[k] * s);
      dg[k] = d[k] * u[k] * (s * (1.0f + g[k] * (1.0f - s)));
    }
    store<T, V>(gp, dg);
    store<T, V>(up, du);
  }
}

template <typename T>
int launch_swiglu(const void* gu, int64_t gu_stride, int64_t rows, int64_t inter, void* m, int64_t m_stride,
                  cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = inter % kVec == 0 && gu_stride % kVec == 0 && m_stride % kVec == 0 && aligned16(gu) && aligned16(m);
  const T* g = static_cast<const T*>(gu);
  T* out = static_cast<T*>(m);
  if (vec) {
    swiglu_kernel<T, kVec><<<grid_for(rows * (inter / kVec)), kThreads, 0, stream>>>(g, gu_stride, rows, inter, out,
                                                                                     m_stride);
  } else {
    swiglu_kernel<T, 1><<<grid_for(rows * inter), kThreads, 0, stream>>>(g, gu_stride, rows, inter, out, m_stride);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_swiglu_backward(const void* dm, int64_t dm_stride, void* gu, int64_t gu_stride, int64_t rows,
                           int64_t inter, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec =
      inter % kVec == 0 && gu_stride % kVec == 0 && dm_stride % kVec == 0 && aligned16(gu) && aligned16(dm);
  const T* d = static_cast<const T*>(dm);
  T* g = static_cast<T*>(gu);
  if (vec) {
    swiglu_backward_kernel<T, kVec>
        <<<grid_for(rows * (inter / kVec)), kThreads, 0, stream>>>(d, dm_stride, g, gu_stride, rows, inter);
  } else {
    swiglu_backward_kernel<T, 1><<<grid_for(rows * inter), kThreads, 0, stream>>>(d, dm_stride, g, gu_stride, rows,
                                                                                  inter);
  }
  return static_cast<int>(cudaGetLastError());
}

// Note [dropout backward add]
//   LoRA's dropout backward on the GPU was three ATen kernels a projection: grad * mask (bool
//   promoted: an unvectorized mixed-type kernel), * 1/(1-p), and the add into the gradient
//   that the projections sharing an input sum. One pass here: v = mask ? round(d * scale) : 0,
//   then out = round(acc + v) (or out = v), the same roundings in the same order, so the
//   result keeps the three kernels' bits. mask is the bool mask at::native_dropout returns (bit
//   masks take dropout_backward_sum_kernel below, with one term).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) dropout_backward_add_kernel(T* out, const T* acc, const T* d,
                                                                        const uint8_t* __restrict__ mask, int64_t n,
                                                                        float scale) {
  const int64_t groups = n / V;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < groups; idx += step) {
    const int64_t i = idx * V;
    float dv[V], a[V], y[V];
    bool keep[V];
    load<T, V>(d + i, dv);
    if constexpr (V == 8) {
      const uint2 raw = *reinterpret_cast<const uint2*>(mask + i);
      memcpy(keep, &raw, 8);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) keep[k] = mask[i + k] != 0;
    }
    if (acc != nullptr) load<T, V>(acc + i, a);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float v = keep[k] ? Conv<T>::to(Conv<T>::from(dv[k] * scale)) : 0.0f;
      y[k] = acc != nullptr ? a[k] + v : v;
    }
    store<T, V>(out + i, y);
  }
}

template <typename T>
int launch_dropout_backward_add(void* out, const void* acc, const void* d, const uint8_t* mask, int64_t n, float scale,
                                cudaStream_t stream) {
  constexpr int kVec = 8;  // 16 bytes of bf16 / fp16, 8 bytes of a bool mask
  const bool vec = n % kVec == 0 && aligned16(out) && aligned16(d) && (acc == nullptr || aligned16(acc)) &&
                   (reinterpret_cast<uintptr_t>(mask) & 7u) == 0;
  T* o = static_cast<T*>(out);
  const T* a = static_cast<const T*>(acc);
  const T* dv = static_cast<const T*>(d);
  if (vec) {
    dropout_backward_add_kernel<T, kVec><<<grid_for(n / kVec), kThreads, 0, stream>>>(o, a, dv, mask, n, scale);
  } else {
    dropout_backward_add_kernel<T, 1><<<grid_for(n), kThreads, 0, stream>>>(o, a, dv, mask, n, scale);
  }
  return static_cast<int>(cudaGetLastError());
}

// Note [dropout backward sum]
//   The projections sharing an input (q, k, v; gate, up) each add their dropout backward into
//   that input's gradient: as one call a projection, three passes over [N, h], each reading the
//   sum so far and writing it back. This kernel takes up to three terms with their bit masks
//   (bit i % 8 of byte i / 8, Note [LoRA dropout kernel]) in one pass: y = acc (absent: the
//   first term), then y = round(y + v_p) in the terms' order, v_p = keep_p ? round(d_p * scale)
//   : 0, the roundings of the calls one a term, so the sum is theirs bit for bit. out may alias
//   acc or d[0]: each thread reads all of its elements before it writes them.
struct DropoutGrads {
  const void* d[kMaxDropoutOutputs];
  const uint8_t* bits[kMaxDropoutOutputs];
};

template <typename T, int V, int kCount>
__global__ void __launch_bounds__(kThreads) dropout_backward_sum_kernel(T* out, const T* acc, DropoutGrads g, int64_t n,
                                                                        float scale) {
  const int64_t groups = n / V;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < groups; idx += step) {
    const int64_t i = idx * V;
    float y[V];
    if (acc != nullptr) load<T, V>(acc + i, y);
#pragma unroll
    for (int p = 0; p < kCount; ++p) {
      float dv[V];
      load<T, V>(static_cast<const T*>(g.d[p]) + i, dv);
      const uint8_t* bits = g.bits[p];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const bool keep = V == 8 ? (bits[idx] >> k) & 1u : (bits[(i + k) >> 3] >> ((i + k) & 7)) & 1u;
        const float v = keep ? Conv<T>::to(Conv<T>::from(dv[k] * scale)) : 0.0f;
        y[k] = p == 0 && acc == nullptr ? v : Conv<T>::to(Conv<T>::from(y[k] + v));
      }
    }
    store<T, V>(out + i, y);
  }
}

template <typename T>
int launch_dropout_backward_sum(void* out, const void* acc, int count, const void* const* d,
                                const uint8_t* const* bits, int64_t n, float scale, cudaStream_t stream) {
  constexpr int kVec = 8;  // 16 bytes of bf16 / fp16, one mask byte
  DropoutGrads g{};
  bool vec = n % kVec == 0 && aligned16(out) && (acc == nullptr || aligned16(acc));
  for (int p = 0; p < count; ++p) {
    g.d[p] = d[p];
    g.bits[p] = bits[p];
    vec = vec && aligned16(d[p]);
  }
  T* o = static_cast<T*>(out);
  const T* a = static_cast<const T*>(acc);
  auto with_width = [&](auto width) {
    constexpr int V = decltype(width)::value;
    const unsigned grid = grid_for(n / V);
    if (count == 1) dropout_backward_sum_kernel<T, V, 1><<<grid, kThreads, 0, stream>>>(o, a, g, n, scale);
    if (count == 2) dropout_backward_sum_kernel<T, V, 2><<<grid, kThreads, 0, stream>>>(o, a, g, n, scale);
    if (count == 3) dropout_backward_sum_kernel<T, V, 3><<<grid, kThreads, 0, stream>>>(o, a, g, n, scale);
  };
  if (vec) {
    with_width(std::integral_constant<int, kVec>{});
  } else {
    with_width(std::integral_constant<int, 1>{});
  }
  return static_cast<int>(cudaGetLastError());
}

// ---------------------------------------------------------------- RMSNorm backward + residual

// Note [RMSNorm backward add]
//   The fused decoder layer ends each half's backward with its norm's input gradient plus the
//   residual branch's gradient: ATen's _fused_rms_norm_backward, then an add, two passes over
//   [N, h] and two launches a norm. Here one CTA a row: with r = 1/rms of the row (fp32, kept from
//   forward), dx_j = r g_j w_j − x_j r³ mean_k(g_k w_k x_k), and out_j = round(dx_j + res_j), all in
//   fp32. The first loop sums g·w·x (per thread, then per warp, then over the warps in a fixed
//   order: the same bits every run); the second re-reads the row (now in L1/L2) and writes out.
//   out may alias g or res: each element is read and written by the same thread, after the sum.
//   The CPU reference is model::rms_norm_backward_add_reference.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) rms_norm_backward_add_kernel(T* out, const T* g, const T* x, const T* w,
                                                                         const float* __restrict__ rstd, const T* res,
                                                                         int64_t h) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * h;
  const float r = rstd[blockIdx.x];
  float part = 0.0f;
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * V; j < h; j += kThreads * V) {
    float gv[V], xv[V], wv[V];
    load<T, V>(g + base + j, gv);
    load<T, V>(x + base + j, xv);
    load<T, V>(w + j, wv);
#pragma unroll
    for (int k = 0; k < V; ++k) part += gv[k] * wv[k] * xv[k];
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) part += __shfl_xor_sync(0xFFFFFFFFu, part, off);
  __shared__ float warp_sums[kThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = part;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int k = 0; k < kThreads / 32; ++k) total += warp_sums[k];
  const float c = total / static_cast<float>(h) * r * r * r;
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * V; j < h; j += kThreads * V) {
    float gv[V], xv[V], wv[V], rv[V], y[V];
    load<T, V>(g + base + j, gv);
    load<T, V>(x + base + j, xv);
    load<T, V>(w + j, wv);
    load<T, V>(res + base + j, rv);
#pragma unroll
    for (int k = 0; k < V; ++k) y[k] = r * gv[k] * wv[k] - xv[k] * c + rv[k];
    store<T, V>(out + base + j, y);
  }
}

template <typename T>
int launch_rms_norm_backward_add(void* out, const void* g, const void* x, const void* w, const float* rstd,
                                 const void* res, int64_t rows, int64_t h, cudaStream_t stream) {
  constexpr int kVec = 8;  // 16 bytes of bf16 / fp16
  const bool vec = h % kVec == 0 && aligned16(out) && aligned16(g) && aligned16(x) && aligned16(w) && aligned16(res);
  T* o = static_cast<T*>(out);
  const T *gv = static_cast<const T*>(g), *xv = static_cast<const T*>(x), *wv = static_cast<const T*>(w),
          *rv = static_cast<const T*>(res);
  const auto grid = static_cast<unsigned>(rows);
  if (vec) {
    rms_norm_backward_add_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(o, gv, xv, wv, rstd, rv, h);
  } else {
    rms_norm_backward_add_kernel<T, 1><<<grid, kThreads, 0, stream>>>(o, gv, xv, wv, rstd, rv, h);
  }
  return static_cast<int>(cudaGetLastError());
}

// ---------------------------------------------------------------- LoRA dropout

// Note [LoRA dropout kernel]
//   at::native_dropout reads its input and writes the dropped copy and a bool mask, one
//   projection at a time: q, k and v share their input, so a decoder layer's forward read it
//   three times and wrote three byte masks (the largest element-wise cost of an 8B step after
//   the NF4 dequant). lora_dropout reads x once for up to three projections and writes each
//   one's dropped copy and a bit mask (bit i % 8 of byte i / 8), an eighth of the mask bytes,
//   which the backward (dropout_backward_add with bits) reads.
//   The draws are a pure function of (seed, offset, i), so a recompute draws them again: for
//   projection p, with the offset o_p the device generator handed out (as ATen's kernels take
//   theirs), element i takes 16 bits of Philox4x32-10 with counter (i / 8 low, i / 8 high,
//   o_p low, o_p high) and key (seed low, seed high): of word (i % 8) / 2, the low half for even
//   i, the high half for odd. It is dropped when those 16 bits are below threshold =
//   round(p * 2^16) (a drop probability within 2^-17 of p), else out = round(x * scale),
//   scale = 1 / (1 - p) in fp32. Dropped elements are +0.
//   A thread owns 8 consecutive elements: one 16-byte load of x (bf16 / fp16), one Philox
//   block and one 16-byte store a projection, and one mask byte. 16 bits a draw, not 32: with
//   three copies the Philox rounds (four 32-bit multiplies each) were as long as the memory
//   traffic (bench_nf4's dropout line times the kernel against a copy). The CPU reference is
//   model::lora_dropout_reference; the Philox rounds there are checked against Random123's
//   known answers, and this kernel against the reference bit for bit.
__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 k) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // Random123's multipliers
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // and key increments
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = __umulhi(kM0, c.x), lo0 = kM0 * c.x;
    const uint32_t hi1 = __umulhi(kM1, c.z), lo1 = kM1 * c.z;
    c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    k.x += kW0;
    k.y += kW1;
  }
  return c;
}

struct DropoutOutputs {
  void* out[kMaxDropoutOutputs];
  uint8_t* mask[kMaxDropoutOutputs];
  uint64_t offset[kMaxDropoutOutputs];
};

// kCount copies, a compile-time count: a loop over a runtime count indexed the kernel's
// parameter arrays dynamically, which put them in local memory (a 72-byte stack frame).
template <typename T, bool kVec, int kCount>
__global__ void __launch_bounds__(kThreads) lora_dropout_kernel(const T* __restrict__ x, int64_t n,
                                                                DropoutOutputs o, uint2 key, uint32_t threshold,
                                                                float scale) {
  const int64_t groups = (n + 7) / 8;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < groups; idx += step) {
    const int64_t i = idx * 8;
    const int m = static_cast<int>(min(static_cast<int64_t>(8), n - i));
    const bool full = kVec && m == 8;
    float xv[8];
    if (full) {
      load<T, 8>(x + i, xv);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) xv[k] = k < m ? Conv<T>::to(x[i + k]) : 0.0f;
    }
    const uint64_t q = static_cast<uint64_t>(idx);  // the Philox counter: the 8-element group
#pragma unroll
    for (int p = 0; p < kCount; ++p) {
      const uint64_t off = o.offset[p];
      const uint32_t olo = static_cast<uint32_t>(off), ohi = static_cast<uint32_t>(off >> 32);
      const uint4 r = philox4x32_10(make_uint4(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), olo, ohi), key);
      const uint32_t w[4] = {r.x, r.y, r.z, r.w};
      float y[8];
      uint32_t bits = 0;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const uint32_t draw = (w[k >> 1] >> (16 * (k & 1))) & 0xFFFFu;
        const bool keep = k < m && draw >= threshold;
        y[k] = keep ? xv[k] * scale : 0.0f;
        bits |= static_cast<uint32_t>(keep) << k;
      }
      T* out = static_cast<T*>(o.out[p]);
      if (full) {
        store<T, 8>(out + i, y);
      } else {
#pragma unroll
        for (int k = 0; k < 8; ++k)
          if (k < m) out[i + k] = Conv<T>::from(y[k]);
      }
      o.mask[p][idx] = static_cast<uint8_t>(bits);
    }
  }
}

template <typename T>
int launch_lora_dropout(const void* x, int64_t n, int count, void* const* outs, uint8_t* const* masks,
                        const DropoutDraws& draws, uint32_t threshold, float scale, cudaStream_t stream) {
  DropoutOutputs o{};
  bool vec = aligned16(x);
  for (int p = 0; p < count; ++p) {
    o.out[p] = outs[p];
    o.mask[p] = masks[p];
    o.offset[p] = draws.offset[p];
    vec = vec && aligned16(outs[p]);
  }
  const uint2 key = make_uint2(static_cast<uint32_t>(draws.seed), static_cast<uint32_t>(draws.seed >> 32));
  const T* xv = static_cast<const T*>(x);
  const unsigned grid = grid_for((n + 7) / 8);
  auto launch = [&](auto kernel) { kernel<<<grid, kThreads, 0, stream>>>(xv, n, o, key, threshold, scale); };
  auto with_count = [&](auto vec_tag) {
    constexpr bool kV = decltype(vec_tag)::value;
    if (count == 1) launch(lora_dropout_kernel<T, kV, 1>);
    if (count == 2) launch(lora_dropout_kernel<T, kV, 2>);
    if (count == 3) launch(lora_dropout_kernel<T, kV, 3>);
  };
  if (vec) {
    with_count(std::true_type{});
  } else {
    with_count(std::false_type{});
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int rope_inplace(void* x, const void* cos, const void* sin, FloatType type, const RopeView& view,
                 CUstream_st* stream) {
  return rope_dispatch(x, view, x, view, cos, sin, type, RopeMode::kForward, stream);
}

int rope_backward_inplace(void* g, const void* cos, const void* sin, FloatType type, const RopeView& view,
                          CUstream_st* stream) {
  return rope_dispatch(g, view, g, view, cos, sin, type, RopeMode::kBackward, stream);
}

int rope_into(void* dst, const RopeView& dst_view, const void* src, const RopeView& src_view, const void* cos,
              const void* sin, FloatType type, RopeMode mode, CUstream_st* stream) {
  return rope_dispatch(dst, dst_view, src, src_view, cos, sin, type, mode, stream);
}

int swiglu(const void* gu, int64_t gu_row_stride, int64_t rows, int64_t inter, void* m, int64_t m_row_stride,
           FloatType type, CUstream_st* stream) {
  if (rows < 0 || inter < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0 || inter == 0) return 0;
  if (gu == nullptr || m == nullptr || gu_row_stride < 2 * inter || m_row_stride < inter)
    return static_cast<int>(cudaErrorInvalidValue);
  return dispatch_type(type, [&](auto tag) {
    return launch_swiglu<decltype(tag)>(gu, gu_row_stride, rows, inter, m, m_row_stride, stream);
  });
}

int rms_norm_backward_add(void* out, const void* g, const void* x, const void* w, const float* rstd, const void* res,
                          int64_t rows, int64_t h, FloatType type, CUstream_st* stream) {
  if (rows < 0 || h < 0 || rows >= (int64_t{1} << 31)) return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0 || h == 0) return 0;
  if (out == nullptr || g == nullptr || x == nullptr || w == nullptr || rstd == nullptr || res == nullptr)
    return static_cast<int>(cudaErrorInvalidValue);
  return dispatch_type(type, [&](auto tag) {
    return launch_rms_norm_backward_add<decltype(tag)>(out, g, x, w, rstd, res, rows, h, stream);
  });
}

int swiglu_backward_inplace(const void* dm, int64_t dm_row_stride, void* gu, int64_t gu_row_stride, int64_t rows,
                            int64_t inter, FloatType type, CUstream_st* stream) {
  if (rows < 0 || inter < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0 || inter == 0) return 0;
  if (gu == nullptr || dm == nullptr || gu_row_stride < 2 * inter || dm_row_stride < inter)
    return static_cast<int>(cudaErrorInvalidValue);
  return dispatch_type(type, [&](auto tag) {
    return launch_swiglu_backward<decltype(tag)>(dm, dm_row_stride, gu, gu_row_stride, rows, inter, stream);
  });
}

int dropout_backward_add(void* out, const void* acc, const void* d, const bool* mask, int64_t n, float scale,
                         FloatType type, CUstream_st* stream) {
  if (n < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0) return 0;
  if (out == nullptr || d == nullptr || mask == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  const auto* bytes = reinterpret_cast<const uint8_t*>(mask);
  return dispatch_type(type, [&](auto tag) {
    return launch_dropout_backward_add<decltype(tag)>(out, acc, d, bytes, n, scale, stream);
  });
}

int dropout_backward_add_bits(void* out, const void* acc, const void* d, const uint8_t* bits, int64_t n, float scale,
                              FloatType type, CUstream_st* stream) {
  return dropout_backward_sum_bits(out, acc, 1, &d, &bits, n, scale, type, stream);
}

int dropout_backward_sum_bits(void* out, const void* acc, int count, const void* const* d, const uint8_t* const* bits,
                              int64_t n, float scale, FloatType type, CUstream_st* stream) {
  if (n < 0 || count < 1 || count > kMaxDropoutOutputs) return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0) return 0;
  if (out == nullptr || d == nullptr || bits == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  for (int p = 0; p < count; ++p)
    if (d[p] == nullptr || bits[p] == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  return dispatch_type(type, [&](auto tag) {
    return launch_dropout_backward_sum<decltype(tag)>(out, acc, count, d, bits, n, scale, stream);
  });
}

int lora_dropout(const void* x, int64_t n, FloatType type, int count, void* const* outs, uint8_t* const* masks,
                 const DropoutDraws& draws, uint32_t threshold, float scale, CUstream_st* stream) {
  if (n < 0 || count < 1 || count > kMaxDropoutOutputs || n / 4 >= (int64_t{1} << 62))
    return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0) return 0;
  if (x == nullptr || outs == nullptr || masks == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  for (int p = 0; p < count; ++p)
    if (outs[p] == nullptr || masks[p] == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  return dispatch_type(type, [&](auto tag) {
    return launch_lora_dropout<decltype(tag)>(x, n, count, outs, masks, draws, threshold, scale, stream);
  });
}

}  // namespace qlora::kernels
