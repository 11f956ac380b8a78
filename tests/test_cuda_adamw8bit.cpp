// kernels (label cuda): the fused 8-bit blockwise AdamW kernel against the reference
// optim::adamw8bit_block_step (bitsandbytes' CUDA kernel, transcribed torch-free), over several
// steps on seeded random ragged sizes, fp32 / bf16 / fp16 gradients; skipped without a GPU.
// Called through the plain-pointer launcher with the CUDA runtime alone; a QLORA_CUDA=ON build
// also checks the at::Tensor glue (optim/adamw8bit_cuda.h).
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
#include "qlora/optim/adamw_ref.h"
#include "qlora/quant/nf4_ref.h"

#ifdef QLORA_WITH_CUDA
#include <ATen/ATen.h>
#include <torch/cuda.h>
#include <torch/types.h>
#include <torch/utils.h>

#include "qlora/optim/adamw8bit_cuda.h"
#include "qlora/optim/optimizer.h"
#include "qlora/optim/state_storage.h"
#endif

namespace qlora {
namespace {

using kernels::FloatType;

// The kernel performs the reference's fp32 operations in the reference's order with correctly
// rounded intrinsics (no FMA contraction), and the block absmax is a max (exact in any order):
// parameters, both code arrays and both absmax arrays must be bitwise equal after every step.
// (Were a contraction ever to slip in, codes would differ by one near a midpoint; this test
// would then report the count instead of hiding it.)
constexpr int64_t kMismatchesAllowed = 0;
constexpr int kSteps = 6;

bool have_gpu(std::string* why) {
  kernels::DeviceInfo devices[4];
  char reason[256];
  if (kernels::query_devices(devices, 4, reason, sizeof reason) > 0) return true;
  *why = reason;
  return false;
}

#define CUDA_OK(expr)                                                      \
  do {                                                                     \
    const int rc_ = static_cast<int>(expr);                                \
    ASSERT_EQ(rc_, 0) << #expr << ": " << kernels::cuda_error_string(rc_); \
  } while (0)

template <typename T>
int64_t count_bitwise_diffs(const std::vector<T>& got, const std::vector<T>& want, const char* what, int step) {
  int64_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) {
      if (bad < 3) {
        std::printf("  step %d %s[%zu]: got %.9g, reference %.9g\n", step, what, i, static_cast<double>(got[i]),
                    static_cast<double>(want[i]));
      }
      ++bad;
    }
  }
  return bad;
}

kernels::DynamicMaps dynamic_maps() {
  kernels::DynamicMaps maps;
  std::memcpy(maps.signed_map, optim::signed_dynamic_map().data(), sizeof maps.signed_map);
  std::memcpy(maps.unsigned_map, optim::unsigned_dynamic_map().data(), sizeof maps.unsigned_map);
  return maps;
}

struct Case {
  int64_t n;
  FloatType grad_type;
  double weight_decay;
  bool non_finite;   // a few inf / nan gradients
  size_t misalign;   // elements the device arrays are shifted by (forces the scalar path)
};

const Case kCases[] = {
    {1, FloatType::kF32, 0.0, false, 0},         {255, FloatType::kF32, 0.01, false, 0},
    {256, FloatType::kBF16, 0.0, false, 0},      {257, FloatType::kF16, 0.01, false, 0},
    {4096, FloatType::kF32, 0.01, true, 0},      {10013, FloatType::kBF16, 0.01, true, 0},
    {65536, FloatType::kF16, 0.0, false, 0},     {65536 + 300, FloatType::kF32, 0.1, false, 0},
    {5000, FloatType::kF32, 0.01, false, 1},     {3000, FloatType::kBF16, 0.0, true, 3},
};

// Gradient values as the kernel sees them: bf16 / fp16 are rounded first, the reference gets
// the widened (exact) values.
float round_to(float g, FloatType t) {
  if (t == FloatType::kBF16) return quant::ref::bf16_bits_to_float(quant::ref::float_to_bf16_bits(g));
  if (t == FloatType::kF16) return quant::ref::f16_bits_to_float(quant::ref::float_to_f16_bits(g));
  return g;
}
std::vector<uint8_t> grad_bytes(const std::vector<float>& g, FloatType t) {
  std::vector<uint8_t> out(g.size() * (t == FloatType::kF32 ? 4 : 2));
  for (size_t i = 0; i < g.size(); ++i) {
    if (t == FloatType::kF32) {
      std::memcpy(&out[4 * i], &g[i], 4);
    } else {
      const uint16_t b =
          t == FloatType::kBF16 ? quant::ref::float_to_bf16_bits(g[i]) : quant::ref::float_to_f16_bits(g[i]);
      std::memcpy(&out[2 * i], &b, 2);
    }
  }
  return out;
}

TEST(CudaAdamW8bit, FusedKernelEqualsReferenceBitForBit) {
  std::string why;
  if (!have_gpu(&why)) GTEST_SKIP() << "no GPU here (" << why << ")";
  const kernels::DynamicMaps maps = dynamic_maps();
  uint32_t seed = 11;
  for (const Case& c : kCases) {
    const int64_t n = c.n;
    const int64_t blocks = optim::quant_blocks(n);
    std::mt19937 rng(seed++);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> param(static_cast<size_t>(n));
    for (auto& p : param) p = normal(rng) * 0.1f;
    // Fresh state, as both optimizers start.
    std::vector<uint8_t> q1(static_cast<size_t>(n), 0), q2(static_cast<size_t>(n), 0);
    std::vector<float> a1(static_cast<size_t>(blocks), 0.0f), a2(static_cast<size_t>(blocks), 0.0f);

    const size_t sh = c.misalign;
    float *d_param = nullptr, *d_a1 = nullptr, *d_a2 = nullptr;
    uint8_t *d_q1 = nullptr, *d_q2 = nullptr, *d_grad = nullptr;
    ASSERT_EQ(cudaMalloc(&d_param, (n + sh) * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_grad, (n + sh) * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_q1, n + sh), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_q2, n + sh), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_a1, blocks * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_a2, blocks * 4), cudaSuccess);
    const size_t gsize = c.grad_type == FloatType::kF32 ? 4 : 2;
    float* p_dev = d_param + sh;
    uint8_t* g_dev = d_grad + sh * gsize;
    uint8_t* q1_dev = d_q1 + sh;
    uint8_t* q2_dev = d_q2 + sh;
    cudaMemcpy(p_dev, param.data(), n * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(q1_dev, q1.data(), n, cudaMemcpyHostToDevice);
    cudaMemcpy(q2_dev, q2.data(), n, cudaMemcpyHostToDevice);
    cudaMemcpy(d_a1, a1.data(), blocks * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(d_a2, a2.data(), blocks * 4, cudaMemcpyHostToDevice);

    optim::AdamWHyper h;
    h.lr = 1e-3;
    h.weight_decay = c.weight_decay;
    for (int step = 1; step <= kSteps; ++step) {
      std::vector<float> grad(static_cast<size_t>(n));
      const float gscale = 0.01f * static_cast<float>(step);
      for (auto& g : grad) g = round_to(normal(rng) * gscale, c.grad_type);
      if (c.non_finite) {
        grad[static_cast<size_t>(n / 3)] = std::numeric_limits<float>::infinity();
        grad[static_cast<size_t>(n / 2)] = std::numeric_limits<float>::quiet_NaN();
      }
      const std::vector<uint8_t> gb = grad_bytes(grad, c.grad_type);
      cudaMemcpy(g_dev, gb.data(), gb.size(), cudaMemcpyHostToDevice);
      const kernels::AdamW8bitScalars s =
          kernels::adamw8bit_scalars(h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, step);
      CUDA_OK(kernels::adamw8bit_step(p_dev, g_dev, c.grad_type, q1_dev, q2_dev, d_a1, d_a2, n, s, maps, nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      optim::adamw8bit_block_step(param.data(), grad.data(), q1.data(), q2.data(), a1.data(), a2.data(), n, step, h);

      std::vector<float> gp(param.size()), ga1(a1.size()), ga2(a2.size());
      std::vector<uint8_t> gq1(q1.size()), gq2(q2.size());
      cudaMemcpy(gp.data(), p_dev, n * 4, cudaMemcpyDeviceToHost);
      cudaMemcpy(gq1.data(), q1_dev, n, cudaMemcpyDeviceToHost);
      cudaMemcpy(gq2.data(), q2_dev, n, cudaMemcpyDeviceToHost);
      cudaMemcpy(ga1.data(), d_a1, blocks * 4, cudaMemcpyDeviceToHost);
      cudaMemcpy(ga2.data(), d_a2, blocks * 4, cudaMemcpyDeviceToHost);
      const std::string what = "n=" + std::to_string(n) + " step " + std::to_string(step);
      EXPECT_LE(count_bitwise_diffs(gp, param, "param", step), kMismatchesAllowed) << what;
      EXPECT_LE(count_bitwise_diffs(gq1, q1, "exp_avg code", step), kMismatchesAllowed) << what;
      EXPECT_LE(count_bitwise_diffs(gq2, q2, "exp_avg_sq code", step), kMismatchesAllowed) << what;
      EXPECT_LE(count_bitwise_diffs(ga1, a1, "exp_avg absmax", step), kMismatchesAllowed) << what;
      EXPECT_LE(count_bitwise_diffs(ga2, a2, "exp_avg_sq absmax", step), kMismatchesAllowed) << what;
      // Sanity: the state moved (the comparison above is not between two untouched arrays).
      if (step == kSteps) {
        EXPECT_GT(a2[0], 0.0f) << what;
      }
    }
    cudaFree(d_param);
    cudaFree(d_grad);
    cudaFree(d_q1);
    cudaFree(d_q2);
    cudaFree(d_a1);
    cudaFree(d_a2);
  }
}

// Paged state (Note in DESIGN "Memory on a GPU, and paging"): the 8-bit moments and their absmax
// in managed memory, explicitly evicted to the host before some steps (the kernel then faults
// the pages back) and prefetched to the device before others; every step must still equal the
// reference bit for bit. Small (a few MiB) and only where the GPU has that much free.
TEST(CudaAdamW8bit, PagedStateEvictedToHostStillEqualsReference) {
  std::string why;
  if (!have_gpu(&why)) GTEST_SKIP() << "no GPU here (" << why << ")";
  int device = 0, concurrent = 0;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  cudaDeviceGetAttribute(&concurrent, cudaDevAttrConcurrentManagedAccess, device);
  if (!concurrent) GTEST_SKIP() << "this GPU / driver cannot prefetch managed memory (no concurrent managed access)";
  const int64_t n = (int64_t{1} << 20) + 77;
  const int64_t blocks = optim::quant_blocks(n);
  const size_t state_bytes = static_cast<size_t>(2 * n + 8 * blocks);
  size_t free_bytes = 0, total_bytes = 0;
  ASSERT_EQ(cudaMemGetInfo(&free_bytes, &total_bytes), cudaSuccess);
  if (free_bytes < 8 * state_bytes) GTEST_SKIP() << "too little free GPU memory for the managed state";

  uint8_t *q1 = nullptr, *q2 = nullptr;
  float *a1 = nullptr, *a2 = nullptr, *d_param = nullptr, *d_grad = nullptr;
  ASSERT_EQ(cudaMallocManaged(&q1, n), cudaSuccess);
  ASSERT_EQ(cudaMallocManaged(&q2, n), cudaSuccess);
  ASSERT_EQ(cudaMallocManaged(&a1, blocks * 4), cudaSuccess);
  ASSERT_EQ(cudaMallocManaged(&a2, blocks * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&d_param, n * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&d_grad, n * 4), cudaSuccess);
  std::memset(q1, 0, n);
  std::memset(q2, 0, n);
  std::memset(a1, 0, blocks * 4);
  std::memset(a2, 0, blocks * 4);
  std::vector<uint8_t> r1(static_cast<size_t>(n), 0), r2(static_cast<size_t>(n), 0);
  std::vector<float> ra1(static_cast<size_t>(blocks), 0.0f), ra2(static_cast<size_t>(blocks), 0.0f);

  std::mt19937 rng(77);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> param(static_cast<size_t>(n));
  for (auto& p : param) p = normal(rng) * 0.1f;
  cudaMemcpy(d_param, param.data(), n * 4, cudaMemcpyHostToDevice);
  const kernels::DynamicMaps maps = dynamic_maps();
  optim::AdamWHyper h;
  h.lr = 1e-3;
  h.weight_decay = 0.01;
  for (int step = 1; step <= 4; ++step) {
    std::vector<float> grad(static_cast<size_t>(n));
    for (auto& g : grad) g = normal(rng) * 0.01f;
    cudaMemcpy(d_grad, grad.data(), n * 4, cudaMemcpyHostToDevice);
    cudaMemLocation where{};
    where.type = step % 2 == 1 ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
    where.id = step % 2 == 1 ? 0 : device;
    for (std::pair<void*, size_t> range : {std::pair<void*, size_t>{q1, n}, {q2, n}, {a1, blocks * 4}, {a2, blocks * 4}})
      CUDA_OK(cudaMemPrefetchAsync(range.first, range.second, where, 0, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    const kernels::AdamW8bitScalars s = kernels::adamw8bit_scalars(h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, step);
    CUDA_OK(kernels::adamw8bit_step(d_param, d_grad, FloatType::kF32, q1, q2, a1, a2, n, s, maps, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    optim::adamw8bit_block_step(param.data(), grad.data(), r1.data(), r2.data(), ra1.data(), ra2.data(), n, step, h);
    std::vector<float> gp(param.size());
    cudaMemcpy(gp.data(), d_param, n * 4, cudaMemcpyDeviceToHost);
    // The managed state is read where it lies now (on the device after the step): host access
    // migrates it back, as a checkpoint save would.
    EXPECT_EQ(count_bitwise_diffs(gp, param, "param", step), 0);
    EXPECT_EQ(std::memcmp(q1, r1.data(), n), 0) << "exp_avg codes, step " << step;
    EXPECT_EQ(std::memcmp(q2, r2.data(), n), 0) << "exp_avg_sq codes, step " << step;
    EXPECT_EQ(std::memcmp(a1, ra1.data(), blocks * 4), 0) << "exp_avg absmax, step " << step;
    EXPECT_EQ(std::memcmp(a2, ra2.data(), blocks * 4), 0) << "exp_avg_sq absmax, step " << step;
  }
  cudaFree(q1);
  cudaFree(q2);
  cudaFree(a1);
  cudaFree(a2);
  cudaFree(d_param);
  cudaFree(d_grad);
}

#ifdef QLORA_WITH_CUDA
TEST(CudaAdamW8bit, TensorGlueEqualsReference) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  torch::manual_seed(3);
  const int64_t n = 3 * 256 + 17;
  at::Tensor param = torch::randn({n}) * 0.1;
  const at::Tensor grad = torch::randn({n}).to(at::kBFloat16);
  optim::AdamWHyper h;
  h.lr = 2e-4;
  h.weight_decay = 0.01;
  at::Tensor q1 = torch::zeros({n}, at::kByte), q2 = torch::zeros({n}, at::kByte);
  at::Tensor a1 = torch::zeros({optim::quant_blocks(n)}), a2 = torch::zeros({optim::quant_blocks(n)});
  at::Tensor gp = param.cuda(), gq1 = q1.cuda(), gq2 = q2.cuda(), ga1 = a1.cuda(), ga2 = a2.cuda();
  const at::Tensor gg = grad.cuda();
  const at::Tensor grad32 = grad.to(at::kFloat).contiguous();
  for (int step = 1; step <= 3; ++step) {
    optim::adamw8bit_step_cuda(gp, gg, gq1, gq2, ga1, ga2, step, h);
    optim::adamw8bit_block_step(param.data_ptr<float>(), grad32.data_ptr<float>(), q1.data_ptr<uint8_t>(),
                                q2.data_ptr<uint8_t>(), a1.data_ptr<float>(), a2.data_ptr<float>(), n, step, h);
  }
  EXPECT_TRUE(torch::equal(gp.cpu(), param));
  EXPECT_TRUE(torch::equal(gq1.cpu(), q1));
  EXPECT_TRUE(torch::equal(gq2.cpu(), q2));
  EXPECT_TRUE(torch::equal(ga1.cpu(), a1));
  EXPECT_TRUE(torch::equal(ga2.cpu(), a2));
}

// adamw8bit_step_cuda_many (Note [AdamW8bit multi-tensor launch]): 53 parameters of ragged
// sizes (more than two launches' worth), one of them empty, fp32 and bf16 gradients mixed (one
// list each), one parameter off 16-byte alignment (the scalar path inside a multi launch), three
// steps: every parameter, code and absmax equal to the reference's, bit for bit.
TEST(CudaAdamW8bit, ManyTensorsInFewLaunchesEqualReference) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  torch::manual_seed(5);
  optim::AdamWHyper h;
  h.lr = 3e-4;
  h.weight_decay = 0.01;
  const int64_t sizes[] = {1, 255, 256, 257, 1000, 4096 + 3, 31, 512};
  struct One {
    at::Tensor param, grad, q1, q2, a1, a2;            // the reference's, on the CPU
    at::Tensor gbuf, gp, gg, gq1, gq2, ga1, ga2;      // the GPU's
  };
  std::vector<One> all;
  for (int i = 0; i < 53; ++i) {
    const int64_t n = i == 20 ? 0 : sizes[i % 8] + i;  // one empty parameter: skipped, never counted twice
    One o;
    o.param = torch::randn({n}) * 0.1;
    o.grad = torch::randn({n});
    if (i % 3 == 1) o.grad = o.grad.to(at::kBFloat16);
    o.q1 = torch::zeros({n}, at::kByte);
    o.q2 = torch::zeros({n}, at::kByte);
    o.a1 = torch::zeros({optim::quant_blocks(n)});
    o.a2 = torch::zeros({optim::quant_blocks(n)});
    if (i == 7) {  // param at a 4-byte offset into its buffer: not 16-byte aligned
      o.gbuf = torch::zeros({n + 1}, at::TensorOptions().device(at::kCUDA));
      o.gp = o.gbuf.narrow(0, 1, n);
      o.gp.copy_(o.param.cuda());
    } else {
      o.gp = o.param.cuda();
    }
    o.gg = o.grad.cuda();
    o.gq1 = o.q1.cuda();
    o.gq2 = o.q2.cuda();
    o.ga1 = o.a1.cuda();
    o.ga2 = o.a2.cuda();
    all.push_back(std::move(o));
  }
  for (int step = 1; step <= 3; ++step) {
    std::vector<optim::AdamW8bitOperands> ops;
    for (One& o : all) ops.push_back({&o.gp, &o.gg, &o.gq1, &o.gq2, &o.ga1, &o.ga2});
    optim::adamw8bit_step_cuda_many(ops, step, h);
    for (One& o : all) {
      const at::Tensor g32 = o.grad.to(at::kFloat).contiguous();
      optim::adamw8bit_block_step(o.param.data_ptr<float>(), g32.data_ptr<float>(), o.q1.data_ptr<uint8_t>(),
                                  o.q2.data_ptr<uint8_t>(), o.a1.data_ptr<float>(), o.a2.data_ptr<float>(),
                                  o.param.numel(), step, h);
    }
  }
  for (size_t i = 0; i < all.size(); ++i) {
    const One& o = all[i];
    EXPECT_TRUE(torch::equal(o.gp.cpu(), o.param)) << "parameter " << i << " (" << o.param.numel() << " elements)";
    EXPECT_TRUE(torch::equal(o.gq1.cpu(), o.q1)) << "exp_avg codes " << i;
    EXPECT_TRUE(torch::equal(o.gq2.cpu(), o.q2)) << "exp_avg_sq codes " << i;
    EXPECT_TRUE(torch::equal(o.ga1.cpu(), o.a1)) << "exp_avg absmax " << i;
    EXPECT_TRUE(torch::equal(o.ga2.cpu(), o.a2)) << "exp_avg_sq absmax " << i;
  }
}

// Note [paged state in managed memory]: the optimizer `qlora train` builds for paged_adamw_8bit
// on a GPU keeps its state in managed memory; evicted to the host before every other step (the
// kernel then faults it back, or the step's prefetch brings it), it must still equal the same
// optimizer over the GPU's own memory bit for bit, state and checkpointed state included.
TEST(CudaPagedState, ManagedStateEvictedToHostEqualsDeviceState) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  const c10::Device gpu(c10::kCUDA, 0);
  if (const std::string why = optim::managed_storage_unavailable(gpu); !why.empty()) GTEST_SKIP() << why;
  torch::manual_seed(11);
  // Two 8-bit tensors (one ragged) and one under min_8bit_size (fp32 state).
  const std::vector<int64_t> sizes = {5 * 4096 + 3, 4096 * 2, 100};
  auto make_params = [&] {
    std::vector<optim::NamedParam> ps;
    torch::manual_seed(12);
    for (size_t i = 0; i < sizes.size(); ++i)
      ps.push_back({"p" + std::to_string(i), (torch::randn({sizes[i]}) * 0.1).to(gpu)});
    return ps;
  };
  optim::AdamWOptions o;
  o.weight_decay = 0.01;
  o.min_8bit_size = 4096;
  auto managed = optim::make_managed_storage(gpu);
  auto paged = optim::make_paged_adamw8bit(make_params(), o, managed);
  auto plain = optim::make_adamw8bit(make_params(), o, optim::make_device_storage(gpu));
  ASSERT_EQ(managed->name(), "cuda-managed");
  ASSERT_TRUE(managed->paged());
  ASSERT_GT(managed->bytes_allocated(), 0u);
  for (int step = 1; step <= 4; ++step) {
    torch::manual_seed(100 + step);
    for (size_t i = 0; i < sizes.size(); ++i) {
      const at::Tensor g = (torch::randn({sizes[i]}) * 0.01).to(gpu);
      at::Tensor a = paged->params()[i].param, b = plain->params()[i].param;
      a.mutable_grad() = g.clone();
      b.mutable_grad() = g.clone();
    }
    if (step % 2 == 1) managed->evict_to_host();
    paged->step(2e-4);
    plain->step(2e-4);
    for (size_t i = 0; i < sizes.size(); ++i)
      EXPECT_TRUE(torch::equal(paged->params()[i].param.cpu(), plain->params()[i].param.cpu()))
          << "parameter " << i << " after step " << step;
  }
  const optim::OptimizerState a = paged->state(), b = plain->state();
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    EXPECT_EQ(a.tensors[i].first, b.tensors[i].first);
    EXPECT_TRUE(torch::equal(a.tensors[i].second.cpu(), b.tensors[i].second.cpu())) << a.tensors[i].first;
  }
  // What `qlora train` builds by default for paged_adamw_8bit on this GPU.
  auto defaulted = optim::make_paged_adamw8bit(make_params(), o);
  EXPECT_EQ(defaulted->kind(), "paged_adamw8bit");
}

TEST(CudaPagedState, RefusesMoreThanTheGpuHasFree) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible to torch";
  const c10::Device gpu(c10::kCUDA, 0);
  if (const std::string why = optim::managed_storage_unavailable(gpu); !why.empty()) GTEST_SKIP() << why;
  kernels::DeviceInfo dev[1];
  char reason[256] = {0};
  ASSERT_EQ(kernels::query_devices(dev, 1, reason, sizeof reason) > 0, true) << reason;
  auto managed = optim::make_managed_storage(gpu);
  // Twice the GPU's whole memory: refused before cudaMallocManaged is called, with the sizes.
  const int64_t too_many = static_cast<int64_t>(2 * dev[0].total_bytes);
  try {
    (void)managed->allocate({too_many}, at::kByte);
    FAIL() << "expected the allocation to be refused";
  } catch (const c10::Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("bytes free"), std::string::npos) << what;
    EXPECT_NE(what.find("train.optimizer: adamw_8bit"), std::string::npos) << what;
  }
  EXPECT_EQ(managed->bytes_allocated(), 0u);
}
#endif

}  // namespace
}  // namespace qlora
