// model/attention: which keys each query may see (AttentionInputs: causal rows, padded rows,
// packed rows) and scaled dot-product attention over them (model::attention), with the kernel
// each layout takes (Note [attention paths] in src/model/attention.cpp):
//   - causal rows: SDPA's causal kernels, grouped kv heads as they are;
//   - packed rows: no [B, 1, T, T] mask: ATen's flash kernel over variable-length runs on a
//     GPU (bf16 / fp16), causal attention run by run on the CPU;
//   - sliding windows: flash's own window on a GPU, a band mask on the CPU;
//   - a mask (padded rows, decoding over a KvCache): the query heads that share a kv head
//     folded into one [groups·t] block of queries, so k and v are not repeated per head.
// Every path computes what transformers' eager attention computes for the same inputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace qlora::model {

// Packed rows as runs over the B·T tokens flattened row by row: a run is a longest stretch of
// one row with one segment id, and a token attends to the earlier tokens of its run only (Note
// [packed attention] in include/qlora/data/batch.h). Padding is a run of its own.
class PackedRows {
 public:
  // segment_ids [B, T] integers on the host; the tensors it makes go to `device`.
  PackedRows(const at::Tensor& host_segment_ids, c10::Device device);

  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  // Where each run starts in the flattened tokens, then B·T: n + 1 offsets, on the host.
  const std::vector<int64_t>& starts() const { return starts_; }
  int64_t longest() const { return longest_; }
  // starts() as int32 [n + 1] on the device: flash attention's cumulative sequence lengths.
  const at::Tensor& cu_seqlens() const { return cu_seqlens_; }
  // Whether no segment id comes back in a row after another one: then the runs are the segments.
  bool runs_are_segments() const { return runs_are_segments_; }
  // The dense [B, 1, T, T] bool mask of the same visibility, on the device, built on the first
  // call and kept (for the paths that still need one; the runs themselves cost O(B·T)).
  at::Tensor mask() const;

 private:
  int64_t rows_ = 0, cols_ = 0, longest_ = 0;
  bool runs_are_segments_ = true;
  std::vector<int64_t> starts_;
  at::Tensor cu_seqlens_;
  at::Tensor host_segment_ids_;
  c10::Device device_;
  mutable std::mutex mask_mutex_;
  mutable at::Tensor mask_;
};

// Positions and visibility for one batch of rows [B, T].
struct AttentionInputs {
  at::Tensor position_ids;  // [B, T] int64
  at::Tensor mask;          // [B, 1, T, T] bool, true = query may attend key; undefined = causal only
  // Packed rows (mask undefined then): attention stays within each run.
  std::shared_ptr<const PackedRows> packed;

  // The visibility as a dense mask: `mask`, else the packed rows' (built once), else undefined
  // (causal).
  at::Tensor dense_mask() const;
};

// Every token real: causal attention without a mask tensor (SDPA's fast path).
AttentionInputs causal_attention(int64_t batch, int64_t seq_len, c10::Device device);

// Right- or left-padded rows. attention_mask [B, T]: 1 for real tokens, 0 for
// padding. Keys that are padding are hidden; positions are 0..T-1 as
// transformers uses when given no position_ids.
AttentionInputs padded_attention(const at::Tensor& attention_mask);

// Packed rows: several examples in one row. segment_ids [B, T] (any integers;
// padding gets its own id, e.g. -1 or 0) and position_ids [B, T] restarting at 0 for
// each example. A token attends to earlier tokens of its own segment only. The result lives
// on position_ids' device; segment_ids may be a host tensor (the trainer's copy: nothing waits
// for the device) or on the device (read back once). Segments that are runs (every id in one
// stretch of its row, as data/batch.h packs them) get `packed` and no mask; an id that comes
// back after another one gets the dense mask, as before.
AttentionInputs packed_attention(const at::Tensor& segment_ids, const at::Tensor& position_ids);

// Scaled dot-product attention of q [B, H, T, d] over k, v [B, Hkv, T, d] (H a multiple of
// Hkv): causal when `attention` has no mask, within each run for packed rows, else the mask.
// `window` > 0 (a sliding-window layer) also hides keys window or more tokens back (i - j >=
// window). `scale` multiplies q·k (0: 1/sqrt(head_dim)); `softcap` > 0 caps the scaled scores at
// cap · tanh(s / cap) before the mask, in Gemma 2's eager op order. Queries may be the last t of
// tk keys (decoding with a KvCache) given a mask [B, 1, t, tk]. Returns [B, H, T, d].
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionInputs& attention,
                     int64_t window = 0, double scale = 0.0, double softcap = 0.0);

// Whether `attention` takes ATen's flash kernel for these operands (a CUDA build, a GPU flash
// supports, bf16 / fp16, a head dim it takes, no soft cap); false on the CPU.
bool flash_attention_applies(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double softcap = 0.0);

}  // namespace qlora::model
