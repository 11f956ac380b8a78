// io/gguf: writing GGUF files (llama.cpp's format, version 3): a header, key/value metadata
// (strings, float32, uint32), tensor descriptions (name, dims innermost first, type, offset) and
// the tensor data, each aligned to 32 bytes. Written whole through a temporary name and renamed.
// F32 tensors only: what qlora writes here (LoRA adapters) is fp32.
#pragma once

#include <cstdint>
#include <string>
#include <variant>
#include <vector>

namespace qlora::io {

struct GgufTensor {
  std::string name;
  std::vector<int64_t> shape;  // row-major, outermost first (numpy order); GGUF stores it reversed
  std::vector<float> data;     // row-major, shape's element count
};

using GgufValue = std::variant<std::string, float, uint32_t>;

// Throws std::runtime_error naming `path` when it cannot be written; std::invalid_argument for a
// tensor whose data does not have its shape's size.
void write_gguf(const std::string& path, const std::vector<std::pair<std::string, GgufValue>>& metadata,
                const std::vector<GgufTensor>& tensors);

}  // namespace qlora::io
