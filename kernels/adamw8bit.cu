// bitsandbytes' 8-bit blockwise AdamW as one fused pass (include/qlora/kernels.h:
// adamw8bit_step), bit for bit optim::adamw8bit_block_step (src/optim/adamw_ref.cpp, Note
// [bnb 8-bit AdamW semantics]).
//
// Note [AdamW8bit kernel layout]
//   One warp owns one block of 256 elements (one absmax pair): lane l holds elements
//   4l..4l+3 and 128+4l..128+4l+3, so every 16-byte load of the warp (params, fp32 grads) and
//   every 4-byte load (codes) covers one contiguous span. The block's new absmax is a max over
//   the new moments, reduced by shuffles: a max has no rounding, so any order gives the
//   reference's value. Every other operation is written with the _rn intrinsics in the
//   reference's order, so nvcc cannot contract a*b+c into an FMA: the codes and parameters equal
//   the reference's exactly. Lanes past the end of a partial last block take the values the
//   reference gives them (g = 0, m code 128, v code 0), which take part in the absmax.
//   The two dynamic maps come as a kernel parameter and live in shared memory for the binary
//   searches.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <cstring>

#include "nf4_common.cuh"
#include "qlora/kernels.h"

namespace qlora::kernels {
namespace {

using detail::Convert;

constexpr int kBlock = 256;           // elements an absmax
constexpr int kWarps = 8;             // blocks a CTA
constexpr int kThreads = kWarps * 32;
constexpr int kPerLane = kBlock / 32;  // 8

// optim::quantize_dynamic: a 7-level binary search from index 127, then the nearer neighbour
// by the fp32 midpoint.
__device__ __forceinline__ uint8_t quantize_dynamic(const float* code, float x, bool signed_map) {
  int pivot = 127;
  int upper_pivot = 255;
  int lower_pivot = 0;
  float lower = signed_map ? -1.0f : 0.0f;
  float upper = 1.0f;
  float val = code[pivot];
#pragma unroll
  for (int i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = code[pivot];
  }
  if (x > val) {
    const float midpoint = __fmul_rn(__fadd_rn(upper, val), 0.5f);
    return static_cast<uint8_t>(x > midpoint ? upper_pivot : pivot);
  }
  const float midpoint = __fmul_rn(__fadd_rn(lower, val), 0.5f);
  return static_cast<uint8_t>(x < midpoint ? lower_pivot : pivot);
}

// Four consecutive gradients (16-byte aligned for fp32, 8-byte for 16-bit types) as fp32.
template <typename G>
__device__ __forceinline__ void load_grad4(const G* g, float* out);
template <>
__device__ __forceinline__ void load_grad4<float>(const float* g, float* out) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(g));
  out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
}
template <>
__device__ __forceinline__ void load_grad4<__nv_bfloat16>(const __nv_bfloat16* g, float* out) {
  const uint2 v = __ldg(reinterpret_cast<const uint2*>(g));
  out[0] = __uint_as_float(v.x << 16), out[1] = __uint_as_float(v.x & 0xFFFF0000u);
  out[2] = __uint_as_float(v.y << 16), out[3] = __uint_as_float(v.y & 0xFFFF0000u);
}
template <>
__device__ __forceinline__ void load_grad4<__half>(const __half* g, float* out) {
  const uint2 v = __ldg(reinterpret_cast<const uint2*>(g));
  __half2 a, b;
  memcpy(&a, &v.x, 4);
  memcpy(&b, &v.y, 4);
  const float2 fa = __half22float2(a), fb = __half22float2(b);
  out[0] = fa.x, out[1] = fa.y, out[2] = fb.x, out[3] = fb.y;
}

__device__ __forceinline__ void unpack4(uint32_t w, uint8_t* out) {
#pragma unroll
  for (int t = 0; t < 4; ++t) out[t] = static_cast<uint8_t>(w >> (8 * t));
}
__device__ __forceinline__ uint32_t pack4(const uint8_t* c) {
  return uint32_t{c[0]} | (uint32_t{c[1]} << 8) | (uint32_t{c[2]} << 16) | (uint32_t{c[3]} << 24);
}

// Note [AdamW8bit kernel layout]: the warp's block b of one parameter. vec_ok: the pointers
// allow the vector loads of full blocks. code1, code2: the maps in shared memory.
template <typename G>
__device__ __forceinline__ void step_block(float* __restrict__ param, const G* __restrict__ grad,
                                           uint8_t* __restrict__ exp_avg_q, uint8_t* __restrict__ exp_avg_sq_q,
                                           float* __restrict__ absmax1, float* __restrict__ absmax2, int64_t n,
                                           int64_t b, const AdamW8bitScalars& s, const float* code1,
                                           const float* code2, bool vec_ok) {
  const int lane = threadIdx.x & 31;
  const int64_t start = b * kBlock;
  if (start >= n) return;
  const int64_t len = n - start < kBlock ? n - start : kBlock;
  const bool vec = vec_ok && len == kBlock;

  float g[kPerLane], p[kPerLane];
  uint8_t c1[kPerLane], c2[kPerLane];
  if (vec) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t off = start + h * 128 + lane * 4;
      const float4 pv = *reinterpret_cast<const float4*>(param + off);
      p[4 * h] = pv.x, p[4 * h + 1] = pv.y, p[4 * h + 2] = pv.z, p[4 * h + 3] = pv.w;
      load_grad4<G>(grad + off, g + 4 * h);
      unpack4(*reinterpret_cast<const uint32_t*>(exp_avg_q + off), c1 + 4 * h);
      unpack4(*reinterpret_cast<const uint32_t*>(exp_avg_sq_q + off), c2 + 4 * h);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int j = (i / 4) * 128 + lane * 4 + (i % 4);
      const bool real = j < len;
      g[i] = real ? Convert<G>::to_float(grad[start + j]) : 0.0f;
      p[i] = real ? param[start + j] : 0.0f;
      c1[i] = real ? exp_avg_q[start + j] : uint8_t{128};
      c2[i] = real ? exp_avg_sq_q[start + j] : uint8_t{0};
    }
  }

  const float a1 = absmax1[b];
  const float a2 = absmax2[b];
  const float one_minus_beta1 = __fsub_rn(1.0f, s.beta1);
  const float one_minus_beta2 = __fsub_rn(1.0f, s.beta2);
  float m[kPerLane], v[kPerLane];
  float max1 = -FLT_MAX, max2 = -FLT_MAX;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    if (isfinite(g[i])) {
      const float v_old = __fmul_rn(code2[c2[i]], a2);
      v[i] = __fadd_rn(__fmul_rn(v_old, s.beta2), __fmul_rn(__fmul_rn(one_minus_beta2, g[i]), g[i]));
      const float m_old = __fmul_rn(code1[c1[i]], a1);
      m[i] = __fadd_rn(__fmul_rn(m_old, s.beta1), __fmul_rn(one_minus_beta1, g[i]));
    } else {
      m[i] = 0.0f;
      v[i] = 0.0f;
    }
    max1 = fmaxf(max1, fabsf(m[i]));
    max2 = fmaxf(max2, fabsf(v[i]));
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    max1 = fmaxf(max1, __shfl_xor_sync(0xFFFFFFFFu, max1, offset));
    max2 = fmaxf(max2, __shfl_xor_sync(0xFFFFFFFFu, max2, offset));
  }
  if (lane == 0) {
    absmax1[b] = max1;
    absmax2[b] = max2;
  }

  const float eps_term = __fmul_rn(s.correction2, s.eps);
  const float decay = __fsub_rn(1.0f, __fmul_rn(s.lr, s.weight_decay));
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    if (isfinite(g[i])) {
      float pi = __fadd_rn(p[i], __fmul_rn(s.step_size, __fdiv_rn(m[i], __fadd_rn(__fsqrt_rn(v[i]), eps_term))));
      if (s.weight_decay > 0.0f) pi = __fmul_rn(pi, decay);
      p[i] = pi;
    }
    uint8_t q1 = quantize_dynamic(code1, __fdiv_rn(m[i], max1), true);
    if ((signbit(code1[q1]) != 0) != (signbit(m[i]) != 0)) q1 = static_cast<uint8_t>(m[i] > 0.0f ? q1 + 1 : q1 - 1);
    c1[i] = q1;
    c2[i] = quantize_dynamic(code2, __fdiv_rn(v[i], max2), false);
  }

  if (vec) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t off = start + h * 128 + lane * 4;
      *reinterpret_cast<float4*>(param + off) = make_float4(p[4 * h], p[4 * h + 1], p[4 * h + 2], p[4 * h + 3]);
      *reinterpret_cast<uint32_t*>(exp_avg_q + off) = pack4(c1 + 4 * h);
      *reinterpret_cast<uint32_t*>(exp_avg_sq_q + off) = pack4(c2 + 4 * h);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int j = (i / 4) * 128 + lane * 4 + (i % 4);
      if (j < len) {
        param[start + j] = p[i];
        exp_avg_q[start + j] = c1[i];
        exp_avg_sq_q[start + j] = c2[i];
      }
    }
  }
}

// The two maps into shared memory (a CTA has 256 threads: one entry each), for the searches.
__device__ __forceinline__ void load_maps(const DynamicMaps& maps, float* code1, float* code2) {
  code1[threadIdx.x] = maps.signed_map[threadIdx.x];
  code2[threadIdx.x] = maps.unsigned_map[threadIdx.x];
  __syncthreads();
}

// One parameter a launch (adamw8bit_step).
template <typename G>
__global__ void __launch_bounds__(kThreads) adamw8bit_kernel(float* __restrict__ param, const G* __restrict__ grad,
                                                             uint8_t* __restrict__ exp_avg_q,
                                                             uint8_t* __restrict__ exp_avg_sq_q,
                                                             float* __restrict__ absmax1,
                                                             float* __restrict__ absmax2, int64_t n,
                                                             AdamW8bitScalars s, DynamicMaps maps, bool vec_ok) {
  __shared__ float code1[256];
  __shared__ float code2[256];
  load_maps(maps, code1, code2);
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  step_block<G>(param, grad, exp_avg_q, exp_avg_sq_q, absmax1, absmax2, n, b, s, code1, code2, vec_ok);
}

// Note [AdamW8bit multi-tensor launch]
//   LoRA's parameters are hundreds of small tensors (256 for Llama-3.1-8B on q,k,v,o): a launch
//   each costs more than the update. adamw8bit_step_multi hands up to
//   kAdamW8bitTensorsPerLaunch of them to one launch as a kernel parameter (with the maps it
//   stays under the classic 4 KiB of parameters): the 256-element blocks of all of them are
//   numbered one after the other (first_block), each warp finds its tensor by a scan of that
//   prefix and runs the same step_block as the one-tensor kernel, so the bits are the same.
struct MultiEntry {
  float* param;
  const void* grad;
  uint8_t* q1;
  uint8_t* q2;
  float* absmax1;
  float* absmax2;
  int64_t n;
  bool vec_ok;
};
struct MultiArgs {
  int count;
  int64_t first_block[kAdamW8bitTensorsPerLaunch + 1];  // first_block[count]: all blocks
  MultiEntry e[kAdamW8bitTensorsPerLaunch];
};
static_assert(sizeof(MultiArgs) + sizeof(DynamicMaps) + sizeof(AdamW8bitScalars) <= 4096,
              "adamw8bit_multi_kernel's parameters must fit the classic 4 KiB");

template <typename G>
__global__ void __launch_bounds__(kThreads) adamw8bit_multi_kernel(MultiArgs args, AdamW8bitScalars s, DynamicMaps maps) {
  __shared__ float code1[256];
  __shared__ float code2[256];
  load_maps(maps, code1, code2);
  const int64_t gb = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (gb >= args.first_block[args.count]) return;
  int t = 0;
  while (gb >= args.first_block[t + 1]) ++t;  // at most kAdamW8bitTensorsPerLaunch steps, warp-uniform
  const MultiEntry& e = args.e[t];
  step_block<G>(e.param, static_cast<const G*>(e.grad), e.q1, e.q2, e.absmax1, e.absmax2, e.n, gb - args.first_block[t],
                s, code1, code2, e.vec_ok);
}

bool aligned(const void* p, uintptr_t bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

template <typename G>
int launch_multi(const AdamW8bitTensor* tensors, int64_t count, const AdamW8bitScalars& s, const DynamicMaps& maps,
                 cudaStream_t stream) {
  int64_t i = 0;  // the next tensor: a launch takes the next kAdamW8bitTensorsPerLaunch non-empty ones
  while (i < count) {
    MultiArgs args{};
    int64_t blocks = 0;
    for (; i < count && args.count < kAdamW8bitTensorsPerLaunch; ++i) {
      const AdamW8bitTensor& t = tensors[i];
      if (t.n <= 0) continue;
      if (t.param == nullptr || t.grad == nullptr || t.exp_avg_q == nullptr || t.exp_avg_sq_q == nullptr ||
          t.absmax_exp_avg == nullptr || t.absmax_exp_avg_sq == nullptr)
        return static_cast<int>(cudaErrorInvalidValue);
      const G* grad = static_cast<const G*>(t.grad);
      args.first_block[args.count] = blocks;
      args.e[args.count] = {t.param, t.grad, t.exp_avg_q, t.exp_avg_sq_q, t.absmax_exp_avg, t.absmax_exp_avg_sq, t.n,
                            aligned(t.param, 16) && aligned(grad, 4 * sizeof(G)) && aligned(t.exp_avg_q, 4) &&
                                aligned(t.exp_avg_sq_q, 4)};
      blocks += detail::ceil_div(t.n, kBlock);
      ++args.count;
    }
    if (args.count == 0) continue;
    args.first_block[args.count] = blocks;
    const unsigned grid = static_cast<unsigned>(detail::ceil_div(blocks, kWarps));
    adamw8bit_multi_kernel<G><<<grid, kThreads, 0, stream>>>(args, s, maps);
    if (const cudaError_t rc = cudaGetLastError(); rc != cudaSuccess) return static_cast<int>(rc);
  }
  return 0;
}

template <typename G>
int launch(float* param, const G* grad, uint8_t* q1, uint8_t* q2, float* absmax1, float* absmax2, int64_t n,
           const AdamW8bitScalars& s, const DynamicMaps& maps, cudaStream_t stream) {
  const bool vec_ok = aligned(param, 16) && aligned(grad, 4 * sizeof(G)) && aligned(q1, 4) && aligned(q2, 4);
  const int64_t blocks = detail::ceil_div(n, kBlock);
  const unsigned grid = static_cast<unsigned>(detail::ceil_div(blocks, kWarps));
  adamw8bit_kernel<G><<<grid, kThreads, 0, stream>>>(param, grad, q1, q2, absmax1, absmax2, n, s, maps, vec_ok);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

AdamW8bitScalars adamw8bit_scalars(double lr, double beta1, double beta2, double eps, double weight_decay,
                                   int64_t step) {
  // The reference's BnbStepScalars (src/optim/adamw_ref.cpp), operation for operation.
  AdamW8bitScalars s;
  s.beta1 = static_cast<float>(beta1);
  s.beta2 = static_cast<float>(beta2);
  s.eps = static_cast<float>(eps);
  s.lr = static_cast<float>(lr);
  s.weight_decay = static_cast<float>(weight_decay);
  const float t = static_cast<float>(step);
  const float correction1 = 1.0f - std::pow(s.beta1, t);
  s.correction2 = std::sqrt(1.0f - std::pow(s.beta2, t));
  s.step_size = (-s.lr * s.correction2) / correction1;
  return s;
}

int adamw8bit_step(float* param, const void* grad, FloatType grad_type, uint8_t* exp_avg_q,
                   uint8_t* exp_avg_sq_q, float* absmax_exp_avg, float* absmax_exp_avg_sq, int64_t n,
                   const AdamW8bitScalars& scalars, const DynamicMaps& maps, CUstream_st* stream) {
  if (n <= 0) return 0;
  if (param == nullptr || grad == nullptr || exp_avg_q == nullptr || exp_avg_sq_q == nullptr ||
      absmax_exp_avg == nullptr || absmax_exp_avg_sq == nullptr)
    return static_cast<int>(cudaErrorInvalidValue);
  switch (grad_type) {
    case FloatType::kF32:
      return launch(param, static_cast<const float*>(grad), exp_avg_q, exp_avg_sq_q, absmax_exp_avg,
                    absmax_exp_avg_sq, n, scalars, maps, stream);
    case FloatType::kBF16:
      return launch(param, static_cast<const __nv_bfloat16*>(grad), exp_avg_q, exp_avg_sq_q, absmax_exp_avg,
                    absmax_exp_avg_sq, n, scalars, maps, stream);
    case FloatType::kF16:
      return launch(param, static_cast<const __half*>(grad), exp_avg_q, exp_avg_sq_q, absmax_exp_avg,
                    absmax_exp_avg_sq, n, scalars, maps, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int adamw8bit_step_multi(const AdamW8bitTensor* tensors, int64_t count, FloatType grad_type,
                         const AdamW8bitScalars& scalars, const DynamicMaps& maps, CUstream_st* stream) {
  if (count <= 0) return 0;
  if (tensors == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  switch (grad_type) {
    case FloatType::kF32:
      return launch_multi<float>(tensors, count, scalars, maps, stream);
    case FloatType::kBF16:
      return launch_multi<__nv_bfloat16>(tensors, count, scalars, maps, stream);
    case FloatType::kF16:
      return launch_multi<__half>(tensors, count, scalars, maps, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace qlora::kernels
