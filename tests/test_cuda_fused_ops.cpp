// kernels/fused_ops.cu (label cuda): RoPE, its backward (in place and out of place), SwiGLU, GeGLU and their backward on the GPU
// (and RMSNorm's backward with the residual; LoRA dropout: tests/test_cuda_dropout.cpp)
// against model/fused_ops.h's references run in fp32 on the CPU, element by element, for fp32,
// bf16 and fp16, on seeded random ragged shapes: strided column-slice views as the fused layer
// passes them, aligned (16-byte vector path) and unaligned (row stride 3*I + 5, odd column
// offsets: scalar path), empty ones, with sentinel columns around every slice that must come
// back untouched bit for bit. The launchers are driven with the CUDA runtime alone (no CUDA
// torch needed), skipped where no GPU is visible; a QLORA_CUDA=ON build also checks the
// at::Tensor dispatch (model::rope_inplace, ... on CUDA tensors), skipped where
// torch::cuda::is_available() is false.
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <ATen/ATen.h>
#include <torch/cuda.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "qlora/kernels.h"
#include "support/cuda_launch.h"
#include "qlora/model/fused_ops.h"
#include "qlora/model/decoder.h"

namespace qlora {
namespace {

using kernels::FloatType;

// Tolerance: one rounding of the output type, relative to max |ref| over the checked output.
// The kernels compute in fp32 and round once; rounding to nearest is off by at most half an
// ulp, 2^-9 (bf16) / 2^-12 (fp16) of the element, so a full ulp of max |ref| (2^-8 / 2^-11)
// leaves room for the fp32-level differences (FMA, expf against ATen's exp). fp32 outputs: the
// reference itself rounds 3-8 times an element in another order: 16 fp32 ulps of max |ref|.
constexpr double kBf16Tol = 1.0 / (1 << 8);
constexpr double kF16Tol = 1.0 / (1 << 11);
constexpr double kF32Tol = 1.0 / (1 << 20);
// Written into every column outside the slice under test; must come back bit for bit.
constexpr double kSentinel = -12345.0;

double tolerance(FloatType t) {
  return t == FloatType::kBF16 ? kBf16Tol : t == FloatType::kF16 ? kF16Tol : kF32Tol;
}
at::ScalarType scalar_of(FloatType t) {
  return t == FloatType::kBF16 ? at::kBFloat16 : t == FloatType::kF16 ? at::kHalf : at::kFloat;
}
const char* name_of(FloatType t) { return t == FloatType::kBF16 ? "bf16" : t == FloatType::kF16 ? "fp16" : "fp32"; }
const FloatType kTypes[] = {FloatType::kF32, FloatType::kBF16, FloatType::kF16};

// A CPU tensor's bytes on the device, freed on scope exit.
class DeviceCopy {
 public:
  explicit DeviceCopy(const at::Tensor& host) : host_(host.contiguous()) {
    bytes_ = static_cast<size_t>(host_.numel()) * host_.element_size();
    ok_ = cudaMalloc(&ptr_, bytes_ + 16) == cudaSuccess &&
          cudaMemcpy(ptr_, host_.const_data_ptr(), bytes_, cudaMemcpyHostToDevice) == cudaSuccess;
  }
  ~DeviceCopy() {
    if (ptr_) cudaFree(ptr_);
  }
  DeviceCopy(const DeviceCopy&) = delete;
  DeviceCopy& operator=(const DeviceCopy&) = delete;
  bool ok() const { return ok_; }
  // The element at `offset` (elements) of the buffer.
  void* at(int64_t offset) const { return static_cast<char*>(ptr_) + offset * host_.element_size(); }
  // The device bytes back in a CPU tensor of the host tensor's shape and dtype.
  at::Tensor download() const {
    at::Tensor out = at::empty_like(host_);
    if (cudaMemcpy(out.data_ptr(), ptr_, bytes_, cudaMemcpyDeviceToHost) != cudaSuccess) return at::Tensor();
    return out;
  }

 private:
  at::Tensor host_;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  bool ok_ = false;
};

// An fp32 copy (never an alias, even of an fp32 tensor: the references write in place).
at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true); }

double max_abs(const at::Tensor& t) { return t.numel() == 0 ? 0.0 : t.abs().max().item<double>(); }

// Every element of got within tol * max |ref|; returns the error relative to max |ref|.
double check_close(const at::Tensor& got, const at::Tensor& ref, double tol, const std::string& what) {
  const at::Tensor g = got.to(at::kDouble), r = ref.to(at::kDouble);
  const double scale = max_abs(r);
  const double err = max_abs(g - r);
  EXPECT_LE(err, tol * scale) << what << ": max |got - ref| = " << err << ", max |ref| = " << scale;
  return scale > 0 ? err / scale : err;
}

// The columns of `wide` [rows, W] outside [col, col + width) are the sentinel still.
void check_outside(const at::Tensor& wide, int64_t col, int64_t width, const std::string& what) {
  const int64_t w = wide.size(1);
  const at::Tensor left = wide.narrow(1, 0, col), right = wide.narrow(1, col + width, w - col - width);
  EXPECT_TRUE(at::equal(left, at::full_like(left, kSentinel))) << what << ": columns left of the slice changed";
  EXPECT_TRUE(at::equal(right, at::full_like(right, kSentinel))) << what << ": columns right of the slice changed";
}

// A [rows, W] buffer of `dtype`: sentinels, with random values (times `scale`) in [col, col + width).
at::Tensor sentinel_buffer(int64_t rows, int64_t w, int64_t col, int64_t width, at::ScalarType dtype,
                           double scale) {
  at::Tensor t = at::full({rows, w}, kSentinel, dtype);
  t.narrow(1, col, width).copy_(at::randn({rows, width}) * scale);
  return t;
}

// ---------------------------------------------------------------- RoPE

struct RopeCase {
  int64_t b, t, h, d;
  int64_t width;  // row stride of the [B*T, width] buffer holding x
  int64_t col;    // x's first column in it
};

const RopeCase kRopeCases[] = {
    {2, 17, 4, 64, 3 * 4 * 64, 4 * 64},      // the k slice of a q|k|v buffer: vector path
    {2, 5, 3, 128, 3 * 3 * 128 + 8, 8},      // aligned offset and stride: vector path
    {1, 3, 2, 128, 2 * 2 * 128 + 5, 3},      // odd stride and offset: scalar path
    {3, 1, 1, 64, 64 + 1, 1},                // one position, scalar
    {1, 0, 2, 64, 128, 0},                   // no rows: no launch
};

std::pair<at::Tensor, at::Tensor> make_cos_sin(int64_t b, int64_t t, int64_t d, at::ScalarType dtype) {
  DecoderConfig c;
  c.head_dim = d;
  c.rope_theta = 500000.0;
  const at::Tensor pos = at::randint(0, 8192, {b, t}, at::kLong);
  return model::rope_cos_sin(model::rope_inv_freq(c), pos, dtype);
}

// The case's heads as rows of a [B*T, width] buffer (each head d elements after the last).
kernels::RopeView view_of(const RopeCase& c, int64_t width) {
  kernels::RopeView v;
  v.batch = c.b;
  v.seq = c.t;
  v.heads = c.h;
  v.head_dim = c.d;
  v.stride_batch = c.t * width;
  v.stride_seq = width;
  v.stride_head = c.d;
  return v;
}

void run_rope_case(FloatType ft, const RopeCase& c, bool backward) {
  const at::ScalarType dtype = scalar_of(ft);
  const std::string what = std::string(backward ? "rope backward " : "rope ") + name_of(ft) + " B=" +
                           std::to_string(c.b) + " T=" + std::to_string(c.t) + " H=" + std::to_string(c.h) +
                           " d=" + std::to_string(c.d) + " stride=" + std::to_string(c.width) +
                           " col=" + std::to_string(c.col);
  const auto [cos, sin] = make_cos_sin(c.b, c.t, c.d, dtype);
  const at::Tensor wide = sentinel_buffer(c.b * c.t, c.width, c.col, c.h * c.d, dtype, 2.0);
  DeviceCopy dx(wide), dcos(cos), dsin(sin);
  ASSERT_TRUE(dx.ok() && dcos.ok() && dsin.ok()) << what;
  const kernels::RopeView v = view_of(c, c.width);
  const int rc = backward ? kernels::rope_backward_inplace(dx.at(c.col), dcos.at(0), dsin.at(0), ft, v, nullptr)
                          : kernels::rope_inplace(dx.at(c.col), dcos.at(0), dsin.at(0), ft, v, nullptr);
  ASSERT_EQ(rc, 0) << what << ": " << kernels::cuda_error_string(rc);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << what;
  const at::Tensor got = dx.download();
  ASSERT_TRUE(got.defined()) << what;

  at::Tensor ref = f32(wide.narrow(1, c.col, c.h * c.d)).reshape({c.b, c.t, c.h, c.d});
  const at::Tensor cf = f32(cos), sf = f32(sin);
  if (backward)
    model::rope_backward_inplace_reference(ref, cf, sf);
  else
    model::rope_inplace_reference(ref, cf, sf);
  const at::Tensor got_x = got.narrow(1, c.col, c.h * c.d).reshape({c.b, c.t, c.h, c.d});
  const double err = check_close(got_x, ref, tolerance(ft), what);
  check_outside(got, c.col, c.h * c.d, what);
  std::printf("  %-70s max err / max|ref| = %.3g\n", what.c_str(), err);
}

TEST(CudaFusedOps, RopeMatchesReference) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(11);
  for (FloatType ft : kTypes)
    for (const RopeCase& c : kRopeCases) run_rope_case(ft, c, /*backward=*/false);
}

TEST(CudaFusedOps, RopeBackwardMatchesReference) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(12);
  for (FloatType ft : kTypes)
    for (const RopeCase& c : kRopeCases) run_rope_case(ft, c, /*backward=*/true);
}

TEST(CudaFusedOps, RopeRejectsOddHeadDim) {
  SKIP_WITHOUT_GPU();
  kernels::RopeView v;
  v.batch = v.seq = v.heads = 1;
  v.head_dim = 63;
  float dummy[64] = {};
  EXPECT_NE(kernels::rope_inplace(dummy, dummy, dummy, FloatType::kF32, v, nullptr), 0);
}

// rope_into (forward, backward, copy): from a strided column slice of a sentinel buffer into
// another buffer of a different row stride and offset, against the in-place kernel on the same
// values, bit for bit (same fp32 math, one rounding; copy is exact). The source must come back
// unchanged, the columns around the destination slice untouched.
TEST(CudaFusedOps, RopeIntoEqualsTheInPlaceKernelBitForBit) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(13);
  for (FloatType ft : kTypes) {
    for (const RopeCase& c : kRopeCases) {
      for (kernels::RopeMode mode : {kernels::RopeMode::kForward, kernels::RopeMode::kBackward, kernels::RopeMode::kCopy}) {
        const at::ScalarType dtype = scalar_of(ft);
        const char* mode_name = mode == kernels::RopeMode::kForward ? "forward" : mode == kernels::RopeMode::kBackward ? "backward" : "copy";
        const int64_t hd = c.h * c.d;
        const int64_t dst_width = hd + (c.col % 2 == 0 ? 8 : 3), dst_col = c.col % 2 == 0 ? 8 : 1;
        const std::string what = std::string("rope_into ") + mode_name + " " + name_of(ft) + " B=" + std::to_string(c.b) +
                                 " T=" + std::to_string(c.t) + " H=" + std::to_string(c.h) + " d=" + std::to_string(c.d) +
                                 " src stride=" + std::to_string(c.width) + " dst stride=" + std::to_string(dst_width);
        const auto [cos, sin] = make_cos_sin(c.b, c.t, c.d, dtype);
        const at::Tensor src = sentinel_buffer(c.b * c.t, c.width, c.col, hd, dtype, 2.0);
        const at::Tensor dst = at::full({c.b * c.t, dst_width}, kSentinel, dtype);
        DeviceCopy dsrc(src), ddst(dst), dinplace(src), dcos(cos), dsin(sin);
        ASSERT_TRUE(dsrc.ok() && ddst.ok() && dinplace.ok() && dcos.ok() && dsin.ok()) << what;
        const kernels::RopeView vs = view_of(c, c.width), vd = view_of(c, dst_width);
        int rc = kernels::rope_into(ddst.at(dst_col), vd, dsrc.at(c.col), vs, dcos.at(0), dsin.at(0), ft, mode, nullptr);
        ASSERT_EQ(rc, 0) << what << ": " << kernels::cuda_error_string(rc);
        rc = mode == kernels::RopeMode::kForward    ? kernels::rope_inplace(dinplace.at(c.col), dcos.at(0), dsin.at(0), ft, vs, nullptr)
             : mode == kernels::RopeMode::kBackward ? kernels::rope_backward_inplace(dinplace.at(c.col), dcos.at(0), dsin.at(0), ft, vs, nullptr)
                                                    : 0;
        ASSERT_EQ(rc, 0) << what << ": " << kernels::cuda_error_string(rc);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << what;
        const at::Tensor got = ddst.download(), want = dinplace.download(), src_after = dsrc.download();
        ASSERT_TRUE(got.defined() && want.defined() && src_after.defined()) << what;
        EXPECT_TRUE(at::equal(got.narrow(1, dst_col, hd), want.narrow(1, c.col, hd)))
            << what << ": expected the in-place kernel's values bit for bit, got max |diff| "
            << max_abs(f32(got.narrow(1, dst_col, hd)) - f32(want.narrow(1, c.col, hd)));
        check_outside(got, dst_col, hd, what);
        EXPECT_TRUE(at::equal(src_after, src)) << what << ": the source changed";
      }
    }
  }
  // Sizes that differ between the views are refused.
  kernels::RopeView a, b;
  a.batch = b.batch = a.seq = b.seq = 1;
  a.heads = 2;
  b.heads = 1;
  a.head_dim = b.head_dim = 8;
  float buf[32] = {};
  EXPECT_NE(kernels::rope_into(buf, a, buf + 16, b, nullptr, nullptr, FloatType::kF32, kernels::RopeMode::kCopy, nullptr), 0);
  EXPECT_NE(kernels::rope_into(buf, a, buf + 16, a, nullptr, nullptr, FloatType::kF32, kernels::RopeMode::kForward, nullptr), 0)
      << "forward without cos / sin must be refused";
}

// ---------------------------------------------------------------- SwiGLU

struct SwigluCase {
  int64_t n, inter;
  int64_t width, col;        // gu: [n, width] buffer, gu's first column
  int64_t out_width, out_col;  // m (forward) or dm (backward): [n, out_width] buffer, first column
};

const SwigluCase kSwigluCases[] = {
    {17, 64, 128, 0, 64, 0},                // contiguous: vector path
    {33, 96, 2 * 96 + 8, 8, 96 + 8, 8},     // aligned column slices: vector path
    {9, 64, 3 * 64 + 5, 0, 64 + 3, 3},      // row stride 3I + 5: scalar path
    {5, 37, 3 * 37 + 5, 3, 40, 1},          // odd I, odd offsets: scalar path
    {1, 1, 2, 0, 1, 0},                     // one element
    {0, 16, 32, 0, 16, 0},                  // no rows: no launch
};

std::string swiglu_name(const char* op, FloatType ft, const SwigluCase& c) {
  return std::string(op) + " " + name_of(ft) + " N=" + std::to_string(c.n) + " I=" + std::to_string(c.inter) +
         " stride=" + std::to_string(c.width) + " col=" + std::to_string(c.col) +
         " out_stride=" + std::to_string(c.out_width) + " out_col=" + std::to_string(c.out_col);
}

// A GLU's launchers and references: SwiGLU's and GeGLU's share the layout, the checks and the
// vector path, so both run the same cases.
struct GluOps {
  const char* name;
  int (*forward)(const void* gu, int64_t gu_row_stride, int64_t rows, int64_t inter, void* m, int64_t m_row_stride,
                 FloatType type, CUstream_st* stream);
  int (*backward)(const void* dm, int64_t dm_row_stride, void* gu, int64_t gu_row_stride, int64_t rows, int64_t inter,
                  FloatType type, CUstream_st* stream);
  at::Tensor (*reference)(const at::Tensor& gu);
  void (*backward_reference)(const at::Tensor& dm, at::Tensor& gu);
};
const GluOps kSwiglu{"swiglu", kernels::swiglu, kernels::swiglu_backward_inplace, model::swiglu_reference,
                     model::swiglu_backward_inplace_reference};
const GluOps kGeglu{"geglu", kernels::geglu, kernels::geglu_backward_inplace, model::geglu_reference,
                    model::geglu_backward_inplace_reference};

void check_glu_forward(const GluOps& op) {
  for (FloatType ft : kTypes)
    for (const SwigluCase& c : kSwigluCases) {
      const std::string what = swiglu_name(op.name, ft, c);
      const at::ScalarType dtype = scalar_of(ft);
      const at::Tensor gu = sentinel_buffer(c.n, c.width, c.col, 2 * c.inter, dtype, 3.0);
      const at::Tensor m = at::full({c.n, c.out_width}, kSentinel, dtype);
      DeviceCopy dgu(gu), dmb(m);
      ASSERT_TRUE(dgu.ok() && dmb.ok()) << what;
      const int rc = op.forward(dgu.at(c.col), c.width, c.n, c.inter, dmb.at(c.out_col), c.out_width, ft, nullptr);
      ASSERT_EQ(rc, 0) << what << ": " << kernels::cuda_error_string(rc);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << what;
      const at::Tensor got = dmb.download(), gu_after = dgu.download();
      ASSERT_TRUE(got.defined() && gu_after.defined()) << what;
      const at::Tensor ref = op.reference(f32(gu.narrow(1, c.col, 2 * c.inter)));
      const double err = check_close(got.narrow(1, c.out_col, c.inter), ref, tolerance(ft), what);
      check_outside(got, c.out_col, c.inter, what);
      EXPECT_TRUE(at::equal(gu_after, gu)) << what << ": the input changed";
      std::printf("  %-70s max err / max|ref| = %.3g\n", what.c_str(), err);
    }
}

void check_glu_backward(const GluOps& op) {
  for (FloatType ft : kTypes)
    for (const SwigluCase& c : kSwigluCases) {
      const std::string what = swiglu_name((std::string(op.name) + " backward").c_str(), ft, c);
      const at::ScalarType dtype = scalar_of(ft);
      const at::Tensor gu = sentinel_buffer(c.n, c.width, c.col, 2 * c.inter, dtype, 3.0);
      const at::Tensor dm = sentinel_buffer(c.n, c.out_width, c.out_col, c.inter, dtype, 1.0);
      DeviceCopy dgu(gu), ddm(dm);
      ASSERT_TRUE(dgu.ok() && ddm.ok()) << what;
      const int rc = op.backward(ddm.at(c.out_col), c.out_width, dgu.at(c.col), c.width, c.n, c.inter, ft, nullptr);
      ASSERT_EQ(rc, 0) << what << ": " << kernels::cuda_error_string(rc);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << what;
      const at::Tensor got = dgu.download(), dm_after = ddm.download();
      ASSERT_TRUE(got.defined() && dm_after.defined()) << what;
      at::Tensor ref = f32(gu.narrow(1, c.col, 2 * c.inter));
      op.backward_reference(f32(dm.narrow(1, c.out_col, c.inter)), ref);
      // dg and du differ in scale: each against its own max |ref|.
      const double err_dg =
          check_close(got.narrow(1, c.col, c.inter), ref.narrow(1, 0, c.inter), tolerance(ft), what + " dg");
      const double err_du = check_close(got.narrow(1, c.col + c.inter, c.inter), ref.narrow(1, c.inter, c.inter),
                                        tolerance(ft), what + " du");
      check_outside(got, c.col, 2 * c.inter, what);
      EXPECT_TRUE(at::equal(dm_after, dm)) << what << ": dm changed";
      std::printf("  %-70s max err / max|ref| = %.3g (dg), %.3g (du)\n", what.c_str(), err_dg, err_du);
    }
}

TEST(CudaFusedOps, SwigluMatchesReference) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(13);
  check_glu_forward(kSwiglu);
}

TEST(CudaFusedOps, SwigluBackwardMatchesReference) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(14);
  check_glu_backward(kSwiglu);
}

// GeGLU (Gemma's gelu_pytorch_tanh): ATen's tanh formula in fp32 against at::gelu's on the CPU.
TEST(CudaFusedOps, GegluMatchesReference) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(15);
  check_glu_forward(kGeglu);
}

TEST(CudaFusedOps, GegluBackwardMatchesReference) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(16);
  check_glu_backward(kGeglu);
}

// ---------------------------------------------------------------- the at::Tensor dispatch

// model::rope_inplace & co. on CUDA tensors (the kernels for bf16 / fp16, the reference for
// fp32), strided views as the fused layer passes them, against the CPU fp32 reference.
TEST(CudaFusedOps, TensorApiOnCudaTensors) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "torch sees no CUDA device (or this is a CPU build of torch)";
  torch::manual_seed(15);
  const at::Device cuda(at::kCUDA, 0);
  for (FloatType ft : kTypes) {
    const at::ScalarType dtype = scalar_of(ft);
    const std::string type = name_of(ft);
    // RoPE on the k slice of a [B*T, 3*H*d + 5] q|k|v buffer (odd stride: scalar path) and on an
    // aligned one (vector path).
    for (int64_t pad : {int64_t{0}, int64_t{5}}) {
      const int64_t b = 2, t = 9, h = 4, d = 64, w = 3 * h * d + pad, col = h * d;
      const auto [cos, sin] = make_cos_sin(b, t, d, dtype);
      const at::Tensor wide = sentinel_buffer(b * t, w, col, h * d, dtype, 2.0);
      for (bool backward : {false, true}) {
        at::Tensor wd = wide.to(cuda);
        at::Tensor x = wd.narrow(1, col, h * d).view({b, t, h, d});
        const at::Tensor cd = cos.to(cuda), sd = sin.to(cuda);
        backward ? model::rope_backward_inplace(x, cd, sd) : model::rope_inplace(x, cd, sd);
        at::Tensor ref = f32(wide.narrow(1, col, h * d)).reshape({b, t, h, d});
        backward ? model::rope_backward_inplace_reference(ref, f32(cos), f32(sin))
                 : model::rope_inplace_reference(ref, f32(cos), f32(sin));
        const std::string what = "tensor api rope " + type + (backward ? " backward" : "") + " pad=" + std::to_string(pad);
        const at::Tensor got = wd.cpu();
        check_close(got.narrow(1, col, h * d).reshape({b, t, h, d}), ref, tolerance(ft), what);
        check_outside(got, col, h * d, what);
      }
    }
    // rope_into / rope_backward_into / copy_heads from the q slice of a [B*T, 3*H*d + 8]
    // buffer into a packed tensor: the in-place op's values on the same slice, bit for bit.
    {
      const int64_t b = 2, t = 9, h = 4, d = 64, w = 3 * h * d + 8;
      const auto [cos, sin] = make_cos_sin(b, t, d, dtype);
      const at::Tensor cd = cos.to(cuda), sd = sin.to(cuda);
      const at::Tensor wide = sentinel_buffer(b * t, w, 0, h * d, dtype, 2.0).to(cuda);
      const at::Tensor src = wide.narrow(1, 0, h * d).view({b, t, h, d});
      for (int mode = 0; mode < 3; ++mode) {
        at::Tensor dst = at::empty({b, t, h, d}, src.options());
        at::Tensor want = src.clone();
        if (mode == 0) {
          model::rope_into(dst, src, cd, sd);
          model::rope_inplace(want, cd, sd);
        } else if (mode == 1) {
          model::rope_backward_into(dst, src, cd, sd);
          model::rope_backward_inplace(want, cd, sd);
        } else {
          model::copy_heads(dst, src);
        }
        EXPECT_TRUE(at::equal(dst, want)) << "tensor api rope_into mode " << mode << " " << type;
      }
    }
    // SwiGLU on gu a column slice of [N, 3I + 5], dm a column slice of [N, I + 3].
    const int64_t n = 13, inter = 40, w = 3 * inter + 5, col = 3;
    const at::Tensor gu = sentinel_buffer(n, w, col, 2 * inter, dtype, 3.0);
    const at::Tensor dm = sentinel_buffer(n, inter + 3, 3, inter, dtype, 1.0);
    at::Tensor gud = gu.to(cuda);
    at::Tensor gus = gud.narrow(1, col, 2 * inter);
    const at::Tensor m = model::swiglu(gus);
    EXPECT_TRUE(m.is_cuda() && m.is_contiguous() && m.scalar_type() == dtype);
    const at::Tensor gf = f32(gu.narrow(1, col, 2 * inter));
    check_close(m.cpu(), model::swiglu_reference(gf), tolerance(ft), "tensor api swiglu " + type);
    model::swiglu_backward_inplace(dm.to(cuda).narrow(1, 3, inter), gus);
    at::Tensor ref = gf.clone();
    model::swiglu_backward_inplace_reference(f32(dm.narrow(1, 3, inter)), ref);
    const at::Tensor got = gud.cpu();
    check_close(got.narrow(1, col, inter), ref.narrow(1, 0, inter), tolerance(ft), "tensor api swiglu dg " + type);
    check_close(got.narrow(1, col + inter, inter), ref.narrow(1, inter, inter), tolerance(ft),
                "tensor api swiglu du " + type);
    check_outside(got, col, 2 * inter, "tensor api swiglu backward " + type);
    // GeGLU through model::geglu / geglu_backward_inplace on the same slices.
    at::Tensor gud2 = gu.to(cuda);
    at::Tensor gus2 = gud2.narrow(1, col, 2 * inter);
    const at::Tensor mg = model::geglu(gus2);
    EXPECT_TRUE(mg.is_cuda() && mg.is_contiguous() && mg.scalar_type() == dtype);
    check_close(mg.cpu(), model::geglu_reference(gf), tolerance(ft), "tensor api geglu " + type);
    model::geglu_backward_inplace(dm.to(cuda).narrow(1, 3, inter), gus2);
    at::Tensor gref = gf.clone();
    model::geglu_backward_inplace_reference(f32(dm.narrow(1, 3, inter)), gref);
    const at::Tensor ggot = gud2.cpu();
    check_close(ggot.narrow(1, col, inter), gref.narrow(1, 0, inter), tolerance(ft), "tensor api geglu dg " + type);
    check_close(ggot.narrow(1, col + inter, inter), gref.narrow(1, inter, inter), tolerance(ft),
                "tensor api geglu du " + type);
    check_outside(ggot, col, 2 * inter, "tensor api geglu backward " + type);
  }
}

// ---------------------------------------------------------------- RMSNorm backward + residual

// model::rms_norm_backward_add (the kernel for bf16 / fp16) element-wise against its reference
// run on the same CUDA tensors in fp32: the two differ in the order of the row's sum and in fp32
// rounding, so each element may differ by one rounding of the output dtype (2 ulp allowed, on
// the element's own magnitude). Rows of h a multiple of 8 (vector loads) and not (scalar), one
// row and many, written in place on g.
TEST(CudaFusedOps, RmsNormBackwardAddMatchesReference) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "torch sees no CUDA device (or this is a CPU build of torch)";
  torch::manual_seed(32);
  const at::Device cuda(at::kCUDA, 0);
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
    const double ulp = dtype == at::kBFloat16 ? 1.0 / 128 : 1.0 / 1024;  // spacing at 1.0
    for (const int64_t rows : {int64_t{1}, int64_t{3}, int64_t{257}}) {
      for (const int64_t h : {int64_t{8}, int64_t{1001}, int64_t{2048}, int64_t{4100}}) {
        const std::string what = std::string(c10::toString(dtype)) + " rows=" + std::to_string(rows) + " h=" +
                                 std::to_string(h);
        const at::TensorOptions opt = at::TensorOptions().device(cuda).dtype(dtype);
        const at::Tensor x = at::randn({rows, h}, opt), w = (at::randn({h}, opt) * 0.5 + 1.0).to(dtype);
        const at::Tensor g = at::randn({rows, h}, opt), res = at::randn({rows, h}, opt);
        const at::Tensor rstd = at::rsqrt(x.to(at::kFloat).pow(2).mean(-1, /*keepdim=*/true) + 1e-5);
        const at::Tensor want = model::rms_norm_backward_add_reference(g.clone(), x, w, rstd, res);
        at::Tensor into = g.clone();
        const at::Tensor got = model::rms_norm_backward_add(into, x, w, rstd, res);
        EXPECT_EQ(got.data_ptr(), into.data_ptr()) << what << ": not in place on g";
        const at::Tensor wf = want.to(at::kFloat), diff = (got.to(at::kFloat) - wf).abs();
        const at::Tensor bound = (wf.abs() + 1e-2) * (2 * ulp);
        EXPECT_TRUE(at::all(diff <= bound).item<bool>())
            << what << ": max |diff| " << diff.max().item<float>() << ", worst diff / bound "
            << (diff / bound).max().item<float>();
      }
    }
  }
}

}  // namespace
}  // namespace qlora
