// train/setup: the first stages of the recipe (device and precision, the
// frozen NF4 base), shared by `qlora train` and the measuring commands
// (`qlora plan --measure`, `--find-micro-batch`).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <string>
#include <vector>

#include "qlora/config/config.h"
#include "qlora/model/decoder.h"
#include "qlora/model/decoder_config.h"

namespace qlora::train {

struct DeviceChoice {
  c10::Device device = c10::Device(c10::kCPU);
  Precision precision = Precision::kFp32;  // train.precision resolved for this device
  std::string description;                 // "CPU (2 threads)" / "cuda:0 NVIDIA H100 80GB HBM3 (sm_90)"
  // The GPU as the driver reports it (empty / 0 on CPU).
  std::string gpu_name;
  double gpu_total_bytes = 0;
  int cc_major = 0;
  int cc_minor = 0;
};

// want: auto (the GPU of this local rank when there is one), cpu, cuda.
// InputError for another value, for cuda without CUDA, for a local rank
// beyond this host's GPUs.
DeviceChoice choose_device(const Config& cfg, const std::string& want, int64_t local_rank = 0);

at::ScalarType scalar_type(Precision p);

struct BaseModel {
  DecoderConfig shape;
  std::string config_path;      // the model's config.json ("" for a preset)
  bool random_weights = false;  // the directory had no weights (allow_random_weights)
  model::DecoderModel model;
};

// cfg.model.path loaded on the device in the run's precision, its projections
// quantized to NF4 as they load. With allow_random_weights, a directory that
// holds config.json but no *.safetensors, or no model.path but a
// model.preset, gets random weights of that shape (train/demo.h:
// random_llama_weights) instead of an error.
BaseModel load_base_model(const Config& cfg, const DeviceChoice& dev, bool allow_random_weights = false);

// InputError when an example of `longest` tokens (after truncation to data.max_seq_length) is
// longer than the model's positions reach (DecoderConfig::max_positions): the numbers, the data
// file `what`, and the keys to change.
void check_sequence_length(const Config& cfg, const DecoderConfig& shape, int64_t longest, const std::string& what);

// What `qlora config` checks of cfg.model.path without loading any weight:
// config.json (a supported model), every safetensors header, the tokenizer
// files (loaded as the run loads them, their ids checked against config.json's
// vocabulary), and data.path / data.eval_path are
// readable files. Throws InputError naming the file; returns one line a check
// ("model: llama, 16 layers, hidden 2048, vocab 128256, 1 safetensors file").
std::vector<std::string> check_run_files(const Config& cfg);

}  // namespace qlora::train
