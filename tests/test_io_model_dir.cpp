// io/model_dir: a sharded model saved by transformers' save_pretrained reads back tensor by
// tensor; single-file directories; the tokenizer file choice; and every way a directory can be
// wrong (no config, pickle weights, missing or inconsistent shards) gets an InputError that
// names the file and says what to do.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "qlora/common/errors.h"
#include "qlora/io/model_dir.h"
#include "qlora/io/safetensors.h"
#include "support/test_support.h"

namespace qlora::io {
namespace {

namespace fs = std::filesystem;
using testing::make_temp_dir;
using testing::source_path;
using testing::write_file;

const std::string kSharded = "tests/data/io/model_sharded";

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return nlohmann::json::parse(s.str());
}

// A scratch copy of the golden sharded model, to break in one way.
std::string sharded_copy() {
  std::string dir = make_temp_dir("io-model") + "/model";
  fs::copy(source_path(kSharded), dir, fs::copy_options::recursive);
  return dir;
}

// Runs `f`, expecting an InputError whose message holds every fragment.
template <class F>
void expect_input_error(F f, const std::vector<std::string>& fragments) {
  try {
    f();
    ADD_FAILURE() << "expected InputError";
  } catch (const InputError& e) {
    for (const auto& frag : fragments)
      EXPECT_NE(std::string(e.what()).find(frag), std::string::npos) << "missing \"" << frag << "\" in: " << e.what();
  }
}

TEST(ModelDir, ShardedModelFromTransformersMatchesSidecar) {
  const auto expected = read_json(source_path("tests/data/io/model_sharded.json"));
  ModelDir m = ModelDir::open(source_path(kSharded));
  EXPECT_EQ(m.config_path(), source_path(kSharded) + "/config.json");
  EXPECT_EQ(m.tokenizer_path(), "");
  EXPECT_EQ(m.shards().size(), expected["shards"].size());
  std::vector<std::string> names;
  for (const auto& [name, e] : expected["tensors"].items()) names.push_back(name);
  EXPECT_EQ(m.tensor_names(), names);  // both sorted
  for (const auto& [name, e] : expected["tensors"].items()) {
    SCOPED_TRACE(name);
    const TensorInfo* info = m.info(name);
    ASSERT_NE(info, nullptr);
    EXPECT_STREQ(dtype_name(info->dtype), e["dtype"].get<std::string>().c_str());
    at::Tensor t = m.tensor(name);
    EXPECT_EQ(t.scalar_type(), at::kBFloat16);
    EXPECT_EQ(std::vector<int64_t>(t.sizes().begin(), t.sizes().end()), e["shape"].get<std::vector<int64_t>>());
    // bf16 -> float64 is exact, so the comparison is exact.
    auto want = e["values"].get<std::vector<double>>();
    at::Tensor v = t.to(at::kDouble).reshape({-1});
    ASSERT_EQ(v.numel(), static_cast<int64_t>(want.size()));
    const double* got = v.data_ptr<double>();
    for (size_t i = 0; i < want.size(); ++i) ASSERT_EQ(got[i], want[i]) << "element " << i;
  }
}

TEST(ModelDir, SingleFileModel) {
  const std::string dir = make_temp_dir("io-model");
  fs::copy_file(source_path("tests/data/io/good_dtypes.safetensors"), dir + "/model.safetensors");
  write_file(dir, "config.json", "{}");
  ModelDir m = ModelDir::open(dir);
  EXPECT_EQ(m.shards().size(), 1u);
  EXPECT_TRUE(m.has_tensor("f32.weight"));
  at::Tensor t = m.tensor("f32.weight");
  EXPECT_EQ(t.sizes(), (std::vector<int64_t>{2, 3, 4}));
  expect_input_error([&] { m.tensor("f32.weigth"); },
                     {dir + "/model.safetensors", "no tensor \"f32.weigth\"", "did you mean \"f32.weight\"?"});
}

TEST(ModelDir, TokenizerJsonPreferredOverModel) {
  const std::string dir = sharded_copy();
  write_file(dir, "tokenizer.model", "x");
  EXPECT_EQ(ModelDir::open(dir).tokenizer_path(), dir + "/tokenizer.model");
  write_file(dir, "tokenizer.json", "{}");
  EXPECT_EQ(ModelDir::open(dir).tokenizer_path(), dir + "/tokenizer.json");
}

TEST(ModelDir, MissingDirectoryOrConfig) {
  const std::string dir = make_temp_dir("io-model");
  expect_input_error([&] { ModelDir::open(dir + "/nope"); }, {dir + "/nope", "model directory not found"});
  write_file(dir, "model.safetensors", "");
  expect_input_error([&] { ModelDir::open(dir + "/model.safetensors"); }, {"expected a model directory"});
  expect_input_error([&] { ModelDir::open(dir); }, {dir, "no config.json"});
}

TEST(ModelDir, PickleWeightsAreRefusedWithConversionCommand) {
  const std::string dir = make_temp_dir("io-model");
  write_file(dir, "config.json", "{}");
  // Content that would run code if unpickled: we must never open it.
  write_file(dir, "pytorch_model.bin", "cos\nsystem\n(S'echo pwned'\ntR.");
  write_file(dir, "training_args.pt", "x");
  expect_input_error([&] { ModelDir::open(dir); },
                     {dir, "pickle format (pytorch_model.bin, training_args.pt)",
                      "M.from_pretrained('" + dir + "').save_pretrained('" + dir + "', safe_serialization=True)"});
}

TEST(ModelDir, ShardsWithoutIndex) {
  const std::string dir = sharded_copy();
  fs::remove(dir + "/model.safetensors.index.json");
  expect_input_error([&] { ModelDir::open(dir); },
                     {"found model-00001-of-00002.safetensors, model-00002-of-00002.safetensors", "index file"});
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".safetensors") fs::remove(e.path());
  expect_input_error([&] { ModelDir::open(dir); }, {dir, "no weights"});
}

TEST(ModelDir, MissingShard) {
  const std::string dir = sharded_copy();
  fs::remove(dir + "/model-00002-of-00002.safetensors");
  expect_input_error([&] { ModelDir::open(dir); },
                     {dir + "/model.safetensors.index.json", "shard \"model-00002-of-00002.safetensors\"",
                      "is missing", "Download the missing file"});
}

TEST(ModelDir, IndexNamesTensorItsShardLacks) {
  const std::string dir = sharded_copy();
  auto index = read_json(dir + "/model.safetensors.index.json");
  index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors";  // it lives in shard 2
  write_file(dir, "model.safetensors.index.json", index.dump());
  expect_input_error([&] { ModelDir::open(dir); },
                     {"tensor \"lm_head.weight\" is mapped to shard \"model-00001-of-00002.safetensors\"",
                      dir + "/model-00001-of-00002.safetensors has no such tensor"});
}

TEST(ModelDir, ShardOutsideDirectory) {
  const std::string dir = sharded_copy();
  auto index = read_json(dir + "/model.safetensors.index.json");
  index["weight_map"]["lm_head.weight"] = "../model-00002-of-00002.safetensors";
  write_file(dir, "model.safetensors.index.json", index.dump());
  expect_input_error([&] { ModelDir::open(dir); }, {"not a file inside the model directory"});
  index["weight_map"]["lm_head.weight"] = "/etc/passwd";
  write_file(dir, "model.safetensors.index.json", index.dump());
  expect_input_error([&] { ModelDir::open(dir); }, {"\"/etc/passwd\", which is not a file inside"});
}

TEST(ModelDir, BadIndexJson) {
  const std::string dir = sharded_copy();
  write_file(dir, "model.safetensors.index.json", "{\"weight_map\": [");
  expect_input_error([&] { ModelDir::open(dir); }, {dir + "/model.safetensors.index.json", "not valid JSON"});
  write_file(dir, "model.safetensors.index.json", "{\"metadata\": {}}");
  expect_input_error([&] { ModelDir::open(dir); }, {"\"weight_map\" object"});
  write_file(dir, "model.safetensors.index.json", "{\"weight_map\": {\"a\": 3}}");
  expect_input_error([&] { ModelDir::open(dir); }, {"weight_map entry for tensor \"a\" is number"});
}

TEST(ModelDir, CorruptShardNamesTheShard) {
  const std::string dir = sharded_copy();
  const std::string shard = dir + "/model-00002-of-00002.safetensors";
  fs::resize_file(shard, fs::file_size(shard) - 2);
  expect_input_error([&] { ModelDir::open(dir); }, {shard + ": tensor \"", "beyond the data section"});
}

}  // namespace
}  // namespace qlora::io
