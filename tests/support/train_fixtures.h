// Small training runs for tests: a random Llama with the demo's byte-level
// tokenizer (hidden 64, 2 layers) and generated JSONL data, so `qlora train`'s
// recipe runs end to end in a second or two on one core; the families' runs on
// bases made by transformers, and qlora's logits with an adapter for PEFT's check.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "qlora/config/config.h"
#include "qlora/io/model_dir.h"
#include "qlora/io/torch_io.h"
#include "qlora/lora/adapter_io.h"
#include "qlora/model/decoder.h"
#include "qlora/model/decoder_config.h"
#include "qlora/model/family.h"
#include "qlora/train/demo.h"
#include "qlora/train/run.h"
#include "support/test_support.h"

namespace qlora::testing {

// `c` (its family, pieces, RoPE) at a small size: 2 layers of `hidden`, 4 heads of hidden / 4
// over 2 kv heads, intermediate 2 · hidden.
inline DecoderConfig small_shape(DecoderConfig c, int64_t hidden = 64) {
  c.hidden_size = hidden;
  c.intermediate_size = 2 * hidden;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = hidden / 4;
  return c;
}

// A run on the CPU as tests want it: no evaluation before the first step, no signal handlers
// (the test runner keeps its own).
inline train::RunOptions cpu_run_options() {
  train::RunOptions ro;
  ro.device = "cpu";
  ro.evaluate_at_start = false;
  ro.handle_signals = false;
  return ro;
}

// The demo's Llama at hidden 64.
inline DecoderConfig small_llama_shape() { return small_shape(train::demo_model_config()); }

// A model directory (tokenizer + random weights), made once per process.
inline const std::string& small_model_dir() {
  static const std::string dir = [] {
    const std::string d = make_temp_dir("small_model");
    train::write_demo_tokenizer(d);
    train::write_random_llama(d, small_llama_shape(), 7);
    return d;
  }();
  return dir;
}

// n alpaca lines "What is i + i%7?" -> "i + i%7", i from `first`.
inline std::string small_alpaca_data(const std::string& dir, int n, int first) {
  std::string text;
  for (int i = first; i < first + n; ++i)
    text += R"({"instruction": "What is )" + std::to_string(i) + " + " + std::to_string(i % 7) +
            R"(?", "input": "", "output": ")" + std::to_string(i + i % 7) + "\"}\n";
  return write_file(dir, "alpaca" + std::to_string(first) + ".jsonl", text);
}

// n short completion lines of different lengths (a few dozen tokens each).
inline std::string small_completion_data(const std::string& dir, int n) {
  std::string text;
  for (int i = 0; i < n; ++i)
    text += R"({"prompt": ")" + std::string(static_cast<size_t>(1 + i % 5), 'a' + static_cast<char>(i % 3)) + " " +
            std::to_string(i) + R"( =", "completion": " )" + std::to_string(i * 3) + "\"}\n";
  return write_file(dir, "completion.jsonl", text);
}

// A run of the small model on alpaca data: `train` examples and `eval` held out (0: none), rows
// up to 256 tokens, micro batch 4; the rest default_config()'s.
inline Config small_run_config(const std::string& dir, int train, int eval) {
  Config cfg = default_config();
  cfg.model.path = small_model_dir();
  cfg.data.path = small_alpaca_data(dir, train, 100);
  if (eval > 0) cfg.data.eval_path = small_alpaca_data(dir, eval, 500);
  cfg.data.max_seq_length = 256;
  cfg.train.micro_batch_size = 4;
  return cfg;
}

// The end-to-end run of a family's base made by transformers (with the demo's tokenizer): 30 steps
// in fp32 on 16 completion lines (written into `tmp`), rows up to 64 tokens, learning rate 3e-3,
// no dropout; the adapter under `out_dir`.
inline Config family_run_config(const std::string& base, const std::string& tmp, const std::string& out_dir) {
  Config cfg = default_config();
  cfg.model.path = base;
  cfg.data.path = small_completion_data(tmp, 16);
  cfg.data.max_seq_length = 64;
  cfg.train.max_steps = 30;
  cfg.train.learning_rate = 3e-3;
  cfg.train.precision = Precision::kFp32;
  cfg.lora.dropout = 0.0;
  cfg.output.dir = out_dir;
  return cfg;
}

// The mean of the first `n` and the mean of the last `n` of `losses` (at least n of them).
inline std::pair<double, double> mean_losses_at_ends(const std::vector<double>& losses, int n = 5) {
  double first = 0, last = 0;
  for (int i = 0; i < n; ++i) {
    first += losses[static_cast<size_t>(i)] / n;
    last += losses[losses.size() - 1 - static_cast<size_t>(i)] / n;
  }
  return {first, last};
}

// qlora's logits of the base directory `base` with the adapter in `adapter_dir` on `batch`
// (input_ids, attention_mask), written to `path` as "logits" for PEFT's check to compare with.
inline void write_adapter_logits(const std::string& base, const std::string& adapter_dir,
                                 const std::map<std::string, at::Tensor>& batch, const std::string& path) {
  const io::ModelDir dir = io::ModelDir::open(base);
  model::WeightSource src{dir.dir(), dir.tensor_names(), [&dir](const std::string& n) { return dir.tensor(n); }};
  model::DecoderModel m = model::DecoderModel::load(read_decoder_config(dir.config_path()), src);
  lora::LoraAdapter a = lora::load_adapter(m, adapter_dir);
  at::Tensor logits = m.forward(batch.at("input_ids"), model::padded_attention(batch.at("attention_mask")));
  io::save_safetensors(path, {{"logits", logits.contiguous()}});
}

}  // namespace qlora::testing
