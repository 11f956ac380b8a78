// io/model_dir: Hugging Face model directory discovery (config.json + safetensors shards).
#include "qlora/io/model_dir.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "qlora/common/errors.h"
#include "qlora/common/input_files.h"
#include "qlora/common/text.h"
#include "qlora/io/torch_io.h"

namespace qlora::io {
namespace fs = std::filesystem;
namespace {

constexpr const char* kIndexName = "model.safetensors.index.json";
constexpr const char* kSingleName = "model.safetensors";

bool is_file(const fs::path& p) {
  std::error_code ec;
  return fs::is_regular_file(p, ec);
}

// Pickle checkpoints in `dir` (sorted file names), which we refuse to load.
std::vector<std::string> pickle_files(const fs::path& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    const std::string ext = e.path().extension().string();
    if (ext == ".bin" || ext == ".pt" || ext == ".pth" || ext == ".ckpt" || name == "pytorch_model.bin.index.json")
      out.push_back(name);
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::string> files_with_extension(const fs::path& dir, const std::string& ext) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (e.path().extension() == ext && is_file(e.path())) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

// GGUF files in `dir` (by name or by magic), sorted: a model downloaded for llama.cpp.
std::vector<std::string> gguf_files(const fs::path& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (is_gguf_file(e.path().string())) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

// A shard name from the index must stay inside the model directory: it is used as a path.
bool safe_relative(const std::string& name) {
  if (name.empty() || name.front() == '/') return false;
  for (const auto& part : fs::path(name))
    if (part == "..") return false;
  return true;
}

nlohmann::json read_json(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) throw InputError(p.string() + ": cannot read the file. Check its permissions.");
  std::stringstream s;
  s << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(s.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded())
    throw InputError(p.string() + ": not valid JSON. Download the file again, or write it with "
                                  "transformers' save_pretrained.");
  return j;
}

}  // namespace

ModelDir ModelDir::open(const std::string& dir) {
  ModelDir m;
  m.dir_ = dir;
  const fs::path root(dir);
  std::error_code ec;
  if (!fs::exists(root, ec))
    throw InputError(dir + ": model directory not found. Give the directory that holds config.json and the "
                           "*.safetensors weights (a Hugging Face model download).");
  if (!fs::is_directory(root, ec)) {
    if (is_gguf_file(dir)) throw InputError(dir + ": is a GGUF file; " + kGgufHint + ".");
    throw InputError(dir + ": is a file, expected a model directory holding config.json and *.safetensors.");
  }
  const fs::path config = root / "config.json";
  if (!is_file(config)) {
    if (fs::exists(config, ec))
      throw InputError(config.string() + ": " + why_not_a_file(config.string()) +
                       "; expected the model's config.json file. Replace it with the config.json of the "
                       "Hugging Face model.");
    if (const auto ggufs = gguf_files(root); !ggufs.empty())
      throw InputError(dir + ": holds " + join(ggufs) + " but no config.json; " + kGgufHint + ".");
    throw InputError(dir + ": no config.json. A Hugging Face model directory holds config.json next to its "
                           "*.safetensors weights; download the whole model, not only the weights.");
  }

  const fs::path index = root / kIndexName;
  const fs::path single = root / kSingleName;
  for (const fs::path& p : {index, single})
    if (fs::exists(p, ec) && !is_file(p))
      throw InputError(p.string() + ": " + why_not_a_file(p.string()) + "; expected the weights file " +
                       p.filename().string() + ". Replace it with the file from the model's download.");
  if (is_file(index)) {
    m.weights_file_ = kIndexName;
    const nlohmann::json j = read_json(index);
    const std::string where = index.string();
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      throw InputError(where + ": expected an object with a \"weight_map\" object (tensor name -> shard file). "
                               "Download the file again, or write it with transformers' save_pretrained.");
    // Open every shard once; then check that each mapped tensor is really in its shard.
    for (const auto& [name, shard] : j["weight_map"].items()) {
      if (!shard.is_string())
        throw InputError(where + ": weight_map entry for tensor \"" + name + "\" is " + shard.type_name() +
                         ", expected a shard file name.");
      const std::string file = shard.get<std::string>();
      if (!safe_relative(file))
        throw InputError(where + ": weight_map sends tensor \"" + name + "\" to \"" + file +
                         "\", which is not a file inside the model directory. Fix or re-download the index.");
      if (!m.shards_.count(file)) {
        if (fs::exists(root / file, ec) && !is_file(root / file))
          throw InputError((root / file).string() + ": " + why_not_a_file((root / file).string()) +
                           "; " + where + " maps tensor \"" + name + "\" to it, a weights file. Replace "
                           "it with the file from the model's download.");
        if (!is_file(root / file))
          throw InputError(where + ": shard \"" + file + "\" (holding tensor \"" + name +
                           "\") is missing from " + dir + ". Download the missing file again.");
        m.shards_[file] = SafetensorsFile::open((root / file).string());
      }
      const auto& sf = m.shards_[file];
      const TensorInfo* info = sf->find(name);
      if (!info)
        throw InputError(where + ": tensor \"" + name + "\" is mapped to shard \"" + file + "\", but " +
                         sf->path() + " has no such tensor. The index and the shards disagree: download the "
                                      "model again.");
      m.where_[name] = Where{sf, info};
    }
    return m;
  }

  if (is_file(single)) {
    m.weights_file_ = kSingleName;
    auto sf = SafetensorsFile::open(single.string());
    m.shards_[kSingleName] = sf;
    for (const TensorInfo& t : sf->tensors()) m.where_[t.name] = Where{sf, &t};
    return m;
  }

  const std::vector<std::string> pickles = pickle_files(root);
  if (!pickles.empty())
    throw InputError(dir + ": the weights are in PyTorch pickle format (" + join(pickles) +
                     "), which qlora does not load: unpickling can run arbitrary code. Convert them to "
                     "safetensors once, with transformers installed:\n  python -c \"from transformers import "
                     "AutoModelForCausalLM as M; M.from_pretrained('" + dir + "').save_pretrained('" + dir +
                     "', safe_serialization=True)\"");
  const std::vector<std::string> others = files_with_extension(root, ".safetensors");
  if (!others.empty())
    throw InputError(dir + ": found " + join(others) + " but neither " + kSingleName + " nor " + kIndexName +
                     ". A sharded model needs its index file: download it too (or rename a single weights "
                     "file to " + kSingleName + ").");
  if (const auto ggufs = gguf_files(root); !ggufs.empty())
    throw InputError(dir + ": holds " + join(ggufs) + " but no " + kSingleName + " or " + kIndexName + "; " +
                     kGgufHint + ".");
  throw InputError(dir + ": no weights: expected " + kSingleName + " or " + kIndexName +
                   " next to config.json. Download the model's *.safetensors files.");
}

std::string ModelDir::config_path() const { return (fs::path(dir_) / "config.json").string(); }

std::string ModelDir::weights_path() const { return (fs::path(dir_) / weights_file_).string(); }

std::vector<std::string> ModelDir::tensor_names() const {
  std::vector<std::string> out;
  out.reserve(where_.size());
  for (const auto& kv : where_) out.push_back(kv.first);
  return out;
}

const TensorInfo* ModelDir::info(const std::string& name) const {
  auto it = where_.find(name);
  return it == where_.end() ? nullptr : it->second.info;
}

at::Tensor ModelDir::tensor(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) {
    std::string hint = closest_match(name, tensor_names());
    throw InputError((fs::path(dir_) / weights_file_).string() + ": no tensor \"" + name + "\" (the model has " +
                     std::to_string(where_.size()) + " tensors" +
                     (hint.empty() ? std::string() : "; did you mean \"" + hint + "\"?") +
                     "). Check that the model is a checkpoint of a supported family and of the expected size.");
  }
  return tensor_view(it->second.file, *it->second.info);
}

std::string ModelDir::file_of(const std::string& name) const {
  auto it = where_.find(name);
  return it == where_.end() ? weights_path() : it->second.file->path();
}

std::string ModelDir::tokenizer_path() const {
  for (const char* name : {"tokenizer.json", "tokenizer.model"}) {
    fs::path p = fs::path(dir_) / name;
    if (is_file(p)) return p.string();
  }
  return "";
}

std::vector<std::shared_ptr<const SafetensorsFile>> ModelDir::shards() const {
  std::vector<std::shared_ptr<const SafetensorsFile>> out;
  for (const auto& kv : shards_) out.push_back(kv.second);
  return out;
}

}  // namespace qlora::io
