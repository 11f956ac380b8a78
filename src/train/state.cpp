#include "qlora/train/state.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/Generator.h>

#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <utility>
#include <vector>

#include "qlora/amp/scaler.h"
#include "qlora/ckpt/sha256.h"
#include "qlora/ckpt/store.h"
#include "qlora/common/errors.h"
#include "qlora/common/log.h"
#include "qlora/data/loader.h"
#include "qlora/dist/group.h"
#include "qlora/io/torch_io.h"
#include "qlora/lora/lora.h"
#include "qlora/optim/optimizer.h"
#include "qlora/plan/plan.h"
#include "qlora/train/trainer.h"

namespace qlora::train {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

constexpr int kStateFormatVersion = 1;

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

json parse_json_file(const fs::path& p) {
  try {
    return json::parse(read_text(p));
  } catch (const json::exception& e) {
    throw InputError(p.string() + ": not valid JSON (" + e.what() + "); the checkpoint is damaged, resume from another");
  }
}


}  // namespace

std::string rng_key(int64_t rank, const std::string& generator) {
  return rank == 0 ? generator : "rank" + std::to_string(rank) + "." + generator;
}

json run_fingerprint(const Config& cfg, const std::string& model_config_sha256, Precision precision,
                     int64_t world_size, int cpu_threads) {
  json math = {
      {"model.config_sha256", model_config_sha256},
      {"lora.r", cfg.lora.r},
      {"lora.alpha", cfg.lora.alpha},
      {"lora.rslora", cfg.lora.rslora},
      {"lora.target_modules", plan::resolve_lora_targets(cfg.lora.target_modules)},
      {"quantization.quant_type", cfg.quantization.quant_type},
      {"quantization.double_quant", cfg.quantization.double_quant},
      {"quantization.compute_dtype", std::string(to_string(cfg.quantization.compute_dtype))},
      {"precision", std::string(to_string(precision))},
      {"effective_batch", cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * world_size},
  };
  json other = {
      {"model.path", cfg.model.path},
      {"lora.dropout", cfg.lora.dropout},
      {"train.micro_batch_size", cfg.train.micro_batch_size},
      {"train.gradient_accumulation_steps", cfg.train.gradient_accumulation_steps},
      {"world_size", world_size},
      {"train.learning_rate", cfg.train.learning_rate},
      {"train.lr_scheduler", std::string(to_string(cfg.train.lr_scheduler))},
      {"train.max_steps", cfg.train.max_steps},
      {"train.epochs", cfg.train.epochs},
      {"train.optimizer", std::string(to_string(cfg.train.optimizer))},
      {"train.seed", cfg.train.seed},
      {"data.path", cfg.data.path},
      {"lora.init_from", cfg.lora.init_from},
      {"data.chat_template", std::string(to_string(cfg.data.chat_template))},
      {"data.train_on", std::string(to_string(cfg.data.train_on))},
      {"data.train_reasoning", cfg.data.train_reasoning},
      {"data.fold_system_prompt", cfg.data.fold_system_prompt},
  };
  json f = {{"math", math}, {"other", other}};
  if (cpu_threads > 0) f["cpu_threads"] = cpu_threads;  // its own warning on resume, not a line of "other"
  return f;
}

FingerprintDiff compare_fingerprints(const json& saved, const json& now) {
  FingerprintDiff d;
  const auto compare = [](const json& a, const json& b, std::vector<std::string>& out) {
    if (!a.is_object() || !b.is_object()) return;
    for (const auto& [key, value] : b.items()) {
      const json was = a.contains(key) ? a.at(key) : json();
      if (was != value) out.push_back(key + ": checkpoint " + was.dump() + ", now " + value.dump());
    }
  };
  compare(saved.value("math", json::object()), now.value("math", json::object()), d.math);
  compare(saved.value("other", json::object()), now.value("other", json::object()), d.other);
  return d;
}

std::string save_checkpoint(const Config& cfg, const TrainingObjects& o, const json& fingerprint,
                            const std::string& metrics_path) {
  const int64_t step = o.trainer.step();
  // Every rank's generators (the LoRA and optimizer state is the same on all).
  std::vector<std::pair<std::string, at::Tensor>> rng;
  const bool several = o.group != nullptr && o.group->distributed();
  for (auto& [name, gen] : step_generators(o.device)) {
    if (!several) {
      rng.emplace_back(name, gen.get_state());
      continue;
    }
    const std::vector<at::Tensor> states = o.group->all_gather(gen.get_state());
    for (size_t r = 0; r < states.size(); ++r) rng.emplace_back(rng_key(static_cast<int64_t>(r), name), states[r]);
  }
  if (several && !o.group->is_main()) return (fs::path(cfg.output.dir) / ("checkpoint-" + std::to_string(step))).string();

  ckpt::CheckpointWriter w(cfg.output.dir, step);
  const optim::OptimizerState opt = o.optimizer.state();  // a deep copy: taken once
  try {
    io::save_safetensors(w.path("adapter.safetensors"), o.adapter.named_parameters(), {{"format", "pt"}});
    io::save_safetensors(w.path("optimizer.safetensors"), opt.tensors);
    io::save_safetensors(w.path("rng.safetensors"), rng);
  } catch (const ckpt::CheckpointError&) {
    throw;
  } catch (const std::exception& e) {
    // The writer's destructor removes the partial directory.
    throw ckpt::CheckpointError("checkpoint " + std::to_string(step) + " not saved: " + e.what() +
                                ". The previous checkpoints in " + cfg.output.dir + " are untouched.");
  }
  const amp::LossScalerState sc = o.scaler.state();
  const json state = {
      {"format_version", kStateFormatVersion},
      {"step", step},
      {"total_steps", o.trainer.scheduler().total_steps()},
      {"schedule",
       {{"kind", std::string(to_string(o.trainer.scheduler().kind()))},
        {"base_lr", o.trainer.scheduler().base_lr()},
        {"warmup_steps", o.trainer.scheduler().warmup_steps()}}},
      {"scaler", {{"scale", sc.scale}, {"growth_tracker", sc.growth_tracker}}},
      {"bad_steps", {{"in_a_row", o.bad_steps.in_a_row()}, {"total", o.bad_steps.total()}}},
      {"optimizer", {{"kind", o.optimizer.kind()}, {"scalars", json::parse(opt.scalars_json)}}},
      {"loader", json::parse(o.loader.cursor().to_json())},
      {"max_micro_rows", o.trainer.max_micro_rows()},
  };
  w.write_json("trainer_state.json", state);
  w.write_json("run.json", json{{"fingerprint", fingerprint},
                                {"qlora_version", QLORA_VERSION},
                                {"torch_version", QLORA_TORCH_VERSION}});
  w.write_text("config.yaml", to_yaml(cfg));
  w.write_text("metrics.jsonl", fs::exists(metrics_path) ? read_text(metrics_path) : std::string());
  const std::string path = w.commit(json{{"step", step}, {"config_sha256", ckpt::sha256_hex(to_json(cfg))}});
  ckpt::prune_checkpoints(cfg.output.dir, static_cast<int>(cfg.output.keep_last));
  return path;
}

std::string resolve_resume(const std::string& output_dir, const std::string& resume) {
  if (resume == "none") return {};
  if (resume == "auto") {
    const ckpt::Found f = ckpt::find_latest_valid(output_dir);
    if (f || f.warnings.empty()) {  // found one, or there is none at all
      for (const auto& w : f.warnings) log::warn(w);
      return f.path;
    }
    std::string msg = "--resume auto: " + output_dir + " holds checkpoints, but none of them verifies:\n";
    for (const auto& w : f.warnings) msg += "  " + w + "\n";
    msg += "Nothing was changed. Put back the damaged files (from a backup or a copy), or start over with "
           "--resume none (the earlier run's checkpoints are then moved to " + output_dir + "/earlier-run-<time>/)";
    throw InputError(msg);
  }
  if (!fs::is_directory(resume))
    throw InputError("--resume " + resume + ": no such checkpoint directory; use --resume auto to take the newest in " +
                     output_dir);
  const ckpt::Verification v = ckpt::verify_checkpoint(resume);
  if (!v.ok)
    throw InputError("--resume " + resume + ": the checkpoint does not verify: " + v.reason +
                     "; use another checkpoint, or --resume auto to take the newest valid one");
  return resume;
}

std::string set_aside_earlier_run(const std::string& output_dir) {
  std::vector<fs::path> move;
  for (const auto& c : ckpt::list_checkpoints(output_dir)) move.emplace_back(c);
  for (const char* name : {"metrics.jsonl", "adapter"})
    if (fs::exists(fs::path(output_dir) / name)) move.push_back(fs::path(output_dir) / name);
  if (move.empty()) return {};
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  ::gmtime_r(&t, &tm);
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y%m%d-%H%M%S", &tm);
  fs::path aside = fs::path(output_dir) / ("earlier-run-" + std::string(stamp));
  for (int n = 2; fs::exists(aside); ++n) aside = fs::path(output_dir) / ("earlier-run-" + std::string(stamp) + "-" + std::to_string(n));
  std::error_code ec;
  fs::create_directories(aside, ec);
  for (const auto& p : move) {
    if (!ec) fs::rename(p, aside / p.filename(), ec);
    if (ec)
      throw ckpt::CheckpointError("cannot move " + p.string() + " to " + aside.string() + ": " + ec.message() +
                                  "; move the earlier run out of " + output_dir + " yourself, or use another output.dir");
  }
  return aside.string();
}

int64_t finished_step(const std::string& checkpoint_dir, const Config& cfg) {
  const json run = json::parse(read_text(fs::path(checkpoint_dir) / "run.json"), nullptr, false);
  const json other = run.is_object() ? run.value("fingerprint", json::object()).value("other", json::object()) : json();
  if (!other.is_object() || other.value("train.max_steps", json()) != json(cfg.train.max_steps) ||
      other.value("train.epochs", json()) != json(cfg.train.epochs))
    return -1;
  const json st = json::parse(read_text(fs::path(checkpoint_dir) / "trainer_state.json"), nullptr, false);
  if (!st.is_object() || !st.contains("step") || !st.contains("total_steps")) return -1;
  const json step = st["step"], total = st["total_steps"];
  if (!step.is_number_integer() || !total.is_number_integer()) return -1;
  return step.get<int64_t>() >= total.get<int64_t>() ? step.get<int64_t>() : -1;
}

int64_t load_checkpoint(const std::string& dir, const TrainingObjects& o, const json& fingerprint, bool force,
                        const std::string& metrics_path) {
  const ckpt::Verification v = ckpt::verify_checkpoint(dir);
  if (!v.ok) throw InputError("cannot resume from " + dir + ": " + v.reason);
  const fs::path d(dir);

  const json run = parse_json_file(d / "run.json");
  const FingerprintDiff diff = compare_fingerprints(run.value("fingerprint", json::object()), fingerprint);
  if (!diff.math.empty()) {
    std::string msg = "cannot resume from " + dir + ": the config changes the run's math:\n";
    for (const auto& l : diff.math) msg += "  " + l + "\n";
    msg += "restore those settings, start a new run in another output.dir, or pass --force to resume anyway";
    if (!force) throw InputError(msg);
    log::warn(msg + " (--force given: resuming anyway)");
  }
  for (const auto& l : diff.other) log::warn("changed since the checkpoint (allowed): " + l);
  const json saved_threads = run.value("fingerprint", json::object()).value("cpu_threads", json());
  const json now_threads = fingerprint.value("cpu_threads", json());
  if (saved_threads.is_number_integer() && now_threads.is_number_integer() && saved_threads != now_threads)
    log::warn("CPU threads: the checkpoint's run had " + saved_threads.dump() + ", this one has " + now_threads.dump() +
              "; ATen splits its work by the count, so from here the numbers may differ in the last bits from "
              "a run never stopped (OMP_NUM_THREADS=" + saved_threads.dump() + " resumes it exactly)");

  const json st = parse_json_file(d / "trainer_state.json");
  if (st.value("format_version", 0) != kStateFormatVersion)
    throw InputError((d / "trainer_state.json").string() + ": format_version " + st.value("format_version", json()).dump() +
                     ", this qlora reads " + std::to_string(kStateFormatVersion));
  try {
    o.adapter.load_state(io::load_safetensors((d / "adapter.safetensors").string()), (d / "adapter.safetensors").string());
    optim::OptimizerState opt;
    for (auto& [name, t] : io::load_safetensors((d / "optimizer.safetensors").string())) opt.tensors.emplace_back(name, t);
    opt.scalars_json = st.at("optimizer").at("scalars").dump();
    o.optimizer.load_state(opt);
    const auto rng = io::load_safetensors((d / "rng.safetensors").string());
    const int64_t rank = o.group != nullptr ? o.group->rank() : 0;
    for (auto& [name, gen] : step_generators(o.device)) {
      auto it = rng.find(rng_key(rank, name));
      if (it == rng.end() && rank > 0 && rng.count(name) > 0) continue;  // a rank the old world lacked
      if (it == rng.end())
        throw InputError((d / "rng.safetensors").string() + ": no \"" + name +
                         "\" generator state (was the checkpoint written on another device type?)");
      gen.set_state(it->second);
    }
    o.scaler.load_state(amp::LossScalerState{st.at("scaler").at("scale").get<float>(),
                                             st.at("scaler").at("growth_tracker").get<int32_t>()});
    o.bad_steps.restore(st.at("bad_steps").at("in_a_row").get<int64_t>(), st.at("bad_steps").at("total").get<int64_t>());
    o.loader.restore(data::LoaderCursor::from_json(st.at("loader").dump(), (d / "trainer_state.json").string()));
    o.trainer.set_step(st.at("step").get<int64_t>());
    o.trainer.set_max_micro_rows(st.value("max_micro_rows", int64_t{0}));
  } catch (const json::exception& e) {
    throw InputError((d / "trainer_state.json").string() + ": " + e.what() + "; the checkpoint is damaged");
  }
  // The metrics of the steps after this checkpoint belong to a run that is
  // being replaced: history restarts from the checkpoint's copy.
  if (!metrics_path.empty())
    std::ofstream(metrics_path, std::ios::binary | std::ios::trunc) << read_text(d / "metrics.jsonl");
  return o.trainer.step();
}

}  // namespace qlora::train
