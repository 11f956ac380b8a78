#include "qlora/common/input_files.h"

#include <filesystem>
#include <fstream>

namespace qlora {

namespace fs = std::filesystem;

std::string why_not_a_file(const std::string& path) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (!fs::exists(st)) return "does not exist";
  if (fs::is_directory(st)) return "is a directory, not a file";
  if (!fs::is_regular_file(st)) return "is not a regular file";
  return "";
}

bool is_gguf_file(const std::string& path) {
  if (!why_not_a_file(path).empty()) return false;
  if (fs::path(path).extension() == ".gguf") return true;
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  return in.read(magic, sizeof magic) && std::string(magic, sizeof magic) == "GGUF";
}

}  // namespace qlora
