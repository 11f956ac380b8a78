// The fused 8-bit AdamW kernel on at::Tensors (include/qlora/optim/adamw8bit_cuda.h).
// Compiled in every build; everything that needs CUDA torch is under QLORA_WITH_CUDA, so in a
// CPU-only build an empty operand list is a no-op and anything else fails with "built without
// CUDA"; callers need no #ifdef.
#include "qlora/optim/adamw8bit_cuda.h"

#include <c10/util/Exception.h>

#ifdef QLORA_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>

#include "qlora/kernels.h"
#endif

namespace qlora::optim {

#ifdef QLORA_WITH_CUDA
namespace {

void check_state(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const at::Device& device,
                 const char* name) {
  TORCH_CHECK(t.defined() && t.scalar_type() == dtype && t.numel() == numel && t.is_contiguous(),
              "adamw8bit_step_cuda: ", name, " must be a contiguous ", dtype, " tensor of ", numel,
              " elements, got ", t.defined() ? t.toString() : std::string("an undefined tensor"));
  // Managed memory (paged state) reports a CUDA device too.
  TORCH_CHECK(t.device() == device, "adamw8bit_step_cuda: ", name, " is on ", t.device(),
              ", the parameter on ", device);
}

const kernels::DynamicMaps& dynamic_maps() {
  static const kernels::DynamicMaps maps = [] {
    kernels::DynamicMaps m;
    std::memcpy(m.signed_map, signed_dynamic_map().data(), sizeof m.signed_map);
    std::memcpy(m.unsigned_map, unsigned_dynamic_map().data(), sizeof m.unsigned_map);
    return m;
  }();
  return maps;
}

// The operands checked (adamw8bit_step_cuda's rules) and the gradient's kernel type.
kernels::FloatType checked(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg_q,
                           const at::Tensor& exp_avg_sq_q, const at::Tensor& absmax_exp_avg,
                           const at::Tensor& absmax_exp_avg_sq, int64_t step) {
  TORCH_CHECK(param.defined() && param.is_cuda(), "adamw8bit_step_cuda: the parameter must be a CUDA tensor");
  TORCH_CHECK(step >= 1, "adamw8bit_step_cuda: step must be >= 1, got ", step);
  const at::Device device = param.device();
  const int64_t n = param.numel();
  check_state(param, at::kFloat, n, device, "param");
  kernels::FloatType grad_type = kernels::FloatType::kF32;
  if (grad.defined() && grad.scalar_type() == at::kBFloat16) grad_type = kernels::FloatType::kBF16;
  if (grad.defined() && grad.scalar_type() == at::kHalf) grad_type = kernels::FloatType::kF16;
  check_state(grad, grad.defined() ? grad.scalar_type() : at::kFloat, n, device, "grad");
  TORCH_CHECK(grad.scalar_type() == at::kFloat || grad_type != kernels::FloatType::kF32,
              "adamw8bit_step_cuda: grad must be float32, bfloat16 or float16, got ", grad.scalar_type());
  check_state(exp_avg_q, at::kByte, n, device, "exp_avg_q");
  check_state(exp_avg_sq_q, at::kByte, n, device, "exp_avg_sq_q");
  check_state(absmax_exp_avg, at::kFloat, quant_blocks(n), device, "absmax_exp_avg");
  check_state(absmax_exp_avg_sq, at::kFloat, quant_blocks(n), device, "absmax_exp_avg_sq");
  return grad_type;
}

}  // namespace

void adamw8bit_step_cuda(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg_q,
                         at::Tensor& exp_avg_sq_q, at::Tensor& absmax_exp_avg,
                         at::Tensor& absmax_exp_avg_sq, int64_t step, const AdamWHyper& h) {
  adamw8bit_step_cuda_many({{&param, &grad, &exp_avg_q, &exp_avg_sq_q, &absmax_exp_avg, &absmax_exp_avg_sq}}, step, h);
}

void adamw8bit_step_cuda_many(const std::vector<AdamW8bitOperands>& operands, int64_t step, const AdamWHyper& h) {
  if (operands.empty()) return;
  const at::Device device = operands.front().param->device();
  // Note [AdamW8bit multi-tensor launch]: one list per gradient dtype, in the given order.
  std::vector<kernels::AdamW8bitTensor> by_type[3];
  for (const AdamW8bitOperands& o : operands) {
    const kernels::FloatType type =
        checked(*o.param, *o.grad, *o.exp_avg_q, *o.exp_avg_sq_q, *o.absmax_exp_avg, *o.absmax_exp_avg_sq, step);
    TORCH_CHECK(o.param->device() == device, "adamw8bit_step_cuda_many: the parameters are on ", device, " and ",
                o.param->device(), "; expected one device");
    kernels::AdamW8bitTensor t;
    t.param = o.param->data_ptr<float>();
    t.grad = o.grad->const_data_ptr();
    t.exp_avg_q = o.exp_avg_q->data_ptr<uint8_t>();
    t.exp_avg_sq_q = o.exp_avg_sq_q->data_ptr<uint8_t>();
    t.absmax_exp_avg = o.absmax_exp_avg->data_ptr<float>();
    t.absmax_exp_avg_sq = o.absmax_exp_avg_sq->data_ptr<float>();
    t.n = o.param->numel();
    by_type[static_cast<int>(type)].push_back(t);
  }
  const kernels::AdamW8bitScalars s =
      kernels::adamw8bit_scalars(h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, step);
  const c10::cuda::CUDAGuard guard(device);
  for (int type = 0; type < 3; ++type) {
    if (by_type[type].empty()) continue;
    const int rc = kernels::adamw8bit_step_multi(by_type[type].data(), static_cast<int64_t>(by_type[type].size()),
                                                 static_cast<kernels::FloatType>(type), s, dynamic_maps(),
                                                 c10::cuda::getCurrentCUDAStream(device.index()).stream());
    TORCH_CHECK(rc == 0, "the 8-bit AdamW kernel failed: ", kernels::cuda_error_string(rc));
  }
}

#else  // no CUDA torch in this build

void adamw8bit_step_cuda(at::Tensor& /*param*/, const at::Tensor& /*grad*/, at::Tensor& /*exp_avg_q*/,
                         at::Tensor& /*exp_avg_sq_q*/, at::Tensor& /*absmax_exp_avg*/,
                         at::Tensor& /*absmax_exp_avg_sq*/, int64_t /*step*/, const AdamWHyper& /*h*/) {
  TORCH_CHECK(false, "adamw8bit_step_cuda: this qlora was built without CUDA (QLORA_CUDA=OFF)");
}

void adamw8bit_step_cuda_many(const std::vector<AdamW8bitOperands>& operands, int64_t /*step*/,
                              const AdamWHyper& /*h*/) {
  TORCH_CHECK(operands.empty(), "adamw8bit_step_cuda_many: this qlora was built without CUDA (QLORA_CUDA=OFF)");
}

#endif

}  // namespace qlora::optim
