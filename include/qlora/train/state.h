// train/state: everything a run needs to continue exactly, in and out of a
// checkpoint directory (the ckpt module makes the directory atomic and
// verifiable; this module decides what goes in it).
//
// checkpoint-N/
//   adapter.safetensors     LoRA A and B under PEFT's keys (fp32)
//   optimizer.safetensors   every optimizer state tensor, by name
//   rng.safetensors         CPU generator state (and CUDA's when on a GPU) of
//                           rank 0 as "cpu" / "cuda", of rank r > 0 as
//                           "rank<r>.cpu" / "rank<r>.cuda"
//   trainer_state.json      step, schedule, loss scaler, bad-step counters,
//                           optimizer scalars, the data loader's cursor
//   run.json                the "math" of the run (below) and the versions
//   config.yaml             the whole resolved config, for people
//   metrics.jsonl           the metrics up to step N
//   manifest.json           sha256 of every file (ckpt/store.h)
// No pickle anywhere: safetensors and JSON.
//
// Note [what a resume may change]: the run's math is the base model (the sha256
// of its config.json and its tensor names/shapes), the LoRA shapes (r, alpha,
// targets, rslora), the quantization, the precision and the effective batch
// (micro × accumulation × world). A resume whose config differs in any of
// these is refused with the list of differences (--force overrides); other
// differences (learning rate, max_steps, logging, output) are allowed and
// listed as warnings.
#pragma once

#include <c10/core/Device.h>

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/config/config.h"

namespace qlora {
namespace lora {
class LoraAdapter;
}
namespace optim {
class Optimizer;
}
namespace amp {
class LossScaler;
class BadStepPolicy;
}  // namespace amp
namespace data {
class DataLoader;
}
namespace dist {
class Group;
}
}  // namespace qlora

namespace qlora::train {

class Trainer;

// The live objects a checkpoint captures (all must outlive the call).
struct TrainingObjects {
  Trainer& trainer;
  optim::Optimizer& optimizer;
  amp::LossScaler& scaler;
  amp::BadStepPolicy& bad_steps;
  data::DataLoader& loader;
  lora::LoraAdapter& adapter;
  c10::Device device;
  const dist::Group* group = nullptr;  // several ranks: rank 0 writes, every rank's RNG goes in
};

// The name of a generator of `rank` in rng.safetensors ("cpu", "rank1.cpu").
std::string rng_key(int64_t rank, const std::string& generator);

// The run's math (Note [what a resume may change]) plus the settings a resume
// may change, as JSON: {"math": {...}, "other": {...}}, plus "cpu_threads" for
// a CPU run (cpu_threads > 0): another count on resume is allowed, with a
// warning that the bits may differ (Note [fixed CPU threads], train/threads.h).
nlohmann::json run_fingerprint(const Config& cfg, const std::string& model_config_sha256, Precision precision,
                               int64_t world_size, int cpu_threads = 0);

// Differences between a saved fingerprint and the current one, one line each
// ("lora.r: checkpoint 16, now 8"). `math` lines refuse a resume.
struct FingerprintDiff {
  std::vector<std::string> math;
  std::vector<std::string> other;
};
FingerprintDiff compare_fingerprints(const nlohmann::json& saved, const nlohmann::json& now);

// Writes checkpoint-<step> into cfg.output.dir atomically, then prunes to
// output.keep_last. Returns its path. Throws ckpt::CheckpointError (the
// previous checkpoints stay untouched). Collective with a group of several
// ranks: every rank calls it, rank 0 alone writes (other ranks get the path
// it will have).
std::string save_checkpoint(const Config& cfg, const TrainingObjects& objects, const nlohmann::json& fingerprint,
                            const std::string& metrics_path);

// Which checkpoint `--resume` means: "auto" = the newest that verifies in
// output_dir (warnings for newer broken ones go to the log; "" when the
// directory holds no checkpoint at all; InputError listing each and what is
// wrong when it holds some and none verifies), "none" = "" (start over), or a
// path (InputError when it does not verify, saying why).
std::string resolve_resume(const std::string& output_dir, const std::string& resume);

// `--resume none` in a directory that holds an earlier run: its checkpoints,
// metrics.jsonl and adapter/ move to output_dir/earlier-run-<UTC time>/ (so a
// later --resume auto cannot mix the two runs, and nothing is deleted).
// Returns that directory, or "" when there was nothing to move.
std::string set_aside_earlier_run(const std::string& output_dir);

// A finished run: the checkpoint's trainer_state.json says step >= its total
// steps, and cfg asks for the same length (train.max_steps and train.epochs
// as the checkpoint's run.json recorded them). Returns that step, or -1 (not
// finished, a longer run asked for, or unreadable: the resume then reads it
// properly and says what is wrong).
int64_t finished_step(const std::string& checkpoint_dir, const Config& cfg);

// Restores every object from `dir` (verified first). Refuses (InputError
// listing the differences) when the run's math changed, unless `force`.
// Copies the checkpoint's metrics.jsonl over `metrics_path` (unless empty:
// ranks other than 0). Each rank takes its own generators' states; a rank the
// checkpoint has none for (the world grew) keeps the seeding it started with.
// Returns the step.
int64_t load_checkpoint(const std::string& dir, const TrainingObjects& objects, const nlohmann::json& fingerprint,
                        bool force, const std::string& metrics_path);

}  // namespace qlora::train
