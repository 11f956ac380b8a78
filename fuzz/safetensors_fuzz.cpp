// libFuzzer target for the safetensors reader (scripts/fuzz.sh builds and runs it).
//
// Each input is a whole file image. It goes through the in-memory parser on libFuzzer's own
// exact-size buffer (so AddressSanitizer sees any read past the end), and through
// SafetensorsFile::open on a memfd (the mmap path). Accepted files have every tensor's bytes
// read, which trips ASan if validation ever let a range escape the image. InputError is the
// expected outcome for bad input; anything else escaping aborts the run as a finding.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "io/safetensors_format.h"
#include "qlora/common/errors.h"
#include "qlora/io/safetensors.h"

namespace {

uint64_t checksum(const uint8_t* p, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

volatile uint64_t g_sink;

void via_memory(const uint8_t* data, size_t size) {
  try {
    auto parsed = qlora::io::detail::parse_safetensors(data, size, "fuzz");
    for (const auto& t : parsed.tensors) {
      if (t.end > size - parsed.data_offset || t.begin > t.end) __builtin_trap();
      g_sink = g_sink + checksum(data + parsed.data_offset + t.begin, t.end - t.begin) + t.numel();
    }
  } catch (const qlora::InputError&) {
  }
}

void via_file(const uint8_t* data, size_t size) {
  int fd = memfd_create("safetensors-fuzz", MFD_CLOEXEC);
  if (fd < 0) return;
  size_t done = 0;
  while (done < size) {
    ssize_t w = write(fd, data + done, size - done);
    if (w <= 0) break;
    done += static_cast<size_t>(w);
  }
  if (done == size) {
    try {
      auto file = qlora::io::SafetensorsFile::open("/proc/self/fd/" + std::to_string(fd));
      for (const auto& t : file->tensors()) {
        if (file->find(t.name) != &t) __builtin_trap();  // names unique, index consistent
        g_sink = g_sink + checksum(file->data(t), t.nbytes());
      }
    } catch (const qlora::InputError&) {
    }
  }
  close(fd);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  via_memory(data, size);
  via_file(data, size);
  return 0;
}
