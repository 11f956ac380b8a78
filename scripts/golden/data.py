#!/usr/bin/env python3
"""Golden permutations for the data loader (tests/data/data/permutations.txt).

An independent Python implementation of the loader's seeded shuffle
(Note [seeded shuffle] in include/qlora/data/shuffle.h): MT19937-64 written
from its published definition (Matsumoto & Nishimura; the constants of
std::mt19937_64), SplitMix64 seed mixing, and Fisher-Yates with rejection
sampling. Stdlib only, deterministic. Each case is one line:
"seed stream n p0 p1 ... p(n-1)".
"""
import os

MASK64 = (1 << 64) - 1


class MT19937_64:
    N, M = 312, 156
    MATRIX_A = 0xB5026F5AA96619E9
    UPPER, LOWER = 0xFFFFFFFF80000000, 0x7FFFFFFF

    def __init__(self, seed):
        self.mt = [0] * self.N
        self.mt[0] = seed & MASK64
        for i in range(1, self.N):
            prev = self.mt[i - 1]
            self.mt[i] = (6364136223846793005 * (prev ^ (prev >> 62)) + i) & MASK64
        self.index = self.N

    def _twist(self):
        for i in range(self.N):
            x = (self.mt[i] & self.UPPER) | (self.mt[(i + 1) % self.N] & self.LOWER)
            xa = x >> 1
            if x & 1:
                xa ^= self.MATRIX_A
            self.mt[i] = self.mt[(i + self.M) % self.N] ^ xa
        self.index = 0

    def __call__(self):
        if self.index >= self.N:
            self._twist()
        y = self.mt[self.index]
        self.index += 1
        y ^= (y >> 29) & 0x5555555555555555
        y ^= (y << 17) & 0x71D67FFFEDA60000
        y ^= (y << 37) & 0xFFF7EEE000000000
        y ^= y >> 43
        return y & MASK64


def mix_seed(seed, stream):
    z = (seed + 0x9E3779B97F4A7C15 * (stream + 1)) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def bounded(rng, m):
    limit = (MASK64 // m) * m
    x = rng()
    while x >= limit:
        x = rng()
    return x % m


def seeded_permutation(n, seed, stream):
    rng = MT19937_64(mix_seed(seed, stream))
    p = list(range(n))
    for i in range(n - 1, 0, -1):
        j = bounded(rng, i + 1)
        p[i], p[j] = p[j], p[i]
    return p


def main():
    # The standard's check value: 10000th output of mt19937_64 seeded with 5489.
    rng = MT19937_64(5489)
    for _ in range(9999):
        rng()
    assert rng() == 9981545732273789042, "MT19937-64 implementation is wrong"

    eval_stream = 0x6576616C
    epoch_base = 0x65706F63
    cases = [(42, 0, 10), (42, 1, 10), (0, eval_stream, 37), (1234, epoch_base, 23),
             (1234, epoch_base + 1, 23), (2**64 - 15, epoch_base + 7, 100), (7, 3, 1), (7, 3, 2),
             (99, epoch_base, 1000)]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out_dir = os.path.join(root, "tests", "data", "data")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "permutations.txt")
    with open(path, "w") as f:
        for seed, stream, n in cases:
            p = seeded_permutation(n, seed, stream)
            assert sorted(p) == list(range(n))
            f.write(" ".join(str(v) for v in [seed, stream, n] + p) + "\n")
    print(f"wrote {path} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
