// Each family trains end to end on the CPU from a random model directory made by transformers
// (scripts/golden/families.py --make-model) with the demo's tokenizer beside it: the loss falls,
// PEFT loads the adapter qlora wrote and computes qlora's logits, and `qlora merge` equals PEFT's
// merge_and_unload. Needs QLORA_PYTHON with transformers and PEFT (set-up installs them for
// the tests); skipped, saying so, without them.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include "qlora/io/torch_io.h"
#include "qlora/lora/merge.h"
#include "qlora/train/demo.h"
#include "qlora/train/run.h"
#include "support/test_support.h"
#include "support/train_fixtures.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;

// One variant a family (scripts/golden/families.py): Qwen2's biases, Qwen3's q/k norms and
// head_dim, Mistral's window (5, shorter than the rows), SmolLM2's 3:1 grouped heads, Gemma 2's
// soft caps and alternating windows, Gemma 3's local RoPE base, Phi-3's fused projections (the
// LoRA on qkv_proj and o_proj), partial rotary and LongRoPE.
const char* kFamilies[] = {"qwen2", "qwen3", "mistral", "smollm2", "gemma2", "gemma3", "phi3_longrope"};

std::string script() { return testing::source_path("scripts/golden/families.py"); }

std::string run_python(const std::string& py, const std::string& args, int* status) {
  return testing::run_capture("'" + py + "' '" + script() + "' " + args + " 2>&1", status);
}

TEST(TrainFamilies, EachFamilyTrainsAndPeftLoadsAndMergesTheAdapter) {
  std::string why;
  const std::string py = testing::python_with("transformers, peft, torch", &why);
  if (py.empty()) GTEST_SKIP() << why;
  const std::string tmp = testing::make_temp_dir("train_families");
  const int64_t vocab = train::write_demo_tokenizer(tmp + "/tokenizer_probe");
  const auto batch = io::load_safetensors(testing::source_path("tests/data/families/qwen2/golden.safetensors"));
  for (const char* v : kFamilies) {
    SCOPED_TRACE(v);
    const std::string base = tmp + "/bases/" + v;
    int status = -1;
    std::string out = run_python(py, "--make-model " + std::string(v) + " '" + base + "' " + std::to_string(vocab),
                                 &status);
    ASSERT_EQ(status, 0) << out;
    train::write_demo_tokenizer(base);

    Config cfg = testing::family_run_config(base, tmp, tmp + "/out/" + v);
    if (std::string(v).rfind("phi3", 0) == 0) cfg.lora.target_modules = {"qkv_proj", "o_proj"};
    train::RunOptions ro = testing::cpu_run_options();
    const train::RunResult r = train::run_training(cfg, ro);
    ASSERT_EQ(r.steps, 30);
    const auto [first, last] = testing::mean_losses_at_ends(r.losses);
    std::printf("  %-8s loss %.3f -> %.3f over 30 steps\n", v, first, last);
    EXPECT_LT(last, 0.8 * first) << "the loss did not fall";

    // qlora's logits with its adapter, on the golden batch, for PEFT to compare with.
    const std::string check = tmp + "/check/" + v;
    fs::create_directories(check);
    for (const char* f : {"adapter_config.json", "adapter_model.safetensors"})
      fs::copy_file(r.adapter_dir + "/" + f, check + "/" + f);
    testing::write_adapter_logits(base, r.adapter_dir, batch, check + "/qlora_logits.safetensors");
    // qlora merge in fp32, the adapter beside it for the check.
    lora::MergeOptions mo;
    mo.base_dir = base;
    mo.adapter_dir = r.adapter_dir;
    mo.out_dir = tmp + "/merged/" + v;
    mo.dtype = "fp32";
    lora::merge_adapter(mo);
    fs::create_directories(mo.out_dir + "/adapter");
    for (const char* f : {"adapter_config.json", "adapter_model.safetensors"})
      fs::copy_file(r.adapter_dir + "/" + f, mo.out_dir + "/adapter/" + f);
  }
  int status = -1;
  std::string out = run_python(py, "--base '" + tmp + "/bases' --check-adapter '" + tmp + "/check'", &status);
  std::printf("%s", out.c_str());
  EXPECT_EQ(status, 0) << out;
  EXPECT_NE(out.find("PEFT loaded qlora's adapter"), std::string::npos) << out;
  out = run_python(py, "--base '" + tmp + "/bases' --check-merged '" + tmp + "/merged'", &status);
  std::printf("%s", out.c_str());
  EXPECT_EQ(status, 0) << out;
}

}  // namespace
}  // namespace qlora
