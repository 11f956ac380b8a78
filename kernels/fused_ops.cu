// Fused element-wise ops of the decoder layer (include/qlora/kernels.h: "fused element-wise
// ops"): RoPE forward / backward on strided head views, in place or from one view into another,
// SwiGLU and GeGLU forward / backward of a merged gate/up GEMM output, RMSNorm's backward with the residual
// gradient added (LoRA dropout and its backward: kernels/dropout.cu). The math is
// model/fused_ops.h's references'; every kernel loads its inputs to fp32, computes in fp32 and
// rounds once into the output type. The shared helpers are in kernels/elementwise.cuh.
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

#include <type_traits>

#include "elementwise.cuh"
#include "qlora/kernels.h"

namespace qlora::kernels {
namespace {

using namespace elementwise;

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

// ---------------------------------------------------------------- SwiGLU, GeGLU

// The GLU MLP's gate activations in fp32: value = act(g) · u, and grad, (dg, du) for dm.
struct SiluGate {
  static __device__ __forceinline__ float value(float g, float u) { return swiglu_value(g, u); }
  static __device__ __forceinline__ void grad(float g, float u, float d, float& dg, float& du) {
    const float s = sigmoid(g);
    du = d * (g * s);
    dg = d * u * (s * (1.0f + g * (1.0f - s)));
  }
};

// gelu_pytorch_tanh in ATen's fp32 opmath and op order (its CUDA GeluCUDAKernelImpl and
// GeluBackwardCUDAKernelImpl for approximate "tanh"), so m and the gradients differ from
// at::gelu(g, "tanh") * u only by the product's one rounding.
struct GeluTanhGate {
  static __device__ __forceinline__ float beta() { return 0.7978845608028654f; }  // sqrt(2) · 2/sqrt(pi) · 0.5
  static __device__ __forceinline__ float kappa() { return 0.044715f; }
  static __device__ __forceinline__ float value(float g, float u) {
    const float cube = g * g * g;
    const float inner = beta() * (g + kappa() * cube);
    return 0.5f * g * (1.0f + tanhf(inner)) * u;
  }
  static __device__ __forceinline__ void grad(float g, float u, float d, float& dg, float& du) {
    const float sq = g * g;
    const float inner = beta() * (g + kappa() * (sq * g));
    const float t = tanhf(inner);
    const float left = 0.5f * g, right = 1.0f + t;
    const float inner_grad = beta() * (1.0f + 3.0f * kappa() * sq);
    du = d * (left * right);
    dg = d * u * (0.5f * right + left * (1.0f - t * t) * inner_grad);
  }
};

// m[r, i] = act(g) * u for columns i of V-groups; g = gu[r, i], u = gu[r, I + i].
template <typename T, int V, typename Gate>
__global__ void __launch_bounds__(kThreads) glu_kernel(const T* __restrict__ gu, int64_t gu_stride, int64_t rows,
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
    for (int k = 0; k < V; ++k) y[k] = Gate::value(g[k], u[k]);
    store<T, V>(m + r * m_stride + i, y);
  }
}

// Note [fused ops in place]: dg over g, du over u.
template <typename T, int V, typename Gate>
__global__ void __launch_bounds__(kThreads) glu_backward_kernel(const T* __restrict__ dm, int64_t dm_stride, T* gu,
                                                                int64_t gu_stride, int64_t rows, int64_t inter) {
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
    for (int k = 0; k < V; ++k) Gate::grad(g[k], u[k], d[k], dg[k], du[k]);
    store<T, V>(gp, dg);
    store<T, V>(up, du);
  }
}

template <typename T, typename Gate>
int launch_glu(const void* gu, int64_t gu_stride, int64_t rows, int64_t inter, void* m, int64_t m_stride,
               cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = inter % kVec == 0 && gu_stride % kVec == 0 && m_stride % kVec == 0 && aligned16(gu) && aligned16(m);
  const T* g = static_cast<const T*>(gu);
  T* out = static_cast<T*>(m);
  if (vec) {
    glu_kernel<T, kVec, Gate><<<grid_for(rows * (inter / kVec)), kThreads, 0, stream>>>(g, gu_stride, rows, inter, out,
                                                                                        m_stride);
  } else {
    glu_kernel<T, 1, Gate><<<grid_for(rows * inter), kThreads, 0, stream>>>(g, gu_stride, rows, inter, out, m_stride);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T, typename Gate>
int launch_glu_backward(const void* dm, int64_t dm_stride, void* gu, int64_t gu_stride, int64_t rows, int64_t inter,
                        cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec =
      inter % kVec == 0 && gu_stride % kVec == 0 && dm_stride % kVec == 0 && aligned16(gu) && aligned16(dm);
  const T* d = static_cast<const T*>(dm);
  T* g = static_cast<T*>(gu);
  if (vec) {
    glu_backward_kernel<T, kVec, Gate>
        <<<grid_for(rows * (inter / kVec)), kThreads, 0, stream>>>(d, dm_stride, g, gu_stride, rows, inter);
  } else {
    glu_backward_kernel<T, 1, Gate><<<grid_for(rows * inter), kThreads, 0, stream>>>(d, dm_stride, g, gu_stride, rows,
                                                                                     inter);
  }
  return static_cast<int>(cudaGetLastError());
}

// The launchers' shared checks and type dispatch.
template <typename Gate>
int glu(const void* gu, int64_t gu_row_stride, int64_t rows, int64_t inter, void* m, int64_t m_row_stride,
        FloatType type, CUstream_st* stream) {
  if (rows < 0 || inter < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0 || inter == 0) return 0;
  if (gu == nullptr || m == nullptr || gu_row_stride < 2 * inter || m_row_stride < inter)
    return static_cast<int>(cudaErrorInvalidValue);
  return dispatch_type(type, [&](auto tag) {
    return launch_glu<decltype(tag), Gate>(gu, gu_row_stride, rows, inter, m, m_row_stride, stream);
  });
}

template <typename Gate>
int glu_backward(const void* dm, int64_t dm_row_stride, void* gu, int64_t gu_row_stride, int64_t rows, int64_t inter,
                 FloatType type, CUstream_st* stream) {
  if (rows < 0 || inter < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0 || inter == 0) return 0;
  if (gu == nullptr || dm == nullptr || gu_row_stride < 2 * inter || dm_row_stride < inter)
    return static_cast<int>(cudaErrorInvalidValue);
  return dispatch_type(type, [&](auto tag) {
    return launch_glu_backward<decltype(tag), Gate>(dm, dm_row_stride, gu, gu_row_stride, rows, inter, stream);
  });
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
  return glu<SiluGate>(gu, gu_row_stride, rows, inter, m, m_row_stride, type, stream);
}

int geglu(const void* gu, int64_t gu_row_stride, int64_t rows, int64_t inter, void* m, int64_t m_row_stride,
          FloatType type, CUstream_st* stream) {
  return glu<GeluTanhGate>(gu, gu_row_stride, rows, inter, m, m_row_stride, type, stream);
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
  return glu_backward<SiluGate>(dm, dm_row_stride, gu, gu_row_stride, rows, inter, type, stream);
}

int geglu_backward_inplace(const void* dm, int64_t dm_row_stride, void* gu, int64_t gu_row_stride, int64_t rows,
                           int64_t inter, FloatType type, CUstream_st* stream) {
  return glu_backward<GeluTanhGate>(dm, dm_row_stride, gu, gu_row_stride, rows, inter, type, stream);
}

}  // namespace qlora::kernels
