// The output directory lock: one run at a time in a directory, a lock left by
// a dead process taken over with a warning, another machine's lock refused.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <climits>
#include <filesystem>
#include <string>

#include "qlora/ckpt/lock.h"
#include "qlora/common/errors.h"
#include "support/test_support.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;

std::string host() {
  char name[HOST_NAME_MAX + 1] = {};
  gethostname(name, sizeof name - 1);
  return name;
}

// A PID that is not running: a child that has exited and been reaped.
long dead_pid() {
  const pid_t pid = fork();
  if (pid == 0) _exit(0);
  int status = 0;
  waitpid(pid, &status, 0);
  return pid;
}

TEST(CkptLock, SecondHolderIsRefusedNamingTheFirst) {
  const std::string dir = testing::make_temp_dir("lock_busy") + "/out";
  {
    ckpt::OutputDirLock first(dir);
    EXPECT_TRUE(fs::exists(first.path()));
    try {
      ckpt::OutputDirLock second(dir);
      FAIL() << "a second lock on the same directory was granted";
    } catch (const InputError& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find("in use by another qlora run"), std::string::npos) << m;
      EXPECT_NE(m.find("process " + std::to_string(getpid()) + " on host " + host()), std::string::npos) << m;
      EXPECT_NE(m.find("output.dir"), std::string::npos) << m;
    }
  }
  // Released: the file is gone and the next run takes it without a word.
  EXPECT_FALSE(fs::exists(dir + "/" + ckpt::kLockFile));
  std::string warning;
  ckpt::OutputDirLock again(dir, &warning);
  EXPECT_EQ(warning, "");
}

// A holder in another process (flock is per open file, so a child's lock is
// another run's): refused while it lives; once it is killed the lock file it
// left is taken over with a warning naming it.
TEST(CkptLock, LockOfAKilledProcessIsTakenOverWithAWarning) {
  const std::string dir = testing::make_temp_dir("lock_killed");
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  const pid_t child = fork();
  if (child == 0) {
    try {
      ckpt::OutputDirLock held(dir);
      (void)!write(ready[1], "x", 1);
      pause();
    } catch (...) {
    }
    _exit(1);
  }
  char c = 0;
  ASSERT_EQ(read(ready[0], &c, 1), 1);
  EXPECT_THROW(ckpt::OutputDirLock busy(dir), InputError);
  kill(child, SIGKILL);
  int status = 0;
  waitpid(child, &status, 0);
  ASSERT_TRUE(fs::exists(dir + "/" + ckpt::kLockFile));  // kill -9: nobody removed it
  std::string warning;
  ckpt::OutputDirLock taken(dir, &warning);
  EXPECT_NE(warning.find("taking over"), std::string::npos) << warning;
  EXPECT_NE(warning.find("process " + std::to_string(child)), std::string::npos) << warning;
  close(ready[0]);
  close(ready[1]);
}

TEST(CkptLock, StaleFileOnThisHostIsTakenOverAnotherHostsIsRefused) {
  const std::string dir = testing::make_temp_dir("lock_stale");
  const long pid = dead_pid();
  testing::write_file(dir, ckpt::kLockFile,
                      "{\"pid\":" + std::to_string(pid) + ",\"host\":\"" + host() + "\",\"started\":\"x\"}\n");
  {
    std::string warning;
    ckpt::OutputDirLock taken(dir, &warning);
    EXPECT_NE(warning.find("process " + std::to_string(pid)), std::string::npos) << warning;
  }
  testing::write_file(dir, ckpt::kLockFile, "{\"pid\":42,\"host\":\"another-machine-xyz\",\"started\":\"x\"}\n");
  try {
    ckpt::OutputDirLock refused(dir);
    FAIL() << "another machine's lock was taken over";
  } catch (const InputError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("another-machine-xyz"), std::string::npos) << m;
    EXPECT_NE(m.find("delete"), std::string::npos) << m;
  }
  // A file that says nothing (a holder killed before writing it) is stale too.
  testing::write_file(dir, ckpt::kLockFile, "");
  EXPECT_NO_THROW(ckpt::OutputDirLock empty(dir));
}

}  // namespace
}  // namespace qlora
