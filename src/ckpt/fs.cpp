#include "ckpt/fs.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <system_error>
#include <vector>

#include "qlora/ckpt/sha256.h"
#include "qlora/ckpt/store.h"

namespace qlora::ckpt::fs {
namespace {

const char* errno_name(int err) {
  switch (err) {
    case ENOSPC: return "ENOSPC";
    case EFBIG: return "EFBIG";
    case EDQUOT: return "EDQUOT";
    case EACCES: return "EACCES";
    case EPERM: return "EPERM";
    case EROFS: return "EROFS";
    case EIO: return "EIO";
    case ENOENT: return "ENOENT";
    case EEXIST: return "EEXIST";
    case ENOTDIR: return "ENOTDIR";
    case EISDIR: return "EISDIR";
    case ENOTEMPTY: return "ENOTEMPTY";
    case EMFILE: return "EMFILE";
    case ENAMETOOLONG: return "ENAMETOOLONG";
    case EXDEV: return "EXDEV";
    default: return nullptr;
  }
}

[[noreturn]] void throw_os(const std::string& what, const std::string& path, int err) {
  throw CheckpointError("cannot " + what + " " + path + ": " + os_error_text(err));
}

// Closes fd, reporting a failure (NFS and some full disks report write errors
// only at close) unless an error is already being thrown.
void close_checked(int fd, const std::string& path) {
  if (::close(fd) != 0 && errno != EINTR) throw_os("close", path, errno);
}

FileDigest read_and_hash(const std::string& path, bool sync) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw_os("open", path, errno);
  Sha256 h;
  FileDigest d;
  std::vector<uint8_t> chunk(1 << 20);
  for (;;) {
    const ssize_t got = ::read(fd, chunk.data(), chunk.size());
    if (got < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      throw_os("read", path, err);
    }
    if (got == 0) break;
    h.update(chunk.data(), static_cast<size_t>(got));
    d.bytes += static_cast<uint64_t>(got);
  }
  if (sync && ::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    throw_os("fsync", path, err);
  }
  close_checked(fd, path);
  d.sha256 = h.hex_digest();
  return d;
}

}  // namespace

std::string os_error_text(int err) {
  std::string text = std::strerror(err);
  if (const char* name = errno_name(err)) text += std::string(" (") + name + ")";
  return text;
}

std::string join(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

std::string base_name(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

void write_all(const std::string& path, const void* data, size_t n, bool sync) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw_os("create", path, errno);
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t put = ::write(fd, p, n);
    if (put < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      throw_os("write", path, err);
    }
    p += put;
    n -= static_cast<size_t>(put);
  }
  if (sync && ::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    throw_os("fsync", path, err);
  }
  close_checked(fd, path);
}

FileDigest hash_and_sync(const std::string& path) { return read_and_hash(path, true); }
FileDigest hash_file(const std::string& path) { return read_and_hash(path, false); }

void fsync_dir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw_os("open directory", dir, errno);
  // Some file systems refuse fsync on a directory (EINVAL): nothing to flush there.
  if (::fsync(fd) != 0 && errno != EINVAL) {
    const int err = errno;
    ::close(fd);
    throw_os("fsync directory", dir, err);
  }
  ::close(fd);
}

void make_dirs(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw CheckpointError("cannot create directory " + dir + ": " + os_error_text(ec.value()));
}

void rename_path(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0) {
    const int err = errno;
    throw CheckpointError("cannot rename " + from + " to " + to + ": " + os_error_text(err));
  }
}

bool exchange_paths(const std::string& a, const std::string& b) {
  if (::renameat2(AT_FDCWD, a.c_str(), AT_FDCWD, b.c_str(), RENAME_EXCHANGE) == 0) return true;
  const int err = errno;
  if (err == EINVAL || err == ENOSYS || err == ENOTSUP) return false;
  throw CheckpointError("cannot exchange " + a + " and " + b + ": " + os_error_text(err));
}

void remove_tree(const std::string& path) noexcept {
  std::error_code ec;
  std::filesystem::remove_all(path, ec);
}

Kind kind_of(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return Kind::kMissing;
  if (S_ISREG(st.st_mode)) return Kind::kFile;
  if (S_ISDIR(st.st_mode)) return Kind::kDir;
  return Kind::kOther;
}

uint64_t file_size(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) throw_os("stat", path, errno);
  return static_cast<uint64_t>(st.st_size);
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) {
    if (errno == ENOENT) return names;
    throw_os("list directory", dir, errno);
  }
  errno = 0;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  const int err = errno;
  ::closedir(d);
  if (err != 0) throw_os("list directory", dir, err);
  return names;
}

bool process_alive(pid_t pid) {
  if (pid <= 0) return true;  // unknown: be safe, treat as running
  if (pid == ::getpid()) return true;
  return ::kill(pid, 0) == 0 || errno == EPERM;
}

}  // namespace qlora::ckpt::fs
