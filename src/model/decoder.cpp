#include "qlora/model/decoder.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <set>
#include <sstream>
#include <stdexcept>

#include "qlora/common/errors.h"
#include "qlora/common/text.h"
#include "qlora/quant/nf4.h"

namespace qlora::model {
namespace {

// Every weight the config implies, with its shape.
std::map<std::string, std::vector<int64_t>> expected_weights(const DecoderConfig& c) {
  std::map<std::string, std::vector<int64_t>> out;
  for (auto& [name, shape] : decoder_weight_shapes(c)) out[name] = std::move(shape);
  return out;
}

bool ignorable_weight(const DecoderConfig& c, const std::string& name) {
  if (ends_with(name, "rotary_emb.inv_freq")) return true;  // saved by old transformers versions
  return c.tie_word_embeddings && name == "lm_head.weight";  // some tied checkpoints carry a copy
}

void check_source(const DecoderConfig& c, const WeightSource& src) {
  const auto expected = expected_weights(c);
  std::set<std::string> present(src.names.begin(), src.names.end());
  std::vector<std::string> missing, unexpected;
  for (const auto& [name, shape] : expected) {
    if (!present.count(name)) missing.push_back(name + " " + shape_text(shape));
  }
  for (const auto& name : present) {
    if (!expected.count(name) && !ignorable_weight(c, name)) unexpected.push_back(name);
  }
  if (!missing.empty() || !unexpected.empty()) {
    std::ostringstream os;
    os << src.origin << ": the weights do not match the config (" << c.model_type << ", "
       << c.num_hidden_layers << " layers, hidden " << c.hidden_size << ", vocab " << c.vocab_size << ")";
    auto list = [&](const char* what, const std::vector<std::string>& v) {
      if (v.empty()) return;
      os << "; " << v.size() << " " << what << ": ";
      for (size_t i = 0; i < v.size() && i < 10; ++i) os << (i ? ", " : "") << v[i];
      if (v.size() > 10) os << ", ... (" << v.size() - 10 << " more)";
    };
    list("missing", missing);
    list("unexpected", unexpected);
    os << ". Check that config.json belongs to these weights (a " << c.model_type
       << " model saved by transformers)";
    throw InputError(os.str());
  }
}

// Note [non-finite base weights]
// A base weight holding NaN or inf is a damaged checkpoint: training on it gives NaN losses
// that the loss scaler skips step after step, or a crash deep in a kernel. The load refuses it,
// naming the file, the tensor and the count, without reading any weight a second time:
//  - a projection handed to LoadOptions::make_linear is counted by the quantizing pass itself
//    (quant::quantize_nf4 throws NonFiniteWeightError, caught here to add the names);
//  - every other weight (embeddings, norms, lm_head, dense projections) gets one fp32-accumulated
//    sum over the copy just made on the device: NaN and inf propagate into the sum. A finite
//    tensor whose sum overflows is told apart by an exact count, on that rare path only.
// The copy is in the model dtype, so a value beyond fp16's range (65504) in a run that
// computes in fp16 is caught too, and reported as such (the file itself is fine there).

// Throws the InputError for tensor `name` of `file`: `original` as the source holds it,
// `converted` the copy in the model dtype that holds inf or NaN.
[[noreturn]] void refuse_non_finite(const std::string& file, const std::string& name, const at::Tensor& original,
                                    const at::Tensor& converted) {
  const auto count_non_finite = [](const at::Tensor& t) {
    return t.is_floating_point() ? at::logical_not(at::isfinite(t)).sum().item<int64_t>() : int64_t{0};
  };
  std::ostringstream os;
  os << file << ": tensor \"" << name << "\" ";
  const int64_t in_file = count_non_finite(original);
  if (in_file > 0) {
    os << "holds " << in_file << " non-finite value" << (in_file == 1 ? "" : "s") << " (NaN or inf) among its "
       << original.numel() << "; the weights are damaged: download the model again, or save it again from a "
       << "copy that loads";
  } else {
    const at::ScalarType t = converted.scalar_type();
    os << "has " << count_non_finite(converted) << " value(s) beyond the range of "
       << (t == at::kHalf ? "float16" : t == at::kBFloat16 ? "bfloat16" : "float32") << " (largest magnitude "
       << original.abs().max().item<double>() << "), which the run computes in: set train.precision to bf16 "
       << "or fp32";
  }
  throw InputError(os.str());
}

// Splits "<module_prefix>layers.N.<group>.<proj>" into (N, index of proj in projection_names); false
// otherwise.
bool parse_linear_name(const std::string& name, const DecoderConfig& c, int64_t* layer, size_t* proj) {
  const std::string prefix = c.module_prefix + "layers.";
  if (name.compare(0, prefix.size(), prefix) != 0) return false;
  size_t dot = name.find('.', prefix.size());
  if (dot == std::string::npos || dot == prefix.size()) return false;
  const std::string num = name.substr(prefix.size(), dot - prefix.size());
  if (num.find_first_not_of("0123456789") != std::string::npos || num.size() > 9) return false;
  const int64_t l = std::stoll(num);
  if (l >= c.num_hidden_layers) return false;
  const auto& names = projection_names(c);
  for (size_t i = 0; i < names.size(); ++i) {
    if (name == linear_module_name(l, names[i], c.module_prefix)) {
      *layer = l;
      *proj = i;
      return true;
    }
  }
  return false;
}

}  // namespace

// ---------------------------------------------------------------- loading

WeightSource weights_from_map(std::map<std::string, at::Tensor> tensors, std::string origin) {
  auto shared = std::make_shared<std::map<std::string, at::Tensor>>(std::move(tensors));
  WeightSource src;
  src.origin = std::move(origin);
  for (const auto& kv : *shared) src.names.push_back(kv.first);
  src.get = [shared](const std::string& name) { return shared->at(name); };
  return src;
}

std::vector<std::pair<std::string, std::vector<int64_t>>> decoder_weight_shapes(const DecoderConfig& c) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> t;
  const int64_t h = c.hidden_size;
  t.push_back({c.module_prefix + "embed_tokens.weight", {c.vocab_size, h}});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = c.module_prefix + "layers." + std::to_string(l) + ".";
    t.push_back({p + "input_layernorm.weight", {h}});
    t.push_back({p + "post_attention_layernorm.weight", {h}});
    if (c.pieces.sandwich_norms) {  // Gemma 2 / 3
      t.push_back({p + "pre_feedforward_layernorm.weight", {h}});
      t.push_back({p + "post_feedforward_layernorm.weight", {h}});
    }
    if (c.pieces.qk_norm) {  // Qwen3, Gemma 3
      t.push_back({p + "self_attn.q_norm.weight", {c.head_dim}});
      t.push_back({p + "self_attn.k_norm.weight", {c.head_dim}});
    }
    for (const LinearShape& s : decoder_linear_shapes(c)) {
      const std::string module = linear_module_name(l, s.name, c.module_prefix);
      t.push_back({module + ".weight", {s.out_features, s.in_features}});
      if (projection_has_bias(c, s.name)) t.push_back({module + ".bias", {s.out_features}});
    }
  }
  t.push_back({c.module_prefix + "norm.weight", {h}});
  if (!c.tie_word_embeddings) t.push_back({"lm_head.weight", {c.vocab_size, h}});
  return t;
}

std::string linear_module_name(int64_t layer, const std::string& proj, const std::string& module_prefix) {
  const bool attn = proj == "q_proj" || proj == "k_proj" || proj == "v_proj" || proj == "o_proj" || proj == "qkv_proj";
  return module_prefix + "layers." + std::to_string(layer) + (attn ? ".self_attn." : ".mlp.") + proj;
}

DecoderModel DecoderModel::load(const DecoderConfig& c, const WeightSource& checkpoint, const LoadOptions& opt) {
  if (opt.dtype != at::kFloat && opt.dtype != at::kBFloat16 && opt.dtype != at::kHalf)
    throw std::invalid_argument("DecoderModel::load: dtype must be float32, bfloat16 or float16");
  const WeightSource src = text_model_weights(c, checkpoint);
  check_source(c, src);
  const auto expected = expected_weights(c);
  std::vector<std::string> misshaped;
  std::set<std::string> misshaped_files;
  const auto file_of = [&](const std::string& name) { return src.file_of ? src.file_of(name) : src.origin; };
  // `quantized`: make_linear takes the copy and counts its non-finite values itself.
  auto fetch = [&](const std::string& name, bool quantized = false) -> at::Tensor {
    at::Tensor t = src.get(name);
    const auto& want = expected.at(name);
    if (!t.defined() || t.sizes() != at::IntArrayRef(want) || !t.is_floating_point())
      misshaped_files.insert(file_of(name));
    if (!t.defined() || t.sizes() != at::IntArrayRef(want)) {
      misshaped.push_back(name + " is " + (t.defined() ? shape_text(t.sizes()) : "undefined") + ", expected " +
                          shape_text(want));
      return at::Tensor();
    }
    if (!t.is_floating_point()) {
      misshaped.push_back(name + " has dtype " + std::string(c10::toString(t.scalar_type())) +
                          ", expected a floating-point tensor");
      return at::Tensor();
    }
    // Always a copy: a source may hand out read-only file mappings.
    at::Tensor copy = t.detach().to(opt.device, opt.dtype, /*non_blocking=*/false, /*copy=*/true).contiguous();
    // Note [non-finite base weights]
    if (!quantized && !std::isfinite(copy.sum(at::kFloat).item<float>()) &&
        at::logical_not(at::isfinite(copy)).any().item<bool>())
      refuse_non_finite(file_of(name), name, t, copy);
    return copy;
  };

  DecoderModel m;
  m.config_ = c;
  m.dtype_ = opt.dtype;
  m.device_ = opt.device;
  m.embed_ = fetch(c.module_prefix + "embed_tokens.weight");
  m.norm_ = fetch(c.module_prefix + "norm.weight");
  m.lm_head_ = c.tie_word_embeddings ? m.embed_ : fetch("lm_head.weight");
  m.inv_freq_ = rope_inv_freq(c).to(opt.device);
  if (c.rope_local_theta > 0) {  // Gemma 3's local layers: their own base, no scaling
    DecoderConfig local = c;
    local.rope_theta = c.rope_local_theta;
    local.rope = RopeScaling{};
    m.local_inv_freq_ = rope_inv_freq(local).to(opt.device);
  }
  const auto shapes = decoder_linear_shapes(c);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = c.module_prefix + "layers." + std::to_string(l) + ".";
    Layer layer;
    layer.input_norm = fetch(p + "input_layernorm.weight");
    layer.post_attention_norm = fetch(p + "post_attention_layernorm.weight");
    if (c.pieces.sandwich_norms) {
      layer.pre_feedforward_norm = fetch(p + "pre_feedforward_layernorm.weight");
      layer.post_feedforward_norm = fetch(p + "post_feedforward_layernorm.weight");
    }
    if (c.pieces.qk_norm) {
      layer.q_norm = fetch(p + "self_attn.q_norm.weight");
      layer.k_norm = fetch(p + "self_attn.k_norm.weight");
    }
    for (const auto& s : shapes) {
      const std::string module = linear_module_name(l, s.name, c.module_prefix);
      const std::string name = module + ".weight";
      at::Tensor w = fetch(name, /*quantized=*/static_cast<bool>(opt.make_linear));
      if (!w.defined()) {
        layer.proj.push_back(nullptr);
        continue;
      }
      std::shared_ptr<FrozenLinear> lin;
      try {
        lin = opt.make_linear ? opt.make_linear(module, w) : std::make_shared<DenseLinear>(w);
      } catch (const quant::NonFiniteWeightError&) {  // Note [non-finite base weights]
        refuse_non_finite(file_of(name), name, src.get(name), w);
      }
      if (projection_has_bias(c, s.name)) lin->set_bias(fetch(module + ".bias"));
      layer.proj.push_back(std::move(lin));
    }
    m.layers_.push_back(std::move(layer));
    // Stop early: a checkpoint with wrong shapes should not cost a full load.
    if (!misshaped.empty()) break;
  }
  if (!misshaped.empty()) {
    std::ostringstream os;
    // The weights file when one holds them all (a single-file model, or one shard).
    os << (misshaped_files.size() == 1 ? *misshaped_files.begin() : src.origin) << ": " << misshaped.size()
       << " weight(s) do not match config.json: ";
    for (size_t i = 0; i < misshaped.size(); ++i) os << (i ? "; " : "") << misshaped[i];
    os << ". Check that config.json belongs to these weights";
    throw InputError(os.str());
  }
  return m;
}

// ---------------------------------------------------------------- building blocks

at::Tensor rms_norm_reference(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const auto in_dtype = x.scalar_type();
  at::Tensor h = x.to(at::kFloat);
  at::Tensor variance = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(variance + eps);
  return weight * h.to(in_dtype);
}

at::Tensor rms_norm_plus_one(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor h = x.to(at::kFloat);
  h = h * at::rsqrt(h.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return (h * (weight.to(at::kFloat) + 1.0)).to(x.scalar_type());
}

// Note [fused RMSNorm on GPUs]: op by op, the norm is 8 kernels forward and
// about 10 backward, per norm, per layer, twice with checkpointing: at small
// batches the step is bound by those launches. On a GPU in bf16/fp16, ATen's
// fused kernel (one forward, one backward; fp32 statistics) does the same
// math; it multiplies by the weight before rounding to 16 bits where
// transformers rounds first, a difference of one bf16 rounding
// (tests/test_cuda_model.cpp bounds it). fp32 and the CPU keep the op-by-op
// reference, which the golden tests pin bit for bit. QLORA_REFERENCE_NORM=1
// forces the reference everywhere (to compare).
bool fused_rms_norm_applies(const at::Tensor& x, const at::Tensor& weight) {
  static const bool reference_only = [] {
    const char* v = std::getenv("QLORA_REFERENCE_NORM");
    return v != nullptr && *v != '\0' && std::string(v) != "0";
  }();
  return !reference_only && x.is_cuda() && x.scalar_type() != at::kFloat && weight.scalar_type() == x.scalar_type();
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (!fused_rms_norm_applies(x, weight)) return rms_norm_reference(x, weight, eps);
  return std::get<0>(at::_fused_rms_norm(x, {x.size(-1)}, weight, eps));
}

// ---------------------------------------------------------------- forward

at::Tensor DecoderModel::embed(const at::Tensor& input_ids) const {
  at::Tensor x = at::embedding(embed_, input_ids);
  if (!config_.scale_embeddings) return x;
  // Gemma: times sqrt(hidden_size) rounded to the model dtype first, as its normalizer tensor is.
  return x * at::scalar_tensor(std::sqrt(static_cast<double>(config_.hidden_size)), x.options());
}

at::Tensor DecoderModel::norm(const at::Tensor& x, const at::Tensor& weight) const {
  return config_.pieces.norm_plus_one ? rms_norm_plus_one(x, weight, config_.rms_norm_eps)
                                      : rms_norm(x, weight, config_.rms_norm_eps);
}

std::pair<at::Tensor, at::Tensor> DecoderModel::rope(const at::Tensor& position_ids) const {
  const double scaling = config_.rope.attention_factor;
  if (config_.rope.type == RopeType::kLongrope && position_ids.numel() > 0) {
    // transformers' LongRoPE: the long factors once the batch's positions pass
    // original_max_position_embeddings, the short ones (computed at load) before.
    const int64_t seq_len = position_ids.max().item<int64_t>() + 1;
    if (seq_len > config_.rope.original_max_position_embeddings)
      return rope_cos_sin(rope_inv_freq(config_, seq_len).to(device_), position_ids, dtype_, scaling);
  }
  if (config_.rope.type == RopeType::kDynamic && position_ids.numel() > 0) {
    // transformers' dynamic RoPE: past max_position_embeddings the base grows with the batch's
    // longest position (as a freshly loaded model computes it for this batch).
    const int64_t seq_len = position_ids.max().item<int64_t>() + 1;
    if (seq_len > config_.max_position_embeddings)
      return rope_cos_sin(rope_inv_freq(config_, seq_len).to(device_), position_ids, dtype_, scaling);
  }
  return rope_cos_sin(inv_freq_, position_ids, dtype_, scaling);
}

at::Tensor DecoderModel::layer_forward(int64_t index, const at::Tensor& hidden,
                                     const std::pair<at::Tensor, at::Tensor>& cos_sin,
                                     const AttentionInputs& attention, KvCache* cache) const {
  const Layer& layer = layers_.at(static_cast<size_t>(index));
  const auto b = hidden.size(0), t = hidden.size(1);
  const int64_t d = config_.head_dim, heads = config_.num_attention_heads, kv_heads = config_.num_key_value_heads;

  at::Tensor h = norm(hidden, layer.input_norm);
  const bool fused = config_.pieces.fused_projections;  // Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj
  at::Tensor q, k, v;
  if (fused) {
    at::Tensor qkv = layer.proj[0]->forward(h);  // [B, T, (H + 2 Hkv) d]: q, then k, then v
    q = qkv.narrow(-1, 0, heads * d).view({b, t, heads, d});
    k = qkv.narrow(-1, heads * d, kv_heads * d).view({b, t, kv_heads, d});
    v = qkv.narrow(-1, (heads + kv_heads) * d, kv_heads * d).view({b, t, kv_heads, d}).transpose(1, 2);
  } else {
    q = layer.proj[0]->forward(h).view({b, t, heads, d});  // [B, T, H, d]
    k = layer.proj[1]->forward(h).view({b, t, kv_heads, d});
    v = layer.proj[2]->forward(h).view({b, t, kv_heads, d}).transpose(1, 2);  // [B, Hkv, T, d]
  }
  if (config_.pieces.qk_norm) {  // Qwen3, Gemma 3: RMSNorm over each head before RoPE
    q = norm(q, layer.q_norm);
    k = norm(k, layer.k_norm);
  }
  const int64_t window = config_.window_of(index);
  std::pair<at::Tensor, at::Tensor> local;
  if (window > 0 && local_inv_freq_.defined())  // Gemma 3: local layers rotate with their own base
    local = rope_cos_sin(local_inv_freq_, attention.position_ids, dtype_);
  const auto& [cos, sin] = local.first.defined() ? local : cos_sin;
  q = apply_rope(q.transpose(1, 2), cos, sin);  // [B, H, T, d]
  k = apply_rope(k.transpose(1, 2), cos, sin);
  if (cache != nullptr) {  // decoding: this call's keys and values join the cached ones
    const int64_t at = cache->length;
    TORCH_CHECK(at + t <= cache->k.at(static_cast<size_t>(index)).size(2), "KvCache: ", at + t,
                " positions exceed its capacity ", cache->k.at(static_cast<size_t>(index)).size(2));
    at::Tensor& ck = cache->k[static_cast<size_t>(index)];
    at::Tensor& cv = cache->v[static_cast<size_t>(index)];
    if (cache->write_at.defined()) {  // fixed shapes: positions from the device, the whole capacity
      TORCH_CHECK(window == 0 || window >= ck.size(2), "KvCache: layer ", index, "'s sliding window ", window,
                  " is shorter than the cache's capacity ", ck.size(2), "; decode it with a growing cache");
      ck.index_copy_(2, cache->write_at, k);
      cv.index_copy_(2, cache->write_at, v);
      k = ck;
      v = cv;
    } else {
      ck.narrow(2, at, t).copy_(k);
      cv.narrow(2, at, t).copy_(v);
      k = ck.narrow(2, 0, at + t);
      v = cv.narrow(2, 0, at + t);
    }
  }

  const double scale = config_.query_pre_attn_scalar > 0 ? 1.0 / std::sqrt(config_.query_pre_attn_scalar) : 0.0;
  at::Tensor attn = model::attention(q, k, v, attention, window, scale, config_.attn_logit_softcapping);
  attn = layer.proj[fused ? 1 : 3]->forward(attn.transpose(1, 2).reshape({b, t, heads * d}));
  if (config_.pieces.sandwich_norms) attn = norm(attn, layer.post_attention_norm);
  at::Tensor x = hidden + attn;

  h = norm(x, config_.pieces.sandwich_norms ? layer.pre_feedforward_norm : layer.post_attention_norm);
  // gate before up, as Python evaluates them: with LoRA dropout the order decides
  // which mask each draws (C++ leaves the order of a * b's operands unspecified).
  at::Tensor gate, up;
  if (fused) {
    at::Tensor gate_up = layer.proj[2]->forward(h);  // [B, T, 2 I]: gate, then up
    gate = gate_up.narrow(-1, 0, config_.intermediate_size);
    up = gate_up.narrow(-1, config_.intermediate_size, config_.intermediate_size);
  } else {
    gate = layer.proj[4]->forward(h);
    up = layer.proj[5]->forward(h);
  }
  gate = config_.pieces.act == Activation::kGeluTanh ? at::gelu(gate, "tanh") : at::silu(gate);
  at::Tensor mlp = layer.proj[fused ? 3 : 6]->forward(gate * up);
  if (config_.pieces.sandwich_norms) mlp = norm(mlp, layer.post_feedforward_norm);
  return x + mlp;
}

at::Tensor DecoderModel::final_norm(const at::Tensor& hidden) const { return norm(hidden, norm_); }

at::Tensor DecoderModel::forward_hidden(const at::Tensor& input_ids, const AttentionInputs& attention) const {
  TORCH_CHECK(input_ids.dim() == 2, "input_ids must be [B, T], got ", input_ids.dim(), "-D");
  at::Tensor x = embed(input_ids);
  const auto cos_sin = rope(attention.position_ids);
  for (int64_t l = 0; l < num_layers(); ++l) x = layer_forward(l, x, cos_sin, attention);
  return final_norm(x);
}

at::Tensor DecoderModel::logits(const at::Tensor& hidden) const {
  at::Tensor logits = at::matmul(hidden, lm_head_.t());
  const double cap = config_.final_logit_softcapping;
  return cap > 0 ? at::tanh(logits / cap) * cap : logits;
}

at::Tensor DecoderModel::forward(const at::Tensor& input_ids, const AttentionInputs& attention) const {
  return logits(forward_hidden(input_ids, attention));
}

KvCache DecoderModel::new_cache(int64_t batch, int64_t capacity) const {
  KvCache c;
  const auto opts = at::TensorOptions().dtype(dtype_).device(device_);
  for (int64_t l = 0; l < num_layers(); ++l) {
    c.k.push_back(at::zeros({batch, config_.num_key_value_heads, capacity, config_.head_dim}, opts));
    c.v.push_back(at::zeros({batch, config_.num_key_value_heads, capacity, config_.head_dim}, opts));
  }
  return c;
}

// ---------------------------------------------------------------- slots

std::vector<std::string> DecoderModel::linear_names() const {
  std::vector<std::string> out;
  for (int64_t l = 0; l < num_layers(); ++l)
    for (const auto& p : projection_names(config_)) out.push_back(linear_module_name(l, p, config_.module_prefix));
  return out;
}

bool DecoderModel::has_linear(const std::string& name) const {
  int64_t l = 0;
  size_t p = 0;
  return parse_linear_name(name, config_, &l, &p);
}

std::shared_ptr<Linear>& DecoderModel::slot(const std::string& name) {
  int64_t l = 0;
  size_t p = 0;
  if (!parse_linear_name(name, config_, &l, &p))
    throw std::out_of_range("no projection named \"" + name + "\" in this model (" +
                            std::to_string(num_layers()) + " layers)");
  return layers_[static_cast<size_t>(l)].proj[p];
}

const std::shared_ptr<Linear>& DecoderModel::linear(const std::string& name) const {
  return const_cast<DecoderModel*>(this)->slot(name);
}

void DecoderModel::set_linear(const std::string& name, std::shared_ptr<Linear> layer) {
  std::shared_ptr<Linear>& s = slot(name);
  TORCH_CHECK(layer && layer->in_features() == s->in_features() && layer->out_features() == s->out_features(),
              "set_linear(", name, "): the replacement must be ", s->out_features(), " x ", s->in_features());
  s = std::move(layer);
}

}  // namespace qlora::model
