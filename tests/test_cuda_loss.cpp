// model/loss on a GPU (label cuda): the cross-entropy rows kernel (qlora/kernels.h:
// cross_entropy_rows) element by element against its CPU reference
// (model::cross_entropy_rows_reference) on seeded random ragged shapes, and the fused
// chunked_cross_entropy (LossPath::kFused) against the recomputing path (kReference) on CUDA.
// The kernel part needs only the CUDA runtime (it runs in a CPU-torch build on a GPU machine);
// the fused part needs a QLORA_CUDA=ON build. Both skip where no GPU is visible.
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <ATen/ATen.h>
#include <torch/cuda.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "qlora/kernels.h"
#include "support/cuda_launch.h"
#include "qlora/model/loss.h"

namespace {

using namespace qlora;
using namespace qlora::model;
using kernels::FloatType;

// The kernel rounds its fp32 gradient once to the row type: at most half an ulp, 2^-8 of the
// value for bf16 (8 significant bits), 2^-11 for fp16 (11). Before that, its fp32 value
// exp(x - lse) - [label] differs from the reference's through lse alone: both are fp32 sums of
// the same terms in another order, rounded to fp32 (ulp 2^-23 |lse|, |lse| ~ 7-30 here), a few
// ulps apart; a difference D in lse moves each element by D * p_j (p_j = its probability),
// which for the label element p - 1 is not small next to the element itself when p ~ 1. So the
// slack is kLseSlack * |lse| * p_j (2e-6: ~16 ulps of lse). fp16 stores the smallest
// probabilities as subnormals (spacing 2^-24): half a spacing absolute. The brief's coarser
// bound (one rounding of the type, relative to the row's max |ref|) is checked and printed too.
constexpr double kBf16HalfUlp = 1.0 / (1 << 8);
constexpr double kF16HalfUlp = 1.0 / (1 << 11);
constexpr double kLseSlack = 2e-6;
constexpr double kF16SubnormalFloor = 1.0 / (1 << 25);
constexpr double kBf16Floor = 1e-37;  // bf16 shares fp32's range: only fp32 subnormals
// lse: the same fp32 sum in another order (see above), relative. loss = lse - logit[label]
// inherits lse's absolute error, so it is bounded relative to max(|loss|, |lse|).
constexpr double kLseRtol = 1e-5;
// Whole loss, fused vs reference: the same 16-bit logits GEMM and fp32 per-row sums, added in
// another order over <= 64 rows: 1e-4 relative (the brief's bound; seen far smaller).
constexpr double kLossSumRtol = 1e-4;
// grad_hidden, fused vs reference, relative to max |reference|: the reference rounds twice
// (d to 16 bits, then the GEMM output), the fused path three times (G, the GEMM output, then the
// product with the incoming scalar), each <= half an ulp; plus G elements where the two lse
// differ in their last bit and round to neighbouring 16-bit values. 4 half-ulps.
constexpr double kBf16GradRtol = 4 * kBf16HalfUlp;
constexpr double kF16GradRtol = 4 * kF16HalfUlp;

// Device memory for one test, freed on scope exit.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) {
    if (cudaMalloc(&ptr_, bytes) != cudaSuccess) ptr_ = nullptr;
  }
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <typename T = void>
  T* get() const {
    return static_cast<T*>(ptr_);
  }
  bool ok() const { return ptr_ != nullptr; }

 private:
  void* ptr_ = nullptr;
};

struct Shape {
  int64_t n, vocab, stride;
};

// Rows: the vector path (16-byte rows), the vector path with a vocab % 8 tail and stride > V,
// and the element-wise path (odd V, or a stride that breaks alignment).
constexpr Shape kShapes[] = {
    {1, 1000, 1000},   {7, 1003, 1008},   {33, 1000, 1013},
    {1, 32003, 32003}, {7, 32003, 32016}, {33, 32000, 32000},
};

constexpr float kSentinel = 7.0f;  // columns past V: the kernel must leave them alone

TEST(CrossEntropyRowsKernel, EqualsTheReference) {
  SKIP_WITHOUT_GPU();
  for (const at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
    const bool bf16 = dtype == at::kBFloat16;
    const double half_ulp = bf16 ? kBf16HalfUlp : kF16HalfUlp;
    const double floor = bf16 ? kBf16Floor : kF16SubnormalFloor;
    double worst_grad_vs_max = 0, worst_lse = 0;
    for (const Shape& s : kShapes) {
      const std::string what = std::string(bf16 ? "bf16" : "fp16") + " n=" + std::to_string(s.n) +
                               " V=" + std::to_string(s.vocab) + " stride=" + std::to_string(s.stride);
      torch::manual_seed(static_cast<uint64_t>(s.n * 100003 + s.vocab + (bf16 ? 0 : 7)));
      at::Tensor buf = at::full({s.n, s.stride}, kSentinel, at::kFloat);  // [n, stride]
      buf.narrow(1, 0, s.vocab).copy_(torch::randn({s.n, s.vocab}) * 4.0);
      at::Tensor labels = torch::randint(0, s.vocab, {s.n}, at::kLong);   // [n]
      labels.index_put_({torch::arange(s.n) % 4 == 3}, kIgnoreIndex);
      if (s.n == 1 && !bf16) labels.fill_(kIgnoreIndex);  // a lone ignored row
      if (s.n > 1) buf.index_put_({1, labels[1].item<int64_t>()}, 20.0);  // p(label) ~ 1
      buf = buf.to(dtype).contiguous();
      const at::Tensor logits = buf.narrow(1, 0, s.vocab);
      const CrossEntropyRows ref = cross_entropy_rows_reference(logits, labels);

      const size_t bytes = static_cast<size_t>(buf.numel()) * 2;
      DeviceBuffer d_logits(bytes), d_labels(s.n * sizeof(int64_t)), d_lse(s.n * sizeof(float)),
          d_loss(s.n * sizeof(float));
      ASSERT_TRUE(d_logits.ok() && d_labels.ok() && d_lse.ok() && d_loss.ok());
      ASSERT_EQ(cudaMemcpy(d_logits.get(), buf.data_ptr(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(d_labels.get(), labels.data_ptr(), s.n * sizeof(int64_t), cudaMemcpyHostToDevice),
                cudaSuccess);
      CUDA_OK(kernels::cross_entropy_rows(d_logits.get(), bf16 ? FloatType::kBF16 : FloatType::kF16, s.n, s.vocab,
                                          s.stride, d_labels.get<int64_t>(), kIgnoreIndex, d_lse.get<float>(),
                                          d_loss.get<float>(), nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      at::Tensor out = at::empty_like(buf), lse = at::empty({s.n}, at::kFloat), loss = at::empty({s.n}, at::kFloat);
      ASSERT_EQ(cudaMemcpy(out.data_ptr(), d_logits.get(), bytes, cudaMemcpyDeviceToHost), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(lse.data_ptr(), d_lse.get(), s.n * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(loss.data_ptr(), d_loss.get(), s.n * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);

      // Untouched padding.
      if (s.stride > s.vocab) {
        EXPECT_TRUE(out.narrow(1, s.vocab, s.stride - s.vocab).eq(kSentinel).all().item<bool>()) << what;
      }

      const at::Tensor ref_lse = ref.lse.to(at::kDouble), ref_loss = ref.loss.to(at::kDouble);
      const at::Tensor lse_err = (lse.to(at::kDouble) - ref_lse).abs();
      EXPECT_TRUE(lse_err.le(kLseRtol * ref_lse.abs()).all().item<bool>())
          << what << ": lse max |err| " << lse_err.max().item<double>();
      const at::Tensor loss_err = (loss.to(at::kDouble) - ref_loss).abs();
      EXPECT_TRUE(loss_err.le(kLseRtol * at::maximum(ref_loss.abs(), ref_lse.abs())).all().item<bool>())
          << what << ": loss max |err| " << loss_err.max().item<double>();
      worst_lse = std::max(worst_lse, (lse_err / ref_lse.abs()).max().item<double>());

      const at::Tensor ignored = labels.eq(kIgnoreIndex);
      EXPECT_TRUE(loss.masked_select(ignored).eq(0).all().item<bool>()) << what;

      const at::Tensor g = out.narrow(1, 0, s.vocab).to(at::kDouble);  // [n, V]
      const at::Tensor r = ref.grad.to(at::kDouble);
      const at::Tensor row_max = r.abs().amax({1}, true);               // [n, 1]
      const at::Tensor err = (g - r).abs();
      at::Tensor p = r.clone();  // the probabilities: r + onehot(label) on counted rows
      const at::Tensor counted_idx = labels.ne(kIgnoreIndex).nonzero().squeeze(1);
      const at::Tensor label_idx = labels.index({counted_idx});
      p.index_put_({counted_idx, label_idx}, r.index({counted_idx, label_idx}) + 1.0);
      const at::Tensor bound = half_ulp * r.abs() + kLseSlack * ref_lse.abs().unsqueeze(1) * p + floor;
      const int64_t bad = err.gt(bound).sum().item<int64_t>();
      EXPECT_EQ(bad, 0) << what << ": " << bad << " gradient elements out of bounds, worst excess "
                        << (err - bound).max().item<double>();
      EXPECT_TRUE(g.index({ignored}).eq(0).all().item<bool>()) << what << ": an ignored row is not zero";
      const at::Tensor counted = ~ignored;
      if (counted.any().item<bool>()) {
        const double rel = (err.index({counted}) / row_max.index({counted})).max().item<double>();
        worst_grad_vs_max = std::max(worst_grad_vs_max, rel);
        EXPECT_LE(rel, 2 * half_ulp) << what;
      }
    }
    std::printf("  %s: worst gradient |err| / row max|ref| %.3e (one rounding %.3e), worst lse rel err %.3e\n",
                bf16 ? "bf16" : "fp16", worst_grad_vs_max, 2 * half_ulp, worst_lse);
  }
}

TEST(CrossEntropyRowsKernel, RejectsBadArguments) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer d(1024);
  ASSERT_TRUE(d.ok());
  float* f = d.get<float>();
  const int64_t* l = d.get<int64_t>();
  EXPECT_NE(kernels::cross_entropy_rows(nullptr, FloatType::kBF16, 1, 8, 8, l, kIgnoreIndex, f, f, nullptr), 0);
  EXPECT_NE(kernels::cross_entropy_rows(d.get(), FloatType::kBF16, 1, 8, 7, l, kIgnoreIndex, f, f, nullptr), 0);
  EXPECT_EQ(kernels::cross_entropy_rows(d.get(), FloatType::kBF16, 0, 8, 8, l, kIgnoreIndex, f, f, nullptr), 0);
}

// The whole loss on CUDA: fused (gradient formed in forward) against the recomputing path.
TEST(FusedCrossEntropy, EqualsTheReferencePathOnCuda) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  const c10::Device gpu(c10::kCUDA, 0);
  const int64_t n = 37, h = 64;
  const double scale = 0.37;  // the incoming gradient (1 / count times a loss scale, say)
  for (const at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
    for (const int64_t vocab : {1000, 32003}) {
      torch::manual_seed(static_cast<uint64_t>(vocab + (dtype == at::kHalf ? 1 : 0)));
      const at::Tensor hidden0 = torch::randn({n, h}).to(gpu).to(dtype);
      const at::Tensor weight = (torch::randn({vocab, h}) * 0.3).to(gpu).to(dtype);
      at::Tensor labels = torch::randint(0, vocab, {n}, at::kLong);
      labels.index_put_({torch::arange(n) % 5 == 1}, kIgnoreIndex);
      labels = labels.to(gpu);
      const double grad_rtol = dtype == at::kBFloat16 ? kBf16GradRtol : kF16GradRtol;

      at::Tensor hr = hidden0.clone().requires_grad_(true);
      TokenLoss ref = chunked_cross_entropy(hr, weight, labels, 16, LossPath::kReference);
      (ref.sum * scale).backward();
      const double ref_sum = ref.sum.item<double>();
      const double ref_max = hr.grad().abs().max().item<double>();
      for (const int64_t chunk : {8, 16, 37, 100}) {
        const std::string what = std::string(dtype == at::kBFloat16 ? "bf16" : "fp16") +
                                 " V=" + std::to_string(vocab) + " chunk=" + std::to_string(chunk);
        at::Tensor hf = hidden0.clone().requires_grad_(true);
        ASSERT_TRUE(fused_cross_entropy_applies(hf, weight));
        TokenLoss fused = chunked_cross_entropy(hf, weight, labels, chunk, LossPath::kFused);
        (fused.sum * scale).backward();
        ASSERT_TRUE(hf.grad().defined()) << what;
        EXPECT_EQ(hf.grad().scalar_type(), dtype) << what;
        EXPECT_EQ(fused.count.item<int64_t>(), ref.count.item<int64_t>()) << what;
        const double sum_err = std::abs(fused.sum.item<double>() - ref_sum) / std::abs(ref_sum);
        const double grad_err =
            (hf.grad().to(at::kDouble) - hr.grad().to(at::kDouble)).abs().max().item<double>() / ref_max;
        std::printf("  %s: loss sum rel err %.3e, grad_hidden |err| / max %.3e\n", what.c_str(), sum_err, grad_err);
        EXPECT_LT(sum_err, kLossSumRtol) << what;
        EXPECT_LT(grad_err, grad_rtol) << what;

        // kAuto takes the fused path here (unless QLORA_REFERENCE_LOSS=1 forces the reference).
        const char* env = std::getenv("QLORA_REFERENCE_LOSS");
        if (env == nullptr || std::string(env) != "1") {
          at::Tensor ha = hidden0.clone().requires_grad_(true);
          TokenLoss autod = chunked_cross_entropy(ha, weight, labels, chunk);
          (autod.sum * scale).backward();
          EXPECT_TRUE(autod.sum.equal(fused.sum)) << what;
          EXPECT_TRUE(ha.grad().equal(hf.grad())) << what;
        }
      }
      // Without grad the reference path runs (and gives the same loss).
      {
        const at::NoGradGuard no_grad;
        EXPECT_FALSE(fused_cross_entropy_applies(hidden0, weight));
        EXPECT_THROW(chunked_cross_entropy(hidden0, weight, labels, 8, LossPath::kFused), c10::Error);
      }
    }
  }
}

// Labels on the host (what the trainer passes, so the range check needs no device sync): the
// same loss, count and gradient as labels on the device, bit for bit; a label out of range is
// refused with the message, and the model's upload copies a host tensor exactly.
TEST(FusedCrossEntropy, HostLabelsEqualDeviceLabels) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  const c10::Device gpu(c10::kCUDA, 0);
  const int64_t n = 45, h = 32, vocab = 777;
  torch::manual_seed(7);
  const at::Tensor hidden0 = torch::randn({n, h}).to(gpu).to(at::kBFloat16);
  const at::Tensor weight = (torch::randn({vocab, h}) * 0.3).to(gpu).to(at::kBFloat16);
  at::Tensor host = torch::randint(0, vocab, {n}, at::kLong);
  host.index_put_({torch::arange(n) % 4 == 0}, kIgnoreIndex);
  for (const LossPath path : {LossPath::kFused, LossPath::kReference}) {
    at::Tensor hd = hidden0.clone().requires_grad_(true);
    at::Tensor hh = hidden0.clone().requires_grad_(true);
    TokenLoss on_device = chunked_cross_entropy(hd, weight, host.to(gpu), 16, path);
    TokenLoss from_host = chunked_cross_entropy(hh, weight, host, 16, path);
    on_device.sum.backward();
    from_host.sum.backward();
    EXPECT_TRUE(from_host.sum.equal(on_device.sum)) << "expected the device-label loss "
                                                    << on_device.sum.item<float>() << ", got "
                                                    << from_host.sum.item<float>();
    EXPECT_EQ(from_host.count.item<int64_t>(), on_device.count.item<int64_t>());
    EXPECT_EQ(from_host.count.device(), gpu);
    EXPECT_TRUE(hh.grad().equal(hd.grad()));
  }
  at::Tensor bad = host.clone();
  bad[3] = vocab;
  at::Tensor hb = hidden0.clone().requires_grad_(true);
  try {
    chunked_cross_entropy(hb, weight, bad, 16);
    ADD_FAILURE() << "expected a label outside [0, 777) to be refused";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("a label is outside [0, 777)"), std::string::npos) << e.what();
  }
  const at::Tensor up = upload(host, gpu);
  EXPECT_EQ(up.device(), gpu);
  EXPECT_TRUE(up.cpu().equal(host));
  EXPECT_TRUE(upload(host, c10::Device(c10::kCPU)).equal(host));  // the CPU: as is
}

}  // namespace
