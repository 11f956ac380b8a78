#include "qlora/io/gguf.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>

namespace qlora::io {
namespace {

constexpr uint32_t kVersion = 3;
constexpr uint64_t kAlignment = 32;
// GGUF value types and the F32 tensor type (ggml's type ids).
constexpr uint32_t kTypeUint32 = 4, kTypeFloat32 = 6, kTypeString = 8;
constexpr uint32_t kTensorF32 = 0;

template <typename T>
void put(std::string& out, T v) {
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));  // little-endian hosts
  out.append(b, sizeof(T));
}

void put_string(std::string& out, const std::string& s) {
  put<uint64_t>(out, s.size());
  out += s;
}

void pad(std::string& out) {
  while (out.size() % kAlignment != 0) out.push_back('\0');
}

}  // namespace

void write_gguf(const std::string& path, const std::vector<std::pair<std::string, GgufValue>>& metadata,
                const std::vector<GgufTensor>& tensors) {
  std::string head;
  head += "GGUF";
  put<uint32_t>(head, kVersion);
  put<uint64_t>(head, tensors.size());
  put<uint64_t>(head, metadata.size());
  for (const auto& [key, value] : metadata) {
    put_string(head, key);
    if (const auto* s = std::get_if<std::string>(&value)) {
      put<uint32_t>(head, kTypeString);
      put_string(head, *s);
    } else if (const auto* f = std::get_if<float>(&value)) {
      put<uint32_t>(head, kTypeFloat32);
      put<float>(head, *f);
    } else {
      put<uint32_t>(head, kTypeUint32);
      put<uint32_t>(head, std::get<uint32_t>(value));
    }
  }
  uint64_t offset = 0;
  for (const GgufTensor& t : tensors) {
    uint64_t n = 1;
    for (int64_t d : t.shape) n *= static_cast<uint64_t>(d);
    if (n != t.data.size())
      throw std::invalid_argument("write_gguf: tensor " + t.name + " has " + std::to_string(t.data.size()) +
                                  " values for a shape of " + std::to_string(n));
    put_string(head, t.name);
    put<uint32_t>(head, static_cast<uint32_t>(t.shape.size()));
    for (auto it = t.shape.rbegin(); it != t.shape.rend(); ++it) put<uint64_t>(head, static_cast<uint64_t>(*it));
    put<uint32_t>(head, kTensorF32);
    put<uint64_t>(head, offset);
    offset += (n * 4 + kAlignment - 1) / kAlignment * kAlignment;
  }
  pad(head);
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw std::runtime_error(tmp + ": cannot open for writing");
    out.write(head.data(), static_cast<std::streamsize>(head.size()));
    for (const GgufTensor& t : tensors) {
      const size_t bytes = t.data.size() * 4;
      out.write(reinterpret_cast<const char*>(t.data.data()), static_cast<std::streamsize>(bytes));
      static const char zeros[kAlignment] = {};
      out.write(zeros, static_cast<std::streamsize>((kAlignment - bytes % kAlignment) % kAlignment));
    }
    out.flush();
    if (!out) throw std::runtime_error(tmp + ": write failed (disk full?)");
  }
  std::filesystem::rename(tmp, path);
}

}  // namespace qlora::io
