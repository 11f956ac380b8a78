// kernels (label cuda): NF4 quantize, dequantize and the fused dequant-GEMV against the torch-free CPU
// reference (quant/nf4_ref.h), element by element on seeded random ragged shapes; skipped where
// no GPU is visible. The kernels are called through their plain-pointer launchers
// (qlora/kernels.h) with the CUDA runtime alone, so this test needs no CUDA build of torch;
// a QLORA_CUDA=ON build also checks the at::Tensor glue (quant/nf4_cuda.h).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "qlora/kernels.h"
#include "support/cuda_launch.h"
#include "qlora/quant/nf4_ref.h"

#ifdef QLORA_WITH_CUDA
#include <ATen/ATen.h>
#include <torch/cuda.h>
#include <torch/types.h>
#include <torch/utils.h>

#include "qlora/quant/nf4.h"
#include "qlora/quant/nf4_cuda.h"
#endif

namespace qlora {
namespace {

namespace ref = quant::ref;
using kernels::FloatType;

// Dequantization is the same fp32 product and the same round-to-nearest-even as the reference:
// every output must equal it bit for bit.
constexpr int64_t kDequantMismatchesAllowed = 0;

// GEMV: y = sum_k w_k x_k, with w_k the exact fp32 dequantized weight. The kernel sums in fp32
// (FMA) k/32 terms per lane, then a 5-level shuffle tree: by the standard bound for recursive
// summation the fp32 result is within (k/32 + 5) * 2^-24 * sum |w_k x_k| of the exact sum; one
// more rounding into bf16 / fp16 adds half an ulp of the output (2^-8 / 2^-11 relative). The
// exact sum is taken in double (whose own error, ~k * 2^-53, is negligible next to these), and
// kAbsFloor covers fp16's subnormal spacing (2^-24: half of it, plus margin).
constexpr double kF32Unit = 1.0 / (1 << 24);
constexpr double kBf16Unit = 1.0 / (1 << 8);
constexpr double kF16Unit = 1.0 / (1 << 11);
constexpr double kAbsFloor = 1.0 / (1 << 24);
constexpr int kTreeLevels = 5;

// Device memory for one test, freed on scope exit; `pad` extra bytes let a test misalign.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (cudaMalloc(&ptr_, bytes + 16) != cudaSuccess) ptr_ = nullptr;
  }
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <typename T = void>
  T* at(size_t byte_offset = 0) const {
    return reinterpret_cast<T*>(static_cast<char*>(ptr_) + byte_offset);
  }
  bool ok() const { return ptr_ != nullptr; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

template <typename T>
void upload(void* dst, const std::vector<T>& src) {
  ASSERT_EQ(cudaMemcpy(dst, src.data(), src.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
}
template <typename T>
void download(std::vector<T>& dst, const void* src) {
  ASSERT_EQ(cudaMemcpy(dst.data(), src, dst.size() * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
}

// A random weight whose blocks have different magnitudes (so scales vary), quantized with the
// reference, with both forms of the statistics and the expanded fp32 absmax.
struct Nf4Host {
  int64_t n = 0;
  std::vector<uint8_t> packed;
  std::vector<float> absmax;     // plain
  std::vector<uint8_t> absmax_q; // double-quantized
  std::vector<float> absmax2;
  float offset = 0.0f;
  std::vector<float> expanded;   // the double-quantized absmax, expanded (reference)
};

// Normal weights whose blocks of 64 have different magnitudes (so the scales vary).
std::vector<float> blocky_weight(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> scale(0.005f, 0.2f);
  std::vector<float> w(static_cast<size_t>(n));
  float s = scale(rng);
  for (int64_t i = 0; i < n; ++i) {
    if (i % ref::kNf4BlockSize == 0) s = scale(rng);
    w[static_cast<size_t>(i)] = normal(rng) * s;
  }
  return w;
}

Nf4Host make_nf4(int64_t n, uint32_t seed) {
  const std::vector<float> w = blocky_weight(n, seed);
  Nf4Host h;
  h.n = n;
  const int64_t blocks = ref::num_blocks(n, ref::kNf4BlockSize);
  h.packed.resize(static_cast<size_t>(ref::packed_bytes(n)));
  h.absmax.resize(static_cast<size_t>(blocks));
  ref::nf4_quantize(w.data(), n, h.packed.data(), h.absmax.data());
  h.offset = ref::mean_f32(h.absmax.data(), blocks);
  h.absmax_q.resize(static_cast<size_t>(blocks));
  h.absmax2.resize(static_cast<size_t>(ref::num_blocks(blocks, ref::kAbsmaxBlockSize)));
  ref::nf4_double_quantize(h.absmax.data(), blocks, h.offset, h.absmax_q.data(), h.absmax2.data());
  h.expanded.resize(static_cast<size_t>(blocks));
  ref::nf4_double_dequantize(h.absmax_q.data(), h.absmax2.data(), ref::dynamic_map(), h.offset, blocks,
                             h.expanded.data());
  return h;
}

// The NF4 statistics on the device, in either form.
struct Nf4Device {
  DeviceBuffer packed, absmax, absmax_q, absmax2, code2;
  explicit Nf4Device(const Nf4Host& h, size_t packed_offset = 0)
      : packed(h.packed.size() + packed_offset),
        absmax(h.absmax.size() * 4),
        absmax_q(h.absmax_q.size()),
        absmax2(h.absmax2.size() * 4),
        code2(256 * 4),
        packed_offset_(packed_offset) {
    upload(packed.at(packed_offset), h.packed);
    upload(absmax.at(), h.absmax);
    upload(absmax_q.at(), h.absmax_q);
    upload(absmax2.at(), h.absmax2);
    upload(code2.at(), std::vector<float>(ref::dynamic_map(), ref::dynamic_map() + 256));
    offset_ = h.offset;
  }
  const uint8_t* packed_ptr() const { return packed.at<uint8_t>(packed_offset_); }
  kernels::Nf4Scales scales(bool double_quant) const {
    kernels::Nf4Scales s;
    if (double_quant) {
      s.absmax_q = absmax_q.at<uint8_t>();
      s.absmax2 = absmax2.at<float>();
      s.code2 = code2.at<float>();
      s.offset = offset_;
    } else {
      s.absmax = absmax.at<float>();
    }
    return s;
  }

 private:
  size_t packed_offset_;
  float offset_ = 0.0f;
};

size_t type_size(FloatType t) { return t == FloatType::kF32 ? 4 : 2; }
const char* type_name(FloatType t) {
  return t == FloatType::kF32 ? "f32" : t == FloatType::kBF16 ? "bf16" : "f16";
}

// The reference's output bytes for one dtype.
std::vector<uint8_t> reference_dequant(const Nf4Host& h, const std::vector<float>& absmax, FloatType t) {
  std::vector<uint8_t> out(static_cast<size_t>(h.n) * type_size(t));
  switch (t) {
    case FloatType::kF32:
      ref::nf4_dequantize_f32(h.packed.data(), absmax.data(), h.n, reinterpret_cast<float*>(out.data()));
      break;
    case FloatType::kBF16:
      ref::nf4_dequantize_bf16(h.packed.data(), absmax.data(), h.n, reinterpret_cast<uint16_t*>(out.data()));
      break;
    case FloatType::kF16:
      ref::nf4_dequantize_f16(h.packed.data(), absmax.data(), h.n, reinterpret_cast<uint16_t*>(out.data()));
      break;
  }
  return out;
}

// Elements whose bytes differ; prints the first few.
int64_t count_mismatches(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want, size_t elem,
                         const std::string& what) {
  int64_t bad = 0;
  for (size_t i = 0; i < want.size() / elem; ++i) {
    if (std::memcmp(&got[i * elem], &want[i * elem], elem) != 0) {
      if (bad < 5) {
        uint32_t g = 0, w = 0;
        std::memcpy(&g, &got[i * elem], elem);
        std::memcpy(&w, &want[i * elem], elem);
        std::printf("  %s: element %zu got bits 0x%08x, reference 0x%08x\n", what.c_str(), i, g, w);
      }
      ++bad;
    }
  }
  return bad;
}

// Sizes that hit every path: tiny, one element short / over a block, odd (padding nibble),
// several second-level blocks (256 scales), multiples of 32 (all vector) and not (vector + tail).
const int64_t kDequantSizes[] = {1, 2, 31, 63, 64, 65, 1001, 4097, 64 * 256 * 3 + 37, 2048 * 96, 131072 + 31};

TEST(CudaNf4Kernels, DequantizeEqualsReferenceBitForBit) {
  SKIP_WITHOUT_GPU();
  uint32_t seed = 1;
  for (int64_t n : kDequantSizes) {
    const Nf4Host h = make_nf4(n, seed++);
    // 0: the vector kernel; 4: packed 4- but not 16-byte aligned, still the vector kernel;
    // 1: packed not 4-byte aligned -> the scalar kernel for every element.
    for (size_t misalign : {size_t{0}, size_t{4}, size_t{1}}) {
      const Nf4Device d(h, misalign);
      for (bool dq : {false, true}) {
        for (FloatType t : {FloatType::kF32, FloatType::kBF16, FloatType::kF16}) {
          const size_t elem = type_size(t);
          DeviceBuffer out(static_cast<size_t>(n) * elem);
          ASSERT_TRUE(out.ok());
          // Poisoned: an element the kernel skips reads as NaN bits, never as a right value.
          CUDA_OK(cudaMemset(out.at(), 0xFF, static_cast<size_t>(n) * elem));
          CUDA_OK(kernels::nf4_dequantize(d.packed_ptr(), d.scales(dq), n, out.at(), t, nullptr));
          CUDA_OK(cudaDeviceSynchronize());
          std::vector<uint8_t> got(static_cast<size_t>(n) * elem);
          download(got, out.at());
          const auto want = reference_dequant(h, dq ? h.expanded : h.absmax, t);
          const std::string what = "n=" + std::to_string(n) + " " + type_name(t) + (dq ? " dq" : " plain") +
                                   (misalign ? " misaligned" : "");
          EXPECT_LE(count_mismatches(got, want, elem, what), kDequantMismatchesAllowed) << what;
        }
      }
    }
  }
}

// A dtype's bits for a float already representable in it, and back.
uint16_t narrow_bits(float v, FloatType t) {
  return t == FloatType::kBF16 ? ref::float_to_bf16_bits(v) : ref::float_to_f16_bits(v);
}
float widen_bits(uint16_t b, FloatType t) {
  return t == FloatType::kBF16 ? ref::bf16_bits_to_float(b) : ref::f16_bits_to_float(b);
}

struct GemvCase {
  int64_t m, k, n_out;
};

// Vector path (k % 32 == 0) at every row-count bucket, and ragged k (scalar path; odd k starts
// rows mid-byte and blocks mid-row).
const GemvCase kGemvCases[] = {{1, 4096, 72},  {2, 64, 1},    {3, 128, 33},  {4, 2048, 24}, {8, 1056, 40},
                               {16, 256, 40},  {16, 4096, 9}, {5, 100, 17},  {7, 33, 9},    {1, 65, 130},
                               {13, 777, 23},  {11, 4128, 5}};

TEST(CudaNf4Kernels, GemvMatchesDequantizeThenMatmul) {
  SKIP_WITHOUT_GPU();
  uint32_t seed = 100;
  double worst_ratio = 0.0;  // max |err| / tolerance seen
  for (const GemvCase& c : kGemvCases) {
    const Nf4Host h = make_nf4(c.n_out * c.k, seed++);
    const Nf4Device d(h);
    for (bool dq : {true, false}) {
      const std::vector<float>& absmax = dq ? h.expanded : h.absmax;
      std::vector<float> w(static_cast<size_t>(h.n));
      ref::nf4_dequantize_f32(h.packed.data(), absmax.data(), h.n, w.data());
      for (FloatType t : {FloatType::kBF16, FloatType::kF16}) {
        std::mt19937 rng(seed * 7 + static_cast<uint32_t>(t));
        std::normal_distribution<float> normal(0.0f, 1.0f);
        std::vector<uint16_t> x(static_cast<size_t>(c.m * c.k));
        for (auto& v : x) v = narrow_bits(normal(rng), t);
        DeviceBuffer dx(x.size() * 2), dy(static_cast<size_t>(c.m * c.n_out) * 2);
        upload(dx.at(), x);
        CUDA_OK(kernels::nf4_gemv(dx.at(), t, c.m, c.k, d.packed_ptr(), d.scales(dq), c.n_out, dy.at(), nullptr));
        CUDA_OK(cudaDeviceSynchronize());
        std::vector<uint16_t> y(static_cast<size_t>(c.m * c.n_out));
        download(y, dy.at());
        const double unit = t == FloatType::kBF16 ? kBf16Unit : kF16Unit;
        const double terms = static_cast<double>(c.k / 32 + (c.k % 32 != 0) + kTreeLevels);
        int64_t bad = 0;
        for (int64_t r = 0; r < c.m; ++r) {
          for (int64_t o = 0; o < c.n_out; ++o) {
            double exact = 0.0, magnitude = 0.0;
            for (int64_t kk = 0; kk < c.k; ++kk) {
              const double p = static_cast<double>(w[static_cast<size_t>(o * c.k + kk)]) *
                               widen_bits(x[static_cast<size_t>(r * c.k + kk)], t);
              exact += p;
              magnitude += std::fabs(p);
            }
            const double got = widen_bits(y[static_cast<size_t>(r * c.n_out + o)], t);
            const double tol = unit * std::fabs(exact) + (1.0 + unit) * terms * kF32Unit * magnitude + kAbsFloor;
            const double err = std::fabs(got - exact);
            worst_ratio = std::max(worst_ratio, err / tol);
            if (!(err <= tol) && bad++ < 5) {
              std::printf("  m=%lld k=%lld n=%lld %s: y[%lld,%lld] = %.9g, exact %.9g, tol %.3g\n",
                          static_cast<long long>(c.m), static_cast<long long>(c.k), static_cast<long long>(c.n_out),
                          type_name(t), static_cast<long long>(r), static_cast<long long>(o), got, exact, tol);
            }
          }
        }
        EXPECT_EQ(bad, 0) << "m=" << c.m << " k=" << c.k << " n_out=" << c.n_out << " " << type_name(t);
      }
    }
  }
  std::printf("  gemv worst |err| / tolerance = %.3f\n", worst_ratio);
}

TEST(CudaNf4Kernels, LaunchersRejectBadArguments) {
  SKIP_WITHOUT_GPU();
  kernels::Nf4Scales none;  // neither plain nor double-quantized statistics
  uint8_t* p = nullptr;
  ASSERT_EQ(cudaMalloc(&p, 64), cudaSuccess);
  EXPECT_NE(kernels::nf4_dequantize(p, none, 64, p, FloatType::kF32, nullptr), 0);
  EXPECT_NE(kernels::nf4_gemv(p, FloatType::kBF16, kernels::kNf4GemvMaxRows + 1, 32, p, none, 1, p, nullptr), 0);
  EXPECT_EQ(kernels::nf4_dequantize(p, none, 0, p, FloatType::kF32, nullptr), 0) << "n = 0 is a no-op";
  cudaFree(p);
}

// blocky_weight with an all-zero block (absmax 0: every code is the
// zero code) and values exactly on NF4 midpoints of their block (ties take the lower code), as
// fp32 bits; narrowed to bf16 / fp16 by the caller.
std::vector<float> quantize_input(int64_t n, uint32_t seed) {
  std::vector<float> w = blocky_weight(n, seed);
  if (n >= 3 * ref::kNf4BlockSize) {
    for (int64_t i = ref::kNf4BlockSize; i < 2 * ref::kNf4BlockSize; ++i) w[static_cast<size_t>(i)] = 0.0f;
    // Block 2: absmax 1 (one weight is 1.0), and a weight on each midpoint (a + b) / 2.
    const float* code = ref::nf4_code();
    float* b2 = w.data() + 2 * ref::kNf4BlockSize;
    b2[0] = 1.0f;
    for (int j = 0; j < 15; ++j) b2[1 + j] = (code[j] + code[j + 1]) / 2.0f;
  }
  return w;
}

// The kernel (Note [NF4 quantize kernel]) against quant::ref::nf4_quantize on every byte of the
// codes and every absmax, for fp32, bf16 and fp16 inputs (widened exactly, as the CPU path does).
TEST(CudaNf4Kernels, QuantizeEqualsReferenceBitForBit) {
  SKIP_WITHOUT_GPU();
  uint32_t seed = 40;
  for (int64_t n : kDequantSizes) {
    for (FloatType t : {FloatType::kF32, FloatType::kBF16, FloatType::kF16}) {
      SCOPED_TRACE(std::string(type_name(t)) + " n=" + std::to_string(n));
      std::vector<float> w = quantize_input(n, seed++);
      std::vector<uint8_t> bytes(static_cast<size_t>(n) * type_size(t));
      for (int64_t i = 0; i < n; ++i) {  // narrow, then widen back: the reference sees the same values
        float& v = w[static_cast<size_t>(i)];
        if (t == FloatType::kBF16) {
          const uint16_t b = ref::float_to_bf16_bits(v);
          std::memcpy(&bytes[static_cast<size_t>(i) * 2], &b, 2);
          v = ref::bf16_bits_to_float(b);
        } else if (t == FloatType::kF16) {
          const uint16_t b = ref::float_to_f16_bits(v);
          std::memcpy(&bytes[static_cast<size_t>(i) * 2], &b, 2);
          v = ref::f16_bits_to_float(b);
        } else {
          std::memcpy(&bytes[static_cast<size_t>(i) * 4], &v, 4);
        }
      }
      const int64_t blocks = ref::num_blocks(n, ref::kNf4BlockSize);
      std::vector<uint8_t> want_packed(static_cast<size_t>(ref::packed_bytes(n)));
      std::vector<float> want_absmax(static_cast<size_t>(blocks));
      ref::nf4_quantize(w.data(), n, want_packed.data(), want_absmax.data());

      DeviceBuffer x(bytes.size()), packed(want_packed.size()), absmax(want_absmax.size() * 4), bad(8);
      ASSERT_TRUE(x.ok() && packed.ok() && absmax.ok() && bad.ok());
      upload(x.at(), bytes);
      CUDA_OK(cudaMemset(packed.at(), 0xAB, want_packed.size()));  // poison: every byte must be written
      CUDA_OK(cudaMemset(bad.at(), 0, 8));
      CUDA_OK(kernels::nf4_quantize(x.at(), t, n, packed.at<uint8_t>(), absmax.at<float>(),
                                    bad.at<unsigned long long>(), nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      std::vector<uint8_t> got_packed(want_packed.size());
      std::vector<float> got_absmax(want_absmax.size());
      std::vector<unsigned long long> got_bad(1);
      download(got_packed, packed.at());
      download(got_absmax, absmax.at());
      download(got_bad, bad.at());
      EXPECT_EQ(got_bad[0], 0u);
      EXPECT_EQ(count_mismatches(got_packed, want_packed, 1, "packed byte"), 0);
      const std::vector<uint8_t> ga(reinterpret_cast<uint8_t*>(got_absmax.data()),
                                    reinterpret_cast<uint8_t*>(got_absmax.data()) + got_absmax.size() * 4);
      const std::vector<uint8_t> wa(reinterpret_cast<uint8_t*>(want_absmax.data()),
                                    reinterpret_cast<uint8_t*>(want_absmax.data()) + want_absmax.size() * 4);
      EXPECT_EQ(count_mismatches(ga, wa, 4, "absmax"), 0);
    }
  }
}

// inf and NaN weights are counted (the tensor glue refuses them, as the CPU path does).
TEST(CudaNf4Kernels, QuantizeCountsNonFiniteWeights) {
  SKIP_WITHOUT_GPU();
  const int64_t n = 1000;
  std::vector<float> w = quantize_input(n, 7);
  w[3] = std::numeric_limits<float>::infinity();
  w[500] = std::numeric_limits<float>::quiet_NaN();
  w[999] = -std::numeric_limits<float>::infinity();
  DeviceBuffer x(n * 4), packed(ref::packed_bytes(n)), absmax(ref::num_blocks(n, 64) * 4), bad(8);
  upload(x.at(), w);
  CUDA_OK(cudaMemset(bad.at(), 0, 8));
  CUDA_OK(kernels::nf4_quantize(x.at(), FloatType::kF32, n, packed.at<uint8_t>(), absmax.at<float>(),
                                bad.at<unsigned long long>(), nullptr));
  std::vector<unsigned long long> got_bad(1);
  download(got_bad, bad.at());
  EXPECT_EQ(got_bad[0], 3u);
  EXPECT_NE(kernels::nf4_quantize(nullptr, FloatType::kF32, n, packed.at<uint8_t>(), absmax.at<float>(),
                                  bad.at<unsigned long long>(), nullptr),
            0);
}

#ifdef QLORA_WITH_CUDA
// quantize_nf4 on a CUDA weight (the registered kernel + the host double quantization) equals
// quantize_nf4 on the same weight on the CPU, every part of the Nf4Tensor bit for bit.
TEST(CudaNf4Kernels, QuantizeOnTheGpuEqualsTheCpuPath) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  ASSERT_TRUE(quant::register_cuda_kernels());
  if (quant::nf4_device_kernels(c10::DeviceType::CUDA).quantize == nullptr)
    GTEST_SKIP() << "QLORA_GPU_QUANTIZE=0: quantization stays on the CPU path";
  torch::manual_seed(9);
  for (const std::vector<int64_t>& shape : std::vector<std::vector<int64_t>>{{96, 200}, {7, 9}, {2048, 520}, {1001}}) {
    for (at::ScalarType t : {at::kFloat, at::kBFloat16, at::kHalf}) {
      const at::Tensor w = (torch::randn(shape) * 0.05).to(t);
      for (bool dq : {true, false}) {
        SCOPED_TRACE("dtype " + std::string(c10::toString(t)) + " dq=" + std::to_string(dq) + " numel " +
                     std::to_string(w.numel()));
        const quant::Nf4Tensor cpu = quant::quantize_nf4(w, dq);
        const quant::Nf4Tensor gpu = quant::quantize_nf4(w.cuda(), dq);
        ASSERT_TRUE(gpu.packed.is_cuda());
        EXPECT_EQ(gpu.shape, cpu.shape);
        EXPECT_EQ(gpu.dtype, cpu.dtype);
        EXPECT_TRUE(torch::equal(gpu.packed.cpu(), cpu.packed));
        EXPECT_EQ(gpu.absmax.defined(), cpu.absmax.defined());
        if (cpu.absmax.defined()) EXPECT_TRUE(torch::equal(gpu.absmax.cpu(), cpu.absmax));
        if (dq) {
          EXPECT_EQ(std::memcmp(&gpu.offset, &cpu.offset, 4), 0) << gpu.offset << " vs " << cpu.offset;
          EXPECT_TRUE(torch::equal(gpu.absmax_q.cpu(), cpu.absmax_q));
          EXPECT_TRUE(torch::equal(gpu.absmax2.cpu(), cpu.absmax2));
          EXPECT_TRUE(torch::equal(gpu.code2.cpu(), cpu.code2));
        }
      }
    }
  }
  at::Tensor broken = torch::randn({64, 64}).cuda();
  broken.view(-1)[100].fill_(std::numeric_limits<float>::quiet_NaN());
  try {
    (void)quant::quantize_nf4(broken, true);
    FAIL() << "expected a weight holding NaN to be refused";
  } catch (const quant::NonFiniteWeightError& e) {
    EXPECT_NE(std::string(e.what()).find("1 non-finite values"), std::string::npos) << e.what();
  }
}

// The at::Tensor glue: dequantize_nf4 on a CUDA Nf4Tensor goes through the registered kernel and
// equals the CPU path exactly; nf4_gemv_cuda equals the launcher's contract.
TEST(CudaNf4Kernels, TensorGlueEqualsCpuPath) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  ASSERT_TRUE(quant::register_cuda_kernels());
  ASSERT_NE(quant::nf4_device_kernels(c10::DeviceType::CUDA).dequantize, nullptr);
  torch::manual_seed(5);
  const at::Tensor w = torch::randn({96, 200}) * 0.05;
  for (bool dq : {true, false}) {
    const quant::Nf4Tensor q = quant::quantize_nf4(w, dq);
    const quant::Nf4Tensor g = quant::nf4_to(q, at::Device(at::kCUDA, 0));
    for (at::ScalarType t : {at::kFloat, at::kBFloat16, at::kHalf}) {
      const at::Tensor cpu = quant::dequantize_nf4(q, t);
      const at::Tensor gpu = quant::dequantize_nf4(g, t);
      ASSERT_TRUE(gpu.is_cuda());
      EXPECT_TRUE(torch::equal(cpu, gpu.cpu())) << "dq=" << dq << " dtype " << t;
      at::Tensor buffer = at::empty({96, 200}, at::TensorOptions().dtype(t).device(at::kCUDA));
      quant::dequantize_nf4_cuda_into(g, buffer);
      EXPECT_TRUE(torch::equal(cpu, buffer.cpu())) << "into, dq=" << dq << " dtype " << t;
    }
    const at::Tensor x = torch::randn({2, 3, 200}).to(at::kBFloat16);
    const at::Tensor y = quant::nf4_gemv_cuda(x.cuda(), g);
    ASSERT_EQ(y.sizes(), (std::vector<int64_t>{2, 3, 96}));
    const at::Tensor want = at::matmul(x.to(at::kFloat), quant::dequantize_nf4(q, at::kFloat).t());
    const double scale = want.abs().max().item<double>();
    EXPECT_LE((y.cpu().to(at::kFloat) - want).abs().max().item<double>(), 2 * kBf16Unit * scale);
  }
}
#endif

}  // namespace
}  // namespace qlora
