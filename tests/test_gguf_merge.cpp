// qlora merge --gguf (lora/gguf_merge.h): the merged model of every family's golden base + adapter
// written as GGUF, read back by the `gguf` package (llama.cpp's gguf-py) with every tensor's bytes
// equal to the fp32 merged model encoded independently in tests/scripts/check_gguf_merge.py, then
// run by llama.cpp itself (the CPU build in the llama-cpp-cffi wheel) next to transformers on the
// merged Hugging Face directory; and each bad input refused with exit code 2 before anything is
// written. The io/gguf encoders are checked against their definitions here too.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "qlora/io/gguf.h"
#include "support/gguf_fixtures.h"
#include "support/test_support.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

using testing::family_dir;

const char* kChatTemplate = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}";

// A base model directory (named `name`, "base_<v>" by default: the GGUF's general.name): the golden
// model of variant `v`, its config.json with `patch` applied (JSON merge patch), and
// (with_tokenizer) the byte-level tokenizer.
std::string make_base(const std::string& root, const std::string& v, const json& patch, bool with_tokenizer = true,
                      const std::string& name = "") {
  const std::string dir = root + "/" + (name.empty() ? "base_" + v : name);
  fs::create_directories(dir);
  json config = json::parse(testing::slurp(family_dir(v) + "/config.json"));
  config.merge_patch(patch);
  testing::write_file(dir, "config.json", config.dump(2));
  fs::copy_file(family_dir(v) + "/model.safetensors", dir + "/model.safetensors", fs::copy_options::overwrite_existing);
  if (with_tokenizer) testing::write_byte_level_tokenizer(dir, kChatTemplate);
  return dir;
}

std::string adapter_of(const std::string& v) { return family_dir(v) + "/lora/adapter"; }

// What llama.cpp would compute differently is taken out of the golden configs: the windows of the
// families whose llama.cpp architecture has none (llama for Mistral, phi3), and Gemma's
// query_pre_attn_scalar 24, where llama.cpp scales by head_dim (16).
json llama_cpp_patch(const std::string& v) {
  if (v == "mistral" || v == "phi3") return {{"sliding_window", nullptr}};
  if (v == "gemma2" || v == "gemma3") return {{"query_pre_attn_scalar", 16}};
  return json::object();
}

struct Family {
  std::string variant, arch;
};
const std::vector<Family>& families() {
  static const std::vector<Family> f = {{"smollm2", "llama"}, {"mistral", "llama"}, {"qwen2", "qwen2"},
                                        {"qwen3", "qwen3"},   {"gemma2", "gemma2"},  {"gemma3", "gemma3"},
                                        {"phi3", "phi3"}};
  return f;
}

// Merges variant `v` into HF fp32 (the reference) and GGUF of `type`; "" on success.
std::string merge_both(const std::string& base, const std::string& v, const std::string& hf, const std::string& gguf,
                       const std::string& type) {
  const auto r = testing::run_qlora("merge --base '" + base + "' --adapter '" + adapter_of(v) + "' --out '" + hf +
                                    "' --dtype fp32 --gguf '" + gguf + "' --type " + type);
  return r.exit_code == 0 ? "" : "exit " + std::to_string(r.exit_code) + ": " + r.err + r.out;
}

// ---------------------------------------------------------------- the encoders

TEST(GgufMerge, Fp16AndQ8_0EncodersFollowTheirDefinitions) {
  // fp16: exact values, ties to even, overflow, subnormals.
  EXPECT_EQ(io::fp32_to_fp16_bits(1.0f), 0x3C00);
  EXPECT_EQ(io::fp32_to_fp16_bits(-2.0f), 0xC000);
  EXPECT_EQ(io::fp32_to_fp16_bits(65504.0f), 0x7BFF);
  EXPECT_EQ(io::fp32_to_fp16_bits(65520.0f), 0x7C00);
  EXPECT_EQ(io::fp32_to_fp16_bits(1.0f + 1.0f / 2048), 0x3C00);      // tie: to even
  EXPECT_EQ(io::fp32_to_fp16_bits(1.0f + 3.0f / 2048), 0x3C02);      // tie: to even (up)
  EXPECT_EQ(io::fp32_to_fp16_bits(std::ldexp(1.0f, -24)), 0x0001);   // smallest subnormal
  EXPECT_EQ(io::fp32_to_fp16_bits(std::ldexp(1.0f, -26)), 0x0000);   // below half of it
  EXPECT_EQ(io::fp32_to_fp16_bits(std::ldexp(1.0f, -14)), 0x0400);   // smallest normal
  // Q8_0: d = max|x| / 127 as fp16, codes round(x / d) half away from zero.
  std::vector<float> x(64);
  for (int i = 0; i < 64; ++i) x[static_cast<size_t>(i)] = static_cast<float>(i - 20) * 0.37f;
  std::vector<uint8_t> q(io::gguf_bytes(io::GgufType::kQ8_0, 64));
  ASSERT_EQ(q.size(), 68u);
  io::quantize_q8_0(x.data(), 64, q.data());
  for (int b = 0; b < 2; ++b) {
    float amax = 0;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[static_cast<size_t>(b * 32 + i)]));
    const float d = amax / 127.0f;
    uint16_t dh;
    std::memcpy(&dh, &q[static_cast<size_t>(b * 34)], 2);
    EXPECT_EQ(dh, io::fp32_to_fp16_bits(d));
    for (int i = 0; i < 32; ++i)
      EXPECT_EQ(static_cast<int8_t>(q[static_cast<size_t>(b * 34 + 2 + i)]),
                static_cast<int8_t>(std::round(x[static_cast<size_t>(b * 32 + i)] * (1.0f / d))));
  }
  EXPECT_THROW(io::gguf_bytes(io::GgufType::kQ8_0, 48), std::invalid_argument);
}

// ---------------------------------------------------------------- gguf-py reads every family

TEST(GgufMerge, GgufPyReadsTheMergedModelOfEachFamily) {
  std::string why;
  const std::string py = testing::python_with("gguf, numpy, safetensors", &why);
  if (py.empty()) GTEST_SKIP() << why;
  const std::string tmp = testing::make_temp_dir("gguf_merge");
  json jobs = json::array();
  std::vector<std::pair<std::string, std::string>> cases;  // variant, type
  for (const auto& f : families()) {
    const std::string base = make_base(tmp, f.variant, llama_cpp_patch(f.variant));
    // Every family in f16; bf16 and q8_0 on families with and without llama.cpp's row permutation
    // (q8_0 needs rows of 32k values: SmolLM2's hidden size 48 is refused, see below).
    std::vector<std::string> types = {"f16"};
    if (f.variant == "mistral" || f.variant == "gemma2") types = {"f16", "bf16", "q8_0"};
    if (f.variant == "phi3") types = {"f16", "q8_0"};
    for (const auto& type : types) {
      const std::string stem = tmp + "/" + f.variant + "_" + type;
      const std::string err = merge_both(base, f.variant, stem + "_hf", stem + ".gguf", type);
      ASSERT_EQ(err, "") << f.variant << " " << type;
      jobs.push_back({{"check", "values"}, {"gguf", stem + ".gguf"}, {"hf", stem + "_hf"}, {"arch", f.arch},
                      {"type", type}});
      cases.emplace_back(f.variant, type);
    }
  }
  const json results = testing::run_checker(py, jobs, tmp);
  ASSERT_EQ(results.size(), jobs.size());
  for (size_t i = 0; i < results.size(); ++i) {
    const auto& [v, type] = cases[i];
    SCOPED_TRACE(v + " " + type);
    const json& g = results[i];
    const std::string arch = jobs[i]["arch"];
    const json config = json::parse(testing::slurp(family_dir(v) + "/config.json"));
    EXPECT_EQ(g["mismatched"], json::array()) << "tensors whose bytes differ from the merged model's";
    EXPECT_EQ(g["unexpected"], json::array());
    EXPECT_EQ(g["missing"], json::array());
    EXPECT_EQ(g["unnamed"], json::array()) << "tensor names llama.cpp does not look up for " << jobs[i]["arch"];
    const json& f = g["fields"];
    EXPECT_EQ(f["general.architecture"], arch);
    EXPECT_EQ(f["general.type"], "model");
    EXPECT_EQ(f["general.file_type"], type == "f16" ? 1 : type == "bf16" ? 32 : 7);
    EXPECT_EQ(f[arch + ".block_count"], config["num_hidden_layers"]);
    EXPECT_EQ(f[arch + ".embedding_length"], config["hidden_size"]);
    EXPECT_EQ(f[arch + ".attention.head_count_kv"], config["num_key_value_heads"]);
    EXPECT_EQ(f["tokenizer.ggml.model"], "gpt2");
    EXPECT_EQ(f["tokenizer.ggml.pre"], "llama-bpe");
    EXPECT_EQ(f["tokenizer.ggml.tokens"]["len"], 256);
    EXPECT_EQ(f["tokenizer.ggml.tokens"]["head"], json::array({"<pad>", "<s>", "</s>", "\xc4\x83"}));
    EXPECT_EQ(f["tokenizer.ggml.token_type"]["head"], json::array({3, 3, 3, 1}));  // control, normal
    EXPECT_EQ(f["tokenizer.ggml.merges"]["len"], 0);
    EXPECT_EQ(f["tokenizer.ggml.bos_token_id"], 1);
    EXPECT_EQ(f["tokenizer.ggml.eos_token_id"], 2);
    EXPECT_EQ(f["tokenizer.ggml.padding_token_id"], 0);
    EXPECT_EQ(f["tokenizer.ggml.add_bos_token"], true);
    EXPECT_EQ(f["tokenizer.chat_template"], kChatTemplate);
    const bool tied = config.value("tie_word_embeddings", arch == "gemma2" || arch == "gemma3");
    EXPECT_EQ(g["tensors"].contains("output.weight"), !tied);
    for (const auto& [name, t] : g["tensors"].items()) {
      const char* want = t["ne"].size() == 1 ? "F32" : type == "f16" ? "F16" : type == "bf16" ? "BF16" : "Q8_0";
      EXPECT_EQ(t["type"], want) << name;
    }
    if (v == "phi3") {
      EXPECT_TRUE(g["tensors"].contains("blk.0.attn_qkv.weight"));
    }
    if (v == "gemma2") {
      EXPECT_TRUE(g["tensors"].contains("blk.0.post_attention_norm.weight"));
      EXPECT_TRUE(g["tensors"].contains("blk.0.post_ffw_norm.weight"));
    }
    if (v == "qwen3") {
      EXPECT_TRUE(g["tensors"].contains("blk.0.attn_q_norm.weight"));
    }
  }
}

// ---------------------------------------------------------------- llama.cpp runs it

// Bounds on max |llama.cpp logits - transformers fp32 logits| over the prompt, relative to the
// largest |logit|. llama.cpp computes in fp32 from F16 weights, so the gap is the rounding of every
// weight to half precision carried through the layers; with Q8_0 it also quantizes activations to 8
// bits for each product. Measured (llama-cpp-cffi 0.4.42, CPU, KV cache F32): f16 worst 0.36% (Gemma 2,
// 26 layers; 1.1e-2 on logits up to 2.97), the others 0.05% to 0.16%; q8_0 worst 9.4% (Gemma 2;
// 0.28 on 2.97), the others 1.9% to 2.0%. A wrong tensor, row order or norm, or a reference without
// Gemma 2's attention softcapping, gives 30% and more.
constexpr double kF16RelativeBound = 0.01;
constexpr double kQ8RelativeBound = 0.15;

// What this llama.cpp build computes only at its real models' shapes, for the bases it runs: Gemma 3's
// window pattern is fixed at 5 sliding layers to 1 global (the depths: testing::llama_cpp_run_layers).
json llama_cpp_run_patch(const std::string& v) {
  json patch = llama_cpp_patch(v);
  if (v == "gemma3") patch["sliding_window_pattern"] = 6;
  return patch;
}

TEST(GgufMerge, LlamaCppRunsTheMergedModelAsTransformersDoes) {
  const std::string tmp = testing::make_temp_dir("gguf_merge_run");
  std::string why;
  const std::string py = testing::python_with_llama_cpp("numpy, transformers, torch", tmp, &why);
  if (py.empty()) GTEST_SKIP() << why;
  const std::vector<int> ids = {1, 72, 101, 108, 108, 111};  // <s> H e l l o
  json jobs = json::array();
  std::vector<std::pair<std::string, std::string>> cases;
  for (const auto& f : families()) {
    // llama.cpp gives a model whose general.name contains "phi3" Phi-3's token attributes, looking up
    // <unk>, <s> and <|endoftext|> by text, which this byte-level vocabulary lacks (its load fails):
    // the bases are named by their architecture's position instead.
    const std::string base = make_base(tmp, f.variant, llama_cpp_run_patch(f.variant), true,
                                       "base" + std::to_string(jobs.size()));
    testing::grow_for_llama_cpp(py, base, f.variant, tmp);
    if (HasFatalFailure()) return;
    for (const std::string type : {"f16", "q8_0"}) {
      // q8_0 needs rows of 32k values (SmolLM2's are 48); qwen3 is refused by this llama.cpp anyway.
      if (type == "q8_0" && (f.variant == "smollm2" || f.variant == "qwen3")) continue;
      const std::string stem = tmp + "/" + f.variant + "_" + type;
      ASSERT_EQ(merge_both(base, f.variant, stem + "_hf", stem + ".gguf", type), "") << f.variant;
      jobs.push_back({{"check", "run"}, {"gguf", stem + ".gguf"}, {"hf", stem + "_hf"}, {"ids", ids},
                      {"new_tokens", 4}});
      cases.emplace_back(f.variant, type);
    }
  }
  const json results = testing::run_checker(py, jobs, tmp);
  ASSERT_EQ(results.size(), jobs.size());
  for (size_t i = 0; i < results.size(); ++i) {
    const auto& [v, type] = cases[i];
    const json& r = results[i];
    if (r.contains("error")) {
      if (testing::llama_cpp_lacks_qwen3(v, r)) {
        std::printf("  %-8s %-5s not checked: this llama.cpp has no qwen3 architecture\n", v.c_str(), type.c_str());
        continue;
      }
      ADD_FAILURE() << v << " " << type << ": " << r["error"].get<std::string>();
      continue;
    }
    const double diff = r["max_abs_diff"];
    std::printf("  %-8s %-5s llama.cpp vs transformers: max |logits diff| %.2e (logits up to %.2f), greedy %s / %s\n",
                v.c_str(), type.c_str(), diff, r["logit_scale"].get<double>(), r["greedy_llama_cpp"].dump().c_str(),
                r["greedy_transformers"].dump().c_str());
    EXPECT_LT(diff, (type == "f16" ? kF16RelativeBound : kQ8RelativeBound) * r["logit_scale"].get<double>())
        << v << " " << type << ", by position " << r["max_abs_diff_by_position"].dump();
    EXPECT_EQ(r["greedy_llama_cpp"], r["greedy_transformers"]) << v << " " << type;
  }
}

// ---------------------------------------------------------------- bad input: exit 2, nothing written

struct Refused {
  int exit_code;
  std::string err;
};
Refused merge_gguf(const std::string& base, const std::string& v, const std::string& gguf, const std::string& extra) {
  const auto r = testing::run_qlora("merge --base '" + base + "' --adapter '" + adapter_of(v) + "' --gguf '" + gguf +
                                    "' " + extra);
  return {r.exit_code, r.err};
}

TEST(GgufMerge, RefusesBadInputBeforeWriting) {
  const std::string tmp = testing::make_temp_dir("gguf_merge_bad");
  const std::string gguf = tmp + "/out.gguf";
  auto expect_refused = [&](const Refused& r, const std::string& says) {
    EXPECT_EQ(r.exit_code, 2) << r.err;
    EXPECT_NE(r.err.find(says), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(gguf));
    EXPECT_FALSE(fs::exists(gguf + ".tmp"));
  };
  const std::string qwen2 = make_base(tmp, "qwen2", json::object());
  // --type without --gguf, an unknown type, neither output.
  auto r = testing::run_qlora("merge --base '" + qwen2 + "' --adapter '" + adapter_of("qwen2") + "' --out '" + tmp +
                              "/hf' --type q8_0");
  expect_refused({r.exit_code, r.err}, "give --gguf");
  EXPECT_FALSE(fs::exists(tmp + "/hf"));
  expect_refused(merge_gguf(qwen2, "qwen2", gguf, "--type q4_k"), "expected f16, bf16 or q8_0");
  r = testing::run_qlora("merge --base '" + qwen2 + "' --adapter '" + adapter_of("qwen2") + "'");
  expect_refused({r.exit_code, r.err}, "--gguf FILE");
  // q8_0 on rows of 48 values (SmolLM2's hidden size).
  const std::string smollm2 = make_base(tmp, "smollm2", json::object());
  expect_refused(merge_gguf(smollm2, "smollm2", gguf, "--type q8_0"), "--type f16 or bf16");
  // No tokenizer beside the base or the adapter.
  const std::string bare = make_base(tmp + "/bare", "qwen2", json::object(), /*with_tokenizer=*/false);
  expect_refused(merge_gguf(bare, "qwen2", gguf, ""), "no tokenizer in");
  // Gemma 3 with an attention scale llama.cpp does not compute.
  const std::string gemma3 = make_base(tmp, "gemma3", json::object());
  expect_refused(merge_gguf(gemma3, "gemma3", gguf, ""), "query_pre_attn_scalar 24");
  // A family llama.cpp has no architecture for here (nor qlora).
  const std::string other = make_base(tmp + "/other", "qwen2", {{"model_type", "gpt_neox"}});
  expect_refused(merge_gguf(other, "qwen2", gguf, ""), "gpt_neox");
  // Both outputs: a non-empty --out is refused before the GGUF file is written.
  fs::create_directories(tmp + "/full");
  testing::write_file(tmp + "/full", "keep.txt", "x");
  r = testing::run_qlora("merge --base '" + qwen2 + "' --adapter '" + adapter_of("qwen2") + "' --out '" + tmp +
                         "/full' --gguf '" + gguf + "'");
  expect_refused({r.exit_code, r.err}, "is not empty");
  // An existing file is replaced only with --force.
  testing::write_file(tmp, "out.gguf", "old");
  r = testing::run_qlora("merge --base '" + qwen2 + "' --adapter '" + adapter_of("qwen2") + "' --gguf '" + gguf + "'");
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_EQ(testing::slurp(gguf), "old");
  r = testing::run_qlora("merge --base '" + qwen2 + "' --adapter '" + adapter_of("qwen2") + "' --gguf '" + gguf +
                         "' --force");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(testing::slurp(gguf).substr(0, 4), "GGUF");
  EXPECT_NE(r.out.find("llama.cpp's qwen2"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace qlora
