#include "qlora/model/nf4_linear.h"

#include <ATen/ATen.h>

#include "qlora/quant/linear4bit.h"

namespace qlora::model {

Nf4Linear::Nf4Linear(quant::Nf4Tensor weight, at::ScalarType compute) : weight_(std::move(weight)), compute_(compute) {
  TORCH_CHECK(weight_.shape.size() == 2, "Nf4Linear: the weight must be 2-D [out, in], got ", weight_.shape.size(),
              "-D");
  TORCH_CHECK(compute == at::kFloat || compute == at::kBFloat16 || compute == at::kHalf,
              "Nf4Linear: compute dtype must be float32, bfloat16 or float16, got ", compute);
}

at::Tensor Nf4Linear::forward(const at::Tensor& x) const { return add_bias(quant::linear4bit(x, weight_, compute_)); }

at::Tensor Nf4Linear::dense_weight(at::ScalarType dtype) const { return quant::dequantize_nf4(weight_, dtype); }

LinearFactory nf4_linear_factory(bool double_quant, at::ScalarType compute) {
  return [double_quant, compute](const std::string& /*name*/, const at::Tensor& weight) {
    return std::make_shared<Nf4Linear>(quant::quantize_nf4(weight, double_quant), compute);
  };
}

}  // namespace qlora::model
