// layer/fused_layer_parts: the pieces the fused decoder layer (src/layer/fused_layer.cpp) is
// made of, private to src/layer: a projection's frozen base, bias and LoRA, the merged
// dequantized weights and biases, LoRA's dropout, forward and backward as the layer's
// hand-written backward needs them, and RMSNorm forward / backward keeping 1/rms (the layer's
// norms, Qwen3's and Gemma 3's per-head q / k norms; Gemma's (1 + w) form too).
#pragma once

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

namespace qlora::model {
class FrozenLinear;
class DecoderModel;
}  // namespace qlora::model
namespace qlora::lora {
class LoraLinear;
}

namespace qlora::layer {

// ---------------------------------------------------------------- dispatch

// Note [fused layer below autograd]
// The fused layer differentiates by hand, so none of its own ops needs autograd's
// bookkeeping. Under BelowAutograd they go straight to their kernels: the dispatcher skips
// the Autograd and ADInplaceOrView keys (grad mode is off there anyway, but every op still
// passed through both, and every narrow, view and transpose built autograd's view record).
// That is host time a kernel: under the profiler, which slows every op on the host, an H200's
// Llama-3.2-1B 4 x 1024 step went from 88-105 ms to 78 ms; without it the host was already
// ahead of the GPU there and tok/s did not change (bench/results/2026-12-02-h200-below-autograd).
// It is headroom for slower hosts and smaller steps. WithAutograd undoes it where the layer
// does want a graph: SDPA's, from the q, k, v leaves to its output. A
// tensor made below autograd carries no view record, so none of them may reach a graph as a
// view that is later written in place (the layer hands autograd only y and the leaves, both
// fresh tensors).
class BelowAutograd {
 public:
  BelowAutograd() = default;
  BelowAutograd(const BelowAutograd&) = delete;
  BelowAutograd& operator=(const BelowAutograd&) = delete;

 private:
  at::AutoDispatchBelowADInplaceOrView guard_;
};

class WithAutograd {
 public:
  WithAutograd()
      : guard_(c10::impl::tls_local_dispatch_key_set().included_,
               c10::impl::tls_local_dispatch_key_set().excluded_ - c10::autograd_dispatch_keyset_with_ADInplaceOrView) {}
  WithAutograd(const WithAutograd&) = delete;
  WithAutograd& operator=(const WithAutograd&) = delete;

 private:
  c10::impl::ForceDispatchKeyGuard guard_;
};

// ---------------------------------------------------------------- projections and weights

struct Proj {
  const model::FrozenLinear* base = nullptr;
  const lora::LoraLinear* lora = nullptr;  // null: no adapter on this projection
  // LoRA's A [r, in] and B [out, r] in the compute dtype, cast once a layer call (forward,
  // recompute and backward share them; the fp32 masters change only at the optimizer step).
  at::Tensor a, b;
  // The base's frozen bias [out] in the compute dtype (FrozenLinear::bias); undefined: none.
  at::Tensor bias;
};

// Projection `index` (decoder_linear_names() order) of `layer`. compute: the dtype of the
// layer's activations; undefined: no LoRA or bias casts (checks only). base is null when the
// projection is neither a frozen base nor LoRA over one.
Proj proj_of(const model::DecoderModel& m, int64_t layer, size_t index, std::optional<at::ScalarType> compute = {});

// The projections' weights stacked by rows: [sum of out, in], one GEMM for all of them.
at::Tensor merged_weight(const std::vector<Proj>& projs, const at::TensorOptions& opts);

// Their biases end to end, [sum of out], in the columns of the merged GEMM's output (zeros for
// one without, beside others with); undefined when none has a bias. A single projection's is
// its own tensor (no copy).
at::Tensor merged_bias(const std::vector<Proj>& projs, const at::TensorOptions& opts);

// ---------------------------------------------------------------- dropout and LoRA

// LoRA dropout as the generic layer draws it (lora::LoraLinear::forward): our kernel on GPUs
// (model::lora_dropout, a bit mask), a scaled Bernoulli mask on the CPU (at::dropout's), so
// the generators advance the same way and the masks are the same.
struct Dropped {
  at::Tensor x;       // the input the LoRA A sees (undefined while shed: source and mask remake it)
  at::Tensor mask;    // uint8 bits (GPU) or the scaled noise (CPU); undefined without dropout
  double p = 0.0;
  at::Tensor source;  // shed(): the input before dropout, which something else keeps anyway
};

// Note [shed LoRA inputs]
// Kept from forward to backward (the layer without recompute; and from a recompute to its
// backward where the checkpoints are offloaded, long sequences, where the copies are the
// largest LoRA share of a half's working set), a dropped copy costs the input's size a LoRA:
// three copies of n1 for q, k, v, one of the attention output for o.
// Shed, the copy goes and the LoRA keeps only its bit mask and the undropped input, which
// the projections sharing it keep once (and o's, the attention output, SDPA keeps anyway);
// backward remakes the copy from the two (model::apply_dropout_bits: the forward's roundings,
// so the same bits) for A's gradient and frees it at once. Only GPU bit masks are shed (the
// CPU's mask is the scaled noise, the size of the copy). `source` must be what `in.x` was
// dropped from.
Dropped shed(Dropped in, const at::Tensor& source);

// The input the LoRA A saw: in.x, or remade from a shed one.
at::Tensor dropped_input(const Dropped& in);

Dropped dropout(const at::Tensor& x, const lora::LoraLinear& l);

// The dropped copies of one input for projections that share it (q, k, v; gate, up), in
// their order: on a GPU one pass over x (Note [LoRA dropout kernel]) drawing what a call a
// projection would.
std::vector<Dropped> dropout_shared(const at::Tensor& x, const std::vector<const lora::LoraLinear*>& loras);

// One LoRA's forward pieces, kept for its backward.
struct LoraPass {
  Dropped in;
  at::Tensor t;  // [N, r] = scaling · dropped input · Aᵀ
};

// dropout(x) and its product with Aᵀ times the scaling, what a LoRA's backward needs of its
// forward (the second form from a dropped copy already drawn).
LoraPass lora_pass(const Proj& p, const at::Tensor& x);
LoraPass lora_pass(const Proj& p, Dropped in);

// A LoRA's gradient at its dropped input, and that input's dropout (as Dropped).
struct DroppedGrad {
  at::Tensor dx;    // [N, in]
  at::Tensor mask;  // undefined without dropout
  double p = 0.0;
};

// The backward of a LoRA's forward (lora_pass, its product ·Bᵀ added to the output) for the
// gradient `go` [N, out] at its output: A and B's gradients
// accumulated and the gradient at the dropped input returned. Consumes `pass`.
DroppedGrad lora_backward(const Proj& p, LoraPass&& pass, const at::Tensor& go);

// The gradient with respect to x [N, in] of the LoRAs sharing x: each term's dropout undone
// and the terms summed, in order, into acc (undefined: the first term starts the sum). On a GPU
// up to three terms with bit masks and one p take one pass (model::dropout_backward_sum).
at::Tensor add_input_grads(at::Tensor acc, std::vector<DroppedGrad> grads);

// One LoRA's: lora_backward, then its term added to acc.
at::Tensor lora_backward(const Proj& p, LoraPass&& pass, const at::Tensor& go, at::Tensor acc);

// ---------------------------------------------------------------- RMSNorm

struct Normed {
  at::Tensor y;     // [N, h]
  at::Tensor rstd;  // [N, 1] fp32
};

// Note [(1 + w) norms]
// Gemma's RMSNorm (pieces.norm_plus_one) scales the normalized row by (1 + w) in fp32 and
// rounds once (model::rms_norm_plus_one); Llama's rounds x̂ to x's dtype and then multiplies by
// w. With plus_one, norm_forward runs rms_norm_plus_one's ops keeping 1/rms (bit for bit the
// reference's output on every device), and norm_backward the closed form with
// dx̂ = dy·(1 + w) in fp32: ATen's ops, on the GPU too. ATen's fused kernel (which multiplies by a
// weight of x's dtype: 1 + w rounded to 16 bits) and model::rms_norm_backward_add's kernel
// (the same weight) are not used for them; a kernel taking the fp32 (1 + w) is a later speed-up.
Normed norm_forward(const at::Tensor& x, const at::Tensor& w, double eps, bool plus_one = false);
// The 1/rms norm_forward's reference ops keep ([N, 1] fp32), alone.
at::Tensor norm_rstd(const at::Tensor& x, double eps);
at::Tensor norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const Normed& n,
                         bool plus_one = false);
// norm_backward(dy, ...) + residual, in place on dy: on GPUs (16-bit, not plus_one) one kernel
// pass (model::rms_norm_backward_add), elsewhere norm_backward's ops and an add.
at::Tensor norm_backward_add(at::Tensor dy, const at::Tensor& x, const at::Tensor& w, const Normed& n,
                             const at::Tensor& residual, bool plus_one = false);

}  // namespace qlora::layer
