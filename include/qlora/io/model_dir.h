// io/model_dir: a Hugging Face model directory on disk, as transformers writes it.
//
// ModelDir::open finds config.json, then the weights: model.safetensors.index.json (its
// "weight_map" sends each tensor name to a shard file) or a single model.safetensors. Every
// shard is opened and validated up front (see io/safetensors.h), so a bad or missing shard is
// reported before any work starts. Pickle checkpoints (pytorch_model*.bin, *.pt, *.pth) are
// never read: they can run code when loaded. A directory that holds only those gets an
// InputError with the command that converts it, and a GGUF file (llama.cpp's format) one that
// says where to get the Hugging Face model. Tensors come out zero-copy (see
// io/torch_io.h, Note [mapped tensors are read-only]).
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "qlora/io/safetensors.h"

namespace qlora::io {

class ModelDir {
 public:
  // Throws InputError naming the directory or the file at fault, saying what to do.
  static ModelDir open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  std::string config_path() const;
  // model.safetensors or model.safetensors.index.json, the file that says what the weights are.
  std::string weights_path() const;
  // Sorted tensor names (the weight map's keys, or the single file's tensors).
  std::vector<std::string> tensor_names() const;
  bool has_tensor(const std::string& name) const { return where_.count(name) != 0; }
  // The header entry (dtype, shape) without touching the data; nullptr when absent.
  const TensorInfo* info(const std::string& name) const;
  // A zero-copy CPU tensor (read-only memory: clone() before writing into it); InputError
  // naming the directory and the weights file when the model has no such tensor.
  at::Tensor tensor(const std::string& name) const;
  // The weights file that holds tensor `name` (weights_path() when the model has no such
  // tensor): what a message about one tensor names.
  std::string file_of(const std::string& name) const;
  // tokenizer.json when present, else tokenizer.model, else "".
  std::string tokenizer_path() const;
  // The weight files, as opened (one for a single-file model).
  std::vector<std::shared_ptr<const SafetensorsFile>> shards() const;

 private:
  struct Where {
    std::shared_ptr<const SafetensorsFile> file;
    const TensorInfo* info;
  };
  std::string dir_;
  std::string weights_file_;  // model.safetensors or model.safetensors.index.json (for messages)
  std::map<std::string, Where> where_;
  std::map<std::string, std::shared_ptr<const SafetensorsFile>> shards_;  // file name -> file
};

}  // namespace qlora::io
