// The fused element-wise ops (include/qlora/model/fused_ops.h): argument checks, the ATen
// references, and the dispatch to kernels/fused_ops.cu for bf16 / fp16 CUDA tensors. Compiled
// in every build; the kernel calls need CUDA torch (streams, guards), so they sit under
// QLORA_WITH_CUDA and a CPU-only build always takes the references.
#include "qlora/model/fused_ops.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>
#include <utility>

#ifdef QLORA_WITH_CUDA
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

at::Tensor dropout_backward_add_reference(at::Tensor acc, at::Tensor d, const at::Tensor& mask, double scale) {
  TORCH_CHECK(mask.defined() && mask.scalar_type() == at::kBool && mask.sizes() == d.sizes(),
              "dropout_backward_add: expected a bool mask of d's shape ", d.sizes(), ", got ", describe(mask));
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
  if (use_kernel(d) && d.is_contiguous() && mask.is_contiguous() && mask.scalar_type() == at::kBool &&
      mask.sizes() == d.sizes() && mask.device() == d.device() &&
      (!acc.defined() || (acc.is_contiguous() && acc.sizes() == d.sizes() && acc.scalar_type() == d.scalar_type() &&
                          acc.device() == d.device()))) {
    at::Tensor out = acc.defined() ? acc : d;
    const c10::cuda::CUDAGuard guard(d.device());
    check_launch(kernels::dropout_backward_add(out.data_ptr(), acc.defined() ? acc.const_data_ptr() : nullptr,
                                               d.const_data_ptr(), mask.const_data_ptr<bool>(), d.numel(),
                                               static_cast<float>(scale), float_type(d), stream_of(d)),
                 "dropout_backward_add");
    return out;
  }
#endif
  return dropout_backward_add_reference(std::move(acc), std::move(d), mask, scale);
}

}  // namespace qlora::model
