// The fused 8-bit AdamW kernel on at::Tensors (include/qlora/optim/adamw8bit_cuda.h).
// Compiled only with QLORA_CUDA=ON (CMakeLists.txt adds src/cuda/ then).
#include "qlora/optim/adamw8bit_cuda.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>

#include "qlora/kernels.h"

namespace qlora::optim {
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

}  // namespace

void adamw8bit_step_cuda(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg_q,
                         at::Tensor& exp_avg_sq_q, at::Tensor& absmax_exp_avg,
                         at::Tensor& absmax_exp_avg_sq, int64_t step, const AdamWHyper& h) {
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
  if (n == 0) return;
  const kernels::AdamW8bitScalars s =
      kernels::adamw8bit_scalars(h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, step);
  const c10::cuda::CUDAGuard guard(device);
  const int rc = kernels::adamw8bit_step(
      param.data_ptr<float>(), grad.data_ptr(), grad_type, exp_avg_q.data_ptr<uint8_t>(),
      exp_avg_sq_q.data_ptr<uint8_t>(), absmax_exp_avg.data_ptr<float>(), absmax_exp_avg_sq.data_ptr<float>(), n, s,
      dynamic_maps(), c10::cuda::getCurrentCUDAStream(device.index()).stream());
  TORCH_CHECK(rc == 0, "the 8-bit AdamW kernel failed: ", kernels::cuda_error_string(rc));
}

}  // namespace qlora::optim
