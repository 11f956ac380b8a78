// A base model tuned on chat data stops after its reply when served: training writes the chat
// template it rendered the data with and a generation_config.json that stops at the template's
// end-of-turn token beside the adapter, `qlora merge` carries them into the merged model, and
// transformers' generate on that model (its own AutoTokenizer chat template, its own generation
// config) produces the reply and stops. Needs QLORA_PYTHON with transformers (set-up installs it
// for the tests); skipped, saying so, without it.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include "qlora/data/tokenizer.h"
#include "qlora/lora/merge.h"
#include "qlora/train/demo.h"
#include "qlora/train/run.h"
#include "support/test_support.h"
#include "support/train_fixtures.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;

using testing::slurp;

// A Llama 3 style template of the model's own, reading bos_token as transformers passes it.
const char* kTemplate =
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

TEST(ChatServing, MergedModelStopsAtTheEndOfTurnInTransformersGenerate) {
  std::string why;
  const std::string py = testing::python_with("transformers, torch", &why);
  if (py.empty()) GTEST_SKIP() << why;
  const std::string tmp = testing::make_temp_dir("chat_serving");
  const std::string base = tmp + "/base";
  const int64_t vocab = train::write_demo_tokenizer(tmp + "/tokenizer_probe");
  int status = -1;
  const std::string made = testing::run_capture("'" + py + "' '" + testing::source_path("scripts/golden/families.py") +
                                                    "' --make-model smollm2 '" + base + "' " + std::to_string(vocab) +
                                                    " 2>&1",
                                                &status);
  ASSERT_EQ(status, 0) << made;
  train::write_demo_tokenizer(base);
  testing::write_file(base, "chat_template.jinja", kTemplate);

  std::string lines;
  for (int n = 1; n <= 16; ++n)
    lines += R"({"messages": [{"role": "user", "content": "Is )" + std::to_string(n * 7) +
             R"( a number?"}, {"role": "assistant", "content": "yes"}]})" "\n";
  Config cfg = default_config();
  cfg.model.path = base;
  cfg.data.path = testing::write_file(tmp, "chat.jsonl", lines);
  cfg.data.max_seq_length = 64;
  cfg.train.max_steps = 40;
  cfg.train.learning_rate = 3e-3;
  cfg.train.precision = Precision::kFp32;
  cfg.lora.dropout = 0.0;
  cfg.output.dir = tmp + "/out";
  train::RunOptions ro = testing::cpu_run_options();
  const train::RunResult r = train::run_training(cfg, ro);
  ASSERT_EQ(r.steps, 40);

  // Beside the adapter: the template, the tokenizer, and a stop at <|eot_id|>.
  const std::unique_ptr<data::Tokenizer> tok = data::load_tokenizer(base);
  const int32_t eot = *tok->token_id("<|eot_id|>");
  EXPECT_EQ(slurp(r.adapter_dir + "/chat_template.jinja"), kTemplate);
  EXPECT_TRUE(fs::exists(r.adapter_dir + "/tokenizer.json"));
  const nlohmann::json gen = nlohmann::json::parse(slurp(r.adapter_dir + "/generation_config.json"));
  EXPECT_EQ(gen.at("eos_token_id"), nlohmann::json::array({tok->eos_id(), eot})) << gen.dump();

  lora::MergeOptions mo;
  mo.base_dir = base;
  mo.adapter_dir = r.adapter_dir;
  mo.out_dir = tmp + "/merged";
  mo.dtype = "fp32";
  lora::merge_adapter(mo);
  EXPECT_EQ(slurp(mo.out_dir + "/chat_template.jinja"), kTemplate);

  const std::string out = testing::run_capture(
      "'" + py + "' '" + testing::source_path("tests/scripts/chat_generate.py") + "' '" + mo.out_dir +
          "' '[{\"role\": \"user\", \"content\": \"Is 1001 a number?\"}]' 24 2>&1",
      &status);
  ASSERT_EQ(status, 0) << out;
  const nlohmann::json g = nlohmann::json::parse(out.substr(out.rfind("\n{") == std::string::npos ? 0 : out.rfind("\n{") + 1));
  std::printf("  transformers generated %s\n", g.at("text").dump().c_str());
  EXPECT_TRUE(g.at("stopped").get<bool>()) << out;
  EXPECT_EQ(g.at("text").get<std::string>(), "yes<|eot_id|>") << out;
  EXPECT_EQ(g.at("prompt").get<std::string>(),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nIs 1001 a number?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
      << out;
}

}  // namespace
}  // namespace qlora
