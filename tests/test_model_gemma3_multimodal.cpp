// The text part of the multimodal Gemma 3 (model_type gemma3, Gemma3ForConditionalGeneration)
// against transformers + PEFT on a tiny random model with a tiny image tower (golden files from
// scripts/golden/gemma3_multimodal.py under tests/data/families/gemma3_mm/): config.json's
// text_config with Gemma3TextConfig's defaults, fp32 logits on text under both weight namings, a
// PEFT adapter's logits and LoRA gradients, `qlora merge` against merge_and_unload with the image
// tower copied through; and (QLORA_PYTHON) training end to end, PEFT loading qlora's adapter.
#include <gtest/gtest.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <string>
#include <vector>

#include "qlora/common/errors.h"
#include "qlora/common/text.h"
#include "qlora/io/model_dir.h"
#include "qlora/io/torch_io.h"
#include "qlora/lora/adapter_io.h"
#include "qlora/lora/lora.h"
#include "qlora/lora/merge.h"
#include "qlora/model/decoder.h"
#include "qlora/model/family.h"
#include "qlora/model/loss.h"
#include "qlora/train/demo.h"
#include "qlora/train/run.h"
#include "support/tensor_checks.h"
#include "support/test_support.h"
#include "support/train_fixtures.h"

namespace qlora {
namespace {

using namespace qlora::model;
namespace fs = std::filesystem;
using json = nlohmann::json;

// fp32 logits vs transformers, relative to the largest |logit| (the families' bound).
constexpr double kLogitRtol = 1e-4;
// The loss and the LoRA gradients vs PEFT, relative (the families' bounds).
constexpr double kLossRtol = 1e-5;
constexpr double kGradRtol = 1e-4;
// A merged fp32 weight vs PEFT's merge_and_unload (W + s·B·A in fp32, another summation order).
constexpr double kMergeAtol = 1e-5;

std::string dir() { return testing::source_path("tests/data/families/gemma3_mm"); }

std::map<std::string, at::Tensor> golden(const std::string& file = "golden.safetensors") {
  return io::load_safetensors(dir() + "/" + file);
}

using testing::rel_err;

DecoderModel load_golden_model() {
  const io::ModelDir d = io::ModelDir::open(dir());
  WeightSource src{d.dir(), d.tensor_names(), [&d](const std::string& n) { return d.tensor(n); }};
  return DecoderModel::load(read_decoder_config(d.config_path()), src);
}

// The checkpoint's tensors under transformers 5's module names (model.language_model.*,
// model.vision_tower.*, model.multi_modal_projector.*), which transformers loads as well.
std::map<std::string, at::Tensor> under_module_names() {
  std::map<std::string, at::Tensor> out;
  for (auto& [name, t] : io::load_safetensors(dir() + "/model.safetensors")) {
    std::string n = name;
    if (n.rfind("language_model.model.", 0) == 0) n = kGemma3TextPrefix + n.substr(21);
    else n = "model." + n;  // vision_tower.*, multi_modal_projector.*
    out[n] = t;
  }
  return out;
}

DecoderConfig read_json(const json& config, const std::string& tag) {
  const std::string d = testing::make_temp_dir("gemma3_mm_config_" + tag);
  return read_decoder_config(testing::write_file(d, "config.json", config.dump(2)));
}

json golden_config() { return json::parse(testing::slurp(dir() + "/config.json")); }

// ---------------------------------------------------------------- config.json

TEST(Gemma3Multimodal, ConfigIsTheTextConfigWithGemma3TextDefaults) {
  const DecoderConfig c = read_decoder_config(dir() + "/config.json");
  EXPECT_TRUE(c.unread_keys.empty()) << join(c.unread_keys);
  EXPECT_EQ(c.model_type, "gemma3_text");
  EXPECT_TRUE(c.multimodal());
  EXPECT_EQ(c.module_prefix, kGemma3TextPrefix);
  EXPECT_EQ(c.vocab_size, 256);
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.num_key_value_heads, 1);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.max_position_embeddings, 131072);  // not in text_config: Gemma3TextConfig's
  EXPECT_EQ(c.layer_window, (std::vector<int64_t>{5, 5, 0}));
  EXPECT_EQ(c.rope_theta, 1000000.0);
  EXPECT_EQ(c.rope_local_theta, 10000.0);
  EXPECT_EQ(c.rope.type, RopeType::kLinear);
  EXPECT_EQ(c.query_pre_attn_scalar, 24);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{1, 106}));  // the top level's
  EXPECT_EQ(c.bos_token_id, 2);
  EXPECT_EQ(c.pad_token_id, 0);
  EXPECT_EQ(c.torch_dtype, "float32");
}

// google/gemma-3-4b-pt's config.json (its vision_config shortened): text_config gives five keys;
// the rest are Gemma3TextConfig's defaults, which make the published 4B (the gemma-3-4b preset).
TEST(Gemma3Multimodal, PublishedFourBConfigReadsAsThePreset) {
  const json config = {
      {"architectures", {"Gemma3ForConditionalGeneration"}},
      {"boi_token_index", 255999},
      {"eoi_token_index", 256000},
      {"eos_token_id", {1, 106}},
      {"image_token_index", 262144},
      {"initializer_range", 0.02},
      {"mm_tokens_per_image", 256},
      {"model_type", "gemma3"},
      {"text_config",
       {{"hidden_size", 2560},
        {"intermediate_size", 10240},
        {"model_type", "gemma3_text"},
        {"num_hidden_layers", 34},
        {"rope_scaling", {{"factor", 8.0}, {"rope_type", "linear"}}},
        {"sliding_window", 1024}}},
      {"torch_dtype", "bfloat16"},
      {"transformers_version", "4.50.0.dev0"},
      {"vision_config", {{"hidden_size", 1152}, {"model_type", "siglip_vision_model"}, {"patch_size", 14}}}};
  const DecoderConfig c = read_json(config, "4b");
  const DecoderConfig p = model_preset("gemma-3-4b");
  EXPECT_TRUE(c.unread_keys.empty()) << join(c.unread_keys);
  EXPECT_EQ(c.vocab_size, p.vocab_size);
  EXPECT_EQ(c.hidden_size, p.hidden_size);
  EXPECT_EQ(c.intermediate_size, p.intermediate_size);
  EXPECT_EQ(c.num_hidden_layers, p.num_hidden_layers);
  EXPECT_EQ(c.num_attention_heads, p.num_attention_heads);
  EXPECT_EQ(c.num_key_value_heads, p.num_key_value_heads);
  EXPECT_EQ(c.head_dim, p.head_dim);
  EXPECT_EQ(c.max_position_embeddings, p.max_position_embeddings);
  EXPECT_EQ(c.layer_window, p.layer_window);
  EXPECT_EQ(c.rope.factor, p.rope.factor);
  EXPECT_EQ(c.rope_local_theta, p.rope_local_theta);
  EXPECT_EQ(total_params(c), total_params(p));
  EXPECT_EQ(c.torch_dtype, "bfloat16");
}

TEST(Gemma3Multimodal, RefusesByNameWhatTheTextLayerDoesNotCompute) {
  struct Case {
    const char* what;
    std::function<void(json&)> edit;
    const char* expected;
  };
  const std::vector<Case> cases = {
      {"another activation", [](json& j) { j["text_config"]["hidden_activation"] = "gelu"; },
       "key \"text_config.hidden_activation\""},
      {"attention dropout", [](json& j) { j["text_config"]["attention_dropout"] = 0.1; },
       "key \"text_config.attention_dropout\""},
      {"a bidirectional encoder", [](json& j) { j["text_config"]["use_bidirectional_attention"] = true; },
       "key \"text_config.use_bidirectional_attention\""},
      {"text_config not an object", [](json& j) { j["text_config"] = 3; }, "key \"text_config\""},
      {"no text_config", [](json& j) { j.erase("text_config"); }, "key \"text_config\": missing"},
      {"another text model", [](json& j) { j["text_config"]["model_type"] = "gemma2"; },
       "key \"text_config.model_type\""},
      {"another head", [](json& j) { j["architectures"] = {"Gemma3ForSequenceClassification"}; },
       "key \"architectures\""},
      {"a quantized checkpoint", [](json& j) { j["quantization_config"] = {{"quant_method", "gptq"}}; },
       "key \"quantization_config\""},
      {"an eos id past the vocabulary", [](json& j) { j["eos_token_id"] = {1, 300}; }, "300 is not a token"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    json j = golden_config();
    c.edit(j);
    const std::string msg = testing::error_of([&] { read_json(j, "refused"); });
    EXPECT_NE(msg.find(c.expected), std::string::npos) << msg;
  }
  json j = golden_config();
  j["text_config"]["some_new_key"] = 1;
  j["some_top_key"] = 2;
  EXPECT_EQ(read_json(j, "unread").unread_keys, (std::vector<std::string>{"text_config.some_new_key", "some_top_key"}));
}

// ---------------------------------------------------------------- the model

// transformers' logits on the padded text batch, with the checkpoint's names (those of the
// published files, which save_pretrained writes) and with the module names, image tower skipped.
TEST(Gemma3Multimodal, LogitsEqualTransformersUnderBothWeightNamings) {
  auto g = golden();
  const at::Tensor mask = g.at("attention_mask");
  DecoderModel m = load_golden_model();
  const at::Tensor logits = m.forward(g.at("input_ids"), padded_attention(mask));
  const double err = rel_err(logits, g.at("logits"), mask);
  EXPECT_LT(err, kLogitRtol);
  const DecoderConfig c = read_decoder_config(dir() + "/config.json");
  DecoderModel renamed = DecoderModel::load(c, weights_from_map(under_module_names(), "module names"));
  EXPECT_TRUE(at::equal(renamed.forward(g.at("input_ids"), padded_attention(mask)), logits));
  std::printf("  gemma3_mm logits rel err %.2e\n", err);

  // A missing text tensor is named; the image tower's tensors are not listed as unexpected.
  auto w = under_module_names();
  w.erase(std::string(kGemma3TextPrefix) + "norm.weight");
  const std::string msg = testing::error_of([&] { DecoderModel::load(c, weights_from_map(w, "x")); });
  EXPECT_NE(msg.find("1 missing: model.language_model.norm.weight"), std::string::npos) << msg;
  EXPECT_EQ(msg.find("vision"), std::string::npos) << msg;
  EXPECT_EQ(m.linear_names().front(), "model.language_model.layers.0.self_attn.q_proj");
}

// PEFT's adapter (trained on Gemma3ForConditionalGeneration) loads with PEFT's logits and loss,
// and one backward gives PEFT's gradient for every LoRA weight.
TEST(Gemma3Multimodal, PeftAdapterLogitsAndLoraGradientsEqualPeft) {
  DecoderModel m = load_golden_model();
  lora::LoraAdapter a = lora::load_adapter(m, dir() + "/lora/adapter");
  auto g = golden();
  auto lg = golden("lora/golden.safetensors");
  const at::Tensor mask = g.at("attention_mask");
  at::Tensor hidden = m.forward_hidden(g.at("input_ids"), padded_attention(mask));
  EXPECT_LT(rel_err(m.logits(hidden), lg.at("lora_logits"), mask), kLogitRtol);
  TokenLoss tl = chunked_cross_entropy(hidden.reshape({-1, hidden.size(-1)}), m.lm_head_weight(),
                                       shift_labels(g.at("labels")).reshape({-1}), 16, 0.0);
  at::Tensor loss = tl.sum / tl.count.to(at::kFloat);
  EXPECT_NEAR(loss.item<double>(), lg.at("lora_loss").item<double>(), kLossRtol * lg.at("lora_loss").item<double>());
  loss.backward();
  size_t checked = 0;
  for (const auto& [key, param] : a.named_parameters()) {
    auto it = lg.find("grad." + key);
    ASSERT_NE(it, lg.end()) << key;
    EXPECT_LT(rel_err(param.grad(), it->second), kGradRtol) << key;
    ++checked;
  }
  EXPECT_EQ(checked, 24u);  // 3 layers, q k v o, A and B

  // The same adapter under the names PEFT gave the text model before transformers 4.52.
  const std::string old = testing::make_temp_dir("gemma3_mm_old_adapter");
  fs::copy_file(dir() + "/lora/adapter/adapter_config.json", old + "/adapter_config.json");
  std::vector<std::pair<std::string, at::Tensor>> renamed;
  const std::string now = std::string("base_model.model.") + kGemma3TextPrefix;
  for (auto& [key, t] : io::load_safetensors(dir() + "/lora/adapter/adapter_model.safetensors"))
    renamed.emplace_back("base_model.model.language_model.model." + key.substr(now.size()), t);
  io::save_safetensors(old + "/adapter_model.safetensors", renamed);
  DecoderModel m2 = load_golden_model();
  lora::LoraAdapter a2 = lora::load_adapter(m2, old);
  EXPECT_TRUE(at::equal(m2.forward(g.at("input_ids"), padded_attention(mask)),
                        m.forward(g.at("input_ids"), padded_attention(mask)).detach()));
}

// What qlora writes for LoRA on a multimodal base keeps PEFT to the language model: the target
// modules as the regular expression the golden adapter was trained with, PEFT's keys.
TEST(Gemma3Multimodal, AdapterConfigKeepsPeftToTheLanguageModel) {
  DecoderModel m = load_golden_model();
  lora::LoraSettings s;
  s.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};
  lora::LoraAdapter a = lora::LoraAdapter::attach(m, s);
  const json mine = json::parse(lora::adapter_config_json(a, "base"));
  const json peft = json::parse(testing::slurp(dir() + "/lora/adapter/adapter_config.json"));
  EXPECT_EQ(mine["target_modules"], peft["target_modules"]);
  // PEFT matches the whole module name (re.fullmatch): transformers' names before 4.52 and after,
  // never the image tower's projections.
  const std::regex re(mine["target_modules"].get<std::string>());
  EXPECT_TRUE(std::regex_match("model.language_model.layers.2.self_attn.q_proj", re));
  EXPECT_TRUE(std::regex_match("language_model.model.layers.0.self_attn.o_proj", re));
  EXPECT_FALSE(std::regex_match("model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj", re));
  EXPECT_FALSE(std::regex_match("model.language_model.layers.0.mlp.gate_proj", re));
  const auto theirs = io::load_safetensors(dir() + "/lora/adapter/adapter_model.safetensors");
  std::vector<std::string> keys, want;
  for (const auto& [k, t] : a.named_parameters()) keys.push_back(k);
  for (const auto& [k, t] : theirs) want.push_back(k);
  std::sort(keys.begin(), keys.end());
  EXPECT_EQ(keys, want);
}

// `qlora merge` of PEFT's adapter equals merge_and_unload; the image tower, the projector and
// the config are copied through, the base's names kept; --from-nf4 round-trips the text
// model's projections only.
TEST(Gemma3Multimodal, MergeEqualsPeftMergeAndUnloadAndKeepsTheImageTower) {
  const std::string out = testing::make_temp_dir("gemma3_mm_merge");
  lora::MergeOptions o;
  o.adapter_dir = dir() + "/lora/adapter";
  o.base_dir = dir();
  o.out_dir = out + "/merged";
  o.dtype = "fp32";
  const lora::MergeResult r = lora::merge_adapter(o);
  EXPECT_EQ(r.merged_modules.size(), 12u);
  auto merged = io::load_safetensors(out + "/merged/model.safetensors");
  auto base = io::load_safetensors(dir() + "/model.safetensors");
  auto want = golden("lora/merged.safetensors");
  ASSERT_EQ(merged.size(), base.size());
  const DecoderConfig c = read_decoder_config(dir() + "/config.json");
  size_t changed = 0, tower = 0;
  for (const auto& [name, t] : base) {
    ASSERT_TRUE(merged.count(name)) << name;
    const auto it = want.find("merged." + text_model_weight_name(c, name));
    if (it == want.end()) {
      EXPECT_TRUE(at::equal(merged.at(name), t)) << name;
      tower += text_model_weight_name(c, name).empty();
      continue;
    }
    EXPECT_LT((merged.at(name) - it->second).abs().max().item<double>(), kMergeAtol) << name;
    ++changed;
  }
  EXPECT_EQ(changed, want.size());
  EXPECT_GT(tower, 10u);
  EXPECT_EQ(json::parse(testing::slurp(out + "/merged/config.json"))["model_type"], "gemma3");

  o.out_dir = out + "/merged_nf4";
  o.from_nf4 = true;
  EXPECT_EQ(lora::merge_adapter(o).nf4_round_trips, 3 * 7);
}

// ---------------------------------------------------------------- end to end (QLORA_PYTHON)

std::string run_script(const std::string& py, const std::string& args, int* status) {
  return testing::run_capture("'" + py + "' '" + testing::source_path("scripts/golden/gemma3_multimodal.py") + "' " +
                                  args + " 2>&1",
                              status);
}

// A random multimodal Gemma 3 made by transformers, with the demo's tokenizer: `qlora train`
// on the CPU lowers the loss, PEFT on Gemma3ForConditionalGeneration loads the adapter with
// qlora's logits, and `qlora merge` equals merge_and_unload and loads in transformers.
TEST(Gemma3MultimodalOracle, TrainsAndPeftLoadsAndMergesTheAdapter) {
  std::string why;
  const std::string py = testing::python_with("transformers, peft, torch", &why);
  if (py.empty()) GTEST_SKIP() << why;
  const std::string tmp = testing::make_temp_dir("gemma3_mm_train");
  const int64_t vocab = train::write_demo_tokenizer(tmp + "/tokenizer_probe");
  const std::string base = tmp + "/base";
  int status = -1;
  std::string out = run_script(py, "--make-model '" + base + "' " + std::to_string(vocab), &status);
  ASSERT_EQ(status, 0) << out;
  train::write_demo_tokenizer(base);

  const Config cfg = testing::family_run_config(base, tmp, tmp + "/out");
  const train::RunResult r = train::run_training(cfg, testing::cpu_run_options());
  ASSERT_EQ(r.steps, 30);
  const auto [first, last] = testing::mean_losses_at_ends(r.losses);
  std::printf("  gemma3_mm loss %.3f -> %.3f over 30 steps\n", first, last);
  EXPECT_LT(last, 0.8 * first) << "the loss did not fall";

  const std::string check = tmp + "/check";
  fs::create_directories(check);
  for (const char* f : {"adapter_config.json", "adapter_model.safetensors"}) {
    fs::copy_file(r.adapter_dir + "/" + f, check + "/" + f);
    fs::create_directories(check + "/adapter");
    fs::copy_file(r.adapter_dir + "/" + f, check + "/adapter/" + f);
  }
  testing::write_adapter_logits(base, r.adapter_dir, golden(), check + "/qlora_logits.safetensors");
  lora::MergeOptions mo;
  mo.base_dir = base;
  mo.adapter_dir = r.adapter_dir;
  mo.out_dir = check + "/merged";
  mo.dtype = "fp32";
  lora::merge_adapter(mo);
  out = run_script(py, "--base '" + base + "' --check-adapter '" + check + "'", &status);
  std::printf("%s", out.c_str());
  EXPECT_EQ(status, 0) << out;
  EXPECT_NE(out.find("PEFT loaded qlora's adapter"), std::string::npos) << out;
  out = run_script(py, "--base '" + base + "' --check-merged '" + check + "'", &status);
  std::printf("%s", out.c_str());
  EXPECT_EQ(status, 0) << out;
}

// llama.cpp keeps the image tower in a projector file of its own, which qlora does not write:
// GGUF output of a multimodal base is refused, naming the option and what to do instead.
TEST(Gemma3Multimodal, GgufOfAMultimodalBaseIsRefusedByName) {
  const std::string out = testing::make_temp_dir("gemma3_mm_gguf");
  const auto merge = testing::run_qlora("merge --base '" + dir() + "' --adapter '" + dir() +
                                        "/lora/adapter' --gguf '" + out + "/m.gguf'");
  EXPECT_EQ(merge.exit_code, 2) << merge.err;
  EXPECT_NE(merge.err.find("--gguf"), std::string::npos) << merge.err;
  EXPECT_NE(merge.err.find("multimodal Gemma 3"), std::string::npos) << merge.err;
  const auto exp = testing::run_qlora("export --adapter '" + dir() + "/lora/adapter' --base '" + dir() + "' --gguf '" +
                                      out + "/a.gguf'");
  EXPECT_EQ(exp.exit_code, 2) << exp.err;
  EXPECT_NE(exp.err.find("multimodal Gemma 3"), std::string::npos) << exp.err;
  EXPECT_FALSE(fs::exists(out + "/m.gguf") || fs::exists(out + "/a.gguf"));
}

}  // namespace
}  // namespace qlora
