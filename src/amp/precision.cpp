// Note [CPU precision]
// On CPU, `auto` resolves to fp32. LibTorch's CPU autocast does run in bf16, but:
//  - most CPUs this runs on (developer machines, CI: AVX2 without AVX512-BF16/AMX) have no
//    bf16 arithmetic. Measured on the development machine (AVX2+FMA, torch 2.11, one
//    thread, [512, 2048] x [2048, 2048]): fp32 matmul 73 ms, bf16 matmul 19.6 s, an
//    nn.Linear under autocast(cpu, bf16) 615 ms against 77 ms in fp32;
//  - CPU runs are the demo and the tests, whose point is agreement with reference numbers;
//    bf16 rounding (8 bits of mantissa) would loosen every tolerance.
// A user can still ask for bf16 on CPU explicitly (honoured: it may pay off on CPUs with
// AMX). fp16 on CPU is honoured too (with the loss scaler), to exercise that path without
// a GPU.
#include "qlora/amp/precision.h"

#include <string>

#include "qlora/common/errors.h"

namespace qlora::amp {

Precision resolve_precision(Precision requested, bool cuda, int cc_major) {
  switch (requested) {
    case Precision::kAuto:
      if (!cuda) return Precision::kFp32;
      return gpu_supports_bf16(cc_major) ? Precision::kBf16 : Precision::kFp16;
    case Precision::kBf16:
      if (cuda && !gpu_supports_bf16(cc_major))
        throw InputError("train.precision: bf16 needs a GPU with compute capability 8.0 or newer (Ampere), this "
                         "GPU is sm_" + std::to_string(cc_major) + "x; set train.precision: fp16 (dynamic loss "
                         "scaling) or auto");
      return Precision::kBf16;
    case Precision::kFp16:
    case Precision::kFp32:
      return requested;
  }
  return Precision::kFp32;
}

bool needs_loss_scaling(Precision resolved) { return resolved == Precision::kFp16; }

}  // namespace qlora::amp
