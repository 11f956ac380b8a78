// LoRA dropout on the GPU (include/qlora/kernels.h): the dropped copies of an input for up to
// three projections sharing it, drawn in one pass with bit masks (Note [LoRA dropout kernel]),
// and the backward: one term with a bool mask (Note [dropout backward add]) or up to three with
// bit masks summed in one pass (Note [dropout backward sum]). The CPU references are
// model::lora_dropout_reference and model::dropout_backward_add_reference; the vector loads
// follow Note [fused ops vector path] (kernels/fused_ops.cu, helpers in elementwise.cuh).
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "elementwise.cuh"
#include "qlora/kernels.h"

namespace qlora::kernels {
namespace {

using namespace elementwise;

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
      const float v = keep[k] ? Convert<T>::to_float(Convert<T>::from_float(dv[k] * scale)) : 0.0f;
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
        const float v = keep ? Convert<T>::to_float(Convert<T>::from_float(dv[k] * scale)) : 0.0f;
        y[k] = p == 0 && acc == nullptr ? v : Convert<T>::to_float(Convert<T>::from_float(y[k] + v));
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

// The keep bits of a full 8-element group `idx` for the draw at `offset`, as dropout_group
// draws them (Note [SwiGLU with dropout]): bit k set where element 8·idx + k is kept (its 16
// bits of Philox at or above threshold).
__device__ __forceinline__ uint32_t keep_bits(uint64_t idx, uint64_t offset, uint2 key, uint32_t threshold) {
  const uint32_t olo = static_cast<uint32_t>(offset), ohi = static_cast<uint32_t>(offset >> 32);
  const uint4 r = philox4x32_10(make_uint4(static_cast<uint32_t>(idx), static_cast<uint32_t>(idx >> 32), olo, ohi), key);
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
  uint32_t bits = 0;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const uint32_t draw = (w[k >> 1] >> (16 * (k & 1))) & 0xFFFFu;
    bits |= static_cast<uint32_t>(draw >= threshold) << k;
  }
  return bits;
}

struct DropoutOutputs {
  void* out[kMaxDropoutOutputs];
  uint8_t* mask[kMaxDropoutOutputs];
  uint64_t offset[kMaxDropoutOutputs];
};

// One 8-element group `idx` of lora_dropout_kernel: m valid elements (8 in every group but a
// ragged last one); kFull: all 8 valid and 16-byte aligned (one vector load and store each).
template <typename T, bool kFull, int kCount>
__device__ __forceinline__ void dropout_group(const T* __restrict__ x, int64_t idx, int m, const DropoutOutputs& o,
                                              uint2 key, uint32_t threshold, float scale) {
  const int64_t i = idx * 8;
  float xv[8];
  if (kFull) {
    load<T, 8>(x + i, xv);
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) xv[k] = k < m ? Convert<T>::to_float(x[i + k]) : 0.0f;
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
      const bool keep = (kFull || k < m) && draw >= threshold;
      y[k] = keep ? xv[k] * scale : 0.0f;
      bits |= static_cast<uint32_t>(keep) << k;
    }
    T* out = static_cast<T*>(o.out[p]);
    if (kFull) {
      store<T, 8>(out + i, y);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k)
        if (k < m) out[i + k] = Convert<T>::from_float(y[k]);
    }
    o.mask[p][idx] = static_cast<uint8_t>(bits);
  }
}

// kCount copies, a compile-time count: a loop over a runtime count indexed the kernel's
// parameter arrays dynamically, which put them in local memory (a 72-byte stack frame).
// The full groups (kVec: 16-byte aligned 16-bit operands) and the rest run in two loops: one
// loop choosing per group kept both paths live at once (ptxas: a 4-byte spill with three bf16 or
// fp16 copies; none now, for any type and count).
template <typename T, bool kVec, int kCount>
__global__ void __launch_bounds__(kThreads) lora_dropout_kernel(const T* __restrict__ x, int64_t n,
                                                                DropoutOutputs o, uint2 key, uint32_t threshold,
                                                                float scale) {
  const int64_t groups = (n + 7) / 8;
  const int64_t full_groups = kVec && sizeof(T) == 2 ? n / 8 : 0;  // fp32: 32 bytes a group, no vector path
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
#pragma unroll 1
  for (int64_t idx = first; idx < full_groups; idx += step)
    dropout_group<T, true, kCount>(x, idx, 8, o, key, threshold, scale);
#pragma unroll 1
  for (int64_t idx = full_groups + first; idx < groups; idx += step)
    dropout_group<T, false, kCount>(x, idx, static_cast<int>(min(static_cast<int64_t>(8), n - idx * 8)), o, key,
                                    threshold, scale);
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

// Note [SwiGLU with dropout]
//   With a LoRA on down_proj, m = swiglu(gu) is that LoRA's input: the forward wrote m, then
//   lora_dropout read it and wrote the dropped copy, and a recompute (which needs no m: down_proj's
//   base GEMM does not run again) wrote m only to read it back. This kernel makes both from gu in
//   one pass: m as swiglu_kernel rounds it (written only when asked), then the dropped copy and
//   mask bits from that rounded m with the draws lora_dropout takes for one copy (keep_bits: the
//   Philox counter is the 8-element group of m's contiguous layout), so the result is the two
//   kernels' bit for bit. 8-element groups only (a group never crosses a row when inter % 8 == 0).
template <typename T, bool kWriteM>
__global__ void __launch_bounds__(kThreads) swiglu_dropout_kernel(const T* __restrict__ gu, int64_t gu_stride,
                                                                  int64_t inter, int64_t groups, T* __restrict__ m,
                                                                  T* __restrict__ dropped, uint8_t* __restrict__ mask,
                                                                  uint2 key, uint64_t offset, uint32_t threshold,
                                                                  float scale) {
  const int64_t per_row = inter / 8;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < groups; idx += step) {
    const T* row = gu + (idx / per_row) * gu_stride + (idx % per_row) * 8;
    float g[8], u[8], y[8];
    load<T, 8>(row, g);
    load<T, 8>(row + inter, u);
#pragma unroll
    for (int k = 0; k < 8; ++k) y[k] = Convert<T>::to_float(Convert<T>::from_float(swiglu_value(g[k], u[k])));
    if (kWriteM) store<T, 8>(m + idx * 8, y);
    const uint32_t bits = keep_bits(static_cast<uint64_t>(idx), offset, key, threshold);
#pragma unroll
    for (int k = 0; k < 8; ++k) y[k] = (bits >> k) & 1u ? y[k] * scale : 0.0f;
    store<T, 8>(dropped + idx * 8, y);
    mask[idx] = static_cast<uint8_t>(bits);
  }
}

}  // namespace

bool swiglu_dropout_fits(const void* gu, int64_t gu_row_stride, int64_t inter, const void* m, const void* dropped,
                         FloatType type) {
  return type != FloatType::kF32 && inter > 0 && inter % 8 == 0 && gu_row_stride % 8 == 0 && aligned16(gu) &&
         aligned16(dropped) && (m == nullptr || aligned16(m));
}

int swiglu_dropout(const void* gu, int64_t gu_row_stride, int64_t rows, int64_t inter, FloatType type, void* m,
                   void* dropped, uint8_t* mask, const DropoutDraws& draws, uint32_t threshold, float scale,
                   CUstream_st* stream) {
  if (rows < 0 || gu == nullptr || dropped == nullptr || mask == nullptr ||
      !swiglu_dropout_fits(gu, gu_row_stride, inter, m, dropped, type))
    return static_cast<int>(cudaErrorInvalidValue);
  const int64_t groups = rows * (inter / 8);
  if (groups == 0) return 0;
  const uint2 key = make_uint2(static_cast<uint32_t>(draws.seed), static_cast<uint32_t>(draws.seed >> 32));
  return dispatch_type(type, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (sizeof(T) != 2) {
      return static_cast<int>(cudaErrorInvalidValue);
    } else {
      const T* g = static_cast<const T*>(gu);
      T* mo = static_cast<T*>(m);
      T* d = static_cast<T*>(dropped);
      const unsigned grid = grid_for(groups);
      if (m != nullptr) {
        swiglu_dropout_kernel<T, true><<<grid, kThreads, 0, stream>>>(g, gu_row_stride, inter, groups, mo, d, mask, key,
                                                                      draws.offset[0], threshold, scale);
      } else {
        swiglu_dropout_kernel<T, false><<<grid, kThreads, 0, stream>>>(g, gu_row_stride, inter, groups, mo, d, mask,
                                                                       key, draws.offset[0], threshold, scale);
      }
      return static_cast<int>(cudaGetLastError());
    }
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
