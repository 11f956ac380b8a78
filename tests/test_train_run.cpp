// `qlora train` end to end on a small random Llama (the demo's assets at a
// smaller size): the recipe runs, writes metrics.jsonl and a PEFT adapter,
// and its pieces (batched greedy generation, exact match, the banner lines)
// do what they say.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "qlora/ckpt/store.h"
#include "qlora/common/errors.h"
#include "qlora/model/family.h"
#include "qlora/common/text.h"
#include "qlora/data/dataset.h"
#include "qlora/data/tokenizer.h"
#include "qlora/io/model_dir.h"
#include "qlora/lora/adapter_io.h"
#include "qlora/lora/lora.h"
#include "qlora/model/decoder.h"
#include "qlora/train/demo.h"
#include "qlora/train/eval.h"
#include "qlora/train/progress.h"
#include "qlora/train/run.h"
#include "support/test_support.h"
#include "support/train_fixtures.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using testing::small_model_dir;

model::DecoderModel load_small(const std::string& dir) {
  const io::ModelDir md = io::ModelDir::open(dir);
  const model::WeightSource w{md.dir(), md.tensor_names(), [&md](const std::string& n) { return md.tensor(n); }};
  return model::DecoderModel::load(read_decoder_config(md.config_path()), w);
}

TEST(TrainRun, BannerLines) {
  // PEFT's print_trainable_parameters for Llama-3.2-1B, r 16 on q,k,v,o in 4 bit:
  // 3,407,872 trainable of 1,235,814,400 + 3,407,872.
  EXPECT_EQ(train::trainable_params_line(3407872, 1239222272),
            "trainable params: 3,407,872 || all params: 1,239,222,272 || trainable%: 0.2750");
  Config cfg = default_config();
  cfg.train.micro_batch_size = 2;
  cfg.train.gradient_accumulation_steps = 16;
  EXPECT_EQ(train::effective_batch_line(cfg, 1),
            "effective batch = micro 2 × accumulation 16 × GPUs 1 = 32 sequences per optimizer step");
}

// The ETA counts the held-out evaluations still ahead: eval_steps 3 over 10 steps evaluates at
// 3, 6, 9 (after those steps) and at the end.
TEST(TrainRun, EvaluationsLeftForTheEta) {
  EXPECT_EQ(train::evaluations_left(1, 10, 3), 4);   // 3, 6, 9, end
  EXPECT_EQ(train::evaluations_left(3, 10, 3), 4);   // step 3's own evaluation runs after the update
  EXPECT_EQ(train::evaluations_left(4, 10, 3), 3);
  EXPECT_EQ(train::evaluations_left(9, 10, 3), 2);
  EXPECT_EQ(train::evaluations_left(10, 10, 3), 1);  // only the final one
  EXPECT_EQ(train::evaluations_left(5, 10, 0), 1);   // no periodic evaluation
  EXPECT_EQ(train::evaluations_left(5, 10, 5), 2);   // 5, end (10 is the final one, not a periodic)
}

TEST(TrainRun, BatchedGreedyEqualsOneByOne) {
  at::manual_seed(0);
  const model::DecoderModel model = load_small(small_model_dir());
  // Prompts of different lengths: the batch is left-padded, each alone is not.
  std::vector<std::vector<int32_t>> prompts = {{256, 72, 105}, {256, 10, 20, 30, 40, 50, 60}, {256, 5}};
  const std::vector<int32_t> stops = {257};
  const auto batched = train::greedy_generate(model, prompts, stops, 6);
  ASSERT_EQ(batched.size(), prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    const auto alone = train::greedy_generate(model, {prompts[i]}, stops, 6);
    EXPECT_EQ(batched[i], alone[0]) << "prompt " << i;
  }
  // The reference: argmax of the full forward, token by token.
  std::vector<int64_t> seq(prompts[1].begin(), prompts[1].end());
  for (int step = 0; step < 6; ++step) {
    const at::Tensor ids = at::tensor(seq, at::kLong).unsqueeze(0);
    const at::Tensor logits = model.forward(ids, model::causal_attention(1, ids.size(1), ids.device()));
    const int64_t next = logits[0][-1].argmax().item<int64_t>();
    if (next == 257) break;
    seq.push_back(next);
  }
  EXPECT_EQ(std::vector<int64_t>(seq.begin() + 7, seq.end()),
            std::vector<int64_t>(batched[1].begin(), batched[1].end()));
}

TEST(TrainRun, ExactMatchCountsWhatGenerationProduces) {
  const std::string dir = small_model_dir();
  const model::DecoderModel model = load_small(dir);
  const auto tok = data::load_tokenizer(dir);
  const std::string tmp = testing::make_temp_dir("run_eval");
  data::LoadOptions lo;
  lo.max_seq_length = 256;
  const data::Dataset ds = data::load_jsonl(testing::small_alpaca_data(tmp, 6, 10), lo, *tok);
  train::EvalOptions eo;
  eo.batch_size = 4;
  eo.max_new_tokens = 4;
  const train::EvalResult r = train::evaluate(model, *tok, ds.examples, eo);
  EXPECT_EQ(r.examples, 6);
  EXPECT_EQ(r.generated, 6);
  EXPECT_GT(r.tokens, 0);
  EXPECT_TRUE(std::isfinite(r.loss));
  // A random model answers nothing right; recount from the generations themselves.
  int64_t exact = 0;
  for (const auto& e : ds.examples) {
    size_t k = 0;
    while (e.labels[k] == data::kIgnoreIndex) ++k;
    const auto out = train::greedy_generate(model, {{e.input_ids.begin(), e.input_ids.begin() + k}},
                                            train::stop_token_ids(*tok), 4);
    std::string want = tok->decode({e.input_ids.begin() + k, e.input_ids.end() - 1});  // minus eos
    if (trim(tok->decode(out[0])) == trim(want)) ++exact;
  }
  EXPECT_EQ(r.exact, exact);
}

TEST(TrainRun, TrainsWritesMetricsAndAPeftAdapter) {
  const std::string tmp = testing::make_temp_dir("run_train");
  Config cfg = testing::small_run_config(tmp, 48, 8);
  cfg.lora.target_modules = {"all-linear"};
  cfg.lora.dropout = 0.0;
  cfg.train.gradient_accumulation_steps = 2;
  cfg.train.max_steps = 6;
  cfg.train.learning_rate = 3e-3;
  cfg.train.eval_steps = 3;
  cfg.train.gradient_checkpointing = true;
  cfg.output.dir = tmp + "/out";
  cfg.output.logging_steps = 2;
  train::RunOptions ro;
  ro.device = "cpu";
  ro.eval.generate_examples = 4;
  ro.eval.max_new_tokens = 4;
  const train::RunResult r = train::run_training(cfg, ro);
  EXPECT_EQ(r.steps, 6);
  EXPECT_EQ(r.total_steps, 6);
  EXPECT_TRUE(r.has_eval);
  EXPECT_LT(r.last_loss, r.first_loss) << "six steps at lr 3e-3 on 48 examples lower the loss";

  // metrics.jsonl: one line per step and per evaluation (start, step 3, end).
  std::ifstream in(r.metrics_path);
  std::string line;
  std::vector<int64_t> train_steps, eval_steps;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line);
    (j["type"] == "train" ? train_steps : eval_steps).push_back(j["step"].get<int64_t>());
    if (j["type"] == "train") {
      EXPECT_TRUE(j.contains("lr") && j.contains("grad_norm") && j.contains("tokens_per_second"));
      EXPECT_GT(j["memory_bytes"].get<int64_t>(), 0);
    } else {  // a few held-out answers beside their prompts and references
      ASSERT_EQ(j["samples"].size(), 3u) << line;
      EXPECT_NE(j["samples"][0]["prompt"].get<std::string>().find("### Response:"), std::string::npos) << line;
      EXPECT_TRUE(j["samples"][0].contains("answer") && j["samples"][0].contains("reference"));
    }
  }
  EXPECT_EQ(train_steps, (std::vector<int64_t>{1, 2, 3, 4, 5, 6}));
  EXPECT_EQ(eval_steps, (std::vector<int64_t>{0, 3, 6}));

  // The adapter is PEFT's format and loads back onto the base.
  EXPECT_TRUE(fs::exists(fs::path(r.adapter_dir) / "adapter_config.json"));
  EXPECT_TRUE(fs::exists(fs::path(r.adapter_dir) / "adapter_model.safetensors"));
  model::DecoderModel base = load_small(small_model_dir());
  const lora::LoraAdapter loaded = lora::load_adapter(base, r.adapter_dir);
  EXPECT_EQ(loaded.module_names().size(), 2u * 7u);
}

// lora.init_from: a second run starts from the first one's adapter (its held-out loss at step 0
// is the first run's final one, bit for bit) and refuses an adapter of another shape.
TEST(TrainRun, ContinuesFromAnAdapter) {
  const std::string tmp = testing::make_temp_dir("run_init_from");
  Config cfg = testing::small_run_config(tmp, 16, 4);
  cfg.lora.dropout = 0.0;
  cfg.train.gradient_accumulation_steps = 1;
  cfg.train.max_steps = 3;
  cfg.train.learning_rate = 3e-3;
  cfg.train.precision = Precision::kFp32;
  cfg.output.dir = tmp + "/first";
  train::RunOptions ro = testing::cpu_run_options();
  ro.eval.generate_examples = 0;
  const train::RunResult first = train::run_training(cfg, ro);
  ASSERT_TRUE(first.has_eval);

  cfg.lora.init_from = first.adapter_dir;
  cfg.output.dir = tmp + "/second";
  ro.evaluate_at_start = true;
  const train::RunResult second = train::run_training(cfg, ro);
  EXPECT_EQ(second.start_eval.loss, first.final_eval.loss);
  EXPECT_EQ(second.steps, 3);
  EXPECT_LT(second.final_eval.loss, second.start_eval.loss);

  cfg.lora.r = 8;
  cfg.output.dir = tmp + "/third";
  const std::string msg = testing::error_of([&] { train::run_training(cfg, ro); });
  EXPECT_NE(msg.find("lora.init_from names an adapter that does not match"), std::string::npos) << msg;
  EXPECT_NE(msg.find("r 16 (the config's lora.r 8)"), std::string::npos) << msg;
}

TEST(TrainRun, MissingModelPathSaysWhatToDo) {
  Config cfg = default_config();
  cfg.data.path = "data/demo/train.alpaca.jsonl";
  try {
    train::run_training(cfg);
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("model.path is not set"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("qlora demo"), std::string::npos) << e.what();
  }
}

// A Mistral config.json with a sliding window shorter than the rows: the run trains them with
// the window (the first step's loss differs from the same run without it; the window's
// arithmetic itself is checked against transformers in tests/test_model_families.cpp).
TEST(TrainRun, SlidingWindowShorterThanTheRowsTrainsWithTheWindow) {
  namespace fs = std::filesystem;
  const std::string tmp = testing::make_temp_dir("sliding");
  const std::string model = tmp + "/model";
  fs::copy(testing::small_model_dir(), model);
  nlohmann::json config = nlohmann::json::parse(testing::slurp(model + "/config.json"));
  config["model_type"] = "mistral";
  config["sliding_window"] = 8;
  testing::write_file(model, "config.json", config.dump(2));
  Config cfg = default_config();
  cfg.model.path = model;
  cfg.data.path = testing::small_completion_data(tmp, 8);
  cfg.data.max_seq_length = 64;
  cfg.train.max_steps = 1;
  cfg.train.precision = Precision::kFp32;
  cfg.output.dir = tmp + "/out";
  train::RunOptions ro = testing::cpu_run_options();
  const train::RunResult windowed = train::run_training(cfg, ro);
  EXPECT_EQ(windowed.steps, 1);
  config["sliding_window"] = nullptr;  // MistralConfig: null is no window
  testing::write_file(model, "config.json", config.dump(2));
  cfg.output.dir = tmp + "/out_full";
  const train::RunResult full = train::run_training(cfg, ro);
  EXPECT_EQ(full.steps, 1);
  EXPECT_NE(windowed.last_loss, full.last_loss) << "the window changed nothing";
}

}  // namespace
}  // namespace qlora

namespace qlora {
namespace {

// Note [out-of-memory retry] end to end, without a GPU: layers above N rows
// raise the allocator's out-of-memory error (RunOptions::simulate_oom_above_rows).
Config oom_config(const std::string& tmp, const std::string& out) {
  Config cfg = default_config();
  cfg.model.path = testing::small_model_dir();
  cfg.data.path = testing::small_alpaca_data(tmp, 32, 100);
  cfg.data.max_seq_length = 256;
  // No dropout: cut into pieces, a micro batch draws its dropout masks piece
  // by piece, other draws of the same distribution (Note [out-of-memory retry]).
  cfg.lora.dropout = 0.0;
  cfg.train.micro_batch_size = 4;
  cfg.train.gradient_accumulation_steps = 2;
  cfg.train.max_steps = 4;
  cfg.train.precision = Precision::kFp32;
  cfg.train.gradient_checkpointing = false;
  cfg.output.dir = tmp + "/" + out;
  cfg.output.save_steps = 1000;
  return cfg;
}

train::RunOptions oom_options(int64_t rows) {
  train::RunOptions ro = testing::cpu_run_options();
  ro.simulate_oom_above_rows = rows;
  return ro;
}

// Summation order only: pieces of 1 row instead of 4 (fp32).
constexpr double kOomLossRtol = 1e-5;

TEST(TrainRunOutOfMemory, RetriesAtOneRowAndTrainsTheSameSteps) {
  const std::string tmp = testing::make_temp_dir("run_oom");
  const train::RunResult plain = train::run_training(oom_config(tmp, "plain"), oom_options(-1));
  const train::RunResult tight = train::run_training(oom_config(tmp, "tight"), oom_options(1));
  EXPECT_EQ(plain.max_micro_rows, 0);
  EXPECT_EQ(tight.max_micro_rows, 1);  // 4 -> 2 -> 1
  ASSERT_EQ(tight.losses.size(), plain.losses.size());
  for (size_t i = 0; i < plain.losses.size(); ++i)
    EXPECT_NEAR(tight.losses[i], plain.losses[i], kOomLossRtol * plain.losses[i]) << "step " << i + 1;
  // The smaller size is in the checkpoint, for a resume to keep.
  std::ifstream state(tight.last_checkpoint + "/trainer_state.json");
  EXPECT_EQ(nlohmann::json::parse(state).at("max_micro_rows").get<int64_t>(), 1);
}

TEST(TrainRunOutOfMemory, NothingFitsSavesACheckpointAndSaysWhatToChange) {
  const std::string tmp = testing::make_temp_dir("run_oom_none");
  const Config cfg = oom_config(tmp, "out");
  try {
    train::run_training(cfg, oom_options(0));
    FAIL() << "expected InputError: not even one row fits";
  } catch (const InputError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("out of memory in step 1 even at one sequence per micro batch"), std::string::npos) << msg;
    EXPECT_NE(msg.find("gradient_checkpointing"), std::string::npos) << msg;
    EXPECT_NE(msg.find("--resume auto"), std::string::npos) << msg;
  }
  const ckpt::Found found = ckpt::find_latest_valid(cfg.output.dir);
  EXPECT_TRUE(found) << "the run must leave a checkpoint to resume from";
}

}  // namespace
}  // namespace qlora
