// train/tensorboard: TensorBoard event files beside metrics.jsonl (output.report_to: tensorboard).
//
// The scalars of each metrics.jsonl line (train/loss, train/learning_rate, train/grad_norm,
// train/tokens_per_second, train/memory_gib; eval/loss, eval/exact_match) go into
// output.dir/runs/events.out.tfevents.<time>.<host>.qlora, written in TensorFlow's record format
// (length, masked CRC-32C of the length, a serialized Event protobuf, its masked CRC-32C: Note
// [tfevents records] in tensorboard.cpp). The events are derived from metrics.jsonl: a run,
// resumed or not, starts a new file from the lines metrics.jsonl holds (a resume has cut it back
// to its checkpoint) and removes the older event files, so no step is shown twice.
#pragma once

#include <cstdint>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

namespace qlora::train {

class TensorboardLog {
 public:
  // Throws std::runtime_error naming the file when it cannot be written.
  TensorboardLog(const std::string& output_dir, const std::string& metrics_path);
  // The scalars of one metrics.jsonl object ({"type": "train" | "eval", "step", ...}).
  void write(const nlohmann::json& line);
  const std::string& path() const { return path_; }

 private:
  void scalar(const std::string& tag, double value, int64_t step, double wall_time);
  void record(const std::string& event);
  std::string path_;
  std::ofstream out_;
};

// CRC-32C (Castagnoli) of `data`, and TensorFlow's masked form of a CRC (for tests).
uint32_t crc32c(const std::string& data);
uint32_t masked_crc32c(const std::string& data);

}  // namespace qlora::train
