#include "qlora/train/progress.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>


#include "qlora/common/log.h"
#include "qlora/plan/plan.h"
#include "qlora/train/memory.h"

namespace qlora::train {

int64_t evaluations_left(int64_t step, int64_t total, int64_t every) {
  const int64_t periodic = every > 0 && step < total ? (total - 1) / every - (step - 1) / every : 0;
  return std::max<int64_t>(periodic, 0) + 1;
}

int64_t memory_in_use(c10::Device device) { return memory_stats(device).allocated; }

int64_t peak_memory(c10::Device device) { return memory_stats(device).peak_allocated; }

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const auto s = static_cast<int64_t>(std::llround(seconds));
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", static_cast<long long>(s / 3600),
                  static_cast<long long>(s / 60 % 60), static_cast<long long>(s % 60));
  else
    std::snprintf(buf, sizeof buf, "%lld:%02lld", static_cast<long long>(s / 60), static_cast<long long>(s % 60));
  return buf;
}

std::string format_progress_line(const StepEvent& e, int64_t memory_bytes) {
  return format_step_line(e.step, e.total, e.stats, e.tokens_per_second) + " | ETA " +
         format_duration(e.eta_seconds) + " | mem " + plan::format_gib(static_cast<double>(memory_bytes)) + " GiB";
}

// ---------------------------------------------------------------- Progress

Progress::Progress(int64_t total_steps, int64_t every, bool tty) : total_(total_steps), every_(every), tty_(tty) {}

Progress::~Progress() { finish(); }

void Progress::clear() {
  if (tty_ && drawn_) {
    std::fputs("\r\033[K", stderr);
    drawn_ = false;
  }
}

void Progress::update(const StepEvent& e, int64_t memory_bytes) {
  const std::string line = format_progress_line(e, memory_bytes);
  if (!tty_) {
    if ((every_ > 0 && e.step % every_ == 0) || e.step == total_) log::info(line);
    return;
  }
  constexpr int kWidth = 20;
  const int filled = total_ > 0 ? static_cast<int>(kWidth * e.step / total_) : kWidth;
  std::string bar = "[" + std::string(static_cast<size_t>(filled), '#') +
                    std::string(static_cast<size_t>(kWidth - filled), '.') + "] ";
  std::fprintf(stderr, "\r\033[K%s%s", bar.c_str(), line.c_str());
  std::fflush(stderr);
  drawn_ = true;
}

void Progress::message(const std::string& line) {
  clear();
  log::info(line);
}

void Progress::finish() {
  if (tty_ && drawn_) {
    std::fputs("\n", stderr);
    drawn_ = false;
  }
}

// ---------------------------------------------------------------- MetricsLog

std::string MetricsLog::path_in(const std::string& dir) { return (std::filesystem::path(dir) / "metrics.jsonl").string(); }

MetricsLog::MetricsLog(const std::string& dir) : path_(path_in(dir)) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  file_ = std::fopen(path_.c_str(), "a");
  if (!file_)
    throw std::runtime_error("cannot open " + path_ + " for appending: " + std::strerror(errno) +
                             "; check output.dir and its permissions");
}

MetricsLog::~MetricsLog() {
  if (file_) std::fclose(file_);
}

void MetricsLog::write(const std::string& json_line) {
  std::fputs(json_line.c_str(), file_);
  std::fputc('\n', file_);
  std::fflush(file_);
}

}  // namespace qlora::train
