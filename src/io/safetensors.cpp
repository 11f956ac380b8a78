// io/safetensors: the validating reader (mmap) and the atomic writer.
//
// Note [safetensors validation]
// A file is accepted only when all of these hold (checked in this order):
//   1. it is a regular file of at least 8 bytes;
//   2. the header length N (u64 little-endian) is <= kMaxHeaderBytes and 8 + N <= file size;
//   3. the N header bytes are valid UTF-8 (no overlongs, surrogates, or code points > U+10FFFF)
//      without NUL bytes;
//   4. they are one JSON object, nothing after it but whitespace, no key given twice at any
//      level (nlohmann's DOM keeps the last of duplicate keys silently, so we parse with SAX);
//   5. "__metadata__", if present, is an object of string -> string;
//   6. every other key is a tensor name: non-empty, no control characters (U+0000-U+001F,
//      U+007F); its value an object with exactly the fields dtype (a known name), shape (an
//      array of at most kMaxRank integers in [0, 2^63)) and data_offsets (two integers);
//   7. per tensor: begin <= end <= data size, and end - begin == numel x element size, where
//      the product is computed with overflow checks (a shape "claiming terabytes" fails here
//      with both numbers in the message);
//   8. sorted by offset, the tensors tile [0, data size) exactly: the first starts at 0, each
//      starts where the previous ended (else: an overlap or a hole, naming both tensors), the
//      last ends at the end of the file (else: trailing bytes).
// Names are only names: "../x" is accepted because we never turn a tensor name into a path.
//
// Note [no allocation from header numbers]
// Nothing is ever sized by a number read from the file: shapes and offsets are only compared
// and multiplied (overflow-checked), data is never copied, and the file itself is mapped, not
// read. What is allocated is the parsed header: each name once (duplicates are found by
// sorting pointers, the name index holds string_views), one TensorInfo per entry with at most
// kMaxRank dims (8 bytes per dim, written as at least 2 header bytes), the metadata strings,
// and nlohmann's buffer for one token. That is a small multiple of the header bytes actually
// present, which are bounded by the file size and by kMaxHeaderBytes. The SAX handler also refuses any JSON
// nesting deeper than the format needs (3 levels) as soon as it starts, so a header of
// "[[[[..." never builds a tree.
#include "qlora/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <numeric>
#include <stdexcept>

#include "io/safetensors_format.h"
#include "qlora/common/errors.h"
#include "qlora/common/text.h"

namespace qlora::io {

// ---------------------------------------------------------------- dtypes
namespace {

struct DTypeRow {
  DType dtype;
  const char* name;
  size_t size;
  int alignment_rank;  // the Python package's Dtype order: the writer sorts by it, descending
};

constexpr DTypeRow kDTypes[] = {
    {DType::F64, "F64", 8, 12},     {DType::F32, "F32", 4, 11},        {DType::F16, "F16", 2, 7},
    {DType::BF16, "BF16", 2, 8},    {DType::I64, "I64", 8, 13},        {DType::I32, "I32", 4, 9},
    {DType::I16, "I16", 2, 5},      {DType::I8, "I8", 1, 2},           {DType::U8, "U8", 1, 1},
    {DType::BOOL, "BOOL", 1, 0},    {DType::F8_E4M3, "F8_E4M3", 1, 4}, {DType::F8_E5M2, "F8_E5M2", 1, 3},
};

// Valid safetensors dtypes that we do not read (message: "qlora does not read").
constexpr const char* kForeignDTypes[] = {"U16", "U32", "U64", "F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "C64"};

const DTypeRow& row_of(DType dtype) {
  for (const auto& r : kDTypes)
    if (r.dtype == dtype) return r;
  throw std::logic_error("io: DType without a table row");
}

std::string dtype_list() {
  std::string out;
  for (const auto& r : kDTypes) out += std::string(out.empty() ? "" : ", ") + r.name;
  return out;
}

}  // namespace

size_t dtype_size(DType dtype) { return row_of(dtype).size; }
int detail::dtype_alignment_rank(DType dtype) { return row_of(dtype).alignment_rank; }
const char* dtype_name(DType dtype) { return row_of(dtype).name; }

bool dtype_from_name(std::string_view name, DType* out) {
  for (const auto& r : kDTypes) {
    if (name == r.name) {
      *out = r.dtype;
      return true;
    }
  }
  return false;
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;  // validated by the reader: cannot overflow
  return n;
}

// ---------------------------------------------------------------- parsing
namespace detail {
namespace {

constexpr const char* kCorruptHint =
    "The file is damaged or was not written by a safetensors writer: download it again, or "
    "re-save it with the Python safetensors package (safetensors.torch.save_file).";

// A name or JSON fragment made safe for a one-line message: control bytes escaped, long
// text cut (a 10 MB tensor name must not become a 10 MB message).
std::string printable(std::string_view s, size_t limit = 80) {
  std::string out;
  for (size_t i = 0; i < s.size() && i < limit; ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  if (s.size() > limit) out += "...(" + std::to_string(s.size()) + " bytes)";
  return out;
}

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw InputError(path + ": " + what + ". " + kCorruptHint);
}

[[noreturn]] void fail_tensor(const std::string& path, const std::string& name, const std::string& what) {
  fail(path, "tensor \"" + printable(name) + "\": " + what);
}

// Offset of the first byte that is not part of valid UTF-8, or npos.
size_t invalid_utf8_at(const uint8_t* s, size_t n) {
  size_t i = 0;
  while (i < n) {
    uint8_t c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint32_t cp, min;
    if ((c & 0xe0) == 0xc0) len = 2, cp = c & 0x1f, min = 0x80;
    else if ((c & 0xf0) == 0xe0) len = 3, cp = c & 0x0f, min = 0x800;
    else if ((c & 0xf8) == 0xf0) len = 4, cp = c & 0x07, min = 0x10000;
    else return i;
    if (n - i < len) return i;
    for (size_t k = 1; k < len; ++k) {
      if ((s[i + k] & 0xc0) != 0x80) return i;
      cp = (cp << 6) | (s[i + k] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return i;
    i += len;
  }
  return std::string::npos;
}

// One header entry as the SAX handler collects it.
struct Entry {
  TensorInfo info;
  bool has_dtype = false, has_shape = false, has_offsets = false;
  std::vector<uint64_t> offsets;
};

// The header's JSON, event by event. Levels: 1 = the top object, 2 = a tensor entry or the
// metadata map, 3 = a shape / data_offsets array. Anything else stops the parse with `error`.
class HeaderHandler {
 public:
  using json = nlohmann::json;

  explicit HeaderHandler(const std::string& path) : path_(path) {}

  std::vector<Entry> entries;
  std::map<std::string, std::string> metadata;
  std::string error;  // set when a handler returns false

  bool null() { return unexpected("null"); }
  bool boolean(bool) { return unexpected("a boolean"); }
  bool number_integer(json::number_integer_t v) {
    if (v >= 0) return number_unsigned(static_cast<uint64_t>(v));
    if (depth_ == 3) return bad_number(std::to_string(v), "is negative");
    return unexpected("a number");
  }
  bool number_unsigned(json::number_unsigned_t v) {
    if (depth_ != 3) return unexpected("a number");
    if (field_ == Field::kShape) {
      if (v > static_cast<uint64_t>(INT64_MAX)) return bad_number(std::to_string(v), "is larger than 2^63 - 1");
      if (current().info.shape.size() == kMaxRank)
        return stop_tensor("shape has more than " + std::to_string(kMaxRank) + " dimensions");
      current().info.shape.push_back(static_cast<int64_t>(v));
    } else {
      if (current().offsets.size() == 2) return stop_tensor("data_offsets has more than 2 entries, expected [begin, end]");
      current().offsets.push_back(v);
    }
    return true;
  }
  bool number_float(json::number_float_t, const json::string_t& text) {
    if (depth_ == 3) return bad_number(text, "is not a non-negative integer");
    return unexpected("a number");
  }
  bool binary(json::binary_t&) { return unexpected("binary data"); }

  bool string(json::string_t& s) {
    if (depth_ == 2 && in_metadata_) {
      metadata[meta_key_] = s;
      return true;
    }
    if (depth_ == 2 && field_ == Field::kDType) {
      Entry& e = current();
      if (!dtype_from_name(s, &e.info.dtype)) {
        bool foreign = std::any_of(std::begin(kForeignDTypes), std::end(kForeignDTypes),
                                   [&](const char* n) { return s == n; });
        return stop_tensor(std::string(foreign ? "dtype \"" + printable(s) + "\" is a safetensors dtype qlora does not read"
                                               : "unknown dtype \"" + printable(s) + "\"") +
                           ", expected one of " + dtype_list());
      }
      return true;
    }
    return unexpected("a string");
  }

  bool start_object(std::size_t) {
    if (depth_ == 0) {
      depth_ = 1;
      return true;
    }
    if (depth_ == 1) {
      depth_ = 2;
      return true;  // the key decided what this object is
    }
    return unexpected("an object");
  }

  bool key(json::string_t& k) {
    if (depth_ == 1) {
      // Duplicate tensor names are found after the parse (parse_safetensors), by sorting:
      // a set of names here would be one more copy of every name.
      if (k == "__metadata__") {
        if (seen_metadata_) return stop("\"__metadata__\" appears twice in the header");
        seen_metadata_ = in_metadata_ = true;
        return true;
      }
      in_metadata_ = false;
      if (k.empty()) return stop("a tensor has an empty name");
      for (unsigned char c : k)
        if (c < 0x20 || c == 0x7f) return stop_tensor_named(k, "name contains a control character");
      entries.emplace_back();
      entries.back().info.name = k;
      return true;
    }
    if (depth_ == 2 && in_metadata_) {
      if (metadata.count(k)) return stop("\"__metadata__\" has the key \"" + printable(k) + "\" twice");
      meta_key_ = k;
      return true;
    }
    if (depth_ == 2) {
      Entry& e = current();
      bool* seen;
      if (k == "dtype") field_ = Field::kDType, seen = &e.has_dtype;
      else if (k == "shape") field_ = Field::kShape, seen = &e.has_shape;
      else if (k == "data_offsets") field_ = Field::kOffsets, seen = &e.has_offsets;
      else return stop_tensor("unknown field \"" + printable(k) + "\", expected dtype, shape and data_offsets");
      if (*seen) return stop_tensor("field \"" + k + "\" appears twice");
      *seen = true;  // the value's handler refuses anything but the right kind
      return true;
    }
    return unexpected("an object");  // unreachable: objects deeper than 2 are refused on start
  }

  bool end_object() {
    if (depth_ == 2 && !in_metadata_) {
      Entry& e = current();
      if (!e.has_dtype) return stop_tensor("missing field \"dtype\"");
      if (!e.has_shape) return stop_tensor("missing field \"shape\"");
      if (!e.has_offsets) return stop_tensor("missing field \"data_offsets\"");
    }
    in_metadata_ = false;
    field_ = Field::kNone;
    --depth_;
    return true;
  }

  bool start_array(std::size_t) {
    if (depth_ == 2 && !in_metadata_ && (field_ == Field::kShape || field_ == Field::kOffsets)) {
      depth_ = 3;
      return true;
    }
    return unexpected("an array");
  }

  bool end_array() {
    Entry& e = current();
    if (field_ == Field::kOffsets) {
      if (e.offsets.size() != 2)
        return stop_tensor("data_offsets has " + std::to_string(e.offsets.size()) + " entries, expected [begin, end]");
      e.info.begin = e.offsets[0];
      e.info.end = e.offsets[1];
    }
    depth_ = 2;
    field_ = Field::kNone;
    return true;
  }

  bool parse_error(std::size_t position, const std::string&, const nlohmann::detail::exception& ex) {
    // ex.what() quotes the last token read; printable() keeps binary garbage out of the message.
    std::string what = ex.what();
    auto colon = what.find(": ");  // drop "[json.exception.parse_error.101] parse error at ..."
    error = path_ + ": header is not valid JSON (at byte " + std::to_string(position) + " of the header: " +
            printable(colon == std::string::npos ? what : what.substr(colon + 2), 160) + "). " + kCorruptHint;
    return false;
  }

 private:
  enum class Field { kNone, kDType, kShape, kOffsets };

  Entry& current() { return entries.back(); }

  bool stop(const std::string& what) {
    error = path_ + ": " + what + ". " + kCorruptHint;
    return false;
  }
  bool stop_tensor_named(const std::string& name, const std::string& what) {
    return stop("tensor \"" + printable(name) + "\": " + what);
  }
  bool stop_tensor(const std::string& what) { return stop_tensor_named(current().info.name, what); }
  bool bad_number(const std::string& text, const std::string& why) {
    const char* field = field_ == Field::kShape ? "shape" : "data_offsets";
    return stop_tensor(std::string(field) + " entry " + printable(text) + " " + why +
                       ", expected a non-negative integer");
  }

  // A JSON value of the wrong kind at the current place.
  bool unexpected(const std::string& got) {
    if (depth_ == 0) return stop("header is " + got + ", expected a JSON object");
    if (depth_ == 1 && in_metadata_) return stop("\"__metadata__\" is " + got + ", expected an object of string to string");
    if (depth_ == 1) return stop_tensor("entry is " + got + ", expected an object with dtype, shape and data_offsets");
    if (depth_ == 2 && in_metadata_)
      return stop("\"__metadata__\" value of \"" + printable(meta_key_) + "\" is " + got + ", expected a string");
    if (depth_ == 2 && field_ == Field::kDType) return stop_tensor("dtype is " + got + ", expected a string such as \"F32\"");
    if (depth_ == 2) {
      const char* field = field_ == Field::kShape ? "shape" : "data_offsets";
      return stop_tensor(std::string(field) + " is " + got + ", expected an array of integers");
    }
    const char* field = field_ == Field::kShape ? "shape" : "data_offsets";
    return stop_tensor(std::string(field) + " holds " + got + ", expected non-negative integers");
  }

  const std::string& path_;
  int depth_ = 0;
  bool in_metadata_ = false;
  Field field_ = Field::kNone;
  std::string meta_key_;
  bool seen_metadata_ = false;
};

// numel x element size for a validated shape; false on overflow.
bool byte_count(const TensorInfo& t, uint64_t* out) {
  uint64_t n = 1;
  for (int64_t d : t.shape)
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n)) return false;
  if (n > static_cast<uint64_t>(INT64_MAX)) return false;  // torch sizes are int64
  return !__builtin_mul_overflow(n, static_cast<uint64_t>(dtype_size(t.dtype)), out);
}

}  // namespace

ParsedFile parse_safetensors(const uint8_t* bytes, uint64_t size, const std::string& path) {
  if (size < 8)
    fail(path, "file is " + std::to_string(size) + " bytes, too short for the 8-byte header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];  // little-endian on any host
  if (n > kMaxHeaderBytes)
    fail(path, "header length " + std::to_string(n) + " exceeds the limit of " + std::to_string(kMaxHeaderBytes) +
                   " bytes (the file has " + std::to_string(size) + ")");
  if (n > size - 8)
    fail(path, "header length " + std::to_string(n) + " runs past the end of the file (" + std::to_string(size) +
                   " bytes: the file is truncated)");
  const uint8_t* header = bytes + 8;
  size_t bad = invalid_utf8_at(header, n);
  if (bad != std::string::npos) fail(path, "header is not valid UTF-8 (byte " + std::to_string(bad) + " of the header)");
  // A raw NUL is never valid JSON, but nlohmann's lexer takes it for the end of the input and
  // would accept "{...}\0<anything>"; the Python package refuses such files, and so do we.
  if (const void* nul = std::memchr(header, 0, n))
    fail(path, "header is not valid JSON (a NUL byte at byte " +
                   std::to_string(static_cast<const uint8_t*>(nul) - header) + " of the header)");

  HeaderHandler handler(path);
  bool ok = false;
  try {
    const char* text = reinterpret_cast<const char*>(header);
    ok = nlohmann::json::sax_parse(text, text + n, &handler, nlohmann::json::input_format_t::json, true);
  } catch (const nlohmann::json::exception& e) {
    fail(path, std::string("header is not valid JSON: ") + printable(e.what(), 160));
  }
  if (!ok) {
    if (handler.error.empty()) fail(path, "header is not valid JSON");
    throw InputError(handler.error);
  }

  ParsedFile out;
  out.data_offset = 8 + n;
  const uint64_t data_size = size - out.data_offset;
  out.metadata = std::move(handler.metadata);
  out.tensors.reserve(handler.entries.size());
  for (Entry& e : handler.entries) out.tensors.push_back(std::move(e.info));
  handler.entries = {};
  {
    std::vector<const std::string*> names;
    names.reserve(out.tensors.size());
    for (const TensorInfo& t : out.tensors) names.push_back(&t.name);
    std::sort(names.begin(), names.end(), [](const std::string* a, const std::string* b) { return *a < *b; });
    for (size_t i = 1; i < names.size(); ++i)
      if (*names[i] == *names[i - 1]) fail_tensor(path, *names[i], "appears twice in the header (duplicate name)");
  }

  for (const TensorInfo& t : out.tensors) {
    const std::string range = "[" + std::to_string(t.begin) + ", " + std::to_string(t.end) + "]";
    if (t.begin > t.end) fail_tensor(path, t.name, "data_offsets " + range + " are reversed (begin > end)");
    if (t.end > data_size)
      fail_tensor(path, t.name, "data_offsets " + range + " reach beyond the data section, which is " +
                                    std::to_string(data_size) + " bytes (file truncated?)");
    uint64_t need = 0;
    if (!byte_count(t, &need))
      fail_tensor(path, t.name, "shape " + shape_text(t.shape) + " of " + dtype_name(t.dtype) +
                                    " overflows 64-bit arithmetic, but data_offsets " + range + " hold " +
                                    std::to_string(t.end - t.begin) + " bytes");
    if (need != t.end - t.begin)
      fail_tensor(path, t.name, "byte count mismatch: shape " + shape_text(t.shape) + " of " + dtype_name(t.dtype) +
                                    " needs " + std::to_string(need) + " bytes, data_offsets " + range + " hold " +
                                    std::to_string(t.end - t.begin));
  }

  std::sort(out.tensors.begin(), out.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t at = 0;
  const std::string* prev = nullptr;
  for (const TensorInfo& t : out.tensors) {
    if (t.begin < at)
      fail_tensor(path, t.name, "data_offsets overlap tensor \"" + printable(*prev) + "\" (starts at byte " +
                                    std::to_string(t.begin) + ", expected " + std::to_string(at) + ")");
    if (t.begin > at)
      fail_tensor(path, t.name, "hole of " + std::to_string(t.begin - at) + " bytes before this tensor (starts at byte " +
                                    std::to_string(t.begin) + ", expected " + std::to_string(at) +
                                    (prev ? ", where \"" + printable(*prev) + "\" ends)" : ", the start of the data)"));
    at = t.end;
    prev = &t.name;
  }
  if (at != data_size)
    fail(path, std::to_string(data_size - at) + " trailing bytes after the last tensor (the tensors cover " +
                   std::to_string(at) + " of the " + std::to_string(data_size) + "-byte data section)");
  return out;
}

}  // namespace detail

// ---------------------------------------------------------------- SafetensorsFile

std::shared_ptr<const SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    throw InputError(path + ": cannot open the safetensors file: " + std::strerror(errno) +
                     ". Check the path and its permissions.");
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw InputError(path + ": not a regular file. Give the path of a .safetensors file.");
  }
  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->size_ = static_cast<uint64_t>(st.st_size);
  if (file->size_ >= 8) {
    // Read-only and private: a stray write through a view faults instead of changing the
    // file. If another process truncates the file while it is mapped, reads past the new end
    // raise SIGBUS; nothing in user space can validate that away.
    void* p = ::mmap(nullptr, file->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      ::close(fd);
      throw InputError(path + ": cannot map the file into memory: " + std::strerror(err) + ".");
    }
    file->base_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);
  static const uint8_t kEmpty[1] = {0};
  // On a throw, `file` unmaps in its destructor.
  detail::ParsedFile parsed = detail::parse_safetensors(file->base_ ? file->base_ : kEmpty, file->size_, path);
  file->data_offset_ = parsed.data_offset;
  file->tensors_ = std::move(parsed.tensors);
  file->metadata_ = std::move(parsed.metadata);
  // Keys view the names in tensors_, which never changes after this point.
  for (size_t i = 0; i < file->tensors_.size(); ++i) file->index_.emplace(file->tensors_[i].name, i);
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (base_) ::munmap(const_cast<uint8_t*>(base_), size_);
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const uint8_t* SafetensorsFile::data(const TensorInfo& info) const {
  // `info` may be a caller's copy, or belong to another file: never step outside the mapping.
  if (info.begin > info.end || info.end > size_ - data_offset_)
    throw std::out_of_range(path_ + ": tensor \"" + info.name + "\": byte range [" + std::to_string(info.begin) +
                            ", " + std::to_string(info.end) + ") is not inside this file's data section");
  return base_ + data_offset_ + info.begin;
}

}  // namespace qlora::io
