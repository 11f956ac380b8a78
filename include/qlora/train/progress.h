// train/progress: what a run shows while it trains, and what it leaves behind.
//
//   Progress     one line per optimizer step as a redrawn bar on a terminal
//                ("[#####.....] 12/200 loss 1.2345 ...") or, when stderr is not
//                a terminal (CI, nohup, a pipe), a plain log line every
//                logging_steps steps and at the last one;
//   MetricsLog   output_dir/metrics.jsonl: one JSON object per optimizer step
//                and per evaluation, appended and flushed as they happen, so a
//                run that dies keeps its history;
//   memory_in_use / peak_memory: what "mem" shows (CUDA caching allocator
//                when the model is on a GPU, the process's resident set on CPU).
#pragma once

#include <c10/core/Device.h>

#include <cstdint>
#include <cstdio>
#include <string>

#include "qlora/train/trainer.h"

namespace qlora::train {

// Bytes in use now / at peak on `device` (CPU: resident set size; peak: the
// process's high-water mark, VmHWM).
int64_t memory_in_use(c10::Device device);
int64_t peak_memory(c10::Device device);

// "1:02:03" / "4:05" (hours only when needed); "?" for a negative or non-finite value.
std::string format_duration(double seconds);

// format_step_line plus " | ETA 4:05 | mem 1.23 GiB".
std::string format_progress_line(const StepEvent& e, int64_t memory_bytes);

// Held-out evaluations a run still has after optimizer step `step` of `total`: one at every
// multiple of `every` from `step` on below `total` (0: none) and the final one. What the ETA adds.
int64_t evaluations_left(int64_t step, int64_t total, int64_t every);

class Progress {
 public:
  // tty: draw a bar on stderr (pass isatty(2)); otherwise log every `every` steps.
  Progress(int64_t total_steps, int64_t every, bool tty);
  ~Progress();

  void update(const StepEvent& e, int64_t memory_bytes);
  // A log line that must not be overwritten by the bar (evaluation, saves).
  void message(const std::string& line);
  void finish();  // ends the bar's line

 private:
  void clear();
  int64_t total_;
  int64_t every_;
  bool tty_;
  bool drawn_ = false;
};

class MetricsLog {
 public:
  // Opens (appending to) dir/metrics.jsonl; dir is created when missing.
  // Throws std::runtime_error naming the file when it cannot be opened.
  explicit MetricsLog(const std::string& dir);
  ~MetricsLog();
  MetricsLog(const MetricsLog&) = delete;
  MetricsLog& operator=(const MetricsLog&) = delete;

  void write(const std::string& json_line);  // one object, no newline
  static std::string path_in(const std::string& dir);  // dir/metrics.jsonl
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::FILE* file_ = nullptr;
};

}  // namespace qlora::train
