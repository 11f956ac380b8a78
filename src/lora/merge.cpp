#include "qlora/lora/merge.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>

#include "qlora/common/errors.h"
#include "qlora/common/text.h"
#include "qlora/io/model_dir.h"
#include "qlora/io/torch_io.h"
#include "qlora/lora/adapter_io.h"
#include "qlora/model/decoder.h"
#include "qlora/model/decoder_config.h"
#include "qlora/quant/nf4.h"

namespace qlora::lora {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

// Note [merging into the NF4 base]
// QLoRA trains A and B against the NF4 round trip of each decoder projection, Q(W), not W.
// Merging into W (the default, and what PEFT's merge_and_unload does on a 16-bit base) gives
// the 16-bit base plus the adapter: the base's quantization error is gone, but the result is
// not exactly the function that was trained. --from-nf4 merges into Q(W) instead, recomputed
// the way training computes it (quant::quantize_nf4 of the stored weight, blocksize 64, double
// quantization) and dequantized straight to fp32, where Q(W) = code · absmax is exact: the
// merged weight is then Q(W) + B·A·scaling rounded once (Note [one rounding]). Only the seven
// decoder projections of each layer are round-tripped, as only those are NF4 in training;
// embeddings, norms and lm_head stay as stored. The default is off because the adapter alone
// does not say it was trained on an NF4 base, and merging into W is the conventional,
// higher-precision choice; pass --from-nf4 for adapters qlora (or any QLoRA trainer) produced.

// Note [one rounding]
// Every merged weight is computed in fp32 (f64 for an f64 base) from exact operands, the base
// weight widened (exact) or its NF4 dequantization in fp32 (exact), plus B·A·scaling in fp32
// as PEFT forms it, and rounded once, to the output dtype. Dequantizing Q(W) to the stored
// 16-bit dtype first and rounding the sum again (what this merge once did) puts a second
// rounding error of up to half an ulp into every weight; on a bf16 base that moved a held-out
// loss from 3.3572 (the trained model) to 3.3829, where rounding once gives 3.3575. With
// --dtype fp32 the merged model computes what the QLoRA model computes in fp32, up to the order
// of fp32 additions (tests/test_lora_merge.cpp, MergedLossEqualsTrainedLoss). A QLoRA run whose
// compute dtype is bf16 / fp16 saw the base as Q(W) rounded to that dtype; a 16-bit merged
// weight differs from that plus B·A·scaling by at most one ulp (half from each rounding).

constexpr const char* kPeftPrefix = "base_model.model.";
constexpr const char* kSuffixA = ".lora_A.weight";
constexpr const char* kSuffixB = ".lora_B.weight";

// Files copied unchanged when present: from the adapter directory, where training wrote the
// tokenizer, chat template and stop tokens the model was tuned with (train/serving_files.h),
// else from the base directory.
const char* const kCopiedFiles[] = {"tokenizer.json",          "tokenizer.model",   "tokenizer_config.json",
                                    "special_tokens_map.json", "added_tokens.json", "vocab.json",
                                    "merges.txt",              "chat_template.jinja", "generation_config.json"};

bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

std::string mib_text(uint64_t bytes) {
  std::ostringstream os;
  os.precision(bytes < (10ull << 20) ? 2 : 0);
  os << std::fixed << static_cast<double>(bytes) / (1 << 20) << " MiB";
  return os.str();
}

bool is_float(io::DType d) {
  return d == io::DType::F64 || d == io::DType::F32 || d == io::DType::F16 || d == io::DType::BF16;
}

json read_json_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(path.string() + ": cannot read the file");
  std::stringstream buf;
  buf << in.rdbuf();
  try {
    return json::parse(buf.str());
  } catch (const json::parse_error& e) {
    throw InputError(path.string() + ": not valid JSON (" + std::string(e.what()) + ")");
  }
}

// ---------------------------------------------------------------- durable files

[[noreturn]] void fail_io(const fs::path& path, const std::string& what) {
  throw std::runtime_error(path.string() + ": " + what + " (" + std::strerror(errno) + ")");
}

void write_file_synced(const fs::path& path, const std::string& bytes) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail_io(path, "cannot create");
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      ::close(fd);
      fail_io(path, "write failed (disk full?)");
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    ::close(fd);
    fail_io(path, "fsync failed");
  }
  if (::close(fd) != 0) fail_io(path, "close failed");
}

void sync_dir(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) fail_io(dir, "cannot open the directory to fsync it");
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) fail_io(dir, "fsync of the directory failed");
}

std::string read_file_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(path.string() + ": cannot read the file");
  std::stringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

// Removes the temporary output directory unless released (the merge finished).
class TempDirGuard {
 public:
  explicit TempDirGuard(fs::path dir) : dir_(std::move(dir)) {}
  ~TempDirGuard() {
    if (dir_.empty()) return;
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  void release() { dir_.clear(); }

 private:
  fs::path dir_;
};

// ---------------------------------------------------------------- checks

// The output directory as an absolute path without a trailing separator.
fs::path normalized(const std::string& p) {
  fs::path a = fs::absolute(fs::path(p)).lexically_normal();
  if (a.filename().empty()) a = a.parent_path();
  return a;
}

bool is_inside(const fs::path& inner, const fs::path& outer) {
  std::error_code ec;
  const fs::path i = fs::weakly_canonical(inner, ec), o = fs::weakly_canonical(outer, ec);
  auto it = i.begin();
  for (const auto& part : o) {
    if (it == i.end() || *it != part) return false;
    ++it;
  }
  return true;
}

void check_out_dir(const fs::path& out, const MergeOptions& opt) {
  if (opt.out_dir.empty()) throw InputError("--out: give the directory to write the merged model to");
  for (const auto& [flag, in] : {std::pair<const char*, std::string>{"--base", opt.base_dir}, {"--adapter", opt.adapter_dir}})
    if (is_inside(normalized(in), out))
      throw InputError("--out " + opt.out_dir + " would contain or replace " + flag + " " + in +
                       "; choose an output directory outside the inputs");
  std::error_code ec;
  const fs::file_status st = fs::status(out, ec);
  if (!fs::exists(st)) return;
  if (!fs::is_directory(st))
    throw InputError("--out " + opt.out_dir + ": exists and is not a directory; remove it or choose another --out");
  if (!fs::is_empty(out, ec) && !opt.force)
    throw InputError("--out " + opt.out_dir +
                     ": exists and is not empty; remove it, choose another --out, or pass --force to replace it "
                     "(the old directory is removed only after the new one is complete)");
}

// What the adapter's weights file holds, by module: A [r, in] and B [out, r] (fp32).
struct AdapterModule {
  at::Tensor a, b;
};

// The plain-language name of an adapter key qlora does not merge.
std::string unsupported_key_reason(const std::string& key) {
  if (key.find("lora_magnitude_vector") != std::string::npos) return "a DoRA magnitude vector (use_dora)";
  if (key.find("lora_embedding_") != std::string::npos) return "LoRA on an embedding layer";
  if (key.find("modules_to_save") != std::string::npos) return "a fully trained module (modules_to_save)";
  if (ends_with(key, ".bias")) return "a trained bias (lora_bias / bias)";
  if (key.find(".lora_A.") != std::string::npos || key.find(".lora_B.") != std::string::npos)
    return "a LoRA weight under an unexpected name";
  return "not a LoRA weight (a fully trained module, e.g. modules_to_save or trainable tokens)";
}

std::map<std::string, AdapterModule> read_adapter_weights(const fs::path& file) {
  std::error_code ec;
  if (!fs::exists(file, ec)) {
    std::string hint;
    if (fs::exists(file.parent_path() / "adapter_model.bin", ec))
      hint = "; found adapter_model.bin, a pickle file, which qlora does not read: convert it with "
             "`python -c \"import torch, safetensors.torch as s; s.save_file(torch.load('adapter_model.bin'), "
             "'adapter_model.safetensors')\"`";
    throw InputError(file.string() + ": not found; a PEFT adapter directory holds adapter_config.json and "
                                     "adapter_model.safetensors" + hint);
  }
  std::map<std::string, AdapterModule> modules;
  for (auto& [key, t] : io::load_safetensors(file.string())) {
    const bool is_a = ends_with(key, kSuffixA), is_b = ends_with(key, kSuffixB);
    if (!starts_with(key, kPeftPrefix) || !(is_a || is_b))
      throw InputError(file.string() + ": key \"" + key + "\" is " + unsupported_key_reason(key) +
                       "; qlora merges plain LoRA adapters (lora_A / lora_B weights only). Merge this one with PEFT");
    const size_t prefix = std::strlen(kPeftPrefix), suffix = std::strlen(is_a ? kSuffixA : kSuffixB);
    const std::string module = key.substr(prefix, key.size() - prefix - suffix);
    if (t.dim() != 2 || !t.is_floating_point())
      throw InputError(file.string() + ": \"" + key + "\" should be a 2-D floating tensor, got " +
                       std::to_string(t.dim()) + "-D " + std::string(c10::toString(t.scalar_type())));
    (is_a ? modules[module].a : modules[module].b) = t.to(at::kFloat);
  }
  if (modules.empty()) throw InputError(file.string() + ": holds no LoRA weights (no *.lora_A.weight keys)");
  for (const auto& [module, m] : modules)
    if (!m.a.defined() || !m.b.defined())
      throw InputError(file.string() + ": module " + module + " has " + (m.a.defined() ? "lora_A" : "lora_B") +
                       " but no " + (m.a.defined() ? "lora_B" : "lora_A") + "; the file is incomplete");
  return modules;
}

// A decoder projection weight (`name` in the model's names: MergedWeights::model_name): what
// training stores in NF4. A multimodal base's image tower has projections of the same short
// names, which training does not touch.
bool is_decoder_projection(const std::string& name, size_t rank, const std::string& module_prefix) {
  if (rank != 2 || !starts_with(name, module_prefix + "layers.")) return false;
  for (const auto& p : decoder_linear_names())
    if (ends_with(name, "." + p + ".weight")) return true;
  return ends_with(name, ".qkv_proj.weight") || ends_with(name, ".gate_up_proj.weight");  // Phi-3
}

std::string config_dtype_of(const json& config) {
  for (const char* key : {"dtype", "torch_dtype"})
    if (config.contains(key) && config[key].is_string()) return config[key].get<std::string>();
  return "";
}

// The dtype name Hugging Face writes in config.json.
const char* hf_dtype_name(io::DType d) {
  switch (d) {
    case io::DType::F32: return "float32";
    case io::DType::F16: return "float16";
    default: return "bfloat16";
  }
}

}  // namespace

io::DType merge_output_dtype(const std::string& requested, const std::string& base_dtype) {
  if (requested == "bf16" || requested == "bfloat16") return io::DType::BF16;
  if (requested == "fp16" || requested == "float16") return io::DType::F16;
  if (requested == "fp32" || requested == "float32") return io::DType::F32;
  if (!requested.empty())
    throw InputError("--dtype " + requested + ": expected bf16, fp16 or fp32 (the dtype of the written weights)");
  return base_dtype == "float16" ? io::DType::F16 : io::DType::BF16;
}

MergedWeights::MergedWeights(const MergeOptions& opt)
    : from_nf4_(opt.from_nf4), base_(io::ModelDir::open(opt.base_dir)) {
  auto progress = [&](const std::string& line) {
    if (opt.progress) opt.progress(line);
  };
  // ---- the base
  const json config = read_json_file(base_.config_path());
  if (!config.is_object()) throw InputError(base_.config_path() + ": expected a JSON object");
  if (config.contains("quantization_config"))
    throw InputError(base_.config_path() + ": has a quantization_config: this base is saved quantized (" +
                     config["quantization_config"].dump().substr(0, 60) +
                     "). Merge needs the 16- or 32-bit base it was quantized from; pass that directory as --base "
                     "(add --from-nf4 to merge into its NF4 round trip)");
  base_dtype_ = config_dtype_of(config);
  // The text part of a multimodal Gemma 3 (model/decoder.h: text_model_weight_name): the adapter
  // names its modules as PEFT does on transformers 5's model, the base may be saved either way.
  if (config.contains("model_type") && config["model_type"] == "gemma3") names_.module_prefix = kGemma3TextPrefix;
  for (const std::string& n : base_.tensor_names()) base_name_[model_name(n)] = n;
  progress("base     " + opt.base_dir + ": " + std::to_string(base_.tensor_names().size()) + " tensors (" +
           (base_dtype_.empty() ? std::string("dtype not recorded") : base_dtype_) + ") in " +
           std::to_string(base_.shards().size()) + " weights file(s)");

  // ---- the adapter
  const fs::path adapter_dir(opt.adapter_dir);
  const fs::path adapter_config_path = adapter_dir / "adapter_config.json";
  settings_ = read_adapter_config(adapter_config_path.string());
  std::string trained_on;
  {
    const json ac = read_json_file(adapter_config_path);
    if (ac.contains("base_model_name_or_path") && ac["base_model_name_or_path"].is_string())
      trained_on = ac["base_model_name_or_path"].get<std::string>();
  }
  for (auto& [module, m] : read_adapter_weights(adapter_dir / "adapter_model.safetensors")) {
    const std::string weight = model_name(module + ".weight");
    modules_[weight.substr(0, weight.size() - 7)] = {m.a, m.b};
  }
  adapter_modules_ = modules_.size();
  {
    std::ostringstream os;
    os << "adapter  " << opt.adapter_dir << ": LoRA r " << settings_.r << ", alpha " << settings_.alpha
       << (settings_.rslora ? ", rslora" : "") << " (scaling " << settings_.scaling() << "), " << modules_.size()
       << " modules";
    progress(os.str());
  }

  // ---- every check before anything is written
  std::vector<std::string> problems;
  for (const auto& [module, m] : modules_) {
    const auto base_name = base_name_.find(module + ".weight");
    const std::string weight = base_name == base_name_.end() ? module + ".weight" : base_name->second;
    const io::TensorInfo* info = base_name == base_name_.end() ? nullptr : base_.info(weight);
    const std::vector<int64_t> a(m.a.sizes().begin(), m.a.sizes().end()), b(m.b.sizes().begin(), m.b.sizes().end());
    if (!info) {
      problems.push_back("adapter module " + module + ": the base has no tensor " + weight);
      continue;
    }
    if (a[0] != settings_.r || b[1] != settings_.r) {
      problems.push_back("adapter module " + module + ": lora_A " + shape_text(a) + " and lora_B " + shape_text(b) +
                         " do not have the rank r = " + std::to_string(settings_.r) + " of adapter_config.json");
      continue;
    }
    const std::vector<int64_t> expected = {b[0], a[1]};
    if (!is_float(info->dtype))
      problems.push_back("base tensor " + weight + " is " + io::dtype_name(info->dtype) +
                         ", not a 16/32-bit float weight (a quantized checkpoint?)");
    else if (info->shape != expected)
      problems.push_back("adapter module " + module + ": lora_B · lora_A is " + shape_text(expected) +
                         ", the base weight " + weight + " is " + shape_text(info->shape));
  }
  if (!problems.empty()) {
    std::ostringstream os;
    os << "adapter " << opt.adapter_dir << " does not fit the base " << opt.base_dir;
    if (!trained_on.empty())
      os << " (its adapter_config.json says it was trained on \"" << trained_on
         << "\"; that name is informational, the shapes decide)";
    os << ":";
    const size_t shown = std::min<size_t>(problems.size(), 12);
    for (size_t i = 0; i < shown; ++i) os << "\n  - " << problems[i];
    if (shown < problems.size()) os << "\n  - ... and " << problems.size() - shown << " more";
    os << "\nPass the base model the adapter was trained on.";
    throw InputError(os.str());
  }
}

std::string MergedWeights::model_name(const std::string& name) const {
  const std::string mine = model::text_model_weight_name(names_, name);
  return mine.empty() ? name : mine;  // the image tower's names stay as they are
}

at::Tensor MergedWeights::merged(const std::string& base_name) {
  at::Tensor w = base_.tensor(base_name);  // mapped, read-only
  const std::string name = model_name(base_name);
  if (from_nf4_ && is_decoder_projection(name, w.dim(), names_.module_prefix) && w.is_floating_point()) {
    // NF4 quantizes fp32 / bf16 / fp16; an f64 weight goes to fp32 first, as loading it into
    // an fp32 model for training does.
    const at::Tensor src = w.scalar_type() == at::kDouble ? w.to(at::kFloat) : w;
    try {
      // In fp32, Q(W) = code · absmax is exact: no rounding before the sum (Note [one rounding]).
      w = quant::dequantize_nf4(quant::quantize_nf4(src, /*double_quant=*/true), at::kFloat);
    } catch (const c10::Error& e) {
      throw InputError("base tensor " + base_name + ": cannot be NF4-quantized: " + e.what_without_backtrace());
    }
    ++nf4_round_trips_;
  }
  const std::string module = name.size() > 7 ? name.substr(0, name.size() - 7) : "";
  auto it = ends_with(name, ".weight") ? modules_.find(module) : modules_.end();
  if (it == modules_.end()) return w;
  // Note [one rounding]: the same fp32 ops as PEFT's merge, (B @ A) * scaling, added to the base
  // widened exactly to fp32 (f64 for an f64 base); the caller casts once to the output dtype.
  const at::ScalarType opmath = w.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor delta = at::matmul(it->second.b, it->second.a).mul_(settings_.scaling());  // [out, in] fp32
  at::Tensor o = w.to(opmath) + delta.to(opmath);
  merged_.push_back(module);
  modules_.erase(it);  // the adapter's fp32 copies are no longer needed
  return o;
}

void check_merge_out_dir(const MergeOptions& opt) { check_out_dir(normalized(opt.out_dir), opt); }

MergeResult merge_adapter(const MergeOptions& opt) {
  auto progress = [&](const std::string& line) {
    if (opt.progress) opt.progress(line);
  };
  const fs::path out = normalized(opt.out_dir);
  check_out_dir(out, opt);
  MergedWeights weights(opt);
  const io::ModelDir& base = weights.base();
  json config = read_json_file(base.config_path());
  const io::DType out_dtype = merge_output_dtype(opt.dtype, weights.base_config_dtype());
  const std::vector<std::string> names = base.tensor_names();

  // ---- shard plan: tensors in name order, a new shard when the next one would pass the limit
  struct Planned {
    std::string name;
    io::DType dtype;
    uint64_t bytes;
  };
  std::vector<std::vector<Planned>> shards(1);
  uint64_t shard_bytes = 0, total_bytes = 0;
  for (const auto& name : names) {
    const io::TensorInfo& info = *base.info(name);
    // Float tensors go to the output dtype; the rotary inverse frequencies (a buffer some
    // checkpoints carry, recomputed by every loader) stay exact.
    const io::DType dt = is_float(info.dtype) && !ends_with(name, "inv_freq") ? out_dtype : info.dtype;
    const uint64_t bytes = static_cast<uint64_t>(info.numel()) * io::dtype_size(dt);
    if (shard_bytes > 0 && shard_bytes + bytes > opt.max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back({name, dt, bytes});
    shard_bytes += bytes;
    total_bytes += bytes;
  }
  std::vector<std::string> shard_names;
  for (size_t i = 0; i < shards.size(); ++i) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
    shard_names.push_back(shards.size() == 1 ? "model.safetensors" : buf);
  }

  // ---- write into a temporary directory beside out
  std::error_code ec;
  fs::create_directories(out.parent_path(), ec);
  if (ec) throw InputError(out.parent_path().string() + ": cannot create the parent of --out (" + ec.message() + ")");
  const fs::path tmp = out.parent_path() / ("." + out.filename().string() + ".tmp-" + std::to_string(::getpid()));
  fs::remove_all(tmp, ec);
  fs::create_directory(tmp, ec);
  if (ec) throw std::runtime_error(tmp.string() + ": cannot create the temporary output directory (" + ec.message() + ")");
  TempDirGuard guard(tmp);

  MergeResult result;
  result.out_dir = out.string();
  result.dtype = out_dtype;
  progress(std::string("merging  ") + std::to_string(weights.adapter_modules()) + " modules into " +
           (opt.from_nf4 ? "the NF4 round trip of the base's decoder projections" : "the base weights as stored") +
           ", written as " + hf_dtype_name(out_dtype));
  json weight_map = json::object();
  for (size_t s = 0; s < shards.size(); ++s) {
    std::vector<at::Tensor> keep;  // the shard's output tensors, alive until written
    std::vector<io::TensorToWrite> entries;
    for (const Planned& p : shards[s]) {
      at::Tensor o = weights.merged(p.name).to(io::to_scalar_type(p.dtype));
      o = o.contiguous();
      keep.push_back(o);
      entries.push_back({p.name, p.dtype, std::vector<int64_t>(o.sizes().begin(), o.sizes().end()), o.data_ptr(),
                         static_cast<size_t>(o.nbytes())});
      weight_map[p.name] = shard_names[s];
      result.weight_bytes += p.bytes;
      ++result.tensors;
    }
    io::write_safetensors((tmp / shard_names[s]).string(), entries, {{"format", "pt"}});
    result.weight_files.push_back(shard_names[s]);
    uint64_t bytes = 0;
    for (const Planned& p : shards[s]) bytes += p.bytes;
    progress("wrote    " + shard_names[s] + " (" + std::to_string(shards[s].size()) + " tensors, " + mib_text(bytes) +
             ")");
  }
  result.merged_modules = weights.merged_modules();
  result.nf4_round_trips = weights.nf4_round_trips();
  if (shards.size() > 1) {
    const json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
    write_file_synced(tmp / "model.safetensors.index.json", index.dump(2) + "\n");
    result.weight_files.push_back("model.safetensors.index.json");
  }

  // ---- config and tokenizer files
  bool dtype_set = false;
  for (const char* key : {"dtype", "torch_dtype"})
    if (config.contains(key)) {
      config[key] = hf_dtype_name(out_dtype);
      dtype_set = true;
    }
  if (!dtype_set) config["torch_dtype"] = hf_dtype_name(out_dtype);
  write_file_synced(tmp / "config.json", config.dump(2) + "\n");
  result.copied_files.push_back("config.json");
  for (const char* f : kCopiedFiles) {
    fs::path src = fs::path(opt.adapter_dir) / f;
    const bool from_adapter = fs::is_regular_file(src, ec);
    if (!from_adapter) src = fs::path(base.dir()) / f;
    if (!fs::is_regular_file(src, ec)) continue;
    write_file_synced(tmp / f, read_file_bytes(src));
    result.copied_files.push_back(std::string(f) + (from_adapter ? " (adapter's)" : ""));
  }
  std::string copied;
  for (const auto& f : result.copied_files) copied += (copied.empty() ? "" : ", ") + f;
  progress("copied   " + copied + " (config dtype " + hf_dtype_name(out_dtype) + ")");

  // ---- into place: the old out (empty, or --force) leaves only after the new one is complete
  sync_dir(tmp);
  if (fs::exists(out, ec)) {
    const fs::path old = out.parent_path() / ("." + out.filename().string() + ".old-" + std::to_string(::getpid()));
    fs::remove_all(old, ec);
    fs::rename(out, old, ec);
    if (ec) throw std::runtime_error(out.string() + ": cannot move the existing directory aside (" + ec.message() + ")");
    fs::rename(tmp, out, ec);
    if (ec) {
      std::error_code ignored;
      fs::rename(old, out, ignored);
      throw std::runtime_error(out.string() + ": cannot move the merged model into place (" + ec.message() + ")");
    }
    guard.release();
    fs::remove_all(old, ec);
  } else {
    fs::rename(tmp, out, ec);
    if (ec) throw std::runtime_error(out.string() + ": cannot move the merged model into place (" + ec.message() + ")");
    guard.release();
  }
  sync_dir(out.parent_path());
  return result;
}

}  // namespace qlora::lora
