// model/loss: next-token cross-entropy over a large vocabulary without the
// [tokens, vocab] fp32 logits tensor.
//
// The loss is summed, not averaged: the trainer divides by the number of label
// tokens in the whole accumulation window (all micro-batches, all ranks), which
// a per-batch mean cannot give. Tokens are processed `chunk` at a time in a
// custom autograd function: forward keeps only each token's logsumexp, and
// backward recomputes each chunk's logits to form the gradient with respect to
// the hidden states and, when it requires grad, the lm_head weight.
#pragma once

#include <ATen/core/Tensor.h>

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
// kIgnoreIndex throw.
TokenLoss chunked_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                int64_t chunk = 1024);

// The plain reference: full fp32 logits, at::cross_entropy with reduction sum.
// For tests and small vocabularies.
TokenLoss dense_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels);

// labels [B, T] -> [B, T] where position t holds labels[t + 1] and the last
// position kIgnoreIndex: what a causal LM predicts at each position.
at::Tensor shift_labels(const at::Tensor& labels);

}  // namespace qlora::model
