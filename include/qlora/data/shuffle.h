// data/shuffle: the one seeded permutation used by the loader and the eval
// split, defined here bit for bit so a run replays the same order with any
// standard library (std::shuffle and the std distributions are
// implementation-defined; std::mt19937_64 itself is fully specified).
#pragma once

#include <cstdint>
#include <vector>

namespace qlora::data {

// Streams: independent permutations drawn from one user seed.
inline constexpr uint64_t kEvalSplitStream = 0x6576616c;  // "eval"
inline constexpr uint64_t kEpochStreamBase = 0x65706f63;  // "epoc"; epoch e uses base + e

// SplitMix64 finalizer: spreads (seed, stream) into a well-mixed 64-bit seed.
uint64_t mix_seed(uint64_t seed, uint64_t stream);

// Note [seeded shuffle]: the permutation of 0..n-1 for (seed, stream):
//   rng = std::mt19937_64(mix_seed(seed, stream)); p = [0, 1, ..., n-1]
//   for i = n-1 down to 1:
//     j = bounded(rng, i + 1); swap(p[i], p[j])
// where bounded(rng, m) draws x = rng() until x < floor((2^64 - 1) / m) * m and
// returns x % m (rejection sampling: unbiased, and defined here rather than by
// std::uniform_int_distribution).
std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed, uint64_t stream);

}  // namespace qlora::data
