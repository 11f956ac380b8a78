// data/batch_tensors: a Batch (plain arrays) as torch tensors for the model,
// and the packed attention mask as a tensor (Note [packed attention] in
// qlora/data/batch.h). The only torch-facing part of the data module.
#pragma once

#include <ATen/core/Tensor.h>

#include "qlora/data/batch.h"

namespace qlora::data {

struct BatchTensors {
  at::Tensor input_ids;       // [B, T] int64
  at::Tensor labels;          // [B, T] int64, kIgnoreIndex where not trained
  at::Tensor attention_mask;  // [B, T] int64, 1 real / 0 padding (Hugging Face convention)
  at::Tensor position_ids;    // [B, T] int64, restarting at 0 per packed example
  at::Tensor segment_ids;     // [B, T] int32, 1..k per example in its row, 0 padding
};

// CPU tensors (the caller moves them to its device).
BatchTensors to_tensors(const Batch& batch);

// segment_ids [B, T] integer (any device) -> [B, T, T] bool, true where query
// i may attend to key j: same nonzero segment and j <= i; a padding query
// attends to itself only. Computed on the device of `segment_ids`.
at::Tensor packed_attention_mask(const at::Tensor& segment_ids);

}  // namespace qlora::data
