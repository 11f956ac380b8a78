#include "support/test_support.h"

#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace qlora::testing {
namespace fs = std::filesystem;

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string make_temp_dir(const std::string& tag) {
  static std::atomic<int> counter{0};
  fs::path dir = fs::temp_directory_path() /
                 ("qlora-test-" + tag + "-" + std::to_string(::getpid()) + "-" +
                  std::to_string(counter++));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

std::string write_file(const std::string& dir, const std::string& name, const std::string& text) {
  fs::path p = fs::path(dir) / name;
  fs::create_directories(p.parent_path());
  std::ofstream out(p, std::ios::binary);
  out << text;
  if (!out) throw std::runtime_error("test support: cannot write " + p.string());
  return p.string();
}

std::string source_path(const std::string& relative) {
  return (fs::path(QLORA_SOURCE_DIR) / relative).string();
}

std::string run_capture(const std::string& cmd, int* exit_code) {
  std::string out;
  FILE* f = ::popen(cmd.c_str(), "r");
  if (!f) {
    *exit_code = -1;
    return out;
  }
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
  const int status = ::pclose(f);
  *exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return out;
}

std::string python_with(const std::string& modules, std::string* why) {
  const char* p = std::getenv("QLORA_PYTHON");
  if (!p || !*p) {
    *why = "QLORA_PYTHON is not set (configure with -DQLORA_PYTHON=.venv/bin/python and run through ctest)";
    return "";
  }
  int status = -1;
  run_capture("'" + std::string(p) + "' -c 'import " + modules + "' 2>&1", &status);
  if (status != 0) {
    *why = std::string(p) + " cannot import " + modules + " (bash scripts/setup.sh --tests installs them)";
    // scripts/test.sh installs the oracles and sets QLORA_REQUIRE_ORACLES: there a missing
    // module is a failure, never a skip that reads as a pass.
    if (const char* r = std::getenv("QLORA_REQUIRE_ORACLES"); r && *r && std::string(r) != "0") ADD_FAILURE() << *why;
    return "";
  }
  return p;
}

CommandResult run_qlora(const std::string& args) {
  std::string dir = make_temp_dir("run");
  fs::path out = fs::path(dir) / "stdout", err = fs::path(dir) / "stderr";
  std::string cmd = "cd '" + std::string(QLORA_SOURCE_DIR) + "' && '" + QLORA_BIN + "' " + args +
                    " >'" + out.string() + "' 2>'" + err.string() + "'";
  int status = std::system(cmd.c_str());
  CommandResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = slurp(out);
  r.err = slurp(err);
  fs::remove_all(dir);
  return r;
}

}  // namespace qlora::testing
