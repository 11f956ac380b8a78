// The fused decoder layer's pieces (src/layer/fused_layer_parts.h).
#include "layer/fused_layer_parts.h"

#include <ATen/ATen.h>

#include <utility>

#include "qlora/lora/lora.h"
#include "qlora/model/fused_ops.h"
#include "qlora/model/decoder.h"
#include "qlora/model/nf4_linear.h"
#include "qlora/quant/nf4_cuda.h"

namespace qlora::layer {
namespace {

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

// A LoRA matrix's gradient, a · b, in the dtype of its fp32 master `param`: on a GPU the GEMM
// writes fp32 itself (16-bit inputs, fp32 output: no rounding to 16 bits and no cast kernel after);
// elsewhere the product in the inputs' dtype.
at::Tensor grad_product(const at::Tensor& param, const at::Tensor& a, const at::Tensor& b) {
  if (a.is_cuda() && param.scalar_type() == at::kFloat && a.scalar_type() != at::kFloat)
    return at::mm(a, b, at::kFloat);
  return at::mm(a, b);
}

// alpha · (a · b) from one GEMM, alpha applied inside it (cuBLAS's, or the CPU's): no kernel of
// its own over the product. addmm with beta 0 reads nothing of its first argument, which only
// has to broadcast to the product's shape.
at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, double alpha) {
  if (alpha == 1.0) return at::mm(a, b);
  return at::addmm(at::empty({1}, a.options()), a, b, /*beta=*/0.0, alpha);
}

// param.grad += grad. An existing gradient takes grad in grad's dtype (the add upcasts inside
// its kernel: no cast op before it); a first one is grad in the parameter's dtype. (The LoRA
// scaling is already in grad: lora_backward.)
void accumulate_grad(const at::Tensor& param, const at::Tensor& grad) {
  at::Tensor p = param;  // a handle: .mutable_grad() is the parameter's
  if (p.grad().defined()) {
    p.mutable_grad().add_(grad);
    return;
  }
  const at::Tensor g = grad.to(p.scalar_type());  // grad itself when the dtypes match
  p.mutable_grad() = g.is_contiguous() ? g : g.contiguous();
}

// One term of add_input_grads: dx (the gradient at the dropped input) through its dropout,
// added to acc (undefined: the term starts the sum).
at::Tensor add_input_grad(at::Tensor acc, DroppedGrad g) {
  if (!g.mask.defined()) return acc.defined() ? acc.add_(g.dx) : g.dx;
  if (g.mask.scalar_type() == at::kByte)  // the GPU's bit mask (model::lora_dropout)
    return model::dropout_backward_add(std::move(acc), std::move(g.dx), g.mask, 1.0 / (1.0 - g.p));
  g.dx.mul_(g.mask);  // the CPU's scaled noise
  return acc.defined() ? acc.add_(g.dx) : g.dx;
}

bool bit_masked(const DroppedGrad& g) { return g.mask.defined() && g.mask.scalar_type() == at::kByte; }

}  // namespace

// compute: the dtype of the layer's activations; undefined: no LoRA or bias casts (checks only).
Proj proj_of(const model::DecoderModel& m, int64_t layer, size_t index, std::optional<at::ScalarType> compute) {
  const model::Linear* lin = m.projection(layer, index).get();
  Proj p;
  if (const auto* l = dynamic_cast<const lora::LoraLinear*>(lin)) {
    p.lora = l;
    p.base = l->base().get();
    if (compute) {
      p.a = l->lora_a().to(*compute);
      p.b = l->lora_b().to(*compute);
    }
  } else {
    p.base = dynamic_cast<const model::FrozenLinear*>(lin);
  }
  if (compute && p.base != nullptr && p.base->bias().defined()) p.bias = p.base->bias().to(*compute);
  return p;
}

// ---------------------------------------------------------------- weights

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

at::Tensor merged_bias(const std::vector<Proj>& projs, const at::TensorOptions& opts) {
  if (projs.size() == 1) return projs[0].bias;
  bool any = false;
  for (const auto& p : projs) any = any || p.bias.defined();
  if (!any) return at::Tensor();
  std::vector<at::Tensor> parts;
  for (const auto& p : projs)
    parts.push_back(p.bias.defined() ? p.bias : at::zeros({p.base->out_features()}, opts));
  return at::cat(parts);
}

// ---------------------------------------------------------------- dropout and LoRA

Dropped dropout(const at::Tensor& x, const lora::LoraLinear& l) { return std::move(dropout_shared(x, {&l}).front()); }

std::vector<Dropped> dropout_shared(const at::Tensor& x, const std::vector<const lora::LoraLinear*>& loras) {
  std::vector<Dropped> out(loras.size());
  // Which draw: on the GPU the projections with dropout draw in one kernel call when they
  // share p (what one call a projection would draw, in the same order).
  std::vector<size_t> drawing;
  for (size_t k = 0; k < loras.size(); ++k) {
    const double p = loras[k]->dropout();
    if (!loras[k]->training() || p <= 0.0) {
      out[k] = {x, {}, 0.0, {}};
      continue;
    }
    if (x.is_cuda()) {
      drawing.push_back(k);
      continue;
    }
    at::Tensor noise = at::empty_like(x).bernoulli_(1.0 - p);
    noise.div_(1.0 - p);
    out[k] = {x * noise, noise, p, {}};
  }
  for (size_t first = 0; first < drawing.size();) {
    const double p = loras[drawing[first]]->dropout();
    size_t last = first + 1;
    while (last < drawing.size() && last - first < 3 && loras[drawing[last]]->dropout() == p) ++last;
    std::vector<model::DroppedCopy> copies = model::lora_dropout(x, static_cast<int64_t>(last - first), p);
    for (size_t j = first; j < last; ++j) out[drawing[j]] = {std::move(copies[j - first].x), std::move(copies[j - first].bits), p, {}};
    first = last;
  }
  return out;
}

Dropped shed(Dropped in, const at::Tensor& source) {
  if (!in.x.defined() || !in.mask.defined() || in.mask.scalar_type() != at::kByte) return in;
  in.x = at::Tensor();
  in.source = source;
  return in;
}

at::Tensor dropped_input(const Dropped& in) {
  if (in.x.defined()) return in.x;
  return model::apply_dropout_bits(in.source, in.mask, 1.0 / (1.0 - in.p));
}

LoraPass lora_pass(const Proj& p, Dropped in) {
  LoraPass pass{std::move(in), {}};
  pass.t = scaled_mm(pass.in.x, p.a.t(), p.lora->scaling());
  return pass;
}

LoraPass lora_pass(const Proj& p, const at::Tensor& x) { return lora_pass(p, dropout(x, *p.lora)); }

// The backward of a LoRA's forward for the gradient `go` [N, out] at its output: A and B's
// gradients accumulated, the gradient at the dropped input returned with its dropout. The
// scaling goes where the tensors are small ([N, r]), inside the GEMMs that make them: pass.t
// already holds it (so B's gradient needs none) and dt is made scaled. Consumes `pass`: the
// dropped input goes as soon as A's gradient is taken.
DroppedGrad lora_backward(const Proj& p, LoraPass&& pass, const at::Tensor& go) {
  const lora::LoraLinear& l = *p.lora;
  const double s = l.scaling();
  accumulate_grad(l.lora_b(), grad_product(l.lora_b(), go.t(), pass.t));  // [out, r]
  const at::Tensor dt_ = scaled_mm(go, p.b, s);                           // [N, r]
  accumulate_grad(l.lora_a(), grad_product(l.lora_a(), dt_.t(), dropped_input(pass.in)));  // [r, in]
  pass.in.x = at::Tensor();
  pass.in.source = at::Tensor();
  pass.t = at::Tensor();
  return {at::mm(dt_, p.a), std::move(pass.in.mask), pass.in.p};  // [N, in]
}

at::Tensor lora_backward(const Proj& p, LoraPass&& pass, const at::Tensor& go, at::Tensor acc) {
  return add_input_grad(std::move(acc), lora_backward(p, std::move(pass), go));
}

// Runs of up to three GPU bit-mask terms with one p take one kernel pass
// (model::dropout_backward_sum); the rest go one at a time. Either way the terms are added in
// order with the roundings of one call a term.
at::Tensor add_input_grads(at::Tensor acc, std::vector<DroppedGrad> grads) {
  for (size_t first = 0; first < grads.size();) {
    if (!bit_masked(grads[first])) {
      acc = add_input_grad(std::move(acc), std::move(grads[first++]));
      continue;
    }
    size_t last = first + 1;
    while (last < grads.size() && last - first < 3 && bit_masked(grads[last]) && grads[last].p == grads[first].p) ++last;
    std::vector<at::Tensor> d, bits;
    for (size_t k = first; k < last; ++k) {
      d.push_back(std::move(grads[k].dx));
      bits.push_back(std::move(grads[k].mask));
    }
    acc = model::dropout_backward_sum(std::move(acc), std::move(d), bits, 1.0 / (1.0 - grads[first].p));
    first = last;
  }
  return acc;
}

// ---------------------------------------------------------------- RMSNorm

Normed norm_forward(const at::Tensor& x, const at::Tensor& w, double eps, bool plus_one) {
  if (!plus_one && model::fused_rms_norm_applies(x, w)) {
    auto [y, rstd] = at::_fused_rms_norm(x, {x.size(-1)}, w, eps);
    return {y, rstd};
  }
  // model::rms_norm_reference's (or rms_norm_plus_one's) ops, keeping 1/rms.
  const at::Tensor h = x.to(at::kFloat);
  const at::Tensor rstd = norm_rstd(h, eps);
  if (plus_one) return {(h * rstd * (w.to(at::kFloat) + 1.0)).to(x.scalar_type()), rstd};
  return {w * (h * rstd).to(x.scalar_type()), rstd};
}

at::Tensor norm_rstd(const at::Tensor& x, double eps) {
  return at::rsqrt(x.to(at::kFloat).pow(2).mean(-1, /*keepdim=*/true) + eps);
}

at::Tensor norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const Normed& n,
                         bool plus_one) {
  if (!plus_one && model::fused_rms_norm_applies(x, w))
    return std::get<0>(at::_fused_rms_norm_backward(dy, x, {x.size(-1)}, n.rstd, w, {true, false}));
  at::Tensor xhat = x.to(at::kFloat) * n.rstd;  // [N, h] fp32, new
  // As autograd: Llama's product in x's dtype, Gemma's (1 + w) in fp32 (Note [(1 + w) norms]).
  at::Tensor dxhat = plus_one ? dy.to(at::kFloat) * (w.to(at::kFloat) + 1.0) : (dy * w).to(at::kFloat);  // new
  const at::Tensor dot = (dxhat * xhat).mean(-1, /*keepdim=*/true);
  // rstd · (dx̂ - x̂ · dot) in place on the two: the same values, two fp32 [N, h] temporaries fewer.
  dxhat.sub_(xhat.mul_(dot));
  xhat = at::Tensor();
  return dxhat.mul_(n.rstd).to(x.scalar_type());
}

at::Tensor norm_backward_add(at::Tensor dy, const at::Tensor& x, const at::Tensor& w, const Normed& n,
                             const at::Tensor& residual, bool plus_one) {
  if (!plus_one && model::fused_rms_norm_applies(x, w))
    return model::rms_norm_backward_add(std::move(dy), x, w, n.rstd, residual);
  return norm_backward(dy, x, w, n, plus_one).add_(residual);
}

}  // namespace qlora::layer
