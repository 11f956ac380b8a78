#include "qlora/model/loss.h"

#include <torch/csrc/autograd/custom_function.h>
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cstdlib>
#include <cstring>
#include <string>

#ifdef QLORA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "qlora/kernels.h"
#endif

namespace qlora::model {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// One chunk's logits [n, V] in fp32: the product in the input dtype, then upcast; with
// `softcap` > 0 (Gemma 2's final_logit_softcapping) then cap · tanh(logits / cap).
at::Tensor chunk_logits(const at::Tensor& h, const at::Tensor& w, double softcap) {
  at::Tensor logits = at::matmul(h, w.t()).to(at::kFloat);
  return softcap > 0 ? at::tanh(logits / softcap) * softcap : logits;
}

// Note [chunked cross-entropy]
// Forward, per chunk of tokens: logits (fp32), lse = logsumexp(logits), loss =
// lse - logits[label] summed over counted tokens. Only lse [N] (fp32) is kept.
// Backward, per chunk: softmax = exp(logits - lse), minus one at the label,
// zero for ignored tokens, times the incoming scalar gradient; that is
// d loss / d logits. It is cast to the input dtype (as autograd through
// `.float()` would) and multiplied back: grad_hidden = dlogits · W, and
// grad_W += dlogitsᵀ · hidden, accumulated in fp32 across chunks. With a soft cap
// z = c · tanh(x / c) the gradient passes through dz/dx = 1 - (z / c)² first.
struct ChunkedCrossEntropy : public torch::autograd::Function<ChunkedCrossEntropy> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                            const at::Tensor& labels, int64_t chunk, double softcap) {
    const int64_t n = hidden.size(0);
    at::Tensor valid = labels.ne(kIgnoreIndex);                     // [N] bool
    at::Tensor safe = at::where(valid, labels, at::zeros_like(labels));  // [N] int64, ignored -> 0
    at::Tensor lse = at::empty({n}, hidden.options().dtype(at::kFloat));
    at::Tensor total = at::zeros({}, hidden.options().dtype(at::kFloat));
    for (int64_t s = 0; s < n; s += chunk) {
      const int64_t len = std::min(chunk, n - s);
      at::Tensor logits = chunk_logits(hidden.narrow(0, s, len), weight, softcap);  // [len, V]
      at::Tensor l = at::logsumexp(logits, {1});                          // [len]
      lse.narrow(0, s, len).copy_(l);
      at::Tensor target = logits.gather(1, safe.narrow(0, s, len).unsqueeze(1)).squeeze(1);
      total += at::where(valid.narrow(0, s, len), l - target, at::zeros_like(l)).sum();
    }
    ctx->save_for_backward({hidden, weight, safe, valid, lse});
    ctx->saved_data["chunk"] = chunk;
    ctx->saved_data["softcap"] = softcap;
    return total;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& hidden = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& safe = saved[2];
    const at::Tensor& valid = saved[3];
    const at::Tensor& lse = saved[4];
    const int64_t chunk = ctx->saved_data["chunk"].toInt();
    const double softcap = ctx->saved_data["softcap"].toDouble();
    const at::Tensor g = grad_outputs[0].to(at::kFloat);  // []
    const bool need_hidden = ctx->needs_input_grad(0);
    const bool need_weight = ctx->needs_input_grad(1);

    const int64_t n = hidden.size(0);
    at::Tensor grad_hidden = need_hidden ? at::empty_like(hidden) : at::Tensor();
    at::Tensor grad_weight = need_weight ? at::zeros(weight.sizes(), weight.options().dtype(at::kFloat)) : at::Tensor();
    for (int64_t s = 0; s < n && (need_hidden || need_weight); s += chunk) {
      const int64_t len = std::min(chunk, n - s);
      at::Tensor h = hidden.narrow(0, s, len);
      at::Tensor logits = chunk_logits(h, weight, softcap);                    // [len, V]
      at::Tensor d = at::exp(logits - lse.narrow(0, s, len).unsqueeze(1));    // softmax
      at::Tensor idx = safe.narrow(0, s, len).unsqueeze(1);
      d.scatter_add_(1, idx, at::full({len, 1}, -1.0f, d.options()));
      d.mul_((valid.narrow(0, s, len).to(at::kFloat) * g).unsqueeze(1));
      if (softcap > 0) d.mul_(1 - (logits / softcap).square());
      at::Tensor dl = d.to(hidden.scalar_type());
      if (need_hidden) grad_hidden.narrow(0, s, len).copy_(at::matmul(dl, weight));
      if (need_weight) grad_weight.add_(at::matmul(dl.t(), h).to(at::kFloat));
    }
    if (need_weight) grad_weight = grad_weight.to(weight.scalar_type());
    return {grad_hidden, grad_weight, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Note [fused cross-entropy]
// On GPUs, with 16-bit hidden states and a frozen lm_head (the QLoRA case: only
// d loss / d hidden is wanted), the forward pass does per chunk of tokens:
//   logits = hidden · Wᵀ         [len, V] in the compute dtype (never fp32)
//   kernels::cross_entropy_rows  fp32 lse and loss per row, and the logits
//                                overwritten by softmax - onehot (the gradient of
//                                the summed loss), rounded once to 16 bits
//   grad_hidden[chunk] = G · W   [len, h], into a buffer [N, h] kept for backward
// and backward returns grad_hidden times the incoming scalar (on the device:
// no host sync). Against ChunkedCrossEntropy this saves the second logits GEMM
// and the fp32 [len, V] temporaries (upcast, exp, subtract, scatter, cast: the
// ~40 ms of elementwise kernels an H100 step spent here), in one read-read-write
// pass over 16-bit logits.
// The trade, memory: the [N, h] gradient (16-bit) is kept from forward to
// backward instead of being recomputed there. The reference saves `hidden` (the
// same size) for its backward and this path does not, so what autograd holds
// between the passes is no larger; but the gradient exists from the forward on,
// also in a forward whose backward never runs. The logits chunk is 16-bit
// ([len, V], half the bytes of the reference's fp32 copy, and none of its fp32
// temporaries), and G overwrites it in place.
// The numerics: the logits were a 16-bit GEMM output in either path, and the
// gradient is rounded to 16 bits once, as the reference also casts `d` to the
// compute dtype before its matmul. The one difference is where the incoming
// scalar (1/count, the loss scale) enters: the reference multiplies d by it in
// fp32 before the rounding; here G · W (rounded to 16 bits) is multiplied by it in
// fp32 and rounded again: one more half-ulp rounding of grad_hidden.
// In fp16 the unscaled softmax is what is rounded: probabilities below 2^-24 flush
// to zero and those below 2^-14 keep fewer bits, where the reference rounds them
// after multiplying by the scalar (1/count times the loss scale); their share of
// grad_hidden is at most V * 2^-25 * max|W| per element. bf16 has fp32's range.
// Ignored tokens' rows cost the same as counted ones (their gradient row is zero).
#ifdef QLORA_WITH_CUDA
struct FusedCrossEntropy : public torch::autograd::Function<FusedCrossEntropy> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                            const at::Tensor& labels, int64_t chunk) {
    const int64_t n = hidden.size(0);
    const int64_t vocab = weight.size(0);
    const kernels::FloatType type =
        hidden.scalar_type() == at::kBFloat16 ? kernels::FloatType::kBF16 : kernels::FloatType::kF16;
    const c10::cuda::CUDAGuard guard(hidden.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(hidden.device().index()).stream();
    const at::Tensor lab = labels.to(hidden.device()).contiguous();            // [N] int64
    at::Tensor grad_hidden = at::empty(hidden.sizes(), hidden.options());     // [N, h], contiguous
    at::Tensor lse = at::empty({n}, hidden.options().dtype(at::kFloat));      // [N]
    at::Tensor loss = at::empty({n}, hidden.options().dtype(at::kFloat));     // [N]
    const at::Tensor wt = weight.t();                                          // [h, V]
    for (int64_t s = 0; s < n; s += chunk) {
      const int64_t len = std::min(chunk, n - s);
      at::Tensor logits = at::mm(hidden.narrow(0, s, len), wt);  // [len, V] 16-bit, becomes G
      TORCH_CHECK(logits.stride(1) == 1, "cross_entropy: the logits GEMM gave a non-row-major result");
      const int rc = kernels::cross_entropy_rows(logits.data_ptr(), type, len, vocab, logits.stride(0),
                                                 lab.const_data_ptr<int64_t>() + s, kIgnoreIndex,
                                                 lse.data_ptr<float>() + s, loss.data_ptr<float>() + s, stream);
      TORCH_CHECK(rc == 0, "cross_entropy: the rows kernel failed: ", kernels::cuda_error_string(rc));
      at::Tensor out = grad_hidden.narrow(0, s, len);  // contiguous rows of a contiguous buffer
      at::mm_out(out, logits, weight);                 // [len, h] = G · W
    }
    ctx->save_for_backward({grad_hidden});
    return loss.sum();
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor grad_hidden = ctx->get_saved_variables()[0];  // [N, h] 16-bit
    // In fp32: a 16-bit tensor times a 0-dim fp32 CUDA tensor would round the scalar to 16 bits.
    const at::Tensor g = grad_outputs[0].to(at::kFloat);
    at::Tensor grad = grad_hidden.to(at::kFloat).mul_(g).to(grad_hidden.scalar_type());
    return {grad, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};
#endif

bool reference_forced_by_env() {
  static const bool forced = [] {
    const char* v = std::getenv("QLORA_REFERENCE_LOSS");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return forced;
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels) {
  TORCH_CHECK(hidden.dim() == 2, "cross_entropy: hidden must be [N, h], got ", hidden.dim(), "-D");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1), "cross_entropy: weight must be [V, ",
              hidden.size(1), "], got ", weight.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0), "cross_entropy: labels must be [",
              hidden.size(0), "], got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "cross_entropy: labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "cross_entropy: hidden is ", hidden.scalar_type(),
              " but the weight is ", weight.scalar_type());
}

}  // namespace

bool fused_cross_entropy_applies(const at::Tensor& hidden, const at::Tensor& weight) {
#ifdef QLORA_WITH_CUDA
  const bool half = hidden.scalar_type() == at::kBFloat16 || hidden.scalar_type() == at::kHalf;
  return hidden.is_cuda() && half && at::GradMode::is_enabled() && hidden.requires_grad() &&
         !weight.requires_grad();
#else
  (void)hidden;
  (void)weight;
  return false;
#endif
}

CrossEntropyRows cross_entropy_rows_reference(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.dim() == 2, "cross_entropy_rows_reference: logits must be [n, V], got ", logits.dim(), "-D");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0) && labels.scalar_type() == at::kLong,
              "cross_entropy_rows_reference: labels must be [", logits.size(0), "] int64, got ", labels.sizes(), " ",
              labels.scalar_type());
  const at::Tensor x = logits.to(at::kFloat);                             // [n, V]
  const at::Tensor valid = labels.ne(kIgnoreIndex);                       // [n] bool
  const at::Tensor safe = at::where(valid, labels, at::zeros_like(labels)).unsqueeze(1);  // [n, 1]
  CrossEntropyRows out;
  out.lse = at::logsumexp(x, {1});                                        // [n]
  const at::Tensor target = x.gather(1, safe).squeeze(1);                 // [n]
  out.loss = at::where(valid, out.lse - target, at::zeros_like(out.lse));
  out.grad = at::exp(x - out.lse.unsqueeze(1));
  out.grad.scatter_add_(1, safe, at::full({x.size(0), 1}, -1.0f, out.grad.options()));
  out.grad.mul_(valid.to(at::kFloat).unsqueeze(1));
  return out;
}

TokenLoss chunked_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                int64_t chunk, double softcap) {
  return chunked_cross_entropy(hidden, weight, labels, chunk, LossPath::kAuto, softcap);
}

at::Tensor upload(const at::Tensor& host, c10::Device device) {
  if (!device.is_cuda() || !host.is_cpu()) return host.to(device);
  return host.pin_memory().to(device, /*non_blocking=*/true);
}

TokenLoss chunked_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& host_or_device_labels,
                                int64_t chunk, LossPath path, double softcap) {
  check_inputs(hidden, weight, host_or_device_labels);
  TORCH_CHECK(chunk > 0, "cross_entropy: chunk must be positive, got ", chunk);
  const int64_t vocab = weight.size(0);
  // One cheap check instead of a device-side assert deep inside gather: on the host when the
  // labels are there (then uploaded without blocking the host), else at the cost of a device sync.
  {
    const at::Tensor& l = host_or_device_labels;
    const at::Tensor bad = at::logical_and(l.ne(kIgnoreIndex), at::logical_or(l.lt(0), l.ge(vocab)));
    TORCH_CHECK(!bad.any().item<bool>(), "cross_entropy: a label is outside [0, ", vocab, ") and is not ",
                kIgnoreIndex);
  }
  const at::Tensor labels = host_or_device_labels.device() == hidden.device()
                                ? host_or_device_labels
                                : upload(host_or_device_labels, hidden.device());
  const bool fused_applies = fused_cross_entropy_applies(hidden, weight) && softcap <= 0;  // the kernel has no cap
  TORCH_CHECK(path != LossPath::kFused || fused_applies,
              "cross_entropy: the fused path needs bf16 / fp16 hidden states on a CUDA device (in a CUDA build) "
              "that require grad, with grad mode on and an lm_head weight that does not; got ",
              hidden.scalar_type(), " on ", hidden.device(), ", hidden.requires_grad=", hidden.requires_grad(),
              ", weight.requires_grad=", weight.requires_grad(), ", grad mode ", at::GradMode::is_enabled());
  const bool fused = path == LossPath::kFused || (path == LossPath::kAuto && fused_applies && !reference_forced_by_env());
  TokenLoss out;
#ifdef QLORA_WITH_CUDA
  out.sum = fused ? FusedCrossEntropy::apply(hidden, weight, labels, chunk)
                  : ChunkedCrossEntropy::apply(hidden, weight, labels, chunk, softcap);
#else
  (void)fused;  // never true without CUDA
  out.sum = ChunkedCrossEntropy::apply(hidden, weight, labels, chunk, softcap);
#endif
  out.count = labels.ne(kIgnoreIndex).sum();
  return out;
}

TokenLoss dense_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                              double softcap) {
  check_inputs(hidden, weight, labels);
  at::Tensor logits = chunk_logits(hidden, weight, softcap);
  TokenLoss out;
  out.sum = at::cross_entropy_loss(logits, labels, {}, at::Reduction::Sum, kIgnoreIndex);
  out.count = labels.ne(kIgnoreIndex).sum();
  return out;
}

at::Tensor shift_labels(const at::Tensor& labels) {
  TORCH_CHECK(labels.dim() == 2, "shift_labels: labels must be [B, T], got ", labels.dim(), "-D");
  at::Tensor pad = at::full({labels.size(0), 1}, kIgnoreIndex, labels.options());
  return at::cat({labels.narrow(1, 1, labels.size(1) - 1), pad}, 1);
}

}  // namespace qlora::model
