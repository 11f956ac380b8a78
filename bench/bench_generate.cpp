// Benchmark of decoding, the path `qlora generate` / `qlora chat` and evaluation take
// (train::generate): the Llama-3.1-8B architecture with random weights drawn on the GPU, its
// projections NF4 (double quantization), LoRA r 16 / alpha 32 on q,k,v,o with B drawn (so the
// adapter computes something), bf16; random prompts of 256 tokens, 256 new tokens, greedy, no stop
// token; batch 1 and 8. scripts/bench_peer_generate.py times transformers + PEFT + bitsandbytes
// the same way.
// One JSON object a line on stdout, per mode and batch:
//   {"bench":"generate","system":"qlora","model":"llama-3.1-8b","mode":"graph","batch":1,
//    "prompt":256,"new_tokens":256,"prefill_seconds":...,"decode_seconds":...,
//    "decode_tokens_per_second":...,"weight_bytes_per_step":...,"copy_bytes_per_second":...,
//    "bound_tokens_per_second":...,"fraction_of_bound":...,"peak_allocated_bytes":...}
//
//   bench_generate [--model PRESET] [--batches 1,8] [--prompt N] [--new N] [--modes graph,eager,dequant]
//     modes: graph    the default: the NF4 GEMV and the decoding step replayed as a CUDA graph
//            eager    the GEMV, every step's kernels launched one by one
//            dequant  neither: each step dequantizes every weight and multiplies (QLORA_NF4_GEMV=0)
//
// Note [decode timing and the bandwidth bound]
// A run of max_new_tokens = 1 is the prefill (and the first token); the full run minus it is the
// decoding of the other new_tokens - 1 tokens a row: decode_tokens_per_second = batch ×
// (new_tokens - 1) / decode_seconds, each run the median of three after a warm-up. A decoding
// step reads every frozen weight once, whatever the batch: the NF4 projections (4-bit codes, the
// 8-bit block scales and their fp32 second-level scales) and the bf16 lm_head.
// weight_bytes_per_step counts exactly those; the norms, the LoRA matrices and the KV cache
// come on top (the cache, read whole by the graph's fixed-shape attention: about 1% of the
// weights at batch 1 and 6% at batch 8 for the 8B at 512 positions), so the bound is a little
// optimistic. Each generate call captures its graph once, at its second step: the decoding time
// includes that capture, as every call a user makes does. copy_bytes_per_second is a
// device-to-device copy of 2 GiB measured in the same run, counted as bytes read plus bytes
// written (what the GPU's memory moves); bound_tokens_per_second = batch ×
// copy_bytes_per_second / weight_bytes_per_step.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "bench_common.h"
#include "qlora/config/config.h"
#include "qlora/kernels.h"
#include "qlora/lora/lora.h"
#include "qlora/model/decoder_config.h"
#include "qlora/quant/linear4bit.h"
#include "qlora/quant/nf4_cuda.h"
#include "qlora/train/generate.h"
#include "qlora/train/setup.h"

namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

struct Args {
  std::string model = "llama-3.1-8b";
  std::vector<int64_t> batches = {1, 8};
  int64_t prompt = 256, new_tokens = 256;
  std::vector<std::string> modes = {"graph", "eager", "dequant"};
};

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "bench_generate: %s needs a value\n", k.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (k == "--model") {
      a.model = value();
    } else if (k == "--batches") {
      a.batches.clear();
      for (const auto& b : split(value())) a.batches.push_back(std::stoll(b));
    } else if (k == "--prompt") {
      a.prompt = std::stoll(value());
    } else if (k == "--new") {
      a.new_tokens = std::stoll(value());
    } else if (k == "--modes") {
      a.modes = split(value());
    } else {
      std::fprintf(stderr, "bench_generate: unknown option %s (see the comment at the top of bench/bench_generate.cpp)\n",
                   k.c_str());
      std::exit(2);
    }
  }
  return a;
}

// Bytes a decoding step reads of the frozen weights (Note [decode timing and the bandwidth bound]).
double weight_bytes_per_step(const qlora::DecoderConfig& c) {
  double projections = 0;
  for (const auto& s : qlora::decoder_linear_shapes(c)) projections += static_cast<double>(s.out_features * s.in_features);
  projections *= static_cast<double>(c.num_hidden_layers);
  const double nf4 = projections / 2 + projections / 64 + projections / 64 / 256 * 4;
  return nf4 + static_cast<double>(c.vocab_size * c.hidden_size) * 2;
}

double copy_bytes_per_second() {
  const int64_t n = int64_t{2} << 30;
  at::Tensor src = at::empty({n}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA));
  at::Tensor dst = at::empty_like(src);
  src.fill_(1);
  dst.copy_(src);
  c10::cuda::device_synchronize();
  const int reps = 10;
  const auto t0 = Clock::now();
  for (int i = 0; i < reps; ++i) dst.copy_(src);
  c10::cuda::device_synchronize();
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  return 2.0 * static_cast<double>(n) * reps / s;
}

double timed_generate(const qlora::model::DecoderModel& m, const std::vector<std::vector<int32_t>>& prompts,
                      qlora::train::SamplingOptions o, int64_t new_tokens) {
  o.max_new_tokens = new_tokens;
  std::vector<double> runs;
  for (int i = 0; i < 3; ++i) {
    c10::cuda::device_synchronize();
    const auto t0 = Clock::now();
    const auto out = qlora::train::generate(m, prompts, o);
    c10::cuda::device_synchronize();
    runs.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    for (const auto& row : out)
      if (static_cast<int64_t>(row.size()) != new_tokens)
        throw std::runtime_error("a row generated " + std::to_string(row.size()) + " tokens, not " +
                                 std::to_string(new_tokens));
  }
  std::sort(runs.begin(), runs.end());
  return runs[1];
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse_args(argc, argv);
  qlora::kernels::DeviceInfo dev[1];
  if (!qlora::bench::find_gpu("generate", dev[0])) return 0;
  int failures = 0;
  try {
    qlora::quant::register_cuda_kernels();
    qlora::Config cfg = qlora::default_config();
    cfg.source = "<bench_generate>";
    cfg.model.preset = args.model;
    cfg.train.precision = qlora::Precision::kBf16;
    const qlora::train::DeviceChoice device = qlora::train::choose_device(cfg, "cuda");
    const auto t_load = Clock::now();
    qlora::train::BaseModel base = qlora::train::load_base_model(cfg, device, /*allow_random_weights=*/true);
    qlora::lora::LoraSettings ls;
    ls.r = 16;
    ls.alpha = 32;
    ls.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};
    qlora::lora::LoraAdapter adapter = qlora::lora::LoraAdapter::attach(base.model, ls);
    {
      at::NoGradGuard no_grad;
      for (const auto& l : adapter.layers()) l->lora_b().normal_(0.0, 0.02);
    }
    adapter.set_training(false);
    c10::cuda::device_synchronize();
    const double load_seconds = std::chrono::duration<double>(Clock::now() - t_load).count();
    const double bytes = weight_bytes_per_step(base.shape);
    const double bandwidth = copy_bytes_per_second();
    std::printf("%s\n", json{{"bench", "generate_device"}, {"system", "qlora"}, {"name", dev[0].name},
                             {"model", args.model}, {"load_seconds", load_seconds},
                             {"weight_bytes_per_step", bytes}, {"copy_bytes_per_second", bandwidth}}
                            .dump()
                            .c_str());
    std::fflush(stdout);
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(7);
    for (const int64_t batch : args.batches) {
      std::vector<std::vector<int32_t>> prompts;
      for (int64_t r = 0; r < batch; ++r) {
        const at::Tensor ids = at::randint(0, base.shape.vocab_size, {args.prompt}, gen, at::kInt);
        prompts.emplace_back(ids.data_ptr<int32_t>(), ids.data_ptr<int32_t>() + args.prompt);
      }
      for (const auto& mode : args.modes) {
        json j = {{"bench", "generate"}, {"system", "qlora"}, {"model", args.model}, {"mode", mode},
                  {"batch", batch}, {"prompt", args.prompt}, {"new_tokens", args.new_tokens}};
        try {
          if (mode != "graph" && mode != "eager" && mode != "dequant")
            throw std::runtime_error("unknown mode " + mode + " (graph, eager, dequant)");
          qlora::quant::set_nf4_gemv_enabled(mode != "dequant");
          qlora::train::SamplingOptions o;
          o.cuda_graph = mode == "graph";
          o.max_new_tokens = 8;
          qlora::train::generate(base.model, prompts, o);  // warm-up
          c10::cuda::CUDACachingAllocator::resetPeakStats(0);
          const double prefill = timed_generate(base.model, prompts, o, 1);
          const double total = timed_generate(base.model, prompts, o, args.new_tokens);
          const double decode = total - prefill;
          const double tps = static_cast<double>(batch * (args.new_tokens - 1)) / decode;
          const double bound = static_cast<double>(batch) * bandwidth / bytes;
          j.update({{"prefill_seconds", prefill},
                    {"decode_seconds", decode},
                    {"decode_tokens_per_second", tps},
                    {"weight_bytes_per_step", bytes},
                    {"copy_bytes_per_second", bandwidth},
                    {"bound_tokens_per_second", bound},
                    {"fraction_of_bound", tps / bound},
                    {"peak_allocated_bytes", c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].peak}});
        } catch (const std::exception& e) {
          ++failures;
          j["error"] = e.what();
        }
        std::printf("%s\n", j.dump(-1, ' ', false, json::error_handler_t::replace).c_str());
        std::fflush(stdout);
      }
    }
    qlora::quant::set_nf4_gemv_enabled(true);
  } catch (const std::exception& e) {
    ++failures;
    std::printf("%s\n", json{{"bench", "generate"}, {"system", "qlora"}, {"error", e.what()}}
                            .dump(-1, ' ', false, json::error_handler_t::replace)
                            .c_str());
  }
  return failures == 0 ? 0 : 1;
}
