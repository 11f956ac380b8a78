#include "qlora/ckpt/lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <ctime>

#include <nlohmann/json.hpp>

#include "ckpt/fs.h"
#include "qlora/ckpt/store.h"
#include "qlora/common/errors.h"

namespace qlora::ckpt {
namespace {

std::string this_host() {
  char name[HOST_NAME_MAX + 1] = {};
  if (::gethostname(name, sizeof name - 1) != 0) return "unknown";
  return name;
}

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  ::gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string read_fd(int fd) {
  std::string text;
  char buf[512];
  off_t at = 0;
  for (ssize_t n; (n = ::pread(fd, buf, sizeof buf, at)) > 0; at += n) text.append(buf, static_cast<size_t>(n));
  return text;
}

// An unreadable or empty file (a holder killed between creating and writing
// it) says nothing: pid 0.
LockHolder parse_holder(const std::string& text) {
  LockHolder h;
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return h;
  h.pid = j.value("pid", 0L);
  h.host = j.value("host", std::string());
  h.started = j.value("started", std::string());
  return h;
}

void write_holder(int fd, const std::string& path) {
  const std::string text =
      nlohmann::json{{"pid", static_cast<long>(::getpid())}, {"host", this_host()}, {"started", utc_now()}}.dump() + "\n";
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, text.data(), text.size(), 0) != static_cast<ssize_t>(text.size()))
    throw CheckpointError(path + ": cannot write the run's lock file: " + fs::os_error_text(errno));
}

}  // namespace

std::string LockHolder::describe() const {
  if (pid <= 0) return "a process that did not say which";
  return "process " + std::to_string(pid) + " on host " + (host.empty() ? "?" : host) +
         (started.empty() ? "" : " (since " + started + ")");
}

// Note [output directory lock]
// flock, not the file's existence, says whether a run holds the directory:
// the kernel releases it when the holder dies, kill -9 included, so a lock
// left behind never blocks a run on the same host. The file's text only names
// the holder. Releasing removes the file first; a run that opened it just
// before and then got the flock holds a file no longer at `path`, so after
// every flock the descriptor's inode is compared with the path's, and the
// open is retried when they differ.
OutputDirLock::OutputDirLock(const std::string& output_dir, std::string* warning)
    : path_(fs::join(output_dir, kLockFile)) {
  fs::make_dirs(output_dir);
  for (int attempt = 0; attempt < 8; ++attempt) {
    const int fd = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) throw CheckpointError(path_ + ": cannot create the run's lock file: " + fs::os_error_text(errno));
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      const int err = errno;
      const LockHolder holder = parse_holder(read_fd(fd));
      ::close(fd);
      if (err == EWOULDBLOCK)
        throw InputError(output_dir + " is in use by another qlora run: " + holder.describe() + " holds " + path_ +
                         ". Wait for that run to end (or stop it), or set output.dir to another directory");
      throw CheckpointError(path_ + ": cannot lock the output directory: " + fs::os_error_text(err));
    }
    struct stat by_fd {}, by_path {};
    if (::fstat(fd, &by_fd) != 0 || ::stat(path_.c_str(), &by_path) != 0 || by_fd.st_ino != by_path.st_ino ||
        by_fd.st_dev != by_path.st_dev) {
      ::close(fd);  // the holder removed it as we opened it: open the new one
      continue;
    }
    const std::string old = read_fd(fd);
    if (!old.empty()) {
      const LockHolder holder = parse_holder(old);
      if (!holder.host.empty() && holder.host != this_host()) {
        ::close(fd);
        throw InputError(path_ + " was written by " + holder.describe() +
                         ", another machine, whose process this one cannot check. If that run has ended, delete " +
                         path_ + " and start again; else set output.dir to another directory");
      }
      if (warning != nullptr)
        *warning = "taking over " + path_ + " from " + holder.describe() +
                   ", which ended without removing it (killed?); its checkpoints are checked before a resume";
    }
    try {
      write_holder(fd, path_);
    } catch (...) {
      ::close(fd);
      throw;
    }
    fd_ = fd;
    return;
  }
  throw CheckpointError(path_ + ": the lock file kept changing while it was being taken; try again");
}

OutputDirLock::~OutputDirLock() {
  if (fd_ < 0) return;
  ::unlink(path_.c_str());
  ::close(fd_);
}

}  // namespace qlora::ckpt
