// Benchmarks of the NF4 and 8-bit AdamW kernels (kernels/), one JSON object a line on stdout:
//   {"bench":"nf4_dequant", ...}  dequantize to bf16 vs a device-to-device copy of the output
//                                 bytes, same run (target: ratio >= 0.85)
//   {"bench":"nf4_gemv", ...}     the fused GEMV at M = 1, 4, 16 vs dequantize + cuBLAS
//                                 (at::matmul) and vs cuBLAS on the already-dequantized weight
//   {"bench":"adamw8bit", ...}    the fused 8-bit AdamW step: its bytes moved / time vs copy
//   {"bench":"lora_dropout", ...} LoRA dropout of q, k, v's shared input (three copies, p 0.05;
//                                 Note [LoRA dropout kernel]): bytes moved / time vs copy
//   {"bench":"swiglu_dropout", ...} SwiGLU and down_proj's LoRA dropout in one pass (Note
//                                 [SwiGLU with dropout]) vs swiglu then lora_dropout, with and
//                                 without m (forward / recompute)
// Timing: CUDA events around each repeat, the L2 flushed between repeats (a 256 MiB memset),
// warm-up first, the median of kRepeats. Weight values are random bytes (speed does not depend
// on them). Needs a GPU; without one it prints one line saying so and exits 0.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <tuple>
#include <vector>

#include "qlora/kernels.h"
#include "qlora/model/fused_ops.h"
#include "qlora/optim/adamw_ref.h"
#include "qlora/quant/nf4_ref.h"

namespace {

using qlora::kernels::FloatType;

constexpr int kWarmup = 5;
constexpr int kRepeats = 50;
constexpr int64_t kFlushBytes = int64_t{256} << 20;  // > the 50 MiB L2 of an H100

struct Shape {
  const char* model;
  int64_t out, in;
};
// Llama-3.2-1B: q/o 2048x2048, gate/up 8192x2048, down 2048x8192; Llama-3.1-8B: q/o 4096x4096,
// gate/up 14336x4096, down 4096x14336.
const Shape kShapes[] = {{"1B", 2048, 2048}, {"1B", 8192, 2048}, {"1B", 2048, 8192},
                         {"8B", 4096, 4096}, {"8B", 14336, 4096}, {"8B", 4096, 14336}};

void check(int rc, const char* what) {
  if (rc != 0) {
    std::fprintf(stderr, "bench_nf4: %s failed: %s\n", what, qlora::kernels::cuda_error_string(rc));
    std::exit(1);
  }
}

// Median milliseconds of `fn` on `stream`, the L2 flushed before each repeat.
double time_ms(cudaStream_t stream, at::Tensor& flush, const std::function<void()>& fn) {
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  for (int i = 0; i < kWarmup; ++i) fn();
  std::vector<float> ms;
  for (int i = 0; i < kRepeats; ++i) {
    check(cudaMemsetAsync(flush.data_ptr(), i & 0xFF, flush.numel(), stream), "L2 flush");
    cudaEventRecord(start, stream);
    fn();
    cudaEventRecord(stop, stream);
    cudaEventSynchronize(stop);
    float t = 0.0f;
    cudaEventElapsedTime(&t, start, stop);
    ms.push_back(t);
  }
  check(static_cast<int>(cudaGetLastError()), "a timed launch");
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::nth_element(ms.begin(), ms.begin() + kRepeats / 2, ms.end());
  return ms[kRepeats / 2];
}

double gbps(double bytes, double ms) { return bytes / (ms * 1e-3) / 1e9; }

// A double-quantized NF4 weight of `n` elements with random bytes, on the GPU.
struct RandomNf4 {
  at::Tensor packed, absmax_q, absmax2, code2;
  qlora::kernels::Nf4Scales scales;
  int64_t bytes = 0;  // what a dequantize reads
  explicit RandomNf4(int64_t n) {
    const auto u8 = at::TensorOptions().dtype(at::kByte).device(at::kCUDA);
    const auto f32 = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA);
    const int64_t blocks = qlora::quant::ref::num_blocks(n, 64);
    packed = at::randint(0, 256, {qlora::quant::ref::packed_bytes(n)}, u8);
    absmax_q = at::randint(0, 256, {blocks}, u8);
    absmax2 = at::rand({qlora::quant::ref::num_blocks(blocks, 256)}, f32) * 0.1;
    code2 = at::from_blob(const_cast<float*>(qlora::quant::ref::dynamic_map()), {256}, at::kFloat).to(at::kCUDA);
    scales.absmax_q = absmax_q.data_ptr<uint8_t>();
    scales.absmax2 = absmax2.data_ptr<float>();
    scales.code2 = code2.data_ptr<float>();
    scales.offset = 0.05f;
    bytes = packed.numel() + absmax_q.numel() + absmax2.numel() * 4 + 256 * 4;
  }
};

void bench_dequant(cudaStream_t stream, at::Tensor& flush) {
  for (const Shape& s : kShapes) {
    const int64_t n = s.out * s.in;
    RandomNf4 w(n);
    at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA));
    at::Tensor copy_dst = at::empty_like(out);
    const double deq = time_ms(stream, flush, [&] {
      check(qlora::kernels::nf4_dequantize(w.packed.data_ptr<uint8_t>(), w.scales, n, out.data_ptr(),
                                           FloatType::kBF16, stream),
            "nf4_dequantize");
    });
    const double out_bytes = static_cast<double>(n) * 2;
    const double copy = time_ms(stream, flush, [&] {
      check(static_cast<int>(cudaMemcpyAsync(copy_dst.data_ptr(), out.data_ptr(), static_cast<size_t>(out_bytes),
                                             cudaMemcpyDeviceToDevice, stream)),
            "copy");
    });
    const double deq_gbps = gbps(static_cast<double>(w.bytes) + out_bytes, deq);
    const double copy_gbps = gbps(2 * out_bytes, copy);
    std::printf(
        "{\"bench\":\"nf4_dequant\",\"model\":\"%s\",\"out\":%lld,\"in\":%lld,\"dtype\":\"bf16\","
        "\"ms\":%.4f,\"gbps\":%.1f,\"copy_ms\":%.4f,\"copy_gbps\":%.1f,\"ratio_to_copy\":%.3f,\"target\":0.85}\n",
        s.model, static_cast<long long>(s.out), static_cast<long long>(s.in), deq, deq_gbps, copy, copy_gbps,
        deq_gbps / copy_gbps);
    std::fflush(stdout);
  }
}

void bench_gemv(cudaStream_t stream, at::Tensor& flush) {
  for (const Shape& s : kShapes) {
    const int64_t n = s.out * s.in;
    RandomNf4 w(n);
    at::Tensor wdeq = at::empty({s.out, s.in}, at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA));
    check(qlora::kernels::nf4_dequantize(w.packed.data_ptr<uint8_t>(), w.scales, n, wdeq.data_ptr(),
                                         FloatType::kBF16, stream),
          "nf4_dequantize");
    for (int64_t m : {1, 4, 16}) {
      const at::Tensor x = at::randn({m, s.in}, at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA));
      at::Tensor y = at::empty({m, s.out}, x.options());
      const double fused = time_ms(stream, flush, [&] {
        check(qlora::kernels::nf4_gemv(x.data_ptr(), FloatType::kBF16, m, s.in, w.packed.data_ptr<uint8_t>(),
                                       w.scales, s.out, y.data_ptr(), stream),
              "nf4_gemv");
      });
      const double deq_mm = time_ms(stream, flush, [&] {
        check(qlora::kernels::nf4_dequantize(w.packed.data_ptr<uint8_t>(), w.scales, n, wdeq.data_ptr(),
                                             FloatType::kBF16, stream),
              "nf4_dequantize");
        at::matmul_out(y, x, wdeq.t());
      });
      const double dense = time_ms(stream, flush, [&] { at::matmul_out(y, x, wdeq.t()); });
      const double bytes = static_cast<double>(w.bytes) + static_cast<double>(m * (s.in + s.out) * 2);
      std::printf(
          "{\"bench\":\"nf4_gemv\",\"model\":\"%s\",\"out\":%lld,\"in\":%lld,\"m\":%lld,\"ms\":%.4f,"
          "\"gbps\":%.1f,\"dequant_matmul_ms\":%.4f,\"speedup_vs_dequant_matmul\":%.2f,"
          "\"dense_bf16_matmul_ms\":%.4f,\"speedup_vs_dense\":%.2f}\n",
          s.model, static_cast<long long>(s.out), static_cast<long long>(s.in), static_cast<long long>(m), fused,
          gbps(bytes, fused), deq_mm, deq_mm / fused, dense, dense / fused);
      std::fflush(stdout);
    }
  }
}

void bench_adamw(cudaStream_t stream, at::Tensor& flush) {
  qlora::kernels::DynamicMaps maps;
  std::memcpy(maps.signed_map, qlora::optim::signed_dynamic_map().data(), sizeof maps.signed_map);
  std::memcpy(maps.unsigned_map, qlora::optim::unsigned_dynamic_map().data(), sizeof maps.unsigned_map);
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA);
  const auto u8 = at::TensorOptions().dtype(at::kByte).device(at::kCUDA);
  // 1B, r 16 on q,k,v,o: ~3.4M LoRA parameters; all-linear 8B r 16: ~42M; and one large tensor.
  for (int64_t n : {int64_t{3407872}, int64_t{41943040}, int64_t{134217728}}) {
    for (FloatType gt : {FloatType::kF32, FloatType::kBF16}) {
      at::Tensor param = at::randn({n}, f32) * 0.02;
      at::Tensor grad = at::randn({n}, f32) * 1e-3;
      if (gt == FloatType::kBF16) grad = grad.to(at::kBFloat16);
      at::Tensor q1 = at::full({n}, 128, u8), q2 = at::zeros({n}, u8);
      const int64_t blocks = qlora::optim::quant_blocks(n);
      at::Tensor a1 = at::full({blocks}, 1e-4, f32), a2 = at::full({blocks}, 1e-8, f32);
      int64_t step = 0;
      const double ms = time_ms(stream, flush, [&] {
        const auto s = qlora::kernels::adamw8bit_scalars(2e-4, 0.9, 0.999, 1e-8, 0.01, ++step);
        check(qlora::kernels::adamw8bit_step(param.data_ptr<float>(), grad.data_ptr(), gt, q1.data_ptr<uint8_t>(),
                                             q2.data_ptr<uint8_t>(), a1.data_ptr<float>(), a2.data_ptr<float>(), n, s,
                                             maps, stream),
              "adamw8bit_step");
      });
      // Read: param, grad, both codes, both absmax; written: param, both codes, both absmax.
      const double gsize = gt == FloatType::kF32 ? 4 : 2;
      const double bytes = static_cast<double>(n) * (4 + gsize + 2 + 4 + 2) + static_cast<double>(blocks) * 16;
      at::Tensor src = at::empty({static_cast<int64_t>(bytes / 2)}, u8), dst = at::empty_like(src);
      const double copy = time_ms(stream, flush, [&] {
        check(static_cast<int>(cudaMemcpyAsync(dst.data_ptr(), src.data_ptr(), src.numel(), cudaMemcpyDeviceToDevice,
                                               stream)),
              "copy");
      });
      const double g = gbps(bytes, ms), copy_g = gbps(2.0 * static_cast<double>(src.numel()), copy);
      std::printf(
          "{\"bench\":\"adamw8bit\",\"n\":%lld,\"grad\":\"%s\",\"ms\":%.4f,\"bytes\":%.0f,\"gbps\":%.1f,"
          "\"copy_gbps\":%.1f,\"ratio_to_copy\":%.3f}\n",
          static_cast<long long>(n), gt == FloatType::kF32 ? "f32" : "bf16", ms, bytes, g, copy_g, g / copy_g);
      std::fflush(stdout);
    }
  }
}

void bench_dropout(cudaStream_t stream, at::Tensor& flush) {
  const double p = 0.05;
  // The q/k/v input of a micro batch: 8 x 2048 tokens of Llama-3.2-1B, 2 x 2048 of Llama-3.1-8B.
  for (const auto& [model, tokens, hidden] : {std::tuple{"1B", 16384, 2048}, std::tuple{"8B", 4096, 4096}}) {
    const int64_t n = int64_t{tokens} * hidden;
    const at::Tensor x = at::randn({n}, at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA));
    std::vector<at::Tensor> outs, masks;
    void* out_ptrs[3];
    uint8_t* mask_ptrs[3];
    for (int k = 0; k < 3; ++k) {
      outs.push_back(at::empty_like(x));
      masks.push_back(at::empty({(n + 7) / 8}, x.options().dtype(at::kByte)));
      out_ptrs[k] = outs.back().data_ptr();
      mask_ptrs[k] = masks.back().data_ptr<uint8_t>();
    }
    const double bytes = static_cast<double>(n) * (2 + 3 * 2) + 3.0 * static_cast<double>((n + 7) / 8);
    // A device-to-device copy of about as many bytes (read + write 8n).
    const at::Tensor src = at::empty({n * 2}, x.options()), dst = at::empty_like(src);
    const double copy = time_ms(stream, flush, [&] {
      check(static_cast<int>(cudaMemcpyAsync(dst.data_ptr(), src.data_ptr(), static_cast<size_t>(n) * 4,
                                             cudaMemcpyDeviceToDevice, stream)),
            "copy");
    });
    const double copy_g = gbps(static_cast<double>(n) * 8, copy);
    qlora::kernels::DropoutDraws draws;
    draws.seed = 1234;
    draws.offset[0] = 0;
    draws.offset[1] = 4;
    draws.offset[2] = 8;
    const uint32_t threshold = qlora::model::dropout_threshold(p);
    const double ms = time_ms(stream, flush, [&] {
      check(qlora::kernels::lora_dropout(x.data_ptr(), n, FloatType::kBF16, 3, out_ptrs, mask_ptrs, draws, threshold,
                                         static_cast<float>(1.0 / (1.0 - p)), stream),
            "lora_dropout");
    });
    std::printf(
        "{\"bench\":\"lora_dropout\",\"model\":\"%s\",\"tokens\":%d,\"hidden\":%d,\"copies\":3,\"ms\":%.4f,"
        "\"gbps\":%.1f,\"copy_gbps\":%.1f,\"ratio_to_copy\":%.3f}\n",
        model, tokens, hidden, ms, gbps(bytes, ms), copy_g, gbps(bytes, ms) / copy_g);
    std::fflush(stdout);
  }
}

// The fused layer's backward tails at a micro batch's shape (1B 8 x 2048, 8B 2 x 2048 tokens):
// - rms_norm_backward_add (Note [RMSNorm backward add]) against what it replaced, ATen's
//   _fused_rms_norm_backward then an add;
// - dropout_backward_sum of q, k, v's three terms (Note [dropout backward sum]) against three
//   one-term calls.
// The same operands for both sides; each timed after an L2 flush. The outputs are written in
// place, so a timed run starts from the previous one's result: the values differ, the traffic
// does not.
void bench_backward_tails(cudaStream_t stream, at::Tensor& flush) {
  const double p = 0.05, scale = 1.0 / (1.0 - p);
  for (const auto& [model, tokens, hidden] : {std::tuple{"1B", 16384, 2048}, std::tuple{"8B", 4096, 4096}}) {
    const at::TensorOptions opt = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
    const at::Tensor x = at::randn({tokens, hidden}, opt), w = at::ones({hidden}, opt);
    const at::Tensor res = at::randn({tokens, hidden}, opt);
    at::Tensor g = at::randn({tokens, hidden}, opt);
    const at::Tensor rstd = at::rsqrt(x.to(at::kFloat).pow(2).mean(-1, /*keepdim=*/true) + 1e-5);
    const double ours = time_ms(stream, flush, [&] { qlora::model::rms_norm_backward_add(g, x, w, rstd, res); });
    const double aten = time_ms(stream, flush, [&] {
      std::get<0>(at::_fused_rms_norm_backward(g, x, {hidden}, rstd, w, {true, false})).add_(res);
    });
    std::printf(
        "{\"bench\":\"rms_norm_backward_add\",\"model\":\"%s\",\"tokens\":%d,\"hidden\":%d,\"ms\":%.4f,"
        "\"aten_norm_backward_then_add_ms\":%.4f,\"speedup\":%.2f}\n",
        model, tokens, hidden, ours, aten, aten / ours);
    std::vector<at::Tensor> d, bits;
    for (int k = 0; k < 3; ++k) {
      d.push_back(at::randn({tokens * int64_t{hidden}}, opt));
      bits.push_back(qlora::model::lora_dropout(d.back(), 1, p).front().bits);
    }
    at::Tensor acc = at::randn({tokens * int64_t{hidden}}, opt);
    const double one_pass = time_ms(stream, flush, [&] { qlora::model::dropout_backward_sum(acc, d, bits, scale); });
    const double calls = time_ms(stream, flush, [&] {
      for (int k = 0; k < 3; ++k) qlora::model::dropout_backward_add(acc, d[k], bits[k], scale);
    });
    std::printf(
        "{\"bench\":\"dropout_backward_sum\",\"model\":\"%s\",\"tokens\":%d,\"hidden\":%d,\"terms\":3,\"ms\":%.4f,"
        "\"three_calls_ms\":%.4f,\"speedup\":%.2f}\n",
        model, tokens, hidden, one_pass, calls, calls / one_pass);
    std::fflush(stdout);
  }
}

// SwiGLU with down_proj's LoRA dropout (Note [SwiGLU with dropout]) at a micro batch's shape
// (1B 4 x 1024 tokens, the all-linear row; 8B 2 x 2048), against the two kernels it replaces:
// the forward keeps m, a recompute does not.
void bench_swiglu_dropout(cudaStream_t stream, at::Tensor& flush) {
  const double p = 0.05;
  for (const auto& [model, tokens, inter] : {std::tuple{"1B", 4096, 8192}, std::tuple{"8B", 4096, 14336}}) {
    const at::TensorOptions opt = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
    const at::Tensor gu = at::randn({tokens, 2 * int64_t{inter}}, opt);
    for (const bool keep_m : {true, false}) {
      const double fused =
          time_ms(stream, flush, [&] { (void)qlora::model::swiglu_lora_dropout(gu, p, 1234, 0, keep_m); });
      const double two = time_ms(stream, flush, [&] {
        const at::Tensor m = qlora::model::swiglu(gu);
        (void)qlora::model::lora_dropout(m, p, 1234, {0});
      });
      std::printf(
          "{\"bench\":\"swiglu_dropout\",\"model\":\"%s\",\"tokens\":%d,\"inter\":%d,\"keep_m\":%s,"
          "\"ms\":%.4f,\"two_kernels_ms\":%.4f,\"speedup\":%.2f}\n",
          model, tokens, inter, keep_m ? "true" : "false", fused, two, two / fused);
      std::fflush(stdout);
    }
  }
}

}  // namespace

int main() {
  qlora::kernels::DeviceInfo dev[1];
  char reason[256];
  if (qlora::kernels::query_devices(dev, 1, reason, sizeof reason) == 0) {
    std::printf("{\"bench\":\"nf4\",\"skipped\":\"no GPU: %s\"}\n", reason);
    return 0;
  }
  std::printf("{\"bench\":\"nf4_device\",\"name\":\"%s\",\"sms\":%d,\"cc\":\"%d.%d\",\"repeats\":%d}\n", dev[0].name,
              dev[0].multiprocessors, dev[0].cc_major, dev[0].cc_minor, kRepeats);
  const c10::cuda::CUDAGuard guard(c10::Device(c10::kCUDA, 0));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(0).stream();
  at::Tensor flush = at::empty({kFlushBytes}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA));
  bench_dequant(stream, flush);
  bench_gemv(stream, flush);
  bench_adamw(stream, flush);
  bench_dropout(stream, flush);
  bench_swiglu_dropout(stream, flush);
  bench_backward_tails(stream, flush);
  return 0;
}
