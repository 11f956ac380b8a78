// config: the typed run configuration and its one schema.
//
// A run is described by one YAML or JSON file (same schema, either syntax) plus
// `--set a.b=value` overrides. Loading fills defaults, accepts the Hugging Face
// TrainingArguments / PEFT / bitsandbytes names a practitioner already knows as
// aliases, and validates everything in one pass: every problem is collected
// with its key path (and line, for files) before anything is thrown, so the
// user fixes them all at once. Unknown keys are errors ("did you mean ...").
// Names config does not know (model presets, GPU presets) are checked by the
// modules that do, through set_name_check. This module knows nothing about torch.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "qlora/common/errors.h"

namespace qlora {

// ---------------------------------------------------------------- enums

enum class Precision { kAuto, kBf16, kFp16, kFp32 };
enum class OptimizerKind { kAdamW, kAdamW8bit, kPagedAdamW8bit };
enum class LrSchedule { kConstant, kLinear, kCosine };
enum class DataFormat { kAuto, kText, kCompletion, kAlpaca, kChat };
// How chat data is rendered (data.chat_template): the model's own template (tokenizer_config.json's
// chat_template or chat_template.jinja) or one of two built-in formats; auto: the model's when it
// has one, else the built-in whose special tokens the tokenizer knows.
enum class ChatTemplate { kAuto, kLlama3, kChatml, kModel };
// Which parts of a chat carry labels (data.train_on).
enum class TrainOn {
  kAllAssistant,   // every assistant turn's content and its end-of-turn token(s)
  kLastAssistant,  // the final assistant turn only
  kAll,            // the whole rendering (continued pretraining on chats)
};
enum class DistBackend { kAuto, kNccl, kGloo };
// What a checkpointed layer recomputes in backward (train.recompute): everything, all but
// the gate/up GEMM output (in train.selective_layers of the layers), or that with the number of
// layers chosen from the memory plan (auto).
enum class Recompute { kFull, kSelective, kAuto };
// Whether checkpointed layers keep their tensors in host memory between forward and backward
// (train.offload_checkpoints): decided by the plan (auto), always, never.
enum class Offload { kAuto, kOn, kOff };

std::string_view to_string(Precision v);
std::string_view to_string(OptimizerKind v);
std::string_view to_string(LrSchedule v);
std::string_view to_string(DataFormat v);
std::string_view to_string(ChatTemplate v);
std::string_view to_string(TrainOn v);
std::string_view to_string(DistBackend v);
std::string_view to_string(Recompute v);
std::string_view to_string(Offload v);

// ---------------------------------------------------------------- the tree

struct ModelConfig {
  std::string path;    // Hugging Face model directory (config.json + *.safetensors)
  std::string preset;  // architecture preset for planning without weights (llama-3.2-1b, ...)
};

struct QuantizationConfig {
  std::string quant_type = "nf4";               // 4-bit NormalFloat, as bitsandbytes
  bool double_quant = true;                     // 8-bit absmax in blocks of 256
  Precision compute_dtype = Precision::kAuto;   // auto: follow train.precision
};

struct LoraConfig {
  int64_t r = 16;
  double alpha = 32.0;
  double dropout = 0.05;
  // Module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)
  // or the single entry "all-linear".
  std::vector<std::string> target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};
  bool rslora = false;  // scaling alpha / sqrt(r) instead of alpha / r
  std::string init_from;  // a PEFT adapter directory training continues from ("": fresh LoRA)
};

struct DataConfig {
  std::string path;          // JSONL training file
  std::string eval_path;     // optional separate JSONL evaluation file
  double eval_ratio = 0.0;   // or: hold out this fraction of `path`
  DataFormat format = DataFormat::kAuto;
  int64_t max_seq_length = 2048;
  bool packing = false;
  bool train_on_inputs = false;  // false: loss on responses only
  ChatTemplate chat_template = ChatTemplate::kAuto;
  TrainOn train_on = TrainOn::kAllAssistant;  // chat only
  bool train_reasoning = true;   // chat only: false leaves <think>...</think> in responses untrained
  bool fold_system_prompt = false;  // chat only: a leading system message joins the first user turn
  bool skip_bad_lines = false;   // true: skip and count malformed lines instead of stopping
};

struct TrainConfig {
  int64_t micro_batch_size = 2;             // per device, per forward pass
  int64_t gradient_accumulation_steps = 16;
  double epochs = 3.0;
  int64_t max_steps = -1;                   // > 0: stop after this many optimizer steps
  double learning_rate = 2e-4;
  LrSchedule lr_scheduler = LrSchedule::kLinear;
  int64_t warmup_steps = 0;
  double warmup_ratio = 0.0;
  double weight_decay = 0.0;
  double max_grad_norm = 1.0;               // 0 disables clipping
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.999;
  double adam_epsilon = 1e-8;
  Precision precision = Precision::kAuto;
  bool gradient_checkpointing = true;
  // With checkpointing: full recomputes each layer in backward; selective keeps each layer's
  // gate/up GEMM output and recomputes the rest (Note [selective recompute]).
  Recompute recompute = Recompute::kFull;
  // With selective: how many decoder layers (the last ones) keep their gate/up output; -1: all.
  // auto sets it to the most that fit the GPU (plan::auto_recompute).
  int64_t selective_layers = -1;
  // With checkpointing, on a GPU: how many decoder layers (the last ones) recompute nothing in
  // backward, keeping every activation as without checkpointing; 0: none. auto sets it once
  // every layer keeps gate/up and memory is left (Note [layers not recomputed]).
  int64_t no_recompute_layers = 0;
  // With checkpointing, on a GPU: each layer's kept tensors wait in pinned host memory from its
  // forward to its backward (Note [offloaded checkpoints] in src/layer/offload.cpp). auto: when
  // the plan finds the run does not fit the GPU without it and does with it.
  Offload offload_checkpoints = Offload::kAuto;
  OptimizerKind optimizer = OptimizerKind::kPagedAdamW8bit;
  int64_t seed = 42;
  int64_t eval_steps = 0;                   // 0: evaluate only at the end
  int64_t max_bad_steps = 10;               // abort after this many inf/nan steps in a row
};

struct OutputConfig {
  std::string dir = "out";
  int64_t save_steps = 500;
  int64_t keep_last = 3;     // 0 keeps every checkpoint
  int64_t logging_steps = 10;
  std::string report_to = "tensorboard";  // tensorboard (event files in dir/runs) | none
};

struct HardwareConfig {
  // Target GPU for `qlora plan`: "auto" (the GPU of this machine) or a preset
  // name (t4, l4, a10, a100-40, a100-80, h100, h200) or a size like "24GiB".
  std::string gpu = "auto";
};

struct DistributedConfig {
  DistBackend backend = DistBackend::kAuto;  // auto: NCCL on GPUs, Gloo on CPU
  // The world size is never configured: it comes from WORLD_SIZE / SLURM_NTASKS.
};

struct Config {
  ModelConfig model;
  QuantizationConfig quantization;
  LoraConfig lora;
  DataConfig data;
  TrainConfig train;
  OutputConfig output;
  HardwareConfig hardware;
  DistributedConfig distributed;

  std::string source;  // where it came from ("configs/x.yaml", "<defaults>"), for messages
};

// ---------------------------------------------------------------- errors

struct ConfigIssue {
  std::string key;      // dotted key path, e.g. "train.micro_batch_size"; may be empty
  std::string message;  // what was expected and what came
  int line = 0;         // 1-based line in the source file, 0 when unknown
};

// All problems of one load, reported together (exit code 2).
class ConfigError : public InputError {
 public:
  ConfigError(std::string source, std::vector<ConfigIssue> issues);
  const std::string& source() const { return source_; }
  const std::vector<ConfigIssue>& issues() const { return issues_; }

 private:
  std::string source_;
  std::vector<ConfigIssue> issues_;
};

// ---------------------------------------------------------------- loading

// Reads a .yaml/.yml/.json file, applies `overrides` ("a.b=value", typed by the
// schema), fills defaults and validates. Throws ConfigError listing every problem.
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {});

// The same from text already in memory; `source` names it in messages.
// JSON is YAML, so one parser reads both.
Config parse_config(std::string_view text, std::string_view source,
                    const std::vector<std::string>& overrides = {});

// The built-in defaults, with overrides applied and validated (no file).
Config default_config(const std::vector<std::string>& overrides = {});

// ---------------------------------------------------------------- names known elsewhere

// model.preset and hardware.gpu name things config does not know: model's presets and plan's
// GPU presets, in modules above this one. The module that knows them registers a check here
// (plan::register_config_checks; the CLI calls it at start-up), and every load runs the
// registered checks with its own cross-key checks, so a bad name is listed in the same
// ConfigError as every other problem. A key with no registered check is taken as given, and its
// consumer rejects a bad value when it reads it (model_preset, plan::resolve_gpu).
// A check returns "" for a good value, else the message (the key and line are added to it).
using NameCheck = std::function<std::string(const std::string& value)>;

// Registers `check` for the string key `key` ("model.preset"), replacing an earlier check of
// that key; checks run in the order their keys were first registered. Thread-safe. Throws
// std::invalid_argument when `key` is not a string key of the schema.
void set_name_check(const std::string& key, NameCheck check);

// ---------------------------------------------------------------- output

// The resolved config as YAML (every key, canonical names, with comments) or
// JSON. Loading either output again gives the same Config.
std::string to_yaml(const Config& cfg);
std::string to_json(const Config& cfg);

// One line per key of the schema: "train.micro_batch_size  int  2  <help>".
std::string describe_schema();

}  // namespace qlora
