// model/decoder: the reference decoder of every family qlora trains (model/family.h:
// Llama 2 / 3.x, SmolLM2, Mistral, Qwen2 / 2.5, Qwen3, Gemma 2 / 3) as transformers' *ForCausalLM
// computes it, op for op, built from a DecoderConfig and a name -> tensor source with
// Hugging Face's weight names. The family's pieces (DecoderConfig::pieces: biases, q/k
// norms, Gemma's (1 + w) and sandwich norms, GeGLU, soft-capping, the attention scale, the
// embedding scale, a local RoPE base; the RoPE scaling; each layer's attention window) are
// applied where transformers applies them. RoPE lives in src/model/rope.cpp; attention (which
// keys each query sees, and the kernel each layout takes) in model/attention.h.
//
// The model owns embeddings, RMSNorm weights, RoPE frequencies, the lm_head
// weight and one `Linear` slot per projection (model/linear.h). It does not
// know about files (the io module hands it tensors) nor about LoRA (the lora
// module swaps slots through `set_linear`). The forward is split into
// embed / layer_forward / final_norm so the trainer can checkpoint each
// decoder layer. Every op is a plain ATen op: CPU and CUDA tensors alike.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "qlora/model/attention.h"
#include "qlora/model/linear.h"
#include "qlora/model/decoder_config.h"

namespace qlora::model {

// ---------------------------------------------------------------- loading

// Where weights come from: the names present, and a getter (lazy, so a
// loader can quantize layer by layer without holding the whole bf16 model).
struct WeightSource {
  std::string origin;  // shown in errors: a file or directory
  std::vector<std::string> names;
  std::function<at::Tensor(const std::string& name)> get;
  // The file that holds one tensor, for messages about it; empty: origin.
  std::function<std::string(const std::string& name)> file_of = {};
};

// A source over an in-memory map (tests, small models).
WeightSource weights_from_map(std::map<std::string, at::Tensor> tensors, std::string origin);

// Builds the frozen base of one projection from its weight, already cast to the
// model dtype and moved to the model device. `name` is the HF module name
// ("model.layers.3.mlp.down_proj"). A factory refuses a weight holding inf or NaN
// by throwing quant::NonFiniteWeightError, as quantizing does (Note [non-finite
// base weights] in decoder.cpp).
using LinearFactory =
    std::function<std::shared_ptr<FrozenLinear>(const std::string& name, const at::Tensor& weight)>;

struct LoadOptions {
  at::ScalarType dtype = at::kFloat;  // of embeddings, norms, dense weights, activations
  c10::Device device = c10::Device(c10::kCPU);
  LinearFactory make_linear;  // empty: DenseLinear
};

// ---------------------------------------------------------------- building blocks

// LlamaRMSNorm, x [..., h], weight [h]: rms_norm_reference on the CPU and in
// fp32; ATen's fused kernel for bf16/fp16 on a GPU (Note [fused RMSNorm on GPUs]).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
// transformers' op order (fp32 statistics, round to the input dtype, then the
// weight): what rms_norm runs on the CPU and in fp32 (Note [fused RMSNorm on GPUs]).
at::Tensor rms_norm_reference(const at::Tensor& x, const at::Tensor& weight, double eps);
// Whether rms_norm takes ATen's fused kernel for these operands (Note [fused RMSNorm on GPUs]).
bool fused_rms_norm_applies(const at::Tensor& x, const at::Tensor& weight);
// Gemma's RMSNorm: normalized and scaled by (1 + w) in fp32, rounded once to x's dtype.
at::Tensor rms_norm_plus_one(const at::Tensor& x, const at::Tensor& weight, double eps);

// Inverse RoPE frequencies [head_dim / 2] fp32 on the CPU, computed with the
// same ops in the same dtype order as transformers' rope init functions (default,
// linear, dynamic, yarn, llama3). `seq_len` matters for dynamic scaling only: above
// max_position_embeddings the base grows with it (0: max_position_embeddings).
at::Tensor rope_inv_freq(const DecoderConfig& config, int64_t seq_len = 0);

// cos and sin [B, T, head_dim] in `dtype`, computed in fp32 from inv_freq
// [head_dim / 2] (any device) and position_ids [B, T], times `attention_scaling`
// (yarn's attention factor; 1 for the other RoPE types).
std::pair<at::Tensor, at::Tensor> rope_cos_sin(const at::Tensor& inv_freq, const at::Tensor& position_ids,
                                               at::ScalarType dtype, double attention_scaling = 1.0);

// Rotates x [B, heads, T, head_dim] by cos/sin [B, T, rotary dim] (rotate-half layout); with a
// rotary dim below head_dim (partial_rotary_factor) only the first dims turn, as Phi-3 does.
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// ---------------------------------------------------------------- decoding

// Keys (after RoPE) and values of the positions decoded so far, per layer [B, kv heads,
// capacity, head_dim] (grouped-query: kv heads only), filled up to `length`. A forward that takes
// a cache writes its tokens' keys and values at `length` and attends over all of them; the caller
// advances `length` after the last layer and gives each call a mask [B, 1, T, length + T].
// Fixed-shape mode (what a CUDA graph replays, train/decode_graph.h): with `write_at` set (int64
// [T] on the device, the positions to write), keys and values go there and attention covers the
// whole capacity, the mask [B, 1, T, capacity] hiding what is not written yet; then no layer may
// have a sliding window shorter than the capacity. The tensors start zeroed, so a hidden
// position never holds a NaN.
struct KvCache {
  std::vector<at::Tensor> k, v;
  int64_t length = 0;
  at::Tensor write_at;
};

// ---------------------------------------------------------------- the model

class DecoderModel {
 public:
  // Checks the source against the config before allocating anything: every
  // missing name, unexpected name and mis-shaped tensor is listed in one
  // InputError naming source.origin. lm_head.weight is optional (and ignored)
  // when the embeddings are tied; rotary_emb.inv_freq buffers are ignored. A multimodal
  // checkpoint is read through text_model_weights (its image tower skipped, either naming).
  // A weight holding inf or NaN (or values the model dtype turns into inf) is
  // an InputError naming the file, the tensor and how many values.
  static DecoderModel load(const DecoderConfig& config, const WeightSource& source, const LoadOptions& options = {});

  const DecoderConfig& config() const { return config_; }
  at::ScalarType dtype() const { return dtype_; }
  c10::Device device() const { return device_; }
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // ---- forward, in pieces (each differentiable with respect to its inputs
  // and to whatever trainable tensors the Linear slots hold)

  at::Tensor embed(const at::Tensor& input_ids) const;  // [B, T] int64 -> [B, T, h]
  // cos, sin [B, T, head_dim] in the model dtype for these positions.
  std::pair<at::Tensor, at::Tensor> rope(const at::Tensor& position_ids) const;
  // One decoder layer: hidden [B, T, h] -> [B, T, h]; with a cache, T new positions after the
  // cached ones (KvCache).
  at::Tensor layer_forward(int64_t layer, const at::Tensor& hidden, const std::pair<at::Tensor, at::Tensor>& cos_sin,
                           const AttentionInputs& attention, KvCache* cache = nullptr) const;
  // An empty cache for `batch` rows of up to `capacity` positions, in the model's dtype and device.
  KvCache new_cache(int64_t batch, int64_t capacity) const;
  at::Tensor final_norm(const at::Tensor& hidden) const;  // [.., h]
  // The family's RMSNorm (pieces.norm_plus_one: Gemma's (1 + w)) of x with `weight`.
  at::Tensor norm(const at::Tensor& x, const at::Tensor& weight) const;

  // embed -> every layer -> final norm: [B, T] -> [B, T, h].
  at::Tensor forward_hidden(const at::Tensor& input_ids, const AttentionInputs& attention) const;
  // hidden [.., h] -> logits [.., V] in the model dtype (soft-capped: final_logit_softcapping).
  at::Tensor logits(const at::Tensor& hidden) const;
  // forward_hidden then logits.
  at::Tensor forward(const at::Tensor& input_ids, const AttentionInputs& attention) const;

  // [V, h]; the embedding matrix itself when tied.
  const at::Tensor& lm_head_weight() const { return lm_head_; }
  const at::Tensor& embedding_weight() const { return embed_; }
  const at::Tensor& inv_freq() const { return inv_freq_; }
  // A decoder layer's two RMSNorm weights [h] (for hand-written layers: layer/fused_layer.h).
  const at::Tensor& input_norm_weight(int64_t layer) const { return layers_.at(static_cast<size_t>(layer)).input_norm; }
  const at::Tensor& post_attention_norm_weight(int64_t layer) const {
    return layers_.at(static_cast<size_t>(layer)).post_attention_norm;
  }
  // Gemma's pre_ and post_feedforward_layernorm weights [h] (pieces.sandwich_norms; there
  // post_attention_norm_weight normalizes the attention output); undefined otherwise.
  const at::Tensor& pre_feedforward_norm_weight(int64_t layer) const {
    return layers_.at(static_cast<size_t>(layer)).pre_feedforward_norm;
  }
  const at::Tensor& post_feedforward_norm_weight(int64_t layer) const {
    return layers_.at(static_cast<size_t>(layer)).post_feedforward_norm;
  }
  // Qwen3's per-head q / k RMSNorm weights [head_dim]; undefined without pieces.qk_norm.
  const at::Tensor& q_norm_weight(int64_t layer) const { return layers_.at(static_cast<size_t>(layer)).q_norm; }
  const at::Tensor& k_norm_weight(int64_t layer) const { return layers_.at(static_cast<size_t>(layer)).k_norm; }
  // A decoder layer's projection, by its index in projection_names() (0 q ... 6 down; Phi-3's 0
  // qkv ... 3 down).
  const std::shared_ptr<Linear>& projection(int64_t layer, size_t index) const {
    return layers_.at(static_cast<size_t>(layer)).proj.at(index);
  }

  // ---- projection slots, by Hugging Face module name

  // "model.layers.0.self_attn.q_proj", ..., "model.layers.{L-1}.mlp.down_proj":
  // layer by layer, each in projection_names() order.
  std::vector<std::string> linear_names() const;
  bool has_linear(const std::string& name) const;
  // Throws std::out_of_range naming the slot when there is no such projection.
  const std::shared_ptr<Linear>& linear(const std::string& name) const;
  void set_linear(const std::string& name, std::shared_ptr<Linear> layer);

 private:
  struct Layer {
    at::Tensor input_norm;           // [h]
    at::Tensor post_attention_norm;  // [h]
    at::Tensor pre_feedforward_norm, post_feedforward_norm;  // [h] (pieces.sandwich_norms)
    at::Tensor q_norm, k_norm;       // [head_dim] (pieces.qk_norm)
    std::vector<std::shared_ptr<Linear>> proj;  // projection_names() order
  };
  DecoderModel() = default;
  std::shared_ptr<Linear>& slot(const std::string& name);

  DecoderConfig config_;
  at::ScalarType dtype_ = at::kFloat;
  c10::Device device_ = c10::Device(c10::kCPU);
  at::Tensor embed_;     // [V, h]
  at::Tensor lm_head_;   // [V, h]
  at::Tensor norm_;      // [h]
  at::Tensor inv_freq_;  // [head_dim / 2] fp32, on the model device
  at::Tensor local_inv_freq_;  // the same for sliding-window layers with their own base (Gemma 3)
  std::vector<Layer> layers_;
};

// Every tensor a checkpoint of `config` holds, with its shape, in file order: embeddings, each
// layer (its norms, Qwen3's q/k norms, each projection's weight and, where the family has one,
// its bias), the final norm, lm_head unless tied. What DecoderModel::load expects.
std::vector<std::pair<std::string, std::vector<int64_t>>> decoder_weight_shapes(const DecoderConfig& config);

// Module name of projection `proj` (projection_names()) of layer `layer`, under the config's
// module_prefix ("model." unless the model is the text part of a multimodal checkpoint).
std::string linear_module_name(int64_t layer, const std::string& proj, const std::string& module_prefix = "model.");

// ---------------------------------------------------------------- multimodal checkpoints

// A multimodal checkpoint's tensor name in the model's names (DecoderConfig::module_prefix):
// transformers 5's module names as they are; the published files' (which save_pretrained
// writes: "language_model.model.layers.0...", "language_model.lm_head.weight") renamed as
// transformers renames them on load; "" for a tensor of the image tower or its projector ("vision_tower.",
// "multi_modal_projector.", either under "model." or not), which the text model does not use.
// Any other name, and every name of a text-only config, unchanged.
std::string text_model_weight_name(const DecoderConfig& config, const std::string& checkpoint_name);

// `source` seen through text_model_weight_name: the text model's tensors under the model's
// names, the image tower's left out (DecoderModel::load reads a multimodal checkpoint so).
// `source` itself for a text-only config.
WeightSource text_model_weights(const DecoderConfig& config, const WeightSource& source);

// One decoder layer's forward in place of DecoderModel::layer_forward, with its arguments: what
// a training run swaps in (train's generic checkpoint, layer/fused_layer.h's fused layer).
using LayerForwardFn = std::function<at::Tensor(int64_t layer, const at::Tensor& hidden,
                                                const std::pair<at::Tensor, at::Tensor>& cos_sin,
                                                const AttentionInputs& attention)>;

}  // namespace qlora::model
