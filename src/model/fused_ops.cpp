// The fused element-wise ops (include/qlora/model/fused_ops.h) but LoRA dropout (dropout_ops.cpp):
// RoPE, SwiGLU, GeGLU and the RMSNorm backward, their argument checks, the ATen references, and the
// dispatch to kernels/fused_ops.cu for bf16 / fp16 CUDA tensors. Compiled in every build; the
// kernel calls need CUDA torch (streams, guards), so they sit under QLORA_WITH_CUDA and a CPU-only
// build always takes the references.
#include "qlora/model/fused_ops.h"
#include "model/fused_ops_internal.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#ifdef QLORA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "qlora/kernels.h"
#endif

namespace qlora::model {

using namespace detail;

namespace {

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

at::Tensor geglu_reference(const at::Tensor& gu) {
  check_gu("geglu", gu);
  const int64_t inter = gu.size(1) / 2;
  return (at::gelu(gu.narrow(1, 0, inter), "tanh") * gu.narrow(1, inter, inter)).contiguous();
}

void geglu_backward_inplace_reference(const at::Tensor& dm, at::Tensor& gu) {
  check_gu("geglu_backward_inplace", gu);
  check_dm("geglu_backward_inplace", dm, gu);
  const int64_t inter = gu.size(1) / 2;
  at::Tensor g = gu.narrow(1, 0, inter), u = gu.narrow(1, inter, inter);
  // Autograd's ops for gelu(g) * u: the product's backward, then gelu's.
  const at::Tensor du = dm * at::gelu(g, "tanh");
  const at::Tensor dg = at::gelu_backward(dm * u, g, "tanh");
  g.copy_(dg);  // both computed before either half is overwritten
  u.copy_(du);
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

at::Tensor geglu(const at::Tensor& gu) {
#ifdef QLORA_WITH_CUDA
  if (use_kernel(gu)) {
    check_gu("geglu", gu);
    const int64_t inter = gu.size(1) / 2;
    at::Tensor m = at::empty({gu.size(0), inter}, gu.options());  // [N, I] contiguous
    const c10::cuda::CUDAGuard guard(gu.device());
    check_launch(kernels::geglu(gu.const_data_ptr(), row_stride(gu, 2 * inter), gu.size(0), inter, m.data_ptr(),
                                inter, float_type(gu), stream_of(gu)),
                 "geglu");
    return m;
  }
#endif
  return geglu_reference(gu);
}

void geglu_backward_inplace(const at::Tensor& dm, at::Tensor& gu) {
#ifdef QLORA_WITH_CUDA
  if (use_kernel(gu)) {
    check_gu("geglu_backward_inplace", gu);
    check_dm("geglu_backward_inplace", dm, gu);
    const int64_t inter = gu.size(1) / 2;
    const c10::cuda::CUDAGuard guard(gu.device());
    check_launch(kernels::geglu_backward_inplace(dm.const_data_ptr(), row_stride(dm, inter), gu.data_ptr(),
                                                 row_stride(gu, 2 * inter), gu.size(0), inter, float_type(gu),
                                                 stream_of(gu)),
                 "geglu_backward_inplace");
    return;
  }
#endif
  geglu_backward_inplace_reference(dm, gu);
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

}  // namespace qlora::model
