#include "qlora/io/gguf.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>

namespace qlora::io {
namespace {

constexpr uint32_t kVersion = 3;
constexpr uint64_t kAlignment = 32;
// GGUF metadata value types.
constexpr uint32_t kTypeUint32 = 4, kTypeInt32 = 5, kTypeFloat32 = 6, kTypeBool = 7, kTypeString = 8,
                   kTypeArray = 9, kTypeUint64 = 10;

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

uint64_t padded(uint64_t n) { return (n + kAlignment - 1) / kAlignment * kAlignment; }

void put_value(std::string& out, const GgufValue& value) {
  struct Put {
    std::string& out;
    void operator()(const std::string& s) const { put<uint32_t>(out, kTypeString), put_string(out, s); }
    void operator()(float f) const { put<uint32_t>(out, kTypeFloat32), put<float>(out, f); }
    void operator()(uint32_t u) const { put<uint32_t>(out, kTypeUint32), put<uint32_t>(out, u); }
    void operator()(int32_t i) const { put<uint32_t>(out, kTypeInt32), put<int32_t>(out, i); }
    void operator()(uint64_t u) const { put<uint32_t>(out, kTypeUint64), put<uint64_t>(out, u); }
    void operator()(bool b) const { put<uint32_t>(out, kTypeBool), put<uint8_t>(out, b ? 1 : 0); }
    void operator()(const std::vector<std::string>& a) const {
      put<uint32_t>(out, kTypeArray), put<uint32_t>(out, kTypeString), put<uint64_t>(out, a.size());
      for (const auto& s : a) put_string(out, s);
    }
    void operator()(const std::vector<int32_t>& a) const {
      put<uint32_t>(out, kTypeArray), put<uint32_t>(out, kTypeInt32), put<uint64_t>(out, a.size());
      for (int32_t v : a) put<int32_t>(out, v);
    }
    void operator()(const std::vector<float>& a) const {
      put<uint32_t>(out, kTypeArray), put<uint32_t>(out, kTypeFloat32), put<uint64_t>(out, a.size());
      for (float v : a) put<float>(out, v);
    }
  };
  std::visit(Put{out}, value);
}

uint64_t numel_of(const std::vector<int64_t>& shape) {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error(path + ": " + what + " (" + std::strerror(errno) + ")");
}

}  // namespace

const char* gguf_type_name(GgufType type) {
  switch (type) {
    case GgufType::kF32: return "F32";
    case GgufType::kF16: return "F16";
    case GgufType::kQ8_0: return "Q8_0";
    case GgufType::kBF16: return "BF16";
  }
  return "?";
}

uint64_t gguf_bytes(GgufType type, int64_t n) {
  switch (type) {
    case GgufType::kF32: return static_cast<uint64_t>(n) * 4;
    case GgufType::kF16:
    case GgufType::kBF16: return static_cast<uint64_t>(n) * 2;
    case GgufType::kQ8_0:
      if (n % kQ8_0Block != 0)
        throw std::invalid_argument("Q8_0 needs a multiple of 32 values, got " + std::to_string(n));
      return static_cast<uint64_t>(n / kQ8_0Block) * (2 + kQ8_0Block);
  }
  throw std::invalid_argument("unknown GGUF tensor type");
}

uint16_t fp32_to_fp16_bits(float x) {
  uint32_t f;
  std::memcpy(&f, &x, 4);
  const uint32_t sign = (f >> 16) & 0x8000u;
  const uint32_t abs = f & 0x7fffffffu;
  if (abs >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {
    // Subnormal half (or zero): value / 2^-24, rounded to nearest even.
    const float a = std::fabs(x) * 16777216.0f;  // exact: a power-of-two scale of a small float
    const float r = std::nearbyint(a);           // default rounding mode: to nearest even
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(r));
  }
  // Normal: drop 13 mantissa bits, round to nearest even (a carry into the exponent is right).
  const uint32_t rebased = abs - 0x38000000u;  // exponent bias 127 -> 15
  const uint32_t round = 0xfffu + ((rebased >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((rebased + round) >> 13));
}

void quantize_q8_0(const float* x, int64_t n, uint8_t* out) {
  if (n % kQ8_0Block != 0) throw std::invalid_argument("quantize_q8_0: n must be a multiple of 32");
  for (int64_t b = 0; b < n / kQ8_0Block; ++b) {
    const float* v = x + b * kQ8_0Block;
    float amax = 0;
    for (int64_t i = 0; i < kQ8_0Block; ++i) amax = std::max(amax, std::fabs(v[i]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const uint16_t dh = fp32_to_fp16_bits(d);
    uint8_t* o = out + b * (2 + kQ8_0Block);
    std::memcpy(o, &dh, 2);
    for (int64_t i = 0; i < kQ8_0Block; ++i) {
      const int8_t q = static_cast<int8_t>(std::round(v[i] * id));  // half away from zero
      std::memcpy(o + 2 + i, &q, 1);
    }
  }
}

// ---------------------------------------------------------------- GgufWriter

GgufWriter::GgufWriter(std::string path, const GgufMetadata& metadata, std::vector<GgufTensorInfo> tensors)
    : path_(std::move(path)), tmp_(path_ + ".tmp"), tensors_(std::move(tensors)) {
  std::string head;
  head += "GGUF";
  put<uint32_t>(head, kVersion);
  put<uint64_t>(head, tensors_.size());
  put<uint64_t>(head, metadata.size());
  for (const auto& [key, value] : metadata) {
    put_string(head, key);
    put_value(head, value);
  }
  uint64_t offset = 0;
  for (const GgufTensorInfo& t : tensors_) {
    const uint64_t bytes = gguf_bytes(t.type, static_cast<int64_t>(numel_of(t.shape)));
    put_string(head, t.name);
    put<uint32_t>(head, static_cast<uint32_t>(t.shape.size()));
    for (auto it = t.shape.rbegin(); it != t.shape.rend(); ++it) put<uint64_t>(head, static_cast<uint64_t>(*it));
    put<uint32_t>(head, static_cast<uint32_t>(t.type));
    put<uint64_t>(head, offset);
    offset += padded(bytes);
  }
  head.resize(padded(head.size()), '\0');
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) fail(tmp_, "cannot open for writing");
  try {
    write_all(head.data(), head.size());
  } catch (...) {  // a throwing constructor runs no destructor: close and remove here
    ::close(fd_);
    fd_ = -1;
    std::remove(tmp_.c_str());
    throw;
  }
}

GgufWriter::~GgufWriter() {
  if (fd_ >= 0) {
    ::close(fd_);
    std::remove(tmp_.c_str());
  }
}

void GgufWriter::write_all(const void* data, uint64_t bytes) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t n = ::write(fd_, p, bytes);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail(tmp_, "write failed (disk full?)");
    p += n;
    bytes -= static_cast<uint64_t>(n);
  }
}

void GgufWriter::write_next(const void* data, uint64_t bytes) {
  if (next_ >= tensors_.size()) throw std::invalid_argument("GgufWriter: more tensors written than described");
  const GgufTensorInfo& t = tensors_[next_];
  const uint64_t want = gguf_bytes(t.type, static_cast<int64_t>(numel_of(t.shape)));
  if (bytes != want)
    throw std::invalid_argument("GgufWriter: tensor " + t.name + " has " + std::to_string(bytes) + " bytes, its " +
                                gguf_type_name(t.type) + " shape needs " + std::to_string(want));
  write_all(data, bytes);
  static const char zeros[kAlignment] = {};
  write_all(zeros, padded(bytes) - bytes);
  ++next_;
}

void GgufWriter::finish() {
  if (next_ != tensors_.size())
    throw std::invalid_argument("GgufWriter: " + std::to_string(tensors_.size() - next_) + " tensors not written");
  if (::fsync(fd_) != 0) fail(tmp_, "fsync failed");
  const int rc = ::close(fd_);
  fd_ = -1;
  if (rc != 0) {
    std::remove(tmp_.c_str());
    fail(tmp_, "close failed");
  }
  if (std::rename(tmp_.c_str(), path_.c_str()) != 0) {
    std::remove(tmp_.c_str());
    fail(path_, "cannot rename " + tmp_ + " into place");
  }
}

// ---------------------------------------------------------------- write_gguf

void write_gguf(const std::string& path, const GgufMetadata& metadata, const std::vector<GgufTensor>& tensors) {
  std::vector<GgufTensorInfo> infos;
  for (const GgufTensor& t : tensors) {
    const uint64_t n = numel_of(t.shape);
    if (n != t.data.size())
      throw std::invalid_argument("write_gguf: tensor " + t.name + " has " + std::to_string(t.data.size()) +
                                  " values for a shape of " + std::to_string(n));
    infos.push_back({t.name, t.shape, GgufType::kF32});
  }
  GgufWriter w(path, metadata, std::move(infos));
  for (const GgufTensor& t : tensors) w.write_next(t.data.data(), t.data.size() * 4);
  w.finish();
}

}  // namespace qlora::io
