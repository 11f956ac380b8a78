#include "qlora/data/batch.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace qlora::data {

int32_t choose_pad_id(int32_t pad_id, int32_t eos_id) {
  if (pad_id >= 0) return pad_id;
  if (eos_id >= 0) return eos_id;
  return 0;
}

namespace {

// An all-padding batch of the given shape.
Batch empty_batch(int64_t rows, int64_t cols, int32_t pad_id) {
  Batch b;
  b.rows = rows;
  b.cols = cols;
  const size_t n = static_cast<size_t>(rows * cols);
  b.input_ids.assign(n, pad_id);
  b.labels.assign(n, kIgnoreIndex);
  b.attention_mask.assign(n, 0);
  b.position_ids.assign(n, 0);
  b.segment_ids.assign(n, 0);
  return b;
}

const TokenizedExample& example_at(const std::vector<TokenizedExample>& examples, int64_t i) {
  if (i < 0 || i >= static_cast<int64_t>(examples.size())) {
    throw std::out_of_range("data batch: example index " + std::to_string(i) + " out of range");
  }
  return examples[static_cast<size_t>(i)];
}

// Writes `ex` into row `row` from column `col` as segment `segment`.
void place(Batch& b, const TokenizedExample& ex, int64_t row, int64_t col, int32_t segment) {
  for (int64_t t = 0; t < ex.size(); ++t) {
    const size_t k = b.at(row, col + t);
    b.input_ids[k] = ex.input_ids[static_cast<size_t>(t)];
    b.labels[k] = ex.labels[static_cast<size_t>(t)];
    b.attention_mask[k] = 1;
    b.position_ids[k] = static_cast<int32_t>(t);
    b.segment_ids[k] = segment;
    b.trained_tokens += b.labels[k] != kIgnoreIndex;
  }
}

}  // namespace

Batch collate_padded(const std::vector<TokenizedExample>& examples,
                     const std::vector<int64_t>& indices, int32_t pad_id) {
  int64_t cols = 0;
  for (int64_t i : indices) cols = std::max(cols, example_at(examples, i).size());
  Batch b = empty_batch(static_cast<int64_t>(indices.size()), cols, pad_id);
  for (size_t r = 0; r < indices.size(); ++r) {
    place(b, example_at(examples, indices[r]), static_cast<int64_t>(r), 0, 1);
    b.example_indices.push_back(indices[r]);
  }
  return b;
}

std::vector<std::vector<int64_t>> pack_next_fit(const std::vector<TokenizedExample>& examples,
                                                const std::vector<int64_t>& order,
                                                int64_t max_len) {
  std::vector<std::vector<int64_t>> rows;
  int64_t used = 0;
  for (int64_t i : order) {
    const int64_t len = example_at(examples, i).size();
    if (len > max_len) {
      throw std::invalid_argument("pack_next_fit: example of " + std::to_string(len) +
                                  " tokens exceeds the row length " + std::to_string(max_len));
    }
    if (rows.empty() || used + len > max_len) {
      rows.emplace_back();
      used = 0;
    }
    rows.back().push_back(i);
    used += len;
  }
  return rows;
}

Batch collate_packed(const std::vector<TokenizedExample>& examples,
                     const std::vector<std::vector<int64_t>>& rows, int32_t pad_id) {
  int64_t cols = 0;
  for (const auto& row : rows) {
    int64_t len = 0;
    for (int64_t i : row) len += example_at(examples, i).size();
    cols = std::max(cols, len);
  }
  Batch b = empty_batch(static_cast<int64_t>(rows.size()), cols, pad_id);
  for (size_t r = 0; r < rows.size(); ++r) {
    int64_t col = 0;
    int32_t segment = 0;
    for (int64_t i : rows[r]) {
      const TokenizedExample& ex = example_at(examples, i);
      place(b, ex, static_cast<int64_t>(r), col, ++segment);
      col += ex.size();
      b.example_indices.push_back(i);
    }
  }
  return b;
}

std::vector<uint8_t> packed_attention_mask(const std::vector<int32_t>& segment_ids, int64_t rows,
                                           int64_t cols) {
  if (static_cast<int64_t>(segment_ids.size()) != rows * cols) {
    throw std::invalid_argument("packed_attention_mask: " + std::to_string(segment_ids.size()) +
                                " segment ids for a [" + std::to_string(rows) + ", " +
                                std::to_string(cols) + "] batch");
  }
  std::vector<uint8_t> mask(static_cast<size_t>(rows * cols * cols), 0);
  for (int64_t b = 0; b < rows; ++b) {
    const int32_t* seg = segment_ids.data() + b * cols;
    uint8_t* m = mask.data() + b * cols * cols;
    for (int64_t i = 0; i < cols; ++i) {
      if (seg[i] == 0) {
        m[i * cols + i] = 1;  // padding sees itself only (Note [packed attention])
        continue;
      }
      for (int64_t j = 0; j <= i; ++j) m[i * cols + j] = seg[j] == seg[i];
    }
  }
  return mask;
}

}  // namespace qlora::data

namespace qlora::data {

std::vector<Batch> split_rows(const Batch& batch, int64_t max_rows) {
  if (max_rows < 1) throw std::invalid_argument("split_rows: max_rows must be >= 1, got " + std::to_string(max_rows));
  std::vector<Batch> pieces;
  const auto per_token = static_cast<size_t>(batch.rows * batch.cols);
  for (int64_t r0 = 0; r0 < batch.rows; r0 += max_rows) {
    const int64_t n = std::min(max_rows, batch.rows - r0);
    Batch p;
    p.rows = n;
    p.cols = batch.cols;
    const auto begin = static_cast<size_t>(r0 * batch.cols), end = static_cast<size_t>((r0 + n) * batch.cols);
    const auto slice = [&](const auto& v, auto& out) {
      if (v.size() == per_token) out.assign(v.begin() + static_cast<std::ptrdiff_t>(begin), v.begin() + static_cast<std::ptrdiff_t>(end));
    };
    slice(batch.input_ids, p.input_ids);
    slice(batch.labels, p.labels);
    slice(batch.attention_mask, p.attention_mask);
    slice(batch.position_ids, p.position_ids);
    slice(batch.segment_ids, p.segment_ids);
    // One example per row unless packed (then the row of each index is not
    // recorded here): keep the indices only when they map to rows.
    if (static_cast<int64_t>(batch.example_indices.size()) == batch.rows)
      p.example_indices.assign(batch.example_indices.begin() + r0, batch.example_indices.begin() + r0 + n);
    for (const int32_t l : p.labels) p.trained_tokens += l != kIgnoreIndex;
    pieces.push_back(std::move(p));
  }
  return pieces;
}

}  // namespace qlora::data
