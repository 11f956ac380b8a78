#include "qlora/model/linear.h"

#include <ATen/ATen.h>

namespace qlora::model {

DenseLinear::DenseLinear(at::Tensor weight) : weight_(weight.detach()) {
  TORCH_CHECK(weight_.dim() == 2, "DenseLinear: weight must be 2-D [out, in], got ", weight_.dim(), "-D");
}

at::Tensor DenseLinear::forward(const at::Tensor& x) const {
  TORCH_CHECK(x.size(-1) == weight_.size(1), "DenseLinear: input has ", x.size(-1), " features, the weight expects ",
              weight_.size(1));
  return at::linear(x, weight_, bias());
}

void FrozenLinear::set_bias(at::Tensor bias) {
  TORCH_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == out_features()), "FrozenLinear: the bias must be [",
              out_features(), "]");
  bias_ = bias.defined() ? bias.detach() : bias;
}

int64_t DenseLinear::in_features() const { return weight_.size(1); }
int64_t DenseLinear::out_features() const { return weight_.size(0); }

at::Tensor DenseLinear::dense_weight(at::ScalarType dtype) const { return weight_.to(dtype); }

}  // namespace qlora::model
