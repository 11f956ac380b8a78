// The one schema of the config: every key, its type, range, default (taken
// from the Config structs' initialisers), help text, and how it reads and
// writes the typed tree. Validation, `--set`, `--print` and `--schema` all
// walk this table, so a key added here is handled everywhere. Private to
// src/config.
#pragma once

#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/config/config.h"

namespace qlora::config_detail {

using json = nlohmann::ordered_json;

enum class Kind { kInt, kFloat, kBool, kString, kEnum, kStringList };

struct Field {
  std::string key;   // "train.micro_batch_size"
  Kind kind;
  std::string help;  // one line: what it does and its trade-off
  std::vector<std::string> choices;  // kEnum: canonical spellings
  double min = -std::numeric_limits<double>::infinity();
  double max = std::numeric_limits<double>::infinity();
  bool min_exclusive = false;
  bool max_exclusive = false;
  // Reads the typed value as JSON (int, double, bool, string, array of strings).
  std::function<json(const Config&)> get;
  // Stores an already-checked value (kEnum: a canonical choice).
  std::function<void(Config&, const json&)> set;

  std::string section() const { return key.substr(0, key.find('.')); }
  std::string leaf() const { return key.substr(key.find('.') + 1); }
};

// Another name for a key: the Hugging Face TrainingArguments, PEFT
// LoraConfig and BitsAndBytesConfig words. `translate` maps the value given
// under the alias to (canonical value), or returns nullopt when the value
// means "no change" (fp16: false); it may throw std::invalid_argument with a
// message for values that have no canonical meaning.
struct Alias {
  std::string name;    // "per_device_train_batch_size"
  std::string target;  // "train.micro_batch_size"
  std::function<std::optional<json>(const json&)> translate;  // empty: identity
};

const std::vector<Field>& schema();
const std::vector<Alias>& aliases();
const std::vector<std::string>& section_names();

const Field* find_field(const std::string& key);
const Alias* find_alias(const std::string& name);

// Extra spellings accepted for enum values ("bfloat16" -> "bf16").
std::string canonical_enum_value(const Field& f, const std::string& value);

}  // namespace qlora::config_detail
