// model/nf4_linear: the frozen base projection stored in NF4 (QLoRA's base).
//
// Wraps a quant::Nf4Tensor behind the FrozenLinear interface: forward is
// quant::linear4bit (dequantize into the compute dtype, multiply; gradient
// for the input only, the dequantization recomputed in backward). The model
// gets these through a LinearFactory at load time, one projection at a time,
// so the dense weights of the whole model never coexist in memory.
#pragma once

#include "qlora/model/linear.h"
#include "qlora/model/decoder.h"
#include "qlora/quant/nf4.h"

namespace qlora::model {

class Nf4Linear final : public FrozenLinear {
 public:
  // weight: an NF4 [out, in] weight; compute: fp32 / bf16 / fp16, the dtype
  // the weight is dequantized into and the output comes out in.
  Nf4Linear(quant::Nf4Tensor weight, at::ScalarType compute);

  at::Tensor forward(const at::Tensor& x) const override;  // [..., in] -> [..., out] in the compute dtype
  int64_t in_features() const override { return weight_.shape.at(1); }
  int64_t out_features() const override { return weight_.shape.at(0); }
  at::Tensor dense_weight(at::ScalarType dtype) const override;
  std::string kind() const override { return "nf4"; }

  const quant::Nf4Tensor& weight() const { return weight_; }
  at::ScalarType compute_dtype() const { return compute_; }

 private:
  quant::Nf4Tensor weight_;
  at::ScalarType compute_;
};

// Quantizes each projection weight as it is loaded (bitsandbytes' NF4,
// blocksize 64, double quantization when asked) and computes in `compute`.
LinearFactory nf4_linear_factory(bool double_quant, at::ScalarType compute);

}  // namespace qlora::model
