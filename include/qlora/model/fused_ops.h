// TEMPORARY shim (lead): replaced by the helper's fused_ops on merge.
#pragma once
#include <ATen/core/Tensor.h>
namespace qlora::model {
void rope_inplace(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
void rope_backward_inplace(at::Tensor& g, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor swiglu(const at::Tensor& gu);
void swiglu_backward_inplace(const at::Tensor& dm, at::Tensor& gu);
}
