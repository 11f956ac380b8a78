// model/loss: next-token cross-entropy over a large vocabulary without the
// [tokens, vocab] fp32 logits tensor.
//
// The loss is summed, not averaged: the trainer divides by the number of label
// tokens in the whole accumulation window (all micro-batches, all ranks), which
// a per-batch mean cannot give. Tokens are processed `chunk` at a time in a
// custom autograd function: forward keeps only each token's logsumexp, and
// backward recomputes each chunk's logits to form the gradient with respect to
// the hidden states and, when it requires grad, the lm_head weight. On GPUs in
// bf16 / fp16 with a frozen lm_head, forward instead forms the gradient with
// respect to the hidden states right away (LossPath::kFused) and backward only
// scales it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>

namespace qlora::model {

inline constexpr int64_t kIgnoreIndex = -100;

struct TokenLoss {
  at::Tensor sum;    // [] fp32, differentiable: sum of -log p(label) over counted tokens
  at::Tensor count;  // [] int64: tokens whose label is not kIgnoreIndex (no host sync)
};

// hidden [N, h] (after the final norm, any float dtype), weight [V, h] (the
// lm_head, same dtype), labels [N] int64 with kIgnoreIndex for tokens that do
// not count. Each chunk's logits are hidden · Wᵀ in the input dtype, then fp32
// (as transformers upcasts before its loss). Labels outside [0, V) other than
// kIgnoreIndex throw. Labels may be on the CPU while hidden is on a GPU: they are checked
// there and uploaded without a device sync (checking labels on the GPU costs one).
// `softcap` > 0: the logits are cap · tanh(logits / cap) (Gemma 2's final_logit_softcapping),
// on the recomputing path only.
TokenLoss chunked_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                int64_t chunk = 1024, double softcap = 0.0);

// Which implementation chunked_cross_entropy runs (Note [fused cross-entropy] in loss.cpp).
// kAuto: kFused where it applies (hidden on a CUDA device in bf16 / fp16, grad mode on, hidden
// requires grad, the weight does not) unless the environment variable QLORA_REFERENCE_LOSS=1
// (read once) asks for kReference; kReference everywhere else. kReference: the recomputing
// path above, on any device. kFused: the gradient formed in the forward pass; throws where it
// does not apply (or in a build without CUDA) or with a soft cap.
enum class LossPath { kAuto, kReference, kFused };

TokenLoss chunked_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                int64_t chunk, LossPath path, double softcap = 0.0);

// Whether LossPath::kFused applies to these inputs now (see LossPath; ignores the env var).
bool fused_cross_entropy_applies(const at::Tensor& hidden, const at::Tensor& weight);

// The CPU reference of the GPU rows kernel (qlora::kernels::cross_entropy_rows), in fp32 ATen ops
// on any device: logits [n, V] (any float dtype, upcast first), labels [n] int64 in [0, V) or
// kIgnoreIndex (not checked). lse [n] = logsumexp of each row; loss [n] = lse - logit[label],
// 0 for ignored rows; grad [n, V] fp32 = softmax - onehot(label), zeros for ignored rows: the
// gradient of loss.sum() with respect to the logits. The kernel writes grad rounded once to the
// logits' dtype.
struct CrossEntropyRows {
  at::Tensor lse;   // [n] fp32
  at::Tensor loss;  // [n] fp32
  at::Tensor grad;  // [n, V] fp32
};
CrossEntropyRows cross_entropy_rows_reference(const at::Tensor& logits, const at::Tensor& labels);

// The plain reference: full fp32 logits, at::cross_entropy with reduction sum.
// For tests and small vocabularies.
TokenLoss dense_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                              double softcap = 0.0);

// A CPU tensor on `device`. On a GPU without blocking the host: through pinned memory and an
// asynchronous copy (a copy from pageable memory waits for all the work queued on the stream,
// which stops the host from running ahead of the GPU; the caching host allocator keeps the
// pinned block until the copy is done). Anything else: tensor.to(device).
at::Tensor upload(const at::Tensor& host, c10::Device device);

// labels [B, T] -> [B, T] where position t holds labels[t + 1] and the last
// position kIgnoreIndex: what a causal LM predicts at each position.
at::Tensor shift_labels(const at::Tensor& labels);

}  // namespace qlora::model
