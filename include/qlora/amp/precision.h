// amp/precision: which compute precision a run uses (train.precision: auto|bf16|fp16|fp32).
//
// auto: bf16 on GPUs with bf16 tensor cores (compute capability >= 8, Ampere and newer),
// fp16 with the dynamic loss scaler on older GPUs (T4, V100), fp32 on CPU. See
// Note [CPU precision] in src/amp/precision.cpp for why CPU stays fp32.
// Torch-free; the autocast guard that applies the choice comes with the trainer.
#pragma once

#include "qlora/config/config.h"

namespace qlora::amp {

// bf16 tensor cores start with Ampere (compute capability 8.0); the plan's GPU
// presets and the run's precision both ask here.
inline constexpr int kBf16MinCcMajor = 8;
inline bool gpu_supports_bf16(int cc_major) { return cc_major >= kBf16MinCcMajor; }

// Resolves `requested` for the device the run uses: `cuda` (a GPU is used) and its
// compute-capability major version (ignored on CPU). Never returns kAuto. Throws
// InputError for bf16 on a GPU older than sm_80, saying what to set instead.
Precision resolve_precision(Precision requested, bool cuda, int cc_major);

// fp16 needs the dynamic loss scaler; bf16 and fp32 have fp32's exponent range.
bool needs_loss_scaling(Precision resolved);

}  // namespace qlora::amp
