// Test-only safetensors reading/writing for test_model_llama and test_lora
// (fp32/int64/bf16/fp16 tensors, no validation beyond what the golden files
// need). The product code uses the io module; this keeps the model tests
// independent of it.
#pragma once

#include <torch/torch.h>

#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

namespace test_io {

inline at::ScalarType parse_dtype(const std::string& s) {
  if (s == "F32") return at::kFloat;
  if (s == "I64") return at::kLong;
  if (s == "BF16") return at::kBFloat16;
  if (s == "F16") return at::kHalf;
  throw std::runtime_error("test_io: unsupported dtype " + s);
}

inline std::map<std::string, at::Tensor> read_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("test_io: cannot open " + path);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  const auto header = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + 8 + static_cast<int64_t>(n));
  const char* data = bytes.data() + 8 + n;
  std::map<std::string, at::Tensor> out;
  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__") continue;
    std::vector<int64_t> shape = info.at("shape").get<std::vector<int64_t>>();
    const auto offsets = info.at("data_offsets").get<std::vector<uint64_t>>();
    at::Tensor t = at::empty(shape, at::TensorOptions().dtype(parse_dtype(info.at("dtype"))));
    if (static_cast<uint64_t>(t.nbytes()) != offsets[1] - offsets[0]) throw std::runtime_error("test_io: bad size");
    std::memcpy(t.data_ptr(), data + offsets[0], t.nbytes());
    out[name] = t;
  }
  return out;
}

}  // namespace test_io
