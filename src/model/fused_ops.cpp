// The fused element-wise ops (include/qlora/model/fused_ops.h): argument checks, the ATen
// references, and the dispatch to kernels/fused_ops.cu and dropout.cu for bf16 / fp16 CUDA tensors. Compiled
// in every build; the kernel calls need CUDA torch (streams, guards), so they sit under
// QLORA_WITH_CUDA and a CPU-only build always takes the references.
#include "qlora/model/fused_ops.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdlib>
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

namespace {

std::string describe(const at::Tensor& t) {
  if (!t.defined()) return "an undefined tensor";
  return std::string(c10::toString(t.scalar_type())) + " " + c10::str(t.sizes()) + " strides " +
         c10::str(t.strides()) + " on " + t.device().str();
}

// The last dim is contiguous (a dim of size <= 1 has no stride to speak of).
bool last_dim_contiguous(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1; }

void check_rope(const char* op, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.defined() && x.dim() == 4, op, ": expected x [B, T, H, d], got ", describe(x));
  TORCH_CHECK(last_dim_contiguous(x), op, ": expected x's last dim contiguous (stride 1), got ", describe(x));
  TORCH_CHECK(x.size(3) % 2 == 0, op, ": expected an even head dim d, got ", x.size(3));
  for (const auto* t : {&cos, &sin}) {
    const char* name = t == &cos ? "cos" : "sin";
    TORCH_CHECK(t->defined() && t->dim() == 3 && t->size(0) == x.size(0) && t->size(1) == x.size(1) &&
                    t->size(2) == x.size(3),
                op, ": expected ", name, " [", x.size(0), ", ", x.size(1), ", ", x.size(3), "] (x is [B, T, H, d] = ",
                x.sizes(), "), got ", describe(*t));
    TORCH_CHECK(t->is_contiguous(), op, ": expected ", name, " contiguous, got ", describe(*t));
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(), op, ": expected ", name,
                " of x's dtype and device (", x.scalar_type(), " on ", x.device(), "), got ", describe(*t));
  }
}

// gu: [N, 2I], last dim contiguous.
void check_gu(const char* op, const at::Tensor& gu) {
  TORCH_CHECK(gu.defined() && gu.dim() == 2 && gu.size(1) % 2 == 0, op,
              ": expected gu [N, 2I] (gate | up), got ", describe(gu));
  TORCH_CHECK(last_dim_contiguous(gu), op, ": expected gu's last dim contiguous (stride 1), got ", describe(gu));
}

void check_dm(const char* op, const at::Tensor& dm, const at::Tensor& gu) {
  const int64_t inter = gu.size(1) / 2;
  TORCH_CHECK(dm.defined() && dm.dim() == 2 && dm.size(0) == gu.size(0) && dm.size(1) == inter, op,
              ": expected dm [", gu.size(0), ", ", inter, "] (gu is ", gu.sizes(), "), got ", describe(dm));
  TORCH_CHECK(last_dim_contiguous(dm), op, ": expected dm's last dim contiguous (stride 1), got ", describe(dm));
  TORCH_CHECK(dm.scalar_type() == gu.scalar_type() && dm.device() == gu.device(), op,
              ": expected dm of gu's dtype and device (", gu.scalar_type(), " on ", gu.device(), "), got ",
              describe(dm));
}

// rotate_half(x) = cat(-x2, x1) over the last dim.
at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

// The transpose of rotate_half: cat(y2, -y1).
at::Tensor rotate_half_t(const at::Tensor& y) {
  const int64_t half = y.size(-1) / 2;
  return at::cat({y.narrow(-1, half, half), -y.narrow(-1, 0, half)}, -1);
}

#ifdef QLORA_WITH_CUDA
bool reference_only() {
  static const bool forced = [] {
    const char* v = std::getenv("QLORA_REFERENCE_OPS");
    return v != nullptr && *v != '\0' && std::string(v) != "0";
  }();
  return forced;
}

// The kernels take bf16 / fp16 CUDA tensors; fp32 keeps the reference (as model::rms_norm).
bool use_kernel(const at::Tensor& t) {
  return !reference_only() && t.is_cuda() &&
         (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf);
}

kernels::FloatType float_type(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 ? kernels::FloatType::kBF16 : kernels::FloatType::kF16;
}

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

void check_launch(int rc, const char* what) {
  TORCH_CHECK(rc == 0, what, ": the CUDA kernel failed: ", kernels::cuda_error_string(rc));
}

// A stride for the kernels: a dim of size 1 is never stepped over, so its stride is 0 (which
// keeps it from spoiling the alignment test of Note [fused ops vector path]).
int64_t stride_of(const at::Tensor& t, int64_t dim) { return t.size(dim) == 1 ? 0 : t.stride(dim); }

kernels::RopeView rope_view(const at::Tensor& x) {
  kernels::RopeView v;
  v.batch = x.size(0);
  v.seq = x.size(1);
  v.heads = x.size(2);
  v.head_dim = x.size(3);
  v.stride_batch = stride_of(x, 0);
  v.stride_seq = stride_of(x, 1);
  v.stride_head = stride_of(x, 2);
  TORCH_CHECK(v.stride_batch >= 0 && v.stride_seq >= 0 && v.stride_head >= 0,
              "rope: expected non-negative strides, got ", x.strides());
  return v;
}

// A row stride for the kernels: any value >= the row's width serves a single row.
int64_t row_stride(const at::Tensor& t, int64_t width) { return t.size(0) <= 1 ? width : t.stride(0); }
#endif

}  // namespace

// ---------------------------------------------------------------- references

void rope_inplace_reference(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_rope("rope_inplace", x, cos, sin);
  // model::apply_rope's ops on [B, T, H, d] instead of [B, H, T, d]: the same values.
  const at::Tensor c = cos.unsqueeze(2), s = sin.unsqueeze(2);  // [B, T, 1, d]
  x.copy_(x * c + rotate_half(x) * s);
}

void rope_backward_inplace_reference(at::Tensor& g, const at::Tensor& cos, const at::Tensor& sin) {
  check_rope("rope_backward_inplace", g, cos, sin);
  const at::Tensor c = cos.unsqueeze(2), s = sin.unsqueeze(2);  // [B, T, 1, d]
  g.copy_(g * c + rotate_half_t(g * s));
}

at::Tensor swiglu_reference(const at::Tensor& gu) {
  check_gu("swiglu", gu);
  const int64_t inter = gu.size(1) / 2;
  return (at::silu(gu.narrow(1, 0, inter)) * gu.narrow(1, inter, inter)).contiguous();
}

at::Tensor rms_norm_backward_add_reference(at::Tensor g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd,
                                           const at::Tensor& res) {
  TORCH_CHECK(g.dim() == 2 && x.sizes() == g.sizes() && res.sizes() == g.sizes() && w.dim() == 1 &&
                  w.size(0) == g.size(1) && rstd.numel() == g.size(0),
              "rms_norm_backward_add: expected g, x, res [N, h], w [h] and rstd [N] (or [N, 1]), got g ", describe(g),
              ", x ", describe(x), ", w ", describe(w), ", rstd ", describe(rstd), ", res ", describe(res));
  const at::Tensor gw = g.to(at::kFloat) * w.to(at::kFloat);
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor r = rstd.to(at::kFloat).reshape({-1, 1});
  const at::Tensor c = (gw * xf).mean(-1, /*keepdim=*/true) * r * r * r;
  g.copy_(r * gw - xf * c + res.to(at::kFloat));
  return g;
}

void swiglu_backward_inplace_reference(const at::Tensor& dm, at::Tensor& gu) {
  check_gu("swiglu_backward_inplace", gu);
  check_dm("swiglu_backward_inplace", dm, gu);
  const int64_t inter = gu.size(1) / 2;
  at::Tensor g = gu.narrow(1, 0, inter), u = gu.narrow(1, inter, inter);
  const at::Tensor sig = at::sigmoid(g);
  const at::Tensor du = dm * (g * sig);
  const at::Tensor dg = dm * u * (sig * (1 + g * (1 - sig)));
  g.copy_(dg);  // both computed before either half is overwritten
  u.copy_(du);
}

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

// ---------------------------------------------------------------- dispatch

void rope_inplace(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
#ifdef QLORA_WITH_CUDA
  if (use_kernel(x)) {
    check_rope("rope_inplace", x, cos, sin);
    const c10::cuda::CUDAGuard guard(x.device());
    check_launch(kernels::rope_inplace(x.data_ptr(), cos.const_data_ptr(), sin.const_data_ptr(), float_type(x),
                                       rope_view(x), stream_of(x)),
                 "rope_inplace");
    return;
  }
#endif
  rope_inplace_reference(x, cos, sin);
}

void rope_backward_inplace(at::Tensor& g, const at::Tensor& cos, const at::Tensor& sin) {
#ifdef QLORA_WITH_CUDA
  if (use_kernel(g)) {
    check_rope("rope_backward_inplace", g, cos, sin);
    const c10::cuda::CUDAGuard guard(g.device());
    check_launch(kernels::rope_backward_inplace(g.data_ptr(), cos.const_data_ptr(), sin.const_data_ptr(),
                                                float_type(g), rope_view(g), stream_of(g)),
                 "rope_backward_inplace");
    return;
  }
#endif
  rope_backward_inplace_reference(g, cos, sin);
}

namespace {

// dst and src of one [B, T, H, d] shape, dtype and device, not overlapping (rope_into's rules).
void check_into(const char* op, const at::Tensor& dst, const at::Tensor& src) {
  TORCH_CHECK(dst.defined() && src.defined() && dst.dim() == 4 && dst.sizes() == src.sizes() &&
                  dst.scalar_type() == src.scalar_type() && dst.device() == src.device(),
              op, ": expected dst and src of one [B, T, H, d] shape, dtype and device, got dst ", describe(dst),
              " and src ", describe(src));
  TORCH_CHECK(last_dim_contiguous(dst) && last_dim_contiguous(src), op,
              ": expected the last dims contiguous (stride 1), got dst ", describe(dst), " and src ", describe(src));
  TORCH_CHECK(dst.numel() == 0 || !dst.is_same(src), op, ": dst and src are the same tensor; use the in-place op");
}

// rope_into, rope_backward_into, copy_heads: the kernel, or the copy and then the in-place
// reference (the values the kernel's single rounding gives, since the copy is exact).
void into(const char* op, at::Tensor& dst, const at::Tensor& src, const at::Tensor* cos, const at::Tensor* sin,
          bool backward) {
  check_into(op, dst, src);
  if (cos != nullptr) check_rope(op, src, *cos, *sin);
#ifdef QLORA_WITH_CUDA
  if (use_kernel(dst)) {
    const kernels::RopeMode mode =
        cos == nullptr ? kernels::RopeMode::kCopy : (backward ? kernels::RopeMode::kBackward : kernels::RopeMode::kForward);
    const c10::cuda::CUDAGuard guard(dst.device());
    check_launch(kernels::rope_into(dst.data_ptr(), rope_view(dst), src.const_data_ptr(), rope_view(src),
                                    cos ? cos->const_data_ptr() : nullptr, sin ? sin->const_data_ptr() : nullptr,
                                    float_type(dst), mode, stream_of(dst)),
                 op);
    return;
  }
#endif
  dst.copy_(src);
  if (cos == nullptr) return;
  if (backward)
    rope_backward_inplace_reference(dst, *cos, *sin);
  else
    rope_inplace_reference(dst, *cos, *sin);
}

}  // namespace

void rope_into(at::Tensor& dst, const at::Tensor& src, const at::Tensor& cos, const at::Tensor& sin) {
  into("rope_into", dst, src, &cos, &sin, false);
}

void rope_backward_into(at::Tensor& dst, const at::Tensor& src, const at::Tensor& cos, const at::Tensor& sin) {
  into("rope_backward_into", dst, src, &cos, &sin, true);
}

void copy_heads(at::Tensor& dst, const at::Tensor& src) { into("copy_heads", dst, src, nullptr, nullptr, false); }

at::Tensor swiglu(const at::Tensor& gu) {
#ifdef QLORA_WITH_CUDA
  if (use_kernel(gu)) {
    check_gu("swiglu", gu);
    const int64_t inter = gu.size(1) / 2;
    at::Tensor m = at::empty({gu.size(0), inter}, gu.options());  // [N, I] contiguous
    const c10::cuda::CUDAGuard guard(gu.device());
    check_launch(kernels::swiglu(gu.const_data_ptr(), row_stride(gu, 2 * inter), gu.size(0), inter, m.data_ptr(),
                                 inter, float_type(gu), stream_of(gu)),
                 "swiglu");
    return m;
  }
#endif
  return swiglu_reference(gu);
}

at::Tensor rms_norm_backward_add(at::Tensor g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd,
                                 const at::Tensor& res) {
#ifdef QLORA_WITH_CUDA
  auto same = [&](const at::Tensor& t) {
    return t.is_contiguous() && t.sizes() == g.sizes() && t.scalar_type() == g.scalar_type() && t.device() == g.device();
  };
  if (use_kernel(g) && g.dim() == 2 && g.is_contiguous() && same(x) && same(res) && w.dim() == 1 &&
      w.size(0) == g.size(1) && w.is_contiguous() && w.scalar_type() == g.scalar_type() && w.device() == g.device() &&
      rstd.scalar_type() == at::kFloat && rstd.numel() == g.size(0) && rstd.is_contiguous() && rstd.device() == g.device()) {
    const c10::cuda::CUDAGuard guard(g.device());
    check_launch(kernels::rms_norm_backward_add(g.data_ptr(), g.const_data_ptr(), x.const_data_ptr(), w.const_data_ptr(),
                                                rstd.const_data_ptr<float>(), res.const_data_ptr(), g.size(0), g.size(1),
                                                float_type(g), stream_of(g)),
                 "rms_norm_backward_add");
    return g;
  }
#endif
  return rms_norm_backward_add_reference(std::move(g), x, w, rstd, res);
}

void swiglu_backward_inplace(const at::Tensor& dm, at::Tensor& gu) {
#ifdef QLORA_WITH_CUDA
  if (use_kernel(gu)) {
    check_gu("swiglu_backward_inplace", gu);
    check_dm("swiglu_backward_inplace", dm, gu);
    const int64_t inter = gu.size(1) / 2;
    const c10::cuda::CUDAGuard guard(gu.device());
    check_launch(kernels::swiglu_backward_inplace(dm.const_data_ptr(), row_stride(dm, inter), gu.data_ptr(),
                                                  row_stride(gu, 2 * inter), gu.size(0), inter, float_type(gu),
                                                  stream_of(gu)),
                 "swiglu_backward_inplace");
    return;
  }
#endif
  swiglu_backward_inplace_reference(dm, gu);
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
