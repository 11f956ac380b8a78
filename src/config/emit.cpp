// The resolved config written back out: YAML with a comment per key, JSON, and
// the schema as a table. Both outputs load again to the same Config.
#include <iomanip>
#include <sstream>

#include "config/schema.h"
#include "qlora/common/text.h"
#include "qlora/config/config.h"

namespace qlora {

using config_detail::Field;
using config_detail::Kind;
using json = nlohmann::ordered_json;

namespace {

constexpr size_t kCommentColumn = 44;

// A value in YAML flow syntax that reads back with the same type.
std::string yaml_value(const Field& f, const json& v) {
  switch (f.kind) {
    case Kind::kInt: return std::to_string(v.get<int64_t>());
    case Kind::kFloat: {
      std::string s = format_double(v.get<double>());
      // "3" would read back as an integer: fine for a float key, but keep the
      // written form unambiguous.
      if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
      return s;
    }
    case Kind::kBool: return v.get<bool>() ? "true" : "false";
    case Kind::kString:
    case Kind::kEnum: return v.dump();  // JSON strings are valid YAML double-quoted scalars
    case Kind::kStringList: return v.dump();
  }
  return v.dump();
}

std::string type_name(const Field& f) {
  switch (f.kind) {
    case Kind::kInt: return "integer";
    case Kind::kFloat: return "number";
    case Kind::kBool: return "bool";
    case Kind::kString: return "string";
    case Kind::kEnum: return join(f.choices, "|");
    case Kind::kStringList: return "list";
  }
  return "";
}

}  // namespace

std::string to_yaml(const Config& cfg) {
  std::ostringstream out;
  out << "# qlora config, resolved (from " << (cfg.source.empty() ? "<defaults>" : cfg.source)
      << "): every key, defaults filled in.\n";
  std::string section;
  for (const Field& f : config_detail::schema()) {
    if (f.section() != section) {
      section = f.section();
      out << (section == "model" ? "" : "\n") << section << ":\n";
    }
    std::string line = "  " + f.leaf() + ": " + yaml_value(f, f.get(cfg));
    if (line.size() < kCommentColumn) line.resize(kCommentColumn, ' ');
    else line += "  ";
    out << line << "# " << f.help << "\n";
  }
  return out.str();
}

std::string to_json(const Config& cfg) {
  json out = json::object();
  for (const Field& f : config_detail::schema()) out[f.section()][f.leaf()] = f.get(cfg);
  return out.dump(2);
}

std::string describe_schema() {
  const Config defaults;
  std::ostringstream out;
  out << std::left << std::setw(38) << "key" << std::setw(30) << "type" << std::setw(22)
      << "default" << "what it does\n";
  for (const Field& f : config_detail::schema()) {
    out << std::setw(38) << f.key << std::setw(30) << type_name(f) << std::setw(22)
        << yaml_value(f, f.get(defaults)) << f.help << "\n";
  }
  out << "\nHugging Face names accepted as aliases (at the top level or in their section):\n";
  for (const auto& a : config_detail::aliases())
    out << "  " << std::setw(36) << a.name << "-> " << a.target << "\n";
  return out.str();
}

}  // namespace qlora
