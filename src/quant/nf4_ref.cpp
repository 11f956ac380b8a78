// Byte-level NF4 reference: see the notes in include/qlora/quant/nf4_ref.h.
#include "qlora/quant/nf4_ref.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace qlora::quant::ref {
namespace {

// bitsandbytes' NF4 table (get_4bit_type("nf4")): normal-distribution quantiles scaled to
// [-1, 1], 7 negative values, 0, 8 positive values. Pinned bit for bit by test_quant_nf4.
constexpr float kNf4Code[16] = {
#include "qlora/kernels/nf4_code.inc"
};

// The values bitsandbytes 0.50.2's create_dynamic_map(signed=True, 7, 8) returns on the golden
// machine, written as exact hex floats (printed by scripts/golden/quant.py's oracle and compared
// bit for bit with the golden file by test_quant_nf4). They are data, not recomputed here: the
// map is built from torch.linspace, whose fp32 results depend on its vectorized code path.
// Layout: 127 negative values, 0, 127 positive values, 1.0 (so it is not symmetric).
constexpr float kDynamicMap[256] = {
#include "quant/dynamic_map.inc"
};

// Midpoints between consecutive NF4 codes, computed as bitsandbytes does ((a + b) / 2 in fp32).
struct Nf4Midpoints {
  float m[15];
  Nf4Midpoints() {
    for (int i = 0; i < 15; ++i) m[i] = (kNf4Code[i] + kNf4Code[i + 1]) / 2.0f;
  }
};
const Nf4Midpoints& nf4_midpoints() {
  static const Nf4Midpoints mids;
  return mids;
}

float clamp_unit(float s) { return std::min(1.0f, std::max(-1.0f, s)); }

// Smallest absmax used as a divisor (torch's clamp(min=1e-38) in fp32): a block of zeros then
// scales to 0, whose code is kNf4ZeroCode; the stored absmax stays 0.
constexpr float kMinDivisor = 1e-38f;

void check_blocksize(int64_t blocksize) {
  if (blocksize <= 0) throw std::invalid_argument("blocksize must be positive");
}

// Codes of an 8-bit map at the bitsandbytes CPU grid (Note [bitsandbytes 8-bit CPU grid]).
class GridQuantizer {
 public:
  explicit GridQuantizer(const float* map) {
    for (int i = 0; i < 255; ++i) mids_[i] = 0.5f * (map[i] + map[i + 1]);
  }
  uint8_t code(float scaled) const {
    const float s = clamp_unit(scaled);
    const float t = (s + 1.0f) * 0.5f;
    const uint16_t bin = static_cast<uint16_t>(static_cast<int32_t>(std::fma(t, 65535.0f, 0.5f)));
    const float grid = (2.0f * static_cast<float>(bin)) / 65535.0f - 1.0f;
    // Number of midpoints strictly below the grid point.
    return static_cast<uint8_t>(std::lower_bound(mids_, mids_ + 255, grid) - mids_);
  }

 private:
  float mids_[255];
};

template <typename Narrow>
void nf4_dequantize_into(const uint8_t* packed, const float* absmax, int64_t n, Narrow narrow) {
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t byte = packed[i / 2];
    const uint8_t q = (i % 2 == 0) ? (byte >> 4) : (byte & 0x0F);
    narrow(i, kNf4Code[q] * absmax[i / kNf4BlockSize]);
  }
}

}  // namespace

const float* nf4_code() { return kNf4Code; }
const float* dynamic_map() { return kDynamicMap; }

int64_t num_blocks(int64_t n, int64_t blocksize) {
  check_blocksize(blocksize);
  return (n + blocksize - 1) / blocksize;
}
int64_t packed_bytes(int64_t n) { return (n + 1) / 2; }

// ------------------------------------------------------------------ conversions
uint16_t float_to_bf16_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if (std::isnan(x)) return static_cast<uint16_t>(((bits >> 16) & 0x8000u) | 0x7FC0u);
  const uint32_t rounding = 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

uint16_t float_to_f16_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return sign | 0x7E00u;      // NaN (quiet)
  if (abs >= 0x477FF000u) return sign | 0x7C00u;     // >= 65520 rounds to infinity
  if (abs < 0x38800000u) {                           // below 2^-14: a half subnormal (or zero)
    float a;
    std::memcpy(&a, &abs, 4);
    // a * 2^24 is exact; nearbyint rounds half to even in the default rounding mode.
    return sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0f));
  }
  const uint32_t exp = (abs >> 23) - 127 + 15;
  const uint32_t mant = abs & 0x7FFFFFu;
  uint32_t h = (exp << 10) | (mant >> 13);
  const uint32_t rest = mant & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry moves into the exponent
  return sign | static_cast<uint16_t>(h);
}

float bf16_bits_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float f16_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    const float mag = static_cast<float>(mant) * (1.0f / 16777216.0f);
    return sign ? -mag : mag;
  }
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// ------------------------------------------------------------------ NF4
namespace {
// The number of midpoints strictly below `scaled` (they increase, so it is the index of the
// nearest code; ties take the lower code; NaN gives 0). Branch-free: the codes of random weights
// are unpredictable, and a compare loop that stops early mispredicts on most of them.
inline int32_t midpoints_below_i32(const float* m, float scaled) {
  int32_t q = 0;
  for (int j = 0; j < 15; ++j) q += m[j] < scaled ? 1 : 0;
  return q;
}
inline uint8_t midpoints_below(const float* m, float scaled) {
  return static_cast<uint8_t>(midpoints_below_i32(m, scaled));
}
}  // namespace

uint8_t nf4_nearest_code(float scaled) { return midpoints_below(nf4_midpoints().m, scaled); }

void nf4_quantize(const float* x, int64_t n, uint8_t* packed, float* absmax) {
  const int64_t blocks = num_blocks(n, kNf4BlockSize);
  const int64_t full_blocks = n / kNf4BlockSize;
  std::fill(packed, packed + packed_bytes(n), static_cast<uint8_t>(0));
  const float* mids = nf4_midpoints().m;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kNf4BlockSize;
    const int64_t end = std::min(begin + kNf4BlockSize, n);
    float amax = 0.0f;
    for (int64_t i = begin; i < end; ++i) amax = std::max(amax, std::fabs(x[i]));
    absmax[b] = amax;
    const float divisor = std::max(amax, kMinDivisor);
    if (b < full_blocks) {
      // The same operations element by element, written as fixed-length loops over the block
      // so the compiler vectorizes them: scale and clamp, count the midpoints below, pack.
      const float inv = 1.0f / divisor;  // full blocks multiply by this (Note [NF4 rounding])
      const float* xb = x + begin;
      float s[kNf4BlockSize];
      int32_t q[kNf4BlockSize];  // 32-bit counts: one lane per float compare
      for (int64_t i = 0; i < kNf4BlockSize; ++i) s[i] = clamp_unit(xb[i] * inv);
      for (int64_t i = 0; i < kNf4BlockSize; ++i) q[i] = midpoints_below_i32(mids, s[i]);
      uint8_t* pb = packed + begin / 2;
      for (int64_t k = 0; k < kNf4BlockSize / 2; ++k) pb[k] = static_cast<uint8_t>((q[2 * k] << 4) | q[2 * k + 1]);
      continue;
    }
    for (int64_t i = begin; i < end; ++i) {  // the short last block divides
      const uint8_t q = midpoints_below(mids, clamp_unit(x[i] / divisor));
      packed[i / 2] |= (i % 2 == 0) ? static_cast<uint8_t>(q << 4) : q;
    }
  }
  if (n % 2 != 0) packed[n / 2] |= kNf4ZeroCode;
}

void nf4_dequantize_f32(const uint8_t* packed, const float* absmax, int64_t n, float* out) {
  nf4_dequantize_into(packed, absmax, n, [out](int64_t i, float v) { out[i] = v; });
}
void nf4_dequantize_bf16(const uint8_t* packed, const float* absmax, int64_t n, uint16_t* out) {
  nf4_dequantize_into(packed, absmax, n,
                      [out](int64_t i, float v) { out[i] = float_to_bf16_bits(v); });
}
void nf4_dequantize_f16(const uint8_t* packed, const float* absmax, int64_t n, uint16_t* out) {
  nf4_dequantize_into(packed, absmax, n,
                      [out](int64_t i, float v) { out[i] = float_to_f16_bits(v); });
}

// ------------------------------------------------------------------ 8-bit blockwise
void blockwise8_quantize(const float* x, int64_t n, int64_t blocksize, const float* map, uint8_t* q,
                         float* absmax) {
  const GridQuantizer grid(map);
  const int64_t blocks = num_blocks(n, blocksize);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * blocksize;
    const int64_t end = std::min(begin + blocksize, n);
    float amax = 0.0f;
    for (int64_t i = begin; i < end; ++i) amax = std::max(amax, std::fabs(x[i]));
    absmax[b] = amax;
    if (amax == 0.0f) {
      std::fill(q + begin, q + end, static_cast<uint8_t>(0));
      continue;
    }
    const float inv = 1.0f / amax;
    for (int64_t i = begin; i < end; ++i) q[i] = grid.code(x[i] * inv);
  }
}

void blockwise8_dequantize(const uint8_t* q, const float* absmax, int64_t n, int64_t blocksize,
                           const float* map, float* out) {
  check_blocksize(blocksize);
  for (int64_t i = 0; i < n; ++i) out[i] = map[q[i]] * absmax[i / blocksize];
}

// ------------------------------------------------------------------ double quantization
float mean_f32(const float* x, int64_t n) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  return static_cast<float>(sum / static_cast<double>(n));
}

void nf4_double_quantize(const float* absmax, int64_t blocks, float offset, uint8_t* absmax_q,
                         float* absmax2) {
  std::vector<float> centered(static_cast<size_t>(blocks));
  for (int64_t i = 0; i < blocks; ++i) centered[static_cast<size_t>(i)] = absmax[i] - offset;
  blockwise8_quantize(centered.data(), blocks, kAbsmaxBlockSize, kDynamicMap, absmax_q, absmax2);
}

void nf4_double_dequantize(const uint8_t* absmax_q, const float* absmax2, const float* map,
                           float offset, int64_t blocks, float* absmax) {
  blockwise8_dequantize(absmax_q, absmax2, blocks, kAbsmaxBlockSize, map, absmax);
  for (int64_t i = 0; i < blocks; ++i) absmax[i] += offset;
}

}  // namespace qlora::quant::ref
