// model/linear: the projection layers of a decoder, behind one interface.
//
// Every projection of the model (q, k, v, o, gate, up, down) is a `Linear`:
// y = x · Wᵀ (+ b where the family has a bias there: Qwen2's q, k, v). The frozen base weight is a
// `FrozenLinear`: dense here (`DenseLinear`), NF4 in the quant module. LoRA
// wraps a FrozenLinear in another Linear (lora/lora.h), so the model never
// knows which kind it runs. Nothing here assumes the CPU: tensors stay on the
// device they were given.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>

namespace qlora::model {

// y = x · Wᵀ (+ b) for x [..., in_features] -> [..., out_features], in x's dtype.
class Linear {
 public:
  virtual ~Linear() = default;
  virtual at::Tensor forward(const at::Tensor& x) const = 0;
  virtual int64_t in_features() const = 0;
  virtual int64_t out_features() const = 0;
};

// A base projection that is never trained: its forward returns gradients with
// respect to x only.
class FrozenLinear : public Linear {
 public:
  // The effective weight [out, in] in `dtype` (dequantized where stored packed);
  // used to merge adapters and by tests.
  virtual at::Tensor dense_weight(at::ScalarType dtype) const = 0;
  // "dense", "nf4", ... for logs and errors.
  virtual std::string kind() const = 0;

  // The frozen bias [out] in the compute dtype, added after the product; undefined when the
  // projection has none. Never trained (PEFT's bias="none"), kept as is by a merge.
  const at::Tensor& bias() const { return bias_; }
  void set_bias(at::Tensor bias);

 protected:
  // y + bias where there is one.
  at::Tensor add_bias(at::Tensor y) const { return bias_.defined() ? y + bias_ : y; }

 private:
  at::Tensor bias_;
};

// A plain weight [out, in]; the input is cast to nothing: x and the weight must
// share a dtype (the model stores every weight in its compute dtype).
class DenseLinear final : public FrozenLinear {
 public:
  explicit DenseLinear(at::Tensor weight);  // [out, in]; detached, requires_grad off

  at::Tensor forward(const at::Tensor& x) const override;
  int64_t in_features() const override;
  int64_t out_features() const override;
  at::Tensor dense_weight(at::ScalarType dtype) const override;
  std::string kind() const override { return "dense"; }

  const at::Tensor& weight() const { return weight_; }

 private:
  at::Tensor weight_;  // [out, in]
};

}  // namespace qlora::model
