#include "qlora/common/json_file.h"

#include <fstream>
#include <sstream>

#include "qlora/common/errors.h"

namespace qlora {

nlohmann::json read_json_object(const std::string& path, const std::string& unreadable, const std::string& expected) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(path + ": " + unreadable);
  std::stringstream buf;
  buf << in.rdbuf();
  nlohmann::json root;
  try {
    root = nlohmann::json::parse(buf.str());
  } catch (const nlohmann::json::parse_error& e) {
    throw InputError(path + ": not valid JSON (" + std::string(e.what()) + ")" +
                     (expected.empty() ? "" : "; expected " + expected));
  }
  if (!root.is_object())
    throw InputError(path + ": expected a JSON object" + (expected.empty() ? "" : " (" + expected + ")") + ", got " +
                     std::string(root.type_name()));
  return root;
}

}  // namespace qlora
