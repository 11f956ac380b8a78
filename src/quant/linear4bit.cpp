// Linear4bit as a torch::autograd::Function (see include/qlora/quant/linear4bit.h).
#include "qlora/quant/linear4bit.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <string>

namespace qlora::quant {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Note [Linear4bit saved state]
//   The Nf4Tensor travels to backward inside ctx->saved_data as plain IValues: its tensors are
//   handles to storage the layer owns anyway (no copies), and none depends on x. Not using
//   save_for_backward also means x can be modified in place after forward.
void save_nf4(AutogradContext* ctx, const Nf4Tensor& w) {
  auto& d = ctx->saved_data;
  d["packed"] = w.packed;
  d["absmax"] = w.absmax;
  d["absmax_q"] = w.absmax_q;
  d["absmax2"] = w.absmax2;
  d["code2"] = w.code2;
  d["offset"] = static_cast<double>(w.offset);  // a float, so the double holds it exactly
  d["shape"] = w.shape;
  d["blocksize"] = w.blocksize;
  d["dtype"] = static_cast<int64_t>(w.dtype);
}

Nf4Tensor load_nf4(AutogradContext* ctx) {
  auto& d = ctx->saved_data;
  auto tensor = [&](const std::string& key) {
    const at::IValue& v = d.at(key);
    return v.isTensor() ? v.toTensor() : at::Tensor();
  };
  Nf4Tensor w;
  w.packed = tensor("packed");
  w.absmax = tensor("absmax");
  w.absmax_q = tensor("absmax_q");
  w.absmax2 = tensor("absmax2");
  w.code2 = tensor("code2");
  w.offset = static_cast<float>(d.at("offset").toDouble());
  w.shape = d.at("shape").toIntVector();
  w.blocksize = d.at("blocksize").toInt();
  w.dtype = static_cast<at::ScalarType>(d.at("dtype").toInt());
  return w;
}

class Linear4bitFunction : public torch::autograd::Function<Linear4bitFunction> {
 public:
  // x: [..., in] already in the compute dtype.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const Nf4Tensor& w) {
    save_nf4(ctx, w);
    const at::Tensor weight = dequantize_nf4(w, x.scalar_type());  // [out, in], dropped on return
    return at::linear(x, weight);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads[0];  // [..., out]
    const Nf4Tensor w = load_nf4(ctx);
    at::Tensor grad_x;
    if (ctx->needs_input_grad(0)) {
      grad_x = at::matmul(grad, dequantize_nf4(w, grad.scalar_type()));  // [..., in]
    }
    return {grad_x, at::Tensor()};
  }
};

}  // namespace

at::Tensor linear4bit(const at::Tensor& x, const Nf4Tensor& w, at::ScalarType compute) {
  TORCH_CHECK(compute == at::kFloat || compute == at::kBFloat16 || compute == at::kHalf,
              "linear4bit: the compute dtype must be float32, bfloat16 or float16, got ", compute);
  TORCH_CHECK(w.shape.size() == 2, "linear4bit: the NF4 weight must be 2-D [out, in], got ",
              w.shape.size(), "-D");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w.shape[1], "linear4bit: x's last dimension is ",
              x.dim() >= 1 ? x.size(-1) : 0, " but the weight has ", w.shape[1],
              " input features");
  TORCH_CHECK(x.device() == w.device(), "linear4bit: x is on ", x.device(),
              " but the weight is on ", w.device());
  return Linear4bitFunction::apply(x.to(compute), w);
}

}  // namespace qlora::quant
