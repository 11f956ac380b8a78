// kernels/dropout.cu (label cuda), through model/fused_ops.h on CUDA tensors: LoRA dropout
// against its CPU reference bit for bit (every dtype, one to three copies, ragged sizes,
// unaligned operands, offsets past 2^32), its draws from the device generator, SwiGLU with
// dropout in one pass against the two calls, its backward
// (one bool-mask term against the ATen ops it replaces, up to three bit-mask terms against one
// call a term) and lora_dropout_autograd's gradient. Skipped where torch sees no CUDA device.
#include <gtest/gtest.h>
#include <ATen/ATen.h>
#include <torch/cuda.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <string>
#include <vector>

#include "qlora/model/fused_ops.h"

namespace qlora {
namespace {

// ---------------------------------------------------------------- LoRA dropout backward

// model::dropout_backward_add on CUDA tensors (the kernel for bf16 / fp16) against the three
// ATen ops it replaces, run on the same CUDA tensors, and against its definition computed on
// the CPU in fp32 (round(d · float(scale)) where kept, then round(acc + that)): bit for bit,
// since each step rounds once in the same order. (ATen's CPU ops are no oracle here: their
// bf16 / fp16 multiply by a scalar rounds differently, by an ulp, seen on an H200's host.)
// Ragged sizes (n % 8 != 0 takes the scalar kernel for all), an operand off 16-byte alignment
// (scalar kernel), with and without a sum to add into.
TEST(CudaFusedOps, DropoutBackwardAddEqualsTheCudaAtenOpsBitForBit) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "torch sees no CUDA device (or this is a CPU build of torch)";
  torch::manual_seed(16);
  const at::Device cuda(at::kCUDA, 0);
  const double p = 0.1, scale = 1.0 / (1.0 - p);
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
    for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{8}, int64_t{1000}, int64_t{64 * 2048}, int64_t{3 * 4096 + 5}}) {
      for (int64_t offset : {int64_t{0}, int64_t{1}}) {  // 1: d and acc off 16-byte alignment
        for (bool with_acc : {false, true}) {
          const std::string what = std::string(c10::toString(dtype)) + " n=" + std::to_string(n) +
                                   " offset=" + std::to_string(offset) + (with_acc ? " acc" : " no acc");
          const at::Tensor d = (at::randn({n + offset}) * 3).to(dtype);
          const at::Tensor acc = at::randn({n + offset}).to(dtype);
          const at::Tensor mask = at::rand({n}) > p;
          const at::Tensor dd = d.to(cuda), ad = acc.to(cuda), md = mask.to(cuda);
          const at::Tensor want_cuda = model::dropout_backward_add_reference(
              with_acc ? ad.clone().narrow(0, offset, n) : at::Tensor(), dd.clone().narrow(0, offset, n), md, scale);
          at::Tensor got = model::dropout_backward_add(with_acc ? ad.narrow(0, offset, n) : at::Tensor(),
                                                       dd.narrow(0, offset, n), md, scale);
          // Where the result went: into acc, or in place on d.
          const at::Tensor target = with_acc ? ad.narrow(0, offset, n) : dd.narrow(0, offset, n);
          EXPECT_EQ(got.data_ptr(), target.data_ptr()) << what << ": the result is not in place";
          EXPECT_TRUE(at::equal(got.cpu(), want_cuda.cpu())) << what << ": differs from ATen's CUDA ops";
          const at::Tensor kept =
              (d.narrow(0, offset, n).to(at::kFloat) * static_cast<float>(scale)).to(dtype).to(at::kFloat);
          const at::Tensor v = at::where(mask, kept, at::zeros_like(kept));
          const at::Tensor want_def =
              (with_acc ? acc.narrow(0, offset, n).to(at::kFloat) + v : v).to(dtype);
          const at::Tensor diff = (got.cpu().to(at::kFloat) - want_def.to(at::kFloat)).abs();
          EXPECT_TRUE(at::equal(got.cpu(), want_def))
              << what << ": differs from the definition, max |diff| " << diff.max().item<double>();
        }
      }
    }
  }
}

// ---------------------------------------------------------------- LoRA dropout

// model::lora_dropout (the kernel) against its CPU reference, bit for bit: every dtype, one to
// three copies, sizes off the 8-element groups (the last group partial), x off 16-byte
// alignment (the scalar kernel), offsets past 2^32 (the counter's high word).
TEST(CudaFusedOps, LoraDropoutEqualsTheReferenceBitForBit) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "torch sees no CUDA device (or this is a CPU build of torch)";
  torch::manual_seed(21);
  const at::Device cuda(at::kCUDA, 0);
  const uint64_t seed = 0x9e3779b97f4a7c15ULL;
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{8}, int64_t{1000}, int64_t{3 * 4096 + 5}, int64_t{64 * 2048}}) {
      for (int64_t offset : {int64_t{0}, int64_t{1}}) {
        for (const std::vector<uint64_t>& offsets :
             {std::vector<uint64_t>{4}, std::vector<uint64_t>{8, 12}, std::vector<uint64_t>{(1ULL << 40) + 4, 16, 20}}) {
          for (const double p : {0.05, 0.5}) {
            const std::string what = std::string(c10::toString(dtype)) + " n=" + std::to_string(n) + " offset=" +
                                     std::to_string(offset) + " copies=" + std::to_string(offsets.size()) +
                                     " p=" + std::to_string(p);
            const at::Tensor x = (at::randn({n + offset}) * 2).to(dtype);
            const at::Tensor xs = x.narrow(0, offset, n);
            const std::vector<model::DroppedCopy> want = model::lora_dropout_reference(xs, p, seed, offsets);
            const std::vector<model::DroppedCopy> got = model::lora_dropout(xs.to(cuda), p, seed, offsets);
            ASSERT_EQ(got.size(), want.size()) << what;
            for (size_t k = 0; k < got.size(); ++k) {
              EXPECT_TRUE(at::equal(got[k].bits.cpu(), want[k].bits)) << what << " copy " << k << ": the bit masks differ";
              const at::Tensor g = got[k].x.cpu();
              EXPECT_TRUE(at::equal(g, want[k].x))
                  << what << " copy " << k << ": max |diff| "
                  << (g.to(at::kDouble) - want[k].x.to(at::kDouble)).abs().max().item<double>();
            }
          }
        }
      }
    }
  }
}

// The draws come from the device generator: three copies in one call draw what three calls of
// one draw, and putting the generator back (what a recompute does) draws the same masks again.
TEST(CudaFusedOps, LoraDropoutDrawsFromTheDeviceGenerator) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "torch sees no CUDA device (or this is a CPU build of torch)";
  const at::Device cuda(at::kCUDA, 0);
  torch::manual_seed(22);
  const at::Tensor x = at::randn({37, 129}, at::TensorOptions().device(cuda).dtype(at::kBFloat16));
  at::Generator gen = at::globalContext().defaultGenerator(cuda);
  const at::Tensor start = gen.get_state();
  const std::vector<model::DroppedCopy> three = model::lora_dropout(x, 3, 0.1);
  gen.set_state(start);
  for (int k = 0; k < 3; ++k) {
    const model::DroppedCopy one = model::lora_dropout(x, 1, 0.1).front();
    EXPECT_TRUE(at::equal(one.bits, three[k].bits)) << "copy " << k;
    EXPECT_TRUE(at::equal(one.x, three[k].x)) << "copy " << k;
  }
  EXPECT_FALSE(at::equal(three[0].bits, three[1].bits)) << "two copies drew the same mask";
  const at::Tensor after = gen.get_state();
  gen.set_state(start);
  const std::vector<model::DroppedCopy> again = model::lora_dropout(x, 3, 0.1);
  for (int k = 0; k < 3; ++k) EXPECT_TRUE(at::equal(again[k].bits, three[k].bits)) << "replay, copy " << k;
  EXPECT_TRUE(at::equal(gen.get_state(), after)) << "a replay must leave the generator where the first draw did";
  // A large input drops p of its elements.
  const at::Tensor big = at::ones({1 << 22}, at::TensorOptions().device(cuda).dtype(at::kHalf));
  const model::DroppedCopy d = model::lora_dropout(big, 1, 0.05).front();
  const double rate = 1.0 - model::unpack_bits(d.bits, {1 << 22}).to(at::kDouble).mean().item<double>();
  EXPECT_NEAR(rate, 0.05, 7e-4) << "expected a drop rate of 0.05 (six standard deviations: 6.4e-4), got " << rate;
}

// ---------------------------------------------------------------- SwiGLU with dropout

// model::swiglu_lora_dropout (Note [SwiGLU with dropout]) against the two calls it stands for,
// model::swiglu then model::lora_dropout of one copy, with the same seed and offset: m, the
// dropped copy and the bits equal bit for bit, and the dropped copy equals lora_dropout's CPU
// reference applied to that m. Every dtype (fp32 and shapes off the 8-element groups take the
// two-call path), gu a slice of a wider row (stride != 2I), gu off 16-byte alignment, m kept or
// not, offsets past 2^32.
TEST(CudaFusedOps, SwigluLoraDropoutEqualsTheTwoCallsBitForBit) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "torch sees no CUDA device (or this is a CPU build of torch)";
  torch::manual_seed(23);
  const at::Device cuda(at::kCUDA, 0);
  const uint64_t seed = 0x2545f4914f6cdd1dULL;
  struct Shape {
    int64_t rows, inter, pad;  // gu [rows, 2·inter] inside rows of 2·inter + pad
    int64_t shift;             // elements gu starts into its buffer (1: off 16-byte alignment)
  };
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    for (const Shape& sh : {Shape{1, 8, 0, 0}, Shape{3, 24, 0, 0}, Shape{5, 13, 0, 0}, Shape{64, 1024, 0, 0},
                            Shape{33, 512, 16, 0}, Shape{17, 256, 0, 1}, Shape{2, 4096, 8, 8}}) {
      for (const uint64_t offset : {uint64_t{4}, (uint64_t{1} << 40) + 8}) {
        for (const double p : {0.05, 0.5}) {
          for (const bool keep_m : {true, false}) {
            const std::string what = std::string(c10::toString(dtype)) + " rows=" + std::to_string(sh.rows) +
                                     " inter=" + std::to_string(sh.inter) + " pad=" + std::to_string(sh.pad) +
                                     " shift=" + std::to_string(sh.shift) + " offset=" + std::to_string(offset) +
                                     " p=" + std::to_string(p) + (keep_m ? " keep m" : "");
            const int64_t width = 2 * sh.inter + sh.pad;
            const at::Tensor buffer =
                (at::randn({sh.rows * width + sh.shift}) * 3).to(dtype).to(cuda);
            const at::Tensor gu = buffer.narrow(0, sh.shift, sh.rows * width).view({sh.rows, width}).narrow(1, 0, 2 * sh.inter);
            const model::SwigluDropped got = model::swiglu_lora_dropout(gu, p, seed, offset, keep_m);
            const at::Tensor m = model::swiglu(gu);
            const model::DroppedCopy want = model::lora_dropout(m, p, seed, {offset}).front();
            EXPECT_EQ(got.m.defined(), keep_m) << what;
            if (keep_m) {
              EXPECT_TRUE(at::equal(got.m, m)) << what << ": m differs from swiglu's";
            }
            EXPECT_TRUE(at::equal(got.dropped.bits, want.bits)) << what << ": the mask differs from lora_dropout's";
            EXPECT_TRUE(at::equal(got.dropped.x, want.x)) << what << ": the dropped copy differs from lora_dropout's";
            const model::DroppedCopy ref = model::lora_dropout_reference(m.cpu(), p, seed, {offset}).front();
            EXPECT_TRUE(at::equal(got.dropped.x.cpu(), ref.x.view(m.sizes()))) << what << ": differs from the reference";
          }
        }
      }
    }
  }
}

// From the device generator it draws what one lora_dropout copy draws, and a replay draws it again.
TEST(CudaFusedOps, SwigluLoraDropoutDrawsLikeOneLoraDropout) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "torch sees no CUDA device (or this is a CPU build of torch)";
  const at::Device cuda(at::kCUDA, 0);
  torch::manual_seed(24);
  const at::Tensor gu = at::randn({37, 2 * 136}, at::TensorOptions().device(cuda).dtype(at::kBFloat16));
  at::Generator gen = at::globalContext().defaultGenerator(cuda);
  const at::Tensor start = gen.get_state();
  const model::SwigluDropped fused = model::swiglu_lora_dropout(gu, 0.1, /*keep_m=*/false);
  const at::Tensor after = gen.get_state();
  gen.set_state(start);
  const model::DroppedCopy two = model::lora_dropout(model::swiglu(gu), 1, 0.1).front();
  EXPECT_TRUE(at::equal(gen.get_state(), after)) << "the two calls moved the generator elsewhere";
  EXPECT_TRUE(at::equal(fused.dropped.bits, two.bits));
  EXPECT_TRUE(at::equal(fused.dropped.x, two.x));
  EXPECT_FALSE(fused.m.defined());
}

// model::dropout_backward_sum (one kernel pass for up to three terms) against the terms added
// one call at a time by ATen's CUDA ops on the unpacked masks (dropout_backward_add_reference),
// bit for bit: one to three terms, with and without a sum to add into, ragged sizes (scalar
// kernel) and operands off 16-byte alignment; the result lands in acc, or in place on d[0].
TEST(CudaFusedOps, DropoutBackwardSumEqualsOneCallATermBitForBit) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "torch sees no CUDA device (or this is a CPU build of torch)";
  torch::manual_seed(24);
  const at::Device cuda(at::kCUDA, 0);
  const double p = 0.05, scale = 1.0 / (1.0 - p);
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
    for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{8}, int64_t{1000}, int64_t{3 * 4096 + 5}, int64_t{64 * 2048}}) {
      for (int64_t offset : {int64_t{0}, int64_t{1}}) {
        for (int count = 1; count <= 3; ++count) {
          for (bool with_acc : {false, true}) {
            const std::string what = std::string(c10::toString(dtype)) + " n=" + std::to_string(n) + " offset=" +
                                     std::to_string(offset) + " terms=" + std::to_string(count) +
                                     (with_acc ? " acc" : " no acc");
            const at::TensorOptions opt = at::TensorOptions().device(cuda).dtype(dtype);
            const at::Tensor acc = at::randn({n + offset}, opt).narrow(0, offset, n);
            std::vector<at::Tensor> d, bits;
            for (int k = 0; k < count; ++k) {
              d.push_back((at::randn({n + offset}, opt) * 3).narrow(0, offset, n));
              bits.push_back(model::lora_dropout(at::ones({n}, opt), 1, p).front().bits);
            }
            at::Tensor want = with_acc ? acc.clone() : at::Tensor();
            for (int k = 0; k < count; ++k)
              want = model::dropout_backward_add_reference(want, d[k].clone(), model::unpack_bits(bits[k], {n}), scale);
            std::vector<at::Tensor> terms;
            for (const at::Tensor& t : d) terms.push_back(t.clone());
            const at::Tensor into = with_acc ? acc.clone() : terms.front();
            const at::Tensor got = model::dropout_backward_sum(with_acc ? into : at::Tensor(), terms, bits, scale);
            EXPECT_EQ(got.data_ptr(), into.data_ptr()) << what << ": the result is not in place";
            EXPECT_TRUE(at::equal(got, want))
                << what << ": max |diff| " << (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
          }
        }
      }
    }
  }
}

// Note [shed LoRA inputs]: the kernel's copy is remade from the input and its bits bit for bit
// (vector and scalar paths: sizes off the 8-element groups, x off 16-byte alignment), and the
// input is left as it was.
TEST(CudaFusedOps, ApplyingTheBitsAgainRemakesTheKernelsCopy) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "torch sees no CUDA device (or this is a CPU build of torch)";
  const at::Device cuda(at::kCUDA, 0);
  torch::manual_seed(24);
  const double p = 0.05;
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    for (int64_t n : {int64_t{5}, int64_t{4096}, int64_t{3 * 4096 + 5}}) {
      for (int64_t offset : {int64_t{0}, int64_t{1}}) {
        const at::Tensor buf = at::randn({n + offset}, at::TensorOptions().device(cuda).dtype(dtype));
        const at::Tensor x = buf.narrow(0, offset, n);
        const at::Tensor before = x.clone();
        for (const model::DroppedCopy& c : model::lora_dropout(x, 3, p)) {
          const at::Tensor again = model::apply_dropout_bits(x, c.bits, 1.0 / (1.0 - p));
          EXPECT_TRUE(at::equal(again, c.x)) << c10::toString(dtype) << " n=" << n << " offset=" << offset;
        }
        EXPECT_TRUE(at::equal(x, before)) << "the input was written";
      }
    }
  }
}

// The backward with the kernel's bit mask equals the bool-mask kernel's on the unpacked mask,
// and lora_dropout_autograd's gradient is that backward of the forward's own mask.
TEST(CudaFusedOps, LoraDropoutBackwardWithBits) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "torch sees no CUDA device (or this is a CPU build of torch)";
  const at::Device cuda(at::kCUDA, 0);
  torch::manual_seed(23);
  const double p = 0.2, scale = 1.0 / (1.0 - p);
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
    for (int64_t n : {int64_t{5}, int64_t{4096}, int64_t{3 * 4096 + 5}}) {
      const at::Tensor x = at::randn({n}, at::TensorOptions().device(cuda).dtype(dtype));
      const model::DroppedCopy c = model::lora_dropout(x, 1, p).front();
      const at::Tensor mask = model::unpack_bits(c.bits, {n});
      const at::Tensor d = at::randn({n}, x.options()), acc = at::randn({n}, x.options());
      const at::Tensor want = model::dropout_backward_add(acc.clone(), d.clone(), mask, scale);
      const at::Tensor got = model::dropout_backward_add(acc.clone(), d.clone(), c.bits, scale);
      EXPECT_TRUE(at::equal(got, want)) << c10::toString(dtype) << " n=" << n;
    }
  }
  at::Generator gen = at::globalContext().defaultGenerator(cuda);
  const at::Tensor x = at::randn({8, 100}, at::TensorOptions().device(cuda).dtype(at::kBFloat16));
  const at::Tensor start = gen.get_state();
  const at::Tensor leaf = x.clone().requires_grad_(true);
  const at::Tensor y = model::lora_dropout_autograd(leaf, p);
  const at::Tensor g = at::randn({8, 100}, x.options());
  y.backward(g);
  gen.set_state(start);
  const model::DroppedCopy c = model::lora_dropout(x, 1, p).front();
  EXPECT_TRUE(at::equal(y.detach(), c.x));
  const at::Tensor want = model::dropout_backward_add(at::Tensor(), g.clone(), c.bits, scale);
  EXPECT_TRUE(at::equal(leaf.grad(), want));
}

}  // namespace
}  // namespace qlora
