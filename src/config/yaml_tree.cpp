#include "config/yaml_tree.h"

#include <cmath>
#include <regex>
#include <stdexcept>

#include <yaml-cpp/yaml.h>

namespace qlora::config_detail {
namespace {

using json = nlohmann::ordered_json;

// Plain (unquoted) scalars, resolved as the YAML 1.2 core schema does.
json resolve_plain(const std::string& s) {
  static const std::regex kNull("^(~|null|Null|NULL)?$");
  static const std::regex kTrue("^(true|True|TRUE)$");
  static const std::regex kFalse("^(false|False|FALSE)$");
  static const std::regex kInt("^[-+]?[0-9]+$");
  static const std::regex kFloat("^[-+]?(\\.[0-9]+|[0-9]+(\\.[0-9]*)?)([eE][-+]?[0-9]+)?$");
  static const std::regex kInfinity("^[-+]?\\.(inf|Inf|INF)$");
  static const std::regex kNan("^\\.(nan|NaN|NAN)$");
  if (std::regex_match(s, kNull)) return nullptr;
  if (std::regex_match(s, kTrue)) return true;
  if (std::regex_match(s, kFalse)) return false;
  if (std::regex_match(s, kInt)) {
    try {
      return std::stoll(s);
    } catch (const std::out_of_range&) {
      return std::stod(s);  // too large for int64: keep it as a number, range checks report it
    }
  }
  if (std::regex_match(s, kFloat)) return std::stod(s);
  if (std::regex_match(s, kInfinity)) return s[0] == '-' ? -INFINITY : INFINITY;
  if (std::regex_match(s, kNan)) return NAN;
  return s;
}

json convert(const YAML::Node& node, const std::string& path, YamlTree& tree) {
  switch (node.Type()) {
    case YAML::NodeType::Null:
    case YAML::NodeType::Undefined:
      return nullptr;
    case YAML::NodeType::Scalar:
      // Tag "!" marks a quoted scalar, "?" a plain one; an explicit !!str is text too.
      if (node.Tag() == "!" || node.Tag() == "tag:yaml.org,2002:str") return node.Scalar();
      return resolve_plain(node.Scalar());
    case YAML::NodeType::Sequence: {
      json out = json::array();
      for (size_t i = 0; i < node.size(); ++i)
        out.push_back(convert(node[i], path + "[" + std::to_string(i) + "]", tree));
      return out;
    }
    case YAML::NodeType::Map: {
      json out = json::object();
      for (auto it = node.begin(); it != node.end(); ++it) {
        const int line = it->first.Mark().line + 1;
        if (!it->first.IsScalar()) {
          tree.issues.push_back({path, "keys must be plain names, not lists or mappings", line});
          continue;
        }
        const std::string key = it->first.Scalar();
        const std::string child = path.empty() ? key : path + "." + key;
        if (out.contains(key)) {
          tree.issues.push_back({child,
                                 "given twice (first on line " + std::to_string(tree.lines[child]) +
                                     "); delete one",
                                 line});
          continue;
        }
        tree.lines[child] = line;
        out[key] = convert(it->second, child, tree);
      }
      return out;
    }
  }
  return nullptr;
}

}  // namespace

YamlTree read_yaml(std::string_view text) {
  YamlTree tree;
  try {
    YAML::Node doc = YAML::Load(std::string(text));
    tree.root = convert(doc, "", tree);
  } catch (const YAML::Exception& e) {
    tree.issues.push_back({"", "not valid YAML/JSON: " + e.msg, e.mark.line + 1});
  }
  return tree;
}

json parse_yaml_value(std::string_view text) {
  YamlTree tree;
  try {
    YAML::Node doc = YAML::Load(std::string(text));
    return convert(doc, "", tree);
  } catch (const YAML::Exception& e) {
    throw std::invalid_argument("not a valid YAML value: " + e.msg);
  }
}

}  // namespace qlora::config_detail
