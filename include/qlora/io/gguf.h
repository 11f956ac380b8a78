// io/gguf: writing GGUF files (llama.cpp's format, version 3): a header, key/value metadata
// (strings, float32, uint32, int32, uint64, bool, and arrays of strings, int32 or float32),
// tensor descriptions (name, dims innermost first, type, offset) and the tensor data, each
// aligned to 32 bytes. Tensors are F32, F16, BF16 or Q8_0 (ggml's blocks of 32 values: an fp16
// scale and 32 int8 codes). Written through a temporary name and renamed, so the file is either
// absent or complete. `GgufWriter` streams the data tensor by tensor (a model never needs to be
// whole in memory); `write_gguf` writes F32 tensors held in memory (LoRA adapters).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace qlora::io {

// ---------------------------------------------------------------- types

// ggml's type ids.
enum class GgufType : uint32_t { kF32 = 0, kF16 = 1, kQ8_0 = 8, kBF16 = 30 };

const char* gguf_type_name(GgufType type);  // "F32", "F16", "Q8_0", "BF16"

// Q8_0's block: 32 values a block, 34 bytes (fp16 scale, 32 int8).
constexpr int64_t kQ8_0Block = 32;

// Bytes of `n` values (a row, or a whole tensor) in `type`. std::invalid_argument for Q8_0 with
// n not a multiple of kQ8_0Block.
uint64_t gguf_bytes(GgufType type, int64_t n);

using GgufValue = std::variant<std::string, float, uint32_t, int32_t, uint64_t, bool, std::vector<std::string>,
                               std::vector<int32_t>, std::vector<float>>;
using GgufMetadata = std::vector<std::pair<std::string, GgufValue>>;

// ---------------------------------------------------------------- encoding

// fp32 to IEEE half, round to nearest even (numpy's astype(float16), ggml's fp32 -> fp16).
uint16_t fp32_to_fp16_bits(float x);

// ggml's reference Q8_0 quantization of `n` values (n a multiple of kQ8_0Block): per block
// d = max|x| / 127, codes round(x / d) half away from zero, d stored as fp16. `out` holds
// gguf_bytes(kQ8_0, n) bytes.
void quantize_q8_0(const float* x, int64_t n, uint8_t* out);

// ---------------------------------------------------------------- streaming writer

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> shape;  // row-major, outermost first (numpy order); GGUF stores it reversed
  GgufType type = GgufType::kF32;
};

// Writes the header at construction, then each tensor's bytes in the order of `tensors`, then
// renames into place at finish(). A writer destroyed before finish() removes its temporary file.
// std::runtime_error naming the path when it cannot be written; std::invalid_argument for data
// of the wrong size or written out of turn.
class GgufWriter {
 public:
  GgufWriter(std::string path, const GgufMetadata& metadata, std::vector<GgufTensorInfo> tensors);
  ~GgufWriter();
  GgufWriter(const GgufWriter&) = delete;
  GgufWriter& operator=(const GgufWriter&) = delete;

  // The next tensor's data: exactly gguf_bytes(type, numel) bytes.
  void write_next(const void* data, uint64_t bytes);
  // After every tensor: flush, fsync, rename to the final path.
  void finish();

 private:
  std::string path_, tmp_;
  std::vector<GgufTensorInfo> tensors_;
  size_t next_ = 0;
  int fd_ = -1;
  void write_all(const void* data, uint64_t bytes);
};

// ---------------------------------------------------------------- F32 tensors in memory

struct GgufTensor {
  std::string name;
  std::vector<int64_t> shape;  // row-major, outermost first (numpy order); GGUF stores it reversed
  std::vector<float> data;     // row-major, shape's element count
};

// Throws std::runtime_error naming `path` when it cannot be written; std::invalid_argument for a
// tensor whose data does not have its shape's size.
void write_gguf(const std::string& path, const GgufMetadata& metadata, const std::vector<GgufTensor>& tensors);

}  // namespace qlora::io
