// LoRA dropout and its backward (include/qlora/model/fused_ops.h): the CPU references (our Philox
// stream, the bit masks), and the dispatch to kernels/dropout.cu for CUDA tensors, SwiGLU with
// down_proj's dropout in one pass among them (Note [SwiGLU with dropout]). Compiled in every
// build; the kernel calls sit under QLORA_WITH_CUDA.
#include "qlora/model/fused_ops.h"
#include "model/fused_ops_internal.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <array>
#include <cmath>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <torch/csrc/autograd/custom_function.h>

#ifdef QLORA_WITH_CUDA
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "qlora/kernels.h"
#endif

namespace qlora::model {

using namespace detail;

// ---------------------------------------------------------------- references

namespace {

bool is_bit_mask(const at::Tensor& mask, const at::Tensor& d) {
  return mask.defined() && mask.scalar_type() == at::kByte && mask.dim() == 1 && mask.numel() == (d.numel() + 7) / 8;
}

}  // namespace

at::Tensor unpack_bits(const at::Tensor& bits, at::IntArrayRef sizes) {
  int64_t n = 1;
  for (const int64_t s : sizes) n *= s;
  TORCH_CHECK(bits.defined() && bits.scalar_type() == at::kByte && bits.dim() == 1 && bits.numel() == (n + 7) / 8,
              "unpack_bits: expected uint8 [", (n + 7) / 8, "] for ", n, " elements, got ", describe(bits));
  const at::Tensor shifts = at::arange(8, bits.options());
  const at::Tensor all = bits.unsqueeze(1).bitwise_right_shift(shifts).bitwise_and(1).reshape({-1});  // [8 ceil(n/8)]
  return all.narrow(0, 0, n).to(at::kBool).reshape(sizes);
}

uint32_t dropout_threshold(double p) {
  TORCH_CHECK(p > 0.0 && p < 1.0, "dropout_threshold: expected p in (0, 1), got ", p);
  const double t = std::round(p * 65536.0);
  return t >= 65535.0 ? 0xFFFFu : static_cast<uint32_t>(t);
}

// Random123's Philox4x32-10, written from the published round function: a round maps
// (c0, c1, c2, c3) with key (k0, k1) to (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1,
// lo(M0 c0)), and the key gains the Weyl constants between rounds.
std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> c, std::array<uint32_t, 2> k) {
  constexpr uint64_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k[0] += kW0;
      k[1] += kW1;
    }
    const uint64_t p0 = kM0 * c[0], p1 = kM1 * c[2];
    c = {static_cast<uint32_t>(p1 >> 32) ^ c[1] ^ k[0], static_cast<uint32_t>(p1),
         static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ k[1], static_cast<uint32_t>(p0)};
  }
  return c;
}

std::vector<DroppedCopy> lora_dropout_reference(const at::Tensor& x, double p, uint64_t seed,
                                                const std::vector<uint64_t>& offsets) {
  const at::Tensor xc = x.detach().to(at::kCPU).contiguous();
  const int64_t n = xc.numel();
  const uint32_t threshold = dropout_threshold(p);
  const auto scale = static_cast<float>(1.0 / (1.0 - p));
  const std::array<uint32_t, 2> key = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
  std::vector<DroppedCopy> out;
  for (const uint64_t off : offsets) {
    at::Tensor keep = at::empty({n}, at::kBool);
    at::Tensor bits = at::zeros({(n + 7) / 8}, at::kByte);
    bool* kp = keep.data_ptr<bool>();
    uint8_t* bp = bits.data_ptr<uint8_t>();
    std::array<uint32_t, 4> words{};
    for (int64_t i = 0; i < n; ++i) {
      if (i % 8 == 0) {  // one Philox block an 8-element group, 16 bits an element
        const auto q = static_cast<uint64_t>(i / 8);
        words = philox4x32_10({static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), static_cast<uint32_t>(off),
                               static_cast<uint32_t>(off >> 32)},
                              key);
      }
      const uint32_t draw = (words[(i % 8) / 2] >> (16 * (i % 2))) & 0xFFFFu;
      kp[i] = draw >= threshold;
      if (kp[i]) bp[i / 8] = static_cast<uint8_t>(bp[i / 8] | (1u << (i % 8)));
    }
    // round(x * scale) in fp32, rounded once to x's dtype; dropped elements +0.
    const at::Tensor scaled = (xc.to(at::kFloat) * scale).to(xc.scalar_type());
    const at::Tensor dropped = at::where(keep.view(xc.sizes()), scaled, at::zeros_like(scaled));
    out.push_back({dropped, bits});
  }
  return out;
}

at::Tensor dropout_backward_add_reference(at::Tensor acc, at::Tensor d, const at::Tensor& given_mask, double scale) {
  const at::Tensor mask = is_bit_mask(given_mask, d) ? unpack_bits(given_mask, d.sizes()) : given_mask;
  TORCH_CHECK(mask.defined() && mask.scalar_type() == at::kBool && mask.sizes() == d.sizes(),
              "dropout_backward_add: expected a bool mask of d's shape ", d.sizes(),
              " or a uint8 bit mask of its elements, got ", describe(given_mask));
  TORCH_CHECK(!acc.defined() || (acc.sizes() == d.sizes() && acc.scalar_type() == d.scalar_type()),
              "dropout_backward_add: expected acc of d's shape and dtype (", describe(d), "), got ", describe(acc));
  d.mul_(mask).mul_(scale);
  return acc.defined() ? acc.add_(d) : d;
}

at::Tensor dropout_backward_add(at::Tensor acc, at::Tensor d, const at::Tensor& mask, double scale) {
#ifdef QLORA_WITH_CUDA
  const bool bits = is_bit_mask(mask, d);
  if (use_kernel(d) && d.is_contiguous() && mask.is_contiguous() && mask.device() == d.device() &&
      (bits || (mask.scalar_type() == at::kBool && mask.sizes() == d.sizes())) &&
      (!acc.defined() || (acc.is_contiguous() && acc.sizes() == d.sizes() && acc.scalar_type() == d.scalar_type() &&
                          acc.device() == d.device()))) {
    at::Tensor out = acc.defined() ? acc : d;
    const c10::cuda::CUDAGuard guard(d.device());
    const void* a = acc.defined() ? acc.const_data_ptr() : nullptr;
    const auto s = static_cast<float>(scale);
    check_launch(bits ? kernels::dropout_backward_add_bits(out.data_ptr(), a, d.const_data_ptr(),
                                                           mask.const_data_ptr<uint8_t>(), d.numel(), s, float_type(d),
                                                           stream_of(d))
                      : kernels::dropout_backward_add(out.data_ptr(), a, d.const_data_ptr(),
                                                      mask.const_data_ptr<bool>(), d.numel(), s, float_type(d),
                                                      stream_of(d)),
                 "dropout_backward_add");
    return out;
  }
#endif
  return dropout_backward_add_reference(std::move(acc), std::move(d), mask, scale);
}

at::Tensor apply_dropout_bits(const at::Tensor& x, const at::Tensor& bits, double scale) {
  TORCH_CHECK(is_bit_mask(bits, x), "apply_dropout_bits: expected a uint8 bit mask of x's ", x.numel(),
              " elements, got ", describe(bits));
#ifdef QLORA_WITH_CUDA
  if (use_kernel(x) && x.is_contiguous() && bits.is_contiguous() && bits.device() == x.device()) {
    at::Tensor out = at::empty_like(x);
    const c10::cuda::CUDAGuard guard(x.device());
    check_launch(kernels::dropout_backward_add_bits(out.data_ptr(), nullptr, x.const_data_ptr(),
                                                    bits.const_data_ptr<uint8_t>(), x.numel(),
                                                    static_cast<float>(scale), float_type(x), stream_of(x)),
                 "apply_dropout_bits");
    return out;
  }
#endif
  // As lora_dropout_reference rounds: x · scale in fp32 (scale rounded to fp32 first, as the
  // kernels take it), once into x's dtype; dropped elements +0.
  const at::Tensor keep = unpack_bits(bits, x.sizes());
  const at::Tensor scaled = (x.to(at::kFloat) * static_cast<float>(scale)).to(x.scalar_type());
  return at::where(keep, scaled, at::zeros_like(scaled));
}

at::Tensor dropout_backward_sum(at::Tensor acc, std::vector<at::Tensor> d, const std::vector<at::Tensor>& bits,
                                double scale) {
  TORCH_CHECK(!d.empty() && d.size() == bits.size(), "dropout_backward_sum: expected as many bit masks as terms (at least ",
              "one), got ", d.size(), " terms and ", bits.size(), " masks");
#ifdef QLORA_WITH_CUDA
  const at::Tensor& d0 = d.front();
  auto fits = [&](const at::Tensor& t) {
    return t.is_contiguous() && t.sizes() == d0.sizes() && t.scalar_type() == d0.scalar_type() &&
           t.device() == d0.device();
  };
  bool kernel = use_kernel(d0) && d.size() <= static_cast<size_t>(kernels::kMaxDropoutOutputs) &&
                (!acc.defined() || fits(acc));
  for (size_t p = 0; p < d.size() && kernel; ++p)
    kernel = fits(d[p]) && is_bit_mask(bits[p], d0) && bits[p].is_contiguous() && bits[p].device() == d0.device();
  if (kernel) {
    at::Tensor out = acc.defined() ? acc : d0;
    const c10::cuda::CUDAGuard guard(d0.device());
    std::array<const void*, kernels::kMaxDropoutOutputs> dp{};
    std::array<const uint8_t*, kernels::kMaxDropoutOutputs> bp{};
    for (size_t p = 0; p < d.size(); ++p) {
      dp[p] = d[p].const_data_ptr();
      bp[p] = bits[p].const_data_ptr<uint8_t>();
    }
    check_launch(kernels::dropout_backward_sum_bits(out.data_ptr(), acc.defined() ? acc.const_data_ptr() : nullptr,
                                                    static_cast<int>(d.size()), dp.data(), bp.data(), d0.numel(),
                                                    static_cast<float>(scale), float_type(d0), stream_of(d0)),
                 "dropout_backward_sum");
    return out;
  }
#endif
  for (size_t p = 0; p < d.size(); ++p) acc = dropout_backward_add(std::move(acc), std::move(d[p]), bits[p], scale);
  return acc;
}

std::vector<DroppedCopy> lora_dropout(const at::Tensor& x, double p, uint64_t seed, const std::vector<uint64_t>& offsets) {
  const auto count = static_cast<int64_t>(offsets.size());
  TORCH_CHECK(x.defined() && x.is_cuda() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf),
              "lora_dropout: expected an fp32, bf16 or fp16 tensor on a CUDA device, got ", describe(x));
  TORCH_CHECK(count >= 1 && count <= 3, "lora_dropout: expected 1 to 3 copies, got ", count);
  const uint32_t threshold = dropout_threshold(p);
#ifdef QLORA_WITH_CUDA
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.numel();
  std::vector<DroppedCopy> out;
  kernels::DropoutDraws draws;
  draws.seed = seed;
  void* outs[kernels::kMaxDropoutOutputs] = {};
  uint8_t* masks[kernels::kMaxDropoutOutputs] = {};
  for (int64_t k = 0; k < count; ++k) {
    out.push_back({at::empty_like(xc), at::empty({(n + 7) / 8}, xc.options().dtype(at::kByte))});
    outs[k] = out.back().x.data_ptr();
    masks[k] = out.back().bits.data_ptr<uint8_t>();
    draws.offset[k] = offsets[static_cast<size_t>(k)];
  }
  const kernels::FloatType type = xc.scalar_type() == at::kFloat ? kernels::FloatType::kF32 : float_type(xc);
  const c10::cuda::CUDAGuard guard(xc.device());
  check_launch(kernels::lora_dropout(xc.const_data_ptr(), n, type, static_cast<int>(count), outs, masks, draws,
                                     threshold, static_cast<float>(1.0 / (1.0 - p)), stream_of(xc)),
               "lora_dropout");
  return out;
#else
  (void)seed;
  (void)threshold;
  TORCH_CHECK(false, "lora_dropout: this build has no CUDA kernels (QLORA_CUDA=OFF)");
#endif
}

#ifdef QLORA_WITH_CUDA
namespace {
// The draws of `count` dropout copies on `device`: the generator's seed and one
// philox_cuda_state(4) offset a copy.
std::pair<uint64_t, std::vector<uint64_t>> dropout_draws(c10::Device device, int64_t count) {
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      std::nullopt, at::cuda::detail::getDefaultCUDAGenerator(device.index()));
  uint64_t seed = 0;
  std::vector<uint64_t> offsets;
  const std::lock_guard<std::mutex> lock(gen->mutex_);
  for (int64_t k = 0; k < count; ++k) {
    const at::PhiloxCudaState st = gen->philox_cuda_state(4);
    TORCH_CHECK(!st.captured_, "lora_dropout: CUDA graph capture is not supported");
    seed = st.seed_.val;
    offsets.push_back(st.offset_.val);
  }
  return {seed, offsets};
}
}  // namespace
#endif

std::vector<DroppedCopy> lora_dropout(const at::Tensor& x, int64_t count, double p) {
  TORCH_CHECK(x.defined() && x.is_cuda(), "lora_dropout: expected a tensor on a CUDA device, got ", describe(x));
  TORCH_CHECK(count >= 1 && count <= 3, "lora_dropout: expected 1 to 3 copies, got ", count);
#ifdef QLORA_WITH_CUDA
  const auto [seed, offsets] = dropout_draws(x.device(), count);
  return lora_dropout(x, p, seed, offsets);
#else
  (void)p;
  TORCH_CHECK(false, "lora_dropout: this build has no CUDA kernels (QLORA_CUDA=OFF)");
#endif
}

namespace {

// lora_dropout_autograd's function: the kernel forward, dropout_backward_add with its bits back.
struct LoraDropoutFunction : public torch::autograd::Function<LoraDropoutFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, double p) {
    DroppedCopy d = std::move(lora_dropout(x, 1, p).front());
    ctx->save_for_backward({d.bits});
    ctx->saved_data["scale"] = 1.0 / (1.0 - p);
    return d.x;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor bits = ctx->get_saved_variables()[0];
    at::Tensor g = grads[0].contiguous().clone();  // the incoming gradient may be shared: a copy to write into
    return {dropout_backward_add(at::Tensor(), std::move(g), bits, ctx->saved_data["scale"].toDouble()), at::Tensor()};
  }
};

}  // namespace

at::Tensor lora_dropout_autograd(const at::Tensor& x, double p) { return LoraDropoutFunction::apply(x, p); }

SwigluDropped swiglu_lora_dropout(const at::Tensor& gu, double p, uint64_t seed, uint64_t offset, bool keep_m) {
  check_gu("swiglu_lora_dropout", gu);
  TORCH_CHECK(gu.is_cuda(), "swiglu_lora_dropout: expected gu on a CUDA device, got ", describe(gu));
  TORCH_CHECK(p > 0.0 && p < 1.0, "swiglu_lora_dropout: expected a dropout probability in (0, 1), got ", p);
#ifdef QLORA_WITH_CUDA
  const int64_t rows = gu.size(0), inter = gu.size(1) / 2;
  SwigluDropped out;
  if (use_kernel(gu)) {
    const int64_t stride = row_stride(gu, 2 * inter);
    if (keep_m) out.m = at::empty({rows, inter}, gu.options());
    out.dropped.x = at::empty({rows, inter}, gu.options());
    out.dropped.bits = at::empty({(rows * inter + 7) / 8}, gu.options().dtype(at::kByte));
    void* m = keep_m ? out.m.data_ptr() : nullptr;
    if (kernels::swiglu_dropout_fits(gu.const_data_ptr(), stride, inter, m, out.dropped.x.data_ptr(), float_type(gu))) {
      kernels::DropoutDraws draws;
      draws.seed = seed;
      draws.offset[0] = offset;
      const c10::cuda::CUDAGuard guard(gu.device());
      check_launch(kernels::swiglu_dropout(gu.const_data_ptr(), stride, rows, inter, float_type(gu), m,
                                           out.dropped.x.data_ptr(), out.dropped.bits.data_ptr<uint8_t>(), draws,
                                           dropout_threshold(p), static_cast<float>(1.0 / (1.0 - p)), stream_of(gu)),
                   "swiglu_lora_dropout");
      return out;
    }
  }
  // Shapes, types or alignments the one-pass kernel does not take: the two kernels it stands for.
  at::Tensor m = swiglu(gu);
  out.dropped = std::move(lora_dropout(m, p, seed, {offset}).front());
  if (keep_m) out.m = std::move(m);
  return out;
#else
  (void)seed;
  (void)offset;
  (void)keep_m;
  TORCH_CHECK(false, "swiglu_lora_dropout: this build has no CUDA kernels (QLORA_CUDA=OFF)");
#endif
}

SwigluDropped swiglu_lora_dropout(const at::Tensor& gu, double p, bool keep_m) {
  TORCH_CHECK(gu.defined() && gu.is_cuda(), "swiglu_lora_dropout: expected gu on a CUDA device, got ", describe(gu));
#ifdef QLORA_WITH_CUDA
  const auto [seed, offsets] = dropout_draws(gu.device(), 1);
  return swiglu_lora_dropout(gu, p, seed, offsets.front(), keep_m);
#else
  (void)p;
  (void)keep_m;
  TORCH_CHECK(false, "swiglu_lora_dropout: this build has no CUDA kernels (QLORA_CUDA=OFF)");
#endif
}

}  // namespace qlora::model
