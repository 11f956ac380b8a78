// Reads YAML (and so JSON, a subset of it) into a JSON value with the YAML 1.2
// core schema's scalar types, remembering the line of every mapping key so
// messages can point at it. Quoted scalars stay strings ("2e-4" in quotes is
// text, 2e-4 without is a number). Private to src/config.
#pragma once

#include <map>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/config/config.h"

namespace qlora::config_detail {

struct YamlTree {
  nlohmann::ordered_json root;                // null for an empty document
  std::map<std::string, int> lines;    // dotted key path -> 1-based line
  std::vector<ConfigIssue> issues;     // syntax errors, duplicate or non-scalar keys
};

YamlTree read_yaml(std::string_view text);

// A YAML value as written on a command line (`--set a.b=VALUE`): scalars,
// flow lists ("[q_proj, v_proj]"). Throws std::invalid_argument on a syntax error.
nlohmann::ordered_json parse_yaml_value(std::string_view text);

}  // namespace qlora::config_detail
