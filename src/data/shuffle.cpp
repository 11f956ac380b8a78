#include "qlora/data/shuffle.h"

#include <random>
#include <utility>

namespace qlora::data {

uint64_t mix_seed(uint64_t seed, uint64_t stream) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ULL * (stream + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

namespace {

uint64_t bounded(std::mt19937_64& rng, uint64_t m) {
  // Largest multiple of m that fits in 2^64: values at or above it are redrawn.
  const uint64_t limit = (~uint64_t{0} / m) * m;
  uint64_t x = rng();
  while (x >= limit) x = rng();
  return x % m;
}

}  // namespace

std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed, uint64_t stream) {
  std::vector<int64_t> p(static_cast<size_t>(n < 0 ? 0 : n));
  for (size_t i = 0; i < p.size(); ++i) p[i] = static_cast<int64_t>(i);
  std::mt19937_64 rng(mix_seed(seed, stream));
  for (size_t i = p.size(); i-- > 1;) {
    const size_t j = static_cast<size_t>(bounded(rng, i + 1));
    std::swap(p[i], p[j]);
  }
  return p;
}

}  // namespace qlora::data
