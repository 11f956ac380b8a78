// Small text helpers shared by every module that reports user errors.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace qlora {

// Levenshtein distance (insert, delete, substitute: cost 1 each).
size_t edit_distance(std::string_view a, std::string_view b);

// The candidate closest to `got` when it is close enough to be a plausible
// typo (distance <= max(2, |got| / 3)), or "" when none is.
std::string closest_match(std::string_view got, const std::vector<std::string>& candidates);

// Whether `s` ends with `suffix`.
inline bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// "a, b, c" (each quoted when quote is true).
std::string join(const std::vector<std::string>& items, std::string_view sep = ", ");

// "[2, 3]": a tensor's shape in a message (a std::vector<int64_t>, torch's IntArrayRef).
template <class Dims>
std::string shape_text(const Dims& dims) {
  std::string out = "[";
  for (size_t i = 0; i < dims.size(); ++i) out += (i ? ", " : "") + std::to_string(dims[i]);
  return out + "]";
}

// Shortest decimal text that parses back to exactly `v` ("0.0002", "1e-08", "3").
std::string format_double(double v);

// Lower-cased ASCII copy.
std::string to_lower(std::string_view s);

// `s` without leading and trailing ASCII whitespace (a view into s).
std::string_view trim(std::string_view s);

// Writes `text` to `path` (replacing it); std::runtime_error naming the path when it cannot.
void write_text_file(const std::string& path, const std::string& text);

}  // namespace qlora
