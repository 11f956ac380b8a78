// NF4 tensors: the frozen base weights of QLoRA, stored as bitsandbytes stores them (4-bit
// NormalFloat codes in blocks of 64, optionally with double-quantized absmax), so that the bytes
// and the dequantized values equal bitsandbytes' quantize_4bit / dequantize_4bit exactly.
// The byte-level rules live in quant/nf4_ref.h (Note [NF4 layout], [NF4 rounding],
// [NF4 double quantization]); this header is the at::Tensor face of them.
//
// Devices: CPU runs the reference loops (in parallel over blocks). Other devices go through
// kernels registered with set_nf4_device_kernels (the CUDA issue plugs in there); without them,
// dequantization runs as torch ops on the device (same values) and quantization copies the
// weight to the CPU and the result back.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "qlora/common/errors.h"

namespace qlora::quant {

// A weight holding inf or NaN, which NF4 cannot represent: a damaged checkpoint, so bad input
// (exit 2). The model loader catches it to name the weights file and the tensor.
class NonFiniteWeightError : public InputError {
 public:
  NonFiniteWeightError(const std::string& what, int64_t count) : InputError(what), count_(count) {}
  int64_t count() const { return count_; }  // how many values are inf or NaN

 private:
  int64_t count_;
};

// ------------------------------------------------------------------ the format
struct Nf4Tensor {
  at::Tensor packed;    // [ceil(numel / 2)] uint8, two codes a byte, high nibble first
  // Plain statistics (double_quant() == false):
  at::Tensor absmax;    // [blocks] fp32, blocks = ceil(numel / 64)
  // Double-quantized statistics (double_quant() == true):
  at::Tensor absmax_q;  // [blocks] uint8, codes of (absmax - offset) in the dynamic map
  at::Tensor absmax2;   // [ceil(blocks / 256)] fp32, second-level absmax
  at::Tensor code2;     // [256] fp32, the dynamic map (bitsandbytes' state2.code)
  float offset = 0.0f;  // mean of the fp32 absmax values, subtracted before quantizing them

  std::vector<int64_t> shape;                     // the original weight's shape ([out, in])
  int64_t blocksize = 64;                         // always 64 (bitsandbytes' default)
  at::ScalarType dtype = at::ScalarType::Float;   // the original weight's dtype

  bool double_quant() const { return absmax_q.defined(); }
  int64_t numel() const;
  int64_t blocks() const;
  at::Device device() const { return packed.device(); }
  // Bytes held by the quantized data and statistics (what a budget counts).
  int64_t nbytes() const;
};

// ------------------------------------------------------------------ quantize / dequantize
// w: any shape, fp32 / bf16 / fp16, finite (throws NonFiniteWeightError with the count of inf /
// NaN values otherwise, found in the quantizing pass itself), any device.
// double_quant: bitsandbytes' compress_statistics.
// The result lives on w's device.
Nf4Tensor quantize_nf4(const at::Tensor& w, bool double_quant = true);

// The weight as bitsandbytes' dequantize_4bit gives it, in `out` (fp32 / bf16 / fp16), shaped
// like the original, on the Nf4Tensor's device.
at::Tensor dequantize_nf4(const Nf4Tensor& w, at::ScalarType out);

// The per-block fp32 absmax ([blocks]): the stored one, or the double-quantized one expanded.
at::Tensor nf4_block_absmax(const Nf4Tensor& w);

// Moves every part to `device` (a copy; the Nf4Tensor itself is a bundle of handles).
Nf4Tensor nf4_to(const Nf4Tensor& w, at::Device device);

// The same two results made of plain torch ops (index_select, mul, add, to), for any device:
// the fallback where no kernels are registered, and a second implementation the tests compare.
at::Tensor nf4_block_absmax_torch_ops(const Nf4Tensor& w);
at::Tensor dequantize_nf4_torch_ops(const Nf4Tensor& w, at::ScalarType out);

// How many times dequantize_nf4 has run in this process (a diagnostic: linear4bit's tests use
// it to see that backward recomputes the weight instead of keeping it).
uint64_t nf4_dequantize_calls();

// ------------------------------------------------------------------ device dispatch
// Kernels for one device type. A null member falls back to the generic torch-op path.
struct Nf4DeviceKernels {
  // Quantizes w (on the device) exactly as quantize_nf4 does on the CPU.
  Nf4Tensor (*quantize)(const at::Tensor& w, bool double_quant) = nullptr;
  // Writes the dequantized weight into `out` (contiguous, numel elements, fp32/bf16/fp16,
  // on the device) given the expanded fp32 absmax ([blocks], on the device), or, when
  // `decodes_statistics`, an undefined tensor: the kernel decodes the block scales itself.
  void (*dequantize)(const Nf4Tensor& w, const at::Tensor& absmax, at::Tensor& out) = nullptr;
  bool decodes_statistics = false;
};
// Registers kernels for `type` (e.g. c10::DeviceType::CUDA); call once at start-up.
void set_nf4_device_kernels(c10::DeviceType type, const Nf4DeviceKernels& kernels);
// The kernels registered for `type` (all members null when none).
Nf4DeviceKernels nf4_device_kernels(c10::DeviceType type);

// The end of quantize_nf4, shared by the CPU path and device quantize kernels once the codes
// (q.packed) and the fp32 block absmax are known: refuses a weight holding `non_finite` inf /
// NaN values (NonFiniteWeightError naming w's shape), then sets q's scales from `absmax` ([blocks] fp32, contiguous,
// on any device): plain, or double-quantized on the host (torch.mean on the CPU decides the
// offset's last bit, as bitsandbytes takes it), the results on absmax's device.
void finish_nf4_quantize(Nf4Tensor& q, const at::Tensor& w, int64_t non_finite, const at::Tensor& absmax,
                         bool double_quant);

}  // namespace qlora::quant
