// io (private): the byte-level safetensors parser behind SafetensorsFile, exposed
// separately so the libFuzzer target can drive it on in-memory images.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "qlora/io/safetensors.h"

namespace qlora::io::detail {

// The header of a fully validated file image.
struct ParsedFile {
  uint64_t data_offset = 0;          // 8 + header length
  std::vector<TensorInfo> tensors;   // ascending data offsets
  std::map<std::string, std::string> metadata;
};

// Validates a whole safetensors file image [bytes, bytes + size): every rule of
// Note [safetensors validation]. `path` is only used in messages. Throws
// InputError; reads no byte outside the image and allocates memory in
// proportion to the header bytes present, never to numbers the header claims.
ParsedFile parse_safetensors(const uint8_t* bytes, uint64_t size, const std::string& path);

// The Python package's dtype order (ascending alignment); its writer lays tensors out by
// descending rank, then name, and so does ours.
int dtype_alignment_rank(DType dtype);

// Largest header the reader accepts (the Python package's limit too).
inline constexpr uint64_t kMaxHeaderBytes = 100'000'000;
// Largest tensor rank the reader accepts (bounds the work per header entry).
inline constexpr size_t kMaxRank = 64;

}  // namespace qlora::io::detail
