// render_text / render_json: a Plan for people and for programs.
#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <sstream>

#include "constants.h"
#include "format.h"
#include "qlora/common/text.h"
#include "qlora/plan/plan.h"

namespace qlora::plan {
namespace {

using fmt::commas;
using fmt::fixed;
using fmt::gib;

std::string pad_right(const std::string& s, size_t width) {
  return s.size() >= width ? s : s + std::string(width - s.size(), ' ');
}
std::string pad_left(const std::string& s, size_t width) {
  return s.size() >= width ? s : std::string(width - s.size(), ' ') + s;
}

}  // namespace

// ---------------------------------------------------------------- rendering

std::string recompute_text(const std::string& mode, int64_t layers, int64_t selective_layers,
                           int64_t no_recompute_layers) {
  const int64_t L = layers, whole = no_recompute_layers;
  if (mode == "none") return "none (no activation checkpointing)";
  if (whole >= L) return "none: every layer kept whole (train.no_recompute_layers), as without checkpointing";
  const int64_t gate_up = std::max<int64_t>(0, selective_layers - whole);
  if (whole == 0)
    return gate_up > 0 ? "selective: gate/up outputs kept in " + std::to_string(gate_up) + " of " + std::to_string(L) +
                             " layers, the rest recomputed"
                       : "full: each layer recomputed in backward";
  std::string out = "the last " + std::to_string(whole) + " of " + std::to_string(L) +
                    " layers kept whole (nothing recomputed)";
  if (gate_up > 0) out += ", gate/up outputs kept in the " + std::to_string(gate_up) + " below them";
  if (L - whole - gate_up > 0) out += ", " + std::to_string(L - whole - gate_up) + " recomputed in full";
  return out;
}

std::string render_text(const Plan& p) {
  std::ostringstream o;
  const auto& m = p.model;
  o << "qlora plan" << (p.config_source.empty() ? "" : " for " + p.config_source) << "\n\n";
  o << "  model       " << p.model_name << ": " << commas(p.total_params) << " parameters, "
    << m.num_hidden_layers << " layers, hidden " << m.hidden_size << ", " << m.num_attention_heads << " heads / "
    << m.num_key_value_heads << " kv, vocab " << commas(m.vocab_size)
    << (m.tie_word_embeddings ? ", tied lm_head" : "") << "\n";
  o << "  LoRA        " << commas(p.lora_params) << " trainable parameters on " << join(p.lora_targets, ",")
    << " (" << fixed(100.0 * double(p.lora_params) / double(p.total_params), 2) << "% of the model)\n";
  o << "  batch       effective batch = micro × accumulation × GPUs = " << p.batch.formula << " sequences of up to "
    << commas(p.seq_length) << " tokens (" << commas(p.batch.total * p.seq_length) << " tokens per step)\n";
  o << "  precision   " << p.precision.message << "\n";
  o << "  recompute   "
    << recompute_text(p.recompute, p.model.num_hidden_layers, p.selective_layers, p.no_recompute_layers) << "\n";
  if (p.offload)
    o << "  offload     each layer's checkpoint waits in pinned host memory until its backward: "
      << gib(p.offload_host_bytes) << " of host memory (train.offload_checkpoints)\n";
  if (p.gpu)
    o << "  GPU         " << (p.gpu->from_device ? "this machine: " : "") << p.gpu->name << ", "
      << gib(p.gpu->memory_bytes) << " usable" << (p.gpu->note.empty() ? "" : " (" + p.gpu->note + ")") << "\n";
  else
    o << "  GPU         none given: no fit verdict (pass --gpu " << join(gpu_preset_names(), "|")
      << "|this|<N>GiB)\n";
  if (!p.this_machine.empty() && !(p.gpu && p.gpu->from_device)) o << "              " << p.this_machine << "\n";

  o << "\nGPU memory per process\n";
  size_t width = 5;
  for (const auto& c : p.components) width = std::max(width, c.label.size());
  for (const auto& c : p.components) {
    o << "  " << pad_right(c.label, width) << "  " << pad_left(format_gib(c.bytes), 7) << " GiB  " << c.formula << "\n";
    if (!c.detail.empty()) o << "  " << std::string(width + 15, ' ') << c.detail << "\n";
  }
  const auto dom = std::find_if(p.components.begin(), p.components.end(),
                                [&](const Component& c) { return c.key == p.dominant; });
  o << "  " << std::string(width + 13, '-') << "\n";
  o << "  " << pad_right("total", width) << "  " << pad_left(format_gib(p.total_bytes), 7) << " GiB  (" << fixed(p.total_bytes / 1e9, 2) << " GB); largest: " << dom->label
    << ", " << fixed(100.0 * dom->bytes / p.total_bytes, 0) << "%\n";
  o << "  " << pad_right("allocated", width) << "  " << pad_left(format_gib(p.allocated_bytes), 7) << " GiB  ("
    << fixed(p.allocated_bytes / 1e9, 2) << " GB): the caching allocator's peak (max_memory_allocated), the total "
    << "less the CUDA context and the fragmentation reserve\n";

  if (p.gpu) {
    o << "\n";
    if (p.fits)
      o << "FITS on " << p.gpu->name << ": " << gib(p.total_bytes) << " of " << gib(p.gpu->memory_bytes) << ", "
        << gib(p.headroom_bytes) << " free\n";
    else
      o << "DOES NOT FIT on " << p.gpu->name << ": " << gib(p.total_bytes) << " of " << gib(p.gpu->memory_bytes)
        << ", " << gib(-p.headroom_bytes) << " over\n";
    if (p.largest_micro_batch > 0)
      o << "largest micro batch that fits at " << p.seq_length << " tokens: " << p.largest_micro_batch
        << (p.largest_micro_batch >= kMaxAdviceMicroBatch ? " or more" : "") << "\n";
    else
      o << "not even micro batch 1 fits at " << p.seq_length << " tokens\n";
  }
  if (!p.advice.empty()) {
    o << "\nadvice\n";
    for (size_t i = 0; i < p.advice.size(); ++i) o << "  " << i + 1 << ". " << p.advice[i].text << "\n";
  }
  o << "\ntime\n";
  if (p.time.available) {
    o << "  ~" << fixed(p.time.seconds_per_step, 2) << " s per optimizer step, ~" << fixed(p.time.hours_per_1000_steps, 1)
      << " h per 1000 steps, ~" << commas(int64_t(p.time.tokens_per_second)) << " tokens/s\n";
    if (p.time.train_examples > 0)
      o << "  " << commas(p.time.train_examples) << " training examples / " << p.batch.total << " per step = "
        << commas(p.time.steps_per_epoch) << " steps per epoch (~" << fixed(p.time.hours_per_epoch, 1)
        << " h); the run: " << commas(p.time.total_steps) << " steps, ~" << fixed(p.time.total_hours, 1) << " h\n";
    o << "  " << p.time.formula << "\n  " << p.time.note << "\n";
  } else {
    o << "  " << p.time.why_unavailable << "\n";
  }
  if (!p.notes.empty()) {
    o << "\nnotes\n";
    for (const auto& n : p.notes) o << "  - " << n << "\n";
  }
  return o.str();
}

std::string render_json(const Plan& p) {
  using nlohmann::ordered_json;
  ordered_json j;
  j["config"] = p.config_source;
  j["model"] = {{"name", p.model_name},
                {"parameters", p.total_params},
                {"layers", p.model.num_hidden_layers},
                {"hidden_size", p.model.hidden_size},
                {"vocab_size", p.model.vocab_size},
                {"tie_word_embeddings", p.model.tie_word_embeddings}};
  j["lora"] = {{"trainable_parameters", p.lora_params}, {"target_modules", p.lora_targets}};
  j["effective_batch"] = {{"micro_batch_size", p.batch.micro},
                          {"gradient_accumulation_steps", p.batch.accumulation},
                          {"world_size", p.batch.world},
                          {"total", p.batch.total},
                          {"formula", p.batch.formula},
                          {"seq_length", p.seq_length},
                          {"tokens_per_step", p.batch.total * p.seq_length}};
  j["recompute"] = {{"mode", p.recompute},
                    {"selective_layers", p.selective_layers},
                    {"no_recompute_layers", p.no_recompute_layers}};
  j["offload"] = {{"enabled", p.offload}, {"host_bytes", int64_t(std::llround(p.offload_host_bytes))}};
  j["precision"] = {{"requested", p.precision.requested},
                    {"resolved", p.precision.resolved},
                    {"supported", p.precision.supported},
                    {"message", p.precision.message}};
  ordered_json comps = ordered_json::array();
  for (const auto& c : p.components) {
    ordered_json e = {{"key", c.key}, {"label", c.label}, {"bytes", int64_t(std::llround(c.bytes))},
                      {"gib", std::round(c.bytes / kGiB * 1000) / 1000}, {"formula", c.formula}};
    if (!c.detail.empty()) e["detail"] = c.detail;
    if (c.pageable_bytes > 0) e["pageable_bytes"] = int64_t(std::llround(c.pageable_bytes));
    e["in_allocator"] = c.in_allocator;
    comps.push_back(e);
  }
  j["memory"] = {{"components", comps},
                 {"total_bytes", int64_t(std::llround(p.total_bytes))},
                 {"total_gib", std::round(p.total_bytes / kGiB * 1000) / 1000},
                 {"allocated_bytes", int64_t(std::llround(p.allocated_bytes))},
                 {"dominant", p.dominant}};
  if (p.gpu) {
    j["gpu"] = {{"name", p.gpu->name},
                {"memory_bytes", int64_t(std::llround(p.gpu->memory_bytes))},
                {"compute_capability", p.gpu->has_compute_capability()
                                           ? std::to_string(p.gpu->cc_major) + "." + std::to_string(p.gpu->cc_minor)
                                           : ""},
                {"from_device", p.gpu->from_device}};
    j["fits"] = p.fits;
    j["headroom_bytes"] = int64_t(std::llround(p.headroom_bytes));
    j["largest_micro_batch"] = p.largest_micro_batch;
  } else {
    j["gpu"] = nullptr;
    j["fits"] = nullptr;
  }
  if (p.this_machine.empty())
    j["this_machine"] = nullptr;
  else
    j["this_machine"] = p.this_machine;
  ordered_json adv = ordered_json::array();
  for (const auto& a : p.advice) {
    ordered_json e = {{"kind", a.kind}, {"text", a.text}};
    if (a.micro_batch_size > 0)
      e["settings"] = {{"micro_batch_size", a.micro_batch_size},
                       {"gradient_accumulation_steps", a.gradient_accumulation_steps},
                       {"max_seq_length", a.max_seq_length},
                       {"lora_r", a.lora_r},
                       {"gradient_checkpointing", a.gradient_checkpointing},
                       {"total_bytes", int64_t(std::llround(a.total_bytes))},
                       {"fits", a.fits}};
    adv.push_back(e);
  }
  j["advice"] = adv;
  if (p.time.available)
    j["time"] = {{"seconds_per_step", p.time.seconds_per_step},
                 {"hours_per_1000_steps", p.time.hours_per_1000_steps},
                 {"tokens_per_second", p.time.tokens_per_second},
                 {"flops_per_token", p.time.flops_per_token},
                 {"attention_flops_per_token", p.time.attention_flops_per_token},
                 {"peak_tflops", p.time.peak_tflops},
                 {"utilisation", p.time.utilisation},
                 {"gemm_seconds_per_step", p.time.gemm_seconds_per_step},
                 {"attention_seconds_per_step", p.time.attention_seconds_per_step},
                 {"memory_bytes_per_step", p.time.memory_bytes_per_step},
                 {"memory_seconds_per_step", p.time.memory_seconds_per_step},
                 {"dequant_seconds_per_step", p.time.dequant_seconds_per_step},
                 {"kernels_per_step", p.time.kernels_per_step},
                 {"gap_seconds_per_step", p.time.gap_seconds_per_step},
                 {"host_seconds_per_step", p.time.host_seconds_per_step},
                 {"offload_seconds_per_step", p.time.offload_seconds_per_step},
                 {"host_bound", p.time.host_bound},
                 {"train_examples", p.time.train_examples},
                 {"steps_per_epoch", p.time.steps_per_epoch},
                 {"total_steps", p.time.total_steps},
                 {"hours_per_epoch", p.time.hours_per_epoch},
                 {"total_hours", p.time.total_hours},
                 {"note", p.time.note}};
  else
    j["time"] = {{"available", false}, {"why", p.time.why_unavailable}};
  j["notes"] = p.notes;
  return j.dump(2);
}

}  // namespace qlora::plan
