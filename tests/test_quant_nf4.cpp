// quant / NF4: our bytes and values against bitsandbytes 0.50.2's (golden files written by
// scripts/golden/quant.py into tests/data/quant/). Everything here is compared BIT FOR BIT:
// packed codes, absmax, the double-quantized parts, and the dequantized weights in fp32, bf16 and
// fp16 — for the byte-level reference (quant/nf4_ref.h), the at::Tensor API (quant/nf4.h) and its
// generic torch-op path. Quantization error itself is measured separately, against the format's
// own bound.
#include <gtest/gtest.h>
#include <ATen/ATen.h>
#include <torch/cuda.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <limits>
#include <vector>

#include "qlora/quant/nf4.h"
#include "qlora/quant/nf4_ref.h"

namespace qlora::quant {
namespace {

// The only tolerance in this file: the offset (mean of the absmax values) from our torch-free
// mean_f32 (double sum) may differ from torch.mean's fp32 sum in the last bits (measured: 2 ulp
// at most over the golden tensors, up to 301 values); the at::Tensor API uses at::mean and
// must match exactly.
constexpr int64_t kMeanMaxUlps = 4;

// ------------------------------------------------------------------ golden reader
// index.txt: `name dtype offset nbytes dim...` per line; quant.bin: the bytes back to back.
class Golden {
 public:
  static const Golden& get() {
    static const Golden g;
    return g;
  }
  at::Tensor operator[](const std::string& name) const {
    auto it = entries_.find(name);
    if (it == entries_.end()) throw std::runtime_error("golden array missing: " + name);
    const Entry& e = it->second;
    at::Tensor t = at::empty(e.shape, at::TensorOptions().dtype(e.dtype));
    if (static_cast<size_t>(t.nbytes()) != e.nbytes) throw std::runtime_error("bad size: " + name);
    std::memcpy(t.data_ptr(), blob_.data() + e.offset, e.nbytes);
    return t;
  }
  bool has(const std::string& name) const { return entries_.count(name) != 0; }
  std::vector<std::string> cases() const {  // "n64.f32", ... : every name with an .input
    std::vector<std::string> out;
    for (const auto& [name, e] : entries_) {
      const std::string suffix = ".input";
      if (name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0 &&
          name.rfind("linear4bit", 0) != 0) {
        out.push_back(name.substr(0, name.size() - suffix.size()));
      }
    }
    return out;
  }

 private:
  struct Entry {
    at::ScalarType dtype;
    size_t offset, nbytes;
    std::vector<int64_t> shape;
  };
  Golden() {
    const std::string dir = std::string(QLORA_SOURCE_DIR) + "/tests/data/quant/";
    std::ifstream bin(dir + "quant.bin", std::ios::binary);
    if (!bin) throw std::runtime_error("cannot open " + dir + "quant.bin (run scripts/golden/quant.py)");
    blob_.assign(std::istreambuf_iterator<char>(bin), std::istreambuf_iterator<char>());
    std::ifstream index(dir + "index.txt");
    const std::map<std::string, at::ScalarType> dtypes = {{"f32", at::kFloat}, {"bf16", at::kBFloat16},
                                                          {"f16", at::kHalf},  {"u8", at::kByte},
                                                          {"i64", at::kLong}};
    std::string line;
    while (std::getline(index, line)) {
      if (line.empty() || line[0] == '#') continue;
      std::istringstream ss(line);
      std::string name, dtype;
      Entry e{};
      ss >> name >> dtype >> e.offset >> e.nbytes;
      int64_t d;
      while (ss >> d) e.shape.push_back(d);
      e.dtype = dtypes.at(dtype);
      if (e.offset + e.nbytes > blob_.size()) throw std::runtime_error("index past quant.bin: " + name);
      entries_[name] = e;
    }
  }
  std::vector<char> blob_;
  std::map<std::string, Entry> entries_;
};

// ------------------------------------------------------------------ comparisons
// Bitwise equality of two tensors of one dtype; on failure, the first mismatches and their count.
::testing::AssertionResult bits_equal(const at::Tensor& got_in, const at::Tensor& want_in) {
  const at::Tensor got = got_in.contiguous().cpu();
  const at::Tensor want = want_in.contiguous().cpu();
  if (got.scalar_type() != want.scalar_type()) {
    return ::testing::AssertionFailure() << "dtype " << got.scalar_type() << " vs " << want.scalar_type();
  }
  if (got.numel() != want.numel()) {
    return ::testing::AssertionFailure() << "numel " << got.numel() << " vs " << want.numel();
  }
  const size_t es = got.element_size();
  const auto* a = static_cast<const uint8_t*>(got.data_ptr());
  const auto* b = static_cast<const uint8_t*>(want.data_ptr());
  int64_t bad = 0;
  std::ostringstream first;
  for (int64_t i = 0; i < got.numel(); ++i) {
    if (std::memcmp(a + i * es, b + i * es, es) != 0) {
      if (bad < 5) {
        first << "\n  [" << i << "] got " << got.reshape(-1)[i].item().toDouble() << " want "
              << want.reshape(-1)[i].item().toDouble();
      }
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << got.numel() << " elements differ" << first.str();
}

at::Tensor u8_tensor(const std::vector<uint8_t>& v) {
  return at::from_blob(const_cast<uint8_t*>(v.data()), {static_cast<int64_t>(v.size())}, at::kByte).clone();
}
at::Tensor f32_tensor(const std::vector<float>& v) {
  return at::from_blob(const_cast<float*>(v.data()), {static_cast<int64_t>(v.size())}, at::kFloat).clone();
}

int64_t ulps_apart(float a, float b) {
  int32_t ia, ib;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  if ((ia < 0) != (ib < 0)) return a == b ? 0 : INT32_MAX;
  return std::abs(static_cast<int64_t>(ia) - static_cast<int64_t>(ib));
}

const std::vector<std::pair<std::string, at::ScalarType>> kOutDtypes = {
    {"f32", at::kFloat}, {"bf16", at::kBFloat16}, {"f16", at::kHalf}};

// ------------------------------------------------------------------ tables
TEST(Nf4Tables, CodeTablesEqualBitsandbytes) {
  const Golden& g = Golden::get();
  EXPECT_TRUE(bits_equal(f32_tensor({ref::nf4_code(), ref::nf4_code() + 16}), g["nf4_code"]));
  EXPECT_TRUE(bits_equal(f32_tensor({ref::dynamic_map(), ref::dynamic_map() + 256}), g["dynamic_map"]));
}

TEST(Nf4Tables, GoldenCoversTheCasesThatMatter) {
  // Ragged sizes, 2-D shapes, > 256 blocks with a partial second-level block, midpoint ties,
  // and all three input dtypes.
  const std::vector<std::string> cases = Golden::get().cases();
  EXPECT_GE(cases.size(), 17u);
  const at::Tensor big = Golden::get()["n19217.bf16.absmax_q"];
  EXPECT_GT(big.numel(), 256);
  EXPECT_NE(big.numel() % 256, 0);
}

// ------------------------------------------------------------------ byte-level reference
TEST(Nf4Reference, BytesAbsmaxAndNestedPartsEqualBitsandbytes) {
  const Golden& g = Golden::get();
  int64_t worst_mean_ulps = 0;
  for (const std::string& c : g.cases()) {
    SCOPED_TRACE(c);
    const at::Tensor x = g[c + ".input"].to(at::kFloat).contiguous();
    const int64_t n = x.numel();
    const int64_t blocks = ref::num_blocks(n, ref::kNf4BlockSize);

    std::vector<uint8_t> packed(ref::packed_bytes(n));
    std::vector<float> absmax(blocks);
    ref::nf4_quantize(x.data_ptr<float>(), n, packed.data(), absmax.data());
    EXPECT_TRUE(bits_equal(u8_tensor(packed), g[c + ".packed"]));
    EXPECT_TRUE(bits_equal(f32_tensor(absmax), g[c + ".absmax"]));

    // Second level, with bitsandbytes' own offset so the bytes can be compared exactly.
    const float offset = g[c + ".offset"].item<float>();
    worst_mean_ulps = std::max(worst_mean_ulps, ulps_apart(ref::mean_f32(absmax.data(), blocks), offset));
    std::vector<uint8_t> absmax_q(blocks);
    std::vector<float> absmax2(ref::num_blocks(blocks, ref::kAbsmaxBlockSize));
    ref::nf4_double_quantize(absmax.data(), blocks, offset, absmax_q.data(), absmax2.data());
    EXPECT_TRUE(bits_equal(u8_tensor(absmax_q), g[c + ".absmax_q"]));
    EXPECT_TRUE(bits_equal(f32_tensor(absmax2), g[c + ".absmax2"]));

    std::vector<float> absmax_deq(blocks);
    ref::nf4_double_dequantize(absmax_q.data(), absmax2.data(), ref::dynamic_map(), offset, blocks,
                               absmax_deq.data());
    EXPECT_TRUE(bits_equal(f32_tensor(absmax_deq), g[c + ".absmax_deq"]));

    // Dequantization: plain absmax in fp32; expanded absmax in every dtype the golden has.
    std::vector<float> out(n);
    ref::nf4_dequantize_f32(packed.data(), absmax.data(), n, out.data());
    EXPECT_TRUE(bits_equal(f32_tensor(out).reshape(x.sizes()), g[c + ".deq_plain.f32"]));
    for (const auto& [name, dtype] : kOutDtypes) {
      const std::string key = c + ".deq_nested." + name;
      if (!g.has(key)) continue;
      at::Tensor got = at::empty(x.sizes(), at::TensorOptions().dtype(dtype));
      if (dtype == at::kFloat) {
        ref::nf4_dequantize_f32(packed.data(), absmax_deq.data(), n, got.data_ptr<float>());
      } else if (dtype == at::kBFloat16) {
        ref::nf4_dequantize_bf16(packed.data(), absmax_deq.data(), n,
                                 reinterpret_cast<uint16_t*>(got.data_ptr<at::BFloat16>()));
      } else {
        ref::nf4_dequantize_f16(packed.data(), absmax_deq.data(), n,
                                reinterpret_cast<uint16_t*>(got.data_ptr<at::Half>()));
      }
      EXPECT_TRUE(bits_equal(got, g[key])) << key;
    }
  }
  std::cout << "[ measured ] mean_f32 vs torch.mean offset: worst " << worst_mean_ulps << " ulp\n";
  EXPECT_LE(worst_mean_ulps, kMeanMaxUlps);
}

TEST(Nf4Reference, TiesTakeTheLowerCodeAndOddCountsPadWithZeroCode) {
  const float* code = ref::nf4_code();
  for (int j = 0; j < 15; ++j) {
    const float mid = (code[j] + code[j + 1]) / 2.0f;
    EXPECT_EQ(ref::nf4_nearest_code(mid), j) << "midpoint " << j;
    EXPECT_EQ(ref::nf4_nearest_code(std::nextafter(mid, 2.0f)), j + 1) << "just above midpoint " << j;
  }
  const float x[3] = {0.5f, -1.0f, 0.25f};
  uint8_t packed[2];
  float absmax[1];
  ref::nf4_quantize(x, 3, packed, absmax);
  EXPECT_EQ(packed[0] >> 4, ref::nf4_nearest_code(0.5f));  // element 0: high nibble
  EXPECT_EQ(packed[0] & 0x0F, 0);                           // element 1 (-1.0): low nibble
  EXPECT_EQ(packed[1] & 0x0F, ref::kNf4ZeroCode);           // padding
}

// A full block (the vectorized path: multiply by 1 / absmax) and the short last block (divide)
// agree with the code-by-code rule on every midpoint, just above it and just below it: with
// absmax 1 both scalings are exact, so each weight reaches the midpoint test as written.
TEST(Nf4Reference, FullAndShortBlocksGiveEveryWeightItsNearestCode) {
  const float* code = ref::nf4_code();
  std::vector<float> x;
  for (int j = 0; j < 15; ++j) {
    const float mid = (code[j] + code[j + 1]) / 2.0f;
    x.insert(x.end(), {mid, std::nextafter(mid, 2.0f), std::nextafter(mid, -2.0f)});
  }
  x.push_back(1.0f);  // absmax 1
  x.resize(64, -1.0f);
  const std::vector<float> block = x;
  x.insert(x.end(), block.begin(), block.begin() + 47);  // a second, short block of 47
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<uint8_t> packed(static_cast<size_t>(ref::packed_bytes(n)));
  std::vector<float> absmax(2);
  ref::nf4_quantize(x.data(), n, packed.data(), absmax.data());
  EXPECT_EQ(absmax[0], 1.0f);
  EXPECT_EQ(absmax[1], 1.0f);
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t byte = packed[static_cast<size_t>(i / 2)];
    const int got = i % 2 == 0 ? byte >> 4 : byte & 0x0F;
    EXPECT_EQ(got, ref::nf4_nearest_code(x[static_cast<size_t>(i)])) << "element " << i << " = " << x[static_cast<size_t>(i)];
  }
  EXPECT_EQ(packed.back() & 0x0F, ref::kNf4ZeroCode);  // 111 elements: the padding nibble
}

TEST(Nf4Reference, NarrowingMatchesTorch) {
  // Random values over many binades, halfway cases, subnormals, overflow to inf.
  at::manual_seed(7);
  at::Tensor v = at::cat({at::randn({20000}) * at::pow(2.0, at::randint(-30, 17, {20000}).to(at::kFloat)),
                          at::tensor({0.0f, -0.0f, 65504.0f, 65519.0f, 65520.0f, 1e-8f, -3e-5f, 6.1e-5f,
                                      1.0f + 1.0f / 2048.0f, 1.0f + 3.0f / 2048.0f, 1.0f + 1.0f / 256.0f,
                                      1.0f + 3.0f / 256.0f, 3e38f, -3e38f})});
  const int64_t n = v.numel();
  at::Tensor bf = at::empty({n}, at::kBFloat16), hf = at::empty({n}, at::kHalf);
  for (int64_t i = 0; i < n; ++i) {
    const float f = v.data_ptr<float>()[i];
    reinterpret_cast<uint16_t*>(bf.data_ptr<at::BFloat16>())[i] = ref::float_to_bf16_bits(f);
    reinterpret_cast<uint16_t*>(hf.data_ptr<at::Half>())[i] = ref::float_to_f16_bits(f);
  }
  EXPECT_TRUE(bits_equal(bf, v.to(at::kBFloat16)));
  EXPECT_TRUE(bits_equal(hf, v.to(at::kHalf)));
  // And back: widening is exact.
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t hb = reinterpret_cast<uint16_t*>(hf.data_ptr<at::Half>())[i];
    const uint16_t bb = reinterpret_cast<uint16_t*>(bf.data_ptr<at::BFloat16>())[i];
    ASSERT_EQ(ref::f16_bits_to_float(hb), static_cast<float>(hf.data_ptr<at::Half>()[i])) << i;
    ASSERT_EQ(ref::bf16_bits_to_float(bb), static_cast<float>(bf.data_ptr<at::BFloat16>()[i])) << i;
  }
}

// ------------------------------------------------------------------ at::Tensor API
TEST(Nf4Tensor, QuantizeEqualsBitsandbytesForEveryGoldenTensor) {
  const Golden& g = Golden::get();
  for (const std::string& c : g.cases()) {
    SCOPED_TRACE(c);
    const at::Tensor x = g[c + ".input"];
    const Nf4Tensor plain = quantize_nf4(x, /*double_quant=*/false);
    EXPECT_FALSE(plain.double_quant());
    EXPECT_EQ(plain.shape, x.sizes().vec());
    EXPECT_EQ(plain.dtype, x.scalar_type());
    EXPECT_TRUE(bits_equal(plain.packed, g[c + ".packed"]));
    EXPECT_TRUE(bits_equal(plain.absmax, g[c + ".absmax"]));

    const Nf4Tensor dq = quantize_nf4(x, /*double_quant=*/true);
    ASSERT_TRUE(dq.double_quant());
    EXPECT_TRUE(bits_equal(dq.packed, g[c + ".packed"]));
    EXPECT_TRUE(bits_equal(dq.absmax_q, g[c + ".absmax_q"]));
    EXPECT_TRUE(bits_equal(dq.absmax2, g[c + ".absmax2"]));
    EXPECT_TRUE(bits_equal(dq.code2, g["dynamic_map"]));
    EXPECT_TRUE(bits_equal(at::tensor({dq.offset}), g[c + ".offset"]));
    EXPECT_TRUE(bits_equal(nf4_block_absmax(dq), g[c + ".absmax_deq"]));
    EXPECT_TRUE(bits_equal(nf4_block_absmax_torch_ops(dq), g[c + ".absmax_deq"]));
  }
}

TEST(Nf4Tensor, DequantizeEqualsBitsandbytesInEveryDtype) {
  const Golden& g = Golden::get();
  int64_t compared = 0;
  for (const std::string& c : g.cases()) {
    SCOPED_TRACE(c);
    const at::Tensor x = g[c + ".input"];
    const Nf4Tensor plain = quantize_nf4(x, false);
    EXPECT_TRUE(bits_equal(dequantize_nf4(plain, at::kFloat), g[c + ".deq_plain.f32"]));
    EXPECT_TRUE(bits_equal(dequantize_nf4_torch_ops(plain, at::kFloat), g[c + ".deq_plain.f32"]));
    const Nf4Tensor dq = quantize_nf4(x, true);
    for (const auto& [name, dtype] : kOutDtypes) {
      const std::string key = c + ".deq_nested." + name;
      if (!g.has(key)) continue;
      const at::Tensor want = g[key];
      const at::Tensor got = dequantize_nf4(dq, dtype);
      EXPECT_EQ(got.sizes(), want.sizes()) << key;
      EXPECT_TRUE(bits_equal(got, want)) << key;
      EXPECT_TRUE(bits_equal(dequantize_nf4_torch_ops(dq, dtype), want)) << key << " (torch ops)";
      ++compared;
    }
  }
  EXPECT_GE(compared, 45);
}

TEST(Nf4Tensor, ParallelCpuPathEqualsOneReferenceCall) {
  // More blocks than one CPU task takes (4,096), an odd count of elements: the chunked
  // at::Tensor path must give the bytes of one sequential reference call.
  at::set_num_threads(2);
  at::manual_seed(5);
  const at::Tensor w = (at::randn({2049, 129}) * 0.03).to(at::kBFloat16);
  const at::Tensor wf = w.to(at::kFloat).contiguous();
  const int64_t n = w.numel();
  std::vector<uint8_t> packed(ref::packed_bytes(n));
  std::vector<float> absmax(ref::num_blocks(n, 64));
  ref::nf4_quantize(wf.data_ptr<float>(), n, packed.data(), absmax.data());
  const Nf4Tensor q = quantize_nf4(w, false);
  EXPECT_TRUE(bits_equal(q.packed, u8_tensor(packed)));
  EXPECT_TRUE(bits_equal(q.absmax, f32_tensor(absmax)));
  at::Tensor want = at::empty({n}, at::kBFloat16);
  ref::nf4_dequantize_bf16(packed.data(), absmax.data(), n,
                           reinterpret_cast<uint16_t*>(want.data_ptr<at::BFloat16>()));
  EXPECT_TRUE(bits_equal(dequantize_nf4(q, at::kBFloat16), want.reshape({2049, 129})));
  EXPECT_TRUE(bits_equal(dequantize_nf4_torch_ops(quantize_nf4(w, true), at::kBFloat16),
                         dequantize_nf4(quantize_nf4(w, true), at::kBFloat16)));
}

TEST(Nf4Tensor, QuantizationErrorWithinHalfTheWidestCodeGap) {
  // Independent of bitsandbytes: |x - deq(x)| <= absmax_block * (widest gap between codes) / 2,
  // plus the rounding of the scale (a few fp32 ulps of the block's absmax).
  const float* code = ref::nf4_code();
  float widest = 0.0f;
  for (int j = 0; j < 15; ++j) widest = std::max(widest, code[j + 1] - code[j]);
  at::manual_seed(3);
  const at::Tensor w = at::randn({37, 129}) * 0.02;
  const Nf4Tensor q = quantize_nf4(w, false);
  const at::Tensor err = (dequantize_nf4(q, at::kFloat) - w).abs().reshape(-1);
  const at::Tensor scale = q.absmax.repeat_interleave(64).narrow(0, 0, w.numel());
  const at::Tensor excess = err - scale * (widest / 2 + 1e-6f);
  EXPECT_LE(excess.max().item<float>(), 0.0f);
  std::cout << "[ measured ] NF4 round-trip max |err|/absmax = " << (err / scale).max().item<float>()
            << " (bound " << widest / 2 << ")\n";
}

TEST(Nf4Tensor, RejectsWhatItCannotQuantize) {
  EXPECT_THROW(quantize_nf4(at::ones({4, 4}, at::kInt)), c10::Error);
  EXPECT_THROW(quantize_nf4(at::empty({0}, at::kFloat)), c10::Error);
  at::Tensor nan = at::randn({4, 64});
  nan[2][3] = std::nanf("");
  EXPECT_THROW(quantize_nf4(nan), NonFiniteWeightError);
  // Counted across the parallel chunks (4,096 blocks each): an inf in the first, a NaN in the third.
  at::Tensor broken_weight = at::randn({600, 1000});
  broken_weight.view(-1)[0].fill_(std::numeric_limits<float>::infinity());
  broken_weight.view(-1)[550000].fill_(std::nanf(""));
  try {
    (void)quantize_nf4(broken_weight, true);
    FAIL() << "expected the weight to be refused";
  } catch (const NonFiniteWeightError& e) {
    EXPECT_EQ(e.count(), 2);
    EXPECT_NE(std::string(e.what()).find("holds 2 non-finite values"), std::string::npos) << e.what();
  }
  const Nf4Tensor q = quantize_nf4(at::randn({8, 8}), true);
  EXPECT_THROW(dequantize_nf4(q, at::kLong), c10::Error);
  Nf4Tensor broken = q;
  broken.shape = {8, 10};  // packed no longer matches the shape
  EXPECT_THROW(dequantize_nf4(broken, at::kFloat), c10::Error);
  EXPECT_EQ(q.nbytes(), 32 + 1 + 4 + 256 * 4);
}

TEST(Nf4Tensor, DeviceKernelsCanBeRegistered) {
  // CPU only here: registration round-trips and leaves the CPU path alone.
  EXPECT_EQ(nf4_device_kernels(c10::DeviceType::CUDA).dequantize, nullptr);
  Nf4DeviceKernels k;
  k.dequantize = [](const Nf4Tensor&, const at::Tensor&, at::Tensor& out) { out.fill_(0); };
  set_nf4_device_kernels(c10::DeviceType::CUDA, k);
  EXPECT_EQ(nf4_device_kernels(c10::DeviceType::CUDA).dequantize, k.dequantize);
  set_nf4_device_kernels(c10::DeviceType::CUDA, Nf4DeviceKernels{});
  EXPECT_EQ(nf4_device_kernels(c10::DeviceType::CUDA).dequantize, nullptr);
}

}  // namespace
}  // namespace qlora::quant
