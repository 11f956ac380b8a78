// data/batch: examples -> one micro batch, padded or packed, as plain
// row-major arrays (torch-free; the trainer wraps them in tensors).
//
// Padded: one example per row, rows padded to the longest row of this micro
// batch (not a global maximum). Packed: several examples per row (greedy
// next-fit up to max_seq_length), position ids restarting at 0 for each
// example, and a segment id per token that confines attention to its example.
//
// Both forms carry the same fields, so the model handles one shape:
//   input_ids       [rows, cols] int32, pad id (pad, else eos, else 0) where padding
//   labels          [rows, cols] int32, kIgnoreIndex where padding or untrained
//   attention_mask  [rows, cols] uint8, 1 real token / 0 padding
//   position_ids    [rows, cols] int32, 0.. per example; 0 on padding
//   segment_ids     [rows, cols] int32, 1..k per example within its row; 0 padding
#pragma once

#include <cstdint>
#include <vector>

#include "qlora/data/format.h"

namespace qlora::data {

struct Batch {
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<int32_t> input_ids;
  std::vector<int32_t> labels;
  std::vector<uint8_t> attention_mask;
  std::vector<int32_t> position_ids;
  std::vector<int32_t> segment_ids;
  std::vector<int64_t> example_indices;  // dataset indices of the examples, in row order
  int64_t trained_tokens = 0;            // labels != kIgnoreIndex (for loss normalization)

  size_t at(int64_t row, int64_t col) const { return static_cast<size_t>(row * cols + col); }
};

// The pad id to use: the tokenizer's pad, else its eos, else 0.
int32_t choose_pad_id(int32_t pad_id, int32_t eos_id);

// One example per row. `indices` index `examples`.
Batch collate_padded(const std::vector<TokenizedExample>& examples,
                     const std::vector<int64_t>& indices, int32_t pad_id);

// Greedy next-fit packing in the given order: an example joins the current row
// when it fits in max_len, otherwise it starts a new row. Order is kept, so the
// packing of a shuffled epoch is itself deterministic. Every example must be
// at most max_len long (the dataset truncates). Returns rows of indices.
std::vector<std::vector<int64_t>> pack_next_fit(const std::vector<TokenizedExample>& examples,
                                                const std::vector<int64_t>& order,
                                                int64_t max_len);

// Several examples per row (rows from pack_next_fit), padded to the longest row.
Batch collate_packed(const std::vector<TokenizedExample>& examples,
                     const std::vector<std::vector<int64_t>>& rows, int32_t pad_id);

// Note [packed attention]: token i may attend to token j exactly when both are
// in the same example and j <= i: mask[b][i][j] = seg[b][i] == seg[b][j] != 0
// && j <= i. A padding token (segment 0) attends only to itself, so no softmax
// row is empty (an all-masked row gives NaN), and no real token attends to
// padding. Returned as [rows, cols, cols] uint8 (1: may attend), row-major.
// For a padded batch this is the ordinary causal mask with padding removed.
// The model builds no such mask for a packed batch: each example is one run of its row, and
// model::packed_attention (model/attention.h) keeps the runs' boundaries, read on the host,
// for attention run by run (the flash kernel's variable-length runs on a GPU). There the
// trailing padding is a run of its own, attending causally within itself: a real token's
// attention is the one this mask gives, padding still never sees nothing (no NaN), and what
// padding computes carries no loss.
std::vector<uint8_t> packed_attention_mask(const std::vector<int32_t>& segment_ids, int64_t rows,
                                           int64_t cols);

}  // namespace qlora::data

namespace qlora::data {

// `batch` cut into consecutive pieces of at most `max_rows` rows (the last may
// be smaller), every per-token field sliced by rows, trained_tokens recounted.
// The trainer retries an out-of-memory window this way: token-normalized
// accumulation makes the pieces' gradient that of the whole batch.
std::vector<Batch> split_rows(const Batch& batch, int64_t max_rows);

}  // namespace qlora::data
