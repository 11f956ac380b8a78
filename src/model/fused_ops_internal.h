// What the fused element-wise ops' two files (fused_ops.cpp: RoPE, SwiGLU, the RMSNorm backward;
// dropout_ops.cpp: LoRA dropout and its backward) share: argument descriptions and checks, and the
// dispatch helpers of the kernel calls. Private to src/model/.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#ifdef QLORA_WITH_CUDA
#include <c10/cuda/CUDAStream.h>

#include "qlora/kernels.h"
#endif

namespace qlora::model::detail {

inline std::string describe(const at::Tensor& t) {
  if (!t.defined()) return "an undefined tensor";
  return std::string(c10::toString(t.scalar_type())) + " " + c10::str(t.sizes()) + " strides " +
         c10::str(t.strides()) + " on " + t.device().str();
}

// The last dim is contiguous (a dim of size <= 1 has no stride to speak of).
inline bool last_dim_contiguous(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1; }

// gu: [N, 2I], last dim contiguous.
inline void check_gu(const char* op, const at::Tensor& gu) {
  TORCH_CHECK(gu.defined() && gu.dim() == 2 && gu.size(1) % 2 == 0, op,
              ": expected gu [N, 2I] (gate | up), got ", describe(gu));
  TORCH_CHECK(last_dim_contiguous(gu), op, ": expected gu's last dim contiguous (stride 1), got ", describe(gu));
}

#ifdef QLORA_WITH_CUDA
inline bool reference_only() {
  static const bool forced = [] {
    const char* v = std::getenv("QLORA_REFERENCE_OPS");
    return v != nullptr && *v != '\0' && std::string(v) != "0";
  }();
  return forced;
}

// The kernels take bf16 / fp16 CUDA tensors; fp32 keeps the reference (as model::rms_norm).
inline bool use_kernel(const at::Tensor& t) {
  return !reference_only() && t.is_cuda() &&
         (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf);
}

inline kernels::FloatType float_type(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 ? kernels::FloatType::kBF16 : kernels::FloatType::kF16;
}

inline cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

inline void check_launch(int rc, const char* what) {
  TORCH_CHECK(rc == 0, what, ": the CUDA kernel failed: ", kernels::cuda_error_string(rc));
}

// A row stride for the kernels: any value >= the row's width serves a single row.
inline int64_t row_stride(const at::Tensor& t, int64_t width) { return t.size(0) <= 1 ? width : t.stride(0); }
#endif

}  // namespace qlora::model::detail
