// The CUDA NF4 kernels behind the at::Tensor API (include/qlora/quant/nf4_cuda.h).
// Compiled in every build; everything that needs CUDA torch is under QLORA_WITH_CUDA, so a
// CPU-only build registers nothing (register_cuda_kernels() returns false, dequantization
// keeps the CPU / torch-op paths) and its CUDA entry points fail with "built without CUDA";
// callers need no #ifdef.
#include "qlora/quant/nf4_cuda.h"

#include <c10/util/Exception.h>

#ifdef QLORA_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "qlora/kernels.h"
#include "qlora/quant/nf4_ref.h"
#endif

namespace qlora::quant {

#ifdef QLORA_WITH_CUDA
namespace {

kernels::FloatType float_type(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat:
      return kernels::FloatType::kF32;
    case at::kBFloat16:
      return kernels::FloatType::kBF16;
    case at::kHalf:
      return kernels::FloatType::kF16;
    default:
      TORCH_CHECK(false, what, " must be float32, bfloat16 or float16, got ", t);
  }
}

void check_part(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const at::Device& device,
                const char* name) {
  TORCH_CHECK(t.defined() && t.scalar_type() == dtype && t.numel() == numel && t.is_contiguous() &&
                  t.device() == device,
              "Nf4Tensor.", name, " must be a contiguous ", dtype, " tensor of ", numel, " elements on ", device,
              ", got ", t.defined() ? t.toString() : std::string("an undefined tensor"),
              t.defined() ? " [" + std::to_string(t.numel()) + "] on " + t.device().str() : std::string());
}

// Checks the format on a CUDA device and returns the kernels' view of its scales.
kernels::Nf4Scales cuda_scales(const Nf4Tensor& w) {
  TORCH_CHECK(w.packed.defined() && w.packed.is_cuda(), "the CUDA NF4 kernels need a Nf4Tensor on a CUDA device, got ",
              w.packed.defined() ? w.packed.device().str() : std::string("no packed data"));
  TORCH_CHECK(w.blocksize == ref::kNf4BlockSize, "Nf4Tensor.blocksize must be 64, got ", w.blocksize);
  const at::Device device = w.packed.device();
  const int64_t blocks = w.blocks();
  check_part(w.packed, at::kByte, ref::packed_bytes(w.numel()), device, "packed");
  kernels::Nf4Scales s;
  if (w.double_quant()) {
    check_part(w.absmax_q, at::kByte, blocks, device, "absmax_q");
    check_part(w.absmax2, at::kFloat, ref::num_blocks(blocks, ref::kAbsmaxBlockSize), device, "absmax2");
    check_part(w.code2, at::kFloat, 256, device, "code2");
    s.absmax_q = w.absmax_q.data_ptr<uint8_t>();
    s.absmax2 = w.absmax2.data_ptr<float>();
    s.code2 = w.code2.data_ptr<float>();
    s.offset = w.offset;
  } else {
    check_part(w.absmax, at::kFloat, blocks, device, "absmax");
    s.absmax = w.absmax.data_ptr<float>();
  }
  return s;
}

void check_launch(int rc, const char* what) {
  TORCH_CHECK(rc == 0, what, " failed: ", kernels::cuda_error_string(rc));
}

cudaStream_t current_stream(const at::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

// Nf4DeviceKernels::dequantize. The kernel computes each block's scale itself, with the same
// two fp32 roundings nf4_block_absmax uses, so the expanded `absmax` handed in is not read.
void dequantize_hook(const Nf4Tensor& w, const at::Tensor& /*absmax*/, at::Tensor& out) {
  dequantize_nf4_cuda_into(w, out);
}

// Nf4DeviceKernels::quantize: codes and block absmax by the kernel (Note [NF4 quantize
// kernel]), the rest by finish_nf4_quantize as on the CPU path (the double quantization moves
// [blocks] floats to the host, not the weight). The result equals quantize_nf4(w.cpu()) moved
// to w's device, bit for bit.
Nf4Tensor quantize_hook(const at::Tensor& w, bool double_quant) {
  const at::Tensor x = w.detach().contiguous();
  const kernels::FloatType type = float_type(x.scalar_type(), "quantize_nf4: the weight");
  const int64_t n = x.numel();
  const int64_t blocks = ref::num_blocks(n, ref::kNf4BlockSize);
  const at::Device device = x.device();
  const c10::cuda::CUDAGuard guard(device);
  Nf4Tensor q;
  q.shape = w.sizes().vec();
  q.dtype = w.scalar_type();
  q.packed = at::empty({ref::packed_bytes(n)}, at::TensorOptions().dtype(at::kByte).device(device));
  at::Tensor absmax = at::empty({blocks}, at::TensorOptions().dtype(at::kFloat).device(device));
  at::Tensor non_finite = at::zeros({1}, at::TensorOptions().dtype(at::kLong).device(device));
  check_launch(kernels::nf4_quantize(x.data_ptr(), type, n, q.packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                     reinterpret_cast<unsigned long long*>(non_finite.data_ptr<int64_t>()),
                                     current_stream(device)),
               "the NF4 quantize kernel");
  finish_nf4_quantize(q, w, non_finite.item<int64_t>(), absmax, double_quant);
  return q;
}

// QLORA_GPU_QUANTIZE=0 keeps quantization on the CPU reference path (then a copy): the A/B
// switch for the kernel above.
bool gpu_quantize_enabled() {
  const char* v = std::getenv("QLORA_GPU_QUANTIZE");
  if (v == nullptr) return true;
  const std::string s = v;
  TORCH_CHECK(s == "0" || s == "1", "QLORA_GPU_QUANTIZE=", s, ": expected 1 (quantize on the GPU, the default) or 0");
  return s == "1";
}

}  // namespace

bool register_cuda_kernels() {
  static std::once_flag once;
  std::call_once(once, [] {
    Nf4DeviceKernels k;
    k.dequantize = &dequantize_hook;
    if (gpu_quantize_enabled()) k.quantize = &quantize_hook;  // else: the CPU reference path, then a copy
    k.decodes_statistics = true;
    set_nf4_device_kernels(c10::DeviceType::CUDA, k);
  });
  return true;
}

void dequantize_nf4_cuda_into(const Nf4Tensor& w, at::Tensor& out) {
  const kernels::Nf4Scales scales = cuda_scales(w);
  const kernels::FloatType type = float_type(out.scalar_type(), "dequantize_nf4_cuda_into: the output");
  TORCH_CHECK(out.device() == w.device() && out.is_contiguous() && out.numel() == w.numel(),
              "dequantize_nf4_cuda_into: the output must be contiguous with ", w.numel(), " elements on ",
              w.device(), ", got ", out.numel(), " elements on ", out.device(),
              out.is_contiguous() ? "" : " (not contiguous)");
  const c10::cuda::CUDAGuard guard(w.device());
  check_launch(kernels::nf4_dequantize(w.packed.data_ptr<uint8_t>(), scales, w.numel(), out.data_ptr(), type,
                                       current_stream(w.device())),
               "the NF4 dequantize kernel");
}

at::Tensor nf4_gemv_cuda(const at::Tensor& x, const Nf4Tensor& w) {
  const kernels::Nf4Scales scales = cuda_scales(w);
  TORCH_CHECK(w.shape.size() == 2, "nf4_gemv_cuda: the weight must be 2-D [out, in], got ", w.shape.size(), "-D");
  const int64_t out_features = w.shape[0];
  const int64_t in_features = w.shape[1];
  TORCH_CHECK(x.defined() && x.device() == w.device(), "nf4_gemv_cuda: x must be on the weight's device ",
              w.device());
  const kernels::FloatType type = float_type(x.scalar_type(), "nf4_gemv_cuda: x");
  TORCH_CHECK(type != kernels::FloatType::kF32, "nf4_gemv_cuda: x must be bfloat16 or float16, got float32 ",
              "(use dequantize_nf4 and a matmul)");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "nf4_gemv_cuda: x must end in the weight's ",
              in_features, " input features, got shape ", x.sizes());
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = out_features;
  at::Tensor y = at::empty(out_shape, x.options());
  const int64_t rows = in_features == 0 ? 0 : x.numel() / in_features;
  if (rows == 0 || out_features == 0) return y;
  TORCH_CHECK(rows <= kernels::kNf4GemvMaxRows, "nf4_gemv_cuda: at most ", kernels::kNf4GemvMaxRows,
              " rows of x (the product of its leading dims), got ", rows, "; larger batches take ",
              "dequantize_nf4 and a matmul");
  const at::Tensor xc = x.contiguous();
  const c10::cuda::CUDAGuard guard(w.device());
  check_launch(kernels::nf4_gemv(xc.data_ptr(), type, rows, in_features, w.packed.data_ptr<uint8_t>(), scales,
                                 out_features, y.data_ptr(), current_stream(w.device())),
               "the NF4 GEMV kernel");
  return y;
}

#else  // no CUDA torch in this build

bool register_cuda_kernels() { return false; }

void dequantize_nf4_cuda_into(const Nf4Tensor& /*w*/, at::Tensor& /*out*/) {
  TORCH_CHECK(false, "dequantize_nf4_cuda_into: this qlora was built without CUDA (QLORA_CUDA=OFF)");
}

at::Tensor nf4_gemv_cuda(const at::Tensor& /*x*/, const Nf4Tensor& /*w*/) {
  TORCH_CHECK(false, "nf4_gemv_cuda: this qlora was built without CUDA (QLORA_CUDA=OFF)");
}

#endif

}  // namespace qlora::quant
