// io/torch_io: safetensors <-> torch tensors.
//
// Note [mapped tensors are read-only]
// SafetensorsFile maps the file PROT_READ / MAP_PRIVATE, and tensor_view() puts that memory
// under a torch storage without copying. An in-place op on such a tensor (add_, copy_ into it,
// an optimizer step) faults with SIGSEGV. We keep the mapping read-only anyway: a writable
// private mapping is charged to the process's commit limit for its whole size (a 16 GB model
// would need 16 GB of commit even if never written), and read-only memory is shared with the
// page cache across processes (several ranks on one host read one copy). Callers that update
// tensors clone() them first, or use load_safetensors(), which copies.
#include "qlora/io/torch_io.h"

#include <ATen/ATen.h>

#include <cstring>
#include <stdexcept>

#include "qlora/common/errors.h"

namespace qlora::io {

at::ScalarType to_scalar_type(DType dtype) {
  switch (dtype) {
    case DType::F64: return at::kDouble;
    case DType::F32: return at::kFloat;
    case DType::F16: return at::kHalf;
    case DType::BF16: return at::kBFloat16;
    case DType::I64: return at::kLong;
    case DType::I32: return at::kInt;
    case DType::I16: return at::kShort;
    case DType::I8: return at::kChar;
    case DType::U8: return at::kByte;
    case DType::BOOL: return at::kBool;
    case DType::F8_E4M3: return at::kFloat8_e4m3fn;
    case DType::F8_E5M2: return at::kFloat8_e5m2;
  }
  throw std::logic_error("io: unhandled DType");
}

DType from_scalar_type(at::ScalarType type) {
  switch (type) {
    case at::kDouble: return DType::F64;
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    case at::kLong: return DType::I64;
    case at::kInt: return DType::I32;
    case at::kShort: return DType::I16;
    case at::kChar: return DType::I8;
    case at::kByte: return DType::U8;
    case at::kBool: return DType::BOOL;
    case at::kFloat8_e4m3fn: return DType::F8_E4M3;
    case at::kFloat8_e5m2: return DType::F8_E5M2;
    default:
      throw std::invalid_argument(std::string("safetensors cannot store torch dtype ") + c10::toString(type));
  }
}

at::Tensor tensor_view(std::shared_ptr<const SafetensorsFile> file, const TensorInfo& info) {
  const uint8_t* p = file->data(info);
  const size_t n = info.nbytes();
  if (info.dtype == DType::BOOL) {
    // torch assumes a bool byte is 0 or 1; anything else is undefined behaviour in its kernels.
    for (size_t i = 0; i < n; ++i)
      if (p[i] > 1)
        throw InputError(file->path() + ": tensor \"" + info.name + "\": BOOL element " + std::to_string(i) +
                         " is " + std::to_string(p[i]) + ", expected 0 or 1. The file is damaged; download or "
                         "save it again.");
  }
  const auto options = at::TensorOptions().dtype(to_scalar_type(info.dtype)).device(at::kCPU);
  const std::vector<int64_t> sizes(info.shape.begin(), info.shape.end());
  if (n == 0) return at::empty(sizes, options);
  if (reinterpret_cast<uintptr_t>(p) % dtype_size(info.dtype) == 0) {
    // The storage holds the file alive; from_blob's data pointer is non-const by API only
    // (Note [mapped tensors are read-only]).
    auto keep = std::move(file);
    return at::from_blob(const_cast<uint8_t*>(p), sizes, [keep](void*) mutable { keep.reset(); }, options);
  }
  at::Tensor copy = at::empty(sizes, options);
  std::memcpy(copy.data_ptr(), p, n);
  return copy;
}

std::map<std::string, at::Tensor> load_safetensors(const std::string& path) {
  auto file = SafetensorsFile::open(path);
  std::map<std::string, at::Tensor> out;
  for (const TensorInfo& info : file->tensors()) out[info.name] = tensor_view(file, info).clone();
  return out;
}

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<at::Tensor> keep;  // owns the CPU contiguous copies while writing
  std::vector<TensorToWrite> rows;
  keep.reserve(tensors.size());
  rows.reserve(tensors.size());
  for (const auto& [name, t] : tensors) {
    if (!t.defined()) throw std::invalid_argument("save_safetensors: tensor \"" + name + "\" is undefined");
    keep.push_back(t.to(at::kCPU).contiguous());
    const at::Tensor& c = keep.back();
    TensorToWrite row;
    row.name = name;
    row.dtype = from_scalar_type(c.scalar_type());
    row.shape.assign(c.sizes().begin(), c.sizes().end());
    row.data = c.data_ptr();
    row.nbytes = c.nbytes();
    rows.push_back(std::move(row));
  }
  write_safetensors(path, rows, metadata);
}

}  // namespace qlora::io
