#include "config/schema.h"

#include <stdexcept>

#include "qlora/common/text.h"

namespace qlora {

// ---------------------------------------------------------------- enum names
// One table per enum: index i is the canonical spelling of enumerator i. Built on first use, like
// the schema that copies them, so a caller from another file's static initializer (a check
// registered through set_name_check, say) never sees them before they exist.
namespace {
const std::vector<std::string>& precision_names() {
  static const std::vector<std::string> names = {"auto", "bf16", "fp16", "fp32"};
  return names;
}
const std::vector<std::string>& optimizer_names() {
  static const std::vector<std::string> names = {"adamw", "adamw_8bit", "paged_adamw_8bit"};
  return names;
}
const std::vector<std::string>& schedule_names() {
  static const std::vector<std::string> names = {"constant", "linear", "cosine"};
  return names;
}
const std::vector<std::string>& format_names() {
  static const std::vector<std::string> names = {"auto", "text", "completion", "alpaca", "chat"};
  return names;
}
const std::vector<std::string>& template_names() {
  static const std::vector<std::string> names = {"auto", "llama3", "chatml", "model"};
  return names;
}
const std::vector<std::string>& train_on_names() {
  static const std::vector<std::string> names = {"all_assistant", "last_assistant", "all"};
  return names;
}
const std::vector<std::string>& backend_names() {
  static const std::vector<std::string> names = {"auto", "nccl", "gloo"};
  return names;
}
const std::vector<std::string>& recompute_names() {
  static const std::vector<std::string> names = {"full", "selective", "auto"};
  return names;
}
const std::vector<std::string>& offload_names() {
  static const std::vector<std::string> names = {"auto", "true", "false"};
  return names;
}

template <typename E>
std::string_view name_of(const std::vector<std::string>& names, E v) {
  return names.at(static_cast<size_t>(v));
}
template <typename E>
E value_of(const std::vector<std::string>& names, const std::string& s) {
  for (size_t i = 0; i < names.size(); ++i)
    if (names[i] == s) return static_cast<E>(i);
  throw std::invalid_argument("unknown enum value " + s);
}
}  // namespace

std::string_view to_string(Precision v) { return name_of(precision_names(), v); }
std::string_view to_string(OptimizerKind v) { return name_of(optimizer_names(), v); }
std::string_view to_string(LrSchedule v) { return name_of(schedule_names(), v); }
std::string_view to_string(DataFormat v) { return name_of(format_names(), v); }
std::string_view to_string(ChatTemplate v) { return name_of(template_names(), v); }
std::string_view to_string(TrainOn v) { return name_of(train_on_names(), v); }
std::string_view to_string(DistBackend v) { return name_of(backend_names(), v); }
std::string_view to_string(Recompute v) { return name_of(recompute_names(), v); }
std::string_view to_string(Offload v) { return name_of(offload_names(), v); }

namespace config_detail {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Binders: a Field's get/set from a pointer to the section and to the member.
template <typename S, typename T>
Field bind_member(std::string key, Kind kind, S Config::*section, T S::*member, std::string help) {
  Field f;
  f.key = std::move(key);
  f.kind = kind;
  f.help = std::move(help);
  f.get = [section, member](const Config& c) { return json((c.*section).*member); };
  f.set = [section, member](Config& c, const json& v) { (c.*section).*member = v.get<T>(); };
  return f;
}

template <typename S, typename E>
Field bind_enum(std::string key, S Config::*section, E S::*member,
                const std::vector<std::string>& names, std::string help) {
  Field f;
  f.key = std::move(key);
  f.kind = Kind::kEnum;
  f.help = std::move(help);
  f.choices = names;
  f.get = [section, member, &names](const Config& c) {
    return json(std::string(name_of(names, (c.*section).*member)));
  };
  f.set = [section, member, &names](Config& c, const json& v) {
    (c.*section).*member = value_of<E>(names, v.get<std::string>());
  };
  return f;
}

Field& range(Field& f, double min, double max, bool min_exclusive = false,
             bool max_exclusive = false) {
  f.min = min;
  f.max = max;
  f.min_exclusive = min_exclusive;
  f.max_exclusive = max_exclusive;
  return f;
}

std::vector<Field> build_schema() {
  using C = Config;
  std::vector<Field> s;
  auto add = [&s](Field f) -> Field& { s.push_back(std::move(f)); return s.back(); };

  // model
  add(bind_member("model.path", Kind::kString, &C::model, &ModelConfig::path,
           "Hugging Face model directory (config.json + *.safetensors)"));
  add(bind_member("model.preset", Kind::kString, &C::model, &ModelConfig::preset,
           "architecture preset for planning without weights (llama-3.2-1b, llama-3.1-8b, ...)"));

  // quantization
  add(bind_member("quantization.quant_type", Kind::kString, &C::quantization,
           &QuantizationConfig::quant_type, "4-bit data type of the frozen base: nf4"));
  add(bind_member("quantization.double_quant", Kind::kBool, &C::quantization,
           &QuantizationConfig::double_quant,
           "quantize the absmax constants too: ~0.37 bit/weight saved, no quality cost"));
  add(bind_enum("quantization.compute_dtype", &C::quantization, &QuantizationConfig::compute_dtype,
                precision_names(), "dtype the base is dequantized to for its matmuls; auto: train.precision"));

  // lora
  range(add(bind_member("lora.r", Kind::kInt, &C::lora, &LoraConfig::r,
                 "adapter rank: higher = more capacity, more memory")), 1, 4096);
  range(add(bind_member("lora.alpha", Kind::kFloat, &C::lora, &LoraConfig::alpha,
                 "scaling numerator: the update is scaled by alpha / r (or alpha / sqrt(r))")),
        0, kInf, true);
  range(add(bind_member("lora.dropout", Kind::kFloat, &C::lora, &LoraConfig::dropout,
                 "dropout on the adapter input: regularizes small data sets")), 0, 1, false, true);
  add(bind_member("lora.target_modules", Kind::kStringList, &C::lora, &LoraConfig::target_modules,
           "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, or all-linear"));
  add(bind_member("lora.rslora", Kind::kBool, &C::lora, &LoraConfig::rslora,
           "rank-stabilized scaling alpha / sqrt(r): steadier at high r"));
  add(bind_member("lora.init_from", Kind::kString, &C::lora, &LoraConfig::init_from,
                  "a PEFT adapter directory to continue training from (its r, alpha and targets must match); "
                  "the optimizer starts fresh"));

  // data
  add(bind_member("data.path", Kind::kString, &C::data, &DataConfig::path, "JSONL training file"));
  add(bind_member("data.eval_path", Kind::kString, &C::data, &DataConfig::eval_path,
           "separate JSONL evaluation file (or use data.eval_ratio)"));
  range(add(bind_member("data.eval_ratio", Kind::kFloat, &C::data, &DataConfig::eval_ratio,
                 "hold out this fraction of data.path for evaluation")), 0, 1, false, true);
  add(bind_enum("data.format", &C::data, &DataConfig::format, format_names(),
                "text | completion | alpaca | chat (OpenAI messages or ShareGPT conversations); "
                "auto: from the first line's keys"));
  range(add(bind_member("data.max_seq_length", Kind::kInt, &C::data, &DataConfig::max_seq_length,
                 "tokens per example; longer ones are truncated: memory grows with it")),
        8, 1 << 20);
  add(bind_member("data.packing", Kind::kBool, &C::data, &DataConfig::packing,
           "pack several examples per row (attention kept within each): fewer pad tokens"));
  add(bind_member("data.train_on_inputs", Kind::kBool, &C::data, &DataConfig::train_on_inputs,
           "false: loss on responses only; true: on prompts too"));
  add(bind_enum("data.chat_template", &C::data, &DataConfig::chat_template, template_names(),
                "chat rendering: model (the model's own chat template) | llama3 | chatml; auto: the "
                "model's template when it has one, else the built-in its tokenizer's tokens match"));
  add(bind_enum("data.train_on", &C::data, &DataConfig::train_on, train_on_names(),
                "chat: what is trained: all_assistant (every reply and its end-of-turn) | "
                "last_assistant | all (the whole chat, for continued pretraining)"));
  add(bind_member("data.train_reasoning", Kind::kBool, &C::data, &DataConfig::train_reasoning,
                  "chat: false leaves a reply's <think>...</think> block untrained (Qwen3, DeepSeek-R1)"));
  add(bind_member("data.fold_system_prompt", Kind::kBool, &C::data, &DataConfig::fold_system_prompt,
                  "chat: true folds a leading system message into the first user turn (\"<system>\\n\\n<user>\"), "
                  "for templates with no place for one (Gemma's)"));
  add(bind_member("data.skip_bad_lines", Kind::kBool, &C::data, &DataConfig::skip_bad_lines,
                  "false: a malformed JSONL line stops the run (file:line named); true: skip and count it"));

  // train
  range(add(bind_member("train.micro_batch_size", Kind::kInt, &C::train, &TrainConfig::micro_batch_size,
                 "sequences per forward pass per GPU: the main memory knob")), 1, 65536);
  range(add(bind_member("train.gradient_accumulation_steps", Kind::kInt, &C::train,
                 &TrainConfig::gradient_accumulation_steps,
                 "micro-batches per optimizer step: raises the effective batch at no memory cost")),
        1, 65536);
  range(add(bind_member("train.epochs", Kind::kFloat, &C::train, &TrainConfig::epochs,
                 "passes over the data (ignored when train.max_steps > 0)")), 0, 1e6, true);
  range(add(bind_member("train.max_steps", Kind::kInt, &C::train, &TrainConfig::max_steps,
                 "optimizer steps to run; -1: use train.epochs")), -1, 1e12);
  range(add(bind_member("train.learning_rate", Kind::kFloat, &C::train, &TrainConfig::learning_rate,
                 "peak learning rate: 1e-4 to 3e-4 is usual for QLoRA")), 0, 1, true);
  add(bind_enum("train.lr_scheduler", &C::train, &TrainConfig::lr_scheduler, schedule_names(),
                "shape after warmup: constant | linear | cosine"));
  range(add(bind_member("train.warmup_steps", Kind::kInt, &C::train, &TrainConfig::warmup_steps,
                 "linear warmup length in steps (or use train.warmup_ratio)")), 0, 1e12);
  range(add(bind_member("train.warmup_ratio", Kind::kFloat, &C::train, &TrainConfig::warmup_ratio,
                 "linear warmup as a fraction of all steps")), 0, 1, false, true);
  range(add(bind_member("train.weight_decay", Kind::kFloat, &C::train, &TrainConfig::weight_decay,
                 "decoupled weight decay on the adapters")), 0, 1);
  range(add(bind_member("train.max_grad_norm", Kind::kFloat, &C::train, &TrainConfig::max_grad_norm,
                 "clip the global gradient norm to this; 0 disables")), 0, kInf);
  range(add(bind_member("train.adam_beta1", Kind::kFloat, &C::train, &TrainConfig::adam_beta1,
                 "AdamW first-moment decay")), 0, 1, false, true);
  range(add(bind_member("train.adam_beta2", Kind::kFloat, &C::train, &TrainConfig::adam_beta2,
                 "AdamW second-moment decay")), 0, 1, false, true);
  range(add(bind_member("train.adam_epsilon", Kind::kFloat, &C::train, &TrainConfig::adam_epsilon,
                 "AdamW denominator epsilon")), 0, 1, true);
  add(bind_enum("train.precision", &C::train, &TrainConfig::precision, precision_names(),
                "autocast dtype: auto picks bf16 where supported, else fp16 with loss scaling"));
  add(bind_member("train.gradient_checkpointing", Kind::kBool, &C::train,
           &TrainConfig::gradient_checkpointing,
           "recompute each decoder layer in backward: far less activation memory, ~30% more compute"));
  add(bind_enum("train.recompute", &C::train, &TrainConfig::recompute, recompute_names(),
                "with checkpointing, on a GPU: full | selective (keeps each layer's gate/up GEMM output, "
                "2 x intermediate_size values a token: ~10% less compute, more memory) | auto (selective in as "
                "many layers as the GPU's memory holds, then no recompute in as many as still fit; see qlora plan)"));
  range(add(bind_member("train.selective_layers", Kind::kInt, &C::train, &TrainConfig::selective_layers,
                 "with train.recompute: selective, how many layers (the last ones) keep gate/up; -1: all")),
        -1, 1e6);
  add(bind_enum("train.offload_checkpoints", &C::train, &TrainConfig::offload_checkpoints, offload_names(),
                "with checkpointing, on a GPU: keep each layer's checkpoint in pinned host memory until its "
                "backward (far less GPU memory at long sequences; host memory and PCIe time instead): auto (when "
                "the run does not fit the GPU without it; see qlora plan) | true | false"));
  range(add(bind_member("train.no_recompute_layers", Kind::kInt, &C::train, &TrainConfig::no_recompute_layers,
                 "with checkpointing, on a GPU: how many layers (the last ones) recompute nothing, keeping all "
                 "their activations (fastest, most memory); auto sets it when every layer keeps gate/up and "
                 "memory is left")),
        0, 1e6);
  add(bind_enum("train.optimizer", &C::train, &TrainConfig::optimizer, optimizer_names(),
                "adamw (8 B/param) | adamw_8bit (2 B/param) | paged_adamw_8bit (can spill to host)"));
  range(add(bind_member("train.seed", Kind::kInt, &C::train, &TrainConfig::seed,
                 "seed of shuffling, dropout and LoRA init: same seed, same run")), 0, 9.2e18);
  range(add(bind_member("train.eval_steps", Kind::kInt, &C::train, &TrainConfig::eval_steps,
                 "evaluate every N optimizer steps; 0: only at the end")), 0, 1e12);
  range(add(bind_member("train.max_bad_steps", Kind::kInt, &C::train, &TrainConfig::max_bad_steps,
                 "abort after this many inf/nan steps in a row (each is skipped)")), 1, 1e6);

  // output
  add(bind_member("output.dir", Kind::kString, &C::output, &OutputConfig::dir,
           "where checkpoints, logs and the final adapter go"));
  range(add(bind_member("output.save_steps", Kind::kInt, &C::output, &OutputConfig::save_steps,
                 "checkpoint every N optimizer steps (and at the end)")), 1, 1e12);
  range(add(bind_member("output.keep_last", Kind::kInt, &C::output, &OutputConfig::keep_last,
                 "keep the newest N checkpoints; 0 keeps all")), 0, 1e6);
  range(add(bind_member("output.logging_steps", Kind::kInt, &C::output, &OutputConfig::logging_steps,
                 "log loss, lr and speed every N optimizer steps")), 1, 1e12);
  add(bind_member("output.report_to", Kind::kString, &C::output, &OutputConfig::report_to,
                  "tensorboard: TensorBoard event files in output.dir/runs (tensorboard --logdir); none"));

  // hardware, distributed
  add(bind_member("hardware.gpu", Kind::kString, &C::hardware, &HardwareConfig::gpu,
           "GPU `qlora plan` budgets for: this or auto (the GPU of this machine) | none | t4 | l4 | a10 | a100-40 | a100-80 | h100 | h200 | <N>GiB"));
  add(bind_enum("distributed.backend", &C::distributed, &DistributedConfig::backend, backend_names(),
                "process-group backend: auto = NCCL on GPUs, Gloo on CPU"));
  return s;
}

// HF `optim` names -> ours. Any other value is refused with the list.
std::optional<json> translate_optim(const json& v) {
  if (!v.is_string()) return v;  // the type check on the target reports it
  static const std::vector<std::pair<std::string, std::string>> kMap = {
      {"adamw_torch", "adamw"}, {"adamw_torch_fused", "adamw"}, {"adamw_hf", "adamw"},
      {"adamw", "adamw"}, {"adamw_bnb_8bit", "adamw_8bit"}, {"adamw_8bit", "adamw_8bit"},
      {"paged_adamw_8bit", "paged_adamw_8bit"}};
  const std::string s = v.get<std::string>();
  for (const auto& [hf, ours] : kMap)
    if (s == hf) return json(ours);
  throw std::invalid_argument("optim \"" + s +
                              "\" is not supported; use adamw_torch, adamw_bnb_8bit or "
                              "paged_adamw_8bit (or train.optimizer: adamw | adamw_8bit | "
                              "paged_adamw_8bit)");
}

// HF `fp16: true` / `bf16: true` -> train.precision; false means "not this one".
std::function<std::optional<json>(const json&)> precision_flag(std::string value) {
  return [value](const json& v) -> std::optional<json> {
    if (!v.is_boolean()) throw std::invalid_argument("expected true or false");
    if (v.get<bool>()) return json(value);
    return std::nullopt;
  };
}

std::optional<json> translate_scheduler(const json& v) {
  if (v.is_string() && v.get<std::string>() == "constant_with_warmup") return json("constant");
  return v;
}

std::vector<Alias> build_aliases() {
  return {
      // transformers.TrainingArguments
      {"per_device_train_batch_size", "train.micro_batch_size", {}},
      {"gradient_accumulation_steps", "train.gradient_accumulation_steps", {}},
      {"num_train_epochs", "train.epochs", {}},
      {"max_steps", "train.max_steps", {}},
      {"learning_rate", "train.learning_rate", {}},
      {"lr_scheduler_type", "train.lr_scheduler", translate_scheduler},
      {"warmup_steps", "train.warmup_steps", {}},
      {"warmup_ratio", "train.warmup_ratio", {}},
      {"weight_decay", "train.weight_decay", {}},
      {"max_grad_norm", "train.max_grad_norm", {}},
      {"adam_beta1", "train.adam_beta1", {}},
      {"adam_beta2", "train.adam_beta2", {}},
      {"adam_epsilon", "train.adam_epsilon", {}},
      {"fp16", "train.precision", precision_flag("fp16")},
      {"bf16", "train.precision", precision_flag("bf16")},
      {"gradient_checkpointing", "train.gradient_checkpointing", {}},
      {"optim", "train.optimizer", translate_optim},
      {"seed", "train.seed", {}},
      {"eval_steps", "train.eval_steps", {}},
      {"output_dir", "output.dir", {}},
      {"save_steps", "output.save_steps", {}},
      {"save_total_limit", "output.keep_last", {}},
      {"logging_steps", "output.logging_steps", {}},
      {"report_to", "output.report_to", {}},
      // PEFT LoraConfig
      {"lora_r", "lora.r", {}},
      {"lora_alpha", "lora.alpha", {}},
      {"lora_dropout", "lora.dropout", {}},
      {"target_modules", "lora.target_modules", {}},
      {"lora_target_modules", "lora.target_modules", {}},
      {"use_rslora", "lora.rslora", {}},
      // transformers.BitsAndBytesConfig
      {"bnb_4bit_quant_type", "quantization.quant_type", {}},
      {"bnb_4bit_use_double_quant", "quantization.double_quant", {}},
      {"bnb_4bit_compute_dtype", "quantization.compute_dtype", {}},
      // model / data (transformers scripts, TRL's SFTConfig)
      {"model_name_or_path", "model.path", {}},
      {"max_seq_length", "data.max_seq_length", {}},
      {"max_length", "data.max_seq_length", {}},
      {"packing", "data.packing", {}},
  };
}

}  // namespace

const std::vector<Field>& schema() {
  static const std::vector<Field> table = build_schema();
  return table;
}

const std::vector<Alias>& aliases() {
  static const std::vector<Alias> table = build_aliases();
  return table;
}

const std::vector<std::string>& section_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> out;
    for (const auto& f : schema())
      if (out.empty() || out.back() != f.section()) out.push_back(f.section());
    return out;
  }();
  return names;
}

const Field* find_field(const std::string& key) {
  for (const auto& f : schema())
    if (f.key == key) return &f;
  return nullptr;
}

const Alias* find_alias(const std::string& name) {
  for (const auto& a : aliases())
    if (a.name == name) return &a;
  return nullptr;
}

std::string canonical_enum_value(const Field& f, const std::string& value) {
  const std::string v = to_lower(value);
  if (f.choices == precision_names()) {
    if (v == "bfloat16") return "bf16";
    if (v == "float16" || v == "half") return "fp16";
    if (v == "float32" || v == "float") return "fp32";
  }
  return v;
}

}  // namespace config_detail
}  // namespace qlora
