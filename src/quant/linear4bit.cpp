// Linear4bit as a torch::autograd::Function (see include/qlora/quant/linear4bit.h).
#include "qlora/quant/linear4bit.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <atomic>
#include <cstdlib>
#include <string>

#include "qlora/kernels.h"
#include "qlora/quant/nf4_cuda.h"

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

std::atomic<bool>& gemv_switch() {
  static std::atomic<bool> on{[] {
    const char* v = std::getenv("QLORA_NF4_GEMV");
    return v == nullptr || std::string(v) != "0";
  }()};
  return on;
}

// Note [NF4 GEMV for decoding]
//   A decoding step multiplies one token a row by every weight: dequantizing a whole [out, in]
//   matrix to multiply it with 1-16 rows reads 4 bits and writes and re-reads 16 bits per
//   weight. The fused GEMV reads the 4 bits once. No autograd node is built: the caller wants
//   no gradient.
bool takes_gemv(const at::Tensor& x, at::ScalarType compute) {
  if (!x.is_cuda() || compute == at::kFloat || !gemv_switch().load(std::memory_order_relaxed)) return false;
  if (at::GradMode::is_enabled() && x.requires_grad()) return false;
  const int64_t in = x.size(-1);
  return in > 0 && x.numel() / in <= kernels::kNf4GemvMaxRows;
}

}  // namespace

void set_nf4_gemv_enabled(bool enabled) { gemv_switch().store(enabled); }
bool nf4_gemv_enabled() { return gemv_switch().load(); }

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
  const at::Tensor xc = x.to(compute);
  if (takes_gemv(xc, compute)) return nf4_gemv_cuda(xc, w);
  return Linear4bitFunction::apply(xc, w);
}

}  // namespace qlora::quant
