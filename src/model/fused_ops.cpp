// TEMPORARY shim (lead).
#include "qlora/model/fused_ops.h"
#include <ATen/ATen.h>
#include "qlora/model/llama.h"
namespace qlora::model {
void rope_inplace(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  // x [B,T,H,d]; apply_rope wants [B,H,T,d] and cos [B,T,d]
  at::Tensor xt = x.transpose(1, 2);
  x.copy_(apply_rope(xt, cos, sin).transpose(1, 2));
}
void rope_backward_inplace(at::Tensor& g, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = g.size(-1) / 2;
  at::Tensor c = cos.unsqueeze(2), s = sin.unsqueeze(2);
  at::Tensor gs = g * s;
  at::Tensor rt = at::cat({gs.narrow(-1, half, half), -gs.narrow(-1, 0, half)}, -1);
  g.copy_(g * c + rt);
}
at::Tensor swiglu(const at::Tensor& gu) {
  const int64_t i = gu.size(1) / 2;
  return at::silu(gu.narrow(1, 0, i)) * gu.narrow(1, i, i);
}
void swiglu_backward_inplace(const at::Tensor& dm, at::Tensor& gu) {
  const int64_t i = gu.size(1) / 2;
  at::Tensor g = gu.narrow(1, 0, i), u = gu.narrow(1, i, i);
  at::Tensor sg = at::sigmoid(g.to(at::kFloat));
  at::Tensor gf = g.to(at::kFloat);
  at::Tensor du = dm * at::silu(g);
  at::Tensor dg = (dm.to(at::kFloat) * u.to(at::kFloat) * sg * (1 + gf * (1 - sg))).to(gu.scalar_type());
  g.copy_(dg);
  u.copy_(du);
}
}
