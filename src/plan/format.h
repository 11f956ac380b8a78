// Number formatting shared by src/plan/*.cpp (internal).
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

namespace qlora::plan::fmt {

// 6979321856 -> "6,979,321,856".
inline std::string commas(int64_t v) {
  std::string digits = std::to_string(v < 0 ? -v : v);
  std::string out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return v < 0 ? "-" + out : out;
}

inline std::string fixed(double v, int decimals) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}

// "3.35 GiB"
inline std::string gib(double bytes) { return fixed(bytes / (1024.0 * 1024.0 * 1024.0), 2) + " GiB"; }

}  // namespace qlora::plan::fmt
