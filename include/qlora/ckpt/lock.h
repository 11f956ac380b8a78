// ckpt/lock: one run at a time in an output directory. The run holds
// output_dir/.qlora.lock, a file with its PID, host and start time, under an
// exclusive flock(2) for as long as it runs; the kernel drops the flock when
// the process dies, however it dies. A second run finds the flock held and
// is refused, naming the holder. A lock file left by a process that is gone
// (same host, flock free) is taken over with a warning.
#pragma once

#include <string>

namespace qlora::ckpt {

inline constexpr const char* kLockFile = ".qlora.lock";

// What the lock file says about its holder.
struct LockHolder {
  long pid = 0;
  std::string host;
  std::string started;  // ISO 8601, UTC
  std::string describe() const;  // "process 4242 on host gpu-3 (since 2026-12-07T16:40:00Z)"
};

class OutputDirLock {
 public:
  // Creates output_dir when missing and takes the lock. Throws InputError when
  // another live run holds it (the message names the process and host, and
  // what to do), CheckpointError when the file cannot be created. `warning`,
  // when not null, receives the line about a stale lock taken over.
  explicit OutputDirLock(const std::string& output_dir, std::string* warning = nullptr);
  ~OutputDirLock();  // removes the lock file, then lets go of the flock
  OutputDirLock(const OutputDirLock&) = delete;
  OutputDirLock& operator=(const OutputDirLock&) = delete;

  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
};

}  // namespace qlora::ckpt
