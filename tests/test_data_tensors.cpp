// The torch side of the data module: Batch -> tensors, and the packed
// attention mask as a tensor agreeing with the plain-array reference.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <random>

#include "qlora/data/batch_tensors.h"
#include "qlora/data/loader.h"

namespace qlora::data {
namespace {

std::vector<TokenizedExample> random_examples(int n, int64_t max_len, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<TokenizedExample> out;
  for (int i = 0; i < n; ++i) {
    TokenizedExample ex;
    const int64_t len = 2 + static_cast<int64_t>(rng() % static_cast<uint64_t>(max_len - 1));
    for (int64_t t = 0; t < len; ++t) {
      ex.input_ids.push_back(static_cast<int32_t>(rng() % 50000));
      ex.labels.push_back(t == 0 ? kIgnoreIndex : ex.input_ids.back());
    }
    out.push_back(ex);
  }
  return out;
}

TEST(DataTensors, MaskTensorEqualsTheReferenceOnPackedAndPaddedBatches) {
  const auto ex = random_examples(40, 30, 17);
  for (bool packing : {true, false}) {
    LoaderOptions o;
    o.packing = packing;
    o.max_seq_length = 48;
    o.micro_batch_size = 3;
    o.pad_id = 5;
    DataLoader loader(ex, o);
    for (int64_t s = 0; s < loader.steps_in_epoch(0); ++s) {
      const Batch b = loader.next();
      const BatchTensors t = to_tensors(b);
      ASSERT_EQ(t.input_ids.sizes(), (std::vector<int64_t>{b.rows, b.cols}));
      EXPECT_EQ(t.input_ids.scalar_type(), at::kLong);
      for (int64_t r = 0; r < b.rows; ++r) {
        for (int64_t c = 0; c < b.cols; ++c) {
          ASSERT_EQ(t.input_ids[r][c].item<int64_t>(), b.input_ids[b.at(r, c)]);
          ASSERT_EQ(t.labels[r][c].item<int64_t>(), b.labels[b.at(r, c)]);
          ASSERT_EQ(t.position_ids[r][c].item<int64_t>(), b.position_ids[b.at(r, c)]);
          ASSERT_EQ(t.attention_mask[r][c].item<int64_t>(), b.attention_mask[b.at(r, c)]);
        }
      }
      const at::Tensor m = packed_attention_mask(t.segment_ids);
      ASSERT_EQ(m.sizes(), (std::vector<int64_t>{b.rows, b.cols, b.cols}));
      ASSERT_EQ(m.scalar_type(), at::kBool);
      const std::vector<uint8_t> ref = packed_attention_mask(b.segment_ids, b.rows, b.cols);
      const at::Tensor m_u8 = m.to(at::kByte).contiguous();
      const uint8_t* got = m_u8.data_ptr<uint8_t>();
      for (size_t i = 0; i < ref.size(); ++i) ASSERT_EQ(got[i], ref[i]) << "element " << i;
    }
  }
  EXPECT_THROW(packed_attention_mask(at::zeros({4}, at::kInt)), std::invalid_argument);
}

}  // namespace
}  // namespace qlora::data
