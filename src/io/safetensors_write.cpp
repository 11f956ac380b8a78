// io/safetensors_write: the atomic safetensors writer.
//
// Layout follows the Python package's writer: tensors sorted by descending dtype alignment,
// then by name; the header is compact JSON with "__metadata__" first and each entry's fields
// in the order dtype, shape, data_offsets; padded with spaces to a multiple of 8 bytes. With
// the 8-byte length prefix, every tensor then starts at a multiple of its element size.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <numeric>
#include <set>
#include <stdexcept>

#include "io/safetensors_format.h"
#include "qlora/common/errors.h"
#include "qlora/io/safetensors.h"

namespace qlora::io {
namespace {

// A JSON string literal; std::invalid_argument when `s` is not valid UTF-8.
std::string quoted(const std::string& s, const char* what) {
  try {
    return nlohmann::json(s).dump(-1, ' ', false, nlohmann::json::error_handler_t::strict);
  } catch (const nlohmann::json::exception&) {
    throw std::invalid_argument(std::string("write_safetensors: ") + what + " is not valid UTF-8");
  }
}

void check_tensor(const TensorToWrite& t) {
  const std::string where = "write_safetensors: tensor \"" + t.name + "\": ";
  if (t.name.empty()) throw std::invalid_argument("write_safetensors: a tensor has an empty name");
  if (t.name == "__metadata__") throw std::invalid_argument(where + "the name is reserved for the metadata map");
  for (unsigned char c : t.name)
    if (c < 0x20 || c == 0x7f) throw std::invalid_argument(where + "the name contains a control character");
  if (t.shape.size() > detail::kMaxRank) throw std::invalid_argument(where + "rank above the reader's limit");
  uint64_t n = 1;
  for (int64_t d : t.shape) {
    if (d < 0) throw std::invalid_argument(where + "negative dimension " + std::to_string(d));
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n)) throw std::invalid_argument(where + "shape overflows");
  }
  uint64_t bytes = 0;
  if (__builtin_mul_overflow(n, static_cast<uint64_t>(dtype_size(t.dtype)), &bytes) || bytes != t.nbytes)
    throw std::invalid_argument(where + "nbytes " + std::to_string(t.nbytes) + " does not match the shape (" +
                                std::to_string(n) + " elements of " + dtype_name(t.dtype) + ")");
  if (t.nbytes > 0 && t.data == nullptr) throw std::invalid_argument(where + "data is null");
}

// The header text for tensors in `order`, already padded to a multiple of 8 bytes.
std::string header_json(const std::vector<TensorToWrite>& tensors, const std::vector<size_t>& order,
                        const std::map<std::string, std::string>& metadata) {
  std::string h = "{";
  if (!metadata.empty()) {
    h += "\"__metadata__\":{";
    bool first = true;
    for (const auto& [k, v] : metadata) {
      h += (first ? "" : ",") + quoted(k, "a metadata key") + ":" + quoted(v, "a metadata value");
      first = false;
    }
    h += "}";
  }
  uint64_t offset = 0;
  for (size_t i : order) {
    const TensorToWrite& t = tensors[i];
    if (h.size() > 1) h += ",";
    h += quoted(t.name, "a tensor name") + ":{\"dtype\":\"" + dtype_name(t.dtype) + "\",\"shape\":[";
    for (size_t d = 0; d < t.shape.size(); ++d) h += (d ? "," : "") + std::to_string(t.shape[d]);
    h += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + t.nbytes) + "]}";
    offset += t.nbytes;
  }
  h += "}";
  h.append((8 - h.size() % 8) % 8, ' ');
  return h;
}

// Writes all of [p, p + n) or returns false with errno set.
bool write_all(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    ssize_t w = ::write(fd, c, std::min<size_t>(n, size_t{1} << 30));
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    c += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

std::string parent_dir(const std::string& path) {
  auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

}  // namespace

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::set<std::string> names;
  for (const auto& t : tensors) {
    check_tensor(t);
    if (!names.insert(t.name).second)
      throw std::invalid_argument("write_safetensors: tensor \"" + t.name + "\" given twice");
  }
  std::vector<size_t> order(tensors.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    int ra = detail::dtype_alignment_rank(tensors[a].dtype), rb = detail::dtype_alignment_rank(tensors[b].dtype);
    return ra != rb ? ra > rb : tensors[a].name < tensors[b].name;
  });
  const std::string header = header_json(tensors, order, metadata);

  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    throw InputError(path + ": cannot create the file (" + tmp + "): " + std::strerror(errno) +
                     ". Check that the directory exists and is writable.");
  }
  auto fail = [&](const std::string& step) {
    int err = errno;
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw std::runtime_error(path + ": writing the safetensors file failed at " + step + ": " + std::strerror(err) +
                             " (disk full or I/O error?)");
  };
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(static_cast<uint64_t>(header.size()) >> (8 * i));
  if (!write_all(fd, len, 8) || !write_all(fd, header.data(), header.size())) fail("the header");
  for (size_t i : order)
    if (!write_all(fd, tensors[i].data, tensors[i].nbytes)) fail("tensor \"" + tensors[i].name + "\"");
  if (::fsync(fd) != 0) fail("fsync");
  if (::close(fd) != 0) {
    fd = -1;
    fail("close");
  }
  fd = -1;
  if (::rename(tmp.c_str(), path.c_str()) != 0) fail("rename to the final name");
  // The rename is durable only once the directory entry is on disk.
  int dir = ::open(parent_dir(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {
    ::fsync(dir);
    ::close(dir);
  }
}

}  // namespace qlora::io
