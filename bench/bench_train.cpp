// Benchmark of the whole training step (the comparison configurations, docs/performance.md):
// `qlora train` as users run it, through the public recipe train::run_training, on the
// Llama-3.2-1B (and 3.1-8B, Qwen3-8B, Qwen2.5-1.5B) architecture with random weights drawn on the
// GPU; r 16 / alpha 32 /
// dropout 0.05 on q,k,v,o, activation checkpointing, bf16, paged 8-bit AdamW, unless a
// configuration (kShapes) says otherwise.
// One JSON object a line on stdout, per configuration (micro, seq):
//   {"bench":"train","system":"qlora","model":"llama-3.2-1b","micro":2,"seq":512,"steps_timed":10,
//    "tokens_per_second":...,"peak_allocated_bytes":...,"peak_reserved_bytes":...,
//    "plan_total_bytes":...,"plan_allocated_bytes":...,"plan_error_pct":...,...}
// or the same keys up to "seq" plus "error" when that configuration failed. Logs go to stderr.
//
//   bench_train [--quick] [--configs NAMES] [--steps N] [--work DIR] [--keep] [--profile PREFIX]
//     --quick     only the first configuration (micro 2, seq 512)
//     --configs   comma-separated names from kShapes (default: 2x512,4x1024,8x2048); also
//                 all-linear-4x1024, no-ckpt-2x512, fp16-4x1024, 8b-2x2048, and
//                 selective-4x1024, selective-8x2048, selective-8b-2x2048 (train.recompute:
//                 selective), auto-2x512, auto-4x1024, auto-8x2048, auto-8b-2x2048 and
//                 auto-8b-2x2048-cap (train.recompute: auto, the last under a 15.45 GB
//                 --memory-cap), no-ckpt-8x2048 and no-ckpt-8b-2x2048; all compared with the
//                 peer's full-checkpointing run of the same shape; qwen3-8b-2x2048 and
//                 qwen2.5-1.5b-4x1024 (the other families: Qwen3's q/k norms, Qwen2's q/k/v
//                 biases; `scripts/gpu.sh --suite families`); phi-4-mini-4x1024 (LoRA on
//                 qkv_proj and o_proj) and gemma-3-4b-4x1024 (`--suite families2`);
//                 real-padded-4x1024, real-packed-4x1024, real-padded-8b-2x2048 and
//                 real-packed-8b-2x2048 (Note [real lengths]); 8b-1x16384, 8b-1x32768 and
//                 offload-8b-1x16384, offload-8b-1x32768, offload-8b-2x2048
//                 (train.offload_checkpoints: true)
//     --steps N   optimizer steps per configuration (default 12); the first kWarmupSteps are
//                 warm-up, excluded from the timing and from the peak
//     --work DIR  where the model directories (config.json + tokenizer), data and outputs go;
//                 default: a new folder under $TMPDIR, removed at the end
//     --keep      also keep each configuration's data, metrics.jsonl and adapter
//
// Note [what is timed and what is the peak]
// Throughput: the trainer's own per-step wall time (metrics.jsonl "step_seconds", each step ends
// with the loss read back to the host, so the GPU work is inside it) and "input_tokens", summed
// over the steps after warm-up. A second figure, wall_tokens_per_second, takes the wall clock
// between two device synchronizations around the same steps (the stop_when hook, which the recipe
// asks after every step), so per-step bookkeeping (metrics lines) is counted too.
// Memory: CUDA caching allocator statistics (what torch.cuda.max_memory_allocated reads in the
// peer), reset when the warm-up ends, so the peak is the steady training step's, the base model,
// adapter, optimizer state and loader already resident, and model loading left out (the peer
// resets after loading too). run_peak_allocated_bytes keeps the whole run, loading included.
// Memory the allocator does not see (managed memory of the paged optimizer, the CUDA context) is
// in neither system's figure; cuBLAS workspaces go through the allocator and are in both.
// The plan: plan::make_plan for the same Config on the h100 preset. plan_total_bytes is what the
// process needs (the fit verdict: CUDA context and fragmentation reserve included);
// plan_allocated_bytes is the allocator's part of it (Note [plan memory model] in
// src/plan/budget.cpp), the figure comparable with the measurement: plan_error_pct is
// (plan_allocated_bytes - peak_allocated_bytes) / peak_allocated_bytes.
#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "bench_common.h"
#include "qlora/config/config.h"
#include "qlora/kernels.h"
#include "qlora/model/decoder_config.h"
#include "qlora/plan/gpu.h"
#include "qlora/plan/plan.h"
#include "qlora/train/demo.h"
#include "qlora/train/run.h"

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr const char* kGpuPreset = "h100";
constexpr int64_t kWarmupSteps = 2;
constexpr int64_t kDefaultSteps = 12;
constexpr int64_t kExtraChars = 16;  // a line is seq + this many bytes, so truncation makes every row seq

// One benchmark configuration. The defaults are r 16 / alpha 32 / dropout 0.05 on
// q,k,v,o, checkpointing, bf16, paged 8-bit AdamW; a variant changes one of them.
struct Shape {
  const char* name;
  const char* model;  // a preset: qlora::model_preset
  int64_t micro, seq;
  bool all_linear = false;
  bool checkpointing = true;
  bool fp16 = false;  // fp16 with the dynamic loss scaler instead of bf16
  // train.recompute: full, selective (Note [selective recompute]) or auto (selective in as many
  // layers as fit; with memory_cap_gb, under that cap, as `qlora train --memory-cap` sets it).
  qlora::Recompute recompute = qlora::Recompute::kFull;
  // The peer's configuration this one is compared with (null: the same name). The peer has
  // no selective recompute: those rows stand beside its full-checkpointing run.
  const char* peer = nullptr;
  double memory_cap_gb = 0;  // > 0: RunOptions::memory_cap_bytes (decimal GB)
  // Note [real lengths]: kFull rows of seq tokens each (the comparison with the peer), or
  // examples of alpaca-like lengths, padded to each micro batch's longest or packed.
  enum class Lengths { kFull, kPadded, kPacked } lengths = Lengths::kFull;
  // train.offload_checkpoints (Note [offloaded checkpoints] in src/layer/offload.cpp); auto keeps
  // it off wherever the row fits the GPU without it.
  qlora::Offload offload = qlora::Offload::kAuto;
};
constexpr auto kSel = qlora::Recompute::kSelective;
constexpr auto kAutoRc = qlora::Recompute::kAuto;
const Shape kShapes[] = {
    {"2x512", "llama-3.2-1b", 2, 512},
    {"4x1024", "llama-3.2-1b", 4, 1024},
    {"8x2048", "llama-3.2-1b", 8, 2048},
    {"all-linear-4x1024", "llama-3.2-1b", 4, 1024, true},
    {"no-ckpt-2x512", "llama-3.2-1b", 2, 512, false, false},
    {"fp16-4x1024", "llama-3.2-1b", 4, 1024, false, true, true},
    {"8b-2x2048", "llama-3.1-8b", 2, 2048},
    {"selective-4x1024", "llama-3.2-1b", 4, 1024, false, true, false, kSel, "4x1024"},
    {"selective-8x2048", "llama-3.2-1b", 8, 2048, false, true, false, kSel, "8x2048"},
    {"selective-8b-2x2048", "llama-3.1-8b", 2, 2048, false, true, false, kSel, "8b-2x2048"},
    // auto under a 15.45 GB --memory-cap: the plan picks how many layers keep gate/up. The cap is
    // where the peak stays under the memory target for this shape, 0.7 × the peer's smaller peak
    // (17.53 GB, measured on 2026-12-02 in every run up to bench/results/
    // 2026-12-02-h200-one-read-per-step): 12.27 GB allocated. The plan's total adds the CUDA
    // context and its fragmentation reserve, and auto leaves 5% of the cap free: 16 layers (total
    // 14.65 GB, allocated 12.35 GB; the plan over-counted this row by 0.9% in that folder's runs,
    // which measured 12.06 GB with 15 layers before the attention half shed the q|k|v GEMM output
    // and n1; 17 layers would be 14.94 GB and 12.58 GB).
    {"auto-8b-2x2048-cap", "llama-3.1-8b", 2, 2048, false, true, false, kAutoRc, "8b-2x2048", 15.45},
    {"auto-8x2048", "llama-3.2-1b", 8, 2048, false, true, false, kAutoRc, "8x2048"},
    // auto on the whole GPU (an H200 holds every layer whole at these shapes).
    {"auto-2x512", "llama-3.2-1b", 2, 512, false, true, false, kAutoRc, "2x512"},
    {"auto-4x1024", "llama-3.2-1b", 4, 1024, false, true, false, kAutoRc, "4x1024"},
    {"auto-8b-2x2048", "llama-3.1-8b", 2, 2048, false, true, false, kAutoRc, "8b-2x2048"},
    // Nothing recomputed, beside the peer's checkpointed run of the shape: the floor of the
    // recompute lever (what train.recompute can gain at most, and at what memory).
    {"no-ckpt-8x2048", "llama-3.2-1b", 8, 2048, false, false, false, qlora::Recompute::kFull, "8x2048"},
    {"no-ckpt-8b-2x2048", "llama-3.1-8b", 2, 2048, false, false, false, qlora::Recompute::kFull, "8b-2x2048"},
    // The other families at the default settings: the model directory's config.json says the
    // family (write_llama_config), and the random weights include Qwen2's q/k/v biases and
    // Qwen3's q/k norms (model::decoder_weight_shapes); both run through the fused layer.
    {"qwen3-8b-2x2048", "qwen3-8b", 2, 2048},
    {"qwen2.5-1.5b-4x1024", "qwen2.5-1.5b", 4, 1024},
    {"phi-4-mini-4x1024", "phi-4-mini", 4, 1024},  // LoRA on qkv_proj and o_proj: q, k, v, o
    {"gemma-3-4b-4x1024", "gemma-3-4b", 4, 1024},
    // Note [real lengths]: the same shapes on examples of alpaca-like lengths, beside the full rows
    // (tokens/s counts real tokens, never padding).
    {"real-padded-4x1024", "llama-3.2-1b", 4, 1024, false, true, false, qlora::Recompute::kFull, "4x1024", 0,
     Shape::Lengths::kPadded},
    {"real-packed-4x1024", "llama-3.2-1b", 4, 1024, false, true, false, qlora::Recompute::kFull, "4x1024", 0,
     Shape::Lengths::kPacked},
    {"real-padded-8b-2x2048", "llama-3.1-8b", 2, 2048, false, true, false, qlora::Recompute::kFull, "8b-2x2048", 0,
     Shape::Lengths::kPadded},
    {"real-packed-8b-2x2048", "llama-3.1-8b", 2, 2048, false, true, false, qlora::Recompute::kFull, "8b-2x2048", 0,
     Shape::Lengths::kPacked},
    // Long context, one sequence (the 8B's rows measured beside Unsloth on 2026-12-07), and the
    // same with each layer's checkpoint in host memory; the 2 × 2048 row offloaded too.
    {"8b-1x16384", "llama-3.1-8b", 1, 16384},
    {"8b-1x32768", "llama-3.1-8b", 1, 32768},
    {"offload-8b-1x16384", "llama-3.1-8b", 1, 16384, false, true, false, qlora::Recompute::kFull, "8b-1x16384", 0,
     Shape::Lengths::kFull, qlora::Offload::kOn},
    {"offload-8b-1x32768", "llama-3.1-8b", 1, 32768, false, true, false, qlora::Recompute::kFull, "8b-1x32768", 0,
     Shape::Lengths::kFull, qlora::Offload::kOn},
    {"offload-8b-2x2048", "llama-3.1-8b", 2, 2048, false, true, false, qlora::Recompute::kFull, "8b-2x2048", 0,
     Shape::Lengths::kFull, qlora::Offload::kOn},
};
constexpr int kDefaultShapes = 3;  // without --configs: the three micro × seq points

struct Args {
  bool quick = false;
  bool keep = false;
  int64_t steps = kDefaultSteps;
  std::string work;
  std::string profile;  // Kineto (CPU + CUDA) trace of the timed steps of each configuration
  std::vector<Shape> shapes;
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr, "bench_train: %s\nusage: bench_train [--quick] [--configs NAMES] [--steps N (> %lld)] [--work DIR] [--keep] [--profile PREFIX]\n",
               why.c_str(), static_cast<long long>(kWarmupSteps));
  std::exit(2);
}

// Kineto with CPU ops (and their input shapes: which tensor an op copied) and CUDA activity
// (CUPTI), as torch.profiler(record_shapes=True) records them.
void start_profiler() {
  using torch::profiler::impl::ActivityType;
  const torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO,
                                                     /*report_input_shapes=*/true);
  const std::set<ActivityType> activities = {ActivityType::CPU, ActivityType::CUDA};
  torch::autograd::profiler::prepareProfiler(config, activities);
  torch::autograd::profiler::enableProfiler(config, activities);
}

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--quick") {
      a.quick = true;
    } else if (arg == "--keep") {
      a.keep = true;
    } else if (arg == "--configs") {
      if (i + 1 >= argc) usage("--configs needs a value");
      std::string list = argv[++i];
      for (size_t pos = 0; pos <= list.size();) {
        const size_t comma = std::min(list.find(',', pos), list.size());
        const std::string name = list.substr(pos, comma - pos);
        pos = comma + 1;
        if (name.empty()) continue;
        bool found = false;
        for (const Shape& s : kShapes)
          if (name == s.name) a.shapes.push_back(s), found = true;
        if (!found) {
          std::string known;
          for (const Shape& s : kShapes) known += std::string(known.empty() ? "" : ", ") + s.name;
          usage("--configs: unknown configuration " + name + " (known: " + known + ")");
        }
      }
    } else if (arg == "--steps" || arg == "--work" || arg == "--profile") {
      if (i + 1 >= argc) usage(arg + " needs a value");
      const std::string v = argv[++i];
      if (arg == "--work") {
        a.work = v;
        continue;
      }
      if (arg == "--profile") {
        a.profile = v;
        continue;
      }
      char* end = nullptr;
      a.steps = std::strtoll(v.c_str(), &end, 10);
      if (end == v.c_str() || *end != '\0') usage("--steps expects an integer, got " + v);
    } else {
      usage("unknown argument " + arg);
    }
  }
  if (a.shapes.empty()) a.shapes.assign(kShapes, kShapes + kDefaultShapes);
  if (a.quick) a.shapes.resize(1);
  if (a.steps <= kWarmupSteps) usage("--steps must exceed the " + std::to_string(kWarmupSteps) + " warm-up steps");
  return a;
}

// `lines` JSONL text lines of random lowercase letters and spaces, each as long as length(rng)
// says: the demo tokenizer without merges makes one token per byte.
template <typename LengthFn>
void write_random_text(const std::string& path, int64_t lines, uint64_t seed, LengthFn length) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> pick(0, 26);  // 26: a space
  std::ofstream f(path, std::ios::trunc);
  for (int64_t l = 0; l < lines; ++l) {
    std::string text(static_cast<size_t>(length(rng)), ' ');
    for (auto& c : text) {
      const int k = pick(rng);
      c = k == 26 ? ' ' : static_cast<char>('a' + k);
    }
    f << json{{"text", text}}.dump() << '\n';
  }
  if (!f) throw std::runtime_error("could not write " + path);
}

// Full rows: `chars` characters each, so each row tokenizes to >= chars tokens.
void write_text_data(const std::string& path, int64_t lines, int64_t chars, uint64_t seed) {
  write_random_text(path, lines, seed, [chars](std::mt19937_64&) { return chars; });
}

// Note [real lengths]
// Full rows measure the causal fast path only; users train on examples of many lengths. These
// lines have alpaca-like lengths (in characters, the demo tokenizer's tokens): log-normal with
// median 180 and sigma 0.8 (mean about 250: many short answers, a long tail), cut to
// [16, max_chars]. Padded, a micro batch is as long as its longest row; packed, rows of
// max_seq_length hold several examples (data.packing).
void write_real_length_data(const std::string& path, int64_t lines, int64_t max_chars, uint64_t seed) {
  std::lognormal_distribution<double> length(std::log(180.0), 0.8);
  write_random_text(path, lines, seed, [&](std::mt19937_64& rng) {
    return std::clamp<int64_t>(static_cast<int64_t>(length(rng)), 16, max_chars);
  });
}

qlora::Config make_config(const std::string& model_dir, const std::string& data_path, const std::string& out_dir,
                          const Shape& s, int64_t steps) {
  qlora::Config cfg = qlora::default_config();
  cfg.source = "<bench_train>";
  cfg.model.path = model_dir;
  cfg.lora.r = 16;
  cfg.lora.alpha = 32.0;
  cfg.lora.dropout = 0.05;
  cfg.lora.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};
  if (qlora::model_preset(s.model).pieces.fused_projections) cfg.lora.target_modules = {"qkv_proj", "o_proj"};
  if (s.all_linear) cfg.lora.target_modules = {"all-linear"};
  cfg.data.path = data_path;
  cfg.data.format = qlora::DataFormat::kText;
  cfg.data.max_seq_length = s.seq;
  cfg.data.packing = s.lengths == Shape::Lengths::kPacked;
  cfg.train.micro_batch_size = s.micro;
  cfg.train.gradient_accumulation_steps = 1;
  cfg.train.max_steps = steps;
  cfg.train.precision = s.fp16 ? qlora::Precision::kFp16 : qlora::Precision::kBf16;
  cfg.train.gradient_checkpointing = s.checkpointing;
  cfg.train.recompute = s.recompute;
  cfg.train.offload_checkpoints = s.offload;
  cfg.train.optimizer = qlora::OptimizerKind::kPagedAdamW8bit;
  cfg.train.eval_steps = 0;
  cfg.output.dir = out_dir;
  cfg.output.save_steps = steps + 1000;  // only the final save, after the timed steps
  cfg.output.keep_last = 1;
  cfg.output.logging_steps = 1;
  return cfg;
}

struct Timed {
  int64_t steps = 0;
  int64_t tokens = 0;
  double seconds = 0.0;
  double mean_loss = 0.0;
};

// The train lines of metrics.jsonl after warm-up: tokens and the trainer's step seconds.
Timed read_metrics(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error("no metrics file " + path);
  Timed t;
  std::string line;
  while (std::getline(f, line)) {
    if (line.empty()) continue;
    const json j = json::parse(line);
    if (j.value("type", "") != "train" || j.at("step").get<int64_t>() <= kWarmupSteps) continue;
    ++t.steps;
    t.tokens += j.at("input_tokens").get<int64_t>();
    t.seconds += j.at("step_seconds").get<double>();
    t.mean_loss += j.at("loss").get<double>();
  }
  if (t.steps > 0) t.mean_loss /= static_cast<double>(t.steps);
  return t;
}

int64_t allocated_peak() {
  return c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].peak;
}
int64_t reserved_peak() {
  return c10::cuda::CUDACachingAllocator::getDeviceStats(0).reserved_bytes[0].peak;
}

json run_one(const Shape& s, const Args& args, const fs::path& work, const fs::path& model_dir,
             const qlora::DecoderConfig& shape, const qlora::plan::GpuSpec& gpu, const qlora::plan::GpuSpec& time_gpu) {
  const std::string tag = s.name;
  const fs::path data = work / ("data_" + tag + ".jsonl");
  const fs::path out = work / ("out_" + tag);
  fs::remove_all(out);
  // One row per micro batch per step, plus a spare batch (the loader never runs dry mid-window).
  const auto seed = static_cast<uint64_t>(s.micro * 100003 + s.seq);
  if (s.lengths == Shape::Lengths::kFull) {
    write_text_data(data.string(), (args.steps + 1) * s.micro, s.seq + kExtraChars, seed);
  } else {
    // Enough lines for every step's rows: one a row padded, about seq / 250 a row packed (x 1.5).
    const int64_t rows = (args.steps + 1) * s.micro;
    write_real_length_data(data.string(),
                           s.lengths == Shape::Lengths::kPacked ? rows * s.seq * 3 / 500 + 16 : rows, s.seq, seed);
  }
  qlora::Config cfg = make_config(model_dir.string(), data.string(), out.string(), s, args.steps);

  // Note [what is timed and what is the peak]: the hook fires after each step with step + 1.
  int64_t run_peak_alloc = 0, run_peak_reserved = 0;
  Clock::time_point timed_start{}, timed_end{};
  qlora::train::RunOptions options;
  options.device = "cuda";
  options.evaluate_at_start = false;
  options.handle_signals = false;
  options.random_weights = true;  // the directory holds config.json only: weights drawn on the GPU
  options.progress_bar = false;
  options.memory_cap_bytes = s.memory_cap_gb * 1e9;
  options.stop_when = [&](int64_t next_step, int64_t micro_done) {
    if (micro_done != 0) return false;
    if (next_step == kWarmupSteps + 1) {
      c10::cuda::device_synchronize();
      run_peak_alloc = allocated_peak();
      run_peak_reserved = reserved_peak();
      c10::cuda::CUDACachingAllocator::resetPeakStats(0);
      if (!args.profile.empty()) start_profiler();
      timed_start = Clock::now();
    } else if (next_step == args.steps + 1) {
      c10::cuda::device_synchronize();
      timed_end = Clock::now();
    }
    return false;
  };

  // The caching allocator initializes with the first CUDA tensor; its stats
  // calls throw ("Invalid device argument") before that.
  (void)at::empty({1}, at::TensorOptions().device(at::kCUDA));
  c10::cuda::CUDACachingAllocator::emptyCache();
  c10::cuda::CUDACachingAllocator::resetPeakStats(0);
  const auto result = qlora::train::run_training(cfg, options);
  c10::cuda::device_synchronize();
  // The plan of what ran: train.recompute: auto as the run resolved it.
  cfg.train.recompute = result.recompute;
  cfg.train.selective_layers = result.selective_layers;
  cfg.train.no_recompute_layers = result.no_recompute_layers;
  const qlora::plan::Plan plan = qlora::plan::make_plan(cfg, shape, &gpu, 1);
  const qlora::plan::TimeEstimate time = qlora::plan::make_plan(cfg, shape, &time_gpu, 1).time;
  if (!args.profile.empty()) {
    // The trace spans the timed steps and the final save (metrics.jsonl says how long each took).
    torch::autograd::profiler::disableProfiler()->save(args.profile + "_" + tag + ".json");
  }
  const int64_t peak_alloc = allocated_peak();      // since the warm-up ended (the final save included)
  const int64_t peak_reserved = reserved_peak();
  const Timed t = read_metrics(result.metrics_path);
  if (t.steps == 0 || t.seconds <= 0) throw std::runtime_error("no timed steps in " + result.metrics_path);
  const double wall = std::chrono::duration<double>(timed_end - timed_start).count();

  json j = {{"bench", "train"},
            {"system", "qlora"},
            {"config", s.name},
            {"model", s.model},
            {"micro", s.micro},
            {"seq", s.seq},
            {"precision", s.fp16 ? "fp16" : "bf16"},
            {"gradient_checkpointing", s.checkpointing},
            {"recompute", !s.checkpointing ? std::string("none") : std::string(qlora::to_string(s.recompute))},
            {"recompute_as_run", plan.recompute},
            {"selective_layers", plan.selective_layers},
            {"no_recompute_layers", plan.no_recompute_layers},
            {"offload", plan.offload},
            {"offload_host_bytes", static_cast<int64_t>(plan.offload_host_bytes)},
            {"memory_cap_bytes", static_cast<int64_t>(s.memory_cap_gb * 1e9)},
            {"peer_config", s.peer ? s.peer : s.name},
            {"optimizer", "paged_adamw_8bit"},
            {"lora", s.all_linear ? "r16 a32 all-linear" : "r16 a32 q,k,v,o"},
            {"steps_timed", t.steps},
            {"tokens_timed", t.tokens},
            {"tokens_per_second", static_cast<double>(t.tokens) / t.seconds},
            {"step_seconds_mean", t.seconds / static_cast<double>(t.steps)},
            {"wall_tokens_per_second", wall > 0 ? static_cast<double>(t.tokens) / wall : 0.0},
            {"loss_mean_timed", t.mean_loss},
            {"peak_allocated_bytes", peak_alloc},
            {"peak_reserved_bytes", peak_reserved},
            {"run_peak_allocated_bytes", std::max(run_peak_alloc, peak_alloc)},
            {"run_peak_reserved_bytes", std::max(run_peak_reserved, peak_reserved)},
            {"plan_total_bytes", static_cast<int64_t>(plan.total_bytes)},
            {"plan_allocated_bytes", static_cast<int64_t>(plan.allocated_bytes)},
            {"plan_error_pct", peak_alloc > 0 ? 100.0 * (plan.allocated_bytes - static_cast<double>(peak_alloc)) /
                                                    static_cast<double>(peak_alloc)
                                              : 0.0},
            {"plan_gpu", kGpuPreset}};
  if (time.available) {
    j["plan_time_gpu"] = time_gpu.name;
    j["plan_tokens_per_second"] = time.tokens_per_second;
    j["plan_time_error_pct"] = 100.0 * (time.tokens_per_second / j["tokens_per_second"].get<double>() - 1.0);
    j["plan_host_bound"] = time.host_bound;
  }
  if (!args.keep) {
    std::error_code ec;
    fs::remove_all(out, ec);
    fs::remove(data, ec);
  }
  return j;
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse_args(argc, argv);
  qlora::kernels::DeviceInfo dev[1];
  if (!qlora::bench::find_gpu("train", dev[0])) return 0;
  std::printf("%s\n", json{{"bench", "train_device"},
                           {"system", "qlora"},
                           {"name", dev[0].name},
                           {"cc", std::to_string(dev[0].cc_major) + "." + std::to_string(dev[0].cc_minor)},
                           {"steps", args.steps},
                           {"warmup_steps", kWarmupSteps}}
                          .dump()
                          .c_str());
  std::fflush(stdout);

  const fs::path work = args.work.empty()
                            ? fs::temp_directory_path() / ("qlora-bench-train-" + std::to_string(::getpid()))
                            : fs::path(args.work);
  int failures = 0;
  try {
    const qlora::plan::GpuSpec gpu = qlora::plan::resolve_gpu(kGpuPreset);
    // The plan's time estimate is for the GPU the bench runs on (its preset's throughput, Note
    // [plan time model]); the memory plan stays on kGpuPreset, the H100 its rows were first checked on.
    const qlora::plan::GpuSpec time_gpu = qlora::plan::gpu_from_device(
        dev[0].name, static_cast<double>(dev[0].total_bytes), dev[0].cc_major, dev[0].cc_minor);
    for (const Shape& s : args.shapes) {
      json j;
      try {
        // config.json (the preset's family: model_type, biases, q/k norms) and a tokenizer
        // only: RunOptions::random_weights draws the weights on the GPU (seconds, where
        // writing an 8B checkpoint would take minutes and 32 GB).
        const qlora::DecoderConfig shape = qlora::model_preset(s.model);
        const fs::path model_dir = work / (std::string("model-") + s.model);
        if (!fs::exists(model_dir / "config.json") || !fs::exists(model_dir / "tokenizer.json")) {
          // Byte-level, no merges: vocabulary 261 (< the model's; ids stay in range), its
          // bos/eos in config.json.
          qlora::train::write_config_with_demo_tokenizer(model_dir.string(), shape);
        }
        j = run_one(s, args, work, model_dir, shape, gpu, time_gpu);
      } catch (const std::exception& e) {
        ++failures;
        j = {{"bench", "train"}, {"system", "qlora"}, {"config", s.name}, {"model", s.model},
             {"micro", s.micro}, {"seq", s.seq},      {"error", e.what()}};
      }
      std::printf("%s\n", j.dump(-1, ' ', false, json::error_handler_t::replace).c_str());
      std::fflush(stdout);
      c10::cuda::CUDACachingAllocator::emptyCache();
    }
  } catch (const std::exception& e) {
    ++failures;
    std::printf("%s\n", json{{"bench", "train"}, {"system", "qlora"}, {"error", e.what()}}
                            .dump(-1, ' ', false, json::error_handler_t::replace)
                            .c_str());
  }
  if (!args.keep && args.work.empty()) {
    std::error_code ec;
    fs::remove_all(work, ec);
  }
  return failures == 0 ? 0 : 1;
}
