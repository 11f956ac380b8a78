// Tensors against their references (the golden files of transformers, PEFT): the relative error
// the model tests bound.
#pragma once

#include <ATen/ATen.h>

namespace qlora::testing {

// max |a - b| / max |b| over the positions where `keep` [B, T] is set (all when undefined).
inline double rel_err(const at::Tensor& a, const at::Tensor& b, const at::Tensor& keep = {}) {
  at::Tensor d = (a.to(at::kDouble) - b.to(at::kDouble)).abs();
  at::Tensor ref = b.to(at::kDouble).abs();
  if (keep.defined()) {
    const at::Tensor m = keep.to(at::kBool);
    d = d.index({m});
    ref = ref.index({m});
  }
  return d.max().item<double>() / ref.max().item<double>();
}

}  // namespace qlora::testing
