#include "qlora/train/setup.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>

#include <filesystem>
#include <memory>
#include <string>
#include <utility>

#include "qlora/amp/precision.h"
#include "qlora/common/errors.h"
#include "qlora/model/family.h"
#include "qlora/common/input_files.h"
#include "qlora/data/tokenizer.h"
#include "qlora/io/model_dir.h"
#include "qlora/kernels.h"
#include "qlora/model/nf4_linear.h"
#include "qlora/train/demo.h"
#include "qlora/train/vocab_check.h"

namespace qlora::train {
namespace {

namespace fs = std::filesystem;

constexpr uint64_t kRandomWeightsSeed = 0;

bool has_safetensors(const std::string& dir) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (e.path().extension() == ".safetensors") return true;
  return false;
}

}  // namespace

DeviceChoice choose_device(const Config& cfg, const std::string& want, int64_t local_rank) {
  DeviceChoice d;
  if (want != "auto" && want != "cpu" && want != "cuda")
    throw InputError("--device " + want + ": expected auto, cpu or cuda");
  if (want == "cuda" && !at::globalContext().hasCUDA())
    throw InputError("--device cuda: this build or machine has no CUDA (qlora env says why); use --device cpu");
  if (want != "cpu" && at::globalContext().hasCUDA()) {
    constexpr int kMaxDevices = 64;
    kernels::DeviceInfo info[kMaxDevices];
    char reason[256] = {0};
    const int n = kernels::query_devices(info, kMaxDevices, reason, sizeof reason);
    if (n > 0 && local_rank >= n)
      throw InputError("LOCAL_RANK " + std::to_string(local_rank) + " but this host has " + std::to_string(n) +
                       " GPU(s): start at most " + std::to_string(n) + " processes per host (torchrun --nproc-per-node)");
    if (n > 0) {
      const kernels::DeviceInfo& g = info[local_rank];
      d.device = c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(local_rank));
      d.gpu_name = g.name;
      d.gpu_total_bytes = static_cast<double>(g.total_bytes);
      d.cc_major = g.cc_major;
      d.cc_minor = g.cc_minor;
      d.description = "cuda:" + std::to_string(local_rank) + " " + std::string(g.name) + " (sm_" +
                      std::to_string(g.cc_major) + std::to_string(g.cc_minor) + ")";
    }
  }
  if (d.device.is_cpu()) {
    const int threads = at::get_num_threads();
    d.description = "CPU (" + std::to_string(threads) + (threads == 1 ? " thread)" : " threads)");
  }
  d.precision = amp::resolve_precision(cfg.train.precision, d.device.is_cuda(), d.cc_major);
  return d;
}

at::ScalarType scalar_type(Precision p) {
  switch (p) {
    case Precision::kBf16: return at::kBFloat16;
    case Precision::kFp16: return at::kHalf;
    default: return at::kFloat;
  }
}

void check_sequence_length(const Config& cfg, const DecoderConfig& shape, int64_t longest, const std::string& what) {
  const int64_t reach = shape.max_positions();
  if (reach <= 0 || longest <= reach) return;
  std::string why = "the model's max_position_embeddings is " + std::to_string(shape.max_position_embeddings);
  if (reach != shape.max_position_embeddings) why += " (" + std::to_string(reach) + " with its rope_scaling)";
  throw InputError(what + ": an example of " + std::to_string(longest) +
                   " tokens is longer than the model's positions reach: " + why + " in config.json. Set " +
                   "data.max_seq_length to " + std::to_string(reach) + " or less (in " + cfg.source +
                   "; longer examples are truncated), or give the model a rope_scaling that extends it (e.g. yarn "
                   "with a factor)");
}

BaseModel load_base_model(const Config& cfg, const DeviceChoice& dev, bool allow_random_weights) {
  const Precision compute =
      cfg.quantization.compute_dtype == Precision::kAuto ? dev.precision : cfg.quantization.compute_dtype;
  model::LoadOptions load;
  load.dtype = scalar_type(dev.precision);
  load.device = dev.device;
  load.make_linear = model::nf4_linear_factory(cfg.quantization.double_quant, scalar_type(compute));
  const fs::path config_json = fs::path(cfg.model.path) / "config.json";
  const bool preset_only = cfg.model.path.empty() && !cfg.model.preset.empty();
  if (allow_random_weights && (preset_only || (fs::exists(config_json) && !has_safetensors(cfg.model.path)))) {
    const DecoderConfig shape = preset_only ? model_preset(cfg.model.preset) : read_decoder_config(config_json.string());
    model::DecoderModel m = model::DecoderModel::load(shape, random_llama_weights(shape, kRandomWeightsSeed, dev.device), load);
    return BaseModel{shape, preset_only ? std::string() : config_json.string(), true, std::move(m)};
  }
  const io::ModelDir dir = io::ModelDir::open(cfg.model.path);
  const DecoderConfig shape = read_decoder_config(dir.config_path());
  const model::WeightSource weights{dir.weights_path(), dir.tensor_names(),
                                    [&dir](const std::string& n) { return dir.tensor(n); },
                                    [&dir](const std::string& n) { return dir.file_of(n); }};
  model::DecoderModel m = model::DecoderModel::load(shape, weights, load);
  return BaseModel{shape, dir.config_path(), false, std::move(m)};
}

std::vector<std::string> check_run_files(const Config& cfg) {
  std::vector<std::string> lines;
  if (!cfg.model.path.empty()) {
    const io::ModelDir dir = io::ModelDir::open(cfg.model.path);
    const DecoderConfig shape = read_decoder_config(dir.config_path());
    lines.push_back("model: " + shape.model_type + (shape.multimodal() ? " (the text part of a multimodal gemma3)" : "") +
                    ", " + std::to_string(shape.num_hidden_layers) + " layers, hidden " +
                    std::to_string(shape.hidden_size) + ", vocab " + std::to_string(shape.vocab_size) + ", " +
                    std::to_string(dir.tensor_names().size()) + " tensors (" + dir.dir() + ")");
    const std::unique_ptr<data::Tokenizer> tok = load_checked_tokenizer(cfg.model.path);
    lines.push_back("tokenizer: " + std::to_string(tok->vocab_size()) + " ids (" + tok->path() + ")");
  }
  for (const auto& [key, path] : {std::pair<std::string, std::string>{"data.path", cfg.data.path},
                                  {"data.eval_path", cfg.data.eval_path}}) {
    if (path.empty()) continue;
    if (const std::string why = why_not_a_file(path); !why.empty())
      throw InputError(cfg.source + ": " + key + ": " + path + " " + why + "; point it at a JSONL file");
    lines.push_back(key + ": " + path + " (" + std::to_string(fs::file_size(path)) + " bytes; `qlora data` tokenizes it)");
  }
  return lines;
}

}  // namespace qlora::train
