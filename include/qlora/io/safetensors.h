// io/safetensors: reading and writing the safetensors format, torch-free.
//
// A safetensors file is an 8-byte little-endian header length N, N bytes of
// UTF-8 JSON (one object: tensor name -> {dtype, shape, data_offsets}, plus an
// optional "__metadata__" string map), then the data section, whose byte ranges
// the header describes. The reader maps the file (read-only, MAP_PRIVATE) and
// validates everything before handing out a pointer: see Note [safetensors
// validation] in src/io/safetensors.cpp for the full list. Every problem is a
// qlora::InputError naming the file and the tensor. The writer produces files
// the Python `safetensors` package loads, atomically (temp file, fsync, rename).
//
// This header and src/io/safetensors.cpp depend only on the standard library,
// nlohmann_json (in the .cpp) and common/errors.h, so the libFuzzer target
// (fuzz/safetensors_fuzz.cpp) builds them without LibTorch. The torch bridge is
// io/torch_io.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace qlora::io {

// ---------------------------------------------------------------- dtypes

// The element types we read and write. F8_* are accepted by the reader (they
// are valid safetensors dtypes); the torch bridge maps them to torch's float8
// types. Other safetensors dtypes (U16, U32, U64, F4, F6_*, F8_E8M0) are
// refused with a message listing these.
enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2 };

// Bytes per element (1, 2, 4 or 8).
size_t dtype_size(DType dtype);
// The name used in the file header ("F32", "BF16", ...).
const char* dtype_name(DType dtype);
// The DType for a header name; false when the name is not one of ours.
bool dtype_from_name(std::string_view name, DType* out);

// ---------------------------------------------------------------- reading

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;  // [] is a scalar (one element); dims >= 0
  uint64_t begin = 0, end = 0;  // byte offsets inside the data section, [begin, end)
  size_t nbytes() const { return static_cast<size_t>(end - begin); }
  int64_t numel() const;
};

// An open, fully validated, memory-mapped safetensors file. Immutable and
// shared: views handed out by the torch bridge keep the mapping alive.
class SafetensorsFile {
 public:
  // Maps and validates `path`; throws InputError naming the file (and the
  // tensor, where one is at fault).
  static std::shared_ptr<const SafetensorsFile> open(const std::string& path);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // In file order (ascending data offsets).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  // nullptr when the file holds no tensor of that name.
  const TensorInfo* find(const std::string& name) const;
  // The tensor's first byte inside the mapping (read-only memory: writing
  // through it crashes). Valid while this object lives; nbytes() long.
  const uint8_t* data(const TensorInfo& info) const;
  // The "__metadata__" map (empty when the file has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Size of the whole file and offset of the data section inside it.
  uint64_t file_size() const { return size_; }
  uint64_t data_offset() const { return data_offset_; }

 private:
  SafetensorsFile() = default;

  std::string path_;
  const uint8_t* base_ = nullptr;  // the mapping (nullptr for an empty data section we did not map)
  uint64_t size_ = 0;
  uint64_t data_offset_ = 0;  // 8 + header length
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;  // name -> position in tensors_
  std::map<std::string, std::string> metadata_;
};

// ---------------------------------------------------------------- writing

struct TensorToWrite {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const void* data = nullptr;  // nbytes bytes, little-endian, row-major
  size_t nbytes = 0;           // must equal numel(shape) * dtype_size(dtype)
};

// Writes a safetensors file the Python `safetensors` package loads. Tensors are
// laid out as that package lays them out (descending dtype alignment, then
// name), so every tensor's data is aligned to its element size when the file
// is mapped. Atomic: writes "<path>.tmp-<pid>", fsyncs it, renames it over
// `path`, fsyncs the directory; on failure the temp file is removed and the
// error names the path. Names must be unique, non-empty, valid UTF-8 without
// control characters, and not "__metadata__" (std::invalid_argument otherwise:
// that is a bug in the caller, not bad user input).
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace qlora::io
