// qlora export: PEFT adapters of every family's golden model written as llama.cpp's LoRA GGUF,
// read back by the gguf package (llama.cpp's gguf-py): metadata, names, shapes and values equal
// to the adapter's (q/k lora_b rows in llama.cpp's order for its llama architecture); then applied
// by llama.cpp itself (the CPU build in the llama-cpp-cffi wheel) to the base written by qlora
// merge --gguf, next to transformers with PEFT's adapter (tests/scripts/check_gguf_merge.py).
#include <gtest/gtest.h>
#include <ATen/ATen.h>

#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <map>
#include <regex>
#include <string>
#include <vector>

#include "qlora/io/torch_io.h"
#include "qlora/lora/gguf_export.h"
#include "qlora/model/family.h"
#include "support/gguf_fixtures.h"
#include "support/test_support.h"

namespace qlora {
namespace {

using testing::family_dir;

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
    const DecoderConfig c = read_decoder_config(family_dir(v) + "/config.json");
    const std::string out = tmp + "/" + v + ".gguf";
    const auto r = testing::run_qlora("export --adapter '" + family_dir(v) + "/lora/adapter' --base '" + family_dir(v) +
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
    const auto adapter = io::load_safetensors(family_dir(v) + "/lora/adapter/adapter_model.safetensors");
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
  auto r = testing::run_qlora("export --adapter '" + tmp + "' --base '" + family_dir("qwen2") + "' --gguf '" + tmp +
                              "/x.gguf'");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("adapter_config.json"), std::string::npos) << r.err;
}

// ---------------------------------------------------------------- llama.cpp applies it

namespace fs = std::filesystem;
using json = nlohmann::json;

// The base model directory `dir` that llama.cpp and transformers both run: the golden model of `v`
// with the byte-level tokenizer, its config without what llama.cpp's architecture computes
// differently or only at real depths (as in tests/test_gguf_merge.cpp: no window for Mistral and
// Phi-3, Gemma's query_pre_attn_scalar at head_dim, Gemma 3's window pattern 6), its layers repeated
// up to a depth this llama.cpp runs (Gemma 2: 26, Gemma 3: 6).
void make_llama_cpp_base(const std::string& py, const std::string& dir, const std::string& v, const std::string& tmp) {
  fs::create_directories(dir);
  json config = json::parse(testing::slurp(family_dir(v) + "/config.json"));
  if (v == "mistral" || v == "phi3") config["sliding_window"] = nullptr;
  if (v == "gemma2" || v == "gemma3") config["query_pre_attn_scalar"] = 16;
  if (v == "gemma3") config["sliding_window_pattern"] = 6;
  testing::write_file(dir, "config.json", config.dump(2));
  fs::copy_file(family_dir(v) + "/model.safetensors", dir + "/model.safetensors", fs::copy_options::overwrite_existing);
  testing::write_byte_level_tokenizer(dir);
  testing::grow_for_llama_cpp(py, dir, v, tmp);
}

// An adapter directory `to` of `config` (adapter_config.json) and `tensors`.
void write_adapter(const std::string& to, const json& config, const std::map<std::string, at::Tensor>& tensors) {
  fs::create_directories(to);
  testing::write_file(to, "adapter_config.json", config.dump(2));
  io::save_safetensors(to + "/adapter_model.safetensors", {tensors.begin(), tensors.end()}, {{"format", "pt"}});
}

// Bound on max |llama.cpp logits (F16 base + fp32 adapter GGUF) - PEFT's logits (fp32 base +
// unmerged adapter)| over the prompt, relative to the largest |logit|: the base's rounding to half
// precision carried through the layers, as for the merged model (test_gguf_merge.cpp). Measured
// (llama-cpp-cffi 0.4.42, CPU, KV cache F32): worst 0.29% (Gemma 2, 26 layers; 8.6e-3 on logits up
// to 2.97), the others 0.06% to 0.12%. The adapters move the logits by 1.97 to 8.18 (PEFT with and
// without them); an adapter GGUF with q/k lora_b in PEFT's row order is off by 23% (Mistral) and
// 107% (SmolLM2), rslora's alpha left at alpha by 87%, no alpha (llama.cpp then scales by 1) by
// 25%, Phi-3's gate_up lora_b halves swapped by 57%.
constexpr double kAdapterRelativeBound = 0.01;

TEST(GgufExport, LlamaCppAppliesTheAdapterAsPeftDoes) {
  const std::string tmp = testing::make_temp_dir("gguf_lora_run");
  std::string why;
  const std::string py = testing::python_with_llama_cpp("numpy, transformers, torch, peft", tmp, &why);
  if (py.empty()) GTEST_SKIP() << why;
  const std::vector<int> ids = {1, 72, 101, 108, 108, 111};  // <s> H e l l o
  json jobs = json::array();
  std::vector<std::string> cases;
  for (const std::string v : {"smollm2", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"}) {
    SCOPED_TRACE(v);
    // Named by position: llama.cpp gives a model whose general.name contains "phi3" Phi-3's token
    // attributes, which this vocabulary lacks.
    const std::string base = tmp + "/base" + std::to_string(cases.size());
    make_llama_cpp_base(py, base, v, tmp);
    if (HasFatalFailure()) return;
    // The adapter: the golden one; Phi-3's also on the fused gate_up_proj (llama.cpp's ffn_up, whose
    // first half it takes as the gate), fixed values.
    std::string adapter = family_dir(v) + "/lora/adapter";
    json config = json::parse(testing::slurp(adapter + "/adapter_config.json"));
    auto tensors = io::load_safetensors(adapter + "/adapter_model.safetensors");
    if (v == "phi3") {
      const DecoderConfig c = read_decoder_config(base + "/config.json");
      const int64_t r = config["r"];
      for (int layer = 0; layer < 2; ++layer) {
        const std::string stem = "base_model.model.model.layers." + std::to_string(layer) + ".mlp.gate_up_proj.lora_";
        const auto n = [](int64_t rows, int64_t cols, double f) {
          return at::sin(at::arange(rows * cols, at::kFloat) * f).reshape({rows, cols});
        };
        tensors[stem + "A.weight"] = n(r, c.hidden_size, 0.7 + layer) * 0.3;
        tensors[stem + "B.weight"] = n(2 * c.intermediate_size, r, 1.3 + layer) * 0.2;
      }
      config["target_modules"].push_back("gate_up_proj");
      adapter = tmp + "/phi3_adapter";
      write_adapter(adapter, config, tensors);
    }
    // The base as qlora writes it: merged with the adapter's B zeroed, in F16.
    for (auto& [name, t] : tensors)
      if (name.find(".lora_B.") != std::string::npos) t = at::zeros_like(t);
    const std::string zero = tmp + "/" + v + "_zero_adapter";
    write_adapter(zero, config, tensors);
    const std::string base_gguf = tmp + "/" + v + "_base.gguf", lora_gguf = tmp + "/" + v + "_lora.gguf";
    auto r = testing::run_qlora("merge --base '" + base + "' --adapter '" + zero + "' --gguf '" + base_gguf +
                                "' --type f16");
    ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
    r = testing::run_qlora("export --adapter '" + adapter + "' --base '" + base + "' --gguf '" + lora_gguf + "'");
    ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
    jobs.push_back({{"check", "lora"}, {"gguf", base_gguf}, {"lora", lora_gguf}, {"hf", base}, {"adapter", adapter},
                    {"ids", ids}, {"new_tokens", 4}});
    cases.push_back(v);
  }
  const json results = testing::run_checker(py, jobs, tmp);
  ASSERT_EQ(results.size(), jobs.size());
  for (size_t i = 0; i < results.size(); ++i) {
    const std::string& v = cases[i];
    const json& r = results[i];
    if (r.contains("error")) {
      if (testing::llama_cpp_lacks_qwen3(v, r)) {
        std::printf("  %-8s not checked: this llama.cpp has no qwen3 architecture\n", v.c_str());
        continue;
      }
      ADD_FAILURE() << v << ": " << r["error"].get<std::string>();
      continue;
    }
    const double diff = r["max_abs_diff"], scale = r["logit_scale"], effect = r["adapter_effect"];
    std::printf("  %-8s llama.cpp + adapter GGUF vs PEFT: max |logits diff| %.2e (logits up to %.2f, the adapter "
                "moves them by %.2f), greedy %s / %s\n",
                v.c_str(), diff, scale, effect, r["greedy_llama_cpp"].dump().c_str(),
                r["greedy_transformers"].dump().c_str());
    EXPECT_LT(diff, kAdapterRelativeBound * scale) << v << ", by position " << r["max_abs_diff_by_position"].dump();
    EXPECT_GT(effect, 10 * kAdapterRelativeBound * scale) << v << ": the adapter hardly changes the logits";
    EXPECT_EQ(r["greedy_llama_cpp"], r["greedy_transformers"]) << v;
  }
}

}  // namespace
}  // namespace qlora
