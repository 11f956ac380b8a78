#include "qlora/train/fused_layer.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <array>
#include <cstdlib>
#include <stdexcept>
#include <utility>
#include <vector>

#include "qlora/lora/lora.h"
#include "qlora/model/fused_ops.h"
#include "qlora/model/llama.h"
#include "qlora/model/nf4_linear.h"
#include "qlora/quant/nf4.h"
#include "qlora/quant/nf4_cuda.h"
#include "qlora/train/checkpoint.h"
#include "train/rng_state.h"

namespace qlora::train {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Note [fused decoder layer]
// Forward (grad off): n1 = norm(x); qkv = n1·[Wq;Wk;Wv]ᵀ (+ each LoRA by addmm into
// its columns); RoPE in place on the q and k columns; a = attention(q, k, v);
// h1 = x + a·Woᵀ (+ LoRA); n2 = norm(h1); gu = n2·[Wg;Wu]ᵀ (+ LoRA); m = swiglu(gu);
// y = h1 + m·Wdᵀ (+ LoRA).
// Kept for backward: x, h1, and the generator states before each half.
// Backward, one half at a time: the MLP half is recomputed from h1 up to m (no
// down_proj: y is not needed) and differentiated (W_d, SwiGLU, [Wg;Wu], norm 2);
// then the attention half from x up to a (no o_proj: h1 is kept) and differentiated
// (W_o, attention, RoPE, [Wq;Wk;Wv], norm 1). Each half's generators are set to
// where its forward drew, so every dropout mask is the forward's.
// The merged weights of the recomputation are reused by the backward, so each
// projection is dequantized once forward and once backward. Attention's own
// backward is ATen's (a small autograd graph around SDPA alone).

// Index of each projection in decoder_linear_names().
constexpr size_t kQ = 0, kK = 1, kV = 2, kO = 3, kGate = 4, kUp = 5, kDown = 6;

struct Proj {
  const model::FrozenLinear* base = nullptr;
  const lora::LoraLinear* lora = nullptr;  // null: no adapter on this projection
};

Proj proj_of(const model::LlamaModel& m, int64_t layer, size_t index) {
  const model::Linear* lin = m.projection(layer, index).get();
  Proj p;
  if (const auto* l = dynamic_cast<const lora::LoraLinear*>(lin)) {
    p.lora = l;
    p.base = l->base().get();
  } else {
    p.base = dynamic_cast<const model::FrozenLinear*>(lin);
  }
  return p;
}

// ---------------------------------------------------------------- weights

// Writes base's weight [out, in] (in out's dtype) into `out`, a contiguous block of rows.
void weight_into(const model::FrozenLinear& base, at::Tensor out) {
  const auto* nf4 = dynamic_cast<const model::Nf4Linear*>(&base);
  if (nf4 != nullptr && out.is_cuda()) {
    quant::dequantize_nf4_cuda_into(nf4->weight(), out);
    return;
  }
  if (const auto* dense = dynamic_cast<const model::DenseLinear*>(&base)) {
    out.copy_(dense->weight());
    return;
  }
  out.copy_(base.dense_weight(out.scalar_type()));
}

// The projections' weights stacked by rows: [sum of out, in], one GEMM for all of them.
at::Tensor merged_weight(const std::vector<Proj>& projs, const at::TensorOptions& opts) {
  if (projs.size() == 1) {
    if (const auto* dense = dynamic_cast<const model::DenseLinear*>(projs[0].base))
      if (dense->weight().scalar_type() == opts.dtype().toScalarType()) return dense->weight();
  }
  int64_t rows = 0;
  for (const auto& p : projs) rows += p.base->out_features();
  at::Tensor w = at::empty({rows, projs[0].base->in_features()}, opts);
  int64_t off = 0;
  for (const auto& p : projs) {
    weight_into(*p.base, w.narrow(0, off, p.base->out_features()));
    off += p.base->out_features();
  }
  return w;
}

// ---------------------------------------------------------------- dropout and LoRA

// LoRA dropout as the generic layer draws it (lora::LoraLinear::forward calls
// at::dropout): the fused kernel on GPUs, a scaled Bernoulli mask on the CPU, so
// the generators advance the same way and the masks are the same.
struct Dropped {
  at::Tensor x;     // the input the LoRA A sees
  at::Tensor mask;  // bool (GPU) or the scaled noise (CPU); undefined without dropout
  double p = 0.0;
};

Dropped dropout(const at::Tensor& x, const lora::LoraLinear& l) {
  const double p = l.dropout();
  if (!l.training() || p <= 0.0) return {x, {}, 0.0};
  if (x.is_cuda()) {
    auto [y, mask] = at::native_dropout(x, p, /*train=*/true);
    return {y, mask, p};
  }
  at::Tensor noise = at::empty_like(x).bernoulli_(1.0 - p);
  noise.div_(1.0 - p);
  return {x * noise, noise, p};
}

// In place on grad: the mask and the 1/(1-p) scale (one rounding, as native_dropout_backward).
at::Tensor& dropout_backward_(at::Tensor& grad, const Dropped& d) {
  if (!d.mask.defined()) return grad;
  if (d.mask.scalar_type() == at::kBool) return grad.mul_(d.mask).mul_(1.0 / (1.0 - d.p));
  return grad.mul_(d.mask);
}

// One LoRA's forward pieces, kept for its backward.
struct LoraPass {
  Dropped in;
  at::Tensor t;  // [N, r] = dropped input · Aᵀ
};

// out += scaling · (dropout(x) · Aᵀ) · Bᵀ, in x's dtype; out may be a column slice.
LoraPass lora_add(const lora::LoraLinear& l, const at::Tensor& x, at::Tensor out) {
  LoraPass pass{dropout(x, l), {}};
  pass.t = at::mm(pass.in.x, l.lora_a().to(x.scalar_type()).t());
  out.addmm_(pass.t, l.lora_b().to(x.scalar_type()).t(), /*beta=*/1.0, /*alpha=*/l.scaling());
  return pass;
}

void accumulate_grad(const at::Tensor& param, const at::Tensor& grad) {
  at::Tensor p = param;  // a handle: .mutable_grad() is the parameter's
  at::Tensor g = grad.to(p.scalar_type());
  if (p.grad().defined()) {
    p.mutable_grad().add_(g);
  } else {
    p.mutable_grad() = g.is_contiguous() ? g : g.contiguous();
  }
}

// The backward of lora_add for the gradient `go` [N, out] at its output: A and B's
// gradients accumulated, the gradient with respect to x [N, in] returned. Consumes
// `pass`: the dropped input goes as soon as A's gradient is taken.
at::Tensor lora_backward(const lora::LoraLinear& l, LoraPass&& pass, const at::Tensor& go) {
  const at::ScalarType dt = go.scalar_type();
  const at::Tensor gs = go * l.scaling();                 // [N, out]
  accumulate_grad(l.lora_b(), at::mm(gs.t(), pass.t));    // [out, r]
  const at::Tensor dt_ = at::mm(gs, l.lora_b().to(dt));  // [N, r]
  accumulate_grad(l.lora_a(), at::mm(dt_.t(), pass.in.x));  // [r, in]
  pass.in.x = at::Tensor();
  pass.t = at::Tensor();
  at::Tensor dx = at::mm(dt_, l.lora_a().to(dt));  // [N, in]
  return dropout_backward_(dx, pass.in);
}

// ---------------------------------------------------------------- RMSNorm

struct Normed {
  at::Tensor y;     // [N, h]
  at::Tensor rstd;  // [N, 1] fp32
};

Normed norm_forward(const at::Tensor& x, const at::Tensor& w, double eps) {
  if (model::fused_rms_norm_applies(x, w)) {
    auto [y, rstd] = at::_fused_rms_norm(x, {x.size(-1)}, w, eps);
    return {y, rstd};
  }
  // model::rms_norm_reference's ops, keeping 1/rms.
  const at::Tensor h = x.to(at::kFloat);
  const at::Tensor rstd = at::rsqrt(h.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return {w * (h * rstd).to(x.scalar_type()), rstd};
}

at::Tensor norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const Normed& n) {
  if (model::fused_rms_norm_applies(x, w))
    return std::get<0>(at::_fused_rms_norm_backward(dy, x, {x.size(-1)}, n.rstd, w, {true, false}));
  const at::Tensor xhat = x.to(at::kFloat) * n.rstd;           // [N, h] fp32
  const at::Tensor dxhat = (dy * w).to(at::kFloat);            // as autograd: the product in x's dtype
  const at::Tensor dot = (dxhat * xhat).mean(-1, /*keepdim=*/true);
  return (n.rstd * (dxhat - xhat * dot)).to(x.scalar_type());
}

// ---------------------------------------------------------------- the layer

struct LayerRefs {
  const model::LlamaModel* model = nullptr;
  int64_t index = 0;
  std::array<Proj, 7> proj;
  at::Tensor norm1, norm2;
  bool any_dropout = false;
};

LayerRefs layer_refs(const model::LlamaModel& m, int64_t index) {
  LayerRefs r;
  r.model = &m;
  r.index = index;
  for (size_t i = 0; i < r.proj.size(); ++i) {
    r.proj[i] = proj_of(m, index, i);
    if (r.proj[i].lora && r.proj[i].lora->training() && r.proj[i].lora->dropout() > 0) r.any_dropout = true;
  }
  r.norm1 = m.input_norm_weight(index);
  r.norm2 = m.post_attention_norm_weight(index);
  return r;
}

std::vector<Proj> pick(const LayerRefs& r, std::initializer_list<size_t> idx) {
  std::vector<Proj> out;
  for (size_t i : idx) out.push_back(r.proj[i]);
  return out;
}

// LoRA of projections `idx` (whose outputs are consecutive column blocks of `out`)
// on input x; the passes in `passes` (null entries where no LoRA).
void lora_columns(const LayerRefs& r, std::initializer_list<size_t> idx, const at::Tensor& x, at::Tensor& out,
                  std::vector<std::pair<size_t, LoraPass>>* passes) {
  int64_t off = 0;
  for (size_t i : idx) {
    const Proj& p = r.proj[i];
    const int64_t n = p.base->out_features();
    if (p.lora) {
      LoraPass pass = lora_add(*p.lora, x, out.narrow(1, off, n));
      if (passes) passes->emplace_back(i, std::move(pass));
    }
    off += n;
  }
}

// The gradient of LoRA projections `idx` given the gradient of their merged output.
at::Tensor lora_columns_backward(const LayerRefs& r, std::initializer_list<size_t> idx, const at::Tensor& gout,
                                 std::vector<std::pair<size_t, LoraPass>>& passes) {
  at::Tensor dx;
  int64_t off = 0;
  for (size_t i : idx) {
    const Proj& p = r.proj[i];
    const int64_t n = p.base->out_features();
    for (auto& [which, pass] : passes) {
      if (which != i) continue;
      at::Tensor d = lora_backward(*p.lora, std::move(pass), gout.narrow(1, off, n));
      dx = dx.defined() ? dx.add_(d) : d;
    }
    off += n;
  }
  return dx;
}

struct AttentionHalf {
  Normed n1;
  at::Tensor w_qkv;  // [q + k + v, h]
  at::Tensor qkv;    // [N, q + k + v], q and k rotated
  at::Tensor a;      // [N, H·d] attention output
  std::vector<std::pair<size_t, LoraPass>> lora;
};

// The attention half up to a. With `grad_leaves`, q, k, v enter attention as
// autograd leaves (filled in) and `attn_out` holds attention's differentiable output.
AttentionHalf attention_half(const LayerRefs& r, const at::Tensor& x2, int64_t b, int64_t t,
                             const std::pair<at::Tensor, at::Tensor>& cos_sin, const model::AttentionInputs& attention,
                             std::array<at::Tensor, 3>* grad_leaves, at::Tensor* attn_out) {
  const LlamaConfig& c = r.model->config();
  const int64_t d = c.head_dim, heads = c.num_attention_heads, kv = c.num_key_value_heads;
  AttentionHalf s;
  s.n1 = norm_forward(x2, r.norm1, c.rms_norm_eps);
  s.w_qkv = merged_weight(pick(r, {kQ, kK, kV}), x2.options());
  s.qkv = at::mm(s.n1.y, s.w_qkv.t());
  lora_columns(r, {kQ, kK, kV}, s.n1.y, s.qkv, &s.lora);
  at::Tensor q = s.qkv.narrow(1, 0, heads * d).view({b, t, heads, d});
  at::Tensor k = s.qkv.narrow(1, heads * d, kv * d).view({b, t, kv, d});
  at::Tensor v = s.qkv.narrow(1, (heads + kv) * d, kv * d).view({b, t, kv, d});
  model::rope_inplace(q, cos_sin.first, cos_sin.second);
  model::rope_inplace(k, cos_sin.first, cos_sin.second);
  // Dense [B, T, H, d] copies: SDPA's fast kernels want each of q, k, v packed
  // (the column slices of qkv have a row stride of q + k + v).
  q = q.contiguous();
  k = k.contiguous();
  v = v.contiguous();
  at::Tensor out;
  if (grad_leaves != nullptr) {
    *grad_leaves = {q.detach().requires_grad_(true), k.detach().requires_grad_(true),
                    v.detach().requires_grad_(true)};
    at::AutoGradMode on(true);
    out = model::attention((*grad_leaves)[0].transpose(1, 2), (*grad_leaves)[1].transpose(1, 2),
                           (*grad_leaves)[2].transpose(1, 2), attention);  // [B, H, T, d]
    *attn_out = out;
    out = out.detach();
  } else {
    out = model::attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention);
  }
  s.a = out.transpose(1, 2).reshape({b * t, heads * d});
  return s;
}

struct MlpHalf {
  Normed n2;
  at::Tensor w_gu;  // [2I, h]
  at::Tensor gu;    // [N, 2I]
  at::Tensor m;     // [N, I]
  std::vector<std::pair<size_t, LoraPass>> lora;
};

MlpHalf mlp_half(const LayerRefs& r, const at::Tensor& h1) {
  MlpHalf s;
  s.n2 = norm_forward(h1, r.norm2, r.model->config().rms_norm_eps);
  s.w_gu = merged_weight(pick(r, {kGate, kUp}), h1.options());
  s.gu = at::mm(s.n2.y, s.w_gu.t());
  lora_columns(r, {kGate, kUp}, s.n2.y, s.gu, &s.lora);
  s.m = model::swiglu(s.gu);
  return s;
}

// y = base + x·Wᵀ (+ LoRA): o_proj and down_proj with the residual in the GEMM.
at::Tensor residual_projection(const LayerRefs& r, size_t index, const at::Tensor& residual, const at::Tensor& x,
                               std::vector<std::pair<size_t, LoraPass>>* passes) {
  at::Tensor y = at::addmm(residual, x, merged_weight(pick(r, {index}), x.options()).t());
  lora_columns(r, {index}, x, y, passes);
  return y;
}

struct LayerHolder : torch::CustomClassHolder {
  LayerRefs refs;
  std::pair<at::Tensor, at::Tensor> cos_sin;
  model::AttentionInputs attention;
};

// Generator states in ctx->saved_data under `key`.
void save_rng(AutogradContext* ctx, const std::string& key, const c10::Device& device) {
  const RngState rng = capture_rng(device);
  ctx->saved_data[key + "_cpu"] = rng.cpu;
  if (rng.cuda.defined()) ctx->saved_data[key + "_cuda"] = rng.cuda;
}

void load_rng(AutogradContext* ctx, const std::string& key, const c10::Device& device) {
  RngState rng;
  rng.cpu = ctx->saved_data[key + "_cpu"].toTensor();
  if (ctx->saved_data.count(key + "_cuda")) rng.cuda = ctx->saved_data[key + "_cuda"].toTensor();
  restore_rng(rng, device);
}

// The MLP half's backward: recomputed from h1 (its dropout masks drawn from the
// generators as they stood before its forward), then the gradient from dy down to h1.
at::Tensor mlp_backward(const LayerRefs& r, const at::Tensor& h1, const at::Tensor& dy) {
  MlpHalf mlp = mlp_half(r, h1);
  LoraPass down;
  if (r.proj[kDown].lora) {
    down.in = dropout(mlp.m, *r.proj[kDown].lora);
    down.t = at::mm(down.in.x, r.proj[kDown].lora->lora_a().to(dy.scalar_type()).t());
  }
  mlp.m = at::Tensor();
  at::Tensor dm = at::mm(dy, merged_weight(pick(r, {kDown}), dy.options()));  // [N, I]
  if (r.proj[kDown].lora) dm.add_(lora_backward(*r.proj[kDown].lora, std::move(down), dy));
  model::swiglu_backward_inplace(dm, mlp.gu);  // gu now holds [dg | du]
  dm = at::Tensor();
  at::Tensor dn2 = at::mm(mlp.gu, mlp.w_gu);  // [N, h]
  if (at::Tensor d = lora_columns_backward(r, {kGate, kUp}, mlp.gu, mlp.lora); d.defined()) dn2.add_(d);
  mlp.gu = at::Tensor();
  mlp.w_gu = at::Tensor();
  return norm_backward(dn2, h1, r.norm2, mlp.n2).add_(dy);
}

// The attention half's backward: recomputed from x (q, k, v and then o's dropout
// masks drawn in the forward's order), then the gradient from dh1 down to x.
at::Tensor attention_backward(const LayerHolder& holder, const at::Tensor& x2, int64_t b, int64_t t,
                              const at::Tensor& dh1) {
  const LayerRefs& r = holder.refs;
  std::array<at::Tensor, 3> leaves;
  at::Tensor attn_out;
  AttentionHalf att = attention_half(r, x2, b, t, holder.cos_sin, holder.attention, &leaves, &attn_out);
  LoraPass o;
  if (r.proj[kO].lora) {
    o.in = dropout(att.a, *r.proj[kO].lora);
    o.t = at::mm(o.in.x, r.proj[kO].lora->lora_a().to(dh1.scalar_type()).t());
  }
  att.a = at::Tensor();
  at::Tensor da = at::mm(dh1, merged_weight(pick(r, {kO}), dh1.options()));  // [N, H·d]
  if (r.proj[kO].lora) da.add_(lora_backward(*r.proj[kO].lora, std::move(o), dh1));
  const LlamaConfig& c = r.model->config();
  const int64_t d = c.head_dim, heads = c.num_attention_heads, kv = c.num_key_value_heads;
  variable_list dqkv;
  {
    at::AutoGradMode on(true);
    dqkv = torch::autograd::grad({attn_out}, {leaves[0], leaves[1], leaves[2]},
                                 {da.view({b, t, heads, d}).transpose(1, 2)});
  }
  da = at::Tensor();
  attn_out = at::Tensor();
  leaves = {};
  at::Tensor g_qkv = at::empty_like(att.qkv);  // [N, q + k + v]
  att.qkv = at::Tensor();
  at::Tensor gq = g_qkv.narrow(1, 0, heads * d).view({b, t, heads, d});
  at::Tensor gk = g_qkv.narrow(1, heads * d, kv * d).view({b, t, kv, d});
  at::Tensor gv = g_qkv.narrow(1, (heads + kv) * d, kv * d).view({b, t, kv, d});
  gq.copy_(dqkv[0]);
  gk.copy_(dqkv[1]);
  gv.copy_(dqkv[2]);
  dqkv.clear();
  model::rope_backward_inplace(gq, holder.cos_sin.first, holder.cos_sin.second);
  model::rope_backward_inplace(gk, holder.cos_sin.first, holder.cos_sin.second);
  at::Tensor dn1 = at::mm(g_qkv, att.w_qkv);  // [N, h]
  if (at::Tensor dl = lora_columns_backward(r, {kQ, kK, kV}, g_qkv, att.lora); dl.defined()) dn1.add_(dl);
  return norm_backward(dn1, x2, r.norm1, att.n1).add_(dh1);
}

// Puts the generators back to the state backward found them in, also on a throw.
class RngGuard {
 public:
  RngGuard(bool active, const c10::Device& device) : device_(device) {
    if (active) found_ = capture_rng(device);
  }
  ~RngGuard() {
    if (found_.cpu.defined()) restore_rng(found_, device_);
  }
  RngGuard(const RngGuard&) = delete;
  RngGuard& operator=(const RngGuard&) = delete;

 private:
  RngState found_;
  c10::Device device_;
};

struct FusedLayerFunction : public torch::autograd::Function<FusedLayerFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& anchor,
                            const c10::intrusive_ptr<LayerHolder>& holder) {
    (void)anchor;
    const LayerRefs& r = holder->refs;
    const int64_t b = input.size(0), t = input.size(1), h = input.size(2);
    if (r.any_dropout) save_rng(ctx, "rng_attention", input.device());
    const at::Tensor x2 = input.reshape({b * t, h});
    at::Tensor a = attention_half(r, x2, b, t, holder->cos_sin, holder->attention, nullptr, nullptr).a;
    const at::Tensor h1 = residual_projection(r, kO, x2, a, nullptr);
    a = at::Tensor();
    if (r.any_dropout) save_rng(ctx, "rng_mlp", input.device());
    at::Tensor m = mlp_half(r, h1).m;
    const at::Tensor y = residual_projection(r, kDown, h1, m, nullptr);
    ctx->save_for_backward({input});
    ctx->saved_data["h1"] = h1;
    ctx->saved_data["layer"] = at::IValue::make_capsule(holder);
    return y.view({b, t, h});
  }

  // Note [fused decoder layer]: the MLP half first (recomputed from h1), then the
  // attention half (recomputed from x); each half's generators are put back to
  // where its forward drew, so only one half's activations are alive at a time.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(3);
    if (!grad_outputs[0].defined()) return grads;
    const at::Tensor input = ctx->get_saved_variables()[0];
    const at::Tensor h1 = ctx->saved_data["h1"].toTensor();
    const auto holder = c10::static_intrusive_pointer_cast<LayerHolder>(ctx->saved_data["layer"].toCapsule());
    const LayerRefs& r = holder->refs;
    const c10::Device device = input.device();
    const int64_t b = input.size(0), t = input.size(1), h = input.size(2);
    const RngGuard guard(r.any_dropout, device);
    if (r.any_dropout) load_rng(ctx, "rng_mlp", device);
    const at::Tensor dh1 = mlp_backward(r, h1, grad_outputs[0].reshape({b * t, h}));
    if (r.any_dropout) load_rng(ctx, "rng_attention", device);
    grads[0] = attention_backward(*holder, input.reshape({b * t, h}), b, t, dh1).view({b, t, h});
    return grads;
  }
};

bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::string(v) == value;
}

}  // namespace

std::string fused_layer_unsupported(const model::LlamaModel& model) {
  for (int64_t l = 0; l < model.num_layers(); ++l) {
    for (size_t i = 0; i < decoder_linear_names().size(); ++i) {
      if (proj_of(model, l, i).base == nullptr)
        return "layer " + std::to_string(l) + " " + decoder_linear_names()[i] +
               " is neither a frozen base projection nor LoRA over one";
    }
  }
  return {};
}

LayerForwardFn fused_layer_forward(const model::LlamaModel& model) {
  const std::string why = fused_layer_unsupported(model);
  if (!why.empty()) throw std::invalid_argument("fused_layer_forward: " + why);
  const model::LlamaModel* m = &model;
  return [m](int64_t layer, const at::Tensor& hidden, const std::pair<at::Tensor, at::Tensor>& cos_sin,
             const model::AttentionInputs& attention) -> at::Tensor {
    if (!at::GradMode::is_enabled()) return m->layer_forward(layer, hidden, cos_sin, attention);
    auto holder = c10::make_intrusive<LayerHolder>();
    holder->refs = layer_refs(*m, layer);
    holder->cos_sin = cos_sin;
    holder->attention = attention;
    // As in checkpoint(): without an input that requires grad, the output would have
    // no grad_fn and the LoRA matrices inside would never get gradients.
    at::Tensor anchor = at::zeros({}, hidden.options());
    if (!hidden.requires_grad()) anchor.requires_grad_(true);
    return FusedLayerFunction::apply(hidden, anchor, holder);
  };
}

LayerForwardFn training_layer_forward(const model::LlamaModel& model) {
  if (env_is("QLORA_LAYER", "fused")) return fused_layer_forward(model);
  const bool gpu_16bit = model.device().is_cuda() && model.dtype() != at::kFloat;
  if (env_is("QLORA_LAYER", "reference") || !gpu_16bit || !fused_layer_unsupported(model).empty())
    return checkpointed_layer_forward(model);
  return fused_layer_forward(model);
}

}  // namespace qlora::train
