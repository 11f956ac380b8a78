// train/generate: KV-cache decoding against transformers' generate on every family's golden model
// (greedy, with and without the PEFT adapter: windows, soft caps, Gemma 3's local RoPE, LongRoPE
// switching to its long factors mid-generation), and the sampling options' contracts.
#include <gtest/gtest.h>
#include <ATen/ATen.h>

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

#include "qlora/io/model_dir.h"
#include "qlora/io/torch_io.h"
#include "qlora/lora/adapter_io.h"
#include "qlora/model/decoder.h"
#include "qlora/model/family.h"
#include "qlora/train/generate.h"
#include "support/test_support.h"

namespace qlora {
namespace {

const char* kVariants[] = {"qwen2",         "qwen2_window", "qwen3",  "mistral", "smollm2", "llama_linear",
                           "llama_dynamic", "gemma2",       "gemma3", "phi3",    "phi3_longrope"};

std::string dir_of(const std::string& v) { return testing::source_path("tests/data/families/" + v); }

model::DecoderModel load(const std::string& v) {
  const io::ModelDir dir = io::ModelDir::open(dir_of(v));
  model::WeightSource src{dir.dir(), dir.tensor_names(), [&dir](const std::string& n) { return dir.tensor(n); }};
  return model::DecoderModel::load(read_decoder_config(dir.config_path()), src);
}

// The golden batch's first row, its real tokens.
std::vector<int32_t> prompt_of(const std::string& v) {
  const auto g = io::load_safetensors(dir_of(v) + "/golden.safetensors");
  const at::Tensor ids = g.at("input_ids")[0], mask = g.at("attention_mask")[0];
  std::vector<int32_t> p;
  for (int64_t i = 0; i < ids.size(0); ++i)
    if (mask[i].item<int64_t>() != 0) p.push_back(static_cast<int32_t>(ids[i].item<int64_t>()));
  return p;
}

TEST(Generate, GreedyEqualsTransformersOnEveryFamily) {
  std::string why;
  const std::string py = testing::python_with("transformers, peft, torch", &why);
  if (py.empty()) GTEST_SKIP() << why;
  nlohmann::json cases = nlohmann::json::array();
  train::SamplingOptions o;
  o.max_new_tokens = 12;  // past phi3_longrope's original context of 10: its long factors too
  for (const char* v : kVariants) {
    for (bool adapter : {false, true}) {
      model::DecoderModel m = load(v);
      lora::LoraAdapter a;
      if (adapter) a = lora::load_adapter(m, dir_of(v) + "/lora/adapter");
      const std::vector<int32_t> prompt = prompt_of(v);
      const auto out = train::generate(m, {prompt}, o);
      ASSERT_EQ(out[0].size(), 12u) << v;
      cases.push_back({{"variant", v}, {"adapter", adapter}, {"prompt", prompt}, {"max_new_tokens", 12},
                       {"generated", out[0]}});
    }
  }
  const std::string file = testing::write_file(testing::make_temp_dir("generate"), "cases.json", cases.dump());
  int status = -1;
  const std::string out = testing::run_capture(
      "'" + py + "' '" + testing::source_path("scripts/golden/families.py") + "' --check-generate '" + file + "' 2>&1",
      &status);
  std::printf("%s", out.c_str());
  EXPECT_EQ(status, 0) << out;
  EXPECT_EQ(out.find("DIFFER"), std::string::npos) << out;
}

TEST(Generate, SamplingIsSeededAndItsFiltersNarrowToGreedy) {
  const model::DecoderModel m = load("qwen3");
  const std::vector<int32_t> prompt = prompt_of("qwen3");
  train::SamplingOptions greedy;
  greedy.max_new_tokens = 8;
  const auto want = train::generate(m, {prompt}, greedy)[0];
  train::SamplingOptions s = greedy;
  s.temperature = 0.7;
  s.seed = 3;
  const auto a = train::generate(m, {prompt}, s)[0];
  EXPECT_EQ(train::generate(m, {prompt}, s)[0], a);  // the same seed, the same draws
  s.top_k = 1;  // only the most likely token survives: greedy
  EXPECT_EQ(train::generate(m, {prompt}, s)[0], want);
  s.top_k = 0;
  s.min_p = 1.0;  // only tokens as likely as the best survive: greedy
  EXPECT_EQ(train::generate(m, {prompt}, s)[0], want);
  // A stop token ends a row without being output; stop_when ends it after the token it saw.
  train::SamplingOptions stop = greedy;
  stop.stop_ids = {want[3]};
  const auto cut = train::generate(m, {prompt}, stop)[0];
  EXPECT_EQ(cut, std::vector<int32_t>(want.begin(), want.begin() + (std::find(want.begin(), want.end(), want[3]) - want.begin())));
  const auto two = train::generate(m, {prompt}, greedy, {}, [](size_t, const std::vector<int32_t>& g) { return g.size() == 2; })[0];
  EXPECT_EQ(two, std::vector<int32_t>(want.begin(), want.begin() + 2));
  // A repetition penalty changes greedy output on a model this small, and is still deterministic.
  train::SamplingOptions pen = greedy;
  pen.repetition_penalty = 5.0;
  EXPECT_EQ(train::generate(m, {prompt}, pen)[0], train::generate(m, {prompt}, pen)[0]);
}

}  // namespace
}  // namespace qlora
