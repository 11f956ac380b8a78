// quant / Linear4bit: forward and input gradient against bitsandbytes' matmul_4bit (golden files
// from scripts/golden/quant.py) and against a dense linear with the dequantized weight; and the
// op's memory contract: no weight gradient, nothing x-dependent saved, the weight dequantized
// again in backward rather than kept.
#include <gtest/gtest.h>
#include <ATen/ATen.h>
#include <torch/cuda.h>
#include <torch/types.h>
#include <torch/csrc/autograd/function.h>
#include <torch/utils.h>

#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "qlora/quant/linear4bit.h"
#include "qlora/quant/nf4.h"

namespace qlora::quant {
namespace {

// Tolerances against bitsandbytes. Both sides run at::linear / at::matmul on the same bits, so on
// the machine that wrote the golden files the results are identical (measured: 0). A different
// CPU may pick another GEMM kernel and sum in another order: fp32 outputs here are O(1) from
// 128-term dot products, so 1e-5 is ~100 fp32 ulps; bf16 rounds the output to 8 bits of mantissa,
// so one bf16 ulp at |y| < 4 is 2^-6 = 0.0156.
constexpr double kF32Atol = 1e-5;
constexpr double kBf16Atol = 0.0157;
// Against the dense reference with the same dequantized weight, on this machine: same kernels.
constexpr double kDenseF32Atol = 1e-6;
constexpr double kDenseBf16Atol = 0.0157;

// ------------------------------------------------------------------ golden reader (see test_quant_nf4)
std::map<std::string, at::Tensor> load_golden(const std::string& prefix) {
  const std::string dir = std::string(QLORA_SOURCE_DIR) + "/tests/data/quant/";
  std::ifstream bin(dir + "quant.bin", std::ios::binary);
  if (!bin) throw std::runtime_error("cannot open " + dir + "quant.bin (run scripts/golden/quant.py)");
  const std::vector<char> blob((std::istreambuf_iterator<char>(bin)), std::istreambuf_iterator<char>());
  const std::map<std::string, at::ScalarType> dtypes = {
      {"f32", at::kFloat}, {"bf16", at::kBFloat16}, {"f16", at::kHalf}, {"u8", at::kByte}};
  std::map<std::string, at::Tensor> out;
  std::ifstream index(dir + "index.txt");
  std::string line;
  while (std::getline(index, line)) {
    if (line.empty() || line[0] == '#' || line.rfind(prefix, 0) != 0) continue;
    std::istringstream ss(line);
    std::string name, dtype;
    size_t offset = 0, nbytes = 0;
    ss >> name >> dtype >> offset >> nbytes;
    std::vector<int64_t> shape;
    int64_t d;
    while (ss >> d) shape.push_back(d);
    at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtypes.at(dtype)));
    if (static_cast<size_t>(t.nbytes()) != nbytes || offset + nbytes > blob.size()) {
      throw std::runtime_error("bad golden entry " + name);
    }
    std::memcpy(t.data_ptr(), blob.data() + offset, nbytes);
    out[name.substr(prefix.size())] = t;
  }
  if (out.empty()) throw std::runtime_error("no golden arrays named " + prefix + "*");
  return out;
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}
double max_rel_diff(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor bd = b.to(at::kDouble);
  return ((a.to(at::kDouble) - bd).abs() / bd.abs().clamp_min(1e-3)).max().item<double>();
}
bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() &&
         std::memcmp(a.contiguous().data_ptr(), b.contiguous().data_ptr(), a.nbytes()) == 0;
}

struct Case {
  const char* name;
  at::ScalarType dtype;
  double atol, dense_atol;
};
const Case kCases[] = {{"f32", at::kFloat, kF32Atol, kDenseF32Atol},
                       {"bf16", at::kBFloat16, kBf16Atol, kDenseBf16Atol}};

TEST(Linear4bit, ForwardAndInputGradientMatchBitsandbytes) {
  for (const Case& c : kCases) {
    SCOPED_TRACE(c.name);
    auto g = load_golden(std::string("linear4bit.") + c.name + ".");
    const Nf4Tensor w = quantize_nf4(g["w"], /*double_quant=*/true);
    // The weight the op multiplies with is bitsandbytes' dequantized weight, bit for bit.
    EXPECT_TRUE(same_bits(dequantize_nf4(w, c.dtype), g["w_deq"]));

    const at::Tensor x = g["x"].clone().requires_grad_(true);
    const at::Tensor y = linear4bit(x, w, c.dtype);
    ASSERT_EQ(y.scalar_type(), c.dtype);
    ASSERT_EQ(y.sizes(), g["out"].sizes());
    y.backward(g["grad_out"]);
    const double fwd_abs = max_abs_diff(y.detach(), g["out"]);
    const double bwd_abs = max_abs_diff(x.grad(), g["grad_x"]);
    std::cout << "[ measured ] " << c.name << " vs bitsandbytes: out max|d| " << fwd_abs << " (rel "
              << max_rel_diff(y.detach(), g["out"]) << ", bit-identical "
              << same_bits(y.detach(), g["out"]) << "), grad_x max|d| " << bwd_abs << " (rel "
              << max_rel_diff(x.grad(), g["grad_x"]) << ", bit-identical "
              << same_bits(x.grad(), g["grad_x"]) << ")\n";
    EXPECT_LE(fwd_abs, c.atol);
    EXPECT_LE(bwd_abs, c.atol);
  }
}

TEST(Linear4bit, GradientsEqualADenseLinearWithTheDequantizedWeight) {
  at::manual_seed(11);
  for (const Case& c : kCases) {
    SCOPED_TRACE(c.name);
    const Nf4Tensor w = quantize_nf4(at::randn({80, 192}) * 0.05, true);
    const at::Tensor x0 = at::randn({2, 5, 192}).to(c.dtype);
    const at::Tensor grad = at::randn({2, 5, 80}).to(c.dtype);

    const at::Tensor x = x0.clone().requires_grad_(true);
    linear4bit(x, w, c.dtype).backward(grad);

    const at::Tensor dense_w = dequantize_nf4(w, c.dtype);  // requires_grad false: frozen
    const at::Tensor xd = x0.clone().requires_grad_(true);
    const at::Tensor yd = at::linear(xd, dense_w);
    yd.backward(grad);

    const at::Tensor y = linear4bit(x0, w, c.dtype);
    const double fwd = max_abs_diff(y, yd.detach());
    const double bwd = max_abs_diff(x.grad(), xd.grad());
    std::cout << "[ measured ] " << c.name << " vs dense: out max|d| " << fwd << ", grad_x max|d| " << bwd
              << "\n";
    EXPECT_LE(fwd, c.dense_atol);
    EXPECT_LE(bwd, c.dense_atol);
  }
}

TEST(Linear4bit, KeepsNoDequantizedWeightAndNoInput) {
  at::manual_seed(12);
  const Nf4Tensor w = quantize_nf4(at::randn({16, 64}), true);
  const at::Tensor x = at::randn({3, 64}).requires_grad_(true);

  const uint64_t before = nf4_dequantize_calls();
  const at::Tensor y = linear4bit(x, w, at::kFloat);
  EXPECT_EQ(nf4_dequantize_calls(), before + 1) << "forward dequantizes once";

  // Only x has a gradient edge: the NF4 parts are not autograd inputs, so no weight gradient.
  ASSERT_NE(y.grad_fn(), nullptr);
  int edges = 0;
  for (const auto& e : y.grad_fn()->next_edges()) edges += e.is_valid() ? 1 : 0;
  EXPECT_EQ(edges, 1);
  for (const at::Tensor* t : {&w.packed, &w.absmax_q, &w.absmax2, &w.code2}) EXPECT_FALSE(t->requires_grad());

  // x is not saved: changing it in place after forward is allowed (a saved x would make
  // backward fail its version check) and does not change dL/dx = grad · W.
  const at::Tensor grad = at::randn({3, 16});
  {
    at::NoGradGuard no_grad;
    x.mul_(2.0);
  }
  y.backward(grad);
  EXPECT_EQ(nf4_dequantize_calls(), before + 2) << "backward dequantizes again";
  EXPECT_TRUE(at::allclose(x.grad(), at::matmul(grad, dequantize_nf4(w, at::kFloat)), 0, 0));
}

TEST(Linear4bit, CastsTheInputAndSendsTheGradientBackInItsDtype) {
  at::manual_seed(13);
  const Nf4Tensor w = quantize_nf4(at::randn({8, 64}).to(at::kBFloat16), true);
  const at::Tensor x = at::randn({4, 64}).requires_grad_(true);  // fp32 activations
  const at::Tensor y = linear4bit(x, w, at::kBFloat16);
  EXPECT_EQ(y.scalar_type(), at::kBFloat16);
  y.sum().backward();
  EXPECT_EQ(x.grad().scalar_type(), at::kFloat);
  // Without requires_grad nothing is recorded.
  EXPECT_FALSE(linear4bit(at::randn({4, 64}), w, at::kFloat).requires_grad());
}

TEST(Linear4bit, RejectsBadArguments) {
  const Nf4Tensor w = quantize_nf4(at::randn({8, 64}), true);
  EXPECT_THROW(linear4bit(at::randn({4, 32}), w, at::kFloat), c10::Error);  // wrong in-features
  EXPECT_THROW(linear4bit(at::randn({4, 64}), w, at::kInt), c10::Error);
  const Nf4Tensor w3 = quantize_nf4(at::randn({2, 8, 64}), true);
  EXPECT_THROW(linear4bit(at::randn({4, 64}), w3, at::kFloat), c10::Error);  // not 2-D
}

}  // namespace
}  // namespace qlora::quant
