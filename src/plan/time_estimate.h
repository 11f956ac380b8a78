// The plan's time estimate (Note [plan time model] in time_estimate.cpp). Internal to src/plan/.
#pragma once

#include <cstdint>
#include <string>

#include "qlora/model/decoder_config.h"
#include "qlora/plan/gpu.h"
#include "qlora/plan/plan.h"

namespace qlora::plan {

// One optimizer step of `accumulation` micro batches of `in` on `gpu` in `precision` ("bf16",
// "fp16", "fp32"), per GPU of `world`; unavailable without the GPU's throughput.
TimeEstimate estimate_time(const DecoderConfig& m, const BudgetInputs& in, int64_t accumulation, int64_t world,
                           const GpuSpec* gpu, const std::string& precision, int64_t lora_params);

}  // namespace qlora::plan
