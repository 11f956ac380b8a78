// The optimizer golden runs of scripts/golden/optim.py, shared by the AdamW and
// 8-bit AdamW tests: the same inputs, rebuilt bit for bit, and the recorded outputs.
#pragma once

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "qlora/io/torch_io.h"
#include "qlora/optim/optimizer.h"

namespace qlora::testing {

// Note [optim golden inputs]: scripts/golden/optim.py's exact_values, reimplemented; every
// value is exact in fp32, so both sides start from identical bits.
inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  uint64_t z = x;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline at::Tensor exact_values(uint64_t seed, std::vector<int64_t> shape) {
  at::Tensor t = at::empty(shape, at::kFloat);
  float* p = t.data_ptr<float>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    const uint64_t z = splitmix64((seed << 32) ^ static_cast<uint64_t>(i));
    const int64_t u = static_cast<int64_t>(z >> 40);
    const int e = static_cast<int>((z >> 8) & 7);
    p[i] = static_cast<float>(std::ldexp(static_cast<double>(u - (1 << 23)), e - 4 - 23));
  }
  return t;
}

struct OptimGolden {
  nlohmann::ordered_json meta;  // insertion order: the shapes' order gives the seeds
  std::map<std::string, at::Tensor> tensors;
};

inline OptimGolden load_optim_golden(const std::string& file) {
  const std::string dir = std::string(QLORA_SOURCE_DIR) + "/tests/data/optim/";
  std::ifstream m(dir + "meta.json");
  return {nlohmann::ordered_json::parse(m), io::load_safetensors(dir + file)};
}

inline std::vector<optim::NamedParam> make_params(const nlohmann::ordered_json& meta) {
  std::vector<optim::NamedParam> params;
  uint64_t k = 0;
  for (const auto& [name, shape] : meta["shapes"].items()) {
    params.push_back({name, exact_values(1000 + k, shape.get<std::vector<int64_t>>())});
    ++k;
  }
  return params;
}

inline void set_grads(std::vector<optim::NamedParam>& params, int64_t step) {
  const float scale = static_cast<float>(std::ldexp(1.0, static_cast<int>(step % 3) - 1));
  for (size_t k = 0; k < params.size(); ++k)
    params[k].param.mutable_grad() = exact_values(100 * (step + 1) + k, params[k].param.sizes().vec()) * scale;
}

inline optim::AdamWOptions options_of(const nlohmann::ordered_json& meta) {
  optim::AdamWOptions o;
  o.beta1 = meta["beta1"];
  o.beta2 = meta["beta2"];
  o.eps = meta["eps"];
  o.weight_decay = meta["weight_decay"];
  return o;
}

}  // namespace qlora::testing
