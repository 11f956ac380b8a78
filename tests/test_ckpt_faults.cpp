// ckpt faults: a writer SIGKILLed at random moments never leaves a checkpoint
// that find_latest_valid takes but does not verify, and a save that runs out
// of room (RLIMIT_FSIZE: write() fails with EFBIG, as on a full disk) leaves
// the previous checkpoint untouched with a clear error.
// The faulty writers run in fork()ed children: no gtest assertion there, only
// _exit codes and a pipe back to the parent.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "qlora/ckpt/store.h"
#include "support/test_support.h"

namespace qlora::ckpt {
namespace {

namespace stdfs = std::filesystem;

// >= 50 saves interrupted, as the issue asks; 60 rounds took 6-12 s on the
// shared dev machine (fsync-bound).
constexpr int kKillRounds = 60;
// Kill after a seeded random delay in 0..max(30 ms, 3 saves): a save of
// ~300 KB with its fsyncs took 30-80 ms on the dev machine's shared ext4 and
// ~2 ms on tmpfs, so the range follows the measured save time and kills land
// before, inside and between saves on either.
constexpr int kMinKillDelayRangeUs = 30000;
constexpr int kSavesPerDelayRange = 3;
// Rounds in which a kill caught a save half-written (a temp dir was left), and
// rounds in which the newest checkpoint moved on: each must happen at least
// this often, or the test proved nothing. Seen on the dev machine: 36-51
// mid-save kills and 19-46 advancing rounds of 60 (the test prints both).
constexpr int kMinMidSaveKills = 10;
constexpr int kMinAdvancedRounds = 10;
constexpr int kKeepLast = 2;

// The bytes of file `index` of the checkpoint for `step`: step-dependent, so a
// checkpoint holding another step's data is caught too.
std::string payload(int64_t step, int index) {
  static constexpr size_t kSizes[] = {160 * 1024, 96 * 1024, 40 * 1024 + 7};
  std::mt19937_64 rng(static_cast<uint64_t>(step) * 7919 + static_cast<uint64_t>(index));
  std::string s(kSizes[index], '\0');
  for (size_t i = 0; i + 8 <= s.size(); i += 8) {
    const uint64_t r = rng();
    std::memcpy(&s[i], &r, 8);
  }
  return s;
}
const char* kPayloadNames[] = {"adapter.safetensors", "optimizer.bin", "rng_state.bin"};

void save_step(const std::string& out, int64_t step) {
  CheckpointWriter w(out, step);
  for (int i = 0; i < 3; ++i) w.write_text(kPayloadNames[i], payload(step, i));
  w.write_json("trainer_state.json", {{"step", step}});
  w.commit({{"config_sha256", "0123"}});
}

// The child: continues from the newest valid checkpoint and saves forever.
// With `resave_first` it first saves the step it resumed from again (a resumed
// run saving on SIGINT before its next step), which replaces checkpoint-<N>.
[[noreturn]] void saving_child(const std::string& out, bool resave_first) {
  try {
    const Found f = find_latest_valid(out);
    for (int64_t step = f ? f.step + (resave_first ? 0 : 1) : 0;; ++step) {
      save_step(out, step);
      prune_checkpoints(out, kKeepLast);
    }
  } catch (...) {
    ::_exit(3);
  }
}

// Empty when `f` is a sound checkpoint holding exactly its step's data.
std::string check_found(const Found& f) {
  if (!f) return "no checkpoint found";
  if (stdfs::path(f.path).filename().string().rfind("checkpoint-", 0) != 0) return "took " + f.path;
  const Verification v = verify_checkpoint(f.path);
  if (!v.ok) return "does not verify: " + v.reason;
  for (int i = 0; i < 3; ++i) {
    std::ifstream in(f.path + "/" + kPayloadNames[i], std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(in)), {});
    if (bytes != payload(f.step, i)) return std::string(kPayloadNames[i]) + " holds another step's bytes";
  }
  return "";
}

TEST(CkptFaults, SigkillDuringSavesNeverLeavesABadCheckpoint) {
  const std::string out = testing::make_temp_dir("ckpt-kill");
  // A valid checkpoint exists before the first kill; the slowest of three
  // saves sets the delay range.
  int64_t save_us = 0;
  for (int64_t step = 0; step < 3; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    save_step(out, step);
    const auto us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0);
    save_us = std::max<int64_t>(save_us, us.count());
  }
  const int64_t delay_range_us = std::max<int64_t>(kMinKillDelayRangeUs, kSavesPerDelayRange * save_us);
  std::mt19937 rng(20261124);
  int mid_save_kills = 0, advanced = 0, killed = 0;
  int64_t last_step = 2;
  for (int round = 0; round < kKillRounds; ++round) {
    const int delay_us = static_cast<int>(rng() % static_cast<uint64_t>(delay_range_us + 1));
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0) << "fork failed";
    if (pid == 0) saving_child(out, /*resave_first=*/round % 3 == 0);
    ::usleep(static_cast<useconds_t>(delay_us));
    ::kill(pid, SIGKILL);
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    ASSERT_FALSE(WIFEXITED(status)) << "round " << round << ": the saving child failed, exit " << WEXITSTATUS(status);
    killed += WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;

    bool temp_left = false;
    for (const auto& e : stdfs::directory_iterator(out)) {
      temp_left |= e.path().filename().string().rfind(".tmp-checkpoint-", 0) == 0;
    }
    mid_save_kills += temp_left;
    const Found f = find_latest_valid(out);
    const std::string problem = check_found(f);
    ASSERT_EQ(problem, "") << "round " << round << " (kill after " << delay_us << " us)";
    // A kill can interrupt a save but never damage a published checkpoint.
    EXPECT_TRUE(f.warnings.empty()) << "round " << round << ": " << f.warnings.front();
    for (const auto& dir : list_checkpoints(out)) {
      const Verification v = verify_checkpoint(dir);
      EXPECT_TRUE(v.ok) << "round " << round << ": " << v.reason;
    }
    EXPECT_GE(f.step, last_step) << "round " << round << ": the newest valid checkpoint went back";
    advanced += f.step > last_step;
    last_step = f.step;
  }
  EXPECT_EQ(killed, kKillRounds);
  EXPECT_GE(mid_save_kills, kMinMidSaveKills) << "too few kills landed inside a save to prove anything";
  EXPECT_GE(advanced, kMinAdvancedRounds) << "too few kills landed after a completed save";
  std::printf("kill rounds %d (delays 0..%lld us, a save took %lld us): mid-save kills %d, rounds that "
              "advanced %d, last step %lld\n",
              kKillRounds, static_cast<long long>(delay_range_us), static_cast<long long>(save_us),
              mid_save_kills, advanced, static_cast<long long>(last_step));
  // The next writer's prune clears what the killed ones left.
  prune_checkpoints(out, kKeepLast);
  for (const auto& e : stdfs::directory_iterator(out)) {
    EXPECT_EQ(e.path().filename().string().rfind(".tmp-", 0), std::string::npos) << e.path();
  }
  stdfs::remove_all(out);
}

// ---------------------------------------------------------------- full disk
struct ChildResult {
  int exit_code = -1;   // 0: threw CheckpointError; 10: the save succeeded
  std::string message;  // what() of the exception
};

// Runs `save` in a child whose files may not grow past `limit` bytes.
template <typename Save>
ChildResult run_with_file_size_limit(rlim_t limit, Save save) {
  int fds[2];
  if (::pipe(fds) != 0) return {};
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(fds[0]);
    ::signal(SIGXFSZ, SIG_IGN);  // write() then fails with EFBIG instead of killing us
    const rlimit rl{limit, limit};
    if (::setrlimit(RLIMIT_FSIZE, &rl) != 0) ::_exit(12);
    int code = 10;
    std::string msg;
    try {
      save();
    } catch (const CheckpointError& e) {
      code = 0;
      msg = e.what();
    } catch (const std::exception& e) {
      code = 11;
      msg = e.what();
    }
    for (size_t off = 0; off < msg.size();) {
      const ssize_t n = ::write(fds[1], msg.data() + off, msg.size() - off);
      if (n <= 0) break;
      off += static_cast<size_t>(n);
    }
    ::_exit(code);
  }
  ::close(fds[1]);
  ChildResult r;
  char buf[4096];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) > 0;) r.message.append(buf, static_cast<size_t>(n));
  ::close(fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

void expect_previous_untouched(const std::string& out, int64_t good_step) {
  const Found f = find_latest_valid(out);
  ASSERT_TRUE(f);
  EXPECT_EQ(f.step, good_step);
  EXPECT_EQ(check_found(f), "");
  EXPECT_TRUE(f.warnings.empty());
  for (const auto& e : stdfs::directory_iterator(out)) {
    EXPECT_EQ(e.path().filename().string().rfind(".tmp-", 0), std::string::npos) << "left behind: " << e.path();
  }
}

constexpr rlim_t kFileSizeLimit = 64 * 1024;  // below payload(…, 0) and (…, 1), above the manifest

TEST(CkptFaults, FullDiskWhileWritingADataFile) {
  const std::string out = testing::make_temp_dir("ckpt-full");
  save_step(out, 1);
  const ChildResult r = run_with_file_size_limit(kFileSizeLimit, [&] { save_step(out, 2); });
  ASSERT_EQ(r.exit_code, 0) << "expected a CheckpointError, got: " << r.message;
  EXPECT_TRUE(contains(r.message, "adapter.safetensors")) << r.message;
  EXPECT_TRUE(contains(r.message, "File too large (EFBIG)")) << r.message;
  EXPECT_TRUE(contains(r.message, "checkpoint 2 not saved")) << r.message;
  EXPECT_TRUE(contains(r.message, "previous checkpoints in " + out + " are untouched")) << r.message;
  expect_previous_untouched(out, 1);
  EXPECT_FALSE(stdfs::exists(out + "/checkpoint-2"));
  stdfs::remove_all(out);
}

TEST(CkptFaults, FullDiskWhileWritingTheManifest) {
  const std::string out = testing::make_temp_dir("ckpt-full");
  save_step(out, 1);
  // Small files, but a manifest larger than the limit (a big `extra`).
  const ChildResult r = run_with_file_size_limit(kFileSizeLimit, [&] {
    CheckpointWriter w(out, 2);
    w.write_text("adapter.safetensors", "small");
    w.commit({{"notes", std::string(2 * kFileSizeLimit, 'n')}});
  });
  ASSERT_EQ(r.exit_code, 0) << "expected a CheckpointError, got: " << r.message;
  EXPECT_TRUE(contains(r.message, "manifest.json")) << r.message;
  EXPECT_TRUE(contains(r.message, "File too large")) << r.message;
  EXPECT_TRUE(contains(r.message, "untouched")) << r.message;
  expect_previous_untouched(out, 1);
  stdfs::remove_all(out);
}

// Re-saving an existing step (after a resume) on a full disk keeps the old one.
TEST(CkptFaults, FullDiskDuringAResaveKeepsTheOldCheckpoint) {
  const std::string out = testing::make_temp_dir("ckpt-full");
  save_step(out, 1);
  save_step(out, 2);
  const ChildResult r = run_with_file_size_limit(kFileSizeLimit, [&] { save_step(out, 2); });
  ASSERT_EQ(r.exit_code, 0) << "expected a CheckpointError, got: " << r.message;
  EXPECT_TRUE(contains(r.message, "checkpoint 2 not saved")) << r.message;
  expect_previous_untouched(out, 2);
  stdfs::remove_all(out);
}

}  // namespace
}  // namespace qlora::ckpt
