// data/loader: the deterministic, resumable stream of micro batches.
//
// Epoch e visits the examples in seeded_permutation(n, seed, kEpochStreamBase
// + e) (Note [seeded shuffle]; file order when shuffle is off), cuts that order
// into micro batches (micro_batch_size examples, or with packing
// micro_batch_size packed rows of next-fit packing in that order), the last one
// possibly smaller. That list is the epoch's global micro-batch list M_e.
//
// Note [sharding]: a global step takes world_size consecutive micro batches of
// M_e; rank r gets the r-th of them, i.e. M_e[p * world_size + r] at step p of
// the epoch. An epoch has floor(|M_e| / world_size) steps: a trailing group
// smaller than world_size is dropped (every rank must take the same number of
// steps), unless even_shards is false (evaluation), where rank r simply takes
// M_e[r], M_e[r + W], ... . Ranks see disjoint examples and together all of
// them (except the dropped tail).
//
// Note [loader cursor]: the whole state is (seed, epoch, position): epoch e's
// order is a pure function of (seed, e), so no RNG state needs saving beyond
// the seed. position counts the steps taken in the epoch (same on every rank).
// The cursor also records the shape of the data it belongs to (example count,
// a fingerprint of the token ids, batch options) so restoring onto a changed
// data set or batch shape is refused instead of silently replaying other
// batches.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "qlora/data/batch.h"
#include "qlora/data/format.h"

namespace qlora::data {

struct LoaderOptions {
  int64_t micro_batch_size = 2;  // examples (or packed rows) per micro batch
  bool packing = false;
  int64_t max_seq_length = 2048;  // packed row length
  uint64_t seed = 42;
  bool shuffle = true;      // false: file order every epoch (evaluation)
  int64_t rank = 0;
  int64_t world_size = 1;
  bool even_shards = true;  // Note [sharding]
  int32_t pad_id = 0;       // choose_pad_id(tokenizer.pad_id(), tokenizer.eos_id())
};

struct LoaderCursor {
  static constexpr int kFormatVersion = 1;
  int64_t epoch = 0;     // current epoch, 0-based
  int64_t position = 0;  // steps already taken in it
  uint64_t seed = 0;
  // What the cursor belongs to (checked by restore).
  int64_t num_examples = 0;
  uint64_t data_fingerprint = 0;
  int64_t micro_batch_size = 0;
  bool packing = false;
  int64_t max_seq_length = 0;
  int64_t world_size = 1;
  bool shuffle = true;

  std::string to_json() const;
  // Throws InputError naming `source` on malformed text or a wrong version.
  static LoaderCursor from_json(std::string_view text, std::string_view source = "cursor");
};

class DataLoader {
 public:
  // Keeps a reference to `examples`: they must outlive the loader.
  // Throws InputError when the options are unusable (micro batch < 1, rank not
  // in [0, world_size), fewer micro batches than ranks).
  DataLoader(const std::vector<TokenizedExample>& examples, LoaderOptions options);

  // The next micro batch of this rank; moves to the next epoch when the
  // current one is exhausted.
  Batch next();

  // Steps (micro batches for this rank) in epoch e; with packing this can
  // differ between epochs, since the rows depend on the order.
  int64_t steps_in_epoch(int64_t epoch) const;

  int64_t epoch() const { return cursor_.epoch; }
  const LoaderCursor& cursor() const { return cursor_; }

  // Continue exactly where `cursor` was taken. Throws InputError when it
  // belongs to other data or other batch options (saying which). A cursor of
  // another world size continues from the same global micro batch when this
  // world size divides the global micro batches done in the epoch.
  void restore(const LoaderCursor& cursor);

  // The example indices of every global micro batch of epoch e (M_e), for
  // tests and for the trainer's accounting.
  std::vector<std::vector<int64_t>> epoch_micro_batches(int64_t epoch) const;

 private:
  struct Plan {
    int64_t epoch = -1;
    std::vector<std::vector<std::vector<int64_t>>> batches;  // [micro batch][row][example]
  };
  Plan make_plan(int64_t epoch) const;
  int64_t steps_of(const Plan& plan) const;
  const Plan& plan_for(int64_t epoch);

  const std::vector<TokenizedExample>& examples_;
  LoaderOptions options_;
  LoaderCursor cursor_;
  Plan plan_;
};

// FNV-1a over every example's length and ids: the cursor's data check.
uint64_t data_fingerprint(const std::vector<TokenizedExample>& examples);

}  // namespace qlora::data
