// RoPE: the inverse frequencies of every scaling type transformers implements, bit for bit, and
// their application (declared in model/decoder.h).
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "qlora/model/decoder.h"

namespace qlora::model {

// Note [RoPE frequencies bit for bit]
// transformers computes inv_freq in fp32 with a particular sequence of ops
// (`1.0 / base ** (arange / dim)`, Python's `a / t` being `reciprocal(t) * a`);
// the llama3 scaling then compares wavelengths against thresholds computed in
// double and cast to fp32 by the comparison; yarn blends interpolated and
// extrapolated frequencies with a ramp computed in fp32 from bounds computed in
// double; dynamic grows the base in fp32 (seq_len is a tensor there). The same
// ATen ops in the same order give the same bits, which the golden tests check.
namespace {

at::Tensor default_inv_freq(double base, int64_t dim) {
  at::Tensor exponent = at::arange(0, dim, 2, at::TensorOptions().dtype(at::kLong)).to(at::kFloat) / dim;
  return at::reciprocal(at::pow(base, exponent)) * 1.0;
}

at::Tensor llama3_inv_freq(const RopeScaling& r, at::Tensor inv_freq) {
  const double factor = r.factor;
  const double low = r.low_freq_factor, high = r.high_freq_factor;
  const double old_context = static_cast<double>(r.original_max_position_embeddings);
  const double low_freq_wavelen = old_context / low;
  const double high_freq_wavelen = old_context / high;

  at::Tensor wavelen = at::reciprocal(inv_freq) * (2 * M_PI);
  at::Tensor scaled = at::where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq);
  at::Tensor smooth = (at::reciprocal(wavelen) * old_context - low) / (high - low);
  at::Tensor smoothed = (1 - smooth) * scaled / factor + smooth * scaled;
  at::Tensor medium = at::logical_not(wavelen < high_freq_wavelen) * at::logical_not(wavelen > low_freq_wavelen);
  return at::where(medium, smoothed, scaled);
}

at::Tensor yarn_inv_freq(const RopeScaling& r, double base, int64_t dim) {
  const auto correction_dim = [&](double rotations) {
    return (static_cast<double>(dim) *
            std::log(static_cast<double>(r.original_max_position_embeddings) / (rotations * 2 * M_PI))) /
           (2 * std::log(base));
  };
  double low = correction_dim(r.beta_fast), high = correction_dim(r.beta_slow);
  if (r.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;  // transformers: prevent a singular ramp
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor pos_freqs = at::pow(base, at::arange(0, dim, 2, at::TensorOptions().dtype(at::kLong)).to(at::kFloat) / dim);
  at::Tensor extrapolation = at::reciprocal(pos_freqs) * 1.0;
  at::Tensor interpolation = at::reciprocal(pos_freqs * r.factor) * 1.0;
  at::Tensor ramp = at::clamp((at::arange(dim / 2, f32) - low) / (high - low), 0, 1);
  at::Tensor extrapolation_factor = 1 - ramp;
  return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor;
}

}  // namespace

// LongRoPE (transformers' _compute_longrope_parameters): 1 / (factor_i * base^(2i / dim)).
at::Tensor longrope_inv_freq(const RopeScaling& r, double base, int64_t dim, bool long_context) {
  const std::vector<double>& f = long_context ? r.long_factor : r.short_factor;
  at::Tensor ext = at::tensor(std::vector<float>(f.begin(), f.end()), at::TensorOptions().dtype(at::kFloat));
  at::Tensor shape = at::arange(0, dim, 2, at::TensorOptions().dtype(at::kLong)).to(at::kFloat) / dim;
  return at::reciprocal(ext * at::pow(base, shape)) * 1.0;
}

at::Tensor rope_inv_freq(const DecoderConfig& c, int64_t seq_len) {
  const int64_t dim = c.rotary_dim();
  const RopeScaling& r = c.rope;
  switch (r.type) {
    case RopeType::kDefault:
      return default_inv_freq(c.rope_theta, dim);
    case RopeType::kLinear:
      return default_inv_freq(c.rope_theta, dim) / r.factor;
    case RopeType::kLlama3:
      return llama3_inv_freq(r, default_inv_freq(c.rope_theta, dim));
    case RopeType::kYarn:
      return yarn_inv_freq(r, c.rope_theta, dim);
    case RopeType::kLongrope:
      return longrope_inv_freq(r, c.rope_theta, dim, seq_len > r.original_max_position_embeddings);
    case RopeType::kDynamic: {
      const int64_t max_pos = c.max_position_embeddings;
      const int64_t len = std::max(seq_len, max_pos);
      // base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2)), in fp32.
      at::Tensor n = at::scalar_tensor(len, at::TensorOptions().dtype(at::kLong));
      at::Tensor base = c.rope_theta * at::pow(r.factor * n / max_pos - (r.factor - 1),
                                               static_cast<double>(dim) / static_cast<double>(dim - 2));
      at::Tensor exponent = at::arange(0, dim, 2, at::TensorOptions().dtype(at::kLong)).to(at::kFloat) / dim;
      return at::reciprocal(at::pow(base, exponent)) * 1.0;
    }
  }
  return default_inv_freq(c.rope_theta, dim);
}

std::pair<at::Tensor, at::Tensor> rope_cos_sin(const at::Tensor& inv_freq, const at::Tensor& position_ids,
                                               at::ScalarType dtype, double attention_scaling) {
  const auto b = position_ids.size(0);
  at::Tensor f = inv_freq.to(position_ids.device(), at::kFloat).view({1, -1, 1}).expand({b, -1, 1});  // [B, d/2, 1]
  at::Tensor p = position_ids.unsqueeze(1).to(at::kFloat);                                           // [B, 1, T]
  at::Tensor freqs = at::matmul(f, p).transpose(1, 2);                                               // [B, T, d/2]
  at::Tensor emb = at::cat({freqs, freqs}, -1);                                                      // [B, T, d]
  if (attention_scaling == 1.0) return {emb.cos().to(dtype), emb.sin().to(dtype)};
  return {(emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)};
}

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  if (cos.size(-1) < x.size(-1)) {  // partial rotary: the first cos.size(-1) dims turn, the rest pass
    const int64_t rot = cos.size(-1);
    return at::cat({apply_rope(x.narrow(-1, 0, rot), cos, sin), x.narrow(-1, rot, x.size(-1) - rot)}, -1);
  }
  const int64_t half = x.size(-1) / 2;
  at::Tensor c = cos.unsqueeze(1), s = sin.unsqueeze(1);  // [B, 1, T, d]
  at::Tensor rotated = at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * c + rotated * s;
}

}  // namespace qlora::model
