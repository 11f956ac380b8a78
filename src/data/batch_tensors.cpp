#include "qlora/data/batch_tensors.h"

#include <ATen/ATen.h>

#include <stdexcept>
#include <string>

namespace qlora::data {

namespace {

template <class T>
at::Tensor to_long(const std::vector<T>& v, int64_t rows, int64_t cols) {
  // from_blob does not own the memory: copy into an owning int64 tensor at once.
  at::Tensor t = at::empty({rows, cols}, at::kLong);
  int64_t* out = t.data_ptr<int64_t>();
  for (size_t i = 0; i < v.size(); ++i) out[i] = static_cast<int64_t>(v[i]);
  return t;
}

}  // namespace

BatchTensors to_tensors(const Batch& b) {
  BatchTensors t;
  t.input_ids = to_long(b.input_ids, b.rows, b.cols);
  t.labels = to_long(b.labels, b.rows, b.cols);
  t.attention_mask = to_long(b.attention_mask, b.rows, b.cols);
  t.position_ids = to_long(b.position_ids, b.rows, b.cols);
  t.segment_ids = to_long(b.segment_ids, b.rows, b.cols).to(at::kInt);
  return t;
}

at::Tensor packed_attention_mask(const at::Tensor& segment_ids) {
  if (segment_ids.dim() != 2) {
    throw std::invalid_argument("packed_attention_mask: segment_ids must be 2-D [B, T], got " +
                                std::to_string(segment_ids.dim()) + "-D");
  }
  if (at::isFloatingType(segment_ids.scalar_type()) || segment_ids.scalar_type() == at::kBool) {
    throw std::invalid_argument("packed_attention_mask: segment_ids must be an integer tensor");
  }
  const int64_t t = segment_ids.size(1);
  const at::Tensor q = segment_ids.unsqueeze(2);  // [B, T, 1]
  const at::Tensor k = segment_ids.unsqueeze(1);  // [B, 1, T]
  const at::Tensor causal =
      at::ones({t, t}, segment_ids.options().dtype(at::kBool)).tril();  // [T, T]
  const at::Tensor same = (q == k) & q.ne(0) & causal;                 // [B, T, T]
  const at::Tensor pad_self =
      q.eq(0) & at::eye(t, segment_ids.options().dtype(at::kBool));    // [B, T, T]
  return same | pad_self;
}

}  // namespace qlora::data
