// The at::Tensor face of the NF4 reference (include/qlora/quant/nf4_ref.h).
#include "qlora/quant/nf4.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <atomic>
#include <mutex>
#include <sstream>

#include "qlora/quant/nf4_ref.h"

namespace qlora::quant {
namespace {

std::mutex g_kernels_mutex;
std::array<Nf4DeviceKernels, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>
    g_kernels;
std::atomic<uint64_t> g_dequantize_calls{0};

// Blocks of 64 weights one CPU task handles (~1 MiB of fp32 weights).
constexpr int64_t kBlocksPerTask = 4096;

void check_float_dtype(at::ScalarType t, const char* what) {
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, what,
              " must be float32, bfloat16 or float16, got ", t);
}

void check_format(const Nf4Tensor& w) {
  TORCH_CHECK(w.packed.defined() && w.packed.scalar_type() == at::kByte && w.packed.is_contiguous(),
              "Nf4Tensor.packed must be a contiguous uint8 tensor");
  TORCH_CHECK(w.blocksize == ref::kNf4BlockSize, "Nf4Tensor.blocksize must be 64, got ",
              w.blocksize);
  TORCH_CHECK(w.packed.numel() == ref::packed_bytes(w.numel()), "Nf4Tensor.packed holds ",
              w.packed.numel(), " bytes; shape ", at::IntArrayRef(w.shape), " needs ",
              ref::packed_bytes(w.numel()));
  const int64_t blocks = w.blocks();
  if (w.double_quant()) {
    TORCH_CHECK(w.absmax_q.scalar_type() == at::kByte && w.absmax_q.numel() == blocks,
                "Nf4Tensor.absmax_q must be uint8 [", blocks, "], got ", w.absmax_q.scalar_type(),
                " [", w.absmax_q.numel(), "]");
    const int64_t blocks2 = ref::num_blocks(blocks, ref::kAbsmaxBlockSize);
    TORCH_CHECK(w.absmax2.scalar_type() == at::kFloat && w.absmax2.numel() == blocks2,
                "Nf4Tensor.absmax2 must be float32 [", blocks2, "], got ",
                w.absmax2.scalar_type(), " [", w.absmax2.numel(), "]");
    TORCH_CHECK(w.code2.scalar_type() == at::kFloat && w.code2.numel() == 256,
                "Nf4Tensor.code2 must be float32 [256]");
  } else {
    TORCH_CHECK(w.absmax.defined() && w.absmax.scalar_type() == at::kFloat &&
                    w.absmax.numel() == blocks,
                "Nf4Tensor.absmax must be float32 [", blocks, "]");
  }
}

}  // namespace

// ------------------------------------------------------------------ Nf4Tensor
int64_t Nf4Tensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}
int64_t Nf4Tensor::blocks() const { return ref::num_blocks(numel(), blocksize); }
int64_t Nf4Tensor::nbytes() const {
  int64_t total = 0;
  for (const at::Tensor* t : {&packed, &absmax, &absmax_q, &absmax2, &code2}) {
    if (t->defined()) total += t->numel() * static_cast<int64_t>(t->element_size());
  }
  return total;
}

// ------------------------------------------------------------------ quantize
Nf4Tensor quantize_nf4(const at::Tensor& w, bool double_quant) {
  TORCH_CHECK(w.defined() && w.numel() > 0, "quantize_nf4: the weight is empty");
  check_float_dtype(w.scalar_type(), "quantize_nf4: the weight");
  if (!w.device().is_cpu()) {
    const Nf4DeviceKernels k = nf4_device_kernels(w.device().type());
    if (k.quantize != nullptr) return k.quantize(w, double_quant);
  }
  // Widening bf16 / fp16 to fp32 is exact, and bitsandbytes computes in fp32 too.
  const at::Tensor x = w.detach().to(at::kCPU).contiguous().to(at::kFloat);
  const int64_t n = x.numel();
  const int64_t blocks = ref::num_blocks(n, ref::kNf4BlockSize);
  const auto u8 = at::TensorOptions().dtype(at::kByte);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);

  Nf4Tensor q;
  q.shape = w.sizes().vec();
  q.dtype = w.scalar_type();
  q.packed = at::empty({ref::packed_bytes(n)}, u8);
  at::Tensor absmax = at::empty({blocks}, f32);
  const float* src = x.data_ptr<float>();
  uint8_t* packed = q.packed.data_ptr<uint8_t>();
  float* scale = absmax.data_ptr<float>();
  // NF4 has no code for inf / NaN, and bitsandbytes' result for them is an accident of its
  // clamp; a weight holding them is a broken checkpoint. They are counted in the same pass (the
  // chunk is in cache) and finish_nf4_quantize refuses the weight.
  std::atomic<int64_t> non_finite{0};
  // Blocks are independent: each chunk of whole blocks starts on a byte (64 is even), and only
  // the last chunk holds the short block and the padding nibble.
  at::parallel_for(0, blocks, kBlocksPerTask, [&](int64_t b0, int64_t b1) {
    const int64_t begin = b0 * ref::kNf4BlockSize;
    const int64_t end = std::min(b1 * ref::kNf4BlockSize, n);
    ref::nf4_quantize(src + begin, end - begin, packed + begin / 2, scale + b0);
    int64_t bad = 0;
    for (int64_t i = begin; i < end; ++i) bad += std::isfinite(src[i]) ? 0 : 1;
    if (bad != 0) non_finite += bad;
  });
  finish_nf4_quantize(q, w, non_finite.load(), absmax, double_quant);
  return w.device().is_cpu() ? q : nf4_to(q, w.device());
}

void finish_nf4_quantize(Nf4Tensor& q, const at::Tensor& w, int64_t non_finite, const at::Tensor& absmax,
                         bool double_quant) {
  if (non_finite != 0) {
    std::ostringstream os;
    os << "quantize_nf4: the weight of shape " << w.sizes() << " holds " << non_finite
       << " non-finite values (inf or NaN), which NF4 cannot represent";
    throw NonFiniteWeightError(os.str(), non_finite);
  }
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous() && absmax.numel() == q.blocks(),
              "finish_nf4_quantize: absmax must be a contiguous fp32 tensor of ", q.blocks(), " elements, got ",
              absmax.toString(), " of ", absmax.numel());
  if (!double_quant) {
    q.absmax = absmax;
    return;
  }
  const at::Device device = absmax.device();
  const at::Tensor host = absmax.is_cpu() ? absmax : absmax.cpu();
  const int64_t blocks = host.numel();
  // torch.mean, as bitsandbytes takes it: its fp32 summation order decides the last bit.
  q.offset = at::mean(host).item<float>();
  at::Tensor absmax_q = at::empty({blocks}, at::kByte);
  at::Tensor absmax2 = at::empty({ref::num_blocks(blocks, ref::kAbsmaxBlockSize)}, at::kFloat);
  ref::nf4_double_quantize(host.data_ptr<float>(), blocks, q.offset, absmax_q.data_ptr<uint8_t>(),
                           absmax2.data_ptr<float>());
  q.absmax_q = absmax_q.to(device);
  q.absmax2 = absmax2.to(device);
  q.code2 = at::from_blob(const_cast<float*>(ref::dynamic_map()), {256}, at::kFloat).clone().to(device);
}

Nf4Tensor nf4_to(const Nf4Tensor& w, at::Device device) {
  Nf4Tensor out = w;
  for (at::Tensor* t : {&out.packed, &out.absmax, &out.absmax_q, &out.absmax2, &out.code2}) {
    if (t->defined()) *t = t->to(device);
  }
  return out;
}

// ------------------------------------------------------------------ dequantize
at::Tensor nf4_block_absmax(const Nf4Tensor& w) {
  check_format(w);
  if (!w.double_quant()) return w.absmax;
  const int64_t blocks = w.blocks();
  if (w.device().is_cpu()) {
    at::Tensor absmax = at::empty({blocks}, at::TensorOptions().dtype(at::kFloat));
    const at::Tensor q = w.absmax_q.contiguous();
    const at::Tensor a2 = w.absmax2.contiguous();
    const at::Tensor code = w.code2.contiguous();
    ref::nf4_double_dequantize(q.data_ptr<uint8_t>(), a2.data_ptr<float>(), code.data_ptr<float>(),
                               w.offset, blocks, absmax.data_ptr<float>());
    return absmax;
  }
  return nf4_block_absmax_torch_ops(w);
}

at::Tensor dequantize_nf4(const Nf4Tensor& w, at::ScalarType out_dtype) {
  check_float_dtype(out_dtype, "dequantize_nf4: the output dtype");
  g_dequantize_calls.fetch_add(1, std::memory_order_relaxed);
  if (!w.device().is_cpu()) {
    const Nf4DeviceKernels k = nf4_device_kernels(w.device().type());
    if (k.dequantize == nullptr) return dequantize_nf4_torch_ops(w, out_dtype);
    // A kernel that decodes the double-quantized scales itself saves the
    // expansion's few small launches per dequantize (three per linear and step).
    const at::Tensor absmax = k.decodes_statistics ? at::Tensor() : nf4_block_absmax(w).contiguous();
    at::Tensor out = at::empty(w.shape, at::TensorOptions().dtype(out_dtype).device(w.device()));
    k.dequantize(w, absmax, out);
    return out;
  }
  const at::Tensor absmax = nf4_block_absmax(w).contiguous();
  const int64_t n = w.numel();
  at::Tensor out = at::empty(w.shape, at::TensorOptions().dtype(out_dtype));
  const uint8_t* packed = w.packed.data_ptr<uint8_t>();
  const float* scale = absmax.data_ptr<float>();
  void* dst = out.data_ptr();
  at::parallel_for(0, w.blocks(), kBlocksPerTask, [&](int64_t b0, int64_t b1) {
    const int64_t begin = b0 * ref::kNf4BlockSize;
    const int64_t len = std::min(b1 * ref::kNf4BlockSize, n) - begin;
    const uint8_t* p = packed + begin / 2;
    switch (out_dtype) {
      case at::kFloat:
        ref::nf4_dequantize_f32(p, scale + b0, len, static_cast<float*>(dst) + begin);
        break;
      case at::kBFloat16:  // c10::BFloat16 and c10::Half are their 16 bits
        ref::nf4_dequantize_bf16(p, scale + b0, len, static_cast<uint16_t*>(dst) + begin);
        break;
      default:  // kHalf
        ref::nf4_dequantize_f16(p, scale + b0, len, static_cast<uint16_t*>(dst) + begin);
        break;
    }
  });
  return out;
}

// ------------------------------------------------------------------ generic torch-op path
at::Tensor nf4_block_absmax_torch_ops(const Nf4Tensor& w) {
  check_format(w);
  if (!w.double_quant()) return w.absmax;
  const int64_t blocks = w.blocks();
  const at::Tensor scale2 =
      w.absmax2.repeat_interleave(ref::kAbsmaxBlockSize).narrow(0, 0, blocks);
  // fp32 product, then the fp32 offset added: the order bitsandbytes uses.
  return w.code2.index_select(0, w.absmax_q.to(at::kLong)).mul(scale2).add(w.offset);
}

at::Tensor dequantize_nf4_torch_ops(const Nf4Tensor& w, at::ScalarType out_dtype) {
  check_float_dtype(out_dtype, "dequantize_nf4_torch_ops: the output dtype");
  const at::Tensor absmax = nf4_block_absmax_torch_ops(w);
  const int64_t n = w.numel();
  const at::Tensor hi = w.packed.bitwise_right_shift(4);
  const at::Tensor lo = w.packed.bitwise_and(0x0F);
  const at::Tensor codes = at::stack({hi, lo}, 1).reshape({-1}).narrow(0, 0, n).to(at::kLong);
  const at::Tensor table =
      at::from_blob(const_cast<float*>(ref::nf4_code()), {16}, at::TensorOptions().dtype(at::kFloat))
          .to(w.device());
  const at::Tensor scale = absmax.repeat_interleave(w.blocksize).narrow(0, 0, n);
  return table.index_select(0, codes).mul(scale).to(out_dtype).reshape(w.shape);
}

uint64_t nf4_dequantize_calls() { return g_dequantize_calls.load(std::memory_order_relaxed); }

// ------------------------------------------------------------------ device dispatch
void set_nf4_device_kernels(c10::DeviceType type, const Nf4DeviceKernels& kernels) {
  std::lock_guard<std::mutex> lock(g_kernels_mutex);
  g_kernels.at(static_cast<size_t>(type)) = kernels;
}

Nf4DeviceKernels nf4_device_kernels(c10::DeviceType type) {
  std::lock_guard<std::mutex> lock(g_kernels_mutex);
  return g_kernels.at(static_cast<size_t>(type));
}

}  // namespace qlora::quant
