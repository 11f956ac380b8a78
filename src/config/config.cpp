// Loading a config: document -> assignments (canonical key, value, where) ->
// typed checks -> cross-key checks -> Config. Every problem is collected
// before anything is thrown.
#include "qlora/config/config.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "config/schema.h"
#include "config/yaml_tree.h"
#include "qlora/common/text.h"

namespace qlora {

using config_detail::Alias;
using config_detail::Field;
using config_detail::Kind;
using json = nlohmann::ordered_json;

namespace {

const std::vector<std::string> kLoraModules = {"q_proj",    "k_proj",  "v_proj",    "o_proj",  "gate_proj",
                                               "up_proj",   "down_proj", "qkv_proj", "gate_up_proj"};
constexpr const char* kAllLinear = "all-linear";
// Upper bounds at or above this are shown as unbounded in messages.
constexpr double kShowAsUnbounded = 1e11;

std::string describe_value(const json& v) {
  if (v.is_null()) return "nothing";
  if (v.is_string()) return "the string \"" + v.get<std::string>() + "\"";
  if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
  if (v.is_number_integer()) return std::to_string(v.get<int64_t>());
  if (v.is_number()) return format_double(v.get<double>());
  if (v.is_array()) return "a list";
  return "a mapping";
}

std::string describe_range(const Field& f, const char* noun) {
  std::string out = noun;
  auto num = [](double x) { return format_double(x); };
  const bool has_min = std::isfinite(f.min), has_max = std::isfinite(f.max) && f.max < kShowAsUnbounded;
  if (has_min && has_max) {
    out += std::string(" ") + (f.min_exclusive ? "> " : ">= ") + num(f.min) + " and " +
           (f.max_exclusive ? "< " : "<= ") + num(f.max);
  } else if (has_min) {
    out += std::string(" ") + (f.min_exclusive ? "> " : ">= ") + num(f.min);
  }
  return out;
}

// The checks set_name_check registered, in the order their keys first came.
struct NameChecks {
  std::mutex mutex;
  std::vector<std::pair<std::string, NameCheck>> checks;
};
NameChecks& name_checks() {
  static NameChecks registry;
  return registry;
}

bool in_range(const Field& f, double x) {
  if (f.min_exclusive ? !(x > f.min) : !(x >= f.min)) return false;
  if (f.max_exclusive ? !(x < f.max) : !(x <= f.max)) return false;
  return true;
}

// The string, when it is a number written in quotes: a common slip worth naming.
bool looks_numeric(const json& v) {
  if (!v.is_string()) return false;
  const std::string& s = v.get_ref<const std::string&>();
  char* end = nullptr;
  std::strtod(s.c_str(), &end);
  return !s.empty() && end && *end == '\0';
}

// Checks `v` against the field's type and range. Returns the value to store,
// or sets `err` to "expected ..., got ...".
json coerce(const Field& f, const json& v, std::string& err) {
  if (v.is_null()) {
    err = "no value given; write one or delete the key";
    return {};
  }
  const std::string quoted_hint = looks_numeric(v) ? " (remove the quotes)" : "";
  switch (f.kind) {
    case Kind::kInt: {
      bool ok = v.is_number_integer() && !v.is_boolean();
      if (!ok && v.is_number_float()) {
        double d = v.get<double>();
        ok = std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.2e18;
      }
      if (!ok || !in_range(f, v.get<double>())) {
        err = "expected " + describe_range(f, "an integer") + ", got " + describe_value(v) + quoted_hint;
        return {};
      }
      return json(static_cast<int64_t>(v.get<double>()));
    }
    case Kind::kFloat: {
      if (!v.is_number() || v.is_boolean() || !std::isfinite(v.get<double>()) ||
          !in_range(f, v.get<double>())) {
        err = "expected " + describe_range(f, "a number") + ", got " + describe_value(v) + quoted_hint;
        return {};
      }
      return json(v.get<double>());
    }
    case Kind::kBool:
      if (!v.is_boolean()) {
        err = "expected true or false, got " + describe_value(v);
        return {};
      }
      return v;
    case Kind::kString:
      if (!v.is_string()) {
        err = "expected a string, got " + describe_value(v) + " (put it in quotes)";
        return {};
      }
      return v;
    case Kind::kEnum: {
      // A YAML true / false for an enum that has those words (train.offload_checkpoints).
      if (v.is_boolean() && std::find(f.choices.begin(), f.choices.end(), v.dump()) != f.choices.end())
        return json(v.dump());
      if (v.is_string()) {
        std::string c = config_detail::canonical_enum_value(f, v.get<std::string>());
        if (std::find(f.choices.begin(), f.choices.end(), c) != f.choices.end()) return json(c);
      }
      err = "expected one of " + join(f.choices, " | ") + ", got " + describe_value(v);
      if (v.is_string()) {
        std::string near = closest_match(v.get<std::string>(), f.choices);
        if (!near.empty()) err += "; did you mean " + near + "?";
      }
      return {};
    }
    case Kind::kStringList: {
      std::vector<std::string> items;
      if (v.is_string()) {  // "q_proj,v_proj" or a single name
        std::stringstream ss(v.get<std::string>());
        for (std::string item; std::getline(ss, item, ',');) {
          item.erase(0, item.find_first_not_of(" \t"));
          item.erase(item.find_last_not_of(" \t") + 1);
          if (!item.empty()) items.push_back(item);
        }
      } else if (v.is_array()) {
        for (const auto& e : v) {
          if (!e.is_string()) {
            err = "expected a list of names, got an entry " + describe_value(e);
            return {};
          }
          items.push_back(e.get<std::string>());
        }
      }
      if (items.empty()) {
        err = "expected a non-empty list of names, got " + describe_value(v);
        return {};
      }
      return json(items);
    }
  }
  return {};
}

struct Assignment {
  const Field* field = nullptr;
  json value;
  int line = 0;
  std::string spelled;   // how the user wrote the key ("per_device_train_batch_size", "--set train.seed")
  bool from_override = false;
  bool cleared = false;  // `--set KEY=` with nothing after '=': the key keeps its default
};

class Loader {
 public:
  explicit Loader(std::string source) : source_(std::move(source)) {}

  void take_document(const config_detail::YamlTree& tree) {
    issues_.insert(issues_.end(), tree.issues.begin(), tree.issues.end());
    lines_ = tree.lines;
    const json& root = tree.root;
    if (root.is_null()) return;
    if (!root.is_object()) {
      issue("", "the top level must be a mapping of sections (model:, lora:, data:, train:, ...), got " +
                    describe_value(root), 1);
      return;
    }
    const auto& sections = config_detail::section_names();
    for (const auto& [key, value] : root.items()) {
      const int line = line_of(key);
      if (std::find(sections.begin(), sections.end(), key) != sections.end()) {
        take_section(key, value, line);
      } else if (const Alias* alias = config_detail::find_alias(key)) {
        take_alias(*alias, value, line, key, false);
      } else {
        unknown_key(key, line);
      }
    }
  }

  void take_override(const std::string& text) {
    const auto eq = text.find('=');
    if (eq == std::string::npos || eq == 0) {
      issue("", "--set \"" + text + "\": expected KEY=VALUE, e.g. --set train.micro_batch_size=4", 0);
      return;
    }
    const std::string key = text.substr(0, eq);
    if (eq + 1 == text.size()) {  // --set KEY= : back to the default, whatever the file says
      const Field* f = config_detail::find_field(key);
      if (f == nullptr)
        if (const Alias* a = config_detail::find_alias(key.substr(key.find('.') + 1))) f = config_detail::find_field(a->target);
      if (f == nullptr) return unknown_key(key, 0, " (from --set)");
      assign(*f, json(), 0, "--set " + key, true);
      assigned_[f->key].cleared = true;
      return;
    }
    json value;
    try {
      value = config_detail::parse_yaml_value(text.substr(eq + 1));
    } catch (const std::invalid_argument& e) {
      issue(key, std::string(e.what()) + " (from --set)", 0);
      return;
    }
    const std::string spelled = "--set " + key;
    if (const Field* f = config_detail::find_field(key)) {
      assign(*f, value, 0, spelled, true);
    } else if (const Alias* a = config_detail::find_alias(key.substr(key.find('.') + 1))) {
      take_alias(*a, value, 0, spelled, true);
    } else {
      unknown_key(key, 0, " (from --set)");
    }
  }

  Config finish() {
    Config cfg;
    cfg.source = source_;
    for (auto& [key, a] : assigned_) {
      if (a.cleared) continue;
      std::string err;
      json v = coerce(*a.field, a.value, err);
      if (!err.empty()) {
        issue(key, err + where(a), a.line);
        continue;
      }
      a.field->set(cfg, v);
    }
    check_cross_keys(cfg);
    if (!issues_.empty()) throw ConfigError(source_, issues_);
    return cfg;
  }

 private:
  int line_of(const std::string& path) const {
    auto it = lines_.find(path);
    return it == lines_.end() ? 0 : it->second;
  }

  void issue(std::string key, std::string message, int line) {
    issues_.push_back({std::move(key), std::move(message), line});
  }

  // " (written as per_device_train_batch_size)" where the user used another name.
  static std::string where(const Assignment& a) {
    if (a.spelled.empty() || a.spelled == a.field->key) return "";
    return " (written as " + a.spelled + ")";
  }

  void take_section(const std::string& section, const json& value, int line) {
    if (value.is_null()) return;  // "train:" with nothing under it
    if (!value.is_object()) {
      issue(section, "expected a mapping of keys under " + section + ":, got " + describe_value(value),
            line);
      return;
    }
    for (const auto& [sub, v] : value.items()) {
      const std::string path = section + "." + sub;
      const int sub_line = line_of(path);
      if (const Field* f = config_detail::find_field(path)) {
        assign(*f, v, sub_line, path, false);
      } else if (const Alias* a = config_detail::find_alias(sub);
                 a && a->target.rfind(section + ".", 0) == 0) {
        take_alias(*a, v, sub_line, path, false);
      } else {
        unknown_key(path, sub_line);
      }
    }
  }

  void take_alias(const Alias& alias, const json& value, int line, const std::string& spelled,
                  bool from_override) {
    const Field* target = config_detail::find_field(alias.target);
    json v = value;
    if (alias.translate) {
      try {
        std::optional<json> t = alias.translate(value);
        if (!t) return;  // e.g. fp16: false, which asks for nothing
        v = *t;
      } catch (const std::invalid_argument& e) {
        issue(spelled, e.what(), line);
        return;
      }
    }
    assign(*target, v, line, spelled, from_override);
  }

  void assign(const Field& f, json value, int line, const std::string& spelled, bool from_override) {
    auto it = assigned_.find(f.key);
    if (it != assigned_.end() && !from_override && !it->second.from_override) {
      const Assignment& first = it->second;
      issue(f.key, "given twice: as " + first.spelled +
                       (first.line ? " (line " + std::to_string(first.line) + ")" : "") + " and as " +
                       spelled + (line ? " (line " + std::to_string(line) + ")" : "") + "; keep one",
            line);
      return;
    }
    if (it != assigned_.end() && it->second.from_override && !from_override) return;
    assigned_[f.key] = Assignment{&f, std::move(value), line, spelled, from_override};
  }

  void unknown_key(const std::string& path, int line, const std::string& suffix = "") {
    std::string msg = "unknown key" + suffix;
    std::string hint = suggest_key(path);
    if (!hint.empty()) msg += "; did you mean " + hint + "?";
    else msg += "; `qlora config --schema` lists every key";
    issue(path, msg, line);
  }

  // The key the user most plausibly meant: the same name in another section,
  // or the closest canonical key, section or alias by edit distance.
  static std::string suggest_key(const std::string& path) {
    const auto dot = path.find('.');
    const std::string leaf = dot == std::string::npos ? path : path.substr(dot + 1);
    for (const auto& f : config_detail::schema())
      if (f.leaf() == leaf) return f.key;
    std::vector<std::string> names;    // what we compare with
    std::vector<std::string> display;  // what we suggest for it
    for (const auto& f : config_detail::schema()) {
      names.push_back(f.leaf());
      display.push_back(f.key);
      names.push_back(f.key);
      display.push_back(f.key);
    }
    for (const auto& a : config_detail::aliases()) {
      names.push_back(a.name);
      display.push_back(dot == std::string::npos ? a.name : a.target);
    }
    if (dot == std::string::npos) {
      for (const auto& s : config_detail::section_names()) {
        names.push_back(s);
        display.push_back(s);
      }
    }
    std::string best = closest_match(leaf, names);
    if (best.empty() && dot != std::string::npos) best = closest_match(path, names);
    if (best.empty()) return "";
    return display[std::find(names.begin(), names.end(), best) - names.begin()];
  }

  int line_for(const std::string& key) const {
    auto it = assigned_.find(key);
    return it == assigned_.end() ? 0 : it->second.line;
  }

  void check_cross_keys(const Config& c) {
    if (c.quantization.quant_type != "nf4")
      issue("quantization.quant_type",
            "expected nf4, got \"" + c.quantization.quant_type +
                "\": qlora stores the base in NF4 only (the QLoRA paper's and bitsandbytes' default)",
            line_for("quantization.quant_type"));

    const auto& mods = c.lora.target_modules;
    const bool all_linear = std::find(mods.begin(), mods.end(), kAllLinear) != mods.end();
    if (all_linear && mods.size() > 1)
      issue("lora.target_modules", "\"all-linear\" already names every projection; give it alone",
            line_for("lora.target_modules"));
    for (size_t i = 0; i < mods.size() && !all_linear; ++i) {
      if (std::find(kLoraModules.begin(), kLoraModules.end(), mods[i]) == kLoraModules.end()) {
        std::string near = closest_match(mods[i], kLoraModules);
        issue("lora.target_modules",
              "unknown module \"" + mods[i] + "\"; expected names from " + join(kLoraModules, ", ") +
                  " or all-linear" + (near.empty() ? "" : "; did you mean " + near + "?"),
              line_for("lora.target_modules"));
      } else if (std::find(mods.begin(), mods.begin() + i, mods[i]) != mods.begin() + i) {
        issue("lora.target_modules", "\"" + mods[i] + "\" is listed twice",
              line_for("lora.target_modules"));
      }
    }

    if (c.train.warmup_steps > 0 && c.train.warmup_ratio > 0)
      issue("train.warmup_ratio", "set either train.warmup_steps or train.warmup_ratio, not both",
            line_for("train.warmup_ratio"));
    if (c.train.max_steps == 0)
      issue("train.max_steps", "expected -1 (use train.epochs) or a positive number of steps, got 0",
            line_for("train.max_steps"));
    if (!c.data.eval_path.empty() && c.data.eval_ratio > 0)
      issue("data.eval_ratio", "set either data.eval_path or data.eval_ratio, not both",
            line_for("data.eval_ratio"));
    if (c.data.train_on_inputs && c.data.train_on == TrainOn::kLastAssistant)
      issue("data.train_on",
            "data.train_on_inputs: true trains every token, which contradicts last_assistant; keep one of them "
            "(data.train_on: all is the chat spelling of train_on_inputs)",
            line_for("data.train_on"));
    if (!c.model.path.empty() && !c.model.preset.empty())
      issue("model.preset",
            "set either model.path (a model directory) or model.preset (shapes only, for planning), not both",
            line_for("model.preset"));
    check_names(c);
    if (c.output.report_to != "tensorboard" && c.output.report_to != "none")
      issue("output.report_to", "expected tensorboard or none, got \"" + c.output.report_to + "\"",
            line_for("output.report_to"));
    if (c.output.dir.empty())
      issue("output.dir", "expected a directory path, got an empty string", line_for("output.dir"));
    if (c.train.no_recompute_layers > 0 && c.train.recompute == Recompute::kAuto)
      issue("train.no_recompute_layers",
            "train.recompute: auto chooses it (from the plan, on the GPU the run gets); remove it, or set "
            "train.recompute: full or selective to choose it yourself",
            line_for("train.no_recompute_layers"));
  }

  // The names other modules know (model.preset, hardware.gpu): their registered checks.
  void check_names(const Config& c) {
    std::vector<std::pair<std::string, NameCheck>> checks;
    {
      NameChecks& registry = name_checks();
      const std::lock_guard<std::mutex> lock(registry.mutex);
      checks = registry.checks;
    }
    for (const auto& [key, check] : checks) {
      const std::string problem = check(config_detail::find_field(key)->get(c).get<std::string>());
      if (!problem.empty()) issue(key, problem, line_for(key));
    }
  }

  std::string source_;
  std::vector<ConfigIssue> issues_;
  std::map<std::string, int> lines_;
  std::map<std::string, Assignment> assigned_;  // canonical key -> what was given
};

// One line per issue in file order (issues with no line, e.g. from --set, last).
std::string format_issues(const std::string& source, std::vector<ConfigIssue> issues) {
  std::stable_sort(issues.begin(), issues.end(), [](const ConfigIssue& a, const ConfigIssue& b) {
    return (a.line == 0 ? INT32_MAX : a.line) < (b.line == 0 ? INT32_MAX : b.line);
  });
  std::ostringstream out;
  out << source << ": " << issues.size() << (issues.size() == 1 ? " problem" : " problems")
      << " in the config:";
  for (const auto& i : issues) {
    out << "\n  " << source;
    if (i.line > 0) out << ":" << i.line;
    out << ": ";
    if (!i.key.empty()) out << i.key << ": ";
    out << i.message;
  }
  out << "\n(`qlora config --schema` lists every key with its type and default)";
  return out.str();
}

}  // namespace

ConfigError::ConfigError(std::string source, std::vector<ConfigIssue> issues)
    : InputError(format_issues(source, issues)), source_(std::move(source)), issues_(std::move(issues)) {}

void set_name_check(const std::string& key, NameCheck check) {
  const Field* f = config_detail::find_field(key);
  if (f == nullptr || f->kind != Kind::kString)
    throw std::invalid_argument("set_name_check: \"" + key + "\" is not a string key of the config schema");
  if (!check) throw std::invalid_argument("set_name_check: the check of " + key + " is empty");
  NameChecks& registry = name_checks();
  const std::lock_guard<std::mutex> lock(registry.mutex);
  for (auto& [k, c] : registry.checks) {
    if (k == key) {
      c = std::move(check);
      return;
    }
  }
  registry.checks.emplace_back(key, std::move(check));
}

Config parse_config(std::string_view text, std::string_view source,
                    const std::vector<std::string>& overrides) {
  Loader loader{std::string(source)};
  loader.take_document(config_detail::read_yaml(text));
  for (const auto& o : overrides) loader.take_override(o);
  return loader.finish();
}

Config default_config(const std::vector<std::string>& overrides) {
  return parse_config("", "<defaults>", overrides);
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  namespace fs = std::filesystem;
  auto fail = [&](const std::string& msg) -> Config {
    throw ConfigError(path, {ConfigIssue{"", msg, 0}});
  };
  std::error_code ec;
  if (!fs::exists(path, ec)) return fail("file not found (check the path; configs/ has examples)");
  if (fs::is_directory(path, ec)) return fail("is a directory; expected a .yaml or .json file");
  const std::string ext = to_lower(fs::path(path).extension().string());
  if (ext != ".yaml" && ext != ".yml" && ext != ".json")
    return fail("expected a .yaml, .yml or .json file, got extension \"" + ext + "\"");
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  if (!in && !in.eof()) return fail("cannot be read (permissions?)");
  return parse_config(text.str(), path, overrides);
}

}  // namespace qlora
