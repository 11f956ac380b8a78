// Note [atomic checkpoint]
// A save never changes what output_dir/checkpoint-<N> names until the new
// contents are complete and on disk:
//   1. every file is written into output_dir/.tmp-checkpoint-<N>-<pid>-<n>/,
//   2. each file is read back once (its sha256 for the manifest) and fsynced,
//   3. manifest.json is written and fsynced, then the temp directory itself,
//   4. one rename publishes it as checkpoint-<N>, and output_dir is fsynced so
//      the rename survives a power loss.
// A kill anywhere before 4 leaves only a hidden temp directory, which readers
// never look at and prune_checkpoints removes once its writer (the pid in its
// name) is gone. Re-saving an existing step swaps the two directories in one
// renameat2(RENAME_EXCHANGE), so checkpoint-<N> is always the old or the new
// one; the old one then sits under the temp name and is deleted. Where the
// file system cannot exchange, the old one is renamed aside to
// .replaced-checkpoint-<N>-<pid>-<n> first, and find_latest_valid still takes
// it if a kill lands between the two renames.
// Deleting a checkpoint also starts with a rename (to .tmp-removing-...), so a
// half-deleted directory never carries a checkpoint-<N> name.
// manifest_sha256 is the sha256 of the manifest's own dump(2) without that key,
// and the file must be exactly dump(2) + "\n": any changed byte of the
// manifest is caught, even where it stays valid JSON.
#include "qlora/ckpt/store.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <set>
#include <stdexcept>

#include "ckpt/fs.h"
#include "qlora/ckpt/sha256.h"
#include "qlora/common/log.h"

namespace qlora::ckpt {
namespace {

constexpr const char* kDirPrefix = "checkpoint-";
constexpr const char* kTempPrefix = ".tmp-checkpoint-";
constexpr const char* kRemovingPrefix = ".tmp-removing-";
constexpr const char* kReplacedPrefix = ".replaced-checkpoint-";

std::atomic<uint64_t> g_unique{0};
bool g_exchange_enabled = true;  // set_rename_exchange_for_testing

bool starts_with(const std::string& s, const std::string& prefix) { return s.compare(0, prefix.size(), prefix) == 0; }

// A non-negative decimal without sign or leading zeros ("0" is fine), < 10^18.
int64_t parse_count(const std::string& s) {
  if (s.empty() || s.size() > 18 || (s.size() > 1 && s[0] == '0')) return -1;
  int64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return -1;
    v = v * 10 + (c - '0');
  }
  return v;
}

// The <step>-<pid>-<n> tail of a hidden name with `prefix`; false if it is not one.
struct HiddenName {
  int64_t step = -1;
  int64_t pid = -1;
};
bool parse_hidden(const std::string& name, const std::string& prefix, HiddenName* out) {
  if (!starts_with(name, prefix)) return false;
  const std::string tail = name.substr(prefix.size());
  const size_t a = tail.find('-');
  const size_t b = a == std::string::npos ? a : tail.find('-', a + 1);
  if (b == std::string::npos || tail.find('-', b + 1) != std::string::npos) return false;
  out->step = parse_count(tail.substr(0, a));
  out->pid = parse_count(tail.substr(a + 1, b - a - 1));
  return out->step >= 0 && out->pid > 0 && parse_count(tail.substr(b + 1)) >= 0;
}

std::string unique_tail(int64_t step) {
  return std::to_string(step) + "-" + std::to_string(::getpid()) + "-" + std::to_string(g_unique++);
}

std::string strip_trailing_slashes(std::string dir) {
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  return dir;
}

// A flat file name the caller may write: no directories, not hidden (temp
// names are hidden), not the manifest.
std::string bad_file_name_reason(const std::string& file) {
  if (file.empty()) return "is empty";
  if (file.find('/') != std::string::npos) return "contains '/' (checkpoint files are flat)";
  if (file[0] == '.') return "starts with '.' (hidden names are reserved)";
  if (file == kManifestFile) return "is reserved for the manifest";
  return "";
}

std::string manifest_hash(nlohmann::json manifest) {
  manifest.erase("manifest_sha256");
  return sha256_hex(manifest.dump(2));
}

bool is_sha256_hex(const std::string& s) {
  return s.size() == 64 && std::all_of(s.begin(), s.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

// Everything verify_checkpoint checks; hash_files=false skips the sha256 of the
// files (prune's cheap "complete" test: manifest sound, sizes right).
Verification check(const std::string& dir, bool hash_files) {
  Verification v;
  auto fail = [&](const std::string& why) {
    v.ok = false;
    v.reason = dir + ": " + why;
    return v;
  };
  if (fs::kind_of(dir) != fs::Kind::kDir) return fail("not a directory");
  const std::string manifest_path = fs::join(dir, kManifestFile);
  if (fs::kind_of(manifest_path) != fs::Kind::kFile) {
    return fail(std::string(kManifestFile) + " is missing (the save did not finish, or it was deleted)");
  }
  std::string text;
  try {
    const uint64_t size = fs::file_size(manifest_path);
    if (size > (64u << 20)) return fail(std::string(kManifestFile) + " is " + std::to_string(size) + " bytes, too large");
    text.resize(size);
    FILE* f = std::fopen(manifest_path.c_str(), "rb");
    if (f == nullptr) return fail(std::string("cannot open ") + kManifestFile);
    const size_t got = std::fread(text.data(), 1, text.size(), f);
    std::fclose(f);
    if (got != text.size()) return fail(std::string("cannot read ") + kManifestFile);
  } catch (const CheckpointError& e) {
    return fail(e.what());
  }
  nlohmann::json m;
  try {
    m = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    return fail(std::string(kManifestFile) + " is not valid JSON: " + e.what());
  }
  if (!m.is_object()) return fail(std::string(kManifestFile) + " is not a JSON object");
  static const std::set<std::string> kKeys = {"format_version", "step", "files", "extra", "manifest_sha256"};
  for (const auto& [key, value] : m.items()) {
    if (kKeys.count(key) == 0) return fail(std::string(kManifestFile) + " has an unexpected key \"" + key + "\"");
  }
  for (const auto& key : kKeys) {
    if (!m.contains(key)) return fail(std::string(kManifestFile) + " has no \"" + key + "\"");
  }
  if (!m["format_version"].is_number_integer() || m["format_version"].get<int64_t>() != kManifestFormatVersion) {
    return fail(std::string(kManifestFile) + " has format_version " + m["format_version"].dump() +
                "; this build reads version " + std::to_string(kManifestFormatVersion));
  }
  if (!m["manifest_sha256"].is_string() || m["manifest_sha256"].get<std::string>() != manifest_hash(m)) {
    return fail(std::string(kManifestFile) + " was altered: its manifest_sha256 " + m["manifest_sha256"].dump() +
                " does not match its contents (" + manifest_hash(m) + ")");
  }
  if (text != m.dump(2) + "\n") {  // whitespace edits: harmless, but not what commit() wrote
    return fail(std::string(kManifestFile) + " was altered: its bytes are not the ones commit() writes");
  }
  if (!m["step"].is_number_integer() || m["step"].get<int64_t>() < 0) {
    return fail(std::string(kManifestFile) + " has step " + m["step"].dump() + ", expected an integer >= 0");
  }
  const int64_t named_step = checkpoint_step(dir);
  if (named_step >= 0 && named_step != m["step"].get<int64_t>()) {
    return fail(std::string(kManifestFile) + " says step " + m["step"].dump() + " but the directory is " +
                fs::base_name(dir));
  }
  if (!m["files"].is_object()) return fail(std::string(kManifestFile) + ": \"files\" is not an object");
  v.manifest = m;

  std::vector<std::string> problems;
  for (const auto& [name, entry] : m["files"].items()) {
    const std::string bad = bad_file_name_reason(name);
    if (!bad.empty()) {
      problems.push_back(std::string(kManifestFile) + " lists a file \"" + name + "\" whose name " + bad);
      continue;
    }
    if (!entry.is_object() || !entry.contains("sha256") || !entry.contains("bytes") || entry.size() != 2 ||
        !entry["sha256"].is_string() || !is_sha256_hex(entry["sha256"].get<std::string>()) ||
        !entry["bytes"].is_number_unsigned()) {
      problems.push_back(std::string(kManifestFile) + ": the entry of " + name +
                         " is not {\"sha256\": 64 hex digits, \"bytes\": count}: " + entry.dump());
      continue;
    }
    const std::string path = fs::join(dir, name);
    const fs::Kind kind = fs::kind_of(path);
    if (kind == fs::Kind::kMissing) {
      problems.push_back(name + " is missing");
      continue;
    }
    if (kind != fs::Kind::kFile) {
      problems.push_back(name + " is not a regular file");
      continue;
    }
    const uint64_t expected_bytes = entry["bytes"].get<uint64_t>();
    try {
      const uint64_t bytes = fs::file_size(path);
      if (bytes != expected_bytes) {
        problems.push_back(name + " has " + std::to_string(bytes) + " bytes, the manifest says " +
                           std::to_string(expected_bytes) + " (truncated or appended to)");
        continue;
      }
      if (!hash_files) continue;
      const std::string got = fs::hash_file(path).sha256;
      const std::string expected = entry["sha256"].get<std::string>();
      if (got != expected) {
        problems.push_back(name + " is corrupt: sha256 " + got + ", the manifest says " + expected);
      }
    } catch (const CheckpointError& e) {
      problems.push_back(e.what());
    }
  }
  try {
    for (const auto& name : fs::list_dir(dir)) {
      if (name != kManifestFile && !m["files"].contains(name)) {
        problems.push_back(name + " is present but not listed in the manifest");
      }
    }
  } catch (const CheckpointError& e) {
    problems.push_back(e.what());
  }
  if (!problems.empty()) {
    std::string joined;
    for (const auto& p : problems) joined += (joined.empty() ? "" : "; ") + p;
    return fail(joined);
  }
  v.ok = true;
  return v;
}

// Removes `path` by first renaming it to a hidden name, so an interrupted
// delete never leaves something that looks like a checkpoint. Warns on failure.
void remove_checkpoint_dir(const std::string& output_dir, const std::string& path, int64_t step) {
  const std::string doomed = fs::join(output_dir, kRemovingPrefix + unique_tail(step));
  try {
    fs::rename_path(path, doomed);
  } catch (const CheckpointError& e) {
    log::warn(std::string("could not remove old checkpoint: ") + e.what());
    return;
  }
  fs::remove_tree(doomed);
}

}  // namespace

void set_rename_exchange_for_testing(bool enabled) { g_exchange_enabled = enabled; }

// ---------------------------------------------------------------- writer
CheckpointWriter::CheckpointWriter(std::string output_dir, int64_t step)
    : output_dir_(strip_trailing_slashes(std::move(output_dir))), step_(step) {
  if (step < 0) throw std::invalid_argument("CheckpointWriter: step must be >= 0, got " + std::to_string(step));
  if (output_dir_.empty()) throw std::invalid_argument("CheckpointWriter: output_dir is empty");
  const std::string temp = fs::join(output_dir_, kTempPrefix + unique_tail(step));
  try {
    fs::make_dirs(output_dir_);
    fs::make_dirs(temp);
  } catch (const CheckpointError& e) {
    fs::remove_tree(temp);
    throw CheckpointError(std::string("checkpoint ") + std::to_string(step) + " not saved: " + e.what() +
                          ". The previous checkpoints in " + output_dir_ + " are untouched.");
  }
  temp_dir_ = temp;
}

CheckpointWriter::~CheckpointWriter() {
  if (!committed_ && !temp_dir_.empty()) fs::remove_tree(temp_dir_);
}

std::string CheckpointWriter::path(const std::string& file) const {
  const std::string bad = bad_file_name_reason(file);
  if (!bad.empty()) throw std::invalid_argument("checkpoint file name \"" + file + "\" " + bad);
  if (temp_dir_.empty()) throw std::logic_error("CheckpointWriter used after a failed save");
  if (committed_) throw std::logic_error("CheckpointWriter used after commit()");
  return fs::join(temp_dir_, file);
}

[[noreturn]] void CheckpointWriter::fail(const std::string& cause) {
  fs::remove_tree(temp_dir_);
  temp_dir_.clear();
  throw CheckpointError("checkpoint " + std::to_string(step_) + " not saved: " + cause +
                        ". The previous checkpoints in " + output_dir_ +
                        " are untouched and the partial save was removed; fix the cause (disk space, file-size "
                        "limit, permissions) and save again.");
}

void CheckpointWriter::write_file(const std::string& file, const void* data, size_t n) {
  const std::string target = path(file);
  try {
    fs::write_all(target, data, n, /*sync=*/false);  // commit() fsyncs every file
  } catch (const CheckpointError& e) {
    fail(e.what());
  }
}

void CheckpointWriter::write_json(const std::string& file, const nlohmann::json& j) {
  write_text(file, j.dump(2) + "\n");
}

std::string CheckpointWriter::commit(const nlohmann::json& extra) {
  if (temp_dir_.empty()) throw std::logic_error("CheckpointWriter::commit after a failed save");
  if (committed_) throw std::logic_error("CheckpointWriter::commit called twice");
  const std::string final_dir = fs::join(output_dir_, kDirPrefix + std::to_string(step_));
  try {
    std::vector<std::string> names = fs::list_dir(temp_dir_);
    std::sort(names.begin(), names.end());
    nlohmann::json files = nlohmann::json::object();
    for (const auto& name : names) {
      const std::string full = fs::join(temp_dir_, name);
      const std::string bad = bad_file_name_reason(name);
      if (!bad.empty()) throw CheckpointError(full + ": a checkpoint file name that " + bad);
      if (fs::kind_of(full) != fs::Kind::kFile) throw CheckpointError(full + " is not a regular file (checkpoints are flat)");
      const fs::FileDigest d = fs::hash_and_sync(full);
      files[name] = {{"sha256", d.sha256}, {"bytes", d.bytes}};
    }
    nlohmann::json manifest = {{"format_version", kManifestFormatVersion},
                               {"step", step_},
                               {"files", files},
                               {"extra", extra.is_null() ? nlohmann::json::object() : extra}};
    manifest["manifest_sha256"] = manifest_hash(manifest);
    const std::string text = manifest.dump(2) + "\n";
    fs::write_all(fs::join(temp_dir_, kManifestFile), text.data(), text.size(), /*sync=*/true);
    fs::fsync_dir(temp_dir_);
  } catch (const CheckpointError& e) {
    fail(e.what());
  }

  // Publish (Note [atomic checkpoint]). Up to the rename a failure leaves the
  // old checkpoint-<step> (if any) in place.
  std::string old_copy;  // where a replaced checkpoint-<step> ended up
  try {
    if (fs::kind_of(final_dir) == fs::Kind::kMissing) {
      fs::rename_path(temp_dir_, final_dir);
    } else if (g_exchange_enabled && fs::exchange_paths(temp_dir_, final_dir)) {
      old_copy = temp_dir_;
    } else {
      old_copy = fs::join(output_dir_, kReplacedPrefix + unique_tail(step_));
      fs::rename_path(final_dir, old_copy);
      try {
        fs::rename_path(temp_dir_, final_dir);
      } catch (const CheckpointError&) {
        try {
          fs::rename_path(old_copy, final_dir);
        } catch (const CheckpointError&) {
          // find_latest_valid still finds it under its .replaced- name.
        }
        throw;
      }
    }
  } catch (const CheckpointError& e) {
    fail(e.what());
  }
  committed_ = true;
  try {
    fs::fsync_dir(output_dir_);
  } catch (const CheckpointError& e) {
    throw CheckpointError(final_dir + " was written, but making its rename durable failed: " + e.what() +
                          ". It may not survive a power loss; the previous checkpoints are still in " + output_dir_ +
                          ".");
  }
  if (!old_copy.empty()) fs::remove_tree(old_copy);
  return final_dir;
}

// ---------------------------------------------------------------- reading
Verification verify_checkpoint(const std::string& dir) { return check(strip_trailing_slashes(dir), true); }

int64_t checkpoint_step(const std::string& dir) {
  const std::string name = fs::base_name(dir);
  if (!starts_with(name, kDirPrefix)) return -1;
  return parse_count(name.substr(std::string(kDirPrefix).size()));
}

std::vector<std::string> list_checkpoints(const std::string& output_dir) {
  const std::string root = strip_trailing_slashes(output_dir);
  std::vector<std::pair<int64_t, std::string>> found;
  for (const auto& name : fs::list_dir(root)) {
    const int64_t step = checkpoint_step(name);
    const std::string path = fs::join(root, name);
    if (step >= 0 && fs::kind_of(path) == fs::Kind::kDir) found.emplace_back(step, path);
  }
  std::sort(found.begin(), found.end());
  std::vector<std::string> paths;
  for (auto& [step, path] : found) paths.push_back(std::move(path));
  return paths;
}

Found find_latest_valid(const std::string& output_dir) {
  const std::string root = strip_trailing_slashes(output_dir);
  // Candidates newest first: checkpoint-<N>, plus a .replaced-checkpoint-<N>
  // left by a re-save killed between its two renames, when no checkpoint-<N> exists.
  std::vector<std::pair<int64_t, std::string>> candidates;
  std::set<int64_t> published;
  for (const auto& path : list_checkpoints(root)) {
    published.insert(checkpoint_step(path));
    candidates.emplace_back(checkpoint_step(path), path);
  }
  for (const auto& name : fs::list_dir(root)) {
    HiddenName h;
    const std::string path = fs::join(root, name);
    if (parse_hidden(name, kReplacedPrefix, &h) && published.count(h.step) == 0 &&
        fs::kind_of(path) == fs::Kind::kDir) {
      candidates.emplace_back(h.step, path);
    }
  }
  std::sort(candidates.begin(), candidates.end(), [](const auto& a, const auto& b) { return a > b; });
  Found found;
  for (const auto& [step, path] : candidates) {
    const Verification v = verify_checkpoint(path);
    if (v.ok) {
      found.path = path;
      found.step = step;
      return found;
    }
    found.warnings.push_back("skipped checkpoint " + std::to_string(step) + ": " + v.reason);
  }
  return found;
}

void prune_checkpoints(const std::string& output_dir, int keep_last) {
  const std::string root = strip_trailing_slashes(output_dir);
  const std::vector<std::string> checkpoints = list_checkpoints(root);
  std::set<int64_t> published;
  for (const auto& path : checkpoints) published.insert(checkpoint_step(path));

  // Leftovers of writers that are gone: temp and half-deleted directories, and
  // replaced copies whose step has been published again.
  for (const auto& name : fs::list_dir(root)) {
    HiddenName h;
    const bool leftover = parse_hidden(name, kTempPrefix, &h) || parse_hidden(name, kRemovingPrefix, &h) ||
                          (parse_hidden(name, kReplacedPrefix, &h) && published.count(h.step) > 0);
    if (leftover && !fs::process_alive(static_cast<pid_t>(h.pid))) fs::remove_tree(fs::join(root, name));
  }
  if (keep_last <= 0) return;

  std::set<std::string> keep;
  int complete = 0;
  for (auto it = checkpoints.rbegin(); it != checkpoints.rend(); ++it) {
    if (complete < keep_last && check(*it, /*hash_files=*/false).ok) {
      keep.insert(*it);
      ++complete;
    }
  }
  if (complete < keep_last) return;  // fewer complete ones than asked to keep: remove nothing
  for (auto it = checkpoints.rbegin(); it != checkpoints.rend(); ++it) {
    if (verify_checkpoint(*it).ok) {  // the newest valid one survives, whatever keep_last says
      keep.insert(*it);
      break;
    }
  }
  // Only checkpoints older than the oldest kept complete one go; a newer broken
  // one is left for a re-save of its step to replace (and for a human to see).
  int64_t oldest_kept = -1;
  for (const auto& path : checkpoints) {
    if (keep.count(path) > 0) {
      oldest_kept = checkpoint_step(path);
      break;
    }
  }
  for (const auto& path : checkpoints) {
    const int64_t step = checkpoint_step(path);
    if (step < oldest_kept && keep.count(path) == 0) remove_checkpoint_dir(root, path, step);
  }
}

}  // namespace qlora::ckpt
