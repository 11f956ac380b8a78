// Batching, packing, the attention mask of packed rows, the seeded loader, its
// cursor (restore at every stop point) and data-parallel sharding.
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "qlora/data/batch.h"
#include "qlora/data/loader.h"
#include "qlora/data/shuffle.h"

namespace qlora::data {
namespace {

constexpr int32_t I = kIgnoreIndex;

// Example i: length lengths[i], ids 1000*(i+1) + t, labels = ids except the
// first two positions (a "prompt" of two tokens).
std::vector<TokenizedExample> make_examples(const std::vector<int64_t>& lengths) {
  std::vector<TokenizedExample> out;
  for (size_t i = 0; i < lengths.size(); ++i) {
    TokenizedExample ex;
    for (int64_t t = 0; t < lengths[i]; ++t) {
      const int32_t id = static_cast<int32_t>(1000 * (i + 1) + static_cast<size_t>(t));
      ex.input_ids.push_back(id);
      ex.labels.push_back(t < 2 ? I : id);
    }
    ex.line = static_cast<int64_t>(i) + 1;
    out.push_back(ex);
  }
  return out;
}

// n examples with seeded random lengths in [2, max_len].
std::vector<TokenizedExample> random_examples(int n, int64_t max_len, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int64_t> lengths;
  for (int i = 0; i < n; ++i) lengths.push_back(2 + static_cast<int64_t>(rng() % static_cast<uint64_t>(max_len - 1)));
  return make_examples(lengths);
}

// ---------------------------------------------------------------- shuffle

TEST(DataShuffle, Mt19937_64IsTheStandardEngine) {
  // The C++ standard fixes the 10000th output of a default-constructed mt19937_64.
  std::mt19937_64 rng;
  rng.discard(9999);
  EXPECT_EQ(rng(), 9981545732273789042ULL);
}

TEST(DataShuffle, SeededPermutationIsAPermutationAndPinned) {
  const std::vector<int64_t> p = seeded_permutation(10, 42, 0);
  std::vector<int64_t> sorted = p;
  std::sort(sorted.begin(), sorted.end());
  for (int64_t i = 0; i < 10; ++i) EXPECT_EQ(sorted[static_cast<size_t>(i)], i);
  EXPECT_EQ(p, seeded_permutation(10, 42, 0));
  EXPECT_NE(p, seeded_permutation(10, 43, 0));
  EXPECT_NE(p, seeded_permutation(10, 42, 1));
}

// Golden permutations from scripts/golden/data.py, an independent Python
// implementation of MT19937-64, SplitMix64 and Note [seeded shuffle].
TEST(DataShuffle, MatchesThePythonReference) {
  std::ifstream in(std::string(QLORA_SOURCE_DIR) + "/tests/data/data/permutations.txt");
  ASSERT_TRUE(in) << "run scripts/golden/data.py";
  int cases = 0;
  uint64_t seed = 0, stream = 0;
  int64_t n = 0;
  while (in >> seed >> stream >> n) {
    std::vector<int64_t> expected(static_cast<size_t>(n));
    for (auto& v : expected) in >> v;
    EXPECT_EQ(seeded_permutation(n, seed, stream), expected) << "seed " << seed << " stream " << stream;
    ++cases;
  }
  EXPECT_GE(cases, 5);
}

// ---------------------------------------------------------------- padding

TEST(DataBatch, PadsToTheLongestRowOfThisMicroBatch) {
  const auto ex = make_examples({3, 5, 2});
  const Batch b = collate_padded(ex, {2, 0}, /*pad_id=*/7);
  ASSERT_EQ(b.rows, 2);
  ASSERT_EQ(b.cols, 3);  // the longest of examples 2 and 0, not of all three
  EXPECT_EQ(b.input_ids, (std::vector<int32_t>{3000, 3001, 7, 1000, 1001, 1002}));
  EXPECT_EQ(b.labels, (std::vector<int32_t>{I, I, I, I, I, 1002}));
  EXPECT_EQ(b.attention_mask, (std::vector<uint8_t>{1, 1, 0, 1, 1, 1}));
  EXPECT_EQ(b.position_ids, (std::vector<int32_t>{0, 1, 0, 0, 1, 2}));
  EXPECT_EQ(b.segment_ids, (std::vector<int32_t>{1, 1, 0, 1, 1, 1}));
  EXPECT_EQ(b.example_indices, (std::vector<int64_t>{2, 0}));
  EXPECT_EQ(b.trained_tokens, 1);
}

TEST(DataBatch, PadIdFallsBackToEos) {
  EXPECT_EQ(choose_pad_id(5, 9), 5);
  EXPECT_EQ(choose_pad_id(-1, 9), 9);
  EXPECT_EQ(choose_pad_id(-1, -1), 0);
}

// ---------------------------------------------------------------- packing

TEST(DataBatch, NextFitPackingKeepsOrder) {
  const auto ex = make_examples({3, 4, 2, 5, 7, 1 + 1});
  const auto rows = pack_next_fit(ex, {0, 1, 2, 3, 4, 5}, 7);
  EXPECT_EQ(rows, (std::vector<std::vector<int64_t>>{{0, 1}, {2, 3}, {4}, {5}}));
  EXPECT_THROW(pack_next_fit(ex, {4}, 6), std::invalid_argument);
}

TEST(DataBatch, PackedRowsRestartPositionsAndNumberSegments) {
  const auto ex = make_examples({3, 2, 4});
  const Batch b = collate_packed(ex, {{0, 1}, {2}}, /*pad_id=*/0);
  ASSERT_EQ(b.rows, 2);
  ASSERT_EQ(b.cols, 5);
  EXPECT_EQ(b.input_ids, (std::vector<int32_t>{1000, 1001, 1002, 2000, 2001,  //
                                               3000, 3001, 3002, 3003, 0}));
  EXPECT_EQ(b.labels, (std::vector<int32_t>{I, I, 1002, I, I,  //
                                            I, I, 3002, 3003, I}));
  EXPECT_EQ(b.position_ids, (std::vector<int32_t>{0, 1, 2, 0, 1,  //
                                                  0, 1, 2, 3, 0}));
  EXPECT_EQ(b.segment_ids, (std::vector<int32_t>{1, 1, 1, 2, 2,  //
                                                 1, 1, 1, 1, 0}));
  EXPECT_EQ(b.attention_mask, (std::vector<uint8_t>{1, 1, 1, 1, 1,  //
                                                    1, 1, 1, 1, 0}));
}

TEST(DataBatch, PackedAttentionMaskByHand) {
  // One row: example 1 (2 tokens), example 2 (2 tokens), one padding token.
  const std::vector<uint8_t> m = packed_attention_mask({1, 1, 2, 2, 0}, 1, 5);
  const std::vector<uint8_t> expected = {
      1, 0, 0, 0, 0,  //
      1, 1, 0, 0, 0,  //
      0, 0, 1, 0, 0,  // first token of example 2 sees only itself
      0, 0, 1, 1, 0,  //
      0, 0, 0, 0, 1,  // padding sees only itself
  };
  EXPECT_EQ(m, expected);
}

// Every (query, key) pair the mask allows lies inside one example and is
// causal, and every causal pair inside an example is allowed: checked on all
// packed batches of a loader over random lengths.
TEST(DataBatch, NoExampleSeesAnother) {
  const auto ex = random_examples(60, 24, 5);
  LoaderOptions o;
  o.packing = true;
  o.max_seq_length = 32;
  o.micro_batch_size = 3;
  DataLoader loader(ex, o);
  int64_t pairs_checked = 0;
  for (int64_t s = 0; s < loader.steps_in_epoch(0); ++s) {
    const Batch b = loader.next();
    const std::vector<uint8_t> m = packed_attention_mask(b.segment_ids, b.rows, b.cols);
    for (int64_t r = 0; r < b.rows; ++r) {
      // Which example each token comes from, from its id (1000 * (index + 1) + t).
      for (int64_t i = 0; i < b.cols; ++i) {
        const bool pad_i = b.attention_mask[b.at(r, i)] == 0;
        const int32_t owner_i = b.input_ids[b.at(r, i)] / 1000;
        for (int64_t j = 0; j < b.cols; ++j) {
          const bool pad_j = b.attention_mask[b.at(r, j)] == 0;
          const int32_t owner_j = b.input_ids[b.at(r, j)] / 1000;
          const bool allowed = m[static_cast<size_t>((r * b.cols + i) * b.cols + j)] != 0;
          const bool want = pad_i ? i == j : (!pad_j && owner_i == owner_j && j <= i);
          ASSERT_EQ(allowed, want) << "row " << r << " query " << i << " key " << j;
          ++pairs_checked;
        }
        // Positions restart: the position id is the token's index in its example.
        if (!pad_i) {
          EXPECT_EQ(b.position_ids[b.at(r, i)], b.input_ids[b.at(r, i)] % 1000);
        }
      }
    }
  }
  EXPECT_GT(pairs_checked, 1000);
}

// ---------------------------------------------------------------- loader

// What a batch is, compared across runs: its examples and every array.
std::vector<int32_t> fingerprint(const Batch& b) {
  std::vector<int32_t> out = {static_cast<int32_t>(b.rows), static_cast<int32_t>(b.cols)};
  for (int64_t i : b.example_indices) out.push_back(static_cast<int32_t>(i));
  out.insert(out.end(), b.input_ids.begin(), b.input_ids.end());
  out.insert(out.end(), b.labels.begin(), b.labels.end());
  out.insert(out.end(), b.position_ids.begin(), b.position_ids.end());
  out.insert(out.end(), b.segment_ids.begin(), b.segment_ids.end());
  for (uint8_t a : b.attention_mask) out.push_back(a);
  return out;
}

std::vector<std::vector<int32_t>> take(DataLoader& loader, int64_t n) {
  std::vector<std::vector<int32_t>> out;
  for (int64_t i = 0; i < n; ++i) out.push_back(fingerprint(loader.next()));
  return out;
}

TEST(DataLoader, EachEpochIsASeededPermutationPaddedPerMicroBatch) {
  const auto ex = random_examples(23, 40, 11);
  LoaderOptions o;
  o.micro_batch_size = 4;
  o.seed = 1234;
  DataLoader a(ex, o), b(ex, o);
  std::vector<std::vector<int64_t>> orders;
  for (int epoch = 0; epoch < 3; ++epoch) {
    ASSERT_EQ(a.steps_in_epoch(epoch), 6);  // ceil(23 / 4): the last micro batch has 3
    std::vector<int64_t> seen;
    for (int64_t s = 0; s < 6; ++s) {
      const Batch x = a.next();
      EXPECT_EQ(fingerprint(x), fingerprint(b.next()));
      EXPECT_EQ(x.rows, s == 5 ? 3 : 4);
      int64_t longest = 0;
      for (int64_t i : x.example_indices) longest = std::max(longest, ex[static_cast<size_t>(i)].size());
      EXPECT_EQ(x.cols, longest);  // padded to this micro batch's longest only
      seen.insert(seen.end(), x.example_indices.begin(), x.example_indices.end());
    }
    EXPECT_EQ(a.epoch(), epoch);
    orders.push_back(seen);
    std::sort(seen.begin(), seen.end());
    for (int64_t i = 0; i < 23; ++i) EXPECT_EQ(seen[static_cast<size_t>(i)], i);
  }
  EXPECT_NE(orders[0], orders[1]);  // reshuffled every epoch
  EXPECT_NE(orders[1], orders[2]);
  o.seed = 1235;
  DataLoader c(ex, o);
  EXPECT_NE(c.epoch_micro_batches(0), a.epoch_micro_batches(0));
  o.shuffle = false;
  DataLoader d(ex, o);
  EXPECT_EQ(d.next().example_indices, (std::vector<int64_t>{0, 1, 2, 3}));
}

// For every stop point k of a run over three epochs, a loader restored from
// the cursor (through its JSON) yields exactly the remaining batches.
void check_restore_everywhere(const std::vector<TokenizedExample>& ex, const LoaderOptions& o) {
  DataLoader ref(ex, o);
  const int64_t total = ref.steps_in_epoch(0) + ref.steps_in_epoch(1) + ref.steps_in_epoch(2);
  const auto expected = take(ref, total);
  for (int64_t k = 0; k <= total; ++k) {
    DataLoader first(ex, o);
    take(first, k);
    const std::string saved = first.cursor().to_json();
    DataLoader resumed(ex, o);
    resumed.restore(LoaderCursor::from_json(saved));
    const auto rest = take(resumed, total - k);
    for (int64_t i = 0; i < total - k; ++i) {
      ASSERT_EQ(rest[static_cast<size_t>(i)], expected[static_cast<size_t>(k + i)])
          << "stopped at " << k << ", batch " << k + i << " differs after restore";
    }
  }
}

TEST(DataLoader, CursorRestoresTheSameFutureAtEveryStopPoint) {
  const auto ex = random_examples(17, 30, 3);
  LoaderOptions o;
  o.micro_batch_size = 3;
  o.seed = 99;
  check_restore_everywhere(ex, o);
  o.packing = true;
  o.max_seq_length = 40;
  check_restore_everywhere(ex, o);
  o.packing = false;
  o.world_size = 2;
  o.rank = 1;
  check_restore_everywhere(ex, o);
}

TEST(DataLoader, CursorJsonRoundTripsAndRejectsOtherRuns) {
  const auto ex = random_examples(10, 20, 4);
  LoaderOptions o;
  o.seed = 0xFFFFFFFFFFFFFFF1ULL;  // the full 64-bit range survives JSON
  DataLoader a(ex, o);
  take(a, 7);
  const LoaderCursor c = LoaderCursor::from_json(a.cursor().to_json());
  EXPECT_EQ(c.seed, o.seed);
  EXPECT_EQ(c.epoch, 1);
  EXPECT_EQ(c.position, 2);
  EXPECT_EQ(c.to_json(), a.cursor().to_json());

  auto message = [&](const std::vector<TokenizedExample>& data, LoaderOptions opt) {
    DataLoader other(data, opt);
    try {
      other.restore(c);
    } catch (const InputError& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  LoaderOptions other = o;
  other.seed = 1;
  EXPECT_NE(message(ex, other).find("train.seed"), std::string::npos);
  other = o;
  other.micro_batch_size = 3;
  EXPECT_NE(message(ex, other).find("train.micro_batch_size"), std::string::npos);
  auto changed = ex;
  changed[3].input_ids[1] += 1;  // same count, different tokens
  EXPECT_NE(message(changed, o).find("tokenized training data"), std::string::npos);
  EXPECT_THROW(LoaderCursor::from_json("{\"epoch\":1}", "ckpt/loader.json"), InputError);
  EXPECT_THROW(LoaderCursor::from_json("nope", "ckpt/loader.json"), InputError);
}

TEST(DataLoader, ShardsAreDisjointAndCoverTheEpoch) {
  const auto ex = random_examples(29, 20, 8);
  for (bool packing : {false, true}) {
    LoaderOptions o;
    o.micro_batch_size = 2;
    o.world_size = 3;
    o.packing = packing;
    o.max_seq_length = 24;
    for (int64_t epoch = 0; epoch < 2; ++epoch) {
      const auto global = DataLoader(ex, o).epoch_micro_batches(epoch);
      const int64_t steps = static_cast<int64_t>(global.size()) / 3;
      std::multiset<int64_t> covered;
      for (int64_t rank = 0; rank < 3; ++rank) {
        LoaderOptions ro = o;
        ro.rank = rank;
        DataLoader loader(ex, ro);
        ASSERT_EQ(loader.steps_in_epoch(epoch), steps);
        for (int64_t e = 0; e < epoch; ++e) take(loader, loader.steps_in_epoch(e));
        for (int64_t s = 0; s < steps; ++s) {
          const Batch b = loader.next();
          // Rank r's step s is global micro batch s * world_size + r (Note [sharding]).
          EXPECT_EQ(b.example_indices, global[static_cast<size_t>(s * 3 + rank)]);
          covered.insert(b.example_indices.begin(), b.example_indices.end());
        }
      }
      // Disjoint: no example twice. Coverage: all but the dropped tail group.
      std::set<int64_t> unique(covered.begin(), covered.end());
      EXPECT_EQ(unique.size(), covered.size()) << "packing " << packing;
      size_t tail = 0;
      for (size_t m = static_cast<size_t>(steps * 3); m < global.size(); ++m) tail += global[m].size();
      EXPECT_LT(tail, ex.size() / 2);
      EXPECT_EQ(covered.size() + tail, ex.size()) << "packing " << packing;
    }
  }
  // Uneven shards (evaluation): nothing dropped.
  LoaderOptions o;
  o.micro_batch_size = 2;
  o.world_size = 4;
  o.shuffle = false;
  o.even_shards = false;
  int64_t total = 0;
  for (int64_t rank = 0; rank < 4; ++rank) {
    o.rank = rank;
    DataLoader loader(ex, o);
    for (int64_t s = 0; s < loader.steps_in_epoch(0); ++s) total += loader.next().rows;
  }
  EXPECT_EQ(total, 29);
}

TEST(DataLoader, RejectsUnusableOptions) {
  const auto ex = random_examples(3, 10, 1);
  LoaderOptions o;
  o.micro_batch_size = 0;
  EXPECT_THROW(DataLoader(ex, o), InputError);
  o.micro_batch_size = 2;
  o.world_size = 3;  // 2 micro batches for 3 ranks
  EXPECT_THROW(DataLoader(ex, o), InputError);
  o.world_size = 2;
  o.rank = 2;
  EXPECT_THROW(DataLoader(ex, o), InputError);
}

}  // namespace
}  // namespace qlora::data

namespace qlora::data {
namespace {

// A resume on another world size continues from the same global micro batch
// (Note [sharding]): what ranks 0..W'-1 take next, in rank order, is what the
// old world would have taken next.
TEST(DataLoader, CursorMovesToAnotherWorldSizeAtTheSameGlobalMicroBatch) {
  const auto ex = random_examples(48, 20, 5);
  LoaderOptions o;
  o.micro_batch_size = 2;
  o.seed = 7;
  o.world_size = 2;
  DataLoader two(ex, o);
  take(two, 4);  // 8 global micro batches of epoch 0 done
  const LoaderCursor saved = two.cursor();

  for (const int64_t world : {1, 4}) {
    for (int64_t r = 0; r < world; ++r) {
      LoaderOptions w = o;
      w.world_size = world;
      w.rank = r;
      DataLoader l(ex, w);
      l.restore(saved);
      EXPECT_EQ(l.cursor().position, 8 / world) << "world " << world;
      // Its next micro batch is global micro batch 8 + r of epoch 0.
      const Batch b = l.next();
      const Batch expect_batch = [&] {
        LoaderOptions single = w;
        single.world_size = 1;
        single.rank = 0;
        DataLoader s(ex, single);
        for (int64_t i = 0; i < 8 + r; ++i) s.next();
        return s.next();
      }();
      EXPECT_EQ(b.input_ids, expect_batch.input_ids) << "world " << world << " rank " << r;
    }
  }
  LoaderOptions three = o;
  three.world_size = 3;
  DataLoader l3(ex, three);
  try {
    l3.restore(saved);
    FAIL() << "8 global micro batches cannot be split over 3 ranks, yet the restore was accepted";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("cannot split evenly"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace qlora::data
