// Shared helpers for the test executables: run the real `qlora` binary and
// capture what it printed and its exit code; write scratch files.
#pragma once

#include <string>
#include <vector>

#include "qlora/common/errors.h"

namespace qlora::testing {

struct CommandResult {
  int exit_code = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};

// Runs `qlora <args>` (QLORA_BIN) from the source directory; args are passed
// through /bin/sh, so quote them as a shell would.
CommandResult run_qlora(const std::string& args);

// A fresh scratch directory under the system temp dir, unique per call.
std::string make_temp_dir(const std::string& tag);

// The bytes of a file ("" when it cannot be read).
std::string slurp(const std::string& path);

// Writes `text` to `dir/name` and returns the full path.
std::string write_file(const std::string& dir, const std::string& name, const std::string& text);

// Absolute path of a file in the source tree ("configs/x.yaml").
std::string source_path(const std::string& relative);

// Runs `cmd` through /bin/sh; returns its stdout and sets *exit_code.
std::string run_capture(const std::string& cmd, int* exit_code);

// The interpreter in QLORA_PYTHON (ctest sets it from the CMake option) when it
// can import every module of `modules` ("transformers, peft"); otherwise "" and
// *why says what is missing (for GTEST_SKIP).
std::string python_with(const std::string& modules, std::string* why);

// The message of the InputError `fn` throws ("" when it throws none).
template <class Fn>
std::string error_of(Fn fn) {
  try {
    fn();
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

}  // namespace qlora::testing
