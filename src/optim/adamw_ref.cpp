// Reference optimizer math (torch-free). Every line follows the operation order of the
// implementation it reproduces; do not "simplify" an expression without re-running
// tests/test_optim_adamw*.cpp.
//
// Note [bnb 8-bit AdamW semantics]
// bitsandbytes 0.50.2 has two implementations of optimizer_update_8bit_blockwise:
//  - CUDA (csrc/kernels.cu, kOptimizerStatic8bit2StateBlockwise, 256 elements a block,
//    one element a thread). Per block: dequantize both moments (code[c] * absmax_old),
//    m = m*b1 + (1-b1)*g, v = v*b2 + ((1-b2)*g)*g in fp32; the new absmax is max|m| and
//    max|v| over the block (lanes past the end of a partial last block load g = 0,
//    code 128 for m and 0 for v, so they contribute |code1[128] * absmax_old * b1|);
//    p = p + step_size * (m / (sqrt(v) + c2*eps)) with c1 = 1 - b1^t, c2 = sqrt(1 - b2^t),
//    step_size = -lr*c2/c1; THEN p = p * (1 - lr*wd) (decay after the update, unlike
//    torch); re-quantize m/absmax, v/absmax with quantize_2D (binary search + fp32
//    midpoint); if the chosen m code has a different sign bit than m, move one code
//    towards m's sign. An inf/nan gradient element keeps its parameter and gets zero
//    moments. Fresh state: codes 0 and absmax 0 (dequantizes to 0).
//  - CPU backend (bitsandbytes/backends/cpu/ops.py): dequantize, update with torch ops
//    (decay BEFORE the update, (1-b) in double), re-quantize through a 65,536-bin lookup
//    table over [-1, 1]. The table's resolution (3e-5) is far coarser than the dynamic
//    map near zero (codes 1e-7 apart), so it picks different codes for small moments and
//    can drop their sign: after 20 steps its parameters differ from the CUDA kernel's by
//    up to ~0.3 lr. Swapping only the quantizer of a kernel transcription for the CPU
//    backend's table brings the two to 1 differing code in 8,386 and 1.4e-6 lr on all but
//    that element, so the table is the difference. We follow the CUDA kernel, which is what
//    users of bnb run and what our own kernel must match; test_optim_adamw8bit checks a
//    NumPy transcription of it bit for bit and the CPU backend within a tolerance
//    (scripts/golden/optim.py).
// CUDA evaluates c1, c2 with __powf and divides with __fdividef (approximate), and nvcc
// may contract a*b+c into FMAs; here every operation is a correctly rounded fp32 one.
// Tensors under min_8bit_size (4096) use kOptimizer32bit2State: same update, fp32 state.
#include "qlora/optim/adamw_ref.h"

#include <algorithm>
#include <cfloat>
#include <cmath>

#include "qlora/quant/nf4_ref.h"

namespace qlora::optim {

namespace {

// bitsandbytes create_dynamic_map(signed=True / False) as computed by bnb 0.50.2 with
// torch 2.11 (its torch.linspace rounding is part of the values, so they are stored, not
// recomputed); test_optim_adamw8bit checks them against tests/data/optim/qmaps.safetensors.
// The signed map is the one NF4's double quantization uses: quant::ref::dynamic_map(), one
// table for both. The unsigned one is the optimizer's alone.
constexpr std::array<float, 256> kUnsignedDynamicMap = {
    0x0.0p+0f, 0x1.5cf754p-22f, 0x1.a0133p-21f, 0x1.1d367p-19f, 0x1.2599ecp-18f, 0x1.bc98a2p-18f,
    0x1.29cbaap-17f, 0x1.0624dcp-16f, 0x1.c2e34p-16f, 0x1.3fd0dp-15f, 0x1.9e3p-15f, 0x1.fc8f34p-15f,
    0x1.2d7732p-14f, 0x1.5ca6c8p-14f, 0x1.8bd662p-14f, 0x1.0cb296p-13f, 0x1.82a994p-13f, 0x1.f8a092p-13f,
    0x1.374bc8p-12f, 0x1.724744p-12f, 0x1.ad42c6p-12f, 0x1.e83e44p-12f, 0x1.119ce2p-11f, 0x1.2f1aap-11f,
    0x1.4c986p-11f, 0x1.6a162p-11f, 0x1.8793dep-11f, 0x1.a511ap-11f, 0x1.c28f5ep-11f, 0x1.e00d1cp-11f,
    0x1.fd8adcp-11f, 0x1.2b020cp-10f, 0x1.74bc6ap-10f, 0x1.be76c8p-10f, 0x1.041894p-9f, 0x1.28f5c2p-9f,
    0x1.4dd2fp-9f, 0x1.72b02p-9f, 0x1.978d4ep-9f, 0x1.bc6a8p-9f, 0x1.e147aep-9f, 0x1.03126ep-8f,
    0x1.158104p-8f, 0x1.27ef9ep-8f, 0x1.3a5e34p-8f, 0x1.4cccccp-8f, 0x1.5f3b64p-8f, 0x1.71a9fap-8f,
    0x1.841894p-8f, 0x1.96872ap-8f, 0x1.a8f5c2p-8f, 0x1.bb645cp-8f, 0x1.cdd2fp-8f, 0x1.e0418ap-8f,
    0x1.f2b01ep-8f, 0x1.028f5cp-7f, 0x1.0bc6a8p-7f, 0x1.14fdf2p-7f, 0x1.1e354p-7f, 0x1.276c8ap-7f,
    0x1.30a3d6p-7f, 0x1.39db24p-7f, 0x1.43126ep-7f, 0x1.5eb854p-7f, 0x1.8ccccep-7f, 0x1.bae146p-7f,
    0x1.e8f5c4p-7f, 0x1.0b851ep-6f, 0x1.228f5ep-6f, 0x1.39999ap-6f, 0x1.50a3d6p-6f, 0x1.67ae16p-6f,
    0x1.7eb852p-6f, 0x1.95c28ep-6f, 0x1.accccep-6f, 0x1.c3d70ep-6f, 0x1.dae146p-6f, 0x1.f1eb86p-6f,
    0x1.047aep-5f, 0x1.1p-5f, 0x1.1b851ep-5f, 0x1.270a3ep-5f, 0x1.328f5ep-5f, 0x1.3e147ap-5f,
    0x1.49999ap-5f, 0x1.551eb8p-5f, 0x1.60a3d6p-5f, 0x1.6c28f6p-5f, 0x1.77ae14p-5f, 0x1.833334p-5f,
    0x1.8eb85p-5f, 0x1.9a3d7p-5f, 0x1.a5c28ep-5f, 0x1.b147aep-5f, 0x1.bccccep-5f, 0x1.c851eep-5f,
    0x1.d3d70ep-5f, 0x1.df5c2ap-5f, 0x1.eae146p-5f, 0x1.f66666p-5f, 0x1.00f5c4p-4f, 0x1.06b854p-4f,
    0x1.0c7ae2p-4f, 0x1.123d7p-4f, 0x1.18p-4f, 0x1.1dc29p-4f, 0x1.23852p-4f, 0x1.2947aep-4f,
    0x1.2f0a3ep-4f, 0x1.34cccep-4f, 0x1.3a8f5ep-4f, 0x1.4051ecp-4f, 0x1.46147cp-4f, 0x1.4bd70ap-4f,
    0x1.51999ap-4f, 0x1.575c2ap-4f, 0x1.5d1eb8p-4f, 0x1.62e148p-4f, 0x1.68a3d6p-4f, 0x1.6e6666p-4f,
    0x1.7428f6p-4f, 0x1.79eb86p-4f, 0x1.7fae16p-4f, 0x1.8570a4p-4f, 0x1.8b3334p-4f, 0x1.90f5c4p-4f,
    0x1.96b852p-4f, 0x1.a8p-4f, 0x1.c4ccccp-4f, 0x1.e1999ap-4f, 0x1.fe6666p-4f, 0x1.0d9998p-3f,
    0x1.1cp-3f, 0x1.2a6668p-3f, 0x1.38ccccp-3f, 0x1.473334p-3f, 0x1.559998p-3f, 0x1.64p-3f,
    0x1.726668p-3f, 0x1.80ccccp-3f, 0x1.8f3334p-3f, 0x1.9d9998p-3f, 0x1.acp-3f, 0x1.ba6668p-3f,
    0x1.c8ccccp-3f, 0x1.d73334p-3f, 0x1.e59998p-3f, 0x1.f4p-3f, 0x1.013332p-2f, 0x1.086666p-2f,
    0x1.0f999ap-2f, 0x1.16ccccp-2f, 0x1.1ep-2f, 0x1.253334p-2f, 0x1.2c6666p-2f, 0x1.339998p-2f,
    0x1.3accccp-2f, 0x1.42p-2f, 0x1.493334p-2f, 0x1.506666p-2f, 0x1.579998p-2f, 0x1.5eccccp-2f,
    0x1.66p-2f, 0x1.6d3334p-2f, 0x1.746666p-2f, 0x1.7b9998p-2f, 0x1.82ccccp-2f, 0x1.8ap-2f,
    0x1.913334p-2f, 0x1.986666p-2f, 0x1.9f9998p-2f, 0x1.a6ccccp-2f, 0x1.aep-2f, 0x1.b53334p-2f,
    0x1.bc6666p-2f, 0x1.c39998p-2f, 0x1.caccccp-2f, 0x1.d2p-2f, 0x1.d93334p-2f, 0x1.e06666p-2f,
    0x1.e79998p-2f, 0x1.eeccccp-2f, 0x1.f6p-2f, 0x1.fd3332p-2f, 0x1.023334p-1f, 0x1.05ccccp-1f,
    0x1.096666p-1f, 0x1.0dp-1f, 0x1.109998p-1f, 0x1.143334p-1f, 0x1.17ccccp-1f, 0x1.1b6668p-1f,
    0x1.1fp-1f, 0x1.22999ap-1f, 0x1.263334p-1f, 0x1.29ccccp-1f, 0x1.2d6668p-1f, 0x1.31p-1f,
    0x1.34999ap-1f, 0x1.383334p-1f, 0x1.3bccccp-1f, 0x1.3f6668p-1f, 0x1.43p-1f, 0x1.46999ap-1f,
    0x1.4a3334p-1f, 0x1.4dccccp-1f, 0x1.516668p-1f, 0x1.55p-1f, 0x1.58999ap-1f, 0x1.5c3334p-1f,
    0x1.5fccccp-1f, 0x1.636668p-1f, 0x1.67p-1f, 0x1.6a999ap-1f, 0x1.6e3334p-1f, 0x1.71ccccp-1f,
    0x1.756668p-1f, 0x1.79p-1f, 0x1.7c999ap-1f, 0x1.803334p-1f, 0x1.83ccccp-1f, 0x1.876668p-1f,
    0x1.8bp-1f, 0x1.8e9998p-1f, 0x1.923334p-1f, 0x1.95ccccp-1f, 0x1.996668p-1f, 0x1.9dp-1f,
    0x1.a09998p-1f, 0x1.a43334p-1f, 0x1.a7ccccp-1f, 0x1.ab6668p-1f, 0x1.afp-1f, 0x1.b29998p-1f,
    0x1.b63334p-1f, 0x1.b9ccccp-1f, 0x1.bd6668p-1f, 0x1.c1p-1f, 0x1.c49998p-1f, 0x1.c83334p-1f,
    0x1.cbccccp-1f, 0x1.cf6668p-1f, 0x1.d3p-1f, 0x1.d69998p-1f, 0x1.da3334p-1f, 0x1.ddccccp-1f,
    0x1.e16668p-1f, 0x1.e5p-1f, 0x1.e89998p-1f, 0x1.ec3334p-1f, 0x1.efccccp-1f, 0x1.f36668p-1f,
    0x1.f7p-1f, 0x1.fa9998p-1f, 0x1.fe3334p-1f, 0x1.0p+0f,
};

}  // namespace

const std::array<float, 256>& signed_dynamic_map() {
  static const std::array<float, 256> map = [] {
    std::array<float, 256> m{};
    std::copy_n(quant::ref::dynamic_map(), m.size(), m.begin());
    return m;
  }();
  return map;
}
const std::array<float, 256>& unsigned_dynamic_map() { return kUnsignedDynamicMap; }

uint8_t quantize_dynamic(const float* code, float x, bool signed_map) {
  int pivot = 127;
  int upper_pivot = 255;
  int lower_pivot = 0;
  float lower = signed_map ? -1.0f : 0.0f;
  float upper = 1.0f;
  float val = code[pivot];
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
    const float midpoint = (upper + val) * 0.5f;
    return static_cast<uint8_t>(x > midpoint ? upper_pivot : pivot);
  }
  const float midpoint = (lower + val) * 0.5f;
  return static_cast<uint8_t>(x < midpoint ? lower_pivot : pivot);
}

void adamw_step(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, int64_t n,
                int64_t step, const AdamWHyper& h) {
  // torch/optim/adam.py _single_tensor_adam with decoupled_weight_decay: Python doubles
  // for the scalars, each tensor op in fp32 with its scalar rounded to fp32.
  const double t = static_cast<double>(step);
  const float decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
  const float lerp_w = static_cast<float>(1.0 - h.beta1);          // exp_avg.lerp_(grad, 1 - beta1)
  const float b2 = static_cast<float>(h.beta2);
  const float one_minus_b2 = static_cast<float>(1.0 - h.beta2);
  const double bias_correction1 = 1.0 - std::pow(h.beta1, t);
  const double bias_correction2 = 1.0 - std::pow(h.beta2, t);
  const float neg_step_size = static_cast<float>(-(h.lr / bias_correction1));
  const float bc2_sqrt = static_cast<float>(std::pow(bias_correction2, 0.5));
  const float eps = static_cast<float>(h.eps);
  const bool decays = h.weight_decay != 0.0;
  for (int64_t i = 0; i < n; ++i) {
    float p = param[i];
    const float g = grad[i];
    if (decays) p = p * decay;
    // ATen's AVX2 kernels fuse two of these multiply-adds (measured against torch 2.11:
    // without the FMAs ~2,000 moment elements of 9,386 differ after 20 steps, with them none):
    // lerp with a weight < 0.5 is fmadd(weight, end - self, self); addcmul's
    // self + (value*t1)*t2 is contracted to fma(value*t1, t2, self).
    float m = exp_avg[i];
    m = std::fma(lerp_w, g - m, m);
    float v = exp_avg_sq[i] * b2;
    v = std::fma(one_minus_b2 * g, g, v);
    const float denom = std::sqrt(v) / bc2_sqrt + eps;
    p = p + neg_step_size * m / denom;                              // addcdiv: self + value*t1/t2
    param[i] = p;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
  }
}

namespace {

// The fp32 scalars both bitsandbytes update kernels derive from the
// hyper-parameters and the step, in the kernels' order of operations.
struct BnbStepScalars {
  float beta1, beta2, eps, lr, weight_decay, correction2, step_size;
  BnbStepScalars(const AdamWHyper& h, int64_t step)
      : beta1(static_cast<float>(h.beta1)),
        beta2(static_cast<float>(h.beta2)),
        eps(static_cast<float>(h.eps)),
        lr(static_cast<float>(h.lr)),
        weight_decay(static_cast<float>(h.weight_decay)) {
    const float t = static_cast<float>(step);
    const float correction1 = 1.0f - std::pow(beta1, t);
    correction2 = std::sqrt(1.0f - std::pow(beta2, t));
    step_size = (-lr * correction2) / correction1;
  }
};

}  // namespace

void adamw8bit_block_step(float* param, const float* grad, uint8_t* exp_avg_q, uint8_t* exp_avg_sq_q,
                          float* absmax_exp_avg, float* absmax_exp_avg_sq, int64_t n, int64_t step,
                          const AdamWHyper& h) {
  const float* code1 = quant::ref::dynamic_map();
  const float* code2 = kUnsignedDynamicMap.data();
  const BnbStepScalars k(h, step);
  const float beta1 = k.beta1, beta2 = k.beta2, eps = k.eps, lr = k.lr, weight_decay = k.weight_decay;
  const float correction2 = k.correction2, step_size = k.step_size;
  float m[kQuantBlock];
  float v[kQuantBlock];
  for (int64_t start = 0; start < n; start += kQuantBlock) {
    const int64_t b = start / kQuantBlock;
    const int64_t len = std::min<int64_t>(kQuantBlock, n - start);
    const float a1 = absmax_exp_avg[b];
    const float a2 = absmax_exp_avg_sq[b];
    float max1 = -FLT_MAX;
    float max2 = -FLT_MAX;
    for (int64_t j = 0; j < kQuantBlock; ++j) {
      // lanes past the end: g = 0, code 128 (m) and 0 (v), as the kernel's padded loads
      const bool real = j < len;
      const float g = real ? grad[start + j] : 0.0f;
      if (std::isfinite(g)) {
        const float v_old = code2[real ? exp_avg_sq_q[start + j] : 0] * a2;
        v[j] = (v_old * beta2) + (((1.0f - beta2) * g) * g);
        const float m_old = code1[real ? exp_avg_q[start + j] : 128] * a1;
        m[j] = (m_old * beta1) + ((1.0f - beta1) * g);
      } else {
        m[j] = 0.0f;
        v[j] = 0.0f;
      }
      max1 = std::fmax(max1, std::fabs(m[j]));
      max2 = std::fmax(max2, std::fabs(v[j]));
    }
    absmax_exp_avg[b] = max1;
    absmax_exp_avg_sq[b] = max2;
    for (int64_t j = 0; j < len; ++j) {
      const int64_t i = start + j;
      if (std::isfinite(grad[i])) {
        float p = param[i] + (step_size * (m[j] / (std::sqrt(v[j]) + (correction2 * eps))));
        if (weight_decay > 0.0f) p = p * (1.0f - (lr * weight_decay));
        param[i] = p;
      }
      uint8_t c1 = quantize_dynamic(code1, m[j] / max1, true);
      const uint8_t c2 = quantize_dynamic(code2, v[j] / max2, false);
      if (std::signbit(code1[c1]) != std::signbit(m[j])) c1 = static_cast<uint8_t>(m[j] > 0.0f ? c1 + 1 : c1 - 1);
      exp_avg_q[i] = c1;
      exp_avg_sq_q[i] = c2;
    }
  }
}

void adamw32_bnb_step(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, int64_t n,
                      int64_t step, const AdamWHyper& h) {
  const BnbStepScalars k(h, step);
  const float beta1 = k.beta1, beta2 = k.beta2, eps = k.eps, lr = k.lr, weight_decay = k.weight_decay;
  const float correction2 = k.correction2, step_size = k.step_size;
  for (int64_t i = 0; i < n; ++i) {
    const float g = grad[i];
    const float m = exp_avg[i] * beta1 + ((1.0f - beta1) * g);
    const float v = exp_avg_sq[i] * beta2 + ((1.0f - beta2) * (g * g));
    float p = param[i] + (1.0f * step_size * (m / (std::sqrt(v) + (eps * correction2))));
    if (weight_decay > 0.0f) p = p * (1.0f - (lr * weight_decay));
    param[i] = p;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
  }
}

void dequantize_moment(const uint8_t* q, const float* absmax, int64_t n, bool signed_map, float* out) {
  const float* code = signed_map ? quant::ref::dynamic_map() : kUnsignedDynamicMap.data();
  for (int64_t i = 0; i < n; ++i) out[i] = code[q[i]] * absmax[i / kQuantBlock];
}

}  // namespace qlora::optim
