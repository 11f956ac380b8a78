// ckpt/store: commit/verify round trip, the manifest, a table of corruptions
// that verify must name, falling back past broken checkpoints, prune, and
// re-saving a step that already exists.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "qlora/ckpt/sha256.h"
#include "qlora/ckpt/store.h"
#include "support/test_support.h"

namespace qlora::ckpt {
namespace {

namespace stdfs = std::filesystem;
using Files = std::map<std::string, std::string>;  // name -> bytes

std::string random_bytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::string s(n, '\0');
  for (auto& c : s) c = static_cast<char>(rng());
  return s;
}

// A checkpoint's worth of files whose bytes depend on `seed`.
Files sample_files(uint64_t seed) {
  return {{"adapter.safetensors", random_bytes(5000 + seed % 97, seed)},
          {"optimizer.bin", random_bytes(3000, seed * 31 + 1)},
          {"trainer_state.json", "{\"step\": " + std::to_string(seed) + "}\n"}};
}

std::string save(const std::string& out, int64_t step, const Files& files,
                 const nlohmann::json& extra = nlohmann::json::object()) {
  CheckpointWriter w(out, step);
  for (const auto& [name, bytes] : files) w.write_text(name, bytes);
  return w.commit(extra);
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::vector<std::string> entries(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : stdfs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// A pid that is certainly not running: a child that has exited and been reaped.
pid_t dead_pid() {
  const pid_t pid = ::fork();
  if (pid == 0) ::_exit(0);
  ::waitpid(pid, nullptr, 0);
  return pid;
}

struct ScratchDir {
  std::string path = testing::make_temp_dir("ckpt-store");
  ~ScratchDir() { stdfs::remove_all(path); }
};

// ---------------------------------------------------------------- round trip
TEST(CkptStore, CommitVerifyRoundTripAndManifest) {
  ScratchDir scratch;
  const std::string out = scratch.path + "/run/out";  // parents are created
  const Files files = sample_files(5);
  const nlohmann::json extra = {{"config_sha256", sha256_hex("config")}, {"versions", {{"qlora", "0.1.0"}}}};

  CheckpointWriter w(out, 5);
  EXPECT_TRUE(contains(stdfs::path(w.temp_dir()).filename().string(), ".tmp-checkpoint-5-"));
  for (const auto& [name, bytes] : files) {
    if (name == "optimizer.bin") {
      write_bytes(w.path(name), bytes);  // written by the caller itself
    } else {
      w.write_text(name, bytes);
    }
  }
  const std::string final_dir = w.commit(extra);
  EXPECT_EQ(final_dir, out + "/checkpoint-5");
  EXPECT_EQ(entries(out), std::vector<std::string>{"checkpoint-5"}) << "temp dir left behind";

  const Verification v = verify_checkpoint(final_dir);
  ASSERT_TRUE(v.ok) << v.reason;
  const nlohmann::json& m = v.manifest;
  EXPECT_EQ(m["format_version"], kManifestFormatVersion);
  EXPECT_EQ(m["step"], 5);
  EXPECT_EQ(m["extra"], extra);
  ASSERT_EQ(m["files"].size(), files.size());
  for (const auto& [name, bytes] : files) {
    ASSERT_TRUE(m["files"].contains(name)) << name;
    EXPECT_EQ(m["files"][name]["bytes"], bytes.size()) << name;
    EXPECT_EQ(m["files"][name]["sha256"], sha256_hex(bytes)) << name;
    EXPECT_EQ(read_bytes(final_dir + "/" + name), bytes) << name;
  }
  ASSERT_TRUE(m["manifest_sha256"].is_string());
  EXPECT_EQ(m["manifest_sha256"].get<std::string>().size(), 64u);
  EXPECT_EQ(list_checkpoints(out), std::vector<std::string>{final_dir});
  EXPECT_EQ(checkpoint_step(final_dir), 5);
  EXPECT_EQ(checkpoint_step(out + "/checkpoint-05"), -1);
  EXPECT_EQ(checkpoint_step(out + "/.tmp-checkpoint-5-1-0"), -1);
}

TEST(CkptStore, WriterWithoutCommitLeavesNothing) {
  ScratchDir scratch;
  {
    CheckpointWriter w(scratch.path, 3);
    w.write_text("a.bin", "abc");
    EXPECT_TRUE(stdfs::exists(w.temp_dir()));
  }
  EXPECT_TRUE(entries(scratch.path).empty());
  EXPECT_FALSE(find_latest_valid(scratch.path));
}

TEST(CkptStore, RejectsNonFlatOrReservedNames) {
  ScratchDir scratch;
  CheckpointWriter w(scratch.path, 1);
  for (const char* bad : {"", "sub/file.bin", ".hidden", "manifest.json", "../escape"}) {
    EXPECT_THROW(w.path(bad), std::invalid_argument) << "\"" << bad << "\"";
  }
  // A directory made by the caller inside the checkpoint is refused at commit.
  stdfs::create_directory(w.temp_dir() + "/nested");
  try {
    w.commit();
    FAIL() << "commit accepted a subdirectory";
  } catch (const CheckpointError& e) {
    EXPECT_TRUE(contains(e.what(), "nested")) << e.what();
    EXPECT_TRUE(contains(e.what(), "untouched")) << e.what();
  }
  EXPECT_TRUE(entries(scratch.path).empty()) << "failed commit left its temp dir";
}

TEST(CkptStore, UnwritableOutputDirIsAClearError) {
  ScratchDir scratch;
  const std::string blocker = testing::write_file(scratch.path, "not-a-dir", "x");
  try {
    CheckpointWriter w(blocker + "/out", 2);
    FAIL() << "writer created a checkpoint under a regular file";
  } catch (const CheckpointError& e) {
    EXPECT_TRUE(contains(e.what(), blocker)) << e.what();
    EXPECT_TRUE(contains(e.what(), "Not a directory")) << e.what();
    EXPECT_TRUE(contains(e.what(), "untouched")) << e.what();
  }
}

// ---------------------------------------------------------------- corruptions
// One row per way a checkpoint can be damaged: how, to which file, and a
// fragment verify's reason must contain besides the file's name.
struct Damage {
  std::string name;
  std::function<void(const std::string& file)> apply;
  std::string fragment;
};

std::vector<Damage> damages() {
  return {
      {"truncate by one byte", [](const std::string& f) { stdfs::resize_file(f, stdfs::file_size(f) - 1); }, ""},
      {"truncate to empty", [](const std::string& f) { stdfs::resize_file(f, 0); }, ""},
      {"append a byte", [](const std::string& f) { std::ofstream(f, std::ios::app | std::ios::binary) << 'x'; }, ""},
      {"delete", [](const std::string& f) { stdfs::remove(f); }, ""},
      {"flip the first byte",
       [](const std::string& f) {
         std::string b = read_bytes(f);
         b[0] = static_cast<char>(b[0] ^ 0x01);
         write_bytes(f, b);
       },
       ""},
      {"flip the middle byte",
       [](const std::string& f) {
         std::string b = read_bytes(f);
         b[b.size() / 2] = static_cast<char>(b[b.size() / 2] ^ 0x80);
         write_bytes(f, b);
       },
       ""},
  };
}

TEST(CkptStore, VerifyNamesEveryDamagedFile) {
  ScratchDir scratch;
  const std::string pristine = save(scratch.path + "/pristine", 7, sample_files(7));
  std::vector<std::string> names;
  for (const auto& [name, bytes] : sample_files(7)) names.push_back(name);
  names.push_back("manifest.json");
  int cases = 0;
  for (const auto& name : names) {
    for (const auto& d : damages()) {
      const std::string dir = scratch.path + "/case/checkpoint-7";
      stdfs::remove_all(scratch.path + "/case");
      stdfs::create_directories(dir);
      stdfs::copy(pristine, dir);
      ASSERT_TRUE(verify_checkpoint(dir).ok) << "copy does not verify";
      d.apply(dir + "/" + name);
      const Verification v = verify_checkpoint(dir);
      EXPECT_FALSE(v.ok) << d.name << " of " << name << " went unnoticed";
      EXPECT_TRUE(contains(v.reason, name)) << d.name << " of " << name << ": " << v.reason;
      ++cases;
    }
  }
  EXPECT_EQ(cases, 4 * 6);
}

TEST(CkptStore, VerifyCatchesEveryFlippedManifestByte) {
  ScratchDir scratch;
  const std::string dir = save(scratch.path, 2, sample_files(2), {{"config_sha256", sha256_hex("c")}});
  const std::string path = dir + "/manifest.json";
  const std::string original = read_bytes(path);
  std::mt19937 rng(11);
  for (size_t i = 0; i < original.size(); ++i) {
    std::string b = original;
    b[i] = static_cast<char>(b[i] ^ (1u << (rng() % 8)));  // one random bit of byte i
    write_bytes(path, b);
    const Verification v = verify_checkpoint(dir);
    EXPECT_FALSE(v.ok) << "flipped byte " << i << " of " << original.size() << " in manifest.json";
    EXPECT_TRUE(contains(v.reason, "manifest")) << "byte " << i << ": " << v.reason;
  }
}

// A manifest whose own hash is recomputed after an edit: the checks behind the
// self-hash still hold.
void edit_manifest(const std::string& dir, const std::function<void(nlohmann::json&)>& edit, bool rehash) {
  nlohmann::json m = nlohmann::json::parse(read_bytes(dir + "/manifest.json"));
  edit(m);
  if (rehash) {
    nlohmann::json body = m;
    body.erase("manifest_sha256");
    m["manifest_sha256"] = sha256_hex(body.dump(2));
  }
  write_bytes(dir + "/manifest.json", m.dump(2) + "\n");
}

TEST(CkptStore, VerifyNamesManifestProblems) {
  struct Row {
    const char* name;
    std::function<void(const std::string& dir)> apply;
    const char* fragment;
  };
  const std::vector<Row> rows = {
      {"junk appended", [](const std::string& d) { std::ofstream(d + "/manifest.json", std::ios::app) << "}junk"; },
       "not valid JSON"},
      {"unknown key, hash recomputed",
       [](const std::string& d) { edit_manifest(d, [](nlohmann::json& m) { m["junk"] = 1; }, true); },
       "unexpected key \"junk\""},
      {"extra edited, hash kept",
       [](const std::string& d) { edit_manifest(d, [](nlohmann::json& m) { m["extra"]["lr"] = 2; }, false); },
       "altered"},
      {"future format version",
       [](const std::string& d) { edit_manifest(d, [](nlohmann::json& m) { m["format_version"] = 2; }, true); },
       "format_version 2"},
      {"lists a file that is not there",
       [](const std::string& d) {
         edit_manifest(d, [](nlohmann::json& m) { m["files"]["ghost.bin"] = {{"sha256", sha256_hex("")}, {"bytes", 0}}; },
                       true);
       },
       "ghost.bin is missing"},
      {"file not listed",
       [](const std::string& d) { testing::write_file(d, "stray.bin", "stray"); }, "stray.bin is present but not listed"},
      {"step disagrees with the directory",
       [](const std::string& d) { edit_manifest(d, [](nlohmann::json& m) { m["step"] = 8; }, true); },
       "says step 8 but the directory is checkpoint-7"},
      {"size edited to match a truncation",
       [](const std::string& d) {
         stdfs::resize_file(d + "/optimizer.bin", 100);
         edit_manifest(d, [](nlohmann::json& m) { m["files"]["optimizer.bin"]["bytes"] = 100; }, true);
       },
       "optimizer.bin is corrupt: sha256"},
      {"manifest deleted", [](const std::string& d) { stdfs::remove(d + "/manifest.json"); }, "manifest.json is missing"},
  };
  ScratchDir scratch;
  const std::string pristine = save(scratch.path + "/pristine", 7, sample_files(7), {{"lr", 1}});
  for (const auto& row : rows) {
    const std::string dir = scratch.path + "/case/checkpoint-7";
    stdfs::remove_all(scratch.path + "/case");
    stdfs::create_directories(dir);
    stdfs::copy(pristine, dir);
    row.apply(dir);
    const Verification v = verify_checkpoint(dir);
    EXPECT_FALSE(v.ok) << row.name;
    EXPECT_TRUE(contains(v.reason, row.fragment)) << row.name << ": " << v.reason;
  }
}

// ---------------------------------------------------------------- find latest
TEST(CkptStore, FindLatestFallsBackWithAWarningNamingTheNewer) {
  ScratchDir scratch;
  const std::string out = scratch.path;
  EXPECT_FALSE(find_latest_valid(out + "/missing"));
  for (int step : {1, 2, 3}) save(out, step, sample_files(step));
  Found f = find_latest_valid(out);
  ASSERT_TRUE(f);
  EXPECT_EQ(f.step, 3);
  EXPECT_TRUE(f.warnings.empty());

  // Same-size corruption of 3: only the sha256 can see it.
  std::string b = read_bytes(out + "/checkpoint-3/adapter.safetensors");
  b[100] = static_cast<char>(b[100] ^ 0x10);
  write_bytes(out + "/checkpoint-3/adapter.safetensors", b);
  f = find_latest_valid(out);
  ASSERT_TRUE(f);
  EXPECT_EQ(f.step, 2);
  EXPECT_EQ(f.path, out + "/checkpoint-2");
  ASSERT_EQ(f.warnings.size(), 1u);
  EXPECT_TRUE(contains(f.warnings[0], "checkpoint-3")) << f.warnings[0];
  EXPECT_TRUE(contains(f.warnings[0], "adapter.safetensors is corrupt: sha256")) << f.warnings[0];

  stdfs::remove(out + "/checkpoint-2/manifest.json");
  f = find_latest_valid(out);
  ASSERT_TRUE(f);
  EXPECT_EQ(f.step, 1);
  ASSERT_EQ(f.warnings.size(), 2u);
  EXPECT_TRUE(contains(f.warnings[1], "checkpoint-2")) << f.warnings[1];
  EXPECT_TRUE(contains(f.warnings[1], "manifest.json is missing")) << f.warnings[1];

  stdfs::resize_file(out + "/checkpoint-1/optimizer.bin", 10);
  f = find_latest_valid(out);
  EXPECT_FALSE(f);
  EXPECT_EQ(f.warnings.size(), 3u) << "no valid checkpoint: every one must be explained";
}

TEST(CkptStore, TempAndOddlyNamedDirectoriesAreIgnored) {
  ScratchDir scratch;
  const std::string out = scratch.path;
  const std::string good = save(out, 4, sample_files(4));
  // Complete-looking copies under names that are not checkpoint-<N>.
  for (const char* name : {".tmp-checkpoint-9-123-0", "checkpoint-09", "checkpoint-x", "checkpoint-", "xcheckpoint-9"}) {
    stdfs::create_directory(out + "/" + name);
    stdfs::copy(good, out + "/" + name);
  }
  testing::write_file(out, "checkpoint-10", "a file, not a directory");
  EXPECT_EQ(list_checkpoints(out), std::vector<std::string>{good});
  const Found f = find_latest_valid(out);
  ASSERT_TRUE(f);
  EXPECT_EQ(f.path, good);
  EXPECT_TRUE(f.warnings.empty());
}

// ---------------------------------------------------------------- prune
TEST(CkptStore, PruneKeepsNewestCompleteOnes) {
  ScratchDir scratch;
  const std::string out = scratch.path;
  for (int step = 1; step <= 5; ++step) {
    save(out, step * 10, sample_files(step));
    prune_checkpoints(out, 2);
    std::vector<std::string> expect;
    for (int k = std::max(1, step - 1); k <= step; ++k) expect.push_back(out + "/checkpoint-" + std::to_string(k * 10));
    EXPECT_EQ(list_checkpoints(out), expect) << "after saving step " << step * 10;
  }
  // A save in progress (our own, live writer) is neither counted nor removed.
  {
    CheckpointWriter w(out, 60);
    w.write_text("adapter.safetensors", "partial");
    prune_checkpoints(out, 1);
    EXPECT_TRUE(stdfs::exists(w.temp_dir()));
    EXPECT_EQ(list_checkpoints(out), std::vector<std::string>{out + "/checkpoint-50"});
  }
  prune_checkpoints(out, 0);  // keep all: removes nothing
  EXPECT_EQ(list_checkpoints(out), std::vector<std::string>{out + "/checkpoint-50"});
}

TEST(CkptStore, PruneCountsOnlyCompleteAndSparesTheNewestValid) {
  ScratchDir scratch;
  const std::string out = scratch.path;
  for (int step = 1; step <= 4; ++step) save(out, step, sample_files(step));
  // 4 is incomplete (a file lost bytes): it does not count toward keep_last,
  // and it is not deleted either (a re-save of step 4 replaces it).
  stdfs::resize_file(out + "/checkpoint-4/optimizer.bin", 1);
  prune_checkpoints(out, 2);
  EXPECT_EQ(list_checkpoints(out),
            (std::vector<std::string>{out + "/checkpoint-2", out + "/checkpoint-3", out + "/checkpoint-4"}));
  // 3 looks complete (sizes right) but a byte is flipped: keep_last 1 keeps 3,
  // and 2, the newest one that verifies, survives too.
  std::string b = read_bytes(out + "/checkpoint-3/optimizer.bin");
  b[0] = static_cast<char>(b[0] ^ 1);
  write_bytes(out + "/checkpoint-3/optimizer.bin", b);
  prune_checkpoints(out, 1);
  EXPECT_EQ(list_checkpoints(out),
            (std::vector<std::string>{out + "/checkpoint-2", out + "/checkpoint-3", out + "/checkpoint-4"}));
  EXPECT_EQ(find_latest_valid(out).step, 2);
}

TEST(CkptStore, PruneRemovesLeftoversOfDeadWritersOnly) {
  ScratchDir scratch;
  const std::string out = scratch.path;
  save(out, 1, sample_files(1));
  const std::string dead = std::to_string(dead_pid());
  const std::string live = std::to_string(::getpid());
  for (const std::string& name : {".tmp-checkpoint-2-" + dead + "-0", ".tmp-removing-0-" + dead + "-1",
                                 ".replaced-checkpoint-1-" + dead + "-2", ".tmp-checkpoint-3-" + live + "-0"}) {
    stdfs::create_directory(out + "/" + name);
    testing::write_file(out + "/" + name, "f.bin", "x");
  }
  prune_checkpoints(out, 0);
  EXPECT_EQ(entries(out), (std::vector<std::string>{".tmp-checkpoint-3-" + live + "-0", "checkpoint-1"}));
}

// ---------------------------------------------------------------- re-save
void expect_resave_replaces(const std::string& out) {
  const Files first = sample_files(1), second = sample_files(2);
  save(out, 5, first);
  const std::string dir = save(out, 5, second);
  const Verification v = verify_checkpoint(dir);
  ASSERT_TRUE(v.ok) << v.reason;
  for (const auto& [name, bytes] : second) EXPECT_EQ(read_bytes(dir + "/" + name), bytes) << name;
  EXPECT_EQ(entries(out), std::vector<std::string>{"checkpoint-5"}) << "old copy or temp dir left behind";
}

TEST(CkptStore, ResaveOfAnExistingStepReplacesItAtomically) {
  ScratchDir scratch;
  expect_resave_replaces(scratch.path);
}

TEST(CkptStore, ResaveWithoutRenameExchange) {
  ScratchDir scratch;
  set_rename_exchange_for_testing(false);
  expect_resave_replaces(scratch.path);
  set_rename_exchange_for_testing(true);
}

// The fallback re-save killed between its two renames: checkpoint-5 is gone,
// the old one sits under .replaced-...; it is still found, and kept until a
// new checkpoint-5 is published.
TEST(CkptStore, ResaveKilledBetweenRenamesIsStillFound) {
  ScratchDir scratch;
  const std::string out = scratch.path;
  save(out, 4, sample_files(4));
  save(out, 5, sample_files(5));
  const std::string aside = out + "/.replaced-checkpoint-5-" + std::to_string(dead_pid()) + "-0";
  stdfs::rename(out + "/checkpoint-5", aside);
  Found f = find_latest_valid(out);
  ASSERT_TRUE(f);
  EXPECT_EQ(f.step, 5);
  EXPECT_EQ(f.path, aside);
  prune_checkpoints(out, 1);
  EXPECT_TRUE(stdfs::exists(aside)) << "the only copy of step 5 was pruned";
  save(out, 5, sample_files(6));
  prune_checkpoints(out, 1);
  EXPECT_EQ(entries(out), std::vector<std::string>{"checkpoint-5"});
  EXPECT_EQ(find_latest_valid(out).path, out + "/checkpoint-5");
}

}  // namespace
}  // namespace qlora::ckpt
