// ckpt/fs: the few POSIX file operations a durable checkpoint needs (write
// with every error checked, fsync of files and directories, atomic renames),
// each throwing CheckpointError with the path and the OS error.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

namespace qlora::ckpt::fs {

// "File too large (EFBIG)": strerror plus the errno name where we know it.
std::string os_error_text(int err);

std::string join(const std::string& dir, const std::string& name);
std::string base_name(std::string path);  // last component, trailing '/' ignored

// Creates or truncates `path`, writes all n bytes, fsyncs when asked, closes.
void write_all(const std::string& path, const void* data, size_t n, bool sync);

struct FileDigest {
  std::string sha256;
  uint64_t bytes = 0;
};
// Reads `path` once, hashing it, then fsyncs it (its data reaches the disk
// before the rename that publishes it).
FileDigest hash_and_sync(const std::string& path);
// The same read and hash, no fsync; throws for a missing or unreadable file.
FileDigest hash_file(const std::string& path);

void fsync_dir(const std::string& dir);
void make_dirs(const std::string& dir);  // mkdir -p
void rename_path(const std::string& from, const std::string& to);
// Swaps two existing paths in one step (renameat2 RENAME_EXCHANGE). Returns
// false, changing nothing, where the file system does not support it.
bool exchange_paths(const std::string& a, const std::string& b);
void remove_tree(const std::string& path) noexcept;  // best effort, never throws

enum class Kind { kMissing, kFile, kDir, kOther };
Kind kind_of(const std::string& path);  // does not follow symlinks
uint64_t file_size(const std::string& path);  // throws CheckpointError
// Entry names of `dir` (no "." or ".."); missing dir: empty. Throws on others.
std::vector<std::string> list_dir(const std::string& dir);

bool process_alive(pid_t pid);

}  // namespace qlora::ckpt::fs
