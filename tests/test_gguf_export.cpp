// qlora export: PEFT adapters of every family's golden model written as llama.cpp's LoRA GGUF,
// read back by the gguf package (llama.cpp's gguf-py): metadata, names, shapes and values equal
// to the adapter's (q/k lora_b rows in llama.cpp's order for its llama architecture).
#include <gtest/gtest.h>
#include <ATen/ATen.h>

#include <nlohmann/json.hpp>

#include <regex>
#include <string>

#include "qlora/io/torch_io.h"
#include "qlora/lora/gguf_export.h"
#include "qlora/model/family.h"
#include "support/test_support.h"

namespace qlora {
namespace {

std::string dir_of(const std::string& v) { return testing::source_path("tests/data/families/" + v); }

TEST(GgufExport, GgufPyReadsTheAdapterOfEachFamily) {
  std::string why;
  const std::string py = testing::python_with("gguf", &why);
  if (py.empty()) GTEST_SKIP() << why;
  const std::string tmp = testing::make_temp_dir("gguf");
  const std::map<std::string, std::string> arch = {{"smollm2", "llama"}, {"mistral", "llama"}, {"qwen2", "qwen2"},
                                                   {"qwen3", "qwen3"},    {"gemma2", "gemma2"},  {"gemma3", "gemma3"},
                                                   {"phi3", "phi3"}};
  for (const auto& [v, want_arch] : arch) {
    SCOPED_TRACE(v);
    const DecoderConfig c = read_decoder_config(dir_of(v) + "/config.json");
    const std::string out = tmp + "/" + v + ".gguf";
    const auto r = testing::run_qlora("export --adapter '" + dir_of(v) + "/lora/adapter' --base '" + dir_of(v) +
                                      "' --gguf '" + out + "'");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    int status = -1;
    const std::string text =
        testing::run_capture("'" + py + "' '" + testing::source_path("tests/scripts/read_gguf.py") + "' '" + out + "' 2>&1", &status);
    ASSERT_EQ(status, 0) << text;
    const nlohmann::json g = nlohmann::json::parse(text.substr(text.find("{\"fields\"")));
    EXPECT_EQ(g["fields"]["general.architecture"], want_arch);
    EXPECT_EQ(g["fields"]["general.type"], "adapter");
    EXPECT_EQ(g["fields"]["adapter.type"], "lora");
    const auto adapter = io::load_safetensors(dir_of(v) + "/lora/adapter/adapter_model.safetensors");
    EXPECT_EQ(g["tensors"].size(), adapter.size());
    const std::regex key(R"(base_model\.model\.model\.layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])\.weight)");
    for (const auto& [name, t] : adapter) {
      std::smatch m;
      ASSERT_TRUE(std::regex_match(name, m, key)) << name;
      const std::string gname = "blk." + m[1].str() + "." + lora::gguf_tensor_of(m[2]) + ".weight.lora_" +
                                (m[3] == "A" ? "a" : "b");
      ASSERT_TRUE(g["tensors"].contains(gname)) << gname;
      const auto& gt = g["tensors"][gname];
      EXPECT_EQ(gt["type"], "F32");
      EXPECT_EQ(gt["ne"], nlohmann::json::array({t.size(1), t.size(0)})) << gname;  // innermost first
      // Row i of the GGUF tensor is row src(i) of PEFT's: for llama.cpp's llama architecture, q/k
      // lora_b rows go from [head][half][pair] to [head][pair][half].
      const bool permuted = want_arch == "llama" && m[3] == "B" && (m[2] == "q_proj" || m[2] == "k_proj");
      const int64_t heads = m[2] == "q_proj" ? c.num_attention_heads : c.num_key_value_heads;
      const int64_t rows = t.size(0), cols = t.size(1), d = rows / heads;
      const at::Tensor w = t.to(at::kFloat).contiguous();
      const float* src = w.data_ptr<float>();
      int64_t bad = 0;
      for (int64_t i = 0; i < rows; ++i) {
        int64_t from = i;
        if (permuted) {
          const int64_t h = i / d, j = (i % d) / 2, half = i % 2;
          from = h * d + half * (d / 2) + j;
        }
        for (int64_t k = 0; k < cols; ++k)
          bad += gt["data"][static_cast<size_t>(i * cols + k)].get<float>() != src[from * cols + k];
      }
      EXPECT_EQ(bad, 0) << gname;
    }
  }
}

TEST(GgufExport, RefusesWhatIsNotAnAdapter) {
  const std::string tmp = testing::make_temp_dir("gguf_bad");
  auto r = testing::run_qlora("export --adapter '" + tmp + "' --base '" + dir_of("qwen2") + "' --gguf '" + tmp + "/x.gguf'");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("adapter_config.json"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace qlora
