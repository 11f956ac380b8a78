// lora/merge, bad input and the command: each bad adapter, base or output is one InputError
// naming what is wrong, and `qlora merge` prints one line a stage, then what it wrote.
#include "lora_merge_fixtures.h"

namespace {

namespace fs = std::filesystem;
using namespace qlora;
using namespace qlora::merge_test;

// ---------------------------------------------------------------- bad input

TEST(LoraMergeErrors, AdapterModuleMissingFromTheBase) {
  const std::string tmp = make_temp_dir();
  const std::string bad = copy_adapter(tmp);
  edit_adapter_weights(bad, [](auto& t) {
    for (auto& [k, v] : t)
      if (k.find("layers.1.self_attn.q_proj") != std::string::npos) k.replace(k.find("layers.1"), 8, "layers.7");
  });
  const std::string msg = input_error([&] { lora::merge_adapter(options(bad, tmp + "/out")); });
  EXPECT_NE(msg.find("model.layers.7.self_attn.q_proj"), std::string::npos) << msg;  // the module
  EXPECT_NE(msg.find(data("base")), std::string::npos) << msg;                       // the base
  EXPECT_NE(msg.find(bad), std::string::npos) << msg;                                // the adapter
  EXPECT_FALSE(fs::exists(tmp + "/out"));
  expect_only(tmp, {"adapter"});
}

TEST(LoraMergeErrors, AdapterForADifferentBaseIsAShapeMismatch) {
  // tests/data/model/llama2 has the same names but 4 key/value heads: k_proj is [64, 64].
  const std::string tmp = make_temp_dir();
  lora::MergeOptions o = options(data("adapter"), tmp + "/out");
  o.base_dir = qlora::testing::source_path("tests/data/model/llama2");
  const std::string msg = input_error([&] { lora::merge_adapter(o); });
  EXPECT_NE(msg.find("model.layers.0.self_attn.k_proj"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[32, 64]"), std::string::npos) << msg;  // expected by the adapter
  EXPECT_NE(msg.find("[64, 64]"), std::string::npos) << msg;  // found in the base
  EXPECT_NE(msg.find("tests/data/merge/base"), std::string::npos) << msg;  // base_model_name_or_path, informational
  EXPECT_FALSE(fs::exists(tmp + "/out"));
}

TEST(LoraMergeErrors, RankDisagreesWithTheConfig) {
  const std::string tmp = make_temp_dir();
  const std::string bad = copy_adapter(tmp);
  edit_adapter_config(bad, [](nlohmann::json& j) { j["r"] = 4; });
  const std::string msg = input_error([&] { lora::merge_adapter(options(bad, tmp + "/out")); });
  EXPECT_NE(msg.find("r = 4"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[8, 64]"), std::string::npos) << msg;
}

TEST(LoraMergeErrors, UnsupportedAdapterFeaturesAreNamed) {
  struct Case {
    const char* key;
    nlohmann::json value;
    const char* named;
  };
  const Case config_cases[] = {{"use_dora", true, "DoRA"},
                               {"modules_to_save", nlohmann::json::array({"lm_head"}), "modules_to_save"},
                               {"lora_bias", true, "LoRA biases"},
                               {"peft_type", "IA3", "LORA"}};
  for (const Case& c : config_cases) {
    const std::string tmp = make_temp_dir();
    const std::string bad = copy_adapter(tmp);
    edit_adapter_config(bad, [&](nlohmann::json& j) { j[c.key] = c.value; });
    const std::string msg = input_error([&] { lora::merge_adapter(options(bad, tmp + "/out")); });
    EXPECT_NE(msg.find(c.named), std::string::npos) << c.key << ": " << msg;
    EXPECT_NE(msg.find("adapter_config.json"), std::string::npos) << c.key << ": " << msg;
  }
  // The weights file alone can carry them too (a config edited by hand).
  const std::pair<const char*, const char*> weight_cases[] = {
      {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", "DoRA"},
      {"base_model.model.lm_head.modules_to_save.weight", "modules_to_save"},
      {"base_model.model.model.embed_tokens.lora_embedding_A", "embedding"}};
  for (const auto& [key, named] : weight_cases) {
    const std::string tmp = make_temp_dir();
    const std::string bad = copy_adapter(tmp);
    edit_adapter_weights(bad, [&, key = key](auto& t) { t.emplace_back(key, at::ones({4, 4})); });
    const std::string msg = input_error([&] { lora::merge_adapter(options(bad, tmp + "/out")); });
    EXPECT_NE(msg.find(named), std::string::npos) << key << ": " << msg;
    EXPECT_NE(msg.find(key), std::string::npos) << key << ": " << msg;
  }
}

TEST(LoraMergeErrors, OutputInsideAnInputOrBadDtype) {
  const std::string tmp = make_temp_dir();
  lora::MergeOptions o = options(data("adapter"), data("base"));
  o.force = true;
  std::string msg = input_error([&] { lora::merge_adapter(o); });
  EXPECT_NE(msg.find("--base"), std::string::npos) << msg;
  EXPECT_TRUE(fs::exists(data("base/model.safetensors")));

  o = options(data("adapter"), tmp + "/out");
  o.dtype = "fp8";
  msg = input_error([&] { lora::merge_adapter(o); });
  EXPECT_NE(msg.find("fp8"), std::string::npos) << msg;
  EXPECT_NE(msg.find("bf16, fp16 or fp32"), std::string::npos) << msg;

  o = options(tmp + "/no-such-adapter", tmp + "/out");
  msg = input_error([&] { lora::merge_adapter(o); });
  EXPECT_NE(msg.find("no-such-adapter"), std::string::npos) << msg;
  expect_only(tmp, {});
}

// ---------------------------------------------------------------- the command

TEST(LoraMergeCli, OneLinePerStageThenWhatWasWritten) {
  const qlora::testing::CommandResult help = qlora::testing::run_qlora("merge --help");
  if (help.exit_code != 0 || help.out.find("--adapter") == std::string::npos)
    GTEST_SKIP() << "this qlora binary has no merge subcommand (add_merge_command not registered in src/cli/app.cpp)";
  const std::string tmp = make_temp_dir();
  const std::string args = "merge --base tests/data/merge/base --adapter tests/data/merge/adapter --out '" + tmp +
                           "/merged' --from-nf4";
  const qlora::testing::CommandResult r = qlora::testing::run_qlora(args);
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  std::vector<std::string> stages;
  std::istringstream lines(r.out);
  for (std::string line; std::getline(lines, line);) stages.push_back(line.substr(0, line.find(' ')));
  EXPECT_EQ(stages, (std::vector<std::string>{"base", "adapter", "merging", "wrote", "copied", "done"})) << r.out;
  EXPECT_NE(r.out.find("AutoModelForCausalLM.from_pretrained(\"" + tmp + "/merged\", dtype=torch.bfloat16)"),
            std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("NF4 round trip of 14 projections"), std::string::npos) << r.out;
  EXPECT_TRUE(fs::exists(tmp + "/merged/model.safetensors"));

  const qlora::testing::CommandResult again = qlora::testing::run_qlora(args);
  EXPECT_EQ(again.exit_code, 2) << again.out << again.err;  // bad input
  EXPECT_NE(again.err.find("pass --force"), std::string::npos) << again.err;
  EXPECT_EQ(qlora::testing::run_qlora(args + " --force").exit_code, 0);
  EXPECT_EQ(qlora::testing::run_qlora(args + " --force --dtype fp8").exit_code, 2);  // CLI11 refuses it

  const qlora::testing::CommandResult fp32 = qlora::testing::run_qlora(args + " --force --dtype fp32");
  EXPECT_EQ(fp32.exit_code, 0) << fp32.out << fp32.err;
  EXPECT_NE(fp32.out.find("dtype=torch.float32)"), std::string::npos) << fp32.out;
  EXPECT_EQ(config_of(tmp + "/merged")["dtype"], "float32");
}

}  // namespace
