// config: defaults, aliases, overrides, one-pass error lists, round trips,
// and the `qlora config` command's exit codes.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/config/config.h"
#include "qlora/plan/gpu.h"
#include "support/test_support.h"
#include "support/train_fixtures.h"

namespace qlora {
namespace {

using testing::run_qlora;

// model.preset and hardware.gpu are checked by plan's registered checks, as in the CLI (the
// whole test program gets them, as before the checks moved out of config).
class NameChecks : public ::testing::Environment {
 public:
  void SetUp() override { plan::register_config_checks(); }
};
::testing::Environment* const kNameChecks = ::testing::AddGlobalTestEnvironment(new NameChecks);

// Every issue's key path + message, one per line, for failure output.
std::string dump(const std::vector<ConfigIssue>& issues) {
  std::string out;
  for (const auto& i : issues) out += "  [" + i.key + "] line " + std::to_string(i.line) + ": " + i.message + "\n";
  return out;
}

std::vector<ConfigIssue> issues_of(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  try {
    parse_config(yaml, "test.yaml", overrides);
  } catch (const ConfigError& e) {
    return e.issues();
  }
  return {};
}

// ---------------------------------------------------------------- bad configs
// One row per way a config can be wrong: the text, the key path the error must
// name, a fragment of its message, and the line it must point at (0: none).
struct BadConfig {
  const char* name;
  const char* yaml;
  const char* key;
  const char* fragment;
  int line;
};
void PrintTo(const BadConfig& c, std::ostream* os) { *os << c.name; }

const BadConfig kBadConfigs[] = {
    {"typo_in_key", "train:\n  micro_batch_sise: 2\n", "train.micro_batch_sise",
     "did you mean train.micro_batch_size?", 2},
    {"key_in_wrong_section", "lora:\n  learning_rate: 0.001\n", "lora.learning_rate",
     "did you mean train.learning_rate?", 2},
    {"unknown_section", "trian:\n  seed: 1\n", "trian", "did you mean train?", 1},
    {"string_for_int", "train:\n  micro_batch_size: two\n", "train.micro_batch_size",
     "expected an integer >= 1 and <= 65536, got the string \"two\"", 2},
    {"zero_micro_batch", "train:\n  micro_batch_size: 0\n", "train.micro_batch_size",
     "expected an integer >= 1 and <= 65536, got 0", 2},
    {"fraction_for_int", "train:\n  gradient_accumulation_steps: 2.5\n",
     "train.gradient_accumulation_steps", "expected an integer", 2},
    {"quoted_number", "train:\n  learning_rate: \"2e-4\"\n", "train.learning_rate",
     "(remove the quotes)", 2},
    {"negative_lr", "train:\n  learning_rate: -0.1\n", "train.learning_rate",
     "expected a number > 0 and <= 1, got -0.1", 2},
    {"yes_for_bool", "data:\n  packing: yes\n", "data.packing", "expected true or false, got the string \"yes\"", 2},
    {"bad_enum", "train:\n  precision: bf61\n", "train.precision",
     "expected one of auto | bf16 | fp16 | fp32, got the string \"bf61\"; did you mean bf16?", 2},
    {"bad_optimizer", "train:\n  optimizer: sgd\n", "train.optimizer", "expected one of adamw | adamw_8bit", 2},
    {"bad_recompute", "train:\n  recompute: partial\n", "train.recompute",
     "expected one of full | selective | auto, got the string \"partial\"", 2},
    {"unsupported_hf_optim", "optim: adafactor\n", "optim", "optim \"adafactor\" is not supported", 1},
    {"dropout_one", "lora:\n  dropout: 1.0\n", "lora.dropout", "expected a number >= 0 and < 1, got 1", 2},
    {"unknown_target_module", "lora:\n  target_modules: [q_proj, vproj]\n", "lora.target_modules",
     "unknown module \"vproj\"", 2},
    {"all_linear_with_others", "lora:\n  target_modules: [all-linear, q_proj]\n", "lora.target_modules",
     "give it alone", 2},
    {"fp4", "quantization:\n  quant_type: fp4\n", "quantization.quant_type", "expected nf4, got \"fp4\"", 2},
    {"both_warmups", "train:\n  warmup_steps: 10\n  warmup_ratio: 0.03\n", "train.warmup_ratio",
     "not both", 3},
    {"fp16_and_bf16", "fp16: true\nbf16: true\n", "train.precision", "given twice: as fp16 (line 1) and as bf16 (line 2)", 2},
    {"alias_and_canonical", "per_device_train_batch_size: 4\ntrain:\n  micro_batch_size: 2\n",
     "train.micro_batch_size", "given twice", 3},
    {"duplicate_key", "train:\n  seed: 1\n  seed: 2\n", "train.seed", "given twice (first on line 2)", 3},
    {"section_not_mapping", "train: 5\n", "train", "expected a mapping of keys under train:", 1},
    {"top_level_list", "- a\n- b\n", "", "the top level must be a mapping", 1},
    {"yaml_syntax", "train:\n  seed: [1, 2\n", "", "not valid YAML/JSON", 0},
    {"null_value", "train:\n  seed:\n", "train.seed", "no value given", 2},
    {"max_steps_zero", "train:\n  max_steps: 0\n", "train.max_steps", "got 0", 2},
    {"path_and_preset", "model:\n  path: /m\n  preset: llama-3.2-1b\n", "model.preset", "not both", 3},
    {"unknown_preset", "model:\n  preset: llama-3.2-1bb\n", "model.preset", "did you mean llama-3.2-1b?", 2},
    {"list_for_string", "output:\n  dir: [a, b]\n", "output.dir", "expected a string, got a list", 2},
    {"flat_canonical_name", "micro_batch_size: 4\n", "micro_batch_size", "did you mean train.micro_batch_size?", 1},
};

class BadConfigTest : public ::testing::TestWithParam<BadConfig> {};

TEST_P(BadConfigTest, ReportsKeyMessageAndLine) {
  const BadConfig& c = GetParam();
  const auto issues = issues_of(c.yaml);
  ASSERT_FALSE(issues.empty()) << c.name << ": expected a ConfigError, the config was accepted";
  auto hit = std::find_if(issues.begin(), issues.end(), [&](const ConfigIssue& i) {
    return i.key == c.key && i.message.find(c.fragment) != std::string::npos;
  });
  ASSERT_NE(hit, issues.end()) << c.name << ": expected an issue at key '" << c.key << "' containing '"
                               << c.fragment << "', got:\n" << dump(issues);
  if (c.line > 0) {
    EXPECT_EQ(hit->line, c.line) << c.name;
  }
}

INSTANTIATE_TEST_SUITE_P(Table, BadConfigTest, ::testing::ValuesIn(kBadConfigs),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(Config, ReportsEveryProblemInOnePass) {
  const auto issues = issues_of(
      "train:\n  micro_batch_size: 0\n  lerning_rate: 0.1\n  precision: fp8\nlora:\n  r: -1\n");
  EXPECT_EQ(issues.size(), 4u) << dump(issues);
}

TEST(Config, ErrorMessageNamesFileLineAndKey) {
  try {
    parse_config("train:\n  micro_batch_size: two\n", "runs/my.yaml");
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("runs/my.yaml:2: train.micro_batch_size: expected an integer"),
              std::string::npos)
        << e.what();
  }
}

TEST(Config, HardwareGpuTakesThisMachine) {
  // "this" and "auto" both mean the GPU `qlora plan` finds here (any case).
  for (const char* v : {"this", "auto", "This", "AUTO", "none", "h100", "24GiB"})
    EXPECT_EQ(parse_config(std::string("hardware:\n  gpu: ") + v + "\n", "g.yaml").hardware.gpu, v) << v;
}

TEST(Config, UnknownHardwareGpuListsEachAcceptedValueOnce) {
  const auto issues = issues_of("hardware:\n  gpu: h1000\n");
  ASSERT_EQ(issues.size(), 1u) << dump(issues);
  const std::string& m = issues[0].message;
  EXPECT_EQ(issues[0].key, "hardware.gpu");
  EXPECT_EQ(issues[0].line, 2);
  EXPECT_NE(m.find("did you mean \"h100\"?"), std::string::npos) << m;
  for (const std::string v : {"t4", "this / auto", "auto", "none", "24GiB"}) {
    const size_t first = m.find(v);
    EXPECT_NE(first, std::string::npos) << v << " missing from: " << m;
    EXPECT_EQ(m.find(v, first + 1), std::string::npos) << v << " listed twice in: " << m;
  }
}

TEST(Config, NameChecksTakeOnlyStringKeys) {
  EXPECT_THROW(set_name_check("train.seed", [](const std::string&) { return std::string(); }),
               std::invalid_argument);
  EXPECT_THROW(set_name_check("model.presets", [](const std::string&) { return std::string(); }),
               std::invalid_argument);
}

// ---------------------------------------------------------------- defaults, aliases

TEST(Config, EmptyDocumentGivesDefaults) {
  const Config c = parse_config("", "empty.yaml");
  const Config d;
  EXPECT_EQ(c.train.micro_batch_size, d.train.micro_batch_size);
  EXPECT_EQ(c.lora.target_modules, d.lora.target_modules);
  EXPECT_EQ(c.train.optimizer, OptimizerKind::kPagedAdamW8bit);
  EXPECT_EQ(c.source, "empty.yaml");
}

TEST(Config, HuggingFaceNamesAreAliases) {
  const Config c = parse_config(R"(
per_device_train_batch_size: 4
gradient_accumulation_steps: 8
gradient_checkpointing: false
fp16: true
learning_rate: 1.0e-4
num_train_epochs: 2
warmup_ratio: 0.05
logging_steps: 5
save_steps: 50
save_total_limit: 2
optim: paged_adamw_8bit
max_grad_norm: 0.3
lr_scheduler_type: cosine
output_dir: runs/x
lora_alpha: 64
bnb_4bit_compute_dtype: bfloat16
bnb_4bit_use_double_quant: false
)",
                                "hf.yaml");
  EXPECT_EQ(c.train.micro_batch_size, 4);
  EXPECT_EQ(c.train.gradient_accumulation_steps, 8);
  EXPECT_FALSE(c.train.gradient_checkpointing);
  EXPECT_EQ(c.train.precision, Precision::kFp16);
  EXPECT_DOUBLE_EQ(c.train.learning_rate, 1e-4);
  EXPECT_DOUBLE_EQ(c.train.epochs, 2.0);
  EXPECT_DOUBLE_EQ(c.train.warmup_ratio, 0.05);
  EXPECT_EQ(c.output.logging_steps, 5);
  EXPECT_EQ(c.output.save_steps, 50);
  EXPECT_EQ(c.output.keep_last, 2);
  EXPECT_EQ(c.train.optimizer, OptimizerKind::kPagedAdamW8bit);
  EXPECT_DOUBLE_EQ(c.train.max_grad_norm, 0.3);
  EXPECT_EQ(c.train.lr_scheduler, LrSchedule::kCosine);
  EXPECT_EQ(c.output.dir, "runs/x");
  EXPECT_DOUBLE_EQ(c.lora.alpha, 64.0);
  EXPECT_EQ(c.quantization.compute_dtype, Precision::kBf16);
  EXPECT_FALSE(c.quantization.double_quant);
}

TEST(Config, AliasInsideItsSection) {
  const Config c = parse_config("train:\n  per_device_train_batch_size: 3\n", "s.yaml");
  EXPECT_EQ(c.train.micro_batch_size, 3);
}

TEST(Config, HfOptimNamesMapToOurs) {
  EXPECT_EQ(parse_config("optim: adamw_torch\n", "a").train.optimizer, OptimizerKind::kAdamW);
  EXPECT_EQ(parse_config("optim: adamw_bnb_8bit\n", "a").train.optimizer, OptimizerKind::kAdamW8bit);
}

TEST(Config, Fp16FalseAsksForNothing) {
  EXPECT_EQ(parse_config("fp16: false\n", "a").train.precision, Precision::kAuto);
}

TEST(Config, JsonIsAccepted) {
  const Config c = parse_config(R"({"train": {"micro_batch_size": 6, "precision": "bf16"},
                                    "lora": {"target_modules": "all-linear"}})",
                                "run.json");
  EXPECT_EQ(c.train.micro_batch_size, 6);
  EXPECT_EQ(c.train.precision, Precision::kBf16);
  EXPECT_EQ(c.lora.target_modules, std::vector<std::string>{"all-linear"});
}

// ---------------------------------------------------------------- overrides

TEST(Config, OverridesAreTypedAndWin) {
  const Config c = parse_config("train:\n  micro_batch_size: 2\n", "o.yaml",
                                {"train.micro_batch_size=8", "lora.target_modules=[q_proj, v_proj]",
                                 "train.learning_rate=3e-4", "data.packing=true",
                                 "per_device_train_batch_size=8", "train.recompute=selective"});
  EXPECT_EQ(c.train.micro_batch_size, 8);
  EXPECT_EQ(c.train.recompute, Recompute::kSelective);
  EXPECT_EQ(default_config().train.recompute, Recompute::kFull);
  EXPECT_EQ(default_config().train.selective_layers, -1);
  const Config a = parse_config("train:\n  recompute: auto\n  selective_layers: 4\n", "a.yaml");
  EXPECT_EQ(a.train.recompute, Recompute::kAuto);
  EXPECT_EQ(a.train.selective_layers, 4);
  EXPECT_THROW(parse_config("train:\n  selective_layers: -2\n", "b.yaml"), ConfigError);
  EXPECT_THROW(parse_config("train:\n  recompute: some\n", "c.yaml"), ConfigError);
  EXPECT_EQ(c.lora.target_modules, (std::vector<std::string>{"q_proj", "v_proj"}));
  EXPECT_DOUBLE_EQ(c.train.learning_rate, 3e-4);
  EXPECT_TRUE(c.data.packing);
}

// `--set KEY=` with nothing after '=' puts the key back to its default: the
// only way to drop a key the file sets (data.eval_path, to train on everything).
TEST(Config, EmptyOverrideClearsAKey) {
  const std::string text = "data:\n  path: a.jsonl\n  eval_path: b.jsonl\ntrain:\n  micro_batch_size: 3\n";
  const Config c = parse_config(text, "e.yaml", {"data.eval_path=", "per_device_train_batch_size="});
  EXPECT_EQ(c.data.eval_path, "");
  EXPECT_EQ(c.data.path, "a.jsonl");
  EXPECT_EQ(c.train.micro_batch_size, default_config().train.micro_batch_size);
  EXPECT_EQ(parse_config(text, "e.yaml").data.eval_path, "b.jsonl");
  // A cleared key that does not exist is still an unknown key.
  EXPECT_NE(dump(issues_of(text, {"data.eval_pth="})).find("unknown key (from --set); did you mean data.eval_path?"),
            std::string::npos)
      << dump(issues_of(text, {"data.eval_pth="}));
}

TEST(Config, BadOverridesAreReported) {
  const auto issues = issues_of("", {"train.micro_batch_size=four", "train.nope=1", "justakey"});
  ASSERT_EQ(issues.size(), 3u) << dump(issues);
  EXPECT_NE(dump(issues).find("got the string \"four\""), std::string::npos);
  EXPECT_NE(dump(issues).find("[train.nope] line 0: unknown key (from --set)"), std::string::npos) << dump(issues);
  EXPECT_NE(dump(issues).find("expected KEY=VALUE"), std::string::npos);
}

// ---------------------------------------------------------------- output

TEST(Config, YamlAndJsonOutputLoadBackToTheSameConfig) {
  const Config c = load_config(testing::source_path("configs/llama-3.2-1b-t4.yaml"));
  for (const std::string& text : {to_yaml(c), to_json(c)}) {
    const Config back = parse_config(text, "printed");
    EXPECT_EQ(to_json(back), to_json(c)) << text;
  }
}

TEST(Config, ShippedConfigsAreValidAndSayWhatTheyClaim) {
  const Config t4 = load_config(testing::source_path("configs/llama-3.2-1b-t4.yaml"));
  EXPECT_EQ(t4.train.micro_batch_size, 2);
  EXPECT_EQ(t4.train.gradient_accumulation_steps, 16);
  EXPECT_EQ(t4.train.precision, Precision::kFp16);
  EXPECT_TRUE(t4.train.gradient_checkpointing);
  EXPECT_EQ(t4.train.optimizer, OptimizerKind::kPagedAdamW8bit);
  EXPECT_EQ(t4.lora.r, 16);
  EXPECT_DOUBLE_EQ(t4.lora.alpha, 32.0);
  EXPECT_EQ(t4.lora.target_modules, (std::vector<std::string>{"q_proj", "k_proj", "v_proj", "o_proj"}));
  EXPECT_DOUBLE_EQ(t4.train.learning_rate, 2e-4);
  EXPECT_DOUBLE_EQ(t4.train.epochs, 3.0);
  EXPECT_DOUBLE_EQ(t4.train.warmup_ratio, 0.03);
  EXPECT_NO_THROW(load_config(testing::source_path("configs/llama-3.1-8b-t4.yaml")));
  EXPECT_NO_THROW(load_config(testing::source_path("configs/llama-3.1-8b-h100.yaml")));
}

TEST(Config, MissingFileAndWrongExtension) {
  EXPECT_THROW(load_config("/nonexistent/run.yaml"), ConfigError);
  const std::string dir = testing::make_temp_dir("cfg");
  const std::string txt = testing::write_file(dir, "run.txt", "train: {}\n");
  try {
    load_config(txt);
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("expected a .yaml, .yml or .json file"), std::string::npos);
  }
}

// ---------------------------------------------------------------- the command

TEST(ConfigCommand, BadConfigExitsTwoWithTheWholeList) {
  const std::string dir = testing::make_temp_dir("cmd");
  const std::string path = testing::write_file(
      dir, "bad.yaml", "train:\n  micro_batch_size: 0\n  optimizer: sgd\nlora:\n  rr: 8\n");
  const auto r = run_qlora("config --config '" + path + "'");
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("3 problems"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("bad.yaml:2: train.micro_batch_size"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("bad.yaml:3: train.optimizer"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("bad.yaml:5: lora.rr: unknown key; did you mean lora.r?"), std::string::npos) << r.err;
}

TEST(ConfigCommand, BadPresetAndGpuAreListedWithTheOtherProblems) {
  const std::string dir = testing::make_temp_dir("cmd");
  const std::string path = testing::write_file(
      dir, "names.yaml", "model:\n  preset: llama-3.2-1bb\ntrain:\n  seed: x\nhardware:\n  gpu: h1000\n");
  const auto r = run_qlora("config --config '" + path + "'");
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("3 problems"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("names.yaml:2: model.preset: unknown preset \"llama-3.2-1bb\""), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("names.yaml:4: train.seed"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("names.yaml:6: hardware.gpu: unknown GPU \"h1000\""), std::string::npos) << r.err;
}

TEST(ConfigCommand, PrintShowsResolvedValuesWithOverrides) {
  const auto r = run_qlora("config --config configs/llama-3.2-1b-t4.yaml --set train.micro_batch_size=4 --print");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("  micro_batch_size: 4"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("  optimizer: \"paged_adamw_8bit\""), std::string::npos) << r.out;
}

// `qlora config` reads the files the config names as `qlora train` will (no
// weights loaded): a tokenizer train would refuse is refused here too.
TEST(ConfigCommand, ChecksTheModelDirectoryTokenizerAndData) {
  const std::string dir = testing::make_temp_dir("config_files");
  const std::string data = testing::small_completion_data(dir, 4);
  const auto config = [&](const std::string& model) {
    return testing::write_file(dir, "run.yaml", "model:\n  path: " + model + "\ndata:\n  path: " + data + "\n");
  };
  auto r = run_qlora("config --config " + config(testing::small_model_dir()));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("model: llama, "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("tokenizer: "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("data.path: " + data), std::string::npos) << r.out;

  const std::string broken = dir + "/model";
  std::filesystem::copy(testing::small_model_dir(), broken);
  testing::write_file(broken, "tokenizer.json", "{\"model\": {\"type\": \"BPE\"");
  r = run_qlora("config --config " + config(broken));
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.err.find(broken + "/tokenizer.json"), std::string::npos) << r.err;
  EXPECT_EQ(r.out.find("valid"), std::string::npos) << r.out;

  // A tokenizer with an id past config.json's vocab_size: train would refuse it, so does config.
  const std::string big = dir + "/model-big-vocab";
  std::filesystem::copy(testing::small_model_dir(), big);
  {
    std::ifstream in(big + "/tokenizer.json");
    nlohmann::json tj = nlohmann::json::parse(in);
    tj["added_tokens"].push_back({{"id", 100000}, {"content", "<|far|>"}, {"single_word", false}, {"lstrip", false},
                                  {"rstrip", false}, {"normalized", false}, {"special", true}});
    testing::write_file(big, "tokenizer.json", tj.dump());
  }
  r = run_qlora("config --config " + config(big));
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.err.find("<|far|>"), std::string::npos) << r.err;

  r = run_qlora("config --config " + config(testing::small_model_dir()) + " --set data.path=" + dir);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("data.path: " + dir + " is a directory"), std::string::npos) << r.err;
}

TEST(ConfigCommand, UnknownFlagExitsTwo) {
  const auto r = run_qlora("config --no-such-flag");
  EXPECT_EQ(r.exit_code, 2);
}

}  // namespace
}  // namespace qlora
