#include "qlora/model/loss.h"

#include <torch/csrc/autograd/custom_function.h>
#include <ATen/ATen.h>

#include <string>

namespace qlora::model {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// One chunk's logits [n, V] in fp32: the product in the input dtype, then upcast.
at::Tensor chunk_logits(const at::Tensor& h, const at::Tensor& w) { return at::matmul(h, w.t()).to(at::kFloat); }

// Note [chunked cross-entropy]
// Forward, per chunk of tokens: logits (fp32), lse = logsumexp(logits), loss =
// lse - logits[label] summed over counted tokens. Only lse [N] (fp32) is kept.
// Backward, per chunk: softmax = exp(logits - lse), minus one at the label,
// zero for ignored tokens, times the incoming scalar gradient; that is
// d loss / d logits. It is cast to the input dtype (as autograd through
// `.float()` would) and multiplied back: grad_hidden = dlogits · W, and
// grad_W += dlogitsᵀ · hidden, accumulated in fp32 across chunks.
struct ChunkedCrossEntropy : public torch::autograd::Function<ChunkedCrossEntropy> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                            const at::Tensor& labels, int64_t chunk) {
    const int64_t n = hidden.size(0);
    at::Tensor valid = labels.ne(kIgnoreIndex);                     // [N] bool
    at::Tensor safe = at::where(valid, labels, at::zeros_like(labels));  // [N] int64, ignored -> 0
    at::Tensor lse = at::empty({n}, hidden.options().dtype(at::kFloat));
    at::Tensor total = at::zeros({}, hidden.options().dtype(at::kFloat));
    for (int64_t s = 0; s < n; s += chunk) {
      const int64_t len = std::min(chunk, n - s);
      at::Tensor logits = chunk_logits(hidden.narrow(0, s, len), weight);  // [len, V]
      at::Tensor l = at::logsumexp(logits, {1});                          // [len]
      lse.narrow(0, s, len).copy_(l);
      at::Tensor target = logits.gather(1, safe.narrow(0, s, len).unsqueeze(1)).squeeze(1);
      total += at::where(valid.narrow(0, s, len), l - target, at::zeros_like(l)).sum();
    }
    ctx->save_for_backward({hidden, weight, safe, valid, lse});
    ctx->saved_data["chunk"] = chunk;
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
    const at::Tensor g = grad_outputs[0].to(at::kFloat);  // []
    const bool need_hidden = ctx->needs_input_grad(0);
    const bool need_weight = ctx->needs_input_grad(1);

    const int64_t n = hidden.size(0);
    at::Tensor grad_hidden = need_hidden ? at::empty_like(hidden) : at::Tensor();
    at::Tensor grad_weight = need_weight ? at::zeros(weight.sizes(), weight.options().dtype(at::kFloat)) : at::Tensor();
    for (int64_t s = 0; s < n && (need_hidden || need_weight); s += chunk) {
      const int64_t len = std::min(chunk, n - s);
      at::Tensor h = hidden.narrow(0, s, len);
      at::Tensor logits = chunk_logits(h, weight);                             // [len, V]
      at::Tensor d = at::exp(logits - lse.narrow(0, s, len).unsqueeze(1));    // softmax
      at::Tensor idx = safe.narrow(0, s, len).unsqueeze(1);
      d.scatter_add_(1, idx, at::full({len, 1}, -1.0f, d.options()));
      d.mul_((valid.narrow(0, s, len).to(at::kFloat) * g).unsqueeze(1));
      at::Tensor dl = d.to(hidden.scalar_type());
      if (need_hidden) grad_hidden.narrow(0, s, len).copy_(at::matmul(dl, weight));
      if (need_weight) grad_weight.add_(at::matmul(dl.t(), h).to(at::kFloat));
    }
    if (need_weight) grad_weight = grad_weight.to(weight.scalar_type());
    return {grad_hidden, grad_weight, at::Tensor(), at::Tensor()};
  }
};

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

TokenLoss chunked_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                int64_t chunk) {
  check_inputs(hidden, weight, labels);
  TORCH_CHECK(chunk > 0, "cross_entropy: chunk must be positive, got ", chunk);
  const int64_t vocab = weight.size(0);
  // One cheap check instead of a device-side assert deep inside gather.
  at::Tensor bad = at::logical_and(labels.ne(kIgnoreIndex), at::logical_or(labels.lt(0), labels.ge(vocab)));
  TORCH_CHECK(!bad.any().item<bool>(), "cross_entropy: a label is outside [0, ", vocab, ") and is not ",
              kIgnoreIndex);
  TokenLoss out;
  out.sum = ChunkedCrossEntropy::apply(hidden, weight, labels, chunk);
  out.count = labels.ne(kIgnoreIndex).sum();
  return out;
}

TokenLoss dense_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels) {
  check_inputs(hidden, weight, labels);
  at::Tensor logits = at::matmul(hidden, weight.t()).to(at::kFloat);
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
