// ckpt/store: checkpoint directories on disk, nothing about what is in them.
// A checkpoint is output_dir/checkpoint-<step>/: flat files written by the
// caller plus manifest.json (format version, step, size and sha256 of every
// file, the caller's `extra`, and a hash of the manifest itself). It appears
// under that name only once complete (Note [atomic checkpoint] in
// src/ckpt/store.cpp), so a kill or a full disk mid-save leaves the previous
// checkpoints as they were. No torch here: the trainer decides the contents.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace qlora::ckpt {

inline constexpr int kManifestFormatVersion = 1;
inline constexpr const char* kManifestFile = "manifest.json";

// A save or a listing failed for a reason of the machine (disk full, file too
// large, permission, I/O error). The message names the path and the OS error,
// and says whether the previous checkpoints are untouched.
class CheckpointError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// ---------------------------------------------------------------- writing
// One checkpoint being written. Files go into a hidden temp directory in
// output_dir; commit() seals and publishes it as checkpoint-<step>, replacing
// an existing checkpoint-<step> atomically (a re-save after a resume). A writer
// destroyed without a successful commit removes its temp directory.
class CheckpointWriter {
 public:
  // Creates output_dir (and parents) when missing and
  // output_dir/.tmp-checkpoint-<step>-<pid>-<n>. Throws CheckpointError.
  CheckpointWriter(std::string output_dir, int64_t step);
  ~CheckpointWriter();  // never throws
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;

  // Where the caller writes `file` itself (e.g. a safetensors writer). Flat
  // names only: no '/', not hidden, not manifest.json (std::invalid_argument).
  std::string path(const std::string& file) const;
  void write_file(const std::string& file, const void* data, size_t n);  // throws CheckpointError
  void write_text(const std::string& file, const std::string& text) { write_file(file, text.data(), text.size()); }
  void write_json(const std::string& file, const nlohmann::json& j);    // pretty-printed

  // Hashes and fsyncs every file, writes and fsyncs manifest.json (with `extra`
  // under the key "extra": config hash, versions, ...), fsyncs the temp dir,
  // renames it to output_dir/checkpoint-<step> and fsyncs output_dir. Returns
  // the final path. On failure throws CheckpointError and removes the temp dir.
  std::string commit(const nlohmann::json& extra = nlohmann::json::object());

  const std::string& temp_dir() const { return temp_dir_; }
  int64_t step() const { return step_; }

 private:
  [[noreturn]] void fail(const std::string& cause);  // removes the temp dir, throws

  std::string output_dir_;
  int64_t step_;
  std::string temp_dir_;
  bool committed_ = false;
};

// ---------------------------------------------------------------- reading
struct Verification {
  bool ok = false;
  std::string reason;        // empty when ok; else names the file and what is wrong
  nlohmann::json manifest;   // the parsed manifest when it could be read, else null
};

// Checks manifest.json (parses, format version, self-hash, step agrees with a
// checkpoint-<N> directory name) and every file it lists (present, size,
// sha256), and that no unlisted file is present. Never throws for a bad
// checkpoint: the reason says what is wrong.
Verification verify_checkpoint(const std::string& dir);

// The newest checkpoint of output_dir that verifies. `warnings` has one line
// per newer checkpoint skipped and why. path is empty (and the bool false)
// when none verifies; the warnings then say what was wrong with each. A
// missing output_dir finds nothing; one that cannot be listed throws
// CheckpointError.
struct Found {
  std::string path;
  int64_t step = -1;
  std::vector<std::string> warnings;
  explicit operator bool() const { return !path.empty(); }
};
Found find_latest_valid(const std::string& output_dir);

// output_dir/checkpoint-<N> directories (full paths), sorted by N ascending.
// Temp directories are never listed. A missing output_dir lists nothing.
std::vector<std::string> list_checkpoints(const std::string& output_dir);

// The N of a ".../checkpoint-<N>" path, or -1 when the name is not one.
int64_t checkpoint_step(const std::string& dir);

// Keeps the newest `keep_last` complete checkpoints (manifest present and every
// listed file of the listed size; <= 0: keep all) and removes the older ones,
// but never the newest one that fully verifies. Also removes temp directories
// left by writers that are no longer running. Deletion goes through a rename to
// a temp name first, so a kill mid-delete never leaves a half checkpoint-<N>.
void prune_checkpoints(const std::string& output_dir, int keep_last);

// ---------------------------------------------------------------- testing
// Off: re-saves take the path for file systems without renameat2
// RENAME_EXCHANGE (rename the old one aside, rename the new one in).
void set_rename_exchange_for_testing(bool enabled);

}  // namespace qlora::ckpt
